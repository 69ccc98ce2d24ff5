//! The program's own `munmap` (and `mremap` shrinking, and `mmap` with `MAP_FIXED`) of memory
//! hetmem created is followed, never silent: every userfaultfd of a space asks for
//! `UFFD_EVENT_UNMAP`, and the event reader lets the range go as `Space::unmap` would (devices
//! lose their mappings, device frames are freed, dirty file data is kept for writeback, the
//! reservation's hole is mapped again or, if the program put something there, left alone).
//! hetmem's own unmaps raise no event (they would deadlock on the space's lock if they did).
//!
//! Each test waits for the event reader through `SpaceStats::foreign_unmaps` (the program's
//! munmap returns once the event is read, a moment before hetmem has followed it), bounded by a
//! watchdog.

mod common;
use common::*;
use hetmem::pagecache::*;
use hetmem::*;

const PAGE: usize = 4096;

/// Waits until the space has followed `n` direct unmaps.
fn wait_followed(space: &Space, n: u64) {
    at(format!("waiting for {n} direct unmap(s) to be followed"));
    while space.stats().foreign_unmaps < n {
        std::thread::yield_now();
    }
}

/// The program's own read-write memory mapped with MAP_FIXED at `at` (over whatever is there,
/// as a program may), `len` bytes; the caller unmaps it.
///
/// # Safety
///
/// `at..at + len` holds nothing the caller still uses (a hole it made, or its own managed
/// mapping, which no Rust object lives in).
unsafe fn map_own_fixed(at: usize, len: usize) -> usize {
    // SAFETY: the caller's guarantee; the new mapping is the caller's.
    let p = unsafe {
        libc::mmap(
            at as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, at);
    at
}

/// A word of the program's plain memory at `a`.
fn load(a: usize) -> u32 {
    // SAFETY: every caller passes an address of memory mapped readable at the time, which no
    // Rust object refers to.
    unsafe { hetmem::sys::probe_load_u32(a) }
}

#[test]
fn a_direct_munmap_of_a_managed_mapping_is_followed() {
    let _w = watchdog("munmap_managed", 60);
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        at(format!("munmap in {mode:?} mode"));
        let space = small_space();
        let a = space
            .map_anon_with(
                16 * PAGE,
                MapOptions {
                    mode,
                    ..MapOptions::default()
                },
            )
            .unwrap();
        let data = pattern(16 * PAGE, |i| i ^ 0x3c3c_0000);
        space.cpu_write(a, &data).unwrap();
        let dev = SoftDevice::private(8 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        m.migrate_range_to_device(a, 16 * PAGE).unwrap();
        let mut page = vec![0u8; PAGE];
        assert_eq!(dev.used(), 16 * PAGE);

        // The program unmaps the middle half itself.
        // SAFETY: pages 4..12 of a managed mapping of the test's own space, in which no Rust
        // object lives; nothing else touches them.
        assert_eq!(
            unsafe { libc::munmap(a.add(4 * PAGE).get() as *mut _, 8 * PAGE) },
            0
        );
        wait_followed(&space, 1);
        assert!(
            m.read(a.add(4 * PAGE), PAGE, &mut page).is_err(),
            "{mode:?}: the device still reads an unmapped page"
        );
        assert!(matches!(
            space.cpu_read(a.add(8 * PAGE), &mut page[..4]).unwrap_err(),
            Error::NotMapped { .. }
        ));
        assert_eq!(
            dev.used(),
            8 * PAGE,
            "{mode:?}: the unmapped pages' device frames are freed"
        );
        // The rest is still managed: its pages come back from the device with their data.
        let mut head = vec![0u8; 4 * PAGE];
        space.cpu_read(a, &mut head).unwrap();
        assert_eq!(head, data[..4 * PAGE]);
        let mut tail = vec![0u8; 4 * PAGE];
        m.read(a.add(12 * PAGE), 4 * PAGE, &mut tail).unwrap();
        assert_eq!(tail, data[12 * PAGE..]);
        // The hole is the program's address space now: memory it maps there later, even with
        // MAP_FIXED (which raises no event there any more), is never mapped over by the space.
        let hole = a.add(4 * PAGE).get();
        // SAFETY: the hole the test itself unmapped; the new mapping is unmapped at the end.
        let own = unsafe { map_own_fixed(hole, 8 * PAGE) };
        // SAFETY: a word of the test's own new mapping.
        unsafe { hetmem::sys::probe_store_u32(hole + PAGE, 0xfeed) };
        let mut maps = Vec::new();
        for _ in 0..8 {
            let b = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
            assert!(
                b.get() + 4 * PAGE <= hole || b.get() >= hole + 8 * PAGE,
                "{mode:?}: the space mapped over the program's memory"
            );
            space.cpu_write(b, &[9; 8]).unwrap();
            maps.push(b);
        }
        assert_eq!(load(hole + PAGE), 0xfeed);
        assert_eq!(space.stats().foreign_unmaps, 1);
        // hetmem's own unmaps raise no event.
        space.unmap(a, 4 * PAGE).unwrap();
        space.unmap(a.add(12 * PAGE), 4 * PAGE).unwrap();
        for b in maps {
            space.unmap(b, 4 * PAGE).unwrap();
        }
        assert_eq!(space.stats().foreign_unmaps, 1);
        assert_eq!(dev.used(), 0);
        drop(m);
        drop(space);
        assert_eq!(
            load(hole + PAGE),
            0xfeed,
            "the space's drop unmapped the program's memory"
        );
        // SAFETY: the test's own mapping, unmapped once.
        assert_eq!(unsafe { libc::munmap(own as *mut _, 8 * PAGE) }, 0);
    }
}

/// mremap shrinking a mapping in place unmaps its tail: followed the same way.
#[test]
fn a_direct_mremap_that_shrinks_a_managed_mapping_is_followed() {
    let _w = watchdog("mremap_shrink", 30);
    let space = small_space();
    let a = space.map_anon(16 * PAGE, Prot::ReadWrite).unwrap();
    let data = pattern(16 * PAGE, |i| i.wrapping_mul(0x9e37_79b9));
    space.cpu_write(a, &data).unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    m.migrate_range_to_device(a, 16 * PAGE).unwrap();
    // SAFETY: the whole managed mapping of the test's own space, shrunk in place to 4 pages;
    // no Rust object lives in it.
    let p = unsafe { libc::mremap(a.get() as *mut _, 16 * PAGE, 4 * PAGE, 0) };
    assert_eq!(p as usize, a.get());
    wait_followed(&space, 1);
    assert_eq!(dev.used(), 4 * PAGE, "the tail's device frames are freed");
    let mut buf = vec![0u8; PAGE];
    assert!(m.read(a.add(4 * PAGE), PAGE, &mut buf).is_err());
    // The head is still managed, and loads of it fault its pages back.
    for k in 0..4 {
        let want = u32::from_ne_bytes(data[k * PAGE..k * PAGE + 4].try_into().unwrap());
        assert_eq!(load(a.add(k * PAGE).get()), want);
    }
}

/// A program that maps memory of its own over a managed mapping with MAP_FIXED: the managed
/// mapping is let go, and the program's memory there is never touched by hetmem, not even when
/// the space is dropped (its reservation is unmapped around it).
#[test]
fn memory_the_program_maps_over_a_managed_mapping_stays_the_programs() {
    let _w = watchdog("map_fixed_over", 30);
    let space = small_space();
    let a = space.map_anon(16 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[1; 16 * PAGE]).unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    m.migrate_range_to_device(a, 16 * PAGE).unwrap();
    // SAFETY: over the test's own managed mapping (no Rust object in it); the new mapping is
    // unmapped at the end.
    let own = unsafe { map_own_fixed(a.get(), 16 * PAGE) };
    wait_followed(&space, 1);
    assert_eq!(dev.used(), 0);
    // SAFETY: a word of the test's own new mapping.
    unsafe { hetmem::sys::probe_store_u32(a.add(5 * PAGE).get(), 0xfeed) };
    // The space never maps over it.
    for _ in 0..4 {
        let b = space.map_anon(1 << 20, Prot::ReadWrite).unwrap();
        assert!(
            !VaRange::new(b, 1 << 20)
                .unwrap()
                .overlaps(&VaRange::new(a, 16 * PAGE).unwrap())
        );
    }
    drop(m);
    drop(space);
    // The reservation is gone, the program's mapping is not.
    assert_eq!(load(a.add(5 * PAGE).get()), 0xfeed);
    // SAFETY: the test's own mapping, unmapped once.
    assert_eq!(unsafe { libc::munmap(own as *mut _, 16 * PAGE) }, 0);
}

/// Stores through a shared file mapping that the program then unmaps itself reach the file at
/// the next fsync: the page tables that recorded them are gone with the munmap, so every cached
/// page of the mapping counts as written.
#[test]
fn stores_before_a_direct_munmap_of_a_file_mapping_reach_the_disk() {
    let _w = watchdog("munmap_file", 30);
    let f = TempFile::new("munmap-file", &vec![0x11u8; 16 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let a = space
        .map_file(&h, 0, 16 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    // The program's own stores (no hetmem call sees them), then its own munmap.
    for k in [0, 3, 15] {
        // SAFETY: a word of the test's shared file mapping, mapped read-write.
        unsafe { hetmem::sys::probe_store_u32(a.add(k * PAGE + 8).get(), 0xabcd_0000 | k as u32) };
    }
    // SAFETY: the test's own managed file mapping; no Rust object lives in it.
    assert_eq!(unsafe { libc::munmap(a.get() as *mut _, 16 * PAGE) }, 0);
    wait_followed(&space, 1);
    h.fsync().unwrap();
    let disk = f.disk();
    for k in [0, 3, 15] {
        let off = k * PAGE + 8;
        assert_eq!(
            u32::from_ne_bytes(disk[off..off + 4].try_into().unwrap()),
            0xabcd_0000 | k as u32,
            "page {k}: a store made before the munmap is lost"
        );
    }
    assert!(disk[4 * PAGE..15 * PAGE].iter().all(|&b| b == 0x11));
}

/// hetmem's own unmaps of every kind of mapping raise no UNMAP event (an event would make the
/// unmapping thread wait for the event reader, which would wait for the space's lock that the
/// thread holds: the watchdog would fire).
#[test]
fn hetmems_own_unmaps_are_not_reported_as_the_programs() {
    let _w = watchdog("own_unmaps", 30);
    let f = TempFile::new("own-unmaps", &vec![0x22u8; 16 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let space = small_space();
    let thread = MapOptions {
        mode: FaultMode::Thread,
        ..MapOptions::default()
    };
    let maps = [
        space.map_anon(16 * PAGE, Prot::ReadWrite).unwrap(),
        space.map_anon_with(16 * PAGE, thread).unwrap(),
        space
            .map_file(&h, 0, 16 * PAGE, Prot::ReadWrite, true)
            .unwrap(),
        space
            .map_file(&h, 0, 16 * PAGE, Prot::ReadWrite, false)
            .unwrap(),
        space
            .map_file_with(&h, 0, 16 * PAGE, intercepting(Prot::ReadWrite))
            .unwrap(),
    ];
    for &a in &maps {
        space.cpu_write(a, &[5; 64]).unwrap();
    }
    // One unmap over all of them and the holes between.
    let lo = maps.iter().min().unwrap().get();
    let hi = maps.iter().max().unwrap().get() + 16 * PAGE;
    space.unmap(VirtAddr(lo), hi - lo).unwrap();
    // And a space dropped with mappings in place.
    let other = small_space();
    let b = other.map_anon_with(16 * PAGE, thread).unwrap();
    other.cpu_write(b, &[1]).unwrap();
    drop(other);
    assert_eq!(space.stats().foreign_unmaps, 0);
    h.fsync().unwrap();
    assert_eq!(&f.disk()[..64], &[5; 64]);
}

/// `Space::unmap` over a range whose middle the program unmapped itself (and mapped memory of
/// its own into) unmaps the rest and leaves the program's memory alone (it failed with ENOMEM:
/// found from outside, four threads mapping, migrating and unmapping in three ways).
#[test]
fn unmapping_around_a_hole_the_program_made_leaves_its_memory_alone() {
    let _w = watchdog("unmap_around_hole", 30);
    let space = small_space();
    let a = space.map_anon(16 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[1; 16 * PAGE]).unwrap();
    let hole = a.add(4 * PAGE).get();
    // SAFETY: pages 4..12 of the test's own managed mapping, no Rust object in them.
    assert_eq!(unsafe { libc::munmap(hole as *mut _, 8 * PAGE) }, 0);
    wait_followed(&space, 1);
    // SAFETY: the hole the test unmapped; the new mapping is unmapped at the end.
    let own = unsafe { map_own_fixed(hole, 8 * PAGE) };
    // SAFETY: a word of the test's own mapping.
    unsafe { hetmem::sys::probe_store_u32(hole, 0xbeef) };
    space.unmap(a, 16 * PAGE).unwrap();
    assert!(matches!(
        space.cpu_read(a, &mut [0u8; 4]).unwrap_err(),
        Error::NotMapped { .. }
    ));
    assert_eq!(load(hole), 0xbeef);
    drop(space);
    assert_eq!(load(hole), 0xbeef);
    // SAFETY: the test's own mapping, unmapped once.
    assert_eq!(unsafe { libc::munmap(own as *mut _, 8 * PAGE) }, 0);
}

/// The process-wide reader, following a munmap of space A while A's lock is held, reads the
/// events of other spaces meanwhile (so that their callers go on); those it then serves
/// without waiting for their fd to poll readable again (it will not). A space B's REMAP read
/// that way stayed queued until B's next event (found by review).
#[test]
fn a_remap_read_while_another_space_waits_is_followed() {
    use hetmem::hmm::IntervalNotifier;
    use hetmem::notifier::{IntervalOps, NotifyRange};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Condvar, Mutex};

    /// Holds the first invalidation (inside `Space::unmap` of A, under A's lock) until released.
    struct Blocker {
        armed: AtomicBool,
        entered: AtomicBool,
        release: Mutex<bool>,
        cv: Condvar,
    }
    impl IntervalOps for Blocker {
        fn invalidate(&self, n: &IntervalNotifier, _r: &NotifyRange, seq: u64) -> bool {
            n.set_seq(seq);
            if self.armed.swap(false, Ordering::SeqCst) {
                self.entered.store(true, Ordering::SeqCst);
                let mut g = self.release.lock().unwrap();
                while !*g {
                    g = self.cv.wait(g).unwrap();
                }
            }
            true
        }
    }

    let _w = watchdog("remap_while_waiting", 60);
    let sa = small_space();
    let a = sa.map_anon(16 * PAGE, Prot::ReadWrite).unwrap();
    sa.cpu_write(a, &[1; 16 * PAGE]).unwrap();
    let sb = small_space();
    let b = sb.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    sb.cpu_write(b, &[2; 4 * PAGE]).unwrap();
    let ops = Arc::new(Blocker {
        armed: AtomicBool::new(true),
        entered: AtomicBool::new(false),
        release: Mutex::new(false),
        cv: Condvar::new(),
    });
    let weak: std::sync::Weak<dyn IntervalOps> =
        Arc::downgrade(&(ops.clone() as Arc<dyn IntervalOps>));
    let n = sa.insert_notifier(a, 4 * PAGE, weak).unwrap();
    let moved = std::thread::scope(|s| {
        let t = s.spawn(|| sa.unmap(a, 4 * PAGE));
        at("waiting for Space::unmap to hold A's lock");
        while !ops.entered.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // A direct munmap of another part of A: the reader reads it and waits for A's lock.
        // SAFETY: pages 8..12 of the test's own managed mapping, no Rust object in them.
        assert_eq!(
            unsafe { libc::munmap(a.add(8 * PAGE).get() as *mut _, 4 * PAGE) },
            0
        );
        // Move B's mapping: its REMAP is read while the reader waits (or after; either way it
        // must be followed).
        // SAFETY: B's own managed mapping; no Rust object lives in it.
        let moved = unsafe { move_away(b, 4 * PAGE) };
        *ops.release.lock().unwrap() = true;
        ops.cv.notify_all();
        t.join().unwrap().unwrap();
        moved
    });
    at("waiting for B's mremap to be followed, with no later event on B");
    while sb.stats().foreign_remaps < 1 {
        std::thread::yield_now();
    }
    assert_eq!(load(moved), u32::from_ne_bytes([2; 4]));
    sa.remove_notifier(&n);
    // SAFETY: the moved range is the test's plain memory now.
    assert_eq!(unsafe { libc::munmap(moved as *mut _, 4 * PAGE) }, 0);
}

/// A device storing to and reading device-coherent pages (the CPU page is the coherent frame)
/// while the program unmaps part of them and maps fresh memory there, before hetmem has
/// followed the unmap: the device's copies went through the address with a plain copy, and
/// one that met the unmapped page killed the process with SIGSEGV (found from outside, 1 run
/// in 2 of a scratch program). Signal-mode mappings (in thread-mode ones the copy is still a
/// plain one, and can still die there). The program breaks the contract here (it must not
/// unmap memory a device is using: docs/architecture.md, munmap), and what the device's
/// command did to the memory it maps anew there is not checked; the process must live. The device's commands over the unmapped part
/// fail or lose their stores there, as the kernel's dmirror's; the process lives; the pages
/// before the hole keep the program's or the device's bytes.
#[test]
fn a_device_copying_coherent_pages_the_program_unmaps_does_not_kill_the_process() {
    let _w = watchdog("coherent copies vs munmap", 120);
    coherent_copies_vs_munmap(&[FaultMode::Signal]);
}

fn coherent_copies_vs_munmap(modes: &[FaultMode]) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    for &mode in modes {
        let space = small_space();
        let dev = coherent(16 << 20);
        let m = dev.mirror(&space).unwrap();
        let opts = MapOptions {
            mode,
            ..MapOptions::default()
        };
        const N: usize = 64;
        for round in 0..100 {
            at(format!("{mode:?} round {round}"));
            let a = space.map_anon_with(N * PAGE, opts).unwrap();
            space.cpu_write(a, &vec![1u8; N * PAGE]).unwrap();
            m.migrate_range_to_device(a, N * PAGE).unwrap();
            let in_flight = AtomicUsize::new(0);
            let stop = AtomicBool::new(false);
            let hole = a.add(16 * PAGE);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let b = vec![9u8; N * PAGE];
                    let mut r = vec![0u8; N * PAGE];
                    let mut i = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let res = if i.is_multiple_of(2) {
                            m.write(a, N * PAGE, &b)
                        } else {
                            m.read(a, N * PAGE, &mut r)
                        };
                        match res {
                            Ok(_) | Err(Error::Busy) | Err(Error::NotMapped { .. }) => {}
                            Err(Error::Invalid(_)) | Err(Error::Os { .. }) => {}
                            Err(e) => panic!("device command: {e:?}"),
                        }
                        i += 1;
                    }
                });
                // Once a device command is in flight (a little later each round).
                while in_flight.load(Ordering::SeqCst) == 0 {
                    std::thread::yield_now();
                }
                for _ in 0..(round % 20) * 200 {
                    std::hint::spin_loop();
                }
                // SAFETY: 16 pages of the test's own managed mapping, which no Rust object
                // refers to; the fresh mapping is the test's plain memory from then on.
                unsafe {
                    assert_eq!(libc::munmap(hole.get() as *mut _, 16 * PAGE), 0);
                    let p = libc::mmap(
                        hole.get() as *mut _,
                        16 * PAGE,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                    assert_eq!(p as usize, hole.get());
                    std::ptr::write_bytes(p as *mut u8, 7, 16 * PAGE);
                }
                stop.store(true, Ordering::SeqCst);
            });
            // SAFETY: the program's fresh memory, no Rust object in it.
            assert_eq!(unsafe { libc::munmap(hole.get() as *mut _, 16 * PAGE) }, 0);
            let mut back = vec![0u8; 16 * PAGE];
            space.cpu_read(a, &mut back).unwrap();
            assert!(
                back.iter().all(|&x| x == 1 || x == 9),
                "{mode:?} round {round}: the pages before the hole"
            );
            space.unmap(a, 16 * PAGE).unwrap();
            space.unmap(a.add(32 * PAGE), 32 * PAGE).unwrap();
        }
    }
}

