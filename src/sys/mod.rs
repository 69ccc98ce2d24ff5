//! The syscall layer: the only module of hetmem that contains `unsafe`.
//!
//! Everything above this module is safe Rust. This module wraps:
//!
//! * [`Region`]: an owned anonymous mapping (device pools, the CPU view's reservation), with
//!   bounds-checked raw copies in and out. No `&[u8]` is ever formed over a region: another
//!   agent (a CPU thread, a device thread) may change it underneath, so every access is a raw
//!   copy (`ptr::copy_nonoverlapping`), as rust-vmm's vm-memory does for guest memory.
//! * [`Uffd`]: a userfaultfd with the ioctls hetmem uses (API, REGISTER, COPY, ZEROPAGE,
//!   WRITEPROTECT, WAKE, MOVE) and its message queue.
//! * The process-wide SIGBUS handler that serves faults of SIGBUS-mode userfaultfds in the
//!   faulting thread, and chains to the previous handler for faults that are not hetmem's.
//! * A few process helpers for tests and benches (fork a child, wait for it).
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
//! changing; hetmem enables no uffd events, so EAGAIN does not occur in its own use, but it is
//! still reported as [`UffdError::Again`] so that a caller can retry.

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

/// Memory protection of a range, as `PROT_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prot {
    /// `PROT_NONE`: any access faults.
    None,
    /// `PROT_READ`.
    Read,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

impl Prot {
    /// Whether loads are allowed.
    pub fn readable(self) -> bool {
        !matches!(self, Prot::None)
    }
    /// Whether stores are allowed.
    pub fn writable(self) -> bool {
        matches!(self, Prot::ReadWrite)
    }
    fn flags(self) -> ProtFlags {
        match self {
            Prot::None => ProtFlags::empty(),
            Prot::Read => ProtFlags::READ,
            Prot::ReadWrite => ProtFlags::READ | ProtFlags::WRITE,
        }
    }
    fn mflags(self) -> MprotectFlags {
        match self {
            Prot::None => MprotectFlags::empty(),
            Prot::Read => MprotectFlags::READ,
            Prot::ReadWrite => MprotectFlags::READ | MprotectFlags::WRITE,
        }
    }
}

/// Checks the machine's page size once; hetmem assumes 4 KiB base pages.
pub fn check_page_size() -> io::Result<()> {
    if rustix::param::page_size() != PAGE_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "hetmem needs 4 KiB base pages",
        ));
    }
    Ok(())
}

/// An owned anonymous private mapping.
///
/// # Invariants
///
/// `base..base + len` is a live mapping created by [`Region::new`] and owned by this value
/// until it is dropped; `base` is aligned to the alignment asked for. The mapping is
/// `MADV_DONTFORK`: a child process does not inherit it (hetmem is inert in a child).
#[derive(Debug)]
pub struct Region {
    base: usize,
    len: usize,
}

/// `n` atomic words, all zero, allocated fallibly and zeroed lazily (a large allocation is fresh
/// anonymous memory: untouched words cost nothing): per-frame metadata of a pool whose size a
/// caller chose.
pub fn zeroed_atomics(n: usize) -> io::Result<Box<[AtomicU64]>> {
    if n == 0 {
        return Ok(Box::new([]));
    }
    let layout = std::alloc::Layout::array::<AtomicU64>(n)
        .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: `layout` has a non-zero size (n > 0).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<AtomicU64>();
    if p.is_null() {
        return Err(io::Error::from_raw_os_error(libc::ENOMEM));
    }
    // SAFETY: `p` is a fresh allocation of `n` AtomicU64 with the global allocator's layout for
    // that array, and all-zero bytes are a valid AtomicU64 (same layout as u64); the box takes
    // ownership and frees it with the same layout.
    Ok(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, n)) })
}

impl Region {
    /// Maps `len` bytes (a multiple of the page size) aligned to `align` (a power of two, at
    /// least a page), with protection `prot`, not inherited across fork.
    pub fn new(len: usize, align: usize, prot: Prot) -> io::Result<Region> {
        if len == 0
            || !len.is_multiple_of(PAGE_SIZE)
            || !align.is_power_of_two()
            || align < PAGE_SIZE
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let total = len
            .checked_add(align - PAGE_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases no
        // Rust object.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                total,
                prot.flags(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        let raw = raw as usize;
        let base = (raw + align - 1) & !(align - 1);
        // Trim the slack on both sides so that only the aligned part stays mapped.
        if base > raw {
            // SAFETY: `raw..base` is part of the mapping just created and nothing refers to it.
            unsafe { rustix::mm::munmap(raw as *mut _, base - raw) }?;
        }
        let tail = raw + total - (base + len);
        if tail > 0 {
            // SAFETY: the tail past `base + len` belongs to the fresh mapping, unused.
            unsafe { rustix::mm::munmap((base + len) as *mut _, tail) }?;
        }
        let region = Region { base, len };
        region.advise(0, len, Advice::LinuxDontFork)?;
        Ok(region)
    }

    /// First byte of the region.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: regions have a non-zero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, len: usize) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EFAULT)),
        }
    }

