//! Alternating CPU and device phases over the same data, with device-private and with
//! device-coherent memory: the coherent device moves the data once, the private one moves it
//! back and forth every round.
//!
//! Run: `cargo run --release --example coherent_pingpong`

use hetmem::{DeviceConfig, MemoryKind, PAGE_SIZE, Prot, SoftDevice, Space};

fn rounds(kind: MemoryKind) -> Result<(u64, u64), hetmem::Error> {
    let space = Space::new()?;
    let dev = SoftDevice::new(DeviceConfig {
        kind,
        capacity: 64 << 20,
    })?;
    let mirror = dev.mirror(&space)?;
    let len = 8 << 20;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    space.cpu_write(a, &vec![1u8; len])?;
    let mut buf = vec![0u8; len];
    for round in 0..4u8 {
        // Device phase: the data goes to (or stays in) device memory, the device reads it.
        mirror.migrate_range_to_device(a, len)?;
        mirror.read(a, len, &mut buf)?;
        // CPU phase: the CPU updates every page.
        for p in 0..len / PAGE_SIZE {
            space.store_u32(a.add(p * PAGE_SIZE), u32::from(round))?;
        }
    }
    let s = space.stats();
    Ok((s.pages_to_device, s.pages_to_system))
}

fn main() -> Result<(), hetmem::Error> {
    for kind in [MemoryKind::Private, MemoryKind::Coherent] {
        let (to_dev, to_sys) = rounds(kind)?;
        println!("{kind:?}: pages moved to the device {to_dev}, back to system memory {to_sys}");
    }
    Ok(())
}
