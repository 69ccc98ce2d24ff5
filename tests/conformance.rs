//! The kernel's HMM selftests (`tools/testing/selftests/mm/hmm-tests.c`), anonymous-memory
//! cases, as hetmem tests against the built-in software device (hetmem's "dmirror").
//!
//! Each case is one function `fn case(kind: MemoryKind)` with the catalogue's setup, operations
//! and expected values and errors (numbers refer to `conformance/hmm-tests.md`). The
//! [`hmm_variant!`] macro turns the list of cases into `#[test]`s for one memory kind, so that
//! the same bodies run against a device-coherent device once hetmem has one (add
//! `mod coherent { hmm_variant!(MemoryKind::Coherent); }`).
//!
//! Translation of the kernel's vocabulary:
//! - `open("/dev/hmm_dmirror0")` is [`SoftDevice::new`] + [`SoftDevice::mirror`] (fixture [`hmm`]);
//! - `hmm_dmirror_cmd(fd, HMM_DMIRROR_X, buffer, npages)` is [`hmm_dmirror_cmd`], built on
//!   [`DeviceMirror::cmd`], which has the ioctl's convention (0 or `-errno`; `cpages`/`faults`
//!   copied out only on success);
//! - `mmap`/`mprotect`/`munmap` are [`Space::map_anon`]/[`Space::protect`]/[`Space::unmap`];
//!   `MADV_HUGEPAGE` is [`Space::advise_large`] (or `MapOptions { large: true }`);
//! - `ptr[i]` is a CPU access through [`Space::cpu_read`]/[`Space::cpu_write`] (real loads and
//!   stores that fault into hetmem), or through a [`Space::probe`] where the kernel test does
//!   `ptr[i]++` one int at a time, or touches memory in a forked child;
//! - `get_user_pages` is [`Space::pin`].
//!
//! Shared anonymous memory (`Space::map_shared_anon`) is here: 7 anon_write_child_shared and
//! 16 migrate_shared (where hetmem goes beyond the kernel: its pages move to device memory).
//! Not here: the file-backed cases (10 file_read, 11 file_write, 13 migrate_file_private) are in
//! `tests/file_map.rs`; 21 mixedmap needs a device-inserted mapping, which hetmem does not
//! offer.

mod common;

use common::{NPAGES, PAGE, PM_PRESENT, PM_SWAP, PMD, intercepting, ints, pagemap_entry, pattern};
use hetmem::device::{FLAG_FAIL_ALLOC, snap};
use hetmem::sys::{self, ChildExit};
use hetmem::{
    Cmd, DeviceConfig, DeviceMirror, DmirrorCmd, MapOptions, MemoryKind, Prot, Residency,
    SoftDevice, Space, SpaceConfig, VirtAddr,
};

/// Device memory of the fixture's device (dmirror allocates 256 MiB chunks).
const DEV_CAPACITY: usize = 256 << 20;
/// `NTIMES` of the selftests.
const NTIMES: u32 = 10;

// ---------------------------------------------------------------------------------------------
// Fixture and helpers (the selftest's `hmm` fixture, `struct hmm_buffer`, `hmm_dmirror_cmd`)
// ---------------------------------------------------------------------------------------------

/// Held exclusively across each fork of these tests ([`fork_and_wait`]) and shared by a
/// `/proc/self/pagemap` check: a fork copies every space's device-private pages into the CPU's
/// view until it is done (space module `fork`), which a concurrent check would see. (The
/// kernel's harness forks per case; these cases share one process.)
static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// [`sys::fork_and_wait`], alone ([`FORKS`]).
///
/// # Safety
///
/// As for [`sys::fork_and_wait`].
unsafe fn fork_and_wait(f: impl FnOnce() -> i32) -> std::io::Result<ChildExit> {
    let _alone = FORKS.write().unwrap_or_else(|p| p.into_inner());
    // SAFETY: the caller's obligations are those of `sys::fork_and_wait`.
    unsafe { sys::fork_and_wait(f) }
}

/// Fixture `hmm`: one device (dev0 of the kind) bound to a fresh address space, whose
/// device-private pages read as swapped in `/proc/self/pagemap`, as the kernel's
/// (`SpaceConfig::device_private_as_swap`).
struct Hmm {
    m: DeviceMirror,
    dev: SoftDevice,
    space: Space,
}

fn hmm(kind: MemoryKind) -> Hmm {
    let space = Space::with_config(SpaceConfig {
        device_private_as_swap: true,
        ..SpaceConfig::default()
    })
    .unwrap();
    let dev = SoftDevice::new(DeviceConfig {
        kind,
        capacity: DEV_CAPACITY,
    })
    .unwrap();
    let m = dev.mirror(&space).unwrap();
    Hmm { m, dev, space }
}

/// `struct hmm_buffer`: the CPU range (`ptr`) and the device-side buffer (`mirror`).
struct HmmBuffer {
    ptr: VirtAddr,
    mirror: Vec<u8>,
    cpages: u64,
    faults: u64,
}

impl HmmBuffer {
    /// A buffer over `ptr` whose mirror holds `mirror_len` bytes, all `fill`.
    fn new(ptr: VirtAddr, mirror_len: usize, fill: u8) -> HmmBuffer {
        HmmBuffer {
            ptr,
            mirror: vec![fill; mirror_len],
            cpages: 0,
            faults: 0,
        }
    }
}

/// The selftest's `hmm_dmirror_cmd`: runs `cmd` on `npages` at `buffer.ptr` with
/// `buffer.mirror` as the user buffer; returns 0 or `-errno`, and copies `cpages`/`faults` into
/// the buffer only on success.
fn hmm_dmirror_cmd(m: &DeviceMirror, cmd: Cmd, buffer: &mut HmmBuffer, npages: usize) -> i32 {
    let mut c = DmirrorCmd {
        addr: buffer.ptr.get() as u64,
        buf: &mut buffer.mirror,
        npages: npages as u64,
        cpages: 0,
        faults: 0,
    };
    let ret = m.cmd(cmd, &mut c);
    if ret == 0 {
        let (cpages, faults) = (c.cpages, c.faults);
        buffer.cpages = cpages;
        buffer.faults = faults;
    }
    ret
}

/// `ALIGN(p, PMD)`.
fn align_pmd(a: VirtAddr) -> VirtAddr {
    VirtAddr(a.get().next_multiple_of(PMD))
}

/// `for (i...) ptr[i] = f(i)` over `len` bytes at `a`.
fn cpu_init(space: &Space, a: VirtAddr, len: usize, f: impl Fn(u32) -> u32) {
    space.cpu_write(a, &pattern(len, f)).unwrap();
}

/// CPU read of `len` bytes at `a`.
fn cpu_get(space: &Space, a: VirtAddr, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    space.cpu_read(a, &mut b).unwrap();
    b
}

