//! The CPU fault service: what a fault does, by page state (zero-fill with fault-around, fault-back
//! from device memory, revocation of exclusive access, a store to a write-protected page, a page
//! dropped behind hetmem's back, file fills), and the copies between frames and the CPU view it
//! and migration use. Runs in the faulting thread's SIGBUS handler (or the handler thread), under
//! the space's state lock: nothing here allocates.

use super::*;

impl SpaceCore {
    /// Installs `len` bytes of `pm`'s frames at byte `off` into the missing CPU pages at `dst`
    /// (`UFFDIO_COPY`), write-protected at once when `protected`: straight from the frames when
    /// the device's memory is host-addressable, else through the bounce buffer (the caller holds
    /// the state lock, so it is ours). No allocation: this is the fault-back path.
    pub(crate) fn install_from_frame(
        &self,
        dst: VirtAddr,
        pm: &Pagemap,
        off: usize,
        len: usize,
        mode: FaultMode,
        protected: bool,
    ) -> std::result::Result<(), sys::UffdError> {
        let store = pm.store();
        let install = |src: &Region, off: usize| {
            if protected {
                self.mm.install_protected(dst, src, off, len, mode)
            } else {
                self.mm.install(dst, src, off, len, mode)
            }
        };
        let res = match store.host_view() {
            Some(r) => install(r, off),
            None => {
                store
                    .copy_out(off, &self.bounce, 0, len)
                    .map_err(|e| sys::UffdError::Os(e.raw_os_error().unwrap_or(libc::EIO)))?;
                install(&self.bounce, 0)
            }
        };
        // The program may have dropped these pages (madvise) between its event's read and this
        // copy: the copy would then stay, with the data it dropped, for good. Parts a REMOVE not
        // followed yet covers are dropped again (zeros: the drop and the copy were concurrent).
        // The entries stay as the caller sets them: a present page the kernel no longer has is
        // refilled as the kernel would at its next access.
        sys::removes_pending_in(dst.get(), dst.get() + len, |s, e| {
            let _ = self.mm.zap(VaRange {
                start: VirtAddr(s).page_down(),
                end: VirtAddr(e),
            });
        });
        res
    }

    /// Copies `len` bytes of present managed pages at `addr` into `pm`'s frames at byte `off`
    /// (directly, or through the bounce buffer for a device the CPU cannot address; the caller
    /// holds the state lock).
    pub(crate) fn copy_into_frames(
        &self,
        addr: VirtAddr,
        pm: &Pagemap,
        off: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let store = pm.store();
        match store.host_view() {
            Some(r) => {
                self.mm.copy_to(addr, r, off, len);
                Ok(())
            }
            None => {
                self.mm.copy_to(addr, &self.bounce, 0, len);
                store.copy_in(off, &self.bounce, 0, len)
            }
        }
    }

    /// Copies `len` bytes between two pools' frames (a device-to-device migration), through
    /// the bounce buffer when either side is not host-addressable (the caller holds the state
    /// lock).
    pub(crate) fn copy_between_frames(
        &self,
        from: &Pagemap,
        from_off: usize,
        to: &Pagemap,
        to_off: usize,
        len: usize,
    ) -> std::io::Result<()> {
        match (from.store().host_view(), to.store().host_view()) {
            (Some(a), _) => to.store().copy_in(to_off, a, from_off, len),
            (None, Some(b)) => from.store().copy_out(from_off, b, to_off, len),
            (None, None) => {
                from.store().copy_out(from_off, &self.bounce, 0, len)?;
                to.store().copy_in(to_off, &self.bounce, 0, len)
            }
        }
    }

