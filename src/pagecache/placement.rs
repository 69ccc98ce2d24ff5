//! File pages in device memory (docs/filesystem-contract.md, "placements").
//!
//! A cached page lives in the memfd (the CPU's view, mapped by every mapping of the file), and
//! may also be placed in a device's memory:
//!
//! | placement | memfd | device frame | CPU access | device access |
//! |---|---|---|---|---|
//! | system (mirror only) | the data | — | mapped | mirrors the memfd page |
//! | device-private | a hole | the only copy | faults in every mapping, in every space, and brings the page back into the memfd | the owner maps the frame; another device's fault brings it back first |
//! | device-coherent | the data (the memfd page *is* the frame, charged to the device, as for anonymous coherent pages) | charged | mapped in place | any device maps the frame (local to its owner, remote to others) |
//!
//! The page's cache state (clean or dirty against the file) stays what it was: a device write
//! to a private page sets the frame's DIRTY bit, which writeback reads and clears
//! ([`FileCache::collect_device_dirty`]); writeback and `fsync` read a private page's bytes from
//! the frame without moving it. Truncate, hole punch and direct write drop a placed page's
//! frame without writing it (after the two-phase invalidation every removal does); eviction of
//! a clean placed page drops it (a dirty one is written back first); `write_at` brings the pages
//! it writes back first; a long-term pin brings a page back (and releases a coherent one).
//!
//! Placing a page and bringing it back are removals in the sense of the contract: they run in
//! its two phases (block the pages and invalidate every device mapping of them with no cache
//! lock held, then act under the cache lock), so a device never holds a mapping of a page
//! whose bytes are moving. A CPU store cannot be held off in a writable shared mapping that does
//! not intercept stores (the kernel resolves the write-protect fault itself), so such pages do
//! not go to device-private memory ([`Error::StoresNotIntercepted`]); in mappings that intercept
//! stores the pages are write-protected first, and a store waits for the move.

use super::state::DevSlot;
use super::*;
use crate::addr::FrameIdx;
use crate::pool::{FrameOwner, MemoryKind, Owner, Pagemap, PagemapId};

/// Where a file page is (see [`FileCache::placement`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagePlacement {
    /// Not in the cache (on disk only).
    Uncached,
    /// In system memory (the memfd); devices may mirror it.
    System,
    /// In device-private memory of the device `owner`: the frame is the only copy.
    DevicePrivate {
        /// The device.
        owner: Owner,
    },
    /// In device-coherent memory of the device `owner`: mapped by the CPU in place.
    DeviceCoherent {
        /// The device.
        owner: Owner,
    },
}

/// A file page placed in device memory, as `range_fault` reports it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DevicePage {
    pub(crate) pagemap: PagemapId,
    pub(crate) frame: FrameIdx,
    pub(crate) owner: Owner,
    pub(crate) coherent: bool,
    /// A read-only replica (the memfd keeps the data): never mapped writable.
    pub(crate) replica: bool,
}

/// Process-wide table of caches with pages in device memory, by id (the reverse map of a
/// file-owned frame names its cache by id). A leaf lock.
static CACHES: std::sync::Mutex<Vec<std::sync::Weak<FileCache>>> =
    std::sync::Mutex::new(Vec::new());

