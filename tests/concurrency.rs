//! Concurrency on the real kernel (userfaultfd, SIGBUS and handler-thread fault service): CPU
//! threads faulting with real loads and stores while a device migrates, unmaps racing device
//! reads, and interval-notifier invalidations racing `range_fault` retries. Every loop is bounded
//! by a count (no sleeps, no time limits); every test holds a watchdog.
//!
//! * [`cpu_rmw_vs_migration_signal`] / [`cpu_rmw_vs_migration_thread`]: CPU threads increment
//!   the words they own (through `Space::load_u32/store_u32` and through a `Probe`: plain loads and stores) while the
//!   device migrates the range to device memory and back; every count is exact at the end.
//! * [`unmap_vs_device_read`]: device reads race `Space::unmap`: each returns the data or
//!   `-EFAULT`, and once `-EFAULT` always `-EFAULT`; no device frame leaks.
//! * [`invalidation_vs_range_fault_retry`]: device reads race protection changes, migrations and
//!   CPU stores: every word a device read returns is a value some writer wrote, never older than
//!   one the same reader saw before.
//! * [`migration_maps_its_pages_while_faults_elsewhere_invalidate`]: a migration leaves every
//!   page device-mapped while CPU fault-backs elsewhere in the space invalidate the mirror: the
//!   device then reads them without a fault.
//! * [`exclusive_vs_cpu_atomics`]: device atomics on a device-exclusive page race CPU atomics
//!   and plain stores to the same page (each revoking the grant): no increment or store is lost.

mod common;
use common::*;

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use hetmem::*;

/// Migrates `npages` at `base` to device memory and, when `back`, back to system memory; true
/// when the migration to device memory reported every page device-mapped.
fn migrate_round(
    m: &DeviceMirror,
    base: VirtAddr,
    npages: usize,
    buf: &mut [u8],
    back: bool,
) -> bool {
    let moved = match m.migrate_to_device(base, npages * PAGE, buf) {
        Ok(out) => {
            assert_eq!(out.cpages, npages as u64);
            true
        }
        // A CPU access brought a page back before the device read the range back.
        Err(e) => {
            assert_eq!(e.errno(), libc::ENOENT, "migrate to device: {e}");
            false
        }
    };
    if back {
        m.migrate_to_system(base, npages * PAGE)
            .expect("migrate to system");
    }
    moved
}

// ---------------------------------------------------------------------------------------------
// (1), (4) CPU read-modify-write vs migration
// ---------------------------------------------------------------------------------------------

const RMW_PAGES: usize = 16;
const RMW_THREADS: usize = 3;
/// Words each thread owns in each page (words `t, t + T, t + 2T, ...`).
const RMW_WORDS: usize = 4;
/// Each CPU thread runs at least this many rounds (one increment of each of its words)...
const RMW_MIN_ROUNDS: u32 = 100;
/// ...and goes on until the device has made this many migrations to device memory (so that the
/// two really overlap), up to [`RMW_MAX_ROUNDS`].
const RMW_MIN_MIGRATIONS: usize = 300;
const RMW_MAX_ROUNDS: u32 = 20_000;
const RMW_MAX_MIGRATIONS: usize = 20_000;

