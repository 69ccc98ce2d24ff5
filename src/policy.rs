//! Placement policies: the decisions the mechanisms leave open, behind one trait, and the event
//! trace that lets policies be compared on the same workload (DESIGN.md §6).
//!
//! The mechanisms (the CPU fault service in [`crate::space`], the device's fault path and
//! migration commands in [`crate::device`]) do what a policy says at three decision points. A
//! [`Policy`] answers each with a plain-data value; its default methods are what hetmem did
//! before policies existed, so [`DefaultPolicy`] (a policy that overrides nothing) changes
//! nothing.
//!
//! | decision point | asked by | question ([`Policy`] method) | choices | default |
//! |---|---|---|---|---|
//! | a CPU access faults on a page in device-private memory | the CPU fault service (`SpaceCore::handle_fault`), in the faulting thread's SIGBUS handler or the handler thread, under the space's lock | [`Policy::cpu_fault`] | [`CpuFaultAction::MigrateBack`] (the page, or its whole 2 MiB unit), [`CpuFaultAction::MigrateBackPage`] (split the unit, bring back only the faulting page) | migrate back the whole unit |
//! | a device accesses a page it has no entry for | [`crate::DeviceMirror`]'s fault path (`DeviceMirror::fault`, the `range_fault` loop of dmirror), with no lock held | [`Policy::device_fault`] | [`Placement::MapRemote`] (map the pages where they are: system memory over the link), [`Placement::Migrate`] (migrate them to the device first) or [`Placement::Replicate`] (read-only copies in the device's memory), and a [`Prefetch`] window around the request | map remotely the pages asked for |
//! | a device's accesses to pages it maps remotely reach a threshold in one region ([`AccessCounters`], when the policy asks for them) | [`crate::DeviceMirror`]'s read and write commands, after the command, with no lock held | [`Policy::remote_accesses`] | [`Placement::MapRemote`] (leave it), [`Placement::Migrate`], [`Placement::Replicate`] | no counters |
//! | a device frame allocation fails during a migration to the device (memory full, or an injected failure) | [`crate::DeviceMirror`]'s migration (`migrate_range`), under the space's lock held by the migration | [`Policy::device_full`] | [`DeviceFullAction::Decline`] the page (it stays where it is) or [`DeviceFullAction::EvictAndRetry`] (evict one page of this space from the device, retry once) | decline |
//!
//! Device-coherent memory has no CPU decision point: a coherent-resident page is mapped by the
//! CPU in place and never faults (docs/architecture.md), which is the coherent-aware choice
//! ("never migrate back what the CPU can read in place"); hetmem cannot see those accesses.
//!
//! # Where the policy is set
//!
//! Per address space: [`crate::Space::set_policy`]. Every device bound to the space
//! ([`crate::SoftDevice::mirror`]) consults the space's policy and says who it is in the
//! question ([`DeviceFault::owner`], [`DeviceFull::owner`]), so one policy can treat devices
//! differently. Per space, not per device, because the questions are about the space's pages
//! (the kernel's and UVM's policies hang off the address space too: `va_space`, VMA hints), and
//! because the CPU fault path only knows the space. The policy lives in the space's state
//! (lock 1): the CPU fault path and migrations read it under the lock they already hold; the
//! device fault path takes the lock once to clone it.
//!
//! # Rules for implementations
//!
//! [`Policy::cpu_fault`] runs in a signal handler with the space's lock held: it must not
//! allocate, block, take locks, panic or touch managed memory. The other two run in device
//! threads (no signal context), but [`Policy::device_full`] is called with the space's lock held
//! and must not call back into hetmem. Answers are plain data; a policy that keeps state (access
//! counters, thrashing detection) keeps it in atomics or preallocated tables.
//!
//! # The event trace
//!
//! See [`trace`]: what happened (CPU faults served, migrations each way, evictions, file
//! writeback), with time, page, direction, bytes and device, into a sink ([`trace::TraceSink`])
//! that costs one `Option` check when off; [`trace::RingSink`] is a lock-free, preallocated
//! ring that is safe to record into from the SIGBUS handler, and [`trace::TraceEvent::to_line`]
//! the line format for replay and an offline oracle.
//!
//! # Policies
//!
//! [`DefaultPolicy`] (today's behaviour) and [`uvm::UvmPolicy`], a UVM-like baseline: on-demand
//! migration with a density prefetcher (64 KiB blocks grown to 2 MiB), thrashing detection (a
//! block the CPU keeps pulling back is mapped remotely for a while), access-counter migration
//! and eviction when the device is full. [`CoherentAwarePolicy`]: whole units, never brought
//! back from coherent memory. [`adaptive::AdaptivePolicy`], hetmem's own: device reads make
//! read-only replicas, writes migrate, a page-grained density prefetcher that recognises
//! streams, and a full device that keeps what it holds rather than evict for data that lost its
//! place once.
//!
//! [`hints::HintPolicy`]: placement hints for ranges, the `cudaMemAdvise` set (prefer the
//! device, prefer system memory, accessed-by) over another policy;
//! [`crate::DeviceMirror::prefetch_async`] is the asynchronous prefetch.
//!
//! [`replay`] simulates a policy on a recorded access trace (`hetmem run --trace`, `hetmem
//! replay`): the bytes it would move, without running the program again.
//!
//! # The oracle
//!
//! [`oracle`]: for a sequence of page accesses by the CPU and a device, the least link cost any
//! placement could reach (a dynamic program per page over where it lives at each access: no
//! policy beats it), and a feasible offline placement that respects the device's capacity
//! (Belady's rule); a policy's cost is reported against them.