/// Asserts `b` holds `f(i)` as its `i`-th int (reports the first mismatch, not 1M ints).
#[track_caller]
fn assert_ints(what: &str, b: &[u8], f: impl Fn(u32) -> u32) {
    for (i, v) in ints(b).into_iter().enumerate() {
        let want = f(i as u32);
        assert_eq!(v, want, "{what}: int {i} is {v:#x}, expected {want:#x}");
    }
}

/// Asserts every byte of `b` is `want`.
#[track_caller]
fn assert_bytes(what: &str, b: &[u8], want: u8) {
    if let Some(i) = b.iter().position(|&x| x != want) {
        panic!("{what}: byte {i} is {:#04x}, expected {want:#04x}", b[i]);
    }
}

/// `ptr[i]++` for every int at `a..a+len`, one real CPU load and store at a time; asserts each
/// load returned `f(i)`.
fn cpu_increment_each(space: &Space, a: VirtAddr, len: usize, f: impl Fn(u32) -> u32) {
    let probe = space.probe(a, len).unwrap();
    for i in 0..(len / 4) as u32 {
        let p = a.add(i as usize * 4);
        let v = probe.load_u32(p).unwrap();
        assert_eq!(v, f(i), "ptr[{i}] before the increment");
        probe.store_u32(p, v + 1).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The variants
// ---------------------------------------------------------------------------------------------

/// One `#[test]` per case for the memory kind `$kind`, each under a 30 s watchdog.
macro_rules! hmm_variant {
    ($kind:expr) => {
        hmm_variant!(@cases $kind;
            open_close,
            anon_read,
            anon_read_prot,
            anon_write,
            anon_write_prot,
            anon_write_child,
            anon_write_child_shared,
            anon_write_huge,
            anon_write_hugetlbfs,
            migrate,
            migrate_fault,
            migrate_release,
            migrate_shared,
            migrate_multiple,
            migrate_multiple_to_sys,
            anon_read_multiple,
            compound,
            exclusive,
            exclusive_mprotect,
            exclusive_cow,
            hmm_gup_test,
            hmm_cow_in_device,
            migrate_anon_huge_empty,
            migrate_anon_huge_zero,
            migrate_anon_huge_free,
            migrate_anon_huge_fault,
            migrate_partial_unmap_fault,
            migrate_anon_huge_zero_err,
            benchmark_thp_migration,
            einval_unaligned_addr,
            einval_zero_npages,
            einval_overflow,
            device_too_small,
            device_too_small_huge,
        );
    };
    (@cases $kind:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let _w = crate::common::watchdog(stringify!($case), 30);
                crate::$case($kind)
            }
        )*
    };
}

/// The device-private variant (`hmm_device_private`: /dev/hmm_dmirror0).
mod private {
    use hetmem::MemoryKind;
    hmm_variant!(MemoryKind::Private);
}

/// The device-coherent variant (`hmm_device_coherent`: /dev/hmm_dmirror2).
mod coherent {
    use hetmem::MemoryKind;
    hmm_variant!(MemoryKind::Coherent);
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// 1 open_close. Kernel: opening `/dev/hmm_dmirror0` gives an fd >= 0 and closing it returns 0.
/// hetmem: creating a device of the kind and binding it to an address space succeed (twice: two
/// opens of one device, and a second device with a distinct owner); dropping them is the close.
fn open_close(kind: MemoryKind) {
    let space = Space::new().unwrap();
    let dev = SoftDevice::new(DeviceConfig {
        kind,
        capacity: DEV_CAPACITY,
    })
    .unwrap();
    assert_eq!(dev.kind(), kind);
    let m = dev.mirror(&space).unwrap();
    assert_eq!(m.owner(), dev.owner());
    let m2 = dev.mirror(&space).unwrap();
    let dev1 = SoftDevice::new(DeviceConfig {
        kind,
        capacity: DEV_CAPACITY,
    })
    .unwrap();
    assert_ne!(dev1.owner(), dev.owner());
    drop(m2);
    drop(m);
    drop(dev1);
    drop(dev);
}

/// 2 anon_read: the device reads anonymous memory, two pages of which were never written (the
/// second is the zero page, read by the CPU after mprotect(PROT_READ)). Asserts as the kernel:
/// READ N returns ok(N, 1); mirror pages 0-1 are 0, the rest `i`.
fn anon_read(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);

    // Initialize buffer->ptr from page 2 on, so pages 0 and 1 stay untouched.
    let data = pattern(size, |i| i);
    h.space
        .cpu_write(ptr.add(2 * PAGE), &data[2 * PAGE..])
        .unwrap();

    // Set buffer permission to read-only.
    h.space.protect(ptr, size, Prot::Read).unwrap();

    // Populate the CPU page table with a special zero page.
    assert_eq!(h.space.load_u32(ptr.add(PAGE)).unwrap(), 0);

    // Simulate a device reading system memory.
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Read, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_eq!(buffer.faults, 1);

    // Check what the device read.
    assert_bytes("mirror pages 0-1", &buffer.mirror[..2 * PAGE], 0);
    assert_ints("mirror pages 2..", &buffer.mirror[2 * PAGE..], |i| {
        i + (2 * PAGE / 4) as u32
    });
}

/// 3 anon_read_prot: a device read of PROT_NONE memory. Asserts as the kernel: READ fails with
/// -EFAULT, the CPU data is intact (`i`, read after mprotect(PROT_READ)) and the device wrote
/// nothing to the mirror (still `-i`).
fn anon_read_prot(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);

    cpu_init(&h.space, ptr, size, |i| i);
    buffer.mirror = pattern(size, |i| i.wrapping_neg());

    h.space.protect(ptr, size, Prot::None).unwrap();

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Read, &mut buffer, npages);
    assert_eq!(ret, -libc::EFAULT);

    // Allow the CPU to read the buffer so we can check it.
    h.space.protect(ptr, size, Prot::Read).unwrap();
    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);

    // Check what the device read: nothing.
    assert_ints("mirror", &buffer.mirror, |i| i.wrapping_neg());
}

/// 4 anon_write: the device writes untouched anonymous memory. Asserts as the kernel: WRITE N
/// returns ok(N, 1) and the CPU reads `i`.
fn anon_write(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    buffer.mirror = pattern(size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Write, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_eq!(buffer.faults, 1);

    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
}

/// 5 anon_write_prot: device accesses to a PROT_READ mapping. Asserts as the kernel: READ 1
/// returns ok(1, 1) (zero page); WRITE N returns -EPERM and the memory stays 0; after
/// mprotect(RW), WRITE N returns ok(N, 1) and the CPU reads `i`.
fn anon_write_prot(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::Read).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);

    // Simulate a device reading a zero page of memory.
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Read, &mut buffer, 1);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, 1);
    assert_eq!(buffer.faults, 1);

    // Initialize data that the device will write to buffer->ptr.
    buffer.mirror = pattern(size, |i| i);

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Write, &mut buffer, npages);
    assert_eq!(ret, -libc::EPERM);

    // Check what the device wrote: nothing.
    assert_bytes("ptr", &cpu_get(&h.space, ptr, size), 0);

    // Now allow writing and see that the zero page is replaced.
    h.space.protect(ptr, size, Prot::ReadWrite).unwrap();

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Write, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_eq!(buffer.faults, 1);

    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
}

