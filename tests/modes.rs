//! Fault-service modes (per mapping) and privileges: what a system call that touches a
//! device-resident page gets, and that everything works for an unprivileged user.

mod common;
use common::*;
use hetmem::*;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

/// Maps `pages` pages in `mode`, writes the pattern, migrates them to a private device.
fn device_resident(space: &Space, dev: &DeviceMirror, mode: FaultMode, pages: usize) -> VirtAddr {
    let a = space
        .map_anon_with(
            pages * PAGE,
            MapOptions {
                mode,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(a, &pattern(pages * PAGE, |i| i)).unwrap();
    let mut buf = vec![0u8; pages * PAGE];
    assert_eq!(
        dev.migrate_to_device(a, pages * PAGE, &mut buf)
            .unwrap()
            .cpages,
        pages as u64
    );
    a
}

/// `read(2)` from a socket into the managed page at `a`.
fn syscall_read_into(space: &Space, a: VirtAddr, payload: &[u8]) -> std::io::Result<usize> {
    let (mut tx, rx) = UnixStream::pair().unwrap();
    tx.write_all(payload).unwrap();
    let probe = space.probe(a, PAGE).unwrap();
    match probe.read_from(rx.as_fd(), a, payload.len()) {
        Ok(n) => Ok(n),
        Err(Error::Os { source, .. }) => Err(source),
        Err(e) => panic!("read into {a}: {e}"),
    }
}

#[test]
fn signal_mode_syscall_gets_efault_and_data_survives() {
    let _w = watchdog("signal_mode_syscall", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = device_resident(&space, &m, FaultMode::Signal, 4);
    let err = syscall_read_into(&space, a, &[0xAB; 64]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    // The page is still on the device, untouched, and a user-mode access brings it back intact.
    assert_eq!(space.residency(a), Residency::Device(dev.owner()));
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(4 * PAGE, |i| i));
}

#[test]
fn thread_mode_serves_syscalls_when_privileged() {
    let _w = watchdog("thread_mode_syscall", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = device_resident(&space, &m, FaultMode::Thread, 4);
    let res = syscall_read_into(&space, a, &[0xAB; 64]);
    if space.user_mode_only() {
        // Unprivileged: kernel-mode accesses are not served in any mode.
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EFAULT));
        return;
    }
    assert_eq!(res.unwrap(), 64);
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    let mut want = pattern(4 * PAGE, |i| i);
    want[..64].fill(0xAB);
    assert_eq!(
        back, want,
        "the syscall's bytes land on the page brought back from the device"
    );
}

#[test]
fn user_mode_only_thread_mode_syscall_gets_efault() {
    let _w = watchdog("umo_thread_syscall", 30);
    let space = Space::with_config(SpaceConfig {
        user_mode_only: true,
        ..SpaceConfig::default()
    })
    .unwrap();
    assert!(space.user_mode_only());
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = device_resident(&space, &m, FaultMode::Thread, 4);
    let err = syscall_read_into(&space, a, &[0xCD; 64]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    // User-mode accesses are served in both modes.
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(4 * PAGE, |i| i));
    let b = device_resident(&space, &m, FaultMode::Signal, 4);
    assert_eq!(space.load_u32(b.add(8)).unwrap(), 2);
}

#[test]
fn thread_mode_cpu_faults_are_served() {
    let _w = watchdog("thread_mode_cpu", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = device_resident(&space, &m, FaultMode::Thread, 64);
    for p in 0..64 {
        assert_eq!(
            space.load_u32(a.add(p * PAGE)).unwrap(),
            (p * PAGE / 4) as u32
        );
    }
    assert_eq!(space.residency(a), Residency::System);
    // First touch in thread mode too.
    let b = space
        .map_anon_with(
            64 * PAGE,
            MapOptions {
                mode: FaultMode::Thread,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.store_u32(b.add(5 * PAGE), 7).unwrap();
    assert_eq!(space.load_u32(b.add(5 * PAGE)).unwrap(), 7);
    assert_eq!(space.load_u32(b).unwrap(), 0);
}

/// The README's main job, run as an unprivileged user (`nobody`), as a new user runs it.
#[test]
fn demo_runs_unprivileged() {
    let _w = watchdog("demo_unprivileged", 60);
    if hetmem::sys::geteuid() != 0 {
        // Already unprivileged: run it directly.
        let mut out = Vec::new();
        assert!(hetmem::demo::run(&mut out).unwrap().verified);
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // The build directory may not be reachable for `nobody` (e.g. under /root): run a copy.
    let dir = std::env::temp_dir().join(format!("hetmem-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("hetmem");
    std::fs::copy(env!("CARGO_BIN_EXE_hetmem"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&bin)
        .args(["demo", "--size", "8"])
        .current_dir(&dir)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo as nobody failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("values verified"), "{stdout}");
    // Part 2: the large file, every placement verified.
    for p in ["mirror", "private", "coherent", "replica", "on-demand"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(p) && l.trim_end().ends_with("yes")),
            "no verified {p} row: {stdout}"
        );
    }
    let sysctl =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if sysctl.trim() == "0" {
        assert!(
            stdout.contains("user-mode-only"),
            "unprivileged run must use a user-mode-only userfaultfd: {stdout}"
        );
    }
}

#[test]
fn demo_in_process() {
    let _w = watchdog("demo", 60);
    let mut out = Vec::new();
    let r = hetmem::demo::run(&mut out).unwrap();
    assert!(r.verified);
    let pages = (hetmem::demo::DEMO_BYTES / PAGE) as u64;
    assert_eq!(r.pages_to_device, 2 * pages);
    assert_eq!(r.pages_to_system, 2 * pages);
    assert!(
        r.cpu_faults >= pages,
        "every page faulted back once in step 5"
    );
}

#[test]
fn a_device_reads_and_writes_pages_the_program_dropped_in_a_thread_mode_mapping() {
    // With a thread-mode handler in the process devices copy system pages raw; a page the
    // program dropped behind hetmem's back (a direct madvise) is told from the page table and
    // refilled as the kernel would (zeros), never faulted on under the device's lock.
    let _w = watchdog("thread_mode_dropped", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space
        .map_anon_with(
            8 * PAGE,
            MapOptions {
                mode: FaultMode::Thread,
                ..MapOptions::default()
            },
        )
        .unwrap();
    let data = pattern(8 * PAGE, |i| i + 1);
    space.cpu_write(a, &data).unwrap();
    let mut buf = vec![0u8; 8 * PAGE];
    m.read(a, 8 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data);
    // SAFETY: `a..a + 8 pages` is managed memory of `space` (mapped above), where no Rust object
    // lives.
    unsafe { hetmem::sys::madvise_dontneed(a.add(2 * PAGE).get(), 2 * PAGE) }.unwrap();
    m.read(a, 8 * PAGE, &mut buf).unwrap();
    let mut want = data.clone();
    want[2 * PAGE..4 * PAGE].fill(0);
    assert_eq!(buf, want);
    // SAFETY: as above.
    unsafe { hetmem::sys::madvise_dontneed(a.add(6 * PAGE).get(), PAGE) }.unwrap();
    let page = pattern(PAGE, |i| 0xf000_0000 | i);
    m.write(
        a.add(5 * PAGE),
        2 * PAGE,
        &[page.clone(), page.clone()].concat(),
    )
    .unwrap();
    want[5 * PAGE..6 * PAGE].copy_from_slice(&page);
    want[6 * PAGE..7 * PAGE].copy_from_slice(&page);
    space.cpu_read(a, &mut buf).unwrap();
    assert_eq!(buf, want);
}

#[test]
fn a_device_reads_and_writes_shared_pages_whose_entries_the_program_dropped() {
    // With a thread-mode handler in the process devices copy raw. A direct madvise(DONTNEED)
    // of a page of a shared mapping drops only its page-table entry: the memfd keeps the
    // bytes, and the device reads and writes them (a check of the page table alone took the
    // page for gone and failed with EFAULT).
    let _w = watchdog("thread_mode_shared_dropped", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let t = space
        .map_anon_with(
            4 * PAGE,
            MapOptions {
                mode: FaultMode::Thread,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(t, &[1u8; 4 * PAGE]).unwrap();
    let (a, _cache) = space.map_shared_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    let data = pattern(4 * PAGE, |i| i * 5 + 1);
    space.cpu_write(a, &data).unwrap();
    let mut buf = vec![0u8; 4 * PAGE];
    m.read(a, 4 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data);
    // SAFETY: `a..a + 4 pages` is managed memory of `space` (mapped above), where no Rust object
    // lives.
    unsafe { hetmem::sys::madvise_dontneed(a.add(PAGE).get(), 2 * PAGE) }.unwrap();
    m.read(a, 4 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data, "the memfd kept the bytes");
    let page = pattern(PAGE, |i| 0xe000_0000 | i);
    m.write(a.add(2 * PAGE), PAGE, &page).unwrap();
    let mut want = data.clone();
    want[2 * PAGE..3 * PAGE].copy_from_slice(&page);
    space.cpu_read(a, &mut buf).unwrap();
    assert_eq!(buf, want);
}
