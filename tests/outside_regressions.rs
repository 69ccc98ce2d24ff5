//! Regression tests for the hangs, aborts and leaks found by testing hetmem from outside,
//! through its public API only (each test fails, hangs into its watchdog, or aborts on the bug
//! it names).

mod common;
use common::*;
use hetmem::pagecache::*;
use hetmem::*;
use std::io;
use std::sync::{Arc, Mutex};

type Hook = Box<dyn FnMut() + Send>;

/// The real file, with a hook run inside `punch` and `write_at` (after the cache has scanned
/// the mappings and before it drops its pages): it lets a test put a CPU store exactly in the
/// window where one raced a hole punch or a direct write.
#[derive(Clone)]
struct HookedFile {
    inner: Arc<StdFile>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl std::fmt::Debug for HookedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookedFile")
    }
}

impl HookedFile {
    fn open(path: &std::path::Path) -> HookedFile {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        HookedFile {
            inner: Arc::new(StdFile(f)),
            hook: Arc::new(Mutex::new(None)),
        }
    }
    fn arm(&self, h: Hook) {
        *self.hook.lock().unwrap() = Some(h);
    }
    fn fire(&self) {
        if let Some(mut h) = self.hook.lock().unwrap().take() {
            h();
        }
    }
}

impl FileBackend for HookedFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
        self.fire();
        self.inner.write_at(off, buf)
    }
    fn sync(&self, data_only: bool) -> io::Result<()> {
        self.inner.sync(data_only)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.fire();
        self.inner.punch(off, len)
    }
}

/// A cache of a 16-page file of 0x11 bytes behind a [`HookedFile`], mapped shared read-write
/// (stores tracked asynchronously, the default) in a new space.
fn hooked_mapping(name: &str) -> (TempFile, HookedFile, FileHandle, Space, VirtAddr) {
    let f = TempFile::new(name, &vec![0x11u8; 16 * PAGE]);
    let hf = HookedFile::open(&f.0);
    let cache =
        FileCache::with_backend(Box::new(hf.clone()), true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file(&h, 0, 16 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    (f, hf, h, space, a)
}

/// A CPU store to a page of a shared file mapping lands after the hole punch scanned the
/// mappings and before the memfd is punched (the race of the outside finding): the punch zaps a
/// page table entry that is not write-protected, and the next scan (`fsync`) reported the
/// now-empty entry as written: the cache marked the page dirty although the memfd had no page,
/// a fault on it found it "cached" and filled nothing, and the access faulted forever.
#[test]
fn store_racing_a_hole_punch_then_fsync_does_not_hang() {
    let _w = watchdog("store_racing_punch", 30);
    let (f, hf, h, space, a) = hooked_mapping("o1-punch");
    let p3 = a.add(3 * PAGE);
    // Plain stores, lock-free: the hook runs under the cache's lock.
    let probe = space.probe(a, 16 * PAGE).unwrap();
    probe.store_u32(p3, 1).unwrap();
    h.fsync().unwrap();
    let hook_probe = probe.clone();
    hf.arm(Box::new(move || hook_probe.store_u32(p3, 2).unwrap()));
    h.punch_hole(3 * PAGE as u64, PAGE as u64).unwrap();
    h.fsync().unwrap();
    at("load of the punched page");
    // The page was punched (the racing store went with it): zeros, on the CPU and on disk.
    assert_eq!(space.load_u32(p3).unwrap(), 0);
    probe.store_u32(p3, 3).unwrap();
    h.fsync().unwrap();
    let disk = f.disk();
    assert_eq!(&disk[3 * PAGE..3 * PAGE + 4], &3u32.to_ne_bytes());
    assert!(disk[3 * PAGE + 4..4 * PAGE].iter().all(|&b| b == 0));
    assert!(disk[..3 * PAGE].iter().all(|&b| b == 0x11));
}

/// The same race with a direct write in place of the punch.
#[test]
fn store_racing_a_direct_write_then_fsync_does_not_hang() {
    let _w = watchdog("store_racing_direct_write", 30);
    let (f, hf, h, space, a) = hooked_mapping("o1-direct");
    let p5 = a.add(5 * PAGE);
    let probe = space.probe(a, 16 * PAGE).unwrap();
    probe.store_u32(p5, 1).unwrap();
    h.fsync().unwrap();
    let hook_probe = probe.clone();
    hf.arm(Box::new(move || hook_probe.store_u32(p5, 2).unwrap()));
    h.direct_write(5 * PAGE as u64, &vec![0x55u8; PAGE])
        .unwrap();
    h.fsync().unwrap();
    at("load of the directly written page");
    assert_eq!(space.load_u32(p5).unwrap(), 0x5555_5555);
    h.fsync().unwrap();
    assert!(f.disk()[5 * PAGE..6 * PAGE].iter().all(|&b| b == 0x55));
}

/// The same race with a device writing the page afterwards: the device's copy faulted on the
/// missing page while holding its page-table lock (a deadlock once another thread invalidates).
#[test]
fn device_write_after_a_store_raced_a_punch_does_not_deadlock() {
    let _w = watchdog("device_write_after_race", 30);
    let (f, hf, h, space, a) = hooked_mapping("o2-device");
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let p2 = a.add(2 * PAGE);
    let probe = space.probe(a, 16 * PAGE).unwrap();
    probe.store_u32(p2, 1).unwrap();
    h.fsync().unwrap();
    let hook_probe = probe.clone();
    hf.arm(Box::new(move || hook_probe.store_u32(p2, 2).unwrap()));
    h.punch_hole(2 * PAGE as u64, PAGE as u64).unwrap();
    h.fsync().unwrap();
    at("device write of the punched page");
    m.write(p2, PAGE, &vec![0x77u8; PAGE]).unwrap();
    // A concurrent punch of the same page (an invalidation waiting for the device's lock).
    let h2 = h.cache().handle();
    let t = std::thread::spawn(move || h2.punch_hole(2 * PAGE as u64, PAGE as u64));
    m.write(p2, PAGE, &vec![0x78u8; PAGE]).unwrap();
    t.join().unwrap().unwrap();
    h.fsync().unwrap();
    let page = &f.disk()[2 * PAGE..3 * PAGE];
    assert!(
        page.iter().all(|&b| b == 0x78) || page.iter().all(|&b| b == 0),
        "the page is either the device's last write or the punch's zeros"
    );
}

/// A page filled with `byte` in a fresh space, mapped in fault mode `mode` ("thread" or
/// "signal"), then migrated to a device-private device: the objects to keep alive, and the page.
fn device_resident_page(mode: &str, byte: u8) -> (Space, SoftDevice, DeviceMirror, VirtAddr) {
    let space = small_space();
    let mode = if mode == "thread" {
        FaultMode::Thread
    } else {
        FaultMode::Signal
    };
    let a = space
        .map_anon_with(
            PAGE,
            MapOptions {
                mode,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(a, &[byte; 4]).unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    m.migrate_range_to_device(a, PAGE).unwrap();
    (space, dev, m, a)
}

/// A fault on a managed address taken while hetmem holds a lock across a copy (a device copy
/// under its page-table lock) used to deadlock; now it aborts the process at once with a message
/// naming the address and the zone. Proved in a child process (this test re-executed): the
/// child enters a no-fault zone and loads from a device-resident page, in each fault mode.
#[test]
fn a_fault_inside_a_no_fault_zone_aborts_with_a_message() {
    if let Ok(mode) = std::env::var("HETMEM_ZONE_CHILD") {
        let (space, _dev, _m, a) = device_resident_page(&mode, 1);
        let probe = space.probe(a, PAGE).unwrap();
        let _zone = hetmem::sys::NoFaultZone::enter("a test's zone");
        let _ = probe.load_u32(a);
        unreachable!("the load inside the zone returned");
    }
    let _w = watchdog("no_fault_zone", 60);
    for mode in ["signal", "thread"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_fault_inside_a_no_fault_zone_aborts_with_a_message",
                "--nocapture",
            ])
            .env("HETMEM_ZONE_CHILD", mode)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{mode}: the child should abort: {out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("hetmem: BUG:") && err.contains("managed address"),
            "{mode}: no message: {err}"
        );
    }
}

/// A panic in user code that hetmem runs under an address space's lock (here a trace sink,
/// during a migration) leaves the space's state possibly half-updated: the next use of the lock
/// aborts the process with a message naming it (`sync`, "Poisoning"), never computes on that
/// state, never hangs. In a child process (this test re-executed).
#[test]
fn a_panic_under_the_space_lock_aborts_at_the_next_use_with_a_message() {
    if std::env::var("HETMEM_POISON_CHILD").is_ok() {
        use hetmem::policy::trace::{TraceEvent, TraceSink, Tracer};
        struct Panicking;
        impl TraceSink for Panicking {
            fn record(&self, _: &TraceEvent) {
                panic!("a trace sink that panics");
            }
        }
        let space = small_space();
        let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
        space.cpu_write(a, &[1; 4 * PAGE]).unwrap();
        let dev = SoftDevice::private(4 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        space.set_trace(Some(Tracer::new(Arc::new(Panicking))));
        // The migration records its event under the space's lock: the panic unwinds from there
        // (or the process is gone already, if the unwinding itself took the lock again).
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.migrate_range_to_device(a, 4 * PAGE)
        }));
        assert!(r.is_err(), "the sink's panic reaches the caller");
        let _ = space.cpu_read(a, &mut [0u8; 4]);
        std::process::exit(0);
    }
    let _w = watchdog("poisoned_space_lock", 60);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panic_under_the_space_lock_aborts_at_the_next_use_with_a_message",
            "--nocapture",
        ])
        .env("HETMEM_POISON_CHILD", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "the child should abort: {out:?}"
    );
    assert!(
        err.contains("a trace sink that panics")
            && err.contains("hetmem: a thread panicked while it held a lock of")
            && err.contains("SpaceState"),
        "no message: {err}"
    );
}

