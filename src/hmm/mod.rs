//! Mirroring: `range_fault`, as `mm/hmm.c` defines it, over the interval notifiers of
//! [`crate::notifier`] (`include/linux/mmu_notifier.h`), which are re-exported here.
//!
//! A device keeps its own page table mirroring part of an address space. It fills it with
//! [`range_fault`] and keeps it correct with an [`IntervalNotifier`], whose callback the address
//! space runs *before* it changes the CPU view of an overlapping range (unmap, protection change,
//! migration, exclusive access, ...). The retry protocol is the kernel's (hmm.rst):
//!
//! 1. `seq = notifier.read_begin()` (waits for an invalidation in progress to end);
//! 2. `range_fault(&mut range)`; on [`Error::Busy`] go back to 1;
//! 3. take the device's page-table lock; if `notifier.read_retry(seq)`, drop it and go to 1;
//! 4. program the device page table, still holding the lock.
//!
//! The callback must call [`IntervalNotifier::set_seq`] under the same device lock and drop the
//! device's entries for the range before it returns. Because callbacks run under the address
//! space's state lock, `read_begin` only has to take and release that lock to wait out an
//! invalidation in progress; it must therefore not be called with the device lock held (lock
//! order: space state, then device).
//!
//! The notifiers live below the address space (`space` holds and runs them); this module is
//! above it (`range_fault` walks the space's page entries), as `mm/hmm.c` uses `mm`.
//!
//! # `hmm_pfns` words
//!
//! | bits | meaning |
//! |---|---|
//! | 63 | `VALID` (input: `REQ_FAULT`) |
//! | 62 | `WRITE` (input: `REQ_WRITE`) |
//! | 61 | `ERROR`: no mapping or no read permission, fault not requested |
//! | 53-57 | order: 9 for a page of a 2 MiB unit, else 0 |
//! | 0-52 | the page: a [`PageTarget`] (system page or device frame) |
//!
//! A word of 0 means "not present, can be faulted".

use crate::addr::{FrameIdx, PAGE_SIZE, VaRange, VirtAddr, Vpn};
use crate::error::{Error, Result};
use crate::pagecache::StoreFault;
use crate::pool::{MemoryKind, Owner, PagemapId};
use crate::space::{PageState, SpaceCore};
use crate::sync::Arc;

pub use crate::notifier::{IntervalNotifier, IntervalOps, NotifyEvent, NotifyRange};

/// `HMM_PFN_VALID` / `HMM_PFN_REQ_FAULT`.
pub const HMM_PFN_VALID: u64 = 1 << 63;
/// `HMM_PFN_WRITE` / `HMM_PFN_REQ_WRITE`.
pub const HMM_PFN_WRITE: u64 = 1 << 62;
/// `HMM_PFN_ERROR`.
pub const HMM_PFN_ERROR: u64 = 1 << 61;
/// The page is the shared zero page, mapped read-only (a hetmem flag: the kernel's callers test
/// `is_zero_pfn` on the pfn instead). A device that wants to write it asks with
/// [`HMM_PFN_REQ_WRITE`], which gives the page a private copy first.
pub const HMM_PFN_ZERO: u64 = 1 << 60;
/// `HMM_PFN_REQ_FAULT`.
pub const HMM_PFN_REQ_FAULT: u64 = HMM_PFN_VALID;
/// `HMM_PFN_REQ_WRITE`.
pub const HMM_PFN_REQ_WRITE: u64 = HMM_PFN_WRITE;
const ORDER_SHIFT: u32 = 53;
const TARGET_MASK: u64 = (1 << ORDER_SHIFT) - 1;
const FLAGS_MASK: u64 = !TARGET_MASK;

/// What a pfn word points at: hetmem's "physical frame".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageTarget {
    /// A page of system memory: the CPU view's page (present).
    System(Vpn),
    /// A frame of a device pagemap.
    Device {
        /// The pagemap.
        pagemap: PagemapId,
        /// The frame.
        frame: FrameIdx,
    },
    /// A frame of an address space's stash (device-exclusive pages).
    Stash(FrameIdx),
}

