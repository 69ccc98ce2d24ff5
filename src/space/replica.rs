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
//! A replica is made under the space's lock: devices' writable mappings of the page are
//! invalidated, the page is write-protected before it is copied (a store in between faults and
//! waits for the lock), and the device maps the copy before the lock is released (`map`), so no
//! invalidation can fall between the copy and the mapping. While a page has replicas,
//! `range_fault` reports it read-only to every device.
//!
//! The device owns its replica frames (they have no reverse-map owner): it frees one when it
//! clears the entry, and may drop its own replicas at any time (its next read faults). A full
//! device asks the space's policy ([`crate::policy::Policy::device_full`]): to evict, it drops
//! its own older replicas (a clock over its page table, never inside the window being
//! replicated); to decline, it maps the page where it is. A migration to a full device that
//! evicts drops a replica before it evicts a page (a copy goes without a copy back).
//!
//! Not replicated (mapped where they are): pages of file mappings (a shared file mapping has
//! the file cache's own replicas, [`crate::pagecache::FileCache::replicate`]), pages of 2 MiB
//! units, device-coherent pages, pinned pages, the zero page, pages a migration owns, and pages
//! of thread-mode mappings (the copy under the lock goes through the kernel, which stops at a
//! page the program dropped in a signal-mode mapping, but in a thread-mode one would wait for
//! the handler thread, which waits for the lock).

use super::*;

/// Pages copied per call of the copy that stops at a missing page.
const COPY_CHUNK_PAGES: usize = 64;

impl SpaceCore {
    /// Makes read-only replicas of the present anonymous pages of `r` in frames of `pm` (a
    /// device-private pagemap; `alloc(first, n, out)` appends up to `n` of its frames
    /// for the pages from `first` on: called under the state lock), calling `map(page, frame)` for each under the state lock so that
    /// the device maps it before any invalidation can run. Returns the replicas made; stops when
    /// the device has no free frame (the rest stay where they are). Devices' mappings of the
    /// pages replicated are invalidated first: the caller maps again what it needs of those
    /// that were not.
    pub(crate) fn replicate(
        &self,
        r: VaRange,
        pm: &Arc<Pagemap>,
        alloc: &mut dyn FnMut(VirtAddr, usize, &mut Vec<FrameIdx>),
        map: &mut dyn FnMut(VirtAddr, FrameIdx),
    ) -> Result<usize> {
        if pm.kind() != MemoryKind::Private {
            return Err(Error::Invalid(
                "replicas go to device-private memory (a coherent device maps the page itself)",
            ));
        }
        let mut staging = crate::error::try_vec(
            COPY_CHUNK_PAGES * PAGE_SIZE,
            0u8,
            "a replica's staging buffer",
        )?;
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
            // Signal mode only: in a thread-mode mapping a copy that meets a page the program
            // dropped waits for the handler thread, which waits for this lock.
            let anon = v.file.is_none() && v.prot.readable() && mode == FaultMode::Signal;
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
            // Frames first: only as many pages as the device has free frames for (replicas
            // never evict), so that nothing below is undone for want of one.
            let mut frames = Vec::new();
            alloc(a, (e.get() - a.get()) / PAGE_SIZE, &mut frames);
            if frames.is_empty() {
                return Ok(made);
            }
            let e = a.add(frames.len() * PAGE_SIZE);
            let run = VaRange { start: a, end: e };
            // Devices that map a page writable lose that mapping first (a device store must
            // fault from now on, as a CPU store will). Pages that already have replicas have no
            // writable device mapping (`range_fault` reports them read-only), and their
            // replicas stay.
            let mut q = a;
            while q < e {
                let fresh = |x: VirtAddr| !st.pte(x).is_some_and(|p| p.replicated());
                if !fresh(q) {
                    q = q.add(PAGE_SIZE);
                    continue;
                }
                let s0 = q;
                while q < e && fresh(q) {
                    q = q.add(PAGE_SIZE);
                }
                self.invalidate(&st, VaRange { start: s0, end: q }, NotifyEvent::Clear, None);
            }
            // Protected first: a store from here on faults and waits for this lock.
            if let Err(err) = self.mm.write_protect(run, true, mode) {
                for f in frames {
                    pm.free(f, false);
                }
                self.unprotect_unreplicated(&st, run, mode);
                return Err(Error::uffd("write-protect for a replica", err, run.start));
            }
            // Copied through the kernel, which stops at a page that is not there: a page the
            // program dropped behind hetmem's back (a direct madvise, maybe racing this) would
            // fault in a plain copy. It is refilled, as its next access would (zeros; its other
            // replicas go), protected again, and copied; one that still is not there is not
            // replicated (its frame goes back). Where the kernel refuses the copy, the pages
            // `/proc/self/pagemap` says hold data are copied plainly: a drop racing that check
            // is the program's own race, as for a migration.
            let mut k = 0;
            let mut refilled = None;
            while k < frames.len() {
                let p = a.add(k * PAGE_SIZE);
                let want = (frames.len() - k).min(COPY_CHUNK_PAGES);
                let buf = &mut staging[..want * PAGE_SIZE];
                let n = match self.mm.read_present(p, buf) {
                    Some(bytes) => bytes / PAGE_SIZE,
                    None => {
                        let n = self.mm.present_prefix(p, want);
                        self.mm.read(p, &mut buf[..n * PAGE_SIZE]);
                        n
                    }
                };
                for j in 0..n {
                    let (q, frame) = (p.add(j * PAGE_SIZE), frames[k + j]);
                    let bytes = &buf[j * PAGE_SIZE..(j + 1) * PAGE_SIZE];
                    if let Err(err) = pm.store().write(frame.offset(), bytes) {
                        for f in &frames[k + j..] {
                            pm.free(*f, false);
                        }
                        self.unprotect_unreplicated(&st, VaRange { start: q, end: e }, mode);
                        return Err(Error::os("copy into a replica", err));
                    }
                    pm.charge_migration(PAGE_SIZE);
                    let pte = st.pte(q).expect("in the run");
                    st.set_pte(q, pte.with_replicated(true));
                    map(q, frame);
                    made += 1;
                }
                k += n;
                if n < want {
                    let q = a.add(k * PAGE_SIZE);
                    let one = VaRange {
                        start: q,
                        end: q.add(PAGE_SIZE),
                    };
                    if refilled != Some(k)
                        && self.refill_dropped(&mut st, q).is_ok()
                        && self.mm.write_protect(one, true, mode).is_ok()
                    {
                        // Refilled unprotected (and its other replicas' protection dropped):
                        // protected again before the copy, so a store faults.
                        refilled = Some(k);
                        continue;
                    }
                    // Still not there: skipped.
                    pm.free(frames[k], false);
                    self.unprotect_unreplicated(&st, one, mode);
                    k += 1;
                }
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
            let (vend, mode) = (v.range.end.min(r.end), v.mode);
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
            // Whatever the mapping's permission now: a page left protected with no mark would
            // refuse a device's store through the kernel once the mapping is writable again.
            let _ = self.mm.write_protect(run, false, mode);
            a = e;
        }
    }
}
