//! Owned mappings ([`Region`]) with bounds-checked raw copies, protections, and the read-only
//! mapping of a file used by the bench baseline.

#![allow(unsafe_code)]

use super::*;

/// Memory protection of a range, as `PROT_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prot {
    /// `PROT_NONE`: any access faults.
    None,
    /// `PROT_READ`.
    Read,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

impl Prot {
    /// Whether loads are allowed.
    pub fn readable(self) -> bool {
        !matches!(self, Prot::None)
    }
    /// Whether stores are allowed.
    pub fn writable(self) -> bool {
        matches!(self, Prot::ReadWrite)
    }
    fn flags(self) -> ProtFlags {
        match self {
            Prot::None => ProtFlags::empty(),
            Prot::Read => ProtFlags::READ,
            Prot::ReadWrite => ProtFlags::READ | ProtFlags::WRITE,
        }
    }
    fn mflags(self) -> MprotectFlags {
        match self {
            Prot::None => MprotectFlags::empty(),
            Prot::Read => MprotectFlags::READ,
            Prot::ReadWrite => MprotectFlags::READ | MprotectFlags::WRITE,
        }
    }
}

/// Checks the machine's page size once; hetmem assumes 4 KiB base pages.
pub fn check_page_size() -> io::Result<()> {
    if rustix::param::page_size() != PAGE_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "hetmem needs 4 KiB base pages",
        ));
    }
    Ok(())
}

/// An owned anonymous private mapping.
///
/// # Invariants
///
/// `base..base + len` is a live mapping created by [`Region::new`] and owned by this value
/// until it is dropped; `base` is aligned to the alignment asked for. The mapping is
/// `MADV_DONTFORK`: a child process does not inherit it (hetmem is inert in a child).
///
/// An *adopted* region ([`Region::adopt`]) is the exception: memory the program mapped itself
/// (anonymous and private, checked when adopted), lent to hetmem. It is not unmapped on drop
/// and keeps the program's fork behaviour; the program must not unmap it while hetmem manages it
/// (the contract of `Space::adopt`: a copy into an unmapped range would crash the process).
///
/// Other threads (and devices) may access the bytes while a copy runs: why plain copies are
/// sound there, and which accesses are volatile or atomic, is in the [module doc](super),
/// "Memory that other threads touch".
#[derive(Debug)]
pub struct Region {
    pub(super) base: usize,
    pub(super) len: usize,
    /// Unmapped on drop (false: adopted, the program's).
    pub(super) owned: bool,
    /// Parts that are no longer the region's (`off, len`): the program unmapped them (its
    /// address space from then on); never unmapped on drop.
    pub(super) disowned: Vec<(usize, usize)>,
}

/// `n` atomic words, all zero, allocated fallibly and zeroed lazily (a large allocation is fresh
/// anonymous memory: untouched words cost nothing): per-frame metadata of a pool whose size a
/// caller chose.
pub fn zeroed_atomics(n: usize) -> io::Result<Box<[AtomicU64]>> {
    if n == 0 {
        return Ok(Box::new([]));
    }
    let layout = std::alloc::Layout::array::<AtomicU64>(n)
        .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: `layout` has a non-zero size (n > 0).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<AtomicU64>();
    if p.is_null() {
        return Err(io::Error::from_raw_os_error(libc::ENOMEM));
    }
    // SAFETY: `p` is a fresh allocation of `n` AtomicU64 with the global allocator's layout for
    // that array, and all-zero bytes are a valid AtomicU64 (same layout as u64); the box takes
    // ownership and frees it with the same layout.
    Ok(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, n)) })
}

