//! Kernel fidelity: a read of a never-written anonymous page maps the kernel's shared zero page
//! (as the kernel's own read fault, and userfaultfd's `UFFDIO_ZEROPAGE`): it costs no memory
//! until a store, a device snapshot reports it as `ZERO | READ`, a store (CPU or device) gives
//! the page a private copy, and migration moves it like any other page.

mod common;
use common::*;

use hetmem::*;

/// `Rss` of the kernel mapping (VMA) holding `a`, in bytes.
fn vma_rss(a: VirtAddr) -> usize {
    smaps_bytes(a.get(), "Rss:")
}

fn snap1(m: &DeviceMirror, a: VirtAddr) -> u8 {
    let mut out = [0u8; 1];
    m.snapshot(a, PAGE_SIZE, &mut out).unwrap();
    out[0]
}

#[test]
fn reads_of_untouched_memory_cost_no_memory_until_a_store() {
    let _w = watchdog("zero page reads", 60);
    let space = small_space();
    let len = 32 << 20;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let p = space.probe(a, len).unwrap();
    for off in (0..len).step_by(PAGE_SIZE) {
        assert_eq!(p.load_u32(a.add(off)).unwrap(), 0);
    }
    let rss = vma_rss(a);
    assert!(
        rss < 1 << 20,
        "32 MiB read but never written holds {rss} bytes (the zero page holds none)"
    );
    assert_eq!(space.residency(a), Residency::System);
    // A store makes one private page, and only that one.
    p.store_u32(a.add(5 * PAGE_SIZE), 77).unwrap();
    assert_eq!(p.load_u32(a.add(5 * PAGE_SIZE)).unwrap(), 77);
    assert_eq!(p.load_u32(a.add(6 * PAGE_SIZE)).unwrap(), 0);
    let rss = vma_rss(a);
    assert!(
        (PAGE_SIZE..1 << 20).contains(&rss),
        "one page written: {rss} bytes"
    );
}

#[test]
fn a_snapshot_reports_the_zero_page_until_a_store_and_device_stores_copy_it() {
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let _w = watchdog("zero page snapshot", 60);
        let space = small_space();
        let dev = SoftDevice::private(4 << 20).unwrap();
        let m = dev.mirror(&space).unwrap();
        let a = space
            .map_anon_with(
                4 * PAGE_SIZE,
                MapOptions {
                    mode,
                    ..MapOptions::default()
                },
            )
            .unwrap();
        let mut b = [0xffu8; 8];
        at(format!("{mode:?}: CPU reads"));
        for k in 0..3 {
            space.cpu_read(a.add(k * PAGE_SIZE), &mut b).unwrap();
            assert_eq!(b, [0; 8]);
        }
        assert_eq!(snap1(&m, a), snap::ZERO | snap::READ, "{mode:?}");
        // Reads map zero pages over the fault-around run (they cost nothing); a mapping never
        // accessed has none.
        assert_eq!(snap1(&m, a.add(3 * PAGE_SIZE)), snap::ZERO | snap::READ);
        let untouched = space.map_anon(PAGE_SIZE, Prot::ReadWrite).unwrap();
        assert_eq!(snap1(&m, untouched), snap::NONE, "never touched");
        // A CPU store: a private page.
        at(format!("{mode:?}: CPU store"));
        space.cpu_write(a.add(4), &[1, 2, 3]).unwrap();
        assert_eq!(snap1(&m, a), snap::WRITE, "{mode:?}");
        space.cpu_read(a, &mut b).unwrap();
        assert_eq!(b, [0, 0, 0, 0, 1, 2, 3, 0]);
        // A device read of the zero page reads zeros and keeps it shared.
        at(format!("{mode:?}: device read"));
        let mut page = vec![0xffu8; PAGE_SIZE];
        m.read(a.add(PAGE_SIZE), PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&x| x == 0));
        assert_eq!(snap1(&m, a.add(PAGE_SIZE)), snap::ZERO | snap::READ);
        // A device store to it: a private copy with the device's bytes.
        at(format!("{mode:?}: device write"));
        let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        m.write(a.add(PAGE_SIZE), PAGE_SIZE, &data).unwrap();
        assert_eq!(snap1(&m, a.add(PAGE_SIZE)), snap::WRITE);
        let mut back = vec![0u8; PAGE_SIZE];
        space.cpu_read(a.add(PAGE_SIZE), &mut back).unwrap();
        assert_eq!(back, data);
        // The zero page migrates like any page, and comes back as zeros.
        at(format!("{mode:?}: migration"));
        assert_eq!(snap1(&m, a.add(2 * PAGE_SIZE)), snap::ZERO | snap::READ);
        let out = m.migrate_range_to_device(a, 3 * PAGE_SIZE).unwrap();
        assert_eq!(out.cpages, 3);
        assert_eq!(
            space.residency(a.add(2 * PAGE_SIZE)),
            Residency::Device(dev.owner())
        );
        m.migrate_to_system(a, 3 * PAGE_SIZE).unwrap();
        space.cpu_read(a.add(2 * PAGE_SIZE), &mut b).unwrap();
        assert_eq!(b, [0; 8]);
        space.cpu_read(a, &mut b).unwrap();
        assert_eq!(b, [0, 0, 0, 0, 1, 2, 3, 0]);
        space.cpu_write(a.add(2 * PAGE_SIZE), &[9]).unwrap();
        space.cpu_read(a.add(2 * PAGE_SIZE), &mut b).unwrap();
        assert_eq!(b[0], 9);
    }
}

/// A zero page is write-protected whatever its mapping's permissions. A migration that selects it
/// in a read-only mapping and leaves it mapped (declined, or moved to device-coherent memory,
/// where the CPU page stays) must remove that protection: once the mapping is writable again, a
/// device store lands through hetmem's own copy, which must not fault (it aborted, found by the
/// model test).
#[test]
fn zero_pages_migrated_from_a_read_only_mapping_take_device_stores_later() {
    let _w = watchdog("zero page, read-only migration", 60);
    let space = small_space();
    let coh = SoftDevice::coherent(4 << 20).unwrap();
    let cm = coh.mirror(&space).unwrap();
    let prv = SoftDevice::private(4 << 20).unwrap();
    let pm = prv.mirror(&space).unwrap();
    let len = 2 * PAGE_SIZE;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let mut b = [0u8; 4];
    space.cpu_read(a, &mut b).unwrap();
    assert_eq!(snap1(&cm, a), snap::ZERO | snap::READ);
    space.protect(a, len, Prot::Read).unwrap();
    at("to coherent memory, read-only");
    cm.migrate_range_to_device(a, PAGE_SIZE).unwrap();
    assert_eq!(space.residency(a), Residency::Coherent(coh.owner()));
    at("declined (allocation failure), read-only");
    prv.fail_next_alloc();
    pm.migrate_range_to_device(a.add(PAGE_SIZE), PAGE_SIZE)
        .unwrap_or_default();
    assert_eq!(space.residency(a.add(PAGE_SIZE)), Residency::System);
    space.protect(a, len, Prot::ReadWrite).unwrap();
    at("device stores");
    let data = vec![0x5au8; PAGE_SIZE];
    cm.write(a, PAGE_SIZE, &data).unwrap();
    pm.write(a.add(PAGE_SIZE), PAGE_SIZE, &data).unwrap();
    let mut back = vec![0u8; len];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0x5a));
}
