//! Regression tests for bugs found in review, each asserting the behaviour the docs promise.

mod common;
use common::*;
use hetmem::migrate::{self, MigrateArgs, SELECT_SYSTEM};
use hetmem::*;

fn large_opts() -> MapOptions {
    MapOptions {
        large: true,
        ..MapOptions::default()
    }
}

/// Exclusive access to an untouched page of a large mapping: making the page present fills the
/// whole 2 MiB unit, which must then be split (the page leaves the CPU view). A compound
/// migration of the unit used to select it whole and read the dropped page under the space's
/// lock: a deadlock with the SIGBUS handler.
#[test]
fn exclusive_in_untouched_large_unit_splits_it() {
    let _w = watchdog("exclusive_large_unit", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon_with(PMD, large_opts()).unwrap();
    let p1 = a.add(PAGE);
    let mut buf = vec![0u8; PAGE];
    m.exclusive(p1, PAGE, &mut buf).unwrap();
    assert!(matches!(space.residency(p1), Residency::Exclusive(_)));
    let mut snap = vec![0u8; 1];
    m.snapshot(a, PAGE, &mut snap).unwrap();
    assert_eq!(snap[0] & hetmem::device::snap::PMD, 0, "the unit was split");
    // The exclusive page is not selected (ENOENT from the read-back), the rest moves as base pages.
    let e = m.migrate_range_to_device(a, PMD).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    assert!(matches!(space.residency(p1), Residency::Exclusive(_)));
    assert_eq!(space.residency(a), Residency::Device(dev.owner()));
    let mut back = vec![1u8; PMD];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

/// The same over the in-memory kernel model (which panics if hetmem reads a missing page).
#[test]
fn exclusive_in_untouched_large_unit_model() {
    let space = Space::new_model(64 << 20).unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon_with(PMD, large_opts()).unwrap();
    let p1 = a.add(PAGE);
    let mut buf = vec![0u8; PAGE];
    m.exclusive(p1, PAGE, &mut buf).unwrap();
    let _ = m.migrate_range_to_device(a, PMD);
    assert!(matches!(space.residency(p1), Residency::Exclusive(_)));
}

/// A pin that outlives its mapping (unmap, then a new mapping at the same address) must not
/// release a pin taken on the new mapping.
#[test]
fn stale_pin_does_not_unpin_a_new_mapping() {
    let _w = watchdog("stale_pin", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(PAGE, Prot::ReadWrite).unwrap();
    space.store_u32(a, 1).unwrap();
    let old_pin = space.pin(a, PAGE, false).unwrap();
    space.unmap(a, PAGE).unwrap();
    space.map_anon_at(a, PAGE, MapOptions::default()).unwrap();
    space.store_u32(a, 2).unwrap();
    let new_pin = space.pin(a, PAGE, false).unwrap();
    drop(old_pin);
    assert!(m.migrate_range_to_device(a, PAGE).is_err());
    assert_eq!(
        space.residency(a),
        Residency::System,
        "a pinned page was migrated"
    );
    drop(new_pin);
    m.migrate_range_to_device(a, PAGE).unwrap();
    assert_eq!(space.load_u32(a).unwrap(), 2);
}

/// Present pages of a mapping without read permission are not selected for migration (copying
/// them would need CPU loads, which fault): no SIGSEGV, the data stays.
#[test]
fn prot_none_pages_are_not_selected() {
    let _w = watchdog("prot_none_migrate", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    // 32 pages: the first touch fills the first 64 KiB (16 pages), the rest stays untouched.
    let len = 32 * PAGE;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    space.store_u32(a, 7).unwrap();
    assert_eq!(space.residency(a.add(31 * PAGE)), Residency::Untouched);
    space.protect(a, len, Prot::None).unwrap();
    let mig = migrate::migrate_vma_setup(
        &space,
        MigrateArgs {
            start: a,
            end: a.add(len),
            flags: SELECT_SYSTEM,
            pgmap_owner: dev.owner(),
        },
    )
    .unwrap();
    assert_eq!(
        mig.src[0] & migrate::MIGRATE_PFN_MIGRATE,
        0,
        "present page of a PROT_NONE mapping"
    );
    assert_ne!(
        mig.src[31] & migrate::MIGRATE_PFN_MIGRATE,
        0,
        "a hole can still move"
    );
    assert_eq!(mig.cpages, 16);
    mig.finalize();
    space.protect(a, len, Prot::Read).unwrap();
    assert_eq!(space.load_u32(a).unwrap(), 7);
}

/// The same through the device while another thread toggles PROT_NONE on the mapping (the
/// device's own readability check and the migration's setup are separate lock acquisitions).
#[test]
fn migrate_racing_protect_none() {
    let _w = watchdog("migrate_racing_protect_none", 60);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(64 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let pages = 16;
    let a = space.map_anon(pages * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &vec![0x5au8; pages * PAGE]).unwrap();
    let s2 = space.clone();
    let t = std::thread::spawn(move || {
        for _ in 0..2000 {
            s2.protect(a, pages * PAGE, Prot::None).unwrap();
            s2.protect(a, pages * PAGE, Prot::ReadWrite).unwrap();
        }
    });
    for _ in 0..300 {
        let _ = m.migrate_to_system(a, pages * PAGE);
        let _ = m.migrate_range_to_device(a, pages * PAGE);
    }
    t.join().unwrap();
    let mut back = vec![0u8; pages * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
}

/// When the CPU pages cannot be dropped (MADV_DONTNEED is refused on mlocked memory), the
/// migration declines the pages instead of leaving a stale CPU copy behind device-resident data.
/// (Only the test's own page is locked: an `mlockall` here made every other test of this
/// process that migrated meanwhile see its pages declined — a flaky ENOENT elsewhere.)
#[test]
fn undroppable_pages_are_declined_not_left_stale() {
    let _w = watchdog("mlocked_decline", 30);
    let space = Space::with_config(SpaceConfig {
        size: 64 << 20,
        stash: 2 << 20,
        ..SpaceConfig::default()
    })
    .unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(PAGE, Prot::ReadWrite).unwrap();
    if hetmem::sys::mlock_onfault(a.get(), PAGE).is_err() {
        eprintln!("mlock refused here: nothing to test");
        return;
    }
    space.cpu_write(a, &[1u8; PAGE]).unwrap();
    let e = m.migrate_range_to_device(a, PAGE).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "the page was declined");
    assert_eq!(space.residency(a), Residency::System);
    assert_eq!(dev.used(), 0, "the declined page's frame was freed");
    // The device writes through its mirror of the system page; the CPU sees it.
    m.write(a, PAGE, &[2u8; PAGE]).unwrap();
    let mut got = vec![0u8; PAGE];
    space.cpu_read(a, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 2));
    space.store_u32(a, 3).unwrap();
    hetmem::sys::munlock(a.get(), PAGE).unwrap();
}

/// Two pages of 0x11 in a fresh space, mirrored by a private device, the second mlocked (a run
/// over them cannot be dropped whole); `None` where mlock2 is refused.
fn two_pages_the_second_mlocked() -> Option<(Space, SoftDevice, DeviceMirror, VirtAddr)> {
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(2 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[0x11u8; 2 * PAGE]).unwrap();
    if hetmem::sys::mlock_onfault(a.add(PAGE).get(), PAGE).is_err() {
        eprintln!("mlock2 refused here: nothing to test");
        return None;
    }
    Some((space, dev, m, a))
}

/// A drop of hetmem's own that failed part-way (the run spans an mlocked page) leaves no record
/// behind that would make the program's later drop there look like hetmem's own: the program's
/// `MADV_DONTNEED` of that page, in device memory by then, is followed and it reads zeros.
#[test]
fn a_partly_failed_own_drop_leaves_the_programs_next_drop_followed() {
    if !kernel_has_uffdio_move() {
        return;
    }
    let _w = watchdog("partial_zap_record", 30);
    let Some((space, dev, m, a)) = two_pages_the_second_mlocked() else {
        return;
    };
    let _ = m.migrate_range_to_device(a, 2 * PAGE);
    hetmem::sys::munlock(a.add(PAGE).get(), PAGE).unwrap();
    m.migrate_range_to_device(a.add(PAGE), PAGE).unwrap();
    assert_eq!(space.residency(a.add(PAGE)), Residency::Device(dev.owner()));
    // SAFETY: managed memory the test mapped, where no Rust object lives.
    unsafe { hetmem::sys::madvise_dontneed(a.add(PAGE).get(), PAGE) }.unwrap();
    let mut snap = [0u8; 1];
    m.snapshot(a.add(PAGE), PAGE, &mut snap).unwrap();
    let mut back = vec![0xffu8; PAGE];
    space.cpu_read(a.add(PAGE), &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "the program's drop was followed"
    );
}

/// Found by the fuzzer: a migration range starting inside the last 2 MiB unit of a mapping,
/// whose unit is device-resident, sliced past the mapping's entries (a panic under the lock).
#[test]
fn range_starting_inside_the_last_device_unit() {
    let _w = watchdog("last_unit_slice", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon_with(2 * PMD, large_opts()).unwrap();
    space.cpu_write(a, &pattern(2 * PMD, |i| i)).unwrap();
    m.migrate_range_to_device(a.add(PMD), PMD).unwrap();
    assert_eq!(
        m.migrate_to_system(a.add(PMD + PAGE), PAGE).unwrap().cpages,
        1
    );
    let mut back = vec![0u8; 2 * PMD];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(2 * PMD, |i| i));
}

/// Found in review: a migration whose drop of the CPU pages fails for part of a run (the run
/// spans an mlocked page) must decline exactly the pages it could not drop: page 0 moves, page 1
/// stays, nothing is lost (before: the whole run was declined although page 0 was already
/// dropped, losing its data).
#[test]
fn partially_droppable_run_declines_only_what_stays() {
    let _w = watchdog("partial_zap", 30);
    let Some((space, dev, m, a)) = two_pages_the_second_mlocked() else {
        return;
    };
    let e = m.migrate_range_to_device(a, 2 * PAGE).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "page 1 did not move");
    assert_eq!(space.residency(a), Residency::Device(dev.owner()));
    assert_eq!(space.residency(a.add(PAGE)), Residency::System);
    let mut back = vec![0u8; 2 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x11), "no byte lost");
    hetmem::sys::munlock(a.add(PAGE).get(), PAGE).unwrap();
}

/// Found in review: moving a coherent page to system memory is charged to the link model the
/// same way by a migration and by an eviction.
#[test]
fn coherent_eviction_is_charged_like_coherent_migration() {
    let _w = watchdog("coherent_evict_charge", 30);
    let space = Space::new().unwrap();
    let dev = coherent(4 << 20);
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(2 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[7u8; 2 * PAGE]).unwrap();
    m.migrate_range_to_device(a, 2 * PAGE).unwrap();
    let r0 = dev.link_report();
    m.migrate_to_system(a, PAGE).unwrap();
    let by_migration = dev.link_report().since(&r0).migration_ns;
    let r1 = dev.link_report();
    assert_eq!(dev.release().unwrap(), 1);
    let by_eviction = dev.link_report().since(&r1).migration_ns;
    assert!(by_migration > 0);
    assert_eq!(by_migration, by_eviction);
}

/// Found in review: a `MigrateVma` dropped without finalize (a driver error path) declines every
/// page and frees the destination frames the driver had set.
#[test]
fn dropped_migration_frees_destination_frames() {
    use hetmem::hmm::PageTarget;
    use hetmem::migrate::*;
    let _w = watchdog("drop_no_leak", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let a = space.map_anon(PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[3u8; PAGE]).unwrap();
    {
        let mut mig = migrate_vma_setup(
            &space,
            MigrateArgs {
                start: a,
                end: a.add(PAGE),
                flags: SELECT_SYSTEM,
                pgmap_owner: dev.owner(),
            },
        )
        .unwrap();
        mig.use_pagemap(dev.pagemap());
        let f = dev.pagemap().alloc().unwrap();
        mig.copy_to_frame(0, dev.pagemap(), f).unwrap();
        mig.dst[0] = migrate_pfn(PageTarget::Device {
            pagemap: dev.pagemap().id(),
            frame: f,
        }) | MIGRATE_PFN_WRITE;
    }
    assert_eq!(space.residency(a), Residency::System);
    assert_eq!(dev.used(), 0, "the destination frame was freed");
    assert_eq!(space.load_u32(a).unwrap(), u32::from_ne_bytes([3; 4]));
}
