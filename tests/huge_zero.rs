//! First touch of a whole 2 MiB unit maps one zeroed transparent huge page, moved into place
//! with `UFFDIO_MOVE` (`mm::HugeZero`), instead of 512 copies of a zero page: the unit reads
//! zeros around what was stored, it is a huge page for the kernel (`AnonHugePages`), and
//! everything hetmem does to pages afterwards (migrating one page of it or the whole unit,
//! the program's `madvise`, `fork`) splits it as the kernel would and keeps every byte.

mod common;
use common::*;

use hetmem::*;

/// Whether whole units get huge pages here: 2 MiB transparent huge pages offered, and a kernel
/// with `UFFDIO_MOVE` (6.8 on). Elsewhere fills copy zeros, and only the data is checked.
fn huge_fills() -> bool {
    let thp = hetmem::sys::anon_huge_pages_offered();
    let has_move = kernel_has_uffdio_move();
    if !(thp && has_move) {
        eprintln!("no transparent huge pages or no UFFDIO_MOVE: fills copy zeros");
    }
    thp && has_move
}

/// `AnonHugePages` of the kernel mapping (VMA) holding `a`, in bytes.
fn anon_huge_bytes(a: VirtAddr) -> usize {
    smaps_bytes(a.get(), "AnonHugePages:")
}

/// One store per page, in order (faults in sequence: fault-around grows to whole units).
fn touch_in_order(probe: &hetmem::space::Probe, a: VirtAddr, len: usize) {
    for p in 0..len / PAGE {
        probe.store_u32(a.add(p * PAGE + 8), p as u32 + 1).unwrap();
    }
}

#[test]
fn a_sequential_first_touch_fills_whole_units_with_zeroed_huge_pages() {
    let huge = huge_fills();
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let _w = watchdog("huge zero fill", 60);
        let space = small_space();
        let len = 8 << 20;
        let opts = MapOptions {
            mode,
            ..MapOptions::default()
        };
        let a = space.map_anon_with(len, opts).unwrap();
        let probe = space.probe(a, len).unwrap();
        touch_in_order(&probe, a, len);
        // Every page: what was stored, zeros around it.
        let mut got = vec![0u8; len];
        space.cpu_read(a, &mut got).unwrap();
        let mut want = vec![0u8; len];
        for p in 0..len / PAGE {
            want[p * PAGE + 8..p * PAGE + 12].copy_from_slice(&(p as u32 + 1).to_ne_bytes());
        }
        assert!(
            got == want,
            "{mode:?}: a page read other than its store and zeros"
        );
        let st = space.stats();
        assert_eq!(st.zero_fill_pages, (len / PAGE) as u64, "{mode:?}");
        if huge {
            // 8 MiB in order: the first unit fills in growing runs (the fourth fault in
            // sequence hints the mapping for huge pages); the units after it are huge pages
            // (three when the mapping starts on a 2 MiB boundary, at least two otherwise).
            assert!(
                st.huge_zero_units >= 2,
                "{mode:?}: {} whole units filled with huge pages",
                st.huge_zero_units
            );
            assert!(
                anon_huge_bytes(a) >= st.huge_zero_units as usize * (2 << 20),
                "{mode:?}: the kernel holds {} bytes of huge pages for {} units",
                anon_huge_bytes(a),
                st.huge_zero_units
            );
        }
    }
}

#[test]
fn a_large_mapping_fills_the_unit_of_a_random_first_touch_with_a_huge_page() {
    let huge = huge_fills();
    let _w = watchdog("huge zero fill, large mapping", 60);
    let space = small_space();
    let len = 8 << 20;
    let opts = MapOptions {
        large: true,
        ..MapOptions::default()
    };
    let a = space.map_anon_with(len, opts).unwrap();
    let probe = space.probe(a, len).unwrap();
    // One store in the middle of units 2 and 0 (a large mapping is 2 MiB aligned).
    probe.store_u32(a.add((5 << 20) + 123 * 4), 7).unwrap();
    probe.store_u32(a.add((1 << 20) + 40), 9).unwrap();
    assert_eq!(space.residency(a.add(3 << 20)), Residency::Untouched);
    let st = space.stats();
    assert_eq!(st.zero_fill_pages, 2 * 512);
    if huge {
        assert_eq!(st.huge_zero_units, 2);
    }
    let mut got = vec![0u8; len];
    space.cpu_read(a, &mut got).unwrap();
    let mut want = vec![0u8; len];
    want[(5 << 20) + 492..(5 << 20) + 496].copy_from_slice(&7u32.to_ne_bytes());
    want[(1 << 20) + 40..(1 << 20) + 44].copy_from_slice(&9u32.to_ne_bytes());
    assert!(got == want);
}

