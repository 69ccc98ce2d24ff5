//! Migration in the kernel's three phases (`mm/migrate_device.c`).
//!
//! 1. [`migrate_vma_setup`] — *collect and unmap*. Registers the migration (its claim on the
//!    range) first; then, in chunks of up to 64 pages (a 2 MiB unit whole), one hold of the
//!    address space's state lock each: selects the pages the flags and owner allow (skipping
//!    pages another migration owns), runs the interval notifiers (MIGRATE, with the initiator as
//!    owner) over the chunk and marks the selected pages MIGRATING (the kernel's migration
//!    entries); then, without the lock, write-protects the selected system pages so that their
//!    bytes cannot change while the driver copies them. Until finalize, a CPU fault on a marked
//!    page waits for the migration, `range_fault` on one waits and returns EBUSY, and
//!    operations that change mappings over the range (unmap, protect, pins, exclusive access,
//!    eviction) wait; the rest of the space is served meanwhile, between two holds too. On
//!    return: `src[i]` has `MIGRATE_PFN_MIGRATE` for every page that may move, and `cpages`
//!    counts them.
//! 2. The driver allocates destinations and copies ([`MigrateVma::copy_to_frame`]); it sets
//!    `dst[i]` (`migrate_pfn(target) | flags`) or leaves it 0 to decline the page.
//! 3. [`MigrateVma::pages`] — *commit*: a page whose `dst` is 0 stops migrating. Then
//!    [`MigrateVma::finalize`]: migrated pages point at their new frame (system pages are
//!    dropped from the CPU view; device pages going to system memory are copied into it), old
//!    frames are freed, declined pages are left exactly as they were (write protection removed).
//!    The drops and copies run without the state lock (the pages are still marked; pages in
//!    consecutive device frames come back with one copy); only the commit of the entries takes
//!    it, again in chunks, each page's mark cleared in the hold that commits it.
//!
//! A `MigrateVma` dropped without `finalize` finalizes with every page declined.
//!
//! # `MIGRATE_PFN_*` and select flags
//!
//! As the kernel: `VALID` 1<<0, `MIGRATE` 1<<1, `WRITE` 1<<3, `COMPOUND` 1<<4; the target
//! ([`PageTarget`]) is shifted left by 6. `SELECT_SYSTEM` 1, `SELECT_DEVICE_PRIVATE` 2,
//! `SELECT_DEVICE_COHERENT` 4, `SELECT_COMPOUND` 8.
//!
//! # Which pages are collected
//!
//! * A missing page (a hole) becomes `MIGRATE` without `VALID`, with `SELECT_SYSTEM` (a device
//!   page is then allocated and cleared). With `SELECT_COMPOUND`, an aligned 2 MiB hole of a large
//!   mapping becomes one `COMPOUND` entry followed by zero entries.
//! * A system page needs `SELECT_SYSTEM`; a page of a 2 MiB unit wholly in the range moves as one
//!   `COMPOUND` entry with `SELECT_COMPOUND`, else the unit is split.
//! * A device-private page needs `SELECT_DEVICE_PRIVATE` and a matching owner.
//! * Device-exclusive pages are skipped; pinned pages are collected but not `MIGRATE`.

use crate::addr::{FrameIdx, PAGE_SIZE, PAGES_PER_LARGE, VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::hmm::{NotifyEvent, PageTarget};
use crate::mm::FaultMode;
use crate::policy::trace::{Direction, EventKind, TraceEvent};
use crate::pool::{MemoryKind, Owner, Pagemap};
use crate::space::{PageState, Pte, Space, SpaceCore, SpaceState};
use crate::sync::{Arc, Guard, Ordering};

/// `MIGRATE_PFN_VALID`.
pub const MIGRATE_PFN_VALID: u64 = 1 << 0;
/// `MIGRATE_PFN_MIGRATE`.
pub const MIGRATE_PFN_MIGRATE: u64 = 1 << 1;
/// `MIGRATE_PFN_WRITE`.
pub const MIGRATE_PFN_WRITE: u64 = 1 << 3;
/// `MIGRATE_PFN_COMPOUND`.
pub const MIGRATE_PFN_COMPOUND: u64 = 1 << 4;
/// `MIGRATE_PFN_SHIFT`.
pub const MIGRATE_PFN_SHIFT: u32 = 6;
/// `MIGRATE_VMA_SELECT_SYSTEM`.
pub const SELECT_SYSTEM: u32 = 1;
/// `MIGRATE_VMA_SELECT_DEVICE_PRIVATE`.
pub const SELECT_DEVICE_PRIVATE: u32 = 2;
/// `MIGRATE_VMA_SELECT_DEVICE_COHERENT`.
pub const SELECT_DEVICE_COHERENT: u32 = 4;
/// `MIGRATE_VMA_SELECT_COMPOUND`.
pub const SELECT_COMPOUND: u32 = 8;

/// `migrate_pfn(target)`: the target with `VALID`.
pub fn migrate_pfn(t: PageTarget) -> u64 {
    (t.encode() << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID
}

/// The target of a `src`/`dst` word with `VALID`.
pub fn migrate_pfn_target(w: u64) -> Option<PageTarget> {
    if w & MIGRATE_PFN_VALID == 0 {
        return None;
    }
    Some(PageTarget::decode(w >> MIGRATE_PFN_SHIFT))
}

/// Arguments of [`migrate_vma_setup`] (`struct migrate_vma`'s inputs).
#[derive(Clone, Copy, Debug)]
pub struct MigrateArgs {
    /// First byte (page-aligned).
    pub start: VirtAddr,
    /// One past the last byte (page-aligned); the range must lie in one mapping.
    pub end: VirtAddr,
    /// `SELECT_*` flags.
    pub flags: u32,
    /// `pgmap_owner`: selects device pages of this owner; names the initiator in notifications.
    pub pgmap_owner: Owner,
}

/// A migration in progress (see the module doc for the phases).
pub struct MigrateVma<'a> {
    core: &'a Arc<SpaceCore>,
    /// Registered in the space (`SpaceState::migrations`) and not finalized yet.
    active: bool,
    /// This migration's id in `SpaceState::migrations`.
    id: u64,
    /// The pages this migration marked MIGRATING at setup (it clears them at finalize).
    marked: Vec<bool>,
    /// First byte.
    pub start: VirtAddr,
    /// One past the last byte.
    pub end: VirtAddr,
    /// Source words, one per page.
    pub src: Vec<u64>,
    /// Destination words, set by the driver.
    pub dst: Vec<u64>,
    /// Pages collected for migration (a compound entry counts its 512 pages).
    pub cpages: usize,
    mode: FaultMode,
    protected: Vec<bool>,
    /// Dropped without `finalize`: every page is declined.
    aborted: bool,
    /// No `fork()` starts while this migration is in flight (`space::fork`).
    _fork_gate: std::sync::RwLockReadGuard<'static, ()>,
}

impl std::fmt::Debug for MigrateVma<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateVma")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("cpages", &self.cpages)
            .finish()
    }
}