pub mod adaptive;
pub mod hints;
pub mod oracle;
pub mod replay;
pub mod trace;
pub mod uvm;

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::pool::{MemoryKind, Owner};

/// What the CPU fault service knows when a CPU access faults on a page in device-private memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuFault {
    /// The faulting page.
    pub addr: VirtAddr,
    /// A store (else a load).
    pub write: bool,
    /// The device holding the page.
    pub owner: Owner,
    /// Its memory type ([`MemoryKind::Private`]: coherent pages never fault).
    pub kind: MemoryKind,
    /// The page is part of a 2 MiB unit that lives in one large device frame.
    pub large: bool,
}

/// What to do with a device-private page the CPU faulted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CpuFaultAction {
    /// Migrate it back to system memory (`migrate_to_ram`): the page, or its whole 2 MiB unit
    /// when it is part of one. The default.
    MigrateBack,
    /// Migrate back only the faulting 4 KiB page: a 2 MiB unit is split first (its device frame
    /// too), and its other pages stay in device memory. For sparse CPU accesses to data the
    /// device works on.
    MigrateBackPage,
}

/// What a device's fault path knows when the device accesses pages it has no entry for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFault {
    /// The faulting device.
    pub owner: Owner,
    /// Its memory type.
    pub kind: MemoryKind,
    /// The first page without an entry.
    pub start: VirtAddr,
    /// One past the last page the access still needs (the rest of the device command's range:
    /// the chunk it asked for).
    pub end: VirtAddr,
    /// The device writes (else reads).
    pub write: bool,
}

/// Where a device fault puts the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// Map the pages where they are (`range_fault` with a fault request): system pages are
    /// accessed over the link, missing ones are filled in system memory. The default.
    MapRemote,
    /// Migrate the pages to the device first (on-demand migration, as NVIDIA UVM does), then
    /// map them; a page that cannot move (pinned, a file page, device full and the policy
    /// declines) is mapped where it is.
    Migrate,
    /// Keep the pages where they are and give the device read-only replicas of them in its own
    /// memory (read-mostly data, `cudaMemAdviseSetReadMostly`): the device reads its copies
    /// locally, the CPU reads the pages in place without a fault, and any write, by the CPU or
    /// a device, drops every replica of the page first (docs/architecture.md, "Read-only
    /// replicas"). For a device's write fault, and on a device-coherent device, the same as
    /// [`Placement::Migrate`]. A page that cannot be replicated (a page of a 2 MiB unit, a
    /// pinned page, the zero page; a full device whose policy declines: on
    /// [`DeviceFullAction::EvictAndRetry`] the device drops its own older replicas to make room)
    /// is mapped where it is; in a shared file mapping the file's cache makes the replicas.
    Replicate,
}

/// How much a device fault brings in around what the device asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Prefetch {
    /// Exactly the pages asked for. The default.
    Request,
    /// The asked pages widened to whole aligned blocks of `bytes` (rounded up to a power of two,
    /// at least a page, at most 1 GiB), clamped to the mapping of the first page. The pages
    /// around the request are brought in best-effort: one that cannot be faulted (past the end
    /// of a file, say) is left alone and fails nothing.
    Aligned {
        /// The block size in bytes.
        bytes: usize,
    },
}

impl Prefetch {
    /// Prefetch whole 2 MiB units.
    pub const UNIT: Prefetch = Prefetch::Aligned {
        bytes: crate::sys::LARGE_PAGE_SIZE,
    };

    /// The block size in pages (1 for [`Prefetch::Request`]).
    pub(crate) fn block_pages(self) -> usize {
        match self {
            Prefetch::Request => 1,
            Prefetch::Aligned { bytes } => {
                bytes
                    .checked_next_power_of_two()
                    .unwrap_or(1 << 30)
                    .clamp(PAGE_SIZE, 1 << 30)
                    / PAGE_SIZE
            }
        }
    }
}