fn cpu_rmw_vs_migration(name: &'static str, mode: FaultMode) {
    let _w = watchdog(name, 60);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let len = RMW_PAGES * PAGE;
    let base = space
        .map_anon_with(
            len,
            MapOptions {
                prot: Prot::ReadWrite,
                mode,
                large: false,
            },
        )
        .unwrap();
    let word = move |p: usize, t: usize, k: usize| base.add(p * PAGE + (t + RMW_THREADS * k) * 4);
    let probe = space.probe(base, len).unwrap();
    let start = Barrier::new(RMW_THREADS + 1);
    let cpus_done = AtomicBool::new(false);
    let migrations = AtomicUsize::new(0);
    let (rounds, moved) = thread::scope(|s| {
        let cpus: Vec<_> = (0..RMW_THREADS)
            .map(|t| {
                let (space, probe, start, migrations) = (&space, &probe, &start, &migrations);
                s.spawn(move || {
                    start.wait();
                    let mut r = 0;
                    while r < RMW_MAX_ROUNDS {
                        if r >= RMW_MIN_ROUNDS
                            && migrations.load(Ordering::SeqCst) >= RMW_MIN_MIGRATIONS
                        {
                            break;
                        }
                        at(format!("cpu thread {t}: round {r}"));
                        for p in 0..RMW_PAGES {
                            for k in 0..RMW_WORDS {
                                let a = word(p, t, k);
                                // Alternate between hetmem's CPU accessors (checked each time)
                                // and a probe (plain loads and stores, as through a pointer).
                                if (r as usize + p + k).is_multiple_of(2) {
                                    let v = space.load_u32(a).unwrap();
                                    assert_eq!(v, r, "thread {t} page {p} word {k}: count lost");
                                    space.store_u32(a, v + 1).unwrap();
                                } else {
                                    let v = probe.load_u32(a).unwrap();
                                    assert_eq!(v, r, "thread {t} page {p} word {k}: count lost");
                                    probe.store_u32(a, v + 1).unwrap();
                                }
                            }
                        }
                        r += 1;
                    }
                    r
                })
            })
            .collect();
        let device = {
            let (m, start, cpus_done, migrations) = (&m, &start, &cpus_done, &migrations);
            s.spawn(move || {
                start.wait();
                let mut buf = vec![0u8; len];
                let mut moved = 0;
                for i in 0..RMW_MAX_MIGRATIONS {
                    if cpus_done.load(Ordering::SeqCst) {
                        break;
                    }
                    // Every other round leaves the pages in device memory: the CPU threads fault
                    // them back one by one (migrate_to_ram) while the next migration starts.
                    at(format!("device: migration {i}"));
                    moved += migrate_round(m, base, RMW_PAGES, &mut buf, i % 2 == 1) as usize;
                    migrations.fetch_add(1, Ordering::SeqCst);
                }
                moved
            })
        };
        let rounds: Vec<u32> = cpus.into_iter().map(|c| c.join().unwrap()).collect();
        cpus_done.store(true, Ordering::SeqCst);
        (rounds, device.join().unwrap())
    });
    let mut all = vec![0u8; len];
    space.cpu_read(base, &mut all).unwrap();
    let words = ints(&all);
    for p in 0..RMW_PAGES {
        for (i, &v) in words[p * PAGE / 4..(p + 1) * PAGE / 4].iter().enumerate() {
            let want = if i < RMW_THREADS * RMW_WORDS {
                rounds[i % RMW_THREADS]
            } else {
                0
            };
            assert_eq!(v, want, "page {p} word {i}");
        }
    }
    // The final read brought every page back: each page moved to the device came back once.
    // (Residency takes the state lock, so it also waits for a handler thread still finishing
    // the last fault: in thread mode UFFDIO_COPY wakes the reader before the bookkeeping ends.)
    for p in 0..RMW_PAGES {
        assert_eq!(
            space.residency(base.add(p * PAGE)),
            Residency::System,
            "page {p}"
        );
    }
    let st = space.stats();
    let migrations = migrations.load(Ordering::SeqCst);
    eprintln!(
        "{name}: CPU rounds {rounds:?}; {migrations} migrations to device ({moved} fully device-mapped \
         on return); {st:?}"
    );
    assert!(st.pages_to_device > 0, "the device never migrated a page");
    assert_eq!(
        st.pages_to_device, st.pages_to_system,
        "pages moved to the device vs back"
    );
    assert_eq!(dev.used(), 0, "device frames still in use");
    drop(m);
    drop(dev);
}

#[test]
fn cpu_rmw_vs_migration_signal() {
    cpu_rmw_vs_migration("cpu_rmw_vs_migration_signal", FaultMode::Signal);
}

#[test]
fn cpu_rmw_vs_migration_thread() {
    cpu_rmw_vs_migration("cpu_rmw_vs_migration_thread", FaultMode::Thread);
}

