//! Device-coherent memory: pages the CPU maps directly, so data used by both sides stays put.

mod common;
use common::*;
use hetmem::device::snap;
use hetmem::*;

fn to_dev(m: &DeviceMirror, a: VirtAddr, pages: usize) {
    assert_eq!(
        m.migrate_range_to_device(a, pages * PAGE).unwrap().cpages,
        pages as u64
    );
}

fn snapshot(m: &DeviceMirror, a: VirtAddr, pages: usize) -> Vec<u8> {
    let mut out = vec![0u8; pages];
    m.snapshot(a, pages * PAGE, &mut out).unwrap();
    out
}

#[test]
fn cpu_accesses_to_coherent_pages_take_no_fault() {
    let _w = watchdog("coherent_no_fault", 30);
    let space = Space::new().unwrap();
    let dev = coherent(16 << 20);
    let m = dev.mirror(&space).unwrap();
    let pages = 256;
    let a = space.map_anon(pages * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(pages * PAGE, |i| i)).unwrap();
    to_dev(&m, a, pages);
    assert_eq!(space.residency(a), Residency::Coherent(dev.owner()));
    assert_eq!(dev.used(), pages * PAGE, "charged to the device's capacity");
    let before = space.stats();
    // Real loads and stores on every page, through a probe and the accessors.
    let probe = space.probe(a, pages * PAGE).unwrap();
    for p in 0..pages {
        let addr = a.add(p * PAGE);
        assert_eq!(probe.load_u32(addr).unwrap(), (p * PAGE / 4) as u32);
        probe.store_u32(addr.add(4), 0xC0DE).unwrap();
    }
    let mut all = vec![0u8; pages * PAGE];
    space.cpu_read(a, &mut all).unwrap();
    let after = space.stats();
    assert_eq!(
        after.cpu_faults, before.cpu_faults,
        "no CPU fault on coherent pages"
    );
    assert_eq!(
        after.pages_to_system, before.pages_to_system,
        "nothing migrated back"
    );
    assert_eq!(
        space.residency(a.add((pages - 1) * PAGE)),
        Residency::Coherent(dev.owner())
    );
    assert!(
        snapshot(&m, a, pages)
            .iter()
            .all(|&b| b == snap::DEV_COHERENT_LOCAL | snap::WRITE)
    );
}

#[test]
fn device_and_cpu_see_each_others_writes_without_migration() {
    let _w = watchdog("coherent_sharing", 30);
    let space = Space::new().unwrap();
    let dev = coherent(16 << 20);
    let m = dev.mirror(&space).unwrap();
    let pages = 64;
    let a = space.map_anon(pages * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(pages * PAGE, |i| i)).unwrap();
    to_dev(&m, a, pages);
    let moved = space.stats();
    for round in 1..=5u32 {
        // CPU phase: the CPU writes in place.
        space
            .cpu_write(a, &pattern(pages * PAGE, |i| i * 3 + round))
            .unwrap();
        // Device phase: the device reads what the CPU wrote, writes its own values.
        let mut buf = vec![0u8; pages * PAGE];
        m.read(a, pages * PAGE, &mut buf).unwrap();
        assert_eq!(buf, pattern(pages * PAGE, |i| i * 3 + round));
        m.write(a, pages * PAGE, &pattern(pages * PAGE, |i| i ^ round))
            .unwrap();
        let mut back = vec![0u8; pages * PAGE];
        space.cpu_read(a, &mut back).unwrap();
        assert_eq!(
            back,
            pattern(pages * PAGE, |i| i ^ round),
            "the CPU sees the device's writes"
        );
    }
    let s = space.stats();
    assert_eq!(
        (s.pages_to_device, s.pages_to_system),
        (moved.pages_to_device, moved.pages_to_system)
    );
    assert_eq!(s.cpu_faults, moved.cpu_faults);
    assert_eq!(space.residency(a), Residency::Coherent(dev.owner()));
}

#[test]
fn selection_by_owner_and_remote_snapshot() {
    let _w = watchdog("coherent_owner", 30);
    let space = Space::new().unwrap();
    let (d0, d1) = (coherent(8 << 20), coherent(8 << 20));
    let (m0, m1) = (d0.mirror(&space).unwrap(), d1.mirror(&space).unwrap());
    let a = space.map_anon(8 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(8 * PAGE, |i| i)).unwrap();
    to_dev(&m0, a, 4);
    to_dev(&m1, a.add(4 * PAGE), 4);
    let s0 = snapshot(&m0, a, 8);
    assert!(
        s0[..4]
            .iter()
            .all(|&b| b == snap::DEV_COHERENT_LOCAL | snap::WRITE)
    );
    assert!(
        s0[4..]
            .iter()
            .all(|&b| b == snap::DEV_COHERENT_REMOTE | snap::WRITE)
    );
    // Device 1's MIGRATE_TO_SYS selects only its own pages.
    let out = m1.migrate_to_system(a, 8 * PAGE).unwrap();
    assert_eq!(out.cpages, 4);
    assert_eq!(space.residency(a), Residency::Coherent(d0.owner()));
    assert_eq!(space.residency(a.add(4 * PAGE)), Residency::System);
    assert_eq!((d0.used(), d1.used()), (4 * PAGE, 0));
    // A migration to device 1 (SELECT_SYSTEM) does not take device 0's pages: they are not
    // system memory. As dmirror, the read-back then finds them missing from device 1: ENOENT.
    let mut buf = vec![0u8; 8 * PAGE];
    let mut c = DmirrorCmd {
        addr: a.get() as u64,
        buf: &mut buf,
        npages: 8,
        cpages: 9,
        faults: 9,
    };
    assert_eq!(m1.cmd(Cmd::MigrateToDev, &mut c), -libc::ENOENT);
    assert_eq!(space.residency(a), Residency::Coherent(d0.owner()));
    assert_eq!(
        space.residency(a.add(4 * PAGE)),
        Residency::Coherent(d1.owner())
    );
    let mut back = vec![0u8; 8 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(8 * PAGE, |i| i));
}

