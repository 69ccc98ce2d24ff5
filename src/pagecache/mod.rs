//! hetmem's page cache for files.
//!
//! A [`FileCache`] caches one file for this process, staged in a memfd at the file's offsets
//! (see `docs/filesystem-contract.md` for why, and for the mappings of the file).
//! This module is the cache itself and its system-call-like API: [`FileHandle::read_at`] and
//! [`FileHandle::write_at`] through the cache, writeback (background under a dirty bound, and
//! synchronous with [`FileHandle::fsync`]), truncate and extend ([`FileHandle::set_len`]), hole
//! punch, direct I/O that stays coherent with the cache, and a budget with eviction of clean
//! pages.
//!
//! # Page states
//!
//! | state | memfd holds | on disk | may be evicted |
//! |---|---|---|---|
//! | `Uncached` | nothing (a hole) | the data | — |
//! | `Clean` | the data | the same data | yes (least recently filled first) |
//! | `Dirty` | newer data | older data | no: written back first |
//! | lost (`Uncached`, and recorded as lost) | nothing (a hole) | older data, never overwritten by writeback | — |
//!
//! A page is lost when its memory fails while it is dirty (a memory failure, `poison.rs`):
//! SIGBUS on CPU access, EIO for reads and device accesses, until a truncate, a hole punch or a
//! write of the whole page.
//!
//! # Locks
//!
//! One lock per cache (`FileCache::st`) serialises every operation on the file: fills, writes,
//! writeback, truncate, punch, direct I/O and eviction. (When mappings and devices come, it sits
//! between the address space's lock and the device page table's: docs/filesystem-contract.md.)
//!
//! # Errors (errseq)
//!
//! A failed writeback (EIO, ENOSPC, a short write) leaves the page dirty and records an error
//! event; every [`FileHandle`] reports each event once, on its next `fsync`, as the kernel's
//! errseq does. A page that keeps failing stays dirty and counts against the dirty bound; once the
//! bound is reached, writers get the error instead of waiting forever. A dirty page lost to a
//! memory failure records an event too (EIO).
//!
//! # What the cache does not promise
//!
//! It is per process: data not yet written back dies with the process (the kernel's page cache
//! would keep it). Writes to the file by other processes, or through other descriptors, while it
//! is cached are outside the contract.

use std::io;
use std::path::Path;

use crate::addr::PAGE_SIZE;
use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicU32, AtomicU64, Condvar, Mutex, Ordering, lock};
use crate::sys::Memfd;

mod ahead;
mod anon;
mod backend;
mod placement;
mod poison;
mod state;

thread_local! {
    /// This thread's file fault-around run: which cache (its address), the page right after its
    /// last window, and that window's size in pages (per thread; a `const` thread-local:
    /// readable from the SIGBUS handler).
    static FILE_FAULT_AROUND: std::cell::Cell<(usize, u64, u64)> =
        const { std::cell::Cell::new((0, u64::MAX, 0)) };
}

pub use backend::AnonBackend;
#[cfg(feature = "testing")]
pub use backend::{FaultPlan, FaultyBackend};
pub use backend::{FileBackend, StdFile};
pub use placement::PagePlacement;
pub(crate) use placement::{cache_by_id, hold_for_fork};
pub use poison::MemoryFailure;
use state::{PageState, PageStates};

const PAGE: u64 = PAGE_SIZE as u64;
/// Blocked runs the cache has room for without allocating (see `prepare_for_faults`).
const BLOCKED_RESERVE: usize = 64;
/// Bytes a fill reads from the file at once (the largest fault-around window).
const FILL_CHUNK: usize = 2 << 20;

/// How a cached file's pages will be accessed through mappings: what `madvise`'s
/// `MADV_NORMAL`, `MADV_RANDOM` and `MADV_SEQUENTIAL` tell the kernel's read-around, told to
/// hetmem's fills ([`FileCache::set_access`]). Advice only: every access reads the same bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// Fault-around adapts: a fault fills its own page, faults in sequence fill a window that
    /// doubles up to 2 MiB, and further windows are read ahead.
    #[default]
    Normal,
    /// Every fault fills its own page only (no fault-around, no read-ahead), and the file is
    /// told so (`POSIX_FADV_RANDOM`: the kernel's read-ahead of those reads reads nothing more).
    Random,
    /// Every fault fills 2 MiB from its page on and hands the next windows to the read-ahead.
    Sequential,
}

/// Sizes of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Most bytes of the file held in memory (memfd has no swap behind it); clean pages beyond
    /// it are evicted.
    pub budget: usize,
    /// Most dirty bytes; a write beyond it first writes back, and fails if writeback fails.
    pub dirty_bound: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            budget: 256 << 20,
            dirty_bound: 64 << 20,
        }
    }
}

/// Aligned to a cache line: the lock word and the data of `Mutex<CacheState>` sit on different
/// lines (see `SpaceState`).
#[derive(Debug)]
#[repr(align(64))]
struct CacheState {
    /// The file's size as this process sees it.
    size: u64,
    /// The size last set on the backend.
    disk_size: u64,
    pages: PageStates,
    /// The buffer fills read the file into (`FILL_CHUNK` bytes, made when the first mapping
    /// is attached or at the first fill; taken while a fill runs): fills never allocate it.
    fill_buf: Vec<u8>,
    err_seq: u64,
    last_err: i32,
    stats: CacheStats,
    /// The file's mappings in address spaces (see [`crate::space::Space::map_file`]).
    mappings: Vec<MapRec>,
    /// File pages being removed (truncate, punch, direct write) while device mappings of them
    /// are invalidated: faults on them retry, `range_fault` gets EBUSY.
    blocked: Vec<(u64, u64)>,
    /// Pin counts of file pages pinned through mappings (never evicted).
    pinned: std::collections::BTreeMap<u64, u32>,
    /// A writeback that an intercepted store at the dirty bound asked the background thread
    /// for (see [`FileCache::store_fault`]).
    flush: Flush,
    /// The devices whose memory holds pages of the file (a page's placement names one by its
    /// index here; see `placement.rs`).
    devs: Vec<Arc<crate::pool::Pagemap>>,
    /// Pages a device may write through a mapping that intercepts stores (granted by
    /// [`FileCache::device_write_fault`]): writeback keeps them dirty and unprotected until
    /// the device's write access is revoked ([`FileCache::lock_for_writeback`]).
    dev_writable: std::collections::BTreeSet<u64>,
    /// Read-only device copies of pages (the memfd keeps the data): per page, the devices
    /// (indices in `devs`) and frames holding one (see `placement.rs`).
    replicas: std::collections::BTreeMap<u64, Vec<(u8, u32)>>,
    /// Pages whose data a memory failure lost (`Uncached`, a hole in the memfd; see
    /// `poison.rs`): never filled, SIGBUS on CPU access, EIO for reads and device accesses.
    poisoned: std::collections::BTreeSet<u64>,
    /// The read-ahead's assignment and the window it is reading (see `ahead.rs`).
    ahead: ahead::Ahead,
    /// How mappings access the file ([`FileCache::set_access`]).
    access: Access,
    /// Pages found removed from the memfd behind the cache's back (the program's
    /// `madvise(MADV_REMOVE)`), to follow with no lock held ([`FileCache::wait_for_removal`]).
    removed_behind: Option<(u64, u64)>,
}

/// The state of a writeback asked of the background thread by stores at the dirty bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flush {
    Idle,
    Requested,
    /// The last one failed: the next store at the bound gets SIGBUS (and the state is Idle
    /// again, so that a later store asks for a new try).
    Failed,
}

/// What an intercepted store fault does next (see [`FileCache::store_fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreFault {
    /// The page is dirty and writable: retry the store.
    Done,
    /// The store must fail with SIGBUS (past the end of file; or the dirty bound is reached and
    /// writeback failed).
    Sigbus,
    /// The dirty bound is reached: the background thread is writing back; wait for it with no
    /// lock held ([`FileCache::wait_flush`]) and retry.
    WaitFlush,
    /// The page is in device-private memory: bring it back ([`FileCache::settle`]) with no
    /// lock held, then retry.
    Device,
}

/// What a fault fill did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// The page is in the cache.
    Filled,
    /// The page is past the end of the file.
    PastEof,
    /// The page is being removed: retry.
    Busy,
    /// The page is in device-private memory: bring it back ([`FileCache::settle`]) with no
    /// lock held, then retry.
    Device,
}

/// An operation that removes file pages from the cache, in the two phases of
/// docs/filesystem-contract.md: the pages are blocked (no fill, no new device mapping) and the
/// device mappings of every mapping of them invalidated, with no cache lock held (notifiers run
/// under each address space's lock, which is above the cache lock); then the operation runs
/// under the cache lock. Dropping it unblocks the pages.
struct Removal<'a> {
    st: crate::sync::Guard<'a, CacheState>,
    _serial: crate::sync::Guard<'a, ()>,
}

impl std::ops::Deref for Removal<'_> {
    type Target = CacheState;
    fn deref(&self) -> &CacheState {
        &self.st
    }
}

impl std::ops::DerefMut for Removal<'_> {
    fn deref_mut(&mut self) -> &mut CacheState {
        &mut self.st
    }
}

/// The cache lock for a writeback ([`FileCache::lock_for_writeback`]).
enum WritebackGuard<'a> {
    Plain(crate::sync::Guard<'a, CacheState>),
    Revoked(Removal<'a>),
}

impl std::ops::Deref for WritebackGuard<'_> {
    type Target = CacheState;
    fn deref(&self) -> &CacheState {
        match self {
            WritebackGuard::Plain(g) => g,
            WritebackGuard::Revoked(r) => r,
        }
    }
}

impl std::ops::DerefMut for WritebackGuard<'_> {
    fn deref_mut(&mut self) -> &mut CacheState {
        match self {
            WritebackGuard::Plain(g) => g,
            WritebackGuard::Revoked(r) => r,
        }
    }
}

