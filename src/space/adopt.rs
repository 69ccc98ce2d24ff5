//! Plain process memory under hetmem: [`Space::adopt`] lends a range the program mapped itself
//! (from `mmap`, or the allocator's heap) to an address space of its own, so that devices mirror
//! it and migrate its pages exactly as memory hetmem created; dropping the space gives it back.
//!
//! The space's reservation *is* the adopted range (a [`Region`] that is not unmapped on drop),
//! holding one mapping over all of it: every operation that works on reservation offsets (the
//! userfaultfd ioctls, write protection, dropping and installing pages) works on it unchanged.
//! Its pages start as the program left them: a page with data (present, or swapped out, read from
//! `/proc/self/pagemap`) is a system page; one without is a hole, zero-filled on first touch as the
//! kernel would. The range is registered with the space's userfaultfd (MISSING and WP) but keeps
//! the program's fork behaviour (no `MADV_DONTFORK`).
//!
//! # fork
//!
//! Adopted memory keeps the program's fork behaviour: a child of `fork()` gets a copy-on-write
//! copy of it, with the pages that were in device memory at the fork (the `fork` module).
//!
//! Locks: the space's state lock (lock 1) guards the mapping as for any space; adoption itself
//! runs before the space is shared, and giving back runs under it.

use super::*;

/// Configuration of an adoption ([`Space::adopt_with`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct AdoptConfig {
    /// As [`SpaceConfig::user_mode_only`].
    pub user_mode_only: bool,
    /// As [`SpaceConfig::device_private_as_swap`] (the drop-in test device asks for it: the
    /// kernel's own tests read `/proc/self/pagemap`).
    pub device_private_as_swap: bool,
}

impl Space {
    /// Adopts `len` bytes at `addr`, anonymous private memory the program mapped itself (with
    /// `mmap`, or from its allocator), as a new address space over exactly that range: devices
    /// mirror it ([`crate::SoftDevice::mirror`]) and migrate its pages like memory of
    /// [`Space::map_anon`]; the program keeps using its own pointers (its loads and stores fault
    /// into hetmem where a page is in device memory). Its data stays where it is: nothing is
    /// copied at adoption.
    ///
    /// When the last handle of the space is dropped (mirrors hold one), every page comes back
    /// to system memory and the range is plain memory of the program's again.
    ///
    /// The program must not `munmap` the range while it is adopted; a direct `mremap` is
    /// followed as for any managed range (the data goes to the new address, which is plain
    /// memory from then on). [`Space::unmap`] of adopted memory is refused.
    ///
    /// # Safety
    ///
    /// The caller owns the range and keeps it mapped while it is adopted, and no Rust object
    /// lives in it that is read or written through references meanwhile: hetmem and devices
    /// write its bytes (a device write, a page coming back) as any other party sharing memory
    /// would, so it is reached only through raw pointers, volatile accesses or hetmem's own
    /// calls (a `Probe`), as for any managed memory. (Buffers handed to a device through raw
    /// pointers, as C programs do, are exactly that.)
    ///
    /// Errors: [`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] for a malformed range; [`Error::Os`] naming the cause for a range that
    /// is not wholly anonymous private memory (EINVAL), not mapped (ENOMEM), not readable
    /// (EACCES), or already managed (EBUSY: another space's range, or registered with a
    /// userfaultfd). Parts the program protected differently (read-only, read-write) become a
    /// mapping each, with that protection.
    ///
    /// # Examples
    ///
    /// ```
    /// use hetmem::{Space, SoftDevice, VirtAddr};
    /// # fn main() -> hetmem::Result<()> {
    /// // Memory the program got from its allocator (a large buffer is anonymous private memory),
    /// // reached only through its raw address while it is adopted.
    /// let buf: *mut u8 = Box::into_raw(vec![0u8; 6 << 20].into_boxed_slice()).cast();
    /// let start = (buf as usize).next_multiple_of(4096);
    /// let addr = VirtAddr(start);
    /// // SAFETY: the block is ours, stays allocated, and is touched only through `space`
    /// // and raw pointers until the space is dropped.
    /// let space = unsafe { Space::adopt(addr, 4 << 20)? };
    /// let dev = SoftDevice::private(8 << 20)?;
    /// let m = dev.mirror(&space)?;
    /// space.store_u32(addr, 7)?;
    /// m.migrate_range_to_device(addr, 4 << 20)?;
    /// assert_eq!(space.load_u32(addr)?, 7); // faults the page back
    /// drop(m);
    /// drop(space); // plain memory again
    /// // SAFETY: plain memory of ours again; the block is freed right after.
    /// unsafe {
    ///     assert_eq!(std::ptr::read_volatile(start as *const u32), 7);
    ///     drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(buf, 6 << 20)));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    // The only `unsafe` outside `sys`: a contract on the caller (the memory is lent to hetmem),
    // not an unsafe operation; the body has no unsafe block.
    #[allow(unsafe_code)]
    pub unsafe fn adopt(addr: VirtAddr, len: usize) -> Result<Space> {
        // SAFETY: the caller's obligations are those of `adopt_with`.
        unsafe { Self::adopt_with(addr, len, AdoptConfig::default()) }
    }

