//! The built-in software device: hetmem's version of the kernel's test device
//! (`lib/test_hmm.c`, "dmirror").
//!
//! A [`SoftDevice`] owns a pagemap (its memory: private or coherent, with a capacity). A
//! [`DeviceMirror`] binds the device to one address space (the kernel's open file of
//! `/dev/hmm_dmirrorN`): it has its own page table, kept correct by an interval notifier over the
//! whole space, and offers the test device's operations ([`Cmd`]): read, write, migrate to device
//! and to system, snapshot, exclusive, check exclusive, release, and flags (fail the next
//! allocation). [`DeviceMirror::cmd`] has the ioctl's exact calling convention (the kernel's
//! range shape, a `u64` address and a page count; `cpages` and `faults` written only on success,
//! `-errno` returned) so the kernel's selftests translate line for line.
//!
//! The methods of the Rust API ([`DeviceMirror::read`], [`DeviceMirror::migrate_range_to_device`],
//! ...) take a range as [`Space`]'s do: `(addr: VirtAddr, len: usize)`, `len` in bytes, a
//! non-zero multiple of [`PAGE_SIZE`], at a page-aligned address. Their [`CmdOut`] keeps the
//! kernel's counters, which count pages.
//!
//! # Device page table and fencing
//!
//! `pt` maps a virtual page number to a [`PageTarget`] with write and atomic tags (none = read
//! only, as dmirror's xarray tags). Every device access looks the page up and copies it *under
//! the `pt` lock*; the notifier callback takes the same lock to drop entries, and the address
//! space runs callbacks before it changes a page. So an invalidation waits for the accesses in
//! flight, a device copy never sees a page vanish, and a frame is freed only after the accesses
//! to it have ended. Device code never dereferences a managed address: it names pages by
//! [`PageTarget`] and the copies go through the address space's [`crate::mm::Mm`] (raw copies of
//! pages known to be present).
//!
//! Unlike dmirror, the callback drops entries on every event, including a MIGRATE that this
//! device initiated: in the emulation a device access to a system page is a real CPU access,
//! and an entry left pointing at a page being migrated could fault on a write-protected page.
//!
//! # Policy
//!
//! Two decisions are the address space's policy's ([`crate::policy`]): what a device fault does
//! (map remotely or migrate to the device, and how much to prefetch: `DeviceMirror::fault`), and
//! what a migration does when the device cannot allocate a frame (decline the page, or evict one
//! of the space's pages from the device and retry: `DeviceMirror::alloc_or_evict`). The default
//! policy does what dmirror does: map remotely the pages asked for, decline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::addr::{FrameIdx, PAGE_SIZE, PAGES_PER_LARGE, VaRange, VirtAddr, Vpn};
use crate::error::{Error, Result};
use crate::hmm::{
    HMM_PFN_ERROR, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID, HMM_PFN_WRITE,
    HMM_PFN_ZERO, HmmRange, IntervalNotifier, IntervalOps, NotifyRange, PageTarget, hmm_pfn_order,
    range_fault,
};
use crate::link::{LinkModel, LinkProfile, LinkReport, Traffic};
use crate::migrate::{
    self, MIGRATE_PFN_COMPOUND, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID, MIGRATE_PFN_WRITE,
    MigrateArgs, SELECT_COMPOUND, SELECT_DEVICE_COHERENT, SELECT_DEVICE_PRIVATE, SELECT_SYSTEM,
};
use crate::pagecache::PagePlacement;
use crate::policy::{
    DeviceFault, DeviceFaultDecision, DeviceFull, DeviceFullAction, Placement, Prefetch,
};
use crate::pool::{FrameOwner, MemoryKind, Owner, Pagemap, PagemapId};
use crate::space::{Space, space_by_id};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex, Ordering, Weak, lock};

/// Pages per `range_fault` call of the device's fault path (dmirror: 32... 64 in older kernels).
pub const FAULT_CHUNK_PAGES: usize = 32;
/// How long the device retries a `range_fault` that keeps returning EBUSY
/// (`HMM_RANGE_DEFAULT_TIMEOUT`).
pub const RANGE_FAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: fail the next large (2 MiB) device allocation once, as the
/// kernel's device fails its next THP allocation (fault injection: with the `testing` feature; a
/// `Cmd::Flags` that sets it is EOPNOTSUPP without).
pub const FLAG_FAIL_ALLOC: u64 = 1;

/// Snapshot bytes (`HMM_DMIRROR_PROT_*`).
pub mod snap {
    /// Not present.
    pub const NONE: u8 = 0x00;
    /// Readable.
    pub const READ: u8 = 0x01;
    /// Writable.
    pub const WRITE: u8 = 0x02;
    /// Mapped at PMD level (2 MiB).
    pub const PMD: u8 = 0x04;
    /// The shared zero page (with [`READ`]): a never-written anonymous page the CPU has read
    /// (an untouched page is [`NONE`]).
    pub const ZERO: u8 = 0x10;
    /// Device-private page of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// Device-private page of another device (never reported: such pages read as NONE).
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
    /// Device-coherent page of this device.
    pub const DEV_COHERENT_LOCAL: u8 = 0x40;
    /// Device-coherent page of another device.
    pub const DEV_COHERENT_REMOTE: u8 = 0x50;
    /// Error (no mapping, no permission).
    pub const ERROR: u8 = 0xFF;
}

/// Configuration of a software device.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    /// Private or coherent memory.
    pub kind: MemoryKind,
    /// Device memory in bytes (rounded up to 2 MiB).
    pub capacity: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            kind: MemoryKind::Private,
            capacity: 256 << 20,
        }
    }
}

/// A slot of the process-wide pagemap-id table (id 0 is every space's stash, never allocated).
enum PagemapSlot {
    Free,
    /// Taken by a device being created (its pagemap is not built yet).
    Reserved,
    /// The id names this pagemap while anything (the device, an address space's pagemap table)
    /// holds it; once the last holder is gone no page entry can name the id and it is reused.
    Live(std::sync::Weak<Pagemap>),
}

/// Pagemap ids in use (index = id). A leaf lock, never held across a `crate::sync` operation.
static PAGEMAP_IDS: std::sync::Mutex<Vec<PagemapSlot>> = std::sync::Mutex::new(Vec::new());

/// How many times in a row a device's copy may stop at a system page that is there (not
/// dropped) before the access fails ([`DeviceMirror::refill_dropped`]).
const DROPPED_BUT_THERE: u32 = 100;

/// The page a device access last found dropped, and how long it has waited for it.
struct DroppedPage {
    addr: VirtAddr,
    patience: crate::sys::Patience,
    /// Refills that found the page there, in a row.
    there: u32,
}

/// Reserves a free pagemap id (1..=255). An id is free again once its pagemap is dropped (not
/// when its device is: an address space keeps the pagemap of a device that had pages there, and
/// must never find another device's pagemap under the same id).
fn alloc_pagemap_id() -> Result<PagemapId> {
    crate::space::register_fork_table(|| {
        Box::new(PAGEMAP_IDS.lock().unwrap_or_else(|p| p.into_inner()))
    });
    let mut t = PAGEMAP_IDS.lock().unwrap_or_else(|p| p.into_inner());
    if t.is_empty() {
        t.resize_with(256, || PagemapSlot::Free);
    }
    for (i, s) in t.iter_mut().enumerate().skip(1) {
        let free = match s {
            PagemapSlot::Free => true,
            PagemapSlot::Reserved => false,
            PagemapSlot::Live(w) => w.strong_count() == 0,
        };
        if free {
            *s = PagemapSlot::Reserved;
            return Ok(PagemapId(i as u8));
        }
    }
    Err(Error::NoMemory {
        what: "device ids (255 live devices per process)",
    })
}

/// Publishes the pagemap built for a reserved id, or frees the id if building it failed.
fn publish_pagemap_id(id: PagemapId, pm: Option<&Arc<Pagemap>>) {
    let mut t = PAGEMAP_IDS.lock().unwrap_or_else(|p| p.into_inner());
    t[id.0 as usize] = match pm {
        Some(pm) => PagemapSlot::Live(Arc::downgrade(pm)),
        None => PagemapSlot::Free,
    };
}

struct DeviceInner {
    pagemap: Arc<Pagemap>,
    /// An injected failure of the next allocation is armed (`testing` feature only).
    #[cfg(feature = "testing")]
    fail_alloc: crate::sync::AtomicBool,
    /// An injected failure of the next *large* allocation is armed (the test device's
    /// `HMM_DMIRROR_FLAG_FAIL_ALLOC`, which fails a THP allocation only: the migration falls
    /// back to base frames; `testing` feature only).
    #[cfg(feature = "testing")]
    fail_large_alloc: crate::sync::AtomicBool,
    /// Injected copy failures still to happen (the device's DMA engine reports an error;
    /// `testing` feature only).
    #[cfg(feature = "testing")]
    fail_copies: crate::sync::AtomicU64,
    /// The eviction clock hand: the frame where the search for a victim starts when the device
    /// is full and the policy evicts ([`DeviceFullAction::EvictAndRetry`]).
    evict_hand: AtomicUsize,
    /// The device's mirrors (they own its replica frames, which a release drops too). A leaf
    /// lock.
    mirrors: Mutex<Vec<Weak<MirrorInner>>>,
}

