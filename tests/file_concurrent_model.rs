//! Concurrent model test of hetmem's page cache for files (`hetmem::pagecache`): operations on one
//! cached file run on 2–4 threads at once, and every value any of them observes must be one that
//! some linearisation of the operations allows.
//!
//! **Setup, per case.** A real temporary file of `STABLE_PAGES`..=`MAX_PAGES` pages (16–24),
//! cached with a budget of `BUDGET_PAGES` (10) and a dirty bound of `DIRTY_PAGES` (4): eviction
//! and writeback happen all the time, and a background writer
//! (`FileCache::start_background_writeback`) runs every `WRITEBACK_US` µs. One address space
//! maps the file twice, shared and read-write: mapping A over file pages 0..8 tracking stores
//! asynchronously (`Space::map_file`, the default), mapping B over file pages 4..16 intercepting
//! stores (`FileMapOptions { intercept_stores: true, .. }`); pages 4..8 are in both. A software
//! device mirrors the space (`SoftDevice::private(..).mirror(&space)`).
//!
//! **Operations**, chosen per thread from a seeded generator (the same seed gives every thread
//! the same operations; the interleaving is the scheduler's): word stores and loads through A and
//! B (1–16 words), `write_at`/`read_at`/`direct_write`/`direct_read` (1 word to 2 pages,
//! word-aligned), device writes and reads of 1–3 whole pages through A and B (a device write
//! through B get write access page by page from the cache, which writeback revokes before it
//! protects a page again),
//! `punch_hole` (1–3 pages), `set_len`, `fsync`/`fdatasync` (then the file on disk is read with
//! `std::fs::read`), `FileCache::shrink_to_budget` and `len()`. Half of the offsets fall in a
//! two-page "hot" window per round, so that operations on the same page race.
//!
//! **Checking.** Every 4-byte word of the file (up to `MAX_PAGES`) is a register, and so is the
//! file's length. A global atomic tick is taken before and after every call. A write-like call
//! records, before it starts, for each word it covers, (value, start tick, op id); its end tick is
//! published when it returns (`Hist::ends`): a store, `write_at`, device write and `direct_write`
//! write their values, a hole punch writes zeros, `set_len(L)` writes zeros to every word at or
//! past `L` (a word past the end of file is always zero in the model: it reads as zero once the
//! file grows over it again, which is what hetmem guarantees). A read-like observation over
//! the window `[os, oe]` (a load, `read_at`, device read, `direct_read`; for the disk read right
//! after an `fsync` that returned Ok, the window runs from the start of the `fsync` to the end of
//! the disk read) is valid for a word when the value equals one written by a write that started
//! before `oe` and did not end before the start of another write to that word that itself ended
//! before `os`: the latest write completed before the observation started, or a later or
//! overlapping one. Values are random per write and word (never zero: zero is what punches and
//! truncations write), so a stale, lost or misplaced value does not pass. System-call-like
//! copies (`pread`/`pwrite` into the staging memfd, device copies) give no word atomicity
//! against concurrent stores, so an observation whose every byte comes from a valid write's
//! word is accepted too (counted as "torn").
//! Histories stay bounded: a write is pruned once another write to the word that started after
//! it ended has ended before every thread's current operation started.
//!
//! The length is a register of its own, written by `set_len` (a set) and by `write_at` and
//! `direct_write` (a growth to at least the write's end); `read_at`/`direct_read` observe it
//! (a short read: exactly `off + n`; a full read: at least `off + n`), `len()` exactly, and the
//! disk after an `fsync` loosely (writeback of a run of pages that is not at the end extends the
//! file on disk to that run only, so the disk's length lies between candidate lengths). A length
//! is valid when it is the value of a set that is not superseded by another completed set, or the
//! end of a growing write not superseded by a set, and not below a value that every linearisation
//! has to respect (a completed set or growth after which no set could come before the
//! observation).
//!
//! Truncation is concurrent too, within what the CPU can survive: an access past the end of a
//! file mapping is SIGBUS (the process dies), so in "mixed" rounds (CPU and device accesses among
//! the operations) `set_len` keeps at least `STABLE_PAGES` pages (A and B lie inside), and the
//! tail `STABLE_PAGES..MAX_PAGES` grows and shrinks under `write_at`, `direct_write` and
//! `set_len`; at least one round in four is "system calls only" (no CPU or device access), where
//! `set_len` goes anywhere from 0 to `MAX_PAGES` pages, over the mapped pages too.
//!
//! **Barriers.** After every round all threads stop (a `Barrier`), and the main thread checks
//! the quiescent state exactly: `len()` and a full `read_at` are valid against the histories; the
//! state read is now the model; loads through both mappings and device reads through both read
//! the model; `fsync` returns Ok and the file on disk equals the model byte for byte; a fresh
//! cache opened on the file reads the model. Then, at half of the barriers, a "deep truncate":
//! stores through both mappings, `set_len` to a cut below the mapped pages, stores past the new
//! end inside its partial last page (allowed, never file data), and an extension back (by
//! `set_len` or by a `write_at` past the end), after which the words past the cut read as zeros
//! everywhere (loads, device reads, `read_at`, disk). The histories then restart from the
//! model. At the end of a case the file is synced, everything dropped, and a fresh cache reads
//! the model.
//!
//! Each thread says what it does through `common::at`; the test holds a watchdog (60 s per unit
//! of `HETMEM_SOAK`), so a hang fails the test with every thread's last operation (and stacks,
//! where gdb is installed) instead of hanging CI.
//! Nothing sleeps: threads meet at barriers; the background writer waits on its channel.
//!
//! **Amount.** `CASES` cases (2, 3 or 4 worker threads), `ROUNDS` rounds each, `OPS_PER_CASE`
//! operations a case: 108,000 file operations per run, 4–9 s in release on a 2-core machine.
//! `HETMEM_SOAK=N` runs N times as many cases; `HETMEM_CONC_SEED=<seed>` reruns the same
//! operations (a failure prints the seed, the word, the value seen, the observation's window and
//! the word's recorded writes with their windows and operations).

mod common;
use common::*;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use hetmem::pagecache::{BackgroundWriteback, CacheConfig, FileCache, FileHandle};
use hetmem::space::{Probe, Space};
use hetmem::{DeviceMirror, Prot, SoftDevice, VirtAddr};

