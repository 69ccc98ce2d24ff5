//! Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`): a file page without a file
//! (`Space::map_shared_anon`, `FileCache::anonymous`, `pagecache::AnonBackend`). Zero-filled on
//! first touch; CPU and device writes seen by every mapping; the placements of file pages
//! (device-private, device-coherent) with nothing lost on the way back; no page with data is ever
//! written back, evicted or dropped; a forked child shares the memory both ways (see
//! docs/filesystem-contract.md, "Shared anonymous memory").

mod common;
use common::*;
use hetmem::pagecache::{AnonBackend, CacheConfig, FileCache, PagePlacement};
use hetmem::sys::{self, ChildExit};
use hetmem::*;

const N: usize = 16;

fn intercepting(prot: Prot) -> FileMapOptions {
    FileMapOptions {
        prot,
        shared: true,
        intercept_stores: true,
    }
}

/// The word a page holds at `off` in `pattern(N * PAGE, f)`.
fn word(f: impl Fn(u32) -> u32, off: usize) -> u32 {
    f((off / 4) as u32)
}

fn read_all(s: &Space, a: VirtAddr, len: usize) -> Vec<u8> {
    let mut b = vec![0xeeu8; len];
    s.cpu_read(a, &mut b).unwrap();
    b
}

#[test]
fn first_touch_reads_zeros_and_cpu_and_device_writes_are_seen_by_every_mapping() {
    let _w = watchdog("shanon_cpu_device", 30);
    let s1 = Space::new().unwrap();
    let s2 = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m1 = dev.mirror(&s1).unwrap();
    let (a1, cache) = s1.map_shared_anon(N * PAGE, Prot::ReadWrite).unwrap();
    assert!(cache.is_anonymous());
    assert_eq!(cache.placement(0), PagePlacement::Uncached);
    // Never touched: zeros, for the CPU and for the device (which faults the pages in).
    assert!(read_all(&s1, a1, N * PAGE).iter().all(|&b| b == 0));
    let mut dbuf = vec![0xeeu8; N * PAGE];
    m1.read(a1, N * PAGE, &mut dbuf).unwrap();
    assert!(dbuf.iter().all(|&b| b == 0));
    // A second address space maps the same memory (through the cache's handle).
    let h = cache.handle();
    let a2 = s2
        .map_file_with(
            &h,
            0,
            N * PAGE,
            FileMapOptions {
                prot: Prot::ReadWrite,
                shared: true,
                intercept_stores: false,
            },
        )
        .unwrap();
    // CPU stores in space 1 are seen by space 2 and by the device.
    let cpu = pattern(N * PAGE, |i| i ^ 0x5a5a_0000);
    s1.cpu_write(a1, &cpu).unwrap();
    assert!(read_all(&s2, a2, N * PAGE) == cpu);
    m1.read(a1, N * PAGE, &mut dbuf).unwrap();
    assert!(dbuf == cpu);
    // Device writes (through the CPU view: the mapping does not intercept stores) are seen by
    // both spaces and by read_at.
    let devw = pattern(4 * PAGE, |i| !i);
    m1.write(a1.add(3 * PAGE), 4 * PAGE, &devw).unwrap();
    let mut want = cpu.clone();
    want[3 * PAGE..7 * PAGE].copy_from_slice(&devw);
    assert!(read_all(&s1, a1, N * PAGE) == want);
    assert!(read_all(&s2, a2, N * PAGE) == want);
    let mut via = vec![0u8; N * PAGE];
    assert_eq!(h.read_at(0, &mut via).unwrap(), N * PAGE);
    assert!(via == want);
    // A CPU store in space 2 is seen in space 1.
    s2.store_u32(a2.add(9 * PAGE + 8), 0xc0ff_ee00).unwrap();
    assert_eq!(s1.load_u32(a1.add(9 * PAGE + 8)).unwrap(), 0xc0ff_ee00);
    want[9 * PAGE + 8..9 * PAGE + 12].copy_from_slice(&0xc0ff_ee00u32.to_ne_bytes());
    // fsync and msync have nothing to write and change nothing.
    h.fsync().unwrap();
    s1.msync(a1, N * PAGE).unwrap();
    assert_eq!(cache.stats().pages_written_back, 0);
    assert!(read_all(&s1, a1, N * PAGE) == want);
    // Unmapping one space leaves the memory to the other.
    s2.unmap(a2, N * PAGE).unwrap();
    assert!(read_all(&s1, a1, N * PAGE) == want);
}

