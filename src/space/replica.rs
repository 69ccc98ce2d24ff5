//! Read-only replicas of anonymous pages (read-mostly data, `cudaMemAdviseSetReadMostly`): a
//! device keeps a copy of a system page in its own memory and reads it locally, while the CPU
//! keeps reading (and may write) the page where it is.
//!
//! # The rule
//!
//! A page with replicas is `Present` with the REPLICATED mark, and its CPU page is
//! write-protected. Whatever could change the page's bytes first drops every replica (an
//! invalidation with [`NotifyEvent::Clear`]: each device clears its entry and frees its copy),
//! under the space's lock:
//!
//! * a CPU store faults on the protection ([`SpaceCore::handle_fault`]);
//! * a device write fault asks `range_fault` for a writable page ([`crate::hmm`]);
//! * a pin ([`crate::Space::pin`]): a pinned page may be written by I/O that no protection
//!   stops;
//! * a migration, an unmap, a grant of exclusive access, a fork's copy: each invalidates the
//!   page's device mappings anyway, and leaves the entry without the mark.
//!
//! A replica is made under the space's lock, with the page write-protected before it is copied
//! (a store in between faults and waits for the lock), and the device maps it before the lock is
//! released (`map`), so no invalidation can fall between the copy and the mapping.
//!
//! The device owns its replica frames (they have no reverse-map owner): it frees one when it
//! clears the entry. Replicas use free frames only: a full device maps the page where it is
//! instead, and never evicts for a replica.
//!
//! Not replicated (mapped where they are): pages of file mappings (a shared file mapping has
//! the file cache's own replicas, [`crate::pagecache::FileCache::replicate`]), pages of 2 MiB
//! units, device-coherent pages, pinned pages, the zero page, and pages a migration owns.

use super::*;

impl SpaceCore {
    /// Makes read-only replicas of the present anonymous pages of `r` in frames of `pm` (a
    /// device-private pagemap), calling `map(page, frame)` for each under the state lock so that
    /// the device maps it before any invalidation can run. Returns the replicas made; stops at
    /// the first frame that cannot be had (the rest stay where they are).
    pub(crate) fn replicate(
        &self,
        r: VaRange,
        pm: &Arc<Pagemap>,
        map: &mut dyn FnMut(VirtAddr, FrameIdx),
    ) -> Result<usize> {
        if pm.kind() != MemoryKind::Private {
            return Err(Error::Invalid(
                "replicas go to device-private memory (a coherent device maps the page itself)",
            ));
        }
        let mut st = self.lock_state_for(r);
        let mut made = 0;
        let mut a = r.start;
        while a < r.end {
            // A run of pages that can be replicated, within one mapping.
            let Some(v) = st.vma(a) else {
                a = a.add(PAGE_SIZE);
                continue;
            };
            let (vend, mode) = (v.range.end.min(r.end), v.mode);
            let anon = v.file.is_none() && v.prot.readable();
            let mut e = a;
            while anon && e < vend {
                let p = v.ptes[v.idx(e)];
                let ok = p.state() == PageState::Present
                    && !p.large()
                    && !p.is_coherent()
                    && !p.is_zero_page()
                    && !p.migrating()
                    && !p.pinned();
                if !ok {
                    break;
                }
                e = e.add(PAGE_SIZE);
            }
            if e == a {
                a = a.add(PAGE_SIZE);
                continue;
            }
            let run = VaRange { start: a, end: e };
            // Protected first: a store from here on faults and waits for this lock.
            self.mm
                .write_protect(run, true, mode)
                .map_err(|e| Error::os("write-protect for a replica", e.into()))?;
            let mut p = a;
            while p < e {
                let frame = match pm.alloc() {
                    Ok(f) => f,
                    // Full: the rest of the run is left as it was.
                    Err(_) => {
                        self.unprotect_unreplicated(&st, VaRange { start: p, end: e }, mode);
                        return Ok(made);
                    }
                };
                if let Err(err) = self.copy_into_frames(p, pm, frame.offset(), PAGE_SIZE) {
                    pm.free(frame, false);
                    self.unprotect_unreplicated(&st, VaRange { start: p, end: e }, mode);
                    return Err(Error::os("copy into a replica", err));
                }
                pm.charge_migration(PAGE_SIZE);
                let pte = st.pte(p).expect("in the run");
                st.set_pte(p, pte.with_replicated(true));
                map(p, frame);
                made += 1;
                p = p.add(PAGE_SIZE);
            }
            a = e;
        }
        Ok(made)
    }

    /// Takes the protection off the pages of `r` that have no replica (another device's
    /// replicas keep theirs).
    fn unprotect_unreplicated(&self, st: &SpaceState, r: VaRange, mode: FaultMode) {
        for q in (r.start.get()..r.end.get()).step_by(PAGE_SIZE) {
            let q = VirtAddr(q);
            if !st.pte(q).is_some_and(|p| p.replicated()) {
                let one = VaRange {
                    start: q,
                    end: q.add(PAGE_SIZE),
                };
                let _ = self.mm.write_protect(one, false, mode);
            }
        }
    }

    /// Drops every replica of the pages of `r` (see the module doc): devices clear their
    /// entries, the marks go and the pages' protection comes off. Pages that were never
    /// replicated are left alone. Called under the state lock.
    pub(crate) fn drop_replicas(&self, st: &mut SpaceState, r: VaRange) {
        let mut a = r.start;
        while a < r.end {
            if !st.pte(a).is_some_and(|p| p.replicated()) {
                a = a.add(PAGE_SIZE);
                continue;
            }
            // A run of replicated pages in one mapping: one invalidation, one unprotect.
            let v = st.vma(a).expect("has a pte");
            let (vend, mode, writable) = (v.range.end.min(r.end), v.mode, v.prot.writable());
            let mut e = a;
            while e < vend && v.ptes[v.idx(e)].replicated() {
                e = e.add(PAGE_SIZE);
            }
            let run = VaRange { start: a, end: e };
            self.invalidate(st, run, NotifyEvent::Clear, None);
            let v = st.vma_mut(a).expect("has a pte");
            let (i, j) = (v.idx(a), v.idx(a) + run.pages());
            for p in &mut v.ptes[i..j] {
                *p = p.with_replicated(false);
            }
            if writable {
                let _ = self.mm.write_protect(run, false, mode);
            }
            a = e;
        }
    }
}
