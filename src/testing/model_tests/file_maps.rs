//! Schedule exploration of file mappings: the page cache ([`FileCache`]) with shared file
//! mappings of it in a model space ([`Space::new_model`]), whose kernel side
//! ([`crate::mm::ModelMm`]) maps the cache's memfd, faults on its holes, tracks stores with
//! asynchronous or synchronous write-protect and reports them to the cache's scans as the
//! kernel's `PAGEMAP_SCAN` does. The cache's background thread (evictor and writeback at the
//! dirty bound) is a `shuttle` thread here, one more thread of every schedule.
//!
//! * [`file_fill_vs_truncate_punch_direct_write`]: CPU fills through a shared and a private
//!   mapping race a truncate into the middle of a page, a hole punch and a direct write: every
//!   load is a state the file went through, in an order the operations allow, past the end of
//!   file is SIGBUS and stays so, a private page keeps what it first showed; after fsync the
//!   file, `read_at` and the mapping agree with the order the operations took.
//! * [`device_and_cpu_stores_vs_punch_writeback_fsync`]: CPU stores to a file page race a hole
//!   punch of it (a store can land between the punch's scan and the punch, leaving an emptied
//!   entry that the next scan reports as written), while a device writes the next page through
//!   the CPU view, and background writeback and an fsync run: each fsync puts on the file every
//!   write completed before it began (a punch only ever zeroes a store that began before it
//!   ended); at the end the file holds the last writes, and every page can still be loaded.
//! * [`cpu_stores_vs_eviction`]: CPU stores through a mapping that tracks them asynchronously
//!   and one that intercepts them (at a one-page dirty bound, so that stores wait for the
//!   background thread's writeback) race eviction under a two-page budget (the background
//!   evictor, rung by fills over budget, and explicit `shrink_to_budget`) and a reader: no load
//!   ever sees less than a store completed before it, and at the end the file holds the last
//!   stores.
//! * [`intercepted_stores_vs_punch`]: stores through a mapping that intercepts them race a hole
//!   punch of their page, a reader that refills it and an fsync: each fsync holds every store
//!   completed before it began (unless the punch may have come after it), and so does the file
//!   at the end (the punch emptied the page's entries, so its protection must be put back for
//!   the next store after a refill to be intercepted and written back).

use super::*;
use crate::pagecache::{CacheConfig, FileCache, FileHandle};
use crate::space::FileMapOptions;
use crate::sync::{AtomicU32, Ordering};

/// A cached file of `pages` pages (page `p` holds `val(1, p)`) behind an in-memory backend, and
/// a model space to map it in.
struct World {
    file: Arc<MemFile>,
    cache: Arc<FileCache>,
    h: Arc<FileHandle>,
    space: Space,
}

impl World {
    fn new(pages: usize, budget_pages: usize, dirty_pages: usize) -> World {
        let mut data = Vec::with_capacity(pages * PAGE_SIZE);
        for p in 0..pages {
            data.extend(fill(val(1, p), PAGE_SIZE));
        }
        let file = Arc::new(MemFile {
            data: crate::sync::Mutex::new(data),
        });
        let cfg = CacheConfig {
            budget: budget_pages * PAGE_SIZE,
            dirty_bound: dirty_pages * PAGE_SIZE,
        };
        let cache = FileCache::with_backend(Box::new(file.clone()), true, cfg).expect("cache");
        let h = Arc::new(cache.handle());
        let space = Space::new_model(4 << 20).expect("model space");
        World {
            file,
            cache,
            h,
            space,
        }
    }

    /// Maps `pages` pages of the file from page `first`, read-write.
    fn map(&self, first: usize, pages: usize, shared: bool, intercept_stores: bool) -> VirtAddr {
        self.space
            .map_file_with(
                &self.h,
                (first * PAGE_SIZE) as u64,
                pages * PAGE_SIZE,
                FileMapOptions {
                    prot: Prot::ReadWrite,
                    shared,
                    intercept_stores,
                },
            )
            .expect("map file")
    }

    /// The backend's bytes (the file on "disk").
    fn disk(&self) -> Vec<u8> {
        crate::sync::lock(&self.file.data).clone()
    }

    /// The whole file through the cache.
    fn view(&self) -> Vec<u8> {
        let len = self.h.len() as usize;
        let mut v = vec![0u8; len];
        assert_eq!(self.h.read_at(0, &mut v).expect("read_at"), len);
        v
    }
}

