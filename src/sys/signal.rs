//! The process-wide SIGBUS handler, the fault-range registry, no-fault zones and the
//! per-thread state the fault service keeps (readable in signal context).

#![allow(unsafe_code)]

use super::*;

// ---------------------------------------------------------------------------------------------
// The SIGBUS handler
// ---------------------------------------------------------------------------------------------

/// Something that serves faults in a range of addresses (an address space).
///
/// [`FaultTarget::handle_fault`] runs in signal context for SIGBUS-mode ranges: no allocation,
/// no panic, no lock the interrupted thread may hold. It returns true when it resolved the fault
/// (the access is retried) and false when the address is not its (the SIGBUS handler then chains
/// to the previous handler).
pub trait FaultTarget: Send + Sync {
    /// Serves a fault at `addr` (`write`: the access was a store).
    fn handle_fault(&self, addr: usize, write: bool) -> bool;
    /// The program moved `from..from + len` (inside this target's range) to `to` with a direct
    /// mremap(2). Called by an event reader thread, never in signal context.
    fn remapped(&self, from: usize, to: usize, len: usize);
    /// The program unmapped `start..end` (overlapping this target's range) with a direct
    /// munmap(2) (`UFFD_EVENT_UNMAP`, asked for by adopted memory only). Called by an event
    /// reader thread after the kernel dropped the range.
    fn unmapped(&self, start: usize, end: usize) {
        let _ = (start, end);
    }
    /// The program dropped the pages of `start..end` (overlapping this target's range) with a
    /// direct `madvise` (`UFFD_EVENT_REMOVE`). Called by an event reader thread after the
    /// kernel read the event (it drops the CPU's pages once the event is read).
    fn removed(&self, start: usize, end: usize) {
        let _ = (start, end);
    }
    /// A read of `addr` by hetmem's own copy of managed memory (inside a [`NoFaultZone`] of
    /// kind [`OWN_COPY_ZONE`]) faulted: the page is missing although the copy's caller saw it
    /// present, so the program dropped it meanwhile (a direct madvise racing a migration).
    /// Without taking any lock (the copier holds the space's), map what the drop leaves there,
    /// if that can be done so (the zero page, in a signal-mode anonymous mapping): true then,
    /// and the copy goes on reading it. Runs in signal context.
    fn fill_dropped_page(&self, addr: usize) -> bool {
        let _ = addr;
        false
    }
    /// For the handler thread of thread-mode mappings, a fault at `addr` taken by a thread
    /// inside a [`NoFaultZone`]: whether the page is one this target holds as present in
    /// system memory (so the program dropped it behind hetmem's back: it may get the zero
    /// page), without waiting for any lock; `None` when that cannot be told now (a lock is
    /// held, perhaps by the faulting thread itself).
    fn holds_present(&self, addr: usize) -> Option<bool> {
        let _ = addr;
        None
    }
    /// Whether memory in `start..end` (inside this target's range) is managed by it now. Not
    /// called in signal context (it may take locks).
    fn manages(&self, start: usize, end: usize) -> bool {
        let _ = (start, end);
        true
    }
}

/// Direct mremaps reported and not yet followed (see [`RemapWindow`]): while non-zero, a
/// signal-mode fault that nobody serves waits for them and retries instead of taking the
/// default action: it may be an access to the moved range before hetmem has followed the move
/// (the program's mremap returns as soon as the event is read).
static REMAPS_PENDING: AtomicUsize = AtomicUsize::new(0);

/// Held by an event reader from before it reads a userfaultfd's messages until it has
/// followed every move among them.
#[derive(Debug)]
pub struct RemapWindow(());

impl RemapWindow {
    /// Opens the window (before the read).
    pub fn open() -> RemapWindow {
        REMAPS_PENDING.fetch_add(1, Ordering::SeqCst);
        RemapWindow(())
    }
}

