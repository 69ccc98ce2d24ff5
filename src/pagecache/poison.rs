//! Memory failure of file pages (docs/filesystem-contract.md, "memory failure").
//!
//! The memory holding a cached page's data is poisoned: the memfd page, a device-coherent frame
//! (which in the emulation *is* the memfd page) or a device-private frame (the page's only
//! copy). What the cache does, in the two phases of every removal (the page is blocked and
//! every device mapping of it, in every space, invalidated first; then, under the cache lock,
//! the CPU stores and device writes made so far are collected):
//!
//! | the page was | its data | then |
//! |---|---|---|
//! | clean | on disk | the poisoned copy is dropped (memfd page punched, device frame retired); the next access reads the file again |
//! | dirty, or any page of shared anonymous memory (no file behind it) | lost | the same, and the page is marked *lost*: every CPU access to it, through any mapping in any space, gets SIGBUS (the fault service refuses it); a device access, `read_at` and a `write_at` of part of it get [`Error::MemoryFailure`] (EIO); the next `fsync` of each handle reports EIO once (errseq); writeback never writes it (the file keeps its old bytes) |
//!
//! A lost page stays lost until a truncate or hole punch removes it, or a `write_at` (or a direct
//! write) covers it whole: then nothing of the lost data can be read any more. This follows the
//! kernel's rule for a hardware-poisoned shmem page (kept in the page cache, EIO on read, SIGBUS
//! on access, until truncated or punched), with one relaxation: a write of the whole page ends
//! it (the kernel's shmem refuses every write to the page).
//!
//! A failed frame holding a read-only replica loses only that copy: the replica is dropped and
//! the frame retired; the page is intact in the memfd. A page's replicas go with it when its
//! memfd page fails (they are freed; hetmem does not recover a lost page's bytes from one).
//!
//! The poisoned state is a set of page numbers beside the page states, whose pages are
//! `Uncached` with a hole in the memfd: fills skip them, so no path maps or reads them. A pinned
//! page is handled the same way (the failed memory is gone either way; a clean one is filled
//! again at its next access and stays pinned).

use super::*;
use crate::addr::FrameIdx;
use crate::pool::PagemapId;

/// What a memory failure did to a file page (returned by the fault-injection hooks
/// `FileCache::inject_poison` and `SoftDevice::inject_poison`, the `testing` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryFailure {
    /// No memory held the page's data (uncached, already lost, or the frame no longer held the
    /// page): nothing changed.
    NotCached,
    /// The page was clean: the poisoned copy was dropped; the next access reads the file again.
    Dropped,
    /// The page was dirty (or held the only copy of its bytes: shared anonymous memory): its
    /// data is lost (SIGBUS on CPU access, EIO for reads, device accesses and the next `fsync`
    /// of each handle) until a truncate, a hole punch or a write of the whole page.
    Lost,
    /// The frame held a read-only replica of the page: the replica was dropped (its frame
    /// retired); the page's data is intact in system memory, where the device reads it next.
    ReplicaDropped,
}

