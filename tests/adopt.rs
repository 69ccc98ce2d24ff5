//! Plain process memory under hetmem ([`Space::adopt`]): memory the program mapped itself with
//! `mmap`, accessed with plain loads and stores, mirrored and migrated by a device exactly like
//! memory hetmem created, and given back intact. Every test holds a watchdog.

mod common;
use common::*;

use hetmem::*;
use std::sync::atomic::{AtomicUsize, Ordering};

mod plain;
use plain::{Plain, adopt_plain};

const LEN: usize = 4 << 20;
const PAGES: usize = LEN / PAGE;

fn word(p: usize) -> u32 {
    0xad00_0000 | p as u32
}

/// Pages written before adoption keep their data, pages never touched read zeros; the device
/// migrates all of them, reads the data, writes some; the CPU's plain loads fault them back and
/// see the device's writes; after the space is dropped every byte is where the program left it
/// and the memory is plain again (it can be adopted again).
#[test]
fn adopted_memory_migrates_and_comes_back_intact() {
    let _w = watchdog("adopted_memory_migrates", 60);
    let mem = Plain::new(LEN, libc::PROT_READ | libc::PROT_WRITE);
    // Every other page written by the program before adoption; the rest never touched.
    for p in (0..PAGES).step_by(2) {
        mem.store(p * PAGE, word(p));
    }
    let space = adopt_plain(mem.at(0), LEN).unwrap();
    assert!(space.is_adopted());
    let dev = SoftDevice::private(2 * LEN).unwrap();
    let m = dev.mirror(&space).unwrap();
    let out = m.migrate_range_to_device(mem.at(0), LEN).unwrap();
    assert_eq!(out.cpages, PAGES as u64);
    let mut snap = vec![0u8; PAGES];
    m.snapshot(mem.at(0), LEN, &mut snap).unwrap();
    assert!(
        snap.iter().all(|f| f & 0xF0 == snap::DEV_PRIVATE_LOCAL),
        "every page in device memory"
    );
    let mut buf = vec![0u8; LEN];
    m.read(mem.at(0), LEN, &mut buf).unwrap();
    for p in 0..PAGES {
        let w = u32::from_ne_bytes(buf[p * PAGE..p * PAGE + 4].try_into().unwrap());
        assert_eq!(
            w,
            if p % 2 == 0 { word(p) } else { 0 },
            "device read of page {p}"
        );
    }
    // The device writes page 1 (a hole before) and page 2.
    let mut page = vec![0u8; PAGE];
    page[..4].copy_from_slice(&0x5eed_0001u32.to_ne_bytes());
    m.write(mem.at(PAGE), PAGE, &page).unwrap();
    page[..4].copy_from_slice(&0x5eed_0002u32.to_ne_bytes());
    m.write(mem.at(2 * PAGE), PAGE, &page).unwrap();
    // Plain loads fault the pages back.
    assert_eq!(mem.load(PAGE), 0x5eed_0001);
    assert_eq!(mem.load(2 * PAGE), 0x5eed_0002);
    assert_eq!(mem.load(4 * PAGE), word(4));
    assert_eq!(mem.load(3 * PAGE), 0);
    assert!(space.stats().cpu_faults >= 4);
    // Unmapping adopted memory through hetmem is refused: it is the program's.
    assert!(matches!(
        space.unmap(mem.at(0), LEN),
        Err(Error::Invalid(_))
    ));
    drop(m);
    drop(space);
    for p in 0..PAGES {
        let want = match p {
            1 => 0x5eed_0001,
            2 => 0x5eed_0002,
            _ if p % 2 == 0 => word(p),
            _ => 0,
        };
        assert_eq!(mem.load(p * PAGE), want, "page {p} after giving back");
    }
    // Plain again: the program's stores work without hetmem, and it can be adopted again.
    mem.store(3 * PAGE, 33);
    assert_eq!(mem.load(3 * PAGE), 33);
    let again = adopt_plain(mem.at(0), LEN).unwrap();
    drop(again);
}

