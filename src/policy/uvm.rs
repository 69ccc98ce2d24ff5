//! A UVM-like placement policy: what NVIDIA's driver does for managed memory, as a baseline that
//! other policies (and the offline oracle, [`super::oracle`]) are measured against.
//!
//! * **On-demand migration with a density prefetcher** (`uvm_perf_prefetch`): a device fault
//!   migrates the pages to the device, and widens the request to the largest aligned block of
//!   the tree 64 KiB → 128 KiB → … → 2 MiB whose pages have mostly been faulted already (more
//!   than [`UvmPolicy::THRESHOLD_PERCENT`] of them, counting this request), climbing from the
//!   64 KiB block of the fault while each level is dense: sequential access grows the window to
//!   whole 2 MiB units, scattered access stays at 64 KiB.
//! * **Thrashing detection** (`uvm_perf_thrashing`): a 64 KiB block the CPU has pulled back from
//!   the device [`UvmPolicy::THRASH_LIMIT`] times is *pinned* where it is: the device's next
//!   faults on it map it remotely instead of migrating it, for [`UvmPolicy::PIN_FAULTS`] device
//!   faults, after which it may migrate again (its count starts over).
//! * **Access-counter migration** (`uvm_perf_access_counters`, Volta and later): the device
//!   counts its accesses to pages it maps remotely, per 2 MiB region
//!   ([`UvmPolicy::ACCESS_GRANULARITY`]); after [`UvmPolicy::ACCESS_THRESHOLD`] of them the
//!   region migrates to the device, unless thrashing detection has pinned a block of it (the
//!   counters would undo the pin and start the ping-pong again). UVM's defaults.
//! * **Oversubscription**: a full device evicts (one page, round robin) and retries.
//!
//! State lives in a fixed table of 2 MiB regions (allocated when the policy is made: the CPU
//! fault decision runs in a signal handler and may not allocate), updated with atomics; a
//! region that hashes onto a slot another region holds takes it over (its history is dropped:
//! the policy forgets, it never errs).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::{
    AccessCounters, CpuFault, CpuFaultAction, DeviceFault, DeviceFaultDecision, DeviceFull,
    DeviceFullAction, Placement, Policy, Prefetch, RegionHistory, RegionTable, RemoteAccesses,
};
use crate::addr::PAGE_SIZE;
use crate::sys::LARGE_PAGE_SIZE;

/// Pages per 2 MiB region, and 64 KiB blocks per region.
const REGION_PAGES: usize = LARGE_PAGE_SIZE / PAGE_SIZE;
const BLOCK_PAGES: usize = (64 << 10) / PAGE_SIZE;
const BLOCKS: usize = REGION_PAGES / BLOCK_PAGES;

/// One 2 MiB region's history.
#[derive(Debug)]
struct Region {
    /// The region number + 1 (0: the slot is free).
    tag: AtomicU64,
    /// Pages the device faulted on (one bit each).
    faulted: [AtomicU64; REGION_PAGES / 64],
    /// Per 64 KiB block: times the CPU pulled it back from the device.
    back: [AtomicU32; BLOCKS],
    /// Per 64 KiB block: device faults left while it is pinned (0: not pinned).
    pinned: [AtomicU32; BLOCKS],
    /// Blocks thrashing detection ever pinned (one bit each): access counters leave them.
    thrashed: AtomicU64,
}

impl RegionHistory for Region {
    fn empty() -> Region {
        Region {
            tag: AtomicU64::new(0),
            faulted: std::array::from_fn(|_| AtomicU64::new(0)),
            back: std::array::from_fn(|_| AtomicU32::new(0)),
            pinned: std::array::from_fn(|_| AtomicU32::new(0)),
            thrashed: AtomicU64::new(0),
        }
    }

    fn tag(&self) -> &AtomicU64 {
        &self.tag
    }

    fn reset(&self, tag: u64) {
        for w in &self.faulted {
            w.store(0, Ordering::Relaxed);
        }
        for c in self.back.iter().chain(&self.pinned) {
            c.store(0, Ordering::Relaxed);
        }
        self.thrashed.store(0, Ordering::Relaxed);
        self.tag.store(tag, Ordering::Release);
    }
}