impl Drop for RemapWindow {
    fn drop(&mut self) {
        REMAPS_PENDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Calls `f(start, end, target)` for each registered range that `wanted(start, end)` picks
/// (live while `f` runs: its `users` count holds off `FaultRange::drop`; ranges not picked cost
/// two loads, no atomic write) until `f` returns true; returns whether one did. Not for signal
/// context (`f` may take locks).
fn each_target(
    wanted: impl Fn(usize, usize) -> bool,
    mut f: impl FnMut(usize, usize, &Arc<dyn FaultTarget>) -> bool,
) -> bool {
    let range = |slot: &Slot| {
        (
            slot.start.load(Ordering::SeqCst),
            slot.end.load(Ordering::SeqCst),
        )
    };
    for slot in SLOTS.iter() {
        let (s, e) = range(slot);
        if s >= e || !wanted(s, e) {
            continue;
        }
        slot.users.fetch_add(1, Ordering::SeqCst);
        // Again under `users`: the slot may have been released and reused meanwhile.
        let (s, e) = range(slot);
        let p = slot.target.load(Ordering::SeqCst);
        let done = !p.is_null() && s < e && wanted(s, e) && {
            // SAFETY: `p` stays valid while `users` is non-zero (FaultRange::drop waits for it).
            let t: &Arc<dyn FaultTarget> = unsafe { &*p };
            f(s, e, t)
        };
        slot.users.fetch_sub(1, Ordering::SeqCst);
        if done {
            return true;
        }
    }
    false
}

/// Routes a move reported by a userfaultfd to the target whose range holds `from`.
pub fn dispatch_remap(from: usize, to: usize, len: usize) -> bool {
    each_target(
        |s, e| s <= from && from < e,
        |_, _, t| {
            t.remapped(from, to, len);
            true
        },
    )
}

/// Routes an unmap reported by a userfaultfd to every target whose range it overlaps.
pub fn dispatch_unmap(start: usize, end: usize) {
    each_overlapping(start, end, |t, s, e| t.unmapped(s, e));
}

/// Routes a drop of pages reported by a userfaultfd to every target whose range it overlaps.
pub fn dispatch_remove(start: usize, end: usize) {
    each_overlapping(start, end, |t, s, e| t.removed(s, e));
}

/// `f(target, s, e)` for every target whose range overlaps `start..end`, with `s..e` the
/// overlap.
fn each_overlapping(start: usize, end: usize, f: impl Fn(&Arc<dyn FaultTarget>, usize, usize)) {
    each_target(
        |s, e| s < end && start < e,
        |s, e, t| {
            f(t, start.max(s), end.min(e));
            false
        },
    );
}

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    target: AtomicPtr<Arc<dyn FaultTarget>>,
    users: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    target: AtomicPtr::new(ptr::null_mut()),
    users: AtomicUsize::new(0),
};

/// Most address ranges (address spaces, bench ranges) registered at once.
pub const MAX_FAULT_RANGES: usize = 64;
static SLOTS: [Slot; MAX_FAULT_RANGES] = [EMPTY_SLOT; MAX_FAULT_RANGES];

/// A registration made by [`register_fault_range`]; dropping it unregisters the range and
/// waits until no handler is still using the target.
#[derive(Debug)]
pub struct FaultRange {
    slot: usize,
    /// The process that registered it: dropped in a forked child (which forgot the parent's
    /// ranges, [`forget_inherited_fault_ranges`]), it touches nothing.
    pid: i32,
}

/// In a forked child (its fork handler, the only thread): forgets every range the parent
/// registered, whose memory is the child's plain memory now, without dropping their targets
/// (the parent's objects, inert here). Async-signal-safe: atomic stores only.
pub fn forget_inherited_fault_ranges() {
    for slot in SLOTS.iter() {
        slot.start.store(0, Ordering::SeqCst);
        slot.end.store(0, Ordering::SeqCst);
        slot.users.store(0, Ordering::SeqCst);
        slot.target.store(ptr::null_mut(), Ordering::SeqCst);
    }
}

/// Whether `start..end` overlaps a registered range at all (whatever its target manages in it
/// now). Lock-free.
pub fn overlaps_registered_range(start: usize, end: usize) -> bool {
    SLOTS.iter().any(|slot| {
        let (s, e) = (
            slot.start.load(Ordering::SeqCst),
            slot.end.load(Ordering::SeqCst),
        );
        s < e && s < end && start < e
    })
}

/// Whether `start..start + len` overlaps memory some address space of hetmem manages (a
/// registered range, whose target says so: a hole the program unmapped in adopted memory is
/// not). Not for signal context.
pub fn overlaps_fault_range(start: usize, len: usize) -> bool {
    let end = start.saturating_add(len);
    each_target(
        |s, e| s < end && start < e,
        |s, e, t| t.manages(start.max(s), end.min(e)),
    )
}

/// Routes faults in `start..end` to `target` (lock-free lookup from the SIGBUS handler and the
/// handler threads).
pub fn register_fault_range(
    start: usize,
    end: usize,
    target: Arc<dyn FaultTarget>,
) -> io::Result<FaultRange> {
    let boxed = Box::into_raw(Box::new(target));
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot
            .target
            .compare_exchange(ptr::null_mut(), boxed, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            slot.start.store(start, Ordering::SeqCst);
            slot.end.store(end, Ordering::SeqCst);
            return Ok(FaultRange {
                slot: i,
                pid: super::getpid(),
            });
        }
    }
    // SAFETY: `boxed` came from Box::into_raw above and was never published.
    drop(unsafe { Box::from_raw(boxed) });
    Err(io::Error::new(
        io::ErrorKind::OutOfMemory,
        "too many hetmem address ranges",
    ))
}

