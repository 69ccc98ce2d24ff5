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
//! copy of it, as of any anonymous private memory. The kernel copies only what the CPU's page
//! tables hold, so hetmem's fork handlers (`pthread_atfork`, installed with the first adoption)
//! bring every page of every adopted space back from device memory first, and hold the *fork
//! gate* from then until the fork is done: a migration of adopted memory towards a device
//! (`migrate_vma_setup`, device-exclusive grants) holds the gate shared for its whole life, so
//! none runs across the fork. The child sees the parent's data and its writes stay its own (the
//! registration is not inherited: the child's copy is plain memory); the parent's pages may
//! move to the device again afterwards. A raw `clone` system call runs no handler: pages in
//! device memory then read zeros in the child.
//!
//! Locks: the space's state lock (lock 1) guards the mapping as for any space; adoption itself
//! runs before the space is shared, and giving back runs under it. The fork gate (a `std`
//! reader-writer lock, process-wide, not ordered with hetmem's levels) is taken before any
//! hetmem lock: shared at migration setup before lock 1, exclusive by the fork handler before
//! it takes the state locks of the adopted spaces one at a time.

use super::*;

/// Held shared by every migration of adopted memory towards a device, exclusively across a
/// `fork()` (module doc, "fork").
static FORK_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    /// The fork handler's hold of [`FORK_GATE`], from `prepare` until `parent`/`child` (the
    /// forking thread runs all three; in the child it is the only thread).
    static FORK_HELD: std::cell::RefCell<Option<std::sync::RwLockWriteGuard<'static, ()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether the fork handlers are installed (with the first adoption).
static FORK_HANDLERS: std::sync::Once = std::sync::Once::new();

/// A shared hold of the fork gate for a migration of `core`'s memory towards a device: `Some`
/// for adopted memory (no fork comes between its setup and its finalize), `None` otherwise.
pub(crate) fn fork_gate(core: &SpaceCore) -> Option<std::sync::RwLockReadGuard<'static, ()>> {
    core.mm
        .adopted()
        .then(|| FORK_GATE.read().unwrap_or_else(|p| p.into_inner()))
}

extern "C" fn before_fork() {
    let g = FORK_GATE.write().unwrap_or_else(|p| p.into_inner());
    let spaces: Vec<Arc<SpaceCore>> = {
        let t = SPACES.lock().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .flatten()
            .filter_map(|w| w.upgrade())
            .filter(|c| c.mm.adopted() && c.check_process().is_ok())
            .collect()
    };
    for core in &spaces {
        core.bring_home();
    }
    drop(spaces);
    FORK_HELD.with(|h| *h.borrow_mut() = Some(g));
}

