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
//!    (from the SIGBUS handler or the handler thread) and every migration phase (a
//!    [`crate::migrate::MigrateVma`] holds it from setup to finalize, which is how CPU accesses
//!    to pages under migration wait, as on the kernel's migration entries).
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
//! A direct `mprotect`, `munmap` or `madvise(MADV_DONTNEED/FREE)` on a managed range:
//! userfaultfd does not report `mprotect`, and hetmem enables no unmap/remove events (an unread
//! event would block the caller). Use [`Space::protect`] and [`Space::unmap`].
//!
//! A direct `mremap` that *moves* a managed range is followed (userfaultfd's REMAP event, read
//! by an event thread per userfaultfd): the moved range becomes the program's plain memory with
//! every byte in place and leaves the space as if unmapped (`SpaceCore::follow_remap`); a
//! moved shared file mapping aborts the process with a message (its stores could not be
//! written back). An `mremap` that shrinks or grows in place is not reported.
//!
//! # fork
//!
//! Managed ranges and pools are `MADV_DONTFORK`: a child process has no mapping there (an access
//! is SIGSEGV, never zeros and never the parent's memory), and hetmem objects are inert in the
//! child (their methods return [`Error::Forked`]).

use std::collections::BTreeMap;

use crate::addr::{FrameIdx, PAGE_SIZE, PAGES_PER_LARGE, VaRange, VirtAddr, Vpn};
use crate::error::{Error, Result};
use crate::hmm::{IntervalNotifier, IntervalOps, NotifyEvent, NotifyRange};
use crate::mm::{FaultMode, KernelMm, Mm, ModelMm};
use crate::pagecache::{FileCache, FileHandle, Fill, MapRec, StoreFault};
use crate::policy::trace::{Direction, EventKind, FaultState, TraceEvent, Tracer};
use crate::policy::{CpuFault, CpuFaultAction, DefaultPolicy, Policy};
use crate::pool::{MemoryKind, Owner, Pagemap, PagemapId};
use crate::sync::{Arc, AtomicU64, Guard, Mutex, Ordering, Weak, lock};
use crate::sys::{self, LARGE_PAGE_SIZE, Prot, Region};

// ---------------------------------------------------------------------------------------------
// Page entries
// ---------------------------------------------------------------------------------------------

/// Where a page's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Never touched (or discarded): reads as zeros.
    None,
    /// Mapped in the CPU view.
    Present,
    /// In a device-private frame.
    Device,
    /// In the stash, with device-exclusive (atomic) access granted to a device.
    Exclusive,
}

/// One page's entry: 8 bytes.
///
/// Bits: 0-1 state; 2 LARGE; 3 COHERENT (a `Present` page charged to a device-coherent pagemap:
/// the CPU page is the device frame); 8-15 pagemap id (Device and coherent: the frame's pagemap;
/// Exclusive: the pagemap of the device holding exclusive access, whose frame is in the space's
/// stash); 16-23 short-term pins; 24-31 long-term pins; 32-63 frame index (Device, coherent,
/// Exclusive).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pte(u64);

const ST_NONE: u64 = 0;
const ST_PRESENT: u64 = 1;
const ST_DEVICE: u64 = 2;
const ST_EXCL: u64 = 3;
const F_LARGE: u64 = 1 << 2;
const F_COHERENT: u64 = 1 << 3;

impl Pte {
    pub(crate) const NONE: Pte = Pte(ST_NONE);

    pub(crate) fn state(self) -> PageState {
        match self.0 & 3 {
            ST_NONE => PageState::None,
            ST_PRESENT => PageState::Present,
            ST_DEVICE => PageState::Device,
            _ => PageState::Exclusive,
        }
    }
    pub(crate) fn large(self) -> bool {
        self.0 & F_LARGE != 0
    }
    pub(crate) fn pagemap(self) -> PagemapId {
        PagemapId((self.0 >> 8) as u8)
    }
    pub(crate) fn frame(self) -> FrameIdx {
        FrameIdx((self.0 >> 32) as u32)
    }
    pub(crate) fn short_pins(self) -> u64 {
        (self.0 >> 16) & 0xff
    }
    pub(crate) fn long_pins(self) -> u64 {
        (self.0 >> 24) & 0xff
    }
    pub(crate) fn pinned(self) -> bool {
        self.short_pins() + self.long_pins() > 0
    }
    fn pins_bits(self) -> u64 {
        self.0 & (0xffff << 16)
    }
    pub(crate) fn present(large: bool, keep: Pte) -> Pte {
        Pte(ST_PRESENT | if large { F_LARGE } else { 0 } | keep.pins_bits())
    }
    pub(crate) fn device(pm: PagemapId, frame: FrameIdx, large: bool) -> Pte {
        Pte(ST_DEVICE
            | if large { F_LARGE } else { 0 }
            | (pm.0 as u64) << 8
            | (frame.0 as u64) << 32)
    }
    /// A present page resident in device-coherent memory (frame `frame` of `pm`).
    pub(crate) fn coherent(pm: PagemapId, frame: FrameIdx, large: bool, keep: Pte) -> Pte {
        Pte(ST_PRESENT
            | F_COHERENT
            | if large { F_LARGE } else { 0 }
            | keep.pins_bits()
            | (pm.0 as u64) << 8
            | (frame.0 as u64) << 32)
    }
    /// Whether the page is present and resident in device-coherent memory.
    pub(crate) fn is_coherent(self) -> bool {
        self.0 & 3 == ST_PRESENT && self.0 & F_COHERENT != 0
    }
    /// The device frame this entry holds, if any: (pagemap, frame, large). For Exclusive pages
    /// the frame is in the stash (not in `pagemap`).
    pub(crate) fn device_frame(self) -> Option<(PagemapId, FrameIdx, bool)> {
        match self.state() {
            PageState::Device | PageState::Exclusive => {
                Some((self.pagemap(), self.frame(), self.large()))
            }
            PageState::Present if self.is_coherent() => {
                Some((self.pagemap(), self.frame(), self.large()))
            }
            _ => None,
        }
    }
    pub(crate) fn exclusive(pm: PagemapId, frame: FrameIdx) -> Pte {
        Pte(ST_EXCL | (pm.0 as u64) << 8 | (frame.0 as u64) << 32)
    }
    pub(crate) fn without_large(self) -> Pte {
        Pte(self.0 & !F_LARGE)
    }
    fn with_pin(self, long: bool, delta: i64) -> Option<Pte> {
        let shift = if long { 24 } else { 16 };
        let cur = ((self.0 >> shift) & 0xff) as i64;
        let new = cur + delta;
        if !(0..=0xff).contains(&new) {
            return None;
        }
        Some(Pte((self.0 & !(0xff << shift)) | (new as u64) << shift))
    }
}

