//! The CPU fault path never allocates: a counting global allocator (counting per thread, so
//! that only the faulting thread's allocations count — in signal mode the fault is served in
//! the faulting thread, inside its SIGBUS handler) is read around loops of real faults of every
//! kind hetmem serves in the faulting thread: anonymous first touch (zero-fill), a read of a
//! never-written page (the zero page) and a store to it, fault-back of
//! a device-private page, revocation of device-exclusive access, a store to a page a declined
//! migration left write-protected, a page dropped by a direct `madvise`, the first load of a
//! shared file page (a fill from the file), the first access to a private file page, a store
//! intercepted by a mapping that intercepts stores, and fills next to pages lost to a memory
//! failure. Setup (mapping, migration) may allocate; only the faults are counted.
//!
//! Why it matters: once a program's own heap is managed memory, `malloc` itself can fault while
//! holding its arena lock, and a fault handler that allocates would deadlock on it.

mod common;
use common::*;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use hetmem::pagecache::{CacheConfig, FileCache};
use hetmem::space::Probe;
use hetmem::*;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` unchanged; the count is a const thread-local
// (no lazy initialisation, no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by `System` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

/// Allocations made by this thread while `f` runs.
fn counted(f: impl FnOnce()) -> u64 {
    let before = allocs();
    f();
    allocs() - before
}

const N: usize = 64;

/// A real load of the word at `a` through `probe` (lock-free: only the fault path runs).
fn load(probe: &Probe, a: VirtAddr) -> u32 {
    probe.load_u32(a).unwrap()
}

/// A real store of `v` at `a` through `probe`.
fn store(probe: &Probe, a: VirtAddr, v: u32) {
    probe.store_u32(a, v).unwrap()
}

#[test]
fn anonymous_faults_allocate_nothing() {
    let _w = watchdog("fault_alloc_anon", 60);
    let s = small_space();
    let a = s.map_anon(N * PAGE, Prot::ReadWrite).unwrap();
    let pa = s.probe(a, N * PAGE).unwrap();
    // First touch: zero-fill (fault-around fills runs; every page is touched).
    let n = counted(|| {
        for i in 0..N {
            store(&pa, a.add(i * PAGE), i as u32);
        }
    });
    assert_eq!(n, 0, "first touch allocated {n} times");
    // Fault-back of device-private pages.
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&s).unwrap();
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    let n = counted(|| {
        for i in 0..N {
            assert_eq!(load(&pa, a.add(i * PAGE)), i as u32);
        }
    });
    assert_eq!(n, 0, "fault-back allocated {n} times");
    // Revocation of device-exclusive access.
    let mut buf = vec![0u8; N * PAGE];
    m.exclusive(a, N * PAGE, &mut buf).unwrap();
    let n = counted(|| {
        for i in 0..N {
            assert_eq!(load(&pa, a.add(i * PAGE)), i as u32);
        }
    });
    assert_eq!(n, 0, "exclusive revocation allocated {n} times");
    // Pages dropped behind hetmem's back (a direct madvise): refilled with zeros.
    // SAFETY: `a..a + N pages` is managed memory of `s` (mapped above), where no Rust object
    // lives.
    unsafe { hetmem::sys::madvise_dontneed(a.get(), N * PAGE) }.unwrap();
    let n = counted(|| {
        for i in 0..N {
            assert_eq!(load(&pa, a.add(i * PAGE)), 0);
        }
    });
    assert_eq!(n, 0, "refilling dropped pages allocated {n} times");
    // Reads of never-written pages (the zero page), then stores to them (a private copy).
    let z = s.map_anon(N * PAGE, Prot::ReadWrite).unwrap();
    let pz = s.probe(z, N * PAGE).unwrap();
    let n = counted(|| {
        for i in 0..N {
            assert_eq!(load(&pz, z.add(i * PAGE)), 0);
        }
    });
    assert_eq!(n, 0, "mapping the zero page allocated {n} times");
    let n = counted(|| {
        for i in 0..N {
            store(&pz, z.add(i * PAGE), i as u32 + 1);
        }
    });
    assert_eq!(n, 0, "stores to the zero page allocated {n} times");
    assert_eq!(load(&pz, z.add(3 * PAGE)), 4);
}

#[test]
fn file_faults_allocate_nothing() {
    let _w = watchdog("fault_alloc_file", 60);
    let content = pattern(N * PAGE, |i| i);
    let f = TempFile::new("fault-alloc", &content);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let s = small_space();
    // Shared mapping: first loads fill the cache from the file (random order: no fault-around).
    let a = s.map_file(&h, 0, N * PAGE, Prot::ReadWrite, true).unwrap();
    let pa = s.probe(a, N * PAGE).unwrap();
    let n = counted(|| {
        for k in 0..N {
            let i = (k * 37) % N;
            assert_eq!(load(&pa, a.add(i * PAGE)), (i * PAGE / 4) as u32);
        }
    });
    assert_eq!(n, 0, "shared file fills allocated {n} times");
    // Private mapping of a second file: first accesses read the file into anonymous pages.
    let f2 = TempFile::new("fault-alloc-private", &content);
    let c2 = FileCache::open(&f2.0, false, CacheConfig::default()).unwrap();
    let h2 = c2.handle();
    let p = s
        .map_file(&h2, 0, N * PAGE, Prot::ReadWrite, false)
        .unwrap();
    let pp = s.probe(p, N * PAGE).unwrap();
    let n = counted(|| {
        for k in 0..N {
            let i = (k * 37) % N;
            assert_eq!(load(&pp, p.add(i * PAGE)), (i * PAGE / 4) as u32);
        }
    });
    assert_eq!(n, 0, "private file fills allocated {n} times");
    // A mapping that intercepts stores: the first store to each clean page faults.
    let b = s
        .map_file_with(&h, 0, N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    let pb = s.probe(b, N * PAGE).unwrap();
    let n = counted(|| {
        for i in 0..8 {
            store(&pb, b.add(i * PAGE), 7);
        }
    });
    assert_eq!(n, 0, "intercepted stores allocated {n} times");
    h.fsync().unwrap();
}

/// Fills next to pages lost to a memory failure (fault-around windows that skip them, private
/// fills that stop short of them) allocate nothing either.
#[test]
fn fills_around_pages_lost_to_a_memory_failure_allocate_nothing() {
    let _w = watchdog("fault_alloc_lost", 60);
    let content = pattern(N * PAGE, |i| i);
    let f = TempFile::new("fault-alloc-lost", &content);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let lost = |i: usize| i % 5 == 2;
    for i in (0..N).filter(|&i| lost(i)) {
        h.write_at((i * PAGE) as u64, &[9; PAGE]).unwrap();
        cache.inject_poison(i as u64).unwrap();
    }
    let s = small_space();
    let a = s.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    let p = s.map_file(&h, 0, N * PAGE, Prot::ReadWrite, false).unwrap();
    let (pa, pp) = (s.probe(a, N * PAGE).unwrap(), s.probe(p, N * PAGE).unwrap());
    // In order: the fault-around windows grow over the lost pages.
    let n = counted(|| {
        for i in (0..N).filter(|&i| !lost(i)) {
            assert_eq!(load(&pa, a.add(i * PAGE)), (i * PAGE / 4) as u32);
            assert_eq!(load(&pp, p.add(i * PAGE)), (i * PAGE / 4) as u32);
        }
    });
    assert_eq!(n, 0, "fills around lost pages allocated {n} times");
    assert_eq!(
        cache.lost_pages().len(),
        (0..N).filter(|&i| lost(i)).count()
    );
}

/// Fills past the cache's budget wake the background evictor (a doorbell, no channel message):
/// still nothing allocated in the faulting thread.
#[test]
fn file_fills_over_the_budget_allocate_nothing() {
    let _w = watchdog("fault_alloc_budget", 60);
    let content = pattern(N * PAGE, |i| !i);
    let f = TempFile::new("fault-alloc-budget", &content);
    let cache = FileCache::open(
        &f.0,
        false,
        CacheConfig {
            budget: 8 * PAGE,
            dirty_bound: 4 * PAGE,
        },
    )
    .unwrap();
    let h = cache.handle();
    let s = small_space();
    let a = s.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    let pa = s.probe(a, N * PAGE).unwrap();
    for round in 0..3 {
        let n = counted(|| {
            for k in 0..N {
                let i = (k * 37 + round) % N;
                assert_eq!(load(&pa, a.add(i * PAGE)), !((i * PAGE / 4) as u32));
            }
        });
        assert_eq!(
            n, 0,
            "fills over the budget allocated {n} times (round {round})"
        );
    }
    // The evictor ran (outside the faulting thread) and brought the cache back.
    cache.shrink_to_budget();
    assert!(cache.cached_bytes() <= 8 * PAGE);
}

/// An intercepted store at the dirty bound does not write back inside the fault (unbounded work,
/// allocating): the background thread writes back while the store waits with no lock held.
/// Nothing is allocated in the storing thread, and every store reaches the file.
#[test]
fn intercepted_stores_at_the_dirty_bound_allocate_nothing() {
    let _w = watchdog("fault_alloc_dirty_bound", 60);
    let f = TempFile::new("fault-alloc-bound", &vec![0u8; N * PAGE]);
    let cache = FileCache::open(
        &f.0,
        true,
        CacheConfig {
            budget: 256 * PAGE,
            dirty_bound: 4 * PAGE,
        },
    )
    .unwrap();
    let h = cache.handle();
    let s = small_space();
    let b = s
        .map_file_with(&h, 0, N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    let pb = s.probe(b, N * PAGE).unwrap();
    // Fill the cache first (loads), so that only the store faults are counted.
    for i in 0..N {
        load(&pb, b.add(i * PAGE));
    }
    let n = counted(|| {
        for i in 0..N {
            store(&pb, b.add(i * PAGE), i as u32 + 1);
        }
    });
    assert_eq!(n, 0, "stores at the dirty bound allocated {n} times");
    assert!(cache.dirty_bytes() <= 4 * PAGE);
    h.fsync().unwrap();
    let disk = f.disk();
    for i in 0..N {
        assert_eq!(
            &disk[i * PAGE..i * PAGE + 4],
            &(i as u32 + 1).to_ne_bytes(),
            "page {i}"
        );
    }
}

/// A CPU access to a file page in device-private memory brings it back into the cache (two
/// phases: the page is blocked and every device mapping of it invalidated, then its bytes are
/// copied back): nothing allocated in the faulting thread, loads and intercepted stores alike.
#[test]
fn file_pages_coming_back_from_device_memory_allocate_nothing() {
    let _w = watchdog("fault_alloc_file_device", 60);
    let content = pattern(N * PAGE, |i| i);
    let f = TempFile::new("fault-alloc-device", &content);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let s = small_space();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&s).unwrap();
    let a = s
        .map_file_with(&h, 0, N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    let pa = s.probe(a, N * PAGE).unwrap();
    for round in 0..3 {
        m.migrate_range_to_device(a, N * PAGE).unwrap();
        assert_eq!(dev.used(), N * PAGE);
        let n = counted(|| {
            for k in 0..N {
                let i = (k * 37) % N;
                if k % 2 == 0 {
                    assert_eq!(load(&pa, a.add(i * PAGE)), (i * PAGE / 4) as u32);
                } else {
                    store(&pa, a.add(i * PAGE), (i * PAGE / 4) as u32);
                }
            }
        });
        assert_eq!(
            n, 0,
            "round {round}: bringing file pages back allocated {n} times"
        );
        assert_eq!(dev.used(), 0);
    }
    h.fsync().unwrap();
    assert!(f.disk() == content);
}
