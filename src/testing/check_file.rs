//! The model checker of hetmem's page cache for files (`hetmem::pagecache`), shared by the
//! model-based property test (`tests/file_cache_model.rs`) and the fuzz target
//! (`fuzz/fuzz_targets/file_ops.rs`). Not part of hetmem's API.
//!
//! A [`World`] is a real temporary file (under [`std::env::temp_dir`], removed when the world is
//! dropped) cached by a [`FileCache`] with a small budget ([`BUDGET_PAGES`] pages: eviction
//! happens all the time) and a dirty bound of [`DIRTY_PAGES`] pages, read and written through a
//! [`FaultyBackend`] (behind an observer that records which backend calls failed), two
//! [`FileHandle`]s, and optionally (`mapped`) a [`Space`] with a shared read-write mapping of the
//! first [`MAP_LEN`] bytes of the file (intercepting stores or tracking them asynchronously) and
//! a private read-write mapping of the same bytes. Every world has two software devices
//! ([`SoftDevice`]): a device-private one and a device-coherent one with room for
//! [`COHERENT_ROOM`] pages (the world holds its other frames), both mirroring the space with the
//! mappings. The model is the bytes the process sees and, per handle, the errnos of the
//! writeback error events it has not reported yet; with the mappings, also a snapshot per
//! filled private page; and the placement of each file page (on which device, if any).
//!
//! [`apply`] runs one [`Op`] on the real objects, checks its outcome against the model, updates
//! the model, and then checks the whole state (see below); [`check_all`] ends a run: it syncs
//! both handles, drops the world and reads the file back through a fresh cache. Both return the
//! first mismatch as an error message; neither depends on a test framework. An `Op` must be *in
//! range* ([`Op::in_range`]: what the property test's strategy produces); the fuzz target clamps
//! its decoded input with [`Op::clamped`].
//!
//! # The operations
//!
//! `write_at` at offsets in the first [`WINDOW`] pages and lengths up to [`MAX_IO`] (often past
//! the end of file), `read_at`, `set_len` (shrink and extend, page-aligned or not), page-aligned
//! `punch_hole`, `fsync`/`fdatasync` on either of two handles, `direct_read`, `direct_write`, a
//! fresh second handle, and fault-plan changes on the [`FaultyBackend`] (fail the next one or
//! two writes with EIO or ENOSPC, a short write, a failed sync, a failed read of the file, no
//! fault), and staging faults ([`FileCache::fail_next_staging`]: the next write into the memfd
//! that allocates fails with ENOMEM or ENOSPC). With the mappings: word stores and loads through
//! the shared mapping and whole-page device reads and writes (within the end of file, after
//! clearing the fault plans: a failed fill there is SIGBUS): a load or device read must return
//! the model's bytes, a store or device write changes the model (through an intercepting mapping
//! too: writeback revokes the device's write access before it protects a page again). Word stores and loads through the private mapping
//! are checked against per-page snapshots taken when the space reports the page filled (the
//! file's bytes at that moment; fault-around fills neighbours too), never reach the file, and
//! survive truncation; filled private pages migrate to the device and back (the device reads
//! their snapshots, a CPU access brings them back); the shared mapping is made read-only and
//! read-write again, and both mappings are unmapped and mapped again; the device is removed (its
//! pages come back to system memory) and replaced; pages of either mapping are pinned (short or
//! long term, one pin at a time: pinned private pages stay in system memory when their run
//! migrates, pinned shared pages are not evicted, a pin left on an unmapped mapping pins
//! nothing). Without the mappings those operations do nothing (the cache's own eviction is
//! checked alone).
//!
//! Placements, in every world: file pages are placed on either device through the cache
//! ([`FileCache::place_on_device`], [`FileCache::place_in_system`], with the fault plans as they
//! are) or, with the mappings, through the device's migrate commands on the shared mapping
//! ([`DeviceMirror::migrate_range_to_device`], [`DeviceMirror::migrate_to_system`]); either
//! device is released ([`SoftDevice::release`]) or removed (dropped with its pages); the device
//! operations above go through either device. Every other operation runs on placed pages: the
//! bytes the model expects do not depend on where a page lives.
//!
//! # The checks
//!
//! Which backend calls failed is observed by a wrapper around the faulty backend (not taken from
//! the cache's own counters); a failed *data* write of `direct_write` (the caller's buffer) is
//! returned by that call and is not a writeback error event. Checked after every operation:
//!
//! - `read_at` over the whole file (in chunks of varying size, through either handle) returns the
//!   model's bytes, and each handle's `len()` is the model's length. In "sparse" worlds the whole
//!   file is read only every [`SPARSE`] operations and otherwise the pages around the operation:
//!   full reads fill the cache and reorder its LRU after every operation, which would hide the
//!   states a longer run reaches (uncached pages past a grown end, old clean pages, evictions
//!   inside an operation);
//! - a random `read_at`/`direct_read` returns exactly the model's bytes;
//! - a `write_at` or `direct_write` that fails changed nothing (the next full read proves it), and
//!   fails only when an injected fault fired during it (a write refused by the dirty bound, or
//!   a staging fault, which is no writeback error event);
//! - `fsync` fails exactly when the handle has an unreported event (each event reported once per
//!   handle: errseq), with one of those events' errnos; after an `fsync` that returns Ok, the file
//!   on disk (read with `std::fs::read`, bypassing the cache) equals the model exactly; after one
//!   that returns Err, the fault plan is cleared and a retry on the same handle returns Ok and the
//!   disk then equals the model;
//! - dirty bytes never exceed the dirty bound; cached bytes are within the budget after every
//!   `read_at`/`write_at` during which no injected fault fired (those are the calls that evict),
//!   and no other call but a placement (which fills the pages it places and leaves the budget
//!   to the next eviction) adds cached bytes over the budget (with a mapping, the eviction inside
//!   `read_at`/`write_at` leaves mapped pages to the background evictor: the check runs its
//!   `shrink_to_budget` first). With an asynchronously tracked mapping (whose pages are never
//!   evicted and whose stores count against the dirty bound only at the next scan) the budget
//!   and the bound are not checked;
//! - after an access through a mapping or the device (with no fault planned), no backend call
//!   failed;
//! - the placement of every file page ([`FileCache::placement`]) after each operation (and again
//!   after the check's reads): a placement puts on the device exactly the pages in the range and
//!   the file that are not placed already nor pinned, in order while the device has room (none
//!   fits: ENOMEM; through the mirror, ENOENT naming a page of the range not on the device); a
//!   device-private placement is refused (`StoresNotIntercepted`, EBUSY) exactly when the range
//!   holds a page of the file and the shared mapping does not intercept stores; a page comes
//!   back only as the contract says (a CPU access through the shared mapping, `write_at`, a pin
//!   — coherent pages only for a long-term one —, the other device's access, a return, the
//!   device's release or removal), leaves the cache with truncate, punch and a direct write
//!   that covers it whole, and may otherwise only be evicted (where eviction runs: `read_at`
//!   and `write_at` without the mappings, the background evictor with an intercepting mapping);
//!   no page past the end of file is cached;
//! - the replicas of every file page ([`FileCache::replica_owners`], see [`Op::Replicate`]):
//!   made for the pages of the range not on a device, not pinned, not replicated yet, in order
//!   while the device has room; refused exactly as a device-private placement; dropped by every
//!   write of the page (CPU store, either device's write, `write_at`, direct write, truncation
//!   into or below it, punch), a pin, a return and the device's release or removal (a drop
//!   that settles the page brings it back from the device it is on, a coherent one too), and
//!   otherwise only by eviction; the device reads its replicas as the model's bytes;
//! - each device's used memory is exactly its pages (file pages placed on it and replicated on
//!   it; the private mapping's pages on the device-private device; the world's frames on the
//!   coherent one),
//!   and the cache's count of placed pages agrees: every page that leaves frees its frame;
//! - the dirty bound is not checked from a device write to a device-private frame until the
//!   next `fsync` that returns Ok (the owner writes its frames with no fault: such writes count
//!   once collected).
//!
//! At the end ([`check_all`]) the file is synced through both handles (each `fsync` checked as
//! above), the world dropped (the file on disk must still equal the model) and the file reopened
//! in a fresh cache: it reads as the disk.
//!
//! # Shared anonymous memory
//!
//! [`World::new_anonymous`] runs the same operations and checks on a cache without a file
//! (`MAP_SHARED | MAP_ANONYMOUS` memory, [`crate::pagecache::AnonBackend`]): every placement,
//! replicas, both mappings, pins, devices. What differs is what the contract says differs:
//! nothing is written back (`fsync` returns Ok, the fault plans change nothing), no page is
//! evicted (no budget, no dirty bound: those checks are off, and any eviction is a mismatch),
//! direct I/O is `read_at`/`write_at`, and there is no disk to compare or reopen.

use std::path::PathBuf;

use crate::pagecache::{
    CacheConfig, FaultPlan, FaultyBackend, FileBackend, FileCache, FileHandle, PagePlacement,
    StdFile,
};
use crate::space::{FileMapOptions, Residency, Space};
use crate::sync::{Arc, Mutex, lock};
use crate::{DeviceMirror, PAGE_SIZE, Prot, SoftDevice, VirtAddr};

const PAGE: usize = PAGE_SIZE;

/// Offsets of the operations fall within this many pages (the file grows a little past it).
pub const WINDOW: usize = 16;
/// The cache's budget, in pages.
pub const BUDGET_PAGES: usize = 8;
/// The cache's dirty bound, in pages.
pub const DIRTY_PAGES: usize = 6;
/// The cache's budget, in bytes.
pub const BUDGET: usize = BUDGET_PAGES * PAGE;
/// The cache's dirty bound, in bytes.
pub const DIRTY: usize = DIRTY_PAGES * PAGE;
/// Most bytes of one read or write (and, in words, of one store or load through a mapping).
pub const MAX_IO: usize = 3 * PAGE;
/// Length of the mappings of the file (from offset 0): the window and the pages the file grows
/// past it.
pub const MAP_LEN: usize = (WINDOW + 4) * PAGE;
/// Pages of the mappings.
pub const MAP_PAGES: usize = MAP_LEN / PAGE;
/// In sparse worlds, the whole file is read every this many operations.
pub const SPARSE: usize = 8;
/// Capacity of the world's devices (a pool rounds it up to whole 2 MiB blocks).
pub const DEVICE_BYTES: usize = 1 << 20;
/// Most pages of one placement or return ([`Op::Place`], [`Op::Unplace`]).
pub const MAX_PLACE: usize = 6;
/// Free frames of the device-coherent device when it holds no file page: the world holds the
/// rest of its frames, so that placements fill it up (the pages that fit move, the rest stay;
/// none fits: ENOMEM).
pub const COHERENT_ROOM: usize = 4;

/// A change of the fault plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fail the next `n` (1 or 2) writes with the errno (EIO or ENOSPC).
    FailWrites(u32, i32),
    /// The next write is short.
    ShortWrite,
    /// The next sync fails with the errno (EIO or ENOSPC).
    FailSync(i32),
    /// The next read of the file fails with the errno (EIO or ENOSPC).
    FailRead(i32),
    /// The next write into the staging memfd that allocates (a fill, a `write_at`'s data) fails
    /// with the errno (ENOMEM or ENOSPC; [`FileCache::fail_next_staging`]).
    FailStaging(i32),
    /// No fault.
    Clear,
}

impl Fault {
    /// The fault with its count and errno brought into range (see [`Op::clamped`]): a count
    /// outside 1..=2 is clamped, an errno other than ENOSPC becomes EIO (ENOMEM for staging).
    pub fn clamped(self) -> Fault {
        let io = |e: i32| if e == libc::ENOSPC { e } else { libc::EIO };
        match self {
            Fault::FailWrites(n, e) => Fault::FailWrites(n.clamp(1, 2), io(e)),
            Fault::FailSync(e) => Fault::FailSync(io(e)),
            Fault::FailRead(e) => Fault::FailRead(io(e)),
            Fault::FailStaging(e) => {
                Fault::FailStaging(if e == libc::ENOSPC { e } else { libc::ENOMEM })
            }
            f @ (Fault::ShortWrite | Fault::Clear) => f,
        }
    }
}