impl FileCache {
    /// The memory holding file page `p` failed (its memfd page or device frame; with `frame`,
    /// only if the page is still in that device frame). Runs as a removal: the page is blocked
    /// and its device mappings in every space invalidated first; then the stores made so far
    /// are collected, and the poisoned copy is dropped: the memfd page punched (every CPU
    /// mapping loses it), a device frame retired (never handed out again). A dirty page is
    /// lost (see the module doc).
    ///
    /// A store through a writable shared mapping that does not intercept stores, landing
    /// between the collection and the punch, is lost without a report: such a mapping cannot
    /// hold stores off (the reason its pages are never evicted either).
    ///
    /// Compiled in every build; reached today through the fault-injection hooks only (the
    /// `testing` feature), until a source of real failures reports them.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn memory_failure(
        &self,
        p: u64,
        frame: Option<(PagemapId, FrameIdx)>,
    ) -> Result<MemoryFailure> {
        if p >= lock(&self.st).pages.len() {
            return Ok(MemoryFailure::NotCached);
        }
        let mut st = self.begin_removal(p, p + 1);
        if p >= st.pages.len() || st.pages.get(p) == PageState::Uncached {
            return Ok(MemoryFailure::NotCached);
        }
        let slot = st.pages.slot(p);
        if let Some((pm, f)) = frame
            && !slot.is_some_and(|s| st.devs[s.dev as usize].id() == pm && s.frame == f.0)
        {
            // A read-only replica's frame: only that copy goes (the memfd keeps the data).
            let on = |&(d, fr): &(u8, u32)| st.devs[d as usize].id() == pm && fr == f.0;
            let Some(k) = st.replicas.get(&p).and_then(|v| v.iter().position(on)) else {
                // The page left that frame before the failure was handled.
                return Ok(MemoryFailure::NotCached);
            };
            let v = st.replicas.get_mut(&p).expect("found above");
            let (d, fr) = v.swap_remove(k);
            if v.is_empty() {
                st.replicas.remove(&p);
            }
            st.devs[d as usize].retire(FrameIdx(fr));
            return Ok(MemoryFailure::ReplicaDropped);
        }
        // CPU stores through the mappings and device writes to a private frame count.
        self.collect_written(&mut st);
        // Without a file behind the cache (shared anonymous memory) the memory held the only
        // copy, whatever the page's state (a forked child's stores are never seen as dirty).
        let lost = st.pages.get(p) == PageState::Dirty || !self.backend.has_storage();
        // The memfd page goes from every mapping (a device-private page has a hole there).
        self.memfd
            .punch(p * PAGE, PAGE)
            .map_err(os("drop a poisoned page"))?;
        if let Some(s) = st.pages.set_slot(p, None) {
            st.devs[s.dev as usize].retire(FrameIdx(s.frame));
        }
        // Leaving the cache frees its read-only replicas too (their frames did not fail).
        self.set_state(&mut st, p, PageState::Uncached);
        if !lost {
            return Ok(MemoryFailure::Dropped);
        }
        st.poisoned.insert(p);
        // Reported once by the next fsync of each handle, as a writeback error is.
        st.err_seq += 1;
        st.last_err = libc::EIO;
        Ok(MemoryFailure::Lost)
    }

    /// Fault injection: the memory holding file page `page` fails now (its memfd page, or the
    /// device frame it is placed in). What follows is the cache's own handling of a memory
    /// failure (see [`MemoryFailure`] and docs/filesystem-contract.md). Only with the `testing`
    /// feature.
    #[cfg(feature = "testing")]
    pub fn inject_poison(&self, page: u64) -> Result<MemoryFailure> {
        self.memory_failure(page, None)
    }

    /// The pages whose data a memory failure lost (in order).
    pub fn lost_pages(&self) -> Vec<u64> {
        lock(&self.st).poisoned.iter().copied().collect()
    }

    /// EIO ([`Error::MemoryFailure`]) if a page of `first..last` is lost.
    pub(super) fn check_not_lost(st: &CacheState, first: u64, last: u64) -> Result<()> {
        if first >= last || st.poisoned.is_empty() {
            return Ok(());
        }
        match st.poisoned.range(first..last).next() {
            Some(&page) => Err(Error::MemoryFailure { page }),
            None => Ok(()),
        }
    }

    /// The pages of `first..last` around page `p` that a fill may map: the widest run holding
    /// `p` and no lost page; EIO if `p` itself is lost (the fault-around of a private file
    /// mapping stops short of lost pages). Allocates nothing.
    pub(crate) fn unlost_run(&self, first: u64, p: u64, last: u64) -> Result<(u64, u64)> {
        let st = lock(&self.st);
        if st.poisoned.is_empty() {
            return Ok((first, last));
        }
        if st.poisoned.contains(&p) {
            return Err(Error::MemoryFailure { page: p });
        }
        let s = st
            .poisoned
            .range(first.min(p)..p)
            .next_back()
            .map_or(first, |&q| q + 1);
        let e = st
            .poisoned
            .range(p + 1..last.max(p + 1))
            .next()
            .copied()
            .unwrap_or(last);
        Ok((s, e))
    }

    /// A write covering file pages of `first..last` (bytes `off..end`, the file `size` bytes
    /// long after it): EIO if it covers part of a lost page (the rest of its bytes are lost);
    /// the lost pages it covers whole (up to the end of file), which it ends.
    pub(super) fn lost_pages_replaced(
        st: &CacheState,
        off: u64,
        end: u64,
        size: u64,
    ) -> Result<Vec<u64>> {
        let (first, last) = (off / PAGE, end.div_ceil(PAGE));
        let mut whole = Vec::new();
        for &p in st.poisoned.range(first..last) {
            let (ps, pe) = (p * PAGE, ((p + 1) * PAGE).min(size.max(end)));
            if off > ps || end < pe {
                return Err(Error::MemoryFailure { page: p });
            }
            whole.push(p);
        }
        Ok(whole)
    }

    /// The lost pages of `first..last` are removed from the file (a truncate, a hole punch, a
    /// direct write over them whole): they are no longer lost.
    pub(super) fn forget_lost(st: &mut CacheState, first: u64, last: u64) {
        if first >= last {
            return;
        }
        while let Some(&p) = st.poisoned.range(first..last).next() {
            st.poisoned.remove(&p);
        }
    }
}
