//! Pages in device-private memory as `/proc/self/pagemap` shows them: swapped out, not present,
//! as the kernel reports its device-private entries, where the space asks for it
//! (`SpaceConfig::device_private_as_swap`, `AdoptConfig::device_private_as_swap`: a
//! userfaultfd write-protect marker on the empty entry); not present and not swapped otherwise.
//! The markers must never stand in the way of a fill: every page reads what it holds, whatever
//! path fills it (a fault back, the zero page after the program's drop, a first touch of a
//! whole unit), and nothing hangs. Every test holds a watchdog.

mod common;
use common::*;

use hetmem::*;

mod plain;
use plain::Plain;

/// Held by every test of this file: a fork copies every space's device-private pages into
/// the CPU's view until it is done (module `fork`), which a concurrent test reading pagemap
/// would see.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// (present, swapped) of each of the `pages` pages from `a`.
fn entries(a: VirtAddr, pages: usize) -> Vec<(bool, bool)> {
    (0..pages)
        .map(|p| {
            let e = pagemap_entry(a.add(p * PAGE));
            (e & PM_PRESENT != 0, e & PM_SWAP != 0)
        })
        .collect()
}

fn space(as_swap: bool) -> Space {
    Space::with_config(SpaceConfig {
        size: 1 << 30,
        device_private_as_swap: as_swap,
        ..SpaceConfig::default()
    })
    .unwrap()
}

fn map_in(space: &Space, len: usize, mode: FaultMode) -> VirtAddr {
    space
        .map_anon_with(
            len,
            MapOptions {
                mode,
                ..MapOptions::default()
            },
        )
        .unwrap()
}

/// Pages migrated to device-private memory read as swapped where the space asks, and as
/// neither present nor swapped where it does not; back in system memory (a CPU read faults
/// them back) they are present with their data, in both fault modes. Device-coherent pages
/// stay present (the CPU maps them).
#[test]
fn device_private_pages_read_as_swapped_in_pagemap_only_where_asked() {
    let _w = watchdog("pagemap_device_private", 60);
    let _serial = one_at_a_time();
    const N: usize = 8;
    for as_swap in [false, true] {
        for mode in [FaultMode::Signal, FaultMode::Thread] {
            let what = format!("as_swap={as_swap} mode={mode:?}");
            let space = space(as_swap);
            let dev = SoftDevice::private(8 << 20).unwrap();
            let m = dev.mirror(&space).unwrap();
            let a = map_in(&space, N * PAGE, mode);
            let data = pattern(N * PAGE, |i| i ^ 0x7e57);
            space.cpu_write(a, &data).unwrap();
            assert!(entries(a, N).iter().all(|&(p, _)| p), "{what}: written");
            let out = m.migrate_range_to_device(a, N * PAGE).unwrap();
            assert_eq!(out.cpages, N as u64, "{what}");
            assert_eq!(
                entries(a, N),
                vec![(false, as_swap); N],
                "{what}: in device-private memory"
            );
            at("the CPU faults them back");
            let mut b = vec![0u8; N * PAGE];
            space.cpu_read(a, &mut b).unwrap();
            assert_eq!(b, data, "{what}: read back");
            assert!(
                entries(a, N).iter().all(|&(p, s)| p && !s),
                "{what}: present again: {:?}",
                entries(a, N)
            );
            at("device-coherent memory");
            let coh = SoftDevice::coherent(8 << 20).unwrap();
            let mc = coh.mirror(&space).unwrap();
            mc.migrate_range_to_device(a, N * PAGE).unwrap();
            assert_eq!(space.residency(a), Residency::Coherent(coh.owner()));
            assert!(
                entries(a, N).iter().all(|&(p, s)| p && !s),
                "{what}: coherent pages are mapped"
            );
        }
    }
}

