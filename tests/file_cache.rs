//! The page cache for files: reads and writes through the cache, writeback and fsync, errors
//! reported once per handle (errseq), truncate and extend, hole punch, direct I/O coherence,
//! the budget.

mod common;
use common::*;
use hetmem::pagecache::*;
use std::sync::Arc;

fn small() -> CacheConfig {
    CacheConfig {
        budget: 8 * PAGE,
        dirty_bound: 4 * PAGE,
    }
}

#[test]
fn reads_and_writes_through_the_cache_reach_the_disk_on_fsync() {
    let _w = watchdog("cache_rw_fsync", 30);
    let content = pattern(10 * PAGE + 123, |i| i);
    let f = TempFile::new("rw", &content);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    assert_eq!(h.len(), content.len() as u64);
    let mut buf = vec![0u8; content.len() + 100];
    assert_eq!(
        h.read_at(0, &mut buf).unwrap(),
        content.len(),
        "short at the end of file"
    );
    assert_eq!(&buf[..content.len()], &content[..]);
    h.write_at(PAGE as u64 - 2, b"abcd").unwrap();
    h.write_at(content.len() as u64 + 10, b"tail").unwrap();
    assert_eq!(
        f.disk(),
        content,
        "nothing reaches the disk before writeback"
    );
    h.fsync().unwrap();
    let mut want = content.clone();
    want[PAGE - 2..PAGE + 2].copy_from_slice(b"abcd");
    want.resize(content.len() + 10, 0);
    want.extend_from_slice(b"tail");
    assert_eq!(f.disk(), want);
    let mut got = vec![0u8; want.len()];
    assert_eq!(h.read_at(0, &mut got).unwrap(), want.len());
    assert_eq!(got, want);
}

#[test]
fn writeback_errors_are_reported_once_per_handle_and_pages_stay_dirty() {
    let _w = watchdog("cache_errseq", 30);
    let f = TempFile::new("errseq", &vec![7u8; 4 * PAGE]);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.0)
        .unwrap();
    let backend = Arc::new(FaultyBackend::new(StdFile(file)));
    let cache =
        FileCache::with_backend(Box::new(backend.clone()), true, CacheConfig::default()).unwrap();
    let (a, b) = (cache.handle(), cache.handle());
    a.write_at(0, &[1u8; 100]).unwrap();
    backend.plan(FaultPlan {
        fail_writes: 1,
        error: libc::ENOSPC,
        ..FaultPlan::default()
    });
    assert_eq!(a.fsync().unwrap_err().errno(), libc::ENOSPC);
    assert_eq!(cache.dirty_bytes(), PAGE, "the page stays dirty");
    assert_eq!(f.disk()[0], 7, "nothing was written");
    // Handle b sees the same error once; a has seen it and succeeds on the retry.
    assert_eq!(b.fsync().unwrap_err().errno(), libc::ENOSPC);
    a.fsync().unwrap();
    b.fsync().unwrap();
    assert_eq!(&f.disk()[..100], &[1u8; 100][..]);
    assert_eq!(cache.dirty_bytes(), 0);
    // A short write is an error too, and the retry writes the whole page.
    a.write_at(PAGE as u64, &[2u8; PAGE]).unwrap();
    backend.plan(FaultPlan {
        short_writes: 1,
        ..FaultPlan::default()
    });
    assert_eq!(a.fsync().unwrap_err().errno(), libc::EIO);
    a.fsync().unwrap();
    assert_eq!(&f.disk()[PAGE..2 * PAGE], &[2u8; PAGE][..]);
}

