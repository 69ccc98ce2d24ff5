//! Extreme inputs: every public entry point of hetmem, fed extreme values — 0, 1, PAGE±1, 2^44,
//! 2^46, 2^62, 2^63, i64::MAX−10, u64::MAX, addresses at the top of the address space, just
//! outside a mapping, unaligned — returns success or a typed [`hetmem::Error`] in bounded time:
//! never an abort, a panic, a hang, or gigabytes of memory for a small request.
//!
//! - `every_entry_point_at_every_extreme`: a deterministic sweep (about 16,000 calls): each
//!   entry point with its arguments over their sets of extreme values (most pairs of them in
//!   full), each call on a fresh fixture.
//! - `random_sequences_of_extreme_calls`: proptest: sequences of calls whose arguments come
//!   from the same sets, their neighbours and random values, on one fixture, so that a call
//!   meets what earlier calls left (a pin, a huge cache, a new mapping, device memory).
//!
//! # How a crash becomes a report
//!
//! Each call runs in a child process: this test binary again, running only the `subprocess`
//! test (a no-op unless `HETMEM_EXTREME_CHILD` is set). The child reads its calls (JSON) on
//! stdin and says on stdout when each one starts and how it ended. The parent kills a child
//! whose call runs past [`HANG`]; a child that dies (an abort, a signal) or panics names the
//! call it was in, with the end of its stderr. The parent then goes on from the next call in a
//! new child, so one run lists every problem. Limits apply in the child only: its allocator
//! fails any single heap allocation over [`ALLOC_MAX`] and a heap over [`HEAP_MAX`] (so an
//! allocation sized by an input aborts at once with "memory allocation of N bytes failed",
//! on any machine, instead of taking seconds and gigabytes); `RLIMIT_AS` caps its address space
//! at what its fixture maps plus [`HEADROOM`]; a call that raises its resident high-water mark
//! by more than [`RSS_LIMIT`] fails.
//!
//! Besides not crashing, some answers are checked (a `WRONG` finding): a range that wraps, is
//! empty, unaligned or outside the space is refused; a device command whose buffer is smaller
//! than its range (its `len`, or `npages` for `DeviceMirror::cmd`) is refused; a file offset past the largest one (`i64::MAX`) is refused
//! — by private file mappings as by shared ones (mmap's EOVERFLOW), by writes and `set_len`;
//! `read_at` returns what the file holds there; a write leaves the file `max(size, off + len)`
//! long (an empty write changes nothing). After each call the child checks that the space still
//! works (map, CPU write, device read, CPU read, unmap).
//!
//! A CPU access past the end of a mapped file gets SIGBUS by design (as with the kernel's mmap):
//! CPU calls that touch a file mapping a call made, or the fixture's after its file was cut
//! short, are skipped.
//!
//! # The fixture
//!
//! [`Fx`], per child (per call in the sweep): a space with a 16-page anonymous mapping `A`
//! whose page 0 the device has read (a device page-table entry: walks over a range have
//! something to walk), page 1 held device-exclusive (an atomic entry) and page 2 in device
//! memory; a PROT_NONE mapping; a 4-page file on disk, cached, mapped shared and private; a
//! device and its mirror; and, made when a call asks for them, a read-only cache of the file, a
//! cache with a one-page budget, a cache of a 1 GiB sparse file, and a cache over an in-memory
//! backend with no size limit (as tmpfs: files up to 2^63 − 1).
//!
//! To replay calls: `HETMEM_EXTREME_CHILD=1 HETMEM_EXTREME_SCRATCH=/tmp
//! target/release/deps/extreme_inputs-<hash> --exact subprocess --nocapture`, with the request
//! (`{"per_call":true,"calls":[{"Mirror":{"op":"CheckExclusive","addr":{"Abs":0},
//! "len":17592186044416,"buf":4096}}]}`) on stdin.