impl Drop for Removal<'_> {
    fn drop(&mut self) {
        // Pages removed from the memfd lost their entries in every mapping, write protection
        // included: protect them again where stores are intercepted, so that the next store
        // after a refill faults.
        // (By index, keeping the list's memory: a CPU fault that brings a page back from a
        // device blocks it here too, and must not allocate.)
        for k in 0..self.st.blocked.len() {
            let (f, l) = self.st.blocked[k];
            FileCache::protect_sync_mappings(&self.st, f, l);
            // Their device mappings were invalidated in phase one and they are protected
            // again: a device's write access to them must be asked for again.
            while let Some(&p) = self.st.dev_writable.range(f..l).next() {
                self.st.dev_writable.remove(&p);
            }
        }
        self.st.blocked.clear();
    }
}

/// The address space a mapping of the file lives in, as the cache sees it (the kernel's
/// `vma->vm_mm`, reached from the file's `i_mmap`). Implemented by the address space
/// (`space::SpaceCore`): the cache reaches it only to invalidate device mappings of pages it
/// removes, and the space's fault service calls into the cache (never the other way round).
pub(crate) trait MappingHost: Send + Sync {
    /// Invalidates the device mappings of `range` (the space's interval notifiers, with
    /// `event`), under the space's own state lock, which the caller must not hold.
    fn invalidate_file_range(
        &self,
        range: crate::addr::VaRange,
        event: crate::notifier::NotifyEvent,
    );
}

/// One mapping of the file: where it is, and which file page its first page is.
#[derive(Debug, Clone)]
pub(crate) struct MapRec {
    pub(crate) space: crate::sync::Weak<dyn MappingHost>,
    /// The space's kernel side: scans and protections under the cache lock go through it,
    /// never through the space (holding the last reference to a space under the cache lock
    /// would run its destructor there, which takes the space's lock and this cache's).
    pub(crate) mm: std::sync::Weak<dyn crate::mm::Mm>,
    pub(crate) space_id: u16,
    pub(crate) range: crate::addr::VaRange,
    pub(crate) pgoff: u64,
    /// Shared: CPU stores reach the cache and are tracked (once it is writable).
    pub(crate) tracked: bool,
    /// Shared and writable now or ever since it was mapped: its pages are never evicted by
    /// `shrink_to_budget` (a store could land between the clean check and the removal).
    pub(crate) writable: bool,
    /// Stores are intercepted (synchronous write-protect): the first store to a clean page
    /// faults into [`FileCache::store_fault`]; writeback re-protects before it reads.
    pub(crate) sync: bool,
}

/// Counters of a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Pages read from the file into the cache.
    pub pages_filled: u64,
    /// Pages written back to the file.
    pub pages_written_back: u64,
    /// Clean pages evicted under the budget.
    pub pages_evicted: u64,
    /// Clean device-private pages a device evicted (its release or removal) without a copy
    /// back: their next access reads the file again.
    pub device_pages_dropped: u64,
    /// Writeback error events.
    pub writeback_errors: u64,
    /// Pages the read-ahead thread filled (counted in `pages_filled` too).
    pub pages_read_ahead: u64,
    /// Windows the read-ahead read and dropped: the file or the memfd failed, or a page of the
    /// window changed (a write, a removal) while it was read, which would have made it stale.
    pub read_ahead_dropped: u64,
    /// Faults (CPU or device) that waited for the read-ahead to read their page.
    pub read_ahead_waits: u64,
    /// Pages the program removed from a shared mapping behind the cache's back
    /// (`madvise(MADV_REMOVE)`), followed as a hole punch (see
    /// docs/filesystem-contract.md).
    pub pages_removed_by_program: u64,
}

/// One file's page cache (see the module doc).
///
/// # Examples
///
/// ```
/// use hetmem::{CacheConfig, FileCache, Prot, Space};
///
/// # fn main() -> hetmem::Result<()> {
/// let path = std::env::temp_dir().join(format!("hetmem-doc-{}", std::process::id()));
/// std::fs::write(&path, vec![0u8; 8192]).unwrap();
/// let cache = FileCache::open(&path, true, CacheConfig::default())?;
/// let file = cache.handle();
/// let space = Space::new()?;
/// let a = space.map_file(&file, 0, 8192, Prot::ReadWrite, true)?; // shared: stores reach the file
/// space.cpu_write(a.add(4096), b"durable")?;
/// file.fsync()?; // hetmem's cache is written back (libc's fsync would not flush it)
/// assert_eq!(&std::fs::read(&path).unwrap()[4096..4103], b"durable");
/// space.unmap(a, 8192)?;
/// # std::fs::remove_file(&path).unwrap();
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FileCache {
    backend: Box<dyn FileBackend>,
    memfd: Memfd,
    writable: bool,
    cfg: CacheConfig,
    st: Mutex<CacheState>,
    /// Serialises page removals (truncate, punch, direct write, eviction) across their two
    /// phases.
    removal: Mutex<()>,
    /// Stores waiting for a writeback of the background thread wait here (with the mutex; the
    /// state is `CacheState::flush`). Taken directly, outside the lock watch (a store fault
    /// waits here); the facade's types, so that `shuttle` schedules the wait.
    flush_wait: (Mutex<()>, Condvar),
    /// This cache, weakly (for the background evictor).
    me: crate::sync::Weak<FileCache>,
    /// The background evictor's doorbell (started with the first mapping).
    evictor: Mutex<Option<std::sync::Arc<Doorbell>>>,
    /// The read-ahead thread's doorbell (started with the first mapping; see `ahead.rs`).
    ahead_bell: Mutex<Option<std::sync::Arc<Doorbell>>>,
    /// Windows the read-ahead has ended (staged or dropped); faults waiting for one wait on
    /// `ahead_wait` (taken directly, outside the lock watch, as `flush_wait`).
    ahead_done: AtomicU64,
    ahead_wait: (Mutex<()>, Condvar),
    /// Fault injection ([`FileCache::fail_next_staging`]): staging writes left to fail, and
    /// with which errno. Only with the `testing` feature.
    #[cfg(feature = "testing")]
    stage_fail: AtomicU32,
    #[cfg(feature = "testing")]
    stage_errno: AtomicU32,
    /// Where writeback events go ([`FileCache::set_trace`]).
    trace: crate::policy::trace::TraceSlot,
    /// Id in the reverse map of device frames (0 until a page is first placed on a device).
    rmap_id: AtomicU32,
}