/// 6 anon_write_child, adapted (fork). Kernel: for migrate in {0,1} x thp in {0,1}, after
/// `ptr = i` (and TO_DEV when migrating) a forked child sees `ptr == i`, opens its own mirror,
/// WRITEs `-i` with ok(npages, 1) (and sees `-i` when not migrated); the parent still reads `i`
/// (copy-on-write).
///
/// hetmem: the child inherits the range copy-on-write as plain memory (space module `fork`):
/// it sees `ptr == i` whether the pages were migrated or not, and its stores of `-i` stay its
/// own. hetmem objects are inert in the child, so it cannot open a device of its own: its
/// hetmem calls get an error (`cpu_read`, `protect`, a device READ: -EINVAL) before anything is
/// touched. Afterwards the parent's state is unchanged (device-resident pages are still on the
/// device, as the snapshot shows: a fork moves nothing) and its data still reads `i`.
fn anon_write_child(kind: MemoryKind) {
    let h = hmm(kind);
    for migrate in [false, true] {
        for use_thp in [false, true] {
            let size = if use_thp { PMD } else { NPAGES * PAGE };
            let npages = size / PAGE;
            let old_ptr = h.space.map_anon(size * 2, Prot::ReadWrite).unwrap();
            let ptr = if use_thp {
                let map = align_pmd(old_ptr);
                h.space.advise_large(map, size).unwrap();
                map
            } else {
                old_ptr
            };
            let mut buffer = HmmBuffer::new(ptr, size, 0);

            cpu_init(&h.space, ptr, size, |i| i);
            buffer.mirror = pattern(size, |i| i.wrapping_neg());

            if migrate {
                let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
                assert_eq!(ret, 0);
                assert_eq!(buffer.cpages, npages as u64);
            }

            // The child sees the parent's data, and its stores stay its own.
            let probe = h.space.probe(ptr, size).unwrap();
            // SAFETY: the child only loads and stores through the probe (bounds checks and
            // volatile accesses of its own copy: no allocation, no lock) and exits.
            let st = unsafe {
                fork_and_wait(|| {
                    for i in 0..(size / 4) {
                        let p = ptr.add(i * 4);
                        if probe.load_u32(p).ok() != Some(i as u32) {
                            return 2;
                        }
                        if probe.store_u32(p, (i as u32).wrapping_neg()).is_err()
                            || probe.load_u32(p).ok() != Some((i as u32).wrapping_neg())
                        {
                            return 3;
                        }
                    }
                    0
                })
            }
            .unwrap();
            assert_eq!(
                st,
                ChildExit::Exited(0),
                "child reads i and writes -i (migrate={migrate}, thp={use_thp})"
            );

            // hetmem is inert in the child: every call fails early (no allocation: the child of
            // a multi-threaded process may only do async-signal-safe work).
            let (space, m) = (&h.space, &h.m);
            // SAFETY: each call below returns early in the child (its process-id check, a system
            // call) before it allocates or takes a lock.
            let st = unsafe {
                fork_and_wait(|| {
                    let mut word = [0u8; 4];
                    if space.cpu_read(ptr, &mut word).is_ok() {
                        return 3;
                    }
                    if space.protect(ptr, PAGE, Prot::None).is_ok() {
                        return 4;
                    }
                    let mut page = [0u8; PAGE];
                    let mut c = DmirrorCmd {
                        addr: ptr.get() as u64,
                        buf: &mut page,
                        npages: 1,
                        cpages: 7,
                        faults: 7,
                    };
                    if m.cmd(Cmd::Read, &mut c) != -libc::EINVAL || c.cpages != 7 || c.faults != 7 {
                        return 5;
                    }
                    0
                })
            }
            .unwrap();
            assert_eq!(
                st,
                ChildExit::Exited(0),
                "child hetmem calls (migrate={migrate}, thp={use_thp})"
            );

            // The parent's state is unchanged.
            if migrate {
                let mut snapb = HmmBuffer::new(ptr, npages, 0);
                let ret = hmm_dmirror_cmd(&h.m, Cmd::Snapshot, &mut snapb, npages);
                assert_eq!(ret, 0);
                assert_eq!(snapb.cpages, npages as u64);
                let want =
                    snap::DEV_PRIVATE_LOCAL | snap::WRITE | if use_thp { snap::PMD } else { 0 };
                if kind == MemoryKind::Private {
                    assert_bytes("snapshot after fork", &snapb.mirror[..npages], want);
                }
            }
            assert_ints("parent ptr", &cpu_get(&h.space, ptr, size), |i| i);

            h.space.unmap(old_ptr, size * 2).unwrap();
        }
    }
}

/// 7 anon_write_child_shared, adapted (fork). Kernel: `MAP_SHARED | MAP_ANONYMOUS`, N pages,
/// ptr = `i`, mirror = `-i`; fork; the child opens dmirror0 and WRITEs N pages: ok(N, 1), the
/// child reads `-i`, and so does the parent (no copy on write).
///
/// hetmem: [`Space::map_shared_anon`], ptr = `i`, mirror = `-i`; fork. The child inherits the
/// mapping (the one managed range a child inherits) but not hetmem: the parent's objects are
/// inert there (a device command is EINVAL) and it has no device of its own, so it writes `-i`
/// with plain CPU stores, after reading `i`. The parent then reads `-i` with the CPU and with its
/// device (READ ok(N, 1), mirror `-i`). The kernel's device WRITE then runs in the parent (ok(N,
/// 0): the READ mapped the pages already), and a second child reads what the device wrote. Both kinds alike: the pages stay in
/// system memory (the device writes through the CPU view of a mapping that does not intercept
/// stores).
fn anon_write_child_shared(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let (ptr, _cache) = h.space.map_shared_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);
    buffer.mirror = pattern(size, |i| i.wrapping_neg());

    let probe = h.space.probe(ptr, size).unwrap();
    let m = &h.m;
    // SAFETY: the child makes one device command that fails at its process-id check (no
    // allocation, no lock: a READ, whose buffer is the child's stack; a WRITE would copy its
    // buffer first), then loads and stores through the probe (bounds checks and volatile
    // accesses) and returns an exit code.
    let st = unsafe {
        fork_and_wait(|| {
            let mut page = [0u8; PAGE];
            let mut c = DmirrorCmd {
                addr: ptr.get() as u64,
                buf: &mut page,
                npages: 1,
                cpages: 7,
                faults: 7,
            };
            if m.cmd(Cmd::Read, &mut c) != -libc::EINVAL || c.cpages != 7 {
                return 2;
            }
            for i in 0..(size / 4) {
                let p = ptr.add(i * 4);
                match probe.load_u32(p) {
                    Ok(v) if v == i as u32 => {}
                    _ => return 3,
                }
                if probe.store_u32(p, (i as u32).wrapping_neg()).is_err() {
                    return 4;
                }
            }
            0
        })
    }
    .unwrap();
    assert_eq!(st, ChildExit::Exited(0), "the child's loads and stores");

    // No copy on write: the parent sees the child's stores.
    assert_ints("parent ptr", &cpu_get(&h.space, ptr, size), |i| {
        i.wrapping_neg()
    });
    let mut readb = HmmBuffer::new(ptr, size, 0);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Read, &mut readb, npages);
    assert_eq!(ret, 0);
    assert_eq!(readb.cpages, npages as u64);
    assert_eq!(readb.faults, 1);
    assert_ints("parent mirror", &readb.mirror, |i| i.wrapping_neg());

    // The kernel's device WRITE, in the parent; a child reads it.
    buffer.mirror = pattern(size, |i| i ^ 0x5a5a_5a5a);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Write, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    // No fault: the READ above mapped the pages, writable (as dmirror maps a writable pte).
    assert_eq!(buffer.faults, 0);
    // SAFETY: loads through the probe only, then an exit code.
    let st = unsafe {
        fork_and_wait(|| {
            for i in 0..(size / 4) {
                match probe.load_u32(ptr.add(i * 4)) {
                    Ok(v) if v == i as u32 ^ 0x5a5a_5a5a => {}
                    _ => return 3,
                }
            }
            0
        })
    }
    .unwrap();
    assert_eq!(st, ChildExit::Exited(0), "the second child's loads");
    assert_ints("parent ptr", &cpu_get(&h.space, ptr, size), |i| {
        i ^ 0x5a5a_5a5a
    });
}

