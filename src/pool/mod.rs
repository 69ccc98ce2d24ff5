//! Frame pools: device memory (and the system "stash" that holds device-exclusive pages) as
//! 4 KiB frames and 2 MiB large frames, with per-frame metadata.
//!
//! A [`Pagemap`] is hetmem's `dev_pagemap`: a pool of one memory type (device-private or
//! device-coherent) with an owner token. Its frames live in one anonymous [`Region`] (hetmem's
//! own memory, never a managed address), so copying into and out of a frame is a plain raw
//! copy, and returning a frame to the CPU is one `UFFDIO_COPY` with no cross-CPU TLB flush.
//!
//! # Frames and large frames
//!
//! The pool is cut into 2 MiB blocks, with one free bit per frame and a count of free frames
//! per block. A large allocation takes the lowest wholly free block; a base allocation takes the
//! lowest free frame (first fit), so consecutive allocations get consecutive frames wherever the
//! pool has them (a migration's pages then come back with one copy per run), and a block whose
//! base frames are all freed is whole again for a large allocation.
//!
//! # Per-frame metadata
//!
//! Two words per frame (the frame's `struct page`):
//!
//! * `rmap[frame]`, the reverse map: the frame's typed owner ([`FrameOwner`]; 0 = none) — an
//!   anonymous page (address space, virtual page) or a page of a file's cache (cache, page
//!   index in the file: one frame shared by every mapping of the file in every space) — so that
//!   eviction, device release and writeback find the page that owns a frame (the kernel's
//!   `migrate_device_range`). Written under the owner's lock (the address space's state lock,
//!   or the file cache's) and read by eviction before taking that lock (and re-checked under
//!   it). Packed in one word: bits 62–63 the kind (1 anonymous, 2 file); anonymous: space id in
//!   bits 46–61, virtual page number in bits 0–45; file: cache id in bits 38–61, page index in
//!   bits 0–37 (files up to 1 PiB).
//! * `flags[frame]`: `ALLOCATED`, `LARGE` (head or tail of a 2 MiB frame), `DIRTY` (the device
//!   wrote it since it received its data; file-backed writeback will read it), `POISONED`
//!   (retired after a memory failure: allocated to nobody, never handed out again). The owner
//!   is the pagemap's.
//!
//! # Locks
//!
//! `PoolState` (the free bitmap, counts) is protected by `Pagemap::state`. It is a leaf lock: nothing
//! else is taken while holding it.

use crate::addr::{FrameIdx, PAGE_SIZE, PAGES_PER_LARGE};
use crate::error::{Error, Result};
use crate::sync::{Mutex, Ordering, lock};
use crate::sys::{LARGE_PAGE_SIZE, Prot};

/// An owned anonymous mapping of hetmem's own memory (never a managed address): what a
/// [`FrameStore`] that the CPU can address exposes ([`FrameStore::host_view`]), and the source and
/// destination of its copies.
pub use crate::sys::Region;

/// The memory type of a pagemap (`enum memory_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Device-private: the CPU cannot map it; a CPU access migrates the page back.
    Private,
    /// Device-coherent: the CPU can map it directly.
    Coherent,
    /// System memory held aside by hetmem (device-exclusive pages).
    System,
}

/// An owner token (`pgmap->owner`): identifies a device for migration selection and for
/// range_fault's `dev_private_owner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(pub u64);

/// A pagemap id, unique in the process; stored in page entries (8 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PagemapId(pub u8);

#[derive(Debug)]
struct PoolState {
    /// One bit per frame, set while the frame is free.
    free: Vec<u64>,
    /// Free frames in each 2 MiB block (512: the block can be allocated large).
    block_free: Vec<u16>,
    /// Every block below this one is full (a hint: the search for a free frame starts here).
    lo: usize,
    /// Allocated frames, in base frames.
    used: usize,
    /// Which blocks are allocated as one large frame.
    large_alloc: Vec<bool>,
}

/// Bitmap words per 2 MiB block.
const WORDS_PER_BLOCK: usize = PAGES_PER_LARGE / 64;

