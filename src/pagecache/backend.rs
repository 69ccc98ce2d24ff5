//! Where the cache reads and writes the file: the real file ([`StdFile`]), no file at all
//! ([`AnonBackend`]: shared anonymous memory) or, with the `testing` feature, a test double that
//! injects errors (`FaultyBackend`).

use super::*;

/// Where the cache reads and writes the file: the real file, or a test double that injects
/// errors.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait FileBackend: Send + Sync + std::fmt::Debug {
    /// Reads at `off` into `buf`; may return fewer bytes (end of file).
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes `buf` at `off`; may write fewer bytes.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize>;
    /// `fsync` (or `fdatasync` when `data_only`).
    fn sync(&self, data_only: bool) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Punches a hole (`FALLOC_FL_PUNCH_HOLE | KEEP_SIZE`).
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
    /// Whether the file may grow to `end` bytes (the file system's largest file); checked
    /// before the cache grows, so that a write the file cannot take fails at once with EFBIG
    /// instead of at writeback. The default allows any size up to `i64::MAX`.
    fn may_grow_to(&self, end: u64) -> bool {
        end <= i64::MAX as u64
    }
    /// Whether the backend keeps what writeback writes to it (a file does). A backend without
    /// storage ([`AnonBackend`]) has nothing to write back to: the cache never writes back
    /// (its written pages stay dirty in the memfd, never evicted: the memfd holds the only
    /// copy), fills only allocate (they never overwrite a page), direct I/O goes through the
    /// cache, and the budget and the dirty bound do not apply (docs/filesystem-contract.md,
    /// "Shared anonymous memory").
    fn has_storage(&self) -> bool {
        true
    }
    /// The cache now holds bytes `off..off + len` of the file (a fill read them, or a sync
    /// made them durable): the file's own copy in the kernel's page cache may go, so that a
    /// file read through hetmem is held in memory once. Advice only: nothing may depend on it.
    /// The default does nothing.
    fn drop_cached(&self, _off: u64, _len: u64) {}
    /// How the cache's mappings will access the file ([`super::Access`], told by
    /// [`super::FileCache::set_access`]): advice for the backend's own read-ahead (a file's:
    /// `posix_fadvise`, so that single-page fills of a random pattern read nothing around
    /// them). Advice only. The default does nothing.
    fn advise(&self, _access: super::Access) {}
}

/// The real file.
#[derive(Debug)]
pub struct StdFile(pub std::fs::File);

impl FileBackend for StdFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, off)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::write_at(&self.0, buf, off)
    }
    fn sync(&self, data_only: bool) -> io::Result<()> {
        if data_only {
            self.0.sync_data()
        } else {
            self.0.sync_all()
        }
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn drop_cached(&self, off: u64, len: u64) {
        // POSIX_FADV_DONTNEED drops the clean, unmapped folios that lie wholly in the range from
        // the kernel's page cache (a page another process maps stays; a dirty one stays until
        // written). Readahead fills the cache with large folios (up to 2 MiB) that need not
        // line up with the cache's fills: the range starts at the 2 MiB boundary below `off`,
        // so that a folio the previous fill only began is dropped with this one (measured: a
        // cold sequential read through hetmem left 62 of 64 MiB in the kernel's cache with the
        // exact range, none with this one).
        let start = off & !(crate::sys::LARGE_PAGE_SIZE as u64 - 1);
        if let Some(len) = std::num::NonZeroU64::new(off + len - start) {
            let _ = rustix::fs::fadvise(&self.0, start, Some(len), rustix::fs::Advice::DontNeed);
        }
    }
    fn advise(&self, access: super::Access) {
        // Measured: 4 KiB `pread`s of 1,024 pages of a cold 256 MiB file, one per 256 KiB, read
        // 4.0 MiB + 12 KiB from storage with the default advice, exactly 4.0 MiB with RANDOM.
        let advice = match access {
            super::Access::Normal => rustix::fs::Advice::Normal,
            super::Access::Random => rustix::fs::Advice::Random,
            super::Access::Sequential => rustix::fs::Advice::Sequential,
        };
        let _ = rustix::fs::fadvise(&self.0, 0, None, advice);
    }
    fn may_grow_to(&self, end: u64) -> bool {
        // `lseek(SEEK_SET)` past the file system's largest file size (its `s_maxbytes`) is
        // EINVAL: a check that changes nothing (the cache never uses the file position).
        end <= i64::MAX as u64
            && rustix::fs::seek(&self.0, rustix::fs::SeekFrom::Start(end)).is_ok()
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(
            &self.0,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            off,
            len,
        )?;
        Ok(())
    }
}

