//! The file cache's read-ahead thread (src/pagecache/ahead.rs): sequential faults at the largest
//! window hand the next windows to it; what it reads is staged only if no page of the window
//! changed while it read (a write, a hole punch, a truncate), so that a racing change is never
//! undone by stale bytes.

mod common;
use common::*;
use hetmem::pagecache::*;
use hetmem::*;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Byte `i` of page `p` of the test files: the page's number in its first 8 bytes, then a
/// pattern that differs from page to page.
fn byte_of(p: usize, i: usize) -> u8 {
    if i < 8 {
        (p as u64).to_le_bytes()[i]
    } else {
        (p.wrapping_mul(7).wrapping_add(i) % 251) as u8 + 1
    }
}

fn content(pages: usize) -> Vec<u8> {
    (0..pages * PAGE)
        .map(|k| byte_of(k / PAGE, k % PAGE))
        .collect()
}

/// Reads `a..a + len` through the mapping with real loads, 64 KiB at a time, in order, up to
/// `limit` bytes as it is when each read begins (a truncate lowers it: an access past the end of
/// the file is SIGBUS). Returns the bytes read.
fn read_in_order(space: &Space, a: VirtAddr, len: usize, limit: &AtomicUsize) -> Vec<u8> {
    const CHUNK: usize = 64 << 10;
    let mut out = vec![0u8; len];
    let mut off = 0;
    while off < len {
        let end = (off + CHUNK).min(len).min(limit.load(Ordering::SeqCst));
        if end <= off {
            break;
        }
        space.cpu_read(a.add(off), &mut out[off..end]).unwrap();
        off = end;
    }
    out.truncate(off);
    out
}

#[test]
fn a_sequential_read_is_read_ahead_and_every_byte_is_the_files() {
    let _w = watchdog("read_ahead_sequential", 60);
    let pages = 6144; // 24 MiB
    let want = content(pages);
    let f = TempFile::new("ra-seq", &want);
    let cache = FileCache::open(&f.0, false, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file(&h, 0, pages * PAGE, Prot::Read, true)
        .unwrap();
    at("sequential read through the mapping");
    let got = read_in_order(&space, a, pages * PAGE, &AtomicUsize::new(usize::MAX));
    assert_eq!(got.len(), want.len());
    if let Some(k) = (0..want.len()).find(|&k| got[k] != want[k]) {
        panic!(
            "byte {k} (page {}) read {:#x}, the file has {:#x}",
            k / PAGE,
            got[k],
            want[k]
        );
    }
    cache.wait_read_ahead();
    let s = cache.stats();
    assert!(
        s.pages_read_ahead >= 2048,
        "the read-ahead filled {} pages of {pages}",
        s.pages_read_ahead
    );
    assert_eq!(s.read_ahead_dropped, 0);
    assert!(s.pages_filled <= pages as u64, "pages filled twice: {s:?}");
}

/// Where the gated read reports its range (offset, length), and what lets it go on.
type Gate = (mpsc::Sender<(u64, usize)>, mpsc::Receiver<()>);

/// The real file; with a gate, the read-ahead thread's first read stops inside `read_at` and
/// reports its range, until the test lets it go on. It records the advice it is told.
#[derive(Debug)]
struct GatedFile {
    inner: StdFile,
    gate: Mutex<Option<Gate>>,
    /// With it, every read of the read-ahead thread says where it reads and waits for a permit.
    pace: Option<Mutex<Pace>>,
    told: Arc<Mutex<Vec<Access>>>,
}

/// Where a paced read reports its offset, and where it takes its permit.
type Pace = (mpsc::Sender<u64>, mpsc::Receiver<()>);

impl FileBackend for GatedFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        if std::thread::current().name() == Some("hetmem-readahead") {
            if let Some(pace) = &self.pace {
                let pace = pace.lock().unwrap();
                let _ = pace.0.send(off);
                let _ = pace.1.recv();
            }
            let gate = self.gate.lock().unwrap().take();
            if let Some((started, go)) = gate {
                // Read first (the old bytes), then wait: the change lands after the read.
                let n = self.inner.read_at(off, buf)?;
                started.send((off, buf.len())).unwrap();
                go.recv().unwrap();
                return Ok(n);
            }
        }
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
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
        self.inner.punch(off, len)
    }
    fn advise(&self, access: Access) {
        self.told.lock().unwrap().push(access);
        self.inner.advise(access);
    }
}

#[derive(Clone, Copy, Debug)]
enum Change {
    Write,
    Punch,
    Truncate,
}