impl PoolState {
    /// Takes the lowest free base frame (first fit: consecutive allocations get consecutive
    /// frames where the pool has them, and whole blocks stay whole for large allocations as long
    /// as lower blocks have room), or `None` when the pool is full.
    fn take_lowest(&mut self) -> Option<u32> {
        while self.lo < self.block_free.len() && self.block_free[self.lo] == 0 {
            self.lo += 1;
        }
        let b = self.lo;
        if b == self.block_free.len() {
            return None;
        }
        let w0 = b * WORDS_PER_BLOCK;
        let (w, word) = self.free[w0..w0 + WORDS_PER_BLOCK]
            .iter()
            .enumerate()
            .find(|(_, x)| **x != 0)
            .map(|(k, x)| (w0 + k, *x))
            .expect("a block with free frames has a set bit");
        let bit = word.trailing_zeros() as usize;
        self.free[w] &= !(1u64 << bit);
        self.block_free[b] -= 1;
        self.used += 1;
        Some((w * 64 + bit) as u32)
    }

    /// Marks base frame `f` free again.
    fn put(&mut self, f: u32) {
        let (w, bit) = (f as usize / 64, f as usize % 64);
        assert!(
            self.free[w] & (1u64 << bit) == 0,
            "free of a frame that is free"
        );
        let b = f as usize / PAGES_PER_LARGE;
        self.free[w] |= 1u64 << bit;
        self.block_free[b] += 1;
        self.used -= 1;
        self.lo = self.lo.min(b);
    }
}

/// The largest pool: a frame index has 32 bits (in page entries), so 2^32 frames of 4 KiB.
pub const MAX_CAPACITY: usize = (1usize << 32) * PAGE_SIZE;

/// A pool of frames of one memory type, with an owner.
#[derive(Debug)]
pub struct Pagemap {
    id: PagemapId,
    kind: MemoryKind,
    owner: Owner,
    store: Box<dyn FrameStore>,
    nframes: usize,
    state: Mutex<PoolState>,
    rmap: Box<[std::sync::atomic::AtomicU64]>,
    flags: Box<[std::sync::atomic::AtomicU64]>,
    /// The device's link model: copies into and out of this pagemap are charged to it.
    link: Option<crate::sync::Arc<crate::link::LinkModel>>,
}

/// Per-frame flag bits (see the module doc).
pub mod frame_flags {
    /// The frame is allocated.
    pub const ALLOCATED: u64 = 1 << 0;
    /// Part of a 2 MiB frame.
    pub const LARGE: u64 = 1 << 1;
    /// Written by the device since it received its data.
    pub const DIRTY: u64 = 1 << 3;
    /// Retired after a memory failure: kept allocated and owned by nobody, never handed out
    /// again (as the kernel takes a hardware-poisoned page out of its allocator for good).
    pub const POISONED: u64 = 1 << 4;
}

/// What a frame's metadata says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// `frame_flags` bits.
    pub flags: u64,
    /// Whose data it holds.
    pub owner: Option<FrameOwner>,
}

/// Whose data a frame holds: what the reverse map records and eviction, device release and
/// writeback follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameOwner {
    /// An anonymous page (or a private file mapping's page, which is anonymous memory).
    Anon {
        /// The address space's id.
        space: u16,
        /// The virtual page number.
        vpn: usize,
    },
    /// A page of a file's cache, shared by every mapping of the file.
    File {
        /// The cache's id.
        cache: u32,
        /// The page's index in the file.
        index: u64,
    },
}

const KIND_SHIFT: u32 = 62;
const ANON: u64 = 1;
const FILE: u64 = 2;
const VPN_BITS: u32 = 46;
const INDEX_BITS: u32 = 38;

impl FrameOwner {
    /// The largest file page index a frame can be owned at.
    pub const MAX_FILE_INDEX: u64 = (1 << INDEX_BITS) - 1;

    fn pack(self) -> u64 {
        match self {
            FrameOwner::Anon { space, vpn } => {
                debug_assert!((vpn as u64) < (1 << VPN_BITS), "vpn {vpn:#x} too large");
                (ANON << KIND_SHIFT)
                    | ((space as u64) << VPN_BITS)
                    | (vpn as u64 & ((1 << VPN_BITS) - 1))
            }
            FrameOwner::File { cache, index } => {
                debug_assert!(cache < (1 << 24) && index <= Self::MAX_FILE_INDEX);
                (FILE << KIND_SHIFT)
                    | (((cache as u64) & ((1 << 24) - 1)) << INDEX_BITS)
                    | (index & Self::MAX_FILE_INDEX)
            }
        }
    }

