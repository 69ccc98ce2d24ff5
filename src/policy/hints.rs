//! Placement hints, the `cudaMemAdvise` set, as a [`Policy`]: a program says where a range
//! should live, and device and CPU faults in it follow; elsewhere another policy decides.
//!
//! | hint | device fault in the range | CPU fault in the range (device-private page) |
//! |---|---|---|
//! | [`Advice::PreferDevice`] (`cudaMemAdviseSetPreferredLocation` = device) | migrate, whole 2 MiB units | bring back only the page (the rest of its unit stays on the device) |
//! | [`Advice::PreferSystem`] (preferred location = CPU) | map remotely, never migrate | bring it back |
//! | [`Advice::AccessedBy`] (`cudaMemAdviseSetAccessedBy`) | map remotely, a whole unit at a time (fewer faults) | bring it back |
//! | [`Advice::ReadMostly`] (`cudaMemAdviseSetReadMostly`) | a read: read-only replicas in the device's memory ([`Placement::Replicate`]); a write: migrate | bring it back (a replicated page never faults on a read) |
//!
//! Replicas of a shared file mapping's pages can also be made ahead, without a fault:
//! [`crate::DeviceMirror::replicate_range`].
//! Asynchronous prefetch (`cudaMemPrefetchAsync`) is [`crate::DeviceMirror::prefetch_async`].
//!
//! The hints live in a fixed table of [`HintPolicy::SLOTS`] ranges, read without a lock (the CPU
//! fault decision runs in a signal handler): each slot is three atomics, published by its `end`
//! word last and withdrawn by it first, so a reader sees a whole hint or none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{Mutex, lock};

use super::{
    AccessCounters, CpuFault, CpuFaultAction, DeviceFault, DeviceFaultDecision, DeviceFull,
    DeviceFullAction, Placement, Policy, Prefetch, RemoteAccesses,
};
use crate::addr::VirtAddr;
use crate::error::{Error, Result};

/// A placement hint for a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// The range should live in device memory.
    PreferDevice,
    /// The range should stay in system memory; devices read it over the link.
    PreferSystem,
    /// Devices access the range where it is, mapped ahead a unit at a time.
    AccessedBy,
    /// Mostly read: every reader gets a read-only replica; a write drops them all.
    ReadMostly,
}

impl Advice {
    fn encode(self) -> u64 {
        match self {
            Advice::PreferDevice => 1,
            Advice::PreferSystem => 2,
            Advice::AccessedBy => 3,
            Advice::ReadMostly => 4,
        }
    }
    fn decode(w: u64) -> Option<Advice> {
        match w {
            1 => Some(Advice::PreferDevice),
            2 => Some(Advice::PreferSystem),
            3 => Some(Advice::AccessedBy),
            4 => Some(Advice::ReadMostly),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    start: AtomicU64,
    /// 0: free (written last when a hint is set, first when it is cleared).
    end: AtomicU64,
    advice: AtomicU64,
}

/// Hints over another policy (see the module doc).
#[derive(Debug)]
pub struct HintPolicy {
    slots: Box<[Slot]>,
    fallback: Arc<dyn Policy>,
    /// Serializes the writers (`advise`, `clear`); readers take no lock.
    writer: Mutex<()>,
}

impl HintPolicy {
    /// Hints at most this many ranges at once.
    pub const SLOTS: usize = 64;

    /// No hints yet; outside hinted ranges `fallback` decides.
    pub fn new(fallback: Arc<dyn Policy>) -> HintPolicy {
        HintPolicy {
            slots: (0..Self::SLOTS).map(|_| Slot::default()).collect(),
            fallback,
            writer: Mutex::new(()),
        }
    }

    /// Hints `advice` for `start..start + len` (replacing the hints of ranges it overlaps).
    /// Errors: an empty or wrapping range (EINVAL), no free slot (ENOMEM).
    pub fn advise(&self, start: VirtAddr, len: usize, advice: Advice) -> Result<()> {
        let end = start
            .get()
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::Invalid("a hint needs a non-empty range"))?;
        let _w = lock(&self.writer);
        self.clear_locked(start, len);
        let s = self
            .slots
            .iter()
            .find(|s| s.end.load(Ordering::Relaxed) == 0)
            .ok_or(Error::NoMemory {
                what: "a slot for another hint",
            })?;
        s.advice.store(advice.encode(), Ordering::Relaxed);
        s.start.store(start.get() as u64, Ordering::Relaxed);
        s.end.store(end as u64, Ordering::Release);
        Ok(())
    }

    /// Withdraws the hints of every range that overlaps `start..start + len`.
    pub fn clear(&self, start: VirtAddr, len: usize) {
        let _w = lock(&self.writer);
        self.clear_locked(start, len);
    }

    fn clear_locked(&self, start: VirtAddr, len: usize) {
        let (s0, e0) = (start.get() as u64, start.get().saturating_add(len) as u64);
        for s in self.slots.iter() {
            let e = s.end.load(Ordering::Acquire);
            if e != 0 && s.start.load(Ordering::Relaxed) < e0 && s0 < e {
                s.end.store(0, Ordering::Release);
            }
        }
    }

    /// The hint covering `a`, if any.
    pub fn hint_at(&self, a: VirtAddr) -> Option<Advice> {
        let a = a.get() as u64;
        self.slots.iter().find_map(|s| {
            let e = s.end.load(Ordering::Acquire);
            let st = s.start.load(Ordering::Relaxed);
            (e != 0 && st <= a && a < e)
                .then(|| Advice::decode(s.advice.load(Ordering::Relaxed)))
                .flatten()
        })
    }
}

impl Policy for HintPolicy {
    fn cpu_fault(&self, fault: &CpuFault) -> CpuFaultAction {
        match self.hint_at(fault.addr) {
            Some(Advice::PreferDevice) => CpuFaultAction::MigrateBackPage,
            Some(_) => CpuFaultAction::MigrateBack,
            None => self.fallback.cpu_fault(fault),
        }
    }