impl Drop for FaultRange {
    fn drop(&mut self) {
        if self.pid != super::getpid() {
            return;
        }
        let slot = &SLOTS[self.slot];
        slot.start.store(0, Ordering::SeqCst);
        slot.end.store(0, Ordering::SeqCst);
        // Wait for lookups that may have seen the old range. A lookup increments `users` before
        // reading the range, so once `users` is zero after the range was cleared, no lookup can
        // still use the target. Bounded: lookups hold the slot only while serving one fault.
        while slot.users.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        let p = slot.target.swap(ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` came from Box::into_raw in register_fault_range; no handler uses it
            // any more (waited above) and the slot no longer publishes it.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

thread_local! {
    /// What the calling thread is doing while it must not fault on a managed address (a hetmem
    /// lock is held across a copy of managed memory); empty outside such a zone. A `const`
    /// thread-local of a `Copy` type: reading it from the SIGBUS handler allocates nothing and
    /// initialises nothing lazily.
    static NO_FAULT: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
    /// This thread's id, once asked (0: not yet).
    static TID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

thread_local! {
    /// On the handler thread of thread-mode mappings, while it serves a fault
    /// ([`serve_thread_fault`]): 1, or 2 once the fault service left the fault to wait in the
    /// kernel ([`defer_thread_fault`]); 0 elsewhere.
    static DEFERRED: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Serves a fault of a thread-mode mapping at `addr` on its handler thread ([`dispatch_fault`]);
/// true when the fault service left the faulting thread asleep in the kernel
/// ([`defer_thread_fault`]): the handler must not wake it.
pub fn serve_thread_fault(addr: usize, write: bool) -> bool {
    DEFERRED.with(|d| d.set(1));
    dispatch_fault(addr, write);
    DEFERRED.with(|d| d.replace(0)) == 2
}

/// Called by the fault service for a fault on a page a migration in flight holds: on the
/// handler thread of thread-mode mappings ([`serve_thread_fault`]) it marks the fault as left
/// asleep in the kernel until the space wakes it when the migration is done, and returns true;
/// elsewhere false (the caller waits for the migration itself). Waiting on the handler thread
/// would hold up the faults the migration itself may take; waking the faulting thread at once
/// to retry made it spin with the handler thread, and with them, on this kernel, a migration's
/// `UFFDIO_MOVE` in the kernel, for good, about once in 50 runs of the test.
pub fn defer_thread_fault() -> bool {
    DEFERRED.with(|d| {
        if d.get() == 0 {
            return false;
        }
        d.set(2);
        true
    })
}

thread_local! {
    /// Set while this thread runs hetmem's SIGBUS handler.
    static IN_SIGNAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Why the last fault this thread's fault service could not serve was not served ("" if it
    /// was, or was not hetmem's).
    static UNSERVED: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

/// Records why the fault being served cannot be served (called by the fault service, in the
/// faulting thread); the SIGBUS handler prints it if the access then takes the default action.
pub fn note_unserved_fault(why: &'static str) {
    UNSERVED.with(|c| c.set(why));
}

/// Whether the calling thread is running hetmem's SIGBUS handler (where nothing may allocate).
pub fn in_signal_handler() -> bool {
    IN_SIGNAL.with(|c| c.get())
}

/// An atomic cell holding a `&'static Location` (where a lock was taken, for the lock watch):
/// only `&'static` references go in, so what comes out is one.
#[derive(Debug)]
pub struct AtomicLocation(AtomicPtr<std::panic::Location<'static>>);

impl AtomicLocation {
    /// Empty.
    pub const fn new() -> AtomicLocation {
        AtomicLocation(AtomicPtr::new(ptr::null_mut()))
    }
    /// Stores `l`.
    pub fn store(&self, l: &'static std::panic::Location<'static>) {
        self.0.store(
            (l as *const std::panic::Location<'static>).cast_mut(),
            Ordering::SeqCst,
        );
    }
    /// The location stored last, if any.
    pub fn load(&self) -> Option<&'static std::panic::Location<'static>> {
        let p = self.0.load(Ordering::SeqCst);
        // SAFETY: the only non-null values ever stored are `&'static Location<'static>`
        // references (`store`), which live for the whole program and are never written through.
        unsafe { p.as_ref() }
    }
}

impl Default for AtomicLocation {
    fn default() -> Self {
        Self::new()
    }
}

/// The [`NoFaultZone`] of hetmem's own copies of managed memory under a hetmem lock (a
/// migration's copy into device frames, a device's reads and stores of system and coherent
/// pages under its page-table lock): a fault there on a page the program dropped meanwhile is
/// recovered ([`FaultTarget::fill_dropped_page`]) instead of aborting.
pub const OWN_COPY_ZONE: &str = "hetmem's own copy of managed memory (under a hetmem lock)";

/// How many pages no-fault zones have refilled after the program dropped them (see
/// [`note_zone_refill`]).
static REFILLS: AtomicUsize = AtomicUsize::new(0);
const REFILL_SLOTS: usize = 64;
/// Bits of a refill's number kept beside its page in one word of [`REFILLED`].
const REFILL_NUMBER_BITS: u32 = 28;
/// The latest 64 refilled pages, each one word (so that a reader never pairs one refill's page
/// with another's number: found by review): the page number above, the low
/// [`REFILL_NUMBER_BITS`] bits of its number in `REFILLS` below; 0 for none. Lock-free: written
/// in signal context too.
#[allow(clippy::declare_interior_mutable_const)]
const NO_REFILL: AtomicU64 = AtomicU64::new(0);
static REFILLED: [AtomicU64; REFILL_SLOTS] = [NO_REFILL; REFILL_SLOTS];

fn refill_number(n: usize) -> u64 {
    n as u64 & ((1 << REFILL_NUMBER_BITS) - 1)
}

/// A zone's copy met `page` missing (the program dropped it) and it was refilled with zeros:
/// the kernel's drop of it has happened, and what it holds now is newer than the drop. The
/// follow of a drop waits until the kernel has dropped the pages it held present; a page a
/// device store refilled meanwhile holds data again, and without this the follow waited its
/// whole bound for it (found by a test: every drop racing a device's stores took that long).
pub fn note_zone_refill(page: usize) {
    let n = REFILLS.fetch_add(1, Ordering::SeqCst) + 1;
    let word = ((page / PAGE_SIZE) as u64) << REFILL_NUMBER_BITS | refill_number(n);
    REFILLED[n % REFILL_SLOTS].store(word, Ordering::SeqCst);
}

/// The number of zone refills so far: a follow takes it before it waits, and asks
/// [`zone_refilled_since`] with it.
pub fn zone_refills() -> usize {
    REFILLS.load(Ordering::SeqCst)
}

/// Whether `page` was refilled by a zone after refill number `since` (among the latest 64: an
/// older one reads as not refilled, and its follow waits as before; numbers are compared
/// modulo 2^28, so a follow that waited through 2^27 refills may miss one, and waits).
pub fn zone_refilled_since(page: usize, since: usize) -> bool {
    let mask = (1u64 << REFILL_NUMBER_BITS) - 1;
    REFILLED.iter().any(|w| {
        let w = w.load(Ordering::SeqCst);
        let after = (w & mask).wrapping_sub(refill_number(since)) & mask;
        w != 0
            && (w >> REFILL_NUMBER_BITS) as usize == page / PAGE_SIZE
            && after != 0
            && after < 1 << (REFILL_NUMBER_BITS - 1)
    })
}

/// Thread ids (as the kernel reports them in thread-mode fault messages) of the threads inside
/// a [`NoFaultZone`], so that the handler thread can tell too. Fixed size, lock-free.
const MAX_ZONE_TIDS: usize = 64;
static ZONE_TIDS: [std::sync::atomic::AtomicU32; MAX_ZONE_TIDS] =
    [const { std::sync::atomic::AtomicU32::new(0) }; MAX_ZONE_TIDS];
/// Per slot of [`ZONE_TIDS`]: whether the zone is an [`OWN_COPY_ZONE`] (a copy of pages its
/// space holds present, made with the space's pages marked or its lock held).
static ZONE_OWN_COPY: [std::sync::atomic::AtomicBool; MAX_ZONE_TIDS] =
    [const { std::sync::atomic::AtomicBool::new(false) }; MAX_ZONE_TIDS];

/// A stretch of hetmem code that holds a hetmem lock while it copies managed memory (a device
/// copy under its page-table lock, a migration copy under the space's lock). Such code only
/// touches pages known to be present; if it faults on a managed address anyway, serving the
/// fault would need the lock it holds, or one ordered above it: a deadlock. Inside a zone such a
/// fault aborts the process with a message naming the zone instead (in the SIGBUS handler for
/// signal-mode mappings, in the handler thread for thread-mode ones) — a bug report, not a hang;
/// except where the program dropped the page meanwhile (`madvise`): a missing page in an
/// [`OWN_COPY_ZONE`], read or written (the SIGBUS handler, or [`thread_fault_in_zone`] in thread
/// mode), gets the zero page, as the drop leaves it (a store then lands in a page of its own,
/// as if the device wrote right after the drop).
#[derive(Debug)]
pub struct NoFaultZone {
    prev: &'static str,
    slot: Option<usize>,
}

impl NoFaultZone {
    /// Enters a zone described by `what` (for example "device copy under the page-table
    /// lock").
    pub fn enter(what: &'static str) -> NoFaultZone {
        ZONE_RETRIES.with(|c| c.set(0));
        let prev = NO_FAULT.with(|c| c.replace(what));
        let mut slot = None;
        if prev.is_empty() {
            let tid = TID.with(|t| {
                if t.get() == 0 {
                    t.set(rustix::thread::gettid().as_raw_nonzero().get() as u32);
                }
                t.get()
            });
            // Every zone must be found by the handler thread of thread-mode mappings (a fault
            // in one it cannot tell from a program's would wait for the zone's own copy): with
            // all slots taken, wait for one (zones are short copies).
            loop {
                slot = ZONE_TIDS.iter().position(|t| {
                    t.compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                });
                if let Some(i) = slot {
                    ZONE_OWN_COPY[i].store(what == OWN_COPY_ZONE, Ordering::SeqCst);
                    break;
                }
                rustix::thread::sched_yield();
            }
        }
        NoFaultZone { prev, slot }
    }
}

impl Drop for NoFaultZone {
    fn drop(&mut self) {
        NO_FAULT.with(|c| c.set(self.prev));
        if let Some(i) = self.slot {
            ZONE_OWN_COPY[i].store(false, Ordering::SeqCst);
            ZONE_TIDS[i].store(0, Ordering::SeqCst);
        }
    }
}

/// Whether thread `tid` is inside a zone, for the handler thread (past 64 threads in zones at
/// once, entering one waits for a slot).
fn zone_of_tid(tid: u32) -> Option<usize> {
    if tid == 0 {
        return None;
    }
    ZONE_TIDS
        .iter()
        .position(|t| t.load(Ordering::SeqCst) == tid)
}

/// Writes `parts` to stderr and aborts: async-signal-safe (no allocation, no lock).
pub fn abort_with(parts: &[&[u8]]) -> ! {
    write_stderr_parts(parts);
    std::process::abort()
}

/// Writes `parts` to stderr: async-signal-safe (no allocation, no lock).
fn write_stderr_parts(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: writes a valid byte slice to fd 2; a failed write is ignored (best effort).
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

/// Formats `v` as hex into `buf` (no allocation), returning the digits.
pub fn hex(v: usize, buf: &mut [u8; 18]) -> &[u8] {
    buf[0] = b'0';
    buf[1] = b'x';
    for i in 0..16 {
        let d = (v >> ((15 - i) * 4)) & 0xf;
        buf[2 + i] = b"0123456789abcdef"[d];
    }
    &buf[..]
}

/// Whether `addr` lies in a registered fault range (a managed address).
fn is_managed(addr: usize) -> bool {
    SLOTS.iter().any(|s| {
        !s.target.load(Ordering::SeqCst).is_null()
            && s.start.load(Ordering::SeqCst) <= addr
            && addr < s.end.load(Ordering::SeqCst)
    })
}

/// Whether a fault at `addr` that the handler thread of thread-mode mappings read was taken
/// by thread `tid` inside a [`NoFaultZone`] on a page of managed memory that the program
/// dropped behind hetmem's back (`madvise`): hetmem's own copy met a page its space holds as
/// present. The handler then maps the zero page there (the drop's zeros, as the SIGBUS
/// handler's [`FaultTarget::fill_dropped_page`] does in signal mode) instead of serving it
/// through the space, which would wait for the very copy (a migration's, or a device's under
/// its page-table lock). A missing page in an [`OWN_COPY_ZONE`], read or written, is such a page
/// without asking the space (as in signal mode: the copy's caller saw it present, and only the
/// program takes a page away under the copier's lock, hetmem invalidating the copier's entries
/// first; asking would need the space's lock, which the copier, or the handler thread itself
/// following the drop, may hold: found from outside, a device's store meeting a dropped page
/// hung). A missing page in another zone is one only if the space holds the page present
/// ([`FaultTarget::holds_present`], asked again with a yield while another thread holds the
/// lock, for a bounded time). Any other fault inside a zone (a store to a write-protected page,
/// a page the space does not hold present, or the space's lock held throughout) is a bug of
/// hetmem's or cannot be told apart from one: it aborts with a message, as before.
pub fn thread_fault_in_zone(addr: usize, wp: bool, tid: u32) -> bool {
    let Some(slot) = zone_of_tid(tid) else {
        return false;
    };
    if !is_managed(addr) {
        return false;
    }
    if !wp && ZONE_OWN_COPY[slot].load(Ordering::SeqCst) {
        return true;
    }
    // Only a page hetmem holds present can have been dropped by the program; anything else (a
    // page in device memory, a store to a protected page) is a bug of hetmem's. The space's
    // lock may be held by another thread for a moment (found by review: under contention every
    // such fault aborted): ask again, yielding, for a bounded time; it stays held only where
    // its holder waits for this handler, which no zone can get out of.
    if !wp {
        let mut patience = super::Patience::new();
        while patience.more() {
            match with_target_at(addr, |t| t.holds_present(addr)).flatten() {
                Some(true) => return true,
                Some(false) => break,
                None => rustix::thread::sched_yield(),
            }
        }
    }
    let mut b = [0u8; 18];
    abort_with(&[
        b"hetmem: BUG: a thread holding a hetmem lock faulted on managed address ",
        hex(addr, &mut b),
        b" (thread-mode mapping): serving it would deadlock\n",
    ]);
}

/// Serves a fault at `addr` with the target registered for it; false when none is.
pub fn dispatch_fault(addr: usize, write: bool) -> bool {
    with_target_at(addr, |t| t.handle_fault(addr, write)).unwrap_or(false)
}

/// [`FaultTarget::fill_dropped_page`] of the target whose range holds `addr`.
fn fill_dropped(addr: usize) -> bool {
    with_target_at(addr, |t| t.fill_dropped_page(addr)).unwrap_or(false)
}

/// `f(target)` for the target whose range holds `addr` (kept alive meanwhile by its slot's
/// `users` count), if one does. No allocation, no lock: usable in signal context.
fn with_target_at<R>(addr: usize, mut f: impl FnMut(&Arc<dyn FaultTarget>) -> R) -> Option<R> {
    for slot in SLOTS.iter() {
        if slot.target.load(Ordering::Relaxed).is_null() {
            continue;
        }
        slot.users.fetch_add(1, Ordering::SeqCst);
        let (s, e) = (
            slot.start.load(Ordering::SeqCst),
            slot.end.load(Ordering::SeqCst),
        );
        let p = slot.target.load(Ordering::SeqCst);
        let hit = !p.is_null() && s <= addr && addr < e;
        let out = hit.then(|| {
            // SAFETY: `p` stays valid while `users` is non-zero (FaultRange::drop waits for it).
            let t: &Arc<dyn FaultTarget> = unsafe { &*p };
            f(t)
        });
        slot.users.fetch_sub(1, Ordering::SeqCst);
        if hit {
            return out;
        }
    }
    None
}

static PREV_ACTION: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
static INSTALL: std::sync::Once = std::sync::Once::new();
static INSTALL_ERR: AtomicUsize = AtomicUsize::new(0);

/// Installs the process-wide SIGBUS handler once; later calls are no-ops.
pub fn install_sigbus_handler() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, default" value, filled in below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = sigbus_handler as *const () as usize;
        // No SA_ONSTACK: the fault service runs on the faulting thread's own stack (an alternate
        // signal stack, sized for a stack-overflow report, is too small for it).
        // SA_NODEFER: SIGBUS stays unblocked while the handler runs. A SIGBUS raised inside the
        // handler (a bug: hetmem code touching a managed page it should not, or the previous
        // handler we chain to faulting) is synchronous, and the kernel kills a thread at once,
        // silently, for a synchronous signal it has blocked; unblocked, the nested fault reaches
        // this handler again, which reports it (a no-fault zone's message) or serves it.
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_NODEFER;
        // SAFETY: sigemptyset on a sigset_t we own.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        let prev = Box::leak(Box::new(
            // SAFETY: zeroed sigaction is valid; overwritten by sigaction below.
            unsafe { std::mem::zeroed::<libc::sigaction>() },
        ));
        // SAFETY: installs a handler for SIGBUS; `sa` and `prev` are valid sigaction structs.
        // The previous action is published before the handler can observe it as null only in
        // the window before this call returns, in which case the handler restores the default.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &sa, prev) };
        if rc != 0 {
            INSTALL_ERR.store(
                io::Error::last_os_error().raw_os_error().unwrap_or(1) as usize,
                Ordering::Release,
            );
        } else {
            PREV_ACTION.store(prev, Ordering::Release);
        }
    });
    match INSTALL_ERR.load(Ordering::Acquire) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

thread_local! {
    /// Stores retried on a page found present since the thread entered its zone (see
    /// `sigbus_handler`): a bound, so that a fault that is not what it seems aborts with a
    /// message, not a loop.
    static ZONE_RETRIES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// For the SIGBUS handler: whether a fault at `addr` inside an [`OWN_COPY_ZONE`] is recovered
/// (the access then retries): a load, or a store to a missing page, gets the drop's zero page
/// ([`fill_dropped`]); a store to a page present and not write-protected by now is retried
/// as it is, at most 1,000 times in a zone. Anything else: false (the handler aborts).
fn own_copy_fault_recovered(addr: usize, write: bool) -> bool {
    if write {
        match super::page_state(addr) {
            Some((true, false)) => return ZONE_RETRIES.with(|c| c.replace(c.get() + 1)) < 1000,
            Some((false, _)) => {}
            _ => return false,
        }
    }
    if !fill_dropped(addr) {
        return false;
    }
    note_zone_refill(addr & !(PAGE_SIZE - 1));
    true
}

extern "C" fn sigbus_handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; saving and restoring it keeps the interrupted code's view.
    let errno_slot = unsafe { libc::__errno_location() };
    // SAFETY: `errno_slot` points at this thread's errno.
    let saved_errno = unsafe { *errno_slot };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: for SA_SIGINFO handlers `ctx` is a valid ucontext_t; REG_ERR holds the x86 page
    // fault error code, whose bit 1 says the access was a write.
    let write = unsafe {
        let uc = ctx as *const libc::ucontext_t;
        ((*uc).uc_mcontext.gregs[libc::REG_ERR as usize] & 2) != 0
    };
    let zone = NO_FAULT.with(|c| c.get());
    if !zone.is_empty() && is_managed(addr) {
        // A missing page in hetmem's own copy, read or written: the program dropped it. A
        // store's fault on a page present by now (another thread refilled it, found by review:
        // a second device's copy) is retried; on a write-protected page it is a bug.
        if zone == OWN_COPY_ZONE && own_copy_fault_recovered(addr, write) {
            // SAFETY: restoring this thread's errno.
            unsafe { *errno_slot = saved_errno };
            return;
        }
        let mut b = [0u8; 18];
        abort_with(&[
            b"hetmem: BUG: faulted on managed address ",
            hex(addr, &mut b),
            b" inside a no-fault zone (",
            zone.as_bytes(),
            b"): serving it would deadlock\n",
        ]);
    }
    let was_in = IN_SIGNAL.with(|c| c.replace(true));
    UNSERVED.with(|c| c.set(""));
    let handled = dispatch_fault(addr, write);
    IN_SIGNAL.with(|c| c.set(was_in));
    if handled {
        // SAFETY: restoring this thread's errno.
        unsafe { *errno_slot = saved_errno };
        return;
    }
    if REMAPS_PENDING.load(Ordering::SeqCst) > 0 {
        // Perhaps the moved range of a direct mremap that hetmem is following right now (or
        // a fill that got EAGAIN while the event was unread): wait for the event readers, then
        // let the access retry. Bounded by their work; sched_yield is async-signal-safe.
        while REMAPS_PENDING.load(Ordering::SeqCst) > 0 {
            rustix::thread::sched_yield();
        }
        // SAFETY: restoring this thread's errno.
        unsafe { *errno_slot = saved_errno };
        return;
    }
    // A managed page that could not be served: say why before the signal takes its course.
    let why = UNSERVED.with(|c| c.get());
    if !why.is_empty() {
        let mut b = [0u8; 18];
        write_stderr_parts(&[
            b"hetmem: SIGBUS at ",
            hex(addr, &mut b),
            b": ",
            why.as_bytes(),
            b"\n",
        ]);
    }
    // Not served: chain to the previous handler (Rust's own, or the default action).
    let prev = PREV_ACTION.load(Ordering::Acquire);
    // SAFETY: `prev`, when non-null, is a leaked, never-freed sigaction written once.
    unsafe {
        if !prev.is_null() {
            let p = &*prev;
            if p.sa_flags & libc::SA_SIGINFO != 0 && p.sa_sigaction > 1 {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(p.sa_sigaction);
                f(sig, info, ctx);
                *errno_slot = saved_errno;
                return;
            }
            if p.sa_sigaction > 1 {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
                f(sig);
                *errno_slot = saved_errno;
                return;
            }
        }
        // Default action: restore SIG_DFL; returning re-executes the access, which kills the
        // process with SIGBUS as if hetmem were not there.
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        *errno_slot = saved_errno;
    }
}