#[test]
fn device_private_placement_moves_every_byte_and_the_device_release_brings_them_back() {
    let _w = watchdog("shanon_private", 30);
    let s = Space::new().unwrap();
    let (a, cache) = s
        .map_shared_anon_with(N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    let h = cache.handle();
    let cpu = pattern(N * PAGE, |i| i.wrapping_mul(2_654_435_761));
    // Pages 0..N/2 written by the CPU; the rest never touched.
    s.cpu_write(a, &cpu[..N / 2 * PAGE]).unwrap();
    let mut want = cpu[..N / 2 * PAGE].to_vec();
    want.resize(N * PAGE, 0);
    {
        let dev = SoftDevice::private(8 << 20).unwrap();
        let m = dev.mirror(&s).unwrap();
        // The kernel: ENOENT (shmem pages do not migrate). hetmem: they move through the
        // cache's placement, untouched pages included (zero-filled first).
        m.migrate_range_to_device(a, N * PAGE).unwrap();
        for p in 0..N {
            assert_eq!(
                cache.placement(p as u64),
                PagePlacement::DevicePrivate { owner: dev.owner() },
                "page {p}"
            );
        }
        assert_eq!(dev.used(), N * PAGE);
        let mut dbuf = vec![0xeeu8; N * PAGE];
        m.read(a, N * PAGE, &mut dbuf).unwrap();
        assert!(dbuf == want);
        // The device writes its frames: pages 6..10 (some CPU-written, some untouched).
        let devw = pattern(4 * PAGE, |i| i | 0xd000_0000);
        m.write(a.add(6 * PAGE), 4 * PAGE, &devw).unwrap();
        want[6 * PAGE..10 * PAGE].copy_from_slice(&devw);
        // read_at reads the frames where they are.
        let mut via = vec![0u8; N * PAGE];
        h.read_at(0, &mut via).unwrap();
        assert!(via == want);
        assert_eq!(cache.device_pages(), N);
        // fsync writes nothing and moves nothing.
        h.fsync().unwrap();
        assert_eq!(cache.device_pages(), N);
        // A CPU load brings page 7 back (the device's bytes), a CPU store page 1.
        assert_eq!(
            s.load_u32(a.add(7 * PAGE + 12)).unwrap(),
            word(|i| i | 0xd000_0000, PAGE + 12)
        );
        assert_eq!(cache.placement(7), PagePlacement::System);
        s.store_u32(a.add(PAGE), 0x1111_2222).unwrap();
        want[PAGE..PAGE + 4].copy_from_slice(&0x1111_2222u32.to_ne_bytes());
        assert_eq!(cache.placement(1), PagePlacement::System);
        assert_eq!(dev.used(), (N - 2) * PAGE);
        // Release: every page comes back, with its bytes.
        assert_eq!(dev.release().unwrap(), N - 2);
        assert_eq!(dev.used(), 0);
        assert_eq!(cache.device_pages(), 0);
        assert!(read_all(&s, a, N * PAGE) == want);
        // The device writes system pages through the intercepting mapping too, and keeps its
        // write access across fsync (nothing to write back, nothing to protect again).
        m.write(a.add(14 * PAGE), PAGE, &vec![0x42u8; PAGE])
            .unwrap();
        h.fsync().unwrap();
        m.write(a.add(15 * PAGE), PAGE, &vec![0x43u8; PAGE])
            .unwrap();
        want[14 * PAGE..15 * PAGE].fill(0x42);
        want[15 * PAGE..16 * PAGE].fill(0x43);
        assert!(read_all(&s, a, N * PAGE) == want);
        // Placed again, then the device goes away (removal brings them back too).
        m.migrate_range_to_device(a, N * PAGE).unwrap();
        m.write(a.add(12 * PAGE), PAGE, &vec![0x77u8; PAGE])
            .unwrap();
        want[12 * PAGE..13 * PAGE].fill(0x77);
        assert_eq!(cache.device_pages(), N);
    }
    assert_eq!(cache.device_pages(), 0);
    assert!(read_all(&s, a, N * PAGE) == want);
    // Nothing was ever written back or evicted: the memfd holds the only copy.
    let st = cache.stats();
    assert_eq!((st.pages_written_back, st.pages_evicted), (0, 0));
}

#[test]
fn device_coherent_placement_takes_any_mapping_and_the_cpu_uses_the_pages_in_place() {
    let _w = watchdog("shanon_coherent", 30);
    let s = Space::new().unwrap();
    let dev = SoftDevice::coherent(8 << 20).unwrap();
    let m = dev.mirror(&s).unwrap();
    // A plain writable mapping (stores not intercepted): fine for coherent memory.
    let (a, cache) = s.map_shared_anon(N * PAGE, Prot::ReadWrite).unwrap();
    let cpu = pattern(N * PAGE, |i| i + 7);
    s.cpu_write(a, &cpu).unwrap();
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    for p in 0..N {
        assert_eq!(
            cache.placement(p as u64),
            PagePlacement::DeviceCoherent { owner: dev.owner() }
        );
    }
    // In place: CPU loads and stores take no fault and move nothing.
    let faults = s.stats().cpu_faults;
    assert!(read_all(&s, a, N * PAGE) == cpu);
    s.store_u32(a.add(2 * PAGE), 0xabad_cafe).unwrap();
    assert_eq!(s.stats().cpu_faults, faults);
    let mut want = cpu.clone();
    want[2 * PAGE..2 * PAGE + 4].copy_from_slice(&0xabad_cafeu32.to_ne_bytes());
    // The device sees the CPU's store and writes its own.
    let mut one = vec![0u8; PAGE];
    m.read(a.add(2 * PAGE), PAGE, &mut one).unwrap();
    assert_eq!(&one[..4], &0xabad_cafeu32.to_ne_bytes());
    m.write(a.add(5 * PAGE), PAGE, &vec![0x3cu8; PAGE]).unwrap();
    want[5 * PAGE..6 * PAGE].fill(0x3c);
    assert!(read_all(&s, a, N * PAGE) == want);
    assert_eq!(dev.release().unwrap(), N);
    assert_eq!(dev.used(), 0);
    assert_eq!(cache.placement(0), PagePlacement::System);
    assert!(read_all(&s, a, N * PAGE) == want);
}

#[test]
fn a_writable_mapping_that_does_not_intercept_stores_keeps_its_pages_out_of_device_private_memory()
{
    let _w = watchdog("shanon_refused", 30);
    let s = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&s).unwrap();
    let (a, cache) = s.map_shared_anon(N * PAGE, Prot::ReadWrite).unwrap();
    s.cpu_write(a, &pattern(N * PAGE, |i| i)).unwrap();
    // A store through this mapping cannot be held off while a page moves (the kernel resolves
    // its write-protect fault itself): the page would move under it.
    let e = m.migrate_range_to_device(a, N * PAGE).unwrap_err();
    assert!(matches!(e, Error::StoresNotIntercepted { page: 0 }), "{e}");
    assert_eq!(e.errno(), libc::EBUSY);
    assert_eq!(dev.used(), 0);
    assert!(read_all(&s, a, N * PAGE) == pattern(N * PAGE, |i| i));
    // Once that mapping is gone, a read-only mapping of the same memory may place it.
    let s2 = Space::new().unwrap();
    let m2 = dev.mirror(&s2).unwrap();
    let h = cache.handle();
    let a2 = s2.map_file(&h, 0, N * PAGE, Prot::Read, true).unwrap();
    s.unmap(a, N * PAGE).unwrap();
    m2.migrate_range_to_device(a2, N * PAGE).unwrap();
    assert_eq!(cache.device_pages(), N);
    assert!(read_all(&s2, a2, N * PAGE) == pattern(N * PAGE, |i| i));
    assert_eq!(cache.device_pages(), 0);
}