    fn device_fault(&self, fault: &DeviceFault) -> DeviceFaultDecision {
        match self.hint_at(fault.start) {
            Some(Advice::PreferDevice) => DeviceFaultDecision {
                placement: Placement::Migrate,
                prefetch: Prefetch::UNIT,
            },
            Some(Advice::PreferSystem) => DeviceFaultDecision {
                placement: Placement::MapRemote,
                prefetch: Prefetch::Request,
            },
            Some(Advice::AccessedBy) => DeviceFaultDecision {
                placement: Placement::MapRemote,
                prefetch: Prefetch::UNIT,
            },
            Some(Advice::ReadMostly) => DeviceFaultDecision {
                placement: Placement::Replicate,
                prefetch: Prefetch::Request,
            },
            None => self.fallback.device_fault(fault),
        }
    }

    fn device_full(&self, full: &DeviceFull) -> DeviceFullAction {
        match self.hint_at(full.addr) {
            Some(Advice::PreferDevice) => DeviceFullAction::EvictAndRetry,
            _ => self.fallback.device_full(full),
        }
    }

    fn access_counters(&self) -> Option<AccessCounters> {
        self.fallback.access_counters()
    }

    fn remote_accesses(&self, notice: &RemoteAccesses) -> Placement {
        match self.hint_at(notice.start) {
            Some(Advice::PreferSystem) => Placement::MapRemote,
            Some(Advice::PreferDevice) => Placement::Migrate,
            _ => self.fallback.remote_accesses(notice),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::DefaultPolicy;
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::pool::{MemoryKind, Owner};

    fn dev(p: &HintPolicy, a: usize) -> DeviceFaultDecision {
        p.device_fault(&DeviceFault {
            owner: Owner(1),
            kind: MemoryKind::Private,
            start: VirtAddr(a),
            end: VirtAddr(a + PAGE_SIZE),
            write: false,
        })
    }

    #[test]
    fn hints_decide_inside_their_ranges_and_the_fallback_elsewhere() {
        shuttle::check_random(hints_decide, 1);
    }

    fn hints_decide() {
        let p = HintPolicy::new(Arc::new(DefaultPolicy));
        let base = 1 << 30;
        p.advise(VirtAddr(base), 1 << 20, Advice::PreferDevice)
            .unwrap();
        p.advise(VirtAddr(base + (2 << 20)), 1 << 20, Advice::AccessedBy)
            .unwrap();
        assert_eq!(dev(&p, base).placement, Placement::Migrate);
        assert_eq!(dev(&p, base).prefetch, Prefetch::UNIT);
        let ab = dev(&p, base + (2 << 20) + PAGE_SIZE);
        assert_eq!(
            (ab.placement, ab.prefetch),
            (Placement::MapRemote, Prefetch::UNIT)
        );
        assert_eq!(dev(&p, base + (1 << 20)), DeviceFaultDecision::DEFAULT);
        p.advise(VirtAddr(base + (4 << 20)), PAGE_SIZE, Advice::ReadMostly)
            .unwrap();
        assert_eq!(
            dev(&p, base + (4 << 20)).placement,
            Placement::Replicate,
            "read-mostly"
        );
        let cpu = |a: usize| {
            p.cpu_fault(&CpuFault {
                addr: VirtAddr(a),
                write: false,
                owner: Owner(1),
                kind: MemoryKind::Private,
                large: true,
            })
        };
        assert_eq!(cpu(base), CpuFaultAction::MigrateBackPage);
        assert_eq!(cpu(base + (3 << 20)), CpuFaultAction::MigrateBack);
        // A new hint over part of a range replaces it; clearing withdraws it.
        p.advise(VirtAddr(base), PAGE_SIZE, Advice::PreferSystem)
            .unwrap();
        assert_eq!(p.hint_at(VirtAddr(base)), Some(Advice::PreferSystem));
        assert_eq!(
            p.hint_at(VirtAddr(base + PAGE_SIZE)),
            None,
            "replaced whole"
        );
        p.clear(VirtAddr(base), 4 << 20);
        assert_eq!(p.hint_at(VirtAddr(base + (2 << 20))), None);
    }

    #[test]
    fn bad_ranges_and_a_full_table_are_errors() {
        shuttle::check_random(bad_ranges, 1);
    }

    fn bad_ranges() {
        let p = HintPolicy::new(Arc::new(DefaultPolicy));
        assert!(p.advise(VirtAddr(0), 0, Advice::PreferDevice).is_err());
        assert!(
            p.advise(VirtAddr(usize::MAX), 2, Advice::PreferDevice)
                .is_err()
        );
        for k in 0..HintPolicy::SLOTS {
            p.advise(VirtAddr(k * 2 * PAGE_SIZE), PAGE_SIZE, Advice::AccessedBy)
                .unwrap();
        }
        assert!(matches!(
            p.advise(VirtAddr(1 << 40), PAGE_SIZE, Advice::AccessedBy),
            Err(Error::NoMemory { .. })
        ));
    }
}