/// Threads of the program increment words of adopted memory with plain loads and stores while
/// the device migrates the range to device memory and back, over and over: every count is
/// exact at the end.
#[test]
fn plain_stores_race_migrations_of_adopted_memory() {
    let _w = watchdog("plain_stores_race_migrations", 60);
    const N: usize = 16;
    const THREADS: usize = 2;
    // Each thread runs at least MIN_ROUNDS, and on until the device has made MIN_MIGRATIONS
    // round trips (so that the two overlap), up to MAX_ROUNDS.
    const MIN_ROUNDS: u32 = 100;
    const MIN_MIGRATIONS: usize = 100;
    const MAX_ROUNDS: u32 = 50_000;
    let mem = Plain::new(N * PAGE, libc::PROT_READ | libc::PROT_WRITE);
    let space = adopt_plain(mem.at(0), N * PAGE).unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let done = AtomicUsize::new(0);
    let migrations = AtomicUsize::new(0);
    let rounds: Vec<u32> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (mem, done, migrations) = (&mem, &done, &migrations);
                s.spawn(move || {
                    let mut r = 0;
                    // At least one migration must have raced the stores (the watchdog bounds
                    // the wait): on a busy 2-core machine the workers could otherwise reach
                    // MAX_ROUNDS before the migrating thread ran once.
                    while r < MIN_ROUNDS || {
                        let done = migrations.load(Ordering::Relaxed);
                        done == 0 || (done < MIN_MIGRATIONS && r < MAX_ROUNDS)
                    } {
                        for p in 0..N {
                            let off = p * PAGE + t * 4;
                            mem.store(off, mem.load(off) + 1);
                        }
                        r += 1;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    r
                })
            })
            .collect();
        s.spawn(|| {
            while done.load(Ordering::Relaxed) < THREADS {
                let _ = m.migrate_range_to_device(mem.at(0), N * PAGE);
                m.migrate_to_system(mem.at(0), N * PAGE).unwrap();
                migrations.fetch_add(1, Ordering::Relaxed);
            }
        });
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for p in 0..N {
        for (t, r) in rounds.iter().enumerate() {
            assert_eq!(mem.load(p * PAGE + t * 4), *r, "page {p}, thread {t}");
        }
    }
    assert!(migrations.load(Ordering::Relaxed) >= 1);
}

