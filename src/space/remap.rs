//! Following a direct `mremap(2)`, `munmap(2)` or `madvise(MADV_DONTNEED)` of a managed range
//! (userfaultfd's REMAP, UNMAP and REMOVE events).

use super::*;

impl SpaceCore {
    /// A direct mremap(2) by the program moved `from..from + len` to `to` (userfaultfd's REMAP
    /// event; the moved range is still registered with hetmem's userfaultfd, and the program's
    /// mremap has returned). hetmem follows it by letting go: every page's data goes to its new
    /// address — device-private pages are copied back there, device-exclusive ones too, coherent
    /// pages are already there (their device frames are released), pages of a private file
    /// mapping not read yet get the file's bytes — then the new range is unregistered and is
    /// plain memory of the program's from then on, and the old range leaves the space as if
    /// unmapped (devices get UNMAP; the hole is the program's address space from then on, kept
    /// out of use). Nothing is lost and nothing reads zeros that were not zeros.
    ///
    /// A shared file mapping cannot be let go that way (stores through the new address could
    /// never be written back to the file): the process is aborted with a message, the loud
    /// failure of an unsupported operation.
    ///
    /// Runs in the event reader thread, which opened a [`sys::RemapWindow`] before reading the
    /// event: until this returns, a signal-mode access to the moved range waits instead of
    /// dying.
    pub(crate) fn follow_remap(&self, from: VirtAddr, to: VirtAddr, len: usize) {
        let (Some(end), Some(_)) = (from.checked_add(len), to.checked_add(len)) else {
            return;
        };
        let old = VaRange { start: from, end };
        let mut st = self.lock_state_for_follow(old);
        if let Some(v) = st
            .vmas
            .values()
            .find(|v| v.range.overlaps(&old) && v.file.as_ref().is_some_and(|f| f.shared))
        {
            let (mut b1, mut b2) = ([0u8; 18], [0u8; 18]);
            sys::abort_with(&[
                b"hetmem: a direct mremap moved the shared file mapping at ",
                sys::hex(v.range.start.get(), &mut b1),
                b" to ",
                sys::hex(to.get(), &mut b2),
                b": not supported (stores through the new address could not be written back \
                  to the file); use Space::unmap and Space::map_file\n",
            ]);
        }
        self.invalidate(&st, old, NotifyEvent::Unmap, None);
        self.split_at(&mut st, old.start);
        self.split_at(&mut st, old.end);
        for v in st.remove_vmas_in(old) {
            let moved = VaRange {
                start: to.add(v.range.start.get() - from.get()),
                end: to.add(v.range.end.get() - from.get()),
            };
            for (i, pte) in v.ptes.iter().enumerate() {
                let dst = moved.start.add(i * PAGE_SIZE);
                let copied = match pte.state() {
                    PageState::Present => Ok(()),
                    PageState::None => match &v.file {
                        // As a first access would have read it.
                        Some(f) => {
                            let mut buf = [0u8; PAGE_SIZE];
                            f.cache
                                .read_pages(f.pgoff + i as u64, &mut buf)
                                .and_then(|()| {
                                    self.bounce
                                        .write(0, &buf)
                                        .map_err(|e| Error::os("fill from file", e))
                                })
                                .and_then(|()| {
                                    self.mm
                                        .install(dst, &self.bounce, 0, PAGE_SIZE, v.mode)
                                        .map_err(|e| Error::uffd("follow mremap", e, dst))
                                })
                        }
                        None => Ok(()),
                    },
                    PageState::Device | PageState::Exclusive => {
                        let (pm, frame, _) = pte.device_frame().expect("device or stash frame");
                        let pool = self.frame_pool(&st, *pte, pm);
                        pool.charge_migration(PAGE_SIZE);
                        self.install_from_frame(
                            dst,
                            &pool,
                            frame.offset(),
                            PAGE_SIZE,
                            v.mode,
                            false,
                        )
                        .map_err(|e| Error::uffd("follow mremap", e, dst))
                    }
                };
                match copied {
                    Ok(()) => {}
                    // The new address is registered no more: the program unmapped (or mapped
                    // over) the moved range since its mremap returned, and its data went with it,
                    // as it would with the kernel alone (found from outside: a program moving a
                    // range away and unmapping it at once was aborted here).
                    Err(Error::NotMapped { .. }) => {}
                    Err(e) => {
                        // Never silently: the page's data could not be placed at its new address.
                        let mut b = [0u8; 18];
                        let msg = format!(" ({e})\n");
                        sys::abort_with(&[
                            b"hetmem: following a direct mremap, the data of page ",
                            sys::hex(dst.get(), &mut b),
                            b" could not be copied to its new address",
                            msg.as_bytes(),
                        ]);
                    }
                }
            }
            let _ = self.mm.forget_moved(moved, v.mode);
            self.free_frames(&st, &v.ptes);
        }
        // The old range is the program's address space now.
        self.mm.disown(old);
        st.lost.push(old);
        self.counters.foreign_remaps.fetch_add(1, Ordering::Relaxed);
    }