impl DeviceInner {
    /// Whether this copy fails (fault injection), consuming one injected failure.
    #[cfg(feature = "testing")]
    fn copy_fails(&self) -> bool {
        self.fail_copies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Without the `testing` feature no copy is made to fail: a constant, so that the checks on
    /// the copy paths fold away.
    #[cfg(not(feature = "testing"))]
    #[inline(always)]
    const fn copy_fails(&self) -> bool {
        false
    }

    /// Up to `n` base frames at once, ascending ([`Pagemap::alloc_many`]); none while an
    /// injected allocation failure is pending (the next single allocation takes it).
    fn alloc_many(&self, n: usize, out: &mut Vec<FrameIdx>) {
        #[cfg(feature = "testing")]
        if self.fail_alloc.load(Ordering::SeqCst) {
            return;
        }
        self.pagemap.alloc_many(n, out)
    }

    fn alloc(&self, large: bool) -> Result<FrameIdx> {
        #[cfg(feature = "testing")]
        if self.fail_alloc.swap(false, Ordering::SeqCst)
            || (large && self.fail_large_alloc.swap(false, Ordering::SeqCst))
        {
            return Err(Error::NoMemory {
                what: "device memory (injected failure)",
            });
        }
        if large {
            self.pagemap.alloc_large()
        } else {
            self.pagemap.alloc()
        }
    }

    /// Evicts every frame of the device (`migrate_device_range` over all of its memory): each
    /// page goes back to system memory in its address space, in batches of up to
    /// [`EVICT_BATCH`] frames per address space (one lock hold, one invalidation per run of
    /// pages and one copy per run of consecutive frames each).
    fn evict_all(&self) -> Result<usize> {
        // The mirrors' read-only replicas first: copies, dropped (their pages lose their marks
        // and protection), not moved.
        let mirrors: Vec<Arc<MirrorInner>> = {
            let mut l = lock(&self.mirrors);
            l.retain(|w| w.strong_count() > 0);
            l.iter().filter_map(Weak::upgrade).collect()
        };
        for m in mirrors {
            m.drop_own_replicas();
        }
        let mut n = 0;
        let mut first_err = None;
        let nframes = self.pagemap.nframes();
        let mut f = 0;
        while f < nframes {
            // A window of frames, grouped by address space.
            let end = (f + EVICT_BATCH).min(nframes);
            let mut by_space: Vec<(u16, FrameIdx, usize)> = Vec::new();
            let mut by_cache: Vec<(u32, u64)> = Vec::new();
            for k in f..end {
                let frame = FrameIdx(k as u32);
                match self.pagemap.rmap(frame) {
                    Some(FrameOwner::Anon { space, vpn }) => by_space.push((space, frame, vpn)),
                    // A file page: it comes back to its cache's memfd (every mapping of the
                    // file, in every space, sees it there).
                    Some(FrameOwner::File { cache, index }) => by_cache.push((cache, index)),
                    None => {}
                }
            }
            by_cache.sort_unstable();
            for group in by_cache.chunk_by(|a, b| a.0 == b.0) {
                let Some(cache) = crate::pagecache::cache_by_id(group[0].0) else {
                    continue;
                };
                let pages: Vec<u64> = group.iter().map(|&(_, p)| p).collect();
                match cache.evict_device_frames(&self.pagemap, &pages, true) {
                    Ok(m) => n += m,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            by_space.sort_unstable_by_key(|&(s, _, vpn)| (s, vpn));
            for group in by_space.chunk_by(|a, b| a.0 == b.0) {
                let Some(core) = space_by_id(group[0].0) else {
                    continue;
                };
                let victims: Vec<(FrameIdx, usize)> =
                    group.iter().map(|&(_, fr, vpn)| (fr, vpn)).collect();
                match core.evict_frames(&self.pagemap, &victims) {
                    Ok(m) => n += m,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            f = end;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

/// Frames examined per eviction batch (a 2 MiB unit's worth of base frames, or 512 units).
const EVICT_BATCH: usize = PAGES_PER_LARGE;

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // Device removal: nothing may stay in memory that is going away.
        let _ = self.evict_all();
    }
}

/// A software device (see the module doc).
///
/// # Examples
///
/// ```
/// use hetmem::{Prot, Residency, SoftDevice, Space};
///
/// # fn main() -> hetmem::Result<()> {
/// let space = Space::new()?;
/// let dev = SoftDevice::private(16 << 20)?; // 16 MiB of device-private memory
/// let mirror = dev.mirror(&space)?;
/// let a = space.map_anon(1 << 20, Prot::ReadWrite)?;
/// space.cpu_write(a, &[7; 16])?;
/// mirror.migrate_range_to_device(a, 1 << 20)?; // addresses and lengths in bytes, as Space's
/// assert_eq!(space.residency(a), Residency::Device(dev.owner()));
/// let mut seen = vec![0u8; 4096];
/// mirror.read(a, 4096, &mut seen)?; // the device reads its own memory
/// assert_eq!(seen[..16], [7; 16]);
/// let mut b = [0u8; 16];
/// space.cpu_read(a, &mut b)?; // a CPU access brings the page back
/// assert_eq!(b, [7; 16]);
/// assert_eq!(space.residency(a), Residency::System);
/// # Ok(())
/// # }
/// ```
pub struct SoftDevice {
    inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for SoftDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftDevice")
            .field("kind", &self.inner.pagemap.kind())
            .field("owner", &self.inner.pagemap.owner())
            .field("capacity", &self.inner.pagemap.capacity())
            .finish()
    }
}

impl SoftDevice {
    /// A device with its own memory.
    ///
    /// Its link model uses the default profile of its kind: PCIe 5 for a device-private device,
    /// NVLink-C2C for a device-coherent one (see [`SoftDevice::with_link`]).
    pub fn new(cfg: DeviceConfig) -> Result<SoftDevice> {
        let profile = match cfg.kind {
            MemoryKind::Coherent => LinkProfile::NVLINK_C2C,
            _ => LinkProfile::PCIE5,
        };
        Self::with_link(cfg, profile)
    }

    /// A device whose accesses and transfers are charged to a link model of `profile`.
    pub fn with_link(cfg: DeviceConfig, profile: LinkProfile) -> Result<SoftDevice> {
        // The process's event reader thread now, before the program maps memory that a later
        // command names (its stack must not land in a hole the program punched and later maps
        // over: see `mm::start_event_reader`).
        #[cfg(not(test))]
        crate::mm::start_event_reader().map_err(|e| Error::os("start hetmem's event reader", e))?;
        Self::with_store(cfg, profile, &|len| {
            Ok(Box::new(crate::pool::HostFrames::new(len)?) as Box<dyn crate::pool::FrameStore>)
        })
    }

    /// A device whose memory is the [`crate::pool::FrameStore`] that `make` returns for the
    /// pool's length in bytes: the seam where a device whose memory the CPU cannot address (an
    /// accelerator behind a driver) plugs in. hetmem then copies in and out through the store
    /// (and the address space's bounce buffer) instead of installing pages straight from device
    /// memory.
    pub fn with_store(
        cfg: DeviceConfig,
        profile: LinkProfile,
        make: &dyn Fn(usize) -> std::io::Result<Box<dyn crate::pool::FrameStore>>,
    ) -> Result<SoftDevice> {
        if cfg.kind == MemoryKind::System {
            return Err(Error::Invalid("a device's memory is private or coherent"));
        }
        let id = alloc_pagemap_id()?;
        let pagemap = match Pagemap::with_store(
            id,
            cfg.kind,
            Owner(0x6865_746d_0000 | id.0 as u64),
            cfg.capacity,
            make,
        ) {
            Ok(pm) => Arc::new(pm.with_link(Arc::new(LinkModel::new(profile)))),
            Err(e) => {
                publish_pagemap_id(id, None);
                return Err(e);
            }
        };
        publish_pagemap_id(id, Some(&pagemap));
        Ok(SoftDevice {
            inner: Arc::new(DeviceInner {
                pagemap,
                #[cfg(feature = "testing")]
                fail_alloc: crate::sync::AtomicBool::new(false),
                #[cfg(feature = "testing")]
                fail_large_alloc: crate::sync::AtomicBool::new(false),
                #[cfg(feature = "testing")]
                fail_copies: crate::sync::AtomicU64::new(0),
                evict_hand: AtomicUsize::new(0),
                mirrors: Mutex::new(Vec::new()),
            }),
        })
    }

    /// A device-coherent device of `capacity` bytes (the CPU keeps mapping pages that live in
    /// its memory).
    pub fn coherent(capacity: usize) -> Result<SoftDevice> {
        Self::new(DeviceConfig {
            kind: MemoryKind::Coherent,
            capacity,
        })
    }

    /// A device-private device of `capacity` bytes.
    pub fn private(capacity: usize) -> Result<SoftDevice> {
        Self::new(DeviceConfig {
            kind: MemoryKind::Private,
            capacity,
        })
    }

    /// The owner token.
    pub fn owner(&self) -> Owner {
        self.inner.pagemap.owner()
    }

    /// The device's link model.
    pub fn link(&self) -> &Arc<LinkModel> {
        self.inner
            .pagemap
            .link()
            .expect("a device's pagemap has a link model")
    }

    /// Modelled device time charged so far (see [`crate::link`]).
    pub fn link_report(&self) -> LinkReport {
        self.link().report()
    }

    /// Declares `bytes` of CPU accesses to this device's coherent memory (hetmem cannot see
    /// them: they never fault), charged to the link model as remote CPU traffic.
    pub fn declare_cpu_access(&self, bytes: u64) {
        self.link().charge(Traffic::CpuRemote, bytes, 1);
    }

    /// The memory type.
    pub fn kind(&self) -> MemoryKind {
        self.inner.pagemap.kind()
    }

    /// The device's memory.
    pub fn pagemap(&self) -> &Arc<Pagemap> {
        &self.inner.pagemap
    }

    /// Bytes of device memory in use.
    pub fn used(&self) -> usize {
        self.inner.pagemap.used()
    }

    /// Binds the device to an address space (opens a mirror).
    pub fn mirror(&self, space: &Space) -> Result<DeviceMirror> {
        space.check_owner_process()?;
        let inner = Arc::new(MirrorInner {
            dev: self.inner.clone(),
            space: space.clone(),
            notifier: Mutex::new(None),
            pt: Mutex::new(DevPageTable::default()),
            counters: (0..crate::policy::AccessCounters::SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
        });
        {
            let mut l = lock(&self.inner.mirrors);
            l.retain(|w| w.strong_count() > 0);
            l.push(Arc::downgrade(&inner));
        }
        let ops: Weak<dyn IntervalOps> = {
            let w: Weak<MirrorInner> = Arc::downgrade(&inner);
            w
        };
        let n = space
            .core
            .insert_notifier(space.range().start, usize::MAX, ops);
        *lock(&inner.notifier) = Some(n);
        Ok(DeviceMirror { inner })
    }

    /// Evicts all device memory back to system memory (device release); returns pages moved.
    pub fn release(&self) -> Result<usize> {
        self.inner.evict_all()
    }

    /// Makes the next `n` device copies fail (fault injection: the copy engine reports an
    /// error). A failed migration copy declines that page (it stays where it was); a failed
    /// device read or write returns EIO. Only with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn fail_next_copies(&self, n: u64) {
        self.inner.fail_copies.store(n, Ordering::SeqCst);
    }

    /// Makes the next device allocation fail once. Only with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn fail_next_alloc(&self) {
        self.inner.fail_alloc.store(true, Ordering::SeqCst);
    }

    /// Fault injection: the device's frame `frame` fails now (its memory is poisoned). A frame
    /// holding a file page (device-private: the page's only copy; device-coherent: the page
    /// itself) is handled by the page's cache, as a memory failure of the page (see
    /// [`crate::pagecache::MemoryFailure`] and docs/filesystem-contract.md): the frame is
    /// retired, a clean page is read from the file again at its next access, a dirty one is
    /// lost. A frame holding no file page is refused (EINVAL): free frames and anonymous pages
    /// are not covered. Only with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn inject_poison(
        &self,
        frame: crate::addr::FrameIdx,
    ) -> Result<crate::pagecache::MemoryFailure> {
        let pm = &self.inner.pagemap;
        if frame.0 as usize >= pm.nframes() {
            return Err(Error::Invalid("no such frame"));
        }
        match pm.rmap(frame) {
            Some(FrameOwner::File { cache, index }) => match crate::pagecache::cache_by_id(cache) {
                Some(c) => c.memory_failure(index, Some((pm.id(), frame))),
                None => Ok(crate::pagecache::MemoryFailure::NotCached),
            },
            _ => Err(Error::Invalid(
                "memory failure of a frame that holds no file page",
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DevPte {
    target: PageTarget,
    write: bool,
    atomic: bool,
    /// A read-only replica of a system page (`target` is a frame of this device that the
    /// device owns: freed when the entry goes). See `SpaceCore::replicate`.
    replica: bool,
}

struct MirrorInner {
    dev: Arc<DeviceInner>,
    space: Space,
    notifier: Mutex<Option<Arc<IntervalNotifier>>>,
    /// The device page table (lock 2 of the space module's lock order).
    pt: Mutex<DevPageTable>,
    /// Access counters ([`crate::policy::AccessCounters`]): per slot, the region number + 1
    /// (high 32 bits) and its count (low 32 bits). Atomics: counted without a lock.
    counters: Box<[AtomicU64]>,
}

/// What one command's copies count of its remote accesses ([`crate::policy::AccessCounters`]).
struct RemoteCount {
    /// (log2 of a region's pages, threshold), or `None`: nothing is counted.
    cfg: Option<(u32, u32)>,
    /// Regions whose counter reached the threshold during the command, each with the page whose
    /// access made it (its mapping is the one served: a region's aligned start may lie in
    /// another mapping, or in none).
    due: Vec<(usize, usize)>,
}

impl RemoteCount {
    /// Counts nothing.
    fn off() -> RemoteCount {
        RemoteCount {
            cfg: None,
            due: Vec::new(),
        }
    }

    /// Counts an access to page `vpn` over the link.
    fn hit(&mut self, counters: &[AtomicU64], vpn: usize) {
        let Some((log2, threshold)) = self.cfg else {
            return;
        };
        let region = vpn >> log2;
        let tag = (region as u64 + 1) << 32;
        let slot = &counters[crate::policy::region_slot(region as u64, counters.len())];
        let mut fired = false;
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            let n = if w & !0xffff_ffff == tag {
                (w & 0xffff_ffff) + 1
            } else {
                1
            };
            fired = n >= threshold as u64;
            Some(tag | if fired { 0 } else { n })
        });
        if fired && !self.due.iter().any(|&(r, _)| r == region) {
            self.due.push((region, vpn));
        }
    }
}

const LEAF: usize = 512;

/// The device page table, dmirror's xarray: leaves of 512 entries indexed by virtual page
/// number. Leaves are allocated by device operations only; invalidation just clears entries (and
/// gives a replica's frame back to the device's pool: a bit in its bitmap), so a notifier
/// callback never allocates or frees memory (it can run on the CPU fault path, in a SIGBUS
/// handler).
/// Aligned to a cache line: the lock word and the data of `Mutex<DevPageTable>` sit on
/// different lines (see `SpaceState`).
#[derive(Default)]
#[repr(align(64))]
struct DevPageTable {
    leaves: BTreeMap<usize, Box<[Option<DevPte>; LEAF]>>,
    len: usize,
    /// Entries that are replicas.
    replicas: usize,
    /// The clock hand of replicas dropped to make room (a virtual page number).
    replica_hand: usize,
}

impl DevPageTable {
    fn get(&self, vpn: &usize) -> Option<&DevPte> {
        self.leaves
            .get(&(vpn / LEAF))
            .and_then(|l| l[vpn % LEAF].as_ref())
    }
    fn contains_key(&self, vpn: &usize) -> bool {
        self.get(vpn).is_some()
    }
    /// Sets the entry of `vpn`; a replica it replaces goes back to `pm` (the device's pool).
    fn insert(&mut self, vpn: usize, e: DevPte, pm: &Pagemap) {
        let leaf = self
            .leaves
            .entry(vpn / LEAF)
            .or_insert_with(|| Box::new([None; LEAF]));
        match leaf[vpn % LEAF].replace(e) {
            None => self.len += 1,
            Some(old) => Self::release(&mut self.replicas, old, pm),
        }
        if e.replica {
            self.replicas += 1;
        }
    }
    /// A replica's frame goes back to the pool when its entry goes.
    fn release(replicas: &mut usize, old: DevPte, pm: &Pagemap) {
        if old.replica
            && let PageTarget::Device { frame, .. } = old.target
        {
            pm.free(frame, false);
            *replicas -= 1;
        }
    }
    fn len(&self) -> usize {
        self.len
    }
    /// Clears the entries of pages `s..e` (no allocation, no free of memory: a replica's frame
    /// goes back to `pm`, the device's pool).
    fn clear_range(&mut self, s: usize, e: usize, pm: &Pagemap) {
        if s >= e {
            return;
        }
        let mut cleared = 0;
        for (&li, leaf) in self.leaves.range_mut(s / LEAF..=(e - 1) / LEAF) {
            let lo = s.max(li * LEAF) - li * LEAF;
            let hi = e.min((li + 1) * LEAF) - li * LEAF;
            for slot in &mut leaf[lo..hi] {
                if let Some(old) = slot.take() {
                    cleared += 1;
                    Self::release(&mut self.replicas, old, pm);
                }
            }
        }
        self.len -= cleared;
    }
    /// Drops up to `n` replicas outside pages `keep` (a full device making room: a replica is
    /// a copy, dropped without a copy back), the next ones from the clock hand on, wrapping
    /// once. Returns how many went.
    fn drop_replicas(&mut self, n: usize, keep: (usize, usize), pm: &Pagemap) -> usize {
        let mut dropped = 0;
        let start = self.replica_hand;
        let leaves: Vec<usize> = self
            .leaves
            .range(start / LEAF..)
            .chain(self.leaves.range(..=start / LEAF))
            .map(|(&li, _)| li)
            .collect();
        for li in leaves {
            if dropped == n || self.replicas == 0 {
                break;
            }
            let leaf = self.leaves.get_mut(&li).expect("listed");
            for (k, slot) in leaf.iter_mut().enumerate() {
                let v = li * LEAF + k;
                if dropped == n {
                    break;
                }
                if (keep.0..keep.1).contains(&v) || !slot.is_some_and(|e| e.replica) {
                    continue;
                }
                let old = slot.take().expect("a replica");
                Self::release(&mut self.replicas, old, pm);
                self.len -= 1;
                dropped += 1;
                self.replica_hand = v + 1;
            }
        }
        dropped
    }
    /// The runs of pages this table holds replicas of.
    fn replica_runs(&self) -> Vec<VaRange> {
        let mut runs: Vec<VaRange> = Vec::new();
        if self.replicas == 0 {
            return runs;
        }
        for (&li, leaf) in &self.leaves {
            for (k, slot) in leaf.iter().enumerate() {
                if !slot.is_some_and(|e| e.replica) {
                    continue;
                }
                let a = Vpn(li * LEAF + k).addr();
                match runs.last_mut() {
                    Some(r) if r.end == a => r.end = a.add(PAGE_SIZE),
                    _ => runs.push(VaRange {
                        start: a,
                        end: a.add(PAGE_SIZE),
                    }),
                }
            }
        }
        runs
    }
    /// Clears every replica entry (the device is going away).
    fn clear_replicas(&mut self, pm: &Pagemap) {
        let mut cleared = 0;
        for leaf in self.leaves.values_mut() {
            for slot in leaf.iter_mut() {
                if let Some(old) = slot.filter(|e| e.replica) {
                    *slot = None;
                    cleared += 1;
                    Self::release(&mut self.replicas, old, pm);
                }
            }
        }
        self.len -= cleared;
    }
    /// Whether any entry of pages `s..e` satisfies `f`. Walks the leaves that exist in the
    /// range, never every page number of it: a caller's range may be 2^51 pages long.
    fn any_in(&self, s: usize, e: usize, f: impl Fn(&DevPte) -> bool) -> bool {
        if s >= e {
            return false;
        }
        self.leaves
            .range(s / LEAF..=(e - 1) / LEAF)
            .any(|(&li, leaf)| {
                let lo = s.max(li * LEAF) - li * LEAF;
                let hi = e.min((li + 1) * LEAF) - li * LEAF;
                leaf[lo..hi].iter().flatten().any(&f)
            })
    }
}

/// Entries the device's page table takes or looks up per hold of its lock when a command maps
/// or checks a whole range: the CPU faults that invalidate entries (and take that lock) wait at
/// most that long. Under the schedule explorer one entry, so that invalidations are explored
/// between any two.
const PT_CHUNK: usize = if cfg!(test) { 1 } else { 16 };

/// Most system pages a device copies with one call ([`DeviceMirror::do_rw`]).
const SYSTEM_RUN: usize = 512;

impl MirrorInner {
    /// Drops this mirror's read-only replicas through the space (`SpaceCore::drop_replicas`):
    /// the pages lose their marks and protection, and every device's replicas of them go (an
    /// invalidation: this mirror's entries too while its notifier is registered). Takes lock 2,
    /// then lock 1, never nested.
    fn drop_own_replicas(&self) {
        let core = &self.space.core;
        if core.check_process().is_err() {
            return;
        }
        let runs = lock(&self.pt).replica_runs();
        if runs.is_empty() {
            return;
        }
        let mut st = core.lock_state();
        for r in runs {
            core.drop_replicas(&mut st, r);
        }
    }
}

impl IntervalOps for MirrorInner {
    fn invalidate(&self, n: &IntervalNotifier, range: &NotifyRange, cur_seq: u64) -> bool {
        // The event reader follows the program's drops and unmaps with this: a device copy
        // holding the page-table lock may be waiting for it to serve a fault on a page the
        // program dropped meanwhile (thread mode; found from outside: a hang), or to read the
        // next event so that its fill of that page stops getting EAGAIN (signal mode).
        let mut pt = crate::space::lock_draining(&self.pt, |_| true);
        n.set_seq(cur_seq);
        pt.clear_range(range.start.page().0, range.end.page().0, &self.dev.pagemap);
        true
    }
}

/// How far [`DeviceMirror::do_rw`] got.
enum Step {
    /// Every page was copied.
    Done,
    /// A page has no (suitable) entry: fault it in and go on.
    Fault,
    /// A system page the device mapped was dropped by the program (its entry is gone).
    Dropped(VirtAddr),
}

/// Result of a device command (`cpages`, `faults` of `struct hmm_dmirror_cmd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdOut {
    /// Pages processed.
    pub cpages: u64,
    /// Fault passes (`range_fault` rounds) needed.
    pub faults: u64,
}

/// The test device's commands (`HMM_DMIRROR_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Device reads the range into the buffer.
    Read,
    /// Device writes the buffer into the range.
    Write,
    /// Migrate the range to device memory; the buffer receives the data for verification.
    MigrateToDev,
    /// Migrate the range's device pages back to system memory.
    MigrateToSys,
    /// One byte per page describing the device's view (see [`snap`]).
    Snapshot,
    /// Take device-exclusive (atomic) access; the buffer receives the data.
    Exclusive,
    /// -EPERM if any atomic entry remains in the range.
    CheckExclusive,
    /// Evict all device memory.
    Release,
    /// Set flags (`npages` is the flag word): [`FLAG_FAIL_ALLOC`] (the `testing` feature;
    /// EOPNOTSUPP without it); other bits are ignored.
    Flags,
}

/// The ioctl argument (`struct hmm_dmirror_cmd`), with the user buffer as a slice.
#[derive(Debug)]
pub struct DmirrorCmd<'b> {
    /// Start address.
    pub addr: u64,
    /// The buffer (`ptr`): `npages` pages for Read/Write/Migrate/Exclusive, `npages` bytes for
    /// Snapshot.
    pub buf: &'b mut [u8],
    /// Number of pages (or the flags word for `Flags`).
    pub npages: u64,
    /// Out: pages processed.
    pub cpages: u64,
    /// Out: fault passes.
    pub faults: u64,
}

/// An asynchronous prefetch in flight ([`DeviceMirror::prefetch_async`]). Dropping it waits for
/// the prefetch (and ignores its result).
#[derive(Debug)]
pub struct PrefetchHandle(Option<crate::sync::thread::JoinHandle<Result<CmdOut>>>);

impl PrefetchHandle {
    /// Waits for the prefetch to end; its result (as [`DeviceMirror::migrate_range_to_device`]).
    pub fn wait(mut self) -> Result<CmdOut> {
        match self.0.take().expect("waited once").join() {
            Ok(r) => r,
            Err(_) => Err(Error::Invalid("the prefetch thread panicked")),
        }
    }
}

impl Drop for PrefetchHandle {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// A device bound to an address space (see the module doc). Dropping it removes its notifier;
/// pages already in device memory stay there and keep working (CPU faults bring them back).
pub struct DeviceMirror {
    inner: Arc<MirrorInner>,
}

impl std::fmt::Debug for DeviceMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMirror")
            .field("owner", &self.owner())
            .finish()
    }
}

impl Drop for DeviceMirror {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.inner.notifier).take() {
            self.inner.space.core.remove_notifier(&n);
        }
        // The pages it held replicas of lose their marks and their protection (with any other
        // device's replicas of them, which come back at that device's next read): a mark with
        // no replica would make every store fault, and refuse the kernel's writes (`read(2)`
        // into the page) in signal mode.
        self.inner.drop_own_replicas();
        // No invalidation reaches the page table any more: whatever is left goes now.
        lock(&self.inner.pt).clear_replicas(&self.inner.dev.pagemap);
    }
}