impl Region {
    /// Maps `len` bytes (a multiple of the page size) aligned to `align` (a power of two, at
    /// least a page), with protection `prot`, not inherited across fork.
    pub fn new(len: usize, align: usize, prot: Prot) -> io::Result<Region> {
        if len == 0
            || !len.is_multiple_of(PAGE_SIZE)
            || !align.is_power_of_two()
            || align < PAGE_SIZE
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let total = len
            .checked_add(align - PAGE_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases no
        // Rust object.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                total,
                prot.flags(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        let raw = raw as usize;
        let base = (raw + align - 1) & !(align - 1);
        // Trim the slack on both sides so that only the aligned part stays mapped.
        if base > raw {
            // SAFETY: `raw..base` is part of the mapping just created and nothing refers to it.
            unsafe { rustix::mm::munmap(raw as *mut _, base - raw) }?;
        }
        let tail = raw + total - (base + len);
        if tail > 0 {
            // SAFETY: the tail past `base + len` belongs to the fresh mapping, unused.
            unsafe { rustix::mm::munmap((base + len) as *mut _, tail) }?;
        }
        let region = Region {
            base,
            len,
            owned: true,
            disowned: Default::default(),
        };
        region.advise(0, len, Advice::LinuxDontFork)?;
        Ok(region)
    }

    /// First byte of the region.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: regions have a non-zero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn check(&self, off: usize, len: usize) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EFAULT)),
        }
    }

    fn advise(&self, off: usize, len: usize, advice: Advice) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: the range lies inside this region (checked); madvise with these advices
        // changes no memory that Rust objects alias (the region is only ever accessed through
        // raw copies).
        unsafe { rustix::mm::madvise((self.base + off) as *mut _, len, advice) }?;
        Ok(())
    }

    /// Copies `dst.len()` bytes at `off` out of the region (a raw copy: the bytes may change
    /// underneath, no reference to them is formed).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> io::Result<()> {
        self.check(off, dst.len())?;
        // SAFETY: source range is inside the live mapping (checked above); `dst` is a distinct
        // Rust buffer, so the ranges do not overlap.
        unsafe {
            ptr::copy_nonoverlapping((self.base + off) as *const u8, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// Copies `src` into the region at `off` (a raw copy).
    pub fn write(&self, off: usize, src: &[u8]) -> io::Result<()> {
        self.check(off, src.len())?;
        // SAFETY: destination range is inside the live mapping (checked above); `src` is a
        // distinct Rust buffer.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), (self.base + off) as *mut u8, src.len()) };
        Ok(())
    }

    /// Copies `len` bytes from `self` at `src_off` to `dst` at `dst_off` (raw memcpy).
    pub fn copy_to(
        &self,
        src_off: usize,
        dst: &Region,
        dst_off: usize,
        len: usize,
    ) -> io::Result<()> {
        self.check(src_off, len)?;
        dst.check(dst_off, len)?;
        let (s, d) = (self.base + src_off, dst.base + dst_off);
        if s < d + len && d < s + len {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: both ranges are inside live mappings (checked) and do not overlap (checked).
        unsafe { ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, len) };
        Ok(())
    }

    /// Fills `len` bytes at `off` with zeros.
    pub fn zero(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: range inside the live mapping (checked).
        unsafe { ptr::write_bytes((self.base + off) as *mut u8, 0, len) };
        Ok(())
    }

    /// Volatile load of a `u64` at `off` (8-byte aligned).
    pub fn load_u64(&self, off: usize) -> io::Result<u64> {
        self.check(off, 8)?;
        if !off.is_multiple_of(8) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: aligned, inside the live mapping (checked).
        Ok(unsafe { ptr::read_volatile((self.base + off) as *const u64) })
    }

    /// Volatile load of a `u32` at `off` (4-byte aligned): one real CPU load, which may fault
    /// (the bench's baselines time it).
    pub fn load_u32(&self, off: usize) -> io::Result<u32> {
        self.check(off, 4)?;
        if !off.is_multiple_of(4) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: aligned, inside the live mapping (checked).
        Ok(unsafe { ptr::read_volatile((self.base + off) as *const u32) })
    }

    /// Volatile store of a `u32` at `off` (4-byte aligned): one real CPU store.
    pub fn store_u32(&self, off: usize, v: u32) -> io::Result<()> {
        self.check(off, 4)?;
        if !off.is_multiple_of(4) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: aligned, inside the live mapping (checked).
        unsafe { ptr::write_volatile((self.base + off) as *mut u32, v) };
        Ok(())
    }

    /// Atomic fetch-add of a `u64` at `off` (8-byte aligned): the device's atomic operation.
    pub fn fetch_add_u64(&self, off: usize, v: u64) -> io::Result<u64> {
        self.check(off, 8)?;
        if !off.is_multiple_of(8) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: aligned, inside the live mapping (checked); AtomicU64 has the layout of u64
        // and every access to this word by hetmem is atomic or a raw copy.
        let a = unsafe { &*((self.base + off) as *const std::sync::atomic::AtomicU64) };
        Ok(a.fetch_add(v, Ordering::SeqCst))
    }

    /// Drops the pages of `off..off + len` (`MADV_DONTNEED`): on an anonymous private region the
    /// next access faults (for a userfaultfd-registered range: a MISSING fault).
    pub fn discard(&self, off: usize, len: usize) -> io::Result<()> {
        self.advise(off, len, Advice::LinuxDontNeed)
    }

    /// Changes the protection of `off..off + len`.
    pub fn protect(&self, off: usize, len: usize, prot: Prot) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: the range is inside this region; its memory is only accessed by raw copies,
        // so no Rust reference is invalidated by a protection change.
        unsafe { rustix::mm::mprotect((self.base + off) as *mut _, len, prot.mflags()) }?;
        Ok(())
    }

    /// Replaces `off..off + len` with a fresh anonymous mapping of protection `prot` (MAP_FIXED).
    ///
    /// This drops the pages *and* any userfaultfd registration of the range. Never use it on a
    /// range that must stay registered (an access in between is silently zero-filled): hetmem
    /// uses it only to create a mapping in a never-registered part of a reservation, and to
    /// unmap (after which accesses must fault with SIGSEGV, as they do on PROT_NONE).
    pub fn remap_fresh(&self, off: usize, len: usize, prot: Prot) -> io::Result<()> {
        self.check(off, len)?;
        // SAFETY: MAP_FIXED over a range of this region only (checked); its memory is accessed
        // only through raw copies, so no Rust object is invalidated.
        unsafe {
            rustix::mm::mmap_anonymous(
                (self.base + off) as *mut _,
                len,
                prot.flags(),
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
            )
        }?;
        self.advise(off, len, Advice::LinuxDontFork)
    }

    /// Gives up `off..off + len`: the program unmapped it (or moved it away) and may map memory
    /// of its own there, which the region's drop must leave alone.
    pub fn disown(&mut self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        self.disowned.push((off, len));
        Ok(())
    }

    /// Touches every page of `off..off + len` for writing (`MADV_POPULATE_WRITE`).
    pub fn populate(&self, off: usize, len: usize) -> io::Result<()> {
        self.advise(off, len, Advice::LinuxPopulateWrite)
    }
}

