//! Model-based property test of hetmem's page cache for files (`hetmem::pagecache`).
//!
//! Random sequences of operations on a real temporary file cached with a small budget (8 pages:
//! eviction happens all the time) and a dirty bound of 6 pages: `write_at`, `read_at`,
//! `set_len`, `punch_hole`, `fsync`/`fdatasync` on either of two handles, direct I/O, a fresh
//! second handle, injected I/O faults (EIO, ENOSPC, short writes, failed syncs and reads) and
//! staging faults (the memfd cannot grow), and, in half of the cases, word stores and loads
//! through a shared mapping of the file (a quarter of all cases intercepting stores, a quarter
//! tracking them asynchronously), device reads and writes through a software device mirroring
//! it, stores and loads through a private mapping checked against per-page snapshots (migrated
//! to the device and back), protect cycles, unmap/remap of both mappings, pins, and device
//! removal. In every case file pages are placed on a device-private and a device-coherent
//! device (through the cache, and with the mappings through the devices' migrate commands),
//! brought back, the devices released or removed, and every other operation runs on placed
//! pages: the model of the bytes ignores placement, and the placement of every page and each
//! device's used memory are checked against a model of the placement rules. In half of the
//! cases ("sparse") the whole file is read back only every few operations, so that longer runs
//! reach states that full reads would hide.
//!
//! The operations, the world, the model and every check are `hetmem::testing::check_file` (shared with
//! the fuzz target `fuzz/fuzz_targets/file_ops.rs`; its module doc lists the checks: after
//! every operation the file reads as the model through either handle, failed writes change
//! nothing and fail only when an injected fault fired, `fsync` reports each writeback error
//! event once per handle and after an Ok one the disk equals the model, the dirty bound and
//! the budget hold; at the end the file is synced, the world dropped and the file reopened in a
//! fresh cache). This file holds the proptest strategy and the runner, and checks that every
//! error path was taken at least once over all cases.
//!
//! CI runs `CASES` cases of up to `MAX_OPS` operations (about 15,000 operations, 1–3 s in
//! release; far more when the disk is busy: every case creates, fsyncs and removes a real
//! file). `HETMEM_SOAK=N` multiplies the number of cases by N (about 1.3 s per unit of N;
//! past N = 80 use `cargo test`, as nextest's slow-timeout ends a test at 120 s). A failure
//! prints the seed (rerun the same cases with `HETMEM_CACHE_SEED=<seed>`) and proptest's shrunk
//! sequence of operations; failures are not persisted (`failure_persistence: None`).

mod common;
use common::*;

use std::sync::Mutex;

