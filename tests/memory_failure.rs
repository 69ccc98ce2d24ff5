//! Memory failure of file pages (docs/filesystem-contract.md, "memory failure"): poison
//! injected into a cached page (`FileCache::inject_poison`) and into a device frame holding a
//! file page (`SoftDevice::inject_poison`, device-private and device-coherent). A clean page is
//! dropped and read from the file again; a dirty page's data is lost: SIGBUS for every CPU
//! mapping in every space (in child processes over the real kernel, and over the kernel model),
//! EIO for `read_at` and device accesses, EIO once from the next `fsync` of each handle, the file
//! keeping its old bytes; other pages unaffected; a truncate, a hole punch or a write of the
//! whole page ends it.

mod common;
use common::*;
use hetmem::addr::FrameIdx;
use hetmem::pagecache::{CacheConfig, FileCache, FileHandle, MemoryFailure, PagePlacement};
use hetmem::pool::frame_flags;
use hetmem::*;
use std::sync::Arc;

const N: usize = 8;
const P: usize = PAGE;

/// The file's initial bytes: word `i` is `i`.
fn base() -> Vec<u8> {
    pattern(N * P, |i| i)
}

/// Page `p` of `v`.
fn pg(v: &[u8], p: usize) -> &[u8] {
    &v[p * P..(p + 1) * P]
}

/// The first word of page `p` in the initial file.
fn first_word(p: usize) -> u32 {
    (p * P / 4) as u32
}

fn file(name: &str) -> (TempFile, Arc<FileCache>, FileHandle) {
    let f = TempFile::new(name, &base());
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    (f, cache, h)
}

/// Writes `bytes` at `off` into the file on disk behind the cache's back: what the cache serves
/// afterwards for an uncached page shows that it was read from the file again.
fn write_disk(f: &TempFile, off: usize, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(&f.0).unwrap();
    file.write_all_at(bytes, off as u64).unwrap();
}

fn intercepting(prot: Prot) -> FileMapOptions {
    FileMapOptions {
        prot,
        shared: true,
        intercept_stores: true,
    }
}

/// The frame of `dev` holding file page `page`.
fn frame_of(dev: &SoftDevice, page: u64) -> FrameIdx {
    let pm = dev.pagemap();
    (0..pm.nframes() as u32)
        .map(FrameIdx)
        .find(|&f| {
            matches!(pm.frame_info(f).and_then(|i| i.owner),
                Some(FrameOwner::File { index, .. }) if index == page)
        })
        .unwrap_or_else(|| panic!("no frame holds file page {page}"))
}

fn assert_lost(e: &Error, page: u64) {
    assert!(
        matches!(e, Error::MemoryFailure { page: q } if *q == page),
        "expected page {page} lost, got {e:?}"
    );
    assert_eq!(e.errno(), libc::EIO, "{e}");
}

fn read_page(h: &FileHandle, p: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; P];
    h.read_at((p * P) as u64, &mut b)?;
    Ok(b)
}

#[test]
fn a_clean_page_is_dropped_and_read_again_from_the_file() {
    let _w = watchdog("poison_clean", 30);
    let (f, cache, h) = file("poison-clean");
    let h2 = cache.handle();
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_file(&h, 0, N * P, Prot::Read, true).unwrap();
    // The page is cached, mapped by the CPU and by the device.
    assert_eq!(space.load_u32(a.add(2 * P)).unwrap(), first_word(2));
    let mut buf = vec![0u8; N * P];
    m.read(a, N * P, &mut buf).unwrap();
    assert!(buf == base());
    assert_eq!(cache.placement(2), PagePlacement::System);
    let filled = cache.stats().pages_filled;
    assert_eq!(cache.inject_poison(2).unwrap(), MemoryFailure::Dropped);
    assert_eq!(cache.placement(2), PagePlacement::Uncached);
    assert!(cache.lost_pages().is_empty());
    // The file changes behind the cache: whatever reads the page next reads the file.
    let new = vec![0xC3u8; P];
    write_disk(&f, 2 * P, &new);
    let mut want = base();
    want[2 * P..3 * P].copy_from_slice(&new);
    assert_eq!(space.load_u32(a.add(2 * P)).unwrap(), 0xC3C3_C3C3);
    assert!(cache.stats().pages_filled > filled, "the page was refilled");
    // The device's old mapping of the page was invalidated: it faults and sees the refill.
    m.read(a, N * P, &mut buf).unwrap();
    assert!(buf == want, "device read after the refill");
    assert!(read_page(&h, 2).unwrap() == new);
    // Nothing was lost: nothing to report.
    h.fsync().unwrap();
    h2.fsync().unwrap();
    assert!(f.disk() == want);
    // Pages that no memory holds: nothing to do.
    assert_eq!(
        cache.inject_poison(N as u64 + 3).unwrap(),
        MemoryFailure::NotCached
    );
}