#[test]
fn no_page_with_data_is_ever_written_back_evicted_or_dropped() {
    let _w = watchdog("shanon_no_loss", 30);
    // A budget and a dirty bound of one page, which a file cache would enforce by writing back
    // and evicting: without storage behind the cache they do not apply (writing back would go
    // nowhere, and an evicted page would come back as zeros).
    let len = 64 * PAGE;
    let cache = FileCache::with_backend(
        Box::new(AnonBackend::new(len as u64)),
        true,
        CacheConfig {
            budget: PAGE,
            dirty_bound: PAGE,
        },
    )
    .unwrap();
    assert!(cache.is_anonymous());
    let h = cache.handle();
    let s = Space::new().unwrap();
    // Stores intercepted: each first store to a clean page counts against the dirty bound,
    // which would make it wait for a writeback that can never clean anything.
    let a = s
        .map_file_with(&h, 0, len, intercepting(Prot::ReadWrite))
        .unwrap();
    let data = pattern(len, |i| i.rotate_left(7) ^ 0x0bad_f00d);
    s.cpu_write(a, &data[..len / 2]).unwrap();
    h.write_at((len / 2) as u64, &data[len / 2..]).unwrap();
    // Everything that would write back or evict.
    cache.writeback_round();
    assert_eq!(cache.shrink_to_budget(), 0);
    h.fsync().unwrap();
    h.fdatasync().unwrap();
    s.msync(a, len).unwrap();
    // Unmapped: pages no mapping covers are the first victims of a file cache's budget.
    s.unmap(a, len).unwrap();
    assert_eq!(cache.shrink_to_budget(), 0);
    // read_at and write_at evict over the budget too.
    let mut back = vec![0u8; len];
    assert_eq!(h.read_at(0, &mut back).unwrap(), len);
    assert!(back == data);
    h.write_at(0, &data[..PAGE]).unwrap();
    let st = cache.stats();
    assert_eq!((st.pages_written_back, st.pages_evicted), (0, 0));
    assert_eq!(cache.cached_bytes(), len);
    assert_eq!(cache.dirty_bytes(), len);
    // Mapped again, in another space: the same bytes.
    let s2 = Space::new().unwrap();
    let a2 = s2.map_file(&h, 0, len, Prot::Read, true).unwrap();
    assert!(read_all(&s2, a2, len) == data);
    // Direct I/O has no file to go to: it goes through the cache.
    h.direct_write(5 * PAGE as u64 + 3, b"direct").unwrap();
    let mut d = [0u8; 6];
    assert_eq!(h.direct_read(5 * PAGE as u64 + 3, &mut d).unwrap(), 6);
    assert_eq!(&d, b"direct");
    assert_eq!(
        &read_all(&s2, a2, len)[5 * PAGE + 3..5 * PAGE + 9],
        b"direct"
    );
    // What drops data on purpose still does: a punched hole reads zeros, a truncated tail is
    // gone (SIGBUS past the end, as for shmem), and extending reads zeros.
    h.punch_hole(2 * PAGE as u64, PAGE as u64).unwrap();
    assert!(
        read_all(&s2, a2, len)[2 * PAGE..3 * PAGE]
            .iter()
            .all(|&b| b == 0)
    );
    h.set_len((len / 2) as u64).unwrap();
    h.set_len(len as u64).unwrap();
    assert!(read_all(&s2, a2, len)[len / 2..].iter().all(|&b| b == 0));
    assert!(read_all(&s2, a2, len)[3 * PAGE..5 * PAGE] == data[3 * PAGE..5 * PAGE]);
}

