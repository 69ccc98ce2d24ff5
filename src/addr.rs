//! Address and index newtypes: a virtual address, a virtual page number, a frame index in a
//! pool. Never a bare `u64` where one of these is meant.

use std::fmt;

pub use crate::sys::{LARGE_PAGE_SIZE, PAGE_SIZE};

/// Pages per large (2 MiB) frame.
pub const PAGES_PER_LARGE: usize = LARGE_PAGE_SIZE / PAGE_SIZE;

/// A virtual address in the process (a CPU address in some hetmem address space).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(pub usize);

impl VirtAddr {
    /// The raw value.
    pub const fn get(self) -> usize {
        self.0
    }
    /// Whether the address is 4 KiB aligned.
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }
    /// Whether the address is 2 MiB aligned.
    pub const fn is_large_aligned(self) -> bool {
        self.0.is_multiple_of(LARGE_PAGE_SIZE)
    }
    /// The page containing this address.
    pub const fn page(self) -> Vpn {
        Vpn(self.0 / PAGE_SIZE)
    }
    /// `self + bytes`, or None on overflow.
    pub fn checked_add(self, bytes: usize) -> Option<VirtAddr> {
        self.0.checked_add(bytes).map(VirtAddr)
    }
    /// `self + bytes` (panics on overflow: only used on validated ranges).
    #[allow(clippy::should_implement_trait)] // an address plus a byte count, not `VirtAddr + VirtAddr`
    pub fn add(self, bytes: usize) -> VirtAddr {
        VirtAddr(self.0 + bytes)
    }
    /// Rounds down to a page.
    pub const fn page_down(self) -> VirtAddr {
        VirtAddr(self.0 & !(PAGE_SIZE - 1))
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A virtual page number: `VirtAddr / PAGE_SIZE`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Vpn(pub usize);

impl Vpn {
    /// First byte of the page.
    pub const fn addr(self) -> VirtAddr {
        VirtAddr(self.0 * PAGE_SIZE)
    }
}

/// The index of a 4 KiB frame in a pool (a large frame is 512 consecutive frames starting at a
/// multiple of 512).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FrameIdx(pub u32);

impl FrameIdx {
    /// Byte offset of the frame in its pool.
    pub const fn offset(self) -> usize {
        self.0 as usize * PAGE_SIZE
    }
}

/// A page-aligned, non-empty range of virtual addresses `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VaRange {
    /// First byte.
    pub start: VirtAddr,
    /// One past the last byte.
    pub end: VirtAddr,
}

// The checked constructor, `VaRange::new`, is in `error`: it returns an `Error`, whose variants
// hold addresses, and `addr` names nothing above `sys`.
impl VaRange {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end.0 - self.start.0
    }
    /// Never empty (by construction).
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len() / PAGE_SIZE
    }
    /// Whether `a` lies inside.
    pub fn contains(&self, a: VirtAddr) -> bool {
        self.start <= a && a < self.end
    }
    /// Whether the ranges overlap.
    pub fn overlaps(&self, o: &VaRange) -> bool {
        self.start < o.end && o.start < self.end
    }
}
