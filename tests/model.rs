//! Model-based property test: random sequences of operations on anonymous memory — CPU reads and
//! writes at random offsets and sizes, device reads and writes, migrations both ways, permission
//! changes, unmap and map, pins, device-exclusive access, device release, injected device
//! allocation failures — over a normal and a large (2 MiB unit) mapping, run on the real kernel
//! (userfaultfd) and checked step by step against a plain in-memory model.
//!
//! The operations, the world and the model are `hetmem::testing::check` (shared with the fuzz target in
//! `fuzz/`); this file holds the proptest strategy.
//!
//! CI runs `CASES × OPS` operations (≥ 100,000). `HETMEM_SOAK=N` multiplies the number of cases
//! by N for a longer soak. A failure prints proptest's seed and the shrunk sequence.

mod common;
mod plain;
use common::*;
use hetmem::testing::check::{LARGE_PAGES, Op, World, apply, check_all, pages_of};
use hetmem::{LARGE_PAGE_SIZE, PAGE_SIZE as PAGE};
use plain::{Plain, adopt_plain};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CASES: u32 = 220;
const OPS: usize = 480;

fn op_strategy() -> impl Strategy<Value = Op> {
    let m = prop_oneof![3 => Just(0usize), 1 => Just(1usize)];
    // Mostly short ranges; sometimes a whole 2 MiB unit (aligned or not), so that large units
    // migrate whole and ranges start inside them.
    let len = prop_oneof![12 => 1usize..64, 1 => Just(512usize)];
    let range = (m, any::<u16>(), len, any::<bool>()).prop_map(|(m, p, n, aligned)| {
        let pages = pages_of(m);
        let page = if aligned && n == 512 {
            (p as usize % 2) * 512 % pages
        } else {
            p as usize % pages
        };
        (m, page, n.min(pages - page))
    });
    prop_oneof![
        6 => (range.clone(), any::<u16>(), 1usize..9000, any::<u8>()).prop_map(|((m, page, _), o, len, byte)| {
            let off = page * PAGE + o as usize % PAGE;
            Op::CpuWrite { m, off, len: len.min(pages_of(m) * PAGE - off), byte }
        }),
        5 => (range.clone(), any::<u16>(), 1usize..9000).prop_map(|((m, page, _), o, len)| {
            let off = page * PAGE + o as usize % PAGE;
            Op::CpuRead { m, off, len: len.min(pages_of(m) * PAGE - off) }
        }),
        4 => range.clone().prop_map(|(m, page, n)| Op::DevRead { m, page, n }),
        3 => (range.clone(), any::<u8>()).prop_map(|((m, page, n), byte)| Op::DevWrite { m, page, n, byte }),
        5 => range.clone().prop_map(|(m, page, n)| Op::ToDev { m, page, n }),
        3 => range.clone().prop_map(|(m, page, n)| Op::ToSys { m, page, n }),
        2 => range.clone().prop_map(|(m, page, n)| Op::CohRead { m, page, n }),
        1 => (range.clone(), any::<u8>()).prop_map(|((m, page, n), byte)| Op::CohWrite { m, page, n, byte }),
        3 => range.clone().prop_map(|(m, page, n)| Op::CohToDev { m, page, n }),
        2 => range.clone().prop_map(|(m, page, n)| Op::CohToSys { m, page, n }),
        2 => (range.clone(), 0u8..3).prop_map(|((m, page, n), prot)| Op::Protect { m, page, n, prot }),
        1 => range.clone().prop_map(|(m, page, n)| Op::Unmap { m, page, n }),
        2 => (0usize..2).prop_map(|m| Op::Remap { m }),
        1 => (range.clone(), any::<bool>()).prop_map(|((m, page, n), long)| Op::Pin { m, page, n, long }),
        1 => Just(Op::Unpin),
        2 => range.prop_map(|(m, page, n)| Op::Exclusive { m, page, n }),
        1 => Just(Op::Release),
        1 => Just(Op::FailNextAlloc),
    ]
}