#[test]
fn a_dirty_page_is_lost_reported_once_per_handle_and_never_written() {
    let _w = watchdog("poison_dirty", 30);
    let (f, cache, h1) = file("poison-dirty");
    let h2 = cache.handle();
    h1.write_at(2 * P as u64, &[0xB2; P]).unwrap();
    h1.write_at(4 * P as u64, &[0xB4; P]).unwrap();
    assert_eq!(cache.dirty_bytes(), 2 * P);
    assert_eq!(cache.inject_poison(2).unwrap(), MemoryFailure::Lost);
    assert_eq!(cache.lost_pages(), vec![2]);
    assert_eq!(cache.dirty_bytes(), P, "the lost page is no longer dirty");
    // Reads of it fail (also one that only touches it); the other pages are intact.
    assert_lost(&read_page(&h1, 2).unwrap_err(), 2);
    let mut across = vec![0u8; 20];
    assert_lost(&h2.read_at(2 * P as u64 - 10, &mut across).unwrap_err(), 2);
    assert!(read_page(&h2, 1).unwrap() == pg(&base(), 1));
    assert!(read_page(&h2, 3).unwrap() == pg(&base(), 3));
    assert!(read_page(&h1, 4).unwrap() == [0xB4; P]);
    // Writeback never writes it: the disk keeps the old bytes.
    cache.writeback_round();
    let mut want = base();
    want[4 * P..5 * P].fill(0xB4);
    assert!(f.disk() == want, "writeback wrote the lost page");
    // The next fsync of each handle reports it, once.
    let e = h1.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h1.fsync().unwrap();
    let e = h2.fdatasync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h2.fsync().unwrap();
    // A handle made since sees nothing (as errseq).
    cache.handle().fsync().unwrap();
    assert!(f.disk() == want);
    // The page stays lost; a second failure finds nothing to take.
    assert_eq!(cache.inject_poison(2).unwrap(), MemoryFailure::NotCached);
    h1.fsync().unwrap();
    assert_lost(&read_page(&h1, 2).unwrap_err(), 2);
    assert!(f.disk() == want);
}

#[test]
fn a_lost_page_ends_with_a_truncate_a_hole_punch_or_a_write_of_the_whole_page() {
    let _w = watchdog("poison_end", 30);
    let (f, cache, h) = file("poison-end");
    for p in [1u8, 3, 5, 6] {
        h.write_at(p as u64 * P as u64, &[0xD0 + p; P]).unwrap();
        assert_eq!(cache.inject_poison(p as u64).unwrap(), MemoryFailure::Lost);
    }
    assert_eq!(cache.lost_pages(), vec![1, 3, 5, 6]);
    // A write of part of a lost page fails and writes nothing (the rest of it is lost).
    assert_lost(&h.write_at(P as u64 + 100, b"xyz").unwrap_err(), 1);
    assert_lost(&h.write_at(P as u64 - 2, b"abcd").unwrap_err(), 1);
    assert!(
        read_page(&h, 0).unwrap() == pg(&base(), 0),
        "page 0 unchanged"
    );
    assert_eq!(cache.lost_pages(), vec![1, 3, 5, 6]);
    // A write covering a lost page whole replaces it.
    let data = vec![0xE3u8; P + 10];
    h.write_at(3 * P as u64 - 5, &data).unwrap();
    assert_eq!(cache.lost_pages(), vec![1, 5, 6]);
    let mut back = vec![0u8; P + 10];
    h.read_at(3 * P as u64 - 5, &mut back).unwrap();
    assert!(back == data);
    // A hole punch over one: zeros.
    h.punch_hole(5 * P as u64, P as u64).unwrap();
    assert_eq!(cache.lost_pages(), vec![1, 6]);
    assert!(read_page(&h, 5).unwrap() == [0; P]);
    // A direct write of the whole page.
    h.direct_write(P as u64, &[0xF1; P]).unwrap();
    assert_eq!(cache.lost_pages(), vec![6]);
    assert!(read_page(&h, 1).unwrap() == [0xF1; P]);
    // A truncate into a lost page leaves it lost (the rest of its bytes are); one below it
    // ends it.
    h.set_len(6 * P as u64 + 100).unwrap();
    assert_eq!(cache.lost_pages(), vec![6]);
    assert_lost(&h.read_at(6 * P as u64, &mut [0u8; 10]).unwrap_err(), 6);
    h.set_len(6 * P as u64).unwrap();
    assert!(cache.lost_pages().is_empty());
    h.set_len((N * P) as u64).unwrap();
    assert!(read_page(&h, 6).unwrap() == [0; P]);
    // The losses are reported once.
    let e = h.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h.fsync().unwrap();
    let mut want = base();
    want[P..2 * P].fill(0xF1);
    want[3 * P - 5..4 * P + 5].fill(0xE3);
    want[5 * P..].fill(0);
    assert!(f.disk() == want);
}