    fn unpack(v: u64) -> Option<FrameOwner> {
        match v >> KIND_SHIFT {
            ANON => Some(FrameOwner::Anon {
                space: ((v >> VPN_BITS) & 0xffff) as u16,
                vpn: (v & ((1 << VPN_BITS) - 1)) as usize,
            }),
            FILE => Some(FrameOwner::File {
                cache: ((v >> INDEX_BITS) & ((1 << 24) - 1)) as u32,
                index: v & Self::MAX_FILE_INDEX,
            }),
            _ => None,
        }
    }
}

/// Where a pagemap's frames keep their bytes: the device side of the copy engine. The core never
/// forms a pointer into device memory; it copies in and out through this trait, addressing
/// frames by byte offset (`FrameIdx::offset`). A device whose memory the CPU can address (the
/// software device: its frames are hetmem's own anonymous memory) also offers a host view, from
/// which a page is installed into the CPU's view with no staging copy; any other device (a real
/// accelerator behind a driver) is copied out into the address space's bounce buffer first.
///
/// Implementations must not allocate in `copy_out` and `copy_in` (they run on the CPU fault
/// path, in a SIGBUS handler) and must not touch managed addresses.
pub trait FrameStore: Send + Sync + std::fmt::Debug {
    /// Copies `len` bytes from host memory `src[src_off..]` into the frames at byte `off`.
    fn copy_in(&self, off: usize, src: &Region, src_off: usize, len: usize) -> std::io::Result<()>;
    /// Copies `len` bytes of the frames at byte `off` out into host memory `dst[dst_off..]`.
    fn copy_out(&self, off: usize, dst: &Region, dst_off: usize, len: usize)
    -> std::io::Result<()>;
    /// Copies the frames' bytes at `off` into `dst` (a device read of the dmirror commands).
    fn read(&self, off: usize, dst: &mut [u8]) -> std::io::Result<()>;
    /// Copies `src` into the frames at `off` (a device write of the dmirror commands).
    fn write(&self, off: usize, src: &[u8]) -> std::io::Result<()>;
    /// Zeroes `len` bytes at `off`.
    fn zero(&self, off: usize, len: usize) -> std::io::Result<()>;
    /// Device atomic fetch-add on the `u64` at `off` (8-byte aligned).
    fn fetch_add_u64(&self, off: usize, v: u64) -> std::io::Result<u64>;
    /// The frames as host memory, when the CPU can address them.
    fn host_view(&self) -> Option<&Region>;
}

/// Frames in hetmem's own anonymous memory: the software device's memory, and the system
/// stash. Host-addressable.
#[derive(Debug)]
pub struct HostFrames(Region);

impl HostFrames {
    /// `len` bytes of fresh anonymous memory, 2 MiB aligned.
    pub fn new(len: usize) -> std::io::Result<HostFrames> {
        Ok(HostFrames(Region::new(
            len,
            LARGE_PAGE_SIZE,
            Prot::ReadWrite,
        )?))
    }
}

impl FrameStore for HostFrames {
    fn copy_in(&self, off: usize, src: &Region, src_off: usize, len: usize) -> std::io::Result<()> {
        src.copy_to(src_off, &self.0, off, len)
    }
    fn copy_out(
        &self,
        off: usize,
        dst: &Region,
        dst_off: usize,
        len: usize,
    ) -> std::io::Result<()> {
        self.0.copy_to(off, dst, dst_off, len)
    }
    fn read(&self, off: usize, dst: &mut [u8]) -> std::io::Result<()> {
        self.0.read(off, dst)
    }
    fn write(&self, off: usize, src: &[u8]) -> std::io::Result<()> {
        self.0.write(off, src)
    }
    fn zero(&self, off: usize, len: usize) -> std::io::Result<()> {
        self.0.zero(off, len)
    }
    fn fetch_add_u64(&self, off: usize, v: u64) -> std::io::Result<u64> {
        self.0.fetch_add_u64(off, v)
    }
    fn host_view(&self) -> Option<&Region> {
        Some(&self.0)
    }
}

impl Pagemap {
    /// A pool of `capacity` bytes (rounded up to 2 MiB) of memory type `kind`, its frames in
    /// hetmem's own memory ([`HostFrames`]).
    pub fn new(id: PagemapId, kind: MemoryKind, owner: Owner, capacity: usize) -> Result<Pagemap> {
        Self::with_store(id, kind, owner, capacity, &|len| {
            Ok(Box::new(HostFrames::new(len)?) as Box<dyn FrameStore>)
        })
    }

