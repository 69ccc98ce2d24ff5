//! Schedule exploration of the core's state machine with `shuttle`, over the in-memory kernel
//! ([`crate::mm::ModelMm`], through [`Space::new_model`]) and the software device.
//!
//! Every test runs its body many times under `shuttle::check_random` and `shuttle::check_pct`
//! (the crate's `sync` facade is shuttle's in this build, so every lock, atomic and thread of
//! the core is a scheduling point), and checks data exactly against a model of what each thread
//! wrote:
//!
//! * [`cpu_fault_vs_migration`]: two CPU writers (each owning one half of every page) and a CPU
//!   reader race a device migrating the same range to device memory and back: every read and
//!   every migrated copy is a value its writer wrote, no older than one seen before; at the end
//!   every page holds each writer's last value.
//! * [`device_read_vs_cpu_write_and_migration`]: device reads (`range_fault` and its
//!   sequence-count retry) race CPU writes, migrations and protection changes: every page a
//!   device read returns is exactly one value its writer wrote (never zeros, never torn), never
//!   older than one the same reader saw before.
//! * [`device_write_vs_cpu_write_and_migration`]: device writes to one page and CPU writes to
//!   its neighbour race a migration of both and a CPU reader: no write is lost or reordered.
//! * [`unmap_vs_device_read`]: `Space::unmap` races device reads, writes and a migration: a read
//!   returns the data or `-EFAULT`, never other data, and never data after an `-EFAULT`; no
//!   device frame leaks.
//! * [`exclusive_vs_cpu_atomics`]: device atomics on device-exclusive pages race CPU
//!   `fetch_add`s that revoke the grant: every fetch-add returns a distinct old value and the
//!   final value is the number of increments.
//! * [`truncate_vs_writeback`]: the page cache's writes, truncate/extend and background
//!   writeback race over an in-memory file: after a final fsync the file equals the cache's view.
//! * [`eviction_vs_device_access`]: device eviction (`SoftDevice::release`) races device writes
//!   and migrations of one page and CPU writes and reads of another: no write is lost, no read
//!   goes back in time, and nothing stays in device memory after a release.
//! * [`file_maps`]: file mappings over the model kernel, which maps the cache's memfd, faults on
//!   its holes and tracks stores: CPU fills vs truncate, punch and direct write; device and CPU
//!   stores vs punch, writeback and fsync; CPU stores vs eviction; intercepted stores vs punch.
//! * [`placements`]: file pages in device memory: truncate and punch vs placement, device writes
//!   vs writeback and fsync, a direct write vs device dirtying, device eviction vs CPU faults
//!   from another space, device writes through an intercepting mapping vs fsync, CPU stores vs
//!   placement.
//!
//! # Iterations and `HETMEM_SOAK`
//!
//! The iteration counts keep the whole model suite at a few seconds per test in both debug and
//! release builds (release runs 20 times more iterations: `cargo nextest run --release --lib`).
//! Set `HETMEM_SOAK=N` to multiply every test's iteration count by `N` for a longer soak (for
//! example `HETMEM_SOAK=50`: about a minute per test in release).
//!
//! CPU accesses go through `Space::cpu_read`/`cpu_write`/`fetch_add_u64` only: a model space
//! has a fake address range, so raw pointers into it are never valid.

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::device::{DeviceMirror, SoftDevice};
use crate::error::Error;
use crate::space::{Residency, Space};
use crate::sync::{Arc, thread};
use crate::sys::Prot;

