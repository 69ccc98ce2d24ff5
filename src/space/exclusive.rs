//! Device-exclusive access (`make_device_exclusive`): the page moves to the stash and the CPU
//! view loses it until a CPU access revokes the grant.

use super::*;

impl SpaceCore {
    /// Grants device-exclusive access to page `a` for the device of pagemap `pm`
    /// (`make_device_exclusive`): the page is faulted in for writing, device mappings are
    /// invalidated (EXCLUSIVE, owner = the device), its data moves to the stash and the CPU view
    /// drops it, so that any CPU access faults and revokes the grant. `map` runs under the state
    /// lock with the stash frame, so that the device maps its atomic entry before any revocation
    /// can run. A pinned page gives [`Error::Busy`].
    pub(crate) fn make_exclusive(
        &self,
        a: VirtAddr,
        pm: &Arc<Pagemap>,
        map: &mut dyn FnMut(VirtAddr, FrameIdx),
    ) -> Result<()> {
        // The whole 2 MiB unit: granting splits a large unit, which must not happen under a
        // migration moving it whole.
        let head = VirtAddr(a.get() & !(LARGE_PAGE_SIZE - 1));
        // No fork starts while a grant is being made (module `fork`).
        let _fork_gate = super::fork::gate();
        let mut st = self.lock_state_for(VaRange {
            start: head,
            end: head.add(LARGE_PAGE_SIZE),
        });
        let v = st.vma(a).ok_or(Error::NotMapped { addr: a })?;
        if !v.prot.readable() {
            return Err(Error::NoRead { addr: a });
        }
        if !v.prot.writable() {
            return Err(Error::NoWrite { addr: a });
        }
        if st.file_page(a).is_some() {
            // As the kernel's make_device_exclusive: anonymous memory only.
            return Err(Error::Busy);
        }
        let pte = st.pte(a).expect("mapped");
        if pte.state() == PageState::Exclusive && pte.pagemap() == pm.id() {
            map(a, pte.frame());
            return Ok(());
        }
        self.make_present(&mut st, a)?;
        // The page leaves device-coherent memory for the stash.
        self.demote_coherent(&mut st, a);
        // Re-read: making the page present may have filled (and marked) a whole 2 MiB unit.
        if st.pte(a).expect("mapped").large() {
            self.split_unit(&mut st, a);
        }
        let pte = st.pte(a).expect("mapped");
        if pte.pinned() {
            return Err(Error::Busy);
        }
        self.add_pagemap(&mut st, pm);
        let r = VaRange {
            start: a,
            end: a.add(PAGE_SIZE),
        };
        self.invalidate(&st, r, NotifyEvent::Exclusive, Some(pm.owner()));
        let frame = self.stash.alloc()?;
        // Write-protect the page before copying it, as migration does: the page is present and
        // writable, so a CPU store does not take the state lock, and one landing between the copy
        // and the zap would be dropped by the zap (a lost update). Protected, the store faults,
        // waits for the state lock, and revokes the grant.
        let mode = st.vma(a).expect("mapped").mode;
        if let Err(e) = self.mm.write_protect(r, true, mode) {
            self.stash.free(frame, false);
            return Err(Error::uffd("write-protect for exclusive access", e, a));
        }
        self.copy_into_frames(a, &self.stash, frame.offset(), PAGE_SIZE)
            .map_err(|e| Error::os("copy into the stash", e))?;
        if let Err(e) = self.mm.zap(r) {
            let _ = self.mm.write_protect(r, false, mode);
            // Unprotected, a zero page is a private page at its next store.
            st.set_pte(a, pte.without_zero());
            self.stash.free(frame, false);
            return Err(Error::os("drop page for exclusive access", e));
        }
        st.set_pte(a, Pte::exclusive(pm.id(), frame));
        map(a, frame);
        Ok(())
    }
}
