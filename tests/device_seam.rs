//! The device seam (`hetmem::FrameStore`): a device whose memory the CPU cannot address plugs
//! in behind the same `SoftDevice`/`DeviceMirror` commands. The store here keeps its frames in
//! plain heap memory hetmem never sees and copies only through a one-page staging buffer, as a
//! driver's copy engine would: every migration, fault-back, device access and device-to-device
//! copy then goes through `copy_in`/`copy_out` (counted) and the address space's bounce buffer,
//! and the data is exactly the same as with the built-in, host-addressable device.

mod common;
use common::*;

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hetmem::link::LinkProfile;
use hetmem::sys::Region;
use hetmem::*;

/// Frames in memory the CPU side of hetmem never addresses, reached through a one-page
/// staging buffer.
#[derive(Debug)]
struct StagedFrames {
    mem: Mutex<Vec<u8>>,
    staging: Mutex<Box<[u8; PAGE]>>,
    copies_in: AtomicU64,
    copies_out: AtomicU64,
}

static COPIES: AtomicU64 = AtomicU64::new(0);

impl StagedFrames {
    fn new(len: usize) -> StagedFrames {
        StagedFrames {
            mem: Mutex::new(vec![0u8; len]),
            staging: Mutex::new(Box::new([0u8; PAGE])),
            copies_in: AtomicU64::new(0),
            copies_out: AtomicU64::new(0),
        }
    }
    fn check(&self, off: usize, len: usize) -> io::Result<()> {
        let n = self.mem.lock().unwrap().len();
        if off.checked_add(len).is_none_or(|e| e > n) {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        Ok(())
    }
}

impl FrameStore for StagedFrames {
    fn copy_in(&self, off: usize, src: &Region, src_off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        self.copies_in.fetch_add(1, Ordering::Relaxed);
        COPIES.fetch_add(1, Ordering::Relaxed);
        let mut st = self.staging.lock().unwrap();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PAGE);
            src.read(src_off + done, &mut st[..n])?;
            self.mem.lock().unwrap()[off + done..off + done + n].copy_from_slice(&st[..n]);
            done += n;
        }
        Ok(())
    }
    fn copy_out(&self, off: usize, dst: &Region, dst_off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        self.copies_out.fetch_add(1, Ordering::Relaxed);
        COPIES.fetch_add(1, Ordering::Relaxed);
        let mut st = self.staging.lock().unwrap();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PAGE);
            st[..n].copy_from_slice(&self.mem.lock().unwrap()[off + done..off + done + n]);
            dst.write(dst_off + done, &st[..n])?;
            done += n;
        }
        Ok(())
    }
    fn read(&self, off: usize, dst: &mut [u8]) -> io::Result<()> {
        self.check(off, dst.len())?;
        dst.copy_from_slice(&self.mem.lock().unwrap()[off..off + dst.len()]);
        Ok(())
    }
    fn write(&self, off: usize, src: &[u8]) -> io::Result<()> {
        self.check(off, src.len())?;
        self.mem.lock().unwrap()[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }
    fn zero(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        self.mem.lock().unwrap()[off..off + len].fill(0);
        Ok(())
    }
    fn fetch_add_u64(&self, off: usize, v: u64) -> io::Result<u64> {
        self.check(off, 8)?;
        let mut m = self.mem.lock().unwrap();
        let old = u64::from_ne_bytes(m[off..off + 8].try_into().unwrap());
        m[off..off + 8].copy_from_slice(&old.wrapping_add(v).to_ne_bytes());
        Ok(old)
    }
    fn host_view(&self) -> Option<&Region> {
        None
    }
}

fn staged_device(capacity: usize) -> SoftDevice {
    SoftDevice::with_store(
        DeviceConfig {
            kind: MemoryKind::Private,
            capacity,
        },
        LinkProfile::PCIE5,
        &|len| Ok(Box::new(StagedFrames::new(len)) as Box<dyn FrameStore>),
    )
    .unwrap()
}

#[test]
fn a_device_that_is_not_host_addressable_keeps_every_byte() {
    let _w = watchdog("device_seam", 60);
    let s = small_space_with_stash(4 << 20);
    const N: usize = 64;
    let a = s.map_anon(N * PAGE, Prot::ReadWrite).unwrap();
    let data = pattern(N * PAGE, |i| i.wrapping_mul(2654435761));
    s.cpu_write(a, &data).unwrap();
    let dev = staged_device(8 << 20);
    let m = dev.mirror(&s).unwrap();
    let before = COPIES.load(Ordering::Relaxed);
    // To the device (copy_in through the bounce buffer), then the device reads its own frames.
    let out = m.migrate_range_to_device(a, N * PAGE).unwrap();
    assert_eq!(out.cpages, N as u64);
    assert_eq!(s.residency(a), Residency::Device(dev.owner()));
    let mut buf = vec![0u8; N * PAGE];
    m.read(a, N * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data);
    // The device writes half of them in its memory.
    let new = pattern(N / 2 * PAGE, |i| !i);
    m.write(a, (N / 2) * PAGE, &new).unwrap();
    // CPU faults bring pages back (copy_out into the bounce buffer, then UFFDIO_COPY).
    let mut back = vec![0u8; N * PAGE];
    s.cpu_read(a, &mut back).unwrap();
    assert_eq!(&back[..N / 2 * PAGE], &new[..]);
    assert_eq!(&back[N / 2 * PAGE..], &data[N / 2 * PAGE..]);
    assert!(
        COPIES.load(Ordering::Relaxed) >= before + 2 * N as u64,
        "the store's copy engine was not used"
    );
    // Again, and back with an explicit migration to system memory.
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    m.migrate_to_system(a, N * PAGE).unwrap();
    s.cpu_read(a, &mut back).unwrap();
    assert_eq!(&back[..N / 2 * PAGE], &new[..]);
    assert_eq!(dev.used(), 0);
}

#[test]
fn large_units_and_a_second_device_go_through_the_store() {
    let _w = watchdog("device_seam_large", 60);
    let s = small_space_with_stash(4 << 20);
    let a = s
        .map_anon_with(
            4 << 20,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    let data = pattern(4 << 20, |i| i ^ 0xdead_beef);
    s.cpu_write(a, &data).unwrap();
    let d1 = staged_device(8 << 20);
    let d2 = staged_device(8 << 20);
    let m1 = d1.mirror(&s).unwrap();
    let m2 = d2.mirror(&s).unwrap();
    m1.migrate_range_to_device(a, 4 << 20).unwrap();
    assert_eq!(s.residency(a), Residency::Device(d1.owner()));
    // To the second device: through system memory (a migration to a device selects system
    // pages, as the kernel's).
    m1.migrate_to_system(a, 4 << 20).unwrap();
    m2.migrate_range_to_device(a, 4 << 20).unwrap();
    assert_eq!(s.residency(a), Residency::Device(d2.owner()));
    let mut back = vec![0u8; 4 << 20];
    s.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, data);
    // Device removal evicts through the store too.
    m2.migrate_range_to_device(a, 4 << 20).unwrap();
    assert_eq!(s.residency(a), Residency::Device(d2.owner()));
    drop(m2);
    drop(d2);
    s.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, data);
}