    /// The program unmapped `start..end` with a direct munmap (or an mremap that shrank a
    /// mapping, or an mmap with MAP_FIXED over it: `UFFD_EVENT_UNMAP`; the kernel has dropped
    /// the range already), and the event reader follows it: devices are told (UNMAP: they drop
    /// their mappings), the device frames of its pages are freed, and the range leaves the
    /// space, as after [`Space::unmap`]. Stores the CPU made through a shared file mapping there
    /// since its last scan cannot be told from the page tables any more: every cached page of
    /// the mapping counts as written (the next fsync writes it back). The range is the
    /// program's address space from then on: kept out of use and left alone when the
    /// reservation is unmapped ([`Mm::disown`]). Migrations over the range finish first (their
    /// copies from the gone range fail, their pages are declined).
    ///
    /// An mremap that moves a mapping reports REMAP, then UNMAP of the old range, which
    /// [`Self::follow_remap`] has already let go: nothing is left to follow then.
    pub(crate) fn follow_unmap(&self, start: usize, end: usize) {
        let r = VaRange {
            start: VirtAddr(start),
            end: VirtAddr(end),
        };
        // The range is the program's from now on, whatever the space still lists there (a
        // concurrent `Space::unmap` of it must not map over memory the program maps there next).
        self.mm.disown(r);
        let mut st = self.lock_state_for_follow(r);
        if !st.vmas.values().any(|v| v.range.overlaps(&r)) {
            return;
        }
        self.invalidate(&st, r, NotifyEvent::Unmap, None);
        self.split_at(&mut st, r.start);
        self.split_at(&mut st, r.end);
        for v in st.remove_vmas_in(r) {
            if let Some(f) = v.file.as_ref().filter(|f| f.shared) {
                f.cache.detach_unmapped(self.id, v.range);
            }
            self.free_frames(&st, &v.ptes);
        }
        // The range is the program's address space now (disowned above): never used again.
        st.lost.push(r);
        drop(st);
        self.counters.foreign_unmaps.fetch_add(1, Ordering::SeqCst);
        debug_event!(space = self.id, start = %r.start, end = %r.end, "managed memory unmapped by the program");
    }