/// The program's `MADV_FREE` of marked device-private pages (the kernel keeps the markers,
/// which refuse `UFFDIO_ZEROPAGE` and `UFFDIO_MOVE`): the pages read zeros and take stores, a
/// whole 2 MiB unit (whose first touch moves a zeroed huge page in) and single pages alike, in
/// memory the space made and in adopted memory; a page the program drops with `MADV_DONTNEED`
/// (which removes the markers) likewise.
#[test]
fn marked_pages_the_program_drops_read_zeros_take_stores_and_never_hang() {
    if !kernel_has_uffdio_move() {
        eprintln!(
            "this kernel has no UFFDIO_MOVE: a direct madvise of device pages is not followed"
        );
        return;
    }
    let _w = watchdog("pagemap_marked_pages_dropped", 60);
    let _serial = one_at_a_time();
    let unit = LARGE_PAGE_SIZE;
    let made = space(true);
    let base = made.map_anon(3 * unit, Prot::ReadWrite).unwrap();
    let made_at = VirtAddr(base.get().next_multiple_of(unit));
    let mem = Plain::new(3 * unit, libc::PROT_READ | libc::PROT_WRITE);
    // SAFETY: the test's own mapping, reached only through raw addresses while adopted.
    let adopted = unsafe {
        Space::adopt_with(
            mem.at(0),
            3 * unit,
            AdoptConfig {
                device_private_as_swap: true,
                ..AdoptConfig::default()
            },
        )
    }
    .unwrap();
    let adopted_at = VirtAddr(mem.addr.next_multiple_of(unit));
    for (space, a, what) in [(&made, made_at, "made"), (&adopted, adopted_at, "adopted")] {
        let dev = SoftDevice::private(8 << 20).unwrap();
        let m = dev.mirror(space).unwrap();
        for (advice, name) in [
            (libc::MADV_FREE, "MADV_FREE"),
            (libc::MADV_DONTNEED, "MADV_DONTNEED"),
        ] {
            let what = format!("{what} {name}");
            let data = pattern(unit, |i| i.wrapping_mul(0x9e37_79b9) | 1);
            space.cpu_write(a, &data).unwrap();
            m.migrate_range_to_device(a, unit).unwrap();
            assert!(
                entries(a, 4).iter().all(|&(p, s)| !p && s),
                "{what}: marked"
            );
            // SAFETY: managed memory the test mapped or adopted, where no Rust object lives.
            let r = unsafe { libc::madvise(a.get() as *mut _, unit, advice) };
            assert_eq!(r, 0, "{what}");
            at(format!("{what}: reads after the drop"));
            let mut b = vec![0xffu8; unit];
            space.cpu_read(a, &mut b).unwrap();
            assert!(
                b.iter().all(|&x| x == 0),
                "{what}: the dropped unit reads zeros"
            );
            assert_eq!(dev.used(), 0, "{what}: the device frames are freed");
            at(format!("{what}: stores after the drop"));
            space.cpu_write(a.add(5 * PAGE), &[0xab; 16]).unwrap();
            let mut w = [0u8; 16];
            space.cpu_read(a.add(5 * PAGE), &mut w).unwrap();
            assert_eq!(w, [0xab; 16], "{what}");
            let d = {
                let mut d = vec![0u8; PAGE];
                m.read(a.add(5 * PAGE), PAGE, &mut d).unwrap();
                d
            };
            assert_eq!(&d[..16], &[0xab; 16], "{what}: the device reads the store");
            at(format!("{what}: a single page"));
            m.migrate_range_to_device(a.add(9 * PAGE), PAGE).unwrap();
            // SAFETY: as above.
            let r = unsafe { libc::madvise(a.add(9 * PAGE).get() as *mut _, PAGE, advice) };
            assert_eq!(r, 0);
            let mut one = vec![0xffu8; PAGE];
            space.cpu_read(a.add(9 * PAGE), &mut one).unwrap();
            assert!(one.iter().all(|&x| x == 0), "{what}: a single dropped page");
            space.cpu_write(a.add(9 * PAGE), &[7; 8]).unwrap();
            space.cpu_read(a.add(9 * PAGE), &mut one[..8]).unwrap();
            assert_eq!(&one[..8], &[7; 8], "{what}");
        }
    }
}

/// A fork copies marked device-private pages for the child (it reads the parent's data, as
/// the kernel's fork gives it); afterwards the parent's pages are in device memory again and
/// read as swapped again, with their data.
#[test]
fn a_fork_gives_the_child_marked_pages_and_marks_them_again() {
    let _w = watchdog("pagemap_fork", 60);
    let _serial = one_at_a_time();
    const N: usize = 8;
    let mem = Plain::new(N * PAGE, libc::PROT_READ | libc::PROT_WRITE);
    for p in 0..N {
        mem.store(p * PAGE, 0xf0_0000 | p as u32);
    }
    // SAFETY: the test's own mapping, reached only through raw addresses while adopted.
    let space = unsafe {
        Space::adopt_with(
            mem.at(0),
            N * PAGE,
            AdoptConfig {
                device_private_as_swap: true,
                ..AdoptConfig::default()
            },
        )
    }
    .unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    m.migrate_range_to_device(mem.at(0), N * PAGE).unwrap();
    assert_eq!(entries(mem.at(0), N), vec![(false, true); N]);
    let mem_ref = &mem;
    // SAFETY: the child makes plain volatile loads of the test's own mapping and exits.
    let st = unsafe {
        sys::fork_and_wait(|| {
            for p in 0..N {
                if mem_ref.load(p * PAGE) != 0xf0_0000 | p as u32 {
                    return 10 + p as i32;
                }
            }
            0
        })
    }
    .unwrap();
    assert_eq!(
        st,
        sys::ChildExit::Exited(0),
        "the child reads the parent's data"
    );
    assert_eq!(
        entries(mem.at(0), N),
        vec![(false, true); N],
        "the parent's pages are marked again"
    );
    for p in 0..N {
        assert_eq!(mem.load(p * PAGE), 0xf0_0000 | p as u32, "page {p}");
    }
}

/// What `sys::pagemap_holds_data` makes of entries, as root reads them and as a process
/// without `CAP_SYS_ADMIN` does (the kernel hides the swap type and offset then: a marker reads
/// `PM_SWAP | PM_UFFD_WP` and nothing else), and of a marked page read here, whoever runs this.
#[test]
fn a_marker_holds_no_data_however_pagemap_shows_it() {
    let _w = watchdog("pagemap_marker_no_data", 30);
    let _serial = one_at_a_time();
    let holds = sys::pagemap_holds_data;
    assert!(holds(PM_PRESENT | 0x1234), "present");
    assert!(!holds(0), "nothing there");
    assert!(
        holds(PM_SWAP | (7 << 5) | 1),
        "swapped out, as root reads it"
    );
    assert!(
        holds(PM_SWAP),
        "swapped out, as an unprivileged reader reads it"
    );
    assert!(
        !holds(0x4200_0000_0000_003f),
        "a write-protect marker, as root reads it"
    );
    assert!(!holds(0x4200_0000_0000_0000), "the same, unprivileged");
    assert!(
        !holds(PM_SWAP | (4 << 5) | 0x1f),
        "a guard marker, as root reads it"
    );
    let space = space(true);
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[3; 4 * PAGE]).unwrap();
    m.migrate_range_to_device(a, 4 * PAGE).unwrap();
    let e = pagemap_entry(a);
    assert_ne!(e & PM_SWAP, 0);
    assert!(!holds(e), "a marked page read here ({e:#x}) holds no data");
}