/// Runs in a child process (re-executed test binary, `HETMEM_POISON_MODE` says which case):
/// page 2 of the file becomes dirty where the mode says, its memory fails, the other pages are
/// checked through every mapping, `fsync` reports EIO once; then the lost page is accessed
/// through the mapping the mode names, which must kill the process with SIGBUS.
#[test]
#[ignore = "run as a child process by every_cpu_mapping_of_a_lost_page_gets_sigbus"]
fn poison_sigbus_child() {
    let (Some(path), Ok(mode)) = (
        std::env::var_os("HETMEM_POISON_FILE"),
        std::env::var("HETMEM_POISON_MODE"),
    ) else {
        return;
    };
    let (s1, s2) = (Space::new().unwrap(), Space::new().unwrap());
    if mode == "shared-anon" {
        // Shared anonymous memory, mapped in two spaces: a page never written is lost too.
        let (a, cache) = s1.map_shared_anon(N * P, Prot::ReadWrite).unwrap();
        let b = s2
            .map_file(&cache.handle(), 0, N * P, Prot::Read, true)
            .unwrap();
        assert_eq!(s2.load_u32(b.add(2 * P)).unwrap(), 0);
        s1.store_u32(a.add(P), 1).unwrap();
        assert_eq!(cache.inject_poison(2).unwrap(), MemoryFailure::Lost);
        assert_eq!(s2.load_u32(b.add(P)).unwrap(), 1);
        eprintln!("hetmem-test: the lost page next");
        let _ = s1.load_u32(a.add(2 * P));
        std::process::exit(0); // not reached
    }
    let cache = FileCache::open(std::path::Path::new(&path), true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let len = N * P;
    let i = s1
        .map_file_with(&h, 0, len, intercepting(Prot::ReadWrite))
        .unwrap();
    let r = s2.map_file(&h, 0, len, Prot::Read, true).unwrap();
    let p = s2.map_file(&h, 0, len, Prot::ReadWrite, false).unwrap();
    // Not with a device-private placement: it refuses pages of writable mappings that do not
    // intercept stores.
    let w =
        (mode != "device-private").then(|| s1.map_file(&h, 0, len, Prot::ReadWrite, true).unwrap());
    h.write_at(5 * P as u64, &[0x55; P]).unwrap();
    assert_eq!(s2.load_u32(r.add(P)).unwrap(), first_word(1));
    let lost = match mode.as_str() {
        "device-private" | "device-coherent" => {
            let dev = if mode == "device-private" {
                SoftDevice::private(8 << 20).unwrap()
            } else {
                SoftDevice::coherent(8 << 20).unwrap()
            };
            let m = dev.mirror(&s1).unwrap();
            assert_eq!(
                cache
                    .place_on_device(0, 4 * P as u64, dev.pagemap())
                    .unwrap(),
                4
            );
            if let Some(w) = w {
                // Coherent: a CPU store in place (seen by the cache's scan).
                s1.store_u32(w.add(2 * P), 0xDEAD_BEEF).unwrap();
            } else {
                // Private: the device writes its frame.
                m.write(i.add(2 * P), P, &[0xA2; P]).unwrap();
            }
            dev.inject_poison(frame_of(&dev, 2)).unwrap()
        }
        "intercepted-store" => {
            s1.store_u32(i.add(2 * P), 0xDEAD_BEEF).unwrap();
            cache.inject_poison(2).unwrap()
        }
        _ => {
            // A store the cache sees only when it scans the mapping.
            s1.store_u32(w.unwrap().add(2 * P), 0xDEAD_BEEF).unwrap();
            cache.inject_poison(2).unwrap()
        }
    };
    assert_eq!(lost, MemoryFailure::Lost, "mode {mode}");
    // The other pages, through every mapping.
    let mut views = vec![(&s1, i), (&s2, r), (&s2, p)];
    if let Some(w) = w {
        views.push((&s1, w));
    }
    for (s, a) in views {
        assert_eq!(s.load_u32(a.add(P)).unwrap(), first_word(1), "mode {mode}");
        assert_eq!(
            s.load_u32(a.add(3 * P)).unwrap(),
            first_word(3),
            "mode {mode}"
        );
        assert_eq!(
            s.load_u32(a.add(5 * P)).unwrap(),
            0x5555_5555,
            "mode {mode}"
        );
    }
    let e = h.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h.fsync().unwrap();
    eprintln!("hetmem-test: the lost page next");
    match mode.as_str() {
        "shared-writer" | "device-coherent" => {
            let _ = s1.load_u32(w.unwrap().add(2 * P));
        }
        "shared-reader" | "device-private" => {
            let _ = s2.load_u32(r.add(2 * P));
        }
        "private" => {
            let _ = s2.load_u32(p.add(2 * P));
        }
        "intercepted-store" => {
            let _ = s1.store_u32(i.add(2 * P), 7);
        }
        other => panic!("unknown mode {other}"),
    }
    std::process::exit(0); // not reached
}

#[test]
fn every_cpu_mapping_of_a_lost_page_gets_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let _w = watchdog("poison_sigbus", 120);
    for mode in [
        "shared-writer",
        "shared-reader",
        "private",
        "intercepted-store",
        "device-private",
        "device-coherent",
        "shared-anon",
    ] {
        let f = TempFile::new(&format!("poison-sigbus-{mode}"), &base());
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "poison_sigbus_child", "--ignored", "--nocapture"])
            .env("HETMEM_POISON_FILE", &f.0)
            .env("HETMEM_POISON_MODE", mode)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "mode {mode}: {:?}\n{err}",
            out.status
        );
        assert!(
            err.contains("hetmem-test: the lost page next"),
            "mode {mode}: SIGBUS before the lost page was touched:\n{err}"
        );
        assert!(
            err.contains("hetmem: SIGBUS at 0x") && err.contains("lost to a memory failure"),
            "mode {mode}: no reason printed:\n{err}"
        );
        // The child fsynced: the lost page kept its old bytes, the other write is there.
        let mut want = base();
        if mode != "shared-anon" {
            want[5 * P..6 * P].fill(0x55);
        }
        assert!(f.disk() == want, "mode {mode}: the disk differs");
    }
}

