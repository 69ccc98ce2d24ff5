//! `fork()` of a process whose own hetmem memory is partly in device memory (space module
//! `fork`): the child gets the parent's anonymous private memory copy-on-write, device-resident
//! and exclusively held pages included, as plain memory; the parent's placement is unchanged.
//! Forks race CPU faults and migrations of other threads without losing a byte or hanging.

mod common;
use common::*;

use hetmem::sys::ChildExit;
use hetmem::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Forks of the tests of this file: a fork maps every page of the process in the child too, so
/// while another test forks, a page of this one is truly shared (pagemap says so, and the kernel
/// would copy it). The test that asserts a page is no longer shared takes it for writing, the
/// others for reading (found in CI: 3 failures in 40 runs beside the others, none in 60 alone).
static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn forks_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FORKS.read().unwrap_or_else(|e| e.into_inner())
}

fn word(i: usize) -> u32 {
    0x5eed_0000 ^ i as u32
}

/// A space with `n` pages mapped and written `word(i)` (word `i`), and a device mirroring it.
fn written(n: usize) -> (Space, SoftDevice, DeviceMirror, VirtAddr) {
    let space = small_space();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(n * PAGE, Prot::ReadWrite).unwrap();
    space
        .cpu_write(a, &pattern(n * PAGE, |i| word(i as usize)))
        .unwrap();
    (space, dev, m, a)
}

#[test]
fn a_child_sees_every_page_of_hetmem_memory_and_the_parent_keeps_its_placement() {
    let _w = watchdog("fork_hetmem", 60);
    let _forks = forks_shared();
    let space = small_space();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    const N: usize = 64;
    let thread = MapOptions {
        mode: FaultMode::Thread,
        ..MapOptions::default()
    };
    let large = MapOptions {
        large: true,
        ..MapOptions::default()
    };
    let maps = [
        space.map_anon(N * PAGE, Prot::ReadWrite).unwrap(),
        space.map_anon_with(N * PAGE, thread).unwrap(),
        space.map_anon_with(2 << 20, large).unwrap(),
    ];
    for &a in &maps {
        // Pages 0..N/2 written, the rest never touched (zeros in the child too).
        let data = pattern(N / 2 * PAGE, |i| word(i as usize));
        space.cpu_write(a, &data).unwrap();
        m.migrate_range_to_device(a, N / 4 * PAGE).unwrap();
    }
    let mut page = vec![0u8; PAGE];
    m.exclusive(maps[0].add((N / 4) * PAGE), PAGE, &mut page)
        .unwrap();
    let probes: Vec<hetmem::space::Probe> = maps
        .iter()
        .map(|&a| space.probe(a, N * PAGE).unwrap())
        .collect();
    let (probes, maps_ref) = (&probes, &maps);
    // SAFETY: the child only loads and stores through the probes (bounds checks and volatile
    // accesses of its own copy: no allocation, no lock) and exits with a code.
    let st = unsafe {
        sys::fork_and_wait(|| {
            for (probe, &a) in probes.iter().zip(maps_ref) {
                for i in 0..N * PAGE / 4 {
                    let want = if i < N / 2 * PAGE / 4 { word(i) } else { 0 };
                    if probe.load_u32(a.add(4 * i)).ok() != Some(want) {
                        return 10;
                    }
                }
                for i in (0..N * PAGE / 4).step_by(256) {
                    if probe.store_u32(a.add(4 * i), 0xc41d).is_err() {
                        return 11;
                    }
                }
            }
            0
        })
    }
    .unwrap();
    assert_eq!(
        st,
        ChildExit::Exited(0),
        "the child's view of the parent's memory"
    );
    // The parent: placement unchanged, data its own.
    for &a in &maps {
        assert_eq!(space.residency(a), Residency::Device(dev.owner()));
    }
    assert_eq!(
        space.residency(maps[0].add((N / 4) * PAGE)),
        Residency::Exclusive(dev.owner())
    );
    for &a in &maps {
        let mut back = vec![0u8; N * PAGE];
        space.cpu_read(a, &mut back).unwrap();
        let want: Vec<u8> = (0..N * PAGE / 4)
            .flat_map(|i| if i < N / 2 * PAGE / 4 { word(i) } else { 0 }.to_ne_bytes())
            .collect();
        assert!(back == want, "the parent's data at {a:?}");
    }
}