/// The answer to a device fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFaultDecision {
    /// Where the pages go.
    pub placement: Placement,
    /// How much around the request.
    pub prefetch: Prefetch,
}

impl DeviceFaultDecision {
    /// Today's behaviour: map remotely exactly the pages asked for.
    pub const DEFAULT: DeviceFaultDecision = DeviceFaultDecision {
        placement: Placement::MapRemote,
        prefetch: Prefetch::Request,
    };
}

/// What a migration to a device knows when the device cannot allocate a frame for a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFull {
    /// The device.
    pub owner: Owner,
    /// Its memory type.
    pub kind: MemoryKind,
    /// The page that needs a frame (a 2 MiB unit that found no large frame was split first: the
    /// question is asked per 4 KiB page).
    pub addr: VirtAddr,
    /// The device's capacity, in pages.
    pub capacity_pages: usize,
    /// Pages of device memory in use.
    pub used_pages: usize,
}

/// What to do when a device is out of memory during a migration to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceFullAction {
    /// Decline the page: it stays where it is, and the migration goes on with the next page
    /// (which will ask again). The default.
    Decline,
    /// Evict one page (or 2 MiB unit) of this address space from the device back to system
    /// memory — the next frame after the device's eviction clock hand (round robin over its
    /// frames) that holds a page of this space outside the range being migrated — and retry
    /// the allocation once. If there is nothing to evict, or the retry fails, the page is
    /// declined. Pages of other address spaces are never evicted here (the migration holds this
    /// space's lock only; taking another space's would risk a deadlock between two migrations).
    EvictAndRetry,
}

/// A placement policy (see the module doc for where each method is consulted).
///
/// Every method has a default: today's behaviour. Implement only the decisions that differ.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// A CPU access faulted on a page in device-private memory. Runs in a signal handler under
    /// the space's lock: no allocation, no blocking, no locks.
    fn cpu_fault(&self, fault: &CpuFault) -> CpuFaultAction {
        let _ = fault;
        CpuFaultAction::MigrateBack
    }

    /// A device accessed pages it has no entry for.
    fn device_fault(&self, fault: &DeviceFault) -> DeviceFaultDecision {
        let _ = fault;
        DeviceFaultDecision::DEFAULT
    }

    /// A migration to a device found its memory full. Called under the space's lock: must not
    /// call into hetmem.
    fn device_full(&self, full: &DeviceFull) -> DeviceFullAction {
        let _ = full;
        DeviceFullAction::Decline
    }

    /// The devices' access counters for this policy (read when the policy is set): `None` (the
    /// default) counts nothing and costs nothing.
    fn access_counters(&self) -> Option<AccessCounters> {
        None
    }

    /// A device's accesses to pages it maps remotely reached the threshold in one region
    /// ([`AccessCounters`]). The answer places the region: [`Placement::MapRemote`] leaves it
    /// (the default), [`Placement::Migrate`] or [`Placement::Replicate`] moves or copies its
    /// pages to the device (best effort), after the device command that counted the accesses.
    /// Called with no lock held.
    fn remote_accesses(&self, notice: &RemoteAccesses) -> Placement {
        let _ = notice;
        Placement::MapRemote
    }
}

/// How a device counts its accesses to pages it maps remotely (system memory over the link),
/// as NVIDIA's GPUs have since Volta (`uvm_perf_access_counters`): one counter per aligned region
/// of `granularity` bytes; when a counter reaches `threshold` the device asks the policy
/// ([`Policy::remote_accesses`]) and the counter starts over. One access is one page read or
/// written by a device command. Counters live in a fixed table per device and address space
/// ([`AccessCounters::SLOTS`] regions): a region hashing onto a slot another holds takes it
/// over, its count lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessCounters {
    /// The region of one counter, in bytes: a power of two from 64 KiB to 1 GiB (rounded up
    /// and clamped so).
    pub granularity: usize,
    /// Accesses that make a notification (at least 1).
    pub threshold: u32,
}

impl AccessCounters {
    /// Regions counted at once, per device and address space.
    pub const SLOTS: usize = 1024;

    /// The granularity as a power of two of pages.
    pub(crate) fn region_pages_log2(self) -> u32 {
        self.granularity
            .clamp(64 << 10, 1 << 30)
            .next_power_of_two()
            .trailing_zeros()
            - PAGE_SIZE.trailing_zeros()
    }

    /// Packed in one word (0: no counters): the granularity's log2 in pages, then the
    /// threshold.
    pub(crate) fn pack(c: Option<AccessCounters>) -> u64 {
        c.map_or(0, |c| {
            (c.region_pages_log2() as u64) << 32 | c.threshold.max(1) as u64
        })
    }

    /// [`Self::pack`]'s word back: (log2 of the region's pages, threshold), or `None`.
    pub(crate) fn unpack(w: u64) -> Option<(u32, u32)> {
        (w != 0).then_some(((w >> 32) as u32, w as u32))
    }
}