#[test]
fn long_term_pins_migrate_coherent_pages_to_system_short_term_do_not() {
    let _w = watchdog("coherent_pins", 30);
    let space = Space::new().unwrap();
    let dev = coherent(8 << 20);
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(4 * PAGE, |i| i + 7)).unwrap();
    to_dev(&m, a, 4);
    let short = space.pin(a, 2 * PAGE, false).unwrap();
    let long = space.pin(a.add(2 * PAGE), 2 * PAGE, true).unwrap();
    assert_eq!(space.residency(a), Residency::Coherent(dev.owner()));
    assert_eq!(space.residency(a.add(2 * PAGE)), Residency::System);
    assert_eq!(dev.used(), 2 * PAGE);
    let s = snapshot(&m, a, 4);
    assert_eq!(
        s,
        vec![
            snap::DEV_COHERENT_LOCAL | snap::WRITE,
            snap::DEV_COHERENT_LOCAL | snap::WRITE,
            snap::WRITE,
            snap::WRITE
        ]
    );
    // Pinned coherent pages are not migrated to system either.
    assert_eq!(m.migrate_to_system(a, 4 * PAGE).unwrap().cpages, 0);
    drop((short, long));
    assert_eq!(m.migrate_to_system(a, 4 * PAGE).unwrap().cpages, 2);
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(4 * PAGE, |i| i + 7));
}

#[test]
fn eviction_and_removal_of_a_coherent_device() {
    let _w = watchdog("coherent_release", 30);
    let space = Space::new().unwrap();
    let dev = coherent(8 << 20);
    let m = dev.mirror(&space).unwrap();
    let a = space
        .map_anon_with(
            4 << 20,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(a, &pattern(4 << 20, |i| i)).unwrap();
    to_dev(&m, a, 1024);
    assert!(
        snapshot(&m, a, 1024)
            .iter()
            .all(|&b| b == snap::DEV_COHERENT_LOCAL | snap::WRITE | snap::PMD)
    );
    assert_eq!(dev.release().unwrap(), 1024);
    assert_eq!(dev.used(), 0);
    assert_eq!(space.residency(a), Residency::System);
    to_dev(&m, a, 1024);
    drop(m);
    drop(dev); // device removal: its pages go back to system memory first
    assert_eq!(space.residency(a.add(3 << 20)), Residency::System);
    let mut back = vec![0u8; 4 << 20];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(4 << 20, |i| i));
}

#[test]
fn private_and_coherent_devices_coexist() {
    let _w = watchdog("coexist", 30);
    let space = Space::new().unwrap();
    let p = SoftDevice::private(8 << 20).unwrap();
    let c = coherent(8 << 20);
    let (mp, mc) = (p.mirror(&space).unwrap(), c.mirror(&space).unwrap());
    let a = space.map_anon(8 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(8 * PAGE, |i| i)).unwrap();
    to_dev(&mp, a, 4);
    to_dev(&mc, a.add(4 * PAGE), 4);
    // The private device's pages are invisible to the coherent device until faulted back; the
    // coherent device's pages are remote-coherent to the private one.
    let sc = snapshot(&mc, a, 8);
    assert!(sc[..4].iter().all(|&b| b == snap::NONE));
    assert!(
        sc[4..]
            .iter()
            .all(|&b| b == snap::DEV_COHERENT_LOCAL | snap::WRITE)
    );
    let sp = snapshot(&mp, a, 8);
    assert!(
        sp[..4]
            .iter()
            .all(|&b| b == snap::DEV_PRIVATE_LOCAL | snap::WRITE)
    );
    assert!(
        sp[4..]
            .iter()
            .all(|&b| b == snap::DEV_COHERENT_REMOTE | snap::WRITE)
    );
    // Device pages move between devices through system memory, as in the kernel (a migration
    // to a device selects system pages only): back from the private device, then in place.
    assert_eq!(mp.migrate_to_system(a, 4 * PAGE).unwrap().cpages, 4);
    to_dev(&mc, a, 4);
    assert_eq!((p.used(), c.used()), (0, 8 * PAGE));
    let mut back = vec![0u8; 8 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(8 * PAGE, |i| i));
    // And the other way: out of coherent memory, then into private memory (out of the CPU view).
    let before = space.stats().cpu_faults;
    assert_eq!(mc.migrate_to_system(a, 8 * PAGE).unwrap().cpages, 8);
    to_dev(&mp, a, 8);
    assert_eq!((p.used(), c.used()), (8 * PAGE, 0));
    assert_eq!(
        space.residency(a.add(5 * PAGE)),
        Residency::Device(p.owner())
    );
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(8 * PAGE, |i| i));
    assert!(
        space.stats().cpu_faults > before,
        "private pages fault back"
    );
}