/// `write_at` far past the end sized the cache's page-state vector by the offset: 2^62 aborted
/// the process (an allocation of 2^50 bytes), 2^44 took seconds and gigabytes. Now sizes past
/// the file system's largest file are EFBIG at once, and a large sparse offset costs nothing.
#[test]
fn writes_at_huge_offsets_are_efbig_or_cheap_never_an_abort() {
    let _w = watchdog("huge_offsets", 60);
    let f = TempFile::new("o4-huge", b"hello");
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    for off in [1u64 << 62, i64::MAX as u64 - 10, u64::MAX - 1] {
        let e = h.write_at(off, b"xy").unwrap_err();
        assert_eq!(e.errno(), libc::EFBIG, "write_at({off:#x}): {e}");
        let e = h.direct_write(off, b"xy").unwrap_err();
        assert_eq!(e.errno(), libc::EFBIG, "direct_write({off:#x}): {e}");
        assert_eq!(h.set_len(off).unwrap_err().errno(), libc::EFBIG);
    }
    assert_eq!(h.len(), 5, "failed writes changed the size");
    // A sparse write at 8 TiB (inside ext4's and tmpfs's limits): no page-state per page of
    // the hole, so it is immediate; the file on disk has the bytes after fsync.
    let off = 1u64 << 43;
    h.write_at(off, b"far").unwrap();
    assert_eq!(h.len(), off + 3);
    assert_eq!(
        cache.cached_bytes(),
        PAGE,
        "only the written page is cached"
    );
    h.fsync().unwrap();
    let mut buf = [0u8; 3];
    assert_eq!(h.direct_read(off, &mut buf).unwrap(), 3);
    assert_eq!(&buf, b"far");
    assert_eq!(std::fs::metadata(&f.0).unwrap().len(), off + 3);
    // Punch and truncate over the huge range walk what is cached, not every page number.
    h.punch_hole(0, (off + PAGE as u64) & !(PAGE as u64 - 1))
        .unwrap();
    h.set_len(5).unwrap();
    h.fsync().unwrap();
    assert_eq!(f.disk(), vec![0u8; 5]);
}