/// The same over the kernel model, in this process (an access returns the signal it ends with):
/// fills skip a lost page (a fault-around window that grows over it leaves it out), and every
/// mapping in every space gets SIGBUS there until a write of the whole page ends it.
#[test]
fn a_lost_page_is_never_filled_and_is_sigbus_in_every_model_mapping() {
    let _w = watchdog("poison_model", 30);
    let (f, cache, h) = file("poison-model");
    let (s1, s2) = (
        Space::new_model(4 << 20).unwrap(),
        Space::new_model(4 << 20).unwrap(),
    );
    let len = N * P;
    let w = s1.map_file(&h, 0, len, Prot::ReadWrite, true).unwrap();
    let r = s2.map_file(&h, 0, len, Prot::Read, true).unwrap();
    let p = s2.map_file(&h, 0, len, Prot::ReadWrite, false).unwrap();
    s1.store_u32(w.add(2 * P), 0xDEAD_BEEF).unwrap();
    assert_eq!(cache.inject_poison(2).unwrap(), MemoryFailure::Lost);
    // Sequential faults double the fill window: page 1's covers pages 1 and 2.
    assert_eq!(s2.load_u32(r).unwrap(), 0);
    assert_eq!(s2.load_u32(r.add(P)).unwrap(), first_word(1));
    assert_eq!(
        cache.placement(2),
        PagePlacement::Uncached,
        "the lost page was filled"
    );
    let sigbus = |res: Result<u32>| {
        matches!(
            res,
            Err(Error::Signal {
                signo: libc::SIGBUS,
                ..
            })
        )
    };
    for (s, a) in [(&s1, w), (&s2, r), (&s2, p)] {
        assert!(sigbus(s.load_u32(a.add(2 * P))), "a load of the lost page");
        assert_eq!(s.load_u32(a.add(3 * P)).unwrap(), first_word(3));
    }
    assert!(matches!(
        s1.store_u32(w.add(2 * P), 1),
        Err(Error::Signal {
            signo: libc::SIGBUS,
            ..
        })
    ));
    // A write of the whole page ends it: every mapping sees the new bytes.
    h.write_at(2 * P as u64, &[0x77; P]).unwrap();
    assert!(cache.lost_pages().is_empty());
    for (s, a) in [(&s1, w), (&s2, r), (&s2, p)] {
        assert_eq!(s.load_u32(a.add(2 * P)).unwrap(), 0x7777_7777);
    }
    let e = h.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h.fsync().unwrap();
    let mut want = base();
    want[2 * P..3 * P].fill(0x77);
    assert!(f.disk() == want);
}