    fn advise(&self, off: usize, len: usize, advice: Advice) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: the range lies inside this region (checked); madvise with these advices
        // changes no memory that Rust objects alias (the region is only ever accessed through
        // raw copies).
        unsafe { rustix::mm::madvise((self.base + off) as *mut _, len, advice) }?;
        Ok(())
    }

    /// Copies `dst.len()` bytes at `off` out of the region (a raw copy: the bytes may change
    /// underneath, no reference to them is formed).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> io::Result<()> {
        self.check(off, dst.len())?;
        // SAFETY: source range is inside the live mapping (checked above); `dst` is a distinct
        // Rust buffer, so the ranges do not overlap.
        unsafe {
            ptr::copy_nonoverlapping((self.base + off) as *const u8, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// Copies `src` into the region at `off` (a raw copy).
    pub fn write(&self, off: usize, src: &[u8]) -> io::Result<()> {
        self.check(off, src.len())?;
        // SAFETY: destination range is inside the live mapping (checked above); `src` is a
        // distinct Rust buffer.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), (self.base + off) as *mut u8, src.len()) };
        Ok(())
    }

    /// Copies `len` bytes from `self` at `src_off` to `dst` at `dst_off` (raw memcpy).
    pub fn copy_to(
        &self,
        src_off: usize,
        dst: &Region,
        dst_off: usize,
        len: usize,
    ) -> io::Result<()> {
        self.check(src_off, len)?;
        dst.check(dst_off, len)?;
        let (s, d) = (self.base + src_off, dst.base + dst_off);
        if s < d + len && d < s + len {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: both ranges are inside live mappings (checked) and do not overlap (checked).
        unsafe { ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, len) };
        Ok(())
    }

    /// Fills `len` bytes at `off` with zeros.
    pub fn zero(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: range inside the live mapping (checked).
        unsafe { ptr::write_bytes((self.base + off) as *mut u8, 0, len) };
        Ok(())
    }

    /// Volatile load of a `u64` at `off` (8-byte aligned).
    pub fn load_u64(&self, off: usize) -> io::Result<u64> {
        self.check(off, 8)?;
        if !off.is_multiple_of(8) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: aligned, inside the live mapping (checked).
        Ok(unsafe { ptr::read_volatile((self.base + off) as *const u64) })
    }

    /// Atomic fetch-add of a `u64` at `off` (8-byte aligned): the device's atomic operation.
    pub fn fetch_add_u64(&self, off: usize, v: u64) -> io::Result<u64> {
        self.check(off, 8)?;
        if !off.is_multiple_of(8) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: aligned, inside the live mapping (checked); AtomicU64 has the layout of u64
        // and every access to this word by hetmem is atomic or a raw copy.
        let a = unsafe { &*((self.base + off) as *const std::sync::atomic::AtomicU64) };
        Ok(a.fetch_add(v, Ordering::SeqCst))
    }

    /// Drops the pages of `off..off + len` (`MADV_DONTNEED`): on an anonymous private region the
    /// next access faults (for a userfaultfd-registered range: a MISSING fault).
    pub fn discard(&self, off: usize, len: usize) -> io::Result<()> {
        self.advise(off, len, Advice::LinuxDontNeed)
    }

    /// Changes the protection of `off..off + len`.
    pub fn protect(&self, off: usize, len: usize, prot: Prot) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: the range is inside this region; its memory is only accessed by raw copies,
        // so no Rust reference is invalidated by a protection change.
        unsafe { rustix::mm::mprotect((self.base + off) as *mut _, len, prot.mflags()) }?;
        Ok(())
    }

    /// Replaces `off..off + len` with a fresh anonymous mapping of protection `prot` (MAP_FIXED).
    ///
    /// This drops the pages *and* any userfaultfd registration of the range. Never use it on a
    /// range that must stay registered (an access in between is silently zero-filled): hetmem
    /// uses it only to create a mapping in a never-registered part of a reservation, and to
    /// unmap (after which accesses must fault with SIGSEGV, as they do on PROT_NONE).
    pub fn remap_fresh(&self, off: usize, len: usize, prot: Prot) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: MAP_FIXED over a range of this region only (checked); its memory is accessed
        // only through raw copies, so no Rust object is invalidated.
        unsafe {
            rustix::mm::mmap_anonymous(
                (self.base + off) as *mut _,
                len,
                prot.flags(),
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
            )
        }?;
        self.advise(off, len, Advice::LinuxDontFork)
    }

    /// Maps `off..off + len` again as fresh PROT_NONE memory, not inherited across fork, where
    /// nothing is mapped now (`MAP_FIXED_NOREPLACE`: EEXIST if something is): the part of the
    /// region a direct mremap moved away.
    pub fn map_hole_again(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory that any
        // code refers to is touched; the range is this region's (checked).
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                (self.base + off) as *mut _,
                len,
                Prot::None.flags(),
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
            )
        }?;
        if p as usize != self.base + off {
            // A kernel without MAP_FIXED_NOREPLACE treats it as a hint: undo the stray mapping.
            // SAFETY: `p..p + len` is the mapping just created, referred to by nothing.
            unsafe { rustix::mm::munmap(p, len) }?;
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        self.advise(off, len, Advice::LinuxDontFork)
    }

    /// Touches every page of `off..off + len` for writing (`MADV_POPULATE_WRITE`).
    pub fn populate(&self, off: usize, len: usize) -> io::Result<()> {
        self.advise(off, len, Advice::LinuxPopulateWrite)
    }
}

impl Region {
    /// Replaces `off..off + len` with a mapping of `fd` at `file_off` (`MAP_SHARED`, or
    /// `MAP_PRIVATE` when `!shared`), not inherited across fork. As [`Region::remap_fresh`]:
    /// only over a never-registered part of the region.
    pub fn map_fd(
        &self,
        off: usize,
        len: usize,
        prot: Prot,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        shared: bool,
    ) -> io::Result<()> {
        self.check(off, len)?;
        let kind = if shared {
            MapFlags::SHARED
        } else {
            MapFlags::PRIVATE
        };
        // SAFETY: MAP_FIXED over a range of this region only (checked); its memory is accessed
        // only through raw copies, so no Rust object is invalidated.
        unsafe {
            rustix::mm::mmap(
                (self.base + off) as *mut _,
                len,
                prot.flags(),
                kind | MapFlags::FIXED,
                fd,
                file_off,
            )
        }?;
        self.advise(off, len, Advice::LinuxDontFork)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the region owns this mapping (type invariant); nothing refers to it any more.
        let _ = unsafe { rustix::mm::munmap(self.base as *mut _, self.len) };
    }
}

// ---------------------------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------------------------

const UFFDIO: u8 = 0xAA;
const OP_API: Opcode = opcode::read_write::<uapi::uffdio_api>(UFFDIO, uapi::_UFFDIO_API as u8);
const OP_REGISTER: Opcode =
    opcode::read_write::<uapi::uffdio_register>(UFFDIO, uapi::_UFFDIO_REGISTER as u8);
const OP_UNREGISTER: Opcode =
    opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_UNREGISTER as u8);
const OP_WAKE: Opcode = opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_WAKE as u8);
const OP_COPY: Opcode = opcode::read_write::<uapi::uffdio_copy>(UFFDIO, uapi::_UFFDIO_COPY as u8);
const OP_WRITEPROTECT: Opcode =
    opcode::read_write::<uapi::uffdio_writeprotect>(UFFDIO, uapi::_UFFDIO_WRITEPROTECT as u8);

/// How a userfaultfd delivers faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdDelivery {
    /// `UFFD_FEATURE_SIGBUS`: the faulting thread gets SIGBUS and serves the fault itself.
    Signal,
    /// Faults are queued as messages and served by a handler thread.
    Thread,
}

/// Errors of the resolving ioctls, each with one meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdError {
    /// EEXIST: the destination is already populated (a racing fault won).
    Exists,
    /// EAGAIN: the mappings are changing; retry after draining events.
    Again,
    /// EBUSY (MOVE): a pinned or shared source page.
    Busy,
    /// Any other errno.
    Os(i32),
}

impl From<UffdError> for io::Error {
    fn from(e: UffdError) -> io::Error {
        io::Error::from_raw_os_error(match e {
            UffdError::Exists => libc::EEXIST,
            UffdError::Again => libc::EAGAIN,
            UffdError::Busy => libc::EBUSY,
            UffdError::Os(n) => n,
        })
    }
}

fn uffd_err(e: rustix::io::Errno) -> UffdError {
    match e {
        rustix::io::Errno::EXIST => UffdError::Exists,
        rustix::io::Errno::AGAIN => UffdError::Again,
        rustix::io::Errno::BUSY => UffdError::Busy,
        other => UffdError::Os(other.raw_os_error()),
    }
}

/// A fault read from a thread-mode userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UffdFault {
    /// Faulting address (page-aligned by the kernel unless EXACT_ADDRESS).
    pub addr: usize,
    /// The access was a write.
    pub write: bool,
    /// The fault is a write-protect fault.
    pub wp: bool,
    /// The faulting thread's id (`UFFD_FEATURE_THREAD_ID`), 0 when unknown.
    pub tid: u32,
}

