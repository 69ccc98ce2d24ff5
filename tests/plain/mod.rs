//! The test's own plain memory (`mmap`), shared by the adoption tests.
#![allow(dead_code)]

use hetmem::*;

/// An anonymous private mapping of `len` bytes made by the test itself (what a program gets
/// from `mmap` or its allocator), reached only through raw addresses; unmapped on drop.
pub struct Plain {
    pub addr: usize,
    len: usize,
}

impl Plain {
    pub fn new(len: usize, prot: i32) -> Plain {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; no Rust
        // object lives there, and the test reaches it only through raw volatile accesses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Plain {
            addr: p as usize,
            len,
        }
    }
    pub fn at(&self, off: usize) -> VirtAddr {
        VirtAddr(self.addr + off)
    }
    /// A plain CPU load (the program's own pointer).
    pub fn load(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len);
        // SAFETY: inside this test-owned mapping, which no Rust object lives in.
        unsafe { sys::probe_load_u32(self.addr + off) }
    }
    /// A plain CPU store.
    pub fn store(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.len);
        // SAFETY: as in `load`.
        unsafe { sys::probe_store_u32(self.addr + off, v) }
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        // SAFETY: the mapping is this value's; nothing refers to it any more.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// [`Space::adopt`] of memory the test owns and reaches only through raw addresses (its own
/// mmap, or a buffer it no longer references), which is the adoption contract.
pub fn adopt_plain(addr: VirtAddr, len: usize) -> Result<Space> {
    // SAFETY: every caller passes its own mapping (or a block it touches only through raw
    // pointers and hetmem while adopted), kept mapped until the space is dropped.
    unsafe { Space::adopt(addr, len) }
}