/// A reader thread reads a 16 MiB file in order through a shared mapping until its run hands
/// windows to the read-ahead; the read-ahead's first read stops after reading; the test changes
/// pages of that window (`change`), then lets it go on. The reader, which cannot pass the window
/// before it ends, must see the change, and so must `read_at` and the file.
fn change_during_read_ahead(change: Change) {
    let pages = 4096;
    let want = content(pages);
    let f = TempFile::new(&format!("ra-{change:?}"), &want);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.0)
        .unwrap();
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let backend = GatedFile {
        inner: StdFile(file),
        gate: Mutex::new(Some((started_tx, go_rx))),
        pace: None,
        told: Arc::default(),
    };
    let cache = FileCache::with_backend(Box::new(backend), true, CacheConfig::default()).unwrap();
    let h = Arc::new(cache.handle());
    let space = small_space();
    let a = space
        .map_file(&h, 0, pages * PAGE, Prot::Read, true)
        .unwrap();
    let limit = Arc::new(AtomicUsize::new(usize::MAX));
    let reader = {
        let (space, limit) = (space.clone(), limit.clone());
        std::thread::spawn(move || read_in_order(&space, a, pages * PAGE, &limit))
    };
    at("waiting for the read-ahead's first read");
    let (off, len) = started
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the read-ahead never read");
    let (first, n) = (off as usize / PAGE, len / PAGE);
    assert!(n >= 128 && first + n <= pages, "window {first}+{n}");
    // Changed pages: 4..12 of the window; the truncate cuts at its page 64, past the 64 KiB read
    // the reader may have begun before the window (16 pages).
    let (c0, c1) = match change {
        Change::Truncate => (first + 64, first + n),
        _ => (first + 4, first + 12),
    };
    let mut expect = want.clone();
    match change {
        Change::Write => {
            let new = vec![0xEEu8; (c1 - c0) * PAGE];
            h.write_at((c0 * PAGE) as u64, &new).unwrap();
            expect[c0 * PAGE..c1 * PAGE].fill(0xEE);
        }
        Change::Punch => {
            h.punch_hole((c0 * PAGE) as u64, ((c1 - c0) * PAGE) as u64)
                .unwrap();
            expect[c0 * PAGE..c1 * PAGE].fill(0);
        }
        Change::Truncate => {
            limit.store(c0 * PAGE, Ordering::SeqCst);
            h.set_len((c0 * PAGE) as u64).unwrap();
            expect.truncate(c0 * PAGE);
        }
    }
    go.send(()).unwrap();
    at("the reader reads on");
    let got = reader.join().unwrap();
    cache.wait_read_ahead();
    let check = |what: &str, got: &[u8], expect: &[u8]| {
        assert_eq!(got.len(), expect.len(), "{what}: length");
        if let Some(k) = (0..expect.len()).find(|&k| got[k] != expect[k]) {
            panic!(
                "{what}: byte {k} (page {}, window {first}..{}) is {:#x}, expected {:#x} \
                 ({change:?} of pages {c0}..{c1})",
                k / PAGE,
                first + n,
                got[k],
                expect[k]
            );
        }
    };
    check("through the mapping", &got, &expect);
    let mut back = vec![0u8; expect.len()];
    assert_eq!(h.read_at(0, &mut back).unwrap(), expect.len());
    check("read_at", &back, &expect);
    h.fsync().unwrap();
    check("the file after fsync", &f.disk(), &expect);
    if let Change::Truncate = change {
        // Nothing of the old file is left past the cut: extended again, it reads zeros.
        h.set_len((pages * PAGE) as u64).unwrap();
        expect.resize(pages * PAGE, 0);
        let mut back = vec![0u8; expect.len()];
        assert_eq!(h.read_at(0, &mut back).unwrap(), expect.len());
        check("read_at after extending again", &back, &expect);
        h.fsync().unwrap();
        check("the file after extending again", &f.disk(), &expect);
    }
    // The race was the one meant: the read in flight saw the change and was dropped.
    let s = cache.stats();
    assert!(
        s.read_ahead_dropped >= 1,
        "the read in flight was staged: {s:?}"
    );
}

#[test]
fn a_write_during_a_read_ahead_is_not_undone() {
    let _w = watchdog("read_ahead_write", 60);
    change_during_read_ahead(Change::Write);
}

#[test]
fn a_hole_punched_during_a_read_ahead_reads_zeros() {
    let _w = watchdog("read_ahead_punch", 60);
    change_during_read_ahead(Change::Punch);
}

#[test]
fn a_truncate_during_a_read_ahead_leaves_nothing_past_the_end() {
    let _w = watchdog("read_ahead_truncate", 60);
    change_during_read_ahead(Change::Truncate);
}