    /// [`Space::adopt`], configured: see [`AdoptConfig`].
    ///
    /// # Safety
    ///
    /// As for [`Space::adopt`].
    #[allow(unsafe_code)]
    pub unsafe fn adopt_with(addr: VirtAddr, len: usize, cfg: AdoptConfig) -> Result<Space> {
        let r = VaRange::new(addr, len)?;
        // One registry entry per address: memory another space still covers (adopted before,
        // even if the program unmapped it since) is refused rather than shadowed.
        if sys::overlaps_registered_range(r.start.get(), r.end.get()) {
            return Err(Error::os(
                "adopt: the range is (partly) another hetmem space's",
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        let (mm, pieces) = KernelMm::adopt(
            r.start.get(),
            r.len(),
            cfg.user_mode_only,
            cfg.device_private_as_swap,
        )
        .map_err(|e| {
            Error::os(
                "adopt: the range must be mapped anonymous private memory",
                e,
            )
        })?;
        // A stash as large as the range: every page may be held exclusively at once (as the
        // kernel allows; a 2 MiB stash refused the 513th page: found by the kernel's own
        // hmm-tests under the drop-in test device). Reserved address space, touched on use.
        let stash = r.len().next_multiple_of(LARGE_PAGE_SIZE);
        let core = Self::make_core(std::sync::Arc::new(mm), stash)?;
        let scan = |core: &SpaceCore| {
            core.mm
                .pages_with_data(r)
                .map_err(|e| Error::os("adopt: read /proc/self/pagemap", e))
        };
        let has_data = scan(&core)?;
        // The 2 MiB units the kernel maps with one PMD (a transparent huge page: the program's
        // MADV_HUGEPAGE or MADV_COLLAPSE): large system pages, as the kernel's migration sees
        // them (it moves such a folio whole to the device; its snapshot then reads PMD). Not
        // known (an old kernel without PAGEMAP_SCAN): base pages.
        let huge: Vec<(usize, usize)> = sys::PagemapScanner::new()
            .and_then(|p| p.huge_mapped(r.start.get(), r.end.get()))
            .unwrap_or_default();
        let in_huge = |a: usize| {
            huge.iter()
                .any(|&(s, e)| s <= a && a + LARGE_PAGE_SIZE <= e)
        };
        let mode = FaultMode::Signal;
        super::fork::install_handlers();
        // The mappings and the registry entry first, the userfaultfd last: from the moment the
        // kernel reports a fault in the range, hetmem serves it. One mapping per protection
        // the program gave parts of the range.
        {
            let mut st = core.lock_state();
            for (s, e, prot) in pieces {
                let piece = VaRange {
                    start: VirtAddr(s),
                    end: VirtAddr(e),
                };
                let mut ptes = new_ptes(piece)?;
                let first = (s - r.start.get()) / PAGE_SIZE;
                for (k, (p, has)) in ptes.iter_mut().zip(&has_data[first..]).enumerate() {
                    if *has {
                        let a = s + k * PAGE_SIZE;
                        let unit = a & !(LARGE_PAGE_SIZE - 1);
                        // Large only where the whole unit is inside this piece, huge-mapped, and
                        // every page of it held data when scanned (a unit collapsed between the
                        // two scans stays base pages, as its empty entries say).
                        let u = (unit - r.start.get()) / PAGE_SIZE;
                        let large = unit >= s
                            && unit + LARGE_PAGE_SIZE <= e
                            && in_huge(unit)
                            && has_data[u..u + LARGE_PAGE_SIZE / PAGE_SIZE]
                                .iter()
                                .all(|&d| d);
                        *p = Pte::present(large, *p);
                    }
                }
                st.insert_vma(piece, prot, mode, false, None, ptes);
            }
        }
        let target: std::sync::Arc<dyn sys::FaultTarget> = core.clone();
        let reg = sys::register_fault_range(r.start.get(), r.end.get(), target)
            .map_err(|e| Error::os("register fault range", e))?;
        core.mm
            .register_adopted(r, mode)
            .map_err(|e| Error::os("adopt: register with userfaultfd", e))?;
        // Pages the program's other threads first touched between the scan and the
        // registration hold data now: they are system pages, not holes.
        let now = scan(&core)?;
        {
            let mut st = core.lock_state();
            for (k, has) in now.into_iter().enumerate() {
                let a = r.start.add(k * PAGE_SIZE);
                if let Some(p) = st.pte(a)
                    && has
                    && p.state() == PageState::None
                    && !p.migrating()
                {
                    st.set_pte(a, Pte::present(false, p));
                }
            }
        }
        debug_event!(space = core.id, start = %r.start, pages = r.pages(), "memory adopted");
        Ok(Space {
            core: core.clone(),
            _reg: Some(Arc::new(Registration {
                adopted: Some(core),
                _range: reg,
            })),
        })
    }

    /// Whether this space is adopted memory ([`Space::adopt`]).
    pub fn is_adopted(&self) -> bool {
        self.core.mm.adopted()
    }
}

impl SpaceCore {
    /// Brings every page of this (adopted) space that is in device memory (private or
    /// coherent) or held exclusively by a device back to system memory, under the state lock once no migration is in flight;
    /// returns the guard. A page that cannot be brought back (its device frame failed) is
    /// reported and reads zeros.
    fn bring_home(&self) -> Guard<'_, SpaceState> {
        let whole = self.mm.reservation();
        let mut st = self.lock_state_for(whole);
        let ranges: Vec<VaRange> = st.vmas.values().map(|v| v.range).collect();
        for r in ranges {
            for k in 0..r.pages() {
                let a = r.start.add(k * PAGE_SIZE);
                let Some(pte) = st.pte(a) else { continue };
                if pte.is_coherent() {
                    // In system memory, as the kernel's copy-on-write or give-back leaves it
                    // (the emulated coherent frame is the CPU page: nothing is copied).
                    self.demote_coherent(&mut st, a);
                    continue;
                }
                if matches!(pte.state(), PageState::Device | PageState::Exclusive)
                    && let Err(e) = self.make_present(&mut st, a)
                {
                    tracing::warn!(
                        target: "hetmem",
                        addr = %a,
                        error = %e,
                        "an adopted page could not be brought back from device memory"
                    );
                }
            }
        }
        st
    }

    /// Brings every page of an adopted space home ([`Self::bring_home`]) and unregisters the
    /// range: plain memory of the program's from then on.
    pub(super) fn give_back(&self) {
        let st = self.bring_home();
        for (r, mode) in st.vmas.values().map(|v| (v.range, v.mode)) {
            self.invalidate(&st, r, NotifyEvent::Release, None);
            let _ = self.mm.forget_moved(r, mode);
        }
        debug_event!(space = self.id, start = %self.mm.reservation().start, "adopted memory given back");
    }
}
