//! hetmem's error type: one variant per meaning, each with the fields that explain it, and the
//! errno the kernel's HMM code would return for it ([`Error::errno`]).

use crate::addr::{PAGE_SIZE, VaRange, VirtAddr};

/// Errors returned by hetmem's API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An address that must be page-aligned is not (EINVAL).
    #[error("address {addr} is not page-aligned")]
    Unaligned {
        /// The address.
        addr: VirtAddr,
    },
    /// A length that must be a multiple of the page size is not (EINVAL).
    #[error("length {len:#x} is not a multiple of the page size")]
    UnalignedLength {
        /// The length.
        len: usize,
    },
    /// A zero length (EINVAL).
    #[error("length is zero")]
    ZeroLength,
    /// `addr + len` overflows (EINVAL).
    #[error("range at {addr} of {len:#x} bytes overflows the address space")]
    Overflow {
        /// Start.
        addr: VirtAddr,
        /// Length.
        len: usize,
    },
    /// Part of the range is not mapped (EFAULT): outside any mapping, or across a hole.
    #[error("no mapping at {addr}")]
    NotMapped {
        /// First unmapped address.
        addr: VirtAddr,
    },
    /// A device access to a page of a file mapping past the end of the file (EFAULT; a CPU
    /// access there gets SIGBUS, as with the kernel's mmap).
    #[error("{addr} is past the end of the mapped file")]
    PastEndOfFile {
        /// The page's address.
        addr: VirtAddr,
    },
    /// The range is outside the address space's reservation (EINVAL).
    #[error("range at {addr} of {len:#x} bytes is outside the address space")]
    OutOfSpace {
        /// Start.
        addr: VirtAddr,
        /// Length.
        len: usize,
    },
    /// The range overlaps an existing mapping (EEXIST).
    #[error("range at {addr} overlaps an existing mapping")]
    Overlap {
        /// Start of the requested range.
        addr: VirtAddr,
    },
    /// A read was requested on a mapping without read permission (EFAULT, as hmm_range_fault).
    #[error("no read permission at {addr}")]
    NoRead {
        /// The address.
        addr: VirtAddr,
    },
    /// A write was requested on a mapping without write permission (EPERM).
    #[error("no write permission at {addr}")]
    NoWrite {
        /// The address.
        addr: VirtAddr,
    },
    /// The notifier sequence changed, or a page is busy: retry (EBUSY).
    #[error("busy: retry")]
    Busy,
    /// A device (or the address space's reservation) is out of memory (ENOMEM).
    #[error("{what} is out of memory")]
    NoMemory {
        /// Which allocator.
        what: &'static str,
    },
    /// Pages that should be in device memory are not (ENOENT), e.g. after a migration that
    /// could not move every page.
    #[error("page at {addr} is not where it was asked to be")]
    NotPresent {
        /// First such page.
        addr: VirtAddr,
    },
    /// Device-exclusive (atomic) entries remain (EPERM from CHECK_EXCLUSIVE).
    #[error("device-exclusive entries remain")]
    ExclusiveRemains,
    /// A size asked for is beyond what hetmem or the system supports (EINVAL): a device's
    /// capacity, an address space's size, a mapping's length.
    #[error("{what} of {requested:#x} bytes is too large (at most {limit:#x})")]
    TooLarge {
        /// What was sized.
        what: &'static str,
        /// The size asked for.
        requested: u64,
        /// The largest supported.
        limit: u64,
    },
    /// A write or extension would make a file larger than its file system allows (EFBIG).
    #[error("file would grow to {end:#x} bytes, past the file system's largest file")]
    FileTooLarge {
        /// The end the operation would reach.
        end: u64,
    },
    /// A file range that no file offset can address (EOVERFLOW): `offset + len` past the
    /// largest `off_t`.
    #[error("file range at {offset:#x} of {len:#x} bytes is past the largest file offset")]
    FileRange {
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
    },
    /// A path that must name a regular file does not (EINVAL): a FIFO, a directory, a device.
    #[error("{path}: not a regular file")]
    NotRegularFile {
        /// The path.
        path: std::path::PathBuf,
    },
    /// Opening a file failed (ENOENT, EACCES, ...).
    #[error("open {path}: {source}")]
    Open {
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file page cannot move to device-private memory: it lies in a writable shared mapping
    /// that does not intercept stores, where a CPU store cannot be held off while the page
    /// moves (EBUSY). Map it with `FileMapOptions::intercept_stores`, or read-only.
    #[error(
        "file page {page} is in a writable shared mapping that does not intercept stores; \
         map it with intercept_stores (or read-only) to place it in device-private memory"
    )]
    StoresNotIntercepted {
        /// The file page.
        page: u64,
    },
    /// A file page's data was lost to a memory failure (EIO): the page was dirty when its memory
    /// was poisoned, so no copy of its latest bytes exists. Reads of it, device accesses to it
    /// and writes of part of it fail until a truncate or hole punch removes it or a write
    /// replaces it whole (see docs/filesystem-contract.md, "memory failure").
    #[error("file page {page} lost its data to a memory failure")]
    MemoryFailure {
        /// The file page.
        page: u64,
    },
    /// Invalid argument not covered by a more precise variant (EINVAL).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The system is set up in a way hetmem cannot serve correctly (ENOTSUP): what, and the
    /// setting to change.
    #[error("unsupported system setting: {0}")]
    Unsupported(String),
    /// hetmem is inert in a child process: the address space belongs to the parent (EINVAL).
    #[error("hetmem objects are inert in a forked child (created by pid {owner})")]
    Forked {
        /// The pid that created the object.
        owner: i32,
    },
    /// The address space or device is gone (EINVAL, as dmirror's "mm is gone").
    #[error("the address space is gone")]
    Gone,
    /// A CPU access made through [`crate::Space::cpu_read`], `cpu_write`, `load_u32`,
    /// `store_u32` or `fetch_add_u64` of a space over the in-memory kernel model
    /// (`Space::new_model`, with the `testing` feature) ended with a signal (EFAULT): `SIGBUS`
    /// when hetmem did not serve its fault (past the end of a file mapping, a fill that failed),
    /// `SIGSEGV` when nothing is mapped there or the protection forbids it. Over the real kernel
    /// the thread gets the signal itself.
    #[error("the CPU access at {addr} ended with signal {signo}")]
    Signal {
        /// The page the access faulted on.
        addr: VirtAddr,
        /// The signal number.
        signo: i32,
    },
    /// An operating system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What hetmem was doing.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The errno the kernel's HMM code returns for this condition (positive).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Unaligned { .. }
            | Error::UnalignedLength { .. }
            | Error::ZeroLength
            | Error::Overflow { .. }
            | Error::OutOfSpace { .. }
            | Error::Invalid(_)
            | Error::TooLarge { .. }
            | Error::NotRegularFile { .. }
            | Error::Forked { .. }
            | Error::Gone => libc::EINVAL,
            Error::NotMapped { .. }
            | Error::NoRead { .. }
            | Error::Signal { .. }
            | Error::PastEndOfFile { .. } => libc::EFAULT,
            Error::Overlap { .. } => libc::EEXIST,
            Error::NoWrite { .. } | Error::ExclusiveRemains => libc::EPERM,
            Error::Busy | Error::StoresNotIntercepted { .. } => libc::EBUSY,
            Error::NoMemory { .. } => libc::ENOMEM,
            Error::NotPresent { .. } => libc::ENOENT,
            Error::FileTooLarge { .. } => libc::EFBIG,
            Error::FileRange { .. } => libc::EOVERFLOW,
            Error::MemoryFailure { .. } => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Os { source, .. } | Error::Open { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }

    pub(crate) fn os(op: &'static str, source: std::io::Error) -> Error {
        Error::Os { op, source }
    }

    /// A userfaultfd ioctl's failure at `addr`: ENOENT (no registered mapping there: the
    /// program unmapped the range behind hetmem's back, and the unmap is not followed yet) is
    /// [`Error::NotMapped`], as once it is followed; any other error is [`Error::Os`] (found
    /// from outside: a device command over a range the program had just unmapped returned
    /// `Os { op: "zero-fill", ENOENT }`).
    pub(crate) fn uffd(op: &'static str, e: crate::sys::UffdError, addr: VirtAddr) -> Error {
        match e {
            crate::sys::UffdError::Os(libc::ENOENT) => Error::NotMapped { addr },
            e => Error::Os {
                op,
                source: e.into(),
            },
        }
    }
}