/// The range of a call of the Rust API: `len` bytes at `addr`. [`Error::Unaligned`] for an
/// unaligned address, [`Error::ZeroLength`] for an empty range, [`Error::UnalignedLength`] for a
/// length that is not a multiple of the page size, [`Error::Overflow`] for one that wraps.
fn range_of(addr: VirtAddr, len: usize) -> Result<VaRange> {
    VaRange::new(addr, len)
}

/// The range of a command in the kernel's shape (`addr` and `npages` of `struct
/// hmm_dmirror_cmd`), with the errors of [`range_of`]: zero pages is [`Error::ZeroLength`], a
/// page count whose bytes overflow is [`Error::Overflow`]. Every one of them is EINVAL, as
/// `dmirror_fops_unlocked_ioctl` answers an unaligned address or a range that wraps.
fn range_of_pages(addr: u64, npages: u64) -> Result<VaRange> {
    let start = VirtAddr(addr as usize);
    if !start.is_page_aligned() {
        return Err(Error::Unaligned { addr: start });
    }
    let len = (npages as usize)
        .checked_mul(PAGE_SIZE)
        .ok_or(Error::Overflow {
            addr: start,
            len: usize::MAX,
        })?;
    VaRange::new(start, len)
}

impl DeviceMirror {
    /// The device's owner token.
    pub fn owner(&self) -> Owner {
        self.inner.dev.pagemap.owner()
    }