impl std::fmt::Debug for Pte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.state())?;
        if self.large() {
            write!(f, "+L")?;
        }
        if matches!(self.state(), PageState::Device | PageState::Exclusive) {
            write!(f, "(pm{} f{})", self.pagemap().0, self.frame().0)?;
        }
        if self.pinned() {
            write!(f, " pins {}/{}", self.short_pins(), self.long_pins())?;
        }
        Ok(())
    }
}

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

/// The state behind [`SpaceCore::state`] (lock 1 of the module doc).
pub(crate) struct SpaceState {
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
}

impl SpaceState {
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
    pub(crate) pages_to_device: AtomicU64,
    pub(crate) pages_to_system: AtomicU64,
    pub(crate) exclusive_revoked: AtomicU64,
    pub(crate) foreign_remaps: AtomicU64,
}

/// A snapshot of an address space's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// CPU faults served (first touch, fault-back, revocations).
    pub cpu_faults: u64,
    /// Pages zero-filled on first touch (fault-around included).
    pub zero_fill_pages: u64,
    /// Pages migrated to device memory.
    pub pages_to_device: u64,
    /// Pages migrated back to system memory (CPU faults, migrations, eviction).
    pub pages_to_system: u64,
    /// Device-exclusive entries revoked by CPU access.
    pub exclusive_revoked: u64,
    /// Direct mremaps of managed ranges that hetmem followed (the moved range became the
    /// program's plain memory, with all its data).
    pub foreign_remaps: u64,
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
    pub(crate) inv_seq: AtomicU64,
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

/// Process-wide table of address spaces by id, for device eviction's reverse map. A leaf lock.
static SPACES: std::sync::Mutex<Vec<Option<Weak<SpaceCore>>>> = std::sync::Mutex::new(Vec::new());