/// `SoftDevice::private(1 << 44)` and `(1 << 46)` aborted the process (32 and 128 GiB of frame
/// metadata allocated infallibly); now a capacity past the largest pool is a typed error and
/// metadata is allocated fallibly (and zeroed lazily).
#[test]
fn huge_device_capacities_are_errors_not_aborts() {
    for cap in [1usize << 46, 1 << 50, usize::MAX] {
        let e = SoftDevice::private(cap).unwrap_err();
        assert!(
            matches!(e, Error::TooLarge { .. }),
            "capacity {cap:#x}: {e}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
    }
    // At the largest pool: a device, or ENOMEM, never an abort.
    match SoftDevice::private(1 << 44) {
        Ok(d) => assert_eq!(d.used(), 0),
        Err(e) => assert_eq!(e.errno(), libc::ENOMEM, "{e}"),
    }
}

/// `FileCache::open` of a FIFO blocked forever inside open(2) (read-only: waiting for a
/// writer). Anything but a regular file is refused, at once, naming the path.
#[test]
fn opening_a_fifo_or_a_directory_is_refused_without_blocking() {
    let _w = watchdog("fifo_open", 30);
    let dir = std::env::temp_dir().join(format!("hetmem-o7-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    for path in [&fifo, &dir] {
        for writable in [false, true] {
            let e = FileCache::open(path, writable, CacheConfig::default()).unwrap_err();
            assert!(
                matches!(e, Error::NotRegularFile { .. }) || (path == &dir && writable),
                "{path:?} writable={writable}: {e}"
            );
            assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
        }
    }
    std::fs::remove_file(&fifo).unwrap();
    std::fs::remove_dir(&dir).unwrap();
}

/// A private `map_file` at a file offset no `off_t` can reach returned Ok (every later access
/// failed) while the shared one returned EOVERFLOW: both are validated the same way now.
#[test]
fn file_offsets_past_off_t_are_eoverflow_for_private_and_shared_mappings() {
    let f = TempFile::new("o8-offset", &vec![1u8; PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    for off in [
        !(PAGE as u64 - 1),
        1 << 63,
        i64::MAX as u64 & !(PAGE as u64 - 1),
    ] {
        for shared in [false, true] {
            let e = space
                .map_file(&h, off, PAGE, Prot::ReadWrite, shared)
                .unwrap_err();
            assert_eq!(
                e.errno(),
                libc::EOVERFLOW,
                "offset {off:#x} shared={shared}: {e}"
            );
        }
    }
}

/// `check_exclusive` with an absurd page count walked every page number of the range under the
/// device's page-table lock (2^28 pages took 194 ms; 2^51 would take weeks) when the device
/// table had any entry, stalling `protect` and CPU faults of the space. It walks what is mapped.
#[test]
fn check_exclusive_over_a_huge_range_walks_only_what_is_mapped() {
    let _w = watchdog("check_exclusive_huge", 30);
    let space = small_space();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[7; 16]).unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let mut buf = vec![0u8; PAGE];
    m.read(a, PAGE, &mut buf).unwrap();
    assert!(m.mapped_pages() >= 1);
    for pages in [1usize << 28, 1 << 40, 1 << 51] {
        assert!(m.check_exclusive(a, pages * PAGE).is_ok());
    }
    m.exclusive(a, PAGE, &mut buf).unwrap();
    let e = m.check_exclusive(a, (1 << 51) * PAGE).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    // An absurd length that overflows the address space is an error, not a walk.
    assert!(matches!(
        m.check_exclusive(a, usize::MAX & !(PAGE - 1)),
        Err(Error::Overflow { .. })
    ));
    space.protect(a, 4 * PAGE, Prot::Read).unwrap();
}

fn budget_cache(name: &str, pages: usize, budget_pages: usize) -> (TempFile, Arc<FileCache>) {
    let f = TempFile::new(name, &pattern(pages * PAGE, |i| i));
    let cache = FileCache::open(
        &f.0,
        false,
        CacheConfig {
            budget: budget_pages * PAGE,
            dirty_bound: 4 * PAGE,
        },
    )
    .unwrap();
    (f, cache)
}

/// A pin held across the unmap of a shared file mapping leaked: dropping it afterwards
/// released nothing in the cache, so the pages stayed pinned and cached over budget forever.
/// The pin now keeps the pages while held (as a pinned page outlives its mapping in the
/// kernel) and releases them when dropped, whatever happened to the mapping.
#[test]
fn a_pin_held_across_unmap_releases_the_file_pages_when_dropped() {
    let _w = watchdog("pin_across_unmap", 30);
    let (_f, cache) = budget_cache("o5-pin", 16, 4);
    let h = cache.handle();
    let space = small_space();
    let a = space.map_file(&h, 0, 16 * PAGE, Prot::Read, true).unwrap();
    let pin = space.pin(a, 8 * PAGE, false).unwrap();
    space.unmap(a, 16 * PAGE).unwrap();
    cache.shrink_to_budget();
    assert!(
        cache.cached_bytes() >= 8 * PAGE,
        "pinned pages were evicted while the pin is held"
    );
    drop(pin);
    cache.shrink_to_budget();
    assert!(
        cache.cached_bytes() <= 4 * PAGE,
        "the dropped pin still holds {} bytes over the budget",
        cache.cached_bytes()
    );
    // The data is intact after eviction.
    let mut b = vec![0u8; 16 * PAGE];
    assert_eq!(h.read_at(0, &mut b).unwrap(), 16 * PAGE);
    assert_eq!(b, pattern(16 * PAGE, |i| i));
}

/// `Space::pin` returned EBUSY whenever it met a page the background evictor was removing
/// (about 29 % of pins under load). It now waits for that removal to end and retries.
#[test]
fn pins_do_not_fail_while_the_evictor_runs() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _w = watchdog("pin_vs_evictor", 60);
    let (_f, cache) = budget_cache("o6-pin", 64, 8);
    let h = cache.handle();
    let space = Arc::new(small_space());
    let a = space.map_file(&h, 0, 64 * PAGE, Prot::Read, true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let evicted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let evictor = {
        let (cache, stop, evicted) = (cache.clone(), stop.clone(), evicted.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                evicted.fetch_add(cache.shrink_to_budget(), Ordering::Relaxed);
            }
        })
    };
    let reader = {
        let (space, stop) = (space.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            let mut b = [0u8; 4];
            while !stop.load(Ordering::Relaxed) {
                i = (i * 7 + 13) % 64;
                space.cpu_read(a.add(i * PAGE), &mut b).unwrap();
                assert_eq!(u32::from_ne_bytes(b), (i * PAGE / 4) as u32);
            }
        })
    };
    let mut busy = 0;
    // At least 3000 pins, and on until the evictor has evicted 500 pages meanwhile (the
    // watchdog bounds it).
    let mut k = 0usize;
    while k < 3000 || evicted.load(Ordering::Relaxed) < 500 {
        k += 1;
        let p = (k * 11) % 64;
        match space.pin(a.add(p * PAGE), PAGE, k.is_multiple_of(2)) {
            Ok(pin) => drop(pin),
            Err(Error::Busy) => busy += 1,
            Err(e) => panic!("pin failed: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    evictor.join().unwrap();
    assert_eq!(
        busy, 0,
        "{busy} of {k} pins returned EBUSY while the evictor ran"
    );
}

/// What the `FaultMode::Signal` docs and README now say: a thread that blocks SIGBUS is killed
/// when it touches a device-resident page of a signal-mode mapping, and `Thread` mode is the
/// remedy (its faults need no signal). Run in a child process (this test re-executed) per mode.
#[test]
fn a_thread_blocking_sigbus_needs_thread_mode() {
    if let Ok(mode) = std::env::var("HETMEM_SIGMASK_CHILD") {
        let (space, _dev, _m, a) = device_resident_page(&mode, 9);
        let probe = space.probe(a, PAGE).unwrap();
        hetmem::sys::block_sigbus_in_this_thread().unwrap();
        let v = probe.load_u32(a).unwrap();
        assert_eq!(v, 0x0909_0909);
        std::process::exit(0);
    }
    let _w = watchdog("sigmask", 60);
    for (mode, killed) in [("signal", true), ("thread", false)] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_thread_blocking_sigbus_needs_thread_mode",
                "--nocapture",
            ])
            .env("HETMEM_SIGMASK_CHILD", mode)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        if killed {
            assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{mode}: {out:?}");
        } else {
            assert!(out.status.success(), "{mode}: {out:?}");
        }
    }
}

