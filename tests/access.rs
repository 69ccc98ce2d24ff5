//! The safe access type for managed memory ([`Probe`]): byte copies and word accesses are real
//! CPU accesses (they fault pages back from device memory), they reach exactly the bytes asked
//! for (unaligned edges included), and what is outside the checked range or misaligned is a
//! typed error, not a crash.

mod common;
use common::*;

use hetmem::space::Probe;
use hetmem::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn byte_copies_and_words_reach_exactly_their_bytes_through_device_memory() {
    let _w = watchdog("probe copies through device memory", 60);
    let space = small_space();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let mirror = dev.mirror(&space).unwrap();
    let len = 4 * PAGE_SIZE;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let p: Probe = space.probe(a, len).unwrap();
    // A copy with unaligned edges across a page boundary, and words around it.
    let data = pattern(PAGE_SIZE + 13, 7);
    let start = a.add(PAGE_SIZE - 5);
    p.write(start, &data).unwrap();
    p.store_u64(a.add(3 * PAGE_SIZE), 0x0123_4567_89ab_cdef)
        .unwrap();
    p.store_u32(a.add(3 * PAGE_SIZE + 8), 0xfeed_beef).unwrap();
    at("migrate to the device");
    let out = mirror.migrate_range_to_device(a, len).unwrap();
    assert_eq!(out.cpages, (len / PAGE_SIZE) as u64);
    assert_eq!(
        space.residency(a.add(PAGE_SIZE)),
        Residency::Device(dev.owner())
    );
    // Reading back faults every page back, and sees exactly what was written.
    at("read back");
    let mut back = vec![0u8; data.len()];
    p.read(start, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        p.load_u64(a.add(3 * PAGE_SIZE)).unwrap(),
        0x0123_4567_89ab_cdef
    );
    assert_eq!(p.load_u32(a.add(3 * PAGE_SIZE + 8)).unwrap(), 0xfeed_beef);
    // The bytes just outside the copy were never written.
    let mut edge = [0xffu8; 5];
    p.read(start.add(data.len()), &mut edge).unwrap();
    assert_eq!(edge, [0; 5]);
    p.read(a.add(PAGE_SIZE - 10), &mut edge).unwrap();
    assert_eq!(edge, [0; 5]);
    // What a device reads is what the probe wrote.
    let mut dbuf = vec![0u8; PAGE_SIZE];
    mirror.read(a.add(PAGE_SIZE), PAGE_SIZE, &mut dbuf).unwrap();
    assert_eq!(&dbuf[..], &data[5..5 + PAGE_SIZE]);
}

#[test]
fn accesses_outside_the_range_or_misaligned_are_typed_errors() {
    let space = small_space();
    let len = 2 * PAGE_SIZE;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let p = space.probe(a, len).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(
        p.read(a.add(len - 8), &mut buf),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(p.write(a.add(len), &[1]), Err(Error::Invalid(_))));
    assert!(matches!(p.load_u64(a.add(4)), Err(Error::Invalid(_))));
    assert!(matches!(p.store_u64(a.add(len), 1), Err(Error::Invalid(_))));
    assert!(matches!(p.load_u32(a.add(2)), Err(Error::Invalid(_))));
    // A copy whose end overflows the address space.
    assert!(matches!(
        p.read(VirtAddr(usize::MAX - 3), &mut buf),
        Err(Error::Invalid(_))
    ));
    // Nothing was written by the refused calls.
    p.read(a, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
    // A probe of a range that is not mapped is refused up front.
    assert!(space.probe(a.add(len), PAGE_SIZE).is_err());
    assert!(matches!(space.probe(a, 0), Err(Error::ZeroLength)));
}

/// `Space::map_owned`: the mapping lives as long as its value, is accessed through its probe,
/// and is unmapped when the value is dropped (its range can be mapped again).
#[test]
fn an_owned_mapping_is_unmapped_when_dropped() {
    let _w = watchdog("owned mapping", 60);
    let space = small_space();
    let m = space.map_owned(4 * PAGE, Prot::ReadWrite).unwrap();
    let (a, len) = (m.addr(), m.len());
    assert_eq!(len, 4 * PAGE);
    m.store_u64(a.add(8), 99).unwrap();
    assert_eq!(m.load_u64(a.add(8)).unwrap(), 99);
    assert_eq!(space.residency(a), Residency::System);
    drop(m);
    assert_eq!(space.residency(a), Residency::Unmapped);
    assert!(space.probe(a, len).is_err(), "the range is gone");
    // Its range is free again.
    space.map_anon_at(a, len, MapOptions::default()).unwrap();
    let p = space.probe(a, len).unwrap();
    assert_eq!(p.load_u64(a.add(8)).unwrap(), 0, "fresh memory");
    assert!(matches!(
        space.map_owned(0, Prot::ReadWrite),
        Err(Error::ZeroLength)
    ));
}