fn alloc_space_id(core: &Arc<SpaceCore>) -> Result<u16> {
    let _ = core;
    let mut t = SPACES.lock().unwrap_or_else(|p| p.into_inner());
    for (i, s) in t.iter_mut().enumerate().skip(1) {
        if s.as_ref().is_none_or(|w| w.strong_count() == 0) {
            *s = None;
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
    t.push(None);
    Ok((t.len() - 1) as u16)
}

pub(crate) fn space_by_id(id: u16) -> Option<Arc<SpaceCore>> {
    let t = SPACES.lock().unwrap_or_else(|p| p.into_inner());
    t.get(id as usize)
        .and_then(|s| s.as_ref())
        .and_then(|w| w.upgrade())
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
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig {
            size: 64 << 30,
            stash: 64 << 20,
            user_mode_only: false,
        }
    }
}

/// An address space (see the module doc). Cloning gives another handle to the same space.
#[derive(Clone, Debug)]
pub struct Space {
    pub(crate) core: Arc<SpaceCore>,
    _reg: Option<Arc<sys::FaultRange>>,
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
        let mm = KernelMm::new(round_up(cfg.size)?, cfg.user_mode_only)
            .map_err(|e| Error::os("reserve address space", e))?;
        let core = Self::make_core(std::sync::Arc::new(mm), cfg.stash)?;
        let r = core.mm.reservation();
        let target: std::sync::Arc<dyn sys::FaultTarget> = core.clone();
        let reg = sys::register_fault_range(r.start.get(), r.end.get(), target)
            .map_err(|e| Error::os("register fault range", e))?;
        Ok(Space {
            core,
            _reg: Some(Arc::new(reg)),
        })
    }

    /// An address space over the in-memory model of the kernel ([`ModelMm`]): CPU accesses go
    /// through [`Space::cpu_read`]/[`Space::cpu_write`] and fault into the core directly. Used
    /// for schedule exploration and model-based tests.
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
                policy: std::sync::Arc::new(DefaultPolicy),
                trace: None,
            }),
            inv_seq: AtomicU64::new(0),
            counters: Counters::default(),
            zero,
            bounce,
            stash,
        });
        let id = alloc_space_id(&core)?;
        // The id is only read through `space_by_id` and `rmap` entries written later; set it
        // before the core is shared.
        let mut core = core;
        Arc::get_mut(&mut core).expect("core not shared yet").id = id;
        SPACES.lock().unwrap_or_else(|p| p.into_inner())[id as usize] = Some(Arc::downgrade(&core));
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

    pub(crate) fn check_owner_process(&self) -> Result<()> {
        self.core.check_process()
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
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedLength { len });
        }
        let mut st = lock(&self.core.state);
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
        let mut st = lock(&self.core.state);
        let r = self.free_range(&st, len, PAGE_SIZE)?;
        let ptes = new_ptes(r)?;
        let pgoff = offset / PAGE_SIZE as u64;
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
            cache.attach(MapRec {
                mm: std::sync::Arc::downgrade(&self.core.mm),
                space: Arc::downgrade(&self.core),
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

    /// Creates an anonymous mapping at a fixed, free address.
    pub fn map_anon_at(&self, addr: VirtAddr, len: usize, opts: MapOptions) -> Result<()> {
        self.check_owner_process()?;
        let r = VaRange::new(addr, len)?;
        let res = self.core.mm.reservation();
        if r.start < res.start || r.end > res.end {
            return Err(Error::OutOfSpace { addr, len });
        }
        let mut st = lock(&self.core.state);
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
        let mut st = lock(&self.core.state);
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
        let mut st = lock(&self.core.state);
        st.check_covered(r)?;
        self.core.for_each_vma_in(&mut st, r, |v| v.large = true);
        Ok(())
    }

    /// Unmaps `[addr, addr+len)` (holes allowed, as munmap): device mappings are invalidated
    /// (UNMAP), device and stash frames freed, the pages dropped. Later CPU accesses get SIGSEGV.
    pub fn unmap(&self, addr: VirtAddr, len: usize) -> Result<()> {
        self.check_owner_process()?;
        let r = VaRange::new(addr, len)?;
        let res = self.core.mm.reservation();
        if r.start < res.start || r.end > res.end {
            return Err(Error::OutOfSpace { addr, len });
        }
        let mut st = lock(&self.core.state);
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
            cache.detach(&self.core, self.core.id, *range);
        }
        // Then the kernel side (holes in the range are already PROT_NONE and unregistered, so
        // unmapping them too is harmless). If it fails, the mappings stay, re-attached.
        if let Err(e) = self.core.mm.unmap(r) {
            for (cache, range, pgoff, sync) in files {
                cache.attach(MapRec {
                    mm: std::sync::Arc::downgrade(&self.core.mm),
                    space: Arc::downgrade(&self.core),
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
        let keys: Vec<usize> = st
            .vmas
            .values()
            .filter(|v| r.overlaps(&v.range))
            .map(|v| v.range.start.get())
            .collect();
        for k in keys {
            let v = st.vmas.remove(&k).expect("key just listed");
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
            let st = lock(&self.core.state);
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
        let st = lock(&self.core.state);
        st.vma(a).map(|v| v.range)
    }

    /// The end of the mapping containing `a` and whether it is readable.
    pub(crate) fn vma_info(&self, a: VirtAddr) -> Option<(VirtAddr, bool)> {
        let st = lock(&self.core.state);
        st.vma(a).map(|v| (v.range.end, v.prot.readable()))
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

    /// Where the page containing `addr` lives.
    pub fn residency(&self, addr: VirtAddr) -> Residency {
        let st = lock(&self.core.state);
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
        lock(&self.core.state).policy = policy;
    }

    /// The placement policy of this space.
    pub fn policy(&self) -> std::sync::Arc<dyn Policy> {
        self.core.policy()
    }

    /// Records this space's events (CPU faults, migrations, evictions: see
    /// [`crate::policy::trace`]) into `trace` from now on; `None` stops.
    pub fn set_trace(&self, trace: Option<Tracer>) {
        lock(&self.core.state).trace = trace;
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
            pages_to_device: c.pages_to_device.load(Ordering::Relaxed),
            pages_to_system: c.pages_to_system.load(Ordering::Relaxed),
            exclusive_revoked: c.exclusive_revoked.load(Ordering::Relaxed),
            foreign_remaps: c.foreign_remaps.load(Ordering::Relaxed),
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
        let st = lock(&self.core.state);
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
        core.mm.cpu_read(addr, dst, &|a, w| core.handle_fault(a, w));
        Ok(())
    }

    /// A CPU write of managed memory with real stores.
    pub fn cpu_write(&self, addr: VirtAddr, src: &[u8]) -> Result<()> {
        self.check_cpu(addr, src.len(), true)?;
        let core = &self.core;
        core.mm
            .cpu_write(addr, src, &|a, w| core.handle_fault(a, w));
        Ok(())
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
        Ok(core
            .mm
            .cpu_fetch_add(addr, v, &|a, w| core.handle_fault(a, w)))
    }

    /// A raw pointer to `addr` for CPU code that accesses managed memory directly (loads and
    /// stores through it fault into hetmem as needed). Only for spaces over the real kernel.
    pub fn as_ptr(&self, addr: VirtAddr) -> *mut u8 {
        addr.get() as *mut u8
    }

    // --- pins --------------------------------------------------------------------------------

    /// Pins the pages of `[addr, addr+len)` (the `get_user_pages` analogue): missing pages are
    /// filled, device-private and exclusive pages brought back to system memory first; pinned
    /// pages are not migrated until the pin is dropped. `long_term` is `FOLL_LONGTERM`: it also
    /// moves device-coherent pages to system memory (a short-term pin leaves them in place).
    /// All-or-nothing: on error no page is pinned (pages may have been brought back).
    pub fn pin(&self, addr: VirtAddr, len: usize, long_term: bool) -> Result<Pin> {
        self.check_owner_process()?;
        let r = VaRange::new(addr, len)?;
        // A file page being removed (eviction, truncate, punch: the cache blocks it while
        // device mappings are invalidated) cannot be made present yet: wait for that removal to
        // end, with no lock held, and try again. Bounded: each round waits for one removal, and
        // a removal is bounded work; a page that stays blocked this many times is EBUSY.
        const BUSY_ROUNDS: usize = 1000;
        let mut round = 0;
        let mut st = loop {
            let mut st = lock(&self.core.state);
            st.check_covered(r)?;
            for p in 0..r.pages() {
                let a = r.start.add(p * PAGE_SIZE);
                let v = st.vma(a).expect("covered");
                if !v.prot.readable() {
                    return Err(Error::NoRead { addr: a });
                }
            }
            match self.make_range_present(&mut st, r, long_term) {
                Ok(()) => break st,
                Err((Error::Busy, Some(cache))) if round < BUSY_ROUNDS => {
                    drop(st);
                    cache.wait_for_removal();
                    round += 1;
                }
                Err((e, _)) => return Err(e),
            }
        };
        for p in 0..r.pages() {
            let pte = st.pte(r.start.add(p * PAGE_SIZE)).expect("covered");
            if pte.with_pin(long_term, 1).is_none() {
                return Err(Error::Busy);
            }
        }
        let mut file_pins: Vec<(Arc<FileCache>, u64, u64)> = Vec::new();
        for p in 0..r.pages() {
            let a = r.start.add(p * PAGE_SIZE);
            let pte = st.pte(a).expect("covered");
            st.set_pte(a, pte.with_pin(long_term, 1).expect("checked above"));
            // A pinned page of a shared file mapping lives in the file's cache: never evicted
            // while the pin is held, even after the mapping is gone (as a pinned page outlives
            // its mapping in the kernel).
            if let Some((cache, page)) = st.file_page(a) {
                cache.pin_page(page, 1);
                match file_pins.last_mut() {
                    Some((c, _, e)) if Arc::ptr_eq(c, &cache) && *e == page => *e += 1,
                    _ => file_pins.push((cache, page, page + 1)),
                }
            }
        }
        let mut pieces = Vec::new();
        let mut a = r.start;
        while a < r.end {
            let v = st.vma(a).expect("covered");
            let end = v.range.end.min(r.end);
            pieces.push((VaRange { start: a, end }, v.id));
            a = end;
        }
        Ok(Pin {
            core: self.core.clone(),
            pieces,
            file_pins,
            long_term,
        })
    }

    /// Makes every page of `r` present (and, for a long-term pin, in system memory). On
    /// failure, the error and, for a file page being removed, its cache (to wait on).
    #[allow(clippy::type_complexity)]
    fn make_range_present(
        &self,
        st: &mut SpaceState,
        r: VaRange,
        long_term: bool,
    ) -> std::result::Result<(), (Error, Option<Arc<FileCache>>)> {
        for p in 0..r.pages() {
            let a = r.start.add(p * PAGE_SIZE);
            if let Err(e) = self.core.make_present(st, a) {
                let cache = st.file_page(a).map(|(c, _)| c);
                return Err((e, cache));
            }
            if long_term {
                // A long-term pin would block the device from evicting its memory: coherent
                // pages move to system memory first (the kernel's FOLL_LONGTERM rule).
                self.core.demote_coherent(st, a);
            }
        }
        Ok(())
    }
}

/// A pin on a range of pages (see [`Space::pin`]); dropping it unpins.
#[derive(Debug)]
pub struct Pin {
    core: Arc<SpaceCore>,
    /// The pinned ranges and the mapping each belongs to.
    pieces: Vec<(VaRange, u64)>,
    /// Runs of file pages pinned in their caches (`first..last`): released on drop whatever
    /// happened to the mappings.
    file_pins: Vec<(Arc<FileCache>, u64, u64)>,
    long_term: bool,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = lock(&self.core.state);
        for &(r, id) in &self.pieces {
            for p in 0..r.pages() {
                let a = r.start.add(p * PAGE_SIZE);
                // Only the mapping that was pinned: after an unmap (and maybe a new mapping at
                // the same address) the pin has nothing left to release.
                let Some(v) = st.vma_mut(a).filter(|v| v.id == id) else {
                    continue;
                };
                let i = v.idx(a);
                if let Some(np) = v.ptes[i].with_pin(self.long_term, -1) {
                    v.ptes[i] = np;
                }
            }
        }
        drop(st);
        for (cache, first, last) in &self.file_pins {
            for page in *first..*last {
                cache.pin_page(page, -1);
            }
        }
    }
}

/// Records why a fault in a mapping could not be served (printed if the access then takes the
/// default SIGBUS action) and returns false.
fn unserved(why: &'static str) -> bool {
    sys::note_unserved_fault(why);
    false
}

/// The unit holding page `a`: its 2 MiB unit when `large`, else the page itself.
fn unit_range(a: VirtAddr, large: bool) -> VaRange {
    let (start, len) = if large {
        (VirtAddr(a.get() & !(LARGE_PAGE_SIZE - 1)), LARGE_PAGE_SIZE)
    } else {
        (a.page_down(), PAGE_SIZE)
    };
    VaRange {
        start,
        end: start.add(len),
    }
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
        // The address space is going away: tell every notifier (RELEASE) so that devices drop
        // their mappings of it. Device frames still holding pages of this space are freed.
        let st = lock(&self.state);
        let r = self.mm.reservation();
        self.invalidate(&st, r, NotifyEvent::Release, None);
        for v in st.vmas.values() {
            self.free_frames(&st, &v.ptes);
            // File mappings: what CPU stores dirtied stays in the cache (written back by the
            // next fsync of the file).
            if let Some(f) = v.file.as_ref().filter(|f| f.shared) {
                f.cache.detach(self, self.id, v.range);
            }
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
}

impl SpaceCore {
    /// A direct mremap(2) by the program moved `from..from + len` to `to` (userfaultfd's REMAP
    /// event; the moved range is still registered with hetmem's userfaultfd, and the program's
    /// mremap has returned). hetmem follows it by letting go: every page's data goes to its new
    /// address — device-private pages are copied back there, device-exclusive ones too, coherent
    /// pages are already there (their device frames are released), pages of a private file
    /// mapping not read yet get the file's bytes — then the new range is unregistered and is
    /// plain memory of the program's from then on, and the old range leaves the space as if
    /// unmapped (devices get UNMAP; the reservation hole is mapped PROT_NONE again, or kept out
    /// of use if the program mapped something there). Nothing is lost and nothing reads zeros
    /// that were not zeros.
    ///
    /// A shared file mapping cannot be let go that way (stores through the new address could
    /// never be written back to the file): the process is aborted with a message, the loud
    /// failure of an unsupported operation.
    ///
    /// Runs in the event reader thread, which opened a [`sys::RemapWindow`] before reading the
    /// event: until this returns, a signal-mode access to the moved range waits instead of
    /// dying.
    pub(crate) fn follow_remap(&self, from: VirtAddr, to: VirtAddr, len: usize) {
        let (Some(end), Some(_)) = (from.checked_add(len), to.checked_add(len)) else {
            return;
        };
        let old = VaRange { start: from, end };
        let mut st = lock(&self.state);
        if let Some(v) = st
            .vmas
            .values()
            .find(|v| v.range.overlaps(&old) && v.file.as_ref().is_some_and(|f| f.shared))
        {
            let (mut b1, mut b2) = ([0u8; 18], [0u8; 18]);
            sys::abort_with(&[
                b"hetmem: a direct mremap moved the shared file mapping at ",
                sys::hex(v.range.start.get(), &mut b1),
                b" to ",
                sys::hex(to.get(), &mut b2),
                b": not supported (stores through the new address could not be written back \
                  to the file); use Space::unmap and Space::map_file\n",
            ]);
        }
        self.invalidate(&st, old, NotifyEvent::Unmap, None);
        self.split_at(&mut st, old.start);
        self.split_at(&mut st, old.end);
        let keys: Vec<usize> = st
            .vmas
            .values()
            .filter(|v| old.overlaps(&v.range))
            .map(|v| v.range.start.get())
            .collect();
        for k in keys {
            let v = st.vmas.remove(&k).expect("key just listed");
            let moved = VaRange {
                start: to.add(v.range.start.get() - from.get()),
                end: to.add(v.range.end.get() - from.get()),
            };
            for (i, pte) in v.ptes.iter().enumerate() {
                let dst = moved.start.add(i * PAGE_SIZE);
                let copied = match pte.state() {
                    PageState::Present => Ok(()),
                    PageState::None => match &v.file {
                        // As a first access would have read it.
                        Some(f) => {
                            let mut buf = [0u8; PAGE_SIZE];
                            f.cache
                                .read_pages(f.pgoff + i as u64, &mut buf)
                                .and_then(|()| {
                                    self.bounce
                                        .write(0, &buf)
                                        .map_err(|e| Error::os("fill from file", e))
                                })
                                .and_then(|()| {
                                    self.mm
                                        .install(dst, &self.bounce, 0, PAGE_SIZE, v.mode)
                                        .map_err(|e| Error::os("follow mremap", e.into()))
                                })
                        }
                        None => Ok(()),
                    },
                    PageState::Device | PageState::Exclusive => {
                        let (pm, frame, _) = pte.device_frame().expect("device or stash frame");
                        let pool = if pte.state() == PageState::Exclusive {
                            self.stash.clone()
                        } else {
                            st.pagemap(pm)
                        };
                        pool.charge_migration(PAGE_SIZE);
                        self.install_from_frame(dst, &pool, frame.offset(), PAGE_SIZE, v.mode)
                            .map_err(|e| Error::os("follow mremap", e.into()))
                    }
                };
                if let Err(e) = copied {
                    // Never silently: the page's data could not be placed at its new address.
                    let mut b = [0u8; 18];
                    let msg = format!(" ({e})\n");
                    sys::abort_with(&[
                        b"hetmem: following a direct mremap, the data of page ",
                        sys::hex(dst.get(), &mut b),
                        b" could not be copied to its new address",
                        msg.as_bytes(),
                    ]);
                }
            }
            let _ = self.mm.forget_moved(moved, v.mode);
            self.free_frames(&st, &v.ptes);
        }
        if self.mm.restore_reservation(old).is_err() {
            st.lost.push(old);
        }
        self.counters.foreign_remaps.fetch_add(1, Ordering::Relaxed);
    }

    /// Installs `len` bytes of `pm`'s frames at byte `off` into the missing CPU pages at `dst`
    /// (`UFFDIO_COPY`): straight from the frames when the device's memory is host-addressable,
    /// else through the bounce buffer (the caller holds the state lock, so it is ours). No
    /// allocation: this is the fault-back path.
    pub(crate) fn install_from_frame(
        &self,
        dst: VirtAddr,
        pm: &Pagemap,
        off: usize,
        len: usize,
        mode: FaultMode,
    ) -> std::result::Result<(), sys::UffdError> {
        let store = pm.store();
        match store.host_view() {
            Some(r) => self.mm.install(dst, r, off, len, mode),
            None => {
                store
                    .copy_out(off, &self.bounce, 0, len)
                    .map_err(|e| sys::UffdError::Os(e.raw_os_error().unwrap_or(libc::EIO)))?;
                self.mm.install(dst, &self.bounce, 0, len, mode)
            }
        }
    }

    /// Copies `len` bytes of present managed pages at `addr` into `pm`'s frames at byte `off`
    /// (directly, or through the bounce buffer for a device the CPU cannot address; the caller
    /// holds the state lock).
    pub(crate) fn copy_into_frames(
        &self,
        addr: VirtAddr,
        pm: &Pagemap,
        off: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let store = pm.store();
        match store.host_view() {
            Some(r) => {
                self.mm.copy_to(addr, r, off, len);
                Ok(())
            }
            None => {
                self.mm.copy_to(addr, &self.bounce, 0, len);
                store.copy_in(off, &self.bounce, 0, len)
            }
        }
    }

    /// Copies `len` bytes between two pools' frames (a device-to-device migration), through
    /// the bounce buffer when either side is not host-addressable (the caller holds the state
    /// lock).
    pub(crate) fn copy_between_frames(
        &self,
        from: &Pagemap,
        from_off: usize,
        to: &Pagemap,
        to_off: usize,
        len: usize,
    ) -> std::io::Result<()> {
        match (from.store().host_view(), to.store().host_view()) {
            (Some(a), _) => to.store().copy_in(to_off, a, from_off, len),
            (None, Some(b)) => from.store().copy_out(from_off, b, to_off, len),
            (None, None) => {
                from.store().copy_out(from_off, &self.bounce, 0, len)?;
                to.store().copy_in(to_off, &self.bounce, 0, len)
            }
        }
    }

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
        st.insert_vma(r, opts.prot, opts.mode, opts.large, None, ptes);
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
            Arc::downgrade(self),
            VaRange { start, end },
            ops,
        ));
        lock(&self.state).notifiers.push(n.clone());
        n
    }

    pub(crate) fn remove_notifier(&self, n: &Arc<IntervalNotifier>) {
        lock(&self.state).notifiers.retain(|x| !Arc::ptr_eq(x, n));
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
    fn free_frames(&self, st: &SpaceState, ptes: &[Pte]) {
        let mut i = 0;
        while i < ptes.len() {
            let p = ptes[i];
            if let Some((pm, frame, large)) = p.device_frame() {
                let pm = if p.state() == PageState::Exclusive {
                    self.stash.clone()
                } else {
                    st.pagemap(pm)
                };
                pm.free(frame, large);
                if large {
                    i += PAGES_PER_LARGE;
                    continue;
                }
            }
            i += 1;
        }
    }

    /// The CPU fault service: a load or store at page `a` faulted (missing page, or a store to a
    /// write-protected one). Returns false if `a` is not in a mapping of this space.
    pub(crate) fn handle_fault(&self, a: VirtAddr, write: bool) -> bool {
        if sys::getpid() != self.pid {
            return false;
        }
        let mut st = lock(&self.state);
        let Some(pte) = st.pte(a) else { return false };
        self.counters.cpu_faults.fetch_add(1, Ordering::Relaxed);
        st.trace_with(|| {
            let (state, owner) = if st.file_page(a).is_some() {
                (FaultState::File, Owner(0))
            } else {
                match pte.state() {
                    PageState::None => (FaultState::Missing, Owner(0)),
                    PageState::Present => (FaultState::Present, Owner(0)),
                    PageState::Device => (FaultState::Device, st.pagemap(pte.pagemap()).owner()),
                    PageState::Exclusive => {
                        (FaultState::Exclusive, st.pagemap(pte.pagemap()).owner())
                    }
                }
            };
            TraceEvent::cpu_fault(self.id, a, write, state, owner)
        });
        if let Some(v) = st
            .vma(a)
            .filter(|v| v.file.as_ref().is_some_and(|f| f.sync))
            && write
        {
            // A store to a mapping that intercepts stores (a clean page, or a missing one).
            let f = v.file.as_ref().expect("filtered");
            let (cache, page) = (f.cache.clone(), f.pgoff + v.idx(a) as u64);
            let r = VaRange {
                start: a,
                end: a.add(PAGE_SIZE),
            };
            return match cache.store_fault(self, page, r) {
                Ok(StoreFault::Done) => true,
                Ok(StoreFault::Sigbus) => unserved(
                    "a store past the end of the file, or at the dirty bound after a failed \
                     writeback",
                ),
                Err(_) => unserved("the page could not be filled from the file for a store"),
                Ok(StoreFault::WaitFlush) => {
                    drop(st);
                    cache.wait_flush();
                    true
                }
            };
        }
        if let Some((cache, page)) = st.file_page(a) {
            // A file mapping: the page is not in the cache yet. Fill the cache (the memfd) and
            // let the access retry: the kernel then maps the page. Past the end of file (or on
            // a read error) the access gets SIGBUS, as with the kernel's mmap. While the page is
            // being removed (truncate, punch), the access retries.
            return match cache.fault_fill(page) {
                Ok(Fill::Filled) | Ok(Fill::Busy) => true,
                Ok(Fill::PastEof) => unserved("an access past the end of the file"),
                Err(_) => unserved("the page could not be filled from the file"),
            };
        }
        let ok = match pte.state() {
            PageState::None => match self.fault_zero(&mut st, a) {
                Ok(()) => true,
                Err(Error::NotMapped { .. }) => unserved("an access past the end of the file"),
                Err(_) => unserved("the page could not be zero-filled or filled from the file"),
            },
            PageState::Present => {
                // Either a store hit a write-protected page after the migration that protected
                // it declined the page (or a racing fault already served it), or the page was
                // dropped behind hetmem's back by a direct madvise(MADV_DONTNEED/REMOVE), which
                // raises no event: then every access would fault here forever. Installing the
                // page tells them apart (EEXIST: it is there) and gives a dropped page what the
                // kernel gives it: zeros, or the file's bytes in a private file mapping.
                if let Err(e) = self.refill_dropped(&st, a) {
                    return e.errno() == libc::EAGAIN
                        || unserved("a page dropped by a direct madvise could not be refilled");
                }
                let v = st.vma(a).expect("pte found");
                if write && v.prot.writable() {
                    let _ = self.mm.write_protect(
                        VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        },
                        false,
                        v.mode,
                    );
                }
                true
            }
            PageState::Device => {
                // The policy decides how much comes back (no allocation: plain data in and out).
                let pm = st.pagemap(pte.pagemap());
                let q = CpuFault {
                    addr: a,
                    write,
                    owner: pm.owner(),
                    kind: pm.kind(),
                    large: pte.large(),
                };
                let action = st.policy.cpu_fault(&q);
                if action == CpuFaultAction::MigrateBackPage && pte.large() {
                    // Only this page comes back: the unit (and its device frame) becomes base
                    // pages first.
                    self.split_unit(&mut st, a);
                }
                self.make_present(&mut st, a).is_ok()
                    || unserved("the page could not be brought back from device memory")
            }
            PageState::Exclusive => {
                self.make_present(&mut st, a).is_ok()
                    || unserved("device-exclusive access could not be revoked")
            }
        };
        if let Some(v) = st.vma(a) {
            self.mm.wake(
                VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                },
                v.mode,
            );
        }
        ok
    }

    /// Installs page `a` of a `Present` entry if the kernel has no page there (dropped by a
    /// direct `madvise`): zeros, or for a private file mapping the file's bytes. Nothing when the
    /// page is there.
    fn refill_dropped(&self, st: &SpaceState, a: VirtAddr) -> Result<()> {
        let v = st.vma(a).expect("caller found the pte");
        let src = match &v.file {
            None => &self.zero,
            Some(f) => {
                // Under the state lock the bounce buffer is ours.
                f.cache
                    .read_pages_into(f.pgoff + v.idx(a) as u64, 1, &self.bounce, 0)?;
                &self.bounce
            }
        };
        match self.mm.install(a, src, 0, PAGE_SIZE, v.mode) {
            Ok(()) | Err(sys::UffdError::Exists) => Ok(()),
            Err(e) => Err(Error::os("refill a dropped page", e.into())),
        }
    }

    /// First touch: zero-fill a run of missing pages around `a` (fault-around: 64 KiB, doubling
    /// up to 2 MiB while faults come in sequence; a whole 2 MiB unit in a large mapping).
    fn fault_zero(&self, st: &mut SpaceState, a: VirtAddr) -> Result<()> {
        let (vs, ve, large, mode, unit) = {
            let v = st.vma(a).expect("caller found the pte");
            (
                v.range.start.get(),
                v.range.end.get(),
                v.large,
                v.mode,
                v.unit_of(v.idx(a)),
            )
        };
        let win = if large && unit.is_some() {
            LARGE_PAGE_SIZE
        } else {
            let (next, window) = sys::fault_around_state();
            let w = if a.get() == next {
                (window * 2).clamp(64 << 10, LARGE_PAGE_SIZE)
            } else {
                64 << 10
            };
            sys::set_fault_around_state(next, w);
            w
        };
        let ws = (a.get() & !(win - 1)).max(vs);
        let we = ((a.get() & !(win - 1)) + win).min(ve);
        let v = st.vma(a).expect("caller found the pte");
        let i = v.idx(a);
        let (lo, hi) = (v.idx(VirtAddr(ws)), v.idx(VirtAddr(we)));
        let mut s = i;
        while s > lo && v.ptes[s - 1].state() == PageState::None {
            s -= 1;
        }
        let mut e = i + 1;
        while e < hi && v.ptes[e].state() == PageState::None {
            e += 1;
        }
        // A private file mapping fills from the file (up to its end; past it: SIGBUS).
        let source = v.file.as_ref().map(|f| (f.cache.clone(), f.pgoff));
        if let Some((cache, pgoff)) = &source {
            let eof = cache.len_pages();
            if pgoff + i as u64 >= eof {
                return Err(Error::NotMapped { addr: a });
            }
            e = e.min((eof - pgoff) as usize);
        }
        let start = v.addr(s);
        let whole_unit = large && unit == Some((s, e)) && source.is_none();
        let mut done = 0;
        while done < e - s {
            let n = (e - s - done).min(PAGES_PER_LARGE);
            let dst = start.add(done * PAGE_SIZE);
            let (src, off) = match &source {
                None => (&self.zero, 0),
                Some((cache, pgoff)) => {
                    // Under the state lock the bounce buffer is ours.
                    let file_page = pgoff + (s + done) as u64;
                    cache.read_pages_into(file_page, n, &self.bounce, 0)?;
                    (&self.bounce, 0)
                }
            };
            match self.mm.install(dst, src, off, n * PAGE_SIZE, mode) {
                Ok(()) | Err(sys::UffdError::Exists) => {}
                Err(err) => {
                    // Nothing of the run may stay mapped while its entries say missing.
                    let _ = self.mm.zap(VaRange {
                        start,
                        end: start.add((e - s) * PAGE_SIZE),
                    });
                    return Err(Error::os("zero-fill", err.into()));
                }
            }
            done += n;
        }
        let v = st.vma_mut(a).expect("caller found the pte");
        for p in &mut v.ptes[s..e] {
            *p = Pte::present(whole_unit, *p);
        }
        let (_, w) = sys::fault_around_state();
        sys::set_fault_around_state(start.get() + (e - s) * PAGE_SIZE, w);
        self.counters
            .zero_fill_pages
            .fetch_add((e - s) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes page `a` present in system memory: zero-fills a missing page, migrates a
    /// device-private page back (`migrate_to_ram`: the whole 2 MiB unit if it is one), revokes
    /// device-exclusive access. Device mappings are invalidated first.
    pub(crate) fn make_present(&self, st: &mut SpaceState, a: VirtAddr) -> Result<()> {
        let pte = st.pte(a).ok_or(Error::NotMapped { addr: a })?;
        if let Some((cache, page)) = st.file_page(a) {
            // A file page is present once it is in the cache (any mapping then maps it).
            return match cache.fault_fill(page)? {
                Fill::Filled => Ok(()),
                Fill::PastEof => Err(Error::NotMapped { addr: a }),
                // Being removed: the caller (range_fault, pin) retries without holding locks.
                Fill::Busy => Err(Error::Busy),
            };
        }
        match pte.state() {
            PageState::Present => Ok(()),
            PageState::None => {
                let (mode, large, file) = {
                    let v = st.vma(a).expect("pte");
                    (v.mode, v.large, v.file.is_some())
                };
                if large || file {
                    // As a CPU fault would: a whole 2 MiB unit where it fits (the kernel faults
                    // in a huge page on a MADV_HUGEPAGE range).
                    return self.fault_zero(st, a);
                }
                match self.mm.install(a, &self.zero, 0, PAGE_SIZE, mode) {
                    Ok(()) | Err(sys::UffdError::Exists) => {}
                    Err(e) => {
                        let _ = self.mm.zap(VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        });
                        return Err(Error::os("zero-fill", e.into()));
                    }
                }
                st.set_pte(a, Pte::present(false, pte));
                self.counters
                    .zero_fill_pages
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            PageState::Device => self.device_to_system(st, a, pte, EventKind::Migrate),
            PageState::Exclusive => {
                let r = VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                };
                self.invalidate(st, r, NotifyEvent::Clear, None);
                self.restore_from_frame(st, r, pte.frame(), self.stash.id(), false)?;
                self.counters
                    .exclusive_revoked
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Brings the device-private page `a` (entry `pte`; its whole 2 MiB unit if it is one) back
    /// to system memory (`migrate_to_ram`), recording it in the trace as `kind` (a migration, or
    /// an eviction).
    fn device_to_system(
        &self,
        st: &mut SpaceState,
        a: VirtAddr,
        pte: Pte,
        kind: EventKind,
    ) -> Result<()> {
        let r = unit_range(a, pte.large());
        self.invalidate(st, r, NotifyEvent::Migrate, None);
        let head = st.pte(r.start).expect("unit inside the mapping");
        self.restore_from_frame(st, r, head.frame(), head.pagemap(), pte.large())?;
        self.counters
            .pages_to_system
            .fetch_add(r.pages() as u64, Ordering::Relaxed);
        st.trace_with(|| {
            let owner = st.pagemap(head.pagemap()).owner();
            TraceEvent::moved(
                kind,
                Direction::ToSystem,
                self.id,
                r.start,
                r.pages(),
                owner,
            )
        });
        Ok(())
    }

    /// Copies frames back into the CPU view at `r` (missing there), marks the pages present and
    /// frees the frames. Caller invalidated device mappings of `r`.
    pub(crate) fn restore_from_frame(
        &self,
        st: &mut SpaceState,
        r: VaRange,
        head: FrameIdx,
        pm: PagemapId,
        large: bool,
    ) -> Result<()> {
        let pagemap = st.pagemap(pm);
        pagemap.charge_migration(r.len());
        let mode = st.vma(r.start).expect("mapped").mode;
        match self.install_from_frame(r.start, &pagemap, head.offset(), r.len(), mode) {
            Ok(()) | Err(sys::UffdError::Exists) => {}
            Err(e) => {
                // Drop what the failed install filled: the pages stay in device memory only.
                let _ = self.mm.zap(r);
                return Err(Error::os("copy back to system memory", e.into()));
            }
        }
        for p in 0..r.pages() {
            let a = r.start.add(p * PAGE_SIZE);
            let old = st.pte(a).expect("mapped");
            st.set_pte(a, Pte::present(large, old));
        }
        if large {
            pagemap.free(head, true);
        } else {
            for p in 0..r.pages() {
                pagemap.free(FrameIdx(head.0 + p as u32), false);
            }
        }
        Ok(())
    }

    /// Moves a coherent-resident page (its whole 2 MiB unit if it is one) to system memory:
    /// device mappings are invalidated (MIGRATE), the device frame is released. The bytes stay
    /// where they are: in the emulation the CPU page is the coherent frame (see
    /// docs/architecture.md), so this is the kernel's `migrate_device_coherent_folio` without the
    /// copy.
    pub(crate) fn demote_coherent(&self, st: &mut SpaceState, a: VirtAddr) {
        self.demote_coherent_as(st, a, EventKind::Migrate)
    }

    /// [`Self::demote_coherent`], recorded in the trace as `kind`.
    fn demote_coherent_as(&self, st: &mut SpaceState, a: VirtAddr, kind: EventKind) {
        let Some(pte) = st.pte(a) else { return };
        if !pte.is_coherent() {
            return;
        }
        let r = unit_range(a, pte.large());
        let (start, n) = (r.start, r.pages());
        self.invalidate(st, r, NotifyEvent::Migrate, None);
        let head = st.pte(start).expect("unit inside the mapping");
        let pm = st.pagemap(head.pagemap());
        // A real coherent device copies the page out: charge it like a migration.
        pm.charge_migration(n * PAGE_SIZE);
        pm.free(head.frame(), pte.large());
        for p in 0..n {
            let ap = start.add(p * PAGE_SIZE);
            let old = st.pte(ap).expect("mapped");
            st.set_pte(ap, Pte::present(pte.large(), old));
        }
        self.counters
            .pages_to_system
            .fetch_add(n as u64, Ordering::Relaxed);
        let owner = pm.owner();
        st.trace_with(|| TraceEvent::moved(kind, Direction::ToSystem, self.id, start, n, owner));
    }

    /// Device eviction of one frame (`migrate_device_range` for one page): if page `vpn` of this
    /// space still lives in `frame` of `pm`, bring it back to system memory.
    /// Returns the number of pages moved (a whole 2 MiB unit moves as one).
    pub(crate) fn evict_frame(&self, pm: &Pagemap, frame: FrameIdx, vpn: usize) -> Result<usize> {
        let mut st = lock(&self.state);
        self.evict_frame_locked(&mut st, pm, frame, vpn)
    }

    /// [`Self::evict_frame`] under the state lock the caller holds (a migration that makes
    /// room in a full device).
    pub(crate) fn evict_frame_locked(
        &self,
        st: &mut SpaceState,
        pm: &Pagemap,
        frame: FrameIdx,
        vpn: usize,
    ) -> Result<usize> {
        let a = Vpn(vpn).addr();
        let Some(pte) = st.pte(a) else { return Ok(0) };
        let n = if pte.large() { PAGES_PER_LARGE } else { 1 };
        if pte.device_frame().map(|(p, f, _)| (p, f)) != Some((pm.id(), frame))
            || pte.state() == PageState::Exclusive
        {
            return Ok(0);
        }
        if pte.is_coherent() {
            self.demote_coherent_as(st, a, EventKind::Evict);
            return Ok(n);
        }
        self.device_to_system(st, a, pte, EventKind::Evict)
            .map(|()| n)
    }

    /// Grants device-exclusive access to page `a` for the device of pagemap `pm`
    /// (`make_device_exclusive`): the page is faulted in for writing, device mappings are
    /// invalidated (EXCLUSIVE, owner = the device), its data moves to the stash and the CPU view
    /// drops it, so that any CPU access faults and revokes the grant. `map` runs under the state
    /// lock with the stash frame, so that the device maps its atomic entry before any revocation
    /// can run. A pinned page gives [`Error::Busy`].
    pub(crate) fn make_exclusive(
        &self,
        a: VirtAddr,
        pm: &Arc<Pagemap>,
        map: &mut dyn FnMut(VirtAddr, FrameIdx),
    ) -> Result<()> {
        let mut st = lock(&self.state);
        let v = st.vma(a).ok_or(Error::NotMapped { addr: a })?;
        if !v.prot.readable() {
            return Err(Error::NoRead { addr: a });
        }
        if !v.prot.writable() {
            return Err(Error::NoWrite { addr: a });
        }
        if st.file_page(a).is_some() {
            // As the kernel's make_device_exclusive: anonymous memory only.
            return Err(Error::Busy);
        }
        let pte = st.pte(a).expect("mapped");
        if pte.state() == PageState::Exclusive && pte.pagemap() == pm.id() {
            map(a, pte.frame());
            return Ok(());
        }
        self.make_present(&mut st, a)?;
        // The page leaves device-coherent memory for the stash.
        self.demote_coherent(&mut st, a);
        // Re-read: making the page present may have filled (and marked) a whole 2 MiB unit.
        if st.pte(a).expect("mapped").large() {
            self.split_unit(&mut st, a);
        }
        let pte = st.pte(a).expect("mapped");
        if pte.pinned() {
            return Err(Error::Busy);
        }
        self.add_pagemap(&mut st, pm);
        let r = VaRange {
            start: a,
            end: a.add(PAGE_SIZE),
        };
        self.invalidate(&st, r, NotifyEvent::Exclusive, Some(pm.owner()));
        let frame = self.stash.alloc()?;
        // Write-protect the page before copying it, as migration does: the page is present and
        // writable, so a CPU store does not take the state lock, and one landing between the copy
        // and the zap would be dropped by the zap (a lost update). Protected, the store faults,
        // waits for the state lock, and revokes the grant.
        let mode = st.vma(a).expect("mapped").mode;
        if let Err(e) = self.mm.write_protect(r, true, mode) {
            self.stash.free(frame, false);
            return Err(Error::os("write-protect for exclusive access", e.into()));
        }
        self.copy_into_frames(a, &self.stash, frame.offset(), PAGE_SIZE)
            .map_err(|e| Error::os("copy into the stash", e))?;
        if let Err(e) = self.mm.zap(r) {
            let _ = self.mm.write_protect(r, false, mode);
            self.stash.free(frame, false);
            return Err(Error::os("drop page for exclusive access", e));
        }
        st.set_pte(a, Pte::exclusive(pm.id(), frame));
        map(a, frame);
        Ok(())
    }

    /// The placement policy (cloned out under the state lock, for callers that decide with no
    /// lock held: the device fault path).
    pub(crate) fn policy(&self) -> std::sync::Arc<dyn Policy> {
        lock(&self.state).policy.clone()
    }

    /// Locks the state (for the mirror and migrate modules).
    pub(crate) fn lock_state(&self) -> Guard<'_, SpaceState> {
        lock(&self.state)
    }
}
