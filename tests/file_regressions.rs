//! Regression tests for bugs found in review of file-backed memory (each test fails on the bug it names).

mod common;
use common::*;
use hetmem::pagecache::*;
use hetmem::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// protect(RW) of a shared file mapping that was writable before (RW -> RO -> RW) registers
/// write tracking again and write-protects the whole range: the "written" bit of a page stored
/// to before is cleared without a scan, so fsync never writes that store back.
#[test]
fn store_before_protect_ro_rw_cycle_reaches_the_file() {
    let _w = watchdog("r3_protect_cycle", 30);
    let f = TempFile::new("r3-protect", &vec![0u8; 4 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file(&h, 0, 4 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    space.store_u32(a.add(PAGE), 0xDEAD_BEEF).unwrap();
    space.protect(a, 4 * PAGE, Prot::Read).unwrap();
    space.protect(a, 4 * PAGE, Prot::ReadWrite).unwrap();
    h.fsync().unwrap();
    assert_eq!(
        &f.disk()[PAGE..PAGE + 4],
        &0xDEAD_BEEFu32.to_ne_bytes(),
        "a CPU store made before protect(RO)+protect(RW) was lost by fsync"
    );
}

/// collect_written upgrades each mapping's Weak<SpaceCore> while holding the cache lock; if the
/// Space is dropped meanwhile, that temporary Arc is the last one and SpaceCore::drop runs in
/// the fsync/writeback thread, under the cache lock: it takes the space lock (1 under 1.5) and
/// then detach() takes the cache lock again: self-deadlock.
#[test]
fn dropping_a_space_during_writeback_does_not_deadlock() {
    let _w = watchdog("r3_drop_during_writeback", 60);
    let f = TempFile::new("r3-dropdl", &vec![0u8; 16 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = Arc::new(cache.handle());
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let wb = {
        let cache = cache.clone();
        let stop = stop.clone();
        let progress = progress.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                cache.writeback_round();
                progress.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mapper = {
        let h = h.clone();
        let stop = stop.clone();
        let progress = progress.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 3000 {
                let space = small_space();
                let a = space
                    .map_file(&h, 0, 16 * PAGE, Prot::ReadWrite, true)
                    .unwrap();
                space.store_u32(a, i as u32).unwrap();
                drop(space);
                progress.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    // A deadlock hangs the join: the watchdog fails the test and prints the stacks.
    mapper.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    wb.join().unwrap();
}

/// A store through a shared mapping past the end of file, inside the last (partial) page, is
/// allowed (as with the kernel's mmap) and must never become file data. Extending the file
/// (set_len up) keeps that page's cached tail as it is: the stored bytes become part of the
/// file (read_at sees them; fsync writes them to disk) where an extension must read zeros.
#[test]
fn extending_the_file_does_not_expose_stores_past_the_old_end() {
    let _w = watchdog("r3_extend_tail", 30);
    let f = TempFile::new("r3-tail", &vec![7u8; 6000]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file(&h, 0, 2 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    // Past the end of file (6000) but inside the last page: no SIGBUS, the bytes are not file data.
    space.store_u32(a.add(6100), 0x5555_5555).unwrap();
    h.set_len(2 * PAGE as u64).unwrap();
    let mut b = [0u8; 4];
    h.read_at(6100, &mut b).unwrap();
    h.fsync().unwrap();
    let disk = f.disk();
    assert_eq!(
        (b, &disk[6100..6104]),
        ([0u8; 4], &[0u8; 4][..]),
        "bytes the file never held (stored past the old end) appear after extending it"
    );
}

/// A pinned page must stay present (the pin is get_user_pages); shrink_to_budget evicts clean
/// pages of read-only shared mappings without looking at pins (a shared file mapping's entries
/// carry the pin counts but the cache never sees them): the pinned pages are punched out.
#[test]
fn shrink_to_budget_does_not_evict_pinned_pages() {
    let _w = watchdog("r3_pin_evict", 30);
    const N: usize = 16;
    let f = TempFile::new("r3-pin", &vec![3u8; N * PAGE]);
    let cache = FileCache::open(
        &f.0,
        true,
        CacheConfig {
            budget: 4 * PAGE,
            dirty_bound: 64 << 20,
        },
    )
    .unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    let pin = space.pin(a, N * PAGE, false).unwrap();
    cache.shrink_to_budget();
    let evicted = cache.stats().pages_evicted;
    let cached = cache.cached_bytes();
    drop(pin);
    assert_eq!(
        (evicted, cached),
        (0, N * PAGE),
        "pages pinned through a read-only shared file mapping were evicted"
    );
}

/// A mapping that intercepts stores (synchronous write-protect) relies on every clean page
/// being write-protected. A dirty page is unprotected; hole punch (also truncate, direct
/// write) zaps it from the memfd, and an unprotected entry leaves no uffd-wp marker behind: the
/// page refilled by the next read maps without protection, so the next store goes through with
/// no fault, the page stays Clean, and fsync never writes it.
#[test]
fn intercepted_stores_after_a_punch_of_a_dirty_page_reach_the_file() {
    let _w = watchdog("r3_sync_punch", 30);
    let f = TempFile::new("r3-syncpunch", &vec![1u8; 4 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file_with(&h, 0, 4 * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    space.store_u32(a.add(PAGE), 0x1111_1111).unwrap();
    h.punch_hole(PAGE as u64, PAGE as u64).unwrap();
    assert_eq!(space.load_u32(a.add(PAGE)).unwrap(), 0);
    space.store_u32(a.add(PAGE), 0x2222_2222).unwrap();
    h.fsync().unwrap();
    assert_eq!(
        &f.disk()[PAGE..PAGE + 4],
        &0x2222_2222u32.to_ne_bytes(),
        "a store after punch + refill was never seen (page left unprotected, never dirtied)"
    );
}

/// Found by the file-cache model (a device write among random operations): a device write
/// through a mapping that intercepts stores hit a write-protected page inside the device's copy,
/// under its page-table lock; the store fault then waited for the space lock, held by the
/// background evictor waiting for the device's page-table lock. Devices were then refused write
/// access to such mappings (EPERM). Now a device gets write access to a page through the cache
/// (the page is made dirty first, within the dirty bound, and the access recorded), and
/// writeback revokes that access (a PROTECTION event, with no cache lock held) before it
/// protects the page again. Device writes, CPU stores, the dirty bound's background writebacks,
/// the evictor and `fsync` interleave; nothing hangs and every byte reaches the disk.
#[test]
fn device_writes_through_an_intercepting_mapping_reach_the_disk() {
    let _w = watchdog("device_write_intercepting", 60);
    let n = 4;
    let f = TempFile::new("dev-intercept", &vec![3u8; n * PAGE]);
    let cfg = CacheConfig {
        budget: 2 * PAGE,
        dirty_bound: 2 * PAGE,
    };
    let cache = FileCache::open(&f.0, true, cfg).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(1 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let opts = intercepting(Prot::ReadWrite);
    let a = space.map_file_with(&h, 0, n * PAGE, opts).unwrap();
    let mut buf = vec![0u8; n * PAGE];
    m.read(a, n * PAGE, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
    let mut want = vec![3u8; n * PAGE];
    for round in 0..24usize {
        for p in 0..n {
            let v = (round * n + p) as u8;
            at(format!("round {round}: device writes page {p}"));
            m.write(a.add(p * PAGE), PAGE, &vec![v; PAGE]).unwrap();
            want[p * PAGE..(p + 1) * PAGE].fill(v);
        }
        // A CPU store to one page, the device reads what the CPU wrote.
        let p = round % n;
        space.store_u32(a.add(p * PAGE), 0x0909_0909).unwrap();
        want[p * PAGE..p * PAGE + 4].fill(9);
        m.read(a.add(p * PAGE), PAGE, &mut buf[..PAGE]).unwrap();
        assert_eq!(&buf[..4], &[9u8; 4]);
        if round % 6 == 5 {
            at(format!("round {round}: fsync"));
            h.fsync().unwrap();
            assert!(f.disk() == want, "round {round}: the disk lost a write");
            // After fsync every page is clean: the device's next write faults for access again.
            assert_eq!(cache.dirty_bytes(), 0);
        }
    }
}

/// A tight loop of `shrink_to_budget` (which takes the cache's locks over and over) must not
/// starve intercepted stores and fills of the same cache: the stores finish while it runs.
#[test]
fn a_tight_shrink_to_budget_loop_does_not_starve_stores() {
    let _w = watchdog("shrink_vs_stores", 60);
    let n = 64;
    let f = TempFile::new("shrink-starve", &vec![1u8; n * PAGE]);
    let cfg = CacheConfig {
        budget: 8 * PAGE,
        dirty_bound: 4 * PAGE,
    };
    let cache = FileCache::open(&f.0, true, cfg).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let opts = intercepting(Prot::ReadWrite);
    let a = space.map_file_with(&h, 0, n * PAGE, opts).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let shrinker = s.spawn(|| {
            at("shrink loop");
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cache.shrink_to_budget();
                rounds += 1;
            }
            rounds
        });
        at("stores");
        for k in 0..4000usize {
            let p = (k * 7) % n;
            space.store_u32(a.add(p * PAGE), k as u32).unwrap();
            assert_eq!(space.load_u32(a.add(p * PAGE)).unwrap(), k as u32);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(shrinker.join().unwrap() > 0);
    });
    h.fsync().unwrap();
    let disk = f.disk();
    for p in 0..n {
        let last = (0..4000usize).rev().find(|k| (k * 7) % n == p).unwrap();
        assert_eq!(
            &disk[p * PAGE..p * PAGE + 4],
            &(last as u32).to_ne_bytes(),
            "page {p}"
        );
    }
}

/// A file page in device-private memory is a hole in the memfd, its frame the only copy. The
/// placement of a file's partial last page copied the previous page's bytes into the frame past
/// the end of file; a truncate into a placed page, and an extension past one, zeroed its tail in
/// the memfd, which put a page of zeros in front of the frame for every CPU mapping (found by
/// `model_tests::placements::truncate_punch_vs_placement`).
#[test]
fn truncating_into_a_device_private_page_keeps_its_head_and_zeroes_its_tail() {
    let _w = watchdog("r3_truncate_placed", 30);
    let data = pattern(3 * PAGE, |i| i | 0x8000_0000);
    let f = TempFile::new("r3-truncate-placed", &data);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let space = small_space();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_file(&h, 0, 3 * PAGE, Prot::Read, true).unwrap();
    let p1 = a.add(PAGE);
    let mut b = vec![0u8; PAGE];
    // The file ends inside page 1 (cached before the truncation: the memfd ends there too):
    // placed, the page is zeros past the end of file.
    h.read_at(0, &mut vec![0u8; 3 * PAGE]).unwrap();
    h.set_len((PAGE + PAGE / 2) as u64).unwrap();
    m.migrate_range_to_device(a, 2 * PAGE).unwrap();
    assert!(matches!(
        cache.placement(1),
        PagePlacement::DevicePrivate { .. }
    ));
    m.read(p1, PAGE, &mut b).unwrap();
    assert!(b[..PAGE / 2] == data[PAGE..PAGE + PAGE / 2]);
    assert!(
        b[PAGE / 2..].iter().all(|&x| x == 0),
        "the placed last page holds bytes past the end of file"
    );
    // Truncate into the placed page: its head stays, its tail is zeros, for the device too.
    let cut = PAGE / 4;
    h.set_len((PAGE + cut) as u64).unwrap();
    m.read(p1, PAGE, &mut b).unwrap();
    assert!(b[..cut] == data[PAGE..PAGE + cut]);
    assert!(
        b[cut..].iter().all(|&x| x == 0),
        "the device reads bytes past the new end of file"
    );
    // Extend past it: still on the device; the CPU brings it back with its head intact.
    h.set_len(2 * PAGE as u64).unwrap();
    assert!(matches!(
        cache.placement(1),
        PagePlacement::DevicePrivate { .. }
    ));
    space.cpu_read(a.add(PAGE), &mut b).unwrap();
    assert!(
        b[..cut] == data[PAGE..PAGE + cut],
        "the CPU lost the head of the placed page to the truncation or the extension"
    );
    assert!(b[cut..].iter().all(|&x| x == 0));
    h.fsync().unwrap();
    let mut want = data[..PAGE + cut].to_vec();
    want.resize(2 * PAGE, 0);
    assert!(f.disk() == want);
}

/// The first access to a page through a private file mapping copies it from the cache; a page
/// in device-private memory is a hole in the memfd, and the copy read zeros there instead of
/// the frame's bytes (found by `model_tests::placements::device_release_vs_cpu_fault`).
#[test]
fn a_private_mapping_copies_a_device_private_page_from_its_frame() {
    let _w = watchdog("r3_private_of_placed", 30);
    let data = pattern(2 * PAGE, |i| i | 0x8000_0000);
    let f = TempFile::new("r3-private-of-placed", &data);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let s1 = small_space();
    let m = dev.mirror(&s1).unwrap();
    let a = s1.map_file(&h, 0, 2 * PAGE, Prot::Read, true).unwrap();
    m.migrate_range_to_device(a, 2 * PAGE).unwrap();
    let s2 = small_space();
    let p = s2.map_file(&h, 0, 2 * PAGE, Prot::Read, false).unwrap();
    let mut b = vec![0u8; 2 * PAGE];
    s2.cpu_read(p, &mut b).unwrap();
    assert!(
        b == data,
        "a private mapping's copy of device-private file pages"
    );
    // Read where they are: still on the device.
    for page in 0..2 {
        assert!(matches!(
            cache.placement(page),
            PagePlacement::DevicePrivate { .. }
        ));
    }
}