    /// A pool whose frames live in the store `make` returns for the pool's length in bytes
    /// (`capacity` rounded up to 2 MiB): a device that is not host-addressable.
    pub fn with_store(
        id: PagemapId,
        kind: MemoryKind,
        owner: Owner,
        capacity: usize,
        make: &dyn Fn(usize) -> std::io::Result<Box<dyn FrameStore>>,
    ) -> Result<Pagemap> {
        if capacity == 0 {
            return Err(Error::ZeroLength);
        }
        if capacity > MAX_CAPACITY {
            return Err(Error::TooLarge {
                what: "a pool's capacity",
                requested: capacity as u64,
                limit: MAX_CAPACITY as u64,
            });
        }
        let blocks = capacity.div_ceil(LARGE_PAGE_SIZE);
        let len = blocks * LARGE_PAGE_SIZE;
        let store = make(len).map_err(|e| Error::os("device memory", e))?;
        let nframes = blocks * PAGES_PER_LARGE;
        let no_mem = |_| Error::NoMemory {
            what: "the pool's frame metadata",
        };
        let rmap = crate::sys::zeroed_atomics(nframes).map_err(no_mem)?;
        let flags = crate::sys::zeroed_atomics(nframes).map_err(no_mem)?;
        let mut free = Vec::new();
        free.try_reserve_exact(nframes / 64)
            .map_err(|_| Error::NoMemory {
                what: "the pool's free bitmap",
            })?;
        free.resize(nframes / 64, u64::MAX);
        Ok(Pagemap {
            id,
            kind,
            owner,
            store,
            nframes,
            // The bitmap has a bit for every frame now: freeing a frame (which the CPU fault
            // path does, in a SIGBUS handler) never allocates.
            state: Mutex::new(PoolState {
                free,
                block_free: vec![PAGES_PER_LARGE as u16; blocks],
                lo: 0,
                used: 0,
                large_alloc: vec![false; blocks],
            }),
            rmap,
            flags,
            link: None,
        })
    }

    /// The pagemap, with copies into and out of it charged to `link`.
    pub fn with_link(mut self, link: crate::sync::Arc<crate::link::LinkModel>) -> Pagemap {
        self.link = Some(link);
        self
    }

    /// Charges a migration copy of `bytes` to the device's link model, if it has one.
    pub(crate) fn charge_migration(&self, bytes: usize) {
        if let Some(l) = &self.link {
            l.charge(crate::link::Traffic::Migration, bytes as u64, 1);
        }
    }

    /// The device's link model, if any.
    pub fn link(&self) -> Option<&crate::sync::Arc<crate::link::LinkModel>> {
        self.link.as_ref()
    }

    fn set_flags(&self, first: usize, n: usize, v: u64) {
        for f in &self.flags[first..first + n] {
            f.store(v, Ordering::Release);
        }
    }

    /// The metadata of `frame` (`None` past the pool's last frame).
    pub fn frame_info(&self, frame: FrameIdx) -> Option<FrameInfo> {
        let i = frame.0 as usize;
        Some(FrameInfo {
            flags: self.flags.get(i)?.load(Ordering::Acquire),
            owner: self.rmap(frame),
        })
    }

    /// Marks `frame` written by the device.
    pub(crate) fn mark_dirty(&self, frame: FrameIdx) {
        self.flags[frame.0 as usize].fetch_or(frame_flags::DIRTY, Ordering::AcqRel);
    }

    /// Whether the device wrote `frame` since the last call (the writeback of a file page
    /// placed in device memory reads and clears it).
    pub(crate) fn take_dirty(&self, frame: FrameIdx) -> bool {
        self.flags[frame.0 as usize].fetch_and(!frame_flags::DIRTY, Ordering::AcqRel)
            & frame_flags::DIRTY
            != 0
    }