/// Threads fault pages back and migrate them while the main thread forks again and again: each
/// child reads exactly the values the parent had, every fork completes, and the parent's data is
/// intact at the end.
#[test]
fn forks_race_faults_and_migrations() {
    let _w = watchdog("fork_race", 120);
    let _forks = forks_shared();
    const N: usize = 512;
    let (space, _dev, m, a) = written(N);
    let stop = AtomicBool::new(false);
    let probe = space.probe(a, N * PAGE).unwrap();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (space, m, stop) = (&space, &m, &stop);
            s.spawn(move || {
                let mut k = t * 97;
                while !stop.load(Ordering::Relaxed) {
                    let p = k % (N - 16);
                    let _ = m.migrate_range_to_device(a.add(p * PAGE), 16 * PAGE);
                    let mut b = [0u8; 4];
                    space.cpu_read(a.add((p + 8) * PAGE), &mut b).unwrap();
                    assert_eq!(u32::from_ne_bytes(b), word((p + 8) * PAGE / 4));
                    k += 31;
                }
            });
        }
        let probe = &probe;
        let mut ends = Vec::new();
        for round in 0..40 {
            at(format!("fork {round}"));
            // SAFETY: the child only loads through the probe (volatile loads of its own copy).
            let st = unsafe {
                sys::fork_and_wait(|| {
                    for i in (0..N * PAGE / 4).step_by(61) {
                        if probe.load_u32(a.add(4 * i)).ok() != Some(word(i)) {
                            return 10;
                        }
                    }
                    0
                })
            };
            ends.push(st.map_err(|e| e.to_string()));
        }
        // The threads stop before any assertion (a failed one would leave them running).
        stop.store(true, Ordering::Relaxed);
        for (round, st) in ends.into_iter().enumerate() {
            assert_eq!(st, Ok(ChildExit::Exited(0)), "fork {round}");
        }
    });
    let mut back = vec![0u8; N * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back == pattern(N * PAGE, |i| word(i as usize)));
}

/// A store by another thread to a page whose fork copy is in the CPU view (between the prepare
/// and the parent's handler) is not lost: the copies are write-protected, so the store faults,
/// waits until the fork is done, and lands on the device's data (an unprotected copy took the
/// store and the parent's handler dropped it: found by review, 10 of 10 stores lost).
#[test]
fn a_store_during_a_fork_to_a_device_page_is_kept() {
    let _w = watchdog("fork_store_window", 60);
    let _forks = forks_shared();
    let space = small_space();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    const N: usize = 1024;
    let a = space.map_anon(N * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &vec![0x11u8; N * PAGE]).unwrap();
    let mut caught = 0;
    for round in 0..10u32 {
        m.migrate_range_to_device(a, N * PAGE).unwrap();
        let p = a.get();
        let val = 0xdead_0000 + round;
        let (started, done) = (AtomicBool::new(false), AtomicBool::new(false));
        let stored = std::thread::scope(|s| {
            let w = s.spawn(|| {
                started.store(true, Ordering::SeqCst);
                // Store as soon as the page is in the CPU view: only the fork's copy puts it
                // there (nothing else touches the range).
                while !done.load(Ordering::SeqCst) {
                    if hetmem::sys::page_resident(p) {
                        // SAFETY: a word of the test's own managed mapping, no Rust object in it.
                        unsafe { hetmem::sys::probe_store_u32(p, val) };
                        return true;
                    }
                }
                false
            });
            while !started.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            // SAFETY: the child does nothing.
            let st = unsafe { sys::fork_and_wait(|| 0) }.unwrap();
            assert_eq!(st, ChildExit::Exited(0));
            done.store(true, Ordering::SeqCst);
            w.join().unwrap()
        });
        if stored {
            caught += 1;
            let mut b = [0u8; 4];
            space.cpu_read(a, &mut b).unwrap();
            assert_eq!(
                u32::from_ne_bytes(b),
                val,
                "round {round}: the store is lost"
            );
        }
    }
    assert!(caught > 0, "no store fell in a fork's window in 10 rounds");
}

