//! `fork()`: a child process gets a copy-on-write copy of the parent's anonymous private memory,
//! hetmem's own mappings ([`Space::map_anon`]) and adopted memory ([`Space::adopt`]) alike,
//! including the pages that were in device memory at the fork, as the kernel gives it.
//!
//! The kernel copies only what the CPU's page tables hold, and the child inherits no
//! userfaultfd registration (that needs `UFFD_FEATURE_EVENT_FORK`, which unprivileged users are
//! refused): the child's copy is plain memory, served by the kernel alone, and hetmem is inert
//! in the child (its calls return [`Error::Forked`]). So hetmem's fork handlers
//! (`pthread_atfork`, installed with the first space) do this around the fork:
//!
//! 1. **prepare** (the forking thread): takes the *fork gate* exclusively, then, space by space,
//!    the state lock once no migration is in flight ([`SpaceCore::lock_state_for`]); copies
//!    every page of an inheritable mapping that is in device-private memory or held exclusively
//!    by a device into the CPU view (the page's state stays what it is: the data stays in
//!    device memory); and sets `fork_hold`. From then on every other thread that takes a
//!    space's state lock waits until the fork is done ([`SpaceCore::lock_state`]): no CPU fault
//!    is served, no migration starts or ends, no device maps a system page anew (the kernel
//!    holds the parent's mmap lock across a fork likewise).
//! 2. the kernel copies the page tables: the child shares every present page copy-on-write.
//! 3. **parent**: drops the copies again (the pages are in device memory, as before the fork),
//!    clears `fork_hold`, releases the gate. **child**: clears `fork_hold` in its (inert) copy
//!    of the state and releases its copy of the gate.
//!
//! The parent's placement is unchanged by a fork; the price is one copy of each device-resident
//! page per fork (a `fork` + `exec` pays it too). Pages in device-coherent memory are CPU pages
//! (in the emulation, the coherent frame is the CPU page): the child shares them copy-on-write
//! as any. The parent's are write-protected after the fork and marked (`Pte::fork_cow`), and
//! devices lose write access to them; the first store to one (the CPU's or a device's) faults
//! to hetmem, which, while the child still maps the page, moves it to system memory before the
//! kernel's copy-on-write copies it, as with the kernel, whose copy lands in system memory (a
//! snapshot then reads WRITE); a page the parent holds alone again (the child exited or wrote
//! its own copy) stays where it is (`SpaceCore::resolve_fork_cow`). A raw `clone` system call
//! runs no
//! handler: pages in device memory then read zeros in the child. A device writing its own
//! device-private frames during a fork is not held up: the child sees the page as copied.
//!
//! # A child's own hetmem
//!
//! A child may make hetmem objects of its own (spaces, devices; it may adopt the memory it
//! inherited), as a child of a program written for the kernel's test device opens a device
//! of its own. So nothing of the parent's may stand in its way there: the process-wide tables
//! (spaces, device ids, file caches, the event reader's) are locked by the prepare and
//! unlocked after the fork on both sides (a lock another thread held at the fork would stay
//! held in the child forever); the child forgets the parent's fault ranges; the event reader is
//! per process (the parent's thread does not exist in the child). The parent's objects are
//! inert in the child and must not be used there; dropping them does nothing but free memory.
//!
//! Mappings a child does not inherit: private file mappings (their pages not yet read hold
//! nothing: the child would read zeros) and shared file mappings are `MADV_DONTFORK` (an
//! access in the child is SIGSEGV); shared anonymous memory is shared with the child as the
//! kernel's (docs/filesystem-contract.md).
//!
//! Locks: the fork gate (a process-wide `std` reader-writer lock, lock −1 of
//! docs/architecture.md) is held exclusively by the forking thread from prepare to parent, and
//! shared by every migration from setup to finalize and by device-exclusive grants ([`gate`]),
//! so that a fork waits for those in flight and none starts during it. A thread that finds
//! `fork_hold` set under a state lock releases that lock and waits on the gate (shared) before
//! taking it again. The forking thread takes each space's state lock once, one at a time,
//! holding the gate.

use super::*;

/// Held exclusively by the forking thread from prepare to parent/child; a thread that finds a
/// space held for a fork waits on it ([`wait_until_done`]).
static FORK_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Whether the fork handlers are installed (with the first space).
static HANDLERS: std::sync::Once = std::sync::Once::new();

thread_local! {
    /// The forking thread's hold of [`FORK_GATE`] and the spaces it prepared, from `prepare`
    /// until `parent`/`child` (the forking thread runs all three; in the child it is the only
    /// thread).
    static FORKING: std::cell::RefCell<Option<Forking>> = const { std::cell::RefCell::new(None) };
}

struct Forking {
    _gate: std::sync::RwLockWriteGuard<'static, ()>,
    spaces: Vec<Arc<SpaceCore>>,
    /// The process-wide tables' locks, held across the fork (module doc, "A child's own
    /// hetmem"): dropped in the parent and in the child.
    tables: Vec<Box<dyn std::any::Any>>,
}