/// A direct mremap of a managed range used to lose data silently: the new address read zeros
/// where pages were in device memory, while hetmem still reported the old address as
/// device-resident. hetmem now hears of the move (userfaultfd's REMAP event) and follows it: the
/// moved range becomes the program's plain memory with every byte in place — device-private and
/// device-exclusive pages copied back, pages never touched reading zeros — and the old range
/// leaves the space as if unmapped (devices lose their mappings of it). In both fault modes.
#[test]
fn a_direct_mremap_of_a_managed_range_keeps_every_byte() {
    let _w = watchdog("mremap_follow", 60);
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        at(format!("mremap in {mode:?} mode"));
        let space = small_space();
        let a = space
            .map_anon_with(
                16 * PAGE,
                MapOptions {
                    mode,
                    ..MapOptions::default()
                },
            )
            .unwrap();
        let data = pattern(12 * PAGE, |i| i ^ 0x5a5a_0000);
        space.cpu_write(a, &data).unwrap();
        let dev = SoftDevice::private(8 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        m.migrate_range_to_device(a, 8 * PAGE).unwrap();
        assert_eq!(space.residency(a), Residency::Device(dev.owner()));
        let mut page = vec![0u8; PAGE];
        m.exclusive(a.add(9 * PAGE), PAGE, &mut page).unwrap();
        m.read(a.add(10 * PAGE), PAGE, &mut page).unwrap();
        let used_before = dev.used();
        assert!(used_before >= 8 * PAGE);

        // SAFETY: `a..a + 16 pages` is one managed mapping of `space` (no Rust object in it),
        // and nothing accesses it while it moves.
        let b = unsafe { hetmem::sys::mremap_elsewhere(a.get(), 16 * PAGE) }.unwrap();
        assert_ne!(b, a.get());
        // `b..b + 16 pages` is the program's plain memory now (hetmem never unmaps it), reached
        // through raw loads and stores only.
        // The first access faults on a device-resident page at the new address: it is served
        // once hetmem has followed the move (it may still be doing so now).
        let mut got = vec![0u8; 16 * PAGE];
        for (i, w) in got.chunks_exact_mut(4).enumerate() {
            // SAFETY: a word of `b..b + 16 pages` (see above).
            let v = unsafe { hetmem::sys::probe_load_u32(b + 4 * i) };
            w.copy_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(&got[..12 * PAGE], &data[..], "{mode:?}: moved data differs");
        assert!(
            got[12 * PAGE..].iter().all(|&x| x == 0),
            "{mode:?}: untouched pages must read zeros"
        );
        // Plain memory now: stores stay.
        // SAFETY: a word of `b..b + 16 pages` (see above).
        unsafe { hetmem::sys::probe_store_u32(b + 13 * PAGE, 77) };
        // SAFETY: as above.
        assert_eq!(unsafe { hetmem::sys::probe_load_u32(b + 13 * PAGE) }, 77);
        // The old range is gone from the space (this takes the space's lock, so it also waits
        // for hetmem to finish following the move), and from the device.
        assert!(matches!(
            space.cpu_read(a, &mut page[..4]).unwrap_err(),
            Error::NotMapped { .. }
        ));
        assert_eq!(space.stats().foreign_remaps, 1);
        assert!(m.read(a, PAGE, &mut page).is_err());
        assert_eq!(m.mapped_pages(), 0);
        assert_eq!(
            dev.used(),
            0,
            "the device frames of the moved pages are freed"
        );
        // The space keeps working, and never maps over the moved range.
        let c = space.map_anon(16 * PAGE, Prot::ReadWrite).unwrap();
        space.cpu_write(c, &[1, 2, 3]).unwrap();
        // SAFETY: a word of `b..b + 16 pages`, still the program's plain memory.
        assert_eq!(unsafe { hetmem::sys::probe_load_u32(b + 13 * PAGE) }, 77);
    }
}

/// The same for a private file mapping: pages the program never read get the file's bytes at
/// the new address (not zeros, and the cache is not corrupted for the file's other users).
#[test]
fn a_direct_mremap_of_a_private_file_mapping_keeps_the_file_bytes() {
    let _w = watchdog("mremap_private_file", 30);
    let content = pattern(8 * PAGE, |i| i.wrapping_mul(2654435761));
    let f = TempFile::new("o9-private", &content);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file(&h, 0, 8 * PAGE, Prot::ReadWrite, false)
        .unwrap();
    space.store_u32(a.add(PAGE), 0xAAAA_5555).unwrap();
    // SAFETY: `a..a + 8 pages` is one managed mapping of `space` (no Rust object in it), and
    // nothing accesses it while it moves.
    let b = unsafe { hetmem::sys::mremap_elsewhere(a.get(), 8 * PAGE) }.unwrap();
    let mut expect = content.clone();
    expect[PAGE..PAGE + 4].copy_from_slice(&0xAAAA_5555u32.to_ne_bytes());
    for i in 0..8 * PAGE / 4 {
        // SAFETY: a word of `b..b + 8 pages`, the program's plain memory since the move (hetmem
        // never unmaps it), reached through raw loads only.
        let w = unsafe { hetmem::sys::probe_load_u32(b + 4 * i) };
        assert_eq!(w.to_ne_bytes(), expect[4 * i..4 * i + 4], "word {i}");
    }
    // The file and its cache are untouched.
    let mut back = vec![0u8; 8 * PAGE];
    h.read_at(0, &mut back).unwrap();
    assert_eq!(back, content);
    assert_eq!(f.disk(), content);
}

/// A direct `madvise(MADV_DONTNEED)` of a managed range raises no event; the next access to a
/// dropped page faulted into hetmem, which found the page "present" and let the access retry:
/// forever. It now gets what the kernel gives a dropped private page: zeros, or the file's
/// bytes in a private file mapping.
#[test]
fn a_direct_madvise_dontneed_reads_zeros_or_the_file_never_hangs() {
    let _w = watchdog("madvise_dontneed", 30);
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let space = small_space();
        let a = space
            .map_anon_with(
                4 * PAGE,
                MapOptions {
                    mode,
                    ..MapOptions::default()
                },
            )
            .unwrap();
        space.cpu_write(a, &vec![0xEE; 4 * PAGE]).unwrap();
        // SAFETY: managed memory of `space` (mapped above), where no Rust object lives.
        unsafe { hetmem::sys::madvise_dontneed(a.get() + PAGE, 2 * PAGE) }.unwrap();
        at(format!("load of a dropped page ({mode:?})"));
        let mut b = vec![0u8; 4 * PAGE];
        space.cpu_read(a, &mut b).unwrap();
        assert!(b[..PAGE].iter().all(|&x| x == 0xEE));
        assert!(b[PAGE..3 * PAGE].iter().all(|&x| x == 0), "{mode:?}");
        assert!(b[3 * PAGE..].iter().all(|&x| x == 0xEE));
        space.store_u32(a.add(2 * PAGE), 5).unwrap();
        assert_eq!(space.load_u32(a.add(2 * PAGE)).unwrap(), 5);
    }
    let content = pattern(4 * PAGE, |i| i + 1);
    let f = TempFile::new("o-dontneed", &content);
    let cache = FileCache::open(&f.0, false, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file(&h, 0, 4 * PAGE, Prot::ReadWrite, false)
        .unwrap();
    space.store_u32(a.add(PAGE), 0).unwrap();
    // SAFETY: managed memory of `space` (mapped above), where no Rust object lives.
    unsafe { hetmem::sys::madvise_dontneed(a.get(), 4 * PAGE) }.unwrap();
    let mut b = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut b).unwrap();
    assert_eq!(
        b, content,
        "a dropped private file page reads the file again"
    );
}

