//! Address spaces: mappings, the per-page state machine, and the CPU fault service.
//!
//! A [`Space`] is hetmem's `mm_struct`: a reserved range of the process's address space in which
//! anonymous mappings (`Vma`) are created with read/write/none permissions. CPU code uses plain
//! pointers into it; hetmem keeps one 8-byte entry (`Pte`) per page saying where the page's
//! data is.
//!
//! # Page states
//!
//! | state | CPU view | data is in | CPU load | CPU store | device |
//! |---|---|---|---|---|---|
//! | `None` | no page | nowhere (reads as zeros) | fault: zero-fill (fault-around) | same | range_fault fills it |
//! | `Present` | page mapped | the CPU page | no fault | no fault (a write-protect fault only while a migration copies it) | mirrors it (system page) |
//! | `Device` | no page | a frame of a device-private pagemap | fault: migrate back (`migrate_to_ram`) | same | owner: local access; others fault it back |
//! | `Exclusive` | no page | a frame of the space's stash | fault: revoke, restore | same | owner: atomic access |
//!
//! Flags beside the state: `LARGE` (part of a 2 MiB unit that faults, migrates and reports
//! order 9 as one; split by any partial operation), and short- and long-term pin counts (a
//! pinned page is `Present` and is never migrated).
//!
//! # Policy and trace
//!
//! A CPU fault on a device-private page asks the space's policy ([`crate::policy`],
//! [`Space::set_policy`]) whether the whole 2 MiB unit comes back or only the faulting page; the
//! fault service, the moves back to system memory and evictions record events into the space's
//! tracer ([`Space::set_trace`]). Both live in the state below (lock 1), read under the lock the
//! fault path already holds.
//!
//! # Locks, and their order
//!
//! 1. `SpaceCore::state` (this module): the mappings, every page entry, the notifier list and
//!    the pagemap table. Every state change happens under it, including the CPU fault service
//!    (from the SIGBUS handler or the handler thread) and a migration's setup and finalize.
//!    Between them a [`crate::migrate::MigrateVma`] holds no lock: its pages carry the
//!    MIGRATING bit (the kernel's migration entries), CPU faults on them wait on
//!    `SpaceCore::migration_done`, and operations over its range wait for it
//!    (`SpaceCore::lock_state_for`). The full order, with the page cache's and the kernel
//!    side's locks, is in docs/architecture.md.
//! 2. A device's page-table lock (taken by its notifier callback, under 1).
//! 3. Pool locks ([`crate::pool`]): leaves.
//!
//! A device never takes 1 while holding 2: it calls `range_fault` (which takes 1) first, then
//! takes 2 and checks `read_retry`. Interval-notifier callbacks run under 1, before the CPU view
//! changes, so a device access that copies under 2 never sees a page vanish mid-copy, and a frame
//! is freed only after every device access to it has ended.
//!
//! hetmem code never touches a managed address whose page may be missing; the SIGBUS handler can
//! therefore take lock 1 (the interrupted thread cannot be holding it).
//!
//! # Unsupported
//!
//! A direct `mprotect` or `madvise(MADV_DONTNEED/FREE)` on a managed range: userfaultfd does not
//! report `mprotect`, and hetmem asks for no REMOVE events (every migration's own `DONTNEED`
//! would wait for the event reader). Use [`Space::protect`].
//!
//! A direct `munmap` (or an `mremap` that shrinks a mapping, or an `mmap` with `MAP_FIXED` over
//! one) is followed: userfaultfd's UNMAP event, read by the same event threads, lets the range
//! go as [`Space::unmap`] would (`SpaceCore::follow_unmap`). hetmem's own unmaps unregister
//! first and raise none.
//!
//! A direct `mremap` that *moves* a managed range is followed (userfaultfd's REMAP event, read
//! by an event thread per userfaultfd): the moved range becomes the program's plain memory with
//! every byte in place and leaves the space as if unmapped (`SpaceCore::follow_remap`); a
//! moved shared file mapping aborts the process with a message (its stores could not be
//! written back). An `mremap` that shrinks or grows in place is not reported.
//!
//! # fork
//!
//! A child gets anonymous private memory copy-on-write, device-resident pages included, as
//! plain memory, and hetmem objects are inert in it (their methods return [`Error::Forked`]):
//! the `fork` module. File mappings, pools and the stash are `MADV_DONTFORK` (a child has no
//! mapping there: an access is SIGSEGV). Shared anonymous memory ([`Space::map_shared_anon`]) is
//! shared with children as the kernel's is: a child maps its memfd as plain shared memory,
//! served by the kernel alone.

use std::collections::BTreeMap;

use crate::addr::{FrameIdx, PAGE_SIZE, PAGES_PER_LARGE, VaRange, VirtAddr, Vpn};
use crate::error::{Error, Result};
#[cfg(any(test, feature = "testing"))]
use crate::mm::ModelMm;
use crate::mm::{FaultMode, KernelMm, Mm, Registered};
use crate::notifier::{IntervalNotifier, IntervalOps, NotifierHost, NotifyEvent, NotifyRange};
use crate::pagecache::{FileCache, FileHandle, Fill, MapRec, MappingHost, StoreFault};
use crate::policy::trace::{Direction, EventKind, FaultState, TraceEvent, Tracer};
use crate::policy::{CpuFault, CpuFaultAction, DefaultPolicy, Policy};
use crate::pool::{MemoryKind, Owner, Pagemap, PagemapId};
use crate::sync::{Arc, AtomicU64, Guard, Mutex, Ordering, Weak, lock};
use crate::sys::{self, LARGE_PAGE_SIZE, Prot, Region};

mod adopt;
pub use adopt::AdoptConfig;
mod fork;
pub(crate) use fork::{gate as fork_gate, register_fork_table};
mod evict;
mod exclusive;
mod fault;
mod pin;
mod probe;
mod pte;
mod remap;
mod replica;

pub use pin::Pin;
pub use probe::{Mapping, Probe};
pub use pte::PageState;
pub(crate) use pte::Pte;

// ---------------------------------------------------------------------------------------------
// Mappings
// ---------------------------------------------------------------------------------------------

/// Options of a new anonymous mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// Permissions.
    pub prot: Prot,
    /// Fault-service mode (see [`FaultMode`]).
    pub mode: FaultMode,
    /// Use 2 MiB units where aligned (the `MADV_HUGEPAGE` analogue): first touch fills a whole
    /// aligned 2 MiB unit, which migrates and reports as one large page.
    pub large: bool,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            prot: Prot::ReadWrite,
            mode: FaultMode::Signal,
            large: false,
        }
    }
}

/// A mapping (VMA): a range with one protection, one fault mode, and one entry per page.
#[derive(Debug)]
pub(crate) struct Vma {
    /// Which `map` call made it (kept by splits): pins name the mapping they pinned, so that a
    /// pin outliving an unmap never touches a new mapping at the same address.
    pub(crate) id: u64,
    pub(crate) range: VaRange,
    pub(crate) prot: Prot,
    pub(crate) mode: FaultMode,
    pub(crate) large: bool,
    /// The kernel was asked for huge pages on this mapping (`Mm::prefer_huge`): a large
    /// mapping from the start, a plain one once a first touch filled 512 KiB (faults came in
    /// sequence).
    pub(crate) huge_hint: bool,
    pub(crate) ptes: Vec<Pte>,
    /// For a file mapping: the file's cache and the file page of the first page.
    pub(crate) file: Option<FileMap>,
}

/// What a file mapping maps.
#[derive(Debug, Clone)]
pub(crate) struct FileMap {
    pub(crate) cache: Arc<FileCache>,
    pub(crate) pgoff: u64,
    pub(crate) shared: bool,
    /// Stores are intercepted (synchronous write-protect): see `FileMapOptions`.
    pub(crate) sync: bool,
    /// Registered for asynchronous write tracking (writable when mapped, or made writable
    /// since): protecting it again would clear stores not yet scanned.
    pub(crate) tracking: bool,
}

impl Vma {
    /// The userfaultfd the mapping is registered with.
    pub(crate) fn registered(&self) -> Registered {
        match &self.file {
            Some(f) if f.shared && f.sync => Registered::FileSync,
            Some(f) if f.shared => Registered::File,
            _ => Registered::Anon(self.mode),
        }
    }
}

/// Options of a file mapping (see [`Space::map_file_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMapOptions {
    /// Permissions.
    pub prot: Prot,
    /// Shared (stores reach the file) or private (copy on write).
    pub shared: bool,
    /// For a shared mapping: intercept the first store to each clean page (synchronous
    /// write-protect: one fault per first store, ≈ 5 µs) so that the cache's dirty bound holds
    /// for stores too (a store that would exceed it writes back first, and gets SIGBUS if
    /// writeback fails). Without it (the default) stores are tracked without faults
    /// (asynchronous write-protect) and counted at the next scan (fsync, msync, background
    /// writeback).
    pub intercept_stores: bool,
}