/// Huge pages of first touches are split by what comes after, as the kernel splits its own:
/// one page of a unit migrated to a device and written there, a whole unit migrated and faulted
/// back, one page dropped by the program, a fork — and every byte stays what it should be.
#[test]
fn huge_units_split_by_migrations_a_drop_and_a_fork_keep_every_byte() {
    let huge = huge_fills();
    let _w = watchdog("huge units split", 60);
    let space = small_space();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let len = 8 << 20;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let probe = space.probe(a, len).unwrap();
    touch_in_order(&probe, a, len);
    if huge {
        assert!(space.stats().huge_zero_units >= 2);
    }
    let mut want = pattern(len, |i| i.wrapping_mul(2654435761));
    space.cpu_write(a, &want).unwrap();
    // A unit boundary inside the mapping, with whole units on both sides.
    let unit = |k: usize| {
        let first = (a.get() + (2 << 20) - 1) & !((2 << 20) - 1);
        a.add(first - a.get() + k * (2 << 20))
    };
    let off = |v: VirtAddr| v.get() - a.get();

    // One page in the middle of a huge unit goes to the device and is written there.
    let p = unit(0).add(17 * PAGE);
    m.migrate_range_to_device(p, PAGE).unwrap();
    assert_eq!(space.residency(p), Residency::Device(dev.owner()));
    let dev_bytes = vec![0xabu8; PAGE];
    m.write(p, PAGE, &dev_bytes).unwrap();
    want[off(p)..off(p) + PAGE].copy_from_slice(&dev_bytes);

    // A whole unit goes to the device and comes back by CPU faults.
    m.migrate_range_to_device(unit(1), 2 << 20).unwrap();
    assert_eq!(space.residency(unit(1)), Residency::Device(dev.owner()));
    for k in (0..512).step_by(7) {
        let w = unit(1).add(k * PAGE + 4);
        let o = off(w);
        let v = u32::from_ne_bytes(want[o..o + 4].try_into().unwrap());
        assert_eq!(probe.load_u32(w).unwrap(), v);
    }

    // The program drops one page of the last whole unit (followed where the kernel can).
    let dropped = unit(2).add(300 * PAGE);
    // SAFETY: managed memory the test mapped, where no Rust object lives.
    unsafe { hetmem::sys::madvise_dontneed(dropped.get(), PAGE) }.unwrap();
    want[off(dropped)..off(dropped) + PAGE].fill(0);

    let mut got = vec![0u8; len];
    space.cpu_read(a, &mut got).unwrap();
    assert!(
        got == want,
        "a byte changed after the huge units were split"
    );

    // A child sees the same bytes (and the page still in device memory).
    let words: Vec<u32> = ints(&want);
    // SAFETY: the child only loads through the probe (bounds checks and volatile loads of its
    // own copy: no allocation, no lock) and exits.
    let st = unsafe {
        sys::fork_and_wait(|| {
            for (i, w) in words.iter().enumerate() {
                if probe.load_u32(a.add(i * 4)).ok() != Some(*w) {
                    return 2;
                }
            }
            0
        })
    }
    .unwrap();
    assert_eq!(st, sys::ChildExit::Exited(0), "the child read other bytes");
    space.cpu_read(a, &mut got).unwrap();
    assert!(got == want, "a byte changed in the parent after the fork");
}

/// Sparse first touches (one store in each 2 MiB unit, out of order) never come in sequence:
/// the mapping is never hinted for huge pages (where a store to a unit with no page would make
/// the kernel zero a huge page it throws away) and each touch fills its 64 KiB run only.
#[test]
fn sparse_first_touches_fill_small_runs_and_no_huge_page() {
    let _w = watchdog("sparse first touches", 60);
    let space = small_space();
    let len = 32 << 20;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let probe = space.probe(a, len).unwrap();
    let units = len / (2 << 20);
    for k in 0..units {
        let u = (k * 7) % units; // every unit once, out of order
        probe
            .store_u32(a.add(u * (2 << 20) + 4096 * 3), u as u32 + 1)
            .unwrap();
    }
    let st = space.stats();
    assert_eq!(st.huge_zero_units, 0);
    assert!(
        st.zero_fill_pages <= (units * 16) as u64,
        "{} pages filled for {units} sparse stores",
        st.zero_fill_pages
    );
    assert_eq!(anon_huge_bytes(a), 0);
    for u in 0..units {
        let w = a.add(u * (2 << 20) + 4096 * 3);
        assert_eq!(probe.load_u32(w).unwrap(), u as u32 + 1);
    }
}