#[test]
fn bad_lengths_and_options_are_typed_errors() {
    let _w = watchdog("shanon_bad_input", 30);
    let s = Space::new().unwrap();
    let rw = Prot::ReadWrite;
    assert!(matches!(s.map_shared_anon(0, rw), Err(Error::ZeroLength)));
    assert!(matches!(
        s.map_shared_anon(PAGE + 1, rw),
        Err(Error::UnalignedLength { len }) if len == PAGE + 1
    ));
    assert!(matches!(
        s.map_shared_anon(100, rw),
        Err(Error::UnalignedLength { .. })
    ));
    for huge in [
        s.range().len() + PAGE,
        1 << 62,
        usize::MAX & !(PAGE - 1),
        isize::MAX as usize + 1,
    ] {
        let e = s.map_shared_anon(huge, rw).unwrap_err();
        assert!(matches!(e, Error::NoMemory { .. }), "{huge:#x}: {e}");
        assert_eq!(e.errno(), libc::ENOMEM);
    }
    let e = s
        .map_shared_anon_with(
            PAGE,
            FileMapOptions {
                prot: rw,
                shared: false,
                intercept_stores: false,
            },
        )
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    // The cache on its own.
    assert!(matches!(FileCache::anonymous(0), Err(Error::ZeroLength)));
    assert!(matches!(
        FileCache::anonymous(3),
        Err(Error::UnalignedLength { len: 3 })
    ));
    let e = FileCache::anonymous(usize::MAX & !(PAGE - 1)).unwrap_err();
    assert!(matches!(e, Error::FileTooLarge { .. }), "{e}");
    assert_eq!(e.errno(), libc::EFBIG);
    // A terabyte of it costs only the pages written (the page states are sparse).
    let big = FileCache::anonymous(1 << 40).unwrap();
    let h = big.handle();
    h.write_at((1u64 << 40) - 4, b"end!").unwrap();
    let mut b = [0u8; 8];
    assert_eq!(h.read_at((1u64 << 40) - 8, &mut b).unwrap(), 8);
    assert_eq!(&b, b"\0\0\0\0end!");
    assert_eq!(big.cached_bytes(), PAGE);
    // Nothing was mapped by the failures: the space still maps what fits.
    let (a, _c) = s.map_shared_anon(PAGE, rw).unwrap();
    s.store_u32(a, 1).unwrap();
    assert_eq!(s.load_u32(a).unwrap(), 1);
}