/// One operation on the world. `h` is a handle (0 or 1); `off`/`len` a byte range of the file;
/// `page`/`pages` a range of pages of the mappings; `seed` the seed of the data written
/// ([`data`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `write_at` of `len` bytes (1..=[`MAX_IO`]) at `off` (below `WINDOW` pages).
    Write {
        /// Handle.
        h: usize,
        /// Byte offset.
        off: usize,
        /// Bytes.
        len: usize,
        /// Data seed.
        seed: u32,
    },
    /// `read_at` of `len` bytes (0..=[`MAX_IO`]) at `off`.
    Read {
        /// Handle.
        h: usize,
        /// Byte offset.
        off: usize,
        /// Bytes.
        len: usize,
    },
    /// `set_len` (through handle 0) to `len` bytes (at most `WINDOW` pages).
    SetLen {
        /// New length.
        len: usize,
    },
    /// `punch_hole` of `pages` pages (1..=3) from page `page` (at most `WINDOW`).
    Punch {
        /// First page.
        page: usize,
        /// Pages.
        pages: usize,
    },
    /// `fsync`, or `fdatasync` when `data_only`.
    Fsync {
        /// Handle.
        h: usize,
        /// `fdatasync`.
        data_only: bool,
    },
    /// `direct_read` of `len` bytes (0..=[`MAX_IO`]) at `off`.
    DirectRead {
        /// Handle.
        h: usize,
        /// Byte offset.
        off: usize,
        /// Bytes.
        len: usize,
    },
    /// `direct_write` of `len` bytes (1..=[`MAX_IO`]) at `off`.
    DirectWrite {
        /// Handle.
        h: usize,
        /// Byte offset.
        off: usize,
        /// Bytes.
        len: usize,
        /// Data seed.
        seed: u32,
    },
    /// Replaces handle 1 by a new handle (which has seen nothing yet).
    NewHandle,
    /// Changes the fault plans.
    Fault(Fault),
    /// Stores `words` words (1..=`MAX_IO / 4`) through the shared mapping at `off` (word-aligned,
    /// below [`MAP_LEN`]; clipped to the end of file), after clearing the fault plan.
    MapStore {
        /// Byte offset (a multiple of 4).
        off: usize,
        /// Words.
        words: usize,
        /// Data seed.
        seed: u32,
    },
    /// Loads `words` words through the shared mapping at `off` (clipped to the end of file),
    /// after clearing the fault plan.
    MapLoad {
        /// Byte offset (a multiple of 4).
        off: usize,
        /// Words.
        words: usize,
    },
    /// Stores (`store`: the data seed) or loads `words` words through the private mapping at
    /// `off` (clipped to the pages that may be accessed: snapshotted ones, or inside the file).
    Private {
        /// Byte offset (a multiple of 4).
        off: usize,
        /// Words.
        words: usize,
        /// A store of data from this seed; `None`: loads.
        store: Option<u32>,
    },
    /// Migrates the filled private pages from `page` (at most `pages`, 1..=4) to the device
    /// (then the device reads them back) or back to system memory (the kernel's
    /// `migrate_file_private`).
    PrivateMigrate {
        /// First page.
        page: usize,
        /// Pages.
        pages: usize,
        /// To the device (else to system memory).
        to_device: bool,
    },
    /// Makes the shared mapping read-only and read-write again (stores before and after must
    /// both reach the file), or unmaps both mappings and maps them again (the private
    /// snapshots are gone; the shared mapping's stores were recorded).
    Remap {
        /// Unmap and map again (else protect cycle).
        unmap: bool,
    },
    /// The device-private device (or, `coherent`, the device-coherent one) is removed: dropped
    /// with whatever it holds, which comes back to system memory (device removal), and a new one
    /// (mirroring the space, with the mappings) takes its place.
    DeviceRemoval {
        /// The device-coherent device (else the device-private one).
        coherent: bool,
    },
    /// `Some((page, pages, long_term, private))`: pins `pages` pages (1..=3) from `page` of the
    /// private or the shared mapping (clipped to the pages that may be accessed), replacing the
    /// pin held (one at a time); `None`: unpins. Pinned private pages do not migrate to the
    /// device; pinned shared pages are not evicted.
    Pin(Option<(usize, usize, bool, bool)>),
    /// A device mirroring the mapping reads (or writes, `write`: the data seed) `pages` whole
    /// pages (1..=3) from `page` (clipped to the whole pages inside the file), after clearing
    /// the fault plan: the device-private device, or (`coherent`) the device-coherent one (a
    /// page in the other device's private memory comes back to system memory first).
    Device {
        /// First page.
        page: usize,
        /// Pages.
        pages: usize,
        /// A write of data from this seed; `None`: reads.
        write: Option<u32>,
        /// Through the device-coherent device (else the device-private one).
        coherent: bool,
    },
    /// Places file pages `page..page + pages` (1..=[`MAX_PLACE`]; clipped to the file) on the
    /// device-private device or (`coherent`) on the device-coherent one (which has room for
    /// [`COHERENT_ROOM`] pages): through the cache ([`FileCache::place_on_device`], with the
    /// fault plans as they are: its fill may fail), or (`mirror`, with the mappings) through
    /// the device's migrate command on the shared mapping
    /// ([`DeviceMirror::migrate_range_to_device`], after clearing the fault plans).
    Place {
        /// First page.
        page: usize,
        /// Pages.
        pages: usize,
        /// The device-coherent device (else the device-private one).
        coherent: bool,
        /// Through the device's mirror of the shared mapping (else the cache's API).
        mirror: bool,
    },
    /// Brings file pages `page..page + pages` (1..=[`MAX_PLACE`]) back to system memory:
    /// through the cache ([`FileCache::place_in_system`]: from any device, with the fault
    /// plans as they are), or (`mirror`, with the mappings) the pages of the device-private
    /// or (`coherent`) the device-coherent device through its migrate command
    /// ([`DeviceMirror::migrate_to_system`], after clearing the fault plans).
    Unplace {
        /// First page.
        page: usize,
        /// Pages.
        pages: usize,
        /// With `mirror`: the device-coherent device's mirror (else the device-private one's).
        coherent: bool,
        /// Through the device's mirror of the shared mapping (else the cache's API).
        mirror: bool,
    },
    /// Device release ([`SoftDevice::release`]) of the device-private device or (`coherent`)
    /// the device-coherent one, after clearing the fault plans: everything on it comes back.
    Release {
        /// The device-coherent device (else the device-private one).
        coherent: bool,
    },
    /// Read-only replicas of file pages `page..page + pages` (1..=[`MAX_PLACE`]; clipped to the
    /// file) on the device-private device: through the cache ([`FileCache::replicate`], with the
    /// fault plans as they are: its fill may fail; the device-coherent device is refused first,
    /// EINVAL), or (`mirror`, with the mappings) through the device's mirror of the shared
    /// mapping ([`DeviceMirror::replicate_range`], after clearing the fault plans), after which
    /// the device reads the pages (its replicas) back.
    Replicate {
        /// First page.
        page: usize,
        /// Pages.
        pages: usize,
        /// Through the device's mirror of the shared mapping (else the cache's API).
        mirror: bool,
    },
}

impl Op {
    /// Whether the op's handle, ranges, counts and errnos are valid (what [`apply`] requires).
    pub fn in_range(&self) -> bool {
        self.clone().clamped() == *self
    }

    /// The op brought into range (an op already in range is returned unchanged): a handle above
    /// 1 becomes 1; a byte offset past the window ([`WINDOW`] pages; [`MAP_LEN`] for mapping
    /// ops, rounded down to a word) and a page past the mappings ([`MAP_PAGES`]; `WINDOW` for a
    /// punch) wrap around; a new length wraps modulo `WINDOW` pages + 1; lengths, word and page
    /// counts are clamped to their ranges (see each op), and faults with [`Fault::clamped`].
    pub fn clamped(self) -> Op {
        let off = |o: usize| o % (WINDOW * PAGE);
        let word = |o: usize| o % MAP_LEN / 4 * 4;
        let words = |w: usize| w.clamp(1, MAX_IO / 4);
        let page = |p: usize| p % MAP_PAGES;
        match self {
            Op::Write {
                h,
                off: o,
                len,
                seed,
            } => Op::Write {
                h: h.min(1),
                off: off(o),
                len: len.clamp(1, MAX_IO),
                seed,
            },
            Op::Read { h, off: o, len } => Op::Read {
                h: h.min(1),
                off: off(o),
                len: len.min(MAX_IO),
            },
            Op::SetLen { len } => Op::SetLen {
                len: len % (WINDOW * PAGE + 1),
            },
            Op::Punch { page, pages } => Op::Punch {
                page: page % (WINDOW + 1),
                pages: pages.clamp(1, 3),
            },
            Op::Fsync { h, data_only } => Op::Fsync {
                h: h.min(1),
                data_only,
            },
            Op::DirectRead { h, off: o, len } => Op::DirectRead {
                h: h.min(1),
                off: off(o),
                len: len.min(MAX_IO),
            },
            Op::DirectWrite {
                h,
                off: o,
                len,
                seed,
            } => Op::DirectWrite {
                h: h.min(1),
                off: off(o),
                len: len.clamp(1, MAX_IO),
                seed,
            },
            Op::Fault(f) => Op::Fault(f.clamped()),
            Op::MapStore {
                off,
                words: w,
                seed,
            } => Op::MapStore {
                off: word(off),
                words: words(w),
                seed,
            },
            Op::MapLoad { off, words: w } => Op::MapLoad {
                off: word(off),
                words: words(w),
            },
            Op::Private {
                off,
                words: w,
                store,
            } => Op::Private {
                off: word(off),
                words: words(w),
                store,
            },
            Op::PrivateMigrate {
                page: p,
                pages,
                to_device,
            } => Op::PrivateMigrate {
                page: page(p),
                pages: pages.clamp(1, 4),
                to_device,
            },
            Op::Pin(pin) => Op::Pin(pin.map(|(p, pages, long_term, private)| {
                (page(p), pages.clamp(1, 3), long_term, private)
            })),
            Op::Device {
                page: p,
                pages,
                write,
                coherent,
            } => Op::Device {
                page: page(p),
                pages: pages.clamp(1, 3),
                write,
                coherent,
            },
            Op::Place {
                page: p,
                pages,
                coherent,
                mirror,
            } => Op::Place {
                page: page(p),
                pages: pages.clamp(1, MAX_PLACE),
                coherent,
                mirror,
            },
            Op::Unplace {
                page: p,
                pages,
                coherent,
                mirror,
            } => Op::Unplace {
                page: page(p),
                pages: pages.clamp(1, MAX_PLACE),
                coherent,
                mirror,
            },
            Op::Replicate {
                page: p,
                pages,
                mirror,
            } => Op::Replicate {
                page: page(p),
                pages: pages.clamp(1, MAX_PLACE),
                mirror,
            },
            op @ (Op::NewHandle
            | Op::Remap { .. }
            | Op::DeviceRemoval { .. }
            | Op::Release { .. }) => op,
        }
    }
}