#[test]
fn device_accesses_to_a_lost_page_fail_with_eio() {
    let _w = watchdog("poison_device", 30);
    let (f, cache, h) = file("poison-device");
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_file(&h, 0, N * P, Prot::ReadWrite, true).unwrap();
    let i = space
        .map_file_with(&h, 0, N * P, intercepting(Prot::ReadWrite))
        .unwrap();
    // The device maps every page, then writes page 2 through the CPU view (tracked like a CPU
    // store: the failure finds it dirty).
    let mut buf = vec![0u8; N * P];
    m.read(a, N * P, &mut buf).unwrap();
    m.write(a.add(2 * P), P, &[0xA2; P]).unwrap();
    assert_eq!(cache.inject_poison(2).unwrap(), MemoryFailure::Lost);
    // Reads through the mirror: EIO for a range holding it, through either mapping.
    assert_lost(&m.read(a, N * P, &mut buf).unwrap_err(), 2);
    assert_lost(&m.read(i.add(2 * P), P, &mut buf).unwrap_err(), 2);
    let mut c = DmirrorCmd {
        addr: a.get() as u64,
        buf: &mut buf,
        npages: N as u64,
        cpages: 0,
        faults: 0,
    };
    assert_eq!(m.cmd(Cmd::Read, &mut c), -libc::EIO);
    // Writes too: through the CPU view, and through a mapping that intercepts stores (which
    // asks the cache for write access).
    assert_lost(&m.write(a.add(2 * P), P, &[1; P]).unwrap_err(), 2);
    assert_lost(&m.write(i.add(2 * P), P, &[1; P]).unwrap_err(), 2);
    // The other pages are intact.
    let mut two = vec![0u8; 2 * P];
    m.read(a, 2 * P, &mut two).unwrap();
    assert!(two == base()[..2 * P]);
    let mut rest = vec![0u8; (N - 3) * P];
    m.read(i.add(3 * P), (N - 3) * P, &mut rest).unwrap();
    assert!(rest == base()[3 * P..]);
    let e = h.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(f.disk() == base(), "the lost page reached the disk");
}