/// Ranges that cannot be adopted are refused with the cause: malformed ranges, memory that is
/// not mapped, not readable, not anonymous private (the stack, a file), or already managed by
/// hetmem (adopted twice, or hetmem's own mapping).
#[test]
fn adopting_what_cannot_be_adopted_is_refused() {
    let _w = watchdog("adopting_refused", 30);
    let mem = Plain::new(LEN, libc::PROT_READ | libc::PROT_WRITE);
    assert!(matches!(
        adopt_plain(mem.at(1), PAGE),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(adopt_plain(mem.at(0), 0), Err(Error::ZeroLength)));
    assert!(matches!(
        adopt_plain(mem.at(0), 100),
        Err(Error::UnalignedLength { .. })
    ));
    let errno = |r: Result<Space>| r.err().map(|e| e.errno());
    // Not mapped (below mmap_min_addr nothing ever is).
    assert_eq!(errno(adopt_plain(VirtAddr(PAGE), PAGE)), Some(libc::ENOMEM));
    // Not readable.
    let none = Plain::new(LEN, libc::PROT_NONE);
    assert_eq!(errno(adopt_plain(none.at(0), LEN)), Some(libc::EACCES));
    // The calling thread's stack.
    let local = [0u8; 3 * 4096];
    let sp = (local.as_ptr() as usize).next_multiple_of(PAGE);
    assert_eq!(errno(adopt_plain(VirtAddr(sp), PAGE)), Some(libc::EINVAL));
    // Adopted already: the second registration is refused, the first keeps working.
    let first = adopt_plain(mem.at(0), LEN).unwrap();
    assert_eq!(errno(adopt_plain(mem.at(0), LEN)), Some(libc::EBUSY));
    assert_eq!(errno(adopt_plain(mem.at(PAGE), PAGE)), Some(libc::EBUSY));
    first.store_u32(mem.at(0), 5).unwrap();
    drop(first);
    assert_eq!(mem.load(0), 5);
    // hetmem's own mapping.
    let space = Space::new().unwrap();
    let a = space.map_anon(LEN, Prot::ReadWrite).unwrap();
    assert_eq!(errno(adopt_plain(a, LEN)), Some(libc::EBUSY));
}

/// A device command whose buffer is memory hetmem manages (here: adopted memory, part of it in
/// device memory) is refused with EINVAL. It used to abort the process: the device copies into
/// the buffer under hetmem's locks, where a page of it in device memory cannot be faulted back
/// (found from outside, by the preloaded test device when a program's `malloc`ed buffer sat in a
/// mapping it had adopted).
#[test]
fn a_device_buffer_in_managed_memory_is_refused_not_an_abort() {
    let _w = watchdog("device_buffer_in_managed_memory", 30);
    let data = Plain::new(LEN, libc::PROT_READ | libc::PROT_WRITE);
    let space = adopt_plain(data.at(0), LEN).unwrap();
    let dev = SoftDevice::private(2 * LEN).unwrap();
    let m = dev.mirror(&space).unwrap();
    // The buffer: a Vec adopted by another space, its pages in device memory.
    let mut buf = vec![1u8; 2 * LEN];
    let start = (buf.as_ptr() as usize).next_multiple_of(PAGE);
    let other = adopt_plain(VirtAddr(start), LEN).unwrap();
    let m2 = dev.mirror(&other).unwrap();
    m2.migrate_range_to_device(VirtAddr(start), LEN).unwrap();
    let off = start - buf.as_ptr() as usize;
    let window = &mut buf[off..off + LEN];
    for r in [
        m.read(data.at(0), LEN, window).map(|_| ()),
        m.migrate_to_device(data.at(0), LEN, window).map(|_| ()),
        m.exclusive(data.at(0), LEN, window).map(|_| ()),
        m.snapshot(data.at(0), LEN, window).map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    }
    drop(m2);
    drop(other);
    // Given back: the buffer's bytes are where they were.
    assert!(buf[off..off + LEN].iter().all(|&b| b == 1));
}

/// The program unmaps part of its adopted memory directly (munmap: userfaultfd's UNMAP event,
/// which adopted memory asks for): devices drop their mappings of it and the device memory its
/// pages held is freed; memory the program maps there afterwards is its own (the device does
/// not read stale data from it: the range left the space); the rest stays adopted and works.
/// Mappings cannot be made in an adopted space.
#[test]
fn a_direct_munmap_of_adopted_memory_is_followed() {
    let _w = watchdog("munmap_adopted", 30);
    let mem = Plain::new(LEN, libc::PROT_READ | libc::PROT_WRITE);
    for p in 0..PAGES {
        mem.store(p * PAGE, word(p));
    }
    let space = adopt_plain(mem.at(0), LEN).unwrap();
    let dev = SoftDevice::private(2 * LEN).unwrap();
    let m = dev.mirror(&space).unwrap();
    m.migrate_range_to_device(mem.at(0), LEN).unwrap();
    assert_eq!(dev.used(), LEN);
    let half = LEN / 2;
    // SAFETY: the second half of the test's own mapping; nothing refers to it any more.
    assert_eq!(
        unsafe { libc::munmap((mem.addr + half) as *mut _, half) },
        0
    );
    // hetmem's event reader follows the munmap: wait for that (the watchdog bounds the wait).
    at("waiting for the munmap to be followed");
    while space.stats().foreign_unmaps == 0 {
        std::thread::yield_now();
    }
    let mut buf = vec![0u8; half];
    assert!(
        m.read(mem.at(half), half, &mut buf).is_err(),
        "the device reads an unmapped range"
    );
    assert_eq!(
        dev.used(),
        half,
        "the unmapped half's device frames are free"
    );
    assert!(matches!(
        space.map_anon(PAGE, Prot::ReadWrite),
        Err(Error::Invalid(_))
    ));
    // The first half is still adopted: in device memory, and the program's loads fault it back.
    m.read(mem.at(0), half, &mut buf).unwrap();
    for p in 0..PAGES / 2 {
        assert_eq!(mem.load(p * PAGE), word(p));
    }
    // A buffer of the program's own in the unmapped half (where its allocator may put the
    // next large block) is the program's memory, not hetmem's: fine for a device command.
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped (else EEXIST, then the
    // check is skipped): nothing of anyone's is replaced.
    let own = unsafe {
        libc::mmap(
            (mem.addr + half) as *mut _,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if own as usize == mem.addr + half {
        // SAFETY: the page just mapped, the test's own; no Rust object lives there otherwise.
        let b = unsafe { std::slice::from_raw_parts_mut(own as *mut u8, PAGE) };
        m.read(mem.at(0), PAGE, b).unwrap();
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()), word(0));
        // SAFETY: that page, unmapped again; `b` is not used after this.
        unsafe { libc::munmap(own, PAGE) };
    }
    drop(m);
    drop(space);
    assert_eq!(mem.load(0), word(0));
}

/// Review findings, each once a crash or lost bytes: threads of the program first-touch pages
/// while the memory is adopted (every value lands and the device reads it: a page touched
/// between the scan and the registration is a system page, not a hole); the handles of an
/// adopted space dropped from two threads at once give the memory back exactly once (no device
/// page is lost); memory another space still covers cannot be adopted again (EBUSY, not a
/// shadowed registry entry whose faults nobody serves).
#[test]
fn adoption_races_touches_drops_and_re_adoption() {
    let _w = watchdog("adoption_races", 60);
    const N: usize = 1024;
    for round in 0..8 {
        at(format!("round {round}: touches during adoption"));
        let mem = Plain::new(N * PAGE, libc::PROT_READ | libc::PROT_WRITE);
        let start = std::sync::Barrier::new(3);
        let space = std::thread::scope(|s| {
            for t in 0..2 {
                let (mem, start) = (&mem, &start);
                s.spawn(move || {
                    start.wait();
                    for p in (t..N).step_by(2) {
                        mem.store(p * PAGE, word(p));
                    }
                });
            }
            start.wait();
            adopt_plain(mem.at(0), N * PAGE).unwrap()
        });
        let dev = SoftDevice::private(2 * N * PAGE).unwrap();
        let m = dev.mirror(&space).unwrap();
        m.migrate_range_to_device(mem.at(0), N * PAGE).unwrap();
        let mut buf = vec![0u8; N * PAGE];
        m.read(mem.at(0), N * PAGE, &mut buf).unwrap();
        for p in 0..N {
            let w = u32::from_ne_bytes(buf[p * PAGE..p * PAGE + 4].try_into().unwrap());
            assert_eq!(w, word(p), "round {round}: page {p} on the device");
        }
        // Two handles dropped at once: the memory comes back exactly once, whole.
        at(format!("round {round}: concurrent drops"));
        let other = space.clone();
        let both = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            let both = &both;
            s.spawn(move || {
                both.wait();
                drop(other);
            });
            both.wait();
            drop(m);
            drop(space);
        });
        for p in 0..N {
            assert_eq!(
                mem.load(p * PAGE),
                word(p),
                "round {round}: page {p} given back"
            );
        }
    }
    // Re-adoption while another space still covers the range.
    let mem = Plain::new(LEN, libc::PROT_READ | libc::PROT_WRITE);
    let space = adopt_plain(mem.at(0), LEN).unwrap();
    let errno = |r: Result<Space>| r.err().map(|e| e.errno());
    assert_eq!(errno(adopt_plain(mem.at(PAGE), PAGE)), Some(libc::EBUSY));
    drop(space);
    let again = adopt_plain(mem.at(PAGE), PAGE).unwrap();
    drop(again);
}