/// Locks the table of caches for a `fork()` (space module `fork`): the guard, held across it.
pub(crate) fn hold_for_fork() -> Box<dyn std::any::Any> {
    Box::new(CACHES.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The cache with id `id`, if it is still alive.
pub(crate) fn cache_by_id(id: u32) -> Option<std::sync::Arc<FileCache>> {
    let t = CACHES.lock().unwrap_or_else(|p| p.into_inner());
    t.get(id as usize).and_then(|w| w.upgrade())
}

impl FileCache {
    /// This cache's id in the reverse map of device frames, given at its first placement.
    fn reverse_map_id(&self) -> Result<u32> {
        let id = self.rmap_id.load(Ordering::Acquire);
        if id != 0 {
            return Ok(id);
        }
        let mut t = CACHES.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.rmap_id.load(Ordering::Acquire);
        if id != 0 {
            return Ok(id);
        }
        if t.is_empty() {
            t.push(std::sync::Weak::new());
        }
        let i = match t.iter().skip(1).position(|w| w.strong_count() == 0) {
            Some(k) => k + 1,
            None if t.len() < (1 << 24) => {
                t.push(std::sync::Weak::new());
                t.len() - 1
            }
            None => {
                return Err(Error::NoMemory {
                    what: "file cache ids",
                });
            }
        };
        t[i] = self.me.clone();
        self.rmap_id.store(i as u32, Ordering::Release);
        Ok(i as u32)
    }

    /// Where file page `page` is now.
    pub fn placement(&self, page: u64) -> PagePlacement {
        let st = lock(&self.st);
        if st.pages.get(page) == PageState::Uncached {
            return PagePlacement::Uncached;
        }
        match st.pages.slot(page) {
            None => PagePlacement::System,
            Some(s) => {
                let owner = st.devs[s.dev as usize].owner();
                if s.coherent {
                    PagePlacement::DeviceCoherent { owner }
                } else {
                    PagePlacement::DevicePrivate { owner }
                }
            }
        }
    }

    /// The device frame of file page `page`, if it is placed in device memory. EBUSY while the
    /// page is being moved or removed (its device mappings were invalidated and must not come
    /// back before the move ends: the caller waits for it, [`FileCache::wait_for_removal`],
    /// and retries).
    pub(crate) fn device_page(&self, page: u64) -> Result<Option<DevicePage>> {
        let st = lock(&self.st);
        let Some(s) = st.pages.slot(page) else {
            return Ok(None);
        };
        if st.blocked.iter().any(|&(f, l)| f <= page && page < l) {
            return Err(Error::Busy);
        }
        let pm = &st.devs[s.dev as usize];
        Ok(Some(DevicePage {
            pagemap: pm.id(),
            frame: FrameIdx(s.frame),
            owner: pm.owner(),
            coherent: s.coherent,
            replica: false,
        }))
    }

    /// Pages placed in device memory.
    pub fn device_pages(&self) -> usize {
        lock(&self.st).pages.placed
    }

    /// Read-only replicas of the file's pages in device memory, on every device together.
    pub fn replica_pages(&self) -> usize {
        lock(&self.st).replicas.values().map(Vec::len).sum()
    }

    /// Page-aligned `[off, off + len)` as file pages, clamped to the file.
    fn page_range(&self, off: u64, len: u64) -> Result<(u64, u64)> {
        if !off.is_multiple_of(PAGE) {
            return Err(Error::Invalid("file offset must be page-aligned"));
        }
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let end = off
            .checked_add(len)
            .ok_or(Error::FileRange { offset: off, len })?;
        let pages = lock(&self.st).pages.len();
        Ok((off / PAGE, end.div_ceil(PAGE).min(pages)))
    }

    /// Places file pages `[off, off + len)` (`off` page-aligned; the range is clamped to the
    /// file) in the memory of `pm`'s device: device-private or device-coherent, as the pagemap
    /// is. Uncached pages are read from the file first. Pages already placed on a device,
    /// pinned pages, and pages the device has no room for stay where they are. Returns the
    /// pages placed by this call.
    ///
    /// Errors: unaligned offset, zero length; [`Error::StoresNotIntercepted`] (device-private
    /// only) when a page lies in a writable shared mapping that does not intercept stores;
    /// [`Error::NoMemory`] when the device had room for none of them; a read error of the fill.
    pub fn place_on_device(&self, off: u64, len: u64, pm: &Arc<Pagemap>) -> Result<u64> {
        let (first, last) = self.page_range(off, len)?;
        if first >= last {
            return Ok(0);
        }
        let coherent = match pm.kind() {
            MemoryKind::Private => false,
            MemoryKind::Coherent => true,
            MemoryKind::System => return Err(Error::Invalid("not a device's memory")),
        };
        let cache_id = self.reverse_map_id()?;
        if !coherent {
            let st = lock(&self.st);
            if let Some(m) = st.mappings.iter().find(|m| {
                m.writable && !m.sync && m.pgoff < last && first < m.pgoff + m.range.pages() as u64
            }) {
                return Err(Error::StoresNotIntercepted {
                    page: m.pgoff.max(first),
                });
            }
        }
        let mut st = self.begin_removal(first, last);
        // Checked again under the removal: a mapping made meanwhile counts too.
        if !coherent
            && let Some(m) = st.mappings.iter().find(|m| {
                m.writable && !m.sync && m.pgoff < last && first < m.pgoff + m.range.pages() as u64
            })
        {
            return Err(Error::StoresNotIntercepted {
                page: m.pgoff.max(first),
            });
        }
        self.fill(&mut st, first, last)?;
        // What the CPU wrote so far is recorded, and (for a private placement) stores in the
        // mappings that intercept them fault from now on and wait for the pages to move.
        self.collect_written(&mut st);
        if !coherent {
            Self::protect_sync_mappings(&st, first, last);
        }
        let dev = Self::dev_index(&mut st, pm)? as usize;
        let mut page = vec![0u8; PAGE_SIZE];
        let mut placed = 0u64;
        let mut full = false;
        let mut copy_err = None;
        let mut moved: Vec<u64> = Vec::new();
        for p in first..last {
            if st.pages.get(p) == PageState::Uncached
                || st.pages.slot(p).is_some()
                || st.pinned.contains_key(&p)
            {
                continue;
            }
            let Ok(f) = pm.alloc() else {
                full = true;
                break;
            };
            // Its read-only replicas go (their device mappings were invalidated above): a
            // device writes a placed page in place, which would leave them stale.
            self.release_replicas(&mut st, p);
            pm.charge_migration(PAGE_SIZE);
            if !coherent {
                // The page's bytes go to the frame; the memfd page is punched below. Past the
                // end of file (a partial last page) the frame holds zeros.
                let copied = self
                    .read_memfd_page(p, &mut page)
                    .and_then(|()| pm.store().write(f.offset(), &page));
                if let Err(e) = copied {
                    pm.free(f, false);
                    copy_err = Some(Error::os("copy a file page to the device", e));
                    break;
                }
                moved.push(p);
            }
            pm.set_rmap(
                f,
                FrameOwner::File {
                    cache: cache_id,
                    index: p,
                },
            );
            st.pages.set_slot(
                p,
                Some(DevSlot {
                    coherent,
                    dev: dev as u8,
                    frame: f.0,
                }),
            );
            placed += 1;
        }
        // The private pages' memfd copies go: every CPU mapping faults on them from now on.
        for (s, e) in runs_of(&moved) {
            if let Err(err) = self.memfd.punch(s * PAGE, (e - s) * PAGE) {
                // Keep the memfd's copies (they are current): undo the placement of the run.
                for p in s..e {
                    self.release_slot(&mut st, p);
                }
                return Err(Error::os("drop the system copy of a file page", err));
            }
        }
        if let Some(e) = copy_err {
            return Err(e);
        }
        if placed == 0 && full {
            return Err(Error::NoMemory {
                what: "device memory",
            });
        }
        Ok(placed)
    }

    /// The index of `pm` in the cache's device list (added if new).
    fn dev_index(st: &mut CacheState, pm: &Arc<Pagemap>) -> Result<u8> {
        match st.devs.iter().position(|d| Arc::ptr_eq(d, pm)) {
            Some(i) => Ok(i as u8),
            None if st.devs.len() < u8::MAX as usize => {
                st.devs.push(pm.clone());
                Ok((st.devs.len() - 1) as u8)
            }
            None => Err(Error::Invalid("a file's pages are on too many devices")),
        }
    }

    /// Brings file pages `[off, off + len)` back to system memory: a device-private page's
    /// bytes go back into the memfd (dirty if it was, or if the device wrote it), a coherent
    /// page's frame is released. Returns the pages moved.
    pub fn place_in_system(&self, off: u64, len: u64) -> Result<u64> {
        let (first, last) = self.page_range(off, len)?;
        self.bring_back(first, last)
    }

    /// [`Self::place_in_system`] over file pages `first..last`.
    pub(crate) fn bring_back(&self, first: u64, last: u64) -> Result<u64> {
        self.bring_back_where(first, last, true)
    }

    /// Evicts file pages `first..last` from the devices holding them (device release or
    /// removal): a clean device-private page (the file on disk holds its bytes, the
    /// device never wrote it) leaves the cache with no copy back, and its next access reads the
    /// file again; any other placed page comes back into the memfd; replicas are dropped.
    /// Returns the pages that left device memory.
    fn evict_from_device(&self, first: u64, last: u64) -> Result<u64> {
        if first >= last {
            return Ok(0);
        }
        let mut st = self.begin_removal(first, last);
        let on_disk = self.backend.has_storage() && st.size == st.disk_size;
        self.each_placed(&mut st, first, last, &|_| true, &mut |c, st, p| {
            if let Some(s) = st.pages.slot(p).filter(|s| !s.coherent)
                && on_disk
                && st.pages.get(p) == PageState::Clean
            {
                if st.devs[s.dev as usize].take_dirty(FrameIdx(s.frame)) {
                    // The device wrote it: dirty, and it comes back below.
                    c.set_state(st, p, PageState::Dirty);
                } else {
                    // Dropped: its frame and replicas go with it (`set_state`).
                    c.set_state(st, p, PageState::Uncached);
                    st.stats.device_pages_dropped += 1;
                    return Ok(());
                }
            }
            c.restore_page(st, p)
        })
    }

    /// Runs `op` on each page of `first..last` that is placed on a device (where `wanted` says
    /// so) or replicated, in order, under the caller's removal; returns how many it did, or the
    /// first error (after trying them all).
    fn each_placed(
        &self,
        st: &mut CacheState,
        first: u64,
        last: u64,
        wanted: &dyn Fn(&DevSlot) -> bool,
        op: &mut dyn FnMut(&Self, &mut CacheState, u64) -> Result<()>,
    ) -> Result<u64> {
        let mut pages: Vec<u64> = st
            .pages
            .placed_in(first, last)
            .iter()
            .filter(|(_, s)| wanted(s))
            .map(|&(p, _)| p)
            .collect();
        pages.extend(st.replicas.range(first..last).map(|(&p, _)| p));
        pages.sort_unstable();
        pages.dedup();
        let (mut n, mut first_err) = (0, None);
        for p in pages {
            match op(self, st, p) {
                Ok(()) => n += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// What a CPU write to file pages `first..last` needs (`write_at`): its device-private pages
    /// back in the memfd and its read-only replicas dropped. Device-coherent pages stay where
    /// they are: the CPU writes them in place.
    pub(crate) fn settle_for_write(&self, first: u64, last: u64) -> Result<u64> {
        self.bring_back_where(first, last, false)
    }

    /// [`Self::bring_back`], device-coherent pages included only with `coherent_too`.
    fn bring_back_where(&self, first: u64, last: u64, coherent_too: bool) -> Result<u64> {
        let wanted = |s: &DevSlot| coherent_too || !s.coherent;
        if last == first + 1 {
            // One page (a CPU fault's): nothing allocated on this path.
            let mut st = self.begin_removal(first, last);
            if !st.pages.slot(first).is_some_and(|s| wanted(&s))
                && !st.replicas.contains_key(&first)
            {
                return Ok(0);
            }
            return self.restore_page(&mut st, first).map(|()| 1);
        }
        let any = |st: &CacheState| {
            st.pages
                .placed_in(first, last)
                .iter()
                .any(|(_, s)| wanted(s))
                || st.replicas.range(first..last).next().is_some()
        };
        if first >= last || !any(&lock(&self.st)) {
            return Ok(0);
        }
        let mut st = self.begin_removal(first, last);
        self.each_placed(&mut st, first, last, &wanted, &mut |c, st, p| {
            c.restore_page(st, p)
        })
    }

    /// Brings placed page `p` back into the memfd (a private page) or releases its frame (a
    /// coherent one), under the removal (its device mappings are invalidated).
    fn restore_page(&self, st: &mut CacheState, p: u64) -> Result<()> {
        // Replicas are copies of the memfd's data: dropped (the caller invalidated their
        // device mappings).
        self.release_replicas(st, p);
        let Some(s) = st.pages.slot(p) else {
            return Ok(());
        };
        let pm = st.devs[s.dev as usize].clone();
        let f = FrameIdx(s.frame);
        if !s.coherent {
            let mut buf = std::mem::take(&mut st.fill_buf);
            if buf.len() < PAGE_SIZE {
                buf = vec![0u8; FILL_CHUNK];
            }
            let res = pm
                .store()
                .read(f.offset(), &mut buf[..PAGE_SIZE])
                .map_err(|e| Error::os("copy a file page from the device", e))
                .and_then(|()| {
                    // Up to the end of file: the memfd keeps the file's size.
                    let n = (st.size.saturating_sub(p * PAGE) as usize).min(PAGE_SIZE);
                    self.stage(p * PAGE, &buf[..n])
                        .map_err(os("copy a file page into the cache"))
                });
            st.fill_buf = buf;
            // On failure the page stays on the device, untouched.
            res?;
            pm.charge_migration(PAGE_SIZE);
            if pm.take_dirty(f) {
                self.set_state(st, p, PageState::Dirty);
            }
        }
        st.pages.set_slot(p, None);
        pm.free(f, false);
        Ok(())
    }

    /// Page `p` is leaving the cache (truncate, punch, direct write, eviction of a clean page):
    /// its device frame, if any, is freed without being written. The removal invalidated its
    /// device mappings first.
    pub(super) fn release_slot(&self, st: &mut CacheState, p: u64) {
        if let Some(s) = st.pages.set_slot(p, None) {
            st.devs[s.dev as usize].free(FrameIdx(s.frame), false);
        }
    }

    /// Records device writes to private pages (the frames' DIRTY bits) as dirty pages: what
    /// the next writeback writes.
    pub(super) fn collect_device_dirty(&self, st: &mut CacheState) {
        if st.pages.placed == 0 {
            return;
        }
        for (p, s) in st.pages.placed_in(0, u64::MAX) {
            if !s.coherent && st.devs[s.dev as usize].take_dirty(FrameIdx(s.frame)) {
                self.set_state(st, p, PageState::Dirty);
            }
        }
    }

    /// Replaces the bytes of device-private pages in `buf` (which holds the file from byte
    /// `off` on, as read from the memfd, where those pages are holes) with the frames' bytes:
    /// writeback and reads through the cache read a private page where it is.
    pub(super) fn overlay_private(&self, st: &CacheState, off: u64, buf: &mut [u8]) -> Result<()> {
        if st.pages.placed == 0 || buf.is_empty() {
            return Ok(());
        }
        let (first, last) = (off / PAGE, (off + buf.len() as u64).div_ceil(PAGE));
        for (p, s) in st.pages.placed_in(first, last) {
            if s.coherent {
                continue;
            }
            let pm = &st.devs[s.dev as usize];
            // The part of page p inside the buffer.
            let (ps, pe) = (p * PAGE, (p + 1) * PAGE);
            let (s0, e0) = (ps.max(off), pe.min(off + buf.len() as u64));
            let dst = &mut buf[(s0 - off) as usize..(e0 - off) as usize];
            pm.store()
                .read(FrameIdx(s.frame).offset() + (s0 - ps) as usize, dst)
                .map_err(|e| Error::os("read a file page on the device", e))?;
            pm.charge_migration(dst.len());
        }
        Ok(())
    }

    /// As [`Self::overlay_private`] for `n` pages from `first` read into `dst[dst_off..]` (a
    /// region of hetmem's own; `got` bytes of them inside the file): the fill of a private file
    /// mapping, on the CPU fault path (copies frame to region, allocates nothing).
    pub(super) fn overlay_private_region(
        &self,
        st: &CacheState,
        first: u64,
        n: usize,
        dst: &crate::sys::Region,
        dst_off: usize,
        got: usize,
    ) -> Result<()> {
        if st.pages.placed == 0 {
            return Ok(());
        }
        for i in 0..n.min(got.div_ceil(PAGE_SIZE)) {
            let Some(s) = st.pages.slot(first + i as u64).filter(|s| !s.coherent) else {
                continue;
            };
            let pm = &st.devs[s.dev as usize];
            let len = (got - i * PAGE_SIZE).min(PAGE_SIZE);
            pm.store()
                .copy_out(
                    FrameIdx(s.frame).offset(),
                    dst,
                    dst_off + i * PAGE_SIZE,
                    len,
                )
                .map_err(|e| Error::os("read a file page on the device", e))?;
            pm.charge_migration(len);
        }
        Ok(())
    }

    /// Writes `bytes` at `at` in page `p`'s frame if the page is in device-private memory
    /// (returns false, writing nothing, if it is not).
    pub(super) fn write_private(
        &self,
        st: &CacheState,
        p: u64,
        at: usize,
        bytes: &[u8],
    ) -> Result<bool> {
        let Some(s) = st.pages.slot(p).filter(|s| !s.coherent) else {
            return Ok(false);
        };
        let pm = &st.devs[s.dev as usize];
        pm.store()
            .write(FrameIdx(s.frame).offset() + at, bytes)
            .map_err(|e| Error::os("update a file page on the device", e))?;
        pm.charge_migration(bytes.len());
        Ok(true)
    }

    /// Whether any page of `first..last` is placed in device-private memory.
    pub(super) fn has_private_in(st: &CacheState, first: u64, last: u64) -> bool {
        st.pages.placed > 0
            && st
                .pages
                .placed_in(first, last)
                .iter()
                .any(|(_, s)| !s.coherent)
    }

    /// Device eviction of file pages (device release or removal, with `drop_clean`; an explicit
    /// migration to system memory without): every page of this cache in `pages` that is on
    /// `pm`'s device leaves it: back into the memfd, or, with `drop_clean`, a clean
    /// device-private page out of the cache with no copy back (see `evict_from_device`).
    /// Returns the pages that left.
    pub(crate) fn evict_device_frames(
        &self,
        pm: &Pagemap,
        pages: &[u64],
        drop_clean: bool,
    ) -> Result<usize> {
        let mut n = 0;
        let mut first_err = None;
        for run in runs_of(pages) {
            // Only the pages still on this device.
            let mine: Vec<u64> = {
                let st = lock(&self.st);
                (run.0..run.1)
                    .filter(|&p| {
                        st.pages
                            .slot(p)
                            .is_some_and(|s| st.devs[s.dev as usize].id() == pm.id())
                            || st.replicas.get(&p).is_some_and(|v| {
                                v.iter().any(|&(d, _)| st.devs[d as usize].id() == pm.id())
                            })
                    })
                    .collect()
            };
            for (s, e) in runs_of(&mine) {
                let moved = if drop_clean {
                    self.evict_from_device(s, e)
                } else {
                    self.bring_back(s, e)
                };
                match moved {
                    Ok(k) => n += k as usize,
                    Err(err) => {
                        first_err.get_or_insert(err);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Frees every device frame the cache holds (the cache is going away: what was not written
    /// back is lost, as for the memfd's pages).
    pub(super) fn release_all_slots(&self, st: &mut CacheState) {
        for (p, _) in st.pages.placed_in(0, u64::MAX) {
            self.release_slot(st, p);
        }
        let replicated: Vec<u64> = st.replicas.keys().copied().collect();
        for p in replicated {
            self.release_replicas(st, p);
        }
    }

    /// Places read-only copies of file pages `[off, off + len)` (`off` page-aligned; clamped to
    /// the file) in the memory of `pm`'s device (device-private memory): the memfd keeps the
    /// data and the CPU keeps mapping it; the device reads its copy locally. Several devices may
    /// hold replicas of a page (read-mostly data). Every replica of a page is dropped before
    /// anything changes the page: a CPU store (caught by write-protection: the page's mappings
    /// must be read-only or intercept stores), a device write, `write_at`, truncate, hole punch,
    /// direct write, eviction; and before a shared mapping that does not intercept stores is
    /// made over it. Uncached pages are read first; pages on a device already (private or
    /// coherent), pinned pages and pages the device has no room for are skipped. Returns the
    /// replicas made by this call.
    ///
    /// Errors: as [`Self::place_on_device`] (a writable file's pages in a shared mapping that
    /// does not intercept stores: [`Error::StoresNotIntercepted`]); a coherent device needs no
    /// replica (EINVAL).
    pub fn replicate(&self, off: u64, len: u64, pm: &Arc<Pagemap>) -> Result<u64> {
        let (first, last) = self.page_range(off, len)?;
        if first >= last {
            return Ok(0);
        }
        if pm.kind() != MemoryKind::Private {
            return Err(Error::Invalid(
                "replicas go to device-private memory (a coherent device maps the page itself)",
            ));
        }
        let cache_id = self.reverse_map_id()?;
        let mut st = self.begin_removal(first, last);
        if let Some(page) = self.unprotectable_in(&st, first, last) {
            return Err(Error::StoresNotIntercepted { page });
        }
        self.fill(&mut st, first, last)?;
        self.collect_written(&mut st);
        // Stores in the mappings that intercept them fault from now on (and drop the replicas).
        Self::protect_sync_mappings(&st, first, last);
        let dev = Self::dev_index(&mut st, pm)?;
        let mut page = vec![0u8; PAGE_SIZE];
        let mut made = 0u64;
        let mut full = false;
        for p in first..last {
            if st.pages.get(p) == PageState::Uncached
                || st.pages.slot(p).is_some()
                || st.pinned.contains_key(&p)
                || st
                    .replicas
                    .get(&p)
                    .is_some_and(|v| v.iter().any(|&(d, _)| d == dev))
            {
                continue;
            }
            let Ok(f) = pm.alloc() else {
                full = true;
                break;
            };
            let copied = self
                .read_memfd_page(p, &mut page)
                .and_then(|()| pm.store().write(f.offset(), &page));
            if let Err(e) = copied {
                pm.free(f, false);
                return Err(Error::os("copy a file page to the device", e));
            }
            pm.charge_migration(PAGE_SIZE);
            pm.set_rmap(
                f,
                FrameOwner::File {
                    cache: cache_id,
                    index: p,
                },
            );
            st.replicas.entry(p).or_default().push((dev, f.0));
            made += 1;
        }
        if made == 0 && full {
            return Err(Error::NoMemory {
                what: "device memory",
            });
        }
        Ok(made)
    }

    /// The devices holding a read-only replica of file page `page`.
    pub fn replica_owners(&self, page: u64) -> Vec<Owner> {
        let st = lock(&self.st);
        st.replicas
            .get(&page)
            .map(|v| {
                v.iter()
                    .map(|&(d, _)| st.devs[d as usize].owner())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The replica of file page `page` on the device `owner`, if any (for `range_fault`: the
    /// device reads its copy). EBUSY while the page is being moved or removed.
    pub(crate) fn replica_for(&self, page: u64, owner: Owner) -> Result<Option<DevicePage>> {
        let st = lock(&self.st);
        let Some(v) = st.replicas.get(&page) else {
            return Ok(None);
        };
        if st.blocked.iter().any(|&(f, l)| f <= page && page < l) {
            return Err(Error::Busy);
        }
        Ok(v.iter().find_map(|&(d, f)| {
            let pm = &st.devs[d as usize];
            (pm.owner() == owner).then(|| DevicePage {
                pagemap: pm.id(),
                frame: FrameIdx(f),
                owner,
                coherent: false,
                replica: true,
            })
        }))
    }

    /// Reads page `p` of the memfd into `page`; past the end of file (a partial last page) it
    /// holds zeros, whatever `page` held before (it is reused from page to page).
    fn read_memfd_page(&self, p: u64, page: &mut [u8]) -> io::Result<()> {
        let n = self.memfd.read_at(p * PAGE, page)?;
        page[n..].fill(0);
        Ok(())
    }

    /// Frees every replica of page `p` (the caller invalidated their device mappings).
    pub(super) fn release_replicas(&self, st: &mut CacheState, p: u64) {
        if let Some(v) = st.replicas.remove(&p) {
            for (d, f) in v {
                st.devs[d as usize].free(FrameIdx(f), false);
            }
        }
    }

    /// The first page of `first..last` in a shared mapping whose stores cannot be held off
    /// (does not intercept stores) while the file is writable: such pages go neither to
    /// device-private memory nor get replicas.
    fn unprotectable_in(&self, st: &CacheState, first: u64, last: u64) -> Option<u64> {
        st.mappings
            .iter()
            .find(|m| {
                (m.writable || (m.tracked && self.writable))
                    && !m.sync
                    && m.pgoff < last
                    && first < m.pgoff + m.range.pages() as u64
            })
            .map(|m| m.pgoff.max(first))
    }

    /// Held by the address space across making a shared mapping that does not intercept stores
    /// over file pages `first..last` of a writable file: the pages' replicas are dropped first
    /// (two phases), and none can be made until the mapping is recorded (replication takes the
    /// same lock, and then sees the mapping and refuses).
    pub(crate) fn hold_without_replicas(
        &self,
        first: u64,
        last: u64,
    ) -> crate::sync::Guard<'_, ()> {
        let serial = lock(&self.removal);
        if !self.writable || lock(&self.st).replicas.range(first..last).next().is_none() {
            return serial;
        }
        lock(&self.st).blocked.push((first, last));
        self.invalidate_mappings(first, last);
        let mut st = lock(&self.st);
        let pages: Vec<u64> = st.replicas.range(first..last).map(|(&p, _)| p).collect();
        for p in pages {
            self.release_replicas(&mut st, p);
        }
        if let Some(i) = st.blocked.iter().position(|&b| b == (first, last)) {
            st.blocked.swap_remove(i);
        }
        serial
    }
}

/// Maximal runs of consecutive numbers in sorted `v`, as `(first, one past last)`.
pub(super) fn runs_of(v: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in v {
        match out.last_mut() {
            Some((_, e)) if *e == p => *e += 1,
            _ => out.push((p, p + 1)),
        }
    }
    out
}