/// A program that moves a range away with a direct mremap and unmaps the new address at once,
/// before hetmem has followed the move (found from outside: the follow's copy of a device page
/// to the new address found it unmapped, ENOENT, and aborted the process, every run). The data
/// goes with the unmapped range, as with the kernel alone; nothing aborts, the move and the
/// unmap are both followed, and the rest of the mapping keeps its bytes. Both fault modes.
#[test]
fn a_range_moved_away_and_unmapped_at_once_aborts_nothing() {
    let _w = watchdog("mremap then munmap", 60);
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let space = small_space();
        let dev = SoftDevice::private(16 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        const CHUNK: usize = 8 * PAGE;
        const ROUNDS: usize = 64;
        let opts = MapOptions {
            mode,
            ..MapOptions::default()
        };
        let a = space.map_anon_with(ROUNDS * 2 * CHUNK, opts).unwrap();
        space
            .cpu_write(a, &pattern(ROUNDS * 2 * CHUNK, |i| i ^ 0x77))
            .unwrap();
        m.migrate_range_to_device(a, ROUNDS * 2 * CHUNK).unwrap();
        for round in 0..ROUNDS {
            at(format!("{mode:?}: round {round}"));
            let before = space.stats().foreign_remaps;
            let from = a.add(round * 2 * CHUNK);
            // SAFETY: the test's own managed chunk, moved away then unmapped; no Rust object
            // lives in it.
            unsafe {
                let moved = move_away(from, CHUNK);
                assert_eq!(libc::munmap(moved as *mut _, CHUNK), 0);
            }
            while space.stats().foreign_remaps == before {
                std::thread::yield_now();
            }
        }
        // The chunks between the moved ones are where they were, with their bytes.
        let want = pattern(ROUNDS * 2 * CHUNK, |i| i ^ 0x77);
        for round in 0..ROUNDS {
            let kept = a.add((round * 2 + 1) * CHUNK);
            let mut b = vec![0u8; CHUNK];
            m.read(kept, CHUNK, &mut b).unwrap();
            let off = (round * 2 + 1) * CHUNK;
            assert!(b == want[off..off + CHUNK], "{mode:?}: chunk {round} kept");
        }
    }
}