/// Pseudo-random bytes for a write (xorshift of `seed`).
pub fn data(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed as u64 | 1 << 40;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A backend call that did not do all that was asked (an injected fault firing).
#[derive(Clone, Copy, Debug)]
struct Failure {
    what: &'static str,
    errno: i32,
    /// The write was of the caller's buffer (`direct_write`'s data), not a writeback.
    user: bool,
}

#[derive(Debug, Default)]
struct ObsState {
    /// Address range of the caller's buffer during a `direct_write`.
    user: (usize, usize),
    failures: Vec<Failure>,
}

/// Observes the outcome of every backend call in front of the faulty backend.
#[derive(Debug)]
struct Observer {
    inner: Arc<dyn FileBackend>,
    st: Mutex<ObsState>,
}

impl Observer {
    fn failed(&self, f: Failure) {
        lock(&self.st).failures.push(f);
    }
    fn take(&self) -> Vec<Failure> {
        std::mem::take(&mut lock(&self.st).failures)
    }
    fn set_user(&self, buf: &[u8]) {
        let a = buf.as_ptr() as usize;
        lock(&self.st).user = (a, a + buf.len());
    }
    fn clear_user(&self) {
        lock(&self.st).user = (0, 0);
    }
    /// Records `r`'s error, if any, as a failure of `what` (not of the caller's buffer).
    fn note<T>(&self, what: &'static str, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r {
            self.failed(Failure {
                what,
                errno: errno_of(e),
                user: false,
            });
        }
        r
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl FileBackend for Observer {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.note("read", self.inner.read_at(off, buf))
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.inner.write_at(off, buf);
        let a = buf.as_ptr() as usize;
        let (lo, hi) = lock(&self.st).user;
        let user = a >= lo && a < hi;
        match &r {
            Err(e) => self.failed(Failure {
                what: "write",
                errno: errno_of(e),
                user,
            }),
            Ok(n) if *n < buf.len() => self.failed(Failure {
                what: "short write",
                errno: libc::EIO,
                user,
            }),
            Ok(_) => {}
        }
        r
    }
    fn sync(&self, data_only: bool) -> std::io::Result<()> {
        self.note("sync", self.inner.sync(data_only))
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.note("set_len", self.inner.set_len(len))
    }
    fn punch(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.note("punch", self.inner.punch(off, len))
    }
    fn drop_cached(&self, off: u64, len: u64) {
        self.inner.drop_cached(off, len)
    }
    fn has_storage(&self) -> bool {
        self.inner.has_storage()
    }
    fn may_grow_to(&self, end: u64) -> bool {
        self.inner.may_grow_to(end)
    }
}

/// How often each path was taken in a world (see [`World::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Operations applied.
    pub ops: u64,
    /// Pages the cache evicted (as of the last check).
    pub evicted: u64,
    /// `fsync`/`fdatasync` calls that returned Ok.
    pub fsync_ok: u64,
    /// `fsync`/`fdatasync` calls that returned an error.
    pub fsync_err: u64,
    /// `write_at` calls refused.
    pub writes_refused: u64,
    /// `direct_read`/`direct_write` calls that failed.
    pub direct_errors: u64,
    /// Bytes stored through the shared mapping or written by the device.
    pub mapped_bytes: u64,
    /// Staging faults that fired.
    pub staging_faults: u64,
    /// Words stored or loaded through the private mapping.
    pub private_words: u64,
    /// Private pages migrated (either way).
    pub private_pages_migrated: u64,
    /// File pages placed in device memory ([`Op::Place`]).
    pub pages_placed: u64,
    /// Device-private placements refused ([`crate::Error::StoresNotIntercepted`]).
    pub placements_refused: u64,
    /// Placements that met a full device (some pages did not fit).
    pub device_full: u64,
    /// Placements that met a device with room for none of their pages (ENOMEM).
    pub device_full_enomem: u64,
    /// File pages brought back by [`Op::Unplace`] and [`Op::Release`].
    pub pages_returned: u64,
    /// Read-only replicas made ([`Op::Replicate`]).
    pub replicas_made: u64,
    /// Replicas the model saw dropped (by a write, a pin, a return, a release, ...).
    pub replicas_dropped: u64,
    /// Replications refused ([`crate::Error::StoresNotIntercepted`]).
    pub replicas_refused: u64,
}

impl Stats {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &Stats) {
        self.ops += o.ops;
        self.evicted += o.evicted;
        self.fsync_ok += o.fsync_ok;
        self.fsync_err += o.fsync_err;
        self.writes_refused += o.writes_refused;
        self.direct_errors += o.direct_errors;
        self.mapped_bytes += o.mapped_bytes;
        self.staging_faults += o.staging_faults;
        self.private_words += o.private_words;
        self.private_pages_migrated += o.private_pages_migrated;
        self.pages_placed += o.pages_placed;
        self.placements_refused += o.placements_refused;
        self.device_full += o.device_full;
        self.device_full_enomem += o.device_full_enomem;
        self.pages_returned += o.pages_returned;
        self.replicas_made += o.replicas_made;
        self.replicas_dropped += o.replicas_dropped;
        self.replicas_refused += o.replicas_refused;
    }
}