/// 8 anon_write_huge: the device writes a MADV_HUGEPAGE region (the `advise_large` analogue) of
/// an mmap of 2P. Asserts as the kernel: WRITE P/pg returns ok(npages, 1), the CPU reads `i`.
fn anon_write_huge(kind: MemoryKind) {
    let h = hmm(kind);
    let size = 2 * PMD;
    let old_ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let size = PMD;
    let npages = size / PAGE;
    let map = align_pmd(old_ptr);
    h.space.advise_large(map, size).unwrap();
    let mut buffer = HmmBuffer::new(map, size, 0);
    buffer.mirror = pattern(size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Write, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_eq!(buffer.faults, 1);

    assert_ints("ptr", &cpu_get(&h.space, map, size), |i| i);
}

/// 9 anon_write_hugetlbfs, adapted: the kernel maps MAP_HUGETLB (2 MiB) memory; hetmem's large
/// pages are 2 MiB frames, so the mapping is `MapOptions { large: true }` of 2 MiB. Asserts as
/// the kernel: WRITE returns ok(npages, 1), the CPU reads `i`.
fn anon_write_hugetlbfs(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    let ptr = h
        .space
        .map_anon_with(
            size,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    buffer.mirror = pattern(size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Write, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_eq!(buffer.faults, 1);

    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
}

/// 12 migrate: TO_DEV of N written pages. Asserts as the kernel: 0, cpages N, mirror `i`.
fn migrate(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);
}

/// 14 migrate_fault: TO_DEV, CPU reads the first half back, TO_DEV again. Asserts as the kernel:
/// both migrations return 0 with cpages N and mirror `i` (the second one finds half the pages
/// already on the device), and the CPU reads `i`.
fn migrate_fault(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    // Fault half the pages back to system memory and check them.
    assert_ints("ptr first half", &cpu_get(&h.space, ptr, size / 2), |i| i);

    // Migrate memory to the device again.
    buffer.mirror.fill(0);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror (second migration)", &buffer.mirror, |i| i);
}

/// 15 migrate_release: TO_DEV, RELEASE (evict all device memory), CPU reads the first half.
/// Asserts as the kernel: TO_DEV 0 with cpages N; RELEASE 0; the data reads `i`. hetmem also
/// checks that the pages are back in system memory and the device memory is free.
fn migrate_release(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    // Release device memory.
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Release, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(h.dev.used(), 0);
    assert_eq!(h.space.residency(ptr), Residency::System);

    // Fault pages back to system memory and check them.
    assert_ints("ptr first half", &cpu_get(&h.space, ptr, size / 2), |i| i);
}

/// 16 migrate_shared. Kernel: `MAP_SHARED | MAP_ANONYMOUS` (shmem), N pages, untouched;
/// TO_DEV N returns **-ENOENT** (shmem pages fail the anonymous check of `migrate_vma`).
///
/// hetmem goes beyond the kernel: shared anonymous memory is a file page without a file, so its
/// pages move through the cache's placement like file pages (every mapping of them sees the
/// move at once), untouched ones zero-filled first: TO_DEV returns 0, cpages N, mirror all 0.
/// Device-private memory needs a mapping whose CPU stores can be held off while a page moves:
/// through the plain writable mapping (stores not intercepted: the kernel resolves their
/// write-protect fault itself) the private device gets **-EBUSY** and nothing moves; through a
/// mapping that intercepts stores (`FileMapOptions::intercept_stores`) it works. Coherent
/// memory takes either (the CPU keeps mapping the page in place). The CPU reads zeros after.
fn migrate_shared(kind: MemoryKind) {
    use hetmem::pagecache::PagePlacement;
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let on_device = |cache: &hetmem::pagecache::FileCache, p: u64| match kind {
        MemoryKind::Private => {
            cache.placement(p)
                == PagePlacement::DevicePrivate {
                    owner: h.dev.owner(),
                }
        }
        _ => {
            cache.placement(p)
                == PagePlacement::DeviceCoherent {
                    owner: h.dev.owner(),
                }
        }
    };

    // The kernel's mapping: shared, writable, stores not intercepted.
    let (ptr, cache) = h.space.map_shared_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0xff);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    if kind == MemoryKind::Private {
        assert_eq!(ret, -libc::EBUSY);
        assert_eq!(cache.device_pages(), 0);
        assert_eq!(h.dev.used(), 0);
    } else {
        assert_eq!(ret, 0);
        assert_eq!(buffer.cpages, npages as u64);
        assert_bytes("mirror", &buffer.mirror, 0);
        assert!(on_device(&cache, 0) && on_device(&cache, npages as u64 - 1));
    }
    assert_bytes("ptr", &cpu_get(&h.space, ptr, size), 0);
    h.space.unmap(ptr, size).unwrap();

    // A mapping that intercepts stores: both kinds move every page.
    let (ptr, cache) = h
        .space
        .map_shared_anon_with(size, intercepting(Prot::ReadWrite))
        .unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0xff);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_bytes("mirror", &buffer.mirror, 0);
    assert_eq!(cache.device_pages(), npages);
    for p in 0..npages as u64 {
        assert!(on_device(&cache, p), "page {p}");
    }
    assert_bytes("ptr", &cpu_get(&h.space, ptr, size), 0);
}

/// 18 migrate_multiple: 10 times, a fresh mapping written `i` migrates to the device (0, cpages
/// N, mirror `i`); the coherent variant also migrates it back (TO_SYS: 0, cpages N); the CPU
/// reads `i`. Same asserts as the kernel (a private device has no TO_SYS step: the CPU read
/// faults the pages back).
fn migrate_multiple(kind: MemoryKind) {
    migrate_multiple_impl(kind, kind == MemoryKind::Coherent);
}

