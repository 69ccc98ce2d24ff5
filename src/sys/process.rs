//! Process helpers: hetmem's own CPU accesses to managed memory (crate-internal, behind the
//! checks of `Space`), and, with the `testing` feature, the tests' helpers: fork, wait, kill,
//! raw probes of memory, and the direct system calls a program makes behind hetmem's back
//! (mremap, madvise). Those that touch arbitrary memory, or fork, are `unsafe fn`s.
//! Always there beside them: the process and user ids (`Space`'s fork check, `hetmem info`).

#![allow(unsafe_code)]

use super::*;

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// How a child process ended.
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    /// `_exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// Forks; the child runs `f` and exits with its return value (`_exit`, no destructors).
/// The parent waits for the child and returns how it ended. For tests (`testing` feature).
///
/// # Safety
///
/// In a multi-threaded process the child has only the forking thread, and every lock another
/// thread held at the fork stays held in it forever (the allocator's among them). So `f` must
/// do only async-signal-safe work: no allocation, no lock, no panic that unwinds (plain loads
/// and stores, raw system calls), and must not map memory.
#[cfg(feature = "testing")]
pub unsafe fn fork_and_wait(f: impl FnOnce() -> i32) -> io::Result<ChildExit> {
    // SAFETY: the child only runs `f`, which the caller guarantees is async-signal-safe work
    // (see `# Safety`), and `_exit`s.
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

/// Forks a child that runs `f` and exits; returns its pid without waiting (see
/// [`wait_child`], [`kill`]). For tests (`testing` feature).
///
/// # Safety
///
/// As for [`fork_and_wait`]: `f` does only async-signal-safe work.
#[cfg(feature = "testing")]
pub unsafe fn fork_child(f: impl FnOnce() -> i32) -> io::Result<i32> {
    // SAFETY: as in fork_and_wait (the caller's guarantee on `f`).
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

/// Sends SIGKILL to `pid` (a child of [`fork_child`]; `testing` feature).
#[cfg(feature = "testing")]
pub fn kill(pid: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory effects in this process.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for child `pid` (`testing` feature).
#[cfg(feature = "testing")]
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

/// `read(2)` from `fd` into `addr..addr + len`: a kernel-mode access to those pages (how a
/// fault-service mode treats system calls). Checked callers use `Probe::read_from`. `testing`
/// feature.
///
/// # Safety
///
/// `addr..addr + len` must be memory that no Rust object lives in: managed memory of a live
/// address space, or a mapping the caller owns and reaches only through raw pointers. (An
/// unmapped or protected page makes the call fail with EFAULT; memory that Rust code owns would
/// be overwritten.)
#[cfg(feature = "testing")]
pub unsafe fn read_into(
    fd: std::os::fd::BorrowedFd<'_>,
    addr: usize,
    len: usize,
) -> io::Result<usize> {
    // SAFETY: the caller's guarantee (see `# Safety`).
    unsafe { read_raw(fd, addr, len) }
}

/// `read(2)` into raw memory (see [`cpu_read_from`]).
///
/// # Safety
///
/// As for [`read_into`]: no Rust object lives in `addr..addr + len`.
unsafe fn read_raw(fd: std::os::fd::BorrowedFd<'_>, addr: usize, len: usize) -> io::Result<usize> {
    // SAFETY: the kernel writes into `addr..addr + len`, which the caller guarantees is memory
    // no Rust object lives in; no reference to it is formed here.
    let n = unsafe { libc::read(fd.as_raw_fd(), addr as *mut libc::c_void, len) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// CPU copy out of managed memory (`len` bytes at `addr`), with real loads that may fault.
/// The caller has checked that the range lies in mappings of a live reservation (as for the
/// other `cpu_*` helpers below, which are crate-internal for that reason).
///
/// Volatile-style, as rust-vmm's vm-memory copies guest memory: every byte is loaded exactly
/// once, by aligned 8-byte loads where the range allows (bytes at the edges), and no reference to
/// managed memory is formed, so a device (or another thread) writing the memory meanwhile is not
/// a data race on a Rust object: a word it wrote is seen whole or not at all.
pub(crate) fn cpu_read(addr: usize, dst: &mut [u8]) {
    let (len, d) = (dst.len(), dst.as_mut_ptr());
    let mut i = 0;
    while i < len && !(addr + i).is_multiple_of(8) {
        // SAFETY: the caller checked the range lies in a live reservation, where no Rust
        // object lives; a volatile load forms no reference (a fault is served or kills the
        // process). `i < len`: inside `dst`.
        unsafe { d.add(i).write(ptr::read_volatile((addr + i) as *const u8)) };
        i += 1;
    }
    while len - i >= 8 {
        // SAFETY: as above, an aligned word; `i + 8 <= len`: inside `dst` (written unaligned).
        unsafe {
            let w = ptr::read_volatile((addr + i) as *const u64);
            d.add(i).cast::<u64>().write_unaligned(w);
        }
        i += 8;
    }
    while i < len {
        // SAFETY: as above, one byte.
        unsafe { d.add(i).write(ptr::read_volatile((addr + i) as *const u8)) };
        i += 1;
    }
}

/// CPU copy into managed memory, with real stores that may fault (volatile-style, as
/// [`cpu_read`]: every byte stored once, aligned 8-byte stores where the range allows).
pub(crate) fn cpu_write(addr: usize, src: &[u8]) {
    let (len, p) = (src.len(), src.as_ptr());
    let mut i = 0;
    while i < len && !(addr + i).is_multiple_of(8) {
        // SAFETY: as in cpu_read, one byte; `i < len`: inside `src`.
        unsafe { ptr::write_volatile((addr + i) as *mut u8, p.add(i).read()) };
        i += 1;
    }
    while len - i >= 8 {
        // SAFETY: as in cpu_read, an aligned word; `i + 8 <= len`: inside `src` (read
        // unaligned).
        unsafe {
            let w = p.add(i).cast::<u64>().read_unaligned();
            ptr::write_volatile((addr + i) as *mut u64, w);
        }
        i += 8;
    }
    while i < len {
        // SAFETY: as in cpu_read, one byte.
        unsafe { ptr::write_volatile((addr + i) as *mut u8, p.add(i).read()) };
        i += 1;
    }
}

/// CPU copy out of managed memory with `memcpy` (the kernel-mapping side of the bench copies
/// the same way): for the bench's timed sweeps, over memory nothing else writes. Other callers
/// use [`cpu_read`].
#[cfg(feature = "cli")]
pub(crate) fn cpu_read_raw(addr: usize, dst: &mut [u8]) {
    // SAFETY: the caller checked the range lies in a live reservation, where no Rust object
    // lives, and that nothing writes it during the copy; raw copy, no reference.
    unsafe { ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), dst.len()) }
}

/// A real CPU load (volatile) of the aligned `u64` at `addr` in managed memory (see
/// [`cpu_load_u32`]).
pub(crate) fn cpu_load_u64(addr: usize) -> u64 {
    debug_assert!(addr.is_multiple_of(8));
    // SAFETY: as in cpu_load_u32.
    unsafe { ptr::read_volatile(addr as *const u64) }
}

/// A real CPU store (volatile) of an aligned `u64` at `addr` in managed memory (see
/// [`cpu_load_u32`]).
pub(crate) fn cpu_store_u64(addr: usize, v: u64) {
    debug_assert!(addr.is_multiple_of(8));
    // SAFETY: as in cpu_load_u32.
    unsafe { ptr::write_volatile(addr as *mut u64, v) }
}

/// CPU atomic fetch-add on a `u64` in managed memory (8-byte aligned, checked by the caller).
pub(crate) fn cpu_fetch_add_u64(addr: usize, v: u64) -> u64 {
    // SAFETY: aligned and inside a live reservation (caller); atomics on managed memory form no
    // long-lived reference.
    let a = unsafe { &*(addr as *const std::sync::atomic::AtomicU64) };
    a.fetch_add(v, Ordering::SeqCst)
}

/// A real CPU load (volatile) of the aligned `u32` at `addr` in managed memory, which may fault
/// into hetmem. The caller has checked that `addr` lies in mappings of a live reservation
/// (`Probe::load_u32`).
pub(crate) fn cpu_load_u32(addr: usize) -> u32 {
    debug_assert!(addr.is_multiple_of(4));
    // SAFETY: the caller's check: the aligned word is in a live reservation, where no Rust
    // object lives; a volatile load forms no reference, and a fault is served or kills the
    // process.
    unsafe { ptr::read_volatile(addr as *const u32) }
}

/// A real CPU store (volatile) of an aligned `u32` at `addr` in managed memory (see
/// [`cpu_load_u32`]).
pub(crate) fn cpu_store_u32(addr: usize, v: u32) {
    debug_assert!(addr.is_multiple_of(4));
    // SAFETY: as in cpu_load_u32.
    unsafe { ptr::write_volatile(addr as *mut u32, v) }
}

/// `read(2)` into managed memory: a kernel-mode access to its pages; the caller has checked the
/// range as for [`cpu_load_u32`].
pub(crate) fn cpu_read_from(
    fd: std::os::fd::BorrowedFd<'_>,
    addr: usize,
    len: usize,
) -> io::Result<usize> {
    // SAFETY: as in cpu_load_u32 (the range lies in a live reservation).
    unsafe { read_raw(fd, addr, len) }
}

/// A real CPU load of the `u32` at `addr` (volatile: exactly one 4-byte load), for tests of
/// fault behaviour (a load that must fault into hetmem, a child process touching memory it did
/// not inherit, memory a direct mremap moved). Checked callers use `Probe::load_u32`. `testing`
/// feature.
///
/// # Panics
///
/// If `addr` is not 4-byte aligned.
///
/// # Safety
///
/// `addr..addr + 4` must be memory that no Rust object lives in: managed memory of a live
/// address space, a mapping the caller owns and reaches only through raw pointers, or an
/// address where nothing is mapped (the load then raises SIGSEGV, which kills the process: what
/// a test in a child process observes). Memory that Rust code owns must never be named.
#[cfg(feature = "testing")]
pub unsafe fn probe_load_u32(addr: usize) -> u32 {
    assert!(
        addr.is_multiple_of(4),
        "probe_load_u32 needs an aligned address"
    );
    // SAFETY: the caller's guarantee (see `# Safety`): no Rust object lives at `addr`; a
    // volatile load forms no reference, and an access that faults is served or kills the
    // process.
    unsafe { ptr::read_volatile(addr as *const u32) }
}

/// The page-table entry of the page at `addr` now (`/proc/self/pagemap`): whether it is
/// present (bit 63), and whether it is write-protected by a userfaultfd (bit 57). For the
/// SIGBUS handler, telling a store to a missing page from one to a write-protected page.
/// Allocates nothing and takes no lock (async-signal-safe system calls only); `None` when
/// pagemap cannot be read.
pub fn page_state(addr: usize) -> Option<(bool, bool)> {
    let mut e = [0u8; 8];
    (pagemap_read(addr, &mut e) == 8).then(|| {
        let e = u64::from_ne_bytes(e);
        (e >> 63 & 1 == 1, e >> 57 & 1 == 1)
    })
}

/// Reads `/proc/self/pagemap` entries from the page at `addr` into `out` (8 bytes each): the
/// bytes read, 0 when it cannot be read. One open and one read; allocates nothing and takes no
/// lock (async-signal-safe system calls only).
fn pagemap_read(addr: usize, out: &mut [u8]) -> usize {
    let Ok(f) = rustix::fs::open(
        c"/proc/self/pagemap",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return 0;
    };
    rustix::io::pread(&f, out, (addr / PAGE_SIZE * 8) as u64).unwrap_or(0)
}

/// How many of the `pages` pages from `addr` (page-aligned) on hold data now, told without
/// touching them: the raw copy that follows reads only those. A page holds data when its
/// page-table entry is present or swapped out (`/proc/self/pagemap`), or when its backing page
/// is in memory (`mincore`: a shared or file page whose entry the program dropped is still in
/// its page cache, and a copy maps it again without a userfaultfd fault). A page the program
/// dropped from private anonymous memory holds none (a copy would fault), nor does a marker
/// ([`pagemap_holds_data`]). One open of
/// pagemap per call, 64 pages per read; 0 on an error.
pub fn resident_prefix(addr: usize, pages: usize) -> usize {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 64;
    let Ok(f) = std::fs::File::open("/proc/self/pagemap") else {
        return 0;
    };
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(CHUNK);
        let at = addr + done * PAGE_SIZE;
        let mut raw = [0u8; CHUNK * 8];
        if f.read_exact_at(&mut raw[..n * 8], (at / PAGE_SIZE * 8) as u64)
            .is_err()
        {
            return done;
        }
        let mut cached = [0u8; CHUNK];
        // SAFETY: mincore reads no memory of the range and writes one byte per page asked into
        // `cached`, which holds `CHUNK >= n` bytes.
        if unsafe { libc::mincore(at as *mut _, n * PAGE_SIZE, cached.as_mut_ptr()) } != 0 {
            cached = [0u8; CHUNK];
        }
        let there = (0..n)
            .take_while(|&i| {
                let e = u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                pagemap_holds_data(e) || cached[i] & 1 != 0
            })
            .count();
        done += there;
        if there < n {
            break;
        }
    }
    done
}

/// How many of the `pages` pages from `addr` (page-aligned, at most 512 looked at) have an
/// empty page-table entry now: neither present nor swapped out (`/proc/self/pagemap` bits 63
/// and 62; a marker reads as swapped, so it is not empty). 0 when pagemap cannot be read.
/// One open and one read of pagemap; allocates nothing.
pub fn empty_prefix(addr: usize, pages: usize) -> usize {
    const MOST: usize = 512;
    let mut raw = [0u8; MOST * 8];
    let got = pagemap_read(addr, &mut raw[..pages.min(MOST) * 8]);
    raw[..got - got % 8]
        .chunks_exact(8)
        .take_while(|w| {
            let e = u64::from_ne_bytes((*w).try_into().expect("8 bytes"));
            e >> 62 & 3 == 0
        })
        .count()
}

/// Whether the page at `addr` is in the CPU's view now (`mincore`: it is in memory and mapped
/// here; a page that would fault is not), without touching it. `testing` feature.
#[cfg(feature = "testing")]
pub fn page_resident(addr: usize) -> bool {
    let mut v = [0u8; 1];
    let page = addr & !(PAGE_SIZE - 1);
    // SAFETY: mincore reads no memory at `page` and writes one byte into `v` (one page asked).
    let r = unsafe { libc::mincore(page as *mut _, PAGE_SIZE, v.as_mut_ptr()) };
    r == 0 && v[0] & 1 != 0
}

/// A real CPU store of a `u32` at `addr` (volatile: exactly one 4-byte store); see
/// [`probe_load_u32`]. `testing` feature.
///
/// # Panics
///
/// If `addr` is not 4-byte aligned.
///
/// # Safety
///
/// As for [`probe_load_u32`].
#[cfg(feature = "testing")]
pub unsafe fn probe_store_u32(addr: usize, v: u32) {
    assert!(
        addr.is_multiple_of(4),
        "probe_store_u32 needs an aligned address"
    );
    // SAFETY: as in probe_load_u32 (the caller's guarantee).
    unsafe { ptr::write_volatile(addr as *mut u32, v) }
}

/// Blocks SIGBUS in the calling thread (`pthread_sigmask`), for tests of what happens to a
/// thread that does so (it is killed when it touches an unfilled page of a signal-mode mapping).
/// `testing` feature.
#[cfg(feature = "testing")]
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
/// address. `testing` feature.
///
/// # Safety
///
/// `from..from + len` must lie in one mapping in which no Rust object lives (managed memory,
/// which hetmem then follows), and nothing may access the old range while the call moves it.
/// The new range is plain memory of the caller's afterwards, reachable through raw pointers
/// only (and never unmapped by hetmem).
#[cfg(feature = "testing")]
pub unsafe fn mremap_elsewhere(from: usize, len: usize) -> io::Result<usize> {
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
    // either (the caller's guarantee for `from..from + len`; `dst` is fresh).
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
/// `madvise(MADV_DONTNEED)` of `addr..addr + len`, exactly as a program would. `testing`
/// feature.
///
/// # Safety
///
/// No Rust object may live in `addr..addr + len` (managed memory qualifies): its pages read as
/// zeros, or as the file, afterwards.
#[cfg(feature = "testing")]
pub unsafe fn madvise_dontneed(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: drops the pages of the caller's range (a private anonymous or file mapping reads
    // zeros or the file afterwards); no Rust object lives there (the caller's guarantee).
    unsafe { rustix::mm::madvise(addr as *mut _, len, Advice::LinuxDontNeed) }?;
    Ok(())
}

/// Registers fork handlers (`pthread_atfork`): `prepare` runs in the forking thread before
/// `fork()`, `parent` and `child` after it, in the parent and in the child. For the C library's
/// `fork()` (and what calls it); a raw `clone` system call runs none of them.
pub fn on_fork(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> io::Result<()> {
    // SAFETY: the three handlers are plain `extern "C"` functions that live as long as the
    // program (hetmem's code); registering them changes no memory of the caller's.
    let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}
