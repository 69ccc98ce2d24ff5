//! The per-page state of a cached file, stored sparsely (see [`PageStates`]).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PageState {
    Uncached,
    Clean,
    Dirty,
}

/// Where a cached page's data lives when not (only) in the memfd: a frame of one of the cache's
/// devices ([`super::CacheState::devs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DevSlot {
    /// Device-coherent (the memfd page is the frame, charged to the device) rather than
    /// device-private (the frame is the page's only copy; the memfd holds a hole).
    pub(super) coherent: bool,
    /// Index in the cache's device list.
    pub(super) dev: u8,
    /// The frame.
    pub(super) frame: u32,
}

impl DevSlot {
    fn pack(self) -> u64 {
        (1 << 63)
            | (u64::from(self.coherent) << 62)
            | (u64::from(self.dev) << 32)
            | u64::from(self.frame)
    }
    fn unpack(w: u64) -> Option<DevSlot> {
        (w >> 63 == 1).then_some(DevSlot {
            coherent: (w >> 62) & 1 == 1,
            dev: (w >> 32) as u8,
            frame: w as u32,
        })
    }
}

/// Pages per leaf of [`PageStates`].
pub(super) const LEAF: u64 = 512;

/// One leaf of [`PageStates`]: 512 consecutive pages.
#[derive(Debug)]
struct Leaf {
    state: [PageState; LEAF as usize],
    /// Fill order of clean pages (wrapping; the eviction age is `next_seq - seq`).
    seq: [u32; LEAF as usize],
    /// Device placement of each page ([`DevSlot`] packed; 0: none).
    dev: [u64; LEAF as usize],
    /// Pages of the leaf that are not `Uncached`.
    used: u16,
    /// Reserved for a mapping's range: kept while empty, so that a fault in the mapping never
    /// allocates a leaf.
    reserved: bool,
}

/// The state of every page of the file, stored sparsely in leaves of 512 pages: a leaf exists
/// only where pages are cached or a mapping reserved it, so the memory it takes is bounded by
/// what the cache holds and what is mapped, never by the file's size (a 16 TiB sparse file costs
/// nothing until its pages are read), and walks over a range visit the leaves that exist in it,
/// not every page number. Setting a page in an existing leaf allocates nothing: the CPU fault
/// path (a fill from a mapping, whose range is reserved when the mapping is made) never
/// allocates here. The dirty and cached counts and the clean pages' fill order (for eviction)
/// live here too.
#[derive(Debug, Default)]
pub(super) struct PageStates {
    /// The file's length in pages.
    pub(super) len: u64,
    leaves: std::collections::BTreeMap<u64, Box<Leaf>>,
    pub(super) cached: usize,
    pub(super) dirty: usize,
    pub(super) next_seq: u32,
    /// Pages with a device placement.
    pub(super) placed: usize,
}