/// 18b migrate_multiple with the TO_SYS step for every kind (not in the kernel, whose private
/// variant skips it): TO_SYS returns 0 with cpages N, after which every page is in system
/// memory and reads `i`.
fn migrate_multiple_to_sys(kind: MemoryKind) {
    migrate_multiple_impl(kind, true);
}

fn migrate_multiple_impl(kind: MemoryKind, to_sys: bool) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    for c in 0..NTIMES {
        let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
        let mut buffer = HmmBuffer::new(ptr, size, 0);
        cpu_init(&h.space, ptr, size, |i| i);

        let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
        assert_eq!(ret, 0, "round {c}");
        assert_eq!(buffer.cpages, npages as u64);
        assert_ints("mirror", &buffer.mirror, |i| i);

        if to_sys {
            let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToSys, &mut buffer, npages);
            assert_eq!(ret, 0, "round {c}");
            assert_eq!(buffer.cpages, npages as u64);
            for p in 0..npages {
                assert_eq!(
                    h.space.residency(ptr.add(p * PAGE)),
                    Residency::System,
                    "page {p} after TO_SYS"
                );
            }
        }

        assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
        h.space.unmap(ptr, size).unwrap();
    }
    assert_eq!(h.dev.used(), 0);
}

/// 19 anon_read_multiple: 10 times, the device reads a fresh mapping written `i + c`. Asserts as
/// the kernel: READ N returns ok(N, 1) and the mirror holds `i + c`.
fn anon_read_multiple(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    for c in 0..NTIMES {
        let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
        let mut buffer = HmmBuffer::new(ptr, size, 0);
        cpu_init(&h.space, ptr, size, |i| i + c);

        let ret = hmm_dmirror_cmd(&h.m, Cmd::Read, &mut buffer, npages);
        assert_eq!(ret, 0, "round {c}");
        assert_eq!(buffer.cpages, npages as u64);
        assert_eq!(buffer.faults, 1);
        assert_ints("mirror", &buffer.mirror, |i| i + c);
        h.space.unmap(ptr, size).unwrap();
    }
}

/// 23 compound, adapted: the kernel snapshots a populated MAP_HUGETLB mapping (every byte
/// WRITE|PMD), mprotects it read-only and snapshots again (READ|PMD). hetmem: the same on a
/// populated 2 MiB large mapping.
fn compound(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    let ptr = h
        .space
        .map_anon_with(
            size,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Snapshot, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_bytes(
        "snapshot",
        &buffer.mirror[..npages],
        snap::WRITE | snap::PMD,
    );

    h.space.protect(ptr, size, Prot::Read).unwrap();
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Snapshot, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_bytes(
        "snapshot (read-only)",
        &buffer.mirror[..npages],
        snap::READ | snap::PMD,
    );
}

/// 25 exclusive: the device takes exclusive (atomic) access, the CPU does `ptr[i]++`. Asserts as
/// the kernel: EXCLUSIVE returns 0 with cpages N and mirror `i`; the CPU sees `i` then `i + 1`;
/// CHECK_EXCLUSIVE returns 0 (every atomic entry was revoked). hetmem also checks that
/// CHECK_EXCLUSIVE returns -EPERM while the entries are still there.
fn exclusive(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Exclusive, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::CheckExclusive, &mut buffer, npages);
    assert_eq!(ret, -libc::EPERM, "atomic entries are still mapped");

    // Fault pages back to system memory and check them.
    cpu_increment_each(&h.space, ptr, size, |i| i);
    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i + 1);

    // Check atomic access revoked.
    let ret = hmm_dmirror_cmd(&h.m, Cmd::CheckExclusive, &mut buffer, npages);
    assert_eq!(ret, 0);
}

/// 26 exclusive_mprotect: after EXCLUSIVE, mprotect(PROT_READ), then a device WRITE. Asserts as
/// the kernel: EXCLUSIVE 0 with cpages N (mirror `i`); WRITE returns -EPERM. hetmem also checks
/// that the data is intact (the CPU reads `i`).
fn exclusive_mprotect(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Exclusive, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    h.space.protect(ptr, size, Prot::Read).unwrap();

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Write, &mut buffer, npages);
    assert_eq!(ret, -libc::EPERM);

    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
}

/// 27 exclusive_cow, adapted (fork). Kernel: after EXCLUSIVE (0, cpages N), fork; parent and
/// child each do `ptr[i]++`, each seeing `i` then `i + 1`; the child exits 0.
///
/// hetmem: the same answers. The child's `ptr[i]++` works on its own copy (it sees `i`, then
/// `i + 1`) and touches none of the parent's pages, which stay exclusive to the device
/// (CHECK_EXCLUSIVE still -EPERM); the parent's `ptr[i]++` sees `i` then `i + 1`, and its atomic
/// entries are revoked (CHECK_EXCLUSIVE 0).
fn exclusive_cow(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::Exclusive, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    let probe = h.space.probe(ptr, size).unwrap();
    // SAFETY: the child only loads and stores through the probe (bounds checks and volatile
    // accesses of its own copy: no allocation, no lock).
    let st = unsafe {
        fork_and_wait(|| {
            for i in 0..(size / 4) {
                let p = ptr.add(i * 4);
                if probe.load_u32(p).ok() != Some(i as u32) {
                    return 2;
                }
                if probe.store_u32(p, i as u32 + 1).is_err()
                    || probe.load_u32(p).ok() != Some(i as u32 + 1)
                {
                    return 3;
                }
            }
            0
        })
    }
    .unwrap();
    assert_eq!(st, ChildExit::Exited(0));

    let ret = hmm_dmirror_cmd(&h.m, Cmd::CheckExclusive, &mut buffer, npages);
    assert_eq!(ret, -libc::EPERM, "the child's accesses revoked nothing");

    cpu_increment_each(&h.space, ptr, size, |i| i);
    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i + 1);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::CheckExclusive, &mut buffer, npages);
    assert_eq!(ret, 0);
}

