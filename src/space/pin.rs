//! Pins (`pin_user_pages`): short- and long-term, of anonymous and file pages.

use super::*;

impl Space {
    /// Pins the pages of `[addr, addr+len)` (the `get_user_pages` analogue): missing pages are
    /// filled, device-private and exclusive pages brought back to system memory first; pinned
    /// pages are not migrated until the pin is dropped. `long_term` is `FOLL_LONGTERM`: it also
    /// moves device-coherent pages to system memory (a short-term pin leaves them in place).
    /// All-or-nothing: on error no page is pinned (pages may have been brought back).
    pub fn pin(&self, addr: VirtAddr, len: usize, long_term: bool) -> Result<Pin> {
        self.check_owner_process()?;
        let r = VaRange::new(addr, len)?;
        // A file page being removed (eviction, truncate, punch: the cache blocks it while
        // device mappings are invalidated) cannot be made present yet: wait for that removal to
        // end, with no lock held, and try again. Bounded: each round waits for one removal, and
        // a removal is bounded work; a page that stays blocked this many times is EBUSY.
        const BUSY_ROUNDS: usize = 1000;
        let mut round = 0;
        let mut st = loop {
            // Pages a migration in flight owns are waited for first.
            let mut st = self.core.lock_state_for(r);
            st.check_covered(r)?;
            for p in 0..r.pages() {
                let a = r.start.add(p * PAGE_SIZE);
                let v = st.vma(a).expect("covered");
                if !v.prot.readable() {
                    return Err(Error::NoRead { addr: a });
                }
            }
            match self.make_range_present(&mut st, r, long_term) {
                Ok(()) => break st,
                Err((Error::Busy, Some((cache, page)))) if round < BUSY_ROUNDS => {
                    drop(st);
                    cache.settle(page, long_term, true)?;
                    round += 1;
                }
                Err((e, _)) => return Err(e),
            }
        };
        // A pinned page may be written by I/O that no protection stops: its read-only replicas
        // go (module `replica`).
        self.core.drop_replicas(&mut st, r);
        for p in 0..r.pages() {
            let pte = st.pte(r.start.add(p * PAGE_SIZE)).expect("covered");
            if pte.with_pin(long_term, 1).is_none() {
                return Err(Error::Busy);
            }
        }
        let mut file_pins: Vec<(Arc<FileCache>, u64, u64)> = Vec::new();
        for p in 0..r.pages() {
            let a = r.start.add(p * PAGE_SIZE);
            let pte = st.pte(a).expect("covered");
            st.set_pte(a, pte.with_pin(long_term, 1).expect("checked above"));
            // A pinned page of a shared file mapping lives in the file's cache: never evicted
            // while the pin is held, even after the mapping is gone (as a pinned page outlives
            // its mapping in the kernel).
            if let Some((cache, page)) = st.file_page(a) {
                cache.pin_page(page, 1);
                match file_pins.last_mut() {
                    Some((c, _, e)) if Arc::ptr_eq(c, &cache) && *e == page => *e += 1,
                    _ => file_pins.push((cache, page, page + 1)),
                }
            }
        }
        let mut pieces = Vec::new();
        let mut a = r.start;
        while a < r.end {
            let v = st.vma(a).expect("covered");
            let end = v.range.end.min(r.end);
            pieces.push((VaRange { start: a, end }, v.id));
            a = end;
        }
        Ok(Pin {
            core: self.core.clone(),
            pieces,
            file_pins,
            long_term,
        })
    }

    /// Makes every page of `r` present (and, for a long-term pin, in system memory). On
    /// failure, the error and, for a file page being removed or in device memory, its cache and
    /// page (to settle).
    #[allow(clippy::type_complexity)]
    pub(super) fn make_range_present(
        &self,
        st: &mut SpaceState,
        r: VaRange,
        long_term: bool,
    ) -> std::result::Result<(), (Error, Option<(Arc<FileCache>, u64)>)> {
        for p in 0..r.pages() {
            let a = r.start.add(p * PAGE_SIZE);
            if let Some((cache, page)) = st.file_page(a)
                && cache.needs_settle(page, long_term, true)
            {
                // In device memory: brought back by the caller, with no lock held.
                return Err((Error::Busy, Some((cache, page))));
            }
            if let Err(e) = self.core.make_present(st, a) {
                return Err((e, st.file_page(a)));
            }
            if long_term {
                // A long-term pin would block the device from evicting its memory: coherent
                // pages move to system memory first (the kernel's FOLL_LONGTERM rule).
                self.core.demote_coherent(st, a);
            }
        }
        Ok(())
    }
}

/// A pin on a range of pages (see [`Space::pin`]); dropping it unpins.
#[derive(Debug)]
pub struct Pin {
    core: Arc<SpaceCore>,
    /// The pinned ranges and the mapping each belongs to.
    pieces: Vec<(VaRange, u64)>,
    /// Runs of file pages pinned in their caches (`first..last`): released on drop whatever
    /// happened to the mappings.
    file_pins: Vec<(Arc<FileCache>, u64, u64)>,
    long_term: bool,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.core.lock_state();
        for &(r, id) in &self.pieces {
            for p in 0..r.pages() {
                let a = r.start.add(p * PAGE_SIZE);
                // Only the mapping that was pinned: after an unmap (and maybe a new mapping at
                // the same address) the pin has nothing left to release.
                let Some(v) = st.vma_mut(a).filter(|v| v.id == id) else {
                    continue;
                };
                let i = v.idx(a);
                if let Some(np) = v.ptes[i].with_pin(self.long_term, -1) {
                    v.ptes[i] = np;
                }
            }
        }
        drop(st);
        for (cache, first, last) in &self.file_pins {
            for page in *first..*last {
                cache.pin_page(page, -1);
            }
        }
    }
}