/// A device's remote accesses in one region reached its threshold (see [`AccessCounters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAccesses {
    /// The device.
    pub owner: Owner,
    /// Its memory type.
    pub kind: MemoryKind,
    /// The region (`granularity` bytes, aligned), within the mapping of the pages whose accesses
    /// were counted: its first page there.
    pub start: VirtAddr,
    /// One past its last page there.
    pub end: VirtAddr,
    /// The accesses counted (the threshold).
    pub accesses: u32,
}

/// The coherent-aware policy: never migrate back what the CPU can use in place. A device fault
/// migrates the pages to the device, whole 2 MiB units at a time: in device-coherent memory the
/// CPU then reads and writes them where they are (it never faults on them), so a page crosses
/// the link once. In device-private memory it behaves as on-demand migration with unit prefetch
/// (a CPU access there must bring the page back: nothing can be used in place).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoherentAwarePolicy;

impl Policy for CoherentAwarePolicy {
    fn device_fault(&self, _fault: &DeviceFault) -> DeviceFaultDecision {
        DeviceFaultDecision {
            placement: Placement::Migrate,
            prefetch: Prefetch::UNIT,
        }
    }

    fn device_full(&self, _full: &DeviceFull) -> DeviceFullAction {
        DeviceFullAction::EvictAndRetry
    }
}

/// The slot of 2 MiB region `r` in a policy's fixed table of `slots` regions (a multiplicative
/// hash: neighbouring regions land apart).
pub(crate) fn region_slot(r: u64, slots: usize) -> usize {
    (r.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 53) as usize % slots
}

/// What a policy remembers of one 2 MiB region, in atomics ([`RegionTable`]).
pub(crate) trait RegionHistory {
    /// An empty history.
    fn empty() -> Self;
    /// The region number + 1 it is of (0: none).
    fn tag(&self) -> &std::sync::atomic::AtomicU64;
    /// Forgets everything, then records `tag` (its slot now holds another region).
    fn reset(&self, tag: u64);
}

/// A policy's fixed table of 2 MiB region histories, allocated when the policy is made (a
/// decision that runs in a signal handler may not allocate): a region that hashes onto a slot
/// another holds takes it over, and its history starts over (the policy forgets, it never errs).
#[derive(Debug)]
pub(crate) struct RegionTable<R> {
    slots: Box<[R]>,
}

impl<R: RegionHistory> RegionTable<R> {
    /// `slots` empty histories.
    pub(crate) fn new(slots: usize) -> RegionTable<R> {
        RegionTable {
            slots: (0..slots).map(|_| R::empty()).collect(),
        }
    }

    /// The history of region `r` (taken over if another region held its slot).
    pub(crate) fn get(&self, r: u64) -> &R {
        use std::sync::atomic::Ordering;
        let slot = &self.slots[region_slot(r, self.slots.len())];
        if slot.tag().load(Ordering::Acquire) != r + 1 {
            slot.reset(r + 1);
        }
        slot
    }
}

/// Today's behaviour at every decision point: CPU faults migrate back the whole page or unit,
/// device faults map remotely exactly what was asked for, a full device declines the page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultPolicy;

impl Policy for DefaultPolicy {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_blocks_are_bounded_powers_of_two() {
        assert_eq!(Prefetch::Request.block_pages(), 1);
        assert_eq!(Prefetch::UNIT.block_pages(), 512);
        assert_eq!(Prefetch::Aligned { bytes: 0 }.block_pages(), 1);
        assert_eq!(Prefetch::Aligned { bytes: 5000 }.block_pages(), 2);
        assert_eq!(
            Prefetch::Aligned { bytes: usize::MAX }.block_pages(),
            (1 << 30) / PAGE_SIZE
        );
    }

    #[test]
    fn the_default_policy_is_todays_behaviour() {
        let p = DefaultPolicy;
        let a = VirtAddr(1 << 30);
        assert_eq!(
            p.cpu_fault(&CpuFault {
                addr: a,
                write: true,
                owner: Owner(1),
                kind: MemoryKind::Private,
                large: true,
            }),
            CpuFaultAction::MigrateBack
        );
        assert_eq!(
            p.device_fault(&DeviceFault {
                owner: Owner(1),
                kind: MemoryKind::Private,
                start: a,
                end: a.add(PAGE_SIZE),
                write: false,
            }),
            DeviceFaultDecision::DEFAULT
        );
        assert_eq!(
            p.device_full(&DeviceFull {
                owner: Owner(1),
                kind: MemoryKind::Private,
                addr: a,
                capacity_pages: 512,
                used_pages: 512,
            }),
            DeviceFullAction::Decline
        );
    }
}