impl Vma {
    pub(crate) fn idx(&self, a: VirtAddr) -> usize {
        (a.get() - self.range.start.get()) / PAGE_SIZE
    }
    pub(crate) fn addr(&self, i: usize) -> VirtAddr {
        self.range.start.add(i * PAGE_SIZE)
    }
    /// Index range of the 2 MiB unit containing page `i`, if the unit lies wholly inside.
    pub(crate) fn unit_of(&self, i: usize) -> Option<(usize, usize)> {
        let a = self.addr(i).get() & !(LARGE_PAGE_SIZE - 1);
        if a < self.range.start.get() || a + LARGE_PAGE_SIZE > self.range.end.get() {
            return None;
        }
        let s = self.idx(VirtAddr(a));
        Some((s, s + PAGES_PER_LARGE))
    }
}

/// The state behind [`SpaceCore::state`] (lock 1 of the module doc). Aligned to a cache line, so
/// that in `Mutex<SpaceState>` the lock word and the data sit on different lines: threads
/// spinning for the lock then do not take the holder's data away from it.
#[repr(align(64))]
pub(crate) struct SpaceState {
    /// A `fork()` is in progress in the process with this id (set by the forking thread's
    /// prepare handler, cleared by its parent handler; a child's copy keeps it, naming the
    /// parent): every other thread that takes this lock waits until it is done
    /// ([`SpaceCore::lock_state`]). See the `fork` module.
    pub(crate) fork_hold: Option<i32>,
    /// Pages in device memory (or held exclusively) copied into the CPU view for the child to
    /// inherit, dropped again once the fork is done.
    pub(crate) fork_copies: Vec<VaRange>,
    pub(crate) vmas: BTreeMap<usize, Vma>,
    pub(crate) notifiers: Vec<Arc<IntervalNotifier>>,
    pub(crate) pagemaps: Vec<Option<Arc<Pagemap>>>,
    next_vma_id: u64,
    /// Parts of the reservation that a direct mremap left unmapped and the program mapped
    /// something into before hetmem could reserve them again: never used for a mapping.
    lost: Vec<VaRange>,
    /// The placement policy ([`Space::set_policy`]): read under this lock by the CPU fault
    /// service and migrations, cloned out by device fault paths.
    pub(crate) policy: std::sync::Arc<dyn Policy>,
    /// Where events go ([`Space::set_trace`]); `None`: one check per event.
    pub(crate) trace: Option<Tracer>,
    /// Migrations in flight (between setup and finalize, which release this lock in between):
    /// an id and the range. Operations that change mappings wait for those overlapping their
    /// range ([`SpaceCore::wait_for_migrations`]).
    pub(crate) migrations: Vec<(u64, VaRange)>,
    pub(crate) next_migration: u64,
}

impl SpaceState {
    /// Registers an operation in flight over `r` that holds pages marked MIGRATING without
    /// the lock (a migration between setup and finalize, a fill or fault-back copying): other
    /// operations over `r` wait for it (`SpaceCore::wait_for_migrations`). Returns its id.
    pub(crate) fn register_claim(&mut self, r: VaRange) -> u64 {
        let id = self.next_migration;
        self.next_migration += 1;
        self.migrations.push((id, r));
        id
    }

    /// Ends the claim `id` (its marks already cleared or its entries rewritten); the caller
    /// wakes the waiters once it has released the lock (`SpaceCore::notify_migrations_done`).
    pub(crate) fn release_claim(&mut self, id: u64) {
        self.migrations.retain(|(m, _)| *m != id);
    }

    /// The mappings inside `r` (split at its ends first by the caller) with the userfaultfd
    /// each is registered with, for [`Mm::unmap`].
    pub(crate) fn registered_in(&self, r: VaRange) -> Vec<(VaRange, Registered)> {
        self.vmas
            .values()
            .filter(|v| r.overlaps(&v.range))
            .map(|v| (v.range, v.registered()))
            .collect()
    }

    /// Removes and returns the mappings that overlap `r` (split at its ends first by the
    /// caller, so that they lie inside it).
    pub(crate) fn remove_vmas_in(&mut self, r: VaRange) -> Vec<Vma> {
        let keys: Vec<usize> = self
            .vmas
            .values()
            .filter(|v| r.overlaps(&v.range))
            .map(|v| v.range.start.get())
            .collect();
        keys.into_iter()
            .map(|k| self.vmas.remove(&k).expect("key just listed"))
            .collect()
    }

    /// Marks the entries of `r` MIGRATING.
    pub(crate) fn mark_migrating(&mut self, r: VaRange) {
        let v = self.vma_mut(r.start).expect("a claimed range is mapped");
        let (s, e) = (v.idx(r.start), v.idx(r.start) + r.pages());
        for p in &mut v.ptes[s..e] {
            *p = p.with_migrating(true);
        }
    }

    /// The mapping containing `a`.
    pub(crate) fn vma(&self, a: VirtAddr) -> Option<&Vma> {
        self.vmas
            .range(..=a.get())
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.range.contains(a))
    }
    pub(crate) fn vma_mut(&mut self, a: VirtAddr) -> Option<&mut Vma> {
        self.vmas
            .range_mut(..=a.get())
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.range.contains(a))
    }
    pub(crate) fn pte(&self, a: VirtAddr) -> Option<Pte> {
        self.vma(a).map(|v| v.ptes[v.idx(a)])
    }
    pub(crate) fn set_pte(&mut self, a: VirtAddr, p: Pte) {
        let v = self.vma_mut(a).expect("set_pte on a mapped page");
        let i = v.idx(a);
        v.ptes[i] = p;
    }
    pub(crate) fn pagemap(&self, id: PagemapId) -> Arc<Pagemap> {
        self.pagemaps[id.0 as usize]
            .clone()
            .expect("a page entry names a known pagemap")
    }
    /// For an address in a shared file mapping: the file's cache and the file page. (A private
    /// file mapping is anonymous memory whose missing pages are filled from the file.)
    pub(crate) fn file_page(&self, a: VirtAddr) -> Option<(Arc<FileCache>, u64)> {
        let v = self.vma(a)?;
        let f = v.file.as_ref().filter(|f| f.shared)?;
        Some((f.cache.clone(), f.pgoff + v.idx(a) as u64))
    }

    /// Records a new mapping of `r` (all pages missing: `ptes` from [`new_ptes`]) under a fresh
    /// id.
    fn insert_vma(
        &mut self,
        r: VaRange,
        prot: Prot,
        mode: FaultMode,
        large: bool,
        file: Option<FileMap>,
        ptes: Vec<Pte>,
    ) {
        debug_assert_eq!(ptes.len(), r.pages());
        let id = self.next_vma_id;
        self.next_vma_id += 1;
        let v = Vma {
            id,
            range: r,
            prot,
            mode,
            large,
            huge_hint: false,
            ptes,
            file,
        };
        self.vmas.insert(r.start.get(), v);
    }

    /// Records the event `ev()` makes, if a tracer is set (`ev` is not called otherwise).
    #[inline]
    pub(crate) fn trace_with(&self, ev: impl FnOnce() -> TraceEvent) {
        if let Some(t) = &self.trace {
            t.record(ev());
        }
    }

    /// Checks that `r` is covered by mappings with no hole; returns the first unmapped address.
    pub(crate) fn check_covered(&self, r: VaRange) -> Result<()> {
        let mut a = r.start;
        while a < r.end {
            let v = self.vma(a).ok_or(Error::NotMapped { addr: a })?;
            a = v.range.end;
        }
        Ok(())
    }
}

/// Counters of what the fault service and migrations did.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) cpu_faults: AtomicU64,
    pub(crate) zero_fill_pages: AtomicU64,
    pub(crate) huge_zero_units: AtomicU64,
    pub(crate) pages_to_device: AtomicU64,
    pub(crate) pages_to_system: AtomicU64,
    pub(crate) exclusive_revoked: AtomicU64,
    pub(crate) foreign_remaps: AtomicU64,
    pub(crate) foreign_unmaps: AtomicU64,
    pub(crate) foreign_removes: AtomicU64,
}

