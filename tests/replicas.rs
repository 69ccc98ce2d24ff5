//! Read-only replicas of anonymous pages (`Placement::Replicate`, the read-mostly hint): the
//! device reads its own copies, the CPU reads the pages in place without a fault, and every way
//! a page can change drops the replicas first, so no device ever reads a stale byte.

mod common;
use common::*;
use hetmem::policy::DefaultPolicy;
use hetmem::policy::hints::{Advice, HintPolicy};
use hetmem::*;
use std::sync::Arc;

const PAGES: usize = 16;

/// A space with `PAGES` written pages, advised read-mostly for every device.
fn setup() -> (Space, VirtAddr, Arc<HintPolicy>) {
    setup_in(FaultMode::Signal)
}

/// [`setup`] with CPU faults served in `mode`.
fn setup_in(mode: FaultMode) -> (Space, VirtAddr, Arc<HintPolicy>) {
    let space = Space::new().unwrap();
    let a = space
        .map_anon_with(
            PAGES * PAGE,
            MapOptions {
                mode,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space
        .cpu_write(a, &pattern(PAGES * PAGE, |i| i + 1))
        .unwrap();
    let hints = Arc::new(HintPolicy::new(Arc::new(DefaultPolicy)));
    hints.advise(a, PAGES * PAGE, Advice::ReadMostly).unwrap();
    space.set_policy(hints.clone());
    (space, a, hints)
}

fn dev_read(m: &DeviceMirror, a: VirtAddr, pages: usize) -> Vec<u32> {
    let mut buf = vec![0u8; pages * PAGE];
    m.read(a, pages * PAGE, &mut buf).unwrap();
    ints(&buf)
}

fn want(pages: usize) -> Vec<u32> {
    ints(&pattern(pages * PAGE, |i| i + 1))
}

#[test]
fn a_read_fault_makes_replicas_the_device_reads_locally_and_the_cpu_reads_in_place() {
    let _w = watchdog("replica_read", 30);
    let (space, a, _h) = setup();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let used0 = dev.used();
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    assert_eq!(m.replica_pages(), PAGES);
    assert_eq!(dev.used(), used0 + PAGES * PAGE, "one frame per replica");
    // The pages stayed in system memory: CPU reads take no fault.
    let faults = space.stats().cpu_faults;
    let mut back = vec![0u8; PAGES * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(ints(&back), want(PAGES));
    assert_eq!(space.stats().cpu_faults, faults, "reads in place");
    for p in 0..PAGES {
        assert_eq!(space.residency(a.add(p * PAGE)), Residency::System);
    }
    // The device's next reads are local: nothing more over the link.
    let remote = dev
        .link()
        .traffic(hetmem::link::Traffic::DeviceRemote)
        .bytes;
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    assert_eq!(
        dev.link()
            .traffic(hetmem::link::Traffic::DeviceRemote)
            .bytes,
        remote
    );
}

#[test]
fn a_cpu_store_drops_every_replica_first_and_the_devices_read_the_new_bytes() {
    let _w = watchdog("replica_cpu_store", 30);
    cpu_store_drops_replicas(FaultMode::Signal);
}

#[test]
fn a_thread_mode_mapping_is_read_where_it_is_and_stays_right() {
    // No replicas in thread mode (a copy under the lock could wait on the handler thread):
    // the device reads the pages where they are, and sees every store.
    let _w = watchdog("replica_thread_mode", 30);
    let (space, a, _h) = setup_in(FaultMode::Thread);
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    assert_eq!(m.replica_pages(), 0);
    space.store_u32(a.add(3 * PAGE), 0xdead_beef).unwrap();
    let mut w = want(PAGES);
    w[3 * PAGE / 4] = 0xdead_beef;
    assert_eq!(dev_read(&m, a, PAGES), w);
}

fn cpu_store_drops_replicas(mode: FaultMode) {
    let (space, a, _h) = setup_in(mode);
    let d1 = SoftDevice::private(16 << 20).unwrap();
    let d2 = SoftDevice::private(16 << 20).unwrap();
    let (m1, m2) = (d1.mirror(&space).unwrap(), d2.mirror(&space).unwrap());
    let used = (d1.used(), d2.used());
    assert_eq!(dev_read(&m1, a, PAGES), want(PAGES));
    assert_eq!(dev_read(&m2, a, PAGES), want(PAGES));
    assert_eq!((m1.replica_pages(), m2.replica_pages()), (PAGES, PAGES));
    // A real store to page 3 (and one through the probe to page 9).
    space.store_u32(a.add(3 * PAGE), 0xdead_beef).unwrap();
    let probe = space.probe(a, PAGES * PAGE).unwrap();
    probe.store_u32(a.add(9 * PAGE + 8), 0x1234_5678).unwrap();
    assert_eq!(
        (m1.replica_pages(), m2.replica_pages()),
        (PAGES - 2, PAGES - 2)
    );
    let mut w = want(PAGES);
    w[3 * PAGE / 4] = 0xdead_beef;
    w[9 * PAGE / 4 + 2] = 0x1234_5678;
    assert_eq!(dev_read(&m1, a, PAGES), w);
    assert_eq!(dev_read(&m2, a, PAGES), w);
    // The devices replicated the changed pages again on their next reads.
    assert_eq!((m1.replica_pages(), m2.replica_pages()), (PAGES, PAGES));
    // A second store to the same page faults again (the new replicas protect it again).
    space.store_u32(a.add(3 * PAGE), 7).unwrap();
    w[3 * PAGE / 4] = 7;
    assert_eq!(dev_read(&m2, a, PAGES), w);
    drop((m1, m2));
    assert_eq!((d1.used(), d2.used()), used, "replicas freed");
}

#[test]
fn a_device_write_drops_every_replica_and_everyone_reads_it() {
    let _w = watchdog("replica_device_write", 30);
    let (space, a, _h) = setup();
    let d1 = SoftDevice::private(16 << 20).unwrap();
    let d2 = SoftDevice::private(16 << 20).unwrap();
    let (m1, m2) = (d1.mirror(&space).unwrap(), d2.mirror(&space).unwrap());
    assert_eq!(dev_read(&m1, a, PAGES), want(PAGES));
    assert_eq!(dev_read(&m2, a, PAGES), want(PAGES));
    // Device 2 writes page 5: a write migrates under read-mostly; device 1's replica goes.
    let page = pattern(PAGE, |i| 0xa000_0000 | i);
    m2.write(a.add(5 * PAGE), PAGE, &page).unwrap();
    assert_eq!(m1.replica_pages(), PAGES - 1);
    let mut w = want(PAGES);
    w[5 * PAGE / 4..6 * PAGE / 4].copy_from_slice(&ints(&page));
    assert_eq!(dev_read(&m1, a, PAGES), w);
    let mut back = vec![0u8; PAGES * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(ints(&back), w);
}

#[test]
fn migration_unmap_pin_and_exclusive_access_drop_replicas() {
    let _w = watchdog("replica_other_paths", 30);
    let (space, a, _h) = setup();
    let d1 = SoftDevice::private(16 << 20).unwrap();
    let d2 = SoftDevice::private(16 << 20).unwrap();
    let (m1, m2) = (d1.mirror(&space).unwrap(), d2.mirror(&space).unwrap());
    let used1 = d1.used();
    assert_eq!(dev_read(&m1, a, PAGES), want(PAGES));
    // Device 2 migrates pages 0..4 to its memory: device 1's replicas of them go.
    m2.migrate_range_to_device(a, 4 * PAGE).unwrap();
    assert_eq!(m1.replica_pages(), PAGES - 4);
    // A pin of pages 4..6 (I/O may write them).
    let pin = space.pin(a.add(4 * PAGE), 2 * PAGE, true).unwrap();
    assert_eq!(m1.replica_pages(), PAGES - 6);
    // Exclusive access to page 6 by device 2.
    let mut one = vec![0u8; PAGE];
    m2.exclusive(a.add(6 * PAGE), PAGE, &mut one).unwrap();
    assert_eq!(m1.replica_pages(), PAGES - 7);
    // Device 2 stores to page 6 atomically; device 1 reads everything right.
    let mut w = want(PAGES);
    w[6 * PAGE / 4] = w[6 * PAGE / 4].wrapping_add(1);
    m2.atomic_fetch_add(a.add(6 * PAGE), 1).unwrap();
    drop(pin);
    assert_eq!(dev_read(&m1, a, PAGES), w);
    // An unmap of the range frees every replica.
    space.unmap(a, PAGES * PAGE).unwrap();
    assert_eq!(m1.replica_pages(), 0);
    assert_eq!(d1.used(), used1, "replica frames back in the pool");
}

#[test]
fn a_full_device_maps_the_rest_where_it_is_and_reads_stay_right() {
    let _w = watchdog("replica_full", 30);
    let space = Space::new().unwrap();
    // 2 MiB of device memory, 3 MiB of data.
    let n = 3 * 256;
    let a = space.map_anon(n * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(n * PAGE, |i| i + 1)).unwrap();
    let hints = Arc::new(HintPolicy::new(Arc::new(DefaultPolicy)));
    hints.advise(a, n * PAGE, Advice::ReadMostly).unwrap();
    space.set_policy(hints);
    let dev = SoftDevice::private(2 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    for _ in 0..2 {
        assert_eq!(dev_read(&m, a, n), want(n));
    }
    assert_eq!(m.replica_pages(), 512, "every free frame, no more");
    assert_eq!(dev.used(), 2 << 20);
    // A migration finds the device full of replicas: the page stays, nothing is lost.
    let _ = m.migrate_range_to_device(a.add(600 * PAGE), PAGE);
    assert_eq!(dev_read(&m, a, n), want(n));
}

#[test]
fn stores_racing_device_reads_are_never_lost_or_read_stale() {
    // One thread stores increasing values into every page; a device reads them under
    // read-mostly, replicating again and again. Every value the device reads is one the CPU
    // stored and never older than one it read before; after the last store, the device reads
    // the last value everywhere.
    let _w = watchdog("replica_race", 60);
    let (space, a, _h) = setup();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    // The race is with replicas: the first read makes them.
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    assert_eq!(m.replica_pages(), PAGES);
    let rounds = 200u32;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for v in 1..=rounds {
                for p in 0..PAGES {
                    space.store_u32(a.add(p * PAGE), 1_000_000 + v).unwrap();
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Release);
        });
        let first = want(PAGES);
        let mut last: Vec<u32> = (0..PAGES).map(|p| first[p * PAGE / 4]).collect();
        loop {
            let done = stop.load(std::sync::atomic::Ordering::Acquire);
            let got = dev_read(&m, a, PAGES);
            for p in 0..PAGES {
                let v = got[p * PAGE / 4];
                assert!(
                    v == first[p * PAGE / 4] || (1_000_001..=1_000_000 + rounds).contains(&v),
                    "page {p}: {v}"
                );
                assert!(v >= last[p], "page {p} went back: {v} after {}", last[p]);
                last[p] = v;
            }
            if done {
                assert_eq!(last, vec![1_000_000 + rounds; PAGES], "the last stores");
                break;
            }
        }
    });
}

#[test]
fn a_device_that_mapped_a_page_writable_before_it_was_replicated_faults_on_its_next_write() {
    let _w = watchdog("replica_prior_writer", 30);
    let space = Space::new().unwrap();
    let a = space.map_anon(PAGES * PAGE, Prot::ReadWrite).unwrap();
    space
        .cpu_write(a, &pattern(PAGES * PAGE, |i| i + 1))
        .unwrap();
    let d1 = SoftDevice::private(16 << 20).unwrap();
    let d2 = SoftDevice::private(16 << 20).unwrap();
    let (m1, m2) = (d1.mirror(&space).unwrap(), d2.mirror(&space).unwrap());
    // Device 2 maps the pages writable (the default policy: where they are).
    let page = pattern(PAGE, |i| 0xb000_0000 | i);
    m2.write(a, PAGE, &page).unwrap();
    // Then the range is read-mostly and device 1 replicates it.
    let hints = Arc::new(HintPolicy::new(Arc::new(DefaultPolicy)));
    hints.advise(a, PAGES * PAGE, Advice::ReadMostly).unwrap();
    space.set_policy(hints);
    let mut w = want(PAGES);
    w[..PAGE / 4].copy_from_slice(&ints(&page));
    assert_eq!(dev_read(&m1, a, PAGES), w);
    assert_eq!(m1.replica_pages(), PAGES);
    // Device 2 writes page 0 again: its old writable entry is gone, so it faults, and device
    // 1's replica goes before the store.
    let page2 = pattern(PAGE, |i| 0xc000_0000 | i);
    let out = m2.write(a, PAGE, &page2).unwrap();
    assert!(out.faults > 0, "the write faulted");
    w[..PAGE / 4].copy_from_slice(&ints(&page2));
    assert_eq!(dev_read(&m1, a, PAGES), w);
}

/// `n` pages of data (`want`) under the adaptive policy, and a device-private device with
/// 2 MiB of memory mirroring them.
fn adaptive_world(n: usize) -> (Space, VirtAddr, SoftDevice, DeviceMirror) {
    let space = Space::new().unwrap();
    let a = space.map_anon(n * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(n * PAGE, |i| i + 1)).unwrap();
    space.set_policy(Arc::new(hetmem::policy::adaptive::AdaptivePolicy::new()));
    let dev = SoftDevice::private(2 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    (space, a, dev, m)
}

#[test]
fn under_the_adaptive_policy_new_data_takes_the_place_of_older_replicas() {
    // 2 MiB of device memory; data A then data B (2 MiB each), then A again. B's reads drop
    // A's replicas to make room; A, faulted again after losing its place, is read where it is
    // (no ping-pong of replicas).
    let _w = watchdog("replica_phases", 30);
    let n = 1024;
    let (space, a, dev, m) = adaptive_world(n);
    let all = want(n);
    let read = |lo: usize, hi: usize| {
        let mut buf = vec![0u8; PAGE];
        for p in lo..hi {
            m.read(a.add(p * PAGE), PAGE, &mut buf).unwrap();
            assert!(
                ints(&buf) == all[p * PAGE / 4..(p + 1) * PAGE / 4],
                "page {p}"
            );
        }
    };
    let remote = || {
        dev.link()
            .traffic(hetmem::link::Traffic::DeviceRemote)
            .bytes
    };
    read(0, 512);
    assert_eq!((m.replica_pages(), remote()), (512, 0));
    read(512, 1024);
    assert_eq!((m.replica_pages(), remote()), (512, 0), "B took A's place");
    read(512, 1024);
    assert_eq!(remote(), 0, "B is local");
    read(0, 512);
    assert_eq!(
        remote(),
        512 * PAGE as u64,
        "A lost its place once: read where it is"
    );
    // A device write to a page of B migrates it (the policy's choice for writes) with the
    // dense rest of its 2 MiB, in the frames their replicas gave up; A's pages, mapped where
    // they are, are written in place.
    let page = pattern(PAGE, |i| 0xd000_0000 | i);
    let b = a.add(600 * PAGE);
    m.write(b, PAGE, &page).unwrap();
    assert_eq!(space.residency(b), Residency::Device(dev.owner()));
    assert_eq!(
        space.residency(a.add(700 * PAGE)),
        Residency::Device(dev.owner())
    );
    assert_eq!(m.replica_pages(), 0);
    read(700, 1024);
    m.write(a, PAGE, &page).unwrap();
    assert_eq!(space.residency(a), Residency::System);
    for x in [a, b] {
        let mut back = vec![0u8; PAGE];
        space.cpu_read(x, &mut back).unwrap();
        assert_eq!(back, page);
    }
}

#[test]
fn a_replicated_page_the_program_drops_loses_its_replicas_and_reads_as_zeros_everywhere() {
    // A direct madvise(MADV_DONTNEED) of a replicated page raises no event: the refill of the
    // dropped page (at the next CPU access, or the next access of a device that maps it where
    // it is) drops the replicas, which held the old bytes. (Until then a device holding a
    // replica reads the bytes from before the drop: a documented limit.)
    let _w = watchdog("replica_madvise", 30);
    {
        let mode = FaultMode::Signal;
        let (space, a, _h) = setup_in(mode);
        let dev = SoftDevice::private(16 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
        // SAFETY: `a..a + PAGES pages` is managed memory of `space` (mapped above), where no
        // Rust object lives.
        unsafe { hetmem::sys::madvise_dontneed(a.get(), 2 * PAGE) }.unwrap();
        // The CPU reads page 0 (refilled with zeros), then stores to it: no stale replica.
        assert_eq!(space.load_u32(a).unwrap(), 0, "{mode:?}");
        space.store_u32(a.add(8), 5).unwrap();
        // Page 1: the CPU's read refills it.
        assert_eq!(space.load_u32(a.add(PAGE)).unwrap(), 0, "{mode:?}");
        let mut w = want(PAGES);
        w[..2 * PAGE / 4].fill(0);
        w[2] = 5;
        assert_eq!(dev_read(&m, a, PAGES), w, "{mode:?}");
        // Page 4, dropped: a second device's first read (read-mostly) finds it gone, refills
        // it, and the first device's replica goes.
        let d2 = SoftDevice::private(16 << 20).unwrap();
        let m2 = d2.mirror(&space).unwrap();
        // SAFETY: as above.
        unsafe { hetmem::sys::madvise_dontneed(a.add(4 * PAGE).get(), PAGE) }.unwrap();
        w[4 * PAGE / 4..5 * PAGE / 4].fill(0);
        assert_eq!(dev_read(&m2, a, PAGES), w, "{mode:?}");
        // The refilled page's new replica protects it: a store drops it.
        space.store_u32(a.add(4 * PAGE), 0xdead_beef).unwrap();
        w[4 * PAGE / 4] = 0xdead_beef;
        assert_eq!(dev_read(&m2, a, PAGES), w, "{mode:?}");
        assert_eq!(dev_read(&m, a, PAGES), w, "{mode:?}");
    }
}

#[test]
fn replicas_dropped_while_the_mapping_is_read_only_leave_the_page_writable_again() {
    let _w = watchdog("replica_read_only", 30);
    let (space, a, _h) = setup();
    let d1 = SoftDevice::private(16 << 20).unwrap();
    let m1 = d1.mirror(&space).unwrap();
    assert_eq!(dev_read(&m1, a, PAGES), want(PAGES));
    space.protect(a, PAGES * PAGE, Prot::Read).unwrap();
    let pin = space.pin(a, PAGE, false).unwrap();
    drop(pin);
    space.protect(a, PAGES * PAGE, Prot::ReadWrite).unwrap();
    // A device store to page 0 goes through (no protection left behind).
    let page = pattern(PAGE, |i| 0xe000_0000 | i);
    let d2 = SoftDevice::private(16 << 20).unwrap();
    let m2 = d2.mirror(&space).unwrap();
    space.set_policy(Arc::new(DefaultPolicy));
    m2.write(a, PAGE, &page).unwrap();
    let mut back = vec![0u8; PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, page);
}

#[test]
fn a_mirror_that_goes_leaves_no_page_protected() {
    // After the only device holding replicas goes, the program's own system calls can write
    // into the pages again (in signal mode a protected page would refuse them: EFAULT).
    let _w = watchdog("replica_mirror_drop", 30);
    let (space, a, _h) = setup();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    drop(m);
    assert_eq!(dev.used(), 0);
    let faults = space.stats().cpu_faults;
    space.store_u32(a, 9).unwrap();
    assert_eq!(space.stats().cpu_faults, faults, "a store takes no fault");
}

#[test]
fn after_a_fork_the_child_reads_and_writes_its_copy_and_the_parents_store_still_drops_replicas() {
    let _w = watchdog("replica_fork", 30);
    let (space, a, _h) = setup();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    let probe = space.probe(a, PAGES * PAGE).unwrap();
    let first = want(PAGES);
    let probe_ref = &probe;
    // SAFETY: the child only loads and stores through the probe (bounds checks and volatile
    // accesses of its own copy: no allocation, no lock) and exits with a code.
    let st = unsafe {
        hetmem::sys::fork_and_wait(|| {
            for p in 0..PAGES {
                let x = a.add(p * PAGE);
                if probe_ref.load_u32(x).ok() != Some(first[p * PAGE / 4]) {
                    return 10;
                }
                if probe_ref.store_u32(x, 0xc41d).is_err() {
                    return 11;
                }
            }
            0
        })
    }
    .unwrap();
    assert_eq!(st, hetmem::sys::ChildExit::Exited(0));
    // The child's stores stayed in the child; the parent's store drops the replica.
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    probe.store_u32(a.add(2 * PAGE), 77).unwrap();
    let mut w = want(PAGES);
    w[2 * PAGE / 4] = 77;
    assert_eq!(dev_read(&m, a, PAGES), w);
}

#[test]
fn a_device_release_drops_its_replicas_and_leaves_the_pages_unprotected() {
    let _w = watchdog("replica_release", 30);
    let (space, a, _h) = setup();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    assert_eq!(dev_read(&m, a, PAGES), want(PAGES));
    assert_eq!(m.replica_pages(), PAGES);
    dev.release().unwrap();
    assert_eq!((dev.used(), m.replica_pages()), (0, 0));
    let faults = space.stats().cpu_faults;
    space.store_u32(a, 9).unwrap();
    assert_eq!(space.stats().cpu_faults, faults, "no protection left");
    let mut w = want(PAGES);
    w[0] = 9;
    assert_eq!(dev_read(&m, a, PAGES), w);
}

#[test]
fn a_migration_to_a_device_full_of_replicas_drops_one_rather_than_evicting_a_page() {
    // 2 MiB of device memory, full of read-only replicas of region A (the adaptive policy);
    // a device write to one page of region B migrates it (writes migrate): the device evicts
    // nothing that would have to be copied back, it drops one replica (a copy, dropped).
    let _w = watchdog("replica_room_for_migration", 30);
    let n = 1024;
    let (space, a, dev, m) = adaptive_world(n);
    let mut buf = vec![0u8; PAGE];
    for p in 0..512 {
        m.read(a.add(p * PAGE), PAGE, &mut buf).unwrap();
    }
    assert_eq!((m.replica_pages(), dev.used()), (512, 2 << 20));
    let page = pattern(PAGE, |i| 0xd000_0000 | i);
    let b = a.add(700 * PAGE);
    m.write(b, PAGE, &page).unwrap();
    assert_eq!(space.residency(b), Residency::Device(dev.owner()));
    assert_eq!(m.replica_pages(), 511, "one replica made room");
    let mut back = vec![0u8; PAGE];
    space.cpu_read(b, &mut back).unwrap();
    assert_eq!(back, page);
    // Every replica left still reads right.
    let all = want(n);
    for p in 0..512 {
        m.read(a.add(p * PAGE), PAGE, &mut buf).unwrap();
        assert!(
            ints(&buf) == all[p * PAGE / 4..(p + 1) * PAGE / 4],
            "page {p}"
        );
    }
}