// `VaRange`'s checked constructor lives here rather than in `addr`, which is below this module
// (the variants above hold addresses): it returns an `Error`.
impl VaRange {
    /// Validates `start` and `len`: page-aligned start, non-zero page-multiple length, no
    /// overflow.
    pub fn new(start: VirtAddr, len: usize) -> Result<VaRange> {
        if !start.is_page_aligned() {
            return Err(Error::Unaligned { addr: start });
        }
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedLength { len });
        }
        let end = start
            .checked_add(len)
            .ok_or(Error::Overflow { addr: start, len })?;
        Ok(VaRange { start, end })
    }
}

/// A vector of `n` copies of `v`, allocated fallibly: a size that comes from a caller never
/// aborts the process (`what` names the allocation in the error).
pub(crate) fn try_vec<T: Clone>(n: usize, v: T, what: &'static str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| Error::NoMemory { what })?;
    out.resize(n, v);
    Ok(out)
}

/// hetmem's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A userfaultfd ioctl's ENOENT (the program unmapped the range, not followed yet) is the
    /// same typed error as once the unmap is followed; other errors keep their errno and step.
    #[test]
    fn a_userfaultfd_enoent_is_not_mapped() {
        let a = VirtAddr(0x7f00_0000_0000);
        assert!(matches!(
            Error::uffd("zero-fill", crate::sys::UffdError::Os(libc::ENOENT), a),
            Error::NotMapped { addr } if addr == a
        ));
        match Error::uffd("zero-fill", crate::sys::UffdError::Os(libc::ENOMEM), a) {
            Error::Os { op, source } => {
                assert_eq!(op, "zero-fill");
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
            }
            e => panic!("{e:?}"),
        }
    }
}