/// A snapshot of an address space's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// CPU faults served (first touch, fault-back, revocations).
    pub cpu_faults: u64,
    /// Pages zero-filled on first touch (fault-around included).
    pub zero_fill_pages: u64,
    /// Whole 2 MiB units of those filled by moving in one zeroed transparent huge page
    /// (`UFFDIO_MOVE`) instead of 512 copies of a zero page. The unit stays one huge page
    /// where it had no page table; where it had one (its pages were there before and were
    /// dropped), the kernel split the huge page and moved base pages.
    pub huge_zero_units: u64,
    /// Pages migrated to device memory.
    pub pages_to_device: u64,
    /// Pages migrated back to system memory (CPU faults, migrations, eviction).
    pub pages_to_system: u64,
    /// Device-exclusive entries revoked by CPU access.
    pub exclusive_revoked: u64,
    /// Direct mremaps of managed ranges that hetmem followed (the moved range became the
    /// program's plain memory, with all its data).
    pub foreign_remaps: u64,
    /// Direct munmaps of adopted memory that hetmem followed (the range left the space).
    pub foreign_unmaps: u64,
    /// Direct drops of pages (`madvise(MADV_DONTNEED)` and the like) that hetmem followed:
    /// the pages there read zeros (a private file mapping's: the file's bytes), in device
    /// memory too (`UFFD_EVENT_REMOVE`; kernels with `UFFDIO_MOVE`).
    pub foreign_removes: u64,
    /// Drops of pages by hetmem itself (migrations to a device) that the kernel could not move
    /// out of the way and that raised a REMOVE event (≈ 50 µs each instead of ≈ 1): pages
    /// shared with a child after a `fork()`, pinned or locked by the kernel, or in a read-only
    /// mapping.
    pub own_drops_with_event: u64,
}

/// The shared core of an address space. Device code and the fault service reach it through
/// [`Space`] handles and the fault registry.
pub struct SpaceCore {
    pub(crate) id: u16,
    pid: i32,
    /// The kernel side (shared with the page caches of files mapped here, which scan and
    /// protect file mappings without holding this space).
    pub(crate) mm: std::sync::Arc<dyn Mm>,
    pub(crate) state: Mutex<SpaceState>,
    /// Signalled when a migration finalizes (waiters: faults on its pages, operations that change
    /// mappings it overlaps).
    pub(crate) migration_done: crate::sync::Condvar,
    /// Threads waiting on `migration_done` (counted under the state lock): finishers notify
    /// only when there is one, so that a fault with nobody waiting makes no futex call.
    pub(crate) migration_waiters: AtomicU64,
    /// A fault of a thread-mode mapping on a page a migration holds was left asleep in the
    /// kernel (set under the state lock): the next end of a migration wakes it.
    pub(crate) thread_faults_deferred: crate::sync::AtomicBool,
    pub(crate) inv_seq: AtomicU64,
    /// The policy's access counters ([`crate::policy::AccessCounters::pack`]; 0: none), read by
    /// devices once per command without the state lock; written with the policy.
    pub(crate) access_counters: AtomicU64,
    pub(crate) counters: Counters,
    pub(crate) zero: Region,
    /// A 2 MiB staging buffer for fills from files (used under the state lock).
    pub(crate) bounce: Region,
    pub(crate) stash: Arc<Pagemap>,
}

impl std::fmt::Debug for SpaceCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaceCore")
            .field("id", &self.id)
            .field("range", &self.mm.reservation())
            .finish()
    }
}

/// A slot of [`SPACES`].
enum SpaceSlot {
    /// Taken by a space being made (its id is given out, its entry not published yet).
    Reserved,
    /// A space (free again once it is gone).
    Live(Weak<SpaceCore>),
}

/// Process-wide table of address spaces by id, for device eviction's reverse map. A leaf lock.
static SPACES: std::sync::Mutex<Vec<Option<SpaceSlot>>> = std::sync::Mutex::new(Vec::new());

/// Reserves an id for a space being made (published by [`publish_space_id`]). A slot is marked
/// reserved at once: two spaces made at the same time were given the same id (the slot stayed
/// empty until the first was published), and a device's release then evicted neither's pages
/// from the other's reverse-map entries (found by two model tests running side by side).
fn alloc_space_id() -> Result<u16> {
    let mut t = SPACES.lock().unwrap_or_else(|p| p.into_inner());
    for (i, s) in t.iter_mut().enumerate().skip(1) {
        let free = match s {
            None => true,
            Some(SpaceSlot::Reserved) => false,
            Some(SpaceSlot::Live(w)) => w.strong_count() == 0,
        };
        if free {
            *s = Some(SpaceSlot::Reserved);
            return Ok(i as u16);
        }
    }
    if t.is_empty() {
        t.push(None);
    }
    if t.len() >= u16::MAX as usize {
        return Err(Error::NoMemory {
            what: "address-space ids",
        });
    }
    t.push(Some(SpaceSlot::Reserved));
    Ok((t.len() - 1) as u16)
}

/// Publishes the space made under id `id` ([`alloc_space_id`]).
fn publish_space_id(id: u16, core: &Arc<SpaceCore>) {
    SPACES.lock().unwrap_or_else(|p| p.into_inner())[id as usize] =
        Some(SpaceSlot::Live(Arc::downgrade(core)));
}

pub(crate) fn space_by_id(id: u16) -> Option<Arc<SpaceCore>> {
    let t = SPACES.lock().unwrap_or_else(|p| p.into_inner());
    match t.get(id as usize) {
        Some(Some(SpaceSlot::Live(w))) => w.upgrade(),
        _ => None,
    }
}

/// Configuration of a new address space.
#[derive(Clone, Debug)]
pub struct SpaceConfig {
    /// Bytes of address space to reserve (mappings are created inside).
    pub size: usize,
    /// Capacity of the stash that holds device-exclusive pages.
    pub stash: usize,
    /// Use user-mode-only userfaultfds even where full ones are allowed (behave exactly as for an
    /// unprivileged user: kernel-mode accesses to missing pages get EFAULT in every mode).
    pub user_mode_only: bool,
    /// Pages in device-private memory read as swapped out in `/proc/self/pagemap` (`PM_SWAP`,
    /// not present), as the kernel reports its device-private entries, for programs that look
    /// (the kernel's own HMM tests do). Costs one `UFFDIO_WRITEPROTECT` per run of pages a
    /// migration moves to device-private memory (a marker is left on their empty page-table
    /// entries: `UFFD_FEATURE_WP_UNPOPULATED`, Linux 6.4; where the kernel lacks it, making the
    /// space fails). Off: such pages read as not present and not swapped.
    pub device_private_as_swap: bool,
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig {
            size: 64 << 30,
            stash: 64 << 20,
            user_mode_only: false,
            device_private_as_swap: false,
        }
    }
}

/// An address space (see the module doc). Cloning gives another handle to the same space.
///
/// # Examples
///
/// ```
/// use hetmem::{Prot, Residency, Space};
///
/// # fn main() -> hetmem::Result<()> {
/// let space = Space::new()?; // reserves address space; nothing committed
/// let a = space.map_anon(1 << 20, Prot::ReadWrite)?;
/// assert_eq!(space.residency(a), Residency::Untouched);
/// space.cpu_write(a, b"hello")?; // a real store: the first touch faults into hetmem
/// let mut b = [0u8; 5];
/// space.cpu_read(a, &mut b)?;
/// assert_eq!(&b, b"hello");
/// assert_eq!(space.residency(a), Residency::System);
/// space.unmap(a, 1 << 20)?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Space {
    pub(crate) core: Arc<SpaceCore>,
    _reg: Option<Arc<Registration>>,
}

/// A space's entry in the fault-range registry, shared by its handles. For adopted memory it is
/// also the one place that gives the memory back: its drop runs exactly once, when the last
/// handle goes, and before the entry itself goes (so faults are served until then).
pub(crate) struct Registration {
    /// The adopted space to give back (`None`: not adopted).
    adopted: Option<Arc<SpaceCore>>,
    _range: sys::FaultRange,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("adopted", &self.adopted.is_some())
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(core) = self.adopted.take()
            && core.check_process().is_ok()
        {
            core.give_back();
        }
    }
}

/// Which page-state residency a page has, for introspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Not mapped.
    Unmapped,
    /// Mapped, never touched (reads as zeros).
    Untouched,
    /// In system memory.
    System,
    /// In device-private memory of the device with this owner.
    Device(Owner),
    /// In device-coherent memory of the device with this owner (mapped by the CPU).
    Coherent(Owner),
    /// Held for device-exclusive access by the device with this owner.
    Exclusive(Owner),
}

impl Space {
    /// Reserves a new address space with the default configuration (64 GiB of address space,
    /// nothing committed), served by the real kernel (userfaultfd).
    pub fn new() -> Result<Space> {
        Self::with_config(SpaceConfig::default())
    }