/// Phase 1: collect and unmap. Errors (EINVAL): unaligned or empty range, a range not inside one
/// mapping.
pub fn migrate_vma_setup<'a>(space: &'a Space, args: MigrateArgs) -> Result<MigrateVma<'a>> {
    let core = &space.core;
    core.check_process()?;
    let len = args
        .end
        .get()
        .checked_sub(args.start.get())
        .ok_or(Error::Invalid("end before start"))?;
    let r = VaRange::new(args.start, len)?;
    // Before any hetmem lock (the gate ranks first).
    let fork_gate = crate::space::fork_gate();
    let mut st = core.lock_state();
    let v = st
        .vma(r.start)
        .ok_or(Error::Invalid("no mapping at start"))?;
    if r.end > v.range.end {
        return Err(Error::Invalid("range is not inside one mapping"));
    }
    let (mode, writable, large_vma) = (v.mode, v.prot.writable(), v.large);
    // Moving a page that the CPU maps means copying it with CPU loads: not possible in a
    // mapping without read permission (holes and device-private pages still move).
    let readable = v.prot.readable();
    // File pages do not migrate (yet; see docs/filesystem-contract.md), and holes in a file
    // mapping are not anonymous memory: as the kernel, nothing of a file mapping is collected.
    let is_file = v.file.is_some();
    let n = r.pages();
    let mut src = vec![0u64; n];
    let mut protected = vec![false; n];
    let mut marked = vec![false; n];
    let mut cpages = 0;
    let compound = args.flags & SELECT_COMPOUND != 0;
    let wbit = if writable { MIGRATE_PFN_WRITE } else { 0 };
    // The claim first: from now on operations that change mappings over the range wait for
    // this migration, so the mapping stays as checked while the pages are selected in chunks,
    // one lock hold each (faults on the rest of the space are served between two holds). A page
    // of a later chunk that a fault serves meanwhile is selected in its new state.
    let id = st.register_claim(r);
    let mut i = 0;
    let mut chunk_start = 0;
    loop {
        if i >= n || i >= chunk_start + CHUNK_PAGES {
            // The chunk is selected: notify and mark it in the same hold.
            mark_chunk(
                core,
                &mut st,
                r,
                chunk_start,
                i,
                &src,
                &mut marked,
                args.pgmap_owner,
            );
            if i >= n {
                break;
            }
            drop(st);
            st = core.lock_state();
            chunk_start = i;
        }
        let a = r.start.add(i * PAGE_SIZE);
        let v = st.vma(a).expect("inside the mapping");
        let vi = v.idx(a);
        let pte = v.ptes[vi];
        // A 2 MiB unit wholly inside the range, with its head here?
        let unit_here = a.is_large_aligned() && i + PAGES_PER_LARGE <= n && v.unit_of(vi).is_some();
        if pte.migrating() {
            // Another migration in flight owns it (the kernel skips pages under migration).
            i += 1;
            continue;
        }
        match pte.state() {
            PageState::None if args.flags & SELECT_SYSTEM != 0 && !is_file => {
                let all_none = unit_here
                    && large_vma
                    && v.ptes[vi..vi + PAGES_PER_LARGE]
                        .iter()
                        .all(|p| p.state() == PageState::None && !p.migrating());
                if compound && all_none {
                    src[i] = MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND | wbit;
                    cpages += PAGES_PER_LARGE;
                    i += PAGES_PER_LARGE;
                    continue;
                }
                src[i] = MIGRATE_PFN_MIGRATE | wbit;
                cpages += 1;
            }
            PageState::Present
                if args.flags & SELECT_SYSTEM != 0 && !pte.is_coherent() && readable =>
            {
                if pte.large() {
                    // Whole only if every page of the unit is still a present, large system page
                    // (a unit is split by any partial operation; check rather than trust it).
                    let whole = unit_here
                        && compound
                        && v.ptes[vi..vi + PAGES_PER_LARGE].iter().all(|p| {
                            p.state() == PageState::Present
                                && p.large()
                                && !p.is_coherent()
                                && !p.pinned()
                                && !p.migrating()
                        });
                    if whole {
                        src[i] = migrate_pfn(PageTarget::System(a.page()))
                            | MIGRATE_PFN_MIGRATE
                            | MIGRATE_PFN_COMPOUND
                            | wbit;
                        for k in 0..PAGES_PER_LARGE {
                            protected[i + k] = true;
                        }
                        cpages += PAGES_PER_LARGE;
                        i += PAGES_PER_LARGE;
                        continue;
                    }
                    core.split_unit(&mut st, a);
                }
                let pte = st.pte(a).expect("mapped");
                src[i] = migrate_pfn(PageTarget::System(a.page())) | wbit;
                if !pte.pinned() {
                    src[i] |= MIGRATE_PFN_MIGRATE;
                    protected[i] = true;
                    cpages += 1;
                }
            }
            // A device-private page, or a present page resident in device-coherent memory.
            PageState::Device | PageState::Present
                if pte.state() == PageState::Device || (pte.is_coherent() && readable) =>
            {
                let coherent = pte.is_coherent();
                let pm = st.pagemap(pte.pagemap());
                let sel = match pm.kind() {
                    MemoryKind::Private => args.flags & SELECT_DEVICE_PRIVATE != 0,
                    MemoryKind::Coherent => args.flags & SELECT_DEVICE_COHERENT != 0,
                    MemoryKind::System => false,
                };
                if sel && pm.owner() == args.pgmap_owner {
                    if pte.large() {
                        // Whole only if the unit's 512 entries name 512 consecutive frames of
                        // the same pagemap, none pinned.
                        // (`unit_here` first: it is what keeps the slice in bounds.)
                        let whole = unit_here
                            && compound
                            && v.ptes[vi..vi + PAGES_PER_LARGE]
                                .iter()
                                .enumerate()
                                .all(|(k, p)| {
                                    p.device_frame()
                                        == Some((
                                            pte.pagemap(),
                                            FrameIdx(pte.frame().0 + k as u32),
                                            true,
                                        ))
                                        && p.state() == pte.state()
                                        && !p.pinned()
                                        && !p.migrating()
                                });
                        if whole {
                            src[i] = migrate_pfn(PageTarget::Device {
                                pagemap: pm.id(),
                                frame: pte.frame(),
                            }) | MIGRATE_PFN_MIGRATE
                                | MIGRATE_PFN_COMPOUND
                                | wbit;
                            // A coherent page is mapped by the CPU: protect it while it moves.
                            protected[i..i + PAGES_PER_LARGE].fill(coherent);
                            cpages += PAGES_PER_LARGE;
                            i += PAGES_PER_LARGE;
                            continue;
                        }
                        core.split_unit(&mut st, a);
                    }
                    let pte = st.pte(a).expect("mapped");
                    src[i] = migrate_pfn(PageTarget::Device {
                        pagemap: pm.id(),
                        frame: pte.frame(),
                    }) | wbit;
                    if !pte.pinned() {
                        src[i] |= MIGRATE_PFN_MIGRATE;
                        protected[i] = coherent;
                        cpages += 1;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    drop(st);
    let mut mig = MigrateVma {
        core,
        active: true,
        id,
        marked,
        start: r.start,
        end: r.end,
        src,
        dst: vec![0; n],
        cpages,
        mode,
        protected,
        aborted: false,
        _fork_gate: fork_gate,
    };
    // Write-protect the system pages that may move, in runs: one ioctl (one TLB flush) per run.
    // A store to one of them from now on faults and waits for the migration (a store before
    // this landed before the driver's copy, which starts after setup returns).
    if writable {
        for (s, e) in runs(&mig.protected) {
            let wr = VaRange {
                start: r.start.add(s * PAGE_SIZE),
                end: r.start.add(e * PAGE_SIZE),
            };
            if let Err(err) = core.mm.write_protect(wr, true, mode) {
                // Undo: every page is declined, and finalize removes the protection of every
                // selected page (removing none that was not set is harmless).
                mig.aborted = true;
                drop(mig);
                return Err(Error::uffd("write-protect for migration", err, wr.start));
            }
        }
    }
    Ok(mig)
}

/// A driver's mapping of committed pages ([`MigrateVma::finalize_and_map`]): called with a
/// chunk's first address and its `src` and `dst` words.
pub type MapCommitted<'m> = dyn FnMut(VirtAddr, &[u64], &[u64]) + 'm;

/// Pages a migration selects, or commits, in one hold of the address space's lock: a hold is
/// then a few microseconds, and a fault on another page of the space waits at most that long.
/// (A 2 MiB unit is selected and committed whole, in one hold.) Under the schedule explorer one
/// page: every page boundary of a migration is then a point where a fault may come in.
const CHUNK_PAGES: usize = if cfg!(test) { 1 } else { 64 };

/// The end of a setup chunk, slots `from..to` of the migration over `r` selected: runs the
/// interval notifiers (MIGRATE, with the initiator as owner) over the chunk's pages and marks
/// those that may move MIGRATING (the kernel's migration entries), in the hold that selected
/// them. From then on a CPU fault on one waits for the migration, a device fault on one gets
/// EBUSY. A zero page's mark goes: it is a private page from then on.
#[allow(clippy::too_many_arguments)]
fn mark_chunk(
    core: &SpaceCore,
    st: &mut SpaceState,
    r: VaRange,
    from: usize,
    to: usize,
    src: &[u64],
    marked: &mut [bool],
    owner: Owner,
) {
    if from >= to {
        return;
    }
    let cr = VaRange {
        start: r.start.add(from * PAGE_SIZE),
        end: r.start.add(to * PAGE_SIZE),
    };
    core.invalidate(st, cr, NotifyEvent::Migrate, Some(owner));
    // The range lies in one mapping (checked at setup, kept by the claim): mark in place.
    let v = st.vma_mut(r.start).expect("a claimed range is mapped");
    let base = v.idx(r.start);
    let mut i = from;
    while i < to {
        let span = if src[i] & MIGRATE_PFN_COMPOUND != 0 {
            PAGES_PER_LARGE
        } else {
            1
        };
        if src[i] & MIGRATE_PFN_MIGRATE != 0 {
            for (p, m) in v.ptes[base + i..base + i + span]
                .iter_mut()
                .zip(&mut marked[i..i + span])
            {
                // A zero page leaves the mark behind: a migration that declines it removes its
                // write protection, and it is a private page from then on.
                *p = p.with_migrating(true).without_zero();
                *m = true;
            }
        }
        i += span;
    }
}

/// A run of migrated slots being gathered into one trace event.
#[derive(Default)]
struct TraceRun {
    /// Direction and device of the run; `None` when no run is open.
    key: Option<(Direction, Owner)>,
    start: Option<VirtAddr>,
    /// Slot one past the run's end, and its length in pages.
    end_slot: usize,
    pages: usize,
}

impl TraceRun {
    /// Adds slot `i` (`span` pages at `a`) moving `key`, flushing the open run if this one does
    /// not continue it.
    fn add(
        &mut self,
        st: &SpaceState,
        space: u16,
        key: (Direction, Owner),
        a: VirtAddr,
        i: usize,
        span: usize,
    ) {
        if st.trace.is_none() {
            return;
        }
        if self.key != Some(key) || self.end_slot != i {
            self.flush(st, space);
            self.key = Some(key);
            self.start = Some(a);
        }
        self.end_slot = i + span;
        self.pages += span;
    }

    fn flush(&mut self, st: &SpaceState, space: u16) {
        if let (Some((dir, owner)), Some(start)) = (self.key.take(), self.start.take()) {
            let pages = std::mem::take(&mut self.pages);
            st.trace_with(|| {
                TraceEvent::moved(EventKind::Migrate, dir, space, start, pages, owner)
            });
        }
    }
}

/// Maximal runs of `true` in `v`, as index ranges.
fn runs(v: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if v[i] {
            let s = i;
            while i < v.len() && v[i] {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

impl MigrateVma<'_> {
    /// Number of page slots.
    pub fn npages(&self) -> usize {
        self.src.len()
    }

    /// The address of slot `i`.
    pub fn addr(&self, i: usize) -> VirtAddr {
        self.start.add(i * PAGE_SIZE)
    }

    /// The address space's state lock (a migration holds it only in setup and finalize).
    fn lock(&self) -> Guard<'_, SpaceState> {
        self.core.lock_state()
    }

    /// Splits the compound source entry at `i` into base entries (the driver could not get a
    /// large destination): the 2 MiB unit becomes 512 base pages, each still migrating.
    pub fn split(&mut self, i: usize) {
        let w = self.src[i];
        if w & MIGRATE_PFN_COMPOUND == 0 {
            return;
        }
        let a = self.addr(i);
        let core = self.core;
        core.split_unit(&mut self.core.lock_state(), a);
        let flags = w & (MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE);
        for k in 0..PAGES_PER_LARGE {
            self.src[i + k] = match migrate_pfn_target(w) {
                None => flags,
                Some(PageTarget::System(v)) => {
                    migrate_pfn(PageTarget::System(crate::addr::Vpn(v.0 + k))) | flags
                }
                Some(PageTarget::Device { pagemap, frame }) => {
                    migrate_pfn(PageTarget::Device {
                        pagemap,
                        frame: FrameIdx(frame.0 + k as u32),
                    }) | flags
                }
                Some(PageTarget::Stash(_)) => 0,
            };
        }
    }

    /// The driver's copy: fills frame(s) `frame..` of `pm` with the data of source slot `i` (a
    /// whole 2 MiB unit for a compound entry; zeros for a hole).
    ///
    /// For a device-coherent destination this copies nothing: the CPU page is the coherent
    /// frame, and `finalize` places the data there (it is already there for a system page).
    pub fn copy_to_frame(&self, i: usize, pm: &Pagemap, frame: FrameIdx) -> Result<()> {
        let w = self.src[i];
        let len = if w & MIGRATE_PFN_COMPOUND != 0 {
            PAGES_PER_LARGE * PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        // A real device copies in both cases: charge the link model.
        pm.charge_migration(len);
        if pm.kind() == MemoryKind::Coherent {
            return Ok(());
        }
        let src_pm = match migrate_pfn_target(w) {
            Some(PageTarget::Device { pagemap, .. }) => Some(self.lock().pagemap(pagemap)),
            _ => None,
        };
        // The copy runs without the state lock (the source pages are marked MIGRATING and
        // write-protected: they cannot change or go away), except when it needs the space's
        // bounce buffer (a device the CPU cannot address), which is used under that lock.
        let needs_bounce = pm.store().host_view().is_none()
            || src_pm
                .as_ref()
                .is_some_and(|s| s.store().host_view().is_none());
        let _bounce = needs_bounce.then(|| self.lock());
        match migrate_pfn_target(w) {
            None => pm
                .store()
                .zero(frame.offset(), len)
                .map_err(|e| Error::os("clear frame", e)),
            Some(PageTarget::System(v)) => self
                .core
                .copy_into_frames(v.addr(), pm, frame.offset(), len)
                .map_err(|e| Error::os("device copy", e)),
            Some(PageTarget::Device { frame: sf, .. }) => {
                let spm = src_pm.expect("a device source's pagemap");
                if spm.kind() == MemoryKind::Coherent {
                    // A coherent page's bytes are in the CPU page (write-protected by setup).
                    return self
                        .core
                        .copy_into_frames(self.addr(i), pm, frame.offset(), len)
                        .map_err(|e| Error::os("device copy", e));
                }
                self.core
                    .copy_between_frames(&spm, sf.offset(), pm, frame.offset(), len)
                    .map_err(|e| Error::os("device copy", e))
            }
            Some(PageTarget::Stash(_)) => Err(Error::Invalid("stash pages do not migrate")),
        }
    }

    /// Phase 3a, commit: pages whose `dst` is 0 (declined) stop migrating; destinations are
    /// checked (a device destination must be a frame of a known pagemap; a system destination
    /// must be the page's own address, and only for device sources; a compound destination
    /// needs a compound source).
    pub fn pages(&mut self) {
        let registered: Vec<bool> = {
            let st = self.lock();
            st.pagemaps.iter().map(|p| p.is_some()).collect()
        };
        for i in 0..self.src.len() {
            if self.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                continue;
            }
            let ok = match migrate_pfn_target(self.dst[i]) {
                None => false,
                Some(PageTarget::Device { pagemap, .. }) => {
                    // A compound source needs a compound destination (the driver splits the
                    // source first if it cannot get one), and vice versa.
                    (self.dst[i] & MIGRATE_PFN_COMPOUND != 0)
                        == (self.src[i] & MIGRATE_PFN_COMPOUND != 0)
                        && registered[pagemap.0 as usize]
                }
                Some(PageTarget::System(v)) => {
                    v == self.addr(i).page()
                        && matches!(
                            migrate_pfn_target(self.src[i]),
                            Some(PageTarget::Device { .. })
                        )
                }
                Some(PageTarget::Stash(_)) => false,
            };
            if !ok {
                self.src[i] &= !MIGRATE_PFN_MIGRATE;
            }
        }
    }

    /// The address space's placement policy (read under the lock this migration holds).
    pub(crate) fn policy(&self) -> std::sync::Arc<dyn crate::policy::Policy> {
        self.lock().policy.clone()
    }

    /// Device memory is full: evicts one page (or 2 MiB unit) of this address space from `pm`
    /// back to system memory, under the lock this migration holds — the first frame from frame
    /// `from` on (round robin) that backs a page of this space outside this migration's range.
    /// Returns the frame after the victim (the device's next clock hand) and the pages moved,
    /// or `None` if no frame qualifies. Pages of other spaces are never touched: their locks
    /// are not ours to take here (two migrations doing so could deadlock).
    pub(crate) fn evict_one(&mut self, pm: &Pagemap, from: usize) -> Option<(usize, usize)> {
        let n = pm.nframes();
        let (lo, hi) = (self.start.page().0, self.end.page().0);
        let core = self.core;
        let mut st = self.lock();
        let st = &mut *st;
        for k in 0..n {
            let f = (from + k) % n;
            let frame = FrameIdx(f as u32);
            let Some(crate::pool::FrameOwner::Anon { space: sid, vpn }) = pm.rmap(frame) else {
                continue;
            };
            if sid != core.id || (lo..hi).contains(&vpn) {
                continue;
            }
            if let Ok(moved) = core.evict_frame_locked(st, pm, frame, vpn)
                && moved > 0
            {
                return Some(((f + 1) % n, moved));
            }
        }
        None
    }

    /// Registers `pm` with the address space so that its frames can be named by page entries
    /// (drivers call this before setting device destinations).
    pub fn use_pagemap(&mut self, pm: &Arc<Pagemap>) {
        let core = self.core;
        core.add_pagemap(&mut self.lock(), pm);
    }

    /// Phase 3b: restore or complete every page and release the address space. Returns the
    /// final `src` and `dst` words: a page migrated iff its `src` still has `MIGRATE` (finalize
    /// itself declines a page it could not complete).
    pub fn finalize(mut self) -> (Vec<u64>, Vec<u64>) {
        self.finish(None);
        (std::mem::take(&mut self.src), std::mem::take(&mut self.dst))
    }

    /// [`Self::finalize`] with the driver's device mapping in it, as dmirror's
    /// `dmirror_migrate_finalize_and_map` maps the new pages before `migrate_vma_finalize`:
    /// `map(start, src, dst)` is called once per committed chunk, under the address space's
    /// lock, while the chunk's pages are still marked MIGRATING, with the chunk's first address
    /// and its slots (a slot whose `src` word still has [`MIGRATE_PFN_MIGRATE`] moved to its
    /// `dst`). No CPU fault or invalidation can come between the commit and the mapping, so the
    /// driver needs no sequence check, and an invalidation of another part of the space (a CPU
    /// fault elsewhere) no longer stops the mapping. `map` may take the device's page-table
    /// lock (it ranks after the address space's); it must not allocate on behalf of faults or
    /// take the address space's lock.
    pub fn finalize_and_map(mut self, map: &mut MapCommitted<'_>) -> (Vec<u64>, Vec<u64>) {
        self.finish(Some(map));
        (std::mem::take(&mut self.src), std::mem::take(&mut self.dst))
    }

    /// Phase 3b, in three passes. The first two run without the address space's lock: the pages
    /// are still this migration's (marked MIGRATING, the range claimed), so CPU faults on them
    /// wait, device faults on them get EBUSY and operations over the range wait, while the rest
    /// of the space is served.
    ///
    /// 1. drop from the CPU view the system (and coherent) pages going to device-private memory,
    ///    in runs; a run that cannot be dropped (e.g. `MADV_DONTNEED` refused on mlocked memory)
    ///    is declined: its bytes stay where they are;
    /// 2. place in the CPU view the data of pages leaving device-private memory for system or
    ///    coherent memory, and the zeros of holes going to coherent memory (one `UFFDIO_COPY`
    ///    per page or unit); a failure declines the page (a device the CPU cannot address copies
    ///    through the space's bounce buffer, under the lock that guards it);
    /// 3. under the lock: commit every page still migrating (page entries point at their new
    ///    frames, old frames are freed); declined pages: device mappings of them are invalidated
    ///    (a driver may have mapped the destination already), their destination frames freed,
    ///    their write protection removed; the MIGRATING marks are cleared and the migration
    ///    leaves the space's list. Waiters are woken once the lock is released.
    fn finish(&mut self, mut map: Option<&mut MapCommitted<'_>>) {
        if !self.active {
            return;
        }
        self.active = false;
        // Commit checks again (idempotent): a driver that skipped `pages()`, or left a `dst`
        // unset, declines those pages.
        self.pages();
        let core = self.core;
        let n = self.src.len();
        // The pagemaps the words name, read once: a pagemap named by a page of this migration
        // stays registered, and the snapshot keeps each alive without the lock.
        let pms: Vec<Option<Arc<Pagemap>>> = core.lock_state().pagemaps.clone();
        let pm_of = |w: u64| match migrate_pfn_target(w) {
            Some(PageTarget::Device { pagemap, .. }) => {
                pms.get(pagemap.0 as usize).and_then(|p| p.as_ref())
            }
            _ => None,
        };
        let kind_of = |w: u64| pm_of(w).map(|p| p.kind());
        let span_of = |w: u64| {
            if w & MIGRATE_PFN_COMPOUND != 0 {
                PAGES_PER_LARGE
            } else {
                1
            }
        };
        // Pass 1 (no lock).
        let mut to_zap = vec![false; n];
        let mut i = 0;
        while i < n {
            let w = self.src[i];
            let span = span_of(w);
            if w & MIGRATE_PFN_MIGRATE != 0 && kind_of(self.dst[i]) == Some(MemoryKind::Private) {
                to_zap[i..i + span].copy_from_slice(&self.protected[i..i + span]);
            }
            i += span;
        }
        let mut declined = vec![self.aborted; n];
        if self.aborted {
            to_zap.fill(false);
        }
        for (s, e) in runs(&to_zap) {
            let r = VaRange {
                start: self.start.add(s * PAGE_SIZE),
                end: self.start.add(e * PAGE_SIZE),
            };
            // Dropping the pages also drops their write protection; a writer blocked on it
            // faults again, now on a missing page, waits for this migration, and gets the data
            // back from the device.
            if core.mm.zap(r).is_ok() {
                core.mm.wake(r, self.mode);
                continue;
            }
            // The run failed (part of it may be dropped already, e.g. a run across an mlocked
            // VMA): page by page, so that exactly the pages that could not be dropped are
            // declined (dropping an already dropped page succeeds again).
            for (p, d) in declined.iter_mut().enumerate().take(e).skip(s) {
                let pr = VaRange {
                    start: self.start.add(p * PAGE_SIZE),
                    end: self.start.add((p + 1) * PAGE_SIZE),
                };
                if core.mm.zap(pr).is_ok() {
                    core.mm.wake(pr, self.mode);
                } else {
                    *d = true;
                }
            }
        }
        // A compound entry moves whole: any of its pages declined declines it.
        let mut i = 0;
        while i < n {
            let span = span_of(self.src[i]);
            if span > 1 && declined[i..i + span].iter().any(|&d| d) {
                declined[i] = true;
            }
            i += span;
        }
        // Pass 2 (no lock). What each slot places in the CPU view: a hole going to coherent
        // memory its zeros, a page leaving device-private memory its frame's bytes.
        enum Place<'p> {
            Zeros,
            Frame(&'p Arc<Pagemap>, FrameIdx),
        }
        let mut plan: Vec<(usize, usize, Place<'_>)> = Vec::new();
        let mut i = 0;
        while i < n {
            let w = self.src[i];
            let span = span_of(w);
            if w & MIGRATE_PFN_MIGRATE == 0 || declined[i] {
                i += span;
                continue;
            }
            let src_pm = pm_of(w).filter(|p| p.kind() == MemoryKind::Private);
            let hole = migrate_pfn_target(w).is_none();
            let place = match (
                migrate_pfn_target(self.dst[i]),
                src_pm,
                migrate_pfn_target(w),
            ) {
                // Into device-coherent memory the CPU page is the frame: a hole is zero-filled,
                // a private device page copied back (a system or coherent page is already
                // there); the page stays mapped.
                (Some(PageTarget::Device { .. }), _, _)
                    if kind_of(self.dst[i]) == Some(MemoryKind::Coherent) && hole =>
                {
                    Some(Place::Zeros)
                }
                (
                    Some(PageTarget::Device { .. }),
                    Some(spm),
                    Some(PageTarget::Device { frame, .. }),
                ) if kind_of(self.dst[i]) == Some(MemoryKind::Coherent) => {
                    Some(Place::Frame(spm, frame))
                }
                (
                    Some(PageTarget::System(_)),
                    Some(spm),
                    Some(PageTarget::Device { frame, .. }),
                ) => {
                    spm.charge_migration(span * PAGE_SIZE);
                    Some(Place::Frame(spm, frame))
                }
                _ => None,
            };
            if let Some(p) = place {
                plan.push((i, span, p));
            }
            i += span;
        }
        // Consecutive slots whose bytes are consecutive frames of one device are placed with one
        // `UFFDIO_COPY` (a page already present, installed by nothing else, is ours: `fill`
        // steps over it). A run that fails is placed again slot by slot, so that exactly the
        // slots that cannot be placed are declined.
        let mut k = 0;
        while k < plan.len() {
            let (first, _, ref p0) = plan[k];
            let mut end = k + 1;
            if let Place::Frame(pm0, f0) = p0 {
                while end < plan.len() {
                    let (j, _, ref pj) = plan[end];
                    let (pj_start, _, _) = plan[end - 1];
                    let contiguous = j == pj_start + plan[end - 1].1;
                    match pj {
                        Place::Frame(pm, f)
                            if contiguous
                                && Arc::ptr_eq(pm, pm0)
                                && f.0 as usize == f0.0 as usize + (j - first) =>
                        {
                            end += 1
                        }
                        _ => break,
                    }
                }
            }
            let (last, last_span, _) = plan[end - 1];
            let (a, len) = (self.addr(first), (last + last_span - first) * PAGE_SIZE);
            let placed = match p0 {
                Place::Zeros => core.mm.install(a, &core.zero, 0, len, self.mode),
                Place::Frame(pm, f) => self.install_unlocked(pm, *f, a, len),
            };
            if placed.is_err() {
                // Drop whatever part of the run the failed install filled; then slot by slot:
                // a slot that fails again stays where it was (its frame too), and finalize
                // reports it as not migrated.
                let _ = core.mm.zap(VaRange {
                    start: a,
                    end: a.add(len),
                });
                for (j, span, p) in &plan[k..end] {
                    let (aj, lj) = (self.addr(*j), span * PAGE_SIZE);
                    let again = match p {
                        Place::Zeros => core.mm.install(aj, &core.zero, 0, lj, self.mode),
                        Place::Frame(pm, f) => self.install_unlocked(pm, *f, aj, lj),
                    };
                    if again.is_err() {
                        let _ = core.mm.zap(VaRange {
                            start: aj,
                            end: aj.add(lj),
                        });
                        declined[*j] = true;
                    }
                }
            }
            k = end;
        }
        // Write protection comes off the pages that stay in (or went to) the CPU view now,
        // while every page of the migration is still marked: no other migration can select and
        // protect one of them again meanwhile, so this cannot undo its protection. In a mapping
        // that is not writable setup protected nothing, but a zero page there is protected
        // (mapped so) and must come off too: the removal runs whatever the permissions.
        let mut unprotect = vec![false; n];
        let mut i = 0;
        while i < n {
            let w = self.src[i];
            let span = span_of(w);
            let migrated = w & MIGRATE_PFN_MIGRATE != 0 && !declined[i];
            if !migrated || kind_of(self.dst[i]) != Some(MemoryKind::Private) {
                unprotect[i..i + span].copy_from_slice(&self.protected[i..i + span]);
            }
            i += span;
        }
        for (s, e) in runs(&unprotect) {
            let r = VaRange {
                start: self.start.add(s * PAGE_SIZE),
                end: self.start.add(e * PAGE_SIZE),
            };
            let _ = core.mm.write_protect(r, false, self.mode);
        }
        // Pages that went into device-private memory from the CPU view (dropped above, or
        // holes) are marked where the space shows them in pagemap (`Mm::mark_device_private`).
        let mut to_mark = vec![false; n];
        let mut i = 0;
        while i < n {
            let w = self.src[i];
            let span = span_of(w);
            if w & MIGRATE_PFN_MIGRATE != 0
                && !declined[i]
                && kind_of(self.dst[i]) == Some(MemoryKind::Private)
                && kind_of(w) != Some(MemoryKind::Private)
            {
                to_mark[i..i + span].fill(true);
            }
            i += span;
        }
        for (s, e) in runs(&to_mark) {
            core.mm.mark_device_private(
                VaRange {
                    start: self.start.add(s * PAGE_SIZE),
                    end: self.start.add(e * PAGE_SIZE),
                },
                self.mode,
            );
        }
        // Pass 3 (under the lock, in chunks of `CHUNK_PAGES`): a page's entry is committed and
        // its mark cleared in one hold. A page of a later chunk stays marked until its own hold
        // (its CPU page may be dropped already: a fault on it waits for this migration rather
        // than finding a stale entry over a missing page). The range is still one mapping:
        // operations that split or unmap it wait for the claim, released in the last hold.
        // Pages moved are traced in runs: consecutive slots moving the same way to or from the
        // same device make one event.
        let mut run = TraceRun::default();
        // Old frames, and destinations of declined pages, freed once the lock is released
        // (nothing names them any more).
        let mut to_free = Vec::new();
        let mut st = core.lock_state();
        let mut chunk_start = 0;
        let mut i = 0;
        while i < n {
            if i >= chunk_start + CHUNK_PAGES {
                if let Some(map) = map.as_mut() {
                    map(
                        self.addr(chunk_start),
                        &self.src[chunk_start..i],
                        &self.dst[chunk_start..i],
                    );
                }
                self.unmark(&mut st, chunk_start, i);
                drop(st);
                st = core.lock_state();
                chunk_start = i;
            }
            let w = self.src[i];
            let a = self.addr(i);
            let compound = w & MIGRATE_PFN_COMPOUND != 0;
            let span = span_of(w);
            if w & MIGRATE_PFN_MIGRATE == 0 {
                i += span;
                continue;
            }
            if declined[i] {
                // A driver may have mapped the destination already: drop that mapping before
                // the frame is freed.
                if let (Some(PageTarget::Device { frame, .. }), Some(dpm)) =
                    (migrate_pfn_target(self.dst[i]), pm_of(self.dst[i]))
                {
                    let r = VaRange {
                        start: a,
                        end: self.addr(i + span),
                    };
                    core.invalidate(&st, r, NotifyEvent::Migrate, None);
                    to_free.push((dpm, frame, self.dst[i] & MIGRATE_PFN_COMPOUND != 0));
                }
                self.src[i] &= !MIGRATE_PFN_MIGRATE;
                i += span;
                continue;
            }
            // Which way this slot moves, and which device's memory it leaves or enters
            // (looked up only when tracing).
            let moving = match (st.trace.is_some(), migrate_pfn_target(self.dst[i])) {
                (false, _) => (Direction::None, Owner(0)),
                (true, Some(PageTarget::Device { pagemap, .. })) => {
                    (Direction::ToDevice, st.pagemap(pagemap).owner())
                }
                (true, _) => match migrate_pfn_target(w) {
                    Some(PageTarget::Device { pagemap, .. }) => {
                        (Direction::ToSystem, st.pagemap(pagemap).owner())
                    }
                    _ => (Direction::None, Owner(0)),
                },
            };
            let dst =
                migrate_pfn_target(self.dst[i]).expect("pages() kept only valid destinations");
            let src = migrate_pfn_target(w);
            let src_pm = pm_of(w);
            let src_coherent = src_pm
                .as_ref()
                .is_some_and(|p| p.kind() == MemoryKind::Coherent);
            match dst {
                PageTarget::Device { pagemap, frame } => {
                    // The snapshot's pagemap (no reference count taken in the hold), and the
                    // slot's entries found once (the range is one mapping, kept by the claim).
                    let pm = pm_of(self.dst[i]).expect("pages() kept only known destinations");
                    let dcompound = self.dst[i] & MIGRATE_PFN_COMPOUND != 0;
                    let coherent = pm.kind() == MemoryKind::Coherent;
                    let v = st.vma_mut(a).expect("a claimed range is mapped");
                    let base = v.idx(a);
                    for k in 0..span {
                        let ak = a.add(k * PAGE_SIZE);
                        let f = FrameIdx(frame.0 + k as u32);
                        let entry = if coherent {
                            Pte::coherent(pagemap, f, dcompound, v.ptes[base + k])
                        } else {
                            Pte::device(pagemap, f, dcompound)
                        };
                        v.ptes[base + k] = entry;
                        pm.set_rmap(
                            f,
                            crate::pool::FrameOwner::Anon {
                                space: core.id,
                                vpn: ak.page().0,
                            },
                        );
                    }
                    match (src, src_pm) {
                        (Some(PageTarget::Device { frame: sf, .. }), Some(spm)) => {
                            to_free.push((spm, sf, compound))
                        }
                        _ => {
                            core.counters
                                .pages_to_device
                                .fetch_add(span as u64, Ordering::Relaxed);
                        }
                    }
                }
                PageTarget::System(_) => {
                    // Out of device-coherent memory the bytes are already in the CPU page; out
                    // of device-private memory pass 2 placed them there.
                    let Some(PageTarget::Device { frame, .. }) = src else {
                        unreachable!("pages() allows system destinations for device sources only")
                    };
                    let v = st.vma_mut(a).expect("a claimed range is mapped");
                    let base = v.idx(a);
                    for p in &mut v.ptes[base..base + span] {
                        *p = Pte::present(compound, *p);
                    }
                    let spm = src_pm.expect("device source");
                    if src_coherent {
                        spm.charge_migration(span * PAGE_SIZE);
                    }
                    to_free.push((spm, frame, compound));
                    core.counters
                        .pages_to_system
                        .fetch_add(span as u64, Ordering::Relaxed);
                }
                PageTarget::Stash(_) => unreachable!("pages() rejects stash destinations"),
            }
            run.add(&st, core.id, moving, a, i, span);
            i += span;
        }
        if let Some(map) = map.as_mut()
            && chunk_start < n
        {
            map(
                self.addr(chunk_start),
                &self.src[chunk_start..n],
                &self.dst[chunk_start..n],
            );
        }
        self.unmark(&mut st, chunk_start, n);
        run.flush(&st, core.id);
        st.release_claim(self.id);
        drop(st);
        core.notify_migrations_done();
        debug_event!(
            space = core.id,
            start = %self.start,
            pages = n,
            migrated = self
                .src
                .iter()
                .filter(|w| **w & MIGRATE_PFN_MIGRATE != 0)
                .count(),
            aborted = self.aborted,
            "migration finalized"
        );
        for (pm, frame, large) in to_free {
            pm.free(frame, large);
        }
    }

    /// Clears the MIGRATING marks this migration set on slots `from..to` (a committed page's
    /// new entry carries none already).
    fn unmark(&self, st: &mut SpaceState, from: usize, to: usize) {
        if let Some(v) = st.vma_mut(self.start) {
            let base = v.idx(self.start);
            for k in from..to {
                if self.marked[k] {
                    v.ptes[base + k] = v.ptes[base + k].with_migrating(false);
                }
            }
        }
    }

    /// Copies `len` bytes of device frame(s) `frame..` of `pm` into the CPU view at `a` for
    /// [`Self::finish`]'s pass 2: without the state lock when the CPU can address the device's
    /// memory, else under it (the bounce buffer is the space's).
    fn install_unlocked(
        &self,
        pm: &Pagemap,
        frame: FrameIdx,
        a: VirtAddr,
        len: usize,
    ) -> std::result::Result<(), crate::sys::UffdError> {
        let _bounce = pm.store().host_view().is_none().then(|| self.lock());
        self.core
            .install_from_frame(a, pm, frame.offset(), len, self.mode, false)
    }

    /// The current sequence of notifier `n`, read while this migration holds the address
    /// space's lock (so no invalidation is in progress): a driver that maps the migrated pages
    /// after `finalize` checks `n.read_retry` against it first, as after `read_begin`.
    pub fn notifier_seq(&self, n: &crate::hmm::IntervalNotifier) -> u64 {
        // Under the lock: no invalidation is in progress while the sequence is read.
        let _st = self.lock();
        n.current_seq()
    }
}

impl Drop for MigrateVma<'_> {
    fn drop(&mut self) {
        if self.active {
            // Every page is declined, and the destinations the driver set are freed.
            self.aborted = true;
            self.finish(None);
        }
    }
}
