//! The syscall layer: the only module of hetmem that contains `unsafe`.
//!
//! Everything above this module is safe Rust. This module wraps:
//!
//! * [`Region`]: an owned anonymous mapping (device pools, the CPU view's reservation), with
//!   bounds-checked raw copies in and out. No `&[u8]` is ever formed over a region: another
//!   agent (a CPU thread, a device thread) may change it underneath, so every access is a raw
//!   copy (`ptr::copy_nonoverlapping`), as rust-vmm's vm-memory does for guest memory (see
//!   "Memory that other threads touch" below).
//! * [`Uffd`]: a userfaultfd with the ioctls hetmem uses (API, REGISTER, UNREGISTER, COPY,
//!   WRITEPROTECT, WAKE) and its message queue (faults, REMAP events) — `uffd`.
//! * The process-wide SIGBUS handler that serves faults of SIGBUS-mode userfaultfds in the
//!   faulting thread, and chains to the previous handler for faults that are not hetmem's; the
//!   fault-range registry, no-fault zones, the per-thread state of the fault service — `signal`.
//! * memfd and `PAGEMAP_SCAN` — `memfd`; owned mappings — `region`.
//! * hetmem's own CPU accesses to managed memory (crate-internal: `Space` checks the range
//!   first) and, with the `testing` feature, the tests' process helpers (fork a child, wait for
//!   it, raw probes, the direct system calls a program makes behind hetmem's back) — `process`.
//!   Those that take an arbitrary address, or fork, are `unsafe fn`s with a `# Safety` section.
//!
//! # Memory that other threads touch
//!
//! Managed memory and device pools are mappings hetmem made with `mmap`: no Rust allocation and
//! no Rust object lives in them, and no reference to their bytes is ever formed (pointers come
//! from integers, and every access is one of the raw accesses here). Other agents use the same
//! bytes at the same time by design: a CPU thread storing through a plain pointer while a device
//! thread copies a device-coherent page, the program's threads among themselves. hetmem follows
//! vm-memory's discipline for guest memory, which is in the same position:
//!
//! * word-sized accesses whose tearing or elision would matter are volatile (exactly one load or
//!   store: [`Region::load_u64`], [`Region::load_u32`], the probes) or atomic
//!   ([`Region::fetch_add_u64`], on an `AtomicU64` formed only for the operation);
//! * bulk copies ([`Region::read`], [`Region::write`], [`Region::copy_to`], [`Region::zero`])
//!   are plain `copy_nonoverlapping`/`write_bytes`, as vm-memory's copies longer than a word
//!   are plain `memcpy`s. Why that is sound here: the bytes lie outside every Rust allocation
//!   and are never behind a reference, so the compiler has nothing to assume about them (no
//!   value whose validity a racing writer could break: any `u8` pattern is valid), and a copy is
//!   one `memcpy` over pointers made from integers, which neither caches the source nor reads it
//!   twice. A writer racing a copy can only tear the data (a mix of old and new bytes), as it
//!   would a DMA transfer; no invariant of hetmem depends on the contents of managed memory, and
//!   where hetmem needs a copy that no writer races (a migration, a writeback) it stops the
//!   writers first (write protection, an unmapped page, the device's page-table lock) rather
//!   than relying on the copy. (The Rust memory model does not yet describe memory shared with
//!   agents it cannot see; this is the position vm-memory takes for guest memory.)
//!
//! # Why the kernel-ordering details matter here
//!
//! A userfaultfd registered with `UFFD_FEATURE_SIGBUS` makes the kernel deliver SIGBUS to the
//! faulting thread instead of queueing a message. The handler resolves the fault with
//! `UFFDIO_COPY` and returns; the faulting instruction is then restarted and finds the page.
//! The handler runs in signal context: it must not allocate, must not take a lock that the
//! interrupted code may hold, and must preserve `errno`. hetmem's own code never touches a
//! managed address whose page may be missing, so a managed-address SIGBUS never interrupts
//! hetmem code that holds one of hetmem's locks; the handler may therefore block on hetmem's
//! locks (another thread holds them and will release them).
//!
//! A UFFDIO_COPY into a page that is already populated fails with EEXIST: a racing fault won
//! and the page is there, which is success for the caller. EAGAIN means the mappings are
//! changing: a direct mremap's REMAP event has been read but its caller has not left the kernel
//! yet; [`Uffd::fill`] retries it with a yield, and it is reported as [`UffdError::Again`]
//! past that bound.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use linux_raw_sys::general as uapi;
use rustix::ioctl::{Opcode, Updater, opcode};
use rustix::mm::{Advice, MapFlags, MprotectFlags, ProtFlags};

/// Size of a base page on the supported targets (x86-64).
pub const PAGE_SIZE: usize = 4096;
/// Size of a large (PMD) page.
pub const LARGE_PAGE_SIZE: usize = 2 << 20;

/// The patience of a wait made of yields (for the mappings to stop changing, for a lock another
/// thread holds a moment): at least 100,000 yields, and at least 10 s. The count alone gave up
/// under load (a loaded 2-core machine runs 100,000 yields in under a second while the thread
/// waited for can stay off a CPU); the clock is read only once the count is spent, so a short
/// wait costs what it did. Safe in a signal handler (the clock is the vDSO's).
pub(crate) struct Patience {
    yields: u32,
    since: Option<std::time::Instant>,
}

impl Patience {
    pub(crate) const fn new() -> Patience {
        Patience {
            yields: 0,
            since: None,
        }
    }

    /// Counts one more yield; false once the wait should give up.
    pub(crate) fn more(&mut self) -> bool {
        if self.yields < 100_000 {
            self.yields += 1;
            return true;
        }
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        since.elapsed() < std::time::Duration::from_secs(10)
    }
}

/// Whether a `/proc/self/pagemap` entry holds data: the page is present, or swapped out.
/// A marker (a userfaultfd write-protect marker that [`Uffd::mark_missing`] leaves, a guard
/// page, a poisoned page) is reported as swapped too, but holds none: an access faults (as
/// missing, for hetmem's markers). With `CAP_SYS_ADMIN` the kernel reports a marker's swap type,
/// 31 (`SWP_PTE_MARKER`); without it the type and offset read 0 (found by review), and a
/// write-protect marker is told by `PM_UFFD_WP` with a zero swap entry, which a page swapped out
/// while write-protected also shows: such a page is then taken for no data by a reader that
/// must not fault (hetmem's raw copies stop before it and fault it in the usual way instead).
pub fn pagemap_holds_data(e: u64) -> bool {
    const PRESENT: u64 = 1 << 63;
    const SWAP: u64 = 1 << 62;
    const UFFD_WP: u64 = 1 << 57;
    const ENTRY: u64 = (1 << 55) - 1;
    const MARKER_TYPE: u64 = 0x1f;
    if e & PRESENT != 0 {
        return true;
    }
    if e & SWAP == 0 {
        return false;
    }
    let marker = e & MARKER_TYPE == MARKER_TYPE || (e & UFFD_WP != 0 && e & ENTRY == 0);
    !marker
}

mod memfd;
mod process;
mod region;
mod signal;
mod uffd;

pub use memfd::*;
pub use process::*;
pub use region::*;
pub use signal::*;
pub use uffd::*;