    /// Reserves a new address space served by the real kernel.
    pub fn with_config(cfg: SpaceConfig) -> Result<Space> {
        let mm = KernelMm::new(
            round_up(cfg.size)?,
            cfg.user_mode_only,
            cfg.device_private_as_swap,
        )
        .map_err(|e| Error::os("reserve address space", e))?;
        let core = Self::make_core(std::sync::Arc::new(mm), cfg.stash)?;
        fork::install_handlers();
        let r = core.mm.reservation();
        let target: std::sync::Arc<dyn sys::FaultTarget> = core.clone();
        let reg = sys::register_fault_range(r.start.get(), r.end.get(), target)
            .map_err(|e| Error::os("register fault range", e))?;
        Ok(Space {
            core,
            _reg: Some(Arc::new(Registration {
                adopted: None,
                _range: reg,
            })),
        })
    }

    /// An address space over the in-memory model of the kernel ([`ModelMm`]): CPU accesses go
    /// through [`Space::cpu_read`]/[`Space::cpu_write`] and fault into the core directly. Used
    /// for schedule exploration and model-based tests (the `testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn new_model(size: usize) -> Result<Space> {
        let core = Self::make_core(std::sync::Arc::new(ModelMm::new(round_up(size)?)), 8 << 20)?;
        Ok(Space { core, _reg: None })
    }

    fn make_core(mm: std::sync::Arc<dyn Mm>, stash: usize) -> Result<Arc<SpaceCore>> {
        let bounce = Region::new(LARGE_PAGE_SIZE, PAGE_SIZE, Prot::ReadWrite)
            .map_err(|e| Error::os("mmap bounce buffer", e))?;
        let zero = Region::new(LARGE_PAGE_SIZE, PAGE_SIZE, Prot::Read)
            .map_err(|e| Error::os("mmap zero page", e))?;
        let stash = Arc::new(Pagemap::new(
            PagemapId(0),
            MemoryKind::System,
            Owner(0),
            stash.max(LARGE_PAGE_SIZE),
        )?);
        let mut pagemaps = vec![None; 256];
        pagemaps[0] = Some(stash.clone());
        let core = Arc::new(SpaceCore {
            id: 0,
            pid: sys::getpid(),
            mm,
            state: Mutex::new(SpaceState {
                vmas: BTreeMap::new(),
                notifiers: Vec::new(),
                pagemaps,
                next_vma_id: 1,
                lost: Vec::new(),
                fork_hold: None,
                fork_copies: Vec::new(),
                policy: std::sync::Arc::new(DefaultPolicy),
                trace: None,
                // Room for every operation in flight at once that a fault can register (the
                // fault path must not allocate): one per thread touching the space, and
                // migrations; more only grows the vector outside the fault path's usual case.
                migrations: Vec::with_capacity(256),
                next_migration: 1,
            }),
            migration_done: crate::sync::Condvar::new(),
            migration_waiters: AtomicU64::new(0),
            thread_faults_deferred: crate::sync::AtomicBool::new(false),
            inv_seq: AtomicU64::new(0),
            access_counters: AtomicU64::new(0),
            counters: Counters::default(),
            zero,
            bounce,
            stash,
        });
        let id = alloc_space_id()?;
        // The id is only read through `space_by_id` and `rmap` entries written later; set it
        // before the core is shared.
        let mut core = core;
        Arc::get_mut(&mut core).expect("core not shared yet").id = id;
        publish_space_id(id, &core);
        Ok(core)
    }

    /// The reserved range.
    pub fn range(&self) -> VaRange {
        self.core.mm.reservation()
    }

    /// Whether kernel-mode accesses to missing pages fail with EFAULT in every fault mode (the
    /// userfaultfd is user-mode-only, as for unprivileged users by default).
    pub fn user_mode_only(&self) -> bool {
        self.core.mm.user_mode_only()
    }

    /// Also the start of every device command: a drop of pages by the program (madvise) whose
    /// madvise returned is followed first (`sys::wait_removes_followed`).
    pub(crate) fn check_owner_process(&self) -> Result<()> {
        self.core.check_process()?;
        sys::wait_removes_followed();
        Ok(())
    }

    /// Mappings are not made in an adopted space: its range is the program's memory (a part
    /// the program unmapped may hold the program's next mapping).
    fn check_not_adopted(&self) -> Result<()> {
        if self.core.mm.adopted() {
            return Err(Error::Invalid(
                "an adopted space holds the program's memory only: map into a Space::new",
            ));
        }
        Ok(())
    }

    /// Creates an anonymous mapping of `len` bytes with protection `prot`, anywhere in the space.
    pub fn map_anon(&self, len: usize, prot: Prot) -> Result<VirtAddr> {
        self.map_anon_with(
            len,
            MapOptions {
                prot,
                ..MapOptions::default()
            },
        )
    }

    /// Creates an anonymous mapping with options, anywhere in the space (2 MiB aligned when
    /// `opts.large`).
    pub fn map_anon_with(&self, len: usize, opts: MapOptions) -> Result<VirtAddr> {
        self.check_owner_process()?;
        self.check_not_adopted()?;
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedLength { len });
        }
        let mut st = self.core.lock_state();
        let align = if opts.large {
            LARGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        let r = self.free_range(&st, len, align)?;
        self.core.map_locked(&mut st, r, opts)?;
        Ok(r.start)
    }

    /// A free range of `len` bytes aligned to `align`: first fit, leaving a one-page guard gap
    /// after each mapping so that mappings never merge and an overrun faults.
    fn free_range(&self, st: &SpaceState, len: usize, align: usize) -> Result<VaRange> {
        let res = self.core.mm.reservation();
        let mut cand = res.start.get();
        // Occupied: the mappings, and what a direct mremap took out of the reservation.
        let mut used: Vec<VaRange> = st.vmas.values().map(|v| v.range).collect();
        if !st.lost.is_empty() {
            used.extend(st.lost.iter().copied());
            used.sort_by_key(|r| r.start);
        }
        for u in used {
            let c = (cand + align - 1) & !(align - 1);
            if c.saturating_add(len) <= u.start.get() {
                break;
            }
            cand = cand.max(u.end.get() + PAGE_SIZE);
        }
        let start = (cand + align - 1) & !(align - 1);
        let r = VaRange::new(VirtAddr(start), len)?;
        if r.end > res.end {
            return Err(Error::NoMemory {
                what: "the address space's reservation",
            });
        }
        Ok(r)
    }

    /// Maps `len` bytes of a cached file at file offset `offset` (page-aligned), shared (stores
    /// reach the file on writeback: `FileHandle::fsync`) or private (copy-on-write: stores stay in
    /// this mapping). Several mappings of one file share its cached pages. A CPU access past the
    /// end of the file gets SIGBUS, as with the kernel's mmap. Faults are served in the faulting
    /// thread (a system call touching an uncached page gets EFAULT: use `read_at`/`write_at`).
    /// A writable shared mapping of a file opened read-only is refused (EACCES).
    pub fn map_file(
        &self,
        file: &FileHandle,
        offset: u64,
        len: usize,
        prot: Prot,
        shared: bool,
    ) -> Result<VirtAddr> {
        self.map_file_with(
            file,
            offset,
            len,
            FileMapOptions {
                prot,
                shared,
                intercept_stores: false,
            },
        )
    }

    /// [`Space::map_file`] with options (see [`FileMapOptions`]).
    pub fn map_file_with(
        &self,
        file: &FileHandle,
        offset: u64,
        len: usize,
        opts: FileMapOptions,
    ) -> Result<VirtAddr> {
        let FileMapOptions {
            prot,
            shared,
            intercept_stores,
        } = opts;
        let sync = shared && intercept_stores;
        self.check_owner_process()?;
        self.check_not_adopted()?;
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedLength { len });
        }
        if !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Error::Invalid("file offset must be page-aligned"));
        }
        let cache = file.cache().clone();
        if shared && prot.writable() && !cache.writable() {
            return Err(Error::os(
                "map a read-only file writable",
                std::io::Error::from_raw_os_error(libc::EACCES),
            ));
        }
        // The same limits for shared and private mappings: the file range must be addressable
        // (`off_t`), as mmap(2) requires of the shared one (EOVERFLOW).
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(Error::FileRange {
                offset,
                len: len as u64,
            });
        }
        let pgoff = offset / PAGE_SIZE as u64;
        // A shared mapping that does not intercept stores cannot hold off a CPU store: the
        // file's read-only replicas in its range are dropped first, and none are made until the
        // mapping is recorded (see `FileCache::replicate`).
        let holder = cache.clone();
        let _no_replicas = (shared && !sync)
            .then(|| holder.hold_without_replicas(pgoff, pgoff + (len / PAGE_SIZE) as u64));
        let mut st = self.core.lock_state();
        let r = self.free_range(&st, len, PAGE_SIZE)?;
        let ptes = new_ptes(r)?;
        if shared {
            let mapped = if sync {
                self.core
                    .mm
                    .map_file_sync(r, cache.memfd().as_fd(), offset, prot)
            } else {
                self.core
                    .mm
                    .map_file(r, cache.memfd().as_fd(), offset, prot, shared)
            };
            mapped.map_err(|e| Error::os("map file", e))?;
            if cache.is_anonymous()
                && let Err(e) = self.core.mm.inherit_on_fork(r)
            {
                // Shared anonymous memory is shared with forked children, as the kernel's.
                let reg = if sync {
                    Registered::FileSync
                } else {
                    Registered::File
                };
                let _ = self.core.mm.unmap(r, &[(r, reg)]);
                return Err(Error::os("share a mapping with children", e));
            }
            cache.attach(MapRec {
                mm: std::sync::Arc::downgrade(&self.core.mm),
                space: Arc::<SpaceCore>::downgrade(&self.core),
                space_id: self.core.id,
                range: r,
                pgoff,
                tracked: !sync,
                // With stores intercepted, eviction is safe: a store to a victim faults.
                writable: !sync && prot.writable(),
                sync,
            });
        } else {
            // A private file mapping is anonymous memory whose missing pages are filled from
            // the file on first access: every anonymous capability (migration to device memory,
            // exclusive access, pins) applies to it. Pages keep what they had at their first
            // access (POSIX leaves later file changes unspecified for MAP_PRIVATE).
            self.core
                .mm
                .map(r, prot, FaultMode::Signal)
                .map_err(|e| Error::os("map file", e))?;
            cache.reserve_for_private_mapping(pgoff, pgoff + r.pages() as u64);
        }
        let file = FileMap {
            cache,
            pgoff,
            shared,
            sync,
            tracking: shared && !sync && prot.writable(),
        };
        st.insert_vma(r, prot, FaultMode::Signal, false, Some(file), ptes);
        Ok(r.start)
    }

    /// Creates a shared anonymous mapping (`MAP_SHARED | MAP_ANONYMOUS`) of `len` bytes with
    /// protection `prot`, anywhere in the space: [`Space::map_shared_anon_with`] with stores
    /// tracked without faults (as [`Space::map_file`]).
    pub fn map_shared_anon(&self, len: usize, prot: Prot) -> Result<(VirtAddr, Arc<FileCache>)> {
        self.map_shared_anon_with(
            len,
            FileMapOptions {
                prot,
                shared: true,
                intercept_stores: false,
            },
        )
    }

    /// Creates shared anonymous memory of `len` bytes (zeros until written) and maps it with
    /// `opts` (`shared` must be set: private anonymous memory is [`Space::map_anon`]). Returns
    /// the address and the memory's cache ([`FileCache::anonymous`]): a file without a file,
    /// whose pages take every placement of file pages (device-private needs a read-only
    /// mapping or `intercept_stores`, as for a file; device-coherent takes any); map it again
    /// with [`Space::map_file_with`] (its handle) to share it with another address space.
    ///
    /// A forked child inherits the mapping (the only managed range it inherits): it maps the
    /// same pages as the kernel's own shared memory, so its CPU loads and stores and the
    /// parent's see each other with no fault; hetmem does not serve the child (its objects are
    /// inert there), and a page that is in device-private memory is a hole the child would fill
    /// with zeros: bring pages back first (see docs/filesystem-contract.md, "Shared anonymous
    /// memory").
    ///
    /// Errors: [`Error::ZeroLength`], [`Error::UnalignedLength`], [`Error::NoMemory`] when
    /// `len` exceeds the space's reservation, [`Error::Invalid`] when `opts.shared` is false,
    /// [`Error::Forked`] in a child.
    pub fn map_shared_anon_with(
        &self,
        len: usize,
        opts: FileMapOptions,
    ) -> Result<(VirtAddr, Arc<FileCache>)> {
        self.check_owner_process()?;
        self.check_not_adopted()?;
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedLength { len });
        }
        if !opts.shared {
            return Err(Error::Invalid(
                "shared anonymous memory is mapped shared (private anonymous memory: map_anon)",
            ));
        }
        if len > self.range().len() {
            return Err(Error::NoMemory {
                what: "the address space's reservation",
            });
        }
        let cache = FileCache::anonymous(len)?;
        let addr = self.map_file_with(&cache.handle(), 0, len, opts)?;
        Ok((addr, cache))
    }

    /// Creates an anonymous mapping at a fixed, free address.
    pub fn map_anon_at(&self, addr: VirtAddr, len: usize, opts: MapOptions) -> Result<()> {
        self.check_owner_process()?;
        self.check_not_adopted()?;
        let r = VaRange::new(addr, len)?;
        let res = self.core.mm.reservation();
        if r.start < res.start || r.end > res.end {
            return Err(Error::OutOfSpace { addr, len });
        }
        let mut st = self.core.lock_state();
        if st.vmas.values().any(|v| v.range.overlaps(&r)) || st.lost.iter().any(|l| l.overlaps(&r))
        {
            return Err(Error::Overlap { addr });
        }
        self.core.map_locked(&mut st, r, opts)
    }

    /// Changes the protection of `[addr, addr+len)`, which must be mapped with no hole
    /// (all-or-nothing). Device mappings of the range are invalidated (PROTECTION_VMA).
    pub fn protect(&self, addr: VirtAddr, len: usize, prot: Prot) -> Result<()> {
        self.check_owner_process()?;
        let r = VaRange::new(addr, len)?;
        let mut st = self.core.lock_state_for(r);
        st.check_covered(r)?;
        let read_only_file = st.vmas.values().any(|v| {
            r.overlaps(&v.range)
                && v.file
                    .as_ref()
                    .is_some_and(|f| f.shared && !f.cache.writable())
        });
        if prot.writable() && read_only_file {
            return Err(Error::os(
                "make a shared mapping of a read-only file writable",
                std::io::Error::from_raw_os_error(libc::EACCES),
            ));
        }
        if prot.writable() {
            // Shared file mappings becoming writable start tracking stores first.
            let untracked: Vec<VaRange> = st
                .vmas
                .values()
                .filter(|v| {
                    r.overlaps(&v.range)
                        && v.file
                            .as_ref()
                            .is_some_and(|f| f.shared && !f.sync && !f.tracking)
                })
                .map(|v| VaRange {
                    start: v.range.start.max(r.start),
                    end: v.range.end.min(r.end),
                })
                .collect();
            for t in untracked {
                self.core
                    .mm
                    .track_writes(t)
                    .map_err(|e| Error::os("track writes", e))?;
            }
            for v in st.vmas.values() {
                if let Some(f) = v.file.as_ref().filter(|f| f.shared && !f.sync)
                    && r.overlaps(&v.range)
                {
                    f.cache.mark_writable(self.core.id, r);
                }
            }
        }
        self.core
            .invalidate(&st, r, NotifyEvent::ProtectionVma, None);
        self.core
            .mm
            .protect(r, prot)
            .map_err(|e| Error::os("mprotect", e))?;
        self.core.for_each_vma_in(&mut st, r, |v| {
            v.prot = prot;
            if let Some(f) = v.file.as_mut().filter(|f| f.shared && !f.sync)
                && prot.writable()
            {
                f.tracking = true;
            }
        });
        Ok(())
    }

    /// Marks `[addr, addr+len)` for 2 MiB units (the `MADV_HUGEPAGE` analogue); the range must
    /// be mapped.
    pub fn advise_large(&self, addr: VirtAddr, len: usize) -> Result<()> {
        self.check_owner_process()?;
        let r = VaRange::new(addr, len)?;
        let mut st = self.core.lock_state_for(r);
        st.check_covered(r)?;
        self.core.for_each_vma_in(&mut st, r, |v| v.large = true);
        Ok(())
    }

    /// Unmaps `[addr, addr+len)` (holes allowed, as munmap): device mappings are invalidated
    /// (UNMAP), device and stash frames freed, the pages dropped. Later CPU accesses get SIGSEGV.
    pub fn unmap(&self, addr: VirtAddr, len: usize) -> Result<()> {
        self.check_owner_process()?;
        if self.core.mm.adopted() {
            return Err(Error::Invalid(
                "adopted memory is the program's: it goes back when its Space is dropped",
            ));
        }
        let r = VaRange::new(addr, len)?;
        let res = self.core.mm.reservation();
        if r.start < res.start || r.end > res.end {
            return Err(Error::OutOfSpace { addr, len });
        }
        let mut st = self.core.lock_state_for(r);
        self.core.invalidate(&st, r, NotifyEvent::Unmap, None);
        self.core.split_at(&mut st, r.start);
        self.core.split_at(&mut st, r.end);
        // File mappings: the cache records what CPU stores dirtied before the page tables go.
        let files: Vec<(Arc<FileCache>, VaRange, u64, bool)> = st
            .vmas
            .values()
            .filter(|v| r.overlaps(&v.range))
            .filter_map(|v| {
                v.file
                    .as_ref()
                    .filter(|f| f.shared)
                    .map(|f| (f.cache.clone(), v.range, f.pgoff, f.sync))
            })
            .collect();
        for (cache, range, _, _) in &files {
            // Stop stores first (as after munmap they get SIGSEGV; their written marks
            // survive), so that none lands between the scan and the unmap.
            let _ = self.core.mm.protect(*range, Prot::None);
            cache.detach(&*self.core.mm, self.core.id, *range);
        }
        // Then the kernel side (holes in the range are already PROT_NONE and unregistered, so
        // unmapping them too is harmless). If it fails, the mappings stay, re-attached.
        let registered = st.registered_in(r);
        if let Err(e) = self.core.mm.unmap(r, &registered) {
            for (cache, range, pgoff, sync) in files {
                cache.attach(MapRec {
                    mm: std::sync::Arc::downgrade(&self.core.mm),
                    space: Arc::<SpaceCore>::downgrade(&self.core),
                    space_id: self.core.id,
                    range,
                    pgoff,
                    tracked: !sync,
                    writable: !sync,
                    sync,
                });
            }
            return Err(Error::os("unmap", e));
        }
        for v in st.remove_vmas_in(r) {
            self.core.free_frames(&st, &v.ptes);
        }
        Ok(())
    }

    /// `msync(MS_SYNC)`: writes back what CPU stores (and device writes) dirtied in the shared
    /// file mappings of `[addr, addr+len)` and syncs the files' data. (libc's `msync` on the
    /// same range does not flush hetmem's cache; this does.) Anonymous mappings in the range are
    /// left alone; the range must be mapped.
    pub fn msync(&self, addr: VirtAddr, len: usize) -> Result<()> {
        self.check_owner_process()?;
        let r = VaRange::new(addr, len)?;
        let files: Vec<(Arc<FileCache>, u64, u64)> = {
            let st = self.core.lock_state();
            st.check_covered(r)?;
            st.vmas
                .values()
                .filter(|v| r.overlaps(&v.range))
                .filter_map(|v| {
                    let f = v.file.as_ref().filter(|f| f.shared)?;
                    let s = v.range.start.max(r.start);
                    let e = v.range.end.min(r.end);
                    let first = f.pgoff + v.idx(s) as u64;
                    Some((
                        f.cache.clone(),
                        first,
                        first + ((e.get() - s.get()) / PAGE_SIZE) as u64,
                    ))
                })
                .collect()
        };
        for (cache, first, last) in files {
            cache.sync_range(first, last)?;
        }
        Ok(())
    }

    /// The range of the mapping containing `a`.
    pub(crate) fn vma_range(&self, a: VirtAddr) -> Option<VaRange> {
        let st = self.core.lock_state();
        st.vma(a).map(|v| v.range)
    }

    /// The end of the mapping containing `a` and whether it is readable.
    pub(crate) fn vma_info(&self, a: VirtAddr) -> Option<(VirtAddr, bool)> {
        let st = self.core.lock_state();
        st.vma(a).map(|v| (v.range.end, v.prot.readable()))
    }

    /// If `r` lies in one shared file mapping: the file's cache and the file page at
    /// `r.start` (file pages move through their cache's placements, for every mapping at once).
    pub(crate) fn shared_file_range(&self, r: VaRange) -> Option<(Arc<FileCache>, u64)> {
        let st = self.core.lock_state();
        let v = st.vma(r.start)?;
        if r.end > v.range.end {
            return None;
        }
        st.file_page(r.start)
    }

    /// `mmu_interval_notifier_insert`: watches `[start, start+len)` (clamped to the end of the
    /// address space) for changes of the CPU view; `ops.invalidate` runs before each change. The
    /// notifier holds `ops` weakly (a device owns its ops and its notifier); remove it with
    /// [`Space::remove_notifier`] before dropping the ops.
    pub fn insert_notifier(
        &self,
        start: VirtAddr,
        len: usize,
        ops: Weak<dyn IntervalOps>,
    ) -> Result<Arc<IntervalNotifier>> {
        self.check_owner_process()?;
        if !start.is_page_aligned() {
            return Err(Error::Unaligned { addr: start });
        }
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        Ok(self.core.insert_notifier(start, len, ops))
    }

    /// `mmu_interval_notifier_remove`.
    pub fn remove_notifier(&self, n: &Arc<IntervalNotifier>) {
        self.core.remove_notifier(n)
    }

    /// Fault injection for a model space ([`Space::new_model`]): from now on, placing pages into
    /// the CPU view of `r` (`UFFDIO_COPY`) fails with ENOMEM, until called with `None`. EINVAL
    /// on a space over the real kernel.
    #[cfg(any(test, feature = "testing"))]
    pub fn fail_cpu_installs(&self, r: Option<VaRange>) -> Result<()> {
        if self.core.mm.fail_installs(r) {
            Ok(())
        } else {
            Err(Error::Invalid(
                "install failures are injected into model spaces only",
            ))
        }
    }

    /// Where the page containing `addr` lives.
    pub fn residency(&self, addr: VirtAddr) -> Residency {
        let st = self.core.lock_state();
        match st.pte(addr.page_down()) {
            None => Residency::Unmapped,
            Some(p) => match p.state() {
                PageState::None => Residency::Untouched,
                PageState::Present if p.is_coherent() => {
                    Residency::Coherent(st.pagemap(p.pagemap()).owner())
                }
                PageState::Present => Residency::System,
                PageState::Device => Residency::Device(st.pagemap(p.pagemap()).owner()),
                PageState::Exclusive => Residency::Exclusive(st.pagemap(p.pagemap()).owner()),
            },
        }
    }

    /// Sets the placement policy of this space (see [`crate::policy`]): consulted by the CPU
    /// fault service and by every device bound to the space, from the next decision on. A new
    /// space has [`DefaultPolicy`].
    pub fn set_policy(&self, policy: std::sync::Arc<dyn Policy>) {
        let mut st = self.core.lock_state();
        self.core.access_counters.store(
            crate::policy::AccessCounters::pack(policy.access_counters()),
            Ordering::Relaxed,
        );
        st.policy = policy;
    }

    /// The placement policy of this space.
    pub fn policy(&self) -> std::sync::Arc<dyn Policy> {
        self.core.policy()
    }

    /// Records this space's events (CPU faults, migrations, evictions: see
    /// [`crate::policy::trace`]) into `trace` from now on; `None` stops.
    pub fn set_trace(&self, trace: Option<Tracer>) {
        self.core.lock_state().trace = trace;
    }

    /// The id of this address space (`space` in trace events).
    pub fn id(&self) -> u16 {
        self.core.id
    }

    /// The counters.
    pub fn stats(&self) -> SpaceStats {
        let c = &self.core.counters;
        SpaceStats {
            cpu_faults: c.cpu_faults.load(Ordering::Relaxed),
            zero_fill_pages: c.zero_fill_pages.load(Ordering::Relaxed),
            huge_zero_units: c.huge_zero_units.load(Ordering::Relaxed),
            pages_to_device: c.pages_to_device.load(Ordering::Relaxed),
            pages_to_system: c.pages_to_system.load(Ordering::Relaxed),
            exclusive_revoked: c.exclusive_revoked.load(Ordering::Relaxed),
            foreign_remaps: c.foreign_remaps.load(Ordering::Relaxed),
            foreign_unmaps: c.foreign_unmaps.load(Ordering::SeqCst),
            foreign_removes: c.foreign_removes.load(Ordering::SeqCst),
            own_drops_with_event: self.core.mm.zaps_with_event(),
        }
    }

    /// hetmem's own per-page state for a system-resident page, in bytes.
    pub const fn metadata_bytes_per_page() -> usize {
        std::mem::size_of::<Pte>()
    }

    // --- user CPU accesses -----------------------------------------------------------------

    fn check_cpu(&self, addr: VirtAddr, len: usize, write: bool) -> Result<()> {
        self.check_owner_process()?;
        if len == 0 {
            return Ok(());
        }
        let end = addr.checked_add(len).ok_or(Error::Overflow { addr, len })?;
        let st = self.core.lock_state();
        let mut a = addr;
        while a < end {
            let v = st.vma(a).ok_or(Error::NotMapped { addr: a })?;
            if !v.prot.readable() {
                return Err(Error::NoRead { addr: a });
            }
            if write && !v.prot.writable() {
                return Err(Error::NoWrite { addr: a });
            }
            a = v.range.end;
        }
        Ok(())
    }

    /// A CPU read of managed memory with real loads (page faults are served by hetmem like any
    /// other CPU access). Checks the range is mapped and readable first.
    pub fn cpu_read(&self, addr: VirtAddr, dst: &mut [u8]) -> Result<()> {
        self.check_cpu(addr, dst.len(), false)?;
        let core = &self.core;
        core.mm
            .cpu_read(addr, dst, &|a, w| core.handle_fault(a, w))
            .map_err(Error::from)
    }

    /// A CPU write of managed memory with real stores.
    pub fn cpu_write(&self, addr: VirtAddr, src: &[u8]) -> Result<()> {
        self.check_cpu(addr, src.len(), true)?;
        let core = &self.core;
        core.mm
            .cpu_write(addr, src, &|a, w| core.handle_fault(a, w))
            .map_err(Error::from)
    }

    /// CPU load of a `u32` (4-byte aligned).
    pub fn load_u32(&self, addr: VirtAddr) -> Result<u32> {
        let mut b = [0u8; 4];
        if !addr.get().is_multiple_of(4) {
            return Err(Error::Invalid("u32 access must be 4-byte aligned"));
        }
        self.cpu_read(addr, &mut b)?;
        Ok(u32::from_ne_bytes(b))
    }

    /// CPU store of a `u32` (4-byte aligned).
    pub fn store_u32(&self, addr: VirtAddr, v: u32) -> Result<()> {
        if !addr.get().is_multiple_of(4) {
            return Err(Error::Invalid("u32 access must be 4-byte aligned"));
        }
        self.cpu_write(addr, &v.to_ne_bytes())
    }

    /// CPU atomic fetch-add on a `u64` (8-byte aligned).
    pub fn fetch_add_u64(&self, addr: VirtAddr, v: u64) -> Result<u64> {
        if !addr.get().is_multiple_of(8) {
            return Err(Error::Invalid("u64 atomic must be 8-byte aligned"));
        }
        self.check_cpu(addr, 8, true)?;
        let core = &self.core;
        core.mm
            .cpu_fetch_add(addr, v, &|a, w| core.handle_fault(a, w))
            .map_err(Error::from)
    }

    /// A raw pointer to `addr` for CPU code that accesses managed memory directly (loads and
    /// stores through it fault into hetmem as needed). Only for spaces over the real kernel.
    pub fn as_ptr(&self, addr: VirtAddr) -> *mut u8 {
        addr.get() as *mut u8
    }

    // --- pins --------------------------------------------------------------------------------
}