impl Region {
    /// Replaces `off..off + len` with a mapping of `fd` at `file_off` (`MAP_SHARED`, or
    /// `MAP_PRIVATE` when `!shared`), not inherited across fork. As [`Region::remap_fresh`]:
    /// only over a never-registered part of the region.
    pub fn map_fd(
        &self,
        off: usize,
        len: usize,
        prot: Prot,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        shared: bool,
    ) -> io::Result<()> {
        self.check(off, len)?;
        let kind = if shared {
            MapFlags::SHARED
        } else {
            MapFlags::PRIVATE
        };
        // SAFETY: MAP_FIXED over a range of this region only (checked); its memory is accessed
        // only through raw copies, so no Rust object is invalidated.
        unsafe {
            rustix::mm::mmap(
                (self.base + off) as *mut _,
                len,
                prot.flags(),
                kind | MapFlags::FIXED,
                fd,
                file_off,
            )
        }?;
        self.advise(off, len, Advice::LinuxDontFork)
    }
}

impl Region {
    /// Lets a child process inherit `off..off + len` (`MADV_DOFORK`): for a shared mapping of a
    /// memfd (shared anonymous memory), which a child then maps as the kernel's own shared
    /// memory (not served by hetmem: the userfaultfd registration is not inherited).
    pub fn inherit_on_fork(&self, off: usize, len: usize) -> io::Result<()> {
        self.advise(off, len, Advice::LinuxDoFork)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.owned {
            // Adopted: the program's memory, given back as it is.
            return;
        }
        let mut gone = std::mem::take(&mut self.disowned);
        gone.sort_unstable();
        let mut at = 0;
        for (off, len) in gone.into_iter().chain([(self.len, 0)]) {
            if off > at {
                // SAFETY: the region owns `at..off` (type invariant; disowned parts are
                // skipped); nothing refers to it any more.
                let _ = unsafe { rustix::mm::munmap((self.base + at) as *mut _, off - at) };
            }
            at = at.max(off + len);
        }
    }
}