/// A file in the temp directory with a unique name, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    /// Creates `hetmem-check-file-<pid>-<n>` with `content` (a name no other file has).
    fn new(content: &[u8]) -> std::io::Result<TempFile> {
        use std::io::Write;
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        loop {
            let path = std::env::temp_dir().join(format!(
                "hetmem-check-file-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let t = TempFile(path);
                    f.write_all(content)?;
                    return Ok(t);
                }
                // Left over by an earlier process with the same id: take the next name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the process should see, and the errors it should get.
struct Model {
    bytes: Vec<u8>,
    /// Per handle: errnos of writeback error events not reported yet (empty: none).
    unreported: [Vec<i32>; 2],
}

impl Model {
    fn write(&mut self, off: usize, d: &[u8]) {
        if self.bytes.len() < off + d.len() {
            self.bytes.resize(off + d.len(), 0);
        }
        self.bytes[off..off + d.len()].copy_from_slice(d);
    }
    fn expect(&self, off: usize, len: usize) -> &[u8] {
        let s = off.min(self.bytes.len());
        let e = (off + len).min(self.bytes.len());
        &self.bytes[s..e]
    }
}

/// Where the model expects a file page placed (see [`World::placed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    /// In the device-private device's memory.
    Private,
    /// In the device-coherent device's memory.
    Coherent,
}

impl Placed {
    fn of(coherent: bool) -> Placed {
        if coherent {
            Placed::Coherent
        } else {
            Placed::Private
        }
    }
}

/// One of the world's devices.
struct Dev {
    /// Its mirror of the space (with the mappings). Dropped before the device: dropping the
    /// device's last handle is its removal.
    m: Option<DeviceMirror>,
    d: SoftDevice,
    /// Frames the world holds in its memory (no file page, no reverse map: a release leaves
    /// them), so that it has room for [`COHERENT_ROOM`] pages only (the device-coherent one).
    filler: Vec<crate::addr::FrameIdx>,
}

impl Dev {
    /// Index in [`World::devs`].
    fn index(coherent: bool) -> usize {
        usize::from(coherent)
    }

    /// A new device (`coherent`: filled up to [`COHERENT_ROOM`] free frames), mirroring
    /// `space`.
    fn new(coherent: bool, space: Option<&Space>) -> Result<Dev, String> {
        let d = if coherent {
            SoftDevice::coherent(DEVICE_BYTES)
        } else {
            SoftDevice::private(DEVICE_BYTES)
        }
        .map_err(|e| format!("device: {e}"))?;
        let m = match space {
            Some(s) => Some(d.mirror(s).map_err(|e| format!("mirror: {e}"))?),
            None => None,
        };
        let mut filler = Vec::new();
        if coherent {
            let pm = d.pagemap();
            for _ in 0..pm.nframes() - COHERENT_ROOM {
                filler.push(pm.alloc().map_err(|e| format!("filler frame: {e}"))?);
            }
        }
        Ok(Dev { m, d, filler })
    }

    /// Free frames.
    fn room(&self) -> usize {
        let pm = self.d.pagemap();
        pm.nframes() - pm.used() / PAGE
    }
}

/// The real objects and the model (see the module doc).
pub struct World {
    /// The file's fault-injecting backend (none for shared anonymous memory).
    faulty: Option<Arc<FaultyBackend<StdFile>>>,
    obs: Arc<Observer>,
    cache: Arc<FileCache>,
    h: [FileHandle; 2],
    m: Model,
    /// Checks done so far (varies the chunking of the full reads).
    checks: usize,
    /// Check the whole file only every `SPARSE` operations (otherwise the bytes around the
    /// operation): the full reads fill the cache and reorder its LRU, which hides states.
    sparse: bool,
    /// Cached bytes after the last call.
    cached_before: usize,
    /// Staging faults pending after the last call, and their errno.
    stage_pending: u32,
    stage_errno: i32,
    /// A shared read-write mapping of the first `MAP_LEN` bytes of the file: the space and the
    /// mapping's address (map operations are no-ops without it, where the cache's own eviction
    /// is checked alone).
    map: Option<(Space, usize)>,
    /// The mapping intercepts stores (so that the budget and the dirty bound hold for its pages
    /// too; else: asynchronous write tracking, whose pages are never evicted and whose stores
    /// count against the dirty bound only at the next scan, so the budget and the bound are not
    /// checked in those worlds).
    intercept: bool,
    /// With `map`: a private read-write mapping of the same `MAP_LEN` bytes, and per page the
    /// bytes it must hold once it has been filled (`None`: not filled yet; it then follows the
    /// file). A fill snapshots the file at that moment (POSIX leaves later changes unspecified
    /// for `MAP_PRIVATE`; hetmem keeps the snapshot, also across a truncate), and may fill
    /// neighbouring pages too (fault-around): the space's residency tells which.
    private: usize,
    snap: Vec<Option<Vec<u8>>>,
    /// The pin held (see `Op::Pin`), and which pages of the current private mapping it pins.
    pin: Option<crate::Pin>,
    pinned_private: Vec<bool>,
    /// The software devices: `[device-private, device-coherent]` ([`Dev::index`]), mirroring
    /// the space (with `map`).
    devs: [Dev; 2],
    /// Per file page (of the first `MAP_PAGES`): the device it is placed on, as the model
    /// expects it (`None`: in system memory or not cached).
    placed: Vec<Option<Placed>>,
    /// Per file page, during one operation: it may have come back to system memory (an
    /// outcome the model cannot tell: an error part way, a concurrent eviction).
    may_leave: Vec<bool>,
    /// Per file page, during one operation: it may have been placed on this device (an
    /// outcome the model cannot tell exactly in worlds where the background evictor runs).
    may_arrive: Vec<Option<Placed>>,
    /// Which file pages the pin held pins in the cache (a pin of the shared mapping: kept
    /// across an unmap, as the cache keeps them).
    pinned_shared: Vec<bool>,
    /// Per file page: the device-private device holds a read-only replica of it, as the model
    /// expects it (the world's only device-private device: the only one that may).
    replicated: Vec<bool>,
    /// Per file page, during one operation: its replica may have been dropped (an outcome the
    /// model cannot tell: an error part way, a concurrent eviction).
    replica_may_drop: Vec<bool>,
    /// Per file page, during one operation: it may have been replicated (the background
    /// evictor may have evicted a page the model had on a device or replicated).
    replica_may_arrive: Vec<bool>,
    /// A device wrote device-private frames since the last `fsync` that returned Ok: those
    /// writes count against the dirty bound only once collected (see the module doc), so the
    /// bound is not checked until then.
    frames_written: bool,
    stats: Stats,
    /// A cache of shared anonymous memory ([`World::new_anonymous`]): no file, no fault plans
    /// (nothing is written back), no budget and no dirty bound.
    anon: bool,
    /// Dropped last: the file (none for shared anonymous memory).
    file: Option<TempFile>,
}

/// Fails with the formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

impl World {
    /// A fresh world: a temporary file holding `initial`, its cache and two handles, and with
    /// `mapped` (`Some(intercept_stores)`) the space with the shared and private mappings and
    /// the device. `sparse`: the whole file is read back only every [`SPARSE`] operations. The
    /// initial state is checked (the whole file reads as `initial`).
    pub fn new(initial: &[u8], sparse: bool, mapped: Option<bool>) -> Result<World, String> {
        Self::build(initial, sparse, mapped, false)
    }

    /// A fresh world of shared anonymous memory: a cache without a file
    /// ([`crate::pagecache::AnonBackend`]) of `initial.len()` bytes into which `initial` is
    /// written first, otherwise as [`World::new`]. The same operations and checks, but: nothing
    /// is ever written back (`fsync` returns Ok and writes nothing; the fault plans change
    /// nothing), no page with data is evicted (no budget, no dirty bound), direct I/O is
    /// `read_at`/`write_at`, and at the end there is no file to read back.
    pub fn new_anonymous(
        initial: &[u8],
        sparse: bool,
        mapped: Option<bool>,
    ) -> Result<World, String> {
        Self::build(initial, sparse, mapped, true)
    }

    fn build(
        initial: &[u8],
        sparse: bool,
        mapped: Option<bool>,
        anon: bool,
    ) -> Result<World, String> {
        let (file, faulty, inner): (Option<TempFile>, _, Arc<dyn FileBackend>) = if anon {
            let b = Arc::new(crate::pagecache::AnonBackend::new(initial.len() as u64));
            (None, None, b)
        } else {
            let file = TempFile::new(initial).map_err(|e| format!("temporary file: {e}"))?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&file.0)
                .map_err(|e| format!("open {}: {e}", file.0.display()))?;
            let faulty = Arc::new(FaultyBackend::new(StdFile(f)));
            (Some(file), Some(faulty.clone()), faulty)
        };
        let obs = Arc::new(Observer {
            inner,
            st: Mutex::new(ObsState::default()),
        });
        let cfg = CacheConfig {
            budget: BUDGET,
            dirty_bound: DIRTY,
        };
        let cache = FileCache::with_backend(Box::new(obs.clone()), true, cfg)
            .map_err(|e| format!("cache: {e}"))?;
        let h = [cache.handle(), cache.handle()];
        if anon && !initial.is_empty() {
            // Shared anonymous memory starts as zeros: the initial bytes are written into it.
            h[0].write_at(0, initial)
                .map_err(|e| format!("initial write: {e}"))?;
        }
        let intercept = mapped != Some(false);
        let (map, private) = match mapped {
            None => (None, 0),
            Some(intercept_stores) => {
                let space = Space::new().map_err(|e| format!("space: {e}"))?;
                let opts = FileMapOptions {
                    prot: Prot::ReadWrite,
                    shared: true,
                    intercept_stores,
                };
                let a = space
                    .map_file_with(&h[0], 0, MAP_LEN, opts)
                    .map_err(|e| format!("shared mapping: {e}"))?
                    .get();
                let private = space
                    .map_file(&h[0], 0, MAP_LEN, Prot::ReadWrite, false)
                    .map_err(|e| format!("private mapping: {e}"))?
                    .get();
                (Some((space, a)), private)
            }
        };
        let space = map.as_ref().map(|m| &m.0);
        let devs = [Dev::new(false, space)?, Dev::new(true, space)?];
        let mut w = World {
            map,
            private,
            snap: vec![None; MAP_PAGES],
            pin: None,
            pinned_private: vec![false; MAP_PAGES],
            intercept,
            devs,
            placed: vec![None; MAP_PAGES],
            may_leave: vec![false; MAP_PAGES],
            may_arrive: vec![None; MAP_PAGES],
            pinned_shared: vec![false; MAP_PAGES],
            replicated: vec![false; MAP_PAGES],
            replica_may_drop: vec![false; MAP_PAGES],
            replica_may_arrive: vec![false; MAP_PAGES],
            frames_written: false,
            anon,
            file,
            faulty,
            obs,
            cache,
            h,
            m: Model {
                bytes: initial.to_vec(),
                unreported: [Vec::new(), Vec::new()],
            },
            checks: 0,
            sparse,
            cached_before: 0,
            stage_pending: 0,
            stage_errno: 0,
            stats: Stats::default(),
        };
        w.check("initial", Some((0, initial.len())))?;
        Ok(w)
    }

    /// Replaces the file's fault plan (nothing without a file).
    fn plan(&self, p: FaultPlan) {
        if let Some(f) = &self.faulty {
            f.plan(p);
        }
    }

    /// How often each path was taken so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Takes the failures observed during the last call and records the writeback error events
    /// among them for every handle. Returns them.
    fn account(&mut self) -> Vec<Failure> {
        let mut f = self.obs.take();
        let pending = self.cache.staging_faults_pending();
        if pending < self.stage_pending {
            // A staging fault fired: returned to the caller, no writeback error event.
            self.stats.staging_faults += 1;
            f.push(Failure {
                what: "stage",
                errno: self.stage_errno,
                user: true,
            });
        }
        self.stage_pending = pending;
        // A failed read is returned by its call, it is no writeback error.
        for x in f.iter().filter(|x| !x.user && x.what != "read") {
            for u in &mut self.m.unreported {
                u.push(x.errno);
            }
        }
        f
    }

    /// Budget and dirty bound after a call during which `failures` fired. Only `read_at` and
    /// `write_at` (`evicts`) evict: after one during which no fault fired the cache is within
    /// its budget (pages can stay over it while writeback fails); no other call adds pages.
    fn check_bounds(
        &mut self,
        failures: &[Failure],
        evicts: bool,
        what: &str,
    ) -> Result<(), String> {
        if (self.map.is_some() && !self.intercept) || self.anon {
            // Asynchronous tracking, or no budget and no bound at all (shared anonymous
            // memory: its pages are never written back nor evicted).
            self.cached_before = self.cache.cached_bytes();
            return Ok(());
        }
        let dirty = self.cache.dirty_bytes();
        ensure!(
            self.frames_written || dirty <= DIRTY,
            "{what}: {dirty} dirty bytes over the bound {DIRTY}"
        );
        let mut cached = self.cache.cached_bytes();
        if evicts && failures.is_empty() && cached > BUDGET && self.map.is_some() {
            // The eviction inside `read_at`/`write_at` leaves mapped pages alone; the
            // background evictor brings them within the budget: do its work now.
            self.cache.shrink_to_budget();
            cached = self.cache.cached_bytes();
        }
        if evicts && failures.is_empty() {
            ensure!(
                cached <= BUDGET,
                "{what}: {cached} cached bytes over the budget {BUDGET} (no fault fired)"
            );
        } else if !evicts {
            ensure!(
                cached <= self.cached_before.max(BUDGET),
                "{what}: {cached} cached bytes, over the budget {BUDGET} and more than the {} before",
                self.cached_before
            );
        }
        self.cached_before = cached;
        Ok(())
    }

    fn check_disk(&self, what: &str) -> Result<(), String> {
        // Shared anonymous memory has no disk: `fsync` writes nothing, the cache is the data
        // (the full reads check it).
        let Some(file) = &self.file else {
            return Ok(());
        };
        let disk = std::fs::read(&file.0).map_err(|e| format!("{what}: reading the file: {e}"))?;
        if disk != self.m.bytes {
            let first = disk.iter().zip(&self.m.bytes).position(|(a, b)| a != b);
            return Err(format!(
                "{what}: the file on disk differs from the model: disk {} bytes, model {} bytes, first differing byte {first:?}",
                disk.len(),
                self.m.bytes.len()
            ));
        }
        Ok(())
    }

    fn fsync(&mut self, h: usize, data_only: bool, what: &str) -> Result<(), String> {
        let r = if data_only {
            self.h[h].fdatasync()
        } else {
            self.h[h].fsync()
        };
        let f = self.account();
        self.check_bounds(&f, false, what)?;
        let unreported = std::mem::take(&mut self.m.unreported[h]);
        if r.is_err() {
            self.stats.fsync_err += 1;
        } else {
            self.stats.fsync_ok += 1;
        }
        match r {
            Ok(()) => {
                ensure!(
                    unreported.is_empty(),
                    "{what}: Ok, but handle {h} had unreported writeback errors {unreported:?}"
                );
                self.frames_written = false;
                self.check_disk(&format!("{what} (Ok)"))
            }
            Err(e) => {
                ensure!(
                    !unreported.is_empty(),
                    "{what}: {e}, but handle {h} had no unreported writeback error (failures seen: {f:?})"
                );
                ensure!(
                    unreported.contains(&e.errno()),
                    "{what}: errno {} is none of the unreported events' {unreported:?}",
                    e.errno()
                );
                // A retry with no fault planned succeeds and makes the file the model.
                self.plan(FaultPlan::default());
                let r = if data_only {
                    self.h[h].fdatasync()
                } else {
                    self.h[h].fsync()
                };
                let f = self.account();
                ensure!(
                    f.is_empty(),
                    "{what}: retry: failures with no fault planned: {f:?}"
                );
                self.m.unreported[h].clear();
                ensure!(
                    r.is_ok(),
                    "{what}: the retry after {e} failed: {:?}",
                    r.err()
                );
                self.frames_written = false;
                self.check_disk(&format!("{what} (retry)"))
            }
        }
    }

    /// Applies `op`, checks it and the state (see [`apply`]).
    fn step(&mut self, op: &Op, what: &str) -> Result<(), String> {
        // Without a file below the cache, direct I/O is `read_at`/`write_at` (the cache is
        // the data): the same expectations.
        let direct_as_cached;
        let op = match (op, self.anon) {
            (&Op::DirectWrite { h, off, len, seed }, true) => {
                direct_as_cached = Op::Write { h, off, len, seed };
                &direct_as_cached
            }
            (&Op::DirectRead { h, off, len }, true) => {
                direct_as_cached = Op::Read { h, off, len };
                &direct_as_cached
            }
            _ => op,
        };
        self.may_leave.fill(false);
        self.may_arrive.fill(None);
        self.replica_may_drop.fill(false);
        self.replica_may_arrive.fill(false);
        self.step_op(op, what)?;
        self.check_placement(what, self.evicts_during(op))?;
        self.check(what, window(op))?;
        // The check's reads evict (without the mappings), as does the background evictor.
        let evicts = self.map.is_none() || self.background_evictor();
        self.check_placement(&format!("{what} (after the check)"), evicts)
    }

    /// The background evictor may evict clean mapped pages at any moment: the pages of a
    /// mapping that intercepts stores are not exempt (those of a writable one that does not
    /// are).
    fn background_evictor(&self) -> bool {
        self.map.is_some() && self.intercept && !self.anon
    }

    /// Whether clean pages may be evicted during `op`: by `read_at`/`write_at` (whose eviction
    /// leaves mapped pages alone), by the background evictor, or while the shared mapping is
    /// unmapped.
    fn evicts_during(&self, op: &Op) -> bool {
        self.background_evictor()
            || match op {
                Op::Read { .. } | Op::Write { .. } => self.map.is_none() && !self.anon,
                Op::Remap { unmap } => *unmap,
                _ => false,
            }
    }

    /// Applies `op` and checks its outcome (the state is checked by [`Self::step`]).
    fn step_op(&mut self, op: &Op, what: &str) -> Result<(), String> {
        match *op {
            Op::Write { h, off, len, seed } => {
                let d = data(seed, len);
                let r = self.h[h].write_at(off as u64, &d);
                let f = self.account();
                self.check_bounds(&f, true, what)?;
                // Device-private pages it writes come back first (also when it then fails).
                let (first, last) = (off / PAGE, (off + len).div_ceil(PAGE));
                self.come_back(first, last, r.is_ok(), |x| x == Placed::Private);
                // Replicated pages come back (from any device) and lose their replicas first.
                self.drop_replicas(first, last, r.is_ok(), true);
                match r {
                    Ok(()) => self.m.write(off, &d),
                    Err(e) => {
                        self.stats.writes_refused += 1;
                        ensure!(
                            f.iter()
                                .any(|x| (!x.user || x.what == "stage") && x.errno == e.errno()),
                            "{what}: refused ({e}) without a writeback or staging failure of that errno (failures: {f:?})"
                        );
                    }
                }
            }
            Op::Read { h, off, len } => {
                let mut buf = vec![0xa5u8; len];
                let r = self.h[h].read_at(off as u64, &mut buf);
                let f = self.account();
                self.check_bounds(&f, true, what)?;
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        ensure!(
                            f.iter()
                                .any(|x| (x.what == "read" || x.what == "stage")
                                    && x.errno == e.errno()),
                            "{what}: {e} without a failed read or staging of that errno (failures: {f:?})"
                        );
                        return Ok(());
                    }
                };
                let want = self.m.expect(off, len);
                ensure!(
                    n == want.len(),
                    "{what}: read {n} bytes, model {}",
                    want.len()
                );
                ensure!(&buf[..n] == want, "{what}: bytes differ from the model");
            }
            Op::SetLen { len } => {
                let r = self.h[0].set_len(len as u64);
                let f = self.account();
                self.check_bounds(&f, false, what)?;
                r.map_err(|e| format!("{what}: {e}"))?;
                // Pages past the new end leave the cache, wherever they were, with their
                // replicas; a partial last page whose tail is cut changes: its replicas go.
                let cut = len < self.m.bytes.len() && !len.is_multiple_of(PAGE);
                let from = if cut { len / PAGE } else { len.div_ceil(PAGE) };
                self.drop_replicas(from, MAP_PAGES, true, false);
                self.m.bytes.resize(len, 0);
                self.come_back(len.div_ceil(PAGE), MAP_PAGES, true, |_| true);
            }
            Op::Punch { page, pages } => {
                let r = self.h[0].punch_hole((page * PAGE) as u64, (pages * PAGE) as u64);
                let f = self.account();
                self.check_bounds(&f, false, what)?;
                r.map_err(|e| format!("{what}: {e}"))?;
                let size = self.m.bytes.len();
                let (s, e) = ((page * PAGE).min(size), ((page + pages) * PAGE).min(size));
                self.m.bytes[s..e].fill(0);
                self.come_back(page, page + pages, true, |_| true);
                self.drop_replicas(page, page + pages, true, false);
            }
            Op::Fsync { h, data_only } => self.fsync(h, data_only, what)?,
            Op::DirectRead { h, off, len } => {
                let mut buf = vec![0xa5u8; len];
                let r = self.h[h].direct_read(off as u64, &mut buf);
                let f = self.account();
                self.check_bounds(&f, false, what)?;
                match r {
                    Ok(n) => {
                        let want = self.m.expect(off, len);
                        ensure!(
                            n == want.len(),
                            "{what}: read {n} bytes, model {}",
                            want.len()
                        );
                        ensure!(&buf[..n] == want, "{what}: bytes differ from the model");
                    }
                    Err(e) => {
                        self.stats.direct_errors += 1;
                        ensure!(
                            f.iter().any(|x| !x.user && x.errno == e.errno()),
                            "{what}: {e} without a writeback failure of that errno (failures: {f:?})"
                        )
                    }
                }
            }
            Op::DirectWrite { h, off, len, seed } => {
                let d = data(seed, len);
                self.obs.set_user(&d);
                let r = self.h[h].direct_write(off as u64, &d);
                self.obs.clear_user();
                let f = self.account();
                self.check_bounds(&f, false, what)?;
                match r {
                    Ok(()) => {
                        ensure!(
                            f.iter().all(|x| x.user),
                            "{what}: Ok despite a writeback failure (failures: {f:?})"
                        );
                        self.m.write(off, &d);
                        // The pages it covers whole leave the cache; a partial first or last
                        // page is updated where it is (in its device frame too).
                        self.come_back(off.div_ceil(PAGE), (off + len) / PAGE, true, |_| true);
                        // Every page it touches loses its replicas (a partial one too).
                        self.drop_replicas(off / PAGE, (off + len).div_ceil(PAGE), true, false);
                    }
                    Err(e) => {
                        self.drop_replicas(off / PAGE, (off + len).div_ceil(PAGE), false, false);
                        self.stats.direct_errors += 1;
                        ensure!(
                            f.iter().any(|x| x.errno == e.errno()),
                            "{what}: {e} without a failure of that errno (failures: {f:?})"
                        )
                    }
                }
            }
            Op::NewHandle => {
                self.h[1] = self.cache.handle();
                self.m.unreported[1].clear();
            }
            Op::Fault(fault) => {
                let p = match fault {
                    Fault::FailWrites(n, error) => FaultPlan {
                        fail_writes: n,
                        error,
                        ..FaultPlan::default()
                    },
                    Fault::ShortWrite => FaultPlan {
                        short_writes: 1,
                        ..FaultPlan::default()
                    },
                    Fault::FailRead(error) => FaultPlan {
                        fail_reads: 1,
                        error,
                        ..FaultPlan::default()
                    },
                    Fault::FailSync(error) => FaultPlan {
                        fail_syncs: 1,
                        error,
                        ..FaultPlan::default()
                    },
                    Fault::FailStaging(errno) => {
                        self.cache.fail_next_staging(1, errno);
                        self.stage_pending = 1;
                        self.stage_errno = errno;
                        FaultPlan::default()
                    }
                    Fault::Clear => {
                        self.clear_staging();
                        FaultPlan::default()
                    }
                };
                self.plan(p);
            }
            Op::MapStore { off, words, seed } => {
                // With no fault planned, neither the fill of a page nor the writeback that an
                // intercepted store may need fails: no access gets SIGBUS.
                self.no_faults();
                let n = self.words_in_file(off, words);
                if let Some((space, map)) = &self.map
                    && n > 0
                {
                    let d = data(seed, 4 * n);
                    for (i, w) in d.chunks_exact(4).enumerate() {
                        let v = u32::from_le_bytes(w.try_into().unwrap());
                        space
                            .store_u32(VirtAddr(map + off + 4 * i), v)
                            .map_err(|e| format!("{what}: store through the mapping: {e}"))?;
                    }
                    self.m.write(off, &d);
                    self.stats.mapped_bytes += d.len() as u64;
                    // A CPU access brings a device-private page back.
                    let (first, last) = (off / PAGE, (off + 4 * n).div_ceil(PAGE));
                    self.come_back(first, last, true, |x| x == Placed::Private);
                    // A store faults on a replicated page: it comes back from any device and
                    // its replicas are dropped first.
                    self.drop_replicas(first, last, true, true);
                }
                self.check_mapped(what)?;
            }
            Op::Device {
                page,
                pages,
                write,
                coherent,
            } => {
                self.no_faults();
                let whole = self.m.bytes.len().min(MAP_LEN) / PAGE;
                let n = whole.saturating_sub(page).min(pages);
                if let (Some((_, map)), Some(m)) = (&self.map, &self.devs[Dev::index(coherent)].m)
                    && n > 0
                {
                    let addr = VirtAddr(map + page * PAGE);
                    let off = page * PAGE;
                    if let Some(seed) = write {
                        let d = data(seed, n * PAGE);
                        // Through an intercepting mapping too: the cache grants the device
                        // write access to each page (dirty first, within the bound) and
                        // writeback revokes it before protecting the page again.
                        m.write(addr, n * PAGE, &d)
                            .map_err(|e| format!("{what}: device write: {e}"))?;
                        self.m.write(off, &d);
                        self.stats.mapped_bytes += d.len() as u64;
                        // The device-private device writes its own frames in place.
                        if !coherent && self.placed[page..page + n].contains(&Some(Placed::Private))
                        {
                            self.frames_written = true;
                        }
                        // Every replica of a page is dropped before a device writes it (the
                        // page comes back from any device first).
                        self.drop_replicas(page, page + n, true, true);
                    } else {
                        let mut buf = vec![0u8; n * PAGE];
                        m.read(addr, n * PAGE, &mut buf)
                            .map_err(|e| format!("{what}: device read: {e}"))?;
                        if buf[..] != self.m.bytes[off..off + n * PAGE] {
                            let i = (0..buf.len())
                                .find(|&i| buf[i] != self.m.bytes[off + i])
                                .unwrap();
                            return Err(format!(
                                "{what}: device read: byte {} is {:#04x}, model {:#04x}",
                                off + i,
                                buf[i],
                                self.m.bytes[off + i]
                            ));
                        }
                    }
                    // Another device's access brings a device-private page back first (a
                    // coherent page is mapped where it is by every device).
                    if coherent {
                        self.come_back(page, page + n, true, |x| x == Placed::Private);
                    }
                }
                self.check_mapped(what)?;
            }
            Op::Private { off, words, store } => {
                self.no_faults();
                if self.map.is_some() {
                    let d = store.map(|seed| data(seed, 4 * words));
                    let eof_pages = self.m.bytes.len().div_ceil(PAGE);
                    for i in 0..words {
                        let a = off + 4 * i;
                        let p = a / PAGE;
                        if a + 4 > MAP_LEN || (self.snap[p].is_none() && p >= eof_pages) {
                            break;
                        }
                        let first = self.snap[p].is_none();
                        self.stats.private_words += 1;
                        let addr = VirtAddr(self.private + a);
                        let space = &self.map.as_ref().expect("mapped (checked above)").0;
                        let fail = |e| format!("{what}: access to the private mapping: {e}");
                        let loaded = match &d {
                            Some(d) => {
                                let v = u32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap());
                                space.store_u32(addr, v).map_err(fail)?;
                                None
                            }
                            None => Some(space.load_u32(addr).map_err(fail)?),
                        };
                        if first {
                            self.snapshot_filled(what)?;
                        }
                        let page = self.snap[p].as_mut().ok_or_else(|| {
                            format!("{what}: private page {p} accessed but not resident")
                        })?;
                        let o = a % PAGE;
                        match loaded {
                            None => page[o..o + 4]
                                .copy_from_slice(&d.as_ref().unwrap()[4 * i..4 * i + 4]),
                            Some(v) => {
                                let m = u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
                                ensure!(
                                    v == m,
                                    "{what}: load through the private mapping at {a}: {v:#010x}, snapshot {m:#010x}"
                                );
                            }
                        }
                    }
                }
                self.check_mapped(what)?;
            }
            Op::PrivateMigrate {
                page,
                pages,
                to_device,
            } => {
                let n = (page..(page + pages).min(self.snap.len()))
                    .take_while(|&p| self.snap[p].is_some())
                    .count();
                let dev = &self.devs[Dev::index(false)];
                if let (Some((space, _)), Some(m), d) = (&self.map, &dev.m, &dev.d)
                    && n > 0
                {
                    let addr = VirtAddr(self.private + page * PAGE);
                    let r = if to_device {
                        m.migrate_range_to_device(addr, n * PAGE)
                    } else {
                        m.migrate_to_system(addr, n * PAGE)
                    };
                    let pinned = self.pinned_private[page..page + n].iter().any(|&x| x);
                    if !(pinned && to_device) {
                        r.map_err(|e| format!("{what}: migrate: {e}"))?;
                    }
                    self.stats.private_pages_migrated += n as u64;
                    for p in page..page + n {
                        let want = if to_device && !self.pinned_private[p] {
                            Residency::Device(d.owner())
                        } else {
                            Residency::System
                        };
                        let got = space.residency(VirtAddr(self.private + p * PAGE));
                        ensure!(
                            got == want,
                            "{what}: private page {p} is {got:?}, not {want:?}"
                        );
                    }
                    if to_device {
                        let mut buf = vec![0u8; n * PAGE];
                        m.read(addr, n * PAGE, &mut buf)
                            .map_err(|e| format!("{what}: device read: {e}"))?;
                        for (i, p) in (page..page + n).enumerate() {
                            ensure!(
                                buf[i * PAGE..(i + 1) * PAGE] == self.snap[p].as_ref().unwrap()[..],
                                "{what}: the device reads private page {p} unlike its snapshot"
                            );
                        }
                    }
                }
                self.check_mapped(what)?;
            }
            Op::Pin(pin) => {
                self.no_faults();
                self.pin = None;
                self.pinned_private.fill(false);
                self.pinned_shared.fill(false);
                if let (Some((space, map)), Some((page, pages, long_term, private))) =
                    (&self.map, pin)
                {
                    let eof_pages = self.m.bytes.len().div_ceil(PAGE);
                    let n = (page..(page + pages).min(MAP_LEN / PAGE))
                        .take_while(|&p| p < eof_pages || (private && self.snap[p].is_some()))
                        .count();
                    if n > 0 {
                        let base = if private { self.private } else { *map };
                        let a = VirtAddr(base + page * PAGE);
                        // A page being evicted right now (background evictor) is busy: retry.
                        let mut r = space.pin(a, n * PAGE, long_term);
                        for _ in 0..10_000 {
                            if !matches!(r, Err(crate::Error::Busy)) {
                                break;
                            }
                            std::thread::yield_now();
                            r = space.pin(a, n * PAGE, long_term);
                        }
                        let p = r.map_err(|e| format!("{what}: pin: {e}"))?;
                        self.pin = Some(p);
                        if private {
                            self.pinned_private[page..page + n].fill(true);
                            self.snapshot_filled(what)?;
                        } else {
                            // Pinned file pages are in system memory (a short-term pin leaves
                            // coherent ones in place) and stay there while pinned.
                            self.pinned_shared[page..page + n].fill(true);
                            // A pin drops the replicas (and brings a replicated page back from
                            // any device).
                            self.drop_replicas(page, page + n, true, true);
                            self.come_back(page, page + n, true, |x| {
                                x == Placed::Private || long_term
                            });
                        }
                    }
                }
                self.check_mapped(what)?;
            }
            Op::DeviceRemoval { coherent } => {
                self.no_faults();
                let i = Dev::index(coherent);
                let space = self.map.as_ref().map(|m| &m.0);
                let new = Dev::new(coherent, space).map_err(|e| format!("{what}: new {e}"))?;
                let old = std::mem::replace(&mut self.devs[i], new);
                let (pm, filler) = (old.d.pagemap().clone(), old.filler.len());
                // The removal brings everything on it back to system memory.
                drop(old);
                ensure!(
                    pm.used() == filler * PAGE,
                    "{what}: {} bytes left on the removed device, {} held by the world",
                    pm.used(),
                    filler * PAGE
                );
                self.release_replicas(coherent);
                self.gone(Placed::of(coherent));
                if !coherent && let Some((space, _)) = &self.map {
                    for p in (0..self.snap.len()).filter(|&p| self.snap[p].is_some()) {
                        let got = space.residency(VirtAddr(self.private + p * PAGE));
                        ensure!(
                            got == Residency::System,
                            "{what}: private page {p} is {got:?} after the device's removal"
                        );
                    }
                }
                self.check_mapped(what)?;
            }
            Op::Remap { unmap } => {
                self.no_faults();
                if let Some((space, map)) = &mut self.map {
                    let fail = |e: crate::Error| format!("{what}: {e}");
                    let a = VirtAddr(*map);
                    if unmap {
                        space.unmap(a, MAP_LEN).map_err(fail)?;
                        space.unmap(VirtAddr(self.private), MAP_LEN).map_err(fail)?;
                        let opts = FileMapOptions {
                            prot: Prot::ReadWrite,
                            shared: true,
                            intercept_stores: self.intercept,
                        };
                        *map = space
                            .map_file_with(&self.h[0], 0, MAP_LEN, opts)
                            .map_err(fail)?
                            .get();
                        self.private = space
                            .map_file(&self.h[1], 0, MAP_LEN, Prot::ReadWrite, false)
                            .map_err(fail)?
                            .get();
                        self.snap.fill(None);
                        // A pin held stays on the old mappings: it pins nothing any more.
                        self.pinned_private.fill(false);
                    } else {
                        space.protect(a, MAP_LEN, Prot::Read).map_err(fail)?;
                        space.protect(a, MAP_LEN, Prot::ReadWrite).map_err(fail)?;
                    }
                }
                self.check_mapped(what)?;
            }
            Op::MapLoad { off, words } => {
                self.no_faults();
                let n = self.words_in_file(off, words);
                let map = self.map.as_ref().map_or(0, |m| m.1);
                for i in (0..n).filter(|_| map != 0) {
                    let a = off + 4 * i;
                    let space = &self.map.as_ref().expect("mapped (map != 0)").0;
                    let v = space
                        .load_u32(VirtAddr(map + a))
                        .map_err(|e| format!("{what}: load through the mapping: {e}"))?;
                    let m = u32::from_le_bytes(self.m.bytes[a..a + 4].try_into().unwrap());
                    ensure!(
                        v == m,
                        "{what}: load through the mapping at {a}: {v:#010x}, model {m:#010x}"
                    );
                }
                if map != 0 && n > 0 {
                    // A CPU access brings a device-private page back.
                    let (first, last) = (off / PAGE, (off + 4 * n).div_ceil(PAGE));
                    self.come_back(first, last, true, |x| x == Placed::Private);
                }
                self.check_mapped(what)?;
            }
            Op::Place {
                page,
                pages,
                coherent,
                mirror,
            } => self.place(page, pages, coherent, mirror, what)?,
            Op::Unplace {
                page,
                pages,
                coherent,
                mirror,
            } => self.unplace(page, pages, coherent, mirror, what)?,
            Op::Replicate {
                page,
                pages,
                mirror,
            } => self.replicate(page, pages, mirror, what)?,
            Op::Release { coherent } => {
                self.no_faults();
                let i = Dev::index(coherent);
                let kind = Placed::of(coherent);
                let files = self.placed.iter().filter(|&&x| x == Some(kind)).count();
                // The device-private device's replicas come back too: each of their pages
                // once (from wherever it is placed).
                let replicated = if coherent {
                    0
                } else {
                    (0..MAP_PAGES)
                        .filter(|&p| self.replicated[p] && self.placed[p] != Some(kind))
                        .count()
                };
                let anon = if coherent {
                    0
                } else {
                    self.private_on_device()
                };
                let n = self.devs[i]
                    .d
                    .release()
                    .map_err(|e| format!("{what}: release: {e}"))?;
                // The background evictor may have evicted some file pages first.
                ensure!(
                    n == files + anon + replicated
                        || (self.background_evictor()
                            && anon <= n
                            && n < files + anon + replicated),
                    "{what}: release moved {n} pages, the model has {files} file pages, {replicated} other replicated pages and {anon} private pages on the device"
                );
                self.stats.pages_returned += (n - anon) as u64;
                self.release_replicas(coherent);
                self.gone(kind);
                self.check_device_empty(i, what)?;
                self.check_mapped(what)?;
            }
        }
        Ok(())
    }

    /// Pages `first..last` placed where `which` says come back to system memory (or leave
    /// the cache): surely (`sure`: the model then expects them in system memory or uncached),
    /// or maybe (an outcome the model cannot tell).
    fn come_back(&mut self, first: usize, last: usize, sure: bool, which: impl Fn(Placed) -> bool) {
        for p in first.min(MAP_PAGES)..last.min(MAP_PAGES) {
            if self.placed[p].is_some_and(&which) {
                if sure {
                    self.placed[p] = None;
                } else {
                    self.may_leave[p] = true;
                }
            }
        }
    }

    /// Every file page on the `kind` device came back (its release or removal).
    fn gone(&mut self, kind: Placed) {
        for x in &mut self.placed {
            if *x == Some(kind) {
                *x = None;
            }
        }
    }

    /// The replicas of pages `first..last` are dropped: surely (`sure`: the model then expects
    /// none) or maybe (an outcome the model cannot tell). `slot_too`: by the cache's return of
    /// the page (a write settles it), which brings a replicated page back from the device it
    /// is placed on as well (a device-coherent one too).
    fn drop_replicas(&mut self, first: usize, last: usize, sure: bool, slot_too: bool) {
        for p in first.min(MAP_PAGES)..last.min(MAP_PAGES) {
            if !self.replicated[p] {
                continue;
            }
            if slot_too && self.placed[p].is_some() {
                if sure {
                    self.placed[p] = None;
                } else {
                    self.may_leave[p] = true;
                }
            }
            if sure {
                self.replicated[p] = false;
                self.stats.replicas_dropped += 1;
            } else {
                self.replica_may_drop[p] = true;
            }
        }
    }

    /// The release or removal of the device-private device (or, `coherent`, the
    /// device-coherent one): the pages with a frame on it come back, and with them every
    /// replica of theirs (the device-private device's replicas: their pages come back from
    /// wherever they are placed).
    fn release_replicas(&mut self, coherent: bool) {
        for p in 0..MAP_PAGES {
            let mine = if coherent {
                self.placed[p] == Some(Placed::Coherent)
            } else {
                self.replicated[p]
            };
            if mine {
                self.drop_replicas(p, p + 1, true, true);
            }
        }
    }

    /// Pages of the private mapping in the device-private device's memory.
    fn private_on_device(&self) -> usize {
        let Some((space, _)) = &self.map else {
            return 0;
        };
        let want = Residency::Device(self.devs[Dev::index(false)].d.owner());
        (0..MAP_PAGES)
            .filter(|&p| space.residency(VirtAddr(self.private + p * PAGE)) == want)
            .count()
    }

    /// After a release: the device holds nothing but the world's filler frames, and the
    /// private mapping's pages are in system memory.
    fn check_device_empty(&self, i: usize, what: &str) -> Result<(), String> {
        let (used, filler) = (self.devs[i].d.used(), self.devs[i].filler.len() * PAGE);
        ensure!(
            used == filler,
            "{what}: {used} bytes used on the device after its release, {filler} held by the world"
        );
        if let (Some((space, _)), 0) = (&self.map, i) {
            for p in (0..self.snap.len()).filter(|&p| self.snap[p].is_some()) {
                let got = space.residency(VirtAddr(self.private + p * PAGE));
                ensure!(
                    got == Residency::System,
                    "{what}: private page {p} is {got:?} after the device's release"
                );
            }
        }
        Ok(())
    }

    /// The placement of each file page as the cache reports it (`None`: in system memory or
    /// uncached; the bool: cached), failing for a device the world does not have.
    fn placement_of(&self, p: usize, what: &str) -> Result<(Option<Placed>, bool), String> {
        let owner = |i: usize| self.devs[i].d.owner();
        Ok(match self.cache.placement(p as u64) {
            PagePlacement::Uncached => (None, false),
            PagePlacement::System => (None, true),
            PagePlacement::DevicePrivate { owner: o } if o == owner(0) => {
                (Some(Placed::Private), true)
            }
            PagePlacement::DeviceCoherent { owner: o } if o == owner(1) => {
                (Some(Placed::Coherent), true)
            }
            other => {
                return Err(format!(
                    "{what}: file page {p} is {other:?}, on no device of the world"
                ));
            }
        })
    }

    /// The cache's placement of every page against the model's (pages may have been evicted
    /// when `may_evict`), then the frames of the devices against the placements.
    fn check_placement(&mut self, what: &str, may_evict: bool) -> Result<(), String> {
        let eof = self.m.bytes.len().div_ceil(PAGE);
        for p in 0..MAP_PAGES {
            let (now, cached) = self.placement_of(p, what)?;
            ensure!(
                p < eof || !cached,
                "{what}: file page {p}, past the end of file ({eof} pages), is cached"
            );
            let want = self.placed[p];
            let ok = match (want, now) {
                (w, n) if w == n => true,
                // Came back, or evicted (a clean page; maybe filled again since).
                (Some(_), None) => self.may_leave[p] || may_evict,
                // Placed again after an eviction (the background evictor), or placed by this
                // operation where the model cannot tell exactly.
                (w, Some(x)) => {
                    self.may_arrive[p] == Some(x) && (w.is_none() || self.may_leave[p] || may_evict)
                }
                (None, None) => unreachable!("equal"),
            };
            ensure!(
                ok,
                "{what}: file page {p} is {:?}, the model expects {}",
                self.cache.placement(p as u64),
                match want {
                    None => "it in system memory or uncached".to_string(),
                    Some(x) => format!("it on the {x:?} device"),
                }
            );
            self.placed[p] = now;
        }
        self.check_replicas(what, may_evict)?;
        self.check_frames(what)
    }

    /// The cache's replica owners of every page ([`FileCache::replica_owners`]) against the
    /// model's (replicas may have been dropped with their pages when `may_evict`): only the
    /// device-private device, once, and only of a cached page.
    fn check_replicas(&mut self, what: &str, may_evict: bool) -> Result<(), String> {
        let me = self.devs[Dev::index(false)].d.owner();
        for p in 0..MAP_PAGES {
            let owners = self.cache.replica_owners(p as u64);
            ensure!(
                owners.len() <= 1 && owners.iter().all(|&o| o == me),
                "{what}: file page {p} has replicas on {owners:?}, the world's device-private device is {me:?}"
            );
            let got = !owners.is_empty();
            ensure!(
                !got || self.placement_of(p, what)?.1,
                "{what}: file page {p} is replicated but not cached"
            );
            let want = self.replicated[p];
            let ok = got == want
                || (want && (self.replica_may_drop[p] || may_evict))
                || (!want && self.replica_may_arrive[p]);
            ensure!(
                ok,
                "{what}: file page {p} has {} replica, the model expects {}",
                if got { "a" } else { "no" },
                if want { "one" } else { "none" }
            );
            self.replicated[p] = got;
        }
        Ok(())
    }

    /// Each device's used memory is its file pages (and, for the device-private device, the
    /// private mapping's pages migrated there; for the device-coherent one, the world's filler
    /// frames): a page that leaves the cache or comes back frees its frame. Counted again
    /// while the background evictor frees frames meanwhile.
    fn check_frames(&self, what: &str) -> Result<(), String> {
        let used = || [self.devs[0].d.used(), self.devs[1].d.used()];
        for _ in 0..=2 * MAP_PAGES {
            let before = used();
            let mut on = [0usize; 2];
            let mut replicas = 0;
            for p in 0..MAP_PAGES {
                replicas += self.cache.replica_owners(p as u64).len();
                match self.placement_of(p, what)?.0 {
                    Some(Placed::Private) => on[0] += 1,
                    Some(Placed::Coherent) => on[1] += 1,
                    None => {}
                }
            }
            let placed = self.cache.device_pages();
            let after = used();
            if before != after {
                continue;
            }
            let want = [
                (on[0] + replicas + self.private_on_device()) * PAGE,
                (on[1] + self.devs[1].filler.len()) * PAGE,
            ];
            ensure!(
                after == want,
                "{what}: devices use {after:?} bytes, their pages {want:?} ({on:?} file pages, {replicas} replicas)"
            );
            ensure!(
                placed == on[0] + on[1],
                "{what}: the cache counts {placed} pages in device memory, its pages say {}",
                on[0] + on[1]
            );
            return Ok(());
        }
        Err(format!("{what}: the devices' memory kept changing"))
    }

    /// After a placement or a return with no failure expected (or failures `f` accounted):
    /// the dirty bound, and the cached bytes as the new reference (a placement fills the
    /// pages it places: the next `read_at`/`write_at` evicts down to the budget).
    fn after_placement(&mut self, what: &str) -> Result<(), String> {
        let dirty = self.cache.dirty_bytes();
        ensure!(
            self.anon || !self.intercept || self.frames_written || dirty <= DIRTY,
            "{what}: {dirty} dirty bytes over the bound {DIRTY}"
        );
        self.cached_before = self.cache.cached_bytes();
        Ok(())
    }

    /// [`Op::Place`].
    fn place(
        &mut self,
        page: usize,
        pages: usize,
        coherent: bool,
        mirror: bool,
        what: &str,
    ) -> Result<(), String> {
        let mirror = mirror && self.map.is_some();
        if mirror {
            self.no_faults();
        }
        // The cache clamps the range to the file; a device's access past it is SIGBUS.
        let eof = self.m.bytes.len().div_ceil(PAGE);
        let last = (page + pages).min(eof);
        let (i, kind) = (Dev::index(coherent), Placed::of(coherent));
        // The pages that move, in order while the device has room: neither placed already
        // (on either device) nor pinned.
        let room = self.devs[i].room();
        let (mut moving, mut full) = (Vec::new(), false);
        for p in page..last {
            if self.placed[p].is_some() || self.pinned_shared[p] {
                continue;
            }
            if moving.len() == room {
                full = true;
                break;
            }
            moving.push(p);
        }
        // The contract's refusal: a device-private page in a writable shared mapping that
        // does not intercept stores.
        let refused = !coherent && self.map.is_some() && !self.intercept && page < last;
        let bg = self.background_evictor();
        let r = match (&self.map, &self.devs[i].m) {
            _ if page >= last => Ok(0),
            (Some((_, map)), Some(m)) if mirror => m
                .migrate_range_to_device(VirtAddr(map + page * PAGE), (last - page) * PAGE)
                .map(|o| o.cpages as usize),
            _ => self
                .cache
                .place_on_device(
                    (page * PAGE) as u64,
                    (pages * PAGE) as u64,
                    self.devs[i].d.pagemap(),
                )
                .map(|n| n as usize),
        };
        let f = self.account();
        // Through the mirror: the first page of the range not in the device's memory afterwards
        // (the migrate command then says ENOENT naming it).
        let missing = (page..last).find(|&p| !moving.contains(&p) && self.placed[p] != Some(kind));
        if refused {
            let Err(e) = r else {
                return Err(format!(
                    "{what}: placed ({r:?}) in a writable mapping that does not intercept stores"
                ));
            };
            ensure!(
                matches!(e, crate::Error::StoresNotIntercepted { page: p } if p == page as u64)
                    && e.errno() == libc::EBUSY,
                "{what}: refused with {e:?}, not StoresNotIntercepted at page {page}"
            );
            self.stats.placements_refused += 1;
            return self.after_placement(what);
        }
        if full {
            self.stats.device_full += 1;
        }
        match r {
            Err(crate::Error::NoMemory { .. }) => {
                // None of them fits (with the background evictor, a page the model had on a
                // device may have been evicted, and needed room).
                ensure!(
                    coherent && room == 0 && (full || bg),
                    "{what}: ENOMEM with room for {room} pages, {} to move",
                    moving.len()
                );
                self.stats.device_full_enomem += 1;
                return self.after_placement(what);
            }
            Err(crate::Error::NotPresent { addr }) if mirror => {
                // Moved, but a page of the range is not in this device's memory: on the other
                // device, pinned, or no room left (or evicted meanwhile).
                let p = (addr.get() - self.map.as_ref().expect("mirror").1) / PAGE;
                ensure!(
                    Some(p) == missing || (bg && (page..last).contains(&p)),
                    "{what}: page {p} reported not on the device, the model has {missing:?} first (moved {moving:?})"
                );
            }
            Err(e) => {
                // Only the fill through the cache may fail (an injected fault): nothing changed.
                fill_failure_explains(&f, &e, mirror, what)?;
                return self.after_placement(what);
            }
            Ok(n) => {
                ensure!(f.is_empty(), "{what}: Ok with failures {f:?}");
                ensure!(
                    !(full && moving.is_empty()) || bg,
                    "{what}: Ok ({n}) with no room on the device for any page"
                );
                if mirror {
                    ensure!(
                        missing.is_none() || bg,
                        "{what}: Ok, but page {missing:?} cannot be on the device"
                    );
                } else {
                    ensure!(
                        n == moving.len() || (bg && n > moving.len() && n <= last - page),
                        "{what}: {n} pages placed, the model moves {moving:?}"
                    );
                }
            }
        }
        self.stats.pages_placed += moving.len() as u64;
        for &p in &moving {
            self.placed[p] = Some(kind);
            // A placed page loses its read-only replicas (a device writes it in place).
            self.replicated[p] = false;
        }
        if bg {
            for p in (page..last).filter(|&p| !self.pinned_shared[p]) {
                self.may_arrive[p] = Some(kind);
            }
        }
        self.after_placement(what)
    }

    /// [`Op::Unplace`].
    fn unplace(
        &mut self,
        page: usize,
        pages: usize,
        coherent: bool,
        mirror: bool,
        what: &str,
    ) -> Result<(), String> {
        let mirror = mirror && self.map.is_some();
        if mirror {
            self.no_faults();
        }
        let last = (page + pages).min(MAP_PAGES);
        let kind = Placed::of(coherent);
        let mine = |x: Placed| !mirror || x == kind;
        let want = (page..last)
            .filter(|&p| self.placed[p].is_some_and(mine))
            .count();
        let r = match (&self.map, &self.devs[Dev::index(coherent)].m) {
            (Some((_, map)), Some(m)) if mirror => m
                .migrate_to_system(VirtAddr(map + page * PAGE), (last - page) * PAGE)
                .map(|o| o.cpages as usize),
            _ => self
                .cache
                .place_in_system((page * PAGE) as u64, (pages * PAGE) as u64)
                .map(|n| n as usize),
        };
        let f = self.account();
        // Through the cache, every replica of the range is dropped first (a replicated page
        // counts as one that came back); through a mirror, those of the device's own pages.
        let dropping: Vec<usize> = (page..last)
            .filter(|&p| {
                self.replicated[p]
                    && if mirror {
                        self.placed[p] == Some(kind)
                    } else {
                        true
                    }
            })
            .collect();
        let want = want
            + dropping
                .iter()
                .filter(|&&p| self.placed[p].is_none())
                .count();
        for &p in &dropping {
            self.drop_replicas(p, p + 1, true, false);
        }
        match r {
            Ok(n) => {
                ensure!(f.is_empty(), "{what}: Ok with failures {f:?}");
                ensure!(
                    n == want || (self.background_evictor() && n < want),
                    "{what}: {n} pages came back, the model has {want} there"
                );
                self.stats.pages_returned += n as u64;
                self.come_back(page, last, true, mine);
            }
            Err(e) => {
                // A private page's bytes go back into the memfd: a staging fault fails it
                // (it stays on the device); the others come back.
                ensure!(
                    !mirror && f.iter().any(|x| x.what == "stage" && x.errno == e.errno()),
                    "{what}: {e} without a staging failure of that errno (failures: {f:?})"
                );
                self.come_back(page, last, false, mine);
            }
        }
        self.after_placement(what)
    }

    /// [`Op::Replicate`].
    fn replicate(
        &mut self,
        page: usize,
        pages: usize,
        mirror: bool,
        what: &str,
    ) -> Result<(), String> {
        let mirror = mirror && self.map.is_some();
        if mirror {
            self.no_faults();
        }
        let eof = self.m.bytes.len().div_ceil(PAGE);
        let last = (page + pages).min(eof);
        let (off, len) = ((page * PAGE) as u64, (pages * PAGE) as u64);
        let i = Dev::index(false);
        if !mirror && page < last {
            // A device-coherent device maps the page itself: no replica there.
            let r = self.cache.replicate(off, len, self.devs[1].d.pagemap());
            let f = self.account();
            ensure!(
                matches!(r, Err(crate::Error::Invalid(_))) && f.is_empty(),
                "{what}: a replica on the device-coherent device: {r:?} (failures {f:?}), not EINVAL"
            );
        }
        // The pages replicated, in order while the device has room: not on a device, not
        // pinned, not replicated already.
        let room = self.devs[i].room();
        let (mut making, mut full) = (Vec::new(), false);
        for p in page..last {
            if self.placed[p].is_some() || self.pinned_shared[p] || self.replicated[p] {
                continue;
            }
            if making.len() == room {
                full = true;
                break;
            }
            making.push(p);
        }
        // A writable file's pages in a shared mapping that does not intercept stores.
        let refused = self.map.is_some() && !self.intercept && page < last;
        let bg = self.background_evictor();
        let r = match (&self.map, &self.devs[i].m) {
            _ if page >= last => Ok(0),
            (Some((_, map)), Some(m)) if mirror => m
                .replicate_range(VirtAddr(map + page * PAGE), (last - page) * PAGE)
                .map(|o| o.cpages as usize),
            _ => self
                .cache
                .replicate(off, len, self.devs[i].d.pagemap())
                .map(|n| n as usize),
        };
        let f = self.account();
        if refused {
            let Err(e) = r else {
                return Err(format!(
                    "{what}: replicated ({r:?}) in a writable mapping that does not intercept stores"
                ));
            };
            ensure!(
                matches!(e, crate::Error::StoresNotIntercepted { page: p } if p == page as u64)
                    && f.is_empty(),
                "{what}: refused with {e:?} (failures {f:?}), not StoresNotIntercepted at page {page}"
            );
            self.stats.replicas_refused += 1;
            return self.after_placement(what);
        }
        match r {
            Err(crate::Error::NoMemory { .. }) => {
                ensure!(
                    (full && making.is_empty()) || bg,
                    "{what}: ENOMEM with room for {room} pages, {} to replicate",
                    making.len()
                );
                return self.after_placement(what);
            }
            Err(e) => {
                // Only the fill through the cache may fail (an injected fault): nothing changed.
                fill_failure_explains(&f, &e, mirror, what)?;
                return self.after_placement(what);
            }
            Ok(n) => {
                ensure!(f.is_empty(), "{what}: Ok with failures {f:?}");
                ensure!(
                    n == making.len() || (bg && n <= last - page),
                    "{what}: {n} replicas made, the model makes {making:?}"
                );
                self.stats.replicas_made += n as u64;
            }
        }
        for &p in &making {
            self.replicated[p] = true;
        }
        if bg {
            for p in (page..last).filter(|&p| !self.pinned_shared[p]) {
                self.replica_may_arrive[p] = true;
            }
        }
        self.after_placement(what)?;
        // The device reads the pages (its replicas) back: the model's bytes.
        let whole = self.m.bytes.len().min(MAP_LEN) / PAGE;
        let n = whole.min(last).saturating_sub(page);
        if self.map.is_some() && n > 0 {
            self.no_faults();
        }
        if let (Some((_, map)), Some(m)) = (&self.map, &self.devs[i].m)
            && n > 0
        {
            let mut buf = vec![0u8; n * PAGE];
            m.read(VirtAddr(map + page * PAGE), n * PAGE, &mut buf)
                .map_err(|e| format!("{what}: device read of the replicas: {e}"))?;
            let o = page * PAGE;
            if let Some(k) = (0..buf.len()).find(|&k| buf[k] != self.m.bytes[o + k]) {
                return Err(format!(
                    "{what}: device read of the replicas: byte {} is {:#04x}, model {:#04x}",
                    o + k,
                    buf[k],
                    self.m.bytes[o + k]
                ));
            }
        }
        if self.map.is_some() && n > 0 {
            self.check_mapped(what)?;
        }
        Ok(())
    }

    /// Records the private pages filled since the last look: their snapshot is the file now.
    fn snapshot_filled(&mut self, what: &str) -> Result<(), String> {
        let Some((space, _)) = &self.map else {
            return Ok(());
        };
        for p in 0..self.snap.len() {
            if self.snap[p].is_some() {
                continue;
            }
            match space.residency(VirtAddr(self.private + p * PAGE)) {
                Residency::Untouched => {}
                Residency::System => {
                    let mut page = vec![0u8; PAGE];
                    let e = self.m.bytes.len().min((p + 1) * PAGE);
                    if e > p * PAGE {
                        page[..e - p * PAGE].copy_from_slice(&self.m.bytes[p * PAGE..e]);
                    }
                    self.snap[p] = Some(page);
                }
                r => {
                    return Err(format!("{what}: private page {p} is {r:?}"));
                }
            }
        }
        Ok(())
    }

    fn clear_staging(&mut self) {
        self.cache.fail_next_staging(0, 0);
        self.stage_pending = 0;
    }

    /// Clears both fault plans: before CPU and device accesses to mappings (a failed fill there
    /// is SIGBUS, not an error the model can observe).
    fn no_faults(&mut self) {
        self.plan(FaultPlan::default());
        self.clear_staging();
    }

    /// How many of `words` words from `off` lie inside the file and the mapping.
    fn words_in_file(&self, off: usize, words: usize) -> usize {
        let limit = self.m.bytes.len().min(MAP_LEN);
        (limit.saturating_sub(off) / 4).min(words)
    }

    /// After an access through the mapping (with no fault planned): no failure, the dirty bound
    /// holds (stores are intercepted). Faults fill pages and the evictor runs in the background,
    /// so the budget is checked by the next `read_at`/`write_at`.
    fn check_mapped(&mut self, what: &str) -> Result<(), String> {
        let f = self.account();
        ensure!(
            f.is_empty(),
            "{what}: failures with no fault planned: {f:?}"
        );
        let dirty = self.cache.dirty_bytes();
        ensure!(
            self.anon || !self.intercept || self.frames_written || dirty <= DIRTY,
            "{what}: {dirty} dirty bytes over the bound {DIRTY}"
        );
        self.cached_before = self.cache.cached_bytes();
        Ok(())
    }

    /// The whole file through `read_at` (chunks of varying size, alternating handles), and both
    /// handles' `len()`.
    fn check(&mut self, what: &str, window: Option<(usize, usize)>) -> Result<(), String> {
        self.checks += 1;
        for (i, h) in self.h.iter().enumerate() {
            let l = h.len();
            ensure!(
                l == self.m.bytes.len() as u64,
                "{what}: handle {i} len() {l}, model {}",
                self.m.bytes.len()
            );
        }
        let chunk = [PAGE, 3 * PAGE - 5, 1000, 2 * PAGE + 17][self.checks % 4];
        let h = self.checks % 2;
        let size = self.m.bytes.len();
        // Past the end first, then from a small offset to the end, then the start.
        let mut buf = vec![0u8; chunk];
        let n = self.h[h].read_at(size as u64 + 3, &mut buf);
        ensure!(matches!(n, Ok(0)), "{what}: read past the end gave {n:?}");
        let start = if size == 0 {
            0
        } else {
            self.checks * 7 % size.min(PAGE)
        };
        let mut ranges = Vec::new();
        let spans = if self.sparse && !self.checks.is_multiple_of(SPARSE) {
            // The pages around the operation.
            let Some((lo, hi)) = window else {
                return Ok(());
            };
            let lo = (lo / PAGE).saturating_sub(1) * PAGE;
            let hi = ((hi / PAGE + 2) * PAGE).min(size);
            vec![(lo.min(hi), hi)]
        } else {
            vec![(start, size), (0, start)]
        };
        for (lo, hi) in spans {
            let mut s = lo;
            while s < hi {
                ranges.push((s, (s + chunk).min(hi)));
                s += chunk;
            }
        }
        for (s, e) in ranges {
            let len = e - s;
            let mut r = self.h[h].read_at(s as u64, &mut buf[..len]);
            let mut f = self.account();
            // A read fault and a staging fault planned fail one read each: the third succeeds.
            for _ in 0..2 {
                if !(r.is_err() && f.iter().any(|x| x.what == "read" || x.what == "stage")) {
                    break;
                }
                self.check_bounds(&f, true, &format!("{what}: check read at {s}"))?;
                r = self.h[h].read_at(s as u64, &mut buf[..len]);
                f = self.account();
            }

            self.check_bounds(&f, true, &format!("{what}: check read at {s}"))?;
            let n = r.map_err(|e| format!("{what}: check read at {s}: {e}"))?;
            ensure!(n == len, "{what}: check read at {s}: {n} bytes of {len}");
            if buf[..len] != self.m.bytes[s..s + len] {
                let i = (0..len).find(|&i| buf[i] != self.m.bytes[s + i]).unwrap();
                return Err(format!(
                    "{what}: check read through handle {h}: byte {} is {:#04x}, model {:#04x}",
                    s + i,
                    buf[i],
                    self.m.bytes[s + i]
                ));
            }
        }
        self.stats.evicted = self.cache.stats().pages_evicted;
        Ok(())
    }

    /// Syncs both handles (clearing the faults first), drops everything (the file on disk must
    /// still be the model) and compares a fresh cache of the file with the disk.
    fn finish(mut self) -> Result<Stats, String> {
        self.no_faults();
        self.fsync(0, false, "final fsync 0")?;
        self.fsync(1, false, "final fsync 1")?;
        let stats = self.stats;
        let World {
            file,
            cache,
            h,
            map,
            devs,
            pin,
            m,
            ..
        } = self;
        drop(pin);
        // Device removal: what they hold comes back to the cache (and was written back).
        drop(devs);
        drop(map);
        drop(h);
        drop(cache);
        // Shared anonymous memory is gone with its cache: nothing to read back.
        let Some(file) = file else {
            return Ok(stats);
        };
        let disk =
            std::fs::read(&file.0).map_err(|e| format!("after the drop: reading the file: {e}"))?;
        ensure!(
            disk == m.bytes,
            "after the drop: the file on disk ({} bytes) differs from the model ({} bytes)",
            disk.len(),
            m.bytes.len()
        );
        let cfg = CacheConfig {
            budget: BUDGET,
            dirty_bound: DIRTY,
        };
        let c = FileCache::open(&file.0, false, cfg).map_err(|e| format!("reopen: {e}"))?;
        let h = c.handle();
        ensure!(
            h.len() == disk.len() as u64,
            "reopen: len {} of {}",
            h.len(),
            disk.len()
        );
        let mut buf = vec![0u8; PAGE];
        for s in (0..disk.len()).step_by(PAGE) {
            let n = h
                .read_at(s as u64, &mut buf)
                .map_err(|e| format!("reopen read: {e}"))?;
            ensure!(
                buf[..n] == disk[s..s + n],
                "reopen: page at {s} differs from the disk"
            );
        }
        Ok(stats)
    }
}