    /// The address space.
    pub fn space(&self) -> &Space {
        &self.inner.space
    }

    fn notifier(&self) -> Result<Arc<IntervalNotifier>> {
        lock(&self.inner.notifier).clone().ok_or(Error::Gone)
    }

    /// `Cmd::Flags` (`HMM_DMIRROR_FLAGS`): [`FLAG_FAIL_ALLOC`] arms one failure of a large
    /// allocation, as the kernel's device fails its next THP allocation (base pages are not
    /// affected).
    fn set_flags(&self, flags: u64) -> Result<CmdOut> {
        if flags & FLAG_FAIL_ALLOC != 0 {
            #[cfg(feature = "testing")]
            self.inner
                .dev
                .fail_large_alloc
                .store(true, Ordering::SeqCst);
            #[cfg(not(feature = "testing"))]
            return Err(Error::os(
                "FLAG_FAIL_ALLOC (fault injection: the `testing` feature)",
                std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            ));
        }
        Ok(CmdOut::default())
    }

    /// Runs a command with the ioctl's convention: returns 0 or `-errno`; `cpages`/`faults` are
    /// written only on success. The range has the kernel's shape: `c.npages` pages at `c.addr`
    /// (EINVAL for every command, `Release` and `Flags` included, when the address is unaligned,
    /// `npages` is zero or the range wraps); a range command runs its method ([`Self::read`],
    /// [`Self::migrate_to_device`], ...) on those `npages * PAGE_SIZE` bytes.
    pub fn cmd(&self, cmd: Cmd, c: &mut DmirrorCmd<'_>) -> i32 {
        // As dmirror_fops_unlocked_ioctl, for every command (Release and Flags included): an
        // unaligned address or a range that wraps (npages 0 included) is EINVAL.
        let r = match range_of_pages(c.addr, c.npages) {
            Ok(r) => r,
            Err(e) => return -e.errno(),
        };
        let (addr, len) = (r.start, r.len());
        let res = match cmd {
            Cmd::Read => self.read(addr, len, c.buf),
            Cmd::Write => self.write(addr, len, c.buf),
            Cmd::MigrateToDev => self.migrate_to_device(addr, len, c.buf),
            Cmd::MigrateToSys => self.migrate_to_system(addr, len),
            Cmd::Snapshot => self.snapshot(addr, len, c.buf),
            Cmd::Exclusive => self.exclusive(addr, len, c.buf),
            Cmd::CheckExclusive => self.check_exclusive(addr, len),
            Cmd::Release => self.release().map(|_| CmdOut::default()),
            Cmd::Flags => self.set_flags(c.npages),
        };
        match res {
            Ok(o) => {
                c.cpages = o.cpages;
                c.faults = o.faults;
                0
            }
            Err(e) => -e.errno(),
        }
    }

    fn check_buf(buf: &[u8], r: &VaRange) -> Result<()> {
        if buf.len() < r.len() {
            return Err(Error::Invalid("buffer smaller than the range"));
        }
        Self::check_own_memory(&buf[..r.len()])
    }

    /// A command's buffer must be the caller's own memory, not memory hetmem manages (any
    /// space's range, adopted memory included): the device copies into and out of it under
    /// hetmem's locks, where a page of it in device memory could not be faulted back.
    fn check_own_memory(buf: &[u8]) -> Result<()> {
        if crate::sys::overlaps_fault_range(buf.as_ptr() as usize, buf.len()) {
            return Err(Error::Invalid(
                "the command's buffer lies in memory hetmem manages: use memory of your own",
            ));
        }
        Ok(())
    }

    /// Reads page `vpn` through the device page table entry `e` into `dst` (under `pt`): a page in
    /// device memory or the stash (system pages are copied in runs by `do_rw`).
    fn copy_out(&self, e: &DevPte, vpn: usize, dst: &mut [u8]) -> Result<()> {
        match e.target {
            PageTarget::System(_) => unreachable!("do_rw copies system pages in runs"),
            PageTarget::Device { pagemap, frame } => {
                let pm = self.frame_pagemap(pagemap)?;
                if pm.kind() == MemoryKind::Coherent {
                    // The CPU page is the coherent frame. The program may have dropped it, or
                    // unmapped it, behind hetmem's back (not followed yet): copied through the
                    // kernel where it can be (a page not there stops the copy; a raw copy of an
                    // unmapped page killed the process: found from outside), and such a page
                    // reads zeros, as the drop leaves it.
                    let n = self.inner.space.core.mm.read_if_there(Vpn(vpn).addr(), dst);
                    dst[n..].fill(0);
                    return Ok(());
                }
                pm.store()
                    .read(frame.offset(), dst)
                    .map_err(|e| Error::os("device read", e))
            }
            PageTarget::Stash(frame) => self
                .inner
                .space
                .core
                .stash
                .store()
                .read(frame.offset(), dst)
                .map_err(|e| Error::os("device read", e)),
        }
    }