#[test]
fn a_page_that_keeps_failing_makes_writers_fail_at_the_dirty_bound() {
    let _w = watchdog("cache_dirty_bound", 30);
    let f = TempFile::new("bound", &[]);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.0)
        .unwrap();
    let backend = Arc::new(FaultyBackend::new(StdFile(file)));
    let cache = FileCache::with_backend(Box::new(backend.clone()), true, small()).unwrap();
    let h = cache.handle();
    backend.plan(FaultPlan {
        fail_writes: 1000,
        ..FaultPlan::default()
    });
    for p in 0..4u64 {
        h.write_at(p * PAGE as u64, &[p as u8 + 1; PAGE]).unwrap();
    }
    // The bound (4 pages) is reached and writeback fails: the writer gets the error, nothing
    // of this write is taken.
    let e = h.write_at(4 * PAGE as u64, &[9u8; PAGE]).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert_eq!(h.len(), 4 * PAGE as u64);
    backend.plan(FaultPlan::default());
    h.write_at(4 * PAGE as u64, &[9u8; PAGE]).unwrap();
    assert!(h.fsync().is_err(), "the earlier failures are reported once");
    h.fsync().unwrap();
    let disk = f.disk();
    assert_eq!(disk.len(), 5 * PAGE);
    for p in 0..4 {
        assert!(
            disk[p * PAGE..(p + 1) * PAGE]
                .iter()
                .all(|&b| b == p as u8 + 1)
        );
    }
    assert!(disk[4 * PAGE..].iter().all(|&b| b == 9));
}

#[test]
fn truncate_drops_dirty_pages_and_extend_reads_zeros() {
    let _w = watchdog("cache_truncate", 30);
    let f = TempFile::new("trunc", &pattern(4 * PAGE, |i| i + 1));
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    h.write_at(3 * PAGE as u64, &[0xEE; PAGE]).unwrap(); // dirty, then cut away
    h.write_at(PAGE as u64, &[0xAA; 10]).unwrap();
    h.set_len(PAGE as u64 + 5).unwrap();
    assert_eq!(
        std::fs::metadata(&f.0).unwrap().len(),
        PAGE as u64 + 5,
        "on disk at once"
    );
    let mut b = vec![0u8; 4 * PAGE];
    assert_eq!(h.read_at(0, &mut b).unwrap(), PAGE + 5);
    h.set_len(3 * PAGE as u64).unwrap();
    assert_eq!(h.read_at(0, &mut b).unwrap(), 3 * PAGE);
    assert_eq!(&b[..PAGE], &pattern(PAGE, |i| i + 1)[..]);
    assert_eq!(&b[PAGE..PAGE + 5], &[0xAA; 5][..]);
    assert!(
        b[PAGE + 5..3 * PAGE].iter().all(|&x| x == 0),
        "the cut tail and the extension read as zeros"
    );
    h.fsync().unwrap();
    assert_eq!(
        f.disk(),
        b[..3 * PAGE].to_vec(),
        "the dropped dirty page never reached the disk"
    );
}