// ---------------------------------------------------------------------------------------------
// fork
// ---------------------------------------------------------------------------------------------

/// Whether a probe's load gave `v` (in a child: no allocation, no formatting).
fn is(r: Result<u32>, v: u32) -> bool {
    matches!(r, Ok(x) if x == v)
}

/// Child exit codes: 0 all good, 10 + k a mismatch found at check k.
fn child_ok(st: ChildExit) {
    assert_eq!(st, ChildExit::Exited(0), "the child found a mismatch");
}

#[test]
fn a_forked_child_shares_the_memory_both_ways() {
    let _w = watchdog("shanon_fork", 30);
    let s = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&s).unwrap();
    let (a, cache) = s.map_shared_anon(N * PAGE, Prot::ReadWrite).unwrap();
    s.cpu_write(a, &pattern(N * PAGE, |i| i)).unwrap();
    let probe = s.probe(a, N * PAGE).unwrap();
    // A second mapping the parent never touches (stores tracked without faults, as `a`).
    let (b, _b_cache) = s.map_shared_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    let probe_b = s.probe(b, 4 * PAGE).unwrap();
    // SAFETY: the child only loads and stores words through the probes (bounds checks and
    // volatile accesses: no allocation, no lock) and returns an exit code.
    let st = unsafe {
        sys::fork_and_wait(|| {
            for p in 0..4 {
                if !is(probe_b.load_u32(b.add(p * PAGE)), 0)
                    || probe_b.store_u32(b.add(p * PAGE), 0xb0 + p as u32).is_err()
                {
                    return 14;
                }
            }
            for k in 0..N * PAGE / 4 {
                let p = a.add(4 * k);
                if !is(probe.load_u32(p), k as u32) {
                    return 10;
                }
                if probe.store_u32(p, (k as u32).wrapping_neg()).is_err() {
                    return 11;
                }
            }
            0
        })
    }
    .unwrap();
    child_ok(st);
    for p in 0..4 {
        assert_eq!(s.load_u32(b.add(p * PAGE)).unwrap(), 0xb0 + p as u32);
    }
    // No copy on write: the parent sees the child's stores, on the CPU and on the device.
    let neg = pattern(N * PAGE, |i| i.wrapping_neg());
    assert!(read_all(&s, a, N * PAGE) == neg);
    let mut dbuf = vec![0u8; N * PAGE];
    m.read(a, N * PAGE, &mut dbuf).unwrap();
    assert!(dbuf == neg);
    let mut via = vec![0u8; N * PAGE];
    cache.handle().read_at(0, &mut via).unwrap();
    assert!(via == neg);
    // The parent's device writes are seen by the next child.
    m.write(a, N * PAGE, &pattern(N * PAGE, |i| i ^ 0xdead_0000))
        .unwrap();
    // SAFETY: as above (loads only).
    let st = unsafe {
        sys::fork_and_wait(|| {
            for k in 0..N * PAGE / 4 {
                if !is(probe.load_u32(a.add(4 * k)), k as u32 ^ 0xdead_0000) {
                    return 12;
                }
            }
            0
        })
    }
    .unwrap();
    child_ok(st);
    // hetmem itself is inert in the child: it refuses before allocating or locking.
    let sp = &s;
    // SAFETY: the call fails at its process-id check, before any allocation or lock.
    let st = unsafe {
        sys::fork_and_wait(|| match sp.map_shared_anon(PAGE, Prot::ReadWrite) {
            Err(Error::Forked { .. }) => 0,
            _ => 13,
        })
    }
    .unwrap();
    child_ok(st);
}

