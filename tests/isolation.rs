//! Isolation: a device sees only what is mirrored for it; an owner token cannot select another
//! owner's device pages; read-only mappings and read-only files refuse writes from the CPU and
//! from the device.

mod common;
use common::*;
use hetmem::migrate::{self, MigrateArgs, SELECT_DEVICE_COHERENT, SELECT_DEVICE_PRIVATE};
use hetmem::*;

#[test]
fn a_device_sees_only_its_address_space() {
    let _w = watchdog("isolation_spaces", 30);
    let (x, y) = (Space::new().unwrap(), Space::new().unwrap());
    let dev = SoftDevice::private(8 << 20).unwrap();
    let mx = dev.mirror(&x).unwrap();
    let ay = y.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    y.cpu_write(ay, &pattern(4 * PAGE, |i| i + 1)).unwrap();
    // Space Y's pages are not mapped in space X: the device mirroring X cannot reach them.
    let mut buf = vec![0u8; 4 * PAGE];
    let e = mx.read(ay, 4 * PAGE, &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::EFAULT);
    assert!(
        buf.iter().all(|&b| b == 0),
        "nothing of space Y leaked into the buffer"
    );
    assert!(mx.migrate_to_device(ay, 4 * PAGE, &mut buf).is_err());
    assert_eq!(y.residency(ay), Residency::System);
    assert_eq!(mx.mapped_pages(), 0);
}

#[test]
fn an_owner_cannot_select_another_owners_pages() {
    let _w = watchdog("isolation_owners", 30);
    let space = Space::new().unwrap();
    let (d0, d1) = (
        SoftDevice::private(8 << 20).unwrap(),
        SoftDevice::private(8 << 20).unwrap(),
    );
    let (m0, m1) = (d0.mirror(&space).unwrap(), d1.mirror(&space).unwrap());
    let a = space.map_anon(8 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(8 * PAGE, |i| i)).unwrap();
    m0.migrate_range_to_device(a, 8 * PAGE).unwrap();
    // Device 1's token selects none of device 0's pages, in any select mode.
    for flags in [
        SELECT_DEVICE_PRIVATE,
        SELECT_DEVICE_COHERENT,
        SELECT_DEVICE_PRIVATE | SELECT_DEVICE_COHERENT,
    ] {
        let mig = migrate::migrate_vma_setup(
            &space,
            MigrateArgs {
                start: a,
                end: a.add(8 * PAGE),
                flags,
                pgmap_owner: d1.owner(),
            },
        )
        .unwrap();
        assert_eq!(mig.cpages, 0);
        mig.finalize();
    }
    assert_eq!(m1.migrate_to_system(a, 8 * PAGE).unwrap().cpages, 0);
    assert_eq!(space.residency(a), Residency::Device(d0.owner()));
    // Device 1 does not see device 0's private pages without faulting them back.
    let mut snap = vec![0xAAu8; 8];
    m1.snapshot(a, 8 * PAGE, &mut snap).unwrap();
    assert!(snap.iter().all(|&b| b == hetmem::device::snap::NONE));
    assert_eq!(d0.used(), 8 * PAGE);
}

#[test]
fn read_only_mappings_refuse_cpu_and_device_writes() {
    let _w = watchdog("isolation_read_only", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(4 * PAGE, |i| i)).unwrap();
    space.protect(a, 4 * PAGE, Prot::Read).unwrap();
    assert!(matches!(
        space.cpu_write(a, &[1]),
        Err(Error::NoWrite { .. })
    ));
    let e = m.write(a, 4 * PAGE, &vec![0xFF; 4 * PAGE]).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    // Not even after the pages moved to the device (their entries are read-only there too).
    let mut buf = vec![0u8; 4 * PAGE];
    m.migrate_to_device(a, 4 * PAGE, &mut buf).unwrap();
    let e = m.write(a, 4 * PAGE, &vec![0xFF; 4 * PAGE]).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(4 * PAGE, |i| i));
}

/// A read-only file: its shared mapping is read-only for the device too (EPERM, the file
/// unchanged); a private mapping of it is the process's own copy, writable by the device, and
/// never reaches the file.
#[test]
fn read_only_files_refuse_device_writes() {
    let _w = watchdog("isolation_read_only_file", 30);
    let f = TempFile::new("iso-ro", &vec![5u8; 2 * PAGE]);
    let cache = hetmem::pagecache::FileCache::open(&f.0, false, Default::default()).unwrap();
    let h = cache.handle();
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let shared = space.map_file(&h, 0, 2 * PAGE, Prot::Read, true).unwrap();
    let e = m
        .write(shared, 2 * PAGE, &vec![0xEE; 2 * PAGE])
        .unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    let mut buf = vec![0u8; 2 * PAGE];
    m.read(shared, 2 * PAGE, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 5));
    let private = space
        .map_file(&h, 0, 2 * PAGE, Prot::ReadWrite, false)
        .unwrap();
    m.write(private, 2 * PAGE, &vec![0xEE; 2 * PAGE]).unwrap();
    space.cpu_read(private, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xEE));
    m.read(shared, 2 * PAGE, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 5),
        "a private write reached the shared view"
    );
    drop(m);
    drop(space);
    drop(h);
    drop(cache);
    assert_eq!(f.disk(), vec![5u8; 2 * PAGE]);
}
