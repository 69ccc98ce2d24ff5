//! Page entries: the 8-byte word per page of a mapping (state, flags, pagemap, pins, frame).

use super::*;

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
/// the CPU page is the device frame); 4 MIGRATING (a migration selected the page and has not
/// finalized yet: the kernel's migration entry — CPU faults on it wait, device faults get EBUSY,
/// other migrations skip it; set and cleared under the state lock, which the migration does not
/// hold in between); 5 ZERO (a `Present` page that is the kernel's shared zero page, mapped
/// write-protected after a read fault on a never-written anonymous page: a store faults and makes
/// it a private page); 6 REPLICATED (a `Present` page that devices hold read-only replicas of,
/// write-protected so that a store faults and drops them first: module `replica`); 7 FORK_COW (a
/// coherent page the CPU shares copy-on-write with a forked child, write-protected after the
/// fork so that the parent's first store faults: module `fork`); 8-15 pagemap id (Device and coherent: the frame's pagemap;
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
const F_MIGRATING: u64 = 1 << 4;
const F_ZERO: u64 = 1 << 5;
const F_REPLICATED: u64 = 1 << 6;
const F_FORK_COW: u64 = 1 << 7;

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
    pub(super) fn pins_bits(self) -> u64 {
        self.0 & (0xffff << 16)
    }
    pub(crate) fn present(large: bool, keep: Pte) -> Pte {
        Pte(ST_PRESENT | if large { F_LARGE } else { 0 } | keep.pins_bits())
    }
    /// The shared zero page, mapped write-protected (pins of `keep` kept).
    pub(crate) fn zero_page(keep: Pte) -> Pte {
        Pte(ST_PRESENT | F_ZERO | keep.pins_bits())
    }
    /// Whether the page is the shared zero page (see [`Pte::zero_page`]).
    pub(crate) fn is_zero_page(self) -> bool {
        self.0 & 3 == ST_PRESENT && self.0 & F_ZERO != 0
    }
    /// The entry without the zero-page mark: the page is (or is about to be) a private page.
    pub(crate) fn without_zero(self) -> Pte {
        Pte(self.0 & !F_ZERO)
    }
    /// Whether devices hold read-only replicas of the page (module `replica`).
    pub(crate) fn replicated(self) -> bool {
        self.0 & 3 == ST_PRESENT && self.0 & F_REPLICATED != 0
    }
    /// The entry with the REPLICATED mark set or cleared.
    pub(crate) fn with_replicated(self, on: bool) -> Pte {
        if on {
            Pte(self.0 | F_REPLICATED)
        } else {
            Pte(self.0 & !F_REPLICATED)
        }
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
    /// Whether the page is a coherent page shared copy-on-write with a forked child (module
    /// `fork`). Any new placement of the page makes a new entry, without the mark.
    pub(crate) fn fork_cow(self) -> bool {
        self.is_coherent() && self.0 & F_FORK_COW != 0
    }
    /// The entry with the FORK_COW mark set.
    pub(crate) fn with_fork_cow(self) -> Pte {
        Pte(self.0 | F_FORK_COW)
    }
    /// The entry without the FORK_COW mark.
    pub(crate) fn without_fork_cow(self) -> Pte {
        Pte(self.0 & !F_FORK_COW)
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
    /// Whether a migration in flight owns the page.
    pub(crate) fn migrating(self) -> bool {
        self.0 & F_MIGRATING != 0
    }
    /// The entry with the MIGRATING bit set or cleared.
    pub(crate) fn with_migrating(self, on: bool) -> Pte {
        if on {
            Pte(self.0 | F_MIGRATING)
        } else {
            Pte(self.0 & !F_MIGRATING)
        }
    }
    pub(crate) fn without_large(self) -> Pte {
        Pte(self.0 & !F_LARGE)
    }
    pub(super) fn with_pin(self, long: bool, delta: i64) -> Option<Pte> {
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
        if self.replicated() {
            write!(f, "+R")?;
        }
        if self.pinned() {
            write!(f, " pins {}/{}", self.short_pins(), self.long_pins())?;
        }
        Ok(())
    }
}