/// The lock watch (on in debug builds; here switched on with `HETMEM_LOCK_WATCH=100` in a child
/// process, this test re-executed): a hetmem lock held past the bound is reported while still
/// held (holder thread and where it was taken) and again at release (with the holder's stack).
/// The child holds a file cache's lock across a backend write that takes 600 ms.
#[test]
fn a_lock_held_past_the_watch_bound_is_reported_with_its_holder() {
    if std::env::var("HETMEM_LOCKWATCH_CHILD").is_ok() {
        assert_eq!(
            hetmem::sync::lock_watch_bound(),
            Some(std::time::Duration::from_millis(100))
        );
        let (_f, hf, h, space, a) = hooked_mapping("o-lockwatch");
        space.store_u32(a, 1).unwrap();
        let (_tx, rx) = std::sync::mpsc::channel::<()>();
        // The backend write inside fsync (under the cache's lock) blocks for 600 ms: the case
        // the watch exists for (nothing ever sends on the channel).
        hf.arm(Box::new(move || {
            let _ = rx.recv_timeout(std::time::Duration::from_millis(600));
        }));
        h.fsync().unwrap();
        std::process::exit(0);
    }
    let _w = watchdog("lock_watch", 60);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_lock_held_past_the_watch_bound_is_reported_with_its_holder",
            "--nocapture",
        ])
        .env("HETMEM_LOCKWATCH_CHILD", "1")
        .env("HETMEM_LOCK_WATCH", "100")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hetmem lock watch: thread") && err.contains("still holds it"),
        "no report while held: {err}"
    );
    assert!(
        err.contains("src/pagecache/mod.rs") && err.contains("was held for"),
        "no report at release naming the place: {err}"
    );
    assert!(
        err.contains("fsync"),
        "the holder's stack names fsync: {err}"
    );
}