#[test]
fn a_child_touching_pages_the_parent_never_touched_reads_zeros_and_its_stores_are_kept() {
    let _w = watchdog("shanon_fork_untouched", 30);
    let s = Space::new().unwrap();
    // Stores intercepted, so that the pages may go to device-private memory afterwards.
    let (a, cache) = s
        .map_shared_anon_with(N * PAGE, intercepting(Prot::ReadWrite))
        .unwrap();
    // The parent touches page 0 only.
    s.store_u32(a, 0x600d).unwrap();
    let probe = s.probe(a, N * PAGE).unwrap();
    // In the child the mapping is the kernel's plain shared memory (the userfaultfd is the
    // parent's, not inherited): a page the parent never touched is a hole the kernel fills
    // with zeros for the child, no SIGBUS; the child's store lands in the shared memfd.
    // SAFETY: loads and stores through the probe only, then an exit code.
    let st = unsafe {
        sys::fork_and_wait(|| {
            if !is(probe.load_u32(a), 0x600d) {
                return 10;
            }
            for p in 1..N {
                let w = a.add(p * PAGE + 4);
                if !is(probe.load_u32(w), 0) || !is(probe.load_u32(a.add(p * PAGE)), 0) {
                    return 11;
                }
                if probe.store_u32(w, 0xc000 + p as u32).is_err() {
                    return 12;
                }
            }
            0
        })
    }
    .unwrap();
    child_ok(st);
    // The parent's cache never filled those pages; it sees the child's bytes anyway (the
    // pages are in the memfd), and filling them (for read_at, a placement) never overwrites.
    for p in 1..N {
        assert_eq!(s.load_u32(a.add(p * PAGE + 4)).unwrap(), 0xc000 + p as u32);
    }
    let mut b = [0u8; 8];
    cache.handle().read_at(3 * PAGE as u64, &mut b).unwrap();
    assert_eq!(&b[4..], &0xc003u32.to_ne_bytes());
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&s).unwrap();
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    assert_eq!(cache.device_pages(), N);
    let mut dbuf = vec![0u8; N * PAGE];
    m.read(a, N * PAGE, &mut dbuf).unwrap();
    for p in 1..N {
        let w = &dbuf[p * PAGE..p * PAGE + 8];
        assert_eq!(&w[..4], &[0; 4]);
        assert_eq!(&w[4..], &(0xc000 + p as u32).to_ne_bytes(), "page {p}");
    }
    assert_eq!(&dbuf[..4], &0x600du32.to_ne_bytes());
    // Back in system memory before the next child (a page in device-private memory is a hole
    // in the memfd, which a child would fill with zeros): the child sees every byte.
    cache.place_in_system(0, (N * PAGE) as u64).unwrap();
    assert_eq!(dev.used(), 0);
    // SAFETY: loads through the probe only.
    let st = unsafe {
        sys::fork_and_wait(|| {
            for p in 1..N {
                if !is(probe.load_u32(a.add(p * PAGE + 4)), 0xc000 + p as u32) {
                    return 13;
                }
            }
            0
        })
    }
    .unwrap();
    child_ok(st);
}