/// 28 hmm_gup_test, adapted: `get_user_pages` is `Space::pin`. Kernel: TO_DEV of 4 pages (0,
/// cpages 4); GUP_BASIC on p0, GUP_FAST on p1 (short-term), PIN_FAST|LONGTERM on p2 and
/// PIN_LONGTERM on p3; SNAPSHOT: coherent m0, m1 = DEV_COHERENT_LOCAL|WRITE, private m0, m1 =
/// WRITE (a pin faults a private page back); m2, m3 = WRITE for both (long-term pins migrate to
/// RAM); data `i`. hetmem: the same with p0, p1 pinned short-term and p2, p3 long-term (pins
/// held during the snapshot). Extra: while pinned, the pages cannot migrate (TO_DEV -ENOENT,
/// data intact); unpinned, they can again.
fn hmm_gup_test(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = 4;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    let p0 = h.space.pin(ptr, PAGE, false).unwrap();
    let p1 = h.space.pin(ptr.add(PAGE), PAGE, false).unwrap();
    let p2 = h.space.pin(ptr.add(2 * PAGE), PAGE, true).unwrap();
    let p3 = h.space.pin(ptr.add(3 * PAGE), PAGE, true).unwrap();

    let mut snapb = HmmBuffer::new(ptr, npages, 0);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Snapshot, &mut snapb, npages);
    assert_eq!(ret, 0);
    assert_eq!(snapb.cpages, npages as u64);
    let m = &snapb.mirror;
    let short = if kind == MemoryKind::Coherent {
        snap::DEV_COHERENT_LOCAL | snap::WRITE
    } else {
        snap::WRITE
    };
    assert_eq!(m[0], short);
    assert_eq!(m[1], short);
    assert_eq!(m[2], snap::WRITE);
    assert_eq!(m[3], snap::WRITE);

    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);

    // Extra: pinned pages do not migrate, and nothing is lost.
    let mut sentinel = HmmBuffer::new(ptr, size, 0);
    sentinel.cpages = 99;
    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut sentinel, npages);
    assert_eq!(ret, -libc::ENOENT);
    assert_eq!(sentinel.cpages, 99, "cpages is not copied out on failure");
    if kind == MemoryKind::Private {
        assert_eq!(h.space.residency(ptr), Residency::System);
    } else {
        // A short-term pin leaves a coherent page where it is.
        assert_eq!(h.space.residency(ptr), Residency::Coherent(h.dev.owner()));
    }
    assert_eq!(h.space.residency(ptr.add(2 * PAGE)), Residency::System);
    assert_ints("ptr (pinned)", &cpu_get(&h.space, ptr, size), |i| i);

    drop((p0, p1, p2, p3));
    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror (unpinned)", &buffer.mirror, |i| i);
}

/// 29 hmm_cow_in_device, adapted (fork). Kernel: 4 pages written `i` migrate (0, cpages 4);
/// fork (the child spins); the parent writes every page (copy-on-write out of device memory);
/// the child is killed (SIGKILL); SNAPSHOT: every m == WRITE (back in RAM).
///
/// hetmem: the same answers for device-private memory. Before the kernel's sequence, a first
/// child stores to its own copy and changes nothing of the parent's: the pages are still on the
/// device (a fork moves nothing). Then the kernel's sequence: the spinning child is killed by
/// SIGKILL, and the snapshot reads WRITE for every page. Coherent variant too: the parent's
/// stores get private copies from the kernel's copy-on-write, in system memory as the kernel's
/// (space module `fork`): every m == WRITE.
fn hmm_cow_in_device(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = 4;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buffer = HmmBuffer::new(ptr, size, 0);
    cpu_init(&h.space, ptr, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);

    // A child's store goes to its own copy.
    let probe = h.space.probe(ptr, size).unwrap();
    // SAFETY: the child makes a load and a store through the probe (bounds checks and volatile
    // accesses of its own copy: no allocation, no lock) and exits.
    let st = unsafe {
        fork_and_wait(|| {
            if probe.load_u32(ptr).ok() != Some(0) || probe.store_u32(ptr, 0xdead).is_err() {
                return 1;
            }
            0
        })
    }
    .unwrap();
    assert_eq!(st, ChildExit::Exited(0));
    if kind == MemoryKind::Private {
        for p in 0..npages {
            assert_eq!(
                h.space.residency(ptr.add(p * PAGE)),
                Residency::Device(h.dev.owner())
            );
        }
    }

    // The kernel's sequence: a child that waits (bounded, in case the kill never comes), the
    // parent writes every page, the child is killed.
    // SAFETY: the child only reads the clock (`clock_gettime`, async-signal-safe) and spins.
    let pid = unsafe {
        sys::fork_child(|| {
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_secs(60) {
                std::hint::spin_loop();
            }
            0
        })
    }
    .unwrap();
    cpu_init(&h.space, ptr, size, |i| i);
    sys::kill(pid).unwrap();
    assert_eq!(
        sys::wait_child(pid).unwrap(),
        ChildExit::Signaled(libc::SIGKILL)
    );

    let mut snapb = HmmBuffer::new(ptr, npages, 0);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Snapshot, &mut snapb, npages);
    assert_eq!(ret, 0);
    assert_eq!(snapb.cpages, npages as u64);
    assert_bytes("snapshot", &snapb.mirror[..npages], snap::WRITE);
    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
}

/// Maps 2P with `prot` and marks the aligned P region large (MADV_HUGEPAGE); returns
/// (old_ptr, map).
fn map_thp(space: &Space, prot: Prot) -> (VirtAddr, VirtAddr) {
    let old_ptr = space.map_anon(2 * PMD, prot).unwrap();
    let map = align_pmd(old_ptr);
    space.advise_large(map, PMD).unwrap();
    (old_ptr, map)
}

/// 30 migrate_anon_huge_empty: an untouched PROT_READ huge region migrates. Asserts as the
/// kernel: TO_DEV P/pg returns 0 with cpages npages and the mirror (0xFF before) reads 0.
fn migrate_anon_huge_empty(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    let (_old, map) = map_thp(&h.space, Prot::Read);
    let mut buffer = HmmBuffer::new(map, size, 0xFF);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_bytes("mirror", &buffer.mirror, 0);
}

/// 31 migrate_anon_huge_zero: as 30, after a CPU read populated the (huge) zero page. Asserts
/// as the kernel: the read is 0; TO_DEV 0 with cpages npages; mirror 0; the CPU reads 0.
fn migrate_anon_huge_zero(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    let (_old, map) = map_thp(&h.space, Prot::Read);
    let mut buffer = HmmBuffer::new(map, size, 0xFF);

    // Initialize a read-only zero huge page.
    assert_eq!(h.space.load_u32(map).unwrap(), 0);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_bytes("mirror", &buffer.mirror, 0);

    assert_bytes("ptr", &cpu_get(&h.space, map, size), 0);
}