/// The bytes an operation touches.
fn window(op: &Op) -> Option<(usize, usize)> {
    match *op {
        Op::Write { off, len, .. }
        | Op::Read { off, len, .. }
        | Op::DirectRead { off, len, .. }
        | Op::DirectWrite { off, len, .. } => Some((off, off + len)),
        Op::SetLen { len } => Some((len, len)),
        Op::Punch { page, pages } => Some((page * PAGE, (page + pages) * PAGE)),
        Op::MapStore { off, words, .. } | Op::MapLoad { off, words } => {
            Some((off, off + 4 * words))
        }
        Op::Private { .. }
        | Op::PrivateMigrate { .. }
        | Op::Remap { .. }
        | Op::DeviceRemoval { .. }
        | Op::Release { .. }
        | Op::Pin(_) => None,
        Op::Device { page, pages, .. }
        | Op::Place { page, pages, .. }
        | Op::Unplace { page, pages, .. }
        | Op::Replicate { page, pages, .. } => Some((page * PAGE, (page + pages) * PAGE)),
        Op::Fsync { .. } | Op::NewHandle | Op::Fault(_) => None,
    }
}

/// Applies `op` (which must be in range, see [`Op::in_range`]) to the real objects, checks the
/// outcome against the model, updates the model, and checks the state (see the module doc).
/// Returns the first mismatch; its message names the op and its index in the world's run.
pub fn apply(w: &mut World, op: &Op) -> Result<(), String> {
    let what = format!("op {} {op:?}", w.stats.ops);
    w.stats.ops += 1;
    ensure!(op.in_range(), "{what}: op out of range");
    w.step(op, &what)
}

/// Ends a run: syncs both handles (with no fault planned; each `fsync` checked as in [`apply`]),
/// drops the world (the file on disk must still equal the model), reopens the file in a fresh
/// cache and reads it back (it must read as the disk). Takes the world because it drops it.
/// Returns the world's final counts (with the final `fsync`s), or the first mismatch.
pub fn check_all(w: World) -> Result<Stats, String> {
    w.finish()
}

/// An error of a placement or replication through the cache is explained by an injected fault
/// of its fill (a failed read of the file or staging into the memfd, of the same errno); through
/// a mirror nothing may fail that way.
fn fill_failure_explains(
    f: &[Failure],
    e: &crate::Error,
    mirror: bool,
    what: &str,
) -> Result<(), String> {
    ensure!(
        !mirror
            && f.iter()
                .any(|x| (x.what == "read" || x.what == "stage") && x.errno == e.errno()),
        "{what}: {e} without a failed read or staging of that errno (failures: {f:?})"
    );
    Ok(())
}
