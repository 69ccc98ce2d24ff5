//! Shared helpers for the integration tests: a watchdog (a hang in a fault path fails the test
//! in seconds instead of hanging CI) and the data patterns of the kernel's selftests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

/// Fails (aborts) the test process with a message if the guard is not dropped within `secs`.
/// Every test that can block on a fault holds one. On a timeout it prints what each thread
/// said it was doing last ([`at`]) and, where gdb is installed, every thread's stack: where
/// each one waits.
pub struct Watchdog {
    tx: Option<mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// What each test thread is doing, as it last said with [`at`].
static STATUS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Records what the calling thread is doing now (shown if the watchdog fires).
pub fn at(what: impl Into<String>) {
    let me = std::thread::current();
    let name = format!("{:?} {}", me.id(), me.name().unwrap_or("-"));
    STATUS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name, what.into());
}

/// The latest panics seen in this process since its first watchdog (16 kept, oldest first):
/// a thread that panicked can leave others waiting for it (a loop on a flag it never set, a
/// scope that never ends), and its message, captured by the test harness, would be lost with
/// the abort. (A "hang" of issue 12 was such a panic.) Expected panics (`catch_unwind` in some
/// tests) show up too.
static PANICS: Mutex<std::collections::VecDeque<String>> =
    Mutex::new(std::collections::VecDeque::new());

/// Records every panic in [`PANICS`], then runs the hook that was there (the harness's).
fn record_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // `info` names the place; the thread is not asked (`thread::current` can itself
            // panic while a thread's locals are torn down).
            let line = info.to_string();
            let mut p = PANICS.lock().unwrap_or_else(|p| p.into_inner());
            if p.len() == 16 {
                p.pop_front();
            }
            p.push_back(line);
            drop(p);
            prev(info);
        }));
    });
}

/// Writes a line to the process's stderr itself: `eprintln!` in a test's threads goes to the
/// harness's capture, which the abort that follows would lose.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

fn report_hang(name: &str, secs: u64) {
    say!("WATCHDOG: test `{name}` did not finish within {secs} s: a fault path is probably hung");
    if let Ok(p) = PANICS.try_lock() {
        for line in p.iter() {
            say!("WATCHDOG:   earlier panic (its thread may be what the others wait for): {line}");
        }
    }
    if let Ok(st) = STATUS.try_lock() {
        for (thread, what) in st.iter() {
            say!("WATCHDOG:   thread {thread}: last at `{what}`");
        }
    }
    // What each thread waits in, from the kernel: never blocks (gdb may, below).
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let p = t.path();
            let read = |f: &str| {
                std::fs::read_to_string(p.join(f))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            say!(
                "WATCHDOG:   task {} `{}`: wchan {}, syscall {}",
                t.file_name().to_string_lossy(),
                read("comm"),
                read("wchan"),
                read("syscall")
            );
        }
    }
    // Every thread's stack, from outside (the hung threads cannot report themselves). gdb's
    // attach stops every thread, this one too, and waits for ever on a thread that cannot
    // stop (one in a killable wait, such as a madvise waiting for its userfaultfd event to be
    // read; found by review): the bound is outside this process, `timeout`'s.
    let pid = std::process::id().to_string();
    let gdb = std::process::Command::new("timeout")
        .args(["-s", "KILL", "20", "gdb", "-p", &pid, "-batch", "-nx"])
        .args(["-ex", "thread apply all bt 25"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match gdb {
        Ok(out) if out.status.success() => say!(
            "WATCHDOG: stacks:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Ok(out) => say!(
            "WATCHDOG: no stacks (gdb ended with {}, killed after 20 s if 137):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => say!("WATCHDOG: no stacks (timeout, gdb: {e})"),
    }
}

pub fn watchdog(name: &'static str, secs: u64) -> Watchdog {
    record_panics();
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs)) {
            report_hang(name, secs);
            std::process::abort();
        }
    });
    Watchdog {
        tx: Some(tx),
        handle: Some(handle),
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub const PAGE: usize = 4096;
/// N of the selftests: 4 MiB of pages.
pub const NPAGES: usize = (4 << 20) / PAGE;
/// P of the selftests: the PMD size.
pub const PMD: usize = 2 << 20;

/// `ptr[i] = i` as 32-bit ints, for `bytes` bytes.
pub fn pattern(bytes: usize, f: impl Fn(u32) -> u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes);
    for i in 0..(bytes / 4) as u32 {
        v.extend_from_slice(&f(i).to_ne_bytes());
    }
    v
}