    fn copy_in(&self, e: &DevPte, vpn: usize, src: &[u8]) -> Result<()> {
        match e.target {
            PageTarget::System(_) => unreachable!("do_rw copies system pages in runs"),
            PageTarget::Device { pagemap, frame } => {
                let pm = self.frame_pagemap(pagemap)?;
                if pm.kind() == MemoryKind::Coherent {
                    // As in `copy_out`: a store to a page the program dropped or unmapped is
                    // lost, as the kernel's dmirror's store to a page freed under it.
                    let _ = self
                        .inner
                        .space
                        .core
                        .mm
                        .write_if_there(Vpn(vpn).addr(), src);
                } else {
                    pm.store()
                        .write(frame.offset(), src)
                        .map_err(|e| Error::os("device write", e))?;
                }
                pm.mark_dirty(frame);
                Ok(())
            }
            PageTarget::Stash(frame) => self
                .inner
                .space
                .core
                .stash
                .store()
                .write(frame.offset(), src)
                .map_err(|e| Error::os("device write", e)),
        }
    }

    /// The pagemap with id `id`. Called under the page-table lock (lock 2), so it must not take
    /// the address space's lock: it reads the process-wide id table (a leaf lock).
    fn frame_pagemap(&self, id: PagemapId) -> Result<Arc<Pagemap>> {
        if id == self.inner.dev.pagemap.id() {
            return Ok(self.inner.dev.pagemap.clone());
        }
        let t = PAGEMAP_IDS.lock().unwrap_or_else(|p| p.into_inner());
        match t.get(id.0 as usize) {
            Some(PagemapSlot::Live(w)) => w.upgrade().ok_or(Error::Invalid("unknown pagemap")),
            _ => Err(Error::Invalid("unknown pagemap")),
        }
    }