/// A CPU load of the page at `a`: its bytes, or `None` for SIGBUS (any other error fails).
fn load(space: &Space, a: VirtAddr) -> Option<Vec<u8>> {
    let mut b = vec![0u8; PAGE_SIZE];
    match space.cpu_read(a, &mut b) {
        Ok(()) => Some(b),
        Err(Error::Signal { signo, .. }) if signo == libc::SIGBUS => None,
        Err(e) => panic!("load at {a}: {e}"),
    }
}

/// The round of page `p`'s value in `b` (a whole page of one value; zeros are round 0).
fn round(b: &[u8], p: usize, what: &str) -> u32 {
    round_of(uniform(b, what), p, what)
}

// ---------------------------------------------------------------------------------------------
// (a) CPU fills vs truncate, hole punch and direct write
// ---------------------------------------------------------------------------------------------

/// Where in page 1 the truncation falls.
const A_CUT: usize = PAGE_SIZE / 2;

/// What page 1 of the file can show: the original, the original cut by the truncation, the
/// direct write's data, and that cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum P1 {
    Orig,
    OrigCut,
    Direct,
    DirectCut,
}

/// The direct write's value for page 1.
fn a_direct() -> u32 {
    val(2, 1)
}

fn p1_state(b: &[u8], what: &str) -> P1 {
    let head = uniform(&b[..A_CUT], what);
    let tail = uniform(&b[A_CUT..], what);
    match (head, tail) {
        (h, t) if h == val(1, 1) && t == h => P1::Orig,
        (h, 0) if h == val(1, 1) => P1::OrigCut,
        (h, t) if h == a_direct() && t == h => P1::Direct,
        (h, 0) if h == a_direct() => P1::DirectCut,
        _ => panic!("{what}: page 1 holds {head:#x} then {tail:#x}, a state it never had"),
    }
}

/// The states page 1 goes through when the truncation runs before the direct write, and after.
const TRUNCATE_FIRST: [P1; 3] = [P1::Orig, P1::OrigCut, P1::Direct];
const WRITE_FIRST: [P1; 3] = [P1::Orig, P1::Direct, P1::DirectCut];

/// Checks a sequence of page 1's states as it is observed: it must go forward along one of the
/// two orders.
#[derive(Debug)]
struct P1Order {
    /// Position reached along each order (`None`: that order is ruled out).
    pos: [Option<usize>; 2],
}

impl P1Order {
    fn new() -> P1Order {
        P1Order {
            pos: [Some(0), Some(0)],
        }
    }

    fn see(&mut self, s: P1, what: &str) {
        for (k, order) in [TRUNCATE_FIRST, WRITE_FIRST].iter().enumerate() {
            self.pos[k] = match (self.pos[k], order.iter().position(|&o| o == s)) {
                (Some(at), Some(i)) if i >= at => Some(i),
                _ => None,
            };
        }
        assert!(
            self.pos.iter().any(Option::is_some),
            "{what}: page 1 showed {s:?} after states that no order of truncate and direct write \
             allows"
        );
    }
}

/// Checks page 0 as observed: the original until the punch, zeros after, never back.
fn see_p0(b: &[u8], punched: &mut bool, what: &str) {
    match round(b, 0, what) {
        1 => assert!(!*punched, "{what}: page 0 is back after its punch"),
        0 => *punched = true,
        r => panic!("{what}: page 0 holds round {r}, never written"),
    }
}

/// Checks page 2 as observed: the original until the truncation, SIGBUS after, never back.
fn see_p2(b: Option<&[u8]>, gone: &mut bool, what: &str) {
    match b {
        Some(b) => {
            assert!(!*gone, "{what}: page 2 is back after the truncation");
            assert_eq!(round(b, 2, what), 1, "{what}: page 2");
        }
        None => *gone = true,
    }
}