/// The calling thread's stack, `lo..hi`, if found. The main thread's is the mapping of `maps`
/// (the text of `/proc/self/maps`) that holds the stack pointer: its `[stack]`, which grows down
/// and merges with no other mapping. Not `pthread_getattr_np` there: for the main thread the C
/// library reads `/proc/self/maps` with stdio, allocating from its `malloc` heap, which the
/// program's own heap overflow may have broken by then (the kernel's hmm-tests `snapshot` case:
/// a device reads a page back into a 7-byte buffer) and which the C API, with an allocator of
/// its own, otherwise never touches. Another thread's stack, which may merge with an adjacent
/// mapping of the same protection in `maps`, comes from `pthread_getattr_np` (the thread's
/// descriptor).
fn current_stack(maps: &str) -> Option<(usize, usize)> {
    if rustix::thread::gettid().as_raw_nonzero() != rustix::process::getpid().as_raw_nonzero() {
        return thread_stack();
    }
    let probe = 0u8;
    let sp = std::hint::black_box(&probe) as *const u8 as usize;
    maps.lines().find_map(|line| {
        let range = line.split_ascii_whitespace().next()?;
        let (s, e) = range.split_once('-')?;
        let (s, e) = (
            usize::from_str_radix(s, 16).ok()?,
            usize::from_str_radix(e, 16).ok()?,
        );
        (s <= sp && sp < e).then_some((s, e))
    })
}

/// The calling (not main) thread's stack, `lo..hi` (`pthread_getattr_np`), if the C library
/// tells.
fn thread_stack() -> Option<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_getattr_np initialises `attr` for the calling thread (on success only,
    // checked); pthread_attr_getstack reads it into two plain out-values; the attribute object
    // is destroyed once read. No memory other than these locals is touched.
    unsafe {
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return None;
        }
        let mut addr = std::ptr::null_mut();
        let mut size = 0usize;
        let r = libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        (r == 0).then(|| (addr as usize, addr as usize + size))
    }
}

/// A part of an adopted range with one protection: `(start, end, protection)`.
pub type AdoptedPiece = (usize, usize, Prot);