impl Region {
    /// Faulted pages among `first..first + n` (page indices in the region).
    fn count(&self, first: usize, n: usize) -> usize {
        (first..first + n)
            .filter(|p| self.faulted[p / 64].load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
            .count()
    }
}

/// The UVM-like policy (see the module doc).
#[derive(Debug)]
pub struct UvmPolicy {
    regions: RegionTable<Region>,
}

impl Default for UvmPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl UvmPolicy {
    /// A block is prefetched whole when more than this share of its pages has faulted.
    pub const THRESHOLD_PERCENT: usize = 50;
    /// CPU pull-backs of a 64 KiB block after which it is pinned where it is.
    pub const THRASH_LIMIT: u32 = 3;
    /// Device faults a pinned block stays mapped remotely.
    pub const PIN_FAULTS: u32 = 16;
    /// 2 MiB regions the policy remembers (4 GiB of address space at once).
    pub const SLOTS: usize = 2048;
    /// The access counters' region (UVM's `uvm_perf_access_counter_granularity` default).
    pub const ACCESS_GRANULARITY: usize = LARGE_PAGE_SIZE;
    /// Remote accesses to a region that migrate it (UVM's
    /// `uvm_perf_access_counter_threshold` default).
    pub const ACCESS_THRESHOLD: u32 = 256;

    /// A policy with an empty history.
    pub fn new() -> UvmPolicy {
        UvmPolicy {
            regions: RegionTable::new(Self::SLOTS),
        }
    }

    fn region(&self, r: u64) -> &Region {
        self.regions.get(r)
    }
}

impl Policy for UvmPolicy {
    fn cpu_fault(&self, fault: &CpuFault) -> CpuFaultAction {
        let page = fault.addr.get() / PAGE_SIZE;
        let reg = self.region((page / REGION_PAGES) as u64);
        let b = (page % REGION_PAGES) / BLOCK_PAGES;
        let n = reg.back[b].fetch_add(1, Ordering::Relaxed) + 1;
        if n >= Self::THRASH_LIMIT && reg.pinned[b].load(Ordering::Relaxed) == 0 {
            reg.pinned[b].store(Self::PIN_FAULTS, Ordering::Relaxed);
            reg.thrashed.fetch_or(1 << b, Ordering::Relaxed);
        }
        CpuFaultAction::MigrateBack
    }