impl PageStates {
    pub(super) fn new(len: u64) -> PageStates {
        PageStates {
            len,
            ..PageStates::default()
        }
    }
    /// Page `p`'s state (`Uncached` past the end).
    pub(super) fn get(&self, p: u64) -> PageState {
        self.leaves
            .get(&(p / LEAF))
            .map_or(PageState::Uncached, |l| l.state[(p % LEAF) as usize])
    }
    fn new_leaf(reserved: bool) -> Box<Leaf> {
        Box::new(Leaf {
            state: [PageState::Uncached; LEAF as usize],
            seq: [0; LEAF as usize],
            dev: [0; LEAF as usize],
            used: 0,
            reserved,
        })
    }
    /// Sets page `p`'s state (allocates only when its leaf does not exist yet).
    pub(super) fn set(&mut self, p: u64, s: PageState) {
        debug_assert!(p < self.len, "page {p} past the end ({} pages)", self.len);
        let (li, i) = (p / LEAF, (p % LEAF) as usize);
        if s == PageState::Uncached && !self.leaves.contains_key(&li) {
            return;
        }
        let leaf = self
            .leaves
            .entry(li)
            .or_insert_with(|| Self::new_leaf(false));
        let old = std::mem::replace(&mut leaf.state[i], s);
        match (old, s) {
            (PageState::Uncached, PageState::Uncached) => {}
            (PageState::Uncached, _) => {
                leaf.used += 1;
                self.cached += 1;
            }
            (_, PageState::Uncached) => {
                leaf.used -= 1;
                self.cached -= 1;
            }
            _ => {}
        }
        if old == PageState::Dirty && s != PageState::Dirty {
            self.dirty -= 1;
        }
        if s == PageState::Dirty && old != PageState::Dirty {
            self.dirty += 1;
        }
        if s == PageState::Clean && old != PageState::Clean {
            leaf.seq[i] = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
        }
        if leaf.used == 0 && !leaf.reserved {
            self.leaves.remove(&li);
        }
    }
    /// Page `p`'s device placement.
    pub(super) fn slot(&self, p: u64) -> Option<DevSlot> {
        if self.placed == 0 {
            return None;
        }
        self.leaves
            .get(&(p / LEAF))
            .and_then(|l| DevSlot::unpack(l.dev[(p % LEAF) as usize]))
    }
    /// Sets (or clears) page `p`'s device placement; the page must be cached. Returns the old
    /// one.
    pub(super) fn set_slot(&mut self, p: u64, s: Option<DevSlot>) -> Option<DevSlot> {
        let Some(leaf) = self.leaves.get_mut(&(p / LEAF)) else {
            debug_assert!(s.is_none(), "placement of an uncached page {p}");
            return None;
        };
        let i = (p % LEAF) as usize;
        debug_assert!(
            s.is_none() || leaf.state[i] != PageState::Uncached,
            "placement of an uncached page {p}"
        );
        let old = DevSlot::unpack(std::mem::replace(
            &mut leaf.dev[i],
            s.map_or(0, DevSlot::pack),
        ));
        match (old.is_some(), s.is_some()) {
            (false, true) => self.placed += 1,
            (true, false) => self.placed -= 1,
            _ => {}
        }
        old
    }
    /// The placed pages in `first..last`, in order.
    pub(super) fn placed_in(&self, first: u64, last: u64) -> Vec<(u64, DevSlot)> {
        let mut out = Vec::new();
        if first >= last || self.placed == 0 {
            return out;
        }
        for (&li, leaf) in self.leaves.range(first / LEAF..=(last - 1) / LEAF) {
            for (i, &w) in leaf.dev.iter().enumerate() {
                let p = li * LEAF + i as u64;
                if let Some(s) = DevSlot::unpack(w)
                    && (first..last).contains(&p)
                {
                    out.push((p, s));
                }
            }
        }
        out
    }
    /// Reserves the leaves of pages `first..last` (a mapping's range: bounded by what exists).
    pub(super) fn reserve(&mut self, first: u64, last: u64) {
        if first >= last {
            return;
        }
        for li in first / LEAF..=(last - 1) / LEAF {
            self.leaves
                .entry(li)
                .or_insert_with(|| Self::new_leaf(true))
                .reserved = true;
        }
    }
    /// The file's length in pages.
    pub(super) fn len(&self) -> u64 {
        self.len
    }
    /// The pages in `first..last` whose state satisfies `f`, in order.
    pub(super) fn pages_in(
        &self,
        first: u64,
        last: u64,
        f: impl Fn(PageState) -> bool,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        if first >= last {
            return out;
        }
        for (&li, leaf) in self.leaves.range(first / LEAF..=(last - 1) / LEAF) {
            if leaf.used == 0 {
                continue;
            }
            for (i, &st) in leaf.state.iter().enumerate() {
                let p = li * LEAF + i as u64;
                if (first..last).contains(&p) && st != PageState::Uncached && f(st) {
                    out.push(p);
                }
            }
        }
        out
    }
    /// The cached pages in `first..last`.
    pub(super) fn cached_in(&self, first: u64, last: u64) -> Vec<u64> {
        self.pages_in(first, last, |_| true)
    }
    /// The dirty pages in `first..last`, in order.
    pub(super) fn dirty_in(&self, first: u64, last: u64) -> Vec<u64> {
        self.pages_in(first, last, |s| s == PageState::Dirty)
    }
    /// Every dirty page, in order.
    pub(super) fn all_dirty(&self) -> Vec<u64> {
        self.dirty_in(0, u64::MAX)
    }
    /// Every clean page, oldest fill first (the eviction order).
    pub(super) fn clean_by_age(&self) -> Vec<u64> {
        let mut v: Vec<(std::cmp::Reverse<u32>, u64)> = Vec::with_capacity(self.cached);
        for (&li, leaf) in &self.leaves {
            for (i, &st) in leaf.state.iter().enumerate() {
                if st == PageState::Clean {
                    let age = self.next_seq.wrapping_sub(leaf.seq[i]);
                    v.push((std::cmp::Reverse(age), li * LEAF + i as u64));
                }
            }
        }
        v.sort_unstable();
        v.into_iter().map(|(_, p)| p).collect()
    }
    /// Sets the length; pages past it must have been made `Uncached` by the caller. Leaves past
    /// it go unless a mapping reserved them.
    pub(super) fn resize(&mut self, len: u64) {
        debug_assert!(self.cached_in(len, u64::MAX).is_empty());
        self.len = len;
        let first_gone = len.div_ceil(LEAF);
        let gone: Vec<u64> = self
            .leaves
            .range(first_gone..)
            .filter(|(_, l)| !l.reserved)
            .map(|(&li, _)| li)
            .collect();
        for li in gone {
            self.leaves.remove(&li);
        }
    }
}
