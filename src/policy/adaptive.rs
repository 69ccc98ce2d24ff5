//! hetmem's own placement policy: read replicas, write migration, a page-grained density
//! prefetcher, and no eviction of data that already lost its place once.
//!
//! * **Reads replicate** ([`Placement::Replicate`]): a device read fault gives the device
//!   read-only copies; the CPU keeps the pages and reads them in place without a fault. A page
//!   read by both sides (ping-pong, halos, random CPU checks of device data) moves once, not
//!   once per phase. A store drops the copies (one CPU fault, no data moved back).
//! * **Writes migrate** ([`Placement::Migrate`]): a page a device writes lives on the device; a
//!   CPU access brings it back.
//! * **Prefetch by density, from single pages**: the window is the largest aligned block (1 page
//!   … 2 MiB) around the fault more than [`AdaptivePolicy::THRESHOLD_PERCENT`] of whose pages
//!   have been brought in or faulted, counting this fault (UVM's tree, with 4 KiB leaves rather
//!   than 64 KiB: sparse access moves only what it touches). A fault just past the last window
//!   of its region continues a stream and needs only
//!   [`AdaptivePolicy::STREAM_THRESHOLD_PERCENT`]: sequential access doubles its window at each
//!   fault, 10 faults per 2 MiB. (With one threshold of 50 %, prefetched pages make a skewed
//!   random pattern look dense: the graph workload moved 1.35× the oracle's bytes, against
//!   1.08× with the two.)
//! * **A full device** (a migration needs a frame, [`Policy::device_full`]): a page the device
//!   never had evicts another and takes its place; a page the device had before and lost (it
//!   was evicted, or taken back by the CPU) stays where it is and is mapped remotely. Cyclic
//!   access to more data than fits then keeps what is resident instead of evicting the page
//!   needed next (the least-recently-used trap), which is Belady's choice for a stream.
//!   The same rule for replicas: a new page's replica takes the place of the device's older
//!   replicas (which go without a copy back), a page that lost its place once is read where it
//!   is.
//!
//! State lives in a fixed table of 2 MiB regions, as [`super::uvm::UvmPolicy`]'s does (no
//! allocation after construction; a region hashing onto a slot another holds takes it over, and
//! the policy forgets, never errs).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    CpuFault, CpuFaultAction, DeviceFault, DeviceFaultDecision, DeviceFull, DeviceFullAction,
    Placement, Policy, Prefetch, RegionHistory, RegionTable,
};
use crate::addr::PAGE_SIZE;
use crate::sys::LARGE_PAGE_SIZE;

const REGION_PAGES: usize = LARGE_PAGE_SIZE / PAGE_SIZE;
const WORDS: usize = REGION_PAGES / 64;

/// One 2 MiB region's history.
#[derive(Debug)]
struct Region {
    /// The region number + 1 (0: the slot is free).
    tag: AtomicU64,
    /// Pages brought in or faulted on (one bit each).
    seen: [AtomicU64; WORDS],
    /// Pages that had been seen before the fault that last brought them in.
    again: [AtomicU64; WORDS],
    /// The page just past the last window (a fault there continues a stream).
    next: AtomicU64,
}

impl RegionHistory for Region {
    fn empty() -> Region {
        Region {
            tag: AtomicU64::new(0),
            seen: std::array::from_fn(|_| AtomicU64::new(0)),
            again: std::array::from_fn(|_| AtomicU64::new(0)),
            next: AtomicU64::new(0),
        }
    }

    fn tag(&self) -> &AtomicU64 {
        &self.tag
    }

    fn reset(&self, tag: u64) {
        for w in self.seen.iter().chain(&self.again) {
            w.store(0, Ordering::Relaxed);
        }
        self.next.store(0, Ordering::Relaxed);
        self.tag.store(tag, Ordering::Release);
    }
}