/// The file has three pages, mapped shared and private. A reader loads them through the shared
/// mapping (twice); the main thread loads them through the private mapping, then again; one
/// thread truncates the file into page 1 (page 2 goes, page 1's tail becomes zeros), one punches
/// page 0, one direct-writes page 1 whole (which grows the file back to two pages if it comes
/// second).
fn file_fill_vs_truncate_punch_direct_write_body() {
    let w = World::new(3, 16, 16);
    let shared = w.map(0, 3, true, false);
    let private = w.map(0, 3, false, false);
    let at = move |base: VirtAddr, p: usize| base.add(p * PAGE_SIZE);
    let reader = {
        let space = w.space.clone();
        thread::spawn(move || {
            let (mut punched, mut gone, mut order) = (false, false, P1Order::new());
            for _ in 0..2 {
                let b0 = load(&space, at(shared, 0)).expect("page 0 is never past the end");
                see_p0(&b0, &mut punched, "shared load");
                let b1 = load(&space, at(shared, 1)).expect("page 1 is never past the end");
                order.see(p1_state(&b1, "shared load"), "shared load");
                see_p2(
                    load(&space, at(shared, 2)).as_deref(),
                    &mut gone,
                    "shared load",
                );
            }
        })
    };
    let puncher = {
        let h = w.h.clone();
        thread::spawn(move || h.punch_hole(0, PAGE_SIZE as u64).expect("punch"))
    };
    let truncater = {
        let h = w.h.clone();
        thread::spawn(move || h.set_len((PAGE_SIZE + A_CUT) as u64).expect("truncate"))
    };
    let writer = {
        let h = w.h.clone();
        thread::spawn(move || {
            h.direct_write(PAGE_SIZE as u64, &fill(a_direct(), PAGE_SIZE))
                .expect("direct write")
        })
    };
    // The private mapping: each page is what the file showed at its first access, for good.
    let first: Vec<Option<Vec<u8>>> = (0..3).map(|p| load(&w.space, at(private, p))).collect();
    let (mut punched, mut gone) = (false, false);
    see_p0(
        first[0].as_deref().expect("page 0"),
        &mut punched,
        "private load",
    );
    p1_state(first[1].as_deref().expect("page 1"), "private load");
    see_p2(first[2].as_deref(), &mut gone, "private load");
    join(reader);
    join(puncher);
    join(truncater);
    join(writer);
    for (p, b) in first.iter().enumerate() {
        assert!(
            &load(&w.space, at(private, p)) == b,
            "private page {p} changed after its first access"
        );
    }
    // The order the truncation and the direct write took decides the end state.
    let len = w.h.len() as usize;
    let p1: Vec<u8> = if len == 2 * PAGE_SIZE {
        fill(a_direct(), PAGE_SIZE)
    } else {
        assert_eq!(len, PAGE_SIZE + A_CUT, "file length");
        let mut b = fill(a_direct(), A_CUT);
        b.resize(PAGE_SIZE, 0);
        b
    };
    let mut want = vec![0u8; PAGE_SIZE];
    want.extend_from_slice(&p1[..len - PAGE_SIZE]);
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after fsync");
    assert!(w.view() == want, "read_at after fsync");
    assert!(
        load(&w.space, at(shared, 0)) == Some(vec![0u8; PAGE_SIZE]),
        "shared page 0 is not the punched hole"
    );
    assert!(
        load(&w.space, at(shared, 1)) == Some(p1),
        "shared page 1 differs from the file"
    );
    assert!(
        load(&w.space, at(shared, 2)).is_none(),
        "shared page 2, past the end of the file, is not SIGBUS"
    );
}

#[test]
fn file_fill_vs_truncate_punch_direct_write() {
    explore(300, 300, file_fill_vs_truncate_punch_direct_write_body);
}

// ---------------------------------------------------------------------------------------------
// (b) device and CPU stores vs hole punch, writeback and fsync
// ---------------------------------------------------------------------------------------------

/// Rounds written by each writer (round 1 is the file's original content).
const B_LAST: u32 = 3;

/// Checks what page 0 shows (`what`): a value stored no earlier than round `done` (the last
/// store completed before the observation began), or zeros if the punch may have come after that
/// store (`after[r]`: whether the punch had ended when store `r` began).
fn check_p0(b: &[u8], done: u32, after: &[AtomicU32; 4], what: &str) {
    let r = round(b, 0, what);
    if r == 0 {
        assert!(
            done == 1 || after[done as usize].load(Ordering::SeqCst) == 0,
            "{what}: zeros, but store {done} began after the punch ended and completed before \
             this began"
        );
    } else {
        assert!(
            r >= done && r <= B_LAST,
            "{what}: round {r}, but round {done} was completed before this began"
        );
    }
}