/// A message read from a userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMsg {
    /// A page fault (thread-mode delivery).
    Fault(UffdFault),
    /// `UFFD_EVENT_REMAP`: the program moved `from..from + len` to `to` with mremap(2); the
    /// moved range is still registered with this fd.
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Length moved.
        len: usize,
    },
    /// Another event (not enabled by hetmem).
    Other(u8),
}

/// A userfaultfd.
///
/// # Invariants
///
/// `fd` is a userfaultfd on which the UFFDIO_API handshake has completed with `features`.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    user_mode_only: bool,
    delivery: UffdDelivery,
}

impl Uffd {
    /// Opens a userfaultfd delivering faults as `delivery` says.
    ///
    /// A plain userfaultfd is tried first (it also serves kernel-mode accesses, e.g. a `read(2)`
    /// into a managed buffer, in thread mode); where the system refuses it to this user
    /// (`vm.unprivileged_userfaultfd = 0`: EPERM), a `UFFD_USER_MODE_ONLY` one is opened instead.
    /// `force_umo` asks for the latter directly (to run as an unprivileged user would).
    pub fn open(delivery: UffdDelivery, force_umo: bool) -> io::Result<Uffd> {
        // MOVE is not requested: hetmem's paths copy (see docs/architecture.md), and asking for a
        // feature the kernel lacks would fail the handshake.
        // EVENT_REMAP: a direct mremap(2) of a managed range is reported (and waits until the
        // event is read), so that hetmem follows it instead of losing device-resident data.
        let mut want = (uapi::UFFD_FEATURE_THREAD_ID | uapi::UFFD_FEATURE_EVENT_REMAP) as u64;
        if delivery == UffdDelivery::Signal {
            want |= uapi::UFFD_FEATURE_SIGBUS as u64;
        }
        Self::handshake(delivery, force_umo, want)
    }