impl Region {
    fn count(&self, first: usize, n: usize) -> usize {
        (first..first + n)
            .filter(|p| self.seen[p / 64].load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
            .count()
    }

    /// Marks pages `first..first + n` seen, remembering which had been seen already.
    fn mark(&self, first: usize, n: usize) {
        for p in first..first + n {
            let bit = 1u64 << (p % 64);
            let before = self.seen[p / 64].fetch_or(bit, Ordering::Relaxed);
            if before & bit != 0 {
                self.again[p / 64].fetch_or(bit, Ordering::Relaxed);
            } else {
                self.again[p / 64].fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }
}

/// hetmem's policy (see the module doc).
#[derive(Debug)]
pub struct AdaptivePolicy {
    regions: RegionTable<Region>,
}

impl Default for AdaptivePolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl AdaptivePolicy {
    /// A block joins the window when more than this share of its pages has been seen.
    pub const THRESHOLD_PERCENT: usize = 75;
    /// The threshold for a fault that continues a stream: the page just past the last window.
    pub const STREAM_THRESHOLD_PERCENT: usize = 50;
    /// 2 MiB regions the policy remembers (4 GiB of address space at once).
    pub const SLOTS: usize = 2048;

    /// A policy with an empty history.
    pub fn new() -> AdaptivePolicy {
        AdaptivePolicy {
            regions: RegionTable::new(Self::SLOTS),
        }
    }

    fn region(&self, r: u64) -> &Region {
        self.regions.get(r)
    }
}

impl Policy for AdaptivePolicy {
    fn cpu_fault(&self, _fault: &CpuFault) -> CpuFaultAction {
        CpuFaultAction::MigrateBack
    }

    fn device_fault(&self, fault: &DeviceFault) -> DeviceFaultDecision {
        let first = fault.start.get() / PAGE_SIZE;
        let reg = self.region((first / REGION_PAGES) as u64);
        let off = first % REGION_PAGES;
        // The largest aligned block around the fault that is dense enough, counting the fault;
        // a fault that continues a stream needs less.
        let threshold = if reg.next.load(Ordering::Relaxed) == off as u64 {
            Self::STREAM_THRESHOLD_PERCENT
        } else {
            Self::THRESHOLD_PERCENT
        };
        let mine = usize::from(reg.seen[off / 64].load(Ordering::Relaxed) & (1 << (off % 64)) == 0);
        let hit = |s: usize, n: usize| (reg.count(s, n) + mine) * 100 > n * threshold;
        let mut size = 1;
        let mut level = 2;
        while level <= REGION_PAGES {
            if hit(off / level * level, level) {
                size = level;
            }
            level *= 2;
        }
        let start = off / size * size;
        reg.mark(start, size);
        reg.next.store((start + size) as u64, Ordering::Relaxed);
        DeviceFaultDecision {
            placement: if fault.write {
                Placement::Migrate
            } else {
                Placement::Replicate
            },
            prefetch: if size == 1 {
                Prefetch::Request
            } else {
                Prefetch::Aligned {
                    bytes: size * PAGE_SIZE,
                }
            },
        }
    }

    fn device_full(&self, full: &DeviceFull) -> DeviceFullAction {
        let p = full.addr.get() / PAGE_SIZE;
        let reg = self.region((p / REGION_PAGES) as u64);
        let off = p % REGION_PAGES;
        if reg.again[off / 64].load(Ordering::Relaxed) & (1 << (off % 64)) != 0 {
            DeviceFullAction::Decline
        } else {
            DeviceFullAction::EvictAndRetry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::VirtAddr;
    use crate::pool::{MemoryKind, Owner};

    const BASE: usize = 1 << 40;

    fn dev(p: &AdaptivePolicy, page: usize, write: bool) -> DeviceFaultDecision {
        let a = VirtAddr(BASE + page * PAGE_SIZE);
        p.device_fault(&DeviceFault {
            owner: Owner(1),
            kind: MemoryKind::Private,
            start: a,
            end: a.add(PAGE_SIZE),
            write,
        })
    }

    fn pages(d: DeviceFaultDecision) -> usize {
        d.prefetch.block_pages()
    }

    fn full(p: &AdaptivePolicy, page: usize) -> DeviceFullAction {
        p.device_full(&DeviceFull {
            owner: Owner(1),
            kind: MemoryKind::Private,
            addr: VirtAddr(BASE + page * PAGE_SIZE),
            capacity_pages: 4,
            used_pages: 4,
        })
    }

    #[test]
    fn reads_replicate_and_writes_migrate() {
        let p = AdaptivePolicy::new();
        assert_eq!(dev(&p, 7, false).placement, Placement::Replicate);
        assert_eq!(dev(&p, 300, true).placement, Placement::Migrate);
    }

    #[test]
    fn sequential_faults_double_the_window_and_sparse_ones_move_one_page() {
        let p = AdaptivePolicy::new();
        // Page 0 alone: 1 of 2 is not more than half.
        assert_eq!(pages(dev(&p, 0, false)), 1);
        // Page 1: [0, 2) is full: 2 pages.
        assert_eq!(pages(dev(&p, 1, false)), 2);
        // Page 2: [0, 4) has 3 of 4.
        assert_eq!(pages(dev(&p, 2, false)), 4);
        // Then each fault lands just past the window, and the window doubles.
        let mut next = 4;
        let mut faults = 3;
        while next < REGION_PAGES {
            let n = pages(dev(&p, next, false));
            assert_eq!(n, next * 2, "fault at page {next}");
            next += n / 2;
            faults += 1;
        }
        assert_eq!(faults, 10, "ten faults per 2 MiB");
        // Off the stream (in a fresh region), a block needs more than three quarters: faults at
        // 200 and 202, then 201 gets [200, 202) (2 of 2) but not [200, 204) (3 of 4), which a stream would get.
        let r2 = 2 * REGION_PAGES;
        dev(&p, r2 + 200, false);
        assert_eq!(pages(dev(&p, r2 + 202, false)), 1);
        assert_eq!(pages(dev(&p, r2 + 201, false)), 2);
        // One page in every 64 pages of another region: never denser than half.
        for k in 0..8 {
            assert_eq!(pages(dev(&p, REGION_PAGES + k * 64 + 5, false)), 1);
        }
    }

    #[test]
    fn a_full_device_evicts_for_new_pages_and_not_for_pages_it_lost() {
        let p = AdaptivePolicy::new();
        dev(&p, 40, true);
        assert_eq!(full(&p, 40), DeviceFullAction::EvictAndRetry, "first time");
        // Faulted on again (it was evicted or taken back): it stays where it is.
        dev(&p, 40, true);
        assert_eq!(full(&p, 40), DeviceFullAction::Decline);
        // A page never faulted on evicts.
        dev(&p, 99, true);
        assert_eq!(full(&p, 99), DeviceFullAction::EvictAndRetry);
    }
}
