//! Safe CPU accesses (words and byte copies) to a range of managed memory, checked once
//! ([`Probe`]), and what is sound about them.

use std::os::fd::BorrowedFd;

use super::Space;
use crate::addr::{VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::sys;

/// Safe access to a range of managed memory, checked once: real CPU loads and stores (aligned
/// 4- and 8-byte words, and byte copies), and `read(2)` into memory, in a range of an address
/// space that [`Space::probe`] checked. These are what a program's own pointer accesses do (each
/// may fault into hetmem, or raise SIGSEGV where the protection forbids it), without the
/// per-access check and lock of [`Space::cpu_read`] / [`Space::load_u32`]. So a probe works
/// where taking the space's lock would not: in a thread that holds a page cache's lock (a file
/// backend's hook), in a forked child (where the accesses fault: hetmem's ranges are not
/// inherited), in timed loops.
///
/// # What is sound, and why there are no slices
///
/// The accesses are volatile-style, as rust-vmm's `vm-memory` accesses guest memory: every byte
/// is loaded or stored exactly once, by aligned words where possible, and no Rust reference to
/// managed memory is ever formed. That is what makes them sound while a device may write the
/// same memory: a device (another thread of the software device, DMA on real hardware) writing a
/// page while a `&[u8]` over it lives would break what the compiler assumes of a shared
/// reference (its bytes do not change), and a `&mut [u8]` would not be exclusive. A word the
/// device writes is seen whole or not at all (aligned 8-byte words); a copy that spans several
/// words may see some of the device's writes and not others, as a CPU would.
///
/// hetmem therefore hands out no slice over managed memory. A program that can prove that no
/// device maps a range and no other thread writes it may still build one from
/// [`Space::as_ptr`] (`unsafe`, and its proof is the program's).
///
/// The accesses themselves are sound because, when the probe was made, its range was covered by
/// mappings of the space, which runs over the real kernel; the probe holds a handle to the
/// space, so the space's reservation stays mapped while it lives. Inside the reservation hetmem
/// keeps every byte either managed memory or a `PROT_NONE` placeholder (an unmap puts one
/// back), and no Rust object ever lives there, so an access can fault but never reaches memory
/// that Rust code owns. The one way out is the program's own: a direct `mremap` that moves the
/// range away (its pointers into the old range are then dangling, as for any memory it remaps).
///
/// # Examples
///
/// ```
/// use hetmem::{Prot, Space};
///
/// # fn main() -> hetmem::Result<()> {
/// let space = Space::new()?;
/// let a = space.map_anon(1 << 20, Prot::ReadWrite)?;
/// let p = space.probe(a, 1 << 20)?; // checked once
/// p.store_u64(a.add(8), 42)?;
/// p.write(a.add(100), b"bytes")?;
/// assert_eq!(p.load_u64(a.add(8))?, 42);
/// let mut b = [0u8; 5];
/// p.read(a.add(100), &mut b)?;
/// assert_eq!(&b, b"bytes");
/// assert!(p.load_u64(a.add(4)).is_err()); // misaligned: a typed error, not a crash
/// # Ok(())
/// # }
/// ```
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
        self.core.lock_state().check_covered(range)?;
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
            return Err(match align {
                4 => Error::Invalid("u32 access must be 4-byte aligned"),
                _ => Error::Invalid("u64 access must be 8-byte aligned"),
            });
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

    /// A real CPU load of the `u64` at `addr` (8-byte aligned, inside the range).
    pub fn load_u64(&self, addr: VirtAddr) -> Result<u64> {
        self.check(addr, 8, 8)?;
        Ok(sys::cpu_load_u64(addr.get()))
    }

    /// A real CPU store of `v` at `addr` (8-byte aligned, inside the range).
    pub fn store_u64(&self, addr: VirtAddr, v: u64) -> Result<()> {
        self.check(addr, 8, 8)?;
        sys::cpu_store_u64(addr.get(), v);
        Ok(())
    }

    /// Copies `dst.len()` bytes at `addr` (inside the range) into `dst`, with real CPU loads
    /// (volatile-style: see the type's doc).
    pub fn read(&self, addr: VirtAddr, dst: &mut [u8]) -> Result<()> {
        self.check(addr, dst.len(), 1)?;
        sys::cpu_read(addr.get(), dst);
        Ok(())
    }

    /// Copies `src` to `addr` (inside the range), with real CPU stores (volatile-style).
    pub fn write(&self, addr: VirtAddr, src: &[u8]) -> Result<()> {
        self.check(addr, src.len(), 1)?;
        sys::cpu_write(addr.get(), src);
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

/// An anonymous mapping owned by a value: made by [`Space::map_owned`], unmapped when dropped
/// (RAII), and accessed through the [`Probe`] it derefs to (volatile-style copies and words; see
/// the `Probe` doc for what is sound). While it lives, its range belongs to it: unmapping that
/// range by address ([`Space::unmap`]) is the program's error, as freeing memory a live value
/// owns would be (later accesses then fault).
///
/// # Examples
///
/// ```
/// use hetmem::{Prot, Space};
///
/// # fn main() -> hetmem::Result<()> {
/// let space = Space::new()?;
/// let m = space.map_owned(1 << 20, Prot::ReadWrite)?;
/// m.write(m.addr(), b"owned")?;
/// let mut b = [0u8; 5];
/// m.read(m.addr(), &mut b)?;
/// assert_eq!(&b, b"owned");
/// drop(m); // unmapped
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Mapping {
    probe: Probe,
}

impl Space {
    /// Maps `len` bytes of anonymous memory (as [`Space::map_anon`]) owned by the returned
    /// [`Mapping`], which unmaps them when dropped.
    pub fn map_owned(&self, len: usize, prot: crate::sys::Prot) -> Result<Mapping> {
        let a = self.map_anon(len, prot)?;
        match self.probe(a, len) {
            Ok(probe) => Ok(Mapping { probe }),
            Err(e) => {
                let _ = self.unmap(a, len);
                Err(e)
            }
        }
    }
}

impl Mapping {
    /// The first byte.
    pub fn addr(&self) -> VirtAddr {
        self.probe.range().start
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.probe.range().len()
    }

    /// Whether it is empty (never: a mapping has at least a page).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::ops::Deref for Mapping {
    type Target = Probe;
    fn deref(&self) -> &Probe {
        &self.probe
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let r = self.probe.range();
        let _ = self.probe.space().unmap(r.start, r.len());
    }
}
