mod common;
use common::*;
use hetmem::*;

#[test]
fn cpu_write_migrate_fault_back() {
    let _w = watchdog("smoke", 20);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(64 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let len = 64 * PAGE;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let data = pattern(len, |i| i);
    space.cpu_write(a, &data).unwrap();
    let mut buf = vec![0u8; len];
    let out = m.migrate_to_device(a, 64 * PAGE, &mut buf).unwrap();
    assert_eq!(out.cpages, 64);
    assert_eq!(buf, data);
    assert_eq!(space.residency(a), Residency::Device(dev.owner()));
    let mut back = vec![0u8; len];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(space.residency(a), Residency::System);
}