    /// Copies mapped pages from `*cur` on; stops at the first missing (or, for writes,
    /// non-writable) entry. Returns true when the whole range was done.
    fn do_rw(
        &self,
        r: &VaRange,
        cur: &mut usize,
        buf: &mut [u8],
        write: bool,
        cpages: &mut u64,
        count: &mut RemoteCount,
    ) -> Result<Step> {
        let mut pt = lock(&self.inner.pt);
        let first = r.start.page().0;
        while *cur < r.end.page().0 {
            let Some(e) = pt.get(cur).copied() else {
                return Ok(Step::Fault);
            };
            if write && !e.write {
                return Ok(Step::Fault);
            }
            let o = (*cur - first) * PAGE_SIZE;
            // Charge the access: local when the page is in this device's memory, over the link
            // otherwise (system memory, the stash, another device).
            let local = matches!(e.target, PageTarget::Device { pagemap, .. } if pagemap == self.inner.dev.pagemap.id());
            let link = self.inner.dev.pagemap.link().expect("device link model");
            if local {
                link.charge(Traffic::DeviceLocal, PAGE_SIZE as u64, 0);
            } else {
                link.charge(Traffic::DeviceRemote, PAGE_SIZE as u64, 1);
                count.hit(&self.inner.counters, *cur);
            }
            if self.inner.dev.copy_fails() {
                return Err(Error::os(
                    "device copy (injected failure)",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            if let PageTarget::System(v) = e.target {
                // A run of system pages the device maps, copied with one call (through the
                // kernel where a missing page can be told without a fault: one system call per
                // run, not per page).
                let end = r.end.page().0.min(*cur + SYSTEM_RUN);
                let mut n = 1;
                while *cur + n < end
                    && pt.get(&(*cur + n)).is_some_and(|x| {
                        matches!(x.target, PageTarget::System(w) if w.0 == v.0 + n)
                            && (!write || x.write)
                    })
                {
                    n += 1;
                }
                let len = n * PAGE_SIZE;
                let mm = &self.inner.space.core.mm;
                let done = if write {
                    mm.write_if_there(v.addr(), &buf[o..o + len])
                } else {
                    mm.read_if_there(v.addr(), &mut buf[o..o + len])
                } / PAGE_SIZE;
                // The run's first page was charged above; the others as they were copied.
                for k in 1..done {
                    link.charge(Traffic::DeviceRemote, PAGE_SIZE as u64, 1);
                    count.hit(&self.inner.counters, *cur + k);
                }
                *cur += done;
                *cpages += done as u64;
                if done < n {
                    // A system page the program dropped behind hetmem's back (a direct
                    // madvise(MADV_DONTNEED)): forget the entry; the caller refills the page as
                    // the kernel would and faults it in again.
                    pt.clear_range(*cur, *cur + 1, &self.inner.dev.pagemap);
                    return Ok(Step::Dropped(Vpn(*cur).addr()));
                }
                continue;
            }
            if write {
                self.copy_in(&e, *cur, &buf[o..o + PAGE_SIZE])?;
            } else {
                self.copy_out(&e, *cur, &mut buf[o..o + PAGE_SIZE])?;
            }
            *cur += 1;
            *cpages += 1;
        }
        Ok(Step::Done)
    }

    /// After [`Step::Dropped`]: refills the dropped page as the kernel would (zeros, or the
    /// file's bytes in a private file mapping). A program dropping pages in a tight loop may
    /// take the same page again before the access gets back to it, many times (found from
    /// outside: one retry was not enough), so each page is waited for patiently
    /// ([`crate::sys::Patience`], from its first refill; each refill yields to the program
    /// first). A page that keeps stopping the copy while it is there (not a drop: say the
    /// program protected it; [`DROPPED_BUT_THERE`] times in a row) fails the access, as does a
    /// page dropped past that patience.
    fn refill_dropped(&self, a: VirtAddr, last: &mut Option<DroppedPage>) -> Result<()> {
        let fail = |why: &'static str| {
            Err(Error::os(
                why,
                std::io::Error::from_raw_os_error(libc::EFAULT),
            ))
        };
        let page = match last {
            Some(p) if p.addr == a => p,
            _ => last.insert(DroppedPage {
                addr: a,
                patience: crate::sys::Patience::new(),
                there: 0,
            }),
        };
        if !page.patience.more() {
            return fail("device access to a page the program drops again and again");
        }
        crate::sync::thread::yield_now();
        if self.inner.space.core.refill_if_dropped(a)? {
            page.there = 0;
        } else {
            // The program may have faulted it in again since the copy stopped at it: only a
            // page that is there every time is not a drop.
            page.there += 1;
            if page.there >= DROPPED_BUT_THERE {
                return fail(
                    "device access to a system page it cannot copy (protected behind hetmem's back?)",
                );
            }
        }
        Ok(())
    }

    /// The device's fault path (`dmirror_fault`): asks the space's policy
    /// ([`crate::policy::Policy::device_fault`]) where the pages go and how much to bring in
    /// around `[start, end)`; migrates them to the device first if it says so (best effort: a
    /// page that does not move is mapped where it is); then `range_fault` over `[start, end)` in
    /// chunks, programming the page table under the sequence check (an error here is the
    /// access's error), and over the prefetch window around it (best effort).
    fn fault(&self, start: Vpn, end: Vpn, write: bool) -> Result<()> {
        let n = self.notifier()?;
        let pm = &self.inner.dev.pagemap;
        let decision = self.inner.space.core.policy().device_fault(&DeviceFault {
            owner: pm.owner(),
            kind: pm.kind(),
            start: start.addr(),
            end: end.addr(),
            write,
        });
        if decision == DeviceFaultDecision::DEFAULT {
            // Today's path, with no look-up of the mapping.
            return self.fault_chunks(&n, start, end, write);
        }
        let (ps, pe, move_end) = self.prefetch_window(start, end, decision.prefetch);
        // Replicas are read-only copies in device-private memory: a write, or a coherent
        // device, migrates instead.
        let replicate = decision.placement == Placement::Replicate
            && !write
            && pm.kind() == MemoryKind::Private;
        let migrate = decision.placement == Placement::Migrate
            || (decision.placement == Placement::Replicate && !replicate);
        let window = VaRange {
            start: Vpn(ps).addr(),
            end: Vpn(move_end).addr(),
        };
        if migrate && move_end > ps {
            let _ = self.migrate_range(window);
        }
        self.fault_chunks(&n, start, end, write)?;
        if ps < start.0 {
            let _ = self.fault_chunks(&n, Vpn(ps), start, write);
        }
        if pe > end.0 {
            let _ = self.fault_chunks(&n, end, Vpn(pe), write);
        }
        if replicate && move_end > ps {
            // Once the pages are present (the faults above filled them): best effort, what is
            // not replicated stays mapped where it is.
            let _ = self.replicate_window(window, Some(&n));
        }
        Ok(())
    }

    /// Makes this device's read-only replicas of the pages of `r` that are in system memory
    /// (see [`Placement::Replicate`]): anonymous pages through the space
    /// (`SpaceCore::replicate`, which maps each under the space's lock), pages of a shared file
    /// mapping through the file's cache. Returns the replicas made. With `remap` (a fault's
    /// notifier), `r` is mapped again where the replication left it unmapped: the cache's
    /// replicas (found by a fault), and anonymous pages whose mappings the replication
    /// invalidated but could not replicate (no free frame, an error); without, the next
    /// access faults them in.
    fn replicate_window(&self, r: VaRange, remap: Option<&Arc<IntervalNotifier>>) -> Result<u64> {
        let pm = &self.inner.dev.pagemap;
        let refault = |n: &Arc<IntervalNotifier>| {
            let _ = self.fault_chunks(n, r.start.page(), r.end.page(), false);
        };
        if let Some((cache, first)) = self.inner.space.shared_file_range(r) {
            let made = cache.replicate(first * PAGE_SIZE as u64, r.len() as u64, pm)?;
            if let Some(n) = remap.filter(|_| made > 0) {
                refault(n);
            }
            return Ok(made);
        }
        // Pages this device already holds a replica of are left alone.
        let mut runs = Vec::new();
        {
            let pt = lock(&self.inner.pt);
            let mut a = r.start.page().0;
            while a < r.end.page().0 {
                let have = |v: usize| pt.get(&v).is_some_and(|e| e.replica);
                if have(a) {
                    a += 1;
                    continue;
                }
                let s = a;
                while a < r.end.page().0 && !have(a) {
                    a += 1;
                }
                runs.push(VaRange {
                    start: Vpn(s).addr(),
                    end: Vpn(a).addr(),
                });
            }
        }
        let inner = &self.inner;
        let mut map = |a: VirtAddr, frame: FrameIdx| {
            lock(&inner.pt).insert(
                a.page().0,
                DevPte {
                    target: PageTarget::Device {
                        pagemap: pm.id(),
                        frame,
                    },
                    write: false,
                    atomic: false,
                    replica: true,
                },
                pm,
            );
        };
        // Frames for a run: free ones; on a full device, the policy may let older replicas of
        // this device (outside the window) make room, as a migration would evict.
        let policy = self.inner.space.core.policy();
        let keep = (r.start.page().0, r.end.page().0);
        let mut alloc = |first: VirtAddr, n: usize, out: &mut Vec<FrameIdx>| {
            self.inner.dev.alloc_many(n, out);
            if out.len() == n {
                return;
            }
            let q = DeviceFull {
                owner: pm.owner(),
                kind: pm.kind(),
                addr: first.add(out.len() * PAGE_SIZE),
                capacity_pages: pm.nframes(),
                used_pages: pm.used() / PAGE_SIZE,
            };
            if policy.device_full(&q) == DeviceFullAction::EvictAndRetry {
                let want = n - out.len();
                if lock(&inner.pt).drop_replicas(want, keep, pm) > 0 {
                    self.inner.dev.alloc_many(want, out);
                }
            }
        };
        let wanted: usize = runs.iter().map(|r| r.pages()).sum();
        let mut made = 0;
        let mut res = Ok(());
        for run in runs {
            match self
                .inner
                .space
                .core
                .replicate(run, pm, &mut alloc, &mut map)
            {
                Ok(n) => made += n,
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        if let Some(n) = remap.filter(|_| made < wanted) {
            refault(n);
        }
        res.map(|()| made as u64)
    }

    /// Asks the space's policy what to do with each region whose access counter reached its
    /// threshold during a command ([`crate::policy::Policy::remote_accesses`]), and does it:
    /// best effort, bounded by the region's mapping.
    fn serve_access_counters(&self, count: &RemoteCount) {
        let Some((log2, threshold)) = count.cfg.filter(|_| !count.due.is_empty()) else {
            return;
        };
        let policy = self.inner.space.core.policy();
        let pm = &self.inner.dev.pagemap;
        for &(region, vpn) in &count.due {
            let start = Vpn(region << log2).addr();
            let end = Vpn((region + 1) << log2).addr();
            // The region within the mapping of the page that was accessed.
            let Some(vma) = self.inner.space.vma_range(Vpn(vpn).addr()) else {
                continue;
            };
            let r = VaRange {
                start: start.max(vma.start),
                end: end.min(vma.end),
            };
            if r.start >= r.end {
                continue;
            }
            let notice = crate::policy::RemoteAccesses {
                owner: pm.owner(),
                kind: pm.kind(),
                start: r.start,
                end: r.end,
                accesses: threshold,
            };
            match policy.remote_accesses(&notice) {
                Placement::Migrate => {
                    let _ = self.migrate_range(r);
                }
                Placement::Replicate if pm.kind() == MemoryKind::Private => {
                    let _ = self.replicate_window(r, None);
                }
                Placement::Replicate => {
                    let _ = self.migrate_range(r);
                }
                _ => {}
            }
        }
    }

    /// Pages this device holds read-only replicas of ([`Placement::Replicate`]; replicas of
    /// file pages are counted by their cache, [`crate::pagecache::FileCache::replica_owners`]).
    pub fn replica_pages(&self) -> usize {
        lock(&self.inner.pt).replicas
    }

    /// The prefetch window of a fault on `[start, end)`: `(ps, pe, move_end)`, pages. `ps..start`
    /// and `end..pe` are the pages around the request to bring in too (empty for
    /// [`Prefetch::Request`]); `ps..move_end` is what a migrating policy moves: the window, and
    /// the request as far as it lies in the mapping of `start` (a range given by a caller is
    /// bounded by what exists before it is walked).
    fn prefetch_window(&self, start: Vpn, end: Vpn, p: Prefetch) -> (usize, usize, usize) {
        let Some(vma) = self.inner.space.vma_range(start.addr()) else {
            return (start.0, end.0, start.0);
        };
        let (vs, ve) = (vma.start.page().0, vma.end.page().0);
        let b = p.block_pages();
        let ps = (start.0 / b * b).max(vs);
        let pe = end
            .0
            .checked_next_multiple_of(b)
            .unwrap_or(end.0)
            .min(ve)
            .max(end.0);
        let move_end = pe.min(ve.max(start.0));
        (ps, pe, move_end)
    }

    /// `range_fault` over `[start, end)` in chunks of [`FAULT_CHUNK_PAGES`], mapping each.
    fn fault_chunks(
        &self,
        n: &Arc<IntervalNotifier>,
        start: Vpn,
        end: Vpn,
        write: bool,
    ) -> Result<()> {
        let mut s = start.0;
        while s < end.0 {
            let e = (s + FAULT_CHUNK_PAGES).min(end.0);
            self.range_fault_map(
                n,
                Vpn(s),
                Vpn(e),
                HMM_PFN_REQ_FAULT | if write { HMM_PFN_REQ_WRITE } else { 0 },
                false,
            )?;
            s = e;
        }
        Ok(())
    }

    /// `range_fault` over `[s, e)` with `flags`, then maps the valid pages under the sequence
    /// check; with `local_only`, only pages in this device's own memory are mapped.
    fn range_fault_map(
        &self,
        n: &Arc<IntervalNotifier>,
        s: Vpn,
        e: Vpn,
        flags: u64,
        local_only: bool,
    ) -> Result<()> {
        let deadline = Instant::now() + RANGE_FAULT_TIMEOUT;
        loop {
            if Instant::now() > deadline {
                return Err(Error::Busy);
            }
            let seq = n.read_begin();
            let mut range = HmmRange {
                notifier: n,
                notifier_seq: seq,
                start: s.addr(),
                end: e.addr(),
                hmm_pfns: vec![0; e.0 - s.0],
                default_flags: flags,
                pfn_flags_mask: 0,
                dev_private_owner: Some(self.owner()),
            };
            match range_fault(&mut range) {
                Err(Error::Busy) => {
                    // A page is being removed from a file's cache, or a migration owns one:
                    // let the thread that holds it run before trying again.
                    crate::sync::thread::yield_now();
                    continue;
                }
                Err(err) => return Err(err),
                Ok(()) => {}
            }
            let mut pt = lock(&self.inner.pt);
            if n.read_retry(seq) {
                continue;
            }
            for (i, w) in range.hmm_pfns.iter().enumerate() {
                if w & HMM_PFN_VALID == 0 {
                    continue;
                }
                let target = PageTarget::decode(*w);
                let own = self.inner.dev.pagemap.id();
                let local = matches!(target, PageTarget::Device { pagemap, .. } if pagemap == own);
                if local_only && !local {
                    continue;
                }
                let write = w & HMM_PFN_WRITE != 0;
                if !write
                    && matches!(target, PageTarget::System(_))
                    && pt.get(&(s.0 + i)).is_some_and(|e| e.replica)
                {
                    // This device's replica of the page is still valid (an invalidation would
                    // have cleared it): it stays.
                    continue;
                }
                pt.insert(
                    s.0 + i,
                    DevPte {
                        target,
                        write,
                        atomic: false,
                        replica: false,
                    },
                    &self.inner.dev.pagemap,
                );
            }
            return Ok(());
        }
    }

    fn rw(&self, addr: VirtAddr, len: usize, buf: &mut [u8], write: bool) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        self.inner.space.check_owner_process()?;
        Self::check_buf(buf, &r)?;
        let mut out = CmdOut::default();
        let mut cur = r.start.page().0;
        let mut dropped = None;
        let mut count = RemoteCount {
            cfg: crate::policy::AccessCounters::unpack(
                self.inner
                    .space
                    .core
                    .access_counters
                    .load(Ordering::Relaxed),
            ),
            due: Vec::new(),
        };
        loop {
            match self.do_rw(&r, &mut cur, buf, write, &mut out.cpages, &mut count)? {
                Step::Done => {
                    self.serve_access_counters(&count);
                    return Ok(out);
                }
                Step::Fault => {}
                Step::Dropped(a) => self.refill_dropped(a, &mut dropped)?,
            }
            self.fault(Vpn(cur), r.end.page(), write)?;
            out.faults += 1;
        }
    }

    /// READ: the device reads the range into `buf` (at least `len` bytes), faulting in what it
    /// has not mapped. `cpages` counts the pages read, `faults` the fault passes needed.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn read(&self, addr: VirtAddr, len: usize, buf: &mut [u8]) -> Result<CmdOut> {
        self.rw(addr, len, buf, false)
    }

    /// WRITE: the device writes `buf` (at least `len` bytes) into the range, faulting in what it
    /// has not mapped writable. `cpages` counts the pages written, `faults` the fault passes
    /// needed.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn write(&self, addr: VirtAddr, len: usize, buf: &[u8]) -> Result<CmdOut> {
        let mut b = buf.to_vec();
        self.rw(addr, len, &mut b, true)
    }

    /// MIGRATE_TO_DEV: moves the range into device memory (2 MiB units as large frames where
    /// possible, falling back to base frames), maps the new pages in the device page table, then
    /// reads the range back from it into `buf` (at least `len` bytes): a page that is not
    /// device-mapped gives [`Error::NotPresent`] (ENOENT). `cpages` counts the pages read back.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn migrate_to_device(&self, addr: VirtAddr, len: usize, buf: &mut [u8]) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        Self::check_buf(buf, &r)?;
        self.migrate_range(r)?;
        // Return the migrated data for verification: every page must now be device-mapped.
        self.read_back(&r, buf, true)
    }