// ---------------------------------------------------------------------------------------------
// (2) Unmap vs device read
// ---------------------------------------------------------------------------------------------

const UNMAP_ITERS: usize = 40;
const UNMAP_PAGES: usize = 32;
/// Reads after the first `-EFAULT` (they must all fail too).
const UNMAP_READS_AFTER: usize = 3;
const UNMAP_MAX_READS: usize = 100_000;

#[test]
fn unmap_vs_device_read() {
    let _w = watchdog("unmap_vs_device_read", 60);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let len = UNMAP_PAGES * PAGE;
    let mut ok_reads = 0;
    for it in 0..UNMAP_ITERS {
        let base = space.map_anon(len, Prot::ReadWrite).unwrap();
        let data = pattern(len, |i| (it as u32) << 20 | i);
        space.cpu_write(base, &data).unwrap();
        // Half of the range in device memory (every other iteration), half in system memory.
        if it.is_multiple_of(2) {
            let mut b = vec![0u8; len / 2];
            m.migrate_to_device(base, (UNMAP_PAGES / 2) * PAGE, &mut b)
                .unwrap();
            assert_eq!(b, data[..len / 2]);
        }
        let start = Barrier::new(2);
        let ok = thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut buf = vec![0u8; len];
                let mut ok = 0;
                let mut failed = 0;
                // In half of the iterations the device first maps the range (two reads before
                // the unmap can start): the race is then with copies through the device page
                // table; otherwise with the device's fault path (range_fault).
                if it % 4 >= 2 {
                    for _ in 0..2 {
                        m.read(base, UNMAP_PAGES * PAGE, &mut buf).unwrap();
                        assert!(
                            buf == data,
                            "iteration {it}: a device read returned other data"
                        );
                        ok += 1;
                    }
                }
                start.wait();
                for _ in 0..UNMAP_MAX_READS {
                    buf.fill(0xee);
                    let mut c = DmirrorCmd {
                        addr: base.get() as u64,
                        buf: &mut buf,
                        npages: UNMAP_PAGES as u64,
                        cpages: 0,
                        faults: 0,
                    };
                    let rc = m.cmd(Cmd::Read, &mut c);
                    if rc == 0 {
                        assert_eq!(
                            failed, 0,
                            "iteration {it}: a device read succeeded after one failed"
                        );
                        assert_eq!(c.cpages, UNMAP_PAGES as u64);
                        assert!(
                            buf == data,
                            "iteration {it}: a device read returned other data"
                        );
                        ok += 1;
                    } else {
                        assert_eq!(rc, -libc::EFAULT, "iteration {it}: device read");
                        failed += 1;
                        if failed > UNMAP_READS_AFTER {
                            break;
                        }
                    }
                }
                assert!(failed > 0, "iteration {it}: never saw the unmap");
                ok
            });
            start.wait();
            space.unmap(base, len).unwrap();
            reader.join().unwrap()
        });
        ok_reads += ok;
        assert_eq!(
            dev.used(),
            0,
            "iteration {it}: device frames leaked by the unmap"
        );
        assert_eq!(space.residency(base), Residency::Unmapped);
    }
    eprintln!(
        "unmap_vs_device_read: {ok_reads} successful device reads raced {UNMAP_ITERS} unmaps"
    );
}

// ---------------------------------------------------------------------------------------------
// (3) Invalidation vs range_fault retry
// ---------------------------------------------------------------------------------------------

/// Pages of each half: half A has its protection toggled, half B is written by the CPU.
const INV_HALF: usize = 8;
/// The writer and the protector run at least this many rounds...
const INV_MIN_ROUNDS: usize = 200;
/// ...and go on until the device has made this many reads and migrations, up to the maxima.
const INV_MIN_READS: usize = 500;
const INV_MIN_MIGRATIONS: usize = 200;
/// Generations fit in 16 bits, below the initial values' `0xa5a5` tag.
const INV_MAX_GENS: u32 = 40_000;
const INV_MAX_PROTECTS: usize = 100_000;
const INV_READERS: usize = 2;
const INV_MAX_READS: usize = 100_000;
const INV_MAX_MIGRATIONS: usize = 20_000;