/// Forks while another thread unmaps small managed mappings directly, one after the other: each
/// munmap posts an UNMAP event, and until it is read the space's fills get EAGAIN. The reader,
/// following one munmap, waits for the space's lock, which the fork's prepare holds while it
/// copies device pages; it keeps reading events meanwhile, so the prepare's copies go through
/// (when it slept on the lock, the copies failed after 100,000 retries: the child read wrong
/// pages and a fork took seconds; found by review).
#[test]
fn forks_race_direct_munmaps() {
    let _w = watchdog("fork_vs_munmap", 120);
    let _forks = forks_shared();
    const N: usize = 512;
    let (space, _dev, m, a) = written(N);
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    let smalls: Vec<usize> = (0..400)
        .map(|_| space.map_anon(PAGE, Prot::ReadWrite).unwrap().get())
        .collect();
    let stop = AtomicBool::new(false);
    let bad = std::thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            for &p in &smalls {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                // SAFETY: a one-page managed mapping of the test's own, no Rust object in it.
                unsafe { libc::munmap(p as *mut _, PAGE) };
            }
        });
        let mut bad = Vec::new();
        for round in 0..5 {
            at(format!("fork {round}"));
            // SAFETY: the child only loads (volatile loads of its own copy).
            let st = unsafe {
                sys::fork_and_wait(|| {
                    let mut wrong = 0;
                    for k in 0..N {
                        let i = k * PAGE / 4;
                        if hetmem::sys::probe_load_u32(a.get() + 4 * i) != word(i) {
                            wrong += 1;
                        }
                    }
                    wrong.min(250)
                })
            };
            if st.as_ref().ok() != Some(&ChildExit::Exited(0)) {
                bad.push((round, st.map_err(|e| e.to_string())));
            }
        }
        stop.store(true, Ordering::SeqCst);
        bad
    });
    assert!(bad.is_empty(), "children that read wrong pages: {bad:?}");
    let mut back = vec![0u8; N * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back == pattern(N * PAGE, |i| word(i as usize)));
}

/// Device-coherent pages after a fork (the parent's are write-protected and marked: space
/// module `fork`). A device that mapped them writable before the fork, and a mirror made after
/// it, write them again (found by review: the device's store hit the protection inside a
/// no-fault zone and aborted the process); once the child is gone the parent's store keeps
/// them where they are, as the kernel reuses a page that is no longer shared. Both fault modes.
#[test]
fn coherent_pages_take_device_and_cpu_stores_after_a_fork() {
    let _w = watchdog("coherent_after_fork", 60);
    let _forks = FORKS.write().unwrap_or_else(|e| e.into_inner());
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let space = small_space();
        let dev = coherent(16 << 20);
        let m = dev.mirror(&space).unwrap();
        let pages = 16;
        let len = pages * PAGE;
        let opts = MapOptions {
            mode,
            ..MapOptions::default()
        };
        let a = space.map_anon_with(len, opts).unwrap();
        space.cpu_write(a, &pattern(len, |i| i)).unwrap();
        assert_eq!(
            m.migrate_range_to_device(a, len).unwrap().cpages,
            pages as u64
        );
        m.write(a, len, &pattern(len, |i| i ^ 1)).unwrap();
        // SAFETY: the child does nothing and exits.
        let st = unsafe { hetmem::sys::fork_and_wait(|| 0) }.unwrap();
        assert_eq!(st, ChildExit::Exited(0));
        at(format!("{mode:?}: the device writes again after the fork"));
        m.write(a, len / 2, &pattern(len / 2, |i| i ^ 2)).unwrap();
        let m2 = dev.mirror(&space).unwrap();
        m2.write(a.add(len / 2), len / 4, &pattern(len / 4, |i| i ^ 3))
            .unwrap();
        at(format!("{mode:?}: the CPU stores, the child gone"));
        space
            .cpu_write(a.add(3 * len / 4), &pattern(len / 4, |i| i ^ 4))
            .unwrap();
        assert_eq!(
            space.residency(a.add(3 * len / 4)),
            Residency::Coherent(dev.owner()),
            "{mode:?}: a page no longer shared stays where it is"
        );
        let mut want = pattern(len / 2, |i| i ^ 2);
        want.extend(pattern(len / 4, |i| i ^ 3));
        want.extend(pattern(len / 4, |i| i ^ 4));
        let mut back = vec![0u8; len];
        space.cpu_read(a, &mut back).unwrap();
        assert_eq!(back, want, "{mode:?}: the CPU reads every store");
        let mut d = vec![0u8; len];
        m.read(a, len, &mut d).unwrap();
        assert_eq!(d, want, "{mode:?}: the device reads every store");
    }
}

/// Forks `rounds` children one after the other, each running `child` (its exit code: 0 when
/// every byte it read is one the parent could have had), then sets `stop` (the other threads'
/// loops end) and asserts that every child exited with 0.
///
/// # Safety
/// `child` runs in a forked child of a multithreaded process: it may only load memory.
unsafe fn fork_children(rounds: usize, stop: &AtomicBool, child: impl Fn() -> i32) {
    let mut ends = Vec::new();
    for round in 0..rounds {
        at(format!("fork {round}"));
        // SAFETY: the caller's guarantee: the child only loads.
        let st = unsafe { sys::fork_and_wait(&child) };
        ends.push(st.map_err(|e| e.to_string()));
    }
    stop.store(true, Ordering::SeqCst);
    for (round, st) in ends.into_iter().enumerate() {
        assert_eq!(st, Ok(ChildExit::Exited(0)), "fork {round}");
    }
}

