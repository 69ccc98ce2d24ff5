//! memfd (the page cache's staging memory) and `PAGEMAP_SCAN` (dirty tracking).

#![allow(unsafe_code)]

use super::*;

/// A memfd: the staging store of hetmem's page cache (file pages at their file offsets).
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
}

/// The selected value of a kernel setting file that lists its choices with the selected one in
/// brackets (`always [madvise] never`).
pub fn selected_setting(contents: &str) -> Option<&str> {
    let open = contents.find('[')?;
    let close = contents[open..].find(']')? + open;
    Some(&contents[open + 1..close])
}

/// The selected value of `/sys/kernel/mm/transparent_hugepage/<name>` (e.g. `enabled`,
/// `hugepages-2048kB/enabled`), if the kernel has it.
pub fn thp_setting(name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{name}")).ok()?;
    selected_setting(&s).map(str::to_string)
}

/// Whether anonymous memory advised `MADV_HUGEPAGE` can get 2 MiB transparent huge pages here:
/// the 2 MiB size's own setting, or the global one where it inherits, is not `never`.
pub fn anon_huge_pages_offered() -> bool {
    let global = thp_setting("enabled");
    let size = match thp_setting("hugepages-2048kB/enabled") {
        Some(s) if s == "inherit" => global,
        None => global,
        s => s,
    };
    size.is_some_and(|s| s != "never")
}

/// Why memfds of this system may get large folios (the kernel's `shmem_enabled` settings for
/// its internal tmpfs mount, which memfds live on), if they may; `None` when they hold base
/// pages only, as hetmem's page cache needs.
///
/// hetmem's cache learns that a CPU access reached a page it has not filled (or has taken to
/// device memory) from userfaultfd's MISSING fault, which the kernel raises only where the
/// memfd holds no page. A write of one page into a memfd whose writes may allocate a large
/// folio (`always`, `within_size`, `force`) creates the whole folio, zeros around the written
/// bytes: the other pages are then present, and a mapping reads those zeros without a fault
/// instead of the file's bytes (measured on this VM with `within_size`: a sweep of a 256 MiB
/// file through a mapping read other bytes than the file's). `advise` gives large folios only
/// to mappings advised `MADV_HUGEPAGE`, which hetmem never asks for on its caches.
pub fn shmem_large_folios() -> Option<String> {
    let base = "/sys/kernel/mm/transparent_hugepage";
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let top = read(&format!("{base}/shmem_enabled"));
    let mut sizes = Vec::new();
    if let Ok(dir) = std::fs::read_dir(base) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("hugepages-")
                && let Some(v) = read(&format!("{base}/{name}/shmem_enabled"))
            {
                sizes.push((name, v));
            }
        }
    }
    shmem_large_folios_in(top.as_deref(), &sizes)
}

/// [`shmem_large_folios`] from the settings' contents: the top-level `shmem_enabled` and each
/// `hugepages-<size>/shmem_enabled` (the selected value is in brackets).
pub fn shmem_large_folios_in(top: Option<&str>, sizes: &[(String, String)]) -> Option<String> {
    let selected = selected_setting;
    let writes_huge = |v: &str| matches!(v, "always" | "within_size" | "force");
    let top = top.and_then(selected);
    if let Some(t) = top
        && writes_huge(t)
    {
        return Some(format!(
            "/sys/kernel/mm/transparent_hugepage/shmem_enabled is `{t}`: memfds get large \
             folios, which hetmem's page cache cannot track page by page (set it to `never` \
             or `advise`)"
        ));
    }
    for (name, v) in sizes {
        if let Some(v) = selected(v)
            && (writes_huge(v) || (v == "inherit" && top.is_some_and(writes_huge)))
        {
            return Some(format!(
                "/sys/kernel/mm/transparent_hugepage/{name}/shmem_enabled is `{v}`: memfds get \
                 large folios, which hetmem's page cache cannot track page by page (set it to \
                 `never`, `advise` or `inherit` with the top level `never`)"
            ));
        }
    }
    None
}

impl Memfd {
    /// A new, empty memfd (not inherited across exec).
    pub fn new(name: &str) -> io::Result<Memfd> {
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
        Ok(Memfd { fd })
    }