use hetmem::testing::check_file::{
    Fault, MAP_LEN, MAX_IO, MAX_PLACE, Op, Stats, WINDOW, World, apply, check_all, data,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

const CASES: u32 = 256;
const MAX_OPS: usize = 120;

fn op_strategy() -> impl Strategy<Value = Op> {
    let h = 0usize..2;
    let off = prop_oneof![
        3 => 0..WINDOW * PAGE,
        1 => (0..WINDOW).prop_map(|p| p * PAGE),
    ];
    let len = prop_oneof![
        3 => 1..=MAX_IO,
        1 => (1..=3usize).prop_map(|p| p * PAGE),
        1 => 1usize..64,
    ];
    let errno = prop_oneof![Just(libc::EIO), Just(libc::ENOSPC)];
    let fault = prop_oneof![
        (1u32..=2, errno.clone()).prop_map(|(n, e)| Fault::FailWrites(n, e)),
        Just(Fault::ShortWrite),
        errno.clone().prop_map(Fault::FailSync),
        errno.clone().prop_map(Fault::FailRead),
        prop_oneof![Just(libc::ENOMEM), Just(libc::ENOSPC)].prop_map(Fault::FailStaging),
        Just(Fault::Clear),
    ];
    prop_oneof![
        10 => (h.clone(), off.clone(), len.clone(), any::<u32>())
            .prop_map(|(h, off, len, seed)| Op::Write { h, off, len, seed }),
        4 => (h.clone(), off.clone(), 0..=MAX_IO).prop_map(|(h, off, len)| Op::Read { h, off, len }),
        2 => prop_oneof![0..=WINDOW * PAGE, (0..=WINDOW).prop_map(|p| p * PAGE)]
            .prop_map(|len| Op::SetLen { len }),
        2 => (0..WINDOW + 1, 1usize..=3).prop_map(|(page, pages)| Op::Punch { page, pages }),
        4 => (h.clone(), any::<bool>()).prop_map(|(h, data_only)| Op::Fsync { h, data_only }),
        2 => (h.clone(), off.clone(), 0..=MAX_IO).prop_map(|(h, off, len)| Op::DirectRead { h, off, len }),
        2 => (h, off, len, any::<u32>())
            .prop_map(|(h, off, len, seed)| Op::DirectWrite { h, off, len, seed }),
        1 => Just(Op::NewHandle),
        3 => fault.prop_map(Op::Fault),
        5 => (0..MAP_LEN / 4, 1..=MAX_IO / 4, any::<u32>())
            .prop_map(|(w, words, seed)| Op::MapStore { off: w * 4, words, seed }),
        3 => (0..MAP_LEN / 4, 1..=MAX_IO / 4)
            .prop_map(|(w, words)| Op::MapLoad { off: w * 4, words }),
        1 => any::<bool>().prop_map(|unmap| Op::Remap { unmap }),
        1 => any::<bool>().prop_map(|coherent| Op::DeviceRemoval { coherent }),
        2 => proptest::option::of((0..MAP_LEN / PAGE, 1usize..=3, any::<bool>(), any::<bool>()))
            .prop_map(Op::Pin),
        2 => (0..MAP_LEN / PAGE, 1usize..=4, any::<bool>())
            .prop_map(|(page, pages, to_device)| Op::PrivateMigrate { page, pages, to_device }),
        4 => (0..MAP_LEN / 4, 1..=MAX_IO / 4, proptest::option::of(any::<u32>()))
            .prop_map(|(w, words, store)| Op::Private { off: w * 4, words, store }),
        3 => (0..MAP_LEN / PAGE, 1usize..=3, proptest::option::of(any::<u32>()), any::<bool>())
            .prop_map(|(page, pages, write, coherent)| Op::Device { page, pages, write, coherent }),
        4 => (0..MAP_LEN / PAGE, 1..=MAX_PLACE, any::<bool>(), any::<bool>())
            .prop_map(|(page, pages, coherent, mirror)| Op::Place { page, pages, coherent, mirror }),
        2 => (0..MAP_LEN / PAGE, 1..=MAX_PLACE, any::<bool>(), any::<bool>())
            .prop_map(|(page, pages, coherent, mirror)| Op::Unplace { page, pages, coherent, mirror }),
        1 => any::<bool>().prop_map(|coherent| Op::Release { coherent }),
        3 => (0..MAP_LEN / PAGE, 1..=MAX_PLACE, any::<bool>())
            .prop_map(|(page, pages, mirror)| Op::Replicate { page, pages, mirror }),
    ]
}

/// Runs one case (a file, or with `anon` shared anonymous memory); if it passes, adds its
/// world's counts to `stats`.
fn run_case(
    initial: &[u8],
    sparse: bool,
    mapped: Option<bool>,
    anon: bool,
    ops: &[Op],
    stats: &Mutex<Stats>,
) -> Result<(), TestCaseError> {
    let mut w = if anon {
        World::new_anonymous(initial, sparse, mapped)
    } else {
        World::new(initial, sparse, mapped)
    }
    .map_err(TestCaseError::fail)?;
    for (i, op) in ops.iter().enumerate() {
        at(format!("op {i}: {op:?}"));
        apply(&mut w, op).map_err(TestCaseError::fail)?;
    }
    let s = check_all(w).map_err(TestCaseError::fail)?;
    stats.lock().unwrap().add(&s);
    Ok(())
}

/// Runs `cases` (× `HETMEM_SOAK`) random cases of file worlds (`anon`: shared anonymous
/// memory) from the seed in `seed_var` (or the clock); panics with the seed and the shrunk case
/// on a mismatch. Returns the counts of every case.
fn explore(what: &str, seed_var: &str, cases: u32, anon: bool) -> Stats {
    let soak = soak();
    let seed = seed_from_env(seed_var);
    eprintln!("{what}: seed {seed} (rerun with {seed_var}={seed})");
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let cfg = Config {
        cases: cases * soak,
        failure_persistence: None,
        max_shrink_iters: 20_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(cfg, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let initial = (0..=4 * PAGE, any::<u32>()).prop_map(|(len, seed)| data(seed, len));
    let strategy = (
        initial,
        any::<bool>(),
        prop_oneof![2 => Just(None), 1 => Just(Some(true)), 1 => Just(Some(false))],
        proptest::collection::vec(op_strategy(), 1..=MAX_OPS),
    );
    let stats = Mutex::new(Stats::default());
    let r = runner.run(&strategy, |(initial, sparse, mapped, v)| {
        run_case(&initial, sparse, mapped, anon, &v, &stats)
    });
    if let Err(e) = r {
        panic!("{what} failed (seed {seed}, rerun with {seed_var}={seed}):\n{e}");
    }
    stats.into_inner().unwrap()
}

#[test]
fn random_file_operations_match_the_model() {
    let _w = watchdog("file_cache_model", 60 * soak() as u64);
    let t0 = std::time::Instant::now();
    let s = explore("file cache model", "HETMEM_CACHE_SEED", CASES, false);
    eprintln!(
        "file_cache_model: {} operations, {} pages evicted, fsync {} Ok and {} Err, {} writes refused, {} direct I/O errors, {} bytes stored through the mapping, {} staging faults, {} private words, {} private pages migrated, {} file pages placed on devices, {} placements refused, {} placements on a full device ({} with no room at all), {} pages brought back, {} replicas made, {} dropped, {} refused, {:?}",
        s.ops,
        s.evicted,
        s.fsync_ok,
        s.fsync_err,
        s.writes_refused,
        s.direct_errors,
        s.mapped_bytes,
        s.staging_faults,
        s.private_words,
        s.private_pages_migrated,
        s.pages_placed,
        s.placements_refused,
        s.device_full,
        s.device_full_enomem,
        s.pages_returned,
        s.replicas_made,
        s.replicas_dropped,
        s.replicas_refused,
        t0.elapsed()
    );
    assert!(
        s.evicted > 0,
        "the budget never evicted a page: the test does not exercise eviction"
    );
    assert!(
        s.fsync_err > 0
            && s.writes_refused > 0
            && s.direct_errors > 0
            && s.mapped_bytes > 0
            && s.staging_faults > 0
            && s.private_words > 0
            && s.private_pages_migrated > 0
            && s.pages_placed > 0
            && s.placements_refused > 0
            && s.device_full > 0
            && s.device_full_enomem > 0
            && s.pages_returned > 0
            && s.replicas_made > 0
            && s.replicas_dropped > 0
            && s.replicas_refused > 0,
        "an error path was never taken: {s:?}"
    );
}

/// The same operations and checks on shared anonymous memory (a cache without a file,
/// `World::new_anonymous`): every placement, replicas, mappings, pins and direct I/O, with no
/// writeback and no eviction of a page that holds data.
#[test]
fn random_shared_anonymous_memory_operations_match_the_model() {
    let _w = watchdog("file_cache_model (shared anonymous)", 60 * soak() as u64);
    let s = explore(
        "shared anonymous memory model",
        "HETMEM_ANON_SEED",
        CASES / 2,
        true,
    );
    eprintln!("file_cache_model (shared anonymous): {s:?}");
    // Nothing is written back, so nothing fails or is refused for it; no page is evicted.
    assert_eq!(
        s.evicted, 0,
        "a page of shared anonymous memory was evicted"
    );
    assert_eq!(s.fsync_err, 0, "an fsync of shared anonymous memory failed");
    assert!(
        s.mapped_bytes > 0
            && s.staging_faults > 0
            && s.private_words > 0
            && s.pages_placed > 0
            && s.placements_refused > 0
            && s.pages_returned > 0
            && s.replicas_made > 0
            && s.replicas_dropped > 0,
        "a path was never taken: {s:?}"
    );
}