/// A hole punch of page 0 racing a CPU thread's rounds of stores to it: whether the punch has
/// completed, and for each round whether it had completed before the round's store began.
struct PunchRace {
    punched: Arc<AtomicU32>,
    after: Arc<[AtomicU32; 4]>,
}

impl PunchRace {
    fn new() -> Self {
        PunchRace {
            punched: Arc::new(AtomicU32::new(0)),
            after: Arc::new(std::array::from_fn(|_| AtomicU32::new(0))),
        }
    }

    /// A thread storing rounds 2..=B_LAST of page 0 at `at` through `space`, each noted in
    /// `after` before it begins and passed to `stored` once done.
    fn spawn_storer(
        &self,
        space: Space,
        at: VirtAddr,
        stored: impl Fn(u32) + Send + 'static,
    ) -> thread::JoinHandle<()> {
        let (punched, after) = (self.punched.clone(), self.after.clone());
        thread::spawn(move || {
            for r in 2..=B_LAST {
                after[r as usize].store(punched.load(Ordering::SeqCst), Ordering::SeqCst);
                space
                    .cpu_write(at, &fill(val(r, 0), PAGE_SIZE))
                    .expect("cpu store");
                stored(r);
            }
        })
    }

    /// A thread punching page 0 through `h`, then noting it.
    fn spawn_puncher(&self, h: Arc<FileHandle>) -> thread::JoinHandle<()> {
        let punched = self.punched.clone();
        thread::spawn(move || {
            h.punch_hole(0, PAGE_SIZE as u64).expect("punch");
            punched.store(1, Ordering::SeqCst);
        })
    }

    /// Whether the punch had completed before store `r` began.
    fn punched_before(&self, r: u32) -> bool {
        self.after[r as usize].load(Ordering::SeqCst) == 1
    }
}

/// The file has two pages, mapped shared (stores tracked asynchronously) in a space a device
/// mirrors. A CPU thread stores to page 0 (rounds 2..=B_LAST) while another thread punches it
/// (a store can land between the punch's scan of the mappings and the punch itself: the
/// kernel's scan then reports the emptied entry as written); the device writes page 1 through
/// the CPU view; one thread runs background writeback and then an fsync, checking that the
/// file holds every write completed before the fsync began. After each write the device reads
/// page 0, which must show a store no older than the last one completed.
fn device_and_cpu_stores_vs_punch_writeback_fsync_body() {
    let w = World::new(2, 16, 16);
    let dev = SoftDevice::private(2 << 20).expect("device");
    let m = Arc::new(dev.mirror(&w.space).expect("mirror"));
    let base = w.map(0, 2, true, false);
    let page = move |p: usize| base.add(p * PAGE_SIZE);
    // Rounds each writer has completed; whether the punch has completed; for each CPU round,
    // whether the punch had completed before it began.
    let done = Arc::new([AtomicU32::new(1), AtomicU32::new(1)]);
    let race = PunchRace::new();
    let cpuw = {
        let done = done.clone();
        race.spawn_storer(w.space.clone(), page(0), move |r| {
            done[0].store(r, Ordering::SeqCst)
        })
    };
    let devw = {
        let (m, done, after) = (m.clone(), done.clone(), race.after.clone());
        thread::spawn(move || {
            let mut b = vec![0u8; PAGE_SIZE];
            for r in 2..=B_LAST {
                m.write(page(1), PAGE_SIZE, &fill(val(r, 1), PAGE_SIZE))
                    .expect("device write");
                done[1].store(r, Ordering::SeqCst);
                // The device reads the page being stored to and punched too.
                let d0 = done[0].load(Ordering::SeqCst);
                m.read(page(0), PAGE_SIZE, &mut b).expect("device read");
                check_p0(&b, d0, &after, "device read of page 0");
            }
        })
    };
    let puncher = race.spawn_puncher(w.h.clone());
    let flusher = {
        let (cache, file, done, after) = (
            w.cache.clone(),
            w.file.clone(),
            done.clone(),
            race.after.clone(),
        );
        let h = Arc::new(w.cache.handle());
        thread::spawn(move || {
            cache.writeback_round();
            let d = [
                done[0].load(Ordering::SeqCst),
                done[1].load(Ordering::SeqCst),
            ];
            h.fsync().expect("fsync");
            let disk = crate::sync::lock(&file.data).clone();
            assert_eq!(disk.len(), 2 * PAGE_SIZE, "file length");
            check_p0(&disk[..PAGE_SIZE], d[0], &after, "file page 0 after fsync");
            let r1 = round(&disk[PAGE_SIZE..], 1, "file page 1 after fsync");
            assert!(
                r1 >= d[1] && r1 <= B_LAST,
                "file page 1 after fsync holds round {r1}; round {} was completed before",
                d[1]
            );
        })
    };
    join(cpuw);
    join(devw);
    join(puncher);
    join(flusher);
    w.h.fsync().expect("final fsync");
    let disk = w.disk();
    last_store_or_punch(
        uniform(&disk[..PAGE_SIZE], "file page 0"),
        race.punched_before(B_LAST),
    );
    assert_eq!(
        uniform(&disk[PAGE_SIZE..], "file page 1"),
        val(B_LAST, 1),
        "the last device write is lost"
    );
    assert!(
        w.view() == disk,
        "read_at differs from the file after fsync"
    );
    let mut b = vec![0u8; 2 * PAGE_SIZE];
    m.read(base, 2 * PAGE_SIZE, &mut b).expect("device read");
    assert!(b == disk, "the device reads other data than the file");
    for p in 0..2 {
        assert!(
            load(&w.space, page(p)).as_deref() == Some(&disk[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]),
            "the mapping shows other data than the file at page {p}"
        );
    }
    drop(Arc::into_inner(m).expect("threads joined: last mirror handle"));
    drop(dev);
}