/// Reads a buffer as 32-bit ints.
pub fn ints(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// A file in the temp directory, removed when dropped.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    /// Creates `hetmem-<name>-<pid>` with `content`.
    pub fn new(name: &str, content: &[u8]) -> TempFile {
        let p = std::env::temp_dir().join(format!("hetmem-{name}-{}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        TempFile(p)
    }
    /// The file's bytes on disk (read independently of any cache).
    pub fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The `HETMEM_SOAK` multiplier of the randomized tests (1 when unset or invalid).
pub fn soak() -> u32 {
    std::env::var("HETMEM_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The seed of a randomized test: `var` if set (to replay a failure), else from the clock and
/// the process id.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ (std::process::id() as u64) << 32
        })
}

/// A 1 GiB address space with a small stash (the tests' usual space).
/// Options of a shared file mapping with `prot` that intercepts stores (so that its pages may be
/// placed in device-private memory or replicated, and the dirty bound holds for its stores).
pub fn intercepting(prot: hetmem::Prot) -> hetmem::FileMapOptions {
    hetmem::FileMapOptions {
        prot,
        shared: true,
        intercept_stores: true,
    }
}

/// A device-coherent software device of `capacity` bytes.
pub fn coherent(capacity: usize) -> hetmem::SoftDevice {
    hetmem::SoftDevice::new(hetmem::DeviceConfig {
        kind: hetmem::MemoryKind::Coherent,
        capacity,
    })
    .unwrap()
}

pub fn small_space() -> hetmem::Space {
    small_space_with_stash(2 << 20)
}

/// A 1 GiB address space with a stash of `stash` bytes.
pub fn small_space_with_stash(stash: usize) -> hetmem::Space {
    hetmem::Space::with_config(hetmem::SpaceConfig {
        size: 1 << 30,
        stash,
        ..hetmem::SpaceConfig::default()
    })
    .unwrap()
}

/// A field of `/proc/self/smaps` (e.g. `"Rss:"`, `"AnonHugePages:"`) for the kernel mapping
/// (VMA) that holds `a`, in bytes.
pub fn smaps_bytes(a: usize, field: &str) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((s, e)) = range.split_once('-')
            && let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
        {
            inside = (s..e).contains(&a);
            continue;
        }
        if inside && let Some(v) = line.strip_prefix(field) {
            let kb: usize = v.trim().trim_end_matches("kB").trim().parse().unwrap();
            return kb * 1024;
        }
    }
    panic!("no mapping at {a:#x} in /proc/self/smaps");
}

/// A direct `mremap` of `len` bytes at `a` (the test's own managed memory) to a fresh
/// `PROT_NONE` mapping, `MREMAP_FIXED`, as a program moving a range away does: the new address.
///
/// # Safety
/// No Rust object may live in `a..a + len`: its memory moves.
pub unsafe fn move_away(a: hetmem::VirtAddr, len: usize) -> usize {
    // SAFETY: a fresh PROT_NONE mapping as the target, and the caller's range moved there
    // (the caller's guarantee: nothing of Rust's lives in it).
    unsafe {
        let tgt = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(tgt, libc::MAP_FAILED);
        let moved = libc::mremap(
            a.get() as *mut _,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            tgt,
        );
        assert_eq!(moved, tgt, "mremap: {}", std::io::Error::last_os_error());
        moved as usize
    }
}

/// Whether this kernel has `UFFDIO_MOVE` (6.8 on), asked with a full userfaultfd or, where that
/// is refused, a user-mode-only one.
pub fn kernel_has_uffdio_move() -> bool {
    hetmem::sys::kernel_features(false)
        .or_else(|_| hetmem::sys::kernel_features(true))
        .is_ok_and(|f| f & (1 << 16) != 0)
}

/// `PM_PRESENT` and `PM_SWAP` of a `/proc/self/pagemap` entry.
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;

/// The `/proc/self/pagemap` entry of the page at `a` (the selftests' `pagemap_get_entry`).
pub fn pagemap_entry(a: hetmem::VirtAddr) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, (a.get() / 4096 * 8) as u64)
        .unwrap();
    u64::from_ne_bytes(e)
}