const CASES: u64 = 6;
const ROUNDS: usize = 6;
/// File operations per case, shared among its threads and rounds.
const OPS_PER_CASE: usize = 18_000;
const WPP: usize = PAGE / 4;
/// In mixed rounds the file keeps at least this many pages (the mappings lie inside).
const STABLE_PAGES: usize = 16;
/// The file never grows past this many pages (the operations stay inside).
const MAX_PAGES: usize = 24;
const MAX_WORDS: usize = MAX_PAGES * WPP;
const STABLE_BYTES: u64 = (STABLE_PAGES * PAGE) as u64;
/// Mapping A (asynchronous store tracking) and B (intercepted stores): first file page, pages.
const A: (usize, usize) = (0, 8);
const B: (usize, usize) = (4, 12);
const BUDGET_PAGES: usize = 10;
const DIRTY_PAGES: usize = 4;
const WRITEBACK_US: u64 = 300;

// ---------------------------------------------------------------------------------------------
// Seeds

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed, 0x5eed))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0, 0)
    }
    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in `lo..hi` (`lo` < `hi`).
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo)
    }
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
}

/// The value a write puts in its `k`-th word: unique per write and word, never zero.
fn value(case_seed: u64, op: u32, k: usize) -> u32 {
    let v = mix(case_seed ^ (op as u64) << 32, k as u64) as u32;
    if v == 0 { 1 } else { v }
}

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Map {
    A,
    B,
}