    /// Opens a userfaultfd (plain, or user-mode-only where the plain one is refused or
    /// `force_umo` asks for it) and completes the UFFDIO_API handshake asking for `want`.
    fn handshake(delivery: UffdDelivery, force_umo: bool, want: u64) -> io::Result<Uffd> {
        let base = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        let umo = rustix::mm::UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
        let (fd, user_mode_only) = if force_umo {
            // SAFETY: the fd is only used through this module's ioctls on hetmem's own regions.
            (unsafe { rustix::mm::userfaultfd(base | umo) }?, true)
        } else {
            // SAFETY: as above.
            match unsafe { rustix::mm::userfaultfd(base) } {
                Ok(fd) => (fd, false),
                Err(rustix::io::Errno::PERM) => {
                    // SAFETY: as above.
                    (unsafe { rustix::mm::userfaultfd(base | umo) }?, true)
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut api = uapi::uffdio_api {
            api: uapi::UFFD_API as u64,
            features: want,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `api` is.
        unsafe { rustix::ioctl::ioctl(&fd, Updater::<OP_API, _>::new(&mut api)) }?;
        Ok(Uffd {
            fd,
            features: api.features,
            user_mode_only,
            delivery,
        })
    }

    /// Opens the userfaultfd of file mappings: SIGBUS delivery for MISSING faults, and
    /// asynchronous write-protect (`UFFD_FEATURE_WP_ASYNC`, on shmem, unpopulated entries
    /// included) for dirty tracking with [`PagemapScanner`]: stores to protected pages go through
    /// and are recorded by the kernel, without a fault.
    ///
    /// With `sync_wp`, write-protect is synchronous instead: a store to a protected page
    /// faults (SIGBUS in the faulting thread), so that hetmem sees every first store.
    pub fn open_file(force_umo: bool, sync_wp: bool) -> io::Result<Uffd> {
        let mut want = (uapi::UFFD_FEATURE_SIGBUS
            | uapi::UFFD_FEATURE_EVENT_REMAP
            | uapi::UFFD_FEATURE_WP_UNPOPULATED
            | uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) as u64;
        if !sync_wp {
            want |= uapi::UFFD_FEATURE_WP_ASYNC as u64;
        }
        Self::handshake(UffdDelivery::Signal, force_umo, want)
    }

    /// Whether this fd was opened with `UFFD_USER_MODE_ONLY` (kernel-mode accesses to missing
    /// pages then fail with EFAULT instead of being served).
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// How faults are delivered.
    pub fn delivery(&self) -> UffdDelivery {
        self.delivery
    }

    /// Whether UFFDIO_MOVE is available.
    pub fn has_move(&self) -> bool {
        self.features & uapi::UFFD_FEATURE_MOVE as u64 != 0
    }

    /// Raw fd number (for the SIGBUS handler's table).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Registers `region[off..off+len]` for MISSING (and WP if `wp`) faults.
    pub fn register(&self, region: &Region, off: usize, len: usize, wp: bool) -> io::Result<()> {
        region.check(off, len)?;
        let mut mode = uapi::UFFDIO_REGISTER_MODE_MISSING as u64;
        if wp {
            mode |= uapi::UFFDIO_REGISTER_MODE_WP as u64;
        }
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range {
                start: (region.base + off) as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`; the range is inside a region
        // hetmem owns (checked), so registration affects no memory other code relies on.
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_REGISTER, _>::new(&mut reg)) }?;
        Ok(())
    }

    /// Unregisters `region[off..off+len]`.
    pub fn unregister(&self, region: &Region, off: usize, len: usize) -> io::Result<()> {
        region.check(off, len)?;
        let mut r = uapi::uffdio_range {
            start: (region.base + off) as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_UNREGISTER, _>::new(&mut r)) }?;
        Ok(())
    }

    /// `UFFDIO_COPY`: fills the missing pages at `dst..dst+len` (registered with this fd) with
    /// `src[src_off..src_off+len]`, waking any thread waiting on them.
    pub fn copy(
        &self,
        dst: usize,
        src: &Region,
        src_off: usize,
        len: usize,
    ) -> Result<(), UffdError> {
        src.check(src_off, len)
            .map_err(|_| UffdError::Os(libc::EFAULT))?;
        let mut c = uapi::uffdio_copy {
            dst: dst as u64,
            src: (src.base + src_off) as u64,
            len: len as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`. The kernel writes only into
        // userfaultfd-registered ranges (hetmem's reservations), never into Rust objects, and
        // reads `src` from a live region (checked).
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_COPY, _>::new(&mut c)) }
            .map_err(uffd_err)
    }

    /// Fills every missing page of `dst..dst+len` from `src[src_off..]` with `UFFDIO_COPY`,
    /// resuming after a partial copy: Ok means every page of the range is now populated (pages
    /// that already were are left as they are: EEXIST on a page is not an error here). An error
    /// means some pages may be populated and others not; calling again completes the range.
    pub fn fill(
        &self,
        dst: usize,
        src: &Region,
        src_off: usize,
        len: usize,
    ) -> Result<(), UffdError> {
        src.check(src_off, len)
            .map_err(|_| UffdError::Os(libc::EFAULT))?;
        let mut done = 0;
        // EAGAIN: the mappings are changing — a direct mremap's REMAP event was read but the
        // thread that called mremap has not yet left the kernel (it ends the window itself,
        // `mmap_changing`, once it runs again). Yield to let it run, bounded.
        let mut again = 0;
        while done < len {
            let mut c = uapi::uffdio_copy {
                dst: (dst + done) as u64,
                src: (src.base + src_off + done) as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: as in `copy`.
            let r = unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_COPY, _>::new(&mut c)) };
            match r.map_err(uffd_err) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // `copy` holds the bytes copied before the error (or a negative errno).
                    if c.copy > 0 {
                        done += c.copy as usize;
                        continue;
                    }
                    match e {
                        // The first page of the rest is already there: step over it.
                        UffdError::Exists => done += PAGE_SIZE,
                        UffdError::Again if again < 100_000 => {
                            again += 1;
                            rustix::thread::sched_yield();
                        }
                        other => return Err(other),
                    }
                }
            }
        }
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT`: sets (`on`) or clears the write-protect bit of the present pages
    /// in `addr..addr+len`; clearing wakes writers waiting there.
    pub fn write_protect(&self, addr: usize, len: usize, on: bool) -> Result<(), UffdError> {
        let mut w = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode: if on { 1 } else { 0 },
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`; it changes PTE
        // permissions only.
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_WRITEPROTECT, _>::new(&mut w)) }
            .map_err(uffd_err)
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on faults in `addr..addr+len`.
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut r = uapi::uffdio_range {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_WAKE, _>::new(&mut r)) }
            .map_err(uffd_err)
    }

    /// Reads one pending message, if any (the fd is non-blocking).
    pub fn read_msg(&self) -> io::Result<Option<UffdMsg>> {
        let mut msg = std::mem::MaybeUninit::<uapi::uffd_msg>::zeroed();
        // SAFETY: reads at most one `uffd_msg` into a buffer of that size.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msg.as_mut_ptr().cast(),
                std::mem::size_of::<uapi::uffd_msg>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EAGAIN) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n as usize != std::mem::size_of::<uapi::uffd_msg>() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // SAFETY: the kernel wrote a complete message (checked size); zero-init covers padding.
        let msg = unsafe { msg.assume_init() };
        if msg.event as u32 == uapi::UFFD_EVENT_REMAP {
            // SAFETY: `remap` is the active union member for UFFD_EVENT_REMAP.
            let r = unsafe { msg.arg.remap };
            return Ok(Some(UffdMsg::Remap {
                from: r.from as usize,
                to: r.to as usize,
                len: r.len as usize,
            }));
        }
        if msg.event as u32 != uapi::UFFD_EVENT_PAGEFAULT {
            return Ok(Some(UffdMsg::Other(msg.event)));
        }
        // SAFETY: `pagefault` is the active union member for UFFD_EVENT_PAGEFAULT.
        let pf = unsafe { msg.arg.pagefault };
        Ok(Some(UffdMsg::Fault(UffdFault {
            addr: pf.address as usize,
            write: pf.flags & uapi::UFFD_PAGEFAULT_FLAG_WRITE as u64 != 0,
            wp: pf.flags & uapi::UFFD_PAGEFAULT_FLAG_WP as u64 != 0,
            // SAFETY: `ptid` is the active member of `feat` with UFFD_FEATURE_THREAD_ID, which
            // every thread-mode userfaultfd asks for; zero-initialised otherwise.
            tid: unsafe { pf.feat.ptid },
        })))
    }

    /// Unregisters `start..start + len`, which need not lie in a region of hetmem's (a range
    /// that a direct mremap moved out of one): the memory stays as it is, as plain memory.
    pub fn unregister_moved(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = uapi::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`; it changes no memory, only
        // which faults this fd reports (the kernel checks the range).
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_UNREGISTER, _>::new(&mut r)) }?;
        Ok(())
    }

    /// Waits until the fd is readable or `stop` is readable; returns false when `stop` fired.
    pub fn wait(&self, stop: &OwnedFd) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, poll};
        loop {
            let mut fds = [
                PollFd::new(&self.fd, PollFlags::IN),
                PollFd::new(stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {
                    if !fds[1].revents().is_empty() {
                        return Ok(false);
                    }
                    return Ok(true);
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Borrow of the fd.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An eventfd used to stop a handler thread.
pub fn stop_fd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?)
}

/// Signals an eventfd made by [`stop_fd`].
pub fn signal_stop(fd: &OwnedFd) -> io::Result<()> {
    rustix::io::write(fd, &1u64.to_ne_bytes())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The SIGBUS handler
// ---------------------------------------------------------------------------------------------

/// Something that serves faults in a range of addresses (an address space).
///
/// [`FaultTarget::handle_fault`] runs in signal context for SIGBUS-mode ranges: no allocation,
/// no panic, no lock the interrupted thread may hold. It returns true when it resolved the fault
/// (the access is retried) and false when the address is not its (the SIGBUS handler then chains
/// to the previous handler).
pub trait FaultTarget: Send + Sync {
    /// Serves a fault at `addr` (`write`: the access was a store).
    fn handle_fault(&self, addr: usize, write: bool) -> bool;
    /// The program moved `from..from + len` (inside this target's range) to `to` with a direct
    /// mremap(2). Called by an event reader thread, never in signal context.
    fn remapped(&self, from: usize, to: usize, len: usize);
}

/// Direct mremaps reported and not yet followed (see [`RemapWindow`]): while non-zero, a
/// signal-mode fault that nobody serves waits for them and retries instead of taking the
/// default action: it may be an access to the moved range before hetmem has followed the move
/// (the program's mremap returns as soon as the event is read).
static REMAPS_PENDING: AtomicUsize = AtomicUsize::new(0);

/// Held by an event reader from before it reads a userfaultfd's messages until it has
/// followed every move among them.
#[derive(Debug)]
pub struct RemapWindow(());

impl RemapWindow {
    /// Opens the window (before the read).
    pub fn open() -> RemapWindow {
        REMAPS_PENDING.fetch_add(1, Ordering::SeqCst);
        RemapWindow(())
    }
}

impl Drop for RemapWindow {
    fn drop(&mut self) {
        REMAPS_PENDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Routes a move reported by a userfaultfd to the target whose range holds `from`.
pub fn dispatch_remap(from: usize, to: usize, len: usize) -> bool {
    for slot in SLOTS.iter() {
        slot.users.fetch_add(1, Ordering::SeqCst);
        let (s, e) = (
            slot.start.load(Ordering::SeqCst),
            slot.end.load(Ordering::SeqCst),
        );
        let p = slot.target.load(Ordering::SeqCst);
        let hit = !p.is_null() && s <= from && from < e;
        if hit {
            // SAFETY: `p` stays valid while `users` is non-zero (FaultRange::drop waits for it).
            let t: &Arc<dyn FaultTarget> = unsafe { &*p };
            t.remapped(from, to, len);
        }
        slot.users.fetch_sub(1, Ordering::SeqCst);
        if hit {
            return true;
        }
    }
    false
}

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    target: AtomicPtr<Arc<dyn FaultTarget>>,
    users: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    target: AtomicPtr::new(ptr::null_mut()),
    users: AtomicUsize::new(0),
};

/// Most address ranges (address spaces, bench ranges) registered at once.
pub const MAX_FAULT_RANGES: usize = 64;
static SLOTS: [Slot; MAX_FAULT_RANGES] = [EMPTY_SLOT; MAX_FAULT_RANGES];

/// A registration made by [`register_fault_range`]; dropping it unregisters the range and
/// waits until no handler is still using the target.
#[derive(Debug)]
pub struct FaultRange {
    slot: usize,
}

/// Routes faults in `start..end` to `target` (lock-free lookup from the SIGBUS handler and the
/// handler threads).
pub fn register_fault_range(
    start: usize,
    end: usize,
    target: Arc<dyn FaultTarget>,
) -> io::Result<FaultRange> {
    let boxed = Box::into_raw(Box::new(target));
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot
            .target
            .compare_exchange(ptr::null_mut(), boxed, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            slot.start.store(start, Ordering::SeqCst);
            slot.end.store(end, Ordering::SeqCst);
            return Ok(FaultRange { slot: i });
        }
    }
    // SAFETY: `boxed` came from Box::into_raw above and was never published.
    drop(unsafe { Box::from_raw(boxed) });
    Err(io::Error::new(
        io::ErrorKind::OutOfMemory,
        "too many hetmem address ranges",
    ))
}

impl Drop for FaultRange {
    fn drop(&mut self) {
        let slot = &SLOTS[self.slot];
        slot.start.store(0, Ordering::SeqCst);
        slot.end.store(0, Ordering::SeqCst);
        // Wait for lookups that may have seen the old range. A lookup increments `users` before
        // reading the range, so once `users` is zero after the range was cleared, no lookup can
        // still use the target. Bounded: lookups hold the slot only while serving one fault.
        while slot.users.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        let p = slot.target.swap(ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` came from Box::into_raw in register_fault_range; no handler uses it
            // any more (waited above) and the slot no longer publishes it.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

thread_local! {
    /// What the calling thread is doing while it must not fault on a managed address (a hetmem
    /// lock is held across a copy of managed memory); empty outside such a zone. A `const`
    /// thread-local of a `Copy` type: reading it from the SIGBUS handler allocates nothing and
    /// initialises nothing lazily.
    static NO_FAULT: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
    /// This thread's id, once asked (0: not yet).
    static TID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

thread_local! {
    /// Set while this thread runs hetmem's SIGBUS handler.
    static IN_SIGNAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Why the last fault this thread's fault service could not serve was not served ("" if it
    /// was, or was not hetmem's).
    static UNSERVED: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

thread_local! {
    /// This thread's anonymous fault-around run: the address right after its last window, and
    /// that window's size in bytes (per thread, so that threads faulting sequentially through
    /// disjoint ranges do not break each other's runs; a const thread-local: readable from the
    /// SIGBUS handler).
    static FAULT_AROUND: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
    /// This thread's file fault-around run: which cache (its address), the page right after its
    /// last window, and that window's size in pages.
    static FILE_FAULT_AROUND: std::cell::Cell<(usize, u64, u64)> =
        const { std::cell::Cell::new((0, u64::MAX, 0)) };
}

/// The calling thread's anonymous fault-around run (next address, window).
pub fn fault_around_state() -> (usize, usize) {
    FAULT_AROUND.with(|c| c.get())
}

/// Sets the calling thread's anonymous fault-around run.
pub fn set_fault_around_state(next: usize, window: usize) {
    FAULT_AROUND.with(|c| c.set((next, window)));
}

/// The calling thread's file fault-around run (cache key, next page, window in pages).
pub fn file_fault_around_state() -> (usize, u64, u64) {
    FILE_FAULT_AROUND.with(|c| c.get())
}

/// Sets the calling thread's file fault-around run.
pub fn set_file_fault_around_state(key: usize, next: u64, window: u64) {
    FILE_FAULT_AROUND.with(|c| c.set((key, next, window)));
}

/// Records why the fault being served cannot be served (called by the fault service, in the
/// faulting thread); the SIGBUS handler prints it if the access then takes the default action.
pub fn note_unserved_fault(why: &'static str) {
    UNSERVED.with(|c| c.set(why));
}

/// Whether the calling thread is running hetmem's SIGBUS handler (where nothing may allocate).
pub fn in_signal_handler() -> bool {
    IN_SIGNAL.with(|c| c.get())
}

/// An atomic cell holding a `&'static Location` (where a lock was taken, for the lock watch):
/// only `&'static` references go in, so what comes out is one.
#[derive(Debug)]
pub struct AtomicLocation(AtomicPtr<std::panic::Location<'static>>);

impl AtomicLocation {
    /// Empty.
    pub const fn new() -> AtomicLocation {
        AtomicLocation(AtomicPtr::new(ptr::null_mut()))
    }
    /// Stores `l`.
    pub fn store(&self, l: &'static std::panic::Location<'static>) {
        self.0.store(
            (l as *const std::panic::Location<'static>).cast_mut(),
            Ordering::SeqCst,
        );
    }
    /// The location stored last, if any.
    pub fn load(&self) -> Option<&'static std::panic::Location<'static>> {
        let p = self.0.load(Ordering::SeqCst);
        // SAFETY: the only non-null values ever stored are `&'static Location<'static>`
        // references (`store`), which live for the whole program and are never written through.
        unsafe { p.as_ref() }
    }
}

impl Default for AtomicLocation {
    fn default() -> Self {
        Self::new()
    }
}

/// Thread ids (as the kernel reports them in thread-mode fault messages) of the threads inside
/// a [`NoFaultZone`], so that the handler thread can tell too. Fixed size, lock-free.
const MAX_ZONE_TIDS: usize = 64;
static ZONE_TIDS: [std::sync::atomic::AtomicU32; MAX_ZONE_TIDS] =
    [const { std::sync::atomic::AtomicU32::new(0) }; MAX_ZONE_TIDS];

/// A stretch of hetmem code that holds a hetmem lock while it copies managed memory (a device
/// copy under its page-table lock, a migration copy under the space's lock). Such code only
/// touches pages known to be present; if it faults on a managed address anyway, serving the
/// fault would need the lock it holds, or one ordered above it: a deadlock. Inside a zone such a
/// fault aborts the process with a message naming the zone instead (in the SIGBUS handler for
/// signal-mode mappings, in the handler thread for thread-mode ones) — a bug report, not a hang.
#[derive(Debug)]
pub struct NoFaultZone {
    prev: &'static str,
    slot: Option<usize>,
}

impl NoFaultZone {
    /// Enters a zone described by `what` (for example "device copy under the page-table
    /// lock").
    pub fn enter(what: &'static str) -> NoFaultZone {
        let prev = NO_FAULT.with(|c| c.replace(what));
        let mut slot = None;
        if prev.is_empty() {
            let tid = TID.with(|t| {
                if t.get() == 0 {
                    t.set(rustix::thread::gettid().as_raw_nonzero().get() as u32);
                }
                t.get()
            });
            slot = ZONE_TIDS.iter().position(|t| {
                t.compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            });
        }
        NoFaultZone { prev, slot }
    }
}

impl Drop for NoFaultZone {
    fn drop(&mut self) {
        NO_FAULT.with(|c| c.set(self.prev));
        if let Some(i) = self.slot {
            ZONE_TIDS[i].store(0, Ordering::SeqCst);
        }
    }
}

/// Whether thread `tid` is inside a zone, for the handler thread (a thread whose slot could not
/// be recorded, past 64 at once, is not found).
fn zone_of_tid(tid: u32) -> bool {
    tid != 0 && ZONE_TIDS.iter().any(|t| t.load(Ordering::SeqCst) == tid)
}

/// Writes `parts` to stderr and aborts: async-signal-safe (no allocation, no lock).
pub fn abort_with(parts: &[&[u8]]) -> ! {
    write_stderr_parts(parts);
    std::process::abort()
}

/// Writes `parts` to stderr: async-signal-safe (no allocation, no lock).
fn write_stderr_parts(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: writes a valid byte slice to fd 2; a failed write is ignored (best effort).
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

/// Formats `v` as hex into `buf` (no allocation), returning the digits.
pub fn hex(v: usize, buf: &mut [u8; 18]) -> &[u8] {
    buf[0] = b'0';
    buf[1] = b'x';
    for i in 0..16 {
        let d = (v >> ((15 - i) * 4)) & 0xf;
        buf[2 + i] = b"0123456789abcdef"[d];
    }
    &buf[..]
}

/// Whether `addr` lies in a registered fault range (a managed address).
fn is_managed(addr: usize) -> bool {
    SLOTS.iter().any(|s| {
        !s.target.load(Ordering::SeqCst).is_null()
            && s.start.load(Ordering::SeqCst) <= addr
            && addr < s.end.load(Ordering::SeqCst)
    })
}

/// Serves a fault at `addr` for the handler thread of thread-mode mappings: as
/// [`dispatch_fault`], but a fault taken by a thread inside a [`NoFaultZone`] aborts.
pub fn dispatch_thread_fault(addr: usize, write: bool, tid: u32) -> bool {
    if zone_of_tid(tid) && is_managed(addr) {
        let mut b = [0u8; 18];
        abort_with(&[
            b"hetmem: BUG: a thread holding a hetmem lock faulted on managed address ",
            hex(addr, &mut b),
            b" (thread-mode mapping): serving it would deadlock\n",
        ]);
    }
    dispatch_fault(addr, write)
}

/// Serves a fault at `addr` with the target registered for it; false when none is.
pub fn dispatch_fault(addr: usize, write: bool) -> bool {
    for slot in SLOTS.iter() {
        if slot.target.load(Ordering::Relaxed).is_null() {
            continue;
        }
        slot.users.fetch_add(1, Ordering::SeqCst);
        let (s, e) = (
            slot.start.load(Ordering::SeqCst),
            slot.end.load(Ordering::SeqCst),
        );
        let p = slot.target.load(Ordering::SeqCst);
        let hit = !p.is_null() && s <= addr && addr < e;
        let handled = if hit {
            // SAFETY: `p` stays valid while `users` is non-zero (FaultRange::drop waits for it).
            let t: &Arc<dyn FaultTarget> = unsafe { &*p };
            t.handle_fault(addr, write)
        } else {
            false
        };
        slot.users.fetch_sub(1, Ordering::SeqCst);
        if hit {
            return handled;
        }
    }
    false
}

static PREV_ACTION: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
static INSTALL: std::sync::Once = std::sync::Once::new();
static INSTALL_ERR: AtomicUsize = AtomicUsize::new(0);

/// Installs the process-wide SIGBUS handler once; later calls are no-ops.
pub fn install_sigbus_handler() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, default" value, filled in below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = sigbus_handler as *const () as usize;
        // No SA_ONSTACK: the fault service runs on the faulting thread's own stack (an alternate
        // signal stack, sized for a stack-overflow report, is too small for it).
        // SA_NODEFER: SIGBUS stays unblocked while the handler runs. A SIGBUS raised inside the
        // handler (a bug: hetmem code touching a managed page it should not, or the previous
        // handler we chain to faulting) is synchronous, and the kernel kills a thread at once,
        // silently, for a synchronous signal it has blocked; unblocked, the nested fault reaches
        // this handler again, which reports it (a no-fault zone's message) or serves it.
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_NODEFER;
        // SAFETY: sigemptyset on a sigset_t we own.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        let prev = Box::leak(Box::new(
            // SAFETY: zeroed sigaction is valid; overwritten by sigaction below.
            unsafe { std::mem::zeroed::<libc::sigaction>() },
        ));
        // SAFETY: installs a handler for SIGBUS; `sa` and `prev` are valid sigaction structs.
        // The previous action is published before the handler can observe it as null only in
        // the window before this call returns, in which case the handler restores the default.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &sa, prev) };
        if rc != 0 {
            INSTALL_ERR.store(
                io::Error::last_os_error().raw_os_error().unwrap_or(1) as usize,
                Ordering::Release,
            );
        } else {
            PREV_ACTION.store(prev, Ordering::Release);
        }
    });
    match INSTALL_ERR.load(Ordering::Acquire) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

extern "C" fn sigbus_handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; saving and restoring it keeps the interrupted code's view.
    let errno_slot = unsafe { libc::__errno_location() };
    // SAFETY: `errno_slot` points at this thread's errno.
    let saved_errno = unsafe { *errno_slot };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: for SA_SIGINFO handlers `ctx` is a valid ucontext_t; REG_ERR holds the x86 page
    // fault error code, whose bit 1 says the access was a write.
    let write = unsafe {
        let uc = ctx as *const libc::ucontext_t;
        ((*uc).uc_mcontext.gregs[libc::REG_ERR as usize] & 2) != 0
    };
    let zone = NO_FAULT.with(|c| c.get());
    if !zone.is_empty() && is_managed(addr) {
        let mut b = [0u8; 18];
        abort_with(&[
            b"hetmem: BUG: faulted on managed address ",
            hex(addr, &mut b),
            b" inside a no-fault zone (",
            zone.as_bytes(),
            b"): serving it would deadlock\n",
        ]);
    }
    let was_in = IN_SIGNAL.with(|c| c.replace(true));
    UNSERVED.with(|c| c.set(""));
    let handled = dispatch_fault(addr, write);
    IN_SIGNAL.with(|c| c.set(was_in));
    if handled {
        // SAFETY: restoring this thread's errno.
        unsafe { *errno_slot = saved_errno };
        return;
    }
    if REMAPS_PENDING.load(Ordering::SeqCst) > 0 {
        // Perhaps the moved range of a direct mremap that hetmem is following right now (or
        // a fill that got EAGAIN while the event was unread): wait for the event readers, then
        // let the access retry. Bounded by their work; sched_yield is async-signal-safe.
        while REMAPS_PENDING.load(Ordering::SeqCst) > 0 {
            rustix::thread::sched_yield();
        }
        // SAFETY: restoring this thread's errno.
        unsafe { *errno_slot = saved_errno };
        return;
    }
    // A managed page that could not be served: say why before the signal takes its course.
    let why = UNSERVED.with(|c| c.get());
    if !why.is_empty() {
        let mut b = [0u8; 18];
        write_stderr_parts(&[
            b"hetmem: SIGBUS at ",
            hex(addr, &mut b),
            b": ",
            why.as_bytes(),
            b"\n",
        ]);
    }
    // Not served: chain to the previous handler (Rust's own, or the default action).
    let prev = PREV_ACTION.load(Ordering::Acquire);
    // SAFETY: `prev`, when non-null, is a leaked, never-freed sigaction written once.
    unsafe {
        if !prev.is_null() {
            let p = &*prev;
            if p.sa_flags & libc::SA_SIGINFO != 0 && p.sa_sigaction > 1 {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(p.sa_sigaction);
                f(sig, info, ctx);
                *errno_slot = saved_errno;
                return;
            }
            if p.sa_sigaction > 1 {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
                f(sig);
                *errno_slot = saved_errno;
                return;
            }
        }
        // Default action: restore SIG_DFL; returning re-executes the access, which kills the
        // process with SIGBUS as if hetmem were not there.
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        *errno_slot = saved_errno;
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// How a child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    /// `_exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// Forks; the child runs `f` and exits with its return value (`_exit`, no destructors).
/// The parent waits for the child and returns how it ended.
///
/// Only for tests and benches: after a fork in a multi-threaded process the child may only do
/// async-signal-safe work, so `f` must not allocate or lock (plain loads and stores, raw
/// syscalls).
pub fn fork_and_wait(f: impl FnOnce() -> i32) -> io::Result<ChildExit> {
    // SAFETY: the child only runs `f` (documented: async-signal-safe work) and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = f();
        // SAFETY: terminates the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    wait_child(pid)
}

/// Forks a child that runs `f` and exits; returns its pid without waiting.
pub fn fork_child(f: impl FnOnce() -> i32) -> io::Result<i32> {
    // SAFETY: as in fork_and_wait.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = f();
        // SAFETY: as in fork_and_wait.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

/// Sends SIGKILL to `pid`.
pub fn kill(pid: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory effects in this process.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for child `pid`.
pub fn wait_child(pid: i32) -> io::Result<ChildExit> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        break;
    }
    if libc::WIFEXITED(status) {
        Ok(ChildExit::Exited(libc::WEXITSTATUS(status)))
    } else {
        Ok(ChildExit::Signaled(libc::WTERMSIG(status)))
    }
}

/// The calling process's id.
pub fn getpid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// The effective user id.
pub fn geteuid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// `read(2)` from `fd` into `region[off..off+len]`: a kernel-mode access to the region's
/// pages (used to check how a fault-service mode treats system calls).
pub fn read_into(
    fd: std::os::fd::BorrowedFd<'_>,
    region_base: usize,
    len: usize,
) -> io::Result<usize> {
    // SAFETY: the kernel writes into `region_base..+len`, which the caller names as part of a
    // hetmem reservation: managed memory, accessed only by raw copies, never by Rust references.
    let n = unsafe { libc::read(fd.as_raw_fd(), region_base as *mut libc::c_void, len) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// CPU copy out of managed memory (`len` bytes at `addr`), with real loads that may fault.
pub(crate) fn cpu_read(addr: usize, dst: &mut [u8]) {
    // SAFETY: the caller checked the range lies in a live reservation; raw copy, no reference.
    unsafe { ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), dst.len()) }
}

/// CPU copy into managed memory, with real stores that may fault.
pub(crate) fn cpu_write(addr: usize, src: &[u8]) {
    // SAFETY: as in cpu_read.
    unsafe { ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, src.len()) }
}

/// CPU atomic fetch-add on a `u64` in managed memory (8-byte aligned, checked by the caller).
pub(crate) fn cpu_fetch_add_u64(addr: usize, v: u64) -> u64 {
    // SAFETY: aligned and inside a live reservation (caller); atomics on managed memory form no
    // long-lived reference.
    let a = unsafe { &*(addr as *const std::sync::atomic::AtomicU64) };
    a.fetch_add(v, Ordering::SeqCst)
}

/// A real CPU load of the `u32` at `addr`, for tests of fault behaviour (a child process
/// touching memory it did not inherit, a load that must fault into hetmem). The address must be
/// 4-byte aligned and should be managed memory: an unmapped address kills the process with
/// SIGSEGV, which is what such tests observe.
pub fn probe_load_u32(addr: usize) -> u32 {
    assert!(
        addr.is_multiple_of(4),
        "probe_load_u32 needs an aligned address"
    );
    // SAFETY: a volatile load forms no reference; managed memory aliases no Rust object. An
    // invalid address faults (the documented purpose), it does not read Rust-owned state.
    unsafe { ptr::read_volatile(addr as *const u32) }
}

/// A real CPU store of a `u32` at `addr` (see [`probe_load_u32`]).
pub fn probe_store_u32(addr: usize, v: u32) {
    assert!(
        addr.is_multiple_of(4),
        "probe_store_u32 needs an aligned address"
    );
    // SAFETY: as in probe_load_u32; the callers only pass managed addresses.
    unsafe { ptr::write_volatile(addr as *mut u32, v) }
}

/// `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`, for tests of how hetmem behaves in a
/// process whose memory is locked (`MADV_DONTNEED` is refused there). Undo with
/// [`munlockall`].
pub fn mlockall_onfault() -> io::Result<()> {
    rustix::mm::mlockall(
        rustix::mm::MlockAllFlags::CURRENT
            | rustix::mm::MlockAllFlags::FUTURE
            | rustix::mm::MlockAllFlags::ONFAULT,
    )?;
    Ok(())
}

/// Blocks SIGBUS in the calling thread (`pthread_sigmask`), for tests of what happens to a
/// thread that does so (it is killed when it touches an unfilled page of a signal-mode mapping).
pub fn block_sigbus_in_this_thread() -> io::Result<()> {
    // SAFETY: `set` is a sigset_t we own, initialised by sigemptyset before use; changing this
    // thread's signal mask touches no Rust-owned memory.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGBUS);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// For tests of a program that moves managed memory behind hetmem's back: maps `len` bytes of
/// fresh anonymous memory somewhere, then moves `from..from + len` there with
/// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)`, exactly as a program would; returns the new
/// address. `from..from + len` must lie in one mapping.
pub fn mremap_elsewhere(from: usize, len: usize) -> io::Result<usize> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
    let dst = unsafe {
        rustix::mm::mmap_anonymous(
            ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }?;
    // SAFETY: moves the caller's mapping over the fresh one just made; no Rust object lives in
    // either (managed memory is reached through raw copies only).
    let moved = unsafe {
        rustix::mm::mremap_fixed(
            from as *mut _,
            len,
            len,
            rustix::mm::MremapFlags::MAYMOVE,
            dst,
        )
    };
    match moved {
        Ok(p) => Ok(p as usize),
        Err(e) => {
            // SAFETY: `dst` is the fresh mapping made above, referred to by nothing.
            let _ = unsafe { rustix::mm::munmap(dst, len) };
            Err(e.into())
        }
    }
}

/// For tests of a program that drops managed pages behind hetmem's back: a direct
/// `madvise(MADV_DONTNEED)` of `addr..addr + len`, exactly as a program would.
pub fn madvise_dontneed(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: drops the pages of the caller's range (a private anonymous or file mapping reads
    // zeros or the file afterwards); no Rust object lives in managed memory.
    unsafe { rustix::mm::madvise(addr as *mut _, len, Advice::LinuxDontNeed) }?;
    Ok(())
}

/// `munlockall()`.
pub fn munlockall() -> io::Result<()> {
    rustix::mm::munlockall()?;
    Ok(())
}

/// A memfd: the staging store of hetmem's page cache (file pages at their file offsets).
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    /// A new, empty memfd (not inherited across exec).
    pub fn new(name: &str) -> io::Result<Memfd> {
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
        Ok(Memfd { fd })
    }

    /// Sets its size.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        rustix::fs::ftruncate(&self.fd, len)?;
        Ok(())
    }

    /// Reads at `off` until `buf` is full or the end (returns the bytes read).
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(&self.fd, &mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Reads up to `len` bytes at `off` straight into `dst[dst_off..dst_off + len]` (a region of
    /// hetmem's own, never a managed address), without a staging buffer; returns the bytes read
    /// (short at the end of the memfd).
    pub fn read_into_region(
        &self,
        off: u64,
        dst: &Region,
        dst_off: usize,
        len: usize,
    ) -> io::Result<usize> {
        dst.check(dst_off, len)?;
        let mut done = 0;
        while done < len {
            let p = (dst.base + dst_off + done) as *mut libc::c_void;
            // SAFETY: `p..p + len - done` lies inside `dst`'s live mapping (checked above); the
            // kernel writes into it like any memory copy (a region of hetmem's own, which no Rust
            // reference covers: it is accessed through raw copies only).
            let n = unsafe {
                libc::pread(
                    self.fd.as_raw_fd(),
                    p,
                    len - done,
                    (off + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => break,
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Writes all of `buf` at `off`.
    pub fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pwrite(&self.fd, &buf[done..], off + done as u64) {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Frees `off..off + len` (`FALLOC_FL_PUNCH_HOLE | KEEP_SIZE`): the bytes read as zeros and
    /// their memory is returned.
    pub fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(
            &self.fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            off,
            len,
        )?;
        Ok(())
    }

    /// Bytes of memory it holds (`st_blocks * 512`).
    pub fn resident_bytes(&self) -> io::Result<u64> {
        Ok(rustix::fs::fstat(&self.fd)?.st_blocks as u64 * 512)
    }
}

/// `PAGEMAP_SCAN` on `/proc/self/pagemap`: which pages of a range with asynchronous
/// write-protect were written since they were last protected.
#[derive(Debug)]
pub struct PagemapScanner {
    fd: OwnedFd,
}

const OP_PAGEMAP_SCAN: u64 = opcode::read_write::<uapi::pm_scan_arg>(b'f', 16) as u64;

impl PagemapScanner {
    /// Opens `/proc/self/pagemap`.
    pub fn new() -> io::Result<PagemapScanner> {
        let fd = rustix::fs::open(
            "/proc/self/pagemap",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(PagemapScanner { fd })
    }

    /// The written pages of `start..end` (as address ranges), write-protecting them again
    /// (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category `PAGE_IS_WRITTEN`).
    pub fn written_and_reprotect(
        &self,
        start: usize,
        end: usize,
    ) -> io::Result<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        let mut regions = vec![
            uapi::page_region {
                start: 0,
                end: 0,
                categories: 0
            };
            512
        ];
        let mut s = start;
        while s < end {
            let mut a = uapi::pm_scan_arg {
                size: std::mem::size_of::<uapi::pm_scan_arg>() as u64,
                flags: (uapi::PM_SCAN_WP_MATCHING | uapi::PM_SCAN_CHECK_WPASYNC) as u64,
                start: s as u64,
                end: end as u64,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: uapi::PAGE_IS_WRITTEN as u64,
                category_anyof_mask: 0,
                return_mask: uapi::PAGE_IS_WRITTEN as u64,
            };
            // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` whose `vec` points at
            // `regions.len()` writable `page_region`s, which `regions` is; it only reads page
            // tables of this process and write-protects the scanned range.
            let n = unsafe { libc::ioctl(self.fd.as_raw_fd(), OP_PAGEMAP_SCAN as _, &mut a) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for r in &regions[..n as usize] {
                out.push((r.start as usize, r.end as usize));
            }
            if a.walk_end as usize <= s {
                break;
            }
            s = a.walk_end as usize;
        }
        Ok(out)
    }
}

impl Memfd {
    /// The fd (to map it).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `mlock2(addr, len, MLOCK_ONFAULT)` on part of a hetmem reservation, for tests of how hetmem
/// behaves when the user locks some of its memory (`MADV_DONTNEED` is refused there).
pub fn mlock_onfault(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock2 changes no memory contents; the range is the caller's managed memory.
    unsafe { rustix::mm::mlock_with(addr as *mut _, len, rustix::mm::MlockFlags::ONFAULT) }?;
    Ok(())
}

/// `munlock(addr, len)`.
pub fn munlock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: munlock changes no memory contents.
    unsafe { rustix::mm::munlock(addr as *mut _, len) }?;
    Ok(())
}

/// A read-only `MAP_SHARED` mapping of a regular file by the kernel itself (its page cache, its
/// fault-around and readahead): the baseline of hetmem's file mappings in `hetmem bench`. It is a
/// [`Region`] (owned, unmapped on drop, read through raw copies; unlike `Region::new`, not
/// `MADV_DONTFORK`) that offers only the reads.
///
/// The file must stay at least `len` bytes long while the mapping lives: as with any `mmap`, an
/// access past the end of file raises SIGBUS (which kills the process; it is not memory unsafety).
#[derive(Debug)]
pub struct MappedFile(Region);

/// Maps the first `len` bytes (non-zero) of `file` read-only and shared (see [`MappedFile`]).
pub fn map_file_readonly(file: &std::fs::File, len: usize) -> io::Result<MappedFile> {
    if len == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a fresh mapping at an address of the kernel's choosing aliases no Rust object; it is
    // read-only and only ever read through raw copies (no reference to its bytes is formed, so
    // writes to the file by others cannot invalidate one).
    let raw = unsafe {
        rustix::mm::mmap(
            ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::SHARED,
            file,
            0,
        )
    }?;
    Ok(MappedFile(Region {
        base: raw as usize,
        len,
    }))
}

impl MappedFile {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the mapping is empty (never: mappings have a non-zero length).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping (a raw copy; the first access to a
    /// page faults into the kernel, which reads the file if it must).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> io::Result<()> {
        self.0.read(off, dst)
    }

    /// Volatile load of a `u64` at `off` (8-byte aligned).
    pub fn load_u64(&self, off: usize) -> io::Result<u64> {
        self.0.load_u64(off)
    }
}
