//! Process helpers for tests and benches: fork, wait, kill, probes of managed memory, and the
//! direct system calls a program makes behind hetmem's back (mremap, madvise).

#![allow(unsafe_code)]

use super::*;

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