/// The `HETMEM_SOAK` multiplier (1 when unset or invalid).
fn soak() -> usize {
    std::env::var("HETMEM_SOAK")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// `base` iterations, times the soak multiplier.
fn iters(base: usize) -> usize {
    base * soak()
}

/// Release builds run this many times the iterations of debug builds (an iteration costs about
/// 0.2 ms in release, 3 ms in debug).
const RELEASE_FACTOR: usize = if cfg!(debug_assertions) { 1 } else { 20 };

/// Runs `body` under the random scheduler and under PCT (depth 3), `random` and `pct` times
/// (debug build; see [`RELEASE_FACTOR`] and `HETMEM_SOAK`).
fn explore(random: usize, pct: usize, body: fn()) {
    // One exploration at a time in this process. Address-space ids and pagemap ids are
    // process-wide, and a device's eviction finds the space of a frame through its reverse map
    // (re-checked under that space's lock, so a stale entry is harmless on the real kernel):
    // two tests exploring on two threads at once could reach each other's spaces, whose locks
    // are another shuttle execution's, which shuttle reports as a deadlock or a RefCell borrow
    // panic (seen about one run in five before this lock).
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    shuttle::check_random(body, iters(random * RELEASE_FACTOR));
    shuttle::check_pct(body, iters(pct * RELEASE_FACTOR), 3);
}

/// The value a writer writes to page `p` in round `r` (round 0: never written, reads as zeros).
fn val(r: u32, p: usize) -> u32 {
    if r == 0 {
        0
    } else {
        (r << 16) | (p as u32 + 1)
    }
}

/// The round of `v` as a value of page `p`; panics if `v` is not a value of page `p`.
fn round_of(v: u32, p: usize, what: &str) -> u32 {
    if v == 0 {
        return 0;
    }
    assert_eq!(
        (v & 0xffff) as usize,
        p + 1,
        "{what}: page {p} holds {v:#x}, a value of another page"
    );
    v >> 16
}

/// `len` bytes of `v` repeated as native-endian `u32`s.
fn fill(v: u32, len: usize) -> Vec<u8> {
    v.to_ne_bytes().iter().copied().cycle().take(len).collect()
}

/// The `u32` that `b` repeats; panics (naming `what`) if `b` is torn or garbage.
fn uniform(b: &[u8], what: &str) -> u32 {
    let v = u32::from_ne_bytes(b[..4].try_into().expect("4 bytes"));
    for (i, c) in b.chunks_exact(4).enumerate() {
        let w = u32::from_ne_bytes(c.try_into().expect("4 bytes"));
        assert_eq!(
            w, v,
            "{what}: word {i} is {w:#x}, word 0 is {v:#x} (torn or garbage)"
        );
    }
    v
}

/// A model space with one mapping of `npages` pages and a private software device mirroring it.
struct Fixture {
    mirror: Arc<DeviceMirror>,
    dev: SoftDevice,
    space: Space,
    base: VirtAddr,
}

impl Fixture {
    fn new(npages: usize) -> Fixture {
        let space = Space::new_model(4 << 20).expect("model space");
        let dev = SoftDevice::private(2 << 20).expect("device");
        let mirror = Arc::new(dev.mirror(&space).expect("mirror"));
        let base = space
            .map_anon(npages * PAGE_SIZE, Prot::ReadWrite)
            .expect("map");
        Fixture {
            mirror,
            dev,
            space,
            base,
        }
    }

    fn page(&self, p: usize) -> VirtAddr {
        self.base.add(p * PAGE_SIZE)
    }

    /// Drops in order: the mirror (threads are joined, so this is the last handle), then the
    /// device (evicting what it still holds), then the space.
    fn finish(self) {
        let Fixture {
            mirror, dev, space, ..
        } = self;
        drop(Arc::into_inner(mirror).expect("threads joined: last mirror handle"));
        drop(dev);
        drop(space);
    }
}

fn join<T>(h: thread::JoinHandle<T>) -> T {
    h.join().expect("thread panicked")
}

// ---------------------------------------------------------------------------------------------
// (0) A migration back to system memory that cannot place one page
// ---------------------------------------------------------------------------------------------

/// Eight pages in consecutive device frames come back to system memory in one copy; with the
/// copy into page 3 failing, that run fails and is placed again page by page: exactly page 3 is
/// declined (it stays in device memory, its data intact), the others come back.
fn a_page_that_cannot_come_back_stays_on_the_device_alone_body() {
    const N: usize = 8;
    let f = Fixture::new(N);
    for p in 0..N {
        f.space
            .cpu_write(f.page(p), &fill(val(1, p), PAGE_SIZE))
            .expect("cpu write");
    }
    let mut buf = vec![0u8; N * PAGE_SIZE];
    let out = f
        .mirror
        .migrate_to_device(f.base, N * PAGE_SIZE, &mut buf)
        .expect("to the device");
    assert_eq!(out.cpages, N as u64);
    let owner = f.mirror.owner();
    f.space
        .fail_cpu_installs(Some(crate::addr::VaRange {
            start: f.page(3),
            end: f.page(4),
        }))
        .expect("a model space");
    f.mirror
        .migrate_to_system(f.base, N * PAGE_SIZE)
        .expect("to system memory");
    for p in 0..N {
        let want = if p == 3 {
            Residency::Device(owner)
        } else {
            Residency::System
        };
        assert_eq!(f.space.residency(f.page(p)), want, "page {p}");
    }
    f.space.fail_cpu_installs(None).expect("a model space");
    let mut b = vec![0u8; PAGE_SIZE];
    for p in 0..N {
        f.space.cpu_read(f.page(p), &mut b).expect("cpu read");
        assert_eq!(uniform(&b, "read back"), val(1, p), "page {p}");
    }
    f.finish();
}

#[test]
fn a_page_that_cannot_come_back_stays_on_the_device_alone() {
    shuttle::check_random(
        a_page_that_cannot_come_back_stays_on_the_device_alone_body,
        1,
    );
}

// ---------------------------------------------------------------------------------------------
// (1) CPU faults vs migration
// ---------------------------------------------------------------------------------------------

const T1_PAGES: usize = 3;
const T1_ROUNDS: u32 = 2;
const HALF: usize = PAGE_SIZE / 2;

/// Two writers: writer `k` owns half `k` of every page and writes `val(r, p)` there, rounds
/// 1..=T1_ROUNDS, page by page. A reader reads whole pages; a device migrates the range to
/// device memory and back twice.
fn cpu_fault_vs_migration_body() {
    let f = Fixture::new(T1_PAGES);
    let base = f.base;
    let check_page = |b: &[u8], p: usize, last: &mut [[u32; 2]; T1_PAGES], what: &str| {
        for (k, last) in last[p].iter_mut().enumerate() {
            let v = uniform(&b[k * HALF..(k + 1) * HALF], what);
            let r = round_of(v, p, what);
            assert!(
                r <= T1_ROUNDS,
                "{what}: page {p} half {k}: round {r} was never written"
            );
            assert!(
                r >= *last,
                "{what}: page {p} half {k} went back from round {} to {r}",
                *last
            );
            *last = r;
        }
    };
    let writers: Vec<_> = (0..2)
        .map(|k| {
            let s = f.space.clone();
            thread::spawn(move || {
                for r in 1..=T1_ROUNDS {
                    for p in 0..T1_PAGES {
                        let a = base.add(p * PAGE_SIZE + k * HALF);
                        s.cpu_write(a, &fill(val(r, p), HALF)).expect("cpu write");
                    }
                }
            })
        })
        .collect();
    let reader = {
        let s = f.space.clone();
        thread::spawn(move || {
            let mut last = [[0u32; 2]; T1_PAGES];
            let mut b = vec![0u8; PAGE_SIZE];
            for _ in 0..2 {
                for p in 0..T1_PAGES {
                    s.cpu_read(base.add(p * PAGE_SIZE), &mut b)
                        .expect("cpu read");
                    check_page(&b, p, &mut last, "cpu read");
                }
            }
        })
    };
    let migrator = {
        let m = f.mirror.clone();
        thread::spawn(move || {
            let mut last = [[0u32; 2]; T1_PAGES];
            let mut buf = vec![0u8; T1_PAGES * PAGE_SIZE];
            for _ in 0..2 {
                match m.migrate_to_device(base, T1_PAGES * PAGE_SIZE, &mut buf) {
                    Ok(out) => {
                        assert_eq!(out.cpages, T1_PAGES as u64);
                        for p in 0..T1_PAGES {
                            check_page(
                                &buf[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                                p,
                                &mut last,
                                "migrated copy",
                            );
                        }
                    }
                    // A CPU access brought a page back before the device read the range back
                    // (dmirror's -ENOENT for a page that is not device-mapped).
                    Err(e @ Error::NotPresent { .. }) => assert_eq!(e.errno(), libc::ENOENT),
                    Err(e) => panic!("migrate to device: {e}"),
                }
                m.migrate_to_system(base, T1_PAGES * PAGE_SIZE)
                    .expect("migrate to system");
            }
        })
    };
    for w in writers {
        join(w);
    }
    join(reader);
    join(migrator);
    let mut b = vec![0u8; PAGE_SIZE];
    for p in 0..T1_PAGES {
        f.space.cpu_read(f.page(p), &mut b).expect("final read");
        for k in 0..2 {
            let v = uniform(&b[k * HALF..(k + 1) * HALF], "final read");
            assert_eq!(v, val(T1_ROUNDS, p), "page {p} half {k}: last write lost");
        }
        assert_eq!(f.space.residency(f.page(p)), Residency::System);
    }
    f.finish();
}

#[test]
fn cpu_fault_vs_migration() {
    explore(150, 150, cpu_fault_vs_migration_body);
}

// ---------------------------------------------------------------------------------------------
// (2) Invalidation vs range_fault retry
// ---------------------------------------------------------------------------------------------

const T2_PAGES: usize = 3;
const T2_ROUNDS: u32 = 3;

/// Pages 0..T2_PAGES hold round 1 before the threads start; a writer writes rounds
/// 2..=T2_ROUNDS; a device reads the range (and one extra page whose protection another thread
/// toggles) twice; a migrator moves all of it to device memory and back.
fn device_read_vs_cpu_write_and_migration_body() {
    let f = Fixture::new(T2_PAGES + 1);
    let base = f.base;
    let extra = f.page(T2_PAGES);
    for p in 0..T2_PAGES {
        f.space
            .cpu_write(f.page(p), &fill(val(1, p), PAGE_SIZE))
            .expect("initial write");
    }
    f.space
        .cpu_write(extra, &fill(val(1, T2_PAGES), PAGE_SIZE))
        .expect("initial write");
    let writer = {
        let s = f.space.clone();
        thread::spawn(move || {
            for r in 2..=T2_ROUNDS {
                for p in 0..T2_PAGES {
                    s.cpu_write(base.add(p * PAGE_SIZE), &fill(val(r, p), PAGE_SIZE))
                        .expect("cpu write");
                }
            }
        })
    };
    let reader = {
        let m = f.mirror.clone();
        thread::spawn(move || {
            let mut last = [1u32; T2_PAGES];
            let mut buf = vec![0u8; (T2_PAGES + 1) * PAGE_SIZE];
            for _ in 0..2 {
                m.read(base, (T2_PAGES + 1) * PAGE_SIZE, &mut buf)
                    .expect("device read");
                for (p, last) in last.iter_mut().enumerate() {
                    let v = uniform(&buf[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "device read");
                    let r = round_of(v, p, "device read");
                    assert!(
                        (1..=T2_ROUNDS).contains(&r),
                        "device read: page {p} holds round {r}"
                    );
                    assert!(
                        r >= *last,
                        "device read: page {p} went back from round {} to {r}",
                        *last
                    );
                    *last = r;
                }
                let v = uniform(&buf[T2_PAGES * PAGE_SIZE..], "device read");
                assert_eq!(v, val(1, T2_PAGES), "device read of the protected page");
            }
        })
    };
    let migrator = {
        let m = f.mirror.clone();
        thread::spawn(move || {
            // The whole range, the page whose protection changes included (the protect splits
            // the mapping under the migration's feet).
            let n = T2_PAGES + 1;
            let mut buf = vec![0u8; n * PAGE_SIZE];
            match m.migrate_to_device(base, n * PAGE_SIZE, &mut buf) {
                Ok(_) => {
                    for p in 0..n {
                        let v = uniform(&buf[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "migrated copy");
                        assert!(round_of(v, p, "migrated copy") >= 1);
                    }
                    assert_eq!(
                        uniform(&buf[T2_PAGES * PAGE_SIZE..], "migrated copy"),
                        val(1, T2_PAGES)
                    );
                }
                Err(e @ Error::NotPresent { .. }) => assert_eq!(e.errno(), libc::ENOENT),
                Err(e) => panic!("migrate to device: {e}"),
            }
            m.migrate_to_system(base, n * PAGE_SIZE)
                .expect("migrate to system");
        })
    };
    let protector = {
        let s = f.space.clone();
        thread::spawn(move || {
            s.protect(extra, PAGE_SIZE, Prot::Read).expect("protect RO");
            s.protect(extra, PAGE_SIZE, Prot::ReadWrite)
                .expect("protect RW");
        })
    };
    join(writer);
    join(reader);
    join(migrator);
    join(protector);
    let mut buf = vec![0u8; (T2_PAGES + 1) * PAGE_SIZE];
    f.mirror
        .read(base, (T2_PAGES + 1) * PAGE_SIZE, &mut buf)
        .expect("final device read");
    for p in 0..=T2_PAGES {
        let want = if p < T2_PAGES {
            val(T2_ROUNDS, p)
        } else {
            val(1, p)
        };
        assert_eq!(
            uniform(
                &buf[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                "final device read"
            ),
            want,
            "page {p}"
        );
        let mut b = vec![0u8; PAGE_SIZE];
        f.space.cpu_read(f.page(p), &mut b).expect("final cpu read");
        assert_eq!(uniform(&b, "final cpu read"), want, "page {p}");
    }
    f.finish();
}

#[test]
fn device_read_vs_cpu_write_and_migration() {
    explore(150, 150, device_read_vs_cpu_write_and_migration_body);
}

// ---------------------------------------------------------------------------------------------
// (2b) Device writes vs CPU writes vs migration
// ---------------------------------------------------------------------------------------------

const T5_ROUNDS: u32 = 2;

/// The device writes page 0 (rounds 1..=T5_ROUNDS, through its page table: range_fault for
/// writing), a CPU writer writes page 1, a migrator moves both to device memory and back, and a
/// CPU reader reads both pages.
fn device_write_vs_cpu_write_and_migration_body() {
    let f = Fixture::new(2);
    let base = f.base;
    let dev_writer = {
        let m = f.mirror.clone();
        thread::spawn(move || {
            for r in 1..=T5_ROUNDS {
                let out = m
                    .write(base, PAGE_SIZE, &fill(val(r, 0), PAGE_SIZE))
                    .expect("device write");
                assert_eq!(out.cpages, 1);
            }
        })
    };
    let cpu_writer = {
        let s = f.space.clone();
        thread::spawn(move || {
            for r in 1..=T5_ROUNDS {
                s.cpu_write(base.add(PAGE_SIZE), &fill(val(r, 1), PAGE_SIZE))
                    .expect("cpu write");
            }
        })
    };
    let reader = {
        let s = f.space.clone();
        thread::spawn(move || {
            let mut last = [0u32; 2];
            let mut b = vec![0u8; PAGE_SIZE];
            for _ in 0..2 {
                for (p, last) in last.iter_mut().enumerate() {
                    s.cpu_read(base.add(p * PAGE_SIZE), &mut b)
                        .expect("cpu read");
                    let r = round_of(uniform(&b, "cpu read"), p, "cpu read");
                    assert!(
                        r <= T5_ROUNDS && r >= *last,
                        "cpu read: page {p} round {r} after {}",
                        *last
                    );
                    *last = r;
                }
            }
        })
    };
    let migrator = {
        let m = f.mirror.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 2 * PAGE_SIZE];
            match m.migrate_to_device(base, 2 * PAGE_SIZE, &mut buf) {
                Ok(_) => {
                    for p in 0..2 {
                        let v = uniform(&buf[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "migrated copy");
                        assert!(round_of(v, p, "migrated copy") <= T5_ROUNDS);
                    }
                }
                Err(e @ Error::NotPresent { .. }) => assert_eq!(e.errno(), libc::ENOENT),
                Err(e) => panic!("migrate to device: {e}"),
            }
            m.migrate_to_system(base, 2 * PAGE_SIZE)
                .expect("migrate to system");
        })
    };
    join(dev_writer);
    join(cpu_writer);
    join(reader);
    join(migrator);
    let mut b = vec![0u8; PAGE_SIZE];
    for p in 0..2 {
        f.space.cpu_read(f.page(p), &mut b).expect("final read");
        assert_eq!(
            uniform(&b, "final read"),
            val(T5_ROUNDS, p),
            "page {p}: last write lost"
        );
    }
    f.finish();
}

#[test]
fn device_write_vs_cpu_write_and_migration() {
    explore(150, 150, device_write_vs_cpu_write_and_migration_body);
}

// ---------------------------------------------------------------------------------------------
// (3) Unmap vs device access
// ---------------------------------------------------------------------------------------------

const T3_PAGES: usize = 3;

/// Pages hold round 1, page 1 lives in device memory; a device reader, a device writer (writing
/// the same data) and a migrator race `Space::unmap` of the whole range.
fn unmap_vs_device_read_body() {
    let f = Fixture::new(T3_PAGES);
    let base = f.base;
    let data: Vec<u8> = (0..T3_PAGES)
        .flat_map(|p| fill(val(1, p), PAGE_SIZE))
        .collect();
    f.space.cpu_write(base, &data).expect("initial write");
    let mut one = vec![0u8; PAGE_SIZE];
    f.mirror
        .migrate_to_device(f.page(1), PAGE_SIZE, &mut one)
        .expect("page 1 to device");
    assert_eq!(one, data[PAGE_SIZE..2 * PAGE_SIZE]);
    let data = Arc::new(data);
    let reader = {
        let (m, data) = (f.mirror.clone(), data.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; T3_PAGES * PAGE_SIZE];
            let mut failed = false;
            for _ in 0..2 {
                buf.fill(0xee);
                match m.read(base, T3_PAGES * PAGE_SIZE, &mut buf) {
                    Ok(_) => {
                        assert!(
                            !failed,
                            "device read succeeded after the range was unmapped"
                        );
                        assert!(buf == *data, "device read returned other data");
                    }
                    Err(e) => {
                        assert_eq!(e.errno(), libc::EFAULT, "device read: {e}");
                        failed = true;
                    }
                }
            }
        })
    };
    let writer = {
        let (m, data) = (f.mirror.clone(), data.clone());
        thread::spawn(move || match m.write(base, T3_PAGES * PAGE_SIZE, &data) {
            Ok(out) => assert_eq!(out.cpages, T3_PAGES as u64),
            Err(e) => assert_eq!(e.errno(), libc::EFAULT, "device write: {e}"),
        })
    };
    let migrator = {
        let (m, data) = (f.mirror.clone(), data.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; T3_PAGES * PAGE_SIZE];
            match m.migrate_to_device(base, T3_PAGES * PAGE_SIZE, &mut buf) {
                Ok(_) => assert!(buf == *data, "migrated copy differs"),
                // No mapping any more (EINVAL), or unmapped after the migration (ENOENT).
                Err(e) => assert!(
                    matches!(e.errno(), libc::EINVAL | libc::ENOENT),
                    "migrate: {e}"
                ),
            }
        })
    };
    f.space.unmap(base, T3_PAGES * PAGE_SIZE).expect("unmap");
    join(reader);
    join(writer);
    join(migrator);
    let mut buf = vec![0u8; T3_PAGES * PAGE_SIZE];
    let e = f
        .mirror
        .read(base, T3_PAGES * PAGE_SIZE, &mut buf)
        .expect_err("read after unmap");
    assert_eq!(e.errno(), libc::EFAULT);
    assert_eq!(
        f.mirror.mapped_pages(),
        0,
        "device entries survived the unmap"
    );
    assert_eq!(f.dev.used(), 0, "device frames leaked by the unmap");
    for p in 0..T3_PAGES {
        assert_eq!(f.space.residency(f.page(p)), Residency::Unmapped);
    }
    f.finish();
}