impl Region {
    /// Adopts `len` bytes at `base`, memory the program mapped itself, as a region that is not
    /// unmapped on drop. The range must be page-aligned, non-empty, and wholly covered by
    /// anonymous private mappings, readable (`/proc/self/maps`: no file, not shared, not the
    /// stack or a special mapping; `[heap]` and named anonymous memory are fine; not the calling
    /// thread's stack — other threads' stacks cannot be told from other anonymous memory, and
    /// must not be adopted): EINVAL otherwise, EACCES for memory that cannot be read. Returns
    /// the region and its pieces by protection (`start`, `end`, read-only or read-write), in
    /// order.
    pub fn adopt(base: usize, len: usize) -> io::Result<(Region, Vec<AdoptedPiece>)> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        if len == 0 || !base.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(einval());
        }
        let end = base.checked_add(len).ok_or_else(einval)?;
        // The calling thread's stack (threads' stacks are plain anonymous mappings in
        // /proc/self/maps: this one, at least, is recognised).
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        if let Some((lo, hi)) = current_stack(&maps)
            && base < hi
            && lo < end
        {
            return Err(einval());
        }
        let mut covered = base;
        let mut pieces: Vec<AdoptedPiece> = Vec::new();
        for line in maps.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let name = f.next().unwrap_or("");
            let Some((s, e)) = range.split_once('-') else {
                continue;
            };
            let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
            else {
                continue;
            };
            if e <= covered || s >= end {
                continue;
            }
            // A gap before this mapping: part of the range is not mapped.
            if s > covered {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            let anonymous =
                inode == "0" && (name.is_empty() || name == "[heap]" || name.starts_with("[anon:"));
            let p = perms.as_bytes();
            if !anonymous || p.len() < 4 || p[3] != b'p' {
                return Err(einval());
            }
            let this = match (p[0], p[1]) {
                (b'r', b'w') => Prot::ReadWrite,
                (b'r', b'-') => Prot::Read,
                _ => return Err(io::Error::from_raw_os_error(libc::EACCES)),
            };
            // One piece per protection (the program may have protected parts differently).
            let (ps, pe) = (s.max(base), e.min(end));
            match pieces.last_mut() {
                Some(last) if last.2 == this && last.1 == ps => last.1 = pe,
                _ => pieces.push((ps, pe, this)),
            }
            covered = e;
            if covered >= end {
                break;
            }
        }
        if covered < end {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok((
            Region {
                base,
                len,
                owned: false,
                disowned: Default::default(),
            },
            if pieces.is_empty() {
                return Err(einval());
            } else {
                pieces
            },
        ))
    }

    /// Whether this region was adopted ([`Region::adopt`]): the program's memory.
    pub fn is_adopted(&self) -> bool {
        !self.owned
    }

    /// Whether a page of `off..off + len` (at most 2 MiB) may be mapped by another process too:
    /// every page present and exclusively mapped (pagemap bits 63 and 56) says no; anything
    /// else (a page shared copy-on-write with a forked child, or swapped out, whose sharing
    /// pagemap does not tell) says yes. Allocates nothing (a fault path asks).
    pub fn range_shared(&self, off: usize, len: usize) -> io::Result<bool> {
        self.check(off, len)?;
        let f = rustix::fs::open(
            c"/proc/self/pagemap",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let mut e = [0u8; 4096];
        let n = (len / PAGE_SIZE).min(512) * 8;
        let got = rustix::io::pread(&f, &mut e[..n], ((self.base + off) / PAGE_SIZE * 8) as u64)?;
        if got != n {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(e[..n].chunks_exact(8).any(|w| {
            let e = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
            !(e >> 63 & 1 == 1 && e >> 56 & 1 == 1)
        }))
    }

    /// For each page of `off..off + len` of this region: whether it holds data (present, or
    /// swapped out, not a marker: [`pagemap_holds_data`]), from `/proc/self/pagemap`. A page
    /// that holds none reads zeros.
    pub fn pages_with_data(&self, off: usize, len: usize) -> io::Result<Vec<bool>> {
        use std::os::unix::fs::FileExt;
        self.check(off, len)?;
        let n = len / PAGE_SIZE;
        let mut raw: Vec<u8> = Vec::new();
        raw.try_reserve_exact(n * 8)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        raw.resize(n * 8, 0);
        let f = std::fs::File::open("/proc/self/pagemap")?;
        f.read_exact_at(&mut raw, ((self.base + off) / PAGE_SIZE * 8) as u64)?;
        let mut out = Vec::new();
        out.try_reserve_exact(n)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        out.extend(
            raw.chunks_exact(8)
                .map(|w| pagemap_holds_data(u64::from_ne_bytes(w.try_into().expect("8 bytes")))),
        );
        Ok(out)
    }
}

/// A read-only `MAP_SHARED` mapping of a regular file by the kernel itself (its page cache, its
/// fault-around and readahead): the baseline of hetmem's file mappings in `hetmem bench`. It is a
/// [`Region`] (owned, unmapped on drop, read through raw copies; unlike `Region::new`, not
/// `MADV_DONTFORK`) that offers only the reads.
///
/// The file must stay at least `len` bytes long while the mapping lives: as with any `mmap`, an
/// access past the end of file raises SIGBUS (which kills the process; it is not memory unsafety).
#[derive(Debug)]
pub struct MappedFile(Region);

/// Maps the first `len` bytes (non-zero) of `file` read-only and shared (see [`MappedFile`]).
pub fn map_file_readonly(file: &std::fs::File, len: usize) -> io::Result<MappedFile> {
    if len == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a fresh mapping at an address of the kernel's choosing aliases no Rust object; it is
    // read-only and only ever read through raw copies (no reference to its bytes is formed, so
    // writes to the file by others cannot invalidate one).
    let raw = unsafe {
        rustix::mm::mmap(
            ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::SHARED,
            file,
            0,
        )
    }?;
    Ok(MappedFile(Region {
        base: raw as usize,
        len,
        owned: true,
        disowned: Default::default(),
    }))
}

impl MappedFile {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the mapping is empty (never: mappings have a non-zero length).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping (a raw copy; the first access to a
    /// page faults into the kernel, which reads the file if it must).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> io::Result<()> {
        self.0.read(off, dst)
    }

    /// Volatile load of a `u64` at `off` (8-byte aligned).
    pub fn load_u64(&self, off: usize) -> io::Result<u64> {
        self.0.load_u64(off)
    }

    /// Tells the kernel how the mapping will be read (`madvise`: `MADV_NORMAL`, `MADV_RANDOM`
    /// or `MADV_SEQUENTIAL`), which sets its read-around on faults.
    pub fn advise(&self, access: FileAccess) -> io::Result<()> {
        let advice = match access {
            FileAccess::Normal => Advice::Normal,
            FileAccess::Random => Advice::Random,
            FileAccess::Sequential => Advice::Sequential,
        };
        self.0.advise(0, self.0.len, advice)
    }

    /// How many of the mapping's pages are in the kernel's page cache (`mincore`).
    pub fn resident_pages(&self) -> io::Result<usize> {
        let mut vec = vec![0u8; self.0.len.div_ceil(PAGE_SIZE)];
        // SAFETY: `base..base + len` is this live mapping (page-aligned base) and `vec` holds one
        // byte per page of it; mincore writes only into `vec` and changes no mapping.
        let r = unsafe { libc::mincore(self.0.base as *mut _, self.0.len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
    }
}

/// An access pattern for [`MappedFile::advise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAccess {
    /// `MADV_NORMAL`: the kernel's default read-around.
    Normal,
    /// `MADV_RANDOM`: no read-around (each fault reads its own page).
    Random,
    /// `MADV_SEQUENTIAL`: aggressive readahead.
    Sequential,
}

impl Region {
    /// Asks for transparent huge pages on the whole region (`MADV_HUGEPAGE`; an error where the
    /// kernel has no THP).
    pub fn advise_hugepage(&self) -> io::Result<()> {
        self.advise(0, self.len, Advice::LinuxHugepage)
    }

    /// `MADV_HUGEPAGE` on `off..off + len` only.
    pub fn advise_hugepage_at(&self, off: usize, len: usize) -> io::Result<()> {
        self.advise(off, len, Advice::LinuxHugepage)
    }
}

impl Region {
    /// Copies `dst.len()` bytes at `off` out of the region *without faulting*: through the
    /// kernel (`process_vm_readv` on this process), so that a page that is not there stops the
    /// copy instead of faulting. Only for ranges whose userfaultfd answers kernel accesses to
    /// missing pages with an error (`UFFD_FEATURE_SIGBUS` or user-mode-only), never one a
    /// handler thread serves (the kernel access would wait for it). Returns the bytes copied:
    /// all of them, or fewer when a page is missing; an error when the kernel refuses the call.
    pub fn read_nofault(&self, off: usize, dst: &mut [u8]) -> io::Result<usize> {
        self.vm_copy(off, dst.as_mut_ptr(), dst.len(), false)
    }

    /// Copies `src` into the region at `off` without faulting (see [`Region::read_nofault`]):
    /// the copy stops at a page that is not there, or write-protected.
    pub fn write_nofault(&self, off: usize, src: &[u8]) -> io::Result<usize> {
        self.vm_copy(off, src.as_ptr().cast_mut(), src.len(), true)
    }

    /// `process_vm_readv` (or `writev` when `write`) of `len` bytes between `local` and the
    /// region at `off`, on this process.
    fn vm_copy(&self, off: usize, local: *mut u8, len: usize, write: bool) -> io::Result<usize> {
        self.check(off, len)?;
        let local = libc::iovec {
            iov_base: local.cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: (self.base + off) as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: `local` describes a caller's buffer of `len` bytes (exclusively borrowed when
        // the kernel writes it: `read_nofault`'s `&mut`; only read otherwise); `remote` a range
        // of this region (checked), which the kernel reads or writes as another process would
        // (no reference is formed; a missing page ends the copy, it does not fault this thread).
        let n = unsafe {
            if write {
                libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0)
            } else {
                libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0)
            }
        };
        match n {
            n if n < 0 => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EFAULT) => Ok(0),
                e => Err(e),
            },
            n => Ok(n as usize),
        }
    }
}