    /// The program dropped the pages of `start..end` with a direct `madvise` (`MADV_DONTNEED`,
    /// `MADV_FREE`, `MADV_REMOVE`: `UFFD_EVENT_REMOVE`; the kernel drops the CPU's pages once
    /// the event is read), and the event reader follows it, as the kernel's drop would treat
    /// pages in device memory: every page there reads zeros afterwards, or a private file
    /// mapping's bytes, on the CPU and on every device. Devices are told (CLEAR: they drop their
    /// mappings of the range and their replicas), and the device and stash frames of pages in
    /// device memory, held exclusively or device-coherent are freed; pages the space holds as
    /// present are refilled on their next access, as after any drop behind its back.
    ///
    /// hetmem's own drops that raise the event never get here: the reader tells them apart as
    /// it reads them (`sys::record_own_remove`).
    /// Shared file mappings are left alone: `MADV_DONTNEED` drops no data there (the cache
    /// keeps its pages), and their userfaultfd does not report `MADV_REMOVE` (see
    /// docs/architecture.md). Migrations over the range finish first.
    pub(crate) fn follow_remove(&self, start: usize, end: usize) {
        let r = VaRange {
            start: VirtAddr(start),
            end: VirtAddr(end),
        };
        // Pages a no-fault zone refills from here on were dropped by the kernel already.
        let refills = sys::zone_refills();
        let mut st = self.lock_state_for_follow(r);
        let parts: Vec<VaRange> = st
            .vmas
            .values()
            .filter(|v| v.range.overlaps(&r) && !v.file.as_ref().is_some_and(|f| f.shared))
            .map(|v| VaRange {
                start: v.range.start.max(r.start),
                end: v.range.end.min(r.end),
            })
            .collect();
        if parts.is_empty() {
            return;
        }
        for part in parts {
            // A large unit the drop cuts becomes base pages first.
            for a in [part.start, part.end] {
                if !a.get().is_multiple_of(LARGE_PAGE_SIZE) {
                    self.split_unit(&mut st, a);
                }
            }
            self.drop_replicas(&mut st, part);
            self.invalidate(&st, part, NotifyEvent::Clear, None);
            let v = st.vma(part.start).expect("a part of a mapping");
            let (i, j) = (v.idx(part.start), v.idx(part.start) + part.pages());
            let held: Vec<Pte> = v.ptes[i..j]
                .iter()
                .map(|p| {
                    if p.device_frame().is_some() {
                        *p
                    } else {
                        Pte::NONE
                    }
                })
                .collect();
            self.free_frames(&st, &held);
            // Pages held present that the kernel dropped (all of them, but for a copy that
            // landed after the drop and was dropped again: `sys::removes_pending_in`) are
            // missing from now on: the next access fills them as the kernel would (zeros, or a
            // private file mapping's bytes), and a migration never copies from them. The reader
            // may get here before the program's madvise, released by the read, has dropped
            // them: a migration starting after this follow would then copy the data being
            // dropped, for good (found by a test). Nothing else can fill them meanwhile (faults
            // and device commands wait for this follow), so wait, bounded, until the kernel has
            // dropped them (`MADV_FREE` may never: then they stay as they are).
            let keeps = |p: &Pte| {
                p.state() == PageState::Present && !p.pinned() && !p.migrating() && !p.large()
            };
            let mut has_data = self.mm.pages_with_data(part).ok();
            let v = st.vma(part.start).expect("a part of a mapping");
            let mut tries = 0;
            while tries < 1000
                && has_data.as_ref().is_some_and(|d| {
                    v.ptes[i..j]
                        .iter()
                        .zip(d)
                        .enumerate()
                        .any(|(k, (p, &data))| {
                            keeps(p)
                                && data
                                && !sys::zone_refilled_since(
                                    part.start.get() + k * PAGE_SIZE,
                                    refills,
                                )
                        })
                })
            {
                // Meanwhile the program's next madvise must not wait for this one (found from
                // outside: under load a fault's fill then got EAGAIN until it gave up).
                sys::Uffd::drain_on_reader_holding_state();
                crate::sync::thread::yield_now();
                tries += 1;
                has_data = self.mm.pages_with_data(part).ok();
            }
            let v = st.vma_mut(part.start).expect("a part of a mapping");
            for (k, (p, h)) in v.ptes[i..j].iter_mut().zip(&held).enumerate() {
                let dropped_present = keeps(p) && has_data.as_ref().is_some_and(|d| !d[k]);
                if h.device_frame().is_some() || dropped_present {
                    *p = Pte::NONE;
                }
            }
        }
        drop(st);
        self.counters.foreign_removes.fetch_add(1, Ordering::SeqCst);
        debug_event!(space = self.id, start = %r.start, end = %r.end, "managed memory dropped by the program");
    }
}
