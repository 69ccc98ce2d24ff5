//! Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`): a cache with no file behind it
//! ([`AnonBackend`]), so that the pages get every placement of a file page (see
//! docs/filesystem-contract.md, "Shared anonymous memory").
//!
//! The memfd holds the only copy of every byte: the cache never writes back (written pages
//! stay dirty), never evicts a page that holds data (no budget, no dirty bound: a clean page is
//! one that reads as zeros), and fills a page by allocating it in the memfd, never by writing
//! it (a forked child, whose mapping of the memfd the kernel serves itself, may have stored to
//! a page this process never touched).

use super::*;

impl FileCache {
    /// A cache of `len` bytes (page-aligned) of shared anonymous memory: zeros until written,
    /// written pages kept in memory until the cache goes away (or a `punch_hole`/`set_len`
    /// drops them). Map it with [`crate::space::Space::map_file_with`] (or make and map it at
    /// once with [`crate::space::Space::map_shared_anon`]); every mapping of it, in every
    /// address space, sees the same pages, and its pages take the placements of file pages
    /// ([`FileCache::place_on_device`]).
    ///
    /// Errors: [`Error::ZeroLength`], [`Error::UnalignedLength`], [`Error::FileTooLarge`]
    /// past the largest memfd (`i64::MAX` bytes), or the memfd's own error.
    pub fn anonymous(len: usize) -> Result<Arc<FileCache>> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedLength { len });
        }
        if len as u64 > i64::MAX as u64 {
            return Err(Error::FileTooLarge { end: len as u64 });
        }
        Self::with_backend(
            Box::new(AnonBackend::new(len as u64)),
            true,
            CacheConfig {
                budget: usize::MAX,
                dirty_bound: usize::MAX,
            },
        )
    }

    /// Whether no file is behind this cache (shared anonymous memory, or any backend without
    /// storage: [`FileBackend::has_storage`]).
    pub fn is_anonymous(&self) -> bool {
        !self.backend.has_storage()
    }

    /// Fills the uncached run `s..e` of a cache without storage: the pages are allocated in
    /// the memfd, nothing is written. A page never written reads as zeros; a page that a
    /// forked child already stored to (the kernel filled the hole for the child's mapping)
    /// keeps the child's bytes, which writing zeros there would lose.
    pub(super) fn fill_anon_run(&self, st: &mut CacheState, s: u64, e: u64) -> Result<()> {
        #[cfg(feature = "testing")]
        if self
            .stage_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::os(
                "fill the cache",
                io::Error::from_raw_os_error(self.stage_errno.load(Ordering::SeqCst) as i32),
            ));
        }
        self.memfd
            .allocate(s * PAGE, (e - s) * PAGE)
            .map_err(os("fill the cache"))?;
        for q in s..e {
            self.set_state(st, q, PageState::Clean);
        }
        st.stats.pages_filled += e - s;
        Ok(())
    }
}
