//! The link model: device accesses and transfers are charged where they happen.

mod common;
use common::*;
use hetmem::link::{LinkProfile, Traffic};
use hetmem::*;

#[test]
fn accesses_and_transfers_are_charged() {
    let _w = watchdog("link_charges", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::with_link(
        DeviceConfig {
            kind: MemoryKind::Private,
            capacity: 8 << 20,
        },
        LinkProfile::PCIE4,
    )
    .unwrap();
    let m = dev.mirror(&space).unwrap();
    let link = dev.link().clone();
    let n = 16u64;
    let a = space.map_anon(16 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(16 * PAGE, |i| i)).unwrap();
    let page = PAGE as u64;

    // The device reads system memory over the link: per page, bytes and one transaction.
    let mut buf = vec![0u8; 16 * PAGE];
    m.read(a, 16 * PAGE, &mut buf).unwrap();
    let r = dev.link_report();
    assert_eq!(
        r.device_remote_ns,
        n * link.cost_ns(Traffic::DeviceRemote, page, 1)
    );
    assert_eq!((r.device_local_ns, r.migration_ns), (0, 0));

    // Migration: one copy per page, over the link.
    m.migrate_range_to_device(a, 16 * PAGE).unwrap();
    let r2 = dev.link_report().since(&r);
    assert_eq!(
        r2.migration_ns,
        n * link.cost_ns(Traffic::Migration, page, 1)
    );

    // Now the device reads its own memory: local.
    let before = dev.link_report();
    m.read(a, 16 * PAGE, &mut buf).unwrap();
    let r4 = dev.link_report().since(&before);
    assert_eq!(
        r4.device_local_ns,
        n * link.cost_ns(Traffic::DeviceLocal, page, 0)
    );
    assert_eq!(r4.device_remote_ns, 0);

    // A CPU fault brings one page back over the link.
    let before = dev.link_report();
    assert_eq!(space.load_u32(a).unwrap(), 0);
    let r5 = dev.link_report().since(&before);
    assert_eq!(r5.migration_ns, link.cost_ns(Traffic::Migration, page, 1));
    assert_eq!(buf, pattern(16 * PAGE, |i| i));
}

#[test]
fn coherent_cpu_accesses_are_charged_as_declared() {
    let _w = watchdog("link_coherent", 30);
    let dev = coherent(2 << 20);
    assert_eq!(
        dev.link().profile(),
        LinkProfile::NVLINK_C2C,
        "the default profile of a coherent device"
    );
    dev.declare_cpu_access(450_000);
    let r = dev.link_report();
    assert_eq!(
        r.cpu_remote_ns,
        dev.link().cost_ns(Traffic::CpuRemote, 450_000, 1)
    );
    assert_eq!(
        r.cpu_remote_ns,
        1000 + 500,
        "450 kB at 450 GB/s plus 0.5 µs"
    );
    let p = SoftDevice::private(2 << 20).unwrap();
    assert_eq!(
        p.link().profile(),
        LinkProfile::PCIE5,
        "the default profile of a private device"
    );
}