/// The entries of a new mapping of `r`, all missing, allocated fallibly (8 bytes a page: a
/// mapping's size comes from the caller).
fn new_ptes(r: VaRange) -> Result<Vec<Pte>> {
    crate::error::try_vec(r.pages(), Pte::NONE, "the mapping's page entries")
}

fn round_up(size: usize) -> Result<usize> {
    if size == 0 {
        return Err(Error::ZeroLength);
    }
    size.checked_next_multiple_of(LARGE_PAGE_SIZE)
        .ok_or(Error::Invalid("address space too large"))
}

impl Drop for SpaceCore {
    fn drop(&mut self) {
        if self.check_process().is_err() {
            // The parent's, dropped in a forked child: inert (its locks may be held forever by
            // threads that do not exist here), only its memory is freed.
            return;
        }
        // The address space is going away: tell every notifier (RELEASE) so that devices drop
        // their mappings of it. Device frames still holding pages of this space are freed.
        let st = self.lock_state();
        let r = self.mm.reservation();
        self.invalidate(&st, r, NotifyEvent::Release, None);
        for v in st.vmas.values() {
            self.free_frames(&st, &v.ptes);
            // File mappings: what CPU stores dirtied stays in the cache (written back by the
            // next fsync of the file).
            if let Some(f) = v.file.as_ref().filter(|f| f.shared) {
                f.cache.detach(&*self.mm, self.id, v.range);
            }
        }
        // The reservation's unmap (when the kernel side goes) must raise no UNMAP event. Only
        // after the scans above: unregistering clears the write-protect bits that tell which
        // pages CPU stores dirtied (unregistering first lost stores: found by the concurrent
        // file model). (Adopted memory was given back, unregistered, already: it may be
        // adopted again.)
        if !self.mm.adopted() {
            self.mm.unregister_all(&st.registered_in(r));
        }
    }
}