    fn device_fault(&self, fault: &DeviceFault) -> DeviceFaultDecision {
        let first = fault.start.get() / PAGE_SIZE;
        let last = fault.end.get().div_ceil(PAGE_SIZE).max(first + 1);
        let reg = self.region((first / REGION_PAGES) as u64);
        let off = first % REGION_PAGES;
        // Record the request's pages (within this region).
        for p in off..(off + (last - first)).min(REGION_PAGES) {
            reg.faulted[p / 64].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        // A thrashing block stays where it is while pinned.
        let b = off / BLOCK_PAGES;
        let pin = reg.pinned[b].load(Ordering::Relaxed);
        if pin > 0 {
            if pin == 1 {
                reg.back[b].store(0, Ordering::Relaxed);
            }
            reg.pinned[b].store(pin - 1, Ordering::Relaxed);
            return DeviceFaultDecision {
                placement: Placement::MapRemote,
                prefetch: Prefetch::Request,
            };
        }
        // The density tree: the largest aligned block (64 KiB .. 2 MiB) around the fault whose
        // pages have mostly faulted.
        let mut size = BLOCK_PAGES;
        while size < REGION_PAGES {
            let up = size * 2;
            let start = off / up * up;
            if reg.count(start, up) * 100 > up * Self::THRESHOLD_PERCENT {
                size = up;
            } else {
                break;
            }
        }
        DeviceFaultDecision {
            placement: Placement::Migrate,
            prefetch: Prefetch::Aligned {
                bytes: size * PAGE_SIZE,
            },
        }
    }

    fn device_full(&self, _full: &DeviceFull) -> DeviceFullAction {
        DeviceFullAction::EvictAndRetry
    }

    fn access_counters(&self) -> Option<AccessCounters> {
        Some(AccessCounters {
            granularity: Self::ACCESS_GRANULARITY,
            threshold: Self::ACCESS_THRESHOLD,
        })
    }

    fn remote_accesses(&self, notice: &RemoteAccesses) -> Placement {
        let reg = self.region((notice.start.get() / LARGE_PAGE_SIZE) as u64);
        if reg.thrashed.load(Ordering::Relaxed) != 0 {
            // Thrashing detection found it going back and forth: the counters leave it where
            // it is (its pin lapses, but the history stays).
            Placement::MapRemote
        } else {
            Placement::Migrate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::VirtAddr;
    use crate::pool::{MemoryKind, Owner};

    const BASE: usize = 1 << 40;

    fn dev(p: &UvmPolicy, page: usize) -> DeviceFaultDecision {
        let a = VirtAddr(BASE + page * PAGE_SIZE);
        p.device_fault(&DeviceFault {
            owner: Owner(1),
            kind: MemoryKind::Private,
            start: a,
            end: a.add(PAGE_SIZE),
            write: false,
        })
    }

    fn cpu(p: &UvmPolicy, page: usize) -> CpuFaultAction {
        p.cpu_fault(&CpuFault {
            addr: VirtAddr(BASE + page * PAGE_SIZE),
            write: false,
            owner: Owner(1),
            kind: MemoryKind::Private,
            large: false,
        })
    }

    fn prefetch_kib(d: DeviceFaultDecision) -> usize {
        match d.prefetch {
            Prefetch::Aligned { bytes } => bytes >> 10,
            _ => 4,
        }
    }

    #[test]
    fn sequential_faults_grow_the_prefetch_to_whole_units() {
        let p = UvmPolicy::new();
        // The first fault of a region: its 64 KiB block.
        let d = dev(&p, 0);
        assert_eq!(d.placement, Placement::Migrate);
        assert_eq!(prefetch_kib(d), 64);
        // Pages 1..=15 fault in order (the 64 KiB block): 16 of 32 pages of the 128 KiB
        // block is not more than half.
        for pg in 1..16 {
            assert_eq!(prefetch_kib(dev(&p, pg)), 64, "page {pg}");
        }
        // The 17th page: 17 of 32 > 50 %: 128 KiB.
        assert_eq!(prefetch_kib(dev(&p, 16)), 128);
        // Past half of the 2 MiB region (257 of 512 pages), a fault inside the dense part
        // climbs every level: the whole unit.
        for pg in 17..257 {
            dev(&p, pg);
        }
        assert_eq!(prefetch_kib(dev(&p, 255)), 2048);
        // A fault in the sparse half climbs no level.
        assert_eq!(prefetch_kib(dev(&p, 400)), 64);
    }

    #[test]
    fn scattered_faults_stay_at_64_kib() {
        let p = UvmPolicy::new();
        // One page in every 64 KiB block: the density never passes half.
        for b in 0..32 {
            assert_eq!(prefetch_kib(dev(&p, b * 16 + 3)), 64, "block {b}");
        }
    }

    #[test]
    fn a_block_the_cpu_keeps_pulling_back_is_mapped_remotely_for_a_while() {
        let p = UvmPolicy::new();
        assert_eq!(dev(&p, 40).placement, Placement::Migrate);
        for k in 0..UvmPolicy::THRASH_LIMIT {
            assert_eq!(cpu(&p, 40 + k as usize), CpuFaultAction::MigrateBack);
        }
        // Pinned: the next PIN_FAULTS device faults on the block map remotely...
        for k in 0..UvmPolicy::PIN_FAULTS {
            let d = dev(&p, 32 + k as usize % 16);
            assert_eq!(d.placement, Placement::MapRemote, "fault {k}");
            assert_eq!(d.prefetch, Prefetch::Request);
        }
        // ...then it may migrate again; another block was never pinned.
        assert_eq!(dev(&p, 40).placement, Placement::Migrate);
        assert_eq!(dev(&p, 100).placement, Placement::Migrate);
    }

    #[test]
    fn remote_accesses_migrate_a_region_unless_thrashing_pins_it() {
        let p = UvmPolicy::new();
        assert_eq!(p.access_counters().unwrap().threshold, 256);
        let notice = |region: usize| RemoteAccesses {
            owner: Owner(1),
            kind: MemoryKind::Private,
            start: VirtAddr(BASE + region * LARGE_PAGE_SIZE),
            end: VirtAddr(BASE + (region + 1) * LARGE_PAGE_SIZE),
            accesses: 256,
        };
        assert_eq!(p.remote_accesses(&notice(0)), Placement::Migrate);
        // Region 0's block at page 40 thrashes: pinned, so the region stays remote.
        dev(&p, 40);
        for k in 0..UvmPolicy::THRASH_LIMIT {
            cpu(&p, 40 + k as usize);
        }
        assert_eq!(p.remote_accesses(&notice(0)), Placement::MapRemote);
        assert_eq!(p.remote_accesses(&notice(1)), Placement::Migrate);
    }

    #[test]
    fn a_full_device_evicts_and_retries() {
        let p = UvmPolicy::new();
        let a = VirtAddr(BASE);
        assert_eq!(
            p.device_full(&DeviceFull {
                owner: Owner(1),
                kind: MemoryKind::Private,
                addr: a,
                capacity_pages: 4,
                used_pages: 4,
            }),
            DeviceFullAction::EvictAndRetry
        );
    }

    #[test]
    fn regions_that_share_a_slot_forget_each_other() {
        let p = UvmPolicy::new();
        for pg in 0..300 {
            dev(&p, pg);
        }
        assert_eq!(prefetch_kib(dev(&p, 100)), 2048);
        // A region far away: fresh history, whatever slot it lands in.
        assert_eq!(prefetch_kib(dev(&p, REGION_PAGES * 1_000_003)), 64);
    }
}