#[test]
fn device_and_cpu_stores_vs_punch_writeback_fsync() {
    explore(
        300,
        300,
        device_and_cpu_stores_vs_punch_writeback_fsync_body,
    );
}

// ---------------------------------------------------------------------------------------------
// (c) CPU stores vs eviction
// ---------------------------------------------------------------------------------------------

/// The file has five pages and a four-page budget, with a one-page dirty bound. Mapping A
/// tracks stores asynchronously and maps page 0 (pages of such a mapping must never be evicted:
/// a store to them is seen only at the next scan); mapping S intercepts stores and maps all
/// five (its clean pages can be evicted: a store to them faults first). One thread stores to
/// page 0 through A; one stores to pages 1 and 2 through S (the second store of each round finds
/// the bound reached and waits for the background thread's writeback); a reader loads pages
/// through S (its fills put the cache over budget and ring the background evictor); one thread
/// runs writeback and `shrink_to_budget`. (The budget leaves room for the page a fault has
/// just filled: with every other page dirty or unevictable, the evictor could take that page
/// before the access retries, again and again.)
fn cpu_stores_vs_eviction_body() {
    const LAST: u32 = 3;
    const PAGES: usize = 5;
    let w = World::new(PAGES, 4, 1);
    let a = w.map(0, 1, true, false);
    let s = w.map(0, PAGES, true, true);
    let sp = move |p: usize| s.add(p * PAGE_SIZE);
    let last_round = |p: usize| if (0..=2).contains(&p) { LAST } else { 1 };
    let done = Arc::new([
        AtomicU32::new(1),
        AtomicU32::new(1),
        AtomicU32::new(1),
        AtomicU32::new(1),
        AtomicU32::new(1),
    ]);
    let wa = {
        let (space, done) = (w.space.clone(), done.clone());
        thread::spawn(move || {
            for r in 2..=LAST {
                space
                    .cpu_write(a, &fill(val(r, 0), PAGE_SIZE))
                    .expect("store through A");
                done[0].store(r, Ordering::SeqCst);
            }
        })
    };
    let ws = {
        let (space, done) = (w.space.clone(), done.clone());
        thread::spawn(move || {
            for r in 2..=LAST {
                for p in 1..=2 {
                    space
                        .cpu_write(sp(p), &fill(val(r, p), PAGE_SIZE))
                        .expect("store through S");
                    done[p].store(r, Ordering::SeqCst);
                }
            }
        })
    };
    let reader = {
        let (space, done) = (w.space.clone(), done.clone());
        thread::spawn(move || {
            let mut last = [1u32; PAGES];
            for p in [3, 4, 0, 1, 2, 3, 4, 0] {
                let before = done[p].load(Ordering::SeqCst);
                let b = load(&space, sp(p)).expect("inside the file");
                let r = round(&b, p, "load through S");
                assert!(
                    r >= before && r >= last[p] && r <= last_round(p),
                    "page {p} shows round {r}: round {before} was stored before the load began, \
                     round {} seen before",
                    last[p]
                );
                last[p] = r;
            }
        })
    };
    let evictor = {
        let cache = w.cache.clone();
        thread::spawn(move || {
            cache.writeback_round();
            cache.shrink_to_budget();
        })
    };
    join(wa);
    join(ws);
    join(reader);
    join(evictor);
    w.h.fsync().expect("fsync");
    let mut want = Vec::new();
    for p in 0..PAGES {
        want.extend(fill(val(last_round(p), p), PAGE_SIZE));
    }
    let disk = w.disk();
    for p in 0..PAGES {
        assert_eq!(
            uniform(
                &disk[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                "file after fsync"
            ),
            val(last_round(p), p),
            "file page {p} after fsync: a store was lost"
        );
    }
    assert!(disk == want);
    assert!(
        w.view() == want,
        "read_at differs from the file after fsync"
    );
    for p in 0..PAGES {
        assert!(
            load(&w.space, sp(p)).as_deref() == Some(&want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]),
            "mapping S shows other data than the file at page {p}"
        );
    }
}

