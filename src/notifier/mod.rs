//! Interval notifiers, as `include/linux/mmu_notifier.h` and `mm/mmu_notifier.c` define them.
//!
//! A device that mirrors part of an address space keeps its own page table correct with an
//! [`IntervalNotifier`], whose callback ([`IntervalOps::invalidate`]) the address space runs
//! *before* it changes the CPU view of an overlapping range (unmap, protection change,
//! migration, exclusive access, ...). The callback must call [`IntervalNotifier::set_seq`] under
//! the device's page-table lock and drop the device's entries for the range before it returns.
//!
//! This module sits below the address space (`space`), which holds the notifiers and runs them;
//! `hmm` (above `space`) uses them to fence `range_fault`, and re-exports them at their usual
//! paths (`hetmem::hmm::IntervalNotifier`, ...). A notifier knows its address space only as what
//! it needs from it: a way to wait out an invalidation in progress (`NotifierHost`).
//!
//! Because callbacks run under the address space's state lock, [`IntervalNotifier::read_begin`]
//! only has to take and release that lock to wait out an invalidation in progress; it must
//! therefore not be called with the device lock held (lock order: space state, then device).
//! The retry protocol (`read_begin`, `range_fault`, `read_retry`) is described in `hmm`.

use std::any::Any;

use crate::addr::{VaRange, VirtAddr};
use crate::pool::Owner;
use crate::sync::{Arc, AtomicU64, Ordering, Weak};

/// What is changing (`enum mmu_notifier_event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotifyEvent {
    /// The range is unmapped.
    Unmap,
    /// Pages are cleared (revocation of exclusive access, discard).
    Clear,
    /// The mapping's protection changes.
    ProtectionVma,
    /// Pages are write-protected again (writeback of pages a device may write through a
    /// mapping that intercepts stores: the device's write access is revoked first).
    ProtectionPage,
    /// The address space is going away.
    Release,
    /// Pages migrate; `owner` is the initiating device, if any.
    Migrate,
    /// Device-exclusive access is granted to `owner`.
    Exclusive,
}

/// One invalidation (`struct mmu_notifier_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyRange {
    /// First byte.
    pub start: VirtAddr,
    /// One past the last byte.
    pub end: VirtAddr,
    /// Why.
    pub event: NotifyEvent,
    /// The device that initiated it (Migrate, Exclusive), if any.
    pub owner: Option<Owner>,
}

/// A notifier callback (`struct mmu_interval_notifier_ops`).
pub trait IntervalOps: Send + Sync {
    /// Called before the CPU view of `range` changes. Must call `n.set_seq(cur_seq)` under the
    /// device's page-table lock and drop the device's entries for the range before returning.
    /// Returns true (hetmem's callbacks are always blockable).
    fn invalidate(&self, n: &IntervalNotifier, range: &NotifyRange, cur_seq: u64) -> bool;
}

/// The address space a notifier watches, as the notifier sees it (the kernel's
/// `mmu_interval_notifier::mm`). Implemented by the address space (`space::SpaceCore`); `hmm`,
/// above it, gets the space back from [`IntervalNotifier::space`] as `Any`.
pub(crate) trait NotifierHost: Any + Send + Sync {
    /// Returns once no invalidation of this space is in progress (callbacks run under the
    /// space's state lock: this takes and releases it).
    fn wait_invalidations(&self);
}

/// An interval notifier (`struct mmu_interval_notifier`).
pub struct IntervalNotifier {
    space: Weak<dyn NotifierHost>,
    range: VaRange,
    seq: AtomicU64,
    ops: Weak<dyn IntervalOps>,
}

impl std::fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("range", &self.range)
            .field("seq", &self.seq)
            .finish()
    }
}

impl IntervalNotifier {
    pub(crate) fn new(
        space: Weak<dyn NotifierHost>,
        range: VaRange,
        ops: Weak<dyn IntervalOps>,
    ) -> Self {
        IntervalNotifier {
            space,
            range,
            seq: AtomicU64::new(0),
            ops,
        }
    }
    /// The range watched.
    pub fn range(&self) -> VaRange {
        self.range
    }
    pub(crate) fn ops(&self) -> Option<Arc<dyn IntervalOps>> {
        self.ops.upgrade()
    }
    /// The address space watched, if it still exists (`hmm` downcasts it to the space).
    pub(crate) fn space(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        self.space
            .upgrade()
            .map(|s| s as Arc<dyn Any + Send + Sync>)
    }
    /// `mmu_interval_read_begin`: waits for an invalidation in progress to end and returns the
    /// sequence to pass to `range_fault` and `read_retry`. Must not be called with the device's
    /// page-table lock held.
    pub fn read_begin(&self) -> u64 {
        if let Some(s) = self.space.upgrade() {
            s.wait_invalidations();
        }
        self.seq.load(Ordering::SeqCst)
    }
    /// The sequence now, for callers that hold the address space's lock (no invalidation can
    /// be in progress): see [`crate::migrate::MigrateVma::notifier_seq`].
    pub(crate) fn current_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// `mmu_interval_read_retry`: true if an invalidation ran since `read_begin` returned `seq`.
    /// Call under the device's page-table lock.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.seq.load(Ordering::SeqCst) != seq
    }
    /// `mmu_interval_set_seq`: called by the callback under the device's page-table lock.
    pub fn set_seq(&self, cur_seq: u64) {
        self.seq.store(cur_seq, Ordering::SeqCst);
    }
}