impl sys::FaultTarget for SpaceCore {
    fn handle_fault(&self, addr: usize, write: bool) -> bool {
        SpaceCore::handle_fault(self, VirtAddr(addr).page_down(), write)
    }
    fn remapped(&self, from: usize, to: usize, len: usize) {
        self.follow_remap(VirtAddr(from), VirtAddr(to), len);
    }
    fn unmapped(&self, start: usize, end: usize) {
        self.follow_unmap(start, end);
    }
    fn removed(&self, start: usize, end: usize) {
        self.follow_remove(start, end);
    }
    fn holds_present(&self, addr: usize) -> Option<bool> {
        let st = crate::sync::try_lock(&self.state)?;
        let pte = st.pte(VirtAddr(addr).page_down())?;
        Some(pte.state() == PageState::Present && st.file_page(VirtAddr(addr)).is_none())
    }
    fn fill_dropped_page(&self, addr: usize) -> bool {
        sys::getpid() == self.pid && self.mm.zero_fill_dropped(VirtAddr(addr).page_down())
    }
    fn manages(&self, start: usize, end: usize) -> bool {
        let r = VaRange {
            start: VirtAddr(start),
            end: VirtAddr(end),
        };
        self.lock_state()
            .vmas
            .values()
            .any(|v| v.range.overlaps(&r))
    }
}