extern "C" fn after_fork() {
    FORK_HELD.with(|h| h.borrow_mut().take());
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
    /// Errors: [`Error::Unaligned`], [`Error::ZeroLength`], [`Error::UnalignedLength`],
    /// [`Error::Overflow`] for a malformed range; [`Error::Os`] naming the cause for a range that
    /// is not wholly anonymous private memory of one protection (EINVAL), not mapped (ENOMEM),
    /// not readable (EACCES), or already managed (EBUSY, from the userfaultfd).
    ///
    /// # Examples
    ///
    /// ```
    /// use hetmem::{Space, SoftDevice, VirtAddr};
    /// # fn main() -> hetmem::Result<()> {
    /// // Memory the program got from its allocator (a large buffer is anonymous private memory).
    /// let mut buf = vec![0u8; 6 << 20];
    /// let start = (buf.as_mut_ptr() as usize).next_multiple_of(4096);
    /// let addr = VirtAddr(start);
    /// let space = Space::adopt(addr, 4 << 20)?;
    /// let dev = SoftDevice::private(8 << 20)?;
    /// let m = dev.mirror(&space)?;
    /// space.store_u32(addr, 7)?;
    /// m.migrate_range_to_device(addr, 4 << 20)?;
    /// assert_eq!(space.load_u32(addr)?, 7); // faults the page back
    /// drop(m);
    /// drop(space); // plain memory again
    /// assert_eq!(buf[start - buf.as_ptr() as usize], 7);
    /// # Ok(())
    /// # }
    /// ```
    pub fn adopt(addr: VirtAddr, len: usize) -> Result<Space> {
        let r = VaRange::new(addr, len)?;
        let (mm, prot) = KernelMm::adopt(r.start.get(), r.len(), false).map_err(|e| {
            Error::os(
                "adopt: the range must be mapped anonymous private memory",
                e,
            )
        })?;
        let core = Self::make_core(std::sync::Arc::new(mm), 2 << 20)?;
        let ptes = {
            let mut ptes = new_ptes(r)?;
            let data = core
                .mm
                .pages_with_data(r)
                .map_err(|e| Error::os("adopt: read /proc/self/pagemap", e))?;
            for (p, has) in ptes.iter_mut().zip(data) {
                if has {
                    *p = Pte::present(false, *p);
                }
            }
            ptes
        };
        let mode = FaultMode::Signal;
        FORK_HANDLERS.call_once(|| {
            if let Err(e) = sys::on_fork(before_fork, after_fork, after_fork) {
                tracing::warn!(target: "hetmem", error = %e, "fork handlers not installed");
            }
        });
        core.mm
            .register_adopted(r, mode)
            .map_err(|e| Error::os("adopt: register with userfaultfd", e))?;
        lock(&core.state).insert_vma(r, prot, mode, false, None, ptes);
        let target: std::sync::Arc<dyn sys::FaultTarget> = core.clone();
        let reg = match sys::register_fault_range(r.start.get(), r.end.get(), target) {
            Ok(reg) => reg,
            Err(e) => {
                let _ = core.mm.forget_moved(r, mode);
                return Err(Error::os("register fault range", e));
            }
        };
        debug_event!(space = core.id, start = %r.start, pages = r.pages(), "memory adopted");
        Ok(Space {
            core,
            _reg: Some(Arc::new(reg)),
        })
    }

    /// Whether this space is adopted memory ([`Space::adopt`]).
    pub fn is_adopted(&self) -> bool {
        self.core.mm.adopted()
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        // The last handle of an adopted space gives the memory back while the fault service
        // still serves it (the registry entry goes with this handle).
        if self.core.mm.adopted()
            && self
                ._reg
                .as_ref()
                .is_some_and(|r| Arc::strong_count(r) == 1)
            && self.core.check_process().is_ok()
        {
            self.core.give_back();
        }
    }
}

impl SpaceCore {
    /// The program unmapped `start..end` of this adopted space with a direct munmap
    /// (`UFFD_EVENT_UNMAP`; the kernel has dropped the range already): devices are told
    /// (UNMAP: they drop their mappings), the device frames of its pages are freed, and the
    /// range leaves the space, as after [`Space::unmap`]. Migrations over it finish first (their
    /// copies into the gone range fail, their pages are declined).
    pub(crate) fn follow_unmap(&self, start: usize, end: usize) {
        let r = VaRange {
            start: VirtAddr(start),
            end: VirtAddr(end),
        };
        let mut st = self.lock_state_for(r);
        self.invalidate(&st, r, NotifyEvent::Unmap, None);
        self.split_at(&mut st, r.start);
        self.split_at(&mut st, r.end);
        for v in st.remove_vmas_in(r) {
            self.free_frames(&st, &v.ptes);
        }
        drop(st);
        self.counters.foreign_unmaps.fetch_add(1, Ordering::SeqCst);
        debug_event!(space = self.id, start = %r.start, end = %r.end, "adopted memory unmapped by the program");
    }

    /// Brings every page of this (adopted) space that is in device memory or held exclusively
    /// by a device back to system memory, under the state lock once no migration is in flight;
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
    fn give_back(&self) {
        let st = self.bring_home();
        for (r, mode) in st.vmas.values().map(|v| (v.range, v.mode)) {
            self.invalidate(&st, r, NotifyEvent::Release, None);
            let _ = self.mm.forget_moved(r, mode);
        }
        debug_event!(space = self.id, start = %self.mm.reservation().start, "adopted memory given back");
    }
}
