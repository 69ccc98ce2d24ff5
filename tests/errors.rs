//! Bad input gets a clear, typed error and loses no data.

mod common;
use common::*;
use hetmem::*;

/// A fork copies every device page of the process into the CPU view until the parent's
/// handler drops the copies again: a CPU read of one then reads the copy and brings nothing
/// back. The test asserting that CPU reads bring every page back takes this for writing, the
/// forking test for reading (found in a full run under load: 838 pages left on the device).
static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn setup() -> (Space, SoftDevice) {
    (Space::new().unwrap(), SoftDevice::private(4 << 20).unwrap())
}

#[test]
fn mapping_arguments() {
    let _w = watchdog("mapping_arguments", 30);
    let (space, _dev) = setup();
    assert!(matches!(
        space.map_anon(0, Prot::ReadWrite),
        Err(Error::ZeroLength)
    ));
    assert!(matches!(
        space.map_anon(100, Prot::ReadWrite),
        Err(Error::UnalignedLength { len: 100 })
    ));
    let r = space.range();
    let opts = MapOptions::default();
    assert!(matches!(
        space.map_anon_at(r.start.add(1), PAGE, opts),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        space.map_anon_at(VirtAddr(PAGE), PAGE, opts),
        Err(Error::OutOfSpace { .. })
    ));
    assert!(matches!(
        space.map_anon_at(VirtAddr(usize::MAX & !(PAGE - 1)), 2 * PAGE, opts),
        Err(Error::Overflow { .. })
    ));
    space.map_anon_at(r.start, 4 * PAGE, opts).unwrap();
    assert!(matches!(
        space.map_anon_at(r.start.add(2 * PAGE), 4 * PAGE, opts),
        Err(Error::Overlap { .. })
    ));
    let e = space.map_anon(r.len() * 2, Prot::ReadWrite).unwrap_err();
    assert!(matches!(e, Error::NoMemory { .. }), "{e}");
    assert_eq!(e.errno(), libc::ENOMEM);
}

#[test]
fn protect_and_unmap_arguments_are_all_or_nothing() {
    let _w = watchdog("protect_unmap_arguments", 30);
    let (space, _dev) = setup();
    let r = space.range();
    let opts = MapOptions::default();
    space.map_anon_at(r.start, 4 * PAGE, opts).unwrap();
    space
        .map_anon_at(r.start.add(8 * PAGE), 4 * PAGE, opts)
        .unwrap();
    space.cpu_write(r.start, &pattern(4 * PAGE, |i| i)).unwrap();
    // Across the hole at pages 4..8: refused, nothing changed.
    let e = space.protect(r.start, 12 * PAGE, Prot::Read).unwrap_err();
    assert!(
        matches!(e, Error::NotMapped { addr } if addr == r.start.add(4 * PAGE)),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EFAULT);
    space.cpu_write(r.start, &[1, 2, 3, 4]).unwrap();
    assert!(matches!(
        space.protect(r.start.add(1), PAGE, Prot::Read),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        space.protect(r.start, 0, Prot::Read),
        Err(Error::ZeroLength)
    ));
    assert!(matches!(
        space.unmap(VirtAddr(PAGE), PAGE),
        Err(Error::OutOfSpace { .. })
    ));
    // Unmap across the hole is allowed (as munmap) and removes both mappings' pages.
    space.unmap(r.start, 12 * PAGE).unwrap();
    assert_eq!(space.residency(r.start), Residency::Unmapped);
    assert!(matches!(
        space.cpu_read(r.start, &mut [0u8; 4]),
        Err(Error::NotMapped { .. })
    ));
}