/// Runs the suite: `CASES` sequences of `OPS` random operations, each on a fresh world from
/// `world`, checked step by step and read back whole at the end.
fn run_suite(name: &'static str, world: impl Fn(&[Op]) -> Result<(), TestCaseError>) {
    run_cases(name, CASES, world)
}

/// [`run_suite`] with `cases` sequences.
fn run_cases(name: &'static str, cases: u32, world: impl Fn(&[Op]) -> Result<(), TestCaseError>) {
    let soak = soak();
    let _w = watchdog(name, 300 * soak as u64);
    let cfg = Config {
        cases: cases * soak,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new(cfg)
        .run(&proptest::collection::vec(op_strategy(), OPS), |ops| {
            world(&ops)
        })
        .unwrap();
}

/// Applies `ops` to `w` and reads every page back.
fn apply_all(w: &mut World, ops: &[Op]) -> Result<(), TestCaseError> {
    for op in ops {
        apply(w, op).map_err(TestCaseError::fail)?;
    }
    check_all(w).map_err(TestCaseError::fail)
}

#[test]
fn random_operations_match_the_model() {
    run_suite("model", |ops| {
        let mut w = World::new().map_err(|e| TestCaseError::fail(format!("world: {e}")))?;
        apply_all(&mut w, ops)
    });
}

/// The same suite under hetmem's own policy (`policy::adaptive`): device reads make read-only
/// replicas of system pages (the normal mapping's; the large one's units are read where they
/// are), device writes migrate, so replicas meet every other operation: CPU stores, device
/// writes, migrations both ways, protection changes, unmaps, pins, exclusive access, release.
#[test]
fn random_operations_under_hetmems_policy_match_the_model() {
    run_cases("model_adaptive", CASES / 2, |ops| {
        let mut w = World::new().map_err(|e| TestCaseError::fail(format!("world: {e}")))?;
        w.space.set_policy(std::sync::Arc::new(
            hetmem::policy::adaptive::AdaptivePolicy::new(),
        ));
        apply_all(&mut w, ops)
    });
}

/// The same suite over adopted memory (`Space::adopt` of the test's own mmap, with the large
/// mapping made large by `advise_large`): every operation gives the same answers and every byte
/// reads back as the model says; unmapping is refused there (adopted memory is the program's).
#[test]
fn random_operations_on_adopted_memory_match_the_model() {
    adopted_suite("model_adopted", CASES, false);
}

/// The adopted suite under hetmem's own policy: replicas of the program's own pages.
#[test]
fn random_operations_on_adopted_memory_under_hetmems_policy_match_the_model() {
    adopted_suite("model_adopted_adaptive", CASES / 2, true);
}

fn adopted_suite(name: &'static str, cases: u32, adaptive: bool) {
    run_cases(name, cases, |ops| {
        // Mapping 0 in the first 2 MiB unit, mapping 1 in the two after it: one plain mapping,
        // adopted whole.
        let len = LARGE_PAGE_SIZE + LARGE_PAGES * PAGE;
        let mem = Plain::new(len + LARGE_PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
        let base = mem.addr.next_multiple_of(LARGE_PAGE_SIZE);
        let space = adopt_plain(hetmem::VirtAddr(base), len)
            .map_err(|e| TestCaseError::fail(format!("adopt: {e}")))?;
        let large = hetmem::VirtAddr(base + LARGE_PAGE_SIZE);
        space
            .advise_large(large, LARGE_PAGES * PAGE)
            .map_err(|e| TestCaseError::fail(format!("advise_large: {e}")))?;
        let mut w = World::over(space, [hetmem::VirtAddr(base), large])
            .map_err(|e| TestCaseError::fail(format!("world: {e}")))?;
        if adaptive {
            w.space.set_policy(std::sync::Arc::new(
                hetmem::policy::adaptive::AdaptivePolicy::new(),
            ));
        }
        let checked = apply_all(&mut w, ops);
        // Every handle goes (the memory is given back) before the mapping is unmapped.
        drop(w);
        drop(mem);
        checked
    });
}