/// Locks a process-wide table for a fork and returns the guard.
type TableHold = fn() -> Box<dyn std::any::Any>;

/// Functions that lock a process-wide table of a module above this one (the device ids) for a
/// fork, registered by that module ([`register_fork_table`]).
static FORK_TABLES: std::sync::Mutex<Vec<TableHold>> = std::sync::Mutex::new(Vec::new());

/// Registers `hold`, which locks a process-wide table and returns the guard, to be held across
/// every fork (so that a child that makes hetmem objects never finds it locked forever by a
/// thread that does not exist there). Leaf locks only.
pub(crate) fn register_fork_table(hold: TableHold) {
    let mut t = FORK_TABLES.lock().unwrap_or_else(|p| p.into_inner());
    if !t.contains(&hold) {
        t.push(hold);
    }
}

/// Locks every process-wide table for the fork (the forking thread, at the end of prepare).
fn hold_tables() -> Vec<Box<dyn std::any::Any>> {
    let hooks: Vec<fn() -> Box<dyn std::any::Any>> = FORK_TABLES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    held.push(Box::new(SPACES.lock().unwrap_or_else(|p| p.into_inner())));
    held.push(crate::mm::hold_for_fork());
    held.push(crate::pagecache::hold_for_fork());
    held.extend(hooks.into_iter().map(|h| h()));
    held
}

/// Installs the fork handlers, once per process.
pub(crate) fn install_handlers() {
    HANDLERS.call_once(|| {
        if let Err(e) = sys::on_fork(before_fork, after_fork_parent, after_fork_child) {
            tracing::warn!(target: "hetmem", error = %e, "fork handlers not installed");
        }
    });
}

/// A shared hold of the fork gate, for a migration from its setup to its finalize (and a
/// device-exclusive grant): no fork starts while one is in flight, so that the prepare never
/// waits for a migration whose thread waits for a space the prepare already holds.
pub(crate) fn gate() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK_GATE.read().unwrap_or_else(|p| p.into_inner())
}

/// Whether `st` is held for a fork that another thread is making (the caller must release it
/// and [`wait_until_done`]).
pub(crate) fn held_against_me(st: &SpaceState) -> bool {
    st.fork_hold.is_some_and(|parent| parent == sys::getpid())
        && FORKING.with(|f| f.borrow().is_none())
}

/// Waits until the fork in progress is done.
pub(crate) fn wait_until_done() {
    drop(FORK_GATE.read().unwrap_or_else(|p| p.into_inner()));
}

extern "C" fn before_fork() {
    let gate = FORK_GATE.write().unwrap_or_else(|p| p.into_inner());
    let spaces: Vec<Arc<SpaceCore>> = {
        let t = SPACES.lock().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .filter_map(|s| match s {
                Some(SpaceSlot::Live(w)) => w.upgrade(),
                _ => None,
            })
            .filter(|c| c.check_process().is_ok())
            .collect()
    };
    FORKING.with(|f| {
        *f.borrow_mut() = Some(Forking {
            _gate: gate,
            spaces: Vec::new(),
            tables: Vec::new(),
        })
    });
    for core in &spaces {
        core.prepare_fork();
    }
    let tables = hold_tables();
    FORKING.with(|f| {
        if let Some(f) = f.borrow_mut().as_mut() {
            f.spaces = spaces;
            f.tables = tables;
        }
    });
}

extern "C" fn after_fork_parent() {
    let Some(forking) = FORKING.with(|f| f.borrow_mut().take()) else {
        return;
    };
    drop(forking.tables);
    // Still the forking thread for this: the holds are cleared by the thread that set them.
    FORKING.with(|f| {
        *f.borrow_mut() = Some(Forking {
            _gate: forking._gate,
            spaces: Vec::new(),
            tables: Vec::new(),
        })
    });
    for core in &forking.spaces {
        core.finish_fork();
    }
    FORKING.with(|f| f.borrow_mut().take());
}

extern "C" fn after_fork_child() {
    // The only thread of the child. It takes no lock: another thread of the parent may have
    // held a space's state lock at the fork (taking it to find the hold), and the child's copy
    // of that lock stays held forever. The holds stay set in the child's copies of the states,
    // naming the parent ([`held_against_me`] ignores them here); hetmem's objects are inert in
    // the child anyway. The copies stay (they are the child's memory). The gate's hold goes;
    // the spaces are not dropped here (no destructor runs in the child's handler).
    if let Some(forking) = FORKING.with(|f| f.borrow_mut().take()) {
        let Forking {
            _gate,
            spaces,
            tables,
        } = forking;
        std::mem::forget(spaces);
        drop(tables);
        drop(_gate);
    }
    // The parent's address ranges are the child's plain memory: they route no fault here, and
    // the child may adopt them.
    sys::forget_inherited_fault_ranges();
    sys::forget_unfollowed_removes();
}