#[test]
fn cpu_access_checks_permissions() {
    let _w = watchdog("cpu_access_permissions", 30);
    let (space, _dev) = setup();
    let a = space.map_anon(2 * PAGE, Prot::Read).unwrap();
    assert!(matches!(
        space.cpu_write(a, &[1]),
        Err(Error::NoWrite { .. })
    ));
    let mut b = [9u8; 8];
    space.cpu_read(a, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
    space.protect(a, 2 * PAGE, Prot::None).unwrap();
    assert!(matches!(
        space.cpu_read(a, &mut b),
        Err(Error::NoRead { .. })
    ));
    assert!(matches!(
        space.pin(a, PAGE, false),
        Err(Error::NoRead { .. })
    ));
    assert!(matches!(space.load_u32(a.add(1)), Err(Error::Invalid(_))));
}

/// The mirror's methods by name (the range arguments only: the buffers are large enough for
/// every range the test gives that fits in a few pages).
const MIRROR_OPS: [&str; 9] = [
    "read",
    "write",
    "migrate_to_device",
    "migrate_range_to_device",
    "replicate_range",
    "migrate_to_system",
    "snapshot",
    "exclusive",
    "check_exclusive",
];

fn mirror_op(m: &DeviceMirror, op: &str, addr: VirtAddr, len: usize) -> Result<CmdOut> {
    let mut buf = vec![0u8; 4 * PAGE];
    match op {
        "read" => m.read(addr, len, &mut buf),
        "write" => m.write(addr, len, &buf),
        "migrate_to_device" => m.migrate_to_device(addr, len, &mut buf),
        "migrate_range_to_device" => m.migrate_range_to_device(addr, len),
        "replicate_range" => m.replicate_range(addr, len),
        "migrate_to_system" => m.migrate_to_system(addr, len),
        "snapshot" => m.snapshot(addr, len, &mut buf),
        "exclusive" => m.exclusive(addr, len, &mut buf),
        "check_exclusive" => m.check_exclusive(addr, len),
        _ => unreachable!("{op}"),
    }
}

/// The mirror's methods take a range as `Space`'s do, `len` bytes at `addr`: a zero length, a
/// length that is not a multiple of the page size, an unaligned address and a length that wraps
/// the address space get their typed errors (EINVAL) before anything is done; a huge length that
/// does not wrap gets a typed error too, at once (the buffer is smaller than the range, or the
/// range leaves the mapping). `cmd` keeps the kernel's shape, a page count, and its answers.
#[test]
fn mirror_range_arguments() {
    let _w = watchdog("mirror_range_arguments", 30);
    let (space, dev) = setup();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    let data = pattern(4 * PAGE, |i| i ^ 0x3c3c);
    space.cpu_write(a, &data).unwrap();
    for op in MIRROR_OPS {
        let e = mirror_op(&m, op, a, 0).unwrap_err();
        assert!(matches!(e, Error::ZeroLength), "{op}: {e}");
        assert_eq!(e.errno(), libc::EINVAL);
        for len in [1, 8, PAGE - 1, PAGE + 1, 3 * PAGE + PAGE / 2] {
            let e = mirror_op(&m, op, a, len).unwrap_err();
            assert!(
                matches!(e, Error::UnalignedLength { len: l } if l == len),
                "{op}, {len:#x} bytes: {e}"
            );
            assert_eq!(e.errno(), libc::EINVAL);
        }
        for addr in [a.add(1), a.add(PAGE / 2), a.add(3 * PAGE + 8)] {
            let e = mirror_op(&m, op, addr, PAGE).unwrap_err();
            assert!(
                matches!(e, Error::Unaligned { addr: x } if x == addr),
                "{op} at {addr}: {e}"
            );
            assert_eq!(e.errno(), libc::EINVAL);
        }
        // The address checked first, as `Space`'s methods do.
        assert!(matches!(
            mirror_op(&m, op, a.add(1), 0),
            Err(Error::Unaligned { .. })
        ));
        // Lengths that wrap: the largest page multiple, and the one that ends exactly at 2^64.
        for len in [usize::MAX & !(PAGE - 1), a.get().wrapping_neg()] {
            let e = mirror_op(&m, op, a, len).unwrap_err();
            assert!(
                matches!(e, Error::Overflow { addr, len: l } if addr == a && l == len),
                "{op}, {len:#x} bytes: {e}"
            );
            assert_eq!(e.errno(), libc::EINVAL);
        }
    }
    assert_eq!(dev.used(), 0, "a refused range moved nothing");
    assert_eq!(m.mapped_pages(), 0, "a refused range mapped nothing");
    // Huge lengths that fit in the address space: refused at once (a buffer smaller than the
    // range; no file mapping to replicate; the range leaves the mapping, where a migration stops
    // as the kernel's does, after the mapping's pages). check_exclusive walks only what is mapped
    // and finds no exclusive entry.
    for len in [1usize << 40, 1 << 46, 1 << 62] {
        for op in MIRROR_OPS {
            let r = mirror_op(&m, op, a, len);
            if op == "check_exclusive" {
                assert_eq!(r.unwrap(), CmdOut::default(), "{len:#x} bytes");
                continue;
            }
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{op}, {len:#x} bytes: {e}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
    }
    // The kernel's shape through `cmd`: zero pages, an unaligned address and a page count whose
    // bytes wrap are EINVAL for every command (Release and Flags too), the counters untouched.
    let mut buf = vec![0u8; 4 * PAGE];
    let cmds = [
        Cmd::Read,
        Cmd::Write,
        Cmd::MigrateToDev,
        Cmd::MigrateToSys,
        Cmd::Snapshot,
        Cmd::Exclusive,
        Cmd::CheckExclusive,
        Cmd::Release,
        Cmd::Flags,
    ];
    let ag = a.get() as u64;
    for cmd in cmds {
        for (addr, npages) in [(ag, 0), (ag + 1, 1), (ag, 1 << 52), (ag, u64::MAX)] {
            let mut c = DmirrorCmd {
                addr,
                buf: &mut buf,
                npages,
                cpages: 7,
                faults: 7,
            };
            assert_eq!(
                m.cmd(cmd, &mut c),
                -libc::EINVAL,
                "{cmd:?} at {addr:#x}, {npages:#x} pages"
            );
            assert_eq!((c.cpages, c.faults), (7, 7));
        }
    }
    // A page count is a range of that many pages.
    let mut c = DmirrorCmd {
        addr: ag + PAGE as u64,
        buf: &mut buf,
        npages: 3,
        cpages: 0,
        faults: 0,
    };
    assert_eq!(m.cmd(Cmd::Read, &mut c), 0);
    assert_eq!(c.cpages, 3);
    assert_eq!(buf[..3 * PAGE], data[PAGE..]);
    // Nothing was lost.
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn device_full_loses_no_data() {
    let _w = watchdog("device_full", 30);
    let _forks = FORKS.write().unwrap_or_else(|e| e.into_inner());
    let (space, dev) = setup(); // 4 MiB of device memory
    let m = dev.mirror(&space).unwrap();
    let len = 8 << 20;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let data = pattern(len, |i| i ^ 0x5a5a);
    space.cpu_write(a, &data).unwrap();
    let mut buf = vec![0u8; len];
    let mut c = DmirrorCmd {
        addr: a.get() as u64,
        buf: &mut buf,
        npages: (len / PAGE) as u64,
        cpages: 7,
        faults: 7,
    };
    assert_eq!(
        m.cmd(Cmd::MigrateToDev, &mut c),
        -libc::ENOENT,
        "not every page fits: ENOENT"
    );
    assert_eq!(
        (c.cpages, c.faults),
        (7, 7),
        "cpages/faults are written only on success"
    );
    assert_eq!(dev.used(), 4 << 20, "the device is full");
    let mut back = vec![0u8; len];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(
        back, data,
        "pages that moved and pages that did not are all intact"
    );
    assert_eq!(dev.used(), 0, "CPU reads brought everything back");
}

#[test]
fn forked_child_is_inert() {
    let _w = watchdog("forked_child", 30);
    let _forks = FORKS.read().unwrap_or_else(|e| e.into_inner());
    let (space, dev) = setup();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(4 * PAGE, |i| i + 1)).unwrap();
    let mut buf = vec![0u8; 2 * PAGE];
    m.migrate_to_device(a.add(2 * PAGE), 2 * PAGE, &mut buf)
        .unwrap();
    // A child inherits the memory copy-on-write, as plain memory: a system-resident page and a
    // device-resident one read the parent's data, and its stores stay its own.
    let probe = space.probe(a, 4 * PAGE).unwrap();
    for p in [0, 2] {
        let addr = a.add(p * PAGE);
        let want = (p * PAGE / 4) as u32 + 1;
        // SAFETY: the child makes a load and a store through the probe (bounds checks and
        // volatile accesses of its own copy: no allocation, no lock) and exits.
        let r = unsafe {
            hetmem::sys::fork_and_wait(|| {
                if probe.load_u32(addr).ok() != Some(want) {
                    return 1;
                }
                if probe.store_u32(addr, 0xdead).is_err()
                    || probe.load_u32(addr).ok() != Some(0xdead)
                {
                    return 2;
                }
                0
            })
        };
        assert_eq!(r.unwrap(), hetmem::sys::ChildExit::Exited(0), "page {p}");
    }
    // The device-resident pages are still on the device: a fork moves nothing.
    assert_eq!(
        space.residency(a.add(2 * PAGE)),
        Residency::Device(dev.owner())
    );
    // hetmem calls in the child fail with Forked before doing anything.
    // SAFETY: `protect` checks the process id first (a system call) and returns `Forked` before
    // it allocates or takes a lock.
    let r = unsafe {
        hetmem::sys::fork_and_wait(|| match space.protect(a, PAGE, Prot::Read) {
            Err(Error::Forked { .. }) => 11,
            _ => 12,
        })
    };
    assert_eq!(r.unwrap(), hetmem::sys::ChildExit::Exited(11));
    // The parent is unaffected.
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(4 * PAGE, |i| i + 1));
}

/// Fault injection at the device's copy engine: a failed migration copy declines the page (it
/// stays in system memory, nothing lost, ENOENT reported); a failed device read or write
/// surfaces EIO to the caller and leaves the data consistent.
#[test]
fn device_copy_failures_lose_no_data() {
    let _w = watchdog("device_copy_failures", 30);
    let (space, dev) = setup();
    let m = dev.mirror(&space).unwrap();
    let pages = 16;
    let a = space.map_anon(pages * PAGE, Prot::ReadWrite).unwrap();
    space
        .cpu_write(a, &pattern(pages * PAGE, |i| i * 7))
        .unwrap();
    dev.fail_next_copies(3);
    let mut buf = vec![0u8; pages * PAGE];
    let mut c = DmirrorCmd {
        addr: a.get() as u64,
        buf: &mut buf,
        npages: pages as u64,
        cpages: 0,
        faults: 0,
    };
    assert_eq!(
        m.cmd(Cmd::MigrateToDev, &mut c),
        -libc::ENOENT,
        "declined pages are reported"
    );
    assert_eq!(
        dev.used(),
        (pages - 3) * PAGE,
        "the failed copies' frames were freed"
    );
    assert_eq!(
        space.residency(a),
        Residency::System,
        "the first copy failed: the page stayed"
    );
    assert_eq!(
        space.residency(a.add(3 * PAGE)),
        Residency::Device(dev.owner())
    );
    // A device write whose copy fails returns EIO.
    dev.fail_next_copies(1);
    let e = m.write(a, PAGE, &vec![0xEE; PAGE]).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    // A device read whose copy fails returns EIO too.
    dev.fail_next_copies(1);
    let e = m
        .read(a.add(4 * PAGE), PAGE, &mut vec![0; PAGE])
        .unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    // Nothing was lost or half-written.
    let mut back = vec![0u8; pages * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(pages * PAGE, |i| i * 7));
    assert_eq!(dev.used(), 0);
}

/// A system whose memfds get large folios on writes (`shmem_enabled` `always`, `within_size`,
/// `force`, directly or through a per-size `inherit`) would have the page cache serve zeros
/// for pages it never filled: opening a cache there is refused with the setting to change;
/// `never` and `advise` are fine. (The decision from the settings' contents; the machine's own
/// setting is checked against what opening a cache does.)
#[test]
fn memfds_with_large_folios_are_refused_with_the_setting_to_change() {
    let _w = watchdog("shmem large folios", 30);
    // A setting's file: its values, the selected one in brackets.
    let file = |all: &[&str], v: &str| {
        all.iter()
            .map(|a| {
                if *a == v {
                    format!("[{a}]")
                } else {
                    a.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let top = |v: &str| {
        file(
            &["always", "within_size", "advise", "never", "deny", "force"],
            v,
        )
    };
    let size = |name: &str, v: &str| {
        let all = ["always", "inherit", "within_size", "advise", "never"];
        (name.to_string(), file(&all, v))
    };
    let check = hetmem::sys::shmem_large_folios_in;
    for bad in ["always", "within_size", "force"] {
        let why = check(Some(&top(bad)), &[size("hugepages-2048kB", "inherit")]).unwrap();
        assert!(why.contains("shmem_enabled") && why.contains(bad), "{why}");
    }
    for ok in ["never", "advise", "deny"] {
        assert_eq!(
            check(Some(&top(ok)), &[size("hugepages-2048kB", "inherit")]),
            None
        );
    }
    let why = check(
        Some(&top("never")),
        &[size("hugepages-64kB", "within_size")],
    )
    .unwrap();
    assert!(why.contains("hugepages-64kB"), "{why}");
    assert_eq!(
        check(Some(&top("never")), &[size("hugepages-64kB", "advise")]),
        None
    );
    assert_eq!(check(None, &[]), None, "no THP support at all");

    // This machine: opening a cache agrees with its settings.
    let f = TempFile::new("shmem-setting", b"0123");
    let r = FileCache::open(&f.0, false, CacheConfig::default());
    match hetmem::sys::shmem_large_folios() {
        None => assert!(r.is_ok()),
        Some(_) => {
            let e = r.err().unwrap();
            assert!(matches!(e, Error::Unsupported(_)), "{e}");
            assert_eq!(e.errno(), libc::ENOTSUP);
        }
    }
}