/// The initial value of every word of page `p`.
fn init(p: usize) -> u32 {
    0xa5a5_0000 | p as u32
}

/// Generation `g` (≥ 1) of word 0 of page `p` of half B.
fn gen_val(g: u32, p: usize) -> u32 {
    (g << 16) | (p as u32 + 1)
}

/// The generation of word 0 of page `p` (0 = initial); panics on a value nobody wrote there.
fn gen_of(v: u32, p: usize, what: &str) -> u32 {
    if v == init(p) {
        return 0;
    }
    let g = v >> 16;
    assert!(
        (v & 0xffff) as usize == p + 1 && (1..=INV_MAX_GENS).contains(&g),
        "{what}: page {p} word 0 is {v:#x}, which no writer wrote"
    );
    g
}

#[test]
fn invalidation_vs_range_fault_retry() {
    let _w = watchdog("invalidation_vs_range_fault_retry", 60);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let np = 2 * INV_HALF;
    let len = np * PAGE;
    let base = space.map_anon(len, Prot::ReadWrite).unwrap();
    let probe = space.probe(base, len).unwrap();
    let half_b = base.add(INV_HALF * PAGE);
    let data: Vec<u8> = (0..np).flat_map(|p| pattern(PAGE, |_| init(p))).collect();
    space.cpu_write(base, &data).unwrap();
    let start = Barrier::new(3 + INV_READERS);
    let (writer_done, protector_done) = (AtomicBool::new(false), AtomicBool::new(false));
    let (reads, migrations) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let done = || writer_done.load(Ordering::SeqCst) && protector_done.load(Ordering::SeqCst);
    let enough = |rounds: usize| {
        rounds >= INV_MIN_ROUNDS
            && reads.load(Ordering::SeqCst) >= INV_MIN_READS
            && migrations.load(Ordering::SeqCst) >= INV_MIN_MIGRATIONS
    };
    let (last_gen, protects, refaulted) = thread::scope(|s| {
        let writer = s.spawn(|| {
            start.wait();
            let mut g = 0;
            while g < INV_MAX_GENS && !enough(g as usize) {
                g += 1;
                for p in INV_HALF..np {
                    let a = base.add(p * PAGE);
                    if g.is_multiple_of(2) {
                        probe.store_u32(a, gen_val(g, p)).unwrap();
                    } else {
                        space.store_u32(a, gen_val(g, p)).unwrap();
                    }
                }
            }
            writer_done.store(true, Ordering::SeqCst);
            g
        });
        let protector = s.spawn(|| {
            start.wait();
            let mut n = 0;
            while n < INV_MAX_PROTECTS && !enough(n) {
                space.protect(base, INV_HALF * PAGE, Prot::Read).unwrap();
                space
                    .protect(base, INV_HALF * PAGE, Prot::ReadWrite)
                    .unwrap();
                n += 1;
            }
            protector_done.store(true, Ordering::SeqCst);
            n
        });
        let migrator = s.spawn(|| {
            start.wait();
            let mut buf = vec![0u8; len];
            for i in 0..INV_MAX_MIGRATIONS {
                if done() {
                    break;
                }
                // Alternate between the whole range and half B alone; every other pair of
                // rounds leaves the pages in device memory.
                let (a, pages) = if i % 2 == 0 {
                    (base, np)
                } else {
                    (half_b, INV_HALF)
                };
                migrate_round(&m, a, pages, &mut buf[..pages * PAGE], i % 4 < 2);
                migrations.fetch_add(1, Ordering::SeqCst);
            }
        });
        let readers: Vec<_> = (0..INV_READERS)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let mut buf = vec![0u8; len];
                    let mut last = vec![0u32; np];
                    let mut refaulted = 0usize;
                    for _ in 0..INV_MAX_READS {
                        if done() {
                            break;
                        }
                        buf.fill(0xee);
                        let out = m.read(base, np * PAGE, &mut buf).expect("device read");
                        assert_eq!(out.cpages, np as u64);
                        reads.fetch_add(1, Ordering::SeqCst);
                        refaulted += (out.faults > 1) as usize;
                        let words = ints(&buf);
                        for (p, last) in last.iter_mut().enumerate() {
                            let w = &words[p * PAGE / 4..(p + 1) * PAGE / 4];
                            assert!(
                                w[1..].iter().all(|&x| x == init(p)),
                                "device read: page {p} holds garbage"
                            );
                            let g = gen_of(w[0], p, "device read");
                            if p < INV_HALF {
                                assert_eq!(g, 0, "device read: page {p} of half A changed");
                            }
                            assert!(
                                g >= *last,
                                "device read: page {p} went back from generation {} to {g}",
                                *last
                            );
                            *last = g;
                        }
                    }
                    refaulted
                })
            })
            .collect();
        let last_gen = writer.join().unwrap();
        let protects = protector.join().unwrap();
        migrator.join().unwrap();
        let refaulted: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
        (last_gen, protects, refaulted)
    });
    let mut buf = vec![0u8; len];
    m.read(base, np * PAGE, &mut buf).unwrap();
    let mut cpu = vec![0u8; len];
    space.cpu_read(base, &mut cpu).unwrap();
    for (what, b) in [("final device read", &buf), ("final cpu read", &cpu)] {
        let words = ints(b);
        for p in 0..np {
            let w = &words[p * PAGE / 4..(p + 1) * PAGE / 4];
            let want0 = if p < INV_HALF {
                init(p)
            } else {
                gen_val(last_gen, p)
            };
            assert_eq!(w[0], want0, "{what}: page {p} word 0");
            assert!(
                w[1..].iter().all(|&x| x == init(p)),
                "{what}: page {p} holds garbage"
            );
        }
    }
    eprintln!(
        "invalidation_vs_range_fault_retry: {} device reads ({refaulted} invalidated mid-read), {} \
         migrations, {last_gen} write generations, {protects} RO/RW toggles; {:?}",
        reads.load(Ordering::SeqCst),
        migrations.load(Ordering::SeqCst),
        space.stats()
    );
}