#[test]
fn a_failed_device_private_frame_is_retired_its_page_read_again_or_lost() {
    let _w = watchdog("poison_device_private", 30);
    let (f, cache, h) = file("poison-dev-private");
    let dev = SoftDevice::private(8 << 20).unwrap();
    let pm = dev.pagemap().clone();
    let space = Space::new().unwrap();
    let m = dev.mirror(&space).unwrap();
    let i = space
        .map_file_with(&h, 0, N * P, intercepting(Prot::ReadWrite))
        .unwrap();
    assert_eq!(cache.place_on_device(0, 4 * P as u64, &pm).unwrap(), 4);
    // The device writes page 2 in its frame (the page's only copy).
    m.write(i.add(2 * P), P, &[0xA2; P]).unwrap();
    let (f1, f2) = (frame_of(&dev, 1), frame_of(&dev, 2));
    let used = dev.used();
    // Page 1 is clean: its frame is retired (never handed out again) and the page is read from
    // the file at its next access.
    assert_eq!(dev.inject_poison(f1).unwrap(), MemoryFailure::Dropped);
    assert_eq!(cache.placement(1), PagePlacement::Uncached);
    let info = pm.frame_info(f1).unwrap();
    assert_eq!(info.owner, None);
    assert_ne!(
        info.flags & frame_flags::POISONED,
        0,
        "the frame was not retired"
    );
    assert_eq!(dev.used(), used, "a retired frame is not freed");
    write_disk(&f, P, &[0xC1; P]);
    assert_eq!(space.load_u32(i.add(P)).unwrap(), 0xC1C1_C1C1);
    assert!(read_page(&h, 1).unwrap() == [0xC1; P]);
    // Page 2 was written by the device: lost.
    assert_eq!(dev.inject_poison(f2).unwrap(), MemoryFailure::Lost);
    assert_eq!(cache.lost_pages(), vec![2]);
    assert_eq!(cache.placement(2), PagePlacement::Uncached);
    assert_lost(&read_page(&h, 2).unwrap_err(), 2);
    let mut buf = vec![0u8; P];
    assert_lost(&m.read(i.add(2 * P), P, &mut buf).unwrap_err(), 2);
    // The other pages stay on the device, intact.
    for p in [0, 3] {
        assert_eq!(
            cache.placement(p as u64),
            PagePlacement::DevicePrivate { owner: dev.owner() }
        );
        m.read(i.add(p * P), P, &mut buf).unwrap();
        assert!(buf == pg(&base(), p), "page {p}");
    }
    let e = h.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h.fsync().unwrap();
    let mut want = base();
    want[P..2 * P].fill(0xC1);
    assert!(f.disk() == want, "the lost page reached the disk");
    // Placed again, page 1 gets another frame; failed or free frames hold no file page.
    assert_eq!(cache.place_on_device(P as u64, P as u64, &pm).unwrap(), 1);
    assert_ne!(frame_of(&dev, 1), f1);
    assert_eq!(dev.inject_poison(f1).unwrap_err().errno(), libc::EINVAL);
    let free = (0..pm.nframes() as u32)
        .map(FrameIdx)
        .find(|&f| pm.frame_info(f).unwrap().flags == 0)
        .unwrap();
    assert_eq!(dev.inject_poison(free).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn a_failed_coherent_frame_is_a_failed_cached_page() {
    let _w = watchdog("poison_coherent", 30);
    let (f, cache, h) = file("poison-coherent");
    let dev = SoftDevice::coherent(8 << 20).unwrap();
    let pm = dev.pagemap().clone();
    let space = Space::new().unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_file(&h, 0, N * P, Prot::ReadWrite, true).unwrap();
    assert_eq!(cache.place_on_device(0, 4 * P as u64, &pm).unwrap(), 4);
    // A CPU store in place (coherent pages are mapped where they are).
    space.store_u32(a.add(2 * P), 0xC0FF_EE00).unwrap();
    let (f1, f2, f3) = (frame_of(&dev, 1), frame_of(&dev, 2), frame_of(&dev, 3));
    // Clean: the frame retired, the page read from the file again (into system memory).
    assert_eq!(dev.inject_poison(f1).unwrap(), MemoryFailure::Dropped);
    assert_ne!(pm.frame_info(f1).unwrap().flags & frame_flags::POISONED, 0);
    write_disk(&f, P, &[0xC1; P]);
    assert_eq!(space.load_u32(a.add(P)).unwrap(), 0xC1C1_C1C1);
    assert_eq!(cache.placement(1), PagePlacement::System);
    // Dirty (the store): lost.
    assert_eq!(dev.inject_poison(f2).unwrap(), MemoryFailure::Lost);
    assert_lost(&read_page(&h, 2).unwrap_err(), 2);
    let mut buf = vec![0u8; P];
    assert_lost(&m.read(a.add(2 * P), P, &mut buf).unwrap_err(), 2);
    // The cache's own page of a coherent page is the frame: its failure retires the frame too.
    h.write_at(3 * P as u64, &[0x33; P]).unwrap();
    assert_eq!(cache.inject_poison(3).unwrap(), MemoryFailure::Lost);
    assert_ne!(pm.frame_info(f3).unwrap().flags & frame_flags::POISONED, 0);
    assert_eq!(cache.lost_pages(), vec![2, 3]);
    // Page 0 is untouched, still coherent.
    assert_eq!(
        cache.placement(0),
        PagePlacement::DeviceCoherent { owner: dev.owner() }
    );
    assert_eq!(space.load_u32(a).unwrap(), 0);
    m.read(a, P, &mut buf).unwrap();
    assert!(buf == pg(&base(), 0));
    let e = h.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h.fsync().unwrap();
    let mut want = base();
    want[P..2 * P].fill(0xC1);
    assert!(f.disk() == want, "a lost page reached the disk");
}

#[test]
fn a_failed_replica_frame_drops_only_that_copy() {
    let _w = watchdog("poison_replica", 30);
    let (f, cache, h) = file("poison-replica");
    let dev = SoftDevice::private(8 << 20).unwrap();
    let pm = dev.pagemap().clone();
    let space = Space::new().unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space
        .map_file_with(&h, 0, N * P, intercepting(Prot::Read))
        .unwrap();
    assert_eq!(cache.replicate(0, 4 * P as u64, &pm).unwrap(), 4);
    let mut buf = vec![0u8; 4 * P];
    m.read(a, 4 * P, &mut buf).unwrap();
    assert!(buf == base()[..4 * P]);
    // A replica's frame fails: that copy goes (its frame retired), the page is intact.
    let f1 = frame_of(&dev, 1);
    assert_eq!(
        dev.inject_poison(f1).unwrap(),
        MemoryFailure::ReplicaDropped
    );
    assert!(cache.replica_owners(1).is_empty());
    assert_eq!(cache.replica_owners(2), vec![dev.owner()]);
    assert_ne!(pm.frame_info(f1).unwrap().flags & frame_flags::POISONED, 0);
    assert_eq!(cache.placement(1), PagePlacement::System);
    m.read(a, 4 * P, &mut buf).unwrap();
    assert!(
        buf == base()[..4 * P],
        "the device reads page 1 in system memory"
    );
    assert!(cache.lost_pages().is_empty());
    h.fsync().unwrap();
    // The memfd page of a replicated clean page fails: its replicas go with it (freed: their
    // frames did not fail), and the page is read from the file again.
    let f2 = frame_of(&dev, 2);
    assert_eq!(cache.inject_poison(2).unwrap(), MemoryFailure::Dropped);
    assert!(cache.replica_owners(2).is_empty());
    assert_eq!(
        pm.frame_info(f2).unwrap().flags,
        0,
        "the replica's frame was freed"
    );
    write_disk(&f, 2 * P, &[0xC2; P]);
    m.read(a.add(2 * P), P, &mut buf[..P]).unwrap();
    assert!(buf[..P] == [0xC2; P]);
    h.fsync().unwrap();
}

/// Shared anonymous memory has no file behind it: its memory holds the only copy of every page,
/// clean or dirty, so a failure of any cached page loses it (SIGBUS on access: the
/// `shared-anon` case of `every_cpu_mapping_of_a_lost_page_gets_sigbus`).
#[test]
fn a_failed_page_of_shared_anonymous_memory_is_lost_whatever_its_state() {
    let _w = watchdog("poison_shared_anon", 30);
    let s = Space::new().unwrap();
    let (a, cache) = s.map_shared_anon(N * P, Prot::ReadWrite).unwrap();
    let h = cache.handle();
    s.store_u32(a.add(P), 0x1111_1111).unwrap();
    assert_eq!(
        s.load_u32(a.add(2 * P)).unwrap(),
        0,
        "page 2: filled, never written"
    );
    h.write_at(3 * P as u64, &[0x33; P]).unwrap();
    for p in [1, 2, 3] {
        assert_eq!(
            cache.inject_poison(p).unwrap(),
            MemoryFailure::Lost,
            "page {p}"
        );
    }
    assert_eq!(cache.lost_pages(), vec![1, 2, 3]);
    for p in [1, 2, 3] {
        assert_lost(&read_page(&h, p as usize).unwrap_err(), p);
    }
    assert_eq!(s.load_u32(a.add(4 * P)).unwrap(), 0);
    let e = h.fsync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    h.fsync().unwrap();
    // A write of the whole page, or a hole punch, ends a loss.
    h.write_at(2 * P as u64, &[0x22; P]).unwrap();
    h.punch_hole(P as u64, P as u64).unwrap();
    assert_eq!(cache.lost_pages(), vec![3]);
    assert_eq!(s.load_u32(a.add(2 * P)).unwrap(), 0x2222_2222);
    assert_eq!(s.load_u32(a.add(P)).unwrap(), 0);
}
