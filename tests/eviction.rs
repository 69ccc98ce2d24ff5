//! Device eviction in batches (the kernel's `migrate_device_range`): a device release brings
//! every page of every address space back to system memory, one copy per run of pages whose
//! frames are consecutive, waits for migrations that own some of its pages, and keeps every byte.

mod common;
use common::*;
use hetmem::migrate::{self, MigrateArgs, SELECT_DEVICE_PRIVATE};
use hetmem::policy::trace::{Direction, EventKind, RingSink, TraceEvent, Tracer};
use hetmem::*;
use std::sync::Arc;

fn traced(space: &Space) -> Arc<RingSink> {
    let (t, ring) = Tracer::ring(1 << 16).unwrap();
    space.set_trace(Some(t));
    ring
}

/// The eviction events of `ring` (in order).
fn evictions(ring: &RingSink) -> Vec<TraceEvent> {
    assert_eq!(ring.dropped(), 0);
    ring.take()
        .into_iter()
        .filter(|e| e.kind == EventKind::Evict)
        .collect()
}

#[test]
fn release_evicts_runs_of_pages_with_one_copy_each_in_every_space() {
    let _w = watchdog("evict_runs", 60);
    let dev = SoftDevice::private(32 << 20).unwrap();
    let spaces: Vec<Space> = (0..2).map(|_| Space::new().unwrap()).collect();
    let n = 1024; // 4 MiB of base pages per space
    let mut maps = Vec::new();
    for (s, space) in spaces.iter().enumerate() {
        let m = dev.mirror(space).unwrap();
        let a = space.map_anon(n * PAGE, Prot::ReadWrite).unwrap();
        let data = pattern(n * PAGE, |i| i ^ (s as u32 * 0x0101_0101));
        space.cpu_write(a, &data).unwrap();
        assert_eq!(
            m.migrate_range_to_device(a, n * PAGE).unwrap().cpages,
            n as u64
        );
        maps.push((m, a, data));
    }
    let rings: Vec<_> = spaces.iter().map(traced).collect();
    assert_eq!(dev.release().unwrap(), 2 * n);
    assert_eq!(dev.used(), 0, "every frame is free after a release");
    for ((space, (_, a, data)), ring) in spaces.iter().zip(&maps).zip(&rings) {
        let evs = evictions(ring);
        // The frames were allocated in order, so the pages come back in a few long runs (one
        // per run of consecutive frames), not one event (one copy) per page.
        assert!(
            !evs.is_empty() && evs.len() <= 4,
            "{} eviction runs for {n} pages: {evs:?}",
            evs.len()
        );
        assert_eq!(evs.iter().map(|e| e.pages as usize).sum::<usize>(), n);
        assert!(evs.iter().all(|e| e.dir == Direction::ToSystem));
        for p in 0..n {
            assert_eq!(space.residency(a.add(p * PAGE)), Residency::System);
        }
        let mut back = vec![0u8; n * PAGE];
        space.cpu_read(*a, &mut back).unwrap();
        assert!(back == *data, "bytes survive the eviction");
    }
}

#[test]
fn release_of_scattered_pages_and_units_keeps_every_byte() {
    let _w = watchdog("evict_scattered", 60);
    let dev = SoftDevice::private(32 << 20).unwrap();
    let space = Space::new().unwrap();
    let m = dev.mirror(&space).unwrap();
    // A large mapping (2 MiB units) and a base-page one, interleaved migrations, some pages
    // faulted back before the release: the frames the device holds are scattered.
    let big = space
        .map_anon_with(
            2 * PMD,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    let small = space.map_anon(256 * PAGE, Prot::ReadWrite).unwrap();
    let dbig = pattern(2 * PMD, |i| i.wrapping_mul(3));
    let dsmall = pattern(256 * PAGE, |i| i.wrapping_mul(7));
    space.cpu_write(big, &dbig).unwrap();
    space.cpu_write(small, &dsmall).unwrap();
    for k in 0..4 {
        m.migrate_range_to_device(small.add(k * 64 * PAGE), 32 * PAGE)
            .unwrap();
        if k < 2 {
            m.migrate_range_to_device(big.add(k * PMD), PMD).unwrap();
        }
        m.migrate_range_to_device(small.add((k * 64 + 32) * PAGE), 32 * PAGE)
            .unwrap();
    }
    // Fault a few back by CPU loads.
    for p in [3usize, 40, 100, 255] {
        let want = u32::from_ne_bytes(dsmall[p * PAGE..p * PAGE + 4].try_into().unwrap());
        assert_eq!(space.load_u32(small.add(p * PAGE)).unwrap(), want);
    }
    let ring = traced(&space);
    let moved = dev.release().unwrap();
    assert_eq!(moved, 2 * (PMD / PAGE) + 256 - 4);
    assert_eq!(dev.used(), 0);
    let evs = evictions(&ring);
    assert_eq!(evs.iter().map(|e| e.pages as usize).sum::<usize>(), moved);
    let mut back = vec![0u8; 2 * PMD];
    space.cpu_read(big, &mut back).unwrap();
    assert!(back == dbig);
    let mut back = vec![0u8; 256 * PAGE];
    space.cpu_read(small, &mut back).unwrap();
    assert!(back == dsmall);
}

#[test]
fn release_waits_for_a_migration_that_owns_some_of_its_pages() {
    let _w = watchdog("evict_waits", 60);
    let dev = SoftDevice::private(16 << 20).unwrap();
    let space = Space::new().unwrap();
    let m = dev.mirror(&space).unwrap();
    let n = 8;
    let a = space.map_anon(n * PAGE, Prot::ReadWrite).unwrap();
    let data = pattern(n * PAGE, |i| i ^ 0x77);
    space.cpu_write(a, &data).unwrap();
    m.migrate_range_to_device(a, n * PAGE).unwrap();
    let ring = traced(&space);
    std::thread::scope(|s| {
        // A migration of the device's own pages 0..4 is in flight (collected, not finalized):
        // those pages are its own until it finalizes.
        let mig = migrate::migrate_vma_setup(
            &space,
            MigrateArgs {
                start: a,
                end: a.add(4 * PAGE),
                flags: SELECT_DEVICE_PRIVATE,
                pgmap_owner: dev.owner(),
            },
        )
        .unwrap();
        assert_eq!(mig.cpages, 4);
        let releaser = s.spawn(|| {
            at("release");
            dev.release()
        });
        // The release evicts pages 4..8 first (one run), then waits for the migration.
        at("waiting for the first eviction");
        let mut seen = Vec::new();
        while seen.iter().map(|e: &TraceEvent| e.pages).sum::<u64>() < 4 {
            seen.extend(evictions(&ring));
            std::thread::yield_now();
        }
        assert_eq!(seen[0].addr, a.add(4 * PAGE).get() as u64);
        // The driver declines every page: they stay in device memory, and the release, which
        // waits for the migration (it cannot have finished), takes them now.
        at("finalize");
        drop(mig);
        at("join");
        assert_eq!(releaser.join().unwrap().unwrap(), n);
    });
    assert_eq!(
        dev.used(),
        0,
        "the waiting release evicted the pages the migration kept"
    );
    let mut back = vec![0u8; n * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back == data);
}