impl Map {
    fn pages(self) -> (usize, usize) {
        match self {
            Map::A => A,
            Map::B => B,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Word stores through a mapping at file word `word`.
    Store {
        map: Map,
        word: usize,
        n: usize,
    },
    Load {
        map: Map,
        word: usize,
        n: usize,
    },
    WriteAt {
        word: usize,
        n: usize,
    },
    ReadAt {
        word: usize,
        n: usize,
    },
    DirectWrite {
        word: usize,
        n: usize,
    },
    DirectRead {
        word: usize,
        n: usize,
    },
    /// Whole pages through the device's mirror of a mapping (from file page `page`).
    DevWrite {
        map: Map,
        page: usize,
        n: usize,
    },
    DevRead {
        map: Map,
        page: usize,
        n: usize,
    },
    Punch {
        page: usize,
        n: usize,
    },
    SetLen {
        bytes: u64,
    },
    Fsync {
        data_only: bool,
    },
    Shrink,
    Len,
}

/// What a recorded write was (shown in failure messages), packed in a `u64`.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Initial = 1,
    StoreA,
    StoreB,
    WriteAt,
    DirectWrite,
    DevWrite,
    Punch,
    SetLen,
    Model,
}

fn pack(kind: Kind, thread: usize, word: usize, n: usize) -> u64 {
    (kind as u64) << 56 | (thread as u64 & 0xff) << 48 | (word as u64 & 0xff_ffff) << 24 | n as u64
}

fn describe(d: u64) -> String {
    let kinds = [
        "?",
        "initial content",
        "store through A",
        "store through B",
        "write_at",
        "direct_write",
        "device write through A",
        "punch_hole",
        "set_len",
        "model at a barrier",
    ];
    let k = kinds.get((d >> 56) as usize).copied().unwrap_or("?");
    let t = (d >> 48) & 0xff;
    let (w, n) = ((d >> 24) & 0xff_ffff, d & 0xff_ffff);
    match (d >> 56) as usize {
        1 | 9 => k.to_string(),
        6 | 7 => format!("{k} by thread {t}: pages {}..{}", w, w + n),
        8 => format!("{k}({}) by thread {t}", w * 4),
        _ => format!(
            "{k} by thread {t}: words {w}..{} (bytes {}..{})",
            w + n,
            w * 4,
            (w + n) * 4
        ),
    }
}

/// Round kinds: CPU and device accesses among the operations, or system calls only (then
/// `set_len` may cut the mapped pages too).
fn syscall_round(case_seed: u64, round: usize) -> bool {
    round % 4 == 3 || mix(case_seed, 1000 + round as u64).is_multiple_of(7)
}

/// A two-page window (first page) where half of the operations of a round fall.
fn hot_page(case_seed: u64, round: usize) -> usize {
    (mix(case_seed, 2000 + round as u64) % (STABLE_PAGES as u64 + 2)) as usize
}

/// A word in `lo..hi`, in the hot window half of the time when it meets the range.
fn pick_word(rng: &mut Rng, hot: usize, lo: usize, hi: usize) -> usize {
    let (hl, hh) = ((hot * WPP).max(lo), ((hot + 2) * WPP).min(hi));
    if hl < hh && rng.chance(1, 2) {
        rng.range(hl, hh)
    } else {
        rng.range(lo, hi)
    }
}

/// Words of a system-call-like transfer: 1 word to 2 pages.
fn io_words(rng: &mut Rng) -> usize {
    match rng.below(4) {
        0 => rng.range(1, 5),
        1 => rng.range(1, 65),
        2 => rng.range(1, WPP + 1),
        _ => rng.range(WPP, 2 * WPP + 1),
    }
}

fn gen_op(rng: &mut Rng, hot: usize, syscalls_only: bool) -> Op {
    loop {
        let op = match rng.below(100) {
            0..24 => {
                let map = if rng.chance(1, 2) { Map::A } else { Map::B };
                let (f, n) = map.pages();
                let word = pick_word(rng, hot, f * WPP, (f + n) * WPP);
                let n = rng.range(1, 17).min((f + n) * WPP - word);
                if rng.chance(3, 5) {
                    Op::Store { map, word, n }
                } else {
                    Op::Load { map, word, n }
                }
            }
            24..36 => {
                let word = pick_word(rng, hot, 0, MAX_WORDS);
                let n = io_words(rng).min(MAX_WORDS - word);
                Op::WriteAt { word, n }
            }
            36..44 => {
                let word = pick_word(rng, hot, 0, MAX_WORDS + 16);
                Op::ReadAt {
                    word,
                    n: io_words(rng),
                }
            }
            44..50 => {
                let word = pick_word(rng, hot, 0, MAX_WORDS);
                let n = io_words(rng).min(MAX_WORDS - word);
                Op::DirectWrite { word, n }
            }
            50..55 => {
                let word = pick_word(rng, hot, 0, MAX_WORDS + 16);
                Op::DirectRead {
                    word,
                    n: io_words(rng),
                }
            }
            55..63 => {
                // Device writes go through A (through B they are refused: one in six).
                let map = if rng.chance(1, 6) { Map::B } else { Map::A };
                let (f, n) = map.pages();
                let page = pick_word(rng, hot, f * WPP, (f + n) * WPP) / WPP;
                let n = rng.range(1, 3).min(f + n - page);
                Op::DevWrite { map, page, n }
            }
            63..70 => {
                let map = if rng.chance(1, 2) { Map::A } else { Map::B };
                let (f, n) = map.pages();
                let page = pick_word(rng, hot, f * WPP, (f + n) * WPP) / WPP;
                let n = rng.range(1, 4).min(f + n - page);
                Op::DevRead { map, page, n }
            }
            70..79 => {
                let page = pick_word(rng, hot, 0, MAX_WORDS) / WPP;
                let n = rng.range(1, 4).min(MAX_PAGES - page);
                Op::Punch { page, n }
            }
            79..85 => {
                let lo = if syscalls_only { 0 } else { STABLE_BYTES };
                let bytes = if rng.chance(1, 2) {
                    rng.range(lo as usize / PAGE, MAX_PAGES + 1) * PAGE
                } else {
                    rng.range(lo as usize / 4, MAX_WORDS + 1) * 4
                };
                Op::SetLen {
                    bytes: bytes as u64,
                }
            }
            85..86 => Op::Fsync {
                data_only: rng.chance(1, 2),
            },
            86..95 => Op::Shrink,
            _ => Op::Len,
        };
        let mapped = matches!(
            op,
            Op::Store { .. } | Op::Load { .. } | Op::DevWrite { .. } | Op::DevRead { .. }
        );
        if !(syscalls_only && mapped) {
            return op;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Histories

#[derive(Clone, Copy, Debug)]
struct Entry {
    val: u32,
    op: u32,
    start: u64,
}

#[derive(Clone, Copy, Debug)]
struct LenEntry {
    /// A `set_len` (else a write that grows the file to at least `val`).
    set: bool,
    val: u64,
    op: u32,
    start: u64,
}

/// A constraint on the length seen by an observation.
#[derive(Clone, Copy, Debug)]
enum LenObs {
    Exact(u64),
    AtLeast(u64),
    AtMost(u64),
    /// The disk's length after an fsync: between candidate lengths.
    Disk(u64),
}

/// The recorded writes of every word and of the length (see the module doc).
struct Hist {
    tick: AtomicU64,
    next_op: AtomicU32,
    /// Per op id: its end tick (0 while running).
    ends: Vec<AtomicU64>,
    /// Per op id: what it is ([`pack`]).
    descs: Vec<AtomicU64>,
    /// Per worker: a tick at or before the start of its current operation.
    active: Vec<AtomicU64>,
    /// Per page, per word: the writes that may still be observed.
    pages: Vec<Mutex<Vec<Vec<Entry>>>>,
    len: Mutex<Vec<LenEntry>>,
    torn: AtomicUsize,
}

impl Hist {
    fn new(cap: usize, workers: usize, words: &[u32], len: u64) -> Hist {
        let h = Hist {
            tick: AtomicU64::new(1),
            next_op: AtomicU32::new(0),
            ends: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            descs: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            active: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            pages: (0..MAX_PAGES)
                .map(|_| Mutex::new(vec![Vec::new(); WPP]))
                .collect(),
            len: Mutex::new(Vec::new()),
            torn: AtomicUsize::new(0),
        };
        h.reset(words, len, Kind::Initial);
        h
    }

    fn end_of(&self, op: u32) -> u64 {
        match self.ends[op as usize].load(Ordering::SeqCst) {
            0 => u64::MAX,
            e => e,
        }
    }

    fn now(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::SeqCst)
    }

    /// Starts an observation by worker `me`: its start tick.
    fn begin_obs(&self, me: usize) -> u64 {
        self.active[me].store(self.tick.load(Ordering::SeqCst), Ordering::SeqCst);
        self.now()
    }

    /// Starts a write by worker `me`: its op id and start tick.
    fn begin(&self, me: usize, desc: u64) -> (u32, u64) {
        self.active[me].store(self.tick.load(Ordering::SeqCst), Ordering::SeqCst);
        let op = self.next_op.fetch_add(1, Ordering::SeqCst);
        assert!(
            (op as usize) < self.ends.len(),
            "more operations than the histories hold"
        );
        self.descs[op as usize].store(desc, Ordering::SeqCst);
        (op, self.now())
    }

    fn finish(&self, op: u32) {
        let e = self.now();
        self.ends[op as usize].store(e, Ordering::SeqCst);
    }

    /// A tick at or before the start of every worker's current operation.
    fn horizon(&self) -> u64 {
        self.active
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .min()
            .unwrap_or(0)
    }

    /// Drops the writes of a word that no observation starting at `h` or later can see.
    fn prune(&self, e: &mut Vec<Entry>, h: u64) {
        let f = e
            .iter()
            .filter(|x| self.end_of(x.op) < h)
            .map(|x| x.start)
            .max();
        if let Some(f) = f {
            e.retain(|x| self.end_of(x.op) > f);
        }
    }

    /// Records that op `op` (started at `start`) writes `val(k)` to words `first + k`, `k <
    /// n`; words at or past `MAX_WORDS` are ignored.
    fn write_words(&self, op: u32, start: u64, first: usize, n: usize, val: impl Fn(usize) -> u32) {
        let h = self.horizon();
        let end = (first + n).min(MAX_WORDS);
        let mut w = first;
        while w < end {
            let p = w / WPP;
            let stop = ((p + 1) * WPP).min(end);
            let mut pg = self.pages[p].lock().unwrap();
            for x in w..stop {
                let e = &mut pg[x % WPP];
                self.prune(e, h);
                e.push(Entry {
                    val: val(x - first),
                    op,
                    start,
                });
            }
            w = stop;
        }
    }

    fn write_len(&self, op: u32, start: u64, set: bool, val: u64) {
        let h = self.horizon();
        let mut v = self.len.lock().unwrap();
        // Sets superseded by a set completed before the horizon, and growths superseded by a
        // set or by a growth at least as large completed before it, can no longer be seen.
        let fs = v
            .iter()
            .filter(|x| x.set && self.end_of(x.op) < h)
            .map(|x| x.start)
            .max()
            .unwrap_or(0);
        let old = v.clone();
        v.retain(|x| {
            let end = self.end_of(x.op);
            end > fs
                && (x.set
                    || !old.iter().any(|f| {
                        !f.set && f.val >= x.val && f.start > end && self.end_of(f.op) < h
                    }))
        });
        v.push(LenEntry {
            set,
            val,
            op,
            start,
        });
    }

    /// Replaces every history by one completed write of `words` (zeros past them) and `len`.
    fn reset(&self, words: &[u32], len: u64, kind: Kind) {
        let op = self.next_op.fetch_add(1, Ordering::SeqCst);
        self.descs[op as usize].store(pack(kind, 0, 0, 0), Ordering::SeqCst);
        let start = self.now();
        for (p, pg) in self.pages.iter().enumerate() {
            let mut pg = pg.lock().unwrap();
            for (i, e) in pg.iter_mut().enumerate() {
                e.clear();
                e.push(Entry {
                    val: words.get(p * WPP + i).copied().unwrap_or(0),
                    op,
                    start,
                });
            }
        }
        *self.len.lock().unwrap() = vec![LenEntry {
            set: true,
            val: len,
            op,
            start,
        }];
        self.finish(op);
        for a in &self.active {
            a.store(self.tick.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    fn show_entry(&self, e: &Entry, alive: bool) -> String {
        let end = self.end_of(e.op);
        let end = if end == u64::MAX {
            "running".to_string()
        } else {
            end.to_string()
        };
        format!(
            "\n    {:#010x} [{}, {end}] op {} {}{}",
            e.val,
            e.start,
            e.op,
            describe(self.descs[e.op as usize].load(Ordering::SeqCst)),
            if alive { "" } else { " (superseded)" }
        )
    }

    /// Checks that `got[k]` is a valid value of word `first + k` for an observation over
    /// `[os, oe]`.
    fn check_words(&self, os: u64, oe: u64, first: usize, got: &[u32]) -> Result<(), String> {
        let mut w = first;
        let end = first + got.len();
        while w < end {
            let p = w / WPP;
            let stop = ((p + 1) * WPP).min(end);
            let pg = self.pages[p].lock().unwrap();
            for x in w..stop {
                let e = &pg[x % WPP];
                let v = got[x - first];
                let f = e
                    .iter()
                    .filter(|y| self.end_of(y.op) < os)
                    .map(|y| y.start)
                    .max()
                    .unwrap_or(0);
                let alive = |y: &Entry| y.start < oe && self.end_of(y.op) > f;
                if e.iter().any(|y| alive(y) && y.val == v) {
                    continue;
                }
                let bytes = v.to_ne_bytes();
                let torn = (0..4).all(|i| {
                    e.iter()
                        .any(|y| alive(y) && y.val.to_ne_bytes()[i] == bytes[i])
                });
                if torn {
                    self.torn.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let writes: String = e.iter().map(|y| self.show_entry(y, alive(y))).collect();
                return Err(format!(
                    "word {x} (file offset {}, page {}) is {v:#010x}, which no valid write put there; observation window [{os}, {oe}]; the word's recorded writes (value [start, end] op):{writes}",
                    x * 4,
                    x / WPP
                ));
            }
            w = stop;
        }
        Ok(())
    }

    fn check_len(&self, os: u64, oe: u64, obs: LenObs) -> Result<(), String> {
        let v = self.len.lock().unwrap();
        let end = |e: &LenEntry| self.end_of(e.op);
        let fs = v
            .iter()
            .filter(|e| e.set && end(e) < os)
            .map(|e| e.start)
            .max()
            .unwrap_or(0);
        let cands: Vec<u64> = v
            .iter()
            .filter(|e| e.start < oe && end(e) > fs)
            .map(|e| e.val)
            .collect();
        let lb = v
            .iter()
            .filter(|e| {
                end(e) < os
                    && !v
                        .iter()
                        .any(|f| f.set && f.op != e.op && f.start < oe && end(f) > e.start)
            })
            .map(|e| e.val)
            .max()
            .unwrap_or(0);
        let ok = match obs {
            LenObs::Exact(x) => x >= lb && cands.contains(&x),
            LenObs::AtLeast(x) => cands.iter().any(|&c| c >= x.max(lb)),
            LenObs::AtMost(x) => cands.iter().any(|&c| lb <= c && c <= x),
            LenObs::Disk(d) => {
                cands.iter().any(|&c| lb <= c && c <= d) && cands.iter().any(|&c| c >= d)
            }
        };
        if ok {
            return Ok(());
        }
        let hist: String = v
            .iter()
            .map(|e| {
                let end = end(e);
                format!(
                    "\n    {} {} [{}, {}] op {} {}",
                    if e.set { "set" } else { "grow to" },
                    e.val,
                    e.start,
                    if end == u64::MAX {
                        "running".to_string()
                    } else {
                        end.to_string()
                    },
                    e.op,
                    describe(self.descs[e.op as usize].load(Ordering::SeqCst))
                )
            })
            .collect();
        Err(format!(
            "the length seen, {obs:?}, is not valid: candidates {cands:?}, lower bound {lb}, observation window [{os}, {oe}]; recorded length writes:{hist}"
        ))
    }
}

fn words_of(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

fn bytes_of(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// A case

/// Counters over the whole run, for the summary line.
#[derive(Default)]
struct Counts {
    ops: AtomicUsize,
    by_kind: [AtomicUsize; 13],
    dev_busy: AtomicUsize,
    evicted: AtomicUsize,
    written_back: AtomicUsize,
    torn: AtomicUsize,
    deep_truncates: AtomicUsize,
}

fn op_index(op: &Op) -> usize {
    match op {
        Op::Store { .. } => 0,
        Op::Load { .. } => 1,
        Op::WriteAt { .. } => 2,
        Op::ReadAt { .. } => 3,
        Op::DirectWrite { .. } => 4,
        Op::DirectRead { .. } => 5,
        Op::DevWrite { .. } => 6,
        Op::DevRead { .. } => 7,
        Op::Punch { .. } => 8,
        Op::SetLen { .. } => 9,
        Op::Fsync { .. } => 10,
        Op::Shrink => 11,
        Op::Len => 12,
    }
}

const OP_NAMES: [&str; 13] = [
    "store",
    "load",
    "write_at",
    "read_at",
    "direct_write",
    "direct_read",
    "dev write",
    "dev read",
    "punch",
    "set_len",
    "fsync",
    "shrink",
    "len",
];

struct Case {
    case_seed: u64,
    file: TempFile,
    cache: Arc<FileCache>,
    h0: FileHandle,
    space: Space,
    a: usize,
    b: usize,
    /// Plain loads and stores through mappings A and B.
    probe_a: Probe,
    probe_b: Probe,
    mirror: DeviceMirror,
    dev: SoftDevice,
    bg: Option<BackgroundWriteback>,
    hist: Hist,
    threads: usize,
}

fn cfg() -> CacheConfig {
    CacheConfig {
        budget: BUDGET_PAGES * PAGE,
        dirty_bound: DIRTY_PAGES * PAGE,
    }
}

impl Case {
    fn new(seed: u64, case: u64, threads: usize) -> Case {
        let case_seed = mix(seed, case);
        let mut rng = Rng::new(case_seed);
        let len = rng.range(STABLE_PAGES * WPP, MAX_WORDS + 1) * 4;
        let words: Vec<u32> = (0..len / 4)
            .map(|k| value(case_seed, u32::MAX, k))
            .collect();
        let file = TempFile::new(&format!("conc-model-{case}"), &bytes_of(&words));
        let cache = FileCache::open(&file.0, true, cfg()).unwrap();
        let h0 = cache.handle();
        let space = Space::new().unwrap();
        let a = space
            .map_file(&h0, (A.0 * PAGE) as u64, A.1 * PAGE, Prot::ReadWrite, true)
            .unwrap()
            .get();
        let opts = intercepting(Prot::ReadWrite);
        let b = space
            .map_file_with(&h0, (B.0 * PAGE) as u64, B.1 * PAGE, opts)
            .unwrap()
            .get();
        let probe_a = space.probe(VirtAddr(a), A.1 * PAGE).unwrap();
        let probe_b = space.probe(VirtAddr(b), B.1 * PAGE).unwrap();
        let dev = SoftDevice::private(1 << 20).unwrap();
        let mirror = dev.mirror(&space).unwrap();
        let bg = cache.start_background_writeback(Duration::from_micros(WRITEBACK_US));
        // Every op of every thread and round, the barriers' resets, and slack.
        let cap = OPS_PER_CASE + threads * ROUNDS + 8 * ROUNDS + 64;
        let hist = Hist::new(cap, threads, &words, len as u64);
        Case {
            case_seed,
            file,
            cache,
            h0,
            space,
            a,
            b,
            probe_a,
            probe_b,
            mirror,
            dev,
            bg: Some(bg),
            hist,
            threads,
        }
    }

    /// The CPU address of file word `word` in mapping `map`.
    fn addr(&self, map: Map, word: usize) -> usize {
        let (base, (first, _)) = match map {
            Map::A => (self.a, A),
            Map::B => (self.b, B),
        };
        base + (word - first * WPP) * 4
    }

    /// A real CPU load of file word `word` through mapping `map`.
    fn load(&self, map: Map, word: usize) -> u32 {
        let probe = if map == Map::A {
            &self.probe_a
        } else {
            &self.probe_b
        };
        let v = probe.load_u32(VirtAddr(self.addr(map, word)));
        v.expect("a word of the mapping")
    }

    /// A real CPU store of `v` to file word `word` through mapping `map`.
    fn store(&self, map: Map, word: usize, v: u32) {
        let probe = if map == Map::A {
            &self.probe_a
        } else {
            &self.probe_b
        };
        let r = probe.store_u32(VirtAddr(self.addr(map, word)), v);
        r.expect("a word of the mapping")
    }

    /// Runs one operation of worker `me`.
    fn run_op(&self, me: usize, h: &FileHandle, op: &Op, counts: &Counts) -> Result<(), String> {
        let hist = &self.hist;
        let cs = self.case_seed;
        match *op {
            Op::Store { map, word, n } => {
                let kind = if map == Map::A {
                    Kind::StoreA
                } else {
                    Kind::StoreB
                };
                let (id, start) = hist.begin(me, pack(kind, me, word, n));
                hist.write_words(id, start, word, n, |k| value(cs, id, k));
                for k in 0..n {
                    self.store(map, word + k, value(cs, id, k));
                }
                hist.finish(id);
            }
            Op::Load { map, word, n } => {
                let os = hist.begin_obs(me);
                let got: Vec<u32> = (0..n).map(|k| self.load(map, word + k)).collect();
                let oe = hist.now();
                hist.check_words(os, oe, word, &got)?;
            }
            Op::WriteAt { word, n } | Op::DirectWrite { word, n } => {
                let direct = matches!(op, Op::DirectWrite { .. });
                let kind = if direct {
                    Kind::DirectWrite
                } else {
                    Kind::WriteAt
                };
                let (id, start) = hist.begin(me, pack(kind, me, word, n));
                let data: Vec<u8> = (0..n)
                    .flat_map(|k| value(cs, id, k).to_ne_bytes())
                    .collect();
                hist.write_words(id, start, word, n, |k| value(cs, id, k));
                hist.write_len(id, start, false, ((word + n) * 4) as u64);
                let off = (word * 4) as u64;
                let r = if direct {
                    h.direct_write(off, &data)
                } else {
                    h.write_at(off, &data)
                };
                hist.finish(id);
                r.map_err(|e| format!("failed: {e}"))?;
            }
            Op::ReadAt { word, n } | Op::DirectRead { word, n } => {
                let mut buf = vec![0xa5u8; n * 4];
                let off = (word * 4) as u64;
                let os = hist.begin_obs(me);
                let r = if matches!(op, Op::DirectRead { .. }) {
                    h.direct_read(off, &mut buf)
                } else {
                    h.read_at(off, &mut buf)
                };
                let oe = hist.now();
                let got = r.map_err(|e| format!("failed: {e}"))?;
                if got % 4 != 0 || got > buf.len() {
                    return Err(format!("read {got} bytes of {}", buf.len()));
                }
                let obs = if got == buf.len() {
                    LenObs::AtLeast(off + got as u64)
                } else if got == 0 {
                    LenObs::AtMost(off)
                } else {
                    LenObs::Exact(off + got as u64)
                };
                hist.check_len(os, oe, obs)?;
                hist.check_words(os, oe, word, &words_of(&buf[..got]))?;
            }
            Op::DevWrite { map, page, n } => {
                let addr = VirtAddr(self.addr(map, page * WPP));
                let (id, start) = hist.begin(me, pack(Kind::DevWrite, me, page, n));
                let buf: Vec<u8> = (0..n * WPP)
                    .flat_map(|k| value(cs, id, k).to_ne_bytes())
                    .collect();
                hist.write_words(id, start, page * WPP, n * WPP, |k| value(cs, id, k));
                let r = self.mirror.write(addr, n * PAGE, &buf);
                hist.finish(id);
                match r {
                    Ok(_) => {}
                    // The pages stayed blocked (removals) past the device's range_fault
                    // timeout: what was written before stays a candidate.
                    Err(hetmem::Error::Busy) => {
                        counts.dev_busy.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(format!("device write failed: {e}")),
                }
            }
            Op::DevRead { map, page, n } => {
                let addr = VirtAddr(self.addr(map, page * WPP));
                let mut buf = vec![0u8; n * PAGE];
                let os = hist.begin_obs(me);
                let r = self.mirror.read(addr, n * PAGE, &mut buf);
                let oe = hist.now();
                match r {
                    Ok(_) => hist.check_words(os, oe, page * WPP, &words_of(&buf))?,
                    Err(hetmem::Error::Busy) => {
                        counts.dev_busy.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(format!("device read failed: {e}")),
                }
            }
            Op::Punch { page, n } => {
                let (id, start) = hist.begin(me, pack(Kind::Punch, me, page, n));
                hist.write_words(id, start, page * WPP, n * WPP, |_| 0);
                let r = h.punch_hole((page * PAGE) as u64, (n * PAGE) as u64);
                hist.finish(id);
                r.map_err(|e| format!("failed: {e}"))?;
            }
            Op::SetLen { bytes } => {
                let w = (bytes / 4) as usize;
                let (id, start) = hist.begin(me, pack(Kind::SetLen, me, w, 0));
                hist.write_words(id, start, w, MAX_WORDS - w, |_| 0);
                hist.write_len(id, start, true, bytes);
                let r = h.set_len(bytes);
                hist.finish(id);
                r.map_err(|e| format!("failed: {e}"))?;
            }
            Op::Fsync { data_only } => {
                let os = hist.begin_obs(me);
                let r = if data_only { h.fdatasync() } else { h.fsync() };
                r.map_err(|e| format!("failed: {e}"))?;
                let disk = self.file.disk();
                let oe = hist.now();
                if !disk.len().is_multiple_of(4) {
                    return Err(format!("the disk holds {} bytes", disk.len()));
                }
                hist.check_len(os, oe, LenObs::Disk(disk.len() as u64))
                    .map_err(|e| format!("disk after Ok: {e}"))?;
                hist.check_words(os, oe, 0, &words_of(&disk))
                    .map_err(|e| format!("disk after Ok: {e}"))?;
            }
            Op::Shrink => {
                self.cache.shrink_to_budget();
            }
            Op::Len => {
                let os = hist.begin_obs(me);
                let l = h.len();
                let oe = hist.now();
                hist.check_len(os, oe, LenObs::Exact(l))?;
            }
        }
        Ok(())
    }

    /// Worker `me` of the case: runs its operations of every round between the barriers.
    #[allow(clippy::too_many_arguments)]
    fn worker(
        &self,
        me: usize,
        ops_per_round: usize,
        start: &Barrier,
        end: &Barrier,
        quit: &AtomicBool,
        stop: &AtomicBool,
        failure: &Mutex<Option<String>>,
        counts: &Counts,
    ) {
        let h = self.cache.handle();
        for round in 0..ROUNDS {
            at(format!("worker {me}: waiting for round {round}"));
            start.wait();
            if quit.load(Ordering::SeqCst) {
                return;
            }
            let sys = syscall_round(self.case_seed, round);
            let hot = hot_page(self.case_seed, round);
            let mut rng = Rng::new(mix(self.case_seed, (round * 64 + me) as u64 + 1));
            for i in 0..ops_per_round {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let op = gen_op(&mut rng, hot, sys);
                at(format!("worker {me}: round {round} op {i}: {op:?}"));
                let r =
                    std::panic::catch_unwind(AssertUnwindSafe(|| self.run_op(me, &h, &op, counts)))
                        .unwrap_or_else(|p| {
                            Err(format!(
                                "panicked: {}",
                                p.downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default()
                            ))
                        });
                counts.ops.fetch_add(1, Ordering::Relaxed);
                counts.by_kind[op_index(&op)].fetch_add(1, Ordering::Relaxed);
                if let Err(e) = r {
                    let mut f = failure.lock().unwrap();
                    if f.is_none() {
                        *f = Some(format!(
                            "round {round} ({}), worker {me} of {}, op {i} {op:?}: {e}",
                            if sys { "system calls only" } else { "mixed" },
                            self.threads
                        ));
                    }
                    stop.store(true, Ordering::SeqCst);
                    break;
                }
            }
            at(format!("worker {me}: round {round} done"));
            end.wait();
        }
    }

    /// The file as `read_at` sees it now (no operation running), checked against the histories
    /// and against loads through both mappings and device reads through both.
    fn quiescent_state(&self, what: &str) -> Result<(Vec<u32>, u64), String> {
        let hist = &self.hist;
        let os = hist.now();
        let len = self.h0.len();
        let mut buf = vec![0u8; len as usize];
        let n = self
            .h0
            .read_at(0, &mut buf)
            .map_err(|e| format!("{what}: read_at: {e}"))?;
        let oe = hist.now();
        if n as u64 != len || !len.is_multiple_of(4) {
            return Err(format!("{what}: read_at gave {n} bytes, len() {len}"));
        }
        hist.check_len(os, oe, LenObs::Exact(len))
            .map_err(|e| format!("{what}: {e}"))?;
        let words = words_of(&buf);
        hist.check_words(os, oe, 0, &words)
            .map_err(|e| format!("{what}: read_at: {e}"))?;
        self.check_views(&words, what)?;
        Ok((words, len))
    }

    /// Loads through both mappings and device reads through both read `words` (the pages
    /// inside the file).
    fn check_views(&self, words: &[u32], what: &str) -> Result<(), String> {
        for map in [Map::A, Map::B] {
            let (first, pages) = map.pages();
            let last = (first * WPP + pages * WPP).min(words.len());
            for (w, &want) in words.iter().enumerate().take(last).skip(first * WPP) {
                let v = self.load(map, w);
                if v != want {
                    return Err(format!(
                        "{what}: load through {map:?} of word {w} (offset {}): {v:#010x}, read_at {want:#010x}",
                        w * 4
                    ));
                }
            }
            let whole = (last / WPP).saturating_sub(first);
            if whole > 0 {
                let mut buf = vec![0u8; whole * PAGE];
                self.mirror
                    .read(
                        VirtAddr(self.addr(map, first * WPP)),
                        whole * PAGE,
                        &mut buf,
                    )
                    .map_err(|e| format!("{what}: device read through {map:?}: {e}"))?;
                let got = words_of(&buf);
                if let Some(i) = (0..got.len()).find(|&i| got[i] != words[first * WPP + i]) {
                    let w = first * WPP + i;
                    return Err(format!(
                        "{what}: device read through {map:?} of word {w} (offset {}): {:#010x}, read_at {:#010x}",
                        w * 4,
                        got[i],
                        words[w]
                    ));
                }
            }
        }
        Ok(())
    }

    /// fsync, then the disk must be exactly `words`, and a fresh cache must read it.
    fn check_durable(&self, words: &[u32], what: &str) -> Result<(), String> {
        self.h0.fsync().map_err(|e| format!("{what}: fsync: {e}"))?;
        let want = bytes_of(words);
        let disk = self.file.disk();
        if disk != want {
            let first = disk.iter().zip(&want).position(|(a, b)| a != b);
            return Err(format!(
                "{what}: the disk after an Ok fsync differs from the model: disk {} bytes, model {}, first differing byte {first:?}",
                disk.len(),
                want.len()
            ));
        }
        let fresh = FileCache::open(&self.file.0, false, cfg())
            .map_err(|e| format!("{what}: reopen: {e}"))?;
        let fh = fresh.handle();
        let mut buf = vec![0u8; want.len() + 8];
        let n = fh
            .read_at(0, &mut buf)
            .map_err(|e| format!("{what}: reopen read: {e}"))?;
        if buf[..n] != want[..] {
            return Err(format!(
                "{what}: a fresh cache of the file reads {n} bytes unlike the model ({} bytes)",
                want.len()
            ));
        }
        Ok(())
    }

    /// The checks at a barrier: the state is valid, becomes the model, is durable; then maybe
    /// a deep truncate; the histories restart from the model.
    fn barrier(&self, round: usize, counts: &Counts) -> Result<(), String> {
        let what = format!("barrier after round {round}");
        at(format!("main: {what}"));
        let (mut words, mut len) = self.quiescent_state(&what)?;
        let mut rng = Rng::new(mix(self.case_seed, 3000 + round as u64));
        if len < STABLE_BYTES {
            // After a round of system calls only: the mappings must lie inside the file again.
            let l = rng.range(STABLE_PAGES * WPP, MAX_WORDS + 1) as u64 * 4;
            at(format!("main: {what}: set_len({l})"));
            self.h0
                .set_len(l)
                .map_err(|e| format!("{what}: set_len({l}): {e}"))?;
            words.resize(l as usize / 4, 0);
            len = l;
        }
        self.check_durable(&words, &what)?;
        if rng.chance(1, 2) {
            self.deep_truncate(&mut rng, &mut words, &mut len, &what)?;
            counts.deep_truncates.fetch_add(1, Ordering::Relaxed);
        }
        self.hist.reset(&words, len, Kind::Model);
        Ok(())
    }

    /// Stores through both mappings around a cut, `set_len` to the cut (below the mapped
    /// pages), then back to at least `STABLE_PAGES`: the words past the cut read as zeros
    /// everywhere, the stores before it stay.
    fn deep_truncate(
        &self,
        rng: &mut Rng,
        words: &mut Vec<u32>,
        len: &mut u64,
        what: &str,
    ) -> Result<(), String> {
        let cut = if rng.chance(1, 2) {
            rng.below(STABLE_PAGES) * WPP
        } else {
            rng.below(STABLE_PAGES * WPP)
        };
        let what = format!("{what}: deep truncate to {}", cut * 4);
        at(format!("main: {what}"));
        for k in 0..24 {
            let map = if k % 2 == 0 { Map::A } else { Map::B };
            let (first, pages) = map.pages();
            let w = rng.range(first * WPP, (first + pages) * WPP);
            let v = mix(self.case_seed, rng.next()) as u32 | 1;
            self.store(map, w, v);
            words[w] = v;
        }
        self.h0
            .set_len((cut * 4) as u64)
            .map_err(|e| format!("{what}: set_len: {e}"))?;
        words.truncate(cut);
        let l = self.h0.len();
        if l != (cut * 4) as u64 {
            return Err(format!("{what}: len() {l} after the cut"));
        }
        let mut buf = vec![0u8; cut * 4 + PAGE];
        let n = self
            .h0
            .read_at(0, &mut buf)
            .map_err(|e| format!("{what}: read_at: {e}"))?;
        if buf[..n] != bytes_of(words)[..] {
            return Err(format!(
                "{what}: read_at after the cut differs from the model"
            ));
        }
        if !cut.is_multiple_of(WPP) {
            // Stores past the end of file inside the last (partial) page are allowed (no
            // SIGBUS) and must never become file data: the extension below reads zeros there.
            let map = if cut / WPP < B.0 { Map::A } else { Map::B };
            for k in 0..4 {
                let w = rng.range(cut, (cut / WPP + 1) * WPP);
                self.store(map, w, 0xdead_0000 | k);
            }
        }
        let back = rng.range(STABLE_PAGES * WPP, MAX_WORDS + 1) * 4;
        words.resize(back / 4, 0);
        *len = back as u64;
        if rng.chance(1, 2) {
            self.h0
                .set_len(back as u64)
                .map_err(|e| format!("{what}: set_len({back}): {e}"))?;
        } else {
            // Extended by a write past the end instead.
            let v = mix(self.case_seed, rng.next()) as u32 | 1;
            self.h0
                .write_at(back as u64 - 4, &v.to_ne_bytes())
                .map_err(|e| format!("{what}: write_at({}): {e}", back - 4))?;
            words[back / 4 - 1] = v;
        }
        let (got, l) = {
            let mut buf = vec![0u8; back + PAGE];
            let n = self
                .h0
                .read_at(0, &mut buf)
                .map_err(|e| format!("{what}: read_at: {e}"))?;
            (words_of(&buf[..n]), n)
        };
        if l != back {
            return Err(format!("{what}: read {l} bytes after extending to {back}"));
        }
        if let Some(w) = (0..got.len()).find(|&w| got[w] != words[w]) {
            return Err(format!(
                "{what}: after extending to {back}, word {w} (offset {}) reads {:#010x}, model {:#010x}",
                w * 4,
                got[w],
                words[w]
            ));
        }
        self.check_views(words, &what)?;
        self.check_durable(words, &what)
    }

    /// Syncs, drops everything and reads the file through a fresh cache.
    fn finish(mut self) -> Result<(usize, usize), String> {
        at("main: final check");
        let (words, _) = self.quiescent_state("final")?;
        self.h0.fsync().map_err(|e| format!("final fsync: {e}"))?;
        let stats = self.cache.stats();
        drop(self.bg.take());
        let Case {
            file,
            cache,
            h0,
            space,
            mirror,
            dev,
            ..
        } = self;
        drop(mirror);
        drop(dev);
        drop(space);
        h0.fsync().map_err(|e| format!("final fsync: {e}"))?;
        drop(h0);
        drop(cache);
        let fresh = FileCache::open(&file.0, false, cfg()).unwrap();
        let fh = fresh.handle();
        let want = bytes_of(&words);
        let mut buf = vec![0u8; want.len() + 8];
        let n = fh
            .read_at(0, &mut buf)
            .map_err(|e| format!("final reopen read: {e}"))?;
        if buf[..n] != want[..] {
            return Err(format!(
                "final: a fresh cache reads {n} bytes unlike the model ({} bytes)",
                want.len()
            ));
        }
        Ok((
            stats.pages_evicted as usize,
            stats.pages_written_back as usize,
        ))
    }
}

/// Runs case `case` of `seed` with `threads` workers; a failure says what and where.
fn run_case(seed: u64, case: u64, threads: usize, counts: &Counts) -> Result<(), String> {
    let c = Case::new(seed, case, threads);
    let ops_per_round = OPS_PER_CASE / (threads * ROUNDS);
    let start = Barrier::new(threads + 1);
    let end = Barrier::new(threads + 1);
    let quit = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let failure = Mutex::new(None::<String>);
    std::thread::scope(|s| {
        for me in 0..threads {
            let (c, start, end, quit, stop, failure) = (&c, &start, &end, &quit, &stop, &failure);
            std::thread::Builder::new()
                .name(format!("conc-{me}"))
                .spawn_scoped(s, move || {
                    c.worker(me, ops_per_round, start, end, quit, stop, failure, counts)
                })
                .unwrap();
        }
        for round in 0..ROUNDS {
            at(format!("main: round {round} running"));
            start.wait();
            end.wait();
            let mut r = match failure.lock().unwrap().take() {
                Some(f) => Err(f),
                None => Ok(()),
            };
            if r.is_ok() {
                r = std::panic::catch_unwind(AssertUnwindSafe(|| c.barrier(round, counts)))
                    .unwrap_or_else(|_| Err(format!("barrier after round {round} panicked")));
            }
            if let Err(e) = r {
                if round + 1 < ROUNDS {
                    quit.store(true, Ordering::SeqCst);
                    start.wait();
                }
                *failure.lock().unwrap() = Some(e);
                return;
            }
        }
    });
    if let Some(f) = failure.into_inner().unwrap() {
        return Err(f);
    }
    counts
        .torn
        .fetch_add(c.hist.torn.load(Ordering::Relaxed), Ordering::Relaxed);
    let (evicted, written) = c.finish()?;
    counts.evicted.fetch_add(evicted, Ordering::Relaxed);
    counts.written_back.fetch_add(written, Ordering::Relaxed);
    Ok(())
}

#[test]
fn concurrent_file_operations_are_linearisable() {
    let soak = soak() as u64;
    let _w = watchdog("file_concurrent_model", 60 * soak);
    let seed = seed_from_env("HETMEM_CONC_SEED");
    eprintln!("file_concurrent_model: seed {seed} (rerun with HETMEM_CONC_SEED={seed})");
    let counts = Counts::default();
    let t0 = std::time::Instant::now();
    for case in 0..CASES * soak {
        let threads = 2 + (case % 3) as usize;
        at(format!("main: case {case} ({threads} threads)"));
        if let Err(e) = run_case(seed, case, threads, &counts) {
            panic!(
                "file_concurrent_model: case {case} ({threads} threads) failed (seed {seed}, rerun with HETMEM_CONC_SEED={seed}):\n{e}"
            );
        }
    }
    let by_kind: Vec<String> = OP_NAMES
        .iter()
        .zip(&counts.by_kind)
        .map(|(n, c)| format!("{n} {}", c.load(Ordering::Relaxed)))
        .collect();
    let ops = counts.ops.load(Ordering::Relaxed);
    let evicted = counts.evicted.load(Ordering::Relaxed);
    let written = counts.written_back.load(Ordering::Relaxed);
    eprintln!(
        "file_concurrent_model: {ops} operations ({}), {evicted} pages evicted, {written} written back, {} deep truncates, device busy {}, {} torn words accepted, {:?}",
        by_kind.join(", "),
        counts.deep_truncates.load(Ordering::Relaxed),
        counts.dev_busy.load(Ordering::Relaxed),
        counts.torn.load(Ordering::Relaxed),
        t0.elapsed()
    );
    assert!(
        evicted > 0 && written > 0,
        "no eviction or no writeback: the test does not exercise them"
    );
}