#[test]
fn cpu_stores_vs_eviction() {
    explore(300, 300, cpu_stores_vs_eviction_body);
}

// ---------------------------------------------------------------------------------------------
// (d) intercepted stores vs hole punch
// ---------------------------------------------------------------------------------------------

/// The file has two pages, mapped shared with stores intercepted. A CPU thread stores to page 0
/// (rounds 2..=B_LAST) while another punches it and a reader loads it (refilling it after the
/// punch); a fourth thread fsyncs, checking that the file holds every store completed before the
/// fsync began. A page the punch removed lost its entry in every mapping, write protection
/// included: unless the cache protects it again, the next store after a refill is neither
/// intercepted nor ever written back.
fn intercepted_stores_vs_punch_body() {
    let w = World::new(2, 16, 16);
    let s = w.map(0, 2, true, true);
    let done = Arc::new(AtomicU32::new(1));
    let race = PunchRace::new();
    let storer = {
        let done = done.clone();
        race.spawn_storer(w.space.clone(), s, move |r| done.store(r, Ordering::SeqCst))
    };
    let reader = {
        let (space, done, after) = (w.space.clone(), done.clone(), race.after.clone());
        thread::spawn(move || {
            for _ in 0..2 {
                let d = done.load(Ordering::SeqCst);
                let b = load(&space, s).expect("inside the file");
                check_p0(&b, d, &after, "load of page 0");
            }
        })
    };
    let puncher = race.spawn_puncher(w.h.clone());
    let syncer = {
        let (file, done, after) = (w.file.clone(), done.clone(), race.after.clone());
        let h = Arc::new(w.cache.handle());
        thread::spawn(move || {
            let d = done.load(Ordering::SeqCst);
            h.fsync().expect("fsync");
            let disk = crate::sync::lock(&file.data).clone();
            check_p0(&disk[..PAGE_SIZE], d, &after, "file page 0 after fsync");
        })
    };
    join(storer);
    join(reader);
    join(puncher);
    join(syncer);
    w.h.fsync().expect("final fsync");
    let disk = w.disk();
    last_store_or_punch(
        uniform(&disk[..PAGE_SIZE], "file page 0"),
        race.punched_before(B_LAST),
    );
    assert!(
        disk[PAGE_SIZE..] == fill(val(1, 1), PAGE_SIZE)[..],
        "file page 1 changed"
    );
    assert!(
        w.view() == disk,
        "read_at differs from the file after fsync"
    );
    assert!(
        load(&w.space, s).as_deref() == Some(&disk[..PAGE_SIZE]),
        "the mapping shows other data than the file at page 0"
    );
}

#[test]
fn intercepted_stores_vs_punch() {
    explore(300, 300, intercepted_stores_vs_punch_body);
}

/// File page 0 after the final fsync of an exploration where the last store to it raced a
/// punch: the last store if it came after the punch (`after`), else the last store or zeros.
fn last_store_or_punch(p0: u32, after: bool) {
    if after {
        assert_eq!(
            p0,
            val(B_LAST, 0),
            "the last store, after the punch, is lost"
        );
    } else {
        assert!(
            p0 == val(B_LAST, 0) || p0 == 0,
            "file page 0 holds {p0:#x}: neither the last store nor the punch"
        );
    }
}