/// A CPU store through a shared mapping to one half of a page, racing a `direct_write` of the
/// other half, was lost: the direct write scanned for stores, wrote the file, then dropped the
/// partial page from the cache, store included (found by the concurrent file model). A
/// partial page is now updated in place. Also: an empty `direct_write` past the end grew the
/// file.
#[test]
fn a_store_racing_a_direct_write_to_the_other_half_of_its_page_is_kept() {
    use std::sync::Barrier;
    let _w = watchdog("store_vs_direct_write", 60);
    let f = TempFile::new("o-dw-half", &vec![0u8; 2 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = Arc::new(cache.handle());
    let space = Arc::new(small_space());
    let a = space
        .map_file(&h, 0, 2 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    const N: u32 = 3000;
    let bar = Arc::new(Barrier::new(2));
    let probe = space.probe(a, 2 * PAGE).unwrap();
    let storer = {
        let bar = bar.clone();
        std::thread::spawn(move || {
            for i in 1..=N {
                bar.wait();
                // A varying delay, so that the store falls at every point of the direct write.
                for _ in 0..((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 50) {
                    std::hint::spin_loop();
                }
                probe.store_u32(a, i).unwrap();
                bar.wait();
            }
        })
    };
    let mut lost = 0;
    let mut b = [0u8; 4];
    for i in 1..=N {
        bar.wait();
        h.direct_write(2048, &i.to_ne_bytes()).unwrap();
        bar.wait();
        h.read_at(0, &mut b).unwrap();
        if u32::from_ne_bytes(b) != i {
            lost += 1;
        }
    }
    storer.join().unwrap();
    assert_eq!(
        lost, 0,
        "{lost} of {N} stores lost to a direct write of the same page"
    );
    h.fsync().unwrap();
    let disk = f.disk();
    assert_eq!(&disk[..4], &N.to_ne_bytes());
    assert_eq!(&disk[2048..2052], &N.to_ne_bytes());
    // An empty direct write past the end changes nothing.
    h.direct_write(5 * PAGE as u64, &[]).unwrap();
    assert_eq!(h.len(), 2 * PAGE as u64);
    h.fsync().unwrap();
    assert_eq!(f.disk().len(), 2 * PAGE);
}

/// The lock order as docs/architecture.md states it holds as the code nests its locks: a child
/// process with the lock watch on (which checks the level of every ordered lock taken) runs file
/// mappings with stores, fsync, a punch and eviction, a device mirroring and migrating, CPU
/// faults and pins, and finds no violation among thousands of checked acquisitions.
#[test]
fn the_lock_order_holds_in_a_mixed_workload() {
    if std::env::var("HETMEM_LOCKORDER_CHILD").is_ok() {
        let (_f, _hf, h, space, a) = hooked_mapping("o-lockorder");
        let dev = SoftDevice::private(8 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        let b = space.map_anon(64 * PAGE, Prot::ReadWrite).unwrap();
        let probe = space.probe(a, 16 * PAGE).unwrap();
        for round in 0..20u32 {
            for p in 0..16 {
                probe.store_u32(a.add(p * PAGE), round).unwrap();
            }
            h.fsync().unwrap();
            h.punch_hole((round as u64 % 16) * PAGE as u64, PAGE as u64)
                .unwrap();
            let mut page = vec![0u8; PAGE];
            m.read(a, PAGE, &mut page).unwrap();
            space.cpu_write(b, &[round as u8; 64 * PAGE]).unwrap();
            m.migrate_range_to_device(b, 64 * PAGE).unwrap();
            let pin = space.pin(b, 8 * PAGE, round % 2 == 0).unwrap();
            drop(pin);
            h.cache().shrink_to_budget();
        }
        let (violations, checks) = hetmem::sync::lock_order_stats();
        println!("LOCKORDER {violations} {checks}");
        std::process::exit(0);
    }
    let _w = watchdog("lock_order", 60);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_lock_order_holds_in_a_mixed_workload",
            "--nocapture",
        ])
        .env("HETMEM_LOCKORDER_CHILD", "1")
        .env("HETMEM_LOCK_WATCH", "600000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("LOCKORDER "))
        .unwrap_or_else(|| panic!("no report: {stdout}"));
    let nums: Vec<u64> = line[10..].split(' ').map(|n| n.parse().unwrap()).collect();
    assert_eq!(
        nums[0],
        0,
        "lock order violations: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        nums[1] > 1000,
        "only {} ordered acquisitions checked",
        nums[1]
    );
}

/// What README.md and docs/architecture.md say of a direct mremap of a *shared* file mapping:
/// hetmem cannot let it go (stores through the new address could never be written back), so the
/// process aborts with a message naming the mapping — loud, never silent. In a child process.
#[test]
fn a_direct_mremap_of_a_shared_file_mapping_aborts_with_a_message() {
    if std::env::var("HETMEM_MREMAP_SHARED_CHILD").is_ok() {
        let f = TempFile::new("o9-shared", &vec![3u8; 4 * PAGE]);
        let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
        let h = cache.handle();
        let space = small_space();
        let a = space
            .map_file(&h, 0, 4 * PAGE, Prot::ReadWrite, true)
            .unwrap();
        space.store_u32(a, 1).unwrap();
        let (_tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: `a..a + 4 pages` is one managed mapping of `space` (no Rust object in it), and
        // nothing accesses it while it moves (or after: the process aborts).
        let _ = unsafe { hetmem::sys::mremap_elsewhere(a.get(), 4 * PAGE) };
        // The event thread aborts the process; this thread waits for it on a read that only
        // the process's end ends (nothing is ever written), touching nothing managed.
        let _ = std::io::Read::read(&mut rx, &mut [0u8; 1]);
        std::process::exit(0);
    }
    let _w = watchdog("mremap_shared", 60);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_direct_mremap_of_a_shared_file_mapping_aborts_with_a_message",
            "--nocapture",
        ])
        .env("HETMEM_MREMAP_SHARED_CHILD", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hetmem: a direct mremap moved the shared file mapping"),
        "no message: {out:?}"
    );
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
}

/// A direct `madvise(MADV_DONTNEED)` by the program drops system pages a device maps (no event
/// tells hetmem): the device's next read and write of them used to abort the process (its copy
/// faulted inside a no-fault zone). Now the device's copy goes through the kernel without
/// faulting, finds the page gone, and the page is refilled as the kernel would (zeros for
/// anonymous memory, the file's bytes for a private file mapping) and faulted in again.
#[test]
fn a_device_access_to_a_page_dropped_by_a_direct_madvise_reads_what_the_kernel_gives() {
    let _w = watchdog("device_after_madvise_dontneed", 30);
    let space = small_space();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &vec![0xEE; 4 * PAGE]).unwrap();
    let mut b = vec![0u8; 4 * PAGE];
    m.read(a, 4 * PAGE, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xEE));
    // SAFETY: managed memory of `space` (mapped above), where no Rust object lives.
    unsafe { hetmem::sys::madvise_dontneed(a.get() + PAGE, 2 * PAGE) }.unwrap();
    at("device read of dropped pages");
    m.read(a, 4 * PAGE, &mut b).unwrap();
    assert!(b[..PAGE].iter().all(|&x| x == 0xEE));
    assert!(b[PAGE..3 * PAGE].iter().all(|&x| x == 0));
    assert!(b[3 * PAGE..].iter().all(|&x| x == 0xEE));
    // A device store to a dropped page lands, and the CPU sees it.
    // SAFETY: as above.
    unsafe { hetmem::sys::madvise_dontneed(a.get(), PAGE) }.unwrap();
    at("device write of a dropped page");
    m.write(a, PAGE, &vec![0x33; PAGE]).unwrap();
    assert_eq!(space.load_u32(a).unwrap(), 0x3333_3333);
    // A private file mapping's dropped page: the file's bytes.
    let content = pattern(2 * PAGE, |i| i + 7);
    let f = TempFile::new("o-dev-dontneed", &content);
    let cache = FileCache::open(&f.0, false, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let fa = space
        .map_file(&h, 0, 2 * PAGE, Prot::ReadWrite, false)
        .unwrap();
    space.store_u32(fa, 0x1234_5678).unwrap();
    let mut c = vec![0u8; 2 * PAGE];
    m.read(fa, 2 * PAGE, &mut c).unwrap();
    // SAFETY: as above.
    unsafe { hetmem::sys::madvise_dontneed(fa.get(), 2 * PAGE) }.unwrap();
    at("device read of dropped private file pages");
    m.read(fa, 2 * PAGE, &mut c).unwrap();
    assert_eq!(
        c, content,
        "the file's bytes, as the kernel gives a dropped private page"
    );
}

/// The program removes pages of a shared file mapping itself (`madvise(MADV_REMOVE)`, which
/// punches the mapping's backing file: here the cache's memfd, behind the cache's back). Found
/// from outside: the cache went on holding the pages, every access to them faulted, found them
/// "cached", filled nothing, and faulted again, for good. Followed now as the kernel's
/// removal from a mapping of the file: the pages read zeros (through both kinds of shared
/// mapping, and `read_at`), the file has a hole there after `fsync` (a dirty page's data is
/// gone), the pages around keep their bytes, and stores to the removed pages reach the file.
#[test]
fn a_programs_madvise_remove_of_a_shared_file_mapping_punches_and_never_hangs() {
    let _w = watchdog("madvise_remove_file", 30);
    for intercept in [false, true] {
        let name = format!("o-remove-{intercept}");
        let f = TempFile::new(&name, &vec![0x11u8; 16 * PAGE]);
        let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
        let h = cache.handle();
        let space = small_space();
        let opts = FileMapOptions {
            prot: Prot::ReadWrite,
            shared: true,
            intercept_stores: intercept,
        };
        let a = space.map_file_with(&h, 0, 16 * PAGE, opts).unwrap();
        space.cpu_write(a.add(4 * PAGE), b"dirty page").unwrap();
        let mut b = vec![0u8; 16 * PAGE];
        space.cpu_read(a, &mut b).unwrap();
        // SAFETY: the test's own shared file mapping; no Rust object lives there.
        let r =
            unsafe { libc::madvise(a.add(3 * PAGE).get() as *mut _, 4 * PAGE, libc::MADV_REMOVE) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        at(format!(
            "intercept {intercept}: reads after the program's MADV_REMOVE"
        ));
        space.cpu_read(a, &mut b).unwrap();
        let mut want = vec![0x11u8; 16 * PAGE];
        want[3 * PAGE..7 * PAGE].fill(0);
        assert_eq!(b, want, "intercept {intercept}: through the mapping");
        assert!(cache.stats().pages_removed_by_program >= 1);
        let mut back = vec![0u8; 16 * PAGE];
        assert_eq!(h.read_at(0, &mut back).unwrap(), 16 * PAGE);
        assert_eq!(back, want, "intercept {intercept}: read_at");
        h.fsync().unwrap();
        assert_eq!(
            f.disk(),
            want,
            "intercept {intercept}: the file after fsync"
        );
        space.cpu_write(a.add(5 * PAGE), b"again").unwrap();
        h.fsync().unwrap();
        assert_eq!(&f.disk()[5 * PAGE..5 * PAGE + 5], b"again");
    }
}

/// The same for shared anonymous memory (a cache without a file): the removed pages read zeros
/// on the CPU and the device alike, and take stores again.
#[test]
fn a_programs_madvise_remove_of_shared_anonymous_memory_reads_zeros_and_never_hangs() {
    let _w = watchdog("madvise_remove_shared_anon", 30);
    let space = small_space();
    let (a, cache) = space.map_shared_anon(16 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &vec![0x22u8; 16 * PAGE]).unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    // SAFETY: the test's own shared mapping; no Rust object lives there.
    let r = unsafe { libc::madvise(a.add(4 * PAGE).get() as *mut _, 4 * PAGE, libc::MADV_REMOVE) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    at("reads after the program's MADV_REMOVE");
    let mut b = vec![0u8; 16 * PAGE];
    space.cpu_read(a, &mut b).unwrap();
    let mut want = vec![0x22u8; 16 * PAGE];
    want[4 * PAGE..8 * PAGE].fill(0);
    assert_eq!(b, want);
    assert_eq!(cache.stats().pages_removed_by_program, 4);
    let mut d = vec![0u8; 16 * PAGE];
    m.read(a, 16 * PAGE, &mut d).unwrap();
    assert_eq!(d, want, "the device reads the same");
    space.cpu_write(a.add(5 * PAGE), b"again").unwrap();
    m.read(a.add(5 * PAGE), PAGE, &mut d[..PAGE]).unwrap();
    assert_eq!(&d[..5], b"again");
}

/// A page the program removed (`MADV_REMOVE`) that no fault finds afterwards (the mapping is
/// unmapped; the file is read through `read_at`): it reads zeros, and still zeros after the
/// budget evicted it, and the file has a hole there after `fsync` (found by review: once
/// evicted, it read the file's old bytes again).
#[test]
fn a_removed_page_found_only_at_eviction_stays_zeros() {
    let _w = watchdog("madvise_remove_evicted", 30);
    let f = TempFile::new("o-remove-evict", &vec![0x11u8; 16 * PAGE]);
    let cfg = CacheConfig {
        budget: 4 * PAGE,
        ..CacheConfig::default()
    };
    let cache = FileCache::open(&f.0, true, cfg).unwrap();
    let h = cache.handle();
    let space = small_space();
    let opts = FileMapOptions {
        prot: Prot::ReadWrite,
        shared: true,
        intercept_stores: true,
    };
    let a = space.map_file_with(&h, 0, 16 * PAGE, opts).unwrap();
    let mut b = vec![0u8; PAGE];
    space.cpu_read(a.add(3 * PAGE), &mut b).unwrap();
    // SAFETY: the test's own shared file mapping; no Rust object lives there.
    let r = unsafe { libc::madvise(a.add(3 * PAGE).get() as *mut _, PAGE, libc::MADV_REMOVE) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    space.unmap(a, 16 * PAGE).unwrap();
    h.read_at(3 * PAGE as u64, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "read_at of the removed page");
    for p in 8..16u64 {
        h.read_at(p * PAGE as u64, &mut b).unwrap();
    }
    cache.shrink_to_budget();
    h.read_at(3 * PAGE as u64, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "read_at after eviction");
    h.fsync().unwrap();
    let disk = f.disk();
    assert!(disk[3 * PAGE..4 * PAGE].iter().all(|&x| x == 0), "the file");
    assert!(disk[4 * PAGE..].iter().all(|&x| x == 0x11));
    assert_eq!(cache.stats().pages_removed_by_program, 1);
}

/// A device writing a page that the program made read-only behind hetmem's back (a direct
/// `mprotect`, which no event reports; `Space::protect` is the way to change it): the device's
/// copy stops at the page, which is there (not dropped). The write fails with an error, soon,
/// and changes no byte of that page; the pages before it take the write. (Review of the
/// patience given to pages the program drops again and again: a page that is there must not
/// get that patience, 100,000 retries and 10 s.) Signal-mode mappings only: in a thread-mode
/// mapping the device's copies are plain stores, and this one kills the process with SIGSEGV
/// (docs/architecture.md, "Unsupported, for now").
#[test]
fn a_device_write_to_a_page_protected_behind_hetmems_back_fails_without_changing_it() {
    let _w = watchdog("device write vs direct mprotect", 60);
    {
        let mode = FaultMode::Signal;
        let space = Space::new().unwrap();
        let dev = SoftDevice::private(8 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        let opts = MapOptions {
            mode,
            ..MapOptions::default()
        };
        let a = space.map_anon_with(4 * PAGE, opts).unwrap();
        space.cpu_write(a, &[1u8; 4 * PAGE]).unwrap();
        // SAFETY: the third page of the test's own managed mapping; no Rust object lives there.
        let rc = unsafe { libc::mprotect(a.add(2 * PAGE).get() as *mut _, PAGE, libc::PROT_READ) };
        assert_eq!(rc, 0);
        let r = m.write(a, 4 * PAGE, &[7u8; 4 * PAGE]);
        assert!(
            matches!(r, Err(Error::Os { .. })),
            "{mode:?}: the device's write returned {r:?}"
        );
        let mut b = vec![0u8; 4 * PAGE];
        space.cpu_read(a, &mut b).unwrap();
        assert!(
            b[..2 * PAGE].iter().all(|&x| x == 7),
            "{mode:?}: the pages before"
        );
        assert!(
            b[2 * PAGE..3 * PAGE].iter().all(|&x| x == 1),
            "{mode:?}: the protected page changed"
        );
    }
}
