//! File mappings through hetmem's page cache: CPU faults fill the cache, CPU stores reach the
//! file on fsync, mappings share pages, private mappings copy on write, a device mirrors file
//! pages, and an access past the end of file gets SIGBUS.

mod common;
use common::*;
use hetmem::pagecache::*;
use hetmem::*;

#[test]
fn cpu_stores_through_a_shared_mapping_reach_the_file_on_fsync() {
    let _w = watchdog("file_map_fsync", 30);
    let content = pattern(8 * PAGE, |i| i);
    let f = TempFile::new("map-fsync", &content);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let a = space
        .map_file(&h, 0, 8 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    // Real loads fault the file in.
    for p in 0..8 {
        assert_eq!(
            space.load_u32(a.add(p * PAGE)).unwrap(),
            (p * PAGE / 4) as u32
        );
    }
    // Real stores, then fsync through the cache.
    space.store_u32(a.add(3 * PAGE + 8), 0xABCD).unwrap();
    space.store_u32(a.add(6 * PAGE), 0x1234).unwrap();
    assert_eq!(f.disk(), content, "nothing on disk before fsync");
    h.fsync().unwrap();
    let mut want = content.clone();
    want[3 * PAGE + 8..3 * PAGE + 12].copy_from_slice(&0xABCDu32.to_ne_bytes());
    want[6 * PAGE..6 * PAGE + 4].copy_from_slice(&0x1234u32.to_ne_bytes());
    assert_eq!(f.disk(), want);
    // A second fsync writes nothing new (the stores were recorded once), and later stores are
    // seen again.
    let before = cache.stats().pages_written_back;
    h.fsync().unwrap();
    assert_eq!(cache.stats().pages_written_back, before);
    space.store_u32(a.add(7 * PAGE), 77).unwrap();
    h.fsync().unwrap();
    assert_eq!(&f.disk()[7 * PAGE..7 * PAGE + 4], &77u32.to_ne_bytes());
}

#[test]
fn mappings_and_read_write_at_share_the_cache() {
    let _w = watchdog("file_map_share", 30);
    let f = TempFile::new("map-share", &vec![1u8; 4 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let a = space
        .map_file(&h, 0, 4 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    let b = space
        .map_file(&h, PAGE as u64, 2 * PAGE, Prot::Read, true)
        .unwrap();
    space.cpu_write(a.add(PAGE), &[9u8; 16]).unwrap();
    let mut got = [0u8; 16];
    space.cpu_read(b, &mut got).unwrap();
    assert_eq!(
        got, [9u8; 16],
        "a store through one mapping is seen through the other"
    );
    h.write_at(2 * PAGE as u64, &[5u8; 8]).unwrap();
    space.cpu_read(b.add(PAGE), &mut got[..8]).unwrap();
    assert_eq!(
        &got[..8],
        &[5u8; 8],
        "write_at is seen through the mappings"
    );
    let mut r = [0u8; 16];
    h.read_at(PAGE as u64, &mut r).unwrap();
    assert_eq!(r, [9u8; 16], "read_at sees the mapping's stores");
    // Unmapping before fsync loses nothing: the stores were recorded at unmap.
    space.unmap(a, 4 * PAGE).unwrap();
    h.fsync().unwrap();
    assert_eq!(&f.disk()[PAGE..PAGE + 16], &[9u8; 16]);
    // Writing through a read-only mapping is refused; mapping a read-only file writable too.
    assert!(matches!(
        space.cpu_write(b, &[0]),
        Err(Error::NoWrite { .. })
    ));
    let ro = FileCache::open(&f.0, false, CacheConfig::default())
        .unwrap()
        .handle();
    assert_eq!(
        space
            .map_file(&ro, 0, PAGE, Prot::ReadWrite, true)
            .unwrap_err()
            .errno(),
        libc::EACCES
    );
    let c = space.map_file(&ro, 0, PAGE, Prot::Read, true).unwrap();
    assert_eq!(
        space.protect(c, PAGE, Prot::ReadWrite).unwrap_err().errno(),
        libc::EACCES
    );
}

#[test]
fn private_mappings_copy_on_write() {
    let _w = watchdog("file_map_private", 30);
    let f = TempFile::new("map-private", &vec![3u8; 2 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let p = space
        .map_file(&h, 0, 2 * PAGE, Prot::ReadWrite, false)
        .unwrap();
    let s = space.map_file(&h, 0, 2 * PAGE, Prot::Read, true).unwrap();
    space.cpu_write(p, &[8u8; 4]).unwrap();
    let mut got = [0u8; 4];
    space.cpu_read(s, &mut got).unwrap();
    assert_eq!(
        got, [3u8; 4],
        "a private store is not seen by the shared mapping"
    );
    space.cpu_read(p, &mut got).unwrap();
    assert_eq!(got, [8u8; 4]);
    h.fsync().unwrap();
    assert_eq!(f.disk(), vec![3u8; 2 * PAGE], "nor written to the file");
    // A private mapping is anonymous memory filled from the file at first access: it migrates
    // like any anonymous memory. Past the end of file it gets SIGBUS (see the child test).
    assert_eq!(space.residency(p), Residency::System);
}

/// The kernel's `migrate_file_private`: a private file mapping whose pages the CPU wrote
/// (anonymous copies) migrates to device memory: 0, cpages N, mirror == i; the CPU reads them
/// back; the file is untouched.
#[test]
fn migrate_file_private() {
    let _w = watchdog("file_map_migrate_private", 30);
    let n = 16;
    let f = TempFile::new("map-migrate-private", &vec![7u8; n * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let p = space
        .map_file(&h, 0, n * PAGE, Prot::ReadWrite, false)
        .unwrap();
    space.cpu_write(p, &pattern(n * PAGE, |i| i)).unwrap();
    let mut buf = vec![0u8; n * PAGE];
    let mut c = DmirrorCmd {
        addr: p.get() as u64,
        buf: &mut buf,
        npages: n as u64,
        cpages: 0,
        faults: 0,
    };
    assert_eq!(m.cmd(Cmd::MigrateToDev, &mut c), 0);
    assert_eq!(c.cpages, n as u64);
    assert_eq!(buf, pattern(n * PAGE, |i| i));
    assert_eq!(space.residency(p), Residency::Device(dev.owner()));
    let mut back = vec![0u8; n * PAGE];
    space.cpu_read(p, &mut back).unwrap();
    assert_eq!(back, pattern(n * PAGE, |i| i));
    h.fsync().unwrap();
    assert_eq!(f.disk(), vec![7u8; n * PAGE]);
    // Unwritten pages of a private mapping are filled from the file, not zeros.
    let q = space.map_file(&h, 0, n * PAGE, Prot::Read, false).unwrap();
    assert_eq!(space.load_u32(q.add(5 * PAGE)).unwrap(), 0x0707_0707);
}

/// The kernel's `file_read` and `file_write` cases: a device mirrors file pages.
#[test]
fn a_device_mirrors_file_pages() {
    let _w = watchdog("file_map_device", 30);
    let n = 16;
    let f = TempFile::new("map-device", &pattern(n * PAGE, |i| i));
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    // file_read: a read-only shared mapping, READ N: ok(N, 1), mirror == i.
    let r = space.map_file(&h, 0, n * PAGE, Prot::Read, true).unwrap();
    let mut buf = vec![0u8; n * PAGE];
    let mut c = DmirrorCmd {
        addr: r.get() as u64,
        buf: &mut buf,
        npages: n as u64,
        cpages: 0,
        faults: 0,
    };
    assert_eq!(m.cmd(Cmd::Read, &mut c), 0);
    assert_eq!((c.cpages, c.faults), (n as u64, 1));
    assert_eq!(buf, pattern(n * PAGE, |i| i));
    // file_write: a read-write shared mapping, WRITE N: ok(N, 1), ptr == i, and on disk after
    // fsync (the device's stores are tracked like the CPU's).
    let w = space
        .map_file(&h, 0, n * PAGE, Prot::ReadWrite, true)
        .unwrap();
    let mut data = pattern(n * PAGE, |i| !i);
    let mut c = DmirrorCmd {
        addr: w.get() as u64,
        buf: &mut data,
        npages: n as u64,
        cpages: 0,
        faults: 0,
    };
    assert_eq!(m.cmd(Cmd::Write, &mut c), 0);
    assert_eq!((c.cpages, c.faults), (n as u64, 1));
    let mut back = vec![0u8; n * PAGE];
    space.cpu_read(w, &mut back).unwrap();
    assert_eq!(back, pattern(n * PAGE, |i| !i));
    h.fsync().unwrap();
    assert_eq!(f.disk(), pattern(n * PAGE, |i| !i));
    // The pages of a writable shared mapping that does not intercept stores do not move to
    // device-private memory (EBUSY: a CPU store there cannot be held off while a page moves;
    // the kernel says ENOENT for every shared file page), and nothing is lost.
    let mut c = DmirrorCmd {
        addr: w.get() as u64,
        buf: &mut back,
        npages: n as u64,
        cpages: 0,
        faults: 0,
    };
    assert_eq!(m.cmd(Cmd::MigrateToDev, &mut c), -libc::EBUSY);
    assert_eq!(dev.used(), 0);
    // No device-exclusive access to file pages (anonymous memory only, as the kernel).
    assert_eq!(
        m.exclusive(w, PAGE, &mut back[..PAGE]).unwrap_err().errno(),
        libc::EBUSY
    );
    // Truncate while the device mirrors the pages: its mappings of the removed pages are
    // invalidated first; a device read of them then fails (EFAULT) instead of reaching memory
    // that is gone, and the pages still inside the file read as before.
    let mut one = vec![0u8; PAGE];
    m.read(w, PAGE, &mut one).unwrap();
    h.set_len(PAGE as u64).unwrap();
    let e = m.read(w.add(PAGE), PAGE, &mut one).unwrap_err();
    assert_eq!(e.errno(), libc::EFAULT);
    m.read(w, PAGE, &mut one).unwrap();
    assert_eq!(one, pattern(PAGE, |i| !i));
    // Hole punch and direct write with the device mirroring: its entries are dropped, and its
    // next read sees the new data.
    h.set_len(4 * PAGE as u64).unwrap();
    m.read(w, 4 * PAGE, &mut back[..4 * PAGE]).unwrap();
    h.direct_write(2 * PAGE as u64, &[0x5Au8; PAGE]).unwrap();
    h.punch_hole(0, PAGE as u64).unwrap();
    m.read(w, 4 * PAGE, &mut back[..4 * PAGE]).unwrap();
    assert!(back[..PAGE].iter().all(|&b| b == 0), "punched");
    assert!(
        back[2 * PAGE..3 * PAGE].iter().all(|&b| b == 0x5A),
        "direct write seen"
    );
}

/// Runs in a child process (re-executed test binary): touches a mapped page past the end of the
/// file, which must kill it with SIGBUS.
#[test]
#[ignore = "run as a child process by past_the_end_of_file_is_sigbus"]
fn sigbus_child() {
    let Some(path) = std::env::var_os("HETMEM_SIGBUS_FILE") else {
        return;
    };
    let cache = FileCache::open(std::path::Path::new(&path), true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    if std::env::var_os("HETMEM_SIGBUS_STAGING").is_some() {
        // The staging memory cannot grow: the fill of the faulting page fails.
        let a = space
            .map_file(&h, 0, 3 * PAGE, Prot::ReadWrite, true)
            .unwrap();
        cache.fail_next_staging(1, libc::ENOMEM);
        let _ = space.load_u32(a.add(PAGE)).unwrap();
        std::process::exit(0); // not reached
    }
    if std::env::var_os("HETMEM_SIGBUS_PRIVATE").is_some() {
        // A private mapping longer than the file: its last page is past the end.
        let a = space
            .map_file(&h, 0, 4 * PAGE, Prot::ReadWrite, false)
            .unwrap();
        assert_eq!(space.load_u32(a).unwrap(), 0x0101_0101);
        let _ = space.load_u32(a.add(3 * PAGE)).unwrap();
        std::process::exit(0); // not reached
    }
    let a = space
        .map_file(&h, 0, 4 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    assert_eq!(space.load_u32(a).unwrap(), 0x0101_0101);
    // Shrink to one page (no device mirrors it): page 2 is past the end of the file now.
    h.set_len(PAGE as u64).unwrap();
    let _ = space.load_u32(a.add(2 * PAGE)).unwrap();
    std::process::exit(0); // not reached
}

#[test]
fn past_the_end_of_file_is_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let _w = watchdog("file_map_sigbus", 30);
    for private in [false, true] {
        let f = TempFile::new(
            if private { "sigbus-p" } else { "sigbus" },
            &vec![1u8; 3 * PAGE],
        );
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "sigbus_child", "--ignored", "--nocapture"])
            .env("HETMEM_SIGBUS_FILE", &f.0);
        if private {
            cmd.env("HETMEM_SIGBUS_PRIVATE", "1");
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "child (private: {private}): {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Before the default action, hetmem says why it did not serve the fault.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("hetmem: SIGBUS at 0x") && err.contains("past the end of the file"),
            "no reason printed (private: {private}): {err}"
        );
        let want = if private { 3 * PAGE } else { PAGE };
        assert_eq!(std::fs::metadata(&f.0).unwrap().len(), want as u64);
    }
}

/// Memory for the cache's staging copy runs out (fault injection at the memfd's growth): a
/// `read_at` or `write_at` returns the error and changes nothing, a retry succeeds, `fsync`
/// reports nothing (it is no writeback error); a CPU access whose fill fails gets SIGBUS.
#[test]
fn staging_memory_exhaustion_is_an_error_or_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let _w = watchdog("file_map_staging", 30);
    let f = TempFile::new("staging", &vec![7u8; 3 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let mut buf = vec![0u8; PAGE];
    cache.fail_next_staging(1, libc::ENOMEM);
    let e = h.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::ENOMEM, "{e}");
    assert_eq!(h.read_at(0, &mut buf).unwrap(), PAGE);
    assert!(buf.iter().all(|&b| b == 7));
    // A write that grows the file: refused, the size unchanged.
    cache.fail_next_staging(1, libc::ENOSPC);
    let e = h.write_at(3 * PAGE as u64 - 1, &[9u8; 10]).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_eq!(h.len(), 3 * PAGE as u64);
    assert_eq!(cache.staging_faults_pending(), 0);
    h.fsync().unwrap();
    assert_eq!(f.disk(), vec![7u8; 3 * PAGE]);
    h.write_at(3 * PAGE as u64 - 1, &[9u8; 10]).unwrap();
    h.fsync().unwrap();
    let mut want = vec![7u8; 3 * PAGE];
    want.pop();
    want.extend([9u8; 10]);
    assert_eq!(f.disk(), want);

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigbus_child", "--ignored", "--nocapture"])
        .env("HETMEM_SIGBUS_FILE", &f.0)
        .env("HETMEM_SIGBUS_STAGING", "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "child: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hetmem: SIGBUS at 0x") && err.contains("could not be filled from the file"),
        "no reason printed: {err}"
    );
    assert_eq!(f.disk(), want, "the child's failed fill changed the file");
}

#[test]
fn msync_writes_back_the_range() {
    let _w = watchdog("file_map_msync", 30);
    let f = TempFile::new("map-msync", &vec![0u8; 4 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let a = space
        .map_file(&h, 0, 4 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    space.store_u32(a, 11).unwrap();
    space.store_u32(a.add(3 * PAGE), 33).unwrap();
    space.msync(a, PAGE).unwrap();
    let disk = f.disk();
    assert_eq!(&disk[..4], &11u32.to_ne_bytes());
    assert_eq!(
        &disk[3 * PAGE..3 * PAGE + 4],
        &[0u8; 4],
        "outside the range: not yet"
    );
    space.msync(a, 4 * PAGE).unwrap();
    assert_eq!(&f.disk()[3 * PAGE..3 * PAGE + 4], &33u32.to_ne_bytes());
}

/// CPU writers through two mappings, `write_at`, and background writeback, all at once; after
/// fsync the file equals the model.
#[test]
fn writers_through_mappings_and_write_at_with_background_writeback() {
    let _w = watchdog("file_map_concurrent", 60);
    const PAGES: usize = 24;
    const ROUNDS: u32 = 200;
    let f = TempFile::new("map-concurrent", &vec![0u8; PAGES * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let a = space
        .map_file(&h, 0, PAGES * PAGE, Prot::ReadWrite, true)
        .unwrap();
    let b = space
        .map_file(&h, 0, PAGES * PAGE, Prot::ReadWrite, true)
        .unwrap();
    let bg = cache.start_background_writeback(std::time::Duration::from_millis(1));
    // Writer k owns word k of every page; writers 0 and 1 store through mappings a and b, writer
    // 2 through write_at.
    std::thread::scope(|s| {
        let (pa, pb) = (
            space.probe(a, PAGES * PAGE).unwrap(),
            space.probe(b, PAGES * PAGE).unwrap(),
        );
        for (k, base) in [(0usize, Some((a, pa))), (1, Some((b, pb))), (2, None)] {
            let h = &h;
            s.spawn(move || {
                for r in 1..=ROUNDS {
                    at(format!("writer {k}: round {r}"));
                    for p in 0..PAGES {
                        let off = p * PAGE + k * 4;
                        let v = r * 1000 + p as u32;
                        match base {
                            Some((m, ref probe)) => probe.store_u32(m.add(off), v).unwrap(),
                            None => h.write_at(off as u64, &v.to_ne_bytes()).unwrap(),
                        }
                    }
                }
            });
        }
    });
    drop(bg);
    h.fsync().unwrap();
    let disk = f.disk();
    for p in 0..PAGES {
        for k in 0..3 {
            let off = p * PAGE + k * 4;
            let v = u32::from_ne_bytes(disk[off..off + 4].try_into().unwrap());
            assert_eq!(v, ROUNDS * 1000 + p as u32, "page {p} writer {k}");
        }
    }
    assert!(cache.stats().pages_written_back > 0);
}

/// A read-only shared mapping (mapped without write tracking, so that the kernel's own
/// fault-around works) made writable: its stores are tracked from then on.
#[test]
fn a_read_only_mapping_made_writable_tracks_stores() {
    let _w = watchdog("file_map_protect_rw", 30);
    let f = TempFile::new("map-protect", &vec![2u8; 2 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let a = space.map_file(&h, 0, 2 * PAGE, Prot::Read, true).unwrap();
    assert_eq!(space.load_u32(a).unwrap(), 0x0202_0202);
    space.protect(a, 2 * PAGE, Prot::ReadWrite).unwrap();
    space.store_u32(a.add(PAGE), 5).unwrap();
    h.fsync().unwrap();
    assert_eq!(&f.disk()[PAGE..PAGE + 4], &5u32.to_ne_bytes());
}

/// The budget applies to mapped pages too: clean pages of read-only mappings are evicted (their
/// device mappings invalidated first), and a later access refills them from the file; pages of
/// writable shared mappings are not victims.
#[test]
fn mapped_pages_are_evicted_under_the_budget() {
    let _w = watchdog("file_map_evict", 60);
    let n = 64;
    let content = pattern(n * PAGE, |i| i ^ 0x77);
    let f = TempFile::new("map-evict", &content);
    let budget = 8 * PAGE;
    let cache = FileCache::open(
        &f.0,
        true,
        CacheConfig {
            budget,
            dirty_bound: 4 * PAGE,
        },
    )
    .unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_file(&h, 0, n * PAGE, Prot::Read, true).unwrap();
    for round in 0..3 {
        let mut got = vec![0u8; n * PAGE];
        space.cpu_read(a, &mut got).unwrap();
        assert_eq!(got, content, "round {round}: CPU read");
        m.read(a, n * PAGE, &mut got).unwrap();
        assert_eq!(got, content, "round {round}: device read");
        cache.shrink_to_budget();
        assert!(
            cache.cached_bytes() <= budget,
            "round {round}: {} bytes cached",
            cache.cached_bytes()
        );
        // The device reads again after its mappings of the evicted pages were invalidated.
        m.read(a, n * PAGE, &mut got).unwrap();
        assert_eq!(got, content, "round {round}: device read after eviction");
    }
    assert!(cache.stats().pages_evicted > 0);
    // A writable shared mapping's pages stay (a store could race the eviction).
    let w = space
        .map_file(&h, 0, 16 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    let mut got = vec![0u8; 16 * PAGE];
    space.cpu_read(w, &mut got).unwrap();
    space.store_u32(w, 1).unwrap();
    cache.shrink_to_budget();
    h.fsync().unwrap();
    assert_eq!(&f.disk()[..4], &1u32.to_ne_bytes());
}

/// A mapping that intercepts stores keeps the cache's dirty bound for CPU stores: each first
/// store to a clean page faults, writing back first when the bound is reached; after
/// writeback the pages are protected again, so a later store is seen again.
#[test]
fn intercepted_stores_respect_the_dirty_bound() {
    let _w = watchdog("file_map_intercept", 30);
    let n = 12;
    let f = TempFile::new("map-intercept", &vec![0u8; n * PAGE]);
    let bound = 4 * PAGE;
    let cache = FileCache::open(
        &f.0,
        true,
        CacheConfig {
            budget: 64 * PAGE,
            dirty_bound: bound,
        },
    )
    .unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let opts = intercepting(Prot::ReadWrite);
    let a = space.map_file_with(&h, 0, n * PAGE, opts).unwrap();
    for p in 0..n {
        space.store_u32(a.add(p * PAGE), p as u32 + 1).unwrap();
        assert!(
            cache.dirty_bytes() <= bound,
            "page {p}: {} dirty bytes",
            cache.dirty_bytes()
        );
    }
    assert!(
        cache.stats().pages_written_back >= (n - 4) as u64,
        "the bound forced writeback"
    );
    h.fsync().unwrap();
    let disk = f.disk();
    for p in 0..n {
        assert_eq!(&disk[p * PAGE..p * PAGE + 4], &(p as u32 + 1).to_ne_bytes());
    }
    assert_eq!(cache.dirty_bytes(), 0);
    // Protected again after writeback: the next store is seen.
    space.store_u32(a.add(5 * PAGE + 8), 99).unwrap();
    assert_eq!(cache.dirty_bytes(), PAGE);
    h.fsync().unwrap();
    assert_eq!(&f.disk()[5 * PAGE + 8..5 * PAGE + 12], &99u32.to_ne_bytes());
}

/// Runs in a child process: with writeback failing, a store beyond the dirty bound gets
/// SIGBUS (the writer gets the error rather than waiting forever).
#[test]
#[ignore = "run as a child process by intercepted_store_past_a_failing_bound_is_sigbus"]
fn bound_child() {
    let Some(path) = std::env::var_os("HETMEM_BOUND_FILE") else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let backend = std::sync::Arc::new(FaultyBackend::new(StdFile(file)));
    let cfg = CacheConfig {
        budget: 64 * PAGE,
        dirty_bound: 2 * PAGE,
    };
    let cache = FileCache::with_backend(Box::new(backend.clone()), true, cfg).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let opts = intercepting(Prot::ReadWrite);
    let a = space.map_file_with(&h, 0, 4 * PAGE, opts).unwrap();
    backend.plan(FaultPlan {
        fail_writes: 1000,
        ..FaultPlan::default()
    });
    space.store_u32(a, 1).unwrap();
    space.store_u32(a.add(PAGE), 2).unwrap();
    println!("WITHIN BOUND");
    space.store_u32(a.add(2 * PAGE), 3).unwrap();
    std::process::exit(0); // not reached
}

#[test]
fn intercepted_store_past_a_failing_bound_is_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let _w = watchdog("file_map_bound_sigbus", 30);
    let f = TempFile::new("map-bound", &vec![0u8; 4 * PAGE]);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "bound_child", "--ignored", "--nocapture"])
        .env("HETMEM_BOUND_FILE", &f.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("WITHIN BOUND"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}", out.status);
    assert_eq!(f.disk(), vec![0u8; 4 * PAGE], "nothing could be written");
}