/// Forks while a coherent device writes a thread-mode mapping (found from outside: the
/// parent's handler write-protected the coherent pages before it took the devices' write
/// access away, so a device store in flight, a plain store in a thread-mode mapping, met the
/// protection inside hetmem's copy and aborted the process, every run). Each child reads only
/// bytes the parent had (1 or the device's 9); afterwards the parent's memory holds only those.
#[test]
fn forks_while_a_coherent_device_writes_a_thread_mode_mapping() {
    let _w = watchdog("fork vs coherent device stores", 120);
    let _forks = forks_shared();
    const N: usize = 256;
    let space = small_space();
    let dev = coherent(16 << 20);
    let m = dev.mirror(&space).unwrap();
    let opts = MapOptions {
        mode: FaultMode::Thread,
        ..MapOptions::default()
    };
    let a = space.map_anon_with(N * PAGE, opts).unwrap();
    space.cpu_write(a, &vec![1u8; N * PAGE]).unwrap();
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let nines = vec![9u8; 16 * PAGE];
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                let p = k * 16 % N;
                match m.write(a.add(p * PAGE), 16 * PAGE, &nines) {
                    Ok(_) | Err(Error::Busy) => {}
                    Err(e) => panic!("device store: {e:?}"),
                }
                k += 1;
            }
        });
        // SAFETY: the child only loads (volatile loads of its own copy).
        unsafe {
            fork_children(60, &stop, || {
                for i in (0..N * PAGE / 4).step_by(97) {
                    let v = hetmem::sys::probe_load_u32(a.get() + 4 * i);
                    if v != 0x0101_0101 && v != 0x0909_0909 {
                        return 10;
                    }
                }
                0
            })
        }
    });
    let mut back = vec![0u8; N * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 1 || x == 9));
}

/// Forks while another thread drops random ranges of the memory in a tight loop and a device
/// migrates it (found from outside: the event reader stopped reading once 256 distinct drops
/// waited to be followed; it waited for a migration whose own drop of pages shared with a child
/// waited for the reader, and the fork's copies, made under the space's lock, got EAGAIN page
/// after page, each for its whole bound: a hang, every run). Every fork returns, and each child
/// reads only bytes the parent had (the pattern, or the drop's zeros).
#[test]
fn forks_while_the_program_drops_pages_in_a_loop_and_a_device_migrates() {
    if !kernel_has_uffdio_move() {
        return;
    }
    let _w = watchdog("fork vs drops and migrations", 120);
    let _forks = forks_shared();
    const N: usize = 512;
    let (space, _dev, m, a) = written(N);
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut k = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let p = k * 37 % (N - 64);
                let r = if k.is_multiple_of(2) {
                    m.migrate_range_to_device(a.add(p * PAGE), 64 * PAGE)
                        .map(drop)
                } else {
                    m.migrate_to_system(a.add(p * PAGE), 64 * PAGE).map(drop)
                };
                match r {
                    Ok(()) | Err(Error::Busy) | Err(Error::NotPresent { .. }) => {}
                    Err(e) => panic!("migration: {e:?}"),
                }
                k += 1;
            }
        });
        s.spawn(|| {
            let mut r = 0x2545_f491_4f6c_dd1du64;
            while !stop.load(Ordering::SeqCst) {
                r ^= r << 13;
                r ^= r >> 7;
                r ^= r << 17;
                let p = r as usize % (N - 16);
                let n = 1 + (r >> 32) as usize % 16;
                // SAFETY: managed memory of the test's own, no Rust object in it.
                unsafe { hetmem::sys::madvise_dontneed(a.get() + p * PAGE, n * PAGE) }.unwrap();
                std::thread::yield_now();
            }
        });
        // SAFETY: the child only loads (volatile loads of its own copy).
        unsafe {
            fork_children(40, &stop, || {
                for k in 0..N {
                    let i = k * PAGE / 4 + k % 1024;
                    let v = hetmem::sys::probe_load_u32(a.get() + 4 * i);
                    if v != 0 && v != word(i) {
                        return 10;
                    }
                }
                0
            })
        }
    });
    let mut back = vec![0u8; N * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    for (k, w) in back.chunks(4).enumerate() {
        let v = u32::from_ne_bytes(w.try_into().unwrap());
        assert!(v == 0 || v == word(k), "word {k}: {v:#x}");
    }
}