    /// Sets its size.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        rustix::fs::ftruncate(&self.fd, len)?;
        Ok(())
    }

    /// Reads at `off` until `buf` is full or the end (returns the bytes read).
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(&self.fd, &mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Reads up to `len` bytes at `off` straight into `dst[dst_off..dst_off + len]` (a region of
    /// hetmem's own, never a managed address), without a staging buffer; returns the bytes read
    /// (short at the end of the memfd).
    pub fn read_into_region(
        &self,
        off: u64,
        dst: &Region,
        dst_off: usize,
        len: usize,
    ) -> io::Result<usize> {
        dst.check(dst_off, len)?;
        let mut done = 0;
        while done < len {
            let p = (dst.base + dst_off + done) as *mut libc::c_void;
            // SAFETY: `p..p + len - done` lies inside `dst`'s live mapping (checked above); the
            // kernel writes into it like any memory copy (a region of hetmem's own, which no Rust
            // reference covers: it is accessed through raw copies only).
            let n = unsafe {
                libc::pread(
                    self.fd.as_raw_fd(),
                    p,
                    len - done,
                    (off + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => break,
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Writes all of `buf` at `off`.
    pub fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pwrite(&self.fd, &buf[done..], off + done as u64) {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Where the memfd next holds a page at or after `off` (`SEEK_DATA`): `off` itself when it
    /// holds one there, `None` when it holds none from `off` on.
    pub fn data_from(&self, off: u64) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.fd, rustix::fs::SeekFrom::Data(off)) {
            Ok(at) => Ok(Some(at)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the memfd holds the page at `off` in any form: in memory (written, or only
    /// allocated by `fallocate`) or swapped out (`cachestat(2)`, Linux 6.5: its cached and
    /// evicted counts). An error where the kernel has no `cachestat` (ENOSYS).
    pub fn holds_page(&self, off: u64) -> io::Result<bool> {
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let r = Range {
            off,
            len: super::PAGE_SIZE as u64,
        };
        let mut c = Stat::default();
        // SAFETY: cachestat(fd, range, out, flags) reads one `struct cachestat_range` and writes
        // one `struct cachestat`, both `repr(C)` locals with the kernel's layout (five and two
        // u64s); flags must be 0. It changes nothing.
        let n = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.fd.as_raw_fd(),
                &r as *const Range,
                &mut c as *mut Stat,
                0u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(c.nr_cache + c.nr_evicted > 0)
    }

    /// Frees `off..off + len` (`FALLOC_FL_PUNCH_HOLE | KEEP_SIZE`): the bytes read as zeros and
    /// their memory is returned.
    pub fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(
            &self.fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            off,
            len,
        )?;
        Ok(())
    }
}

/// `PAGEMAP_SCAN` on `/proc/self/pagemap`: which pages of a range with asynchronous
/// write-protect were written since they were last protected.
#[derive(Debug)]
pub struct PagemapScanner {
    fd: OwnedFd,
}

const OP_PAGEMAP_SCAN: u64 = opcode::read_write::<uapi::pm_scan_arg>(b'f', 16) as u64;

impl PagemapScanner {
    /// Opens `/proc/self/pagemap`.
    pub fn new() -> io::Result<PagemapScanner> {
        let fd = rustix::fs::open(
            "/proc/self/pagemap",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(PagemapScanner { fd })
    }

    /// The written pages of `start..end` (as address ranges), write-protecting them again
    /// (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category `PAGE_IS_WRITTEN`).
    pub fn written_and_reprotect(
        &self,
        start: usize,
        end: usize,
    ) -> io::Result<Vec<(usize, usize)>> {
        self.scan(
            start,
            end,
            (uapi::PM_SCAN_WP_MATCHING | uapi::PM_SCAN_CHECK_WPASYNC) as u64,
            uapi::PAGE_IS_WRITTEN as u64,
        )
    }

    /// The parts of `start..end` that the kernel maps with large page-table entries
    /// (`PAGE_IS_HUGE`: a PMD-mapped transparent huge page, or hugetlb), as address ranges.
    /// Scans only: nothing is protected.
    pub fn huge_mapped(&self, start: usize, end: usize) -> io::Result<Vec<(usize, usize)>> {
        self.scan(start, end, 0, uapi::PAGE_IS_HUGE as u64)
    }

    /// The ranges of `start..end` whose pages are in every category of `category` (as address
    /// ranges), scanned with `flags` (`PAGEMAP_SCAN`, 512 ranges per call until the walk ends).
    fn scan(
        &self,
        start: usize,
        end: usize,
        flags: u64,
        category: u64,
    ) -> io::Result<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        let mut regions = vec![
            uapi::page_region {
                start: 0,
                end: 0,
                categories: 0
            };
            512
        ];
        let mut s = start;
        while s < end {
            let mut a = uapi::pm_scan_arg {
                size: std::mem::size_of::<uapi::pm_scan_arg>() as u64,
                flags,
                start: s as u64,
                end: end as u64,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: category,
                category_anyof_mask: 0,
                return_mask: category,
            };
            // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` whose `vec` points at
            // `regions.len()` writable `page_region`s, which `regions` is; it reads page tables
            // of this process and, with PM_SCAN_WP_MATCHING (`written_and_reprotect` only),
            // write-protects what it matches.
            let n = unsafe { libc::ioctl(self.fd.as_raw_fd(), OP_PAGEMAP_SCAN as _, &mut a) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for r in &regions[..n as usize] {
                out.push((r.start as usize, r.end as usize));
            }
            if a.walk_end as usize <= s {
                break;
            }
            s = a.walk_end as usize;
        }
        Ok(out)
    }
}

impl Memfd {
    /// The fd (to map it).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Memfd {
    /// Allocates `off..off + len` (`fallocate` with `KEEP_SIZE`): holes get zeroed pages, pages
    /// already there keep their bytes (nothing is written). A mapping of the memfd registered
    /// for MISSING faults then maps those pages without faulting.
    pub fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.fd, rustix::fs::FallocateFlags::KEEP_SIZE, off, len)?;
        Ok(())
    }
}

/// `mlock2(addr, len, MLOCK_ONFAULT)` on part of a hetmem reservation, for tests of how hetmem
/// behaves when the user locks some of its memory (`MADV_DONTNEED` is refused there).
/// `testing` feature.
#[cfg(feature = "testing")]
pub fn mlock_onfault(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock2 changes no memory contents; the range is the caller's managed memory.
    unsafe { rustix::mm::mlock_with(addr as *mut _, len, rustix::mm::MlockFlags::ONFAULT) }?;
    Ok(())
}

/// `munlock(addr, len)` (`testing` feature).
#[cfg(feature = "testing")]
pub fn munlock(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: munlock changes no memory contents.
    unsafe { rustix::mm::munlock(addr as *mut _, len) }?;
    Ok(())
}
