//! Word-sized CPU accesses to a range of managed memory, checked once ([`Probe`]).

use std::os::fd::BorrowedFd;

use super::Space;
use crate::addr::{VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::sync::lock;
use crate::sys;

/// Real CPU loads and stores of aligned 4-byte words, and `read(2)` into memory, in a range of
/// an address space that [`Space::probe`] checked once: what a program's own pointer accesses
/// do (each may fault into hetmem, or raise SIGSEGV where the protection forbids it), without
/// the per-access check and lock of [`Space::load_u32`]. So a probe works where taking the
/// space's lock would not: in a thread that holds a page cache's lock (a file backend's hook),
/// in a forked child (where the accesses fault: hetmem's ranges are not inherited), in timed
/// loops.
///
/// # Why the accesses are sound
///
/// When the probe was made, its range was covered by mappings of the space, which runs over the
/// real kernel; the probe holds a handle to the space, so the space's reservation stays mapped
/// while it lives. Inside the reservation hetmem keeps every byte either managed memory or a
/// `PROT_NONE` placeholder (an unmap puts one back), and no Rust object ever lives there, so a
/// word access can fault but never reaches memory that Rust code owns. The one way out is the
/// program's own: a direct `mremap` that moves the range away (its pointers into the old range
/// are then dangling, as for any memory it remaps).
#[derive(Clone, Debug)]
pub struct Probe {
    space: Space,
    range: VaRange,
}

impl Space {
    /// A [`Probe`] of `addr..addr + len`: checks once that the range is covered by mappings of
    /// this space (any protection) and that the space runs over the real kernel (not
    /// `Space::new_model`'s in-memory model, whose addresses are not mapped).
    pub fn probe(&self, addr: VirtAddr, len: usize) -> Result<Probe> {
        self.check_owner_process()?;
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if self._reg.is_none() {
            return Err(Error::Invalid(
                "probes need an address space over the real kernel",
            ));
        }
        let range = VaRange::new(addr, len)?;
        lock(&self.core.state).check_covered(range)?;
        Ok(Probe {
            space: self.clone(),
            range,
        })
    }
}

impl Probe {
    /// The range checked.
    pub fn range(&self) -> VaRange {
        self.range
    }

    /// The space probed.
    pub fn space(&self) -> &Space {
        &self.space
    }

    fn check(&self, addr: VirtAddr, len: usize, align: usize) -> Result<()> {
        if !addr.get().is_multiple_of(align) {
            return Err(Error::Invalid("u32 access must be 4-byte aligned"));
        }
        match addr.checked_add(len) {
            Some(end) if addr >= self.range.start && end <= self.range.end => Ok(()),
            _ => Err(Error::Invalid("access outside the probe's range")),
        }
    }

    /// A real CPU load of the `u32` at `addr` (4-byte aligned, inside the range).
    pub fn load_u32(&self, addr: VirtAddr) -> Result<u32> {
        self.check(addr, 4, 4)?;
        Ok(sys::cpu_load_u32(addr.get()))
    }

    /// A real CPU store of `v` at `addr` (4-byte aligned, inside the range).
    pub fn store_u32(&self, addr: VirtAddr, v: u32) -> Result<()> {
        self.check(addr, 4, 4)?;
        sys::cpu_store_u32(addr.get(), v);
        Ok(())
    }

    /// `read(2)` from `fd` into `addr..addr + len` (inside the range): a kernel-mode access to
    /// the pages, which a fault-service mode may or may not serve (EFAULT where it does not).
    /// The system call's error is [`Error::Os`].
    pub fn read_from(&self, fd: BorrowedFd<'_>, addr: VirtAddr, len: usize) -> Result<usize> {
        self.check(addr, len, 1)?;
        sys::cpu_read_from(fd, addr.get(), len)
            .map_err(|e| Error::os("read(2) into managed memory", e))
    }
}