#[test]
fn unmap_vs_device_read() {
    explore(150, 150, unmap_vs_device_read_body);
}

// ---------------------------------------------------------------------------------------------
// (4) Device-exclusive atomics vs CPU atomics
// ---------------------------------------------------------------------------------------------

const T4_DEV_INCS: usize = 3;
const T4_CPU_THREADS: usize = 2;
const T4_CPU_INCS: usize = 2;
const T4_WORD: usize = 16;

/// A device increments a word with atomics on its exclusive grant (re-taking the grant whenever
/// a CPU access revoked it) while CPU threads `fetch_add` the same word.
fn exclusive_vs_cpu_atomics_body() {
    let f = Fixture::new(1);
    let word = f.base.add(T4_WORD);
    let device = {
        let m = f.mirror.clone();
        let base = f.base;
        thread::spawn(move || {
            let mut olds = Vec::new();
            let mut buf = vec![0u8; PAGE_SIZE];
            for _ in 0..T4_DEV_INCS {
                let mut tries = 0;
                loop {
                    match m.atomic_fetch_add(word, 1) {
                        Ok(old) => {
                            olds.push(old);
                            break;
                        }
                        Err(Error::NotPresent { .. }) => {}
                        Err(e) => panic!("device atomic: {e}"),
                    }
                    tries += 1;
                    // A CPU increment revokes the grant once per fault it takes, and it can take
                    // several if the device re-grants between its fault and its retry: a bound
                    // well above that, so that only a real livelock trips it.
                    assert!(
                        tries <= 64 * (T4_CPU_THREADS * T4_CPU_INCS + 1),
                        "device atomic starved"
                    );
                    match m.exclusive(base, PAGE_SIZE, &mut buf) {
                        Ok(_) => {}
                        // Revoked again before the device read the page back.
                        Err(e @ Error::NotPresent { .. }) => assert_eq!(e.errno(), libc::ENOENT),
                        Err(e) => panic!("exclusive: {e}"),
                    }
                }
            }
            olds
        })
    };
    let cpus: Vec<_> = (0..T4_CPU_THREADS)
        .map(|_| {
            let s = f.space.clone();
            thread::spawn(move || {
                (0..T4_CPU_INCS)
                    .map(|_| s.fetch_add_u64(word, 1).expect("cpu atomic"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut olds = join(device);
    for c in cpus {
        olds.extend(join(c));
    }
    olds.sort_unstable();
    let total = T4_DEV_INCS + T4_CPU_THREADS * T4_CPU_INCS;
    assert_eq!(
        olds,
        (0..total as u64).collect::<Vec<_>>(),
        "fetch-adds did not see distinct old values"
    );
    let mut b = [0u8; 8];
    f.space.cpu_read(word, &mut b).expect("final read");
    assert_eq!(u64::from_ne_bytes(b), total as u64, "increments lost");
    f.mirror
        .check_exclusive(f.base, PAGE_SIZE)
        .expect("the CPU read revoked the grant");
    assert_eq!(f.space.residency(f.base), Residency::System);
    f.finish();
}

#[test]
fn exclusive_vs_cpu_atomics() {
    explore(200, 200, exclusive_vs_cpu_atomics_body);
}

// ---------------------------------------------------------------------------------------------
// (6) device eviction vs device and CPU access
// ---------------------------------------------------------------------------------------------

const T6_ROUNDS: u32 = 2;

/// Page 0 is written by the device (`DeviceMirror::write`), page 1 by the CPU, rounds
/// 1..=T6_ROUNDS; a device thread also migrates both pages to device memory; an evictor
/// releases the device's memory twice (device eviction: `migrate_device_range`). Every device
/// and CPU read sees a value its writer wrote, never older than one seen before; at the end both
/// pages hold their last value and the device holds nothing after a final release.
fn eviction_vs_device_access_body() {
    let space = Space::new_model(4 << 20).expect("model space");
    let dev = Arc::new(SoftDevice::private(2 << 20).expect("device"));
    let m = Arc::new(dev.mirror(&space).expect("mirror"));
    let base = space.map_anon(2 * PAGE_SIZE, Prot::ReadWrite).expect("map");
    let page = move |p: usize| base.add(p * PAGE_SIZE);
    let dev_writer = {
        let m = m.clone();
        thread::spawn(move || {
            for r in 1..=T6_ROUNDS {
                m.write(page(0), PAGE_SIZE, &fill(val(r, 0), PAGE_SIZE))
                    .expect("device write");
                let _ = m.migrate_range_to_device(base, 2 * PAGE_SIZE);
            }
        })
    };
    let cpu_writer = {
        let space = space.clone();
        thread::spawn(move || {
            let mut last0 = 0;
            for r in 1..=T6_ROUNDS {
                space
                    .cpu_write(page(1), &fill(val(r, 1), PAGE_SIZE))
                    .expect("cpu write");
                let mut b = vec![0u8; PAGE_SIZE];
                space.cpu_read(page(0), &mut b).expect("cpu read");
                let r0 = round_of(uniform(&b, "cpu read of page 0"), 0, "cpu read of page 0");
                assert!(r0 >= last0, "page 0 went back from round {last0} to {r0}");
                last0 = r0;
            }
        })
    };
    let evictor = {
        let dev = dev.clone();
        thread::spawn(move || {
            for _ in 0..2 {
                dev.release().expect("release");
            }
        })
    };
    join(dev_writer);
    join(cpu_writer);
    join(evictor);
    dev.release().expect("final release");
    assert_eq!(dev.used(), 0, "a release leaves nothing in device memory");
    for p in 0..2 {
        let mut b = vec![0u8; PAGE_SIZE];
        space.cpu_read(page(p), &mut b).expect("final read");
        assert_eq!(
            uniform(&b, "final"),
            val(T6_ROUNDS, p),
            "page {p} lost its last write"
        );
        assert_eq!(space.residency(page(p)), Residency::System);
    }
    drop(Arc::into_inner(m).expect("threads joined: last mirror handle"));
}

#[test]
fn eviction_vs_device_access() {
    explore(100, 100, eviction_vs_device_access_body);
}

// ---------------------------------------------------------------------------------------------
// (7) page cache: truncate vs writeback vs writes
// ---------------------------------------------------------------------------------------------

/// An in-memory file for the page cache's backend (the facade's lock: a scheduling point).
#[derive(Debug, Default)]
struct MemFile {
    data: crate::sync::Mutex<Vec<u8>>,
}

impl crate::pagecache::FileBackend for Arc<MemFile> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let d = crate::sync::lock(&self.data);
        let off = off as usize;
        if off >= d.len() {
            return Ok(0);
        }
        let n = buf.len().min(d.len() - off);
        buf[..n].copy_from_slice(&d[off..off + n]);
        Ok(n)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<usize> {
        let mut d = crate::sync::lock(&self.data);
        let off = off as usize;
        if d.len() < off + buf.len() {
            d.resize(off + buf.len(), 0);
        }
        d[off..off + buf.len()].copy_from_slice(buf);
        Ok(buf.len())
    }
    fn sync(&self, _data_only: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(crate::sync::lock(&self.data).len() as u64)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        crate::sync::lock(&self.data).resize(len as usize, 0);
        Ok(())
    }
    fn punch(&self, off: u64, len: u64) -> std::io::Result<()> {
        let mut d = crate::sync::lock(&self.data);
        let end = ((off + len) as usize).min(d.len());
        d[(off as usize).min(end)..end].fill(0);
        Ok(())
    }
}

/// A writer (`write_at`), a truncater (`set_len` down and up) and background writeback race on
/// one cached file. Whatever the schedule, after a final `fsync` the file holds exactly what the
/// cache shows (no write lost, none resurrected past a truncate), and never bytes that nobody
/// wrote.
fn truncate_vs_writeback_body() {
    use crate::pagecache::{CacheConfig, FileCache};
    let file = Arc::new(MemFile::default());
    let cfg = CacheConfig {
        budget: 4 * PAGE_SIZE,
        dirty_bound: 2 * PAGE_SIZE,
    };
    let cache = FileCache::with_backend(Box::new(file.clone()), true, cfg).expect("cache");
    let h = Arc::new(cache.handle());
    let writer = {
        let h = h.clone();
        thread::spawn(move || {
            for r in 1..=3u8 {
                h.write_at((r as u64 - 1) * 3000, &[r; 3000])
                    .expect("write_at");
            }
        })
    };
    let truncater = {
        let h = h.clone();
        thread::spawn(move || {
            h.set_len(2000).expect("shrink");
            h.set_len(3 * PAGE_SIZE as u64).expect("extend");
        })
    };
    let flusher = {
        let cache = cache.clone();
        thread::spawn(move || {
            cache.writeback_round();
            cache.writeback_round();
        })
    };
    join(writer);
    join(truncater);
    join(flusher);
    h.fsync().expect("fsync");
    let len = h.len() as usize;
    let mut view = vec![0u8; len];
    assert_eq!(h.read_at(0, &mut view).expect("read_at"), len);
    let disk = crate::sync::lock(&file.data).clone();
    assert_eq!(disk.len(), len, "file length after fsync");
    assert_eq!(
        disk, view,
        "file content after fsync differs from the cache's view"
    );
    assert!(disk.iter().all(|&b| b <= 3), "a byte nobody wrote");
}

#[test]
fn truncate_vs_writeback() {
    explore(60, 60, truncate_vs_writeback_body);
}

// ---------------------------------------------------------------------------------------------
// (8) file mappings: see the submodule
// ---------------------------------------------------------------------------------------------

mod file_maps;

// ---------------------------------------------------------------------------------------------
// (9) file pages in device memory: see the submodule
// ---------------------------------------------------------------------------------------------

mod placements;