    /// Copies the range out through the device page table into `buf` (dmirror's read-back
    /// after MIGRATE_TO_DEV and EXCLUSIVE): a page without an entry is ENOENT. With
    /// `remap_own`, pages in this device's own memory whose entries a notification dropped are
    /// mapped again first (see [`Self::remap_own`]).
    fn read_back(&self, r: &VaRange, buf: &mut [u8], remap_own: bool) -> Result<CmdOut> {
        let mut out = CmdOut::default();
        let mut cur = r.start.page().0;
        // A pass of the copy (not counted by access counters: the command moved the pages).
        let pass = |cur: &mut usize, buf: &mut [u8], out: &mut CmdOut| -> Result<bool> {
            let step = self.do_rw(r, cur, buf, false, &mut out.cpages, &mut RemoteCount::off())?;
            Ok(matches!(step, Step::Done))
        };
        if pass(&mut cur, buf, &mut out)? {
            return Ok(out);
        }
        if remap_own {
            self.remap_own(r, cur)?;
            if pass(&mut cur, buf, &mut out)? {
                return Ok(out);
            }
        }
        Err(Error::NotPresent {
            addr: Vpn(cur).addr(),
        })
    }

    /// [`Self::migrate_range_to_device`] in the background (the `cudaMemPrefetchAsync`
    /// analogue): returns at once with a handle whose [`PrefetchHandle::wait`] gives the
    /// migration's result. The pages stay usable meanwhile: CPU and device accesses to a page
    /// being moved wait for its migration, as they would for any migration.
    pub fn prefetch_async(self: &Arc<Self>, addr: VirtAddr, len: usize) -> PrefetchHandle {
        let m = self.clone();
        PrefetchHandle(Some(crate::sync::thread::spawn(move || {
            m.migrate_range_to_device(addr, len)
        })))
    }