/// Every page of an adopted range can be held exclusively at once, as the kernel allows (the
/// stash of an adopted space was 2 MiB: the 513th page was refused with ENOMEM; found by the
/// kernel's own hmm-tests, `exclusive`, under the drop-in test device).
#[test]
fn every_page_of_adopted_memory_can_be_held_exclusively() {
    let _w = watchdog("adopt_exclusive", 30);
    const N: usize = 1024;
    let mem = Plain::new(N * PAGE, libc::PROT_READ | libc::PROT_WRITE);
    for p in 0..N {
        mem.store(p * PAGE, word(p));
    }
    let space = adopt_plain(mem.at(0), N * PAGE).unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let mut buf = vec![0u8; N * PAGE];
    let out = m.exclusive(mem.at(0), N * PAGE, &mut buf).unwrap();
    assert_eq!(out.cpages, N as u64);
    // The program's loads revoke it, page by page, with the data intact.
    for p in 0..N {
        assert_eq!(mem.load(p * PAGE), word(p));
    }
}

/// Memory the program protected in parts (read-only, read-write) is adopted as one mapping per
/// part, each with its protection: devices read all of it and migrate it (read-only pages
/// too, as the kernel's device does), a device write to the read-only part is refused, and
/// the program's loads see its data throughout.
#[test]
fn memory_protected_in_parts_is_adopted_with_each_parts_protection() {
    let _w = watchdog("adopt_mixed_protection", 30);
    const N: usize = 8;
    let mem = Plain::new(N * PAGE, libc::PROT_READ | libc::PROT_WRITE);
    for p in 0..N {
        mem.store(p * PAGE, p as u32 + 100);
    }
    // SAFETY: the test's own mapping (pages 0..4 become read-only).
    let r = unsafe { libc::mprotect(mem.addr as *mut _, 4 * PAGE, libc::PROT_READ) };
    assert_eq!(r, 0);
    let space = adopt_plain(mem.at(0), N * PAGE).unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let mut buf = vec![0u8; N * PAGE];
    m.read(mem.at(0), N * PAGE, &mut buf).unwrap();
    for p in 0..N {
        assert_eq!(ints(&buf[p * PAGE..p * PAGE + 4])[0], p as u32 + 100);
    }
    assert_eq!(
        m.migrate_range_to_device(mem.at(0), N * PAGE)
            .unwrap()
            .cpages,
        N as u64
    );
    assert!(matches!(
        m.write(mem.at(0), PAGE, &vec![1u8; PAGE]),
        Err(Error::NoWrite { .. })
    ));
    m.write(mem.at(4 * PAGE), PAGE, &vec![7u8; PAGE]).unwrap();
    for p in 0..N {
        let want = if p == 4 { 0x0707_0707 } else { p as u32 + 100 };
        assert_eq!(mem.load(p * PAGE), want, "page {p}");
    }
    drop(m);
    drop(space);
    // Given back: the program's protections are its own again.
    mem.store(5 * PAGE, 9);
    assert_eq!(mem.load(5 * PAGE), 9);
}