    /// The pagemap's id.
    pub fn id(&self) -> PagemapId {
        self.id
    }
    /// The memory type.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    /// The owner token.
    pub fn owner(&self) -> Owner {
        self.owner
    }
    /// Where the frames keep their bytes.
    pub fn store(&self) -> &dyn FrameStore {
        &*self.store
    }
    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.nframes * PAGE_SIZE
    }
    /// Bytes allocated.
    pub fn used(&self) -> usize {
        lock(&self.state).used * PAGE_SIZE
    }

    /// Allocates a base frame: the lowest free one.
    pub fn alloc(&self) -> Result<FrameIdx> {
        let mut st = lock(&self.state);
        let f = st.take_lowest().ok_or(Error::NoMemory {
            what: "device memory",
        })?;
        self.set_flags(f as usize, 1, frame_flags::ALLOCATED);
        Ok(FrameIdx(f))
    }

    /// Allocates up to `n` base frames in one hold of the pool's lock, appended to `out` in
    /// ascending order, the lowest free ones: the pages a migration moves together then lie in
    /// consecutive frames wherever the pool has them, and are copied back with one call. Fewer
    /// when the pool runs out: the caller deals with the rest one frame at a time.
    pub fn alloc_many(&self, n: usize, out: &mut Vec<FrameIdx>) {
        let mut st = lock(&self.state);
        for _ in 0..n {
            let Some(f) = st.take_lowest() else { break };
            self.set_flags(f as usize, 1, frame_flags::ALLOCATED);
            out.push(FrameIdx(f));
        }
    }

    /// Allocates a large frame (512 contiguous base frames, 2 MiB aligned): the lowest wholly
    /// free block.
    pub fn alloc_large(&self) -> Result<FrameIdx> {
        let mut st = lock(&self.state);
        let Some(block) =
            (st.lo..st.block_free.len()).find(|&b| st.block_free[b] as usize == PAGES_PER_LARGE)
        else {
            return Err(Error::NoMemory {
                what: "device memory (large frames)",
            });
        };
        let w0 = block * WORDS_PER_BLOCK;
        st.free[w0..w0 + WORDS_PER_BLOCK].fill(0);
        st.block_free[block] = 0;
        st.large_alloc[block] = true;
        st.used += PAGES_PER_LARGE;
        let head = block * PAGES_PER_LARGE;
        self.set_flags(
            head,
            PAGES_PER_LARGE,
            frame_flags::ALLOCATED | frame_flags::LARGE,
        );
        Ok(FrameIdx(head as u32))
    }

    /// Splits an allocated large frame into 512 allocated base frames (freed one by one).
    pub(crate) fn split_large(&self, head: FrameIdx) {
        let mut st = lock(&self.state);
        let block = head.0 as usize / PAGES_PER_LARGE;
        debug_assert!(st.large_alloc[block], "split of a frame that is not large");
        st.large_alloc[block] = false;
        for f in &self.flags[head.0 as usize..head.0 as usize + PAGES_PER_LARGE] {
            f.fetch_and(!frame_flags::LARGE, Ordering::AcqRel);
        }
    }

    /// Frees a frame: a base frame, or (given its head) a whole large frame. Clears its rmap.
    pub(crate) fn free(&self, frame: FrameIdx, large: bool) {
        let mut st = lock(&self.state);
        if large {
            let block = frame.0 as usize / PAGES_PER_LARGE;
            assert!(
                st.large_alloc[block],
                "large free of a frame not allocated large"
            );
            st.large_alloc[block] = false;
            let w0 = block * WORDS_PER_BLOCK;
            st.free[w0..w0 + WORDS_PER_BLOCK].fill(u64::MAX);
            st.block_free[block] = PAGES_PER_LARGE as u16;
            st.used -= PAGES_PER_LARGE;
            st.lo = st.lo.min(block);
            for f in frame.0 as usize..frame.0 as usize + PAGES_PER_LARGE {
                self.rmap[f].store(0, Ordering::Release);
            }
            self.set_flags(frame.0 as usize, PAGES_PER_LARGE, 0);
        } else {
            st.put(frame.0);
            self.rmap[frame.0 as usize].store(0, Ordering::Release);
            self.set_flags(frame.0 as usize, 1, 0);
        }
    }

    /// Retires an allocated base frame after a memory failure: its owner is cleared and it
    /// stays allocated (counted in [`Pagemap::used`]), flagged [`frame_flags::POISONED`], so it
    /// is never allocated again. Instead of [`Pagemap::free`], by whoever held it.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn retire(&self, frame: FrameIdx) {
        let _st = lock(&self.state);
        self.rmap[frame.0 as usize].store(0, Ordering::Release);
        self.set_flags(
            frame.0 as usize,
            1,
            frame_flags::ALLOCATED | frame_flags::POISONED,
        );
    }

    /// Records whose data a frame holds.
    pub(crate) fn set_rmap(&self, frame: FrameIdx, owner: FrameOwner) {
        self.rmap[frame.0 as usize].store(owner.pack(), Ordering::Release);
    }

    /// Whose data a frame holds, if allocated and owned.
    pub(crate) fn rmap(&self, frame: FrameIdx) -> Option<FrameOwner> {
        FrameOwner::unpack(self.rmap[frame.0 as usize].load(Ordering::Acquire))
    }

    /// Number of base frames.
    pub fn nframes(&self) -> usize {
        self.nframes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_capacity() {
        shuttle::check_random(
            || {
                let p = Pagemap::new(PagemapId(1), MemoryKind::Private, Owner(1), 4 << 20).unwrap();
                assert_eq!(p.capacity(), 4 << 20);
                let l = p.alloc_large().unwrap();
                let b = p.alloc().unwrap();
                assert_eq!(p.used(), LARGE_PAGE_SIZE + PAGE_SIZE);
                assert!(
                    p.alloc_large().is_err(),
                    "second block is split for base frames"
                );
                p.free(l, true);
                p.free(b, false);
                assert_eq!(p.used(), 0);
                let f = p.alloc().unwrap();
                assert_eq!(p.frame_info(f).unwrap().flags, frame_flags::ALLOCATED);
                p.set_rmap(f, FrameOwner::Anon { space: 3, vpn: 77 });
                p.mark_dirty(f);
                assert_eq!(
                    p.frame_info(f).unwrap(),
                    FrameInfo {
                        flags: frame_flags::ALLOCATED | frame_flags::DIRTY,
                        owner: Some(FrameOwner::Anon { space: 3, vpn: 77 })
                    }
                );
                p.free(f, false);
                assert_eq!(
                    p.frame_info(f).unwrap(),
                    FrameInfo {
                        flags: 0,
                        owner: None
                    }
                );
                assert!(p.alloc_large().is_ok());
            },
            1,
        );
    }

    #[test]
    fn frames_come_lowest_first_and_a_freed_block_is_whole_again() {
        shuttle::check_random(
            || {
                let p = Pagemap::new(PagemapId(1), MemoryKind::Private, Owner(1), 6 << 20).unwrap();
                let mut got = Vec::new();
                p.alloc_many(3 * PAGES_PER_LARGE + 7, &mut got);
                assert_eq!(got.len(), 3 * PAGES_PER_LARGE, "only what the pool has");
                assert!(
                    got.iter().enumerate().all(|(k, f)| f.0 as usize == k),
                    "consecutive frames, ascending"
                );
                assert!(p.alloc().is_err() && p.alloc_large().is_err());
                // Every base frame of the middle block freed: it is one large frame again.
                for f in &got[PAGES_PER_LARGE..2 * PAGES_PER_LARGE] {
                    p.free(*f, false);
                }
                assert_eq!(p.alloc_large().unwrap(), FrameIdx(PAGES_PER_LARGE as u32));
                // A freed base frame is the next one handed out (the lowest free).
                p.free(FrameIdx(5), false);
                p.free(FrameIdx(3), false);
                assert_eq!(p.alloc().unwrap(), FrameIdx(3));
                assert_eq!(p.alloc().unwrap(), FrameIdx(5));
                assert_eq!(p.used(), 6 << 20);
            },
            1,
        );
    }

    #[test]
    #[should_panic(expected = "free of a frame that is free")]
    fn a_frame_freed_twice_is_caught_before_the_free_bitmap_changes() {
        shuttle::check_random(
            || {
                let p = Pagemap::new(PagemapId(1), MemoryKind::Private, Owner(1), 2 << 20).unwrap();
                let f = p.alloc().unwrap();
                p.free(f, false);
                p.free(f, false);
            },
            1,
        );
    }

    #[test]
    fn frame_owners_round_trip_through_the_reverse_map_word() {
        for o in [
            FrameOwner::Anon { space: 0, vpn: 0 },
            FrameOwner::Anon {
                space: u16::MAX,
                vpn: (1 << VPN_BITS) - 1,
            },
            FrameOwner::File { cache: 0, index: 0 },
            FrameOwner::File {
                cache: (1 << 24) - 1,
                index: FrameOwner::MAX_FILE_INDEX,
            },
        ] {
            let w = o.pack();
            assert_ne!(w, 0, "an owner never packs to the free word");
            assert_eq!(FrameOwner::unpack(w), Some(o));
        }
        assert_eq!(FrameOwner::unpack(0), None);
    }
}