impl PageTarget {
    /// Encodes into the low 53 bits of a pfn word (kind in bits 50-52).
    pub fn encode(self) -> u64 {
        match self {
            PageTarget::System(v) => v.0 as u64 & ((1 << 50) - 1),
            PageTarget::Device { pagemap, frame } => {
                (1 << 50) | (pagemap.0 as u64) << 32 | frame.0 as u64
            }
            PageTarget::Stash(f) => (2 << 50) | f.0 as u64,
        }
    }
    /// Decodes the low 53 bits of a pfn word.
    pub fn decode(w: u64) -> PageTarget {
        let w = w & TARGET_MASK;
        match w >> 50 {
            0 => PageTarget::System(Vpn((w & ((1 << 50) - 1)) as usize)),
            1 => PageTarget::Device {
                pagemap: PagemapId((w >> 32) as u8),
                frame: FrameIdx(w as u32),
            },
            _ => PageTarget::Stash(FrameIdx(w as u32)),
        }
    }
}

/// The order field of a pfn word.
pub fn hmm_pfn_order(w: u64) -> u32 {
    ((w >> ORDER_SHIFT) & 0x1f) as u32
}

/// A range to fault (`struct hmm_range`).
#[derive(Debug)]
pub struct HmmRange<'a> {
    /// The notifier whose sequence fences this walk.
    pub notifier: &'a Arc<IntervalNotifier>,
    /// From `read_begin`.
    pub notifier_seq: u64,
    /// First byte (page-aligned).
    pub start: VirtAddr,
    /// One past the last byte (page-aligned).
    pub end: VirtAddr,
    /// One word per page: input requests (with `pfn_flags_mask`), output entries.
    pub hmm_pfns: Vec<u64>,
    /// Requests applied to every page.
    pub default_flags: u64,
    /// Which bits of each input word are requests.
    pub pfn_flags_mask: u64,
    /// Device-private pages of this owner are reported, not faulted.
    pub dev_private_owner: Option<Owner>,
}