// ---------------------------------------------------------------------------------------------
// (5) Device-exclusive atomics vs CPU atomics
// ---------------------------------------------------------------------------------------------

const EXCL_CPU_THREADS: usize = 2;
const EXCL_CPU_INCS: usize = 5_000;
const EXCL_DEV_INCS: usize = 5_000;
/// Word offsets in the page: the CPU threads and the device all add to word 0; CPU thread `t`
/// also counts its own increments in word `t + 1` (a plain store on the same page).
const EXCL_WORD: usize = 0;
const EXCL_MAX_SPINS: usize = 100_000;

#[test]
fn exclusive_vs_cpu_atomics() {
    let _w = watchdog("exclusive_vs_cpu_atomics", 60);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let base = space.map_anon(PAGE, Prot::ReadWrite).unwrap();
    let probe = space.probe(base, PAGE).unwrap();
    let word = base.add(EXCL_WORD * 8);
    let start = Barrier::new(EXCL_CPU_THREADS + 1);
    let (cpu_incs, dev_incs) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let regrants = thread::scope(|s| {
        let device = s.spawn(|| {
            let mut buf = vec![0u8; PAGE];
            let mut regrants = 0usize;
            start.wait();
            for k in 0..EXCL_DEV_INCS {
                // Keep in step with the CPU threads (so that grants and revocations interleave
                // all along): wait, a bounded number of yields, until they made k increments.
                for _ in 0..EXCL_MAX_SPINS {
                    if cpu_incs.load(Ordering::SeqCst) >= k * EXCL_CPU_THREADS {
                        break;
                    }
                    thread::yield_now();
                }
                // Bounded: each failure is a revocation by a CPU access, and the CPU threads
                // make a bounded number of them.
                for tries in 0.. {
                    assert!(
                        tries <= EXCL_CPU_THREADS * EXCL_CPU_INCS * 2 + 1,
                        "device atomic starved"
                    );
                    match m.atomic_fetch_add(word, 1) {
                        Ok(_) => {
                            dev_incs.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Err(e) => assert_eq!(e.errno(), libc::ENOENT, "device atomic: {e}"),
                    }
                    regrants += 1;
                    if let Err(e) = m.exclusive(base, PAGE, &mut buf) {
                        // Revoked again before the device read the page back.
                        assert_eq!(e.errno(), libc::ENOENT, "exclusive: {e}");
                    }
                }
            }
            regrants
        });
        for t in 0..EXCL_CPU_THREADS {
            let (space, probe, start) = (&space, &probe, &start);
            let (cpu_incs, dev_incs) = (&cpu_incs, &dev_incs);
            s.spawn(move || {
                start.wait();
                let mine = base.add((t + 1) * 8);
                for i in 0..EXCL_CPU_INCS {
                    // In step with the device, as the device is with the CPU threads.
                    for _ in 0..EXCL_MAX_SPINS {
                        if dev_incs.load(Ordering::SeqCst) >= i {
                            break;
                        }
                        thread::yield_now();
                    }
                    space.fetch_add_u64(word, 1).unwrap();
                    cpu_incs.fetch_add(1, Ordering::SeqCst);
                    // A plain store to the same page, racing the grant's copy of the page.
                    probe.store_u32(mine, i as u32 + 1).unwrap();
                    assert_eq!(
                        probe.load_u32(mine).unwrap(),
                        i as u32 + 1,
                        "thread {t}: own store lost"
                    );
                }
            });
        }
        device.join().unwrap()
    });
    let mut b = [0u8; 8 * (EXCL_CPU_THREADS + 1)];
    space.cpu_read(base, &mut b).unwrap();
    let total = u64::from_ne_bytes(b[..8].try_into().unwrap());
    assert_eq!(
        total,
        (EXCL_DEV_INCS + EXCL_CPU_THREADS * EXCL_CPU_INCS) as u64,
        "increments lost"
    );
    for t in 0..EXCL_CPU_THREADS {
        let o = (t + 1) * 8;
        let v = u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(v, EXCL_CPU_INCS as u32, "thread {t}: stores lost");
    }
    m.check_exclusive(base, PAGE)
        .expect("the CPU read revoked the grant");
    eprintln!(
        "exclusive_vs_cpu_atomics: {regrants} re-grants; {:?}",
        space.stats()
    );
}

/// Fault-around runs are per thread: two threads first-touching disjoint halves of one mapping
/// sequentially each keep their own doubling window (the space-wide state let each thread's
/// faults break the other's run: 37 faults per sweep became 140–380).
#[test]
fn fault_around_runs_are_per_thread() {
    let _w = watchdog("fault_around_per_thread", 60);
    const HALF: usize = 16 << 20;
    // One thread alone over one half: the reference count.
    let space = std::sync::Arc::new(Space::new().unwrap());
    let b = space.map_anon(2 * HALF, Prot::ReadWrite).unwrap();
    let one = Space::new().unwrap();
    let c = one.map_anon(HALF, Prot::ReadWrite).unwrap();
    let probe = one.probe(c, HALF).unwrap();
    for off in (0..HALF).step_by(PAGE) {
        probe.store_u32(c.add(off), 1).unwrap();
    }
    let f1 = one.stats().cpu_faults;
    let bar = std::sync::Arc::new(std::sync::Barrier::new(2));
    let ts: Vec<_> = (0..2)
        .map(|t| {
            let bar = bar.clone();
            let base = b.add(t * HALF);
            let probe = space.probe(base, HALF).unwrap();
            std::thread::spawn(move || {
                bar.wait();
                for off in (0..HALF).step_by(PAGE) {
                    probe.store_u32(base.add(off), 1).unwrap();
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    let f2 = space.stats().cpu_faults;
    assert!(
        f2 <= 2 * f1 + 4,
        "two threads took {f2} faults for what one thread alone takes {f1} per half"
    );
}

// ---------------------------------------------------------------------------------------------
// A migration's device mapping vs invalidations elsewhere in the space
// ---------------------------------------------------------------------------------------------

/// A migration to the device while CPU fault-backs on another mapping of the same space
/// invalidate the mirror (its one notifier spans the whole space) over and over: after every
/// migration of B, every page of B is device-private and mapped by the device (it reads B
/// without a fault), with B's values, and the CPU reads A's. (This proves the outcome, which the
/// mapping at commit, `MigrateVma::finalize_and_map`, and the re-mapping pass after it both
/// give; that the commit-time mapping spares the re-mapping is a performance property, measured
/// by `hetmem bench --only contention`.)
#[test]
fn migration_maps_its_pages_while_faults_elsewhere_invalidate() {
    let _w = watchdog("migration_maps_its_pages_while_faults_elsewhere", 60);
    const A_PAGES: usize = 2048;
    const B_PAGES: usize = 512;
    const ROUNDS: usize = 40;
    let space = Space::new().unwrap();
    let dev = SoftDevice::private((A_PAGES + B_PAGES) * PAGE + (4 << 20)).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(A_PAGES * PAGE, Prot::ReadWrite).unwrap();
    let b = space.map_anon(B_PAGES * PAGE, Prot::ReadWrite).unwrap();
    for p in 0..A_PAGES {
        space.store_u32(a.add(p * PAGE), p as u32 + 1).unwrap();
    }
    for p in 0..B_PAGES {
        space
            .store_u32(b.add(p * PAGE), 0xb000_0000 | p as u32)
            .unwrap();
    }
    let probe = space.probe(a, A_PAGES * PAGE).unwrap();
    let done = AtomicBool::new(false);
    let faulted = AtomicUsize::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            // Fault A back page by page, again and again, until B's rounds are done.
            while !done.load(Ordering::Relaxed) {
                m.migrate_range_to_device(a, A_PAGES * PAGE).unwrap();
                for p in 0..A_PAGES {
                    assert_eq!(probe.load_u32(a.add(p * PAGE)).unwrap(), p as u32 + 1);
                    faulted.fetch_add(1, Ordering::Relaxed);
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
        });
        let mut snap = vec![0u8; B_PAGES];
        let mut buf = vec![0u8; B_PAGES * PAGE];
        // Start once A's fault-backs are under way (the watchdog ends a thread that never
        // starts).
        while faulted.load(Ordering::Relaxed) == 0 {
            thread::yield_now();
        }
        for round in 0..ROUNDS {
            let out = m.migrate_range_to_device(b, B_PAGES * PAGE).unwrap();
            assert_eq!(out.cpages, B_PAGES as u64);
            m.snapshot(b, B_PAGES * PAGE, &mut snap).unwrap();
            for (p, f) in snap.iter().enumerate() {
                assert_eq!(
                    *f & 0xF0,
                    snap::DEV_PRIVATE_LOCAL,
                    "round {round}: page {p} of B is not device-private and mapped ({f:#x})"
                );
            }
            // Every page was mapped at its commit: the device reads B without a fault.
            let out = m.read(b, B_PAGES * PAGE, &mut buf).unwrap();
            assert_eq!(out.faults, 0, "round {round}: the device faulted to read B");
            for p in 0..B_PAGES {
                let w = u32::from_ne_bytes(buf[p * PAGE..p * PAGE + 4].try_into().unwrap());
                assert_eq!(w, 0xb000_0000 | p as u32, "round {round}: page {p} of B");
            }
            m.migrate_to_system(b, B_PAGES * PAGE).unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    for p in 0..B_PAGES {
        assert_eq!(
            space.load_u32(b.add(p * PAGE)).unwrap(),
            0xb000_0000 | p as u32
        );
    }
}