/// 32 migrate_anon_huge_free, adapted: a written huge region migrates (0, cpages npages,
/// mirror `i`), then the kernel calls MADV_FREE (== 0). hetmem has no MADV_FREE API: the
/// madvise is skipped; hetmem asserts the migration and that the data still reads `i`.
fn migrate_anon_huge_free(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    let (_old, map) = map_thp(&h.space, Prot::ReadWrite);
    let mut buffer = HmmBuffer::new(map, size, 0xFF);
    cpu_init(&h.space, map, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    assert_ints("ptr", &cpu_get(&h.space, map, size), |i| i);
}

/// 33 migrate_anon_huge_fault: a written (collapsed) huge region migrates and faults back.
/// Asserts as the kernel: TO_DEV 0 with cpages npages, mirror `i`; private: every snapshot byte
/// is DEV_PRIVATE_LOCAL|WRITE|PMD, and `/proc/self/pagemap` has a swap entry, not present, for
/// every page; the CPU reads `i`.
fn migrate_anon_huge_fault(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    let (_old, map) = map_thp(&h.space, Prot::ReadWrite);
    let mut buffer = HmmBuffer::new(map, size, 0xFF);
    cpu_init(&h.space, map, size, |i| i);

    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);

    if kind == MemoryKind::Private {
        let mut snapb = HmmBuffer::new(map, npages, 0);
        let ret = hmm_dmirror_cmd(&h.m, Cmd::Snapshot, &mut snapb, npages);
        assert_eq!(ret, 0);
        assert_eq!(snapb.cpages, npages as u64);
        assert_bytes(
            "snapshot",
            &snapb.mirror,
            snap::DEV_PRIVATE_LOCAL | snap::WRITE | snap::PMD,
        );
        let _no_fork = FORKS.read().unwrap_or_else(|p| p.into_inner());
        for p in 0..npages {
            assert_eq!(
                h.space.residency(map.add(p * PAGE)),
                Residency::Device(h.dev.owner())
            );
            let e = pagemap_entry(map.add(p * PAGE));
            assert_ne!(e & PM_SWAP, 0, "page {p}: a swap entry");
            assert_eq!(e & PM_PRESENT, 0, "page {p}: not present");
        }
    }

    assert_ints("ptr", &cpu_get(&h.space, map, size), |i| i);
}

/// 34 migrate_partial_unmap_fault: for thp in {HUGEPAGE, NOHUGEPAGE} x offset in {0, P/4, P/2}:
/// a written P region migrates (0, cpages npages, mirror `i`), P/2 at the offset is unmapped,
/// the CPU reads the rest. Asserts as the kernel: the remaining data reads `i`. hetmem also
/// checks that the unmap freed the device memory of the unmapped half.
fn migrate_partial_unmap_fault(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    for use_thp in [true, false] {
        for off in [0, PMD / 4, PMD / 2] {
            let old_ptr = h.space.map_anon(2 * size, Prot::ReadWrite).unwrap();
            let map = align_pmd(old_ptr);
            if use_thp {
                h.space.advise_large(map, size).unwrap();
            }
            let mut buffer = HmmBuffer::new(map, size, 0xFF);
            cpu_init(&h.space, map, size, |i| i);

            let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
            assert_eq!(ret, 0, "thp={use_thp} off={off:#x}");
            assert_eq!(buffer.cpages, npages as u64);
            assert_ints("mirror", &buffer.mirror, |i| i);

            h.space.unmap(map.add(off), PMD / 2).unwrap();
            assert_eq!(
                h.dev.used(),
                PMD / 2,
                "thp={use_thp} off={off:#x}: device memory of the unmapped half freed"
            );

            // Fault pages back to system memory and check them.
            let back = cpu_get_around(&h.space, map, size, off, PMD / 2);
            for (i, v) in back {
                assert_eq!(v, i, "thp={use_thp} off={off:#x}: ptr[{i}]");
            }

            h.space.unmap(old_ptr, 2 * size).unwrap();
            assert_eq!(h.dev.used(), 0);
        }
    }
}

/// CPU reads of the ints of `[a, a+len)` outside the hole `[a+off, a+off+hole)`, as (index, value).
fn cpu_get_around(
    space: &Space,
    a: VirtAddr,
    len: usize,
    off: usize,
    hole: usize,
) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for (s, e) in [(0, off), (off + hole, len)] {
        if s < e {
            let b = cpu_get(space, a.add(s), e - s);
            out.extend(
                ints(&b)
                    .into_iter()
                    .enumerate()
                    .map(|(k, v)| ((s / 4 + k) as u32, v)),
            );
        }
    }
    out
}

/// 37 migrate_anon_huge_zero_err: a PROT_READ huge region migrates with the device's next
/// allocation failing (FLAGS(FAIL_ALLOC)): the large frame fails and the migration falls back to
/// base frames. Asserts as the kernel: FLAGS 0; TO_DEV 0 with cpages npages; mirror 0; the CPU
/// reads 0 at ptr[2048]; after the region is replaced by a fresh one (munmap + mmap: hetmem's
/// `unmap` + `map_anon` + `advise_large`) and read once (zero huge page), FLAGS 0, TO_DEV 0 with
/// cpages npages, mirror 0, and every CPU read is 0.
fn migrate_anon_huge_zero_err(kind: MemoryKind) {
    let h = hmm(kind);
    let size = PMD;
    let npages = size / PAGE;
    let (old_ptr, map) = map_thp(&h.space, Prot::Read);
    let mut buffer = HmmBuffer::new(map, 2 * size, 0xFF);

    // Migrate memory to device but force a THP allocation error.
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Flags, &mut buffer, FLAG_FAIL_ALLOC as usize);
    assert_eq!(ret, 0);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_bytes("mirror", &buffer.mirror[..size], 0);

    // Try faulting back a single (PAGE_SIZE) page.
    assert_eq!(h.space.load_u32(map.add(2048 * 4)).unwrap(), 0);

    // Unmap and remap the region to reset things.
    h.space.unmap(old_ptr, 2 * size).unwrap();
    let (_old, map) = map_thp(&h.space, Prot::Read);
    buffer.ptr = map;
    buffer.mirror.fill(0xFF);

    // Initialize buffer in system memory (zero THP page).
    assert_eq!(h.space.load_u32(map).unwrap(), 0);

    // Migrate memory to device but force a THP allocation error.
    let ret = hmm_dmirror_cmd(&h.m, Cmd::Flags, &mut buffer, FLAG_FAIL_ALLOC as usize);
    assert_eq!(ret, 0);
    let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_bytes("mirror", &buffer.mirror[..size], 0);

    // Fault the buffer back and check it.
    assert_bytes("ptr", &cpu_get(&h.space, map, size), 0);
}