mod common;
use common::*;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hetmem::addr::FrameIdx;
use hetmem::hmm::{IntervalNotifier, IntervalOps, NotifyRange};
use hetmem::link::LinkProfile;
use hetmem::pagecache::{CacheConfig, FileBackend, FileCache, FileHandle};
use hetmem::pool::{Owner, Pagemap, PagemapId};
use hetmem::sys::{Memfd, Region};
use hetmem::{
    Cmd, DeviceConfig, DeviceMirror, DmirrorCmd, FaultMode, FileMapOptions, MapOptions, MemoryKind,
    Prot, SoftDevice, Space, SpaceConfig, VaRange, VirtAddr,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::{Deserialize, Serialize};

/// The global allocator: the system's, with the limits [`ALLOC_MAX`] and [`HEAP_MAX`] in a child.
struct Limited;

static LIMITS_ON: AtomicBool = AtomicBool::new(false);
static HEAP: AtomicUsize = AtomicUsize::new(0);

impl Limited {
    /// Whether an allocation of `size` bytes that grows the heap by `growth` is allowed.
    fn allowed(size: usize, growth: usize) -> bool {
        !LIMITS_ON.load(Ordering::Relaxed)
            || (size <= ALLOC_MAX && HEAP.load(Ordering::Relaxed) + growth <= HEAP_MAX)
    }
}

// SAFETY: every call is forwarded to `System` unchanged, or fails with a null pointer (which
// the `GlobalAlloc` contract allows).
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !Self::allowed(l.size(), l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            HEAP.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !Self::allowed(l.size(), l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            HEAP.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HEAP.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with `l` (through this allocator).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if !Self::allowed(new, new.saturating_sub(l.size())) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's pointer, layout and size.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            HEAP.fetch_add(new, Ordering::Relaxed);
            HEAP.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Limited = Limited;

/// A call that has not returned after this long is hung: its child is killed.
const HANG: Duration = Duration::from_secs(5);
/// A call (with the health check after it) that takes longer than this fails as too slow.
const SLOW: Duration = Duration::from_secs(2);
/// Calls slower than this are listed (on stderr) even when they pass.
const NOTE: Duration = Duration::from_secs(1);
/// Address space a child may map beyond its fixture (`RLIMIT_AS`): room for huge reservations
/// (a 16 TiB device pool is only address space, and must get as far as its metadata), not for
/// unbounded ones.
const HEADROOM: u64 = 1 << 45;
/// In a child, a heap allocation larger than this fails (Rust aborts with "memory allocation
/// of N bytes failed"): an allocation sized by an extreme input is found at once, on any
/// machine, instead of taking seconds and gigabytes (or the machine's memory).
const ALLOC_MAX: usize = 1 << 30;
/// In a child, the heap may not grow past this in all.
const HEAP_MAX: usize = 3 << 30;
/// Include the lower-level public modules (`sys::Region`, `sys::Memfd`, `pool::Pagemap`) in the
/// sweep and the sequences.
const LOW_LEVEL: bool = true;
/// Resident memory a single call may add to the child's high-water mark.
const RSS_LIMIT: u64 = 1 << 30;
/// The environment variable that makes the `subprocess` test a child.
const CHILD_ENV: &str = "HETMEM_EXTREME_CHILD";
/// Where a child finds the parent's FIFO, directory and socket.
const SCRATCH_ENV: &str = "HETMEM_EXTREME_SCRATCH";
/// Prefix of the child's protocol lines on stdout.
const MARK: &str = "@@extreme";

const P: u64 = 4096;
const I64M: u64 = i64::MAX as u64;

// ---------------------------------------------------------------------------------------------
// The extreme values
// ---------------------------------------------------------------------------------------------

/// Byte lengths and sizes.
const LENS: &[u64] = &[
    0,
    1,
    P - 1,
    P,
    P + 1,
    2 * P,
    16 * P,
    2 << 20,
    (1 << 44) - P,
    1 << 44,
    1 << 46,
    1 << 62,
    I64M - 10,
    1 << 63,
    !(P - 1), // u64::MAX & !(P - 1): the last page
    u64::MAX,
];

/// Absolute addresses.
const ABS: &[u64] = &[
    0,
    1,
    P - 1,
    P,
    P + 1,
    1 << 44,
    1 << 46,
    1 << 47,
    0x7fff_ffff_f000,
    0x7fff_ffff_fff8,
    1 << 62,
    I64M - 10,
    1 << 63,
    !(P - 1), // u64::MAX & !(P - 1): the last page
    u64::MAX - 7,
    u64::MAX,
];

/// Offsets from a fixture address (see [`Base`]): just before, inside, unaligned, just after.
const REL: &[(Base, i64)] = &[
    (Base::A, -(P as i64)),
    (Base::A, -1),
    (Base::A, 0),
    (Base::A, 1),
    (Base::A, 4),
    (Base::A, P as i64),
    (Base::A, 15 * P as i64),
    (Base::A, 16 * P as i64 - 8),
    (Base::A, 16 * P as i64 - 4),
    (Base::A, 16 * P as i64),
    (Base::A, 17 * P as i64),
    (Base::NoAccess, 0),
    (Base::Shared, 0),
    (Base::Shared, 4 * P as i64 - 4),
    (Base::Shared, 4 * P as i64),
    (Base::Private, 0),
    (Base::ResEnd, -(P as i64)),
    (Base::ResEnd, -8),
    (Base::ResEnd, 0),
    (Base::ResEnd, P as i64),
];

/// Page counts of device commands in the kernel's shape (`DeviceMirror::cmd`).
const NPAGES: &[u64] = &[
    0,
    1,
    2,
    16,
    17,
    512,
    1 << 20,
    1 << 32,
    1 << 40,
    1 << 44,
    1 << 46,
    1 << 51,
    1 << 52,
    1 << 62,
    I64M - 10,
    u64::MAX,
];

/// Buffer lengths (always small: a huge size comes with a small buffer).
const BUFS: &[u64] = &[0, 1, 4, P - 1, P, P + 1, 2 * P, 16 * P, 17 * P];

/// File offsets.
const OFFS: &[u64] = &[
    0,
    1,
    P - 1,
    P,
    P + 1,
    4 * P,
    5 * P,
    1 << 30,
    (1 << 44) - P,
    1 << 44,
    1 << 46,
    1 << 62,
    I64M - 10,
    I64M & !(P - 1),
    1 << 63,
    !(P - 1), // u64::MAX & !(P - 1): the last page
    u64::MAX,
];

/// Device capacities.
const CAPS: &[u64] = &[
    0,
    1,
    P,
    2 << 20,
    1 << 30,
    1 << 44,
    1 << 46,
    1 << 50,
    1 << 62,
    !((2 << 20) - 1), // u64::MAX rounded down to 2 MiB
    u64::MAX,
];

/// Cache budgets and dirty bounds.
const CACHE_SIZES: &[u64] = &[0, 1, P - 1, P, 2 * P, 1 << 44, u64::MAX];

/// Errno values for injected failures.
const ERRNOS: &[i32] = &[0, -1, libc::EIO, libc::ENOSPC, 4095, i32::MAX, i32::MIN];

// ---------------------------------------------------------------------------------------------
// The calls
// ---------------------------------------------------------------------------------------------

/// A fixture address that relative addresses start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Base {
    /// The 16-page anonymous mapping.
    A,
    /// The PROT_NONE mapping.
    NoAccess,
    /// The shared mapping of the file.
    Shared,
    /// The private mapping of the file.
    Private,
    /// The end of the space's reservation.
    ResEnd,
    /// The last anonymous mapping a call of the sequence made (else `A`).
    LastAnon,
    /// The last file mapping a call of the sequence made (else `Shared`). CPU calls that touch
    /// a file mapping a call made are skipped: it may lie past the end of its file, where a CPU
    /// access gets SIGBUS by design.
    LastFile,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Addr {
    Abs(u64),
    At(Base, i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum P3 {
    None,
    Read,
    ReadWrite,
}

/// Which cached file a file call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum F {
    /// The fixture's 4-page file, writable (ext4: files up to 16 TiB).
    Rw,
    /// The same file, read-only.
    Ro,
    /// A 4-page file with a one-page budget and dirty bound.
    Tiny,
    /// A 1 GiB sparse file.
    Sparse,
    /// An in-memory backend without a size limit (4 pages at first).
    Mem,
    /// The cache the last `Open`/`WithBackend` of the sequence made (else `Rw`).
    Last,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum PathSel {
    Missing,
    Empty,
    Directory,
    Fifo,
    Socket,
    DevNull,
    DevZero,
    ProcSelfMem,
    Regular,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum DevKind {
    /// `SoftDevice::private`.
    Private,
    NewPrivate,
    NewCoherent,
    NewSystem,
    /// `with_link` with all-zero bandwidths.
    LinkZero,
    LinkNan,
    LinkInf,
    LinkNegative,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum MOp {
    Read,
    Write,
    MigrateToDevice,
    MigrateRangeToDevice,
    MigrateToSystem,
    Snapshot,
    Exclusive,
    CheckExclusive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum CmdSel {
    Read,
    Write,
    MigrateToDev,
    MigrateToSys,
    Snapshot,
    Exclusive,
    CheckExclusive,
    Release,
    Flags,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Call {
    MapAnon {
        len: u64,
        prot: P3,
    },
    MapAnonWith {
        len: u64,
        prot: P3,
        thread: bool,
        large: bool,
    },
    MapAnonAt {
        addr: Addr,
        len: u64,
        large: bool,
    },
    Protect {
        addr: Addr,
        len: u64,
        prot: P3,
    },
    Unmap {
        addr: Addr,
        len: u64,
    },
    Msync {
        addr: Addr,
        len: u64,
    },
    Pin {
        addr: Addr,
        len: u64,
        long_term: bool,
    },
    AdviseLarge {
        addr: Addr,
        len: u64,
    },
    CpuRead {
        addr: Addr,
        buf: u64,
    },
    CpuWrite {
        addr: Addr,
        buf: u64,
    },
    LoadU32 {
        addr: Addr,
    },
    StoreU32 {
        addr: Addr,
        v: u32,
    },
    FetchAddU64 {
        addr: Addr,
        v: u64,
    },
    Residency {
        addr: Addr,
    },
    InsertNotifier {
        addr: Addr,
        len: u64,
    },
    /// `map_file` (`intercept: None`) or `map_file_with`.
    MapFile {
        file: F,
        offset: u64,
        len: u64,
        prot: P3,
        shared: bool,
        intercept: Option<bool>,
    },
    SpaceWithConfig {
        size: u64,
        stash: u64,
    },
    SpaceModel {
        size: u64,
    },
    Device {
        kind: DevKind,
        capacity: u64,
    },
    DeclareCpuAccess {
        bytes: u64,
    },
    FailNextCopies {
        n: u64,
    },
    Mirror {
        op: MOp,
        addr: Addr,
        /// Bytes.
        len: u64,
        buf: u64,
    },
    Cmd {
        cmd: CmdSel,
        addr: Addr,
        npages: u64,
        buf: u64,
    },
    AtomicFetchAdd {
        addr: Addr,
        v: u64,
    },
    Release,
    Open {
        path: PathSel,
        writable: bool,
        budget: u64,
        dirty: u64,
    },
    WithBackend {
        len: u64,
        writable: bool,
        budget: u64,
        dirty: u64,
    },
    ReadAt {
        file: F,
        off: u64,
        buf: u64,
    },
    WriteAt {
        file: F,
        off: u64,
        buf: u64,
    },
    SetLen {
        file: F,
        len: u64,
    },
    PunchHole {
        file: F,
        off: u64,
        len: u64,
    },
    DirectRead {
        file: F,
        off: u64,
        buf: u64,
    },
    DirectWrite {
        file: F,
        off: u64,
        buf: u64,
    },
    Fsync {
        file: F,
        data_only: bool,
    },
    /// `fail_next_staging(n, errno)`, then a `write_at` and a `read_at` that meet it.
    FailNextStaging {
        file: F,
        n: u32,
        errno: i32,
    },
    /// `writeback_round` and `shrink_to_budget`.
    Writeback {
        file: F,
    },
    /// `start_background_writeback(interval)`, a write, then the guard dropped.
    BackgroundWriteback {
        file: F,
        interval_ns: u64,
    },
    /// `sys::Region::new(len, align, prot)`.
    RegionNew {
        len: u64,
        align: u64,
        prot: P3,
    },
    /// On a 4-page read-write `sys::Region` (`len` is the buffer length of reads and writes).
    RegionOp {
        op: RegOp,
        off: u64,
        len: u64,
    },
    /// On a 4-page `sys::Memfd` (`len` is the buffer length of reads and writes).
    MemfdOp {
        op: FdOp,
        off: u64,
        len: u64,
    },
    /// `pool::Pagemap::new(capacity)`.
    PagemapNew {
        capacity: u64,
    },
    /// On the fixture device's pagemap.
    PagemapFrame {
        op: FrameOp,
        frame: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum RegOp {
    Read,
    Write,
    Zero,
    LoadU64,
    FetchAddU64,
    Discard,
    Protect,
    RemapFresh,
    Populate,
    CopyTo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum FdOp {
    SetLen,
    ReadAt,
    WriteAt,
    Punch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum FrameOp {
    /// The only public per-frame call (allocation, freeing, splitting and dirtying are the
    /// pool's own, crate-private).
    Info,
}

const REG_OPS: &[RegOp] = &[
    RegOp::Read,
    RegOp::Write,
    RegOp::Zero,
    RegOp::LoadU64,
    RegOp::FetchAddU64,
    RegOp::Discard,
    RegOp::Protect,
    RegOp::RemapFresh,
    RegOp::Populate,
    RegOp::CopyTo,
];
const FD_OPS: &[FdOp] = &[FdOp::SetLen, FdOp::ReadAt, FdOp::WriteAt, FdOp::Punch];
const FRAME_OPS: &[FrameOp] = &[FrameOp::Info];
/// Frame indices: one past the fixture device's last frame (8 MiB: 2048 frames), and beyond.
const FRAMES: &[u32] = &[2048, 2048 + 512, 1 << 31, u32::MAX - 511, u32::MAX];
/// Alignments of `Region::new`.
const ALIGNS: &[u64] = &[
    0,
    1,
    P - 1,
    P,
    P + 1,
    2 << 20,
    1 << 30,
    1 << 47,
    1 << 62,
    1 << 63,
    u64::MAX,
];
/// Whether a buffer-taking low-level operation uses `len` as a buffer length.
fn buffer_op(op: RegOp) -> bool {
    matches!(op, RegOp::Read | RegOp::Write)
}

/// What the parent sends a child on stdin.
#[derive(Serialize, Deserialize)]
struct Request {
    /// A fresh fixture for each call (the sweep), or one for the whole sequence.
    per_call: bool,
    calls: Vec<Call>,
}

// ---------------------------------------------------------------------------------------------
// The deterministic sweep
// ---------------------------------------------------------------------------------------------

fn addrs() -> Vec<Addr> {
    ABS.iter()
        .map(|&a| Addr::Abs(a))
        .chain(REL.iter().map(|&(b, o)| Addr::At(b, o)))
        .collect()
}

const PROTS: &[P3] = &[P3::None, P3::Read, P3::ReadWrite];

/// Every entry point with its arguments over their extreme values: addresses × lengths, page
/// counts and buffer sizes, offsets × buffer sizes in full; other arguments one at a time.
fn sweep() -> Vec<Call> {
    let addrs = addrs();
    let a0 = Addr::At(Base::A, 0);
    let mut v = Vec::new();
    for &len in LENS {
        for &prot in PROTS {
            v.push(Call::MapAnon { len, prot });
        }
        v.push(Call::MapAnonWith {
            len,
            prot: P3::ReadWrite,
            thread: true,
            large: true,
        });
        v.push(Call::MapAnonWith {
            len,
            prot: P3::Read,
            thread: false,
            large: false,
        });
        v.push(Call::SpaceWithConfig {
            size: len,
            stash: 64 << 20,
        });
        v.push(Call::SpaceWithConfig {
            size: 1 << 30,
            stash: len,
        });
        v.push(Call::SpaceModel { size: len });
    }
    // Range calls: (addr, len).
    let range_calls = |addr: Addr, len: u64, i: usize| {
        vec![
            Call::MapAnonAt {
                addr,
                len,
                large: i.is_multiple_of(2),
            },
            Call::Protect {
                addr,
                len,
                prot: PROTS[i % 3],
            },
            Call::Unmap { addr, len },
            Call::Msync { addr, len },
            Call::Pin {
                addr,
                len,
                long_term: i % 2 == 1,
            },
            Call::AdviseLarge { addr, len },
            Call::InsertNotifier { addr, len },
        ]
    };
    for (i, &addr) in addrs.iter().enumerate() {
        for (j, &len) in LENS.iter().enumerate() {
            v.extend(range_calls(addr, len, i + j));
        }
    }
    // CPU accesses.
    for &addr in &addrs {
        for &buf in BUFS {
            v.push(Call::CpuRead { addr, buf });
            v.push(Call::CpuWrite { addr, buf });
        }
        v.push(Call::LoadU32 { addr });
        v.push(Call::StoreU32 { addr, v: u32::MAX });
        v.push(Call::FetchAddU64 { addr, v: u64::MAX });
        v.push(Call::Residency { addr });
        v.push(Call::AtomicFetchAdd { addr, v: u64::MAX });
    }
    v.push(Call::AtomicFetchAdd {
        addr: Addr::At(Base::A, P as i64 + 8),
        v: u64::MAX,
    });
    // Device mirror commands.
    let mops = [
        MOp::Read,
        MOp::Write,
        MOp::MigrateToDevice,
        MOp::MigrateRangeToDevice,
        MOp::MigrateToSystem,
        MOp::Snapshot,
        MOp::Exclusive,
        MOp::CheckExclusive,
    ];
    // Starts of the length sweeps: the mapping (page 0 has a device entry), page 0 of the
    // address space (the walk meets the mapping's entries after billions of pages), the last
    // page of the space.
    let len_starts = [a0, Addr::Abs(0), Addr::At(Base::ResEnd, -(P as i64))];
    for op in mops {
        for &len in LENS {
            // Every address with every length, but for check_exclusive, whose walks over huge
            // ranges each hang until fixed: there, the starts above only.
            let starts = if op == MOp::CheckExclusive {
                &len_starts[..]
            } else {
                &addrs[..]
            };
            for &addr in starts {
                v.push(Call::Mirror {
                    op,
                    addr,
                    len,
                    buf: P,
                });
            }
            v.push(Call::Mirror {
                op,
                addr: Addr::At(Base::Shared, 0),
                len,
                buf: 16 * P,
            });
        }
        if op == MOp::CheckExclusive {
            for &addr in &addrs {
                v.push(Call::Mirror {
                    op,
                    addr,
                    len: P,
                    buf: P,
                });
            }
        }
        for &buf in BUFS {
            for len in [P, 16 * P, 17 * P] {
                v.push(Call::Mirror {
                    op,
                    addr: a0,
                    len,
                    buf,
                });
            }
        }
    }
    let cmds = [
        CmdSel::Read,
        CmdSel::Write,
        CmdSel::MigrateToDev,
        CmdSel::MigrateToSys,
        CmdSel::Snapshot,
        CmdSel::Exclusive,
        CmdSel::CheckExclusive,
        CmdSel::Release,
        CmdSel::Flags,
    ];
    for cmd in cmds {
        for &npages in NPAGES {
            v.push(Call::Cmd {
                cmd,
                addr: a0,
                npages,
                buf: P,
            });
        }
        for &addr in &addrs {
            v.push(Call::Cmd {
                cmd,
                addr,
                npages: 1,
                buf: P,
            });
        }
    }
    v.push(Call::Release);
    // Devices.
    let kinds = [
        DevKind::Private,
        DevKind::NewPrivate,
        DevKind::NewCoherent,
        DevKind::NewSystem,
        DevKind::LinkZero,
        DevKind::LinkNan,
        DevKind::LinkInf,
        DevKind::LinkNegative,
    ];
    for kind in kinds {
        for &capacity in CAPS {
            v.push(Call::Device { kind, capacity });
        }
    }
    for n in [0, 1, u64::MAX] {
        v.push(Call::DeclareCpuAccess { bytes: n });
        v.push(Call::FailNextCopies { n });
    }
    // File mappings.
    for file in [F::Rw, F::Ro, F::Mem] {
        for shared in [true, false] {
            for &offset in OFFS {
                v.push(Call::MapFile {
                    file,
                    offset,
                    len: P,
                    prot: P3::Read,
                    shared,
                    intercept: None,
                });
                v.push(Call::MapFile {
                    file,
                    offset,
                    len: 4 * P,
                    prot: P3::ReadWrite,
                    shared,
                    intercept: Some(true),
                });
            }
            for &len in LENS {
                v.push(Call::MapFile {
                    file,
                    offset: 0,
                    len,
                    prot: P3::ReadWrite,
                    shared,
                    intercept: Some(false),
                });
            }
        }
    }
    // File caches.
    let paths = [
        PathSel::Missing,
        PathSel::Empty,
        PathSel::Directory,
        PathSel::Fifo,
        PathSel::Socket,
        PathSel::DevNull,
        PathSel::DevZero,
        PathSel::ProcSelfMem,
        PathSel::Regular,
    ];
    let d = CacheConfig::default();
    let (db, dd) = (d.budget as u64, d.dirty_bound as u64);
    for path in paths {
        for writable in [false, true] {
            v.push(Call::Open {
                path,
                writable,
                budget: db,
                dirty: dd,
            });
        }
    }
    for &s in CACHE_SIZES {
        v.push(Call::Open {
            path: PathSel::Regular,
            writable: true,
            budget: s,
            dirty: dd,
        });
        v.push(Call::Open {
            path: PathSel::Regular,
            writable: true,
            budget: db,
            dirty: s,
        });
        v.push(Call::Open {
            path: PathSel::Regular,
            writable: false,
            budget: s,
            dirty: s,
        });
        v.push(Call::WithBackend {
            len: 4 * P,
            writable: true,
            budget: s,
            dirty: s,
        });
    }
    for &len in LENS {
        v.push(Call::WithBackend {
            len,
            writable: true,
            budget: db,
            dirty: dd,
        });
        v.push(Call::WithBackend {
            len,
            writable: false,
            budget: P,
            dirty: P,
        });
    }
    let files = [F::Rw, F::Ro, F::Tiny, F::Sparse, F::Mem];
    for file in files {
        for &off in OFFS {
            for &buf in BUFS {
                v.push(Call::ReadAt { file, off, buf });
                v.push(Call::WriteAt { file, off, buf });
                v.push(Call::DirectRead { file, off, buf });
                v.push(Call::DirectWrite { file, off, buf });
            }
        }
        let mut lens: Vec<u64> = LENS.iter().chain(OFFS).copied().collect();
        lens.sort_unstable();
        lens.dedup();
        for &len in &lens {
            v.push(Call::SetLen { file, len });
        }
        for &off in OFFS {
            for &len in &lens {
                v.push(Call::PunchHole { file, off, len });
            }
        }
        v.push(Call::Fsync {
            file,
            data_only: false,
        });
        v.push(Call::Fsync {
            file,
            data_only: true,
        });
        v.push(Call::Writeback { file });
        for &errno in ERRNOS {
            v.push(Call::FailNextStaging { file, n: 1, errno });
        }
        v.push(Call::FailNextStaging {
            file,
            n: u32::MAX,
            errno: libc::EIO,
        });
        for interval_ns in [0, 1, u64::MAX] {
            v.push(Call::BackgroundWriteback { file, interval_ns });
        }
    }
    if LOW_LEVEL {
        for &len in LENS {
            for align in [P, 2 << 20] {
                v.push(Call::RegionNew {
                    len,
                    align,
                    prot: P3::ReadWrite,
                });
            }
        }
        for &align in ALIGNS {
            for &prot in PROTS {
                v.push(Call::RegionNew {
                    len: P,
                    align,
                    prot,
                });
            }
        }
        for &op in REG_OPS {
            let small = if buffer_op(op) { BUFS } else { LENS };
            for &off in OFFS {
                v.push(Call::RegionOp { op, off, len: 8 });
            }
            for &len in small {
                v.push(Call::RegionOp { op, off: 0, len });
                v.push(Call::RegionOp {
                    op,
                    off: 3 * P,
                    len,
                });
            }
        }
        for &op in FD_OPS {
            for &off in OFFS {
                v.push(Call::MemfdOp { op, off, len: 1 });
                v.push(Call::MemfdOp { op, off, len: P });
            }
            let lens = if matches!(op, FdOp::ReadAt | FdOp::WriteAt) {
                BUFS
            } else {
                LENS
            };
            for &len in lens {
                v.push(Call::MemfdOp { op, off: 0, len });
            }
        }
        for &capacity in CAPS {
            v.push(Call::PagemapNew { capacity });
        }
        for &op in FRAME_OPS {
            for &frame in FRAMES {
                v.push(Call::PagemapFrame { op, frame });
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The parent: runs calls in children, collects what went wrong
// ---------------------------------------------------------------------------------------------

/// Something wrong with one call.
#[derive(Debug)]
struct Finding {
    kind: &'static str,
    call: String,
    detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:5} {}: {}", self.kind, self.call, self.detail)
    }
}

#[derive(Default)]
struct Outcome {
    findings: Vec<Finding>,
    /// Calls slower than [`NOTE`] (they may still pass).
    slow: Vec<(String, Duration)>,
}

/// The scratch directory the children find a FIFO, a directory and a socket in.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("hetmem-extreme-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("dir")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            dir.join("fifo"),
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        drop(std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap());
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

enum Event {
    Line(String),
    Eof,
}

/// The last part of a child's stderr, on one line.
fn tail(s: &str) -> String {
    let t: String = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    let n = t.chars().count();
    if n > 600 {
        t.chars().skip(n - 600).collect()
    } else {
        t
    }
}

/// Runs `calls` in children (in order; after a call that kills or hangs its child, the rest in
/// a new child), and returns what went wrong. In sequence mode (`per_call` false) a failure
/// ends the run: the rest would not meet the state it was generated for.
fn run_calls(calls: &[Call], per_call: bool, scratch: &Path) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let mut out = Outcome::default();
    let mut next = 0;
    while next < calls.len() {
        let base = next;
        let req = Request {
            per_call,
            calls: calls[base..].to_vec(),
        };
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "subprocess",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, "1")
            .env(SCRATCH_ENV, scratch)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the test binary as a child");
        let pid = child.id();
        let mut stdin = child.stdin.take().unwrap();
        let body = serde_json::to_vec(&req).unwrap();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::Line(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Eof);
        });
        let mut stderr = child.stderr.take().unwrap();
        let err_text = Arc::new(Mutex::new(String::new()));
        let mut err_reader = Some({
            let err_text = err_text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut t = err_text.lock().unwrap();
                    t.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if t.len() > 64 << 10 {
                        let cut = t.len() - (16 << 10);
                        let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(0);
                        t.drain(..cut);
                    }
                }
            })
        });
        // The call in flight: (index in `calls`, description, when it started).
        let mut cur: Option<(usize, String, Instant)> = None;
        let mut last_desc = String::from("(fixture setup, before any call)");
        let mut panicked = false;
        let mut stop = false;
        let setup_deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let deadline = match &cur {
                Some((_, _, t0)) => *t0 + HANG,
                None => setup_deadline.max(Instant::now() + Duration::from_secs(10)),
            };
            let ev = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            match ev {
                Ok(Event::Line(l)) => {
                    let Some(rest) = l.strip_prefix(MARK) else {
                        continue;
                    };
                    let rest = rest.trim_start();
                    let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                    match word {
                        "start" => {
                            let (i, d) = rest.split_once(' ').unwrap_or((rest, ""));
                            let i = base + i.parse::<usize>().unwrap();
                            let d = match calls.get(i) {
                                Some(c) if d.is_empty() => format!("{c:?}"),
                                _ => d.to_string(),
                            };
                            panicked = false;
                            last_desc = d.clone();
                            cur = Some((i, d, Instant::now()));
                        }
                        "done" => {
                            let (i, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                            let i = base + i.parse::<usize>().unwrap();
                            let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                            let (_, d, t0) = cur.take().expect("done without start");
                            let took = t0.elapsed();
                            let call = d.clone();
                            if took > NOTE {
                                out.slow.push((call.clone(), took));
                            }
                            if verdict == "wrong" {
                                out.findings.push(Finding {
                                    kind: "WRONG",
                                    call: call.clone(),
                                    detail: detail.to_string(),
                                });
                            } else if took > SLOW {
                                out.findings.push(Finding {
                                    kind: "SLOW",
                                    call: call.clone(),
                                    detail: format!("took {:.1} s ({detail})", took.as_secs_f64()),
                                });
                            } else if verdict == "rss" {
                                out.findings.push(Finding {
                                    kind: "RSS",
                                    call: call.clone(),
                                    detail: detail.to_string(),
                                });
                            }
                            if verdict != "ok" && !per_call {
                                stop = true;
                            }
                            next = i + 1;
                        }
                        "panic" => {
                            let (call, i) = match &cur {
                                Some((i, d, _)) => (d.clone(), *i),
                                None => (format!("after {last_desc}"), next),
                            };
                            out.findings.push(Finding {
                                kind: "PANIC",
                                call,
                                detail: rest.to_string(),
                            });
                            panicked = true;
                            next = i + 1;
                        }
                        "setup-failed" => {
                            out.findings.push(Finding {
                                kind: "SETUP",
                                call: format!("fixture setup after {last_desc}"),
                                detail: rest.to_string(),
                            });
                            stop = true;
                        }
                        _ => {}
                    }
                    if stop {
                        break;
                    }
                }
                Ok(Event::Eof) => {
                    let status = child.wait().unwrap();
                    // The child is gone: its stderr ends too.
                    if let Some(h) = err_reader.take() {
                        let _ = h.join();
                    }
                    if let Some((i, d, _)) = cur.take() {
                        if !panicked {
                            let how = match std::os::unix::process::ExitStatusExt::signal(&status) {
                                Some(s) => format!("killed by signal {s}"),
                                None => format!("exited with {status}"),
                            };
                            let e = err_text.lock().unwrap().clone();
                            out.findings.push(Finding {
                                kind: "ABORT",
                                call: d.clone(),
                                detail: format!("the process died ({how}); stderr: {}", tail(&e)),
                            });
                        }
                        next = i + 1;
                    } else if next < calls.len() && !stop && !panicked {
                        let e = err_text.lock().unwrap().clone();
                        out.findings.push(Finding {
                            kind: "ABORT",
                            call: format!("between calls, after {last_desc}"),
                            detail: format!("the process died ({status}); stderr: {}", tail(&e)),
                        });
                        next += 1;
                    }
                    break;
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    match cur.take() {
                        Some((i, d, _)) => {
                            out.findings.push(Finding {
                                kind: "HANG",
                                call: d.clone(),
                                detail: format!("no return within {} s (killed)", HANG.as_secs()),
                            });
                            next = i + 1;
                        }
                        None => {
                            out.findings.push(Finding {
                                kind: "HANG",
                                call: format!("between calls, after {last_desc}"),
                                detail: "the child made no progress (killed)".into(),
                            });
                            stop = true;
                        }
                    }
                    break;
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = writer.join();
        drop(rx);
        let _ = reader.join();
        if let Some(h) = err_reader.take() {
            let _ = h.join();
        }
        // What a killed child left in the temp directory (its `TempFile`s).
        for name in ["rw", "tiny", "sparse"] {
            let _ = std::fs::remove_file(
                std::env::temp_dir().join(format!("hetmem-extreme-{name}-{pid}")),
            );
        }
        if stop || (!per_call && !out.findings.is_empty()) {
            break;
        }
    }
    out
}

fn report(what: &str, out: &Outcome) -> String {
    let mut s = format!("{what}: {} problem(s):\n", out.findings.len());
    for f in &out.findings {
        let _ = writeln!(s, "  {f}");
    }
    s
}

fn note_slow(out: &Outcome) {
    for (c, t) in &out.slow {
        eprintln!("extreme_inputs: slow ({:.2} s): {c}", t.as_secs_f64());
    }
}

/// Each argument of each entry point, over its extreme values; each call in a fresh fixture.
#[test]
fn every_entry_point_at_every_extreme() {
    let _w = watchdog("every_entry_point_at_every_extreme", 600);
    let scratch = Scratch::new("sweep");
    let calls = sweep();
    // A few children at once, the calls dealt round-robin: a hung call waits out its timeout
    // without holding up the others.
    let workers = 4;
    let t0 = Instant::now();
    let outs: Vec<Outcome> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|k| {
                let mine: Vec<Call> = calls.iter().skip(k).step_by(workers).cloned().collect();
                let dir = &scratch.0;
                s.spawn(move || run_calls(&mine, true, dir))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = Outcome::default();
    for o in outs {
        all.findings.extend(o.findings);
        all.slow.extend(o.slow);
    }
    all.findings
        .sort_by(|a, b| (a.kind, &a.call).cmp(&(b.kind, &b.call)));
    note_slow(&all);
    eprintln!(
        "extreme_inputs: {} calls in {:.1} s, {} problem(s)",
        calls.len(),
        t0.elapsed().as_secs_f64(),
        all.findings.len()
    );
    assert!(
        all.findings.is_empty(),
        "{}",
        report("extreme values", &all)
    );
}

// ---------------------------------------------------------------------------------------------
// The property test
// ---------------------------------------------------------------------------------------------

/// A value from `set`, a neighbour of one, or any value.
fn pick(set: &'static [u64]) -> BoxedStrategy<u64> {
    prop_oneof![
        6 => proptest::sample::select(set),
        2 => (proptest::sample::select(set), -9i64..=9).prop_map(|(v, d)| v.wrapping_add_signed(d)),
        1 => any::<u64>(),
    ]
    .boxed()
}

/// More offsets for sequences: from what earlier calls mapped.
const REL_SEQ: &[(Base, i64)] = &[
    (Base::LastAnon, 0),
    (Base::LastAnon, -(P as i64)),
    (Base::LastAnon, P as i64),
    (Base::LastAnon, 2 << 20),
    (Base::LastFile, 0),
    (Base::LastFile, P as i64),
];

fn addr_s() -> BoxedStrategy<Addr> {
    prop_oneof![
        2 => pick(ABS).prop_map(Addr::Abs),
        1 => (proptest::sample::select(REL_SEQ), -9i64..=9)
            .prop_map(|((b, o), d)| Addr::At(b, if d.abs() < 6 { o } else { o + d })),
        3 => (proptest::sample::select(REL), -9i64..=9)
            .prop_map(|((b, o), d)| Addr::At(b, if d.abs() < 6 { o } else { o + d })),
    ]
    .boxed()
}

fn buf_s() -> BoxedStrategy<u64> {
    prop_oneof![3 => proptest::sample::select(BUFS), 1 => 0..=17 * P].boxed()
}

fn one_of<T: Clone + std::fmt::Debug + 'static>(v: &'static [T]) -> BoxedStrategy<T> {
    proptest::sample::select(v).boxed()
}

fn prot_s() -> BoxedStrategy<P3> {
    one_of(PROTS)
}

fn file_s() -> BoxedStrategy<F> {
    one_of(&[F::Rw, F::Ro, F::Tiny, F::Sparse, F::Mem, F::Last, F::Last])
}

fn call_s() -> BoxedStrategy<Call> {
    let len = || pick(LENS);
    let mop = one_of(&[
        MOp::Read,
        MOp::Write,
        MOp::MigrateToDevice,
        MOp::MigrateRangeToDevice,
        MOp::MigrateToSystem,
        MOp::Snapshot,
        MOp::Exclusive,
        MOp::CheckExclusive,
    ]);
    let cmd = one_of(&[
        CmdSel::Read,
        CmdSel::Write,
        CmdSel::MigrateToDev,
        CmdSel::MigrateToSys,
        CmdSel::Snapshot,
        CmdSel::Exclusive,
        CmdSel::CheckExclusive,
        CmdSel::Release,
        CmdSel::Flags,
    ]);
    let path = one_of(&[
        PathSel::Missing,
        PathSel::Empty,
        PathSel::Directory,
        PathSel::Fifo,
        PathSel::Socket,
        PathSel::DevNull,
        PathSel::DevZero,
        // Not /proc/self/mem: a later write through the cache (at a random offset) would be a
        // store to this process's memory at that address.
        PathSel::Regular,
        PathSel::Regular,
    ]);
    let kind = one_of(&[
        DevKind::Private,
        DevKind::NewPrivate,
        DevKind::NewCoherent,
        DevKind::NewSystem,
        DevKind::LinkZero,
        DevKind::LinkNan,
        DevKind::LinkInf,
        DevKind::LinkNegative,
    ]);
    let api = prop_oneof![
        2 => (len(), prot_s()).prop_map(|(len, prot)| Call::MapAnon { len, prot }),
        1 => (len(), prot_s(), any::<bool>(), any::<bool>())
            .prop_map(|(len, prot, thread, large)| Call::MapAnonWith { len, prot, thread, large }),
        2 => (addr_s(), len(), any::<bool>()).prop_map(|(addr, len, large)| Call::MapAnonAt { addr, len, large }),
        2 => (addr_s(), len(), prot_s()).prop_map(|(addr, len, prot)| Call::Protect { addr, len, prot }),
        2 => (addr_s(), len()).prop_map(|(addr, len)| Call::Unmap { addr, len }),
        1 => (addr_s(), len()).prop_map(|(addr, len)| Call::Msync { addr, len }),
        2 => (addr_s(), len(), any::<bool>()).prop_map(|(addr, len, long_term)| Call::Pin { addr, len, long_term }),
        1 => (addr_s(), len()).prop_map(|(addr, len)| Call::AdviseLarge { addr, len }),
        2 => (addr_s(), buf_s()).prop_map(|(addr, buf)| Call::CpuRead { addr, buf }),
        2 => (addr_s(), buf_s()).prop_map(|(addr, buf)| Call::CpuWrite { addr, buf }),
        1 => addr_s().prop_map(|addr| Call::LoadU32 { addr }),
        1 => (addr_s(), any::<u32>()).prop_map(|(addr, v)| Call::StoreU32 { addr, v }),
        1 => (addr_s(), any::<u64>()).prop_map(|(addr, v)| Call::FetchAddU64 { addr, v }),
        1 => addr_s().prop_map(|addr| Call::Residency { addr }),
        1 => (addr_s(), len()).prop_map(|(addr, len)| Call::InsertNotifier { addr, len }),
        3 => (file_s(), pick(OFFS), len(), prot_s(), any::<bool>(), proptest::option::of(any::<bool>()))
            .prop_map(|(file, offset, len, prot, shared, intercept)| Call::MapFile { file, offset, len, prot, shared, intercept }),
        1 => (len(), len()).prop_map(|(size, stash)| Call::SpaceWithConfig { size, stash }),
        1 => len().prop_map(|size| Call::SpaceModel { size }),
        2 => (kind, pick(CAPS)).prop_map(|(kind, capacity)| Call::Device { kind, capacity }),
        1 => any::<u64>().prop_map(|bytes| Call::DeclareCpuAccess { bytes }),
        1 => prop_oneof![Just(0u64), Just(1), Just(u64::MAX)].prop_map(|n| Call::FailNextCopies { n }),
        8 => (mop, addr_s(), len(), buf_s())
            .prop_map(|(op, addr, len, buf)| Call::Mirror { op, addr, len, buf }),
        2 => (cmd, addr_s(), pick(NPAGES), buf_s())
            .prop_map(|(cmd, addr, npages, buf)| Call::Cmd { cmd, addr, npages, buf }),
        1 => (addr_s(), any::<u64>()).prop_map(|(addr, v)| Call::AtomicFetchAdd { addr, v }),
        1 => Just(Call::Release),
        1 => (path, any::<bool>(), pick(CACHE_SIZES), pick(CACHE_SIZES))
            .prop_map(|(path, writable, budget, dirty)| Call::Open { path, writable, budget, dirty }),
        2 => (len(), any::<bool>(), pick(CACHE_SIZES), pick(CACHE_SIZES))
            .prop_map(|(len, writable, budget, dirty)| Call::WithBackend { len, writable, budget, dirty }),
        3 => (file_s(), pick(OFFS), buf_s()).prop_map(|(file, off, buf)| Call::ReadAt { file, off, buf }),
        3 => (file_s(), pick(OFFS), buf_s()).prop_map(|(file, off, buf)| Call::WriteAt { file, off, buf }),
        2 => (file_s(), pick(OFFS)).prop_map(|(file, len)| Call::SetLen { file, len }),
        2 => (file_s(), pick(OFFS), len()).prop_map(|(file, off, len)| Call::PunchHole { file, off, len }),
        2 => (file_s(), pick(OFFS), buf_s()).prop_map(|(file, off, buf)| Call::DirectRead { file, off, buf }),
        2 => (file_s(), pick(OFFS), buf_s()).prop_map(|(file, off, buf)| Call::DirectWrite { file, off, buf }),
        1 => (file_s(), any::<bool>()).prop_map(|(file, data_only)| Call::Fsync { file, data_only }),
        1 => (file_s(), prop_oneof![Just(1u32), Just(u32::MAX)], one_of(ERRNOS))
            .prop_map(|(file, n, errno)| Call::FailNextStaging { file, n, errno }),
        1 => file_s().prop_map(|file| Call::Writeback { file }),
        1 => (file_s(), prop_oneof![Just(0u64), Just(1), Just(u64::MAX)])
            .prop_map(|(file, interval_ns)| Call::BackgroundWriteback { file, interval_ns }),
    ]
    .boxed();
    if !LOW_LEVEL {
        return api;
    }
    prop_oneof![
        12 => api,
        1 => (len(), pick(ALIGNS), prot_s()).prop_map(|(len, align, prot)| Call::RegionNew { len, align, prot }),
        1 => (one_of(REG_OPS), pick(OFFS), len())
            .prop_map(|(op, off, len)| Call::RegionOp { op, off, len: if buffer_op(op) { len.min(17 * P) } else { len } }),
        1 => (one_of(FD_OPS), pick(OFFS), len())
            .prop_map(|(op, off, len)| Call::MemfdOp { op, off, len: if matches!(op, FdOp::ReadAt | FdOp::WriteAt) { len.min(17 * P) } else { len } }),
        1 => pick(CAPS).prop_map(|capacity| Call::PagemapNew { capacity }),
    ]
    .boxed()
}

/// Sequences of extreme calls on one fixture: each call returns, in bounded time, whatever the
/// earlier calls left.
#[test]
fn random_sequences_of_extreme_calls() {
    let _w = watchdog("random_sequences_of_extreme_calls", 600);
    let scratch = Scratch::new("random");
    let cfg = Config {
        cases: 512 * soak(),
        failure_persistence: None,
        // A hung case costs `HANG` a run: shrink for a while, not for ever.
        max_shrink_iters: 64,
        max_shrink_time: 30_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(cfg);
    let slow = Mutex::new(Vec::new());
    let r = runner.run(&proptest::collection::vec(call_s(), 1..=8), |calls| {
        let out = run_calls(&calls, false, &scratch.0);
        slow.lock().unwrap().extend(out.slow.iter().cloned());
        if out.findings.is_empty() {
            Ok(())
        } else {
            Err(TestCaseError::fail(report("extreme sequence", &out)))
        }
    });
    note_slow(&Outcome {
        findings: Vec::new(),
        slow: slow.into_inner().unwrap(),
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------------------

/// The child's entry point (a no-op in the normal run).
#[test]
fn subprocess() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    child_main();
}

fn say(line: &str) {
    let line: String = line
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{MARK} {line}");
    let _ = o.flush();
}

fn proc_status(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

fn child_main() -> ! {
    // Die with the parent (a parent killed by its watchdog leaves no child blocked on a FIFO).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // Panics anywhere (a hetmem thread included) are reported with the call in flight.
    std::panic::set_hook(Box::new(|info| say(&format!("panic {info}"))));
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).unwrap();
    let req: Request = serde_json::from_str(&input).unwrap();
    let scratch = PathBuf::from(std::env::var_os(SCRATCH_ENV).expect("scratch directory"));
    let fx = match Fx::new(&scratch) {
        Ok(fx) => fx,
        Err(e) => {
            say(&format!("setup-failed {e}"));
            std::process::exit(2);
        }
    };
    let limit = proc_status("VmSize:") + HEADROOM;
    rustix::process::setrlimit(
        rustix::process::Resource::As,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: None,
        },
    )
    .expect("setrlimit(RLIMIT_AS)");
    LIMITS_ON.store(true, Ordering::Relaxed);
    let n = req.calls.len();
    let mut fx = Some(fx);
    for (i, call) in req.calls.iter().enumerate() {
        if fx.is_none() {
            match Fx::new(&scratch) {
                Ok(f) => fx = Some(f),
                Err(e) => {
                    say(&format!("setup-failed {e}"));
                    std::process::exit(2);
                }
            }
        }
        let hwm = proc_status("VmHWM:");
        let started = std::cell::Cell::new(false);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut begin = |d: &str| {
                say(&format!("start {i} {d}"));
                started.set(true);
            };
            let f = fx.as_mut().expect("a fixture");
            let mut wrong = run_call(f, call, &mut begin);
            if !started.get() {
                begin("");
            }
            if wrong.is_ok()
                && let Err(e) = health(f)
            {
                wrong = Err(format!("the space no longer works after it: {e}"));
            }
            if req.per_call {
                // Dropping the fixture is part of the call (it drops what the call made).
                fx = None;
            }
            wrong
        }));
        match r {
            Ok(Ok(v)) => {
                let grew = proc_status("VmHWM:").saturating_sub(hwm);
                if grew > RSS_LIMIT {
                    say(&format!(
                        "done {i} rss resident memory grew by {} MiB ({v})",
                        grew >> 20
                    ));
                } else {
                    say(&format!("done {i} ok {v}"));
                }
            }
            Ok(Err(w)) => say(&format!("done {i} wrong {w}")),
            Err(_) => std::process::exit(3),
        }
    }
    if !req.per_call {
        // The sequence's fixture is dropped as a call of its own.
        say(&format!("start {n} drop the fixture after the sequence"));
        drop(fx);
        say(&format!("done {n} ok dropped"));
    }
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// The child's fixture
// ---------------------------------------------------------------------------------------------

/// A file backend in memory with no size limit (a filesystem whose largest file is 2^63 − 1, as
/// tmpfs): reads of the data give zeros.
#[derive(Debug)]
struct MemFile {
    len: AtomicU64,
}

impl FileBackend for MemFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = self.len.load(Ordering::SeqCst);
        let n = len.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[..n].fill(0);
        Ok(n)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<usize> {
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > I64M) {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.len.fetch_max(off + buf.len() as u64, Ordering::SeqCst);
        Ok(buf.len())
    }
    fn sync(&self, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.len.load(Ordering::SeqCst))
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > I64M {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.len.store(len, Ordering::SeqCst);
        Ok(())
    }
    fn punch(&self, off: u64, len: u64) -> std::io::Result<()> {
        if off.checked_add(len).is_none_or(|e| e > I64M) {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        Ok(())
    }
}

/// Notifier callbacks that only record the sequence.
struct NoOps;

impl IntervalOps for NoOps {
    fn invalidate(&self, n: &IntervalNotifier, _: &NotifyRange, cur_seq: u64) -> bool {
        n.set_seq(cur_seq);
        true
    }
}

/// See the module doc. Fields drop in order: what calls made first, the space last.
struct Fx {
    /// What calls made that must live on (pins, caches), for the calls after them.
    keep: Vec<Box<dyn std::any::Any>>,
    last: Option<FileHandle>,
    extra: Vec<(F, FileHandle)>,
    mirror: DeviceMirror,
    dev: SoftDevice,
    rw: FileHandle,
    space: Space,
    res: VaRange,
    a: VirtAddr,
    none: VirtAddr,
    shared: VirtAddr,
    private: VirtAddr,
    ops: Arc<NoOps>,
    /// A 4-page read-write region and a second one to copy to (made on first use).
    regions: Option<(Region, Region)>,
    memfd: Option<Memfd>,
    /// The mapped file was made shorter than its mappings: a CPU access past its end gets
    /// SIGBUS, by design (as with the kernel's mmap), so CPU calls there are skipped.
    truncated: bool,
    last_anon: Option<VirtAddr>,
    last_file: Option<VirtAddr>,
    /// The file mappings calls made: they may lie past the end of their file (CPU calls that
    /// touch them are skipped).
    file_maps: Vec<(u64, u64)>,
    scratch: PathBuf,
    rw_path: PathBuf,
    files: Vec<TempFile>,
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

impl Fx {
    fn new(scratch: &Path) -> Result<Fx, String> {
        let e = |what: &str| {
            let what = what.to_string();
            move |e: hetmem::Error| format!("{what}: {e}")
        };
        let p = P as usize;
        let space = Space::new().map_err(e("Space::new"))?;
        let dev = SoftDevice::private(8 << 20).map_err(e("SoftDevice::private"))?;
        let mirror = dev.mirror(&space).map_err(e("mirror"))?;
        let a = space
            .map_anon(16 * p, Prot::ReadWrite)
            .map_err(e("map A"))?;
        space
            .cpu_write(a, &content(16 * p, 1))
            .map_err(e("write A"))?;
        let mut b = vec![0u8; p];
        mirror
            .read(a, p, &mut b)
            .map_err(e("device read of A page 0"))?;
        mirror
            .exclusive(a.add(p), p, &mut b)
            .map_err(e("exclusive on A page 1"))?;
        mirror
            .migrate_to_device(a.add(2 * p), p, &mut b)
            .map_err(e("migrate A page 2"))?;
        let none = space
            .map_anon(4 * p, Prot::None)
            .map_err(e("map PROT_NONE"))?;
        let file = TempFile::new("extreme-rw", &content(4 * p, 2));
        let cache =
            FileCache::open(&file.0, true, CacheConfig::default()).map_err(e("open the file"))?;
        let rw = cache.handle();
        let shared = space
            .map_file(&rw, 0, 4 * p, Prot::ReadWrite, true)
            .map_err(e("map shared"))?;
        let private = space
            .map_file(&rw, 0, 4 * p, Prot::ReadWrite, false)
            .map_err(e("map private"))?;
        space
            .cpu_write(shared.add(8), b"dirty")
            .map_err(e("write shared"))?;
        space
            .cpu_write(private.add(8), b"own")
            .map_err(e("write private"))?;
        Ok(Fx {
            keep: Vec::new(),
            last: None,
            extra: Vec::new(),
            res: space.range(),
            mirror,
            dev,
            rw,
            space,
            a,
            none,
            shared,
            private,
            ops: Arc::new(NoOps),
            regions: None,
            memfd: None,
            truncated: false,
            last_anon: None,
            last_file: None,
            file_maps: Vec::new(),
            scratch: scratch.to_path_buf(),
            rw_path: file.0.clone(),
            files: vec![file],
        })
    }

    fn resolve(&self, a: Addr) -> u64 {
        match a {
            Addr::Abs(v) => v,
            Addr::At(b, off) => {
                let base = match b {
                    Base::A => self.a,
                    Base::NoAccess => self.none,
                    Base::Shared => self.shared,
                    Base::Private => self.private,
                    Base::ResEnd => self.res.end,
                    Base::LastAnon => self.last_anon.unwrap_or(self.a),
                    Base::LastFile => self.last_file.unwrap_or(self.shared),
                };
                (base.get() as u64).wrapping_add_signed(off)
            }
        }
    }

    fn show(&self, a: Addr) -> String {
        match a {
            Addr::Abs(v) => format!("{v:#x}"),
            Addr::At(b, off) => {
                let sign = if off < 0 { '-' } else { '+' };
                format!(
                    "{b:?}{sign}{:#x} (={:#x})",
                    off.unsigned_abs(),
                    self.resolve(a)
                )
            }
        }
    }

    /// The handle of `f`, made on first use.
    fn file(&mut self, f: F) -> Result<FileHandle, String> {
        let f = match f {
            F::Rw => return Ok(self.rw.clone_handle()),
            F::Last => match &self.last {
                Some(h) => return Ok(h.cache().handle()),
                None => return Ok(self.rw.clone_handle()),
            },
            f => f,
        };
        if let Some((_, h)) = self.extra.iter().find(|(g, _)| *g == f) {
            return Ok(h.cache().handle());
        }
        let p = P as usize;
        let d = CacheConfig::default();
        let c = match f {
            F::Ro => FileCache::open(&self.rw_path, false, d),
            F::Tiny => {
                let t = TempFile::new("extreme-tiny", &content(4 * p, 3));
                let c = FileCache::open(
                    &t.0,
                    true,
                    CacheConfig {
                        budget: p,
                        dirty_bound: p,
                    },
                );
                self.files.push(t);
                c
            }
            F::Sparse => {
                let t = TempFile::new("extreme-sparse", b"");
                std::fs::File::options()
                    .write(true)
                    .open(&t.0)
                    .and_then(|f| f.set_len(1 << 30))
                    .map_err(|e| format!("make the sparse file: {e}"))?;
                let c = FileCache::open(&t.0, true, d);
                self.files.push(t);
                c
            }
            F::Mem => FileCache::with_backend(
                Box::new(MemFile {
                    len: AtomicU64::new(4 * P),
                }),
                true,
                d,
            ),
            F::Rw | F::Last => unreachable!(),
        }
        .map_err(|e| format!("open the {f:?} file: {e}"))?;
        let h = c.handle();
        self.extra.push((f, c.handle()));
        Ok(h)
    }

    fn path(&self, p: PathSel) -> PathBuf {
        match p {
            PathSel::Missing => self.scratch.join("missing"),
            PathSel::Empty => PathBuf::new(),
            PathSel::Directory => self.scratch.join("dir"),
            PathSel::Fifo => self.scratch.join("fifo"),
            PathSel::Socket => self.scratch.join("sock"),
            PathSel::DevNull => PathBuf::from("/dev/null"),
            PathSel::DevZero => PathBuf::from("/dev/zero"),
            PathSel::ProcSelfMem => PathBuf::from("/proc/self/mem"),
            PathSel::Regular => self.rw_path.clone(),
        }
    }
}

/// Another handle to the same cache.
trait CloneHandle {
    fn clone_handle(&self) -> FileHandle;
}

impl CloneHandle for FileHandle {
    fn clone_handle(&self) -> FileHandle {
        self.cache().handle()
    }
}

/// After each call: the space still maps, stores, serves a device read and unmaps, in time.
/// (A full reservation or device is not an error here; wrong data is.)
fn health(fx: &Fx) -> Result<(), String> {
    let Ok(x) = fx.space.map_anon(P as usize, Prot::ReadWrite) else {
        return Ok(());
    };
    let r = (|| {
        fx.space
            .cpu_write(x, &[0xa5; 8])
            .map_err(|e| format!("cpu_write: {e}"))?;
        let mut b = vec![0u8; P as usize];
        if fx.mirror.read(x, PAGE, &mut b).is_ok() && b[..8] != [0xa5; 8] {
            return Err(format!(
                "a device read returned {:?}, not what the CPU wrote",
                &b[..8]
            ));
        }
        let mut c = [0u8; 8];
        fx.space
            .cpu_read(x, &mut c)
            .map_err(|e| format!("cpu_read: {e}"))?;
        if c != [0xa5; 8] {
            return Err(format!("a CPU read returned {c:?}, not what the CPU wrote"));
        }
        Ok(())
    })();
    fx.space
        .unmap(x, P as usize)
        .map_err(|e| format!("unmap: {e}"))?;
    r
}

fn prot(p: P3) -> Prot {
    match p {
        P3::None => Prot::None,
        P3::Read => Prot::Read,
        P3::ReadWrite => Prot::ReadWrite,
    }
}

fn show<T: std::fmt::Debug>(r: &hetmem::Result<T>) -> String {
    match r {
        Ok(v) => {
            let s = format!("{v:?}");
            let s: String = s.chars().take(80).collect();
            format!("Ok({s})")
        }
        Err(e) => format!("Err({e}; errno {})", e.errno()),
    }
}

/// `Err(why)` if `must_fail` and `r` is Ok.
fn refuse<T: std::fmt::Debug>(
    r: &hetmem::Result<T>,
    must_fail: bool,
    why: &str,
) -> Result<String, String> {
    if must_fail && r.is_ok() {
        Err(format!("returned {}: {why}", show(r)))
    } else {
        Ok(show(r))
    }
}

/// After a write of `buf` bytes at `off` to a file of `size` bytes: the file is `now` bytes
/// long, which must be `size`, or `off + buf` if that is more (an empty write changes nothing,
/// as `pwrite(2)` of nothing).
fn grown(
    r: &hetmem::Result<()>,
    size: u64,
    off: u64,
    buf: u64,
    now: u64,
) -> Result<String, String> {
    let want = if r.is_err() || buf == 0 {
        size
    } else {
        size.max(off + buf)
    };
    if now != want {
        return Err(format!(
            "returned {} and the file is now {now:#x} bytes long; it was {size:#x}, so it should be {want:#x}",
            show(r)
        ));
    }
    Ok(show(r))
}

/// Runs one call on the fixture; `Ok(what it returned)`, or `Err(why the answer is wrong)`.
/// `begin` is told the call (with its resolved arguments) right before it is made.
fn run_call(fx: &mut Fx, call: &Call, begin: &mut dyn FnMut(&str)) -> Result<String, String> {
    let pu = P as usize;
    let space = fx.space.clone();
    let res = fx.res;
    // Whether [addr, addr+len) is not a valid range of the reservation.
    let outside = |addr: u64, len: u64| {
        addr < res.start.get() as u64
            || addr
                .checked_add(len)
                .is_none_or(|e| e > res.end.get() as u64)
    };
    let bad_range = |addr: u64, len: u64| {
        len == 0 || !addr.is_multiple_of(P) || !len.is_multiple_of(P) || outside(addr, len)
    };
    let va = |a: u64| VirtAddr(a as usize);
    let cpu = match *call {
        Call::CpuRead { addr, buf } | Call::CpuWrite { addr, buf } => Some((addr, buf)),
        Call::LoadU32 { addr } | Call::StoreU32 { addr, .. } => Some((addr, 4)),
        Call::FetchAddU64 { addr, .. } => Some((addr, 8)),
        _ => None,
    };
    if let Some((addr, len)) = cpu {
        let a = fx.resolve(addr);
        let hits = |m: VirtAddr| {
            let m = m.get() as u64;
            a < m + 4 * P && a.saturating_add(len) > m
        };
        let past_eof = fx.truncated && (hits(fx.shared) || hits(fx.private));
        let made = fx
            .file_maps
            .iter()
            .any(|&(m, l)| a < m.saturating_add(l) && a.saturating_add(len) > m);
        if past_eof || made {
            return Ok(
                "skipped: a CPU access past the end of a mapped file is SIGBUS, by design".into(),
            );
        }
    }
    match *call {
        Call::MapAnon { len, prot: p } => {
            begin(&format!("space.map_anon(len={len:#x}, {p:?})"));
            let r = space.map_anon(len as usize, prot(p));
            fx.last_anon = r.as_ref().ok().copied().or(fx.last_anon);
            refuse(
                &r,
                len == 0 || len % P != 0 || len > res.len() as u64,
                "an empty, unaligned or too large length",
            )
        }
        Call::MapAnonWith {
            len,
            prot: p,
            thread,
            large,
        } => {
            let mode = if thread {
                FaultMode::Thread
            } else {
                FaultMode::Signal
            };
            begin(&format!(
                "space.map_anon_with(len={len:#x}, {p:?}, {mode:?}, large={large})"
            ));
            let r = space.map_anon_with(
                len as usize,
                MapOptions {
                    prot: prot(p),
                    mode,
                    large,
                },
            );
            fx.last_anon = r.as_ref().ok().copied().or(fx.last_anon);
            refuse(
                &r,
                len == 0 || len % P != 0 || len > res.len() as u64,
                "an empty, unaligned or too large length",
            )
        }
        Call::MapAnonAt { addr, len, large } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.map_anon_at(addr={}, len={len:#x}, large={large})",
                fx.show(addr)
            ));
            let r = space.map_anon_at(
                va(a),
                len as usize,
                MapOptions {
                    large,
                    ..MapOptions::default()
                },
            );
            if r.is_ok() {
                fx.last_anon = Some(va(a));
            }
            refuse(&r, bad_range(a, len), "an invalid range")
        }
        Call::Protect { addr, len, prot: p } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.protect(addr={}, len={len:#x}, {p:?})",
                fx.show(addr)
            ));
            let r = space.protect(va(a), len as usize, prot(p));
            refuse(&r, bad_range(a, len), "an invalid range")
        }
        Call::Unmap { addr, len } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.unmap(addr={}, len={len:#x})",
                fx.show(addr)
            ));
            let r = space.unmap(va(a), len as usize);
            refuse(&r, bad_range(a, len), "an invalid range")
        }
        Call::Msync { addr, len } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.msync(addr={}, len={len:#x})",
                fx.show(addr)
            ));
            let r = space.msync(va(a), len as usize);
            refuse(&r, bad_range(a, len), "an invalid range")
        }
        Call::Pin {
            addr,
            len,
            long_term,
        } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.pin(addr={}, len={len:#x}, long_term={long_term})",
                fx.show(addr)
            ));
            let r = space.pin(va(a), len as usize, long_term);
            let s = refuse(&r, bad_range(a, len), "an invalid range");
            if let Ok(pin) = r {
                fx.keep.push(Box::new(pin));
            }
            s
        }
        Call::AdviseLarge { addr, len } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.advise_large(addr={}, len={len:#x})",
                fx.show(addr)
            ));
            let r = space.advise_large(va(a), len as usize);
            refuse(&r, bad_range(a, len), "an invalid range")
        }
        Call::CpuRead { addr, buf } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.cpu_read(addr={}, buf={buf:#x} bytes)",
                fx.show(addr)
            ));
            let mut b = vec![0u8; buf as usize];
            let r = space.cpu_read(va(a), &mut b);
            refuse(&r, buf > 0 && outside(a, buf), "a range outside the space")
        }
        Call::CpuWrite { addr, buf } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.cpu_write(addr={}, buf={buf:#x} bytes)",
                fx.show(addr)
            ));
            let b = content(buf as usize, 4);
            let r = space.cpu_write(va(a), &b);
            refuse(&r, buf > 0 && outside(a, buf), "a range outside the space")
        }
        Call::LoadU32 { addr } => {
            let a = fx.resolve(addr);
            begin(&format!("space.load_u32(addr={})", fx.show(addr)));
            let r = space.load_u32(va(a));
            refuse(
                &r,
                !a.is_multiple_of(4) || outside(a, 4),
                "unaligned or outside the space",
            )
        }
        Call::StoreU32 { addr, v } => {
            let a = fx.resolve(addr);
            begin(&format!("space.store_u32(addr={}, {v:#x})", fx.show(addr)));
            let r = space.store_u32(va(a), v);
            refuse(
                &r,
                !a.is_multiple_of(4) || outside(a, 4),
                "unaligned or outside the space",
            )
        }
        Call::FetchAddU64 { addr, v } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.fetch_add_u64(addr={}, {v:#x})",
                fx.show(addr)
            ));
            let r = space.fetch_add_u64(va(a), v);
            refuse(
                &r,
                !a.is_multiple_of(8) || outside(a, 8),
                "unaligned or outside the space",
            )
        }
        Call::Residency { addr } => {
            let a = fx.resolve(addr);
            begin(&format!("space.residency(addr={})", fx.show(addr)));
            Ok(format!("{:?}", space.residency(va(a))))
        }
        Call::InsertNotifier { addr, len } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "space.insert_notifier(addr={}, len={len:#x}) + protect(A) + remove",
                fx.show(addr)
            ));
            let ops: std::sync::Weak<dyn IntervalOps> = {
                let w: std::sync::Weak<NoOps> = Arc::downgrade(&fx.ops);
                w
            };
            let r = space.insert_notifier(va(a), len as usize, ops);
            let s = refuse(
                &r,
                !a.is_multiple_of(P) || len == 0,
                "an unaligned or empty range",
            );
            if let Ok(n) = r {
                let _ = space.protect(fx.a, pu, Prot::ReadWrite);
                space.remove_notifier(&n);
            }
            s
        }
        Call::MapFile {
            file,
            offset,
            len,
            prot: p,
            shared,
            intercept,
        } => {
            let h = fx.file(file)?;
            let name = if intercept.is_some() {
                "map_file_with"
            } else {
                "map_file"
            };
            begin(&format!(
                "space.{name}({file:?} file, offset={offset:#x}, len={len:#x}, {p:?}, {}{})",
                if shared { "shared" } else { "private" },
                intercept.map_or(String::new(), |i| format!(", intercept_stores={i}"))
            ));
            let r = match intercept {
                None => space.map_file(&h, offset, len as usize, prot(p), shared),
                Some(i) => space.map_file_with(
                    &h,
                    offset,
                    len as usize,
                    FileMapOptions {
                        prot: prot(p),
                        shared,
                        intercept_stores: i,
                    },
                ),
            };
            if let Ok(m) = r {
                fx.last_file = Some(m);
                fx.file_maps.push((m.get() as u64, len));
            }
            let past = offset.checked_add(len).is_none_or(|e| e > I64M);
            refuse(
                &r,
                past,
                "a file range past the largest file offset (i64::MAX) must be refused (EOVERFLOW), as mmap does",
            )?;
            refuse(
                &r,
                offset % P != 0 || len == 0 || len % P != 0,
                "an unaligned offset or an empty or unaligned length",
            )
        }
        Call::SpaceWithConfig { size, stash } => {
            begin(&format!(
                "Space::with_config(size={size:#x}, stash={stash:#x}) + map, write, drop"
            ));
            let r = Space::with_config(SpaceConfig {
                size: size as usize,
                stash: stash as usize,
                user_mode_only: false,
                device_private_as_swap: false,
            });
            let s = show(&r);
            if let Ok(sp) = r
                && let Ok(x) = sp.map_anon(pu, Prot::ReadWrite)
            {
                let _ = sp.cpu_write(x, &[1, 2, 3]);
            }
            Ok(s)
        }
        Call::SpaceModel { size } => {
            begin(&format!(
                "Space::new_model(size={size:#x}) + map, write, drop"
            ));
            let r = Space::new_model(size as usize);
            let s = show(&r);
            if let Ok(sp) = r
                && let Ok(x) = sp.map_anon(pu, Prot::ReadWrite)
            {
                let _ = sp.cpu_write(x, &[1, 2, 3]);
            }
            Ok(s)
        }
        Call::Device { kind, capacity } => {
            let cap = capacity as usize;
            let link = |v: f64| LinkProfile {
                name: "extreme",
                local_gbps: v,
                link_gbps: v,
                link_latency_us: v,
            };
            let cfg = |kind| DeviceConfig {
                kind,
                capacity: cap,
            };
            begin(&format!(
                "{}(capacity={capacity:#x}) + mirror, migrate, read, declare_cpu_access(u64::MAX), release",
                match kind {
                    DevKind::Private => "SoftDevice::private",
                    DevKind::NewPrivate => "SoftDevice::new(Private)",
                    DevKind::NewCoherent => "SoftDevice::new(Coherent)",
                    DevKind::NewSystem => "SoftDevice::new(System)",
                    DevKind::LinkZero => "SoftDevice::with_link(Private, 0 GB/s)",
                    DevKind::LinkNan => "SoftDevice::with_link(Private, NaN GB/s)",
                    DevKind::LinkInf => "SoftDevice::with_link(Coherent, inf GB/s)",
                    DevKind::LinkNegative => "SoftDevice::with_link(Private, -1 GB/s)",
                }
            ));
            let r = match kind {
                DevKind::Private => SoftDevice::private(cap),
                DevKind::NewPrivate => SoftDevice::new(cfg(MemoryKind::Private)),
                DevKind::NewCoherent => SoftDevice::new(cfg(MemoryKind::Coherent)),
                DevKind::NewSystem => SoftDevice::new(cfg(MemoryKind::System)),
                DevKind::LinkZero => SoftDevice::with_link(cfg(MemoryKind::Private), link(0.0)),
                DevKind::LinkNan => SoftDevice::with_link(cfg(MemoryKind::Private), link(f64::NAN)),
                DevKind::LinkInf => {
                    SoftDevice::with_link(cfg(MemoryKind::Coherent), link(f64::INFINITY))
                }
                DevKind::LinkNegative => {
                    SoftDevice::with_link(cfg(MemoryKind::Private), link(-1.0))
                }
            };
            let s = refuse(
                &r,
                capacity == 0 || kind == DevKind::NewSystem,
                "no capacity, or system memory",
            )?;
            if let Ok(dev) = r {
                let m = dev
                    .mirror(&space)
                    .map_err(|e| format!("mirror of the new device: {e}"))?;
                let a3 = fx.a.add(3 * pu);
                let _ = m.migrate_range_to_device(a3, pu);
                let mut b = vec![0u8; pu];
                let _ = m.read(a3, pu, &mut b);
                dev.declare_cpu_access(u64::MAX);
                let _ = dev.link_report();
                let _ = dev.release();
            }
            Ok(s)
        }
        Call::DeclareCpuAccess { bytes } => {
            begin(&format!("dev.declare_cpu_access({bytes:#x}) + link_report"));
            fx.dev.declare_cpu_access(bytes);
            Ok(format!("{:?}", fx.dev.link_report()))
        }
        Call::FailNextCopies { n } => {
            begin(&format!("dev.fail_next_copies({n:#x}) + migrate A page 3"));
            fx.dev.fail_next_copies(n);
            Ok(show(
                &fx.mirror.migrate_range_to_device(fx.a.add(3 * pu), pu),
            ))
        }
        Call::Mirror { op, addr, len, buf } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "mirror.{}(addr={}, len={len:#x}, buf={buf:#x} bytes)",
                mop_name(op),
                fx.show(addr)
            ));
            let mut b = content(buf as usize, 5);
            let m = &fx.mirror;
            let (at, n) = (va(a), len as usize);
            let r = match op {
                MOp::Read => m.read(at, n, &mut b),
                MOp::Write => m.write(at, n, &b),
                MOp::MigrateToDevice => m.migrate_to_device(at, n, &mut b),
                MOp::MigrateRangeToDevice => m.migrate_range_to_device(at, n),
                MOp::MigrateToSystem => m.migrate_to_system(at, n),
                MOp::Snapshot => m.snapshot(at, n, &mut b),
                MOp::Exclusive => m.exclusive(at, n, &mut b),
                MOp::CheckExclusive => m.check_exclusive(at, n),
            };
            let wraps = a.checked_add(len).is_none();
            refuse(
                &r,
                wraps || len == 0 || !len.is_multiple_of(P) || !a.is_multiple_of(P),
                "an unaligned, empty or wrapping range",
            )?;
            let small = match op {
                MOp::Read | MOp::Write | MOp::MigrateToDevice | MOp::Exclusive => buf < len,
                MOp::Snapshot => buf < len / P,
                _ => false,
            };
            refuse(&r, small, "the buffer is smaller than the range")
        }
        Call::Cmd {
            cmd,
            addr,
            npages,
            buf,
        } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "mirror.cmd({cmd:?}, addr={}, npages={npages:#x}, buf={buf:#x} bytes)",
                fx.show(addr)
            ));
            let mut b = content(buf as usize, 6);
            let c = match cmd {
                CmdSel::Read => Cmd::Read,
                CmdSel::Write => Cmd::Write,
                CmdSel::MigrateToDev => Cmd::MigrateToDev,
                CmdSel::MigrateToSys => Cmd::MigrateToSys,
                CmdSel::Snapshot => Cmd::Snapshot,
                CmdSel::Exclusive => Cmd::Exclusive,
                CmdSel::CheckExclusive => Cmd::CheckExclusive,
                CmdSel::Release => Cmd::Release,
                CmdSel::Flags => Cmd::Flags,
            };
            let mut arg = DmirrorCmd {
                addr: a,
                buf: &mut b,
                npages,
                cpages: 0,
                faults: 0,
            };
            let rc = fx.mirror.cmd(c, &mut arg);
            let wraps = npages
                .checked_mul(P)
                .and_then(|n| a.checked_add(n))
                .is_none()
                || npages == 0;
            if !(-4095..=0).contains(&rc) {
                return Err(format!("returned {rc}, not 0 or -errno"));
            }
            if (wraps || !a.is_multiple_of(P)) && rc != -libc::EINVAL {
                return Err(format!(
                    "returned {rc}: an unaligned, empty or wrapping range is -EINVAL"
                ));
            }
            Ok(format!(
                "rc {rc}, cpages {}, faults {}",
                arg.cpages, arg.faults
            ))
        }
        Call::AtomicFetchAdd { addr, v } => {
            let a = fx.resolve(addr);
            begin(&format!(
                "mirror.atomic_fetch_add(addr={}, {v:#x})",
                fx.show(addr)
            ));
            let r = fx.mirror.atomic_fetch_add(va(a), v);
            refuse(
                &r,
                !a.is_multiple_of(8) || outside(a, 8),
                "unaligned or outside the space",
            )
        }
        Call::Release => {
            begin("mirror.release()");
            Ok(show(&fx.mirror.release()))
        }
        Call::Open {
            path,
            writable,
            budget,
            dirty,
        } => {
            let p = fx.path(path);
            begin(&format!(
                "FileCache::open({path:?} {p:?}, writable={writable}, budget={budget:#x}, dirty_bound={dirty:#x})"
            ));
            let r = FileCache::open(
                &p,
                writable,
                CacheConfig {
                    budget: budget as usize,
                    dirty_bound: dirty as usize,
                },
            );
            let s = refuse(
                &r,
                budget < P || dirty < P,
                "a budget or dirty bound below a page",
            )?;
            if let Ok(c) = r {
                fx.last = Some(c.handle());
            }
            Ok(s)
        }
        Call::WithBackend {
            len,
            writable,
            budget,
            dirty,
        } => {
            begin(&format!(
                "FileCache::with_backend(a {len:#x}-byte file, writable={writable}, budget={budget:#x}, dirty_bound={dirty:#x})"
            ));
            let r = FileCache::with_backend(
                Box::new(MemFile {
                    len: AtomicU64::new(len),
                }),
                writable,
                CacheConfig {
                    budget: budget as usize,
                    dirty_bound: dirty as usize,
                },
            );
            let s = refuse(
                &r,
                budget < P || dirty < P,
                "a budget or dirty bound below a page",
            )?;
            if let Ok(c) = r {
                let h = c.handle();
                // Read the last byte: the cache meets the end of the file.
                let mut one = [0u8; 1];
                let _ = h.read_at(len.saturating_sub(1), &mut one);
                fx.last = Some(h);
            }
            Ok(s)
        }
        Call::ReadAt { file, off, buf } => {
            let h = fx.file(file)?;
            begin(&format!(
                "{file:?}.read_at(off={off:#x}, buf={buf:#x} bytes)"
            ));
            let mut b = vec![0u8; buf as usize];
            let size = h.len();
            let r = h.read_at(off, &mut b);
            let want = size.saturating_sub(off).min(buf);
            match r {
                Ok(n) if n as u64 != want => Err(format!(
                    "returned {n}: a {buf}-byte read at {off:#x} of a {size:#x}-byte file reads {want}"
                )),
                _ => Ok(show(&r)),
            }
        }
        Call::DirectRead { file, off, buf } => {
            let h = fx.file(file)?;
            begin(&format!(
                "{file:?}.direct_read(off={off:#x}, buf={buf:#x} bytes)"
            ));
            let mut b = vec![0u8; buf as usize];
            let r = h.direct_read(off, &mut b);
            match r {
                Ok(n) if n > b.len() => Err(format!("returned {n} for a {}-byte buffer", b.len())),
                _ => Ok(show(&r)),
            }
        }
        Call::WriteAt { file, off, buf } => {
            let h = fx.file(file)?;
            begin(&format!(
                "{file:?}.write_at(off={off:#x}, buf={buf:#x} bytes)"
            ));
            let size = h.len();
            let r = h.write_at(off, &content(buf as usize, 7));
            let past = buf > 0 && off.checked_add(buf).is_none_or(|e| e > I64M);
            refuse(
                &r,
                past,
                "a write past the largest file offset (i64::MAX) must be refused (EFBIG)",
            )?;
            grown(&r, size, off, buf, h.len())
        }
        Call::DirectWrite { file, off, buf } => {
            let h = fx.file(file)?;
            begin(&format!(
                "{file:?}.direct_write(off={off:#x}, buf={buf:#x} bytes)"
            ));
            let size = h.len();
            let r = h.direct_write(off, &content(buf as usize, 8));
            let past = buf > 0 && off.checked_add(buf).is_none_or(|e| e > I64M);
            refuse(
                &r,
                past,
                "a write past the largest file offset (i64::MAX) must be refused (EFBIG)",
            )?;
            grown(&r, size, off, buf, h.len())
        }
        Call::SetLen { file, len } => {
            let h = fx.file(file)?;
            begin(&format!("{file:?}.set_len({len:#x})"));
            let r = h.set_len(len);
            if r.is_ok() && len < 4 * P && Arc::ptr_eq(h.cache(), fx.rw.cache()) {
                fx.truncated = true;
            }
            refuse(
                &r,
                len > I64M,
                "a length past the largest file offset (i64::MAX) must be refused",
            )
        }
        Call::PunchHole { file, off, len } => {
            let h = fx.file(file)?;
            begin(&format!("{file:?}.punch_hole(off={off:#x}, len={len:#x})"));
            let r = h.punch_hole(off, len);
            let past = off.checked_add(len).is_none_or(|e| e > I64M);
            refuse(
                &r,
                past || len == 0 || off % P != 0 || len % P != 0,
                "an empty, unaligned or too large range",
            )
        }
        Call::Fsync { file, data_only } => {
            let h = fx.file(file)?;
            begin(&format!(
                "{file:?}.{}()",
                if data_only { "fdatasync" } else { "fsync" }
            ));
            Ok(show(&if data_only { h.fdatasync() } else { h.fsync() }))
        }
        Call::FailNextStaging { file, n, errno } => {
            let h = fx.file(file)?;
            begin(&format!(
                "{file:?}: fail_next_staging({n}, errno {errno}) + write_at(8 KiB) + read_at + fsync"
            ));
            h.cache().fail_next_staging(n, errno);
            let w = h.write_at(0, &content(2 * pu, 9));
            let mut b = vec![0u8; pu];
            let rd = h.read_at(P, &mut b);
            let sy = h.fsync();
            Ok(format!(
                "write {}, read {}, fsync {}",
                show(&w),
                show(&rd),
                show(&sy)
            ))
        }
        Call::Writeback { file } => {
            let h = fx.file(file)?;
            begin(&format!("{file:?}: writeback_round + shrink_to_budget"));
            let c = h.cache();
            Ok(format!(
                "{} written, {} evicted",
                c.writeback_round(),
                c.shrink_to_budget()
            ))
        }
        Call::BackgroundWriteback { file, interval_ns } => {
            let h = fx.file(file)?;
            begin(&format!(
                "{file:?}: start_background_writeback({interval_ns} ns) + write_at + drop"
            ));
            let g = h
                .cache()
                .start_background_writeback(Duration::from_nanos(interval_ns));
            let w = h.write_at(0, &content(pu, 10));
            // Dropping the writer must return in bounded time whatever the interval (zero or
            // centuries), whether or not it has run yet.
            drop(g);
            Ok(show(&w))
        }
        Call::RegionNew {
            len,
            align,
            prot: p,
        } => {
            begin(&format!(
                "sys::Region::new(len={len:#x}, align={align:#x}, {p:?})"
            ));
            let r =
                Region::new(len as usize, align as usize, prot(p)).map_err(|e| hetmem::Error::Os {
                    op: "Region::new",
                    source: e,
                });
            let bad = len == 0 || len % P != 0 || !align.is_power_of_two() || align < P;
            refuse(
                &r,
                bad,
                "an empty or unaligned length, or an alignment that is not a power of two of at least a page",
            )
        }
        Call::RegionOp { op, off, len } => {
            if fx.regions.is_none() {
                let mk = || {
                    Region::new(4 * pu, pu, Prot::ReadWrite)
                        .map_err(|e| format!("Region::new: {e}"))
                };
                fx.regions = Some((mk()?, mk()?));
            }
            let (rg, other) = fx.regions.as_ref().expect("made above");
            let (o, l) = (off as usize, len as usize);
            begin(&format!(
                "sys::Region(4 pages).{op:?}(off={off:#x}, len={len:#x})"
            ));
            let mut b = vec![0u8; if buffer_op(op) { l } else { 0 }];
            let r = match op {
                RegOp::Read => rg.read(o, &mut b),
                RegOp::Write => rg.write(o, &b),
                RegOp::Zero => rg.zero(o, l),
                RegOp::LoadU64 => rg.load_u64(o).map(drop),
                RegOp::FetchAddU64 => rg.fetch_add_u64(o, u64::MAX).map(drop),
                RegOp::Discard => rg.discard(o, l),
                RegOp::Protect => rg.protect(o, l, Prot::ReadWrite),
                RegOp::RemapFresh => rg.remap_fresh(o, l, Prot::ReadWrite),
                RegOp::Populate => rg.populate(o, l),
                RegOp::CopyTo => rg.copy_to(o, other, 0, l),
            }
            .map_err(|e| hetmem::Error::Os {
                op: "Region",
                source: e,
            });
            let n = match op {
                RegOp::LoadU64 | RegOp::FetchAddU64 => 8,
                _ => len,
            };
            refuse(
                &r,
                off.checked_add(n).is_none_or(|e| e > 4 * P),
                "a range outside the region",
            )
        }
        Call::MemfdOp { op, off, len } => {
            if fx.memfd.is_none() {
                let m = Memfd::new("extreme").map_err(|e| format!("Memfd::new: {e}"))?;
                m.set_len(4 * P)
                    .map_err(|e| format!("Memfd::set_len: {e}"))?;
                fx.memfd = Some(m);
            }
            let m = fx.memfd.as_ref().expect("made above");
            begin(&format!(
                "sys::Memfd(4 pages).{op:?}(off={off:#x}, len={len:#x})"
            ));
            let r = match op {
                FdOp::SetLen => m.set_len(off),
                FdOp::ReadAt => m.read_at(off, &mut vec![0u8; len as usize]).map(drop),
                FdOp::WriteAt => m.write_at(off, &content(len as usize, 11)),
                FdOp::Punch => m.punch(off, len),
            }
            .map_err(|e| hetmem::Error::Os {
                op: "Memfd",
                source: e,
            });
            let past = match op {
                FdOp::SetLen => off > I64M,
                FdOp::ReadAt => false,
                FdOp::WriteAt => len > 0 && off.checked_add(len).is_none_or(|e| e > I64M),
                FdOp::Punch => off.checked_add(len).is_none_or(|e| e > I64M),
            };
            refuse(&r, past, "past the largest file offset (i64::MAX)")
        }
        Call::PagemapNew { capacity } => {
            begin(&format!(
                "pool::Pagemap::new(PagemapId(254), Private, capacity={capacity:#x})"
            ));
            let r = Pagemap::new(
                PagemapId(254),
                MemoryKind::Private,
                Owner(u64::MAX),
                capacity as usize,
            );
            refuse(&r, capacity == 0, "no capacity")
        }
        Call::PagemapFrame { op, frame } => {
            let pm = fx.dev.pagemap().clone();
            begin(&format!(
                "dev.pagemap().{op:?}(FrameIdx({frame:#x})) of {} frames",
                pm.nframes()
            ));
            let f = FrameIdx(frame);
            match op {
                FrameOp::Info => Ok(format!("{:?}", pm.frame_info(f))),
            }
        }
    }
}

fn mop_name(op: MOp) -> &'static str {
    match op {
        MOp::Read => "read",
        MOp::Write => "write",
        MOp::MigrateToDevice => "migrate_to_device",
        MOp::MigrateRangeToDevice => "migrate_range_to_device",
        MOp::MigrateToSystem => "migrate_to_system",
        MOp::Snapshot => "snapshot",
        MOp::Exclusive => "exclusive",
        MOp::CheckExclusive => "check_exclusive",
    }
}