/// Wakes a background thread without allocating (the CPU fault path rings it): a flag and a
/// condition variable; `close` makes the thread's `wait` return false. Taken directly, outside
/// the lock watch; the facade's types, so that under `shuttle` the background thread (a
/// facade thread too) is one more thread of the schedules explored.
#[derive(Debug, Default)]
struct Doorbell {
    /// (rung, closed)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = true;
        self.cv.notify_one();
    }
    fn close(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        self.cv.notify_one();
    }
    /// Waits for a ring (true) or the close (false).
    fn wait(&self) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if g.1 {
                return false;
            }
            if std::mem::take(&mut g.0) {
                return true;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for FileCache {
    fn drop(&mut self) {
        // The evictor holds only a weak reference: tell it to end (it is not joined: it may be
        // the thread dropping the last reference).
        if let Some(bell) = lock(&self.evictor).take() {
            bell.close();
        }
        if let Some(bell) = lock(&self.ahead_bell).take() {
            bell.close();
        }
        // Device frames holding pages of the file are freed.
        let mut st = lock(&self.st);
        self.release_all_slots(&mut st);
    }
}

/// A running background writer (see [`FileCache::start_background_writeback`]); dropping it
/// stops the writer.
#[derive(Debug)]
pub struct BackgroundWriteback {
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BackgroundWriteback {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A handle on a cached file: the unit that sees each writeback error once (like a file
/// description).
#[derive(Debug)]
pub struct FileHandle {
    cache: Arc<FileCache>,
    seen: AtomicU64,
}

fn pages_for(size: u64) -> u64 {
    size.div_ceil(PAGE)
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::os(op, e)
}

impl FileCache {
    /// Opens `path` with the caller's permissions (read-only, or read-write when `writable`) and
    /// caches it. A file that cannot be opened gives the error of `open(2)` (ENOENT, EACCES...).
    ///
    /// Only a regular file can be cached: anything else (a FIFO, a directory, a device) is
    /// refused with [`Error::NotRegularFile`] without blocking — the file is opened
    /// non-blocking (opening a FIFO would otherwise wait for a writer forever) and checked with
    /// `fstat` before any I/O.
    pub fn open(path: &Path, writable: bool, cfg: CacheConfig) -> Result<Arc<FileCache>> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| {
                // A FIFO opened for writing without a reader: ENXIO. Say what it is.
                if std::fs::metadata(path).is_ok_and(|m| !m.file_type().is_file()) {
                    Error::NotRegularFile {
                        path: path.to_owned(),
                    }
                } else {
                    Error::Open {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        let meta = f.metadata().map_err(os("stat file"))?;
        if !meta.file_type().is_file() {
            return Err(Error::NotRegularFile {
                path: path.to_owned(),
            });
        }
        // O_NONBLOCK means nothing to a regular file's I/O; cleared anyway so that the
        // descriptor is exactly what a plain open gives.
        let flags = rustix::fs::fcntl_getfl(&f).map_err(|e| Error::os("fcntl", e.into()))?;
        rustix::fs::fcntl_setfl(&f, flags - rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| Error::os("fcntl", e.into()))?;
        Self::with_backend(Box::new(StdFile(f)), writable, cfg)
    }

    /// Caches the file behind `backend`.
    pub fn with_backend(
        backend: Box<dyn FileBackend>,
        writable: bool,
        cfg: CacheConfig,
    ) -> Result<Arc<FileCache>> {
        if cfg.budget < PAGE_SIZE || cfg.dirty_bound < PAGE_SIZE {
            return Err(Error::Invalid(
                "cache budget and dirty bound must hold a page",
            ));
        }
        // A backend without storage (shared anonymous memory) can neither write back nor
        // refill what it would evict: no budget, no dirty bound.
        let cfg = if backend.has_storage() {
            cfg
        } else {
            CacheConfig {
                budget: usize::MAX,
                dirty_bound: usize::MAX,
            }
        };
        let size = backend.len().map_err(os("stat file"))?;
        // A memfd whose writes make large folios would serve zeros for pages never filled.
        if let Some(why) = crate::sys::shmem_large_folios() {
            return Err(Error::Unsupported(why));
        }
        let memfd = Memfd::new("hetmem-cache").map_err(os("memfd_create"))?;
        memfd.set_len(size).map_err(os("size the cache"))?;
        Ok(Arc::new_cyclic(|me| FileCache {
            me: me.clone(),
            evictor: Mutex::new(None),
            ahead_bell: Mutex::new(None),
            ahead_done: AtomicU64::new(0),
            ahead_wait: (Mutex::new(()), Condvar::new()),
            #[cfg(feature = "testing")]
            stage_fail: AtomicU32::new(0),
            #[cfg(feature = "testing")]
            stage_errno: AtomicU32::new(0),
            trace: Default::default(),
            backend,
            memfd,
            writable,
            cfg,
            removal: Mutex::new(()),
            flush_wait: (Mutex::new(()), Condvar::new()),
            st: Mutex::new(CacheState {
                size,
                disk_size: size,
                pages: PageStates::new(pages_for(size)),
                fill_buf: Vec::new(),
                err_seq: 0,
                last_err: 0,
                stats: CacheStats::default(),
                mappings: Vec::new(),
                blocked: Vec::new(),
                pinned: std::collections::BTreeMap::new(),
                flush: Flush::Idle,
                devs: Vec::new(),
                dev_writable: std::collections::BTreeSet::new(),
                replicas: std::collections::BTreeMap::new(),
                poisoned: std::collections::BTreeSet::new(),
                ahead: ahead::Ahead::default(),
                access: Access::Normal,
                removed_behind: None,
            }),
            rmap_id: AtomicU32::new(0),
        }))
    }

    /// A new handle (it will report writeback errors that happen from now on).
    pub fn handle(self: &Arc<Self>) -> FileHandle {
        let seen = lock(&self.st).err_seq;
        FileHandle {
            cache: self.clone(),
            seen: AtomicU64::new(seen),
        }
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        lock(&self.st).stats
    }

    /// Records this file's writeback events into `t` from now on (`None`: stop). Share one
    /// tracer between a space and the files it maps to get one trace on one clock.
    pub fn set_trace(&self, t: Option<crate::policy::trace::Tracer>) {
        self.trace.set(t);
    }

    /// Fault injection at the staging memory's growth: the next `n` writes into the memfd that
    /// allocate its pages (a fill from the file, for `read_at`, a CPU fault or a private
    /// mapping; the data of a `write_at`) fail with `errno` before writing anything, as when
    /// memory runs out (`ENOMEM`, or `ENOSPC` from the memfd). The caller gets the error: a
    /// `read_at` or `write_at` returns it with nothing changed, a CPU access gets SIGBUS (the
    /// fault is not served: the default action, as for the kernel's read error on a mapped file;
    /// the page stays uncached). It is no writeback error:
    /// `fsync` does not report it. Only with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn fail_next_staging(&self, n: u32, errno: i32) {
        self.stage_errno.store(errno as u32, Ordering::SeqCst);
        self.stage_fail.store(n, Ordering::SeqCst);
    }

    /// Staging faults planned by [`FileCache::fail_next_staging`] that have not fired yet.
    #[cfg(feature = "testing")]
    pub fn staging_faults_pending(&self) -> u32 {
        self.stage_fail.load(Ordering::SeqCst)
    }

    /// A write into the memfd that may allocate: fails if a staging fault is planned.
    fn stage(&self, off: u64, data: &[u8]) -> io::Result<()> {
        #[cfg(feature = "testing")]
        if self
            .stage_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::from_raw_os_error(
                self.stage_errno.load(Ordering::SeqCst) as i32,
            ));
        }
        self.memfd.write_at(off, data)
    }

    /// Bytes of the file held in memory.
    pub fn cached_bytes(&self) -> usize {
        lock(&self.st).pages.cached * PAGE_SIZE
    }

    /// Dirty bytes.
    pub fn dirty_bytes(&self) -> usize {
        lock(&self.st).pages.dirty * PAGE_SIZE
    }

    fn set_state(&self, st: &mut CacheState, p: u64, new: PageState) {
        // A read-ahead of the page in flight is stale now.
        st.ahead.touch(p);
        if new == PageState::Uncached {
            // Leaving the cache: a device frame holding it goes too (not written), and so do
            // its read-only replicas.
            self.release_slot(st, p);
            self.release_replicas(st, p);
            if !st.dev_writable.is_empty() {
                st.dev_writable.remove(&p);
            }
        }
        st.pages.set(p, new);
    }

    /// Reads pages `first..last` that are not cached from the file into the memfd (runs of
    /// uncached pages in one read each; the tail past the end of file reads as zeros). Lost
    /// pages are skipped.
    fn fill(&self, st: &mut CacheState, first: u64, last: u64) -> Result<()> {
        let last = last.min(st.pages.len());
        // A page whose data a memory failure lost is never filled (see `poison.rs`).
        let fillable = |st: &CacheState, p: u64| {
            st.pages.get(p) == PageState::Uncached
                && (st.poisoned.is_empty() || !st.poisoned.contains(&p))
        };
        let mut p = first;
        while p < last {
            if !fillable(st, p) {
                p += 1;
                continue;
            }
            let s = p;
            while p < last && fillable(st, p) {
                p += 1;
            }
            // The run, in chunks of the fill buffer.
            let mut buf = std::mem::take(&mut st.fill_buf);
            if buf.len() < FILL_CHUNK {
                buf = vec![0u8; FILL_CHUNK];
            }
            let res = self.fill_run(st, s, p, &mut buf);
            st.fill_buf = buf;
            res?;
        }
        Ok(())
    }

    /// Fills the uncached run `s..e` through `buf`, a chunk at a time.
    fn fill_run(&self, st: &mut CacheState, s: u64, e: u64, buf: &mut [u8]) -> Result<()> {
        if !self.backend.has_storage() {
            return self.fill_anon_run(st, s, e);
        }
        let chunk = (buf.len() / PAGE_SIZE) as u64;
        let mut c = s;
        while c < e {
            let n = (e - c).min(chunk);
            let buf = &mut buf[..(n * PAGE) as usize];
            let want = (st.disk_size.min(st.size))
                .saturating_sub(c * PAGE)
                .min(buf.len() as u64) as usize;
            let got = self
                .read_file(c * PAGE, &mut buf[..want])
                .map_err(os("read file"))?;
            buf[got..].fill(0);
            self.stage(c * PAGE, buf).map_err(os("fill the cache"))?;
            // The cache holds these bytes now: the kernel's copy may go (held once).
            self.backend.drop_cached(c * PAGE, got as u64);
            for q in c..c + n {
                self.set_state(st, q, PageState::Clean);
            }
            st.stats.pages_filled += n;
            c += n;
        }
        Ok(())
    }

    /// Reads the file at `off` into `buf` until it is full or the file ends (interrupted reads
    /// retried); returns the bytes read.
    fn read_file(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.backend.read_at(off + got as u64, &mut buf[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(got)
    }

    /// Evicts clean pages (oldest fill first, never those in `keep` nor mapped ones) while over
    /// the budget; if only dirty pages are left, writes them back first.
    fn evict(&self, st: &mut CacheState, keep: (u64, u64)) {
        let budget = self.cfg.budget / PAGE_SIZE;
        if st.pages.cached <= budget {
            return;
        }
        // A device-private page the device wrote is dirty, not a victim.
        self.collect_device_dirty(st);
        for round in 0..2 {
            for p in st.pages.clean_by_age() {
                if st.pages.cached <= budget {
                    return;
                }
                if (keep.0..keep.1).contains(&p) || Self::mapped(st, p) {
                    continue;
                }
                if !self.evict_clean(st, p) {
                    return;
                }
            }
            if round == 0 && st.pages.cached > budget && st.pages.dirty > 0 {
                let all = st.pages.all_dirty();
                let _ = self.writeback(st, &all);
            }
        }
    }

    /// Evicts clean page `p`: punched from the memfd, uncached. A clean page in system memory
    /// that the memfd no longer holds was removed by the program behind the cache's back
    /// (`madvise(MADV_REMOVE)`) and not found by a fault since: its file range is punched too,
    /// so that it reads zeros from now on, as it did from the memfd (found by review: read
    /// through `read_at`, it read zeros, then, evicted, the file's old bytes). False when the
    /// memfd refuses the punch.
    fn evict_clean(&self, st: &mut CacheState, p: u64) -> bool {
        if st.pages.slot(p).is_none()
            && self.backend.has_storage()
            && self.writable
            && !self.memfd_holds(p)
        {
            let _ = self.backend.punch(p * PAGE, PAGE);
            st.stats.pages_removed_by_program += 1;
        }
        if self.memfd.punch(p * PAGE, PAGE).is_err() {
            return false;
        }
        self.set_state(st, p, PageState::Uncached);
        st.stats.pages_evicted += 1;
        true
    }

    /// Writes back the given dirty pages (runs in one write each). A failing run stays dirty and
    /// records one error event for the call.
    fn writeback(&self, st: &mut CacheState, pages: &[u64]) -> Result<()> {
        if !self.backend.has_storage() {
            // Nowhere to write (shared anonymous memory): the pages stay dirty in the memfd.
            return Ok(());
        }
        let mut failed: Option<io::Error> = None;
        let mut i = 0;
        while i < pages.len() {
            let s = pages[i];
            let mut e = s + 1;
            i += 1;
            while i < pages.len() && pages[i] == e {
                e += 1;
                i += 1;
            }
            let (s, e) = (s, e.min(st.pages.len()));
            if s >= e {
                continue;
            }
            let len = ((e - s) * PAGE).min(st.size - s * PAGE) as usize;
            // Mappings that intercept stores: protect the run again first, so that a store
            // from now on faults and dirties the page again — except pages a device may write
            // through such a mapping (its write access is revoked only by a writeback that
            // takes `lock_for_writeback`): they are written and stay dirty and unprotected.
            if st.dev_writable.range(s..e).next().is_none() {
                Self::protect_sync_mappings(st, s, e);
            } else {
                let mut q = s;
                while q < e {
                    let k = st.dev_writable.range(q..e).next().copied().unwrap_or(e);
                    Self::protect_sync_mappings(st, q, k);
                    q = k + 1;
                }
            }
            let mut buf = vec![0u8; len];
            if let Err(err) = self.memfd.read_at(s * PAGE, &mut buf) {
                failed = Some(err);
                continue;
            }
            // Device-private pages are read where they are.
            if let Err(Error::Os { source, .. }) = self.overlay_private(st, s * PAGE, &mut buf) {
                failed = Some(source);
                continue;
            }
            let mut done = 0;
            let mut res = Ok(());
            while done < len {
                match self.backend.write_at(s * PAGE + done as u64, &buf[done..]) {
                    Ok(0) => {
                        res = Err(io::Error::from_raw_os_error(libc::EIO));
                        break;
                    }
                    // A short write is an error for this writeback (the page stays dirty and is
                    // written again whole next time).
                    Ok(n) if done + n < len => {
                        res = Err(io::Error::from_raw_os_error(libc::EIO));
                        break;
                    }
                    Ok(n) => done += n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        res = Err(err);
                        break;
                    }
                }
            }
            match res {
                Ok(()) => {
                    for q in s..e {
                        if st.pages.get(q) == PageState::Dirty && !st.dev_writable.contains(&q) {
                            self.set_state(st, q, PageState::Clean);
                        }
                    }
                    st.stats.pages_written_back += e - s;
                    debug_event!(first_page = s, pages = e - s, "written back");
                    self.trace.writeback(s, e - s, len as u64);
                    if st.disk_size < s * PAGE + len as u64 {
                        st.disk_size = s * PAGE + len as u64;
                    }
                }
                Err(err) => failed = Some(err),
            }
        }
        match failed {
            None => Ok(()),
            Some(err) => {
                self.record_error(st, &err);
                Err(Error::os("write back", err))
            }
        }
    }

    fn record_error(&self, st: &mut CacheState, err: &io::Error) {
        st.err_seq += 1;
        st.last_err = err.raw_os_error().unwrap_or(libc::EIO);
        st.stats.writeback_errors += 1;
    }

    /// Whether file page `p` lies in a mapping (mapped pages are never evicted: a device may be
    /// reading them through the CPU view).
    fn mapped(st: &CacheState, p: u64) -> bool {
        st.mappings
            .iter()
            .any(|m| (m.pgoff..m.pgoff + m.range.pages() as u64).contains(&p))
    }

    /// Records the pages that CPU stores (or device writes through the CPU view) dirtied in the
    /// tracked mappings (the scan write-protects them again, so later stores are seen by the
    /// next scan).
    /// Write-protects file pages `first..last` again in the mappings that intercept stores.
    fn protect_sync_mappings(st: &CacheState, first: u64, last: u64) {
        for m in st.mappings.iter().filter(|m| m.sync) {
            let (a, b) = (
                m.pgoff.max(first),
                (m.pgoff + m.range.pages() as u64).min(last),
            );
            if a < b
                && let Some(mm) = m.mm.upgrade()
            {
                let r = crate::addr::VaRange {
                    start: m.range.start.add(((a - m.pgoff) * PAGE) as usize),
                    end: m.range.start.add(((b - m.pgoff) * PAGE) as usize),
                };
                let _ = mm.file_write_protect(r, true);
            }
        }
    }

    fn collect_written(&self, st: &mut CacheState) {
        let recs: Vec<MapRec> = st.mappings.iter().filter(|m| m.tracked).cloned().collect();
        for m in recs {
            let Some(mm) = m.mm.upgrade() else { continue };
            self.mark_written(st, &*mm, &m);
        }
        self.collect_device_dirty(st);
    }

    fn mark_written(&self, st: &mut CacheState, mm: &dyn crate::mm::Mm, m: &MapRec) {
        let Ok(written) = mm.scan_written(m.range) else {
            return;
        };
        for w in written {
            let first = m.pgoff + ((w.start.get() - m.range.start.get()) / PAGE_SIZE) as u64;
            for p in first..first + w.pages() as u64 {
                // The scan reports an *empty* page-table entry as written too (the kernel's
                // PAGEMAP_SCAN counts any entry without the write-protect bit or marker; a hole
                // punch or eviction zaps a written entry without leaving a marker). An uncached
                // page has no data in the memfd, so such a report is never a store: a store to
                // it would have faulted and filled it first. Marking it dirty would make the
                // cache believe it holds the page and every later fault on it would fill
                // nothing and fault again, forever.
                if st.pages.get(p) != PageState::Uncached {
                    self.set_state(st, p, PageState::Dirty);
                }
            }
        }
    }

    /// Registers a mapping (called by the address space, under its lock), and starts the
    /// background evictor with the first one: CPU faults on mappings fill the cache without
    /// evicting (eviction of mapped pages needs address-space locks: `shrink_to_budget`).
    pub(crate) fn attach(&self, rec: MapRec) {
        {
            let mut st = lock(&self.st);
            let (first, pages) = (rec.pgoff, rec.range.pages() as u64);
            Self::prepare_for_faults(&mut st, first, first + pages);
            st.mappings.push(rec);
        }
        self.start_background(
            &self.evictor,
            "hetmem-evict",
            || (),
            |c, _| c.background_round(),
        );
        self.start_read_ahead();
    }

    /// Starts, once, a background thread of this cache named `name`, woken through the
    /// doorbell kept in `slot` (a fault rings it without allocating): for each ring it runs
    /// `round` on the cache with the thread's own state (made by `state` on the thread), and
    /// ends when the cache is gone (it holds the cache weakly; `Drop` closes the doorbell).
    fn start_background<S: 'static>(
        &self,
        slot: &Mutex<Option<std::sync::Arc<Doorbell>>>,
        name: &str,
        state: impl FnOnce() -> S + Send + 'static,
        round: fn(&FileCache, &mut S),
    ) {
        let mut bell = lock(slot);
        if bell.is_some() {
            return;
        }
        let b = std::sync::Arc::new(Doorbell::default());
        let (me, b2) = (self.me.clone(), b.clone());
        let spawned = crate::sync::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut s = state();
                while b2.wait() {
                    let Some(c) = me.upgrade() else { return };
                    round(&c, &mut s);
                }
            });
        if spawned.is_ok() {
            *bell = Some(b);
        }
    }

    /// Makes what a CPU fault on file pages `first..last` needs, so that the fault allocates
    /// nothing: the pages' state leaves and the fill buffer (called when a mapping is made; a
    /// mapping's length is bounded by the address space that holds its page entries).
    fn prepare_for_faults(st: &mut CacheState, first: u64, last: u64) {
        st.pages.reserve(first, last);
        // Room for the pages that CPU faults block while they bring pages back from devices.
        st.blocked.reserve(BLOCKED_RESERVE);
        if st.fill_buf.len() < FILL_CHUNK {
            st.fill_buf = vec![0u8; FILL_CHUNK];
        }
    }

    /// A private mapping of file pages `first..last` is made: its faults read the file through
    /// the cache and must not allocate either.
    pub(crate) fn reserve_for_private_mapping(&self, first: u64, last: u64) {
        Self::prepare_for_faults(&mut lock(&self.st), first, last);
    }

    /// A shared mapping piece of `space_id` within `range` became writable.
    pub(crate) fn mark_writable(&self, space_id: u16, range: crate::addr::VaRange) {
        let mut st = lock(&self.st);
        for m in st.mappings.iter_mut() {
            if m.space_id == space_id && m.range.overlaps(&range) {
                m.writable = true;
            }
        }
    }

    /// A mapping of `space_id` is split at `at`: its record becomes two.
    pub(crate) fn split_mapping(&self, space_id: u16, at: crate::addr::VirtAddr) {
        let mut st = lock(&self.st);
        let Some(i) = st
            .mappings
            .iter()
            .position(|m| m.space_id == space_id && m.range.start < at && at < m.range.end)
        else {
            return;
        };
        let mut tail = st.mappings[i].clone();
        let head_pages = (at.get() - tail.range.start.get()) / PAGE_SIZE;
        tail.range.start = at;
        tail.pgoff += head_pages as u64;
        st.mappings[i].range.end = at;
        st.mappings.push(tail);
    }

    /// A mapping piece of `space_id` at exactly `range` goes away: what CPU stores dirtied in it
    /// is recorded first (called by the address space, under its lock, before it unmaps).
    pub(crate) fn detach(
        &self,
        mm: &dyn crate::mm::Mm,
        space_id: u16,
        range: crate::addr::VaRange,
    ) {
        let mut st = lock(&self.st);
        let Some(m) = Self::take_mapping(&mut st, space_id, range) else {
            return;
        };
        if m.tracked {
            self.mark_written(&mut st, mm, &m);
        }
    }

    /// Removes and returns the record of `space_id`'s mapping at `range`.
    fn take_mapping(
        st: &mut CacheState,
        space_id: u16,
        range: crate::addr::VaRange,
    ) -> Option<MapRec> {
        let i = st
            .mappings
            .iter()
            .position(|m| m.space_id == space_id && m.range == range)?;
        Some(st.mappings.remove(i))
    }

    /// The program unmapped a mapping of this file directly (`munmap`, reported by userfaultfd):
    /// its record goes, and, where stores were tracked without faults, every cached page of it
    /// counts as written, since the page tables that told which were are gone. (A mapping whose
    /// stores fault told the cache of each already.)
    pub(crate) fn detach_unmapped(&self, space_id: u16, range: crate::addr::VaRange) {
        let mut st = lock(&self.st);
        let Some(m) = Self::take_mapping(&mut st, space_id, range) else {
            return;
        };
        if m.tracked {
            for p in m.pgoff..m.pgoff + range.pages() as u64 {
                if p < st.pages.len() && st.pages.get(p) == PageState::Clean {
                    self.set_state(&mut st, p, PageState::Dirty);
                }
            }
        }
    }

    /// Fills the file pages from page `p` on for a CPU fault (uncached pages inside the file
    /// only). Fault-around adapts to the access pattern: a fault right after the previous
    /// fault's window continues a sequential run and fills twice that window (up to 2 MiB);
    /// any other fault fills its own 4 KiB page only (a random access would pay for the 64 KiB
    /// around it: `hetmem bench`, `file_rand_read_4k_us`, 140 → 70 µs cold), unless the cache
    /// was told otherwise ([`FileCache::set_access`]). Returns `PastEof` when `p` is past the
    /// end of file (the access must get SIGBUS). `missing`: the access faulted on a missing
    /// page (a CPU fault; a device's or a pin's asks whatever the page's state), so that a page
    /// the cache holds was removed behind its back (`note_removed_behind`).
    pub(crate) fn fault_fill(&self, p: u64, missing: bool) -> Result<Fill> {
        use ahead::{AheadStep, MAX_WINDOW};
        let me = self as *const FileCache as usize;
        let mut st = lock(&self.st);
        let mut waited = false;
        loop {
            if p >= st.pages.len() {
                return Ok(Fill::PastEof);
            }
            if st.blocked.iter().any(|&(f, l)| f <= p && p < l) {
                return Ok(Fill::Busy);
            }
            // Lost to a memory failure: the access gets SIGBUS (a device's, EIO).
            Self::check_not_lost(&st, p, p + 1)?;
            if st.pages.slot(p).is_some_and(|s| !s.coherent) {
                return Ok(Fill::Device);
            }
            let AheadStep::Wait(seen) = self.ahead_step(&mut st, p) else {
                break;
            };
            // The read-ahead thread was assigned it: wait for its windows to end, with the
            // cache's lock released (a device's fault waits holding its space's lock, as it
            // would across a fill of its own), until the page is no longer assigned (staged,
            // or dropped and left to this fill). This thread's run goes on where the
            // assignment ends.
            let until = st.ahead.until;
            st.stats.read_ahead_waits += 1;
            drop(st);
            self.wait_ahead(seen);
            FILE_FAULT_AROUND.with(|c| c.set((me, until, MAX_WINDOW)));
            st = lock(&self.st);
            waited = true;
        }
        if waited && st.pages.get(p) != PageState::Uncached {
            // Staged by the read-ahead: the access retries, the run as it is.
            return Ok(Fill::Filled);
        }
        if missing && st.pages.get(p) != PageState::Uncached && self.note_removed_behind(&mut st, p)
        {
            // A page the cache holds faulted as missing: the program removed it (the caller
            // follows that with no lock held, `wait_for_removal`, and retries).
            return Ok(Fill::Busy);
        }
        // The faulting thread's run (per thread: two threads reading sequentially must not break
        // each other's runs), keyed by this cache.
        let (key, next, window) = FILE_FAULT_AROUND.with(|c| c.get());
        let w = match st.access {
            Access::Random => 1,
            Access::Sequential => MAX_WINDOW,
            Access::Normal if key == me && p == next => (window * 2).clamp(1, MAX_WINDOW),
            Access::Normal => 1,
        };
        self.fill(&mut st, p, p + w)?;
        // At the largest window the next windows go to the read-ahead thread, which reads
        // them while this thread uses this one.
        let mut next = p + w;
        if w == MAX_WINDOW
            && let Some(until) = self.hand_ahead(&mut st, p + w)
        {
            next = until;
        }
        FILE_FAULT_AROUND.with(|c| c.set((me, next, w)));
        self.wake_evictor_if_over(&st);
        Ok(Fill::Filled)
    }

    /// Tells the cache how its mappings will access the file (see [`Access`]): from the next
    /// fault on, fills follow it. A read-ahead already under way finishes its windows.
    pub fn set_access(&self, access: Access) {
        lock(&self.st).access = access;
        self.backend.advise(access);
    }

    /// How the cache was told its mappings access the file ([`FileCache::set_access`]).
    pub fn access(&self) -> Access {
        lock(&self.st).access
    }

    /// Wakes the background evictor when the cache is over its budget.
    fn wake_evictor_if_over(&self, st: &CacheState) {
        if st.pages.cached * PAGE_SIZE > self.cfg.budget
            && let Some(bell) = lock(&self.evictor).as_ref()
        {
            bell.ring();
        }
    }

    /// Writes back the dirty pages of file pages `first..last` (CPU stores through mappings
    /// included) and syncs the file's data: `msync(MS_SYNC)` of a mapped range. A failure is
    /// returned and recorded for every handle's next `fsync` (errseq).
    pub(crate) fn sync_range(&self, first: u64, last: u64) -> Result<()> {
        let mut st = self.lock_for_writeback();
        self.collect_written(&mut st);
        let dirty = st.pages.dirty_in(first, last);
        self.writeback(&mut st, &dirty)?;
        if st.disk_size < st.size {
            self.backend
                .set_len(st.size)
                .map_err(os("set file length"))?;
            st.disk_size = st.size;
        }
        if let Err(e) = self.backend.sync(true) {
            self.record_error(&mut st, &e);
            return Err(Error::os("msync", e));
        }
        Ok(())
    }

    /// One round of background writeback: records the CPU stores of the mappings and writes
    /// every dirty page back (errors stay recorded for the next `fsync`). Returns the pages
    /// written.
    pub fn writeback_round(&self) -> u64 {
        let mut st = self.lock_for_writeback();
        let before = st.stats.pages_written_back;
        self.collect_written(&mut st);
        let all = st.pages.all_dirty();
        let _ = self.writeback(&mut st, &all);
        st.stats.pages_written_back - before
    }

    /// Starts a background writer that runs [`FileCache::writeback_round`] every `interval`
    /// (the kernel's `dirty_writeback_centisecs`) until the returned guard is dropped.
    pub fn start_background_writeback(
        self: &Arc<Self>,
        interval: std::time::Duration,
    ) -> BackgroundWriteback {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let cache = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("hetmem-writeback".into())
            .spawn(move || {
                // Waits on the stop channel, not a sleep: dropping the guard wakes it at once.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(interval)
                {
                    let Some(c) = cache.upgrade() else { return };
                    c.writeback_round();
                }
            })
            .ok();
        BackgroundWriteback {
            stop: Some(tx),
            handle,
        }
    }

    /// A store faulted on page `p` of a mapping that intercepts stores (at `r` in `mm`): the
    /// page is filled if needed and becomes dirty, within the dirty bound, then this mapping lets
    /// stores through. At the bound the fault does no writeback itself (unbounded work, and
    /// allocation, in a SIGBUS handler): it asks the background thread for one and returns
    /// [`StoreFault::WaitFlush`]; the store waits with no lock held and retries. When that
    /// writeback failed and the bound is still reached, the store gets SIGBUS (the writer gets
    /// the error rather than waiting forever); so does a store past the end of file.
    pub(crate) fn store_fault(
        &self,
        mm: &dyn crate::mm::Mm,
        p: u64,
        r: crate::addr::VaRange,
    ) -> Result<StoreFault> {
        self.write_fault(mm, p, r, false)
    }

    /// [`Self::store_fault`] (`device` false) and [`Self::device_write_fault`] (`device`
    /// true): they differ only on a page being removed (a store faults again until the removal
    /// ends; a device's `range_fault` gets EBUSY and waits for it) and in recording the
    /// device's write access.
    fn write_fault(
        &self,
        mm: &dyn crate::mm::Mm,
        p: u64,
        r: crate::addr::VaRange,
        device: bool,
    ) -> Result<StoreFault> {
        let mut st = lock(&self.st);
        if p >= st.pages.len() {
            return Ok(StoreFault::Sigbus);
        }
        if st.blocked.iter().any(|&(f, l)| f <= p && p < l) {
            return if device {
                Err(Error::Busy)
            } else {
                Ok(StoreFault::Done)
            };
        }
        Self::check_not_lost(&st, p, p + 1)?;
        if st.pages.slot(p).is_some_and(|s| !s.coherent) || st.replicas.contains_key(&p) {
            // On a device, or replicated there: settled first (`settle(p, _, true)`).
            return Ok(StoreFault::Device);
        }
        if !device && st.pages.get(p) == PageState::Dirty && self.note_removed_behind(&mut st, p) {
            // A CPU store faulted on a dirty page (which stores reach without faulting): the
            // program removed it. Followed with no lock held (`settle` does).
            return Ok(StoreFault::Device);
        }
        self.fill(&mut st, p, p + 1)?;
        if let Some(f) = self.dirty_one(&mut st, p) {
            return Ok(f);
        }
        if device {
            st.dev_writable.insert(p);
        }
        mm.file_write_protect(r, false)
            .map_err(|e| Error::os("let writes through", e))?;
        Ok(StoreFault::Done)
    }

    /// Makes page `p` dirty within the dirty bound (for a store fault or a device write). At
    /// the bound: `Some(Sigbus)` when the last writeback failed, else the background thread is
    /// asked for a writeback and `Some(WaitFlush)` is returned (or, without that thread, the
    /// writeback runs here).
    fn dirty_one(&self, st: &mut CacheState, p: u64) -> Option<StoreFault> {
        if st.pages.get(p) == PageState::Dirty {
            return None;
        }
        if (st.pages.dirty + 1) * PAGE_SIZE > self.cfg.dirty_bound {
            match st.flush {
                Flush::Failed => {
                    st.flush = Flush::Idle;
                    return Some(StoreFault::Sigbus);
                }
                Flush::Idle | Flush::Requested => {
                    let Some(bell) = lock(&self.evictor).clone() else {
                        // No background thread (it could not be started): write back here.
                        let all = st.pages.all_dirty();
                        if self.writeback(st, &all).is_err()
                            && (st.pages.dirty + 1) * PAGE_SIZE > self.cfg.dirty_bound
                        {
                            return Some(StoreFault::Sigbus);
                        }
                        self.set_state(st, p, PageState::Dirty);
                        return None;
                    };
                    st.flush = Flush::Requested;
                    bell.ring();
                    return Some(StoreFault::WaitFlush);
                }
            }
        }
        self.set_state(st, p, PageState::Dirty);
        None
    }

    /// A device asks to write page `p` of a mapping that intercepts stores (at `r` in `mm`):
    /// as a store fault, the page is filled and becomes dirty within the dirty bound and this
    /// mapping lets stores through; and the page is recorded as device-writable, so that
    /// writeback first revokes the device's write access (see [`Self::lock_for_writeback`])
    /// before it write-protects the page again. EBUSY while the page is being removed or
    /// written back that way.
    pub(crate) fn device_write_fault(
        &self,
        mm: &dyn crate::mm::Mm,
        p: u64,
        r: crate::addr::VaRange,
    ) -> Result<StoreFault> {
        self.write_fault(mm, p, r, true)
    }

    /// Whether a device may hold write access to page `p` through a mapping that intercepts
    /// stores.
    pub(crate) fn device_writable(&self, p: u64) -> bool {
        lock(&self.st).dev_writable.contains(&p)
    }

    /// The cache lock for a writeback that must leave pages clean and write-protected: pages
    /// devices may write through mappings that intercept stores have their device write access
    /// revoked first (two phases, as a removal: blocked, every device mapping of them
    /// invalidated with no cache lock held, a PROTECTION event), so that writeback can protect
    /// them again; the guard unblocks them when dropped.
    fn lock_for_writeback(&self) -> WritebackGuard<'_> {
        let runs = {
            let st = lock(&self.st);
            // Without storage nothing is written back or protected again (shared anonymous
            // memory): devices keep their write access.
            if st.dev_writable.is_empty() || !self.backend.has_storage() {
                return WritebackGuard::Plain(st);
            }
            let v: Vec<u64> = st.dev_writable.iter().copied().collect();
            placement::runs_of(&v)
        };
        let serial = lock(&self.removal);
        lock(&self.st).blocked.extend(runs.iter().copied());
        for &(first, last) in &runs {
            self.invalidate_mappings_as(first, last, crate::notifier::NotifyEvent::ProtectionPage);
        }
        let mut st = lock(&self.st);
        for (first, last) in runs {
            for p in first..last {
                st.dev_writable.remove(&p);
            }
        }
        WritebackGuard::Revoked(Removal {
            st,
            _serial: serial,
        })
    }

    /// Waits, with no lock held, until the writeback that a store at the dirty bound asked for
    /// has run (bounded: one round of writeback of at most the dirty bound).
    pub(crate) fn wait_flush(&self) {
        let (m, cv) = &self.flush_wait;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        while lock(&self.st).flush == Flush::Requested {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// One round of the background thread: the writeback stores at the dirty bound asked for
    /// (if any), then eviction down to the budget.
    fn background_round(&self) {
        let asked = {
            let mut st = self.lock_for_writeback();
            if st.flush == Flush::Requested {
                self.collect_written(&mut st);
                let all = st.pages.all_dirty();
                let ok = self.writeback(&mut st, &all).is_ok();
                st.flush = if ok { Flush::Idle } else { Flush::Failed };
                true
            } else {
                false
            }
        };
        if asked {
            let (m, cv) = &self.flush_wait;
            let _g = m.lock().unwrap_or_else(|p| p.into_inner());
            cv.notify_all();
        }
        self.shrink_to_budget();
    }

    /// Waits until the page removal in progress (if any) has ended: a fill of a blocked page
    /// can then be tried again. Called with no lock held.
    pub(crate) fn wait_for_removal(&self) {
        let run = lock(&self.st).removed_behind.take();
        if let Some((s, e)) = run {
            self.follow_removed_behind(s, e);
        }
        drop(lock(&self.removal));
    }

    /// The run of pages from `p` on that the cache holds (clean or dirty, in the memfd) and the
    /// memfd no longer has: removed behind the cache's back. `None` when `p` is not one.
    fn removed_run(&self, st: &CacheState, p: u64) -> Option<(u64, u64)> {
        let held = |q: u64| {
            matches!(st.pages.get(q), PageState::Clean | PageState::Dirty)
                && st.pages.slot(q).is_none_or(|s| s.coherent)
        };
        if !held(p) {
            return None;
        }
        if self.memfd_holds(p) {
            return None;
        }
        let len = st.pages.len();
        let mut e = p + 1;
        while e < len && held(e) && !self.memfd_holds(e) {
            e += 1;
        }
        Some((p, e))
    }

    /// Whether the memfd holds page `p` in any form (`Memfd::holds_page`). Not `SEEK_DATA`
    /// alone: a cache without a file fills pages with `fallocate`, and `SEEK_DATA` calls such a
    /// page a hole until it is written (found by review: threads first touching shared
    /// anonymous memory took each other's fresh pages for removed ones and dropped them, with
    /// stores made in between). Where the kernel has no `cachestat`: `SEEK_DATA` for a cache
    /// over a file (its fills write the memfd), and "held" for one without (nothing is taken
    /// for removed there).
    fn memfd_holds(&self, p: u64) -> bool {
        match self.memfd.holds_page(p * PAGE) {
            Ok(h) => h,
            Err(_) if self.backend.has_storage() => {
                matches!(self.memfd.data_from(p * PAGE), Ok(Some(at)) if at / PAGE <= p)
            }
            Err(_) => true,
        }
    }

    /// A fault found page `p`, which the cache holds, missing from the memfd: records the run
    /// removed behind the cache's back for [`Self::wait_for_removal`] to follow. False when
    /// the page is there.
    fn note_removed_behind(&self, st: &mut CacheState, p: u64) -> bool {
        let Some((s, e)) = self.removed_run(st, p) else {
            return false;
        };
        st.removed_behind = Some(match st.removed_behind {
            Some((a, b)) => (a.min(s), b.max(e)),
            None => (s, e),
        });
        true
    }

    /// Follows the program's removal of pages within `s..e` from a shared mapping
    /// (`madvise(MADV_REMOVE)`, which punches the mapping's backing file: here the cache's
    /// memfd, behind the cache's back; the memfd is not the file, so without this the cache
    /// went on holding pages it no longer had, and their faults found them "cached" and filled
    /// nothing, for good: found from outside, a hang). As the kernel's removal from a mapping of
    /// the file would: the pages leave the cache and the file's range is punched (they read
    /// zeros from now on), as a hole punch does (two phases: device mappings invalidated
    /// first). Only the pages still held and still missing from the memfd go.
    fn follow_removed_behind(&self, s: u64, e: u64) {
        let mut st = self.begin_removal(s, e);
        self.collect_written(&mut st);
        let e = e.min(st.pages.len());
        let mut q = s;
        while q < e {
            let Some((a, b)) = self.removed_run(&st, q) else {
                q += 1;
                continue;
            };
            let b = b.min(e);
            if self.backend.has_storage() && self.writable {
                let _ = self.backend.punch(a * PAGE, (b - a) * PAGE);
            }
            let _ = self.drop_pages(&mut st, a, b);
            st.stats.pages_removed_by_program += b - a;
            q = b;
        }
    }

    /// Whether file page `p` must be settled ([`Self::settle`]) before the CPU can use it: it
    /// is in device-private memory, or (for a long-term pin) in device-coherent memory, or
    /// (for a write) replicated on devices.
    pub(crate) fn needs_settle(&self, p: u64, long_term: bool, write: bool) -> bool {
        let st = lock(&self.st);
        st.pages.slot(p).is_some_and(|s| !s.coherent || long_term)
            || (write && st.replicas.contains_key(&p))
    }

    /// Makes file page `p` usable by the CPU, with no lock held: waits for a removal in
    /// progress, and brings the page back from device memory (private; coherent too when
    /// `long_term`; its read-only replicas are dropped too, which a `write` needs).
    pub(crate) fn settle(&self, p: u64, long_term: bool, write: bool) -> Result<()> {
        self.wait_for_removal();
        if self.needs_settle(p, long_term, write) {
            self.bring_back(p, p + 1)?;
        }
        Ok(())
    }

    /// Pins (`delta` 1) or unpins (-1) file page `p` (a `Space::pin` of a shared file mapping).
    pub(crate) fn pin_page(&self, p: u64, delta: i32) {
        let mut st = lock(&self.st);
        let c = st.pinned.entry(p).or_insert(0);
        *c = c.saturating_add_signed(delta);
        if *c == 0 {
            st.pinned.remove(&p);
        }
    }

    /// The file's size in pages (as this process sees it).
    pub(crate) fn len_pages(&self) -> u64 {
        lock(&self.st).pages.len()
    }

    /// Reads file pages from `page` on into `buf` through the cache (the tail past the end of
    /// file reads as zeros): the fill of a private file mapping.
    pub(crate) fn read_pages(&self, page: u64, buf: &mut [u8]) -> Result<()> {
        let got = self.read_cached(page * PAGE, buf)?;
        buf[got..].fill(0);
        Ok(())
    }

    /// Reads `n` file pages from `page` on through the cache into `dst[dst_off..]` (the tail
    /// past the end of file reads as zeros): the fill of a private file mapping, from the CPU
    /// fault path. Allocates nothing once the mapping's range is prepared
    /// ([`FileCache::reserve_for_private_mapping`]); leaves the budget to the evictor. Returns
    /// how many of the pages were inside the file when they were read: the rest must not be
    /// mapped (an access there is SIGBUS; a truncation may have come since the caller looked).
    pub(crate) fn read_pages_into(
        &self,
        page: u64,
        n: usize,
        dst: &crate::sys::Region,
        dst_off: usize,
    ) -> Result<usize> {
        let len = n * PAGE_SIZE;
        let mut st = lock(&self.st);
        let off = page * PAGE;
        let got = if off < st.size {
            Self::check_not_lost(&st, page, page + n as u64)?;
            self.fill(&mut st, page, page + n as u64)?;
            let want = (st.size - off).min(len as u64) as usize;
            let got = self
                .memfd
                .read_into_region(off, dst, dst_off, want)
                .map_err(os("read the cache"))?;
            // Device-private pages are holes in the memfd: their bytes are in their frames.
            self.overlay_private_region(&st, page, n, dst, dst_off, got)?;
            got
        } else {
            0
        };
        dst.zero(dst_off + got, len - got)
            .map_err(os("zero past the end of file"))?;
        self.wake_evictor_if_over(&st);
        Ok((st.pages.len().saturating_sub(page) as usize).min(n))
    }

    /// The memfd (to map it).
    pub(crate) fn memfd(&self) -> &Memfd {
        &self.memfd
    }

    /// Whether the file may be written.
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// Phase one of a removal of file pages `first..last` (see [`Removal`]).
    fn begin_removal(&self, first: u64, last: u64) -> Removal<'_> {
        let serial = lock(&self.removal);
        if first < last {
            let mut st = lock(&self.st);
            st.blocked.push((first, last));
            // A read-ahead in flight may have read what this removes: it is dropped.
            st.ahead.stale += 1;
            drop(st);
            self.invalidate_mappings(first, last);
        }
        Removal {
            st: lock(&self.st),
            _serial: serial,
        }
    }

    /// Invalidates the device mappings of file pages `first..last` in every mapping of the
    /// file, each under its address space's lock, with the cache lock not held (taken only to
    /// read one mapping record at a time: nothing is allocated). Mappings made meanwhile cannot
    /// map the pages on a device: they are blocked.
    fn invalidate_mappings(&self, first: u64, last: u64) {
        self.invalidate_mappings_as(first, last, crate::notifier::NotifyEvent::Clear);
    }

    /// [`Self::invalidate_mappings`] with `event`.
    fn invalidate_mappings_as(&self, first: u64, last: u64, event: crate::notifier::NotifyEvent) {
        let mut i = 0;
        loop {
            let m = match lock(&self.st).mappings.get(i) {
                Some(m) => m.clone(),
                None => return,
            };
            i += 1;
            let (s, e) = (
                m.pgoff.max(first),
                (m.pgoff + m.range.pages() as u64).min(last),
            );
            if s >= e {
                continue;
            }
            let Some(space) = m.space.upgrade() else {
                continue;
            };
            let vr = crate::addr::VaRange {
                start: m.range.start.add(((s - m.pgoff) * PAGE) as usize),
                end: m.range.start.add(((e - m.pgoff) * PAGE) as usize),
            };
            space.invalidate_file_range(vr, event);
        }
    }

    /// Blocks the runs of file pages (no fill, no new device mapping) and invalidates the
    /// device mappings of them in every mapping, each under its address space's lock, with the
    /// cache lock not held. The caller holds `removal`.
    fn block_and_invalidate(&self, runs: Vec<(u64, u64)>) {
        lock(&self.st).blocked.extend(runs.iter().copied());
        for (first, last) in runs {
            self.invalidate_mappings(first, last);
        }
    }

    /// File page ranges of the mappings whose pages `shrink_to_budget` must never evict
    /// (writable shared mappings that do not intercept stores).
    fn writable_ranges(st: &CacheState) -> Vec<(u64, u64)> {
        st.mappings
            .iter()
            .filter(|m| m.writable)
            .map(|m| (m.pgoff, m.pgoff + m.range.pages() as u64))
            .collect()
    }

    /// Brings the cache within its budget, evicting clean pages that mappings cover too (the
    /// eviction inside `read_at`/`write_at` leaves those alone): pages of writable shared
    /// mappings are never victims (a CPU store could land between the check that the page is
    /// clean and its removal); the victims are blocked, device mappings of them invalidated
    /// (two phases, as truncate), then punched from the memfd, which unmaps them from every
    /// CPU mapping: the next access faults and refills from the file. Runs in the background
    /// after fills that leave the cache over budget, and on demand.
    pub fn shrink_to_budget(&self) -> u64 {
        let budget = (self.cfg.budget / PAGE_SIZE) as u64;
        let serial = lock(&self.removal);
        let victims: Vec<u64> = {
            let st = lock(&self.st);
            if (st.pages.cached as u64) <= budget {
                return 0;
            }
            let mut over = st.pages.cached as u64 - budget;
            let writable = Self::writable_ranges(&st);
            let mut v = Vec::new();
            for p in st.pages.clean_by_age() {
                if over == 0 {
                    break;
                }
                if !writable.iter().any(|&(s, e)| s <= p && p < e) && !st.pinned.contains_key(&p) {
                    v.push(p);
                    over -= 1;
                }
            }
            v.sort_unstable();
            v
        };
        if victims.is_empty() {
            return 0;
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in victims {
            match runs.last_mut() {
                Some((_, e)) if *e == p => *e += 1,
                _ => runs.push((p, p + 1)),
            }
        }
        self.block_and_invalidate(runs.clone());
        let mut st = Removal {
            st: lock(&self.st),
            _serial: serial,
        };
        // Mappings may have become writable since the victims were chosen: skip their pages
        // (and pinned ones). A device-private page the device wrote (before its mappings were
        // invalidated above) is dirty: not a victim either.
        self.collect_device_dirty(&mut st);
        let writable = Self::writable_ranges(&st);
        let mut n = 0;
        for (s, e) in runs {
            for p in s..e {
                if st.pages.get(p) == PageState::Clean
                    && !writable.iter().any(|&(a, b)| a <= p && p < b)
                    && !st.pinned.contains_key(&p)
                    && self.evict_clean(&mut st, p)
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Reads at `off` through the cache, filling it from the file first, then evicting over the
    /// budget (never the pages just read); short at the end of file.
    fn read_cached(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let mut st = lock(&self.st);
        if off >= st.size || buf.is_empty() {
            return Ok(0);
        }
        let end = (off + buf.len() as u64).min(st.size);
        let (first, last) = (off / PAGE, end.div_ceil(PAGE));
        Self::check_not_lost(&st, first, last)?;
        self.fill(&mut st, first, last)?;
        let n = (end - off) as usize;
        let got = self
            .memfd
            .read_at(off, &mut buf[..n])
            .map_err(os("read the cache"))?;
        self.overlay_private(&st, off, &mut buf[..got])?;
        self.evict(&mut st, (first, last));
        Ok(got)
    }

    /// Drops file pages `first..last` from the cache without writing them (dirty or not): the
    /// memfd is punched, so every mapping faults on its next access (hole punch, direct write).
    fn drop_pages(&self, st: &mut CacheState, first: u64, last: u64) -> Result<()> {
        for p in st.pages.cached_in(first, last) {
            self.set_state(st, p, PageState::Uncached);
        }
        // Their lost data (a memory failure's) is being replaced too.
        Self::forget_lost(st, first, last);
        if first < last {
            self.memfd
                .punch(first * PAGE, (last - first) * PAGE)
                .map_err(os("drop cached pages"))?;
        }
        Ok(())
    }

    /// Fails with EFBIG when the file cannot grow to `end` bytes.
    fn check_end(&self, end: u64) -> Result<()> {
        if self.backend.may_grow_to(end) {
            Ok(())
        } else {
            Err(Error::FileTooLarge { end })
        }
    }

    /// Grows the cached size to `end` (a write past the end): new pages read as zeros.
    /// Before the file grows to `end`: the bytes of the old partial last page past the old end
    /// (a store through a shared mapping may have put data there) must read as zeros.
    fn zero_old_tail(&self, st: &CacheState, end: u64) -> Result<()> {
        let old = st.size;
        if end <= old
            || old.is_multiple_of(PAGE)
            || st.pages.get(st.pages.len().saturating_sub(1)) == PageState::Uncached
        {
            return Ok(());
        }
        let stop = (old.div_ceil(PAGE) * PAGE).min(end);
        let zeros = vec![0u8; (stop - old) as usize];
        // A device-private page's bytes are in its frame (the memfd holds a hole there).
        if self.write_private(st, old / PAGE, (old % PAGE) as usize, &zeros)? {
            return Ok(());
        }
        self.memfd
            .write_at(old, &zeros)
            .map_err(os("zero past the old end"))
    }

    fn grow(&self, st: &mut CacheState, end: u64) -> Result<()> {
        if end <= st.size {
            return Ok(());
        }
        self.zero_old_tail(st, end)?;
        self.memfd.set_len(end).map_err(os("grow the cache"))?;
        st.size = end;
        st.pages.resize(pages_for(end));
        Ok(())
    }
}

impl FileHandle {
    /// The cache.
    pub fn cache(&self) -> &Arc<FileCache> {
        &self.cache
    }

    /// The file's size as this process sees it.
    pub fn len(&self) -> u64 {
        lock(&self.cache.st).size
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check_writable(&self) -> Result<()> {
        if !self.cache.writable {
            return Err(Error::Os {
                op: "write to a file opened read-only",
                source: io::Error::from_raw_os_error(libc::EBADF),
            });
        }
        Ok(())
    }

    /// Reads at `off` through the cache (filling it from the file); short at the end of file.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.cache.read_cached(off, buf)
    }

    /// Writes at `off` through the cache (the pages become dirty; written back by `fsync`, by
    /// the dirty bound or by eviction). Past the end, the file grows. Refused on a read-only file
    /// (EBADF); when the dirty bound is reached and writeback fails, the write is refused with
    /// that error and nothing is written.
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        if data.is_empty() {
            return Ok(());
        }
        let c = &self.cache;
        let end = off
            .checked_add(data.len() as u64)
            .ok_or(Error::FileTooLarge { end: u64::MAX })?;
        let (first, last) = (off / PAGE, end.div_ceil(PAGE));
        let over_bound = |st: &CacheState| {
            let new_dirty = (first..last)
                .filter(|&p| st.pages.get(p) != PageState::Dirty)
                .count();
            (st.pages.dirty + new_dirty) * PAGE_SIZE > c.cfg.dirty_bound
        };
        let mut revoked = false;
        // Pages in device-private memory come back first (a CPU write, as a store through a
        // mapping would fault them back); bounded: each round brings the range's pages back.
        let mut st = loop {
            let st = lock(&c.st);
            if FileCache::has_private_in(&st, first, last)
                || st.replicas.range(first..last).next().is_some()
            {
                // Device-coherent pages of the range stay: the write goes to them in place.
                drop(st);
                c.settle_for_write(first, last)?;
                continue;
            }
            // At the dirty bound, pages a device may write through a mapping that intercepts
            // stores would stay dirty across the writeback below: a writeback that revokes
            // that access first (once) makes them clean.
            if !revoked && !st.dev_writable.is_empty() && over_bound(&st) {
                drop(st);
                revoked = true;
                let mut g = c.lock_for_writeback();
                let all = g.pages.all_dirty();
                c.writeback(&mut g, &all)?;
                continue;
            }
            break st;
        };
        if end > st.size {
            c.check_end(end)?;
        }
        // Pages lost to a memory failure: a write of part of one fails (EIO), nothing written;
        // the ones it covers whole are replaced (no longer lost once it succeeds).
        let replaced = if st.poisoned.is_empty() {
            Vec::new()
        } else {
            FileCache::lost_pages_replaced(&st, off, end, st.size)?
        };
        if over_bound(&st) {
            let all = st.pages.all_dirty();
            c.writeback(&mut st, &all)?;
        }
        // Partial first and last pages that hold file data are read first (read-modify-write).
        let old_pages = st.pages.len();
        for p in [first, last - 1] {
            if p < old_pages {
                c.fill(&mut st, p, p + 1)?;
            }
        }
        let (old_size, old_pages) = (st.size, st.pages.len());
        c.grow(&mut st, end)?;
        if let Err(e) = c.stage(off, data) {
            // Nothing was written (a failed allocation): undo the growth, so that the failed
            // write changed nothing. (The bytes past the old end were zeroed; they stay past it.)
            if st.size != old_size {
                let _ = c.memfd.set_len(old_size);
                st.size = old_size;
                st.pages.resize(old_pages);
            }
            return Err(Error::os("write the cache", e));
        }
        for p in first..last {
            c.set_state(&mut st, p, PageState::Dirty);
        }
        for p in replaced {
            st.poisoned.remove(&p);
        }
        c.evict(&mut st, (first, last));
        Ok(())
    }

    /// Writes back every dirty page, sets the file's size, and syncs it (`fsync`). If writeback
    /// errors happened since this handle last looked (errseq), returns one (the latest), once.
    pub fn fsync(&self) -> Result<()> {
        self.sync(false)
    }

    /// As [`FileHandle::fsync`], with `fdatasync`.
    pub fn fdatasync(&self) -> Result<()> {
        self.sync(true)
    }

    fn sync(&self, data_only: bool) -> Result<()> {
        let c = &self.cache;
        let mut st = c.lock_for_writeback();
        c.collect_written(&mut st);
        let all = st.pages.all_dirty();
        let _ = c.writeback(&mut st, &all);
        if st.disk_size != st.size {
            match c.backend.set_len(st.size) {
                Ok(()) => st.disk_size = st.size,
                Err(e) => c.record_error(&mut st, &e),
            }
        }
        if let Err(e) = c.backend.sync(data_only) {
            c.record_error(&mut st, &e);
        }
        let seen = self.seen.swap(st.err_seq, Ordering::SeqCst);
        if seen != st.err_seq {
            return Err(Error::os(
                "fsync",
                io::Error::from_raw_os_error(st.last_err),
            ));
        }
        Ok(())
    }

    /// Truncates or extends the file to `len`, on disk at once. Cached pages past the new end
    /// are dropped without being written (dirty or not); the new partial last page's tail reads
    /// as zeros; pages added by an extension read as zeros.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        let c = &self.cache;
        c.check_end(len)?;
        // From the partial last page, if any: its tail may change (its replicas go).
        let mut st = c.begin_removal(len / PAGE, u64::MAX);
        c.collect_written(&mut st);
        c.backend.set_len(len).map_err(os("set file length"))?;
        st.disk_size = len;
        let keep = pages_for(len);
        if len < st.size {
            for p in st.pages.cached_in(keep, u64::MAX) {
                c.set_state(&mut st, p, PageState::Uncached);
            }
            // Lost pages past the new end are gone from the file (a lost partial last page
            // stays lost: the rest of its bytes are).
            FileCache::forget_lost(&mut st, keep, u64::MAX);
            // The tail of the new last page, if cached, must read as zeros from now on.
            if !len.is_multiple_of(PAGE) && st.pages.get(keep - 1) != PageState::Uncached {
                // Its read-only replicas would keep the old tail.
                c.release_replicas(&mut st, keep - 1);
                let zeros = vec![0u8; (PAGE - len % PAGE) as usize];
                // A device-private page's tail is in its frame (the memfd holds a hole there).
                if !c.write_private(&st, keep - 1, (len % PAGE) as usize, &zeros)? {
                    c.memfd.write_at(len, &zeros).map_err(os("zero the tail"))?;
                }
            }
        }
        c.zero_old_tail(&st, len)?;
        c.memfd.set_len(len).map_err(os("size the cache"))?;
        st.pages.resize(keep);
        st.size = len;
        Ok(())
    }

    /// Punches a hole (page-aligned offset and length): the range reads as zeros, on disk and
    /// in the cache; dirty pages in it are dropped (their data is what is being punched).
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if !off.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(Error::Invalid(
                "hole punch needs a page-aligned offset and length",
            ));
        }
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let end = off
            .checked_add(len)
            .ok_or(Error::FileRange { offset: off, len })?;
        let c = &self.cache;
        let mut st = c.begin_removal(off / PAGE, end / PAGE);
        c.collect_written(&mut st);
        c.backend.punch(off, len).map_err(os("punch file"))?;
        let (first, last) = (off / PAGE, (end / PAGE).min(st.pages.len()));
        c.drop_pages(&mut st, first, last)
    }

    /// Direct read: reads the file itself, after writing back the dirty pages of the range (so
    /// it sees every write made through the cache).
    ///
    /// Without a file behind the cache (shared anonymous memory) it is [`FileHandle::read_at`].
    pub fn direct_read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        if self.cache.is_anonymous() {
            // No file below the cache: the cache is the data.
            return self.read_at(off, buf);
        }
        let c = &self.cache;
        let mut st = lock(&c.st);
        c.collect_written(&mut st);
        let end = off.saturating_add(buf.len() as u64);
        let dirty = st.pages.dirty_in(off / PAGE, end.div_ceil(PAGE));
        c.writeback(&mut st, &dirty)?;
        if st.disk_size < st.size && end > st.disk_size {
            c.backend.set_len(st.size).map_err(os("set file length"))?;
            st.disk_size = st.size;
        }
        let want = (st.size.saturating_sub(off)).min(buf.len() as u64) as usize;
        let mut got = 0;
        while got < want {
            match c.backend.read_at(off + got as u64, &mut buf[got..want]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::os("direct read", e)),
            }
        }
        Ok(got)
    }

    /// Direct write: writes the file itself; the range's dirty pages are written back first,
    /// the pages it covers whole are then dropped from the cache and a cached partial first or
    /// last page is updated in place (a CPU store to its other bytes is never lost), so later
    /// cached reads see this write. An empty write changes nothing.
    ///
    /// Without a file behind the cache (shared anonymous memory) it is [`FileHandle::write_at`].
    pub fn direct_write(&self, off: u64, data: &[u8]) -> Result<()> {
        if self.cache.is_anonymous() {
            // No file below the cache: the cache is the data.
            return self.write_at(off, data);
        }
        self.check_writable()?;
        if data.is_empty() {
            // As pwrite(2) of nothing: no change, not even to the size.
            return Ok(());
        }
        let c = &self.cache;
        let end = off
            .checked_add(data.len() as u64)
            .ok_or(Error::FileTooLarge { end: u64::MAX })?;
        c.check_end(end)?;
        let (first, last) = (off / PAGE, end.div_ceil(PAGE));
        let mut st = c.begin_removal(first, last);
        c.collect_written(&mut st);
        let dirty = st.pages.dirty_in(first, last);
        c.writeback(&mut st, &dirty)?;
        if st.disk_size < st.size {
            c.backend.set_len(st.size).map_err(os("set file length"))?;
            st.disk_size = st.size;
        }
        // Replicas of the range go stale: dropped (their device mappings were invalidated).
        for p in first..last.min(st.pages.len()) {
            c.release_replicas(&mut st, p);
        }
        let mut done = 0;
        while done < data.len() {
            match c.backend.write_at(off + done as u64, &data[done..]) {
                Ok(0) => {
                    return Err(Error::os(
                        "direct write",
                        io::Error::from_raw_os_error(libc::EIO),
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::os("direct write", e)),
            }
        }
        if end > st.disk_size {
            st.disk_size = end;
        }
        c.grow(&mut st, end)?;
        // Pages the write covers whole are dropped (the next access reads the file). A partial
        // first or last page that is cached is updated in place instead: a CPU store to its
        // other bytes through a mapping (which takes no lock) may land at any moment, also
        // after the scan above, and dropping the page would lose it.
        for p in [first, last - 1] {
            let (ps, pe) = (p * PAGE, (p + 1) * PAGE);
            let partial = off > ps || end < pe;
            if partial && st.pages.get(p) != PageState::Uncached {
                let (s0, e0) = (off.max(ps), end.min(pe));
                let bytes = &data[(s0 - off) as usize..(e0 - off) as usize];
                // A device-private page is updated in its frame (the memfd holds a hole).
                if !c.write_private(&st, p, (s0 - ps) as usize, bytes)? {
                    c.memfd
                        .write_at(s0, bytes)
                        .map_err(os("update a cached page"))?;
                }
            }
        }
        let (whole_first, whole_last) = (off.div_ceil(PAGE), (end / PAGE).min(st.pages.len()));
        c.drop_pages(&mut st, whole_first, whole_last)
    }
}