/// 38 benchmark_thp_migration, as a functional test: for sizes P/4 .. 8P (the kernel also runs
/// 128P), with and without MADV_HUGEPAGE, a buffer written `i & 0xFF` migrates to the device and
/// back once. The kernel only asserts that every call returns 0 (and times 5 iterations);
/// hetmem asserts 0, cpages == npages both ways, the mirror and the data, and no timing.
fn benchmark_thp_migration(kind: MemoryKind) {
    let h = hmm(kind);
    for size in [PMD / 4, PMD / 2, PMD, 2 * PMD, 4 * PMD, 8 * PMD] {
        for use_thp in [true, false] {
            let npages = size / PAGE;
            let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
            if use_thp {
                h.space.advise_large(ptr, size).unwrap();
            }
            let mut buffer = HmmBuffer::new(ptr, size, 0xFF);
            cpu_init(&h.space, ptr, size, |i| i & 0xFF);

            let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToDev, &mut buffer, npages);
            assert_eq!(ret, 0, "size={size:#x} thp={use_thp}");
            assert_eq!(buffer.cpages, npages as u64);
            assert_ints("mirror", &buffer.mirror, |i| i & 0xFF);

            let ret = hmm_dmirror_cmd(&h.m, Cmd::MigrateToSys, &mut buffer, npages);
            assert_eq!(ret, 0, "size={size:#x} thp={use_thp}");
            assert_eq!(buffer.cpages, npages as u64);
            assert_eq!(h.dev.used(), 0);

            assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i & 0xFF);
            h.space.unmap(ptr, size).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dmirror's argument checks and device memory exhaustion
// ---------------------------------------------------------------------------------------------

/// The commands whose argument checks are tested.
const CHECKED_CMDS: [Cmd; 4] = [Cmd::Read, Cmd::Write, Cmd::MigrateToDev, Cmd::Snapshot];

/// Runs `cmd` with raw `addr`/`npages` and sentinel `cpages`/`faults`; asserts it fails with
/// -EINVAL and leaves both untouched (the ioctl copies them out only on success).
#[track_caller]
fn assert_einval(m: &DeviceMirror, cmd: Cmd, addr: u64, npages: u64, buf: &mut [u8]) {
    let mut c = DmirrorCmd {
        addr,
        buf,
        npages,
        cpages: 77,
        faults: 88,
    };
    let ret = m.cmd(cmd, &mut c);
    assert_eq!(
        ret,
        -libc::EINVAL,
        "{cmd:?} addr={addr:#x} npages={npages:#x}"
    );
    assert_eq!(
        (c.cpages, c.faults),
        (77, 88),
        "{cmd:?}: cpages/faults written on failure"
    );
}

/// dmirror's ioctl returns -EINVAL when `addr` is not page-aligned, for every command. hetmem:
/// READ, WRITE, MIGRATE_TO_DEV and SNAPSHOT at `ptr + 1` (and `ptr + 2048`) of a mapped,
/// written range; the data is unchanged.
fn einval_unaligned_addr(kind: MemoryKind) {
    let h = hmm(kind);
    let npages = 4;
    let size = npages * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    cpu_init(&h.space, ptr, size, |i| i);
    let mut buf = vec![0u8; size];
    for cmd in CHECKED_CMDS {
        for delta in [1, 2048, PAGE as u64 - 4] {
            assert_einval(&h.m, cmd, ptr.get() as u64 + delta, 1, &mut buf);
        }
    }
    assert_eq!(h.dev.used(), 0);
    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
}

/// dmirror's ioctl returns -EINVAL when `addr + npages * PAGE <= addr`, which includes
/// `npages == 0`. hetmem: READ, WRITE, MIGRATE_TO_DEV and SNAPSHOT with npages 0.
fn einval_zero_npages(kind: MemoryKind) {
    let h = hmm(kind);
    let size = 4 * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    cpu_init(&h.space, ptr, size, |i| i);
    let mut buf = vec![0u8; size];
    for cmd in CHECKED_CMDS {
        assert_einval(&h.m, cmd, ptr.get() as u64, 0, &mut buf);
    }
    assert_ints("ptr", &cpu_get(&h.space, ptr, size), |i| i);
}

/// dmirror's ioctl returns -EINVAL when `addr + npages * PAGE` wraps around. hetmem: READ,
/// WRITE, MIGRATE_TO_DEV and SNAPSHOT at the last page of the address space with 2 pages, at a
/// mapped address with `npages` so large that the length wraps, and with `npages * PAGE`
/// overflowing.
fn einval_overflow(kind: MemoryKind) {
    let h = hmm(kind);
    let size = 4 * PAGE;
    let ptr = h.space.map_anon(size, Prot::ReadWrite).unwrap();
    let mut buf = vec![0u8; size];
    let last_page = !(PAGE as u64 - 1);
    let a = ptr.get() as u64;
    for cmd in CHECKED_CMDS {
        assert_einval(&h.m, cmd, last_page, 2, &mut buf);
        // addr + npages * PAGE wraps to exactly addr - PAGE.
        assert_einval(&h.m, cmd, a, (u64::MAX - a) / PAGE as u64 + 1, &mut buf);
        // npages * PAGE itself overflows.
        assert_einval(&h.m, cmd, a, u64::MAX / 2, &mut buf);
        assert_einval(&h.m, cmd, a, u64::MAX, &mut buf);
    }
    assert_eq!(h.dev.used(), 0);
}

/// Device memory exhaustion (not a kernel case: dmirror allocates more 256 MiB chunks on
/// demand). A 2 MiB device is asked to migrate 4 MiB written `i`: the first 2 MiB move, the
/// device cannot allocate the rest, those pages are declined (they stay in system memory), and
/// the read-back of the migrated range (as dmirror's) finds pages that are not device-mapped:
/// -ENOENT, with `cpages` not written. No data is lost: the CPU reads `i` everywhere, and the
/// device memory is free again afterwards.
fn device_too_small(kind: MemoryKind) {
    device_too_small_impl(kind, false);
}

/// As [`device_too_small`], with a large (MADV_HUGEPAGE) mapping: the second 2 MiB unit fails
/// its large frame, falls back to base frames, which fail too: -ENOENT, no data lost.
fn device_too_small_huge(kind: MemoryKind) {
    device_too_small_impl(kind, true);
}

fn device_too_small_impl(kind: MemoryKind, large: bool) {
    let space = Space::new().unwrap();
    let dev = SoftDevice::new(DeviceConfig {
        kind,
        capacity: PMD,
    })
    .unwrap();
    let m = dev.mirror(&space).unwrap();
    let npages = NPAGES;
    let size = npages * PAGE;
    let ptr = space
        .map_anon_with(
            size,
            MapOptions {
                large,
                ..MapOptions::default()
            },
        )
        .unwrap();
    cpu_init(&space, ptr, size, |i| i);
    let mut buffer = HmmBuffer::new(ptr, size, 0xFF);
    buffer.cpages = 99;
    buffer.faults = 98;

    let ret = hmm_dmirror_cmd(&m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, -libc::ENOENT);
    assert_eq!(
        (buffer.cpages, buffer.faults),
        (99, 98),
        "cpages/faults are not copied out on failure"
    );
    assert_eq!(dev.used(), PMD, "the device is full");
    if kind == MemoryKind::Private {
        assert_eq!(space.residency(ptr), Residency::Device(dev.owner()));
    }
    assert_eq!(space.residency(ptr.add(size - PAGE)), Residency::System);

    assert_ints("ptr", &cpu_get(&space, ptr, size), |i| i);
    if kind == MemoryKind::Private {
        assert_eq!(dev.used(), 0, "CPU reads brought every private page back");
    } else {
        // The CPU reads coherent pages in place: nothing moves.
        assert_eq!(dev.used(), PMD, "coherent pages stay in device memory");
        assert_eq!(space.residency(ptr), Residency::Coherent(dev.owner()));
    }

    // The device still works for what fits.
    let npages = PMD / PAGE;
    let mut buffer = HmmBuffer::new(ptr, PMD, 0xFF);
    let ret = hmm_dmirror_cmd(&m, Cmd::MigrateToDev, &mut buffer, npages);
    assert_eq!(ret, 0);
    assert_eq!(buffer.cpages, npages as u64);
    assert_ints("mirror", &buffer.mirror, |i| i);
}
