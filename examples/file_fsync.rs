//! A file mapped through hetmem's page cache: CPU stores through the mapping and a device
//! writing through its mirror both reach the file on `fsync`.
//!
//! Run: `cargo run --release --example file_fsync`

use hetmem::pagecache::{CacheConfig, FileCache};
use hetmem::{PAGE_SIZE, Prot, SoftDevice, Space};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("hetmem-example-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 16 * PAGE_SIZE])?;

    let cache = FileCache::open(&path, true, CacheConfig::default())?;
    let file = cache.handle();
    let space = Space::new()?;
    let a = space.map_file(&file, 0, 16 * PAGE_SIZE, Prot::ReadWrite, true)?;

    // The CPU writes page 0 through the mapping; a device writes page 1 through its mirror.
    space.cpu_write(a, b"written by the CPU")?;
    let dev = SoftDevice::private(16 << 20)?;
    let mirror = dev.mirror(&space)?;
    let mut page = vec![0u8; PAGE_SIZE];
    page[..21].copy_from_slice(b"written by the device");
    mirror.write(a.add(PAGE_SIZE), PAGE_SIZE, &page)?;

    // Durable once fsync returns Ok (libc's fsync would not flush hetmem's cache).
    file.fsync()?;
    let disk = std::fs::read(&path)?;
    assert_eq!(&disk[..18], b"written by the CPU");
    assert_eq!(&disk[PAGE_SIZE..PAGE_SIZE + 21], b"written by the device");
    println!("both writes are on disk: {:?}", cache.stats());
    std::fs::remove_file(&path)?;
    Ok(())
}