impl NotifierHost for SpaceCore {
    fn wait_invalidations(&self) {
        drop(self.lock_state());
    }
}

impl MappingHost for SpaceCore {
    fn invalidate_file_range(&self, r: VaRange, event: NotifyEvent) {
        let st = self.lock_state();
        self.invalidate(&st, r, event, None);
    }
}

impl SpaceCore {
    pub(crate) fn check_process(&self) -> Result<()> {
        if sys::getpid() != self.pid {
            return Err(Error::Forked { owner: self.pid });
        }
        Ok(())
    }

    fn map_locked(&self, st: &mut SpaceState, r: VaRange, opts: MapOptions) -> Result<()> {
        let ptes = new_ptes(r)?;
        self.mm
            .map(r, opts.prot, opts.mode)
            .map_err(|e| Error::os("map", e))?;
        // A forked child inherits anonymous private memory, as the kernel's (the `fork` module).
        if let Err(e) = self.mm.inherit_on_fork(r) {
            let _ = self.mm.unmap(r, &[(r, Registered::Anon(opts.mode))]);
            return Err(Error::os("map", e));
        }
        st.insert_vma(r, opts.prot, opts.mode, opts.large, None, ptes);
        if opts.large {
            // A large mapping is hetmem's MADV_HUGEPAGE: every first touch fills a whole unit.
            self.prefer_huge(st, r.start);
        }
        Ok(())
    }

    /// Runs the interval notifiers overlapping `r` (under lock 1), before the CPU view changes.
    pub(crate) fn invalidate(
        &self,
        st: &SpaceState,
        r: VaRange,
        event: NotifyEvent,
        owner: Option<Owner>,
    ) {
        let seq = self.inv_seq.fetch_add(1, Ordering::SeqCst) * 2 + 1;
        let nr = NotifyRange {
            start: r.start,
            end: r.end,
            event,
            owner,
        };
        for n in &st.notifiers {
            if n.range().overlaps(&r)
                && let Some(ops) = n.ops()
            {
                ops.invalidate(n, &nr, seq);
            }
        }
    }

    /// Registers an interval notifier on `[start, start+len)` (clamped to the address space).
    pub(crate) fn insert_notifier(
        self: &Arc<Self>,
        start: VirtAddr,
        len: usize,
        ops: Weak<dyn IntervalOps>,
    ) -> Arc<IntervalNotifier> {
        let res_end = self.mm.reservation().end;
        let end = start.checked_add(len).map_or(res_end, |e| e.min(res_end));
        let n = Arc::new(IntervalNotifier::new(
            Arc::<Self>::downgrade(self),
            VaRange { start, end },
            ops,
        ));
        self.lock_state().notifiers.push(n.clone());
        n
    }

    pub(crate) fn remove_notifier(&self, n: &Arc<IntervalNotifier>) {
        self.lock_state().notifiers.retain(|x| !Arc::ptr_eq(x, n));
    }