    /// The CPU fault service: a load or store at page `a` faulted (missing page, or a store to a
    /// write-protected one). Returns false if `a` is not in a mapping of this space.
    pub(crate) fn handle_fault(&self, a: VirtAddr, write: bool) -> bool {
        if sys::getpid() != self.pid {
            return false;
        }
        // A drop of the page by the program (madvise) whose madvise returned is followed first.
        sys::wait_removes_followed();
        let mut st = self.lock_state();
        let Some(pte) = st.pte(a) else { return false };
        if pte.migrating() {
            if st.vma(a).is_some_and(|v| v.mode == FaultMode::Thread) && sys::defer_thread_fault() {
                // The handler thread serves every fault of thread-mode mappings in turn:
                // waiting here for the migration would hold up the faults the migration itself
                // may take (its copy of a page the program dropped meanwhile: found from
                // outside, a hang). The faulting thread stays asleep in the kernel instead, and
                // is woken when the migration is done (`notify_migrations_done`: the mark is
                // set under this lock, which the migration's commit takes after it).
                self.thread_faults_deferred.store(true, Ordering::SeqCst);
                return true;
            }
            // A migration in flight owns the page (a store to a page it write-protected, or a
            // first touch of a hole it is moving): wait for it to finalize, with the lock
            // released meanwhile, and retry the access against the page's new state.
            let _st = self.wait_for_migrations(
                st,
                VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                },
            );
            return true;
        }
        self.counters.cpu_faults.fetch_add(1, Ordering::Relaxed);
        debug_event!(
            space = self.id,
            addr = %a,
            write,
            state = ?pte.state(),
            "CPU fault"
        );
        st.trace_with(|| {
            let (state, owner) = if st.file_page(a).is_some() {
                (FaultState::File, Owner(0))
            } else {
                match pte.state() {
                    PageState::None => (FaultState::Missing, Owner(0)),
                    PageState::Present => (FaultState::Present, Owner(0)),
                    PageState::Device => (FaultState::Device, st.pagemap(pte.pagemap()).owner()),
                    PageState::Exclusive => {
                        (FaultState::Exclusive, st.pagemap(pte.pagemap()).owner())
                    }
                }
            };
            TraceEvent::cpu_fault(self.id, a, write, state, owner)
        });
        if let Some(v) = st
            .vma(a)
            .filter(|v| v.file.as_ref().is_some_and(|f| f.sync))
            && write
        {
            // A store to a mapping that intercepts stores (a clean page, or a missing one).
            let f = v.file.as_ref().expect("filtered");
            let (cache, page) = (f.cache.clone(), f.pgoff + v.idx(a) as u64);
            let r = VaRange {
                start: a,
                end: a.add(PAGE_SIZE),
            };
            return match cache.store_fault(&*self.mm, page, r) {
                Ok(StoreFault::Done) => true,
                Ok(StoreFault::Sigbus) => unserved(
                    "a store past the end of the file, or at the dirty bound after a failed \
                     writeback",
                ),
                Err(Error::MemoryFailure { .. }) => {
                    unserved("the page's data was lost to a memory failure")
                }
                Err(_) => unserved("the page could not be filled from the file for a store"),
                Ok(StoreFault::WaitFlush) => {
                    drop(st);
                    cache.wait_flush();
                    true
                }
                Ok(StoreFault::Device) => {
                    drop(st);
                    cache.settle(page, false, true).is_ok()
                        || unserved("a file page could not be brought back from device memory")
                }
            };
        }
        if let Some((cache, page)) = st.file_page(a) {
            // A file mapping: the page is not in the cache yet. Fill the cache (the memfd) and
            // let the access retry: the kernel then maps the page. Past the end of file (or on
            // a read error) the access gets SIGBUS, as with the kernel's mmap. While the page is
            // being removed (truncate, punch), the access retries. The fill needs only the
            // cache's lock: the space's lock is released first, so that a fill's disk read
            // never holds up the other faults and migrations of the space (if the mapping goes
            // away meanwhile, the retried access faults as on any unmapped address).
            drop(st);
            return match cache.fault_fill(page, true) {
                Ok(Fill::Filled) => true,
                Ok(Fill::Busy) => {
                    // Being removed: wait for the removal to end (no lock held), then retry.
                    cache.wait_for_removal();
                    true
                }
                // In device-private memory: bring it back (no lock held), then retry.
                Ok(Fill::Device) => {
                    cache.settle(page, false, false).is_ok()
                        || unserved("a file page could not be brought back from device memory")
                }
                Ok(Fill::PastEof) => unserved("an access past the end of the file"),
                Err(Error::MemoryFailure { .. }) => {
                    unserved("the page's data was lost to a memory failure")
                }
                Err(_) => unserved("the page could not be filled from the file"),
            };
        }
        if pte.state() == PageState::None
            && !write
            && st.vma(a).is_some_and(|v| v.file.is_none() && !v.large)
        {
            // A read of a never-written anonymous page: the kernel's shared zero page, as the
            // kernel serves it (no memory until a store; the store faults, write-protected).
            // Over the fault-around run: zero pages cost no memory, so mapping the run ahead
            // saves the faults of a sequential read.
            let (s, e, start, _, mode) = self.zero_run(&st, a, MAX_ZERO_PAGE_AROUND);
            let r = VaRange {
                start,
                end: start.add((e - s) * PAGE_SIZE),
            };
            return match self.mm.map_zero_pages(r, mode) {
                Ok(()) => {
                    let v = st.vma_mut(a).expect("checked");
                    for p in &mut v.ptes[s..e] {
                        *p = Pte::zero_page(*p);
                    }
                    let (_, w) = fault_around_state();
                    set_fault_around_state(r.end.get(), w);
                    true
                }
                Err(_) => unserved("the zero page could not be mapped"),
            };
        }
        if pte.state() == PageState::None
            && st
                .vma(a)
                .is_some_and(|v| v.file.is_none() && v.mode == FaultMode::Signal)
        {
            // Anonymous first touch in the faulting thread: the zero-fill's copy runs without
            // the space's lock. (Not in thread mode: there the copy wakes the faulting thread
            // before the entries are committed, and its next call could find them still
            // marked.)
            return self.fault_zero_unlocked(st, a).is_ok()
                || unserved("the page could not be zero-filled");
        }
        let ok = match pte.state() {
            PageState::None => match self.fault_zero(&mut st, a) {
                Ok(()) => true,
                Err(Error::NotMapped { .. }) => unserved("an access past the end of the file"),
                Err(Error::MemoryFailure { .. }) => {
                    unserved("the page's data was lost to a memory failure")
                }
                Err(_) => unserved("the page could not be zero-filled or filled from the file"),
            },
            PageState::Present if pte.is_zero_page() && !write => {
                // A read fault on the zero page: a direct madvise dropped it (the kernel raises
                // no event). Map it again.
                let mode = st.vma(a).expect("pte found").mode;
                let r = VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                };
                self.mm.map_zero_pages(r, mode).is_ok()
                    || unserved("the zero page could not be mapped again")
            }
            PageState::Present => {
                // Either a store hit a write-protected page after the migration that protected
                // it declined the page (or a racing fault already served it), or the page was
                // dropped behind hetmem's back by a direct madvise(MADV_DONTNEED/REMOVE), which
                // raises no event: then every access would fault here forever. Installing the
                // page tells them apart (EEXIST: it is there) and gives a dropped page what the
                // kernel gives it: zeros, or the file's bytes in a private file mapping.
                if let Err(e) = self.refill_dropped(&mut st, a) {
                    return match e {
                        Error::MemoryFailure { .. } => {
                            unserved("the page's data was lost to a memory failure")
                        }
                        _ => {
                            e.errno() == libc::EAGAIN
                                || unserved(
                                    "a page dropped by a direct madvise could not be refilled",
                                )
                        }
                    };
                }
                if write && pte.fork_cow() && self.resolve_fork_cow(&mut st, a).is_err() {
                    return unserved("a store to a page shared with a forked child");
                }
                if write && pte.replicated() {
                    // A store to a page devices hold read-only replicas of: they go first
                    // (module `replica`).
                    self.drop_replicas(
                        &mut st,
                        VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        },
                    );
                }
                if write && pte.is_zero_page() && st.vma(a).is_some_and(|v| v.prot.writable()) {
                    // A store to the zero page: the kernel gives the page a private copy once
                    // the protection is off (below). Devices that map the zero page drop it
                    // (the kernel's copy-on-write clears the entry: MMU_NOTIFY_CLEAR).
                    self.invalidate(
                        &st,
                        VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        },
                        NotifyEvent::Clear,
                        None,
                    );
                    st.set_pte(a, pte.without_zero());
                }
                let v = st.vma(a).expect("pte found");
                if write && v.prot.writable() {
                    let _ = self.mm.write_protect(
                        VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        },
                        false,
                        v.mode,
                    );
                }
                true
            }
            PageState::Device => {
                // The policy decides how much comes back (no allocation: plain data in and out).
                let pm = st.pagemap(pte.pagemap());
                let q = CpuFault {
                    addr: a,
                    write,
                    owner: pm.owner(),
                    kind: pm.kind(),
                    large: pte.large(),
                };
                let action = st.policy.cpu_fault(&q);
                if action == CpuFaultAction::MigrateBackPage && pte.large() {
                    // Only this page comes back: the unit (and its device frame) becomes base
                    // pages first.
                    self.split_unit(&mut st, a);
                }
                let unlocked = st.vma(a).is_some_and(|v| v.mode == FaultMode::Signal)
                    && st.pagemap(pte.pagemap()).store().host_view().is_some();
                if unlocked {
                    return self.fault_back_unlocked(st, a).is_ok()
                        || unserved("the page could not be brought back from device memory");
                }
                self.make_present(&mut st, a).is_ok()
                    || unserved("the page could not be brought back from device memory")
            }
            PageState::Exclusive => {
                self.make_present(&mut st, a).is_ok()
                    || unserved("device-exclusive access could not be revoked")
            }
        };
        if let Some(v) = st.vma(a) {
            self.mm.wake(
                VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                },
                v.mode,
            );
        }
        ok
    }

    /// A device found system page `a` gone (dropped by a direct `madvise` behind hetmem's
    /// back): refills it as [`Self::refill_dropped`] does, if its entry still says present.
    /// False where the kernel has the page (pagemap: present), so that the device's copy
    /// stopped there for another reason than a drop.
    pub(crate) fn refill_if_dropped(&self, a: VirtAddr) -> Result<bool> {
        let mut st = self.lock_state();
        match st.pte(a) {
            Some(p) if p.state() == PageState::Present && !p.migrating() => {
                if sys::page_state(a.get()).is_some_and(|(present, _)| present) {
                    return Ok(false);
                }
                self.refill_dropped(&mut st, a).map(|()| true)
            }
            // Taken elsewhere meanwhile (migrating, moved to a device): the device's next
            // fault finds it there.
            _ => Ok(true),
        }
    }

    /// Installs page `a` of a `Present` entry if the kernel has no page there (dropped by a
    /// direct `madvise`): zeros, or for a private file mapping the file's bytes. Nothing when the
    /// page is there. A dropped page's read-only replicas hold the bytes it had: they go.
    pub(super) fn refill_dropped(&self, st: &mut SpaceState, a: VirtAddr) -> Result<()> {
        let v = st.vma(a).expect("caller found the pte");
        let src = match &v.file {
            None => &self.zero,
            Some(f) => {
                // Under the state lock the bounce buffer is ours.
                let inside =
                    f.cache
                        .read_pages_into(f.pgoff + v.idx(a) as u64, 1, &self.bounce, 0)?;
                if inside == 0 {
                    return Err(Error::NotMapped { addr: a });
                }
                &self.bounce
            }
        };
        match self.mm.install(a, src, 0, PAGE_SIZE, v.mode) {
            Ok(()) => {
                if st.pte(a).is_some_and(|p| p.replicated()) {
                    let one = VaRange {
                        start: a,
                        end: a.add(PAGE_SIZE),
                    };
                    self.drop_replicas(st, one);
                }
                Ok(())
            }
            Err(sys::UffdError::Exists) => Ok(()),
            Err(e) => Err(Error::uffd("refill a dropped page", e, a)),
        }
    }

    /// First touch: zero-fill a run of missing pages around `a` (fault-around: 64 KiB, doubling
    /// up to [`MAX_FAULT_AROUND`] while faults come in sequence; a whole 2 MiB unit in a large
    /// mapping).
    /// Anonymous first touch, with the space's lock released across the copy: the run of
    /// missing pages around `a` (as [`Self::fault_zero`] chooses it) is marked MIGRATING and
    /// registered under the lock (a fault on it waits, operations over it wait, migrations skip
    /// it), zero-filled without the lock (so two threads touching disjoint ranges of one space
    /// fill at once), then committed under the lock again and the waiters woken.
    pub(super) fn fault_zero_unlocked(
        &self,
        mut st: Guard<'_, SpaceState>,
        a: VirtAddr,
    ) -> Result<()> {
        let (s, e, start, whole_unit, mode) = self.zero_run(&st, a, MAX_FAULT_AROUND);
        let run = VaRange {
            start,
            end: start.add((e - s) * PAGE_SIZE),
        };
        let (writable, faulted) = self.huge_fill_plan(&mut st, a, e - s);
        st.mark_migrating(run);
        let id = st.register_claim(run);
        drop(st);
        let mut res = Ok(());
        let mut done = 0;
        while done < e - s {
            let n = (e - s - done).min(PAGES_PER_LARGE);
            let dst = start.add(done * PAGE_SIZE);
            if writable && dst != faulted && self.zero_fill_unit(dst, n, mode) {
                done += n;
                continue;
            }
            match self.mm.install(dst, &self.zero, 0, n * PAGE_SIZE, mode) {
                Ok(()) | Err(sys::UffdError::Exists) => done += n,
                Err(err) => {
                    // Nothing of the run may stay mapped while its entries say missing.
                    let _ = self.mm.zap(run);
                    res = Err(Error::uffd("zero-fill", err, dst));
                    break;
                }
            }
        }
        let mut st = self.lock_state();
        for k in 0..e - s {
            let ak = start.add(k * PAGE_SIZE);
            let pte = st.pte(ak).expect("a registered run is not unmapped");
            st.set_pte(
                ak,
                if res.is_ok() {
                    Pte::present(whole_unit, pte)
                } else {
                    pte.with_migrating(false)
                },
            );
        }
        st.release_claim(id);
        if res.is_ok() {
            let (_, w) = fault_around_state();
            set_fault_around_state(run.end.get(), w);
            self.counters
                .zero_fill_pages
                .fetch_add((e - s) as u64, Ordering::Relaxed);
        }
        self.mm.wake(
            VaRange {
                start: a,
                end: a.add(PAGE_SIZE),
            },
            mode,
        );
        drop(st);
        self.notify_migrations_done();
        res
    }

    /// Fault-back of a device-private page (its 2 MiB unit if it is one) in the faulting
    /// thread, with the space's lock released across the copy: under the lock the device
    /// mappings are invalidated and the unit is marked and registered (as a migration's pages);
    /// the copy from the frame runs without the lock (the frame stays allocated and owned: its
    /// eviction, another migration and an unmap all wait for the mark); the entries are
    /// committed and the frame freed under the lock again. For a host-addressable device only
    /// (a copy through the bounce buffer needs the lock held).
    pub(super) fn fault_back_unlocked(
        &self,
        mut st: Guard<'_, SpaceState>,
        a: VirtAddr,
    ) -> Result<()> {
        let pte = st.pte(a).expect("caller found the pte");
        let r = unit_range(a, pte.large());
        let head = st.pte(r.start).expect("unit inside the mapping");
        let pm = st.pagemap(head.pagemap());
        let mode = st.vma(a).expect("mapped").mode;
        self.invalidate(&st, r, NotifyEvent::Migrate, None);
        st.mark_migrating(r);
        let id = st.register_claim(r);
        drop(st);
        pm.charge_migration(r.len());
        let host = pm.store().host_view().expect("checked by the caller");
        let res = match self
            .mm
            .install(r.start, host, head.frame().offset(), r.len(), mode)
        {
            Ok(()) | Err(sys::UffdError::Exists) => Ok(()),
            Err(e) => {
                // Drop what the failed install filled: the pages stay in device memory only.
                let _ = self.mm.zap(r);
                Err(Error::uffd("copy back to system memory", e, r.start))
            }
        };
        let mut st = self.lock_state();
        for k in 0..r.pages() {
            let ak = r.start.add(k * PAGE_SIZE);
            let p = st.pte(ak).expect("a registered unit is not unmapped");
            st.set_pte(
                ak,
                if res.is_ok() {
                    Pte::present(pte.large(), p)
                } else {
                    p.with_migrating(false)
                },
            );
        }
        st.release_claim(id);
        if res.is_ok() {
            self.counters
                .pages_to_system
                .fetch_add(r.pages() as u64, Ordering::Relaxed);
            st.trace_with(|| {
                TraceEvent::moved(
                    EventKind::Migrate,
                    Direction::ToSystem,
                    self.id,
                    r.start,
                    r.pages(),
                    pm.owner(),
                )
            });
        }
        drop(st);
        self.notify_migrations_done();
        if res.is_ok() {
            // Nothing names the frame any more: freed without the space's lock.
            pm.free(head.frame(), pte.large());
        }
        res
    }

    /// Before a first touch at `a` fills a run of `pages` pages: hints the mapping for huge
    /// pages when the run is 512 KiB or more ([`Self::prefer_huge`]) and says which units
    /// of the run may get one ([`Self::zero_fill_unit`]): whether the mapping is writable
    /// (a move into a read-only one is refused), and the start of a unit that may not, the
    /// faulting unit of a mapping that was not hinted when the fault came (the fault left a
    /// page table in it, where the kernel would split the huge page after it was zeroed;
    /// `VirtAddr(0)` when none).
    fn huge_fill_plan(&self, st: &mut SpaceState, a: VirtAddr, pages: usize) -> (bool, VirtAddr) {
        let Some(v) = st.vma(a) else {
            return (false, VirtAddr(0));
        };
        let (writable, hinted) = (v.prot.writable(), v.huge_hint);
        // A run of 512 KiB is the fourth fault in sequence: the window will reach whole units
        // two faults later, and hinting now leaves no page table in them.
        if pages >= PAGES_PER_LARGE / 4 {
            self.prefer_huge(st, a);
        }
        let faulted = if hinted {
            VirtAddr(0)
        } else {
            VirtAddr(a.get() & !(LARGE_PAGE_SIZE - 1))
        };
        (writable, faulted)
    }

    /// Asks the kernel for huge pages on the anonymous mapping holding `a`, once: a large
    /// mapping when it is made, a plain one when a first touch fills 512 KiB (its faults come
    /// in sequence, and [`Self::zero_fill_unit`] can give the units ahead huge pages). Without
    /// the hint a fault leaves a page table in its unit, where no huge page fits
    /// any more; with it, the kernel allocates and zeroes a huge page on every store to a unit
    /// with no page and throws it away before reporting the fault (its huge-page fault path
    /// allocates first: 85 µs per such fault instead of 30 measured by a review), which is why
    /// a mapping whose first touches never come in sequence (sparse stores) is never hinted.
    pub(super) fn prefer_huge(&self, st: &mut SpaceState, a: VirtAddr) {
        if let Some(v) = st.vma_mut(a)
            && !v.huge_hint
            && v.file.is_none()
        {
            v.huge_hint = true;
            self.mm.prefer_huge(v.range);
        }
    }

    /// Zero-fills the `n` missing pages at `dst` in one step when they are a whole aligned
    /// 2 MiB unit and the kernel can ([`Mm::zero_fill_unit`]: a zeroed huge page moved in);
    /// false otherwise (the caller copies zeros).
    fn zero_fill_unit(&self, dst: VirtAddr, n: usize, mode: FaultMode) -> bool {
        let whole = n == PAGES_PER_LARGE && dst.get().is_multiple_of(LARGE_PAGE_SIZE);
        let done = whole && self.mm.zero_fill_unit(dst, mode);
        if done {
            self.counters
                .huge_zero_units
                .fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    /// The run of missing anonymous pages a first touch at `a` fills (fault-around: 64 KiB,
    /// doubling up to [`MAX_FAULT_AROUND`] while the thread's faults come in sequence; a whole
    /// unit of a large mapping):
    /// (first index, end index, first address, whether it is a whole 2 MiB unit, fault mode).
    fn zero_run(
        &self,
        st: &SpaceState,
        a: VirtAddr,
        max: usize,
    ) -> (usize, usize, VirtAddr, bool, FaultMode) {
        let v = st.vma(a).expect("caller found the pte");
        let (vs, ve, large, mode, unit) = (
            v.range.start.get(),
            v.range.end.get(),
            v.large,
            v.mode,
            v.unit_of(v.idx(a)),
        );
        let win = if large && unit.is_some() {
            LARGE_PAGE_SIZE
        } else {
            let (next, window) = fault_around_state();
            let w = if a.get() == next {
                (window * 2).clamp(64 << 10, max)
            } else {
                64 << 10
            };
            set_fault_around_state(next, w);
            w
        };
        let ws = (a.get() & !(win - 1)).max(vs);
        let we = ((a.get() & !(win - 1)) + win).min(ve);
        let i = v.idx(a);
        let (lo, hi) = (v.idx(VirtAddr(ws)), v.idx(VirtAddr(we)));
        let mut s = i;
        while s > lo && v.ptes[s - 1].state() == PageState::None && !v.ptes[s - 1].migrating() {
            s -= 1;
        }
        let mut e = i + 1;
        while e < hi && v.ptes[e].state() == PageState::None && !v.ptes[e].migrating() {
            e += 1;
        }
        (s, e, v.addr(s), large && unit == Some((s, e)), mode)
    }

    /// First touch under the lock (pins and `range_fault` asking for a missing page, and
    /// private file mappings, whose fills use the bounce buffer): the run [`Self::zero_run`]
    /// chooses, zero-filled or read from the file.
    pub(super) fn fault_zero(&self, st: &mut SpaceState, a: VirtAddr) -> Result<()> {
        let (mut s, mut e, _, whole_unit, mode) = self.zero_run(st, a, MAX_FAULT_AROUND);
        let (writable, faulted) = self.huge_fill_plan(st, a, e - s);
        let v = st.vma(a).expect("caller found the pte");
        let i = v.idx(a);
        // A private file mapping fills from the file (up to its end; past it: SIGBUS).
        let source = v.file.as_ref().map(|f| (f.cache.clone(), f.pgoff));
        if let Some((cache, pgoff)) = &source {
            let eof = cache.len_pages();
            if pgoff + i as u64 >= eof {
                return Err(Error::NotMapped { addr: a });
            }
            e = e.min((eof - pgoff) as usize);
            // Pages whose data a memory failure lost are never mapped: the run stops short of
            // them (an access to one is SIGBUS).
            let p = |k: usize| pgoff + k as u64;
            let (ls, le) = cache.unlost_run(p(s), p(i), p(e))?;
            (s, e) = ((ls - pgoff) as usize, (le - pgoff) as usize);
        }
        let start = v.addr(s);
        let whole_unit = whole_unit && source.is_none();
        let mut done = 0;
        while done < e - s {
            let mut n = (e - s - done).min(PAGES_PER_LARGE);
            let dst = start.add(done * PAGE_SIZE);
            let (src, off) = match &source {
                None if writable && dst != faulted && self.zero_fill_unit(dst, n, mode) => {
                    done += n;
                    continue;
                }
                None => (&self.zero, 0),
                Some((cache, pgoff)) => {
                    // Under the state lock the bounce buffer is ours.
                    let file_page = pgoff + (s + done) as u64;
                    let inside = cache.read_pages_into(file_page, n, &self.bounce, 0)?;
                    if inside < n {
                        // The file shrank since its end was read above: the run stops at the
                        // new end (an access past it is SIGBUS, never zeros).
                        (e, n) = (s + done + inside, inside);
                        if i >= e {
                            let _ = self.mm.zap(VaRange { start, end: dst });
                            return Err(Error::NotMapped { addr: a });
                        }
                        if n == 0 {
                            break;
                        }
                    }
                    (&self.bounce, 0)
                }
            };
            match self.mm.install(dst, src, off, n * PAGE_SIZE, mode) {
                Ok(()) | Err(sys::UffdError::Exists) => {}
                Err(err) => {
                    // Nothing of the run may stay mapped while its entries say missing.
                    let _ = self.mm.zap(VaRange {
                        start,
                        end: start.add((e - s) * PAGE_SIZE),
                    });
                    return Err(Error::uffd("zero-fill", err, dst));
                }
            }
            done += n;
        }
        let v = st.vma_mut(a).expect("caller found the pte");
        for p in &mut v.ptes[s..e] {
            *p = Pte::present(whole_unit, *p);
        }
        let (_, w) = fault_around_state();
        set_fault_around_state(start.get() + (e - s) * PAGE_SIZE, w);
        self.counters
            .zero_fill_pages
            .fetch_add((e - s) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes page `a` present in system memory: zero-fills a missing page, migrates a
    /// device-private page back (`migrate_to_ram`: the whole 2 MiB unit if it is one), revokes
    /// device-exclusive access. Device mappings are invalidated first.
    pub(crate) fn make_present(&self, st: &mut SpaceState, a: VirtAddr) -> Result<()> {
        let pte = st.pte(a).ok_or(Error::NotMapped { addr: a })?;
        if pte.migrating() {
            // A migration in flight owns it: the caller retries without holding the lock
            // (`range_fault` returns EBUSY, a pin waits for the migration).
            return Err(Error::Busy);
        }
        if let Some((cache, page)) = st.file_page(a) {
            // A file page is present once it is in the cache (any mapping then maps it).
            return match cache.fault_fill(page, false)? {
                Fill::Filled => Ok(()),
                Fill::PastEof => Err(Error::NotMapped { addr: a }),
                // Being removed, or in device-private memory: the caller (range_fault, pin)
                // settles the page ([`FileCache::settle`]) without holding locks and retries.
                Fill::Busy | Fill::Device => Err(Error::Busy),
            };
        }
        match pte.state() {
            PageState::Present => Ok(()),
            PageState::None => {
                let (mode, large, file) = {
                    let v = st.vma(a).expect("pte");
                    (v.mode, v.large, v.file.is_some())
                };
                if large || file {
                    // As a CPU fault would: a whole 2 MiB unit where it fits (the kernel faults
                    // in a huge page on a MADV_HUGEPAGE range).
                    return self.fault_zero(st, a);
                }
                match self.mm.install(a, &self.zero, 0, PAGE_SIZE, mode) {
                    Ok(()) | Err(sys::UffdError::Exists) => {}
                    Err(e) => {
                        let _ = self.mm.zap(VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        });
                        return Err(Error::uffd("zero-fill", e, a));
                    }
                }
                st.set_pte(a, Pte::present(false, pte));
                self.counters
                    .zero_fill_pages
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            PageState::Device => self.device_to_system(st, a, pte, EventKind::Migrate),
            PageState::Exclusive => {
                let r = VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                };
                self.invalidate(st, r, NotifyEvent::Clear, None);
                self.restore_from_frame(st, r, pte.frame(), self.stash.id(), false)?;
                self.counters
                    .exclusive_revoked
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Brings the device-private page `a` (entry `pte`; its whole 2 MiB unit if it is one) back
    /// to system memory (`migrate_to_ram`), recording it in the trace as `kind` (a migration, or
    /// an eviction).
    pub(super) fn device_to_system(
        &self,
        st: &mut SpaceState,
        a: VirtAddr,
        pte: Pte,
        kind: EventKind,
    ) -> Result<()> {
        let r = unit_range(a, pte.large());
        self.invalidate(st, r, NotifyEvent::Migrate, None);
        let head = st.pte(r.start).expect("unit inside the mapping");
        self.restore_from_frame(st, r, head.frame(), head.pagemap(), pte.large())?;
        self.counters
            .pages_to_system
            .fetch_add(r.pages() as u64, Ordering::Relaxed);
        st.trace_with(|| {
            let owner = st.pagemap(head.pagemap()).owner();
            TraceEvent::moved(
                kind,
                Direction::ToSystem,
                self.id,
                r.start,
                r.pages(),
                owner,
            )
        });
        Ok(())
    }

    /// Copies frames back into the CPU view at `r` (missing there), marks the pages present and
    /// frees the frames. Caller invalidated device mappings of `r`.
    pub(crate) fn restore_from_frame(
        &self,
        st: &mut SpaceState,
        r: VaRange,
        head: FrameIdx,
        pm: PagemapId,
        large: bool,
    ) -> Result<()> {
        let pagemap = st.pagemap(pm);
        pagemap.charge_migration(r.len());
        let mode = st.vma(r.start).expect("mapped").mode;
        match self.install_from_frame(r.start, &pagemap, head.offset(), r.len(), mode, false) {
            Ok(()) | Err(sys::UffdError::Exists) => {}
            Err(e) => {
                // Drop what the failed install filled: the pages stay in device memory only.
                let _ = self.mm.zap(r);
                return Err(Error::uffd("copy back to system memory", e, r.start));
            }
        }
        for p in 0..r.pages() {
            let a = r.start.add(p * PAGE_SIZE);
            let old = st.pte(a).expect("mapped");
            st.set_pte(a, Pte::present(large, old));
        }
        if large {
            pagemap.free(head, true);
        } else {
            for p in 0..r.pages() {
                pagemap.free(FrameIdx(head.0 + p as u32), false);
            }
        }
        Ok(())
    }

    /// Moves a coherent-resident page (its whole 2 MiB unit if it is one) to system memory:
    /// device mappings are invalidated (MIGRATE), the device frame is released. The bytes stay
    /// where they are: in the emulation the CPU page is the coherent frame (see
    /// docs/architecture.md), so this is the kernel's `migrate_device_coherent_folio` without the
    /// copy.
    pub(crate) fn demote_coherent(&self, st: &mut SpaceState, a: VirtAddr) {
        self.demote_coherent_as(st, a, EventKind::Migrate)
    }

    /// A store (the CPU's or a device's) to a coherent page the CPU shares copy-on-write with a
    /// forked child (`Pte::fork_cow`, write-protected after the fork: module `fork`). While the
    /// child still maps the page, it moves to system memory first, where the kernel's
    /// copy-on-write copy lands (as the kernel's own device-coherent pages, whose copies are
    /// system pages); once it is the parent's alone again (the child exited or wrote its own
    /// copy), it stays where it is. Either way the mark and the protection go (the whole unit
    /// of a large page).
    pub(crate) fn resolve_fork_cow(&self, st: &mut SpaceState, a: VirtAddr) -> Result<()> {
        let Some(pte) = st.pte(a) else {
            return Ok(());
        };
        if !pte.fork_cow() {
            return Ok(());
        }
        let unit = unit_range(a, pte.large());
        if self.mm.range_shared(unit) {
            self.demote_coherent_as(st, a, EventKind::Migrate);
        }
        for q in 0..unit.pages() {
            let b = unit.start.add(q * PAGE_SIZE);
            if let Some(p) = st.pte(b) {
                st.set_pte(b, p.without_fork_cow());
            }
        }
        let mode = st.vma(a).ok_or(Error::NotMapped { addr: a })?.mode;
        self.mm
            .write_protect(unit, false, mode)
            .map_err(|e| Error::uffd("a store to a page shared with a forked child", e, a))
    }

    /// [`Self::demote_coherent`], recorded in the trace as `kind`.
    pub(super) fn demote_coherent_as(&self, st: &mut SpaceState, a: VirtAddr, kind: EventKind) {
        let Some(pte) = st.pte(a) else { return };
        if !pte.is_coherent() {
            return;
        }
        let r = unit_range(a, pte.large());
        let (start, n) = (r.start, r.pages());
        self.invalidate(st, r, NotifyEvent::Migrate, None);
        let head = st.pte(start).expect("unit inside the mapping");
        let pm = st.pagemap(head.pagemap());
        // A real coherent device copies the page out: charge it like a migration.
        pm.charge_migration(n * PAGE_SIZE);
        pm.free(head.frame(), pte.large());
        for p in 0..n {
            let ap = start.add(p * PAGE_SIZE);
            let old = st.pte(ap).expect("mapped");
            st.set_pte(ap, Pte::present(pte.large(), old));
        }
        self.counters
            .pages_to_system
            .fetch_add(n as u64, Ordering::Relaxed);
        let owner = pm.owner();
        st.trace_with(|| TraceEvent::moved(kind, Direction::ToSystem, self.id, start, n, owner));
    }

    /// Device eviction of one frame under the state lock the caller holds (a migration that
    /// makes room in a full device): if page `vpn` of this space still lives in `frame` of
    /// `pm`, bring it back to system memory. Returns the pages moved (a 2 MiB unit moves whole).
    pub(crate) fn evict_frame_locked(
        &self,
        st: &mut SpaceState,
        pm: &Pagemap,
        frame: FrameIdx,
        vpn: usize,
    ) -> Result<usize> {
        let a = Vpn(vpn).addr();
        let Some(pte) = st.pte(a) else { return Ok(0) };
        if pte.migrating() {
            // A migration in flight owns it (only a migration evicting to make room gets here).
            return Ok(0);
        }
        let n = if pte.large() { PAGES_PER_LARGE } else { 1 };
        if pte.device_frame().map(|(p, f, _)| (p, f)) != Some((pm.id(), frame))
            || pte.state() == PageState::Exclusive
        {
            return Ok(0);
        }
        if pte.is_coherent() {
            self.demote_coherent_as(st, a, EventKind::Evict);
            return Ok(n);
        }
        self.device_to_system(st, a, pte, EventKind::Evict)
            .map(|()| n)
    }
}

/// Records why a fault in a mapping could not be served (printed if the access then takes the
/// default SIGBUS action) and returns false.
pub(super) fn unserved(why: &'static str) -> bool {
    sys::note_unserved_fault(why);
    false
}

/// The unit holding page `a`: its 2 MiB unit when `large`, else the page itself.
pub(super) fn unit_range(a: VirtAddr, large: bool) -> VaRange {
    let (start, len) = if large {
        (VirtAddr(a.get() & !(LARGE_PAGE_SIZE - 1)), LARGE_PAGE_SIZE)
    } else {
        (a.page_down(), PAGE_SIZE)
    };
    VaRange {
        start,
        end: start.add(len),
    }
}

thread_local! {
    /// This thread's anonymous fault-around run: the address right after its last window, and
    /// that window's size in bytes (per thread, so that threads faulting sequentially through
    /// disjoint ranges do not break each other's runs; a `const` thread-local of a `Copy` type:
    /// readable from the SIGBUS handler without lazy initialisation).
    static FAULT_AROUND: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// The calling thread's anonymous fault-around run (next address, window).
fn fault_around_state() -> (usize, usize) {
    FAULT_AROUND.with(|c| c.get())
}

/// Sets the calling thread's anonymous fault-around run.
fn set_fault_around_state(next: usize, window: usize) {
    FAULT_AROUND.with(|c| c.set((next, window)));
}

/// The most an anonymous first touch fills while the thread's faults come in sequence: four
/// 2 MiB units. The window doubles from 64 KiB with each fault that lands where the previous run
/// ended (64 KiB, 128 KiB, … 8 MiB), so a thread reaches it only after runs of faults in order
/// (the readahead argument; a thread storing once per 64 KiB in order also counts as in
/// order). What it may fill that is never touched: up to 8 MiB past the thread's last store,
/// per thread and mapping (2 MiB while the window was one unit), and a window may reach into
/// the range another thread is touching (that thread then waits for the run and starts its own
/// window again at 64 KiB). Past one unit it fills the next units before the thread reaches
/// them: a store to a unit with no page makes the kernel allocate and zero a huge page that it
/// throws away before reporting the fault (its huge-page fault path allocates first), and that
/// cost is paid once per window instead of once per unit. Sequential first touch per 4 KiB
/// (64 MiB, this VM): 0.35 µs with windows of one unit, 0.29–0.31 with two, 0.26–0.28 with
/// four, 0.27 with eight; the kernel with `MADV_HUGEPAGE` 0.19.
const MAX_FAULT_AROUND: usize = 4 * LARGE_PAGE_SIZE;

/// The most a read of never-written anonymous memory maps of the zero page around it while
/// reads come in sequence (their runs cost no memory, but a later store faults once per page
/// there and those units never get a huge page).
const MAX_ZERO_PAGE_AROUND: usize = LARGE_PAGE_SIZE;