    /// Moves the range into device memory, like MIGRATE_TO_DEV, without copying the data out
    /// (a runtime's prefetch): Ok when every page is now device-mapped, with `cpages` the
    /// range's pages (`len / PAGE_SIZE`); [`Error::NotPresent`] (ENOENT) naming the first page
    /// that did not move.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn migrate_range_to_device(&self, addr: VirtAddr, len: usize) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        if self.migrate_range(r)? == r.pages() {
            // Every page moved and was mapped as it was committed.
            return Ok(CmdOut {
                cpages: r.pages() as u64,
                faults: 0,
            });
        }
        let first = r.start.page().0;
        let mut cur = self.mapped_until(&r, first);
        if cur < r.end.page().0 {
            self.remap_own(&r, cur)?;
            cur = self.mapped_until(&r, cur);
            if cur < r.end.page().0 {
                return Err(Error::NotPresent {
                    addr: Vpn(cur).addr(),
                });
            }
        }
        Ok(CmdOut {
            cpages: r.pages() as u64,
            faults: 0,
        })
    }

    /// The first page from `cur` on without a device page-table entry (`r.end` if none).
    fn mapped_until(&self, r: &VaRange, mut cur: usize) -> usize {
        let end = r.end.page().0;
        while cur < end {
            // In holds of up to `PT_CHUNK` lookups.
            let pt = lock(&self.inner.pt);
            let stop = end.min(cur + PT_CHUNK);
            while cur < stop && pt.contains_key(&cur) {
                cur += 1;
            }
            if cur < stop {
                break;
            }
        }
        cur
    }

    /// The MIGRATE notifications of a migration also drop this device's entries for pages
    /// already in its memory (not selected, so not mapped again by it), where dmirror's callback
    /// ignores its own MIGRATE events and keeps them. Maps those pages again, without faulting.
    fn remap_own(&self, r: &VaRange, cur: usize) -> Result<()> {
        let n = self.notifier()?;
        self.range_fault_map(&n, Vpn(cur), r.end.page(), 0, true)
    }

    /// Migrates the anonymous pages of `r` to this device and maps them (a shared file range:
    /// places the file's pages). Returns how many pages of `r` it mapped.
    fn migrate_range(&self, r: VaRange) -> Result<usize> {
        let space = &self.inner.space;
        space.check_owner_process()?;
        if let Some((cache, first)) = space.shared_file_range(r) {
            // A shared file mapping (where the kernel says ENOENT): the file's pages move
            // through its cache, for every mapping of the file at once (see
            // docs/filesystem-contract.md).
            let n = cache.place_on_device(
                first * PAGE_SIZE as u64,
                r.len() as u64,
                &self.inner.dev.pagemap,
            )?;
            debug_event!(
                device = self.owner().0,
                first_page = first,
                pages = n,
                "file pages placed in device memory"
            );
            return Ok(0);
        }
        let pm = self.inner.dev.pagemap.clone();
        let mut mapped = 0;
        // The mirror is attached (its invalidations reach the entries mapped below).
        self.notifier()?;
        let mut a = r.start;
        while a < r.end {
            let (vend, readable) = space.vma_info(a).ok_or(Error::Invalid("no mapping"))?;
            if !readable {
                return Err(Error::Invalid("mapping without read permission"));
            }
            let next = r.end.min(vend).min(a.add(PAGES_PER_LARGE * PAGE_SIZE));
            let mut mig = match migrate::migrate_vma_setup(
                space,
                MigrateArgs {
                    start: a,
                    end: next,
                    flags: SELECT_SYSTEM | SELECT_COMPOUND,
                    pgmap_owner: self.owner(),
                },
            ) {
                Ok(mig) => mig,
                // The mapping changed (a concurrent protect split it, an unmap removed it)
                // between `vma_info` and the setup, which takes the address space's lock
                // (dmirror holds mmap_lock across both): look it up again.
                Err(_) if space.vma_info(a).map(|(e, _)| e) != Some(vend) => continue,
                Err(e) => return Err(e),
            };
            mig.use_pagemap(&pm);
            // The base frames, taken at once and in ascending order: consecutive pages land in
            // consecutive frames (copied back with one call later). Compound slots that must
            // split, and slots beyond what the device had, take theirs one by one.
            let base = (0..mig.npages())
                .filter(|&i| {
                    mig.src[i] & (MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND) == MIGRATE_PFN_MIGRATE
                })
                .count();
            let mut frames = Vec::new();
            self.inner.dev.alloc_many(base, &mut frames);
            let mut frames = frames.into_iter();
            let mut i = 0;
            while i < mig.npages() {
                let w = mig.src[i];
                if w & MIGRATE_PFN_MIGRATE == 0 {
                    i += 1;
                    continue;
                }
                if w & MIGRATE_PFN_COMPOUND != 0 {
                    match self.inner.dev.alloc(true) {
                        Ok(f) => {
                            if self.inner.dev.copy_fails() || mig.copy_to_frame(i, &pm, f).is_err()
                            {
                                // The copy failed: decline the unit, it stays where it is.
                                pm.free(f, true);
                                i += PAGES_PER_LARGE;
                                continue;
                            }
                            mig.dst[i] = migrate::migrate_pfn(PageTarget::Device {
                                pagemap: pm.id(),
                                frame: f,
                            }) | MIGRATE_PFN_COMPOUND
                                | (w & MIGRATE_PFN_WRITE);
                            i += PAGES_PER_LARGE;
                            continue;
                        }
                        Err(_) => mig.split(i),
                    }
                }
                let w = mig.src[i];
                if let Some(f) = frames
                    .next()
                    .or_else(|| self.alloc_or_evict(&mut mig, &pm, i))
                {
                    if self.inner.dev.copy_fails() || mig.copy_to_frame(i, &pm, f).is_err() {
                        pm.free(f, false);
                        i += 1;
                        continue;
                    }
                    mig.dst[i] = migrate::migrate_pfn(PageTarget::Device {
                        pagemap: pm.id(),
                        frame: f,
                    }) | (w & MIGRATE_PFN_WRITE);
                }
                i += 1;
            }
            for f in frames {
                pm.free(f, false);
            }
            mig.pages();
            // Free the frames of pages declined at commit (dst set, but no longer migrating).
            let mut i = 0;
            while i < mig.npages() {
                let (w, d) = (mig.src[i], mig.dst[i]);
                if let Some(PageTarget::Device { frame, .. }) = migrate::migrate_pfn_target(d)
                    && w & MIGRATE_PFN_MIGRATE == 0
                {
                    pm.free(frame, d & MIGRATE_PFN_COMPOUND != 0);
                }
                i += if w & MIGRATE_PFN_COMPOUND != 0 {
                    PAGES_PER_LARGE
                } else {
                    1
                };
            }
            // Map the migrated pages as each chunk is committed (dmirror's finalize_and_map),
            // while they are still marked MIGRATING: nothing can invalidate them between the
            // commit and the mapping, and invalidations elsewhere in the space (a CPU fault on
            // another mapping) do not stop it. In holds of one committed chunk.
            let own = pm.id();
            let inner = &self.inner;
            let mapped_ref = &mut mapped;
            let mut map = |start: VirtAddr, src: &[u64], dst: &[u64]| {
                let mut pt = lock(&inner.pt);
                let mut i = 0;
                while i < src.len() {
                    let (w, d) = (src[i], dst[i]);
                    let span = if w & MIGRATE_PFN_COMPOUND != 0 {
                        PAGES_PER_LARGE
                    } else {
                        1
                    };
                    if let Some(PageTarget::Device { pagemap, frame }) =
                        migrate::migrate_pfn_target(d)
                        && pagemap == own
                        && w & MIGRATE_PFN_MIGRATE != 0
                    {
                        for k in 0..span {
                            pt.insert(
                                start.page().0 + i + k,
                                DevPte {
                                    target: PageTarget::Device {
                                        pagemap,
                                        frame: FrameIdx(frame.0 + k as u32),
                                    },
                                    write: d & MIGRATE_PFN_WRITE != 0,
                                    atomic: false,
                                    replica: false,
                                },
                                &pm,
                            );
                        }
                        *mapped_ref += span;
                    }
                    i += span;
                }
            };
            mig.finalize_and_map(&mut map);
            a = next;
        }
        Ok(mapped)
    }

    /// A base frame for slot `i` of `mig`. When the device cannot give one (full, or an
    /// injected failure), the space's policy decides ([`crate::policy::Policy::device_full`]):
    /// decline the page (`None`), or evict one page of this space from the device (the clock
    /// hand's next victim) and try once more.
    fn alloc_or_evict(
        &self,
        mig: &mut migrate::MigrateVma<'_>,
        pm: &Pagemap,
        i: usize,
    ) -> Option<FrameIdx> {
        if let Ok(f) = self.inner.dev.alloc(false) {
            return Some(f);
        }
        let q = DeviceFull {
            owner: pm.owner(),
            kind: pm.kind(),
            addr: mig.addr(i),
            capacity_pages: pm.nframes(),
            used_pages: pm.used() / PAGE_SIZE,
        };
        match mig.policy().device_full(&q) {
            DeviceFullAction::EvictAndRetry => {
                // A replica is the cheapest victim: a copy, dropped without a copy back.
                if lock(&self.inner.pt).drop_replicas(1, (0, 0), pm) == 1 {
                    return self.inner.dev.alloc(false).ok();
                }
                let hand = &self.inner.dev.evict_hand;
                let (next, _) = mig.evict_one(pm, hand.load(Ordering::Relaxed))?;
                hand.store(next, Ordering::Relaxed);
                self.inner.dev.alloc(false).ok()
            }
            _ => None,
        }
    }

    /// Places read-only replicas of the pages of a shared file mapping in this device's memory
    /// ([`crate::pagecache::FileCache::replicate`]): the device then reads its copies locally,
    /// the CPU keeps using the file's pages, and any write drops every replica first. `cpages`
    /// counts the replicas made (pages). EINVAL outside one shared file mapping.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn replicate_range(&self, addr: VirtAddr, len: usize) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        self.inner.space.check_owner_process()?;
        let (cache, first) = self.inner.space.shared_file_range(r).ok_or(Error::Invalid(
            "replicas are of pages of one shared file mapping",
        ))?;
        let n = cache.replicate(
            first * PAGE_SIZE as u64,
            r.len() as u64,
            &self.inner.dev.pagemap,
        )?;
        Ok(CmdOut {
            cpages: n,
            faults: 0,
        })
    }

    /// MIGRATE_TO_SYS: moves this device's pages of the range back to system memory; `cpages`
    /// counts the pages that were selected (0 when none of the range was on this device).
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn migrate_to_system(&self, addr: VirtAddr, len: usize) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        let space = &self.inner.space;
        space.check_owner_process()?;
        if let Some((cache, first)) = space.shared_file_range(r) {
            // A shared file mapping: this device's pages of the file come back to its cache.
            let mine: Vec<u64> = (first..first + r.pages() as u64)
                .filter(|&p| {
                    matches!(
                        cache.placement(p),
                        PagePlacement::DevicePrivate { owner } | PagePlacement::DeviceCoherent { owner }
                            if owner == self.owner()
                    )
                })
                .collect();
            let n = cache.evict_device_frames(&self.inner.dev.pagemap, &mine, false)?;
            return Ok(CmdOut {
                cpages: n as u64,
                faults: 0,
            });
        }
        let select = match self.inner.dev.pagemap.kind() {
            MemoryKind::Coherent => SELECT_DEVICE_COHERENT,
            _ => SELECT_DEVICE_PRIVATE,
        };
        let mut out = CmdOut::default();
        let mut a = r.start;
        while a < r.end {
            let (vend, _) = space.vma_info(a).ok_or(Error::Invalid("no mapping"))?;
            let next = r.end.min(vend).min(a.add(PAGES_PER_LARGE * PAGE_SIZE));
            let mut mig = match migrate::migrate_vma_setup(
                space,
                MigrateArgs {
                    start: a,
                    end: next,
                    flags: select | SELECT_COMPOUND,
                    pgmap_owner: self.owner(),
                },
            ) {
                Ok(mig) => mig,
                // The mapping changed between `vma_info` and the setup: look it up again (as
                // in migrate_to_device).
                Err(_) if space.vma_info(a).map(|(e, _)| e) != Some(vend) => continue,
                Err(e) => return Err(e),
            };
            let mut i = 0;
            while i < mig.npages() {
                let w = mig.src[i];
                let span = if w & MIGRATE_PFN_COMPOUND != 0 {
                    PAGES_PER_LARGE
                } else {
                    1
                };
                if w & (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                    == (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                {
                    mig.dst[i] = migrate::migrate_pfn(PageTarget::System(mig.addr(i).page()))
                        | (w & MIGRATE_PFN_COMPOUND);
                    out.cpages += span as u64;
                }
                i += span;
            }
            mig.pages();
            mig.finalize();
            a = next;
        }
        Ok(out)
    }

    /// SNAPSHOT: one byte per page of the range ([`snap`]) into `out` (at least
    /// `len / PAGE_SIZE` bytes), from a non-faulting `range_fault`. `cpages` counts the pages
    /// described.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn snapshot(&self, addr: VirtAddr, len: usize, out: &mut [u8]) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        self.inner.space.check_owner_process()?;
        if out.len() < r.pages() {
            return Err(Error::Invalid(
                "snapshot buffer smaller than the range's pages",
            ));
        }
        Self::check_own_memory(&out[..r.pages()])?;
        let n = self.notifier()?;
        let deadline = Instant::now() + RANGE_FAULT_TIMEOUT;
        let pfns = loop {
            if Instant::now() > deadline {
                return Err(Error::Busy);
            }
            let seq = n.read_begin();
            let mut range = HmmRange {
                notifier: &n,
                notifier_seq: seq,
                start: r.start,
                end: r.end,
                hmm_pfns: vec![0; r.pages()],
                default_flags: 0,
                pfn_flags_mask: 0,
                dev_private_owner: Some(self.owner()),
            };
            match range_fault(&mut range) {
                Err(Error::Busy) => continue,
                Err(e) => return Err(e),
                Ok(()) => break range.hmm_pfns,
            }
        };
        for (i, w) in pfns.iter().enumerate() {
            out[i] = self.snapshot_byte(*w);
        }
        Ok(CmdOut {
            cpages: r.pages() as u64,
            faults: 0,
        })
    }

    fn snapshot_byte(&self, w: u64) -> u8 {
        if w & HMM_PFN_ERROR != 0 {
            return snap::ERROR;
        }
        if w & HMM_PFN_VALID == 0 {
            return snap::NONE;
        }
        let mut b = if w & HMM_PFN_WRITE != 0 {
            snap::WRITE
        } else {
            snap::READ
        };
        if hmm_pfn_order(w) == 9 {
            b |= snap::PMD;
        }
        if w & HMM_PFN_ZERO != 0 {
            b |= snap::ZERO;
        }
        if let PageTarget::Device { pagemap, .. } = PageTarget::decode(w)
            && let Ok(pm) = self.frame_pagemap(pagemap)
        {
            let local = pm.owner() == self.owner();
            b |= match (pm.kind(), local) {
                (MemoryKind::Private, true) => snap::DEV_PRIVATE_LOCAL,
                (MemoryKind::Private, false) => snap::DEV_PRIVATE_REMOTE,
                (MemoryKind::Coherent, true) => snap::DEV_COHERENT_LOCAL,
                (MemoryKind::Coherent, false) => snap::DEV_COHERENT_REMOTE,
                (MemoryKind::System, _) => 0,
            };
        }
        b
    }

    /// EXCLUSIVE: takes device-exclusive (atomic) access to every page of the range; the CPU
    /// loses access until it touches a page, which revokes the grant. `buf` (at least `len`
    /// bytes) receives the data; `cpages` counts the pages read back.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn exclusive(&self, addr: VirtAddr, len: usize, buf: &mut [u8]) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        let space = &self.inner.space;
        space.check_owner_process()?;
        Self::check_buf(buf, &r)?;
        let pm = self.inner.dev.pagemap.clone();
        for p in 0..r.pages() {
            let a = r.start.add(p * PAGE_SIZE);
            space.core.make_exclusive(a, &pm, &mut |a, frame| {
                lock(&self.inner.pt).insert(
                    a.page().0,
                    DevPte {
                        target: PageTarget::Stash(frame),
                        write: true,
                        atomic: true,
                        replica: false,
                    },
                    &self.inner.dev.pagemap,
                );
            })?;
        }
        self.read_back(&r, buf, false)
    }

    /// CHECK_EXCLUSIVE: [`Error::ExclusiveRemains`] (EPERM) if any atomic entry remains in the
    /// range; Ok with zero counters otherwise.
    ///
    /// The range is `len` bytes at `addr`: a page-aligned address and a non-zero multiple of
    /// [`PAGE_SIZE`] ([`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] otherwise).
    pub fn check_exclusive(&self, addr: VirtAddr, len: usize) -> Result<CmdOut> {
        let r = range_of(addr, len)?;
        let pt = lock(&self.inner.pt);
        if pt.any_in(r.start.page().0, r.end.page().0, |e| e.atomic) {
            return Err(Error::ExclusiveRemains);
        }
        Ok(CmdOut::default())
    }

    /// A device atomic fetch-add on a `u64` of a page the device holds exclusively (as a real
    /// device's atomics on `make_device_exclusive` pages); [`Error::NotPresent`] otherwise.
    pub fn atomic_fetch_add(&self, addr: VirtAddr, v: u64) -> Result<u64> {
        if !addr.get().is_multiple_of(8) {
            return Err(Error::Invalid("u64 atomic must be 8-byte aligned"));
        }
        // An atomic on system memory (the stash) goes over the link.
        self.inner
            .dev
            .pagemap
            .link()
            .expect("device link model")
            .charge(Traffic::DeviceRemote, 8, 1);
        let pt = lock(&self.inner.pt);
        match pt.get(&addr.page().0) {
            Some(DevPte {
                target: PageTarget::Stash(f),
                atomic: true,
                ..
            }) => self
                .inner
                .space
                .core
                .stash
                .store()
                .fetch_add_u64(f.offset() + addr.get() % PAGE_SIZE, v)
                .map_err(|e| Error::os("device atomic", e)),
            _ => Err(Error::NotPresent { addr }),
        }
    }

    /// RELEASE: evicts all of the device's memory (every address space) back to system memory.
    pub fn release(&self) -> Result<usize> {
        self.inner.dev.evict_all()
    }

    /// Number of entries in the device page table (for tests and reports).
    pub fn mapped_pages(&self) -> usize {
        lock(&self.inner.pt).len()
    }
}