    pub(crate) fn add_pagemap(&self, st: &mut SpaceState, pm: &Arc<Pagemap>) {
        let slot = &mut st.pagemaps[pm.id().0 as usize];
        if slot.is_none() {
            *slot = Some(pm.clone());
        }
    }

    /// Splits the mapping containing `a` so that a mapping starts at `a` (no-op at a boundary).
    /// A 2 MiB unit cut by the split becomes base pages (a device large frame is split too).
    pub(crate) fn split_at(&self, st: &mut SpaceState, a: VirtAddr) {
        let Some(v) = st.vma(a) else { return };
        if v.range.start == a {
            return;
        }
        let i = v.idx(a);
        if i > 0 && v.ptes[i - 1].large() {
            self.split_unit(st, a.add(0).page_down());
        }
        let v = st.vma_mut(a).expect("checked above");
        let tail = v.ptes.split_off(i);
        let file = v.file.clone().map(|mut f| {
            f.cache.split_mapping(self.id, a);
            f.pgoff += i as u64;
            f
        });
        let new = Vma {
            file,
            id: v.id,
            range: VaRange {
                start: a,
                end: v.range.end,
            },
            prot: v.prot,
            mode: v.mode,
            large: v.large,
            huge_hint: v.huge_hint,
            ptes: tail,
        };
        v.range.end = a;
        st.vmas.insert(a.get(), new);
    }

    /// Splits the mappings at the ends of `r` and applies `f` to every mapping inside it.
    fn for_each_vma_in(&self, st: &mut SpaceState, r: VaRange, mut f: impl FnMut(&mut Vma)) {
        self.split_at(st, r.start);
        self.split_at(st, r.end);
        for v in st.vmas.values_mut() {
            if r.overlaps(&v.range) {
                f(v);
            }
        }
    }

    /// Turns the 2 MiB unit containing `a` (if it is one) into base pages.
    pub(crate) fn split_unit(&self, st: &mut SpaceState, a: VirtAddr) {
        let head = VirtAddr(a.get() & !(LARGE_PAGE_SIZE - 1));
        let Some(v) = st.vma(head) else { return };
        let i = v.idx(head);
        if !v.ptes[i].large() {
            return;
        }
        let first = v.ptes[i];
        if first.state() == PageState::Device || first.is_coherent() {
            st.pagemap(first.pagemap()).split_large(first.frame());
        }
        let v = st.vma_mut(head).expect("checked");
        for p in &mut v.ptes[i..i + PAGES_PER_LARGE] {
            *p = p.without_large();
        }
    }

    /// Frees the device and stash frames named by `ptes` (after invalidation).
    /// The pool holding the frame of a device-resident or exclusively held page: the space's
    /// stash for an exclusive one, the device's pagemap otherwise.
    pub(crate) fn frame_pool(&self, st: &SpaceState, pte: Pte, pm: PagemapId) -> Arc<Pagemap> {
        if pte.state() == PageState::Exclusive {
            self.stash.clone()
        } else {
            st.pagemap(pm)
        }
    }

    fn free_frames(&self, st: &SpaceState, ptes: &[Pte]) {
        let mut i = 0;
        while i < ptes.len() {
            let p = ptes[i];
            if let Some((pm, frame, large)) = p.device_frame() {
                self.frame_pool(st, p, pm).free(frame, large);
                if large {
                    i += PAGES_PER_LARGE;
                    continue;
                }
            }
            i += 1;
        }
    }

    /// The placement policy (cloned out under the state lock, for callers that decide with no
    /// lock held: the device fault path).
    pub(crate) fn policy(&self) -> std::sync::Arc<dyn Policy> {
        self.lock_state().policy.clone()
    }

    /// Locks the state (for the mirror and migrate modules).
    /// Waits, releasing the state lock meanwhile, until no migration in flight overlaps `r`.
    /// Bounded: a migration holds its pages only from setup to finalize, and finalize never
    /// waits for this.
    pub(crate) fn wait_for_migrations<'a>(
        &'a self,
        mut st: Guard<'a, SpaceState>,
        r: VaRange,
    ) -> Guard<'a, SpaceState> {
        loop {
            while st.migrations.iter().any(|(_, m)| m.overlaps(&r)) {
                self.migration_waiters.fetch_add(1, Ordering::SeqCst);
                st = crate::sync::wait(&self.migration_done, st);
                self.migration_waiters.fetch_sub(1, Ordering::SeqCst);
            }
            if !fork::held_against_me(&st) {
                return st;
            }
            drop(st);
            st = self.lock_state();
        }
    }

    /// Wakes the threads waiting for migrations, if any (call after releasing the state lock
    /// that removed a migration: a waiter counts itself under that lock, so one that has not
    /// counted yet will see the removal).
    pub(crate) fn notify_migrations_done(&self) {
        if self.migration_waiters.load(Ordering::SeqCst) > 0 {
            self.migration_done.notify_all();
        }
        if self.thread_faults_deferred.swap(false, Ordering::SeqCst) {
            // Threads whose faults on thread-mode mappings wait for a migration: they retry
            // (and fault again where the page is still not there).
            self.mm.wake(self.mm.reservation(), FaultMode::Thread);
        }
    }

    /// The state lock, once no migration in flight overlaps `r`.
    pub(crate) fn lock_state_for(&self, r: VaRange) -> Guard<'_, SpaceState> {
        self.wait_for_migrations(self.lock_state(), r)
    }

    /// The state lock once no migration in flight overlaps `r`, for a userfaultfd's reader
    /// following the program's munmap or mremap: it never sleeps while it waits, and reads the
    /// events pending on its userfaultfds meanwhile ([`sys::Uffd::drain_on_reader`]). A thread
    /// that holds the lock (or a migration that holds pages) may be filling pages, and its
    /// fills get EAGAIN until the reader reads the event the program's next munmap posted:
    /// sleeping on the lock, the reader would wait for that thread, and that thread (100,000
    /// retries later) would fail (found by review: a fork's copies read zeros in the child).
    pub(crate) fn lock_state_for_follow(&self, r: VaRange) -> Guard<'_, SpaceState> {
        self.lock_state_draining(|st| !st.migrations.iter().any(|(_, m)| m.overlaps(&r)))
    }

    /// The state lock, taken by a thread that reads userfaultfd messages (`sys::Uffd::on_reader`),
    /// once `ready` says so (and no `fork()` holds it): while it waits it reads the messages
    /// pending on its fds (`sys::Uffd::drain_on_reader`), so that a thread holding the lock
    /// while it waits for one of them to be read (a drop that raises an event, a copy that
    /// faults on a page the program dropped) goes on.
    fn lock_state_draining(&self, ready: impl Fn(&SpaceState) -> bool) -> Guard<'_, SpaceState> {
        lock_draining(&self.state, |st| !fork::held_against_me(st) && ready(st))
    }

    /// The state lock; while a `fork()` is in progress in another thread, once it is done.
    /// On a thread that reads userfaultfd messages, without blocking them
    /// ([`Self::lock_state_draining`]).
    pub(crate) fn lock_state(&self) -> Guard<'_, SpaceState> {
        if sys::Uffd::on_reader() {
            return self.lock_state_draining(|_| true);
        }
        loop {
            let st = lock(&self.state);
            if !fork::held_against_me(&st) {
                return st;
            }
            drop(st);
            fork::wait_until_done();
        }
    }
}

/// `m`'s lock, taken by a thread that reads userfaultfd messages (`sys::Uffd::on_reader`) once
/// `ready` says so: while it waits it reads the messages pending on its fds
/// (`sys::Uffd::drain_on_reader`), so that a thread holding the lock while it waits for one of
/// them to be read (a drop that raises an event, a copy that faults on a page the program
/// dropped) goes on. On any other thread: the lock, once `ready` says so.
#[track_caller]
pub(crate) fn lock_draining<T>(m: &Mutex<T>, ready: impl Fn(&T) -> bool) -> Guard<'_, T> {
    let reader = sys::Uffd::on_reader();
    let mut tries = 0u32;
    loop {
        if reader {
            if let Some(g) = crate::sync::try_lock(m)
                && ready(&g)
            {
                return g;
            }
            sys::Uffd::drain_on_reader();
        } else {
            let g = lock(m);
            if ready(&g) {
                return g;
            }
        }
        // Yield at first (the holder's critical sections are short); then wait on the
        // reader's fds (woken at once by an event to read, else after 1 ms, to try the lock
        // again), so that a long wait (a fork, a slow migration) does not burn a core.
        tries = tries.saturating_add(1);
        if tries < 64 {
            crate::sync::thread::yield_now();
        } else {
            sys::Uffd::wait_on_reader(1);
        }
    }
}