/// Memory the program backed with a transparent huge page before adoption (`MADV_HUGEPAGE`):
/// adopted as a large page, so that a migration moves the whole unit and the device maps it as
/// one (snapshot PMD, as the kernel's device reports a THP it migrated whole), and every byte
/// comes back. Skipped where the kernel gives no huge page.
#[test]
fn a_huge_page_made_before_adoption_migrates_whole() {
    let _w = watchdog("adopted_thp", 60);
    let mem = Plain::new(3 * LARGE_PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
    let unit = mem.addr.next_multiple_of(LARGE_PAGE_SIZE) - mem.addr;
    // SAFETY: advice on the test's own mapping (no Rust object lives there).
    let r = unsafe {
        libc::madvise(
            mem.at(0).get() as *mut _,
            3 * LARGE_PAGE_SIZE,
            libc::MADV_HUGEPAGE,
        )
    };
    assert_eq!(r, 0);
    for p in 0..LARGE_PAGE_SIZE / PAGE {
        mem.store(unit + p * PAGE, word(p));
    }
    if smaps_bytes(mem.addr + unit, "AnonHugePages:") < LARGE_PAGE_SIZE {
        eprintln!("the kernel gave no transparent huge page here: skipped");
        return;
    }
    let space = adopt_plain(mem.at(0), 3 * LARGE_PAGE_SIZE).unwrap();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let out = m
        .migrate_range_to_device(mem.at(unit), LARGE_PAGE_SIZE)
        .unwrap();
    assert_eq!(out.cpages, (LARGE_PAGE_SIZE / PAGE) as u64);
    let mut snap = vec![0u8; LARGE_PAGE_SIZE / PAGE];
    m.snapshot(mem.at(unit), LARGE_PAGE_SIZE, &mut snap)
        .unwrap();
    assert!(
        snap.iter()
            .all(|&f| f & 0xF0 == snap::DEV_PRIVATE_LOCAL && f & snap::PMD != 0),
        "the unit is in device memory as one large page: {:#x?}",
        &snap[..4]
    );
    at("plain loads fault the unit back");
    for p in 0..LARGE_PAGE_SIZE / PAGE {
        assert_eq!(mem.load(unit + p * PAGE), word(p), "page {p}");
    }
}