#[test]
fn hole_punch_and_direct_io_stay_coherent_with_the_cache() {
    let _w = watchdog("cache_punch_direct", 30);
    let f = TempFile::new("direct", &vec![5u8; 4 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    h.write_at(0, &[1u8; 2 * PAGE]).unwrap();
    // A direct read sees the cached (dirty) data: it is written back first.
    let mut b = vec![0u8; 4 * PAGE];
    assert_eq!(h.direct_read(0, &mut b).unwrap(), 4 * PAGE);
    assert!(b[..2 * PAGE].iter().all(|&x| x == 1));
    // A direct write is seen by later cached reads (its cached pages were dropped).
    let mut c = vec![0u8; PAGE];
    h.read_at(PAGE as u64, &mut c).unwrap();
    h.direct_write(PAGE as u64, &[3u8; PAGE]).unwrap();
    h.read_at(PAGE as u64, &mut c).unwrap();
    assert!(c.iter().all(|&x| x == 3));
    // A punched range reads as zeros, in the cache and on disk.
    h.write_at(2 * PAGE as u64, &[4u8; PAGE]).unwrap();
    h.punch_hole(2 * PAGE as u64, PAGE as u64).unwrap();
    h.read_at(2 * PAGE as u64, &mut c).unwrap();
    assert!(c.iter().all(|&x| x == 0));
    h.fsync().unwrap();
    let disk = f.disk();
    assert!(disk[2 * PAGE..3 * PAGE].iter().all(|&x| x == 0));
    assert!(disk[3 * PAGE..].iter().all(|&x| x == 5));
    assert!(matches!(
        h.punch_hole(1, PAGE as u64),
        Err(hetmem::Error::Invalid(_))
    ));
}

#[test]
fn the_budget_evicts_clean_pages_and_reads_stay_correct() {
    let _w = watchdog("cache_budget", 30);
    let content = pattern(64 * PAGE, |i| i * 3);
    let f = TempFile::new("budget", &content);
    let cache = FileCache::open(&f.0, false, small()).unwrap();
    let h = cache.handle();
    for round in 0..3 {
        for p in (0..64).rev() {
            let mut b = vec![0u8; PAGE];
            h.read_at((p * PAGE) as u64, &mut b).unwrap();
            assert_eq!(
                b,
                content[p * PAGE..(p + 1) * PAGE],
                "round {round} page {p}"
            );
            assert!(cache.cached_bytes() <= 8 * PAGE, "over budget");
        }
    }
    assert!(cache.stats().pages_evicted >= 3 * 64 - 8);
}

#[test]
fn read_only_files_refuse_writes_and_missing_files_are_clear_errors() {
    let _w = watchdog("cache_permissions", 30);
    let f = TempFile::new("ro", &[1u8; 10]);
    let cache = FileCache::open(&f.0, false, CacheConfig::default()).unwrap();
    let h = cache.handle();
    assert_eq!(h.write_at(0, b"x").unwrap_err().errno(), libc::EBADF);
    assert_eq!(h.set_len(0).unwrap_err().errno(), libc::EBADF);
    assert_eq!(f.disk(), vec![1u8; 10]);
    let e = FileCache::open(
        &f.0.with_extension("missing"),
        false,
        CacheConfig::default(),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    // The message names the path (and the errno's text).
    assert!(
        e.to_string().starts_with("open ") && e.to_string().contains("missing"),
        "{e}"
    );
}

/// A file read through the cache is held in memory once: each fill drops the kernel's
/// page-cache copy of what it read (`POSIX_FADV_DONTNEED`), large readahead folios included.
/// Checked with `mincore` on a mapping of the file. On a tmpfs the page cache is the file itself
/// and nothing can be dropped: there the test says so and checks only the data.
#[test]
fn a_file_read_through_the_cache_is_not_also_kept_in_the_kernels_page_cache() {
    let _w = watchdog("held once", 60);
    let len = 8 << 20;
    let content = pattern(len, |i| i * 7);
    let f = TempFile::new("held-once", &content);
    let file = std::fs::File::open(&f.0).unwrap();
    file.sync_all().unwrap();
    let tmpfs = rustix::fs::fstatfs(&file).unwrap().f_type == 0x0102_1994;
    // Cold: the kernel's copy goes first (clean after the sync).
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let cache = FileCache::open(&f.0, false, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let mut buf = vec![0u8; len];
    let mut off = 0;
    while off < len {
        let n = h
            .read_at(off as u64, &mut buf[off..(off + (1 << 20)).min(len)])
            .unwrap();
        assert!(n > 0);
        off += n;
    }
    assert!(buf == content, "the data read through the cache");
    assert_eq!(cache.cached_bytes(), len);
    let m = hetmem::sys::map_file_readonly(&file, len).unwrap();
    let resident = m.resident_pages().unwrap() * PAGE;
    if tmpfs {
        eprintln!(
            "the temp directory is a tmpfs: the kernel's copy is the file ({resident} bytes)"
        );
        return;
    }
    assert!(
        resident <= len / 16,
        "{resident} of {len} bytes also in the kernel's page cache"
    );
}
