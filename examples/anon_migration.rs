//! Anonymous memory moved to a device-private software device and back.
//!
//! The CPU writes a buffer, the device migrates it into its own memory (without copying it out
//! to the caller), the device writes into its copy, and a plain CPU read faults the pages back.
//!
//! Run: `cargo run --release --example anon_migration`

use hetmem::{PAGE_SIZE, Prot, SoftDevice, Space};

fn main() -> Result<(), hetmem::Error> {
    let space = Space::new()?;
    let dev = SoftDevice::private(64 << 20)?;
    let mirror = dev.mirror(&space)?;

    let len = 4 << 20;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    space.cpu_write(a, &vec![7u8; len])?;

    let out = mirror.migrate_range_to_device(a, len)?;
    println!(
        "{} pages now in device memory ({} bytes used)",
        out.cpages,
        dev.used()
    );

    // The device writes the first page in its own memory.
    mirror.write(a, PAGE_SIZE, &vec![9u8; PAGE_SIZE])?;

    // A CPU read faults the pages back into system memory.
    let mut back = vec![0u8; len];
    space.cpu_read(a, &mut back)?;
    assert!(back[..PAGE_SIZE].iter().all(|&b| b == 9));
    assert!(back[PAGE_SIZE..].iter().all(|&b| b == 7));
    let s = space.stats();
    println!(
        "CPU faults: {}, pages back to system memory: {}, device memory used now: {} bytes",
        s.cpu_faults,
        s.pages_to_system,
        dev.used()
    );
    Ok(())
}