/// `hmm_range_fault`: fills `range.hmm_pfns` with the current translation of each page,
/// faulting pages in where requested.
///
/// Errors, each with one meaning: [`Error::NoWrite`] (EPERM) a write requested on a mapping
/// without write permission; [`Error::NotMapped`]/[`Error::NoRead`] (EFAULT) a fault requested
/// where there is no mapping or no read permission (without a request such pages read as
/// `HMM_PFN_ERROR`); [`Error::Busy`] (EBUSY) the notifier's sequence changed: retry.
pub fn range_fault(range: &mut HmmRange<'_>) -> Result<()> {
    let space: Arc<SpaceCore> = range
        .notifier
        .space()
        .ok_or(Error::Gone)?
        .downcast()
        .expect("a notifier's host is an address space");
    space.check_process()?;
    // A drop of pages by the program (madvise) whose madvise returned is followed first.
    crate::sys::wait_removes_followed();
    let r = VaRange::new(
        range.start,
        range.end.get().saturating_sub(range.start.get()),
    )?;
    if range.hmm_pfns.len() != r.pages() {
        return Err(Error::Invalid("hmm_pfns must hold one word per page"));
    }
    let mut st = space.lock_state();
    if range.notifier.read_retry(range.notifier_seq) {
        return Err(Error::Busy);
    }
    for i in 0..r.pages() {
        let a = r.start.add(i * PAGE_SIZE);
        let req = (range.hmm_pfns[i] & range.pfn_flags_mask) | range.default_flags;
        let want_fault = req & HMM_PFN_REQ_FAULT != 0;
        let want_write = req & HMM_PFN_REQ_WRITE != 0;
        let Some(v) = st.vma(a) else {
            if want_fault {
                return Err(Error::NotMapped { addr: a });
            }
            range.hmm_pfns[i] = HMM_PFN_ERROR;
            continue;
        };
        let (readable, writable) = (v.prot.readable(), v.prot.writable());
        // A shared file mapping that intercepts stores keeps clean pages write-protected and
        // write-protects them again at writeback: a device gets write access to a page only
        // through the cache (below), which makes the page dirty first and revokes the access
        // before protecting the page again; see docs/filesystem-contract.md.
        let intercepts = v.file.as_ref().is_some_and(|f| f.shared && f.sync);
        // A device-private file page is written in its frame, never through the CPU view: the
        // mapping's own permission applies.
        let frame_writable = writable;
        let writable = writable && !intercepts;
        if !readable {
            if want_fault {
                return Err(Error::NoRead { addr: a });
            }
            range.hmm_pfns[i] = HMM_PFN_ERROR;
            continue;
        }
        let file_dev = match st.file_page(a) {
            Some((cache, page)) => match cache.device_page(page).and_then(|d| match d {
                // A read of a page the caller holds a read-only replica of: its copy.
                None if !want_write => match range.dev_private_owner {
                    Some(o) => cache.replica_for(page, o),
                    None => Ok(None),
                },
                d => Ok(d),
            }) {
                Ok(d) => d.map(|d| (d, cache, page)),
                Err(e) => {
                    // Being moved or removed: wait for that to end, then the caller retries.
                    drop(st);
                    cache.wait_for_removal();
                    return Err(e);
                }
            },
            None => None,
        };
        // The caller's own device-private frame (written in place; a replica is read-only).
        let own_frame = matches!(&file_dev,
            Some((dp, ..)) if !dp.replica && !dp.coherent && Some(dp.owner) == range.dev_private_owner);
        let mut writable = match &file_dev {
            Some((dp, ..)) if dp.replica => false,
            _ if own_frame => frame_writable,
            _ => writable,
        };
        // A read of a page of a mapping that intercepts stores: whether a device may write it is
        // asked once the page is in the cache (below), not before: the fill may wait for a
        // writeback that revokes that access, and a grant read before it would be stale.
        let mut grant_of = None;
        if intercepts
            && !own_frame
            && file_dev.as_ref().is_none_or(|(dp, ..)| !dp.replica)
            && frame_writable
        {
            // A mapping that intercepts stores: a device may write a page through it once the
            // cache has made the page dirty and let writes through (as for a CPU store), and
            // recorded the device's write access, which writeback revokes (a PROTECTION
            // event) before it write-protects the page again. A device-coherent page too (a
            // device writes it through the CPU's view, where it is); another device's private
            // page comes back first (`StoreFault::Device`).
            let (cache, page) = st.file_page(a).expect("a shared file mapping");
            if want_write && page >= cache.len_pages() {
                // Past the end of the file (a CPU access there is SIGBUS).
                return Err(Error::PastEndOfFile { addr: a });
            }
            if want_write {
                let r = VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                };
                match cache.device_write_fault(&*space.mm, page, r) {
                    Ok(StoreFault::Done) => writable = true,
                    Ok(StoreFault::WaitFlush) => {
                        drop(st);
                        cache.wait_flush();
                        return Err(Error::Busy);
                    }
                    Ok(StoreFault::Device) => {
                        drop(st);
                        cache.settle(page, false, true)?;
                        return Err(Error::Busy);
                    }
                    Ok(StoreFault::Sigbus) => {
                        return Err(Error::os(
                            "device write to a file page at the dirty bound after a failed writeback",
                            std::io::Error::from_raw_os_error(libc::EIO),
                        ));
                    }
                    Err(Error::Busy) => {
                        drop(st);
                        cache.wait_for_removal();
                        return Err(Error::Busy);
                    }
                    Err(e) => return Err(e),
                }
            } else {
                grant_of = Some((cache, page));
            }
        }
        if want_write && !writable {
            return Err(Error::NoWrite { addr: a });
        }
        // A page of a shared file mapping placed in device memory (the file's cache says
        // where): reported as its frame where the caller may map it (a coherent page, or a
        // private page of the caller's own device); a private page of another device comes
        // back to system memory first (no lock held; the caller retries).
        if let Some((dp, cache, page)) = file_dev {
            if dp.coherent || Some(dp.owner) == range.dev_private_owner {
                range.hmm_pfns[i] = HMM_PFN_VALID
                    | if writable { HMM_PFN_WRITE } else { 0 }
                    | PageTarget::Device {
                        pagemap: dp.pagemap,
                        frame: dp.frame,
                    }
                    .encode();
                continue;
            }
            if want_fault {
                drop(st);
                cache.settle(page, false, want_write)?;
                return Err(Error::Busy);
            }
            range.hmm_pfns[i] = 0;
            continue;
        }
        let mut pte = v.ptes[v.idx(a)];
        if pte.migrating() {
            // A migration in flight owns the page (the kernel's migration entry): wait for it
            // to finalize, then the caller retries (its notifier sequence has moved anyway).
            let _st = space.wait_for_migrations(
                st,
                VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                },
            );
            return Err(Error::Busy);
        }
        let order = |large: bool| if large { 9u64 << ORDER_SHIFT } else { 0 };

        if pte.state() == PageState::Device {
            let pm = st.pagemap(pte.pagemap());
            if pm.kind() == MemoryKind::Private && Some(pm.owner()) == range.dev_private_owner {
                range.hmm_pfns[i] = HMM_PFN_VALID
                    | if writable { HMM_PFN_WRITE } else { 0 }
                    | order(pte.large())
                    | PageTarget::Device {
                        pagemap: pte.pagemap(),
                        frame: pte.frame(),
                    }
                    .encode();
                continue;
            }
        }
        if pte.state() != PageState::Present {
            if !want_fault {
                range.hmm_pfns[i] = 0;
                continue;
            }
            space.make_present(&mut st, a)?;
            pte = st.pte(a).expect("still mapped");
        }
        if pte.fork_cow() {
            if want_write {
                // A device store to a coherent page shared with a forked child: as a CPU
                // store (`SpaceCore::resolve_fork_cow`).
                space.resolve_fork_cow(&mut st, a)?;
                pte = st.pte(a).expect("still mapped");
            } else {
                // Read-only until then: a device's store must fault.
                writable = false;
            }
        }
        if want_write && pte.replicated() {
            // A device store to a page devices hold read-only replicas of: every replica goes
            // first (the invalidation sends the caller round again, to map the page writable).
            space.drop_replicas(
                &mut st,
                VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                },
            );
            pte = st.pte(a).expect("still mapped");
        } else if pte.replicated() {
            // Read-only while replicas exist: a device's store must fault (and drop them).
            writable = false;
        }
        let mut zero = false;
        if pte.is_zero_page() {
            if want_write {
                // A device store to the zero page: the page gets a private copy first (the
                // protection comes off; the device's store then copies it, as a CPU store
                // would).
                let mode = st.vma(a).expect("mapped").mode;
                st.set_pte(a, pte.without_zero());
                space
                    .mm
                    .write_protect(
                        VaRange {
                            start: a,
                            end: a.add(PAGE_SIZE),
                        },
                        false,
                        mode,
                    )
                    .map_err(|e| Error::uffd("a device store to the zero page", e, a))?;
            } else {
                zero = true;
                writable = false;
            }
        }
        if let Some((cache, page)) = grant_of {
            // The page was filled and not being removed or revoked just now; a revocation that
            // starts from here on invalidates this walk (it needs the space's lock).
            writable = cache.device_writable(page);
        }
        // A coherent-resident page is a normal present page whose frame is device memory: it is
        // reported as that frame, whoever asks.
        let target = if pte.is_coherent() {
            PageTarget::Device {
                pagemap: pte.pagemap(),
                frame: pte.frame(),
            }
        } else {
            PageTarget::System(a.page())
        };
        range.hmm_pfns[i] = HMM_PFN_VALID
            | if writable { HMM_PFN_WRITE } else { 0 }
            | if zero { HMM_PFN_ZERO } else { 0 }
            | order(pte.large())
            | target.encode();
    }
    if range.notifier.read_retry(range.notifier_seq) {
        return Err(Error::Busy);
    }
    Ok(())
}

/// Splits a pfn word into its flags and target.
pub fn hmm_pfn_split(w: u64) -> (u64, PageTarget) {
    (w & FLAGS_MASK, PageTarget::decode(w))
}