#[test]
fn coherent_pages_stay_shared_with_a_child() {
    let _w = watchdog("shanon_fork_coherent", 30);
    let s = Space::new().unwrap();
    let dev = SoftDevice::coherent(8 << 20).unwrap();
    let m = dev.mirror(&s).unwrap();
    let (a, cache) = s.map_shared_anon(N * PAGE, Prot::ReadWrite).unwrap();
    s.cpu_write(a, &pattern(N * PAGE, |i| i * 3)).unwrap();
    m.migrate_range_to_device(a, N * PAGE).unwrap();
    assert_eq!(
        cache.placement(N as u64 - 1),
        PagePlacement::DeviceCoherent { owner: dev.owner() }
    );
    let probe = s.probe(a, N * PAGE).unwrap();
    // SAFETY: loads and stores through the probe only, then an exit code.
    let st = unsafe {
        sys::fork_and_wait(|| {
            for k in 0..N * PAGE / 4 {
                let p = a.add(4 * k);
                if !is(probe.load_u32(p), k as u32 * 3) {
                    return 10;
                }
                let _ = probe.store_u32(p, k as u32 + 1);
            }
            0
        })
    }
    .unwrap();
    child_ok(st);
    // The pages stayed in coherent memory; the device and the parent see the child's stores.
    assert_eq!(cache.device_pages(), N);
    let mut dbuf = vec![0u8; N * PAGE];
    m.read(a, N * PAGE, &mut dbuf).unwrap();
    assert!(dbuf == pattern(N * PAGE, |i| i + 1));
    assert!(read_all(&s, a, N * PAGE) == pattern(N * PAGE, |i| i + 1));
}

/// Threads first touching the pages of shared anonymous memory at once: no store is lost and no
/// page is taken for one the program removed (found by review: a fresh page, filled by
/// `fallocate`, reads as a hole to `SEEK_DATA`, so a racing fault took it for a page the
/// program's `MADV_REMOVE` had punched and dropped it, with the stores made meanwhile).
#[test]
fn parallel_first_touches_lose_no_store_and_remove_nothing() {
    let _w = watchdog("shared_anon_parallel_first_touch", 120);
    let (n, threads) = (512usize, 4usize);
    for round in 0..20u64 {
        let space = small_space();
        let (a, cache) = space.map_shared_anon(n * PAGE, Prot::ReadWrite).unwrap();
        let probe = space.probe(a, n * PAGE).unwrap();
        let word = |p: usize, k: usize| round * 100_000 + (p * 10 + k) as u64 + 1;
        let start = std::sync::Barrier::new(threads);
        std::thread::scope(|s| {
            for k in 0..threads {
                let (probe, start) = (&probe, &start);
                s.spawn(move || {
                    start.wait();
                    for p in 0..n {
                        probe
                            .store_u64(a.add(p * PAGE + k * 8), word(p, k))
                            .unwrap();
                    }
                });
            }
        });
        for p in 0..n {
            for k in 0..threads {
                let v = probe.load_u64(a.add(p * PAGE + k * 8)).unwrap();
                assert_eq!(v, word(p, k), "round {round}: page {p}, thread {k}'s store");
            }
        }
        assert_eq!(cache.stats().pages_removed_by_program, 0, "round {round}");
    }
}