/// What a [`FaultyBackend`] injects: counts of operations still to fail, and how.
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// The next this many writes fail with `error`.
    pub fail_writes: u32,
    /// The next this many writes are short (half the bytes).
    pub short_writes: u32,
    /// The next this many reads fail with `error`.
    pub fail_reads: u32,
    /// The next this many syncs fail with `error`.
    pub fail_syncs: u32,
    /// The errno injected (EIO when 0).
    pub error: i32,
}

/// A backend that injects the faults of its [`FaultPlan`] in front of another one.
#[cfg(feature = "testing")]
#[derive(Debug)]
pub struct FaultyBackend<B: FileBackend> {
    inner: B,
    plan: Mutex<FaultPlan>,
}

#[cfg(feature = "testing")]
impl<B: FileBackend> FaultyBackend<B> {
    /// `inner` with no fault planned.
    pub fn new(inner: B) -> Self {
        FaultyBackend {
            inner,
            plan: Mutex::new(FaultPlan::default()),
        }
    }
    /// Replaces the plan.
    pub fn plan(&self, p: FaultPlan) {
        *lock(&self.plan) = p;
    }
    fn take(&self, pick: impl Fn(&mut FaultPlan) -> &mut u32) -> Option<io::Error> {
        let mut p = lock(&self.plan);
        let err = if p.error == 0 { libc::EIO } else { p.error };
        let c = pick(&mut p);
        if *c > 0 {
            *c -= 1;
            return Some(io::Error::from_raw_os_error(err));
        }
        None
    }
}

#[cfg(feature = "testing")]
impl<B: FileBackend> FileBackend for FaultyBackend<B> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.take(|p| &mut p.fail_reads) {
            return Err(e);
        }
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
        if let Some(e) = self.take(|p| &mut p.fail_writes) {
            return Err(e);
        }
        if self.take(|p| &mut p.short_writes).is_some() && buf.len() > 1 {
            return self.inner.write_at(off, &buf[..buf.len() / 2]);
        }
        self.inner.write_at(off, buf)
    }
    fn sync(&self, data_only: bool) -> io::Result<()> {
        if let Some(e) = self.take(|p| &mut p.fail_syncs) {
            return Err(e);
        }
        self.inner.sync(data_only)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch(off, len)
    }
    fn may_grow_to(&self, end: u64) -> bool {
        self.inner.may_grow_to(end)
    }
    fn has_storage(&self) -> bool {
        self.inner.has_storage()
    }
    fn drop_cached(&self, off: u64, len: u64) {
        self.inner.drop_cached(off, len)
    }
    fn advise(&self, access: super::Access) {
        self.inner.advise(access)
    }
}

impl<B: FileBackend> FileBackend for Arc<B> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<usize> {
        (**self).write_at(off, buf)
    }
    fn sync(&self, data_only: bool) -> io::Result<()> {
        (**self).sync(data_only)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).punch(off, len)
    }
    fn may_grow_to(&self, end: u64) -> bool {
        (**self).may_grow_to(end)
    }
    fn has_storage(&self) -> bool {
        (**self).has_storage()
    }
    fn drop_cached(&self, off: u64, len: u64) {
        (**self).drop_cached(off, len)
    }
    fn advise(&self, access: super::Access) {
        (**self).advise(access)
    }
}

/// No file behind the cache: the storage of shared anonymous memory (`MAP_SHARED |
/// MAP_ANONYMOUS`, [`crate::space::Space::map_shared_anon`]). It has a length and nothing else:
/// it reads as zeros, and it keeps nothing ([`FileBackend::has_storage`] is false), so the
/// cache never writes to it and its memfd holds every byte written.
#[derive(Debug)]
pub struct AnonBackend {
    len: AtomicU64,
}

impl AnonBackend {
    /// `len` bytes of zeros.
    pub fn new(len: u64) -> Self {
        AnonBackend {
            len: AtomicU64::new(len),
        }
    }
}

impl FileBackend for AnonBackend {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.len.load(Ordering::Acquire).saturating_sub(off);
        let n = n.min(buf.len() as u64) as usize;
        buf[..n].fill(0);
        Ok(n)
    }
    /// Refused (EINVAL): there is nowhere to write, and accepting the bytes would lose them.
    /// The cache never calls it (see [`FileBackend::has_storage`]).
    fn write_at(&self, _off: u64, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn sync(&self, _data_only: bool) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.len.store(len, Ordering::Release);
        Ok(())
    }
    fn punch(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn has_storage(&self) -> bool {
        false
    }
}