impl SpaceCore {
    /// Prepare, for this space (module doc, step 1).
    fn prepare_fork(&self) {
        let whole = self.mm.reservation();
        let mut st = self.lock_state_for(whole);
        let mut copies = Vec::new();
        for v in st.vmas.values() {
            if v.file.is_some() {
                // Not inherited (MADV_DONTFORK), or shared with the child through its memfd.
                continue;
            }
            for (k, pte) in v.ptes.iter().enumerate() {
                if !matches!(pte.state(), PageState::Device | PageState::Exclusive) {
                    continue;
                }
                let a = v.range.start.add(k * PAGE_SIZE);
                let (pm, frame, _) = pte.device_frame().expect("device or stash frame");
                let pool = self.frame_pool(&st, *pte, pm);
                // Write-protected: a store by another thread before the parent drops the copy
                // again faults, waits for the fork, and is served from the device's data
                // (unprotected, it landed in the copy and was lost: found by review).
                match self.install_from_frame(a, &pool, frame.offset(), PAGE_SIZE, v.mode, true) {
                    Ok(()) => match copies.last_mut() {
                        Some(VaRange { end, .. }) if *end == a => *end = a.add(PAGE_SIZE),
                        _ => copies.push(VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        }),
                    },
                    Err(e) => tracing::warn!(
                        target: "hetmem",
                        addr = %a,
                        error = ?e,
                        "a page in device memory could not be copied for a forked child (it reads zeros there)"
                    ),
                }
            }
        }
        st.fork_copies = copies;
        st.fork_hold = Some(sys::getpid());
    }

    /// Parent, for this space (module doc, step 3): the copies go, the hold ends.
    fn finish_fork(&self) {
        let mut st = self.lock_state();
        for r in std::mem::take(&mut st.fork_copies) {
            let res = self.mm.zap(r);
            if res.is_ok()
                && let Some(v) = st.vma(r.start)
            {
                // In device-private memory again: marked again where the space shows it, a
                // run of such pages at a time.
                let mode = v.mode;
                let private = |p: usize| {
                    st.pte(r.start.add(p * PAGE_SIZE))
                        .is_some_and(|pte| pte.state() == PageState::Device)
                };
                let mut p = 0;
                while p < r.pages() {
                    if !private(p) {
                        p += 1;
                        continue;
                    }
                    let mut e = p + 1;
                    while e < r.pages() && private(e) {
                        e += 1;
                    }
                    self.mm.mark_device_private(
                        VaRange {
                            start: r.start.add(p * PAGE_SIZE),
                            end: r.start.add(e * PAGE_SIZE),
                        },
                        mode,
                    );
                    p = e;
                }
            }
            if let Err(e) = res {
                // The CPU would read the copy instead of faulting to the device's data: never
                // silently.
                let mut b = [0u8; 18];
                let msg = format!(" ({e})\n");
                sys::abort_with(&[
                    b"hetmem: after a fork, the parent's copies of device-resident pages at ",
                    sys::hex(r.start.get(), &mut b),
                    b" could not be dropped",
                    msg.as_bytes(),
                ]);
            }
        }
        // Coherent pages are CPU pages that the child now shares copy-on-write: the parent's
        // first store to one must find it in system memory, where the kernel's copy lands.
        let mut runs: Vec<(VaRange, FaultMode)> = Vec::new();
        for v in st
            .vmas
            .values()
            .filter(|v| v.file.is_none() && v.prot.writable())
        {
            for (k, pte) in v.ptes.iter().enumerate() {
                if !pte.is_coherent() {
                    continue;
                }
                let a = v.range.start.add(k * PAGE_SIZE);
                match runs.last_mut() {
                    Some((r, m)) if r.end == a && *m == v.mode => r.end = a.add(PAGE_SIZE),
                    _ => runs.push((
                        VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        },
                        v.mode,
                    )),
                }
            }
        }
        for (r, mode) in runs {
            // Devices that map the pages writable lose that (as the kernel's fork invalidates
            // the parent's copy-on-write pages): their next store faults and is resolved as a
            // CPU store (`SpaceCore::resolve_fork_cow`). First, so that a device's store in
            // flight (its copy runs under its page-table lock, which the invalidation waits
            // for) never meets the protection: in a thread-mode mapping that store is a plain
            // one, and a write-protect fault inside hetmem's copy aborts the process (found
            // from outside: a program forking while a coherent device wrote its memory).
            self.invalidate(&st, r, NotifyEvent::ProtectionPage, None);
            if self.mm.write_protect(r, true, mode).is_err() {
                continue;
            }
            for p in 0..r.pages() {
                let a = r.start.add(p * PAGE_SIZE);
                if let Some(pte) = st.pte(a) {
                    st.set_pte(a, pte.with_fork_cow());
                }
            }
        }
        st.fork_hold = None;
        drop(st);
        self.notify_migrations_done();
    }
}