/// The access advice decides what a fault fills: `Random` its own page only (no read-ahead),
/// `Normal` a window that doubles while faults come in sequence, `Sequential` 2 MiB at once
/// and the read-ahead behind it; every access reads the file's bytes.
#[test]
fn the_access_advice_decides_what_a_fault_fills() {
    let _w = watchdog("read_ahead_advice", 60);
    let pages = 2048;
    let want = content(pages);
    let f = TempFile::new("ra-advice", &want);
    let space = small_space();
    for (access, filled_after_two) in [
        (Access::Random, 2),
        (Access::Normal, 3),
        (Access::Sequential, 512 + 512),
    ] {
        let cache = FileCache::open(&f.0, false, CacheConfig::default()).unwrap();
        cache.set_access(access);
        assert_eq!(cache.access(), access);
        let h = cache.handle();
        let a = space
            .map_file(&h, 0, pages * PAGE, Prot::Read, true)
            .unwrap();
        at(format!("{access:?}: two faults in sequence"));
        let mut b = vec![0u8; PAGE];
        for p in [100, 101] {
            // Sequential: the second page was filled by the first fault; read one past it.
            let q = if access == Access::Sequential && p == 101 {
                612
            } else {
                p
            };
            space.cpu_read(a.add(q * PAGE), &mut b).unwrap();
            assert_eq!(
                &b[..],
                &want[q * PAGE..(q + 1) * PAGE],
                "{access:?}: page {q}"
            );
        }
        cache.wait_read_ahead();
        let s = cache.stats();
        if access == Access::Sequential {
            assert!(
                s.pages_filled >= filled_after_two && s.pages_read_ahead > 0,
                "{access:?}: {s:?}"
            );
        } else {
            assert_eq!(s.pages_filled, filled_after_two, "{access:?}: {s:?}");
            assert_eq!(s.pages_read_ahead, 0, "{access:?}");
        }
        space.unmap(a, pages * PAGE).unwrap();
    }
}

/// The advice reaches the backend (a file's: `posix_fadvise`, without which 4 KiB reads of a
/// random pattern read 12 KiB more per 4 MiB from storage, by the kernel's own read-ahead).
#[test]
fn the_access_advice_reaches_the_backend() {
    let f = TempFile::new("ra-told", &content(4));
    let told = Arc::new(Mutex::new(Vec::new()));
    let backend = GatedFile {
        inner: StdFile(std::fs::File::open(&f.0).unwrap()),
        gate: Mutex::new(None),
        pace: None,
        told: told.clone(),
    };
    let cache = FileCache::with_backend(Box::new(backend), false, CacheConfig::default()).unwrap();
    cache.set_access(Access::Random);
    cache.set_access(Access::Sequential);
    assert_eq!(*told.lock().unwrap(), [Access::Random, Access::Sequential]);
    let mut b = vec![0u8; 4 * PAGE];
    assert_eq!(cache.handle().read_at(0, &mut b).unwrap(), 4 * PAGE);
    assert_eq!(b, content(4));
}

/// A device reads a page that the read-ahead was assigned two windows past the one it is
/// reading: its fault waits until that page's own window is staged, and reads the file's bytes
/// (found by review: it waited for the next window only, was told the page was there, found it
/// missing twice and failed with EFAULT).
#[test]
fn a_device_read_ahead_of_the_read_ahead_waits_for_its_own_window() {
    let _w = watchdog("read_ahead_device", 60);
    let pages = 4096;
    let want = content(pages);
    let f = TempFile::new("ra-device", &want);
    let (asked_tx, asked) = mpsc::channel();
    let (permit, permits) = mpsc::channel::<()>();
    let backend = GatedFile {
        inner: StdFile(std::fs::File::open(&f.0).unwrap()),
        gate: Mutex::new(None),
        pace: Some(Mutex::new((asked_tx, permits))),
        told: Arc::default(),
    };
    let cache = FileCache::with_backend(Box::new(backend), false, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space
        .map_file(&h, 0, pages * PAGE, Prot::Read, true)
        .unwrap();
    // In order through the first 3 MiB: the fault at page 511 fills 2 MiB (to page 1023) and
    // hands the next 8 MiB to the read-ahead.
    let got = read_in_order(&space, a, 3 << 20, &AtomicUsize::new(usize::MAX));
    assert_eq!(&got[..], &want[..3 << 20]);
    let first = asked
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the read-ahead never read") as usize
        / PAGE;
    let p = first + 2 * 512 + 10;
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut one = vec![0u8; PAGE];
            m.read(a.add(p * PAGE), PAGE, &mut one).map(|_| one)
        });
        at("waiting for the device's fault to wait");
        while cache.stats().read_ahead_waits == 0 {
            std::thread::yield_now();
        }
        for _ in 0..8 {
            permit.send(()).unwrap();
        }
        let one = reader.join().unwrap().expect("the device read");
        assert_eq!(&one[..], &want[p * PAGE..(p + 1) * PAGE], "page {p}");
    });
}
