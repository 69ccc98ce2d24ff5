//! File pages in device memory: the device-private and device-coherent placements of
//! docs/filesystem-contract.md, through the cache's API and the mirror's migration commands,
//! with every mapping of the file (in every address space) seeing one page, and the file on disk
//! right after `fsync` wherever the page lived.

mod common;
use common::*;
use hetmem::pagecache::{CacheConfig, FileCache, PagePlacement};
use hetmem::*;

const N: usize = 16;

fn file(
    name: &str,
) -> (
    TempFile,
    std::sync::Arc<FileCache>,
    hetmem::pagecache::FileHandle,
) {
    let f = TempFile::new(name, &pattern(N * PAGE, |i| i));
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    (f, cache, h)
}

/// A file, a private device mirroring a space, and a writable mapping of the file in that space
/// that intercepts stores (so that its pages may go to device-private memory).
struct Fixture {
    m: DeviceMirror,
    dev: SoftDevice,
    s: Space,
    a: VirtAddr,
    h: hetmem::pagecache::FileHandle,
    cache: std::sync::Arc<FileCache>,
    f: TempFile,
}

fn fixture(name: &str) -> Fixture {
    let (f, cache, h) = file(name);
    let dev = SoftDevice::private(8 << 20).unwrap();
    let s = Space::new().unwrap();
    let m = dev.mirror(&s).unwrap();
    let a = s
        .map_file_with(&h, 0, N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    Fixture {
        m,
        dev,
        s,
        a,
        h,
        cache,
        f,
    }
}

fn private_on(cache: &FileCache, dev: &SoftDevice, p: usize) -> bool {
    cache.placement(p as u64) == PagePlacement::DevicePrivate { owner: dev.owner() }
}

#[test]
fn device_private_file_pages_are_shared_by_every_mapping_and_come_back_on_cpu_access() {
    let _w = watchdog("placement_private_shared", 30);
    let (_f, cache, h) = file("place-private");
    let dev = SoftDevice::private(8 << 20).unwrap();
    let (s1, s2) = (Space::new().unwrap(), Space::new().unwrap());
    let m1 = dev.mirror(&s1).unwrap();
    let a1 = s1.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    let a2 = s2.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    // Both mappings see the file; the device migrates the file's pages (the kernel: ENOENT).
    assert_eq!(s2.load_u32(a2).unwrap(), 0);
    m1.migrate_range_to_device(a1, N * PAGE).unwrap();
    for p in 0..N {
        assert!(private_on(&cache, &dev, p), "page {p}");
    }
    assert_eq!(dev.used(), N * PAGE);
    assert_eq!(cache.device_pages(), N);
    // The device reads them where they are (mapped as its own frames, no fault).
    let mut buf = vec![0u8; N * PAGE];
    m1.read(a1, N * PAGE, &mut buf).unwrap();
    assert!(buf == pattern(N * PAGE, |i| i));
    assert!(private_on(&cache, &dev, 0));
    // A read through the cache reads the frame, without moving it.
    let mut b = vec![0u8; PAGE];
    h.read_at(3 * PAGE as u64, &mut b).unwrap();
    assert!(b == pattern(N * PAGE, |i| i)[3 * PAGE..4 * PAGE]);
    assert!(private_on(&cache, &dev, 3));
    // A CPU access from the *other* space brings page 5 back, for every mapping.
    let want = u32::from_ne_bytes(
        pattern(N * PAGE, |i| i)[5 * PAGE..5 * PAGE + 4]
            .try_into()
            .unwrap(),
    );
    assert_eq!(s2.load_u32(a2.add(5 * PAGE)).unwrap(), want);
    assert_eq!(cache.placement(5), PagePlacement::System);
    assert_eq!(s1.load_u32(a1.add(5 * PAGE)).unwrap(), want);
    assert_eq!(dev.used(), (N - 1) * PAGE);
    // The device's mapping of the page that left was invalidated: its read faults it in again
    // (now as a system page) and reads the same bytes.
    m1.read(a1, N * PAGE, &mut buf).unwrap();
    assert!(buf == pattern(N * PAGE, |i| i));
    // Everything back by CPU reads from space 1.
    let mut all = vec![0u8; N * PAGE];
    s1.cpu_read(a1, &mut all).unwrap();
    assert!(all == pattern(N * PAGE, |i| i));
    assert_eq!(dev.used(), 0);
    assert_eq!(cache.device_pages(), 0);
}

#[test]
fn device_writes_to_private_file_pages_reach_the_disk_on_fsync_without_moving_them() {
    let _w = watchdog("placement_private_writeback", 30);
    let Fixture {
        m,
        dev,
        s,
        a,
        h,
        cache,
        f,
    } = fixture("place-wb");
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    // The device writes its own frames (through a mapping that intercepts CPU stores).
    let data = pattern(N * PAGE, |i| i.wrapping_mul(31) ^ 0xabcd);
    m.write(a, N * PAGE, &data).unwrap();
    h.fsync().unwrap();
    assert!(f.disk() == data, "fsync wrote the device's bytes");
    for p in 0..N {
        assert!(
            private_on(&cache, &dev, p),
            "writeback left page {p} on the device"
        );
    }
    // Written back: a second fsync writes nothing.
    let written = cache.stats().pages_written_back;
    h.fsync().unwrap();
    assert_eq!(cache.stats().pages_written_back, written);
    // A CPU store through the intercepting mapping brings its page back, and lands.
    s.store_u32(a.add(2 * PAGE), 0x1234_5678).unwrap();
    assert_eq!(cache.placement(2), PagePlacement::System);
    h.fsync().unwrap();
    let disk = f.disk();
    assert_eq!(&disk[2 * PAGE..2 * PAGE + 4], &0x1234_5678u32.to_ne_bytes());
    assert!(disk[2 * PAGE + 4..] == data[2 * PAGE + 4..]);
}

#[test]
fn a_writable_mapping_that_does_not_intercept_stores_keeps_its_pages_in_system_memory() {
    let _w = watchdog("placement_refused", 30);
    let (_f, cache, h) = file("place-refused");
    let dev = SoftDevice::private(8 << 20).unwrap();
    let s = Space::new().unwrap();
    let m = dev.mirror(&s).unwrap();
    let a = s.map_file(&h, 0, N * PAGE, Prot::ReadWrite, true).unwrap();
    let e = m.migrate_range_to_device(a, N * PAGE).unwrap_err();
    assert!(matches!(e, Error::StoresNotIntercepted { page: 0 }), "{e}");
    assert_eq!(e.errno(), libc::EBUSY);
    let e = cache
        .place_on_device(0, (N * PAGE) as u64, dev.pagemap())
        .unwrap_err();
    assert!(matches!(e, Error::StoresNotIntercepted { .. }));
    assert_eq!(dev.used(), 0);
    // Device-coherent memory is fine: the CPU keeps mapping the page in place.
    let c = SoftDevice::coherent(8 << 20).unwrap();
    assert_eq!(
        cache
            .place_on_device(0, (N * PAGE) as u64, c.pagemap())
            .unwrap(),
        N as u64
    );
    assert_eq!(
        cache.placement(0),
        PagePlacement::DeviceCoherent { owner: c.owner() }
    );
}

#[test]
fn truncate_and_punch_drop_device_pages_without_writing_them() {
    let _w = watchdog("placement_truncate", 30);
    let Fixture {
        m,
        dev,
        s: _s,
        a,
        h,
        cache,
        f,
    } = fixture("place-trunc");
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    m.write(a, N * PAGE, &vec![0x5a; N * PAGE]).unwrap();
    // Punch pages 2..4: their device frames go, unwritten; they read as zeros.
    h.punch_hole(2 * PAGE as u64, 2 * PAGE as u64).unwrap();
    assert_eq!(cache.placement(2), PagePlacement::Uncached);
    assert_eq!(dev.used(), (N - 2) * PAGE);
    // Truncate to 8 pages: pages 8.. go, unwritten.
    h.set_len(8 * PAGE as u64).unwrap();
    assert_eq!(dev.used(), (8 - 2) * PAGE);
    h.fsync().unwrap();
    let disk = f.disk();
    assert_eq!(disk.len(), 8 * PAGE);
    assert!(disk[..2 * PAGE].iter().all(|&b| b == 0x5a));
    assert!(disk[2 * PAGE..4 * PAGE].iter().all(|&b| b == 0));
    assert!(disk[4 * PAGE..].iter().all(|&b| b == 0x5a));
    // Extending again reads zeros past the old end, never the dropped device bytes.
    h.set_len((N * PAGE) as u64).unwrap();
    let mut back = vec![1u8; 8 * PAGE];
    h.read_at(8 * PAGE as u64, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn device_release_brings_dirty_file_pages_back_and_nothing_is_lost() {
    let _w = watchdog("placement_release", 30);
    let (f, cache, h) = file("place-release");
    let s = Space::new().unwrap();
    let a = s
        .map_file_with(&h, 0, N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    let data = pattern(N * PAGE, |i| !i);
    {
        let dev = SoftDevice::private(8 << 20).unwrap();
        let m = dev.mirror(&s).unwrap();
        m.migrate_range_to_device(a, N * PAGE).unwrap();
        m.write(a, N * PAGE, &data).unwrap();
        // Release: every page comes back to the cache (dirty), the device is empty.
        assert_eq!(dev.release().unwrap(), N);
        assert_eq!(dev.used(), 0);
        assert_eq!(cache.placement(0), PagePlacement::System);
        m.migrate_range_to_device(a, 4 * PAGE).unwrap();
        assert_eq!(dev.used(), 4 * PAGE);
        // The device goes away with 4 pages on it (removal evicts them).
    }
    assert_eq!(cache.device_pages(), 0);
    let mut back = vec![0u8; N * PAGE];
    s.cpu_read(a, &mut back).unwrap();
    assert!(back == data);
    h.fsync().unwrap();
    assert!(f.disk() == data);
}

#[test]
fn write_at_and_direct_io_on_device_pages_stay_coherent() {
    let _w = watchdog("placement_io", 30);
    let (f, cache, h) = file("place-io");
    let dev = SoftDevice::private(8 << 20).unwrap();
    assert_eq!(
        cache
            .place_on_device(0, (N * PAGE) as u64, dev.pagemap())
            .unwrap(),
        N as u64
    );
    // write_at brings the pages it writes back first.
    h.write_at(PAGE as u64 + 100, b"hello").unwrap();
    assert_eq!(cache.placement(1), PagePlacement::System);
    assert!(matches!(
        cache.placement(0),
        PagePlacement::DevicePrivate { .. }
    ));
    // A direct write to part of a device page updates the frame in place.
    h.direct_write(4 * PAGE as u64 + 8, b"direct").unwrap();
    assert!(matches!(
        cache.placement(4),
        PagePlacement::DevicePrivate { .. }
    ));
    let mut b = [0u8; 6];
    h.read_at(4 * PAGE as u64 + 8, &mut b).unwrap();
    assert_eq!(&b, b"direct");
    let mut d = [0u8; 6];
    h.direct_read(4 * PAGE as u64 + 8, &mut d).unwrap();
    assert_eq!(&d, b"direct");
    h.fsync().unwrap();
    let mut want = pattern(N * PAGE, |i| i);
    want[PAGE + 100..PAGE + 105].copy_from_slice(b"hello");
    want[4 * PAGE + 8..4 * PAGE + 14].copy_from_slice(b"direct");
    assert!(f.disk() == want);
    // Back to system memory through the API: bytes unchanged, device empty.
    cache.place_in_system(0, (N * PAGE) as u64).unwrap();
    assert_eq!(dev.used(), 0);
    let mut all = vec![0u8; N * PAGE];
    h.read_at(0, &mut all).unwrap();
    assert!(all == want);
}

#[test]
fn coherent_file_pages_are_mapped_in_place_and_written_back_where_they_are() {
    let _w = watchdog("placement_coherent", 30);
    let (f, cache, h) = file("place-coherent");
    let dev = SoftDevice::coherent(8 << 20).unwrap();
    let s = Space::new().unwrap();
    let m = dev.mirror(&s).unwrap();
    let a = s.map_file(&h, 0, N * PAGE, Prot::ReadWrite, true).unwrap();
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    assert_eq!(
        cache.placement(0),
        PagePlacement::DeviceCoherent { owner: dev.owner() }
    );
    assert_eq!(dev.used(), N * PAGE);
    // The CPU uses them in place: no fault, no migration.
    let faults = s.stats().cpu_faults;
    let mut back = vec![0u8; N * PAGE];
    s.cpu_read(a, &mut back).unwrap();
    assert!(back == pattern(N * PAGE, |i| i));
    s.store_u32(a.add(PAGE), 0xfeed_f00d).unwrap();
    assert_eq!(s.stats().cpu_faults, faults);
    assert_eq!(
        cache.placement(1),
        PagePlacement::DeviceCoherent { owner: dev.owner() }
    );
    // The device sees the CPU's store and writes too; fsync reads them there.
    let mut one = vec![0u8; PAGE];
    m.read(a.add(PAGE), PAGE, &mut one).unwrap();
    assert_eq!(&one[..4], &0xfeed_f00du32.to_ne_bytes());
    m.write(a.add(3 * PAGE), PAGE, &vec![7u8; PAGE]).unwrap();
    h.fsync().unwrap();
    let disk = f.disk();
    assert_eq!(&disk[PAGE..PAGE + 4], &0xfeed_f00du32.to_ne_bytes());
    assert!(disk[3 * PAGE..4 * PAGE].iter().all(|&b| b == 7));
    // A long-term pin moves the pinned pages to system memory (releases their frames).
    let pin = s.pin(a, 2 * PAGE, true).unwrap();
    assert_eq!(cache.placement(0), PagePlacement::System);
    assert_eq!(dev.used(), (N - 2) * PAGE);
    drop(pin);
    // Release: the rest are released in place.
    assert_eq!(dev.release().unwrap(), N - 2);
    assert_eq!(dev.used(), 0);
    s.cpu_read(a, &mut back).unwrap();
    assert_eq!(&back[PAGE..PAGE + 4], &0xfeed_f00du32.to_ne_bytes());
}

#[test]
fn another_device_faulting_a_private_file_page_brings_it_back_first() {
    let _w = watchdog("placement_foreign", 30);
    let (_f, cache, h) = file("place-foreign");
    let (d1, d2) = (
        SoftDevice::private(8 << 20).unwrap(),
        SoftDevice::private(8 << 20).unwrap(),
    );
    let s = Space::new().unwrap();
    let (m1, m2) = (d1.mirror(&s).unwrap(), d2.mirror(&s).unwrap());
    let a = s.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    m1.migrate_range_to_device(a, N * PAGE).unwrap();
    let mut buf = vec![0u8; N * PAGE];
    m2.read(a, N * PAGE, &mut buf).unwrap();
    assert!(buf == pattern(N * PAGE, |i| i));
    assert_eq!(cache.placement(0), PagePlacement::System);
    assert_eq!(d1.used(), 0);
    // Device 2 can now take them.
    m2.migrate_range_to_device(a, N * PAGE).unwrap();
    assert!(private_on(&cache, &d2, N - 1));
    // Device full: the pages that fit move, the rest stay (and a device with no room at all
    // says so).
    let small = SoftDevice::private(2 << 20).unwrap();
    m2.migrate_to_system(a, N * PAGE).unwrap();
    assert_eq!(d2.used(), 0);
    let filler = Space::new().unwrap();
    let fm = small.mirror(&filler).unwrap();
    let fa = filler.map_anon(2 << 20, Prot::ReadWrite).unwrap();
    filler.cpu_write(fa, &vec![1u8; 2 << 20]).unwrap();
    fm.migrate_range_to_device(fa, 512 * PAGE).unwrap();
    assert_eq!(small.used(), 2 << 20);
    let e = cache
        .place_on_device(0, (N * PAGE) as u64, small.pagemap())
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOMEM);
    assert_eq!(cache.placement(0), PagePlacement::System);
}

#[test]
fn device_writes_racing_cpu_faults_from_another_space_truncate_free_and_fsync_lose_nothing() {
    let _w = watchdog("placement_race", 60);
    let (f, cache, h) = file("place-race");
    let dev = SoftDevice::private(8 << 20).unwrap();
    let (s1, s2) = (Space::new().unwrap(), Space::new().unwrap());
    let m = dev.mirror(&s1).unwrap();
    let a1 = s1
        .map_file_with(&h, 0, N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    let a2 = s2.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    // The last generation the device wrote to each page (a page holds one u32, repeated).
    let mut last = [None::<u32>; N];
    std::thread::scope(|sc| {
        let reader = sc.spawn(|| {
            at("cpu reads from space 2");
            let mut k = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = k % N;
                let v = s2.load_u32(a2.add(p * PAGE)).unwrap();
                // Either the file's original word or a device generation (tagged 0xd0..).
                let orig = u32::from_ne_bytes(
                    pattern(N * PAGE, |i| i)[p * PAGE..p * PAGE + 4]
                        .try_into()
                        .unwrap(),
                );
                assert!(
                    v == orig || v >> 24 == 0xd0,
                    "page {p}: torn or stale word {v:#x}"
                );
                k += 7;
            }
        });
        at("device writes");
        for g in 0..300u32 {
            let p = (g as usize * 5) % N;
            let _ = m.migrate_range_to_device(a1, N * PAGE);
            let word = 0xd000_0000 | g;
            let buf: Vec<u8> = (0..PAGE / 4).flat_map(|_| word.to_ne_bytes()).collect();
            match m.write(a1.add(p * PAGE), PAGE, &buf) {
                Ok(_) => last[p] = Some(word),
                // The page came back to system memory meanwhile: a device may not write
                // through a mapping that intercepts stores (EPERM).
                Err(e) => assert_eq!(e.errno(), libc::EPERM, "{e}"),
            }
            if g % 50 == 49 {
                h.fsync().unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
    });
    h.fsync().unwrap();
    let disk = f.disk();
    let orig = pattern(N * PAGE, |i| i);
    for p in 0..N {
        let page = &disk[p * PAGE..(p + 1) * PAGE];
        match last[p] {
            Some(w) => assert!(
                page.chunks(4).all(|c| c == w.to_ne_bytes()),
                "page {p} lost the device's last write {w:#x}"
            ),
            None => assert!(page == &orig[p * PAGE..(p + 1) * PAGE]),
        }
    }
    drop(cache);
}

fn owners(cache: &FileCache, p: usize) -> Vec<hetmem::Owner> {
    let mut v = cache.replica_owners(p as u64);
    v.sort_by_key(|o| o.0);
    v
}

#[test]
fn read_only_replicas_on_several_devices_serve_reads_and_survive_cpu_reads() {
    let _w = watchdog("replica_reads", 30);
    let f = TempFile::new("replica-ro", &pattern(N * PAGE, |i| i ^ 0x3c3c));
    // Model weights: a file opened read-only.
    let cache = FileCache::open(&f.0, false, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let (d1, d2) = (
        SoftDevice::private(8 << 20).unwrap(),
        SoftDevice::private(8 << 20).unwrap(),
    );
    let (s1, s2) = (Space::new().unwrap(), Space::new().unwrap());
    let (m1, m2) = (d1.mirror(&s1).unwrap(), d2.mirror(&s2).unwrap());
    let a1 = s1.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    let a2 = s2.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    assert_eq!(m1.replicate_range(a1, N * PAGE).unwrap().cpages, N as u64);
    assert_eq!(m2.replicate_range(a2, N * PAGE).unwrap().cpages, N as u64);
    let mut want = vec![d1.owner(), d2.owner()];
    want.sort_by_key(|o| o.0);
    assert_eq!(owners(&cache, 0), want);
    assert_eq!((d1.used(), d2.used()), (N * PAGE, N * PAGE));
    assert_eq!(
        cache.placement(0),
        PagePlacement::System,
        "the memfd keeps the data"
    );
    // Both devices read their own copies; the CPU reads the file's pages; nothing moves.
    let data = pattern(N * PAGE, |i| i ^ 0x3c3c);
    let mut buf = vec![0u8; N * PAGE];
    m1.read(a1, N * PAGE, &mut buf).unwrap();
    assert!(buf == data);
    m2.read(a2, N * PAGE, &mut buf).unwrap();
    assert!(buf == data);
    s1.cpu_read(a1, &mut buf).unwrap();
    assert!(buf == data);
    assert_eq!(owners(&cache, N - 1), want);
    // The devices read their own memory: a snapshot shows each page as a read-only local
    // device page.
    let mut snap = vec![0u8; N];
    m1.snapshot(a1, N * PAGE, &mut snap).unwrap();
    assert!(
        snap.iter()
            .all(|&b| b == hetmem::device::snap::DEV_PRIVATE_LOCAL | hetmem::device::snap::READ),
        "{snap:x?}"
    );
    // Releasing a device drops the replicas of the pages it held (a replica is a copy: nothing
    // to bring back); the other device reads on.
    d1.release().unwrap();
    assert_eq!(d1.used(), 0);
    m2.read(a2, N * PAGE, &mut buf).unwrap();
    assert!(buf == data);
}

#[test]
fn every_write_drops_the_replicas_first() {
    let _w = watchdog("replica_writes", 30);
    let Fixture {
        m,
        dev,
        s,
        a,
        h,
        cache,
        f,
    } = fixture("replica-w");
    let mut data = pattern(N * PAGE, |i| i);
    m.replicate_range(a, N * PAGE).unwrap();
    assert_eq!(dev.used(), N * PAGE);
    // A CPU store: the page's replica goes first, then the store lands.
    s.store_u32(a.add(PAGE), 0xaaaa_5555).unwrap();
    data[PAGE..PAGE + 4].copy_from_slice(&0xaaaa_5555u32.to_ne_bytes());
    assert!(owners(&cache, 1).is_empty());
    assert_eq!(owners(&cache, 0), vec![dev.owner()]);
    let mut buf = vec![0u8; N * PAGE];
    m.read(a, N * PAGE, &mut buf).unwrap();
    assert!(
        buf == data,
        "the device reads the store, not a stale replica"
    );
    // write_at, a device write, a punch, a direct write, truncate: each drops what it touches.
    h.write_at(2 * PAGE as u64, b"wa").unwrap();
    data[2 * PAGE..2 * PAGE + 2].copy_from_slice(b"wa");
    assert!(owners(&cache, 2).is_empty());
    m.write(a.add(3 * PAGE), PAGE, &vec![0x33; PAGE]).unwrap();
    data[3 * PAGE..4 * PAGE].fill(0x33);
    assert!(owners(&cache, 3).is_empty());
    h.punch_hole(4 * PAGE as u64, PAGE as u64).unwrap();
    data[4 * PAGE..5 * PAGE].fill(0);
    assert!(owners(&cache, 4).is_empty());
    h.direct_write(5 * PAGE as u64 + 10, b"dw").unwrap();
    data[5 * PAGE + 10..5 * PAGE + 12].copy_from_slice(b"dw");
    assert!(owners(&cache, 5).is_empty());
    h.set_len((N - 2) as u64 * PAGE as u64).unwrap();
    data.truncate((N - 2) * PAGE);
    assert!(owners(&cache, N - 1).is_empty());
    assert_eq!(
        dev.used(),
        (N - 2 - 5) * PAGE,
        "pages 0 and 6.. keep theirs"
    );
    let mut buf = vec![0u8; (N - 2) * PAGE];
    m.read(a, (N - 2) * PAGE, &mut buf).unwrap();
    assert!(buf == data);
    h.fsync().unwrap();
    assert!(f.disk() == data);
}

#[test]
fn a_shared_mapping_that_does_not_intercept_stores_and_replicas_exclude_each_other() {
    let _w = watchdog("replica_exclusion", 30);
    let (_f, cache, h) = file("replica-x");
    let dev = SoftDevice::private(8 << 20).unwrap();
    let s = Space::new().unwrap();
    let ro = s.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    let _ = ro;
    // A read-only mapping of a writable file can be made writable later without a fault to
    // catch the store: no replicas while it exists.
    let e = cache
        .replicate(0, (N * PAGE) as u64, dev.pagemap())
        .unwrap_err();
    assert!(matches!(e, Error::StoresNotIntercepted { .. }), "{e}");
    s.unmap(ro, N * PAGE).unwrap();
    let b = s
        .map_file_with(&h, 0, N * PAGE, intercepting(Prot::Read))
        .unwrap();
    assert_eq!(
        cache
            .replicate(0, (N * PAGE) as u64, dev.pagemap())
            .unwrap(),
        N as u64
    );
    // Making such a mapping drops the replicas of its range first.
    let w = s
        .map_file(&h, 4 * PAGE as u64, 4 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    assert!(owners(&cache, 4).is_empty() && owners(&cache, 7).is_empty());
    assert_eq!(owners(&cache, 3), vec![dev.owner()]);
    s.store_u32(w, 77).unwrap();
    assert_eq!(s.load_u32(b.add(4 * PAGE)).unwrap(), 77);
    assert_eq!(dev.used(), (N - 4) * PAGE);
}

#[test]
fn a_device_write_past_the_end_of_the_file_is_a_typed_error() {
    let _w = watchdog("placement_past_eof", 30);
    let Fixture {
        m,
        dev: _dev,
        s: _s,
        a,
        h,
        cache: _cache,
        f: _f,
    } = fixture("place-eof");
    h.set_len((N / 2 * PAGE) as u64).unwrap();
    let e = m
        .write(a.add((N - 1) * PAGE), PAGE, &vec![1u8; PAGE])
        .unwrap_err();
    assert!(matches!(e, Error::PastEndOfFile { .. }), "{e}");
    assert_eq!(e.errno(), libc::EFAULT);
    // Inside the file the device writes.
    m.write(a, PAGE, &vec![1u8; PAGE]).unwrap();
}

/// A `write_at` over a range that holds a replicated page and a device-coherent page drops the
/// replica (the page changes) and writes the coherent page in place: it stays in the device's
/// memory (it used to be brought back with the replica's page, a migration nobody asked for;
/// found by the shared-anonymous-memory model). The same for a file and for shared anonymous
/// memory.
#[test]
fn write_at_next_to_a_replica_keeps_a_coherent_page_in_place() {
    let _w = watchdog("write_at next to a replica", 60);
    let (_f, file_cache, _) = file("replica-coherent");
    let anon = FileCache::anonymous(N * PAGE).unwrap();
    anon.handle()
        .write_at(0, &pattern(N * PAGE, |i| i))
        .unwrap();
    for cache in [file_cache, anon] {
        let h = cache.handle();
        let prv = SoftDevice::private(4 << 20).unwrap();
        let coh = SoftDevice::coherent(4 << 20).unwrap();
        assert_eq!(
            cache
                .replicate(5 * PAGE as u64, 5 * PAGE as u64, prv.pagemap())
                .unwrap(),
            5
        );
        assert_eq!(
            cache
                .place_on_device(10 * PAGE as u64, PAGE as u64, coh.pagemap())
                .unwrap(),
            1
        );
        let data = vec![0xabu8; 2 * PAGE];
        h.write_at(9 * PAGE as u64, &data).unwrap();
        assert!(
            owners(&cache, 9).is_empty(),
            "the written page keeps a replica"
        );
        assert_eq!(
            owners(&cache, 8),
            vec![prv.owner()],
            "an unwritten page lost its replica"
        );
        assert_eq!(
            cache.placement(10),
            PagePlacement::DeviceCoherent { owner: coh.owner() },
            "the coherent page was moved by a write to it"
        );
        let mut back = vec![0u8; 2 * PAGE];
        h.read_at(9 * PAGE as u64, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(coh.used(), PAGE);
    }
}

/// The replica of a partial last page holds zeros past the end of file, whatever page was
/// copied before it: after the file grows, a device reading its replica sees the zeros the
/// extension promises (it used to see the previous page's bytes there; found by the file-cache
/// model, seed 1796220943457260753).
#[test]
fn the_replica_of_a_partial_last_page_reads_zeros_past_the_old_end() {
    let _w = watchdog("replica of a partial last page", 30);
    let len = 2 * PAGE + 1;
    let mut data = vec![0x5au8; len];
    // Written through the cache (the memfd ends at the end of file, mid-page).
    let f = TempFile::new("replica-tail", &[]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    h.write_at(0, &data).unwrap();
    let dev = SoftDevice::private(1 << 20).unwrap();
    let s = Space::new().unwrap();
    let m = dev.mirror(&s).unwrap();
    let a = s
        .map_file_with(&h, 0, 3 * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    assert_eq!(cache.replicate(0, len as u64, dev.pagemap()).unwrap(), 3);
    h.set_len(3 * PAGE as u64).unwrap();
    data.resize(3 * PAGE, 0);
    let mut buf = vec![0u8; 3 * PAGE];
    m.read(a, 3 * PAGE, &mut buf).unwrap();
    assert_eq!(
        owners(&cache, 2),
        vec![dev.owner()],
        "the device read its replica"
    );
    let bad = buf.iter().zip(&data).position(|(x, y)| x != y);
    assert_eq!(bad, None, "the device reads stale bytes past the old end");
    s.cpu_read(a, &mut buf).unwrap();
    assert!(buf == data);
}

#[test]
fn device_release_drops_clean_file_pages_without_a_copy_back_and_keeps_written_ones() {
    // Clean device-private pages (the disk holds their bytes, the device never wrote them)
    // leave the cache when the device evicts them: no copy over the link, the next access
    // reads the file again. Pages the device wrote come back and reach the disk.
    let _w = watchdog("placement_release_clean", 30);
    let x = fixture("place-release-clean");
    x.m.migrate_range_to_device(x.a, N * PAGE).unwrap();
    let half = pattern(N / 2 * PAGE, |i| 0xabc0_0000 | i);
    x.m.write(x.a, N / 2 * PAGE, &half).unwrap();
    let (moved, filled) = (
        x.dev.link().traffic(hetmem::link::Traffic::Migration).bytes,
        x.cache.stats().pages_filled,
    );
    assert_eq!(x.dev.release().unwrap(), N);
    assert_eq!(x.dev.used(), 0);
    assert_eq!(x.cache.stats().device_pages_dropped, (N / 2) as u64);
    let copied = x.dev.link().traffic(hetmem::link::Traffic::Migration).bytes - moved;
    assert_eq!(
        copied,
        (N / 2 * PAGE) as u64,
        "only the written pages came back"
    );
    for p in 0..N {
        let want = if p < N / 2 {
            PagePlacement::System
        } else {
            PagePlacement::Uncached
        };
        assert_eq!(x.cache.placement(p as u64), want, "page {p}");
    }
    let mut want = pattern(N * PAGE, |i| i);
    want[..N / 2 * PAGE].copy_from_slice(&half);
    let mut back = vec![0u8; N * PAGE];
    x.s.cpu_read(x.a, &mut back).unwrap();
    assert!(
        back == want,
        "every byte: written ones from the cache, the rest from the file"
    );
    assert_eq!(x.cache.stats().pages_filled, filled + (N / 2) as u64);
    x.h.fsync().unwrap();
    assert!(x.f.disk() == want);
    // An explicit migration to system memory brings clean pages back (nothing dropped).
    x.m.migrate_range_to_device(x.a, N * PAGE).unwrap();
    x.h.fsync().unwrap();
    x.m.migrate_to_system(x.a, N * PAGE).unwrap();
    assert_eq!(x.cache.stats().device_pages_dropped, (N / 2) as u64);
    assert_eq!(x.cache.placement(N as u64 - 1), PagePlacement::System);
}
