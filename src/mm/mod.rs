//! The kernel boundary: what hetmem's core asks of the operating system for the CPU's view of
//! an address space, behind one trait ([`Mm`]) with two implementations:
//!
//! * [`KernelMm`]: the real one. A reserved range of anonymous private memory; mappings are
//!   carved out of it and registered with a userfaultfd (MISSING and WP modes). Faults are
//!   served in the faulting thread (SIGBUS mode) or by a handler thread (thread mode), chosen per
//!   mapping ([`FaultMode`]).
//! * `ModelMm`: an in-memory model of the same contract (mappings with their protections,
//!   present anonymous pages with a write-protect bit, and file mappings of a page cache's memfd
//!   with the kernel's MISSING faults, asynchronous and synchronous write-protect, `PAGEMAP_SCAN`
//!   and SIGBUS past the end of file). CPU accesses through it call the core's fault handler
//!   directly and return the signal an access ends with, so the core's state machine, the page
//!   cache's included, can be explored under `shuttle`, which cannot drive userfaultfd or
//!   signals. A test double: only with the `testing` feature (and in the unit-test build).
//!
//! # The contract
//!
//! The CPU view holds, per page, either nothing (an access faults into the core) or a present
//! page, which may be write-protected (a store faults into the core). Only the core changes
//! which: `install` fills missing pages (never overwriting a present one), `zap` drops pages,
//! `write_protect` sets or clears the write-protect bit. `read`/`write`/`copy_to` are hetmem's
//! own accesses and are only ever made to pages the core knows to be present (a missing page
//! would fault into the core while it holds its lock).
//!
//! # Device-private pages in pagemap
//!
//! The kernel leaves a device-private swap entry where a page went to device-private memory:
//! `/proc/self/pagemap` reports it swapped out (`PM_SWAP`), not present. hetmem's page there is
//! simply missing, which pagemap reports as neither. A space that asks for the kernel's answer
//! (`SpaceConfig::device_private_as_swap`; the drop-in test device does, for the kernel's own
//! tests) opens its anonymous userfaultfds with `UFFD_FEATURE_WP_UNPOPULATED`, and a migration
//! to device-private memory write-protects the missing entries it leaves
//! ([`Mm::mark_device_private`]): the kernel installs a userfaultfd-wp marker there, which
//! pagemap reports as `PM_SWAP | PM_UFFD_WP`, not present. Measured on Linux 6.18: an access to
//! a marked page faults as missing; `UFFDIO_COPY` replaces the marker; `UFFDIO_ZEROPAGE` and
//! `UFFDIO_MOVE` refuse it (EEXIST, as over a page), so [`sys::Uffd::zeropage`] copies a page of
//! zeros over a marker and a zeroed huge page's move falls back to a copy; the program's
//! `MADV_DONTNEED` removes markers, its `MADV_FREE` keeps them; a fork's child gets none (its
//! mapping is not registered); an unregister clears them. A marker holds no data: the pagemap
//! reads that tell which pages hold some (adoption, hetmem's raw copies) skip them
//! (`sys::pagemap_holds_data`, which tells them also where the kernel hides the swap entry from
//! a reader without `CAP_SYS_ADMIN`), and the handler thread's zero page over one is a copied
//! page of zeros too. The price: one `UFFDIO_WRITEPROTECT` per run of pages a
//! migration moves to device-private memory (≈ 0.6 µs here), and one per page a fork copied.

use std::io;

use crate::addr::{LARGE_PAGE_SIZE, PAGE_SIZE, VaRange, VirtAddr};
use crate::sync::{Mutex, lock};
use crate::sys::{self, Prot, Region, Uffd, UffdDelivery, UffdError};

/// How CPU faults in a mapping are served; fixed per mapping (a userfaultfd has one mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum FaultMode {
    /// In the faulting thread, from a SIGBUS handler (≈ 5 µs a fault here). A system call that
    /// touches a missing page of the mapping (`read(2)` into it, O_DIRECT, io_uring) fails with
    /// EFAULT instead of being served.
    ///
    /// **A thread that blocks SIGBUS** (`pthread_sigmask`, `sigprocmask`, or a runtime that
    /// masks signals in its worker threads) **is killed by the kernel** when it touches a
    /// device-resident or not-yet-filled page of such a mapping: the kernel cannot deliver the
    /// signal that would serve the fault. Threads that must block SIGBUS should touch only
    /// mappings made with [`FaultMode::Thread`], whose faults are served by a handler thread
    /// and need no signal.
    #[default]
    Signal,
    /// By a handler thread (a wake-up, ≈ 15 µs more). Kernel-mode accesses are served too, when
    /// the userfaultfd is not user-mode-only (root, or `vm.unprivileged_userfaultfd = 1`);
    /// otherwise they fail with EFAULT as in signal mode.
    Thread,
}

/// Which of an address space's userfaultfds a mapping is registered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// An anonymous mapping, a private file mapping or adopted memory, served in this mode.
    Anon(FaultMode),
    /// A shared file mapping with asynchronous write tracking ([`Mm::map_file`]).
    File,
    /// A shared file mapping whose stores fault ([`Mm::map_file_sync`]).
    FileSync,
}

/// The operating-system side of an address space (see the module doc for the contract).
pub trait Mm: Send + Sync {
    /// The reserved range.
    fn reservation(&self) -> VaRange;
    /// Fault injection (the model only): from now on, installs into the pages of `r` fail with
    /// ENOMEM, after the pages before them in the same call are placed (as `UFFDIO_COPY` does),
    /// until called with `None`. Returns false where not supported (the real kernel).
    #[cfg(any(test, feature = "testing"))]
    fn fail_installs(&self, _r: Option<VaRange>) -> bool {
        false
    }
    /// Creates a mapping over a free (never-registered) part of the reservation.
    fn map(&self, r: VaRange, prot: Prot, mode: FaultMode) -> io::Result<()>;
    /// Changes the protection of a mapped range.
    fn protect(&self, r: VaRange, prot: Prot) -> io::Result<()>;
    /// Unmaps a range: its pages are dropped and accesses fault with SIGSEGV. `registered`
    /// lists the mappings inside it and which userfaultfd each is registered with: they are
    /// unregistered first, so that the unmap raises no `UFFD_EVENT_UNMAP` (whose reader would
    /// follow it under the space's lock, which the caller holds).
    fn unmap(&self, r: VaRange, registered: &[(VaRange, Registered)]) -> io::Result<()>;
    /// Unregisters each listed mapping from its userfaultfd (the space is going away: its
    /// reservation's unmap then raises no event).
    fn unregister_all(&self, _registered: &[(VaRange, Registered)]) {}
    /// Fills the missing pages at `dst..dst+len` with the matching bytes of `src[off..off+len]`;
    /// pages already present are left as they are. Ok: every page of the range is populated.
    /// An error may leave part of the range populated; calling again completes it.
    fn install(
        &self,
        dst: VirtAddr,
        src: &Region,
        off: usize,
        len: usize,
        mode: FaultMode,
    ) -> Result<(), UffdError>;
    /// [`Mm::install`], the new pages write-protected at once (a store to them faults into the
    /// core): a fork's copies of device-resident pages, which no store may reach.
    fn install_protected(
        &self,
        dst: VirtAddr,
        src: &Region,
        off: usize,
        len: usize,
        mode: FaultMode,
    ) -> Result<(), UffdError> {
        self.install(dst, src, off, len, mode)?;
        let r = VaRange {
            start: dst,
            end: dst.add(len),
        };
        self.write_protect(r, true, mode)
    }
    /// Maps the shared zero page, write-protected, at the missing pages of `r` (a read fault
    /// on never-written anonymous pages, as the kernel serves it: no memory until a write,
    /// which faults as a write-protect fault); wakes a thread-mode waiter once they are
    /// protected.
    fn map_zero_pages(&self, r: VaRange, mode: FaultMode) -> Result<(), UffdError>;
    /// Drops the pages of `r` (the next access faults).
    fn zap(&self, r: VaRange) -> io::Result<()>;
    /// Marks the missing pages of `r`, whose data is in device-private memory now, where the
    /// space asked for it (`SpaceConfig::device_private_as_swap`): `/proc/self/pagemap` reports
    /// them swapped out (`PM_SWAP`, not present), as it reports the kernel's device-private
    /// entries; an access faults as missing still, and a fill replaces the marker. Every page of
    /// `r` must be missing (a present one would be write-protected). Nothing to do elsewhere.
    fn mark_device_private(&self, r: VaRange, mode: FaultMode) {
        let _ = (r, mode);
    }
    /// How many of hetmem's own drops raised a REMOVE event (the pages could not be moved
    /// out: see `sys::ZapSink`).
    fn zaps_with_event(&self) -> u64 {
        0
    }
    /// Maps the zero page at the missing page `a` of a signal-mode mapping, with no lock taken
    /// (signal context: `sys::FaultTarget::fill_dropped_page`); false if it cannot.
    fn zero_fill_dropped(&self, a: VirtAddr) -> bool {
        let _ = a;
        false
    }
    /// Readies the new anonymous mapping `r` for [`Mm::zero_fill_unit`]: marks it for
    /// transparent huge pages, so that a fault on a unit with no page yet reaches the core
    /// without the kernel making a page table for it (a huge page then fits in whole).
    fn prefer_huge(&self, r: VaRange) {
        let _ = r;
    }
    /// Fills the 2 MiB unit at `dst` (aligned, inside one anonymous mapping, every page
    /// missing) with zeros in one step where the kernel can: a zeroed transparent huge page
    /// moved in whole ([`HugeZero`]). False where it cannot (no `UFFDIO_MOVE`, no transparent
    /// huge pages, a protection the staging buffer does not share, a page there already): the
    /// caller then fills with [`Mm::install`], which steps over any page this call placed.
    fn zero_fill_unit(&self, dst: VirtAddr, mode: FaultMode) -> bool {
        let _ = (dst, mode);
        false
    }
    /// Sets or clears write protection of the present pages of `r` (clearing wakes writers).
    fn write_protect(&self, r: VaRange, on: bool, mode: FaultMode) -> Result<(), UffdError>;
    /// Wakes threads waiting on faults in `r` (thread mode).
    fn wake(&self, r: VaRange, mode: FaultMode);
    /// How many of the `pages` pages from `addr` on the kernel has now, told without touching
    /// them: hetmem's own raw copies under its locks read only those (a page the program
    /// dropped behind hetmem's back would fault).
    fn present_prefix(&self, addr: VirtAddr, pages: usize) -> usize {
        let _ = addr;
        pages
    }
    /// Copies out of the pages of a signal-mode mapping from `addr` on through the kernel, which
    /// stops at a page that is not there (a userfaultfd fault there is an error, not a wait):
    /// the bytes copied, or `None` where the kernel refuses the call (a seccomp filter, ENOSYS).
    /// Safe under hetmem's locks even when the program drops pages concurrently.
    fn read_present(&self, addr: VirtAddr, dst: &mut [u8]) -> Option<usize> {
        let _ = (addr, dst);
        None
    }
    /// Copies out of present pages.
    fn read(&self, addr: VirtAddr, dst: &mut [u8]);
    /// Copies into present, writable pages.
    fn write(&self, addr: VirtAddr, src: &[u8]);
    /// Copies `len` bytes of present pages at `addr` into `dst[off..]`.
    fn copy_to(&self, addr: VirtAddr, dst: &Region, off: usize, len: usize);
    /// A device's copy out of system pages it maps ([`Mm::read`]), which the program may have
    /// dropped behind hetmem's back (a direct `madvise(MADV_DONTNEED)`: no event reports it):
    /// returns the bytes copied, fewer than `dst.len()` when a page is not there (the copy stops
    /// at it), where that can be told without a fault; otherwise as [`Mm::read`].
    fn read_if_there(&self, addr: VirtAddr, dst: &mut [u8]) -> usize {
        self.read(addr, dst);
        dst.len()
    }
    /// The same for a device's store ([`Mm::write`]).
    fn write_if_there(&self, addr: VirtAddr, src: &[u8]) -> usize {
        self.write(addr, src);
        src.len()
    }
    /// A user CPU read (real loads: may fault into the core through `fault`, which returns
    /// false for a fault it does not serve). Only the model returns the [`Signal`] the access
    /// ends with; on the real kernel the thread gets it.
    fn cpu_read(
        &self,
        addr: VirtAddr,
        dst: &mut [u8],
        fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<(), Signal>;
    /// A user CPU write (real stores: may fault into the core through `fault`).
    fn cpu_write(
        &self,
        addr: VirtAddr,
        src: &[u8],
        fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<(), Signal>;
    /// A user CPU atomic fetch-add on an aligned `u64`.
    fn cpu_fetch_add(
        &self,
        addr: VirtAddr,
        v: u64,
        fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<u64, Signal>;
    /// Whether kernel-mode accesses to missing pages fail with EFAULT in every mode.
    fn user_mode_only(&self) -> bool;
    /// Creates a file mapping over a free part of the reservation: `fd` (a page cache's memfd)
    /// at `file_off`, shared or private, registered for MISSING faults (served in the faulting
    /// thread) and asynchronous write-protect (dirty tracking), protected from the start.
    fn map_file(
        &self,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
        shared: bool,
    ) -> io::Result<()>;
    /// As `map_file` for a shared mapping whose stores must be intercepted: synchronous
    /// write-protect, so that the first store to a clean page faults into hetmem (the dirty
    /// bound, and writeback that re-protects before it reads).
    fn map_file_sync(
        &self,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
    ) -> io::Result<()>;
    /// Sets or clears synchronous write protection of part of a `map_file_sync` mapping.
    fn file_write_protect(&self, r: VaRange, on: bool) -> io::Result<()>;
    /// The pages of a file mapping written since the last scan (which re-protects them).
    fn scan_written(&self, r: VaRange) -> io::Result<Vec<VaRange>>;
    /// Starts tracking stores to a file mapping that was mapped without write tracking (a
    /// read-only shared mapping becoming writable): registers asynchronous write-protect and
    /// protects the range.
    fn track_writes(&self, r: VaRange) -> io::Result<()>;
    /// A direct mremap moved a mapping of fault mode `mode` to `moved` (outside the
    /// reservation, or anywhere the program chose): unregisters it, so that it is plain memory
    /// from now on.
    fn forget_moved(&self, moved: VaRange, mode: FaultMode) -> io::Result<()>;
    /// Gives up the range `r` of the reservation, which a direct mremap or munmap left
    /// unmapped: it is the program's address space from then on (it may map memory of its own
    /// there, now or later, with or without MAP_FIXED), never mapped again by hetmem and left
    /// alone when the reservation is unmapped. (Mapping the hole PROT_NONE again let the
    /// program's later `MAP_FIXED` there go unseen, and the space then mapped over the
    /// program's memory: found by review.)
    fn disown(&self, r: VaRange);
    /// Lets child processes inherit the file mapping `r` (shared anonymous memory: a child
    /// maps it as plain shared memory, not served by hetmem). Nothing to do where there are no
    /// processes (the in-memory model).
    fn inherit_on_fork(&self, r: VaRange) -> io::Result<()> {
        let _ = r;
        Ok(())
    }
    /// Whether the reservation is memory the program mapped itself and lent to hetmem
    /// ([`KernelMm::adopt`]).
    fn adopted(&self) -> bool {
        false
    }
    /// Registers the adopted range `r` (already mapped, with the program's data in it) with the
    /// userfaultfd of `mode`, MISSING and WP, replacing nothing.
    fn register_adopted(&self, r: VaRange, mode: FaultMode) -> io::Result<()> {
        let _ = (r, mode);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// For each page of `r`: whether it holds data (present or swapped out; adopted memory).
    fn pages_with_data(&self, r: VaRange) -> io::Result<Vec<bool>> {
        let _ = r;
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Whether a page of `r` (at most 2 MiB) may be mapped by another process too (shared
    /// copy-on-write with a forked child that still maps it). Without a way to tell: true (the
    /// careful answer).
    fn range_shared(&self, r: VaRange) -> bool {
        let _ = r;
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The real kernel
// ---------------------------------------------------------------------------------------------

/// A thread reading one userfaultfd: fault messages (thread-mode delivery) and the REMAP
/// events of direct mremaps (every userfaultfd of hetmem's asks for them). Stopped and joined on
/// drop.
struct ThreadService {
    uffd: std::sync::Arc<Uffd>,
    stop: std::os::fd::OwnedFd,
    handle: Option<std::thread::JoinHandle<()>>,
    /// The process whose thread it is (dropped in a forked child, where the thread does not
    /// exist, it joins nothing).
    pid: i32,
}

impl ThreadService {
    fn start(uffd: std::sync::Arc<Uffd>, name: &str) -> io::Result<ThreadService> {
        let stop = sys::stop_fd()?;
        let stop2 = stop.try_clone()?;
        let u2 = uffd.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve_uffd(&u2, &stop2))?;
        Ok(ThreadService {
            uffd,
            stop,
            handle: Some(handle),
            pid: sys::getpid(),
        })
    }
}

impl Drop for ThreadService {
    fn drop(&mut self) {
        if self.pid != sys::getpid() {
            return;
        }
        let _ = sys::signal_stop(&self.stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The process-wide reader of the signal-mode userfaultfds (one per address space): their
/// messages are the REMAP and UNMAP events of the program's mremaps and munmaps (signal-mode
/// faults are not messages). One thread serves every space, started with the first and never
/// stopped, so that creating and dropping spaces creates no thread and ends none: a program may
/// map and unmap its own memory where a new thread's stack would land, or where glibc keeps the
/// cached stack of an exited one (the kernel's hmm-tests, `migrate_remap_fault`, under the
/// drop-in test device: an adoption crashed in `pthread_create`).
///
/// Lock: `watched` (a process-wide `std` table, like the registry of spaces: each critical
/// section adds, removes or clones the list) is never held while a message is served.
struct EventReader {
    watched: std::sync::Mutex<Vec<std::sync::Arc<Uffd>>>,
    /// Rung when `watched` changes, so that the reader polls the new list.
    wake: std::os::fd::OwnedFd,
}

/// The event reader of this process, with the process's id: a forked child (whose copy names
/// the parent, and has no reader thread) starts its own. A leaf lock, held across a fork by the
/// fork handler ([`hold_for_fork`]).
static EVENT_READER: std::sync::Mutex<Option<(i32, &'static EventReader)>> =
    std::sync::Mutex::new(None);

/// Locks the event reader's table for a `fork()` (space module `fork`): the guard.
pub(crate) fn hold_for_fork() -> Box<dyn std::any::Any> {
    Box::new(EVENT_READER.lock().unwrap_or_else(|p| p.into_inner()))
}

impl EventReader {
    /// The reader, started on first use (in each process).
    fn get() -> io::Result<&'static EventReader> {
        let mut t = EVENT_READER.lock().unwrap_or_else(|p| p.into_inner());
        let me = sys::getpid();
        if let Some((pid, r)) = *t
            && pid == me
        {
            return Ok(r);
        }
        let r: &'static EventReader = Box::leak(Box::new(EventReader {
            watched: std::sync::Mutex::new(Vec::new()),
            wake: sys::stop_fd()?,
        }));
        std::thread::Builder::new()
            .name("hetmem-events".into())
            .spawn(move || r.serve())?;
        *t = Some((me, r));
        Ok(r)
    }

    /// Reads `uffd`'s messages from now on, until the returned watch is dropped.
    fn watch(uffd: std::sync::Arc<Uffd>) -> io::Result<EventWatch> {
        let r = Self::get()?;
        r.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(uffd.clone());
        let _ = sys::signal_stop(&r.wake);
        Ok(EventWatch {
            reader: r,
            uffd,
            pid: sys::getpid(),
        })
    }

    fn serve(&self) {
        loop {
            let list: Vec<std::sync::Arc<Uffd>> = self
                .watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let refs: Vec<&Uffd> = list.iter().map(|u| &**u).collect();
            Uffd::become_reader_of(&refs);
            // Messages read for one fd while another's were served (its follow waited) are
            // served first: that fd will not poll readable for them (found by review: a
            // REMAP stayed queued until the next event on its fd).
            let kept: Vec<bool> = refs.iter().map(|u| u.has_kept()).collect();
            if kept.iter().any(|&k| k) {
                for (u, k) in list.iter().zip(kept) {
                    if k {
                        serve_msgs(u);
                    }
                }
                continue;
            }
            let Ok(ready) = Uffd::wait_any(&refs, &self.wake) else {
                // ENOMEM for the poll set: try again with the list as it is then.
                std::thread::yield_now();
                continue;
            };
            for (u, r) in list.iter().zip(ready) {
                if r {
                    serve_msgs(u);
                }
            }
        }
    }
}

/// Starts the process-wide reader of address spaces' userfaultfd events, if it is not running
/// yet (`EventReader`). Called when a device is made, so that a program that opens a device
/// first (as the kernel's test device is opened) gets the thread before it maps memory of its
/// own: a thread's stack created later may land in a hole the program punched in its own
/// mapping and then maps over with `MAP_FIXED`/`mremap`, which the kernel's `hmm-tests` do
/// (`migrate_remap_fault` overwrote the reader's stack).
pub fn start_event_reader() -> io::Result<()> {
    EventReader::get().map(|_| ())
}

/// A userfaultfd read by the [`EventReader`]; dropping it stops the reading (the fd closes
/// when the reader lets go of it too). Nothing may be registered with the fd by then: an
/// UNMAP event nobody reads would hold up the unmap that raised it.
struct EventWatch {
    reader: &'static EventReader,
    uffd: std::sync::Arc<Uffd>,
    /// The process watching (in a forked child the reader is the parent's: nothing to undo).
    pid: i32,
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        if self.pid != sys::getpid() {
            return;
        }
        self.reader
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|u| !std::sync::Arc::ptr_eq(u, &self.uffd));
        let _ = sys::signal_stop(&self.reader.wake);
    }
}

/// The real kernel boundary: a reservation of anonymous private memory and userfaultfds.
pub struct KernelMm {
    /// The signal-mode userfaultfd, read by the process-wide event reader.
    sig: EventWatch,
    thr: Mutex<Option<ThreadService>>,
    /// The userfaultfd of file mappings (with its event reader) and the pagemap scanner, made
    /// on first use.
    file: Mutex<Option<(ThreadService, sys::PagemapScanner)>>,
    /// The userfaultfd of file mappings with synchronous write-protect (with its event
    /// reader), made on first use.
    file_sync: Mutex<Option<ThreadService>>,
    force_umo: bool,
    /// Device-private pages leave a marker in the CPU's page table, which `/proc/self/pagemap`
    /// reports as swapped out, as the kernel's device-private entries ([`Mm::mark_device_private`]):
    /// the anonymous userfaultfds ask for `UFFD_FEATURE_WP_UNPOPULATED`.
    markers: bool,
    /// Device copies of system pages must not go through the kernel: a thread-mode userfaultfd
    /// exists (a kernel access to a missing page of its ranges waits for the handler thread), or
    /// the kernel refused the call (seccomp, ENOSYS). Set once.
    raw_device_copies: std::sync::atomic::AtomicBool,
    /// Device stores through the kernel ([`Mm::write_if_there`], `process_vm_writev`: read side)
    /// against the scans that write-protect file pages again ([`Mm::scan_written`]: write side).
    /// The kernel pins the pages first (resolving the write-protect fault then) and copies
    /// after: a scan in between would report the page, protect it again and let writeback
    /// read it before the bytes land, and the late store, made through the pin and not the
    /// page table, would never be reported: the page stays clean with data the file never gets.
    copy_gate: crate::sync::RwLock<()>,
    /// Parts of the reservation the program unmapped (or moved away) directly: its address
    /// space now, left alone when the reservation is unmapped ([`Mm::disown`]).
    disowned: Mutex<Vec<VaRange>>,
    /// Where [`Mm::zap`] moves pages out of the reservation, so that hetmem's own drops raise
    /// no REMOVE event on `sig` (which asks for them only when this exists: the kernel has
    /// `UFFDIO_MOVE`). A leaf lock.
    sink: Option<Mutex<sys::ZapSink>>,
    /// How many drops of hetmem's own raised a REMOVE event.
    zaps_with_event: std::sync::atomic::AtomicU64,
    /// Zeroed huge pages for first touches of whole 2 MiB units (kernels with `UFFDIO_MOVE`
    /// and transparent huge pages).
    huge: Option<HugeZero>,
    /// The reservation. Dropped last: its mappings were unregistered when the space went
    /// (`Mm::unregister_all`), and the thread-mode and file userfaultfds are closed by then, so
    /// that unmapping it raises no UNMAP event.
    res: Region,
}

/// Zeroed transparent huge pages for the first touch of whole 2 MiB units.
///
/// `UFFDIO_COPY` installs base pages only: a first touch filled 2 MiB with 512 copies of a zero
/// page (≈ 1.2 µs per 4 KiB here), where the kernel's own first touch of a `MADV_HUGEPAGE`
/// range maps one zeroed huge page (≈ 0.2 µs per 4 KiB). So a fill of a whole unit faults a
/// huge page into a staging buffer of its own (`MADV_HUGEPAGE`, never registered: the kernel
/// allocates and zeroes it as for any program) and moves it into place with `UFFDIO_MOVE`, one
/// PMD. Where the kernel gives a base page instead (no huge page free) the move stops at the
/// hole after it, the caller copies zeros over the rest, and the slot is mapped afresh (its
/// page table would keep later faults on base pages). Where the destination's PMD holds a page
/// table already (pages of the unit were there before), the kernel splits the huge page and
/// moves base pages: correct, and the slot is found split on its next use.
///
/// Slots are claimed with `try_lock`: a fill that finds none free copies instead. Each slot
/// holds no memory between fills (its page moved out, or the slot unmapped after a refused
/// move), only address space; a fill the kernel refused transiently (EAGAIN) leaves the
/// slot's page for the next one.
///
/// The huge page is allocated under the slot's memory policy (the task's), not the
/// destination's: an `mbind` policy on managed memory is not followed for units filled this
/// way (hetmem's mappings have none of their own; `UFFDIO_COPY` would follow one).
#[derive(Debug)]
pub struct HugeZero {
    slots: [Mutex<Option<Region>>; HugeZero::SLOTS],
}

impl HugeZero {
    /// Fills that can take the fast path at once (threads of the space first-touching whole
    /// units together).
    const SLOTS: usize = 4;

    /// The slots, empty until first used; `None` where anonymous memory gets no 2 MiB
    /// transparent huge pages ([`sys::anon_huge_pages_offered`]).
    pub fn new() -> Option<HugeZero> {
        if !sys::anon_huge_pages_offered() {
            return None;
        }
        Some(HugeZero {
            slots: std::array::from_fn(|_| Mutex::new(None)),
        })
    }

    fn slot() -> io::Result<Region> {
        let r = Region::new(LARGE_PAGE_SIZE, LARGE_PAGE_SIZE, Prot::ReadWrite)?;
        r.advise_hugepage()?;
        Ok(r)
    }

    /// Moves a zeroed huge page into the missing unit at `dst` with `uffd` (which `dst` is
    /// registered with): true when the whole unit is filled.
    fn fill(&self, uffd: &Uffd, dst: VirtAddr) -> bool {
        for slot in &self.slots {
            let Some(mut g) = crate::sync::try_lock(slot) else {
                continue;
            };
            if g.is_none() {
                *g = Self::slot().ok();
            }
            let Some(r) = g.as_ref() else {
                return false;
            };
            // A store of zero faults the slot's page in (a huge page, zeroed by the kernel)
            // and leaves it all zeros.
            if r.store_u32(0, 0).is_err() {
                return false;
            }
            let (res, moved) = uffd.move_whole(dst.get(), r.base(), LARGE_PAGE_SIZE);
            match res {
                Ok(()) => return true,
                // Transient (the mappings are changing, or a drop there is not followed
                // yet): the slot keeps its page for the next fill.
                Err(UffdError::Again) if moved == 0 => {}
                // A page there, or a marker (`Uffd::mark_missing`), before anything moved: the
                // caller copies instead, and the slot keeps its page too.
                Err(UffdError::Exists) if moved == 0 => {}
                // A base page moved, then the hole after it; or the kernel refused the move
                // (a protection or lock state the slot does not share: EINVAL; a page there:
                // EEXIST): map the slot afresh, so that it holds no memory meanwhile.
                Err(_) => *g = None,
            }
            return false;
        }
        false
    }
}

impl Drop for KernelMm {
    fn drop(&mut self) {
        for r in std::mem::take(&mut *lock(&self.disowned)) {
            let off = self.off(r.start);
            let _ = self.res.disown(off, r.len());
        }
    }
}

impl std::fmt::Debug for KernelMm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelMm")
            .field("base", &self.res.base())
            .field("len", &self.res.len())
            .finish()
    }
}

impl KernelMm {
    /// Reserves `len` bytes (PROT_NONE, not inherited across fork) aligned to 2 MiB and opens the
    /// SIGBUS-mode userfaultfd; installs the process-wide SIGBUS handler.
    /// `user_mode_only` opens user-mode-only userfaultfds even where a full one is allowed;
    /// `markers` makes device-private pages show in `/proc/self/pagemap`
    /// ([`Mm::mark_device_private`]).
    pub fn new(len: usize, user_mode_only: bool, markers: bool) -> io::Result<KernelMm> {
        let res = Region::new(len, crate::addr::LARGE_PAGE_SIZE, Prot::None)?;
        Self::over(res, user_mode_only, markers)
    }

    /// The kernel side of an address space over `len` bytes at `base` that the program mapped
    /// itself (anonymous, private: [`Region::adopt`]); returns it and the memory's pieces by
    /// protection.
    /// Nothing is registered yet ([`Mm::register_adopted`]).
    pub fn adopt(
        base: usize,
        len: usize,
        user_mode_only: bool,
        markers: bool,
    ) -> io::Result<(KernelMm, Vec<sys::AdoptedPiece>)> {
        let (res, pieces) = Region::adopt(base, len)?;
        Ok((Self::over(res, user_mode_only, markers)?, pieces))
    }

    fn over(res: Region, user_mode_only: bool, markers: bool) -> io::Result<KernelMm> {
        sys::check_page_size()?;
        // Every userfaultfd of a space asks for the program's munmaps (hetmem's own unmaps
        // unregister first and raise none); each has a reader for as long as it lives.
        // The program's drops of pages (madvise) are followed where hetmem's own can be made
        // without raising the event (`sys::ZapSink`): kernels with UFFDIO_MOVE.
        let sink = sys::ZapSink::new(user_mode_only).ok().map(Mutex::new);
        let sig = EventReader::watch(std::sync::Arc::new(Uffd::open_events(
            UffdDelivery::Signal,
            user_mode_only,
            sink.is_some(),
            markers,
        )?))?;
        sys::install_sigbus_handler()?;
        // Not over the program's own memory (adopted): its huge-page advice is the program's,
        // and without it a fault leaves a page table in the unit, where the kernel would split
        // the huge page after hetmem had zeroed it.
        let huge = (sink.is_some() && !res.is_adopted())
            .then(HugeZero::new)
            .flatten();
        Ok(KernelMm {
            sig,
            thr: Mutex::new(None),
            file: Mutex::new(None),
            file_sync: Mutex::new(None),
            force_umo: user_mode_only,
            markers,
            raw_device_copies: std::sync::atomic::AtomicBool::new(false),
            copy_gate: crate::sync::RwLock::new(()),
            disowned: Mutex::new(Vec::new()),
            sink,
            zaps_with_event: std::sync::atomic::AtomicU64::new(0),
            huge,
            res,
        })
    }

    fn off(&self, a: VirtAddr) -> usize {
        a.get() - self.res.base()
    }

    fn with_uffd<R>(&self, mode: FaultMode, f: impl FnOnce(&Uffd) -> R) -> R {
        match mode {
            FaultMode::Signal => f(&self.sig.uffd),
            FaultMode::Thread => {
                let uffd = self
                    .thread_uffd()
                    .expect("thread-mode uffd exists once a thread-mode mapping does");
                f(&uffd)
            }
        }
    }

    fn thread_uffd(&self) -> io::Result<std::sync::Arc<Uffd>> {
        let mut g = lock(&self.thr);
        if let Some(s) = g.as_ref() {
            return Ok(s.uffd.clone());
        }
        self.raw_device_copies
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The program's drops are followed here too where hetmem's own raise no event (as
        // on the space's userfaultfd): the handler thread reads them with its faults, and
        // waits for the space's lock without blocking them (`SpaceCore::lock_state_draining`).
        let uffd = std::sync::Arc::new(Uffd::open_events(
            UffdDelivery::Thread,
            self.force_umo,
            self.sink.is_some(),
            self.markers,
        )?);
        *g = Some(ThreadService::start(uffd.clone(), "hetmem-uffd")?);
        Ok(uffd)
    }

    /// Maps `fd` at `r` (a never-registered part of the reservation: nothing is lost by
    /// MAP_FIXED) and registers it MISSING with `uffd`, plus write-protect and at once
    /// write-protected when `wp` (until then every page would count as written, and pages mapped
    /// later inherit the protection: WP_UNPOPULATED). On failure the range is left fresh again.
    #[allow(clippy::too_many_arguments)]
    fn map_registered(
        &self,
        uffd: &Uffd,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
        shared: bool,
        wp: bool,
    ) -> io::Result<()> {
        let off = self.off(r.start);
        self.res.map_fd(off, r.len(), prot, fd, file_off, shared)?;
        let res = uffd.register(&self.res, off, r.len(), wp).and_then(|()| {
            if !wp {
                return Ok(());
            }
            uffd.write_protect(r.start.get(), r.len(), true)
                .map_err(io::Error::from)
        });
        if let Err(e) = res {
            // Registered, maybe: leave the userfaultfd first (no event for hetmem's own unmap).
            let _ = uffd.unregister(r.start.get(), r.len());
            let _ = self.res.remap_fresh(off, r.len(), Prot::None);
            return Err(e);
        }
        Ok(())
    }
}

/// The reader of a userfaultfd (see [`ThreadService`]): serves each fault message through the
/// fault registry and wakes the faulting thread; follows each direct mremap and munmap (REMAP
/// and UNMAP events) through the registry too. Messages read while one of its own fills waited
/// for the mappings to stop changing (an mremap posts UNMAP of the old range right after the
/// REMAP that the reader is following) come first ([`Uffd::next_msg`]). The window of pending moves ([`sys::RemapWindow`]) opens before the read,
/// so that a signal-mode access to a moved range made after the program's mremap returned (the
/// kernel releases it when the event is read) waits for the move to be followed. It never
/// touches managed memory itself.
fn serve_uffd(uffd: &Uffd, stop: &std::os::fd::OwnedFd) {
    uffd.become_reader();
    loop {
        match uffd.wait(stop) {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
        serve_msgs(uffd);
    }
}

/// Serves the messages pending on `uffd` (see [`serve_uffd`]), on its reader thread.
fn serve_msgs(uffd: &Uffd) {
    let _window = sys::RemapWindow::open();
    while let Ok(Some(m)) = uffd.next_msg() {
        match m {
            sys::UffdMsg::Fault(f) => {
                if uffd.serve_zone_fault(&f) {
                    continue;
                }
                let page = f.addr & !(PAGE_SIZE - 1);
                if sys::serve_thread_fault(page, f.write || f.wp) {
                    // It waits for a migration in flight; the space wakes it when that ends.
                    continue;
                }
                // Whatever the outcome, wake the faulting thread: it retries the access and
                // faults again if the page is still missing.
                let _ = uffd.wake(page, PAGE_SIZE);
            }
            sys::UffdMsg::Remap { from, to, len } => {
                sys::dispatch_remap(from, to, len);
            }
            sys::UffdMsg::Unmap { start, end } => sys::dispatch_unmap(start, end),
            sys::UffdMsg::Remove { start, end } => {
                sys::dispatch_remove(start, end);
                sys::remove_followed(start, end);
            }
            sys::UffdMsg::Other(_) => {}
        }
    }
}

impl KernelMm {
    /// A device's copy of system pages through the kernel (`copy`: it stops at a missing page),
    /// where every range is served in SIGBUS mode (the space's and the file mappings'
    /// userfaultfds): the bytes copied. `None`: copy raw instead, because a thread-mode handler
    /// exists or the kernel refused the call (a seccomp filter, ENOSYS; then never tried again).
    fn nofault(&self, copy: impl FnOnce(&Region) -> io::Result<usize>) -> Option<usize> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.raw_device_copies.load(SeqCst) {
            return None;
        }
        let n = copy(&self.res).ok();
        if n.is_none() {
            self.raw_device_copies.store(true, SeqCst);
        }
        n
    }
}

impl KernelMm {
    /// The parts of `r` that are still the reservation's (not given up to the program:
    /// [`Mm::disown`]), in order.
    fn owned_parts(&self, r: VaRange) -> Vec<VaRange> {
        let mut gone: Vec<VaRange> = lock(&self.disowned)
            .iter()
            .filter(|d| d.overlaps(&r))
            .copied()
            .collect();
        gone.sort_by_key(|d| d.start);
        let mut parts = Vec::new();
        let mut at = r.start;
        for d in gone {
            if d.start > at {
                parts.push(VaRange {
                    start: at,
                    end: d.start,
                });
            }
            at = at.max(d.end);
        }
        if at < r.end {
            parts.push(VaRange {
                start: at,
                end: r.end,
            });
        }
        parts
    }

    /// Unregisters `r` from the userfaultfd `reg` names (one that was never made has nothing
    /// registered).
    fn unregister(&self, r: VaRange, reg: Registered) -> io::Result<()> {
        // Drops of ours recorded there were reported by now, or never will be.
        sys::forget_own_removes(r.start.get(), r.end.get());
        let (a, len) = (r.start.get(), r.len());
        match reg {
            Registered::Anon(FaultMode::Signal) => self.sig.uffd.unregister(a, len),
            Registered::Anon(FaultMode::Thread) => match lock(&self.thr).as_ref() {
                Some(s) => s.uffd.unregister(a, len),
                None => Ok(()),
            },
            Registered::File => match lock(&self.file).as_ref() {
                Some((s, _)) => s.uffd.unregister(a, len),
                None => Ok(()),
            },
            Registered::FileSync => match lock(&self.file_sync).as_ref() {
                Some(s) => s.uffd.unregister(a, len),
                None => Ok(()),
            },
        }
    }
}

impl Mm for KernelMm {
    fn reservation(&self) -> VaRange {
        VaRange {
            start: VirtAddr(self.res.base()),
            end: VirtAddr(self.res.base() + self.res.len()),
        }
    }

    fn map(&self, r: VaRange, prot: Prot, mode: FaultMode) -> io::Result<()> {
        let off = self.off(r.start);
        // The range is PROT_NONE and unregistered (free part of the reservation), so replacing
        // it with MAP_FIXED loses nothing and opens no unregistered window over managed data.
        self.res.remap_fresh(off, r.len(), prot)?;
        let res = match mode {
            FaultMode::Signal => self.sig.uffd.register(&self.res, off, r.len(), true),
            FaultMode::Thread => self.thread_uffd()?.register(&self.res, off, r.len(), true),
        };
        if let Err(e) = res {
            let _ = self.res.remap_fresh(off, r.len(), Prot::None);
            return Err(e);
        }
        Ok(())
    }

    fn protect(&self, r: VaRange, prot: Prot) -> io::Result<()> {
        self.res.protect(self.off(r.start), r.len(), prot)
    }

    fn unregister_all(&self, registered: &[(VaRange, Registered)]) {
        for &(part, reg) in registered {
            let _ = self.unregister(part, reg);
        }
    }

    fn unmap(&self, r: VaRange, registered: &[(VaRange, Registered)]) -> io::Result<()> {
        // Accesses get SIGSEGV from here on, as on any unmapped address; then each mapping
        // leaves its userfaultfd (no event: the program's munmaps alone are reported); then
        // MAP_FIXED PROT_NONE drops the pages.
        // Parts the program unmapped directly are its own now: never touched (memory it mapped
        // there would be replaced; an mprotect across the hole fails with ENOMEM: found from
        // outside, unmapping a range whose middle the program had unmapped).
        let parts = self.owned_parts(r);
        for p in &parts {
            self.res.protect(self.off(p.start), p.len(), Prot::None)?;
        }
        for &(part, reg) in registered {
            // A part that stays registered (the kernel refused) raises an UNMAP event below:
            // its reader reads it while it waits for the space's lock the caller holds
            // (`SpaceCore::lock_state_for_follow`), then finds nothing left to follow. Going on
            // keeps the space and the kernel's view one (stopping here left the range PROT_NONE
            // and partly unregistered under mappings the space still listed).
            let _ = self.unregister(part, reg);
        }
        for p in &parts {
            self.res
                .remap_fresh(self.off(p.start), p.len(), Prot::None)?;
        }
        Ok(())
    }

    fn install(
        &self,
        dst: VirtAddr,
        src: &Region,
        off: usize,
        len: usize,
        mode: FaultMode,
    ) -> Result<(), UffdError> {
        self.with_uffd(mode, |u| u.fill(dst.get(), src, off, len, false))
    }

    fn install_protected(
        &self,
        dst: VirtAddr,
        src: &Region,
        off: usize,
        len: usize,
        mode: FaultMode,
    ) -> Result<(), UffdError> {
        self.with_uffd(mode, |u| u.fill(dst.get(), src, off, len, true))
    }

    fn map_zero_pages(&self, r: VaRange, mode: FaultMode) -> Result<(), UffdError> {
        let (a, len) = (r.start, r.len());
        self.with_uffd(mode, |u| {
            // Not woken before the protection is on: a thread-mode waiter that went on at once
            // could store to the zero page unprotected (the kernel would copy it on write
            // silently). Another thread may still store between the two calls: its store lands
            // in a private copy, which the protection then covers (the page is then reported as
            // the zero page until its next store, with its data intact).
            u.zeropage(a.get(), len, true)?;
            u.write_protect(a.get(), len, true)?;
            if mode == FaultMode::Thread {
                let _ = u.wake(a.get(), len);
            }
            Ok(())
        })
    }

    fn zap(&self, r: VaRange) -> io::Result<()> {
        let Some(sink) = &self.sink else {
            return self.res.discard(self.off(r.start), r.len());
        };
        let (moved, done) = lock(sink).take(r.start.get(), r.len());
        if moved.is_ok() {
            return Ok(());
        }
        // The rest is dropped in place, which raises a REMOVE event on `sig` (where the
        // range is registered with it): recorded first, so that the reader, which follows it
        // under the space's lock after this drop, finds it ours.
        let rest = VaRange {
            start: r.start.add(done.next_multiple_of(PAGE_SIZE)),
            end: r.end,
        };
        if rest.start >= rest.end {
            return Ok(());
        }
        sys::record_own_remove(rest.start.get(), rest.end.get());
        self.zaps_with_event
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let res = self.res.discard(self.off(rest.start), rest.len());
        if res.is_err() {
            // Refused before any event (mlocked memory): nothing to tell apart.
            sys::cancel_own_remove(rest.start.get(), rest.end.get());
        }
        res
    }

    fn mark_device_private(&self, r: VaRange, mode: FaultMode) {
        if self.markers {
            // Reporting only: a page left unmarked (the mappings changing past the retries)
            // reads as not present instead of swapped, and faults the same.
            let _ = self.with_uffd(mode, |u| u.mark_missing(r.start.get(), r.len()));
        }
    }

    fn zero_fill_dropped(&self, a: VirtAddr) -> bool {
        // Only the signal-mode userfaultfd (no lock guards it); a range registered elsewhere
        // refuses the call.
        self.sig
            .uffd
            .zeropage_over_drops(a.get(), PAGE_SIZE)
            .is_ok()
    }

    fn prefer_huge(&self, r: VaRange) {
        if self.huge.is_some() {
            // A hint: where the kernel refuses it, fills copy as before.
            let _ = self.res.advise_hugepage_at(self.off(r.start), r.len());
        }
    }

    fn zero_fill_unit(&self, dst: VirtAddr, mode: FaultMode) -> bool {
        self.huge
            .as_ref()
            .is_some_and(|h| self.with_uffd(mode, |u| h.fill(u, dst)))
    }

    fn zaps_with_event(&self) -> u64 {
        self.zaps_with_event
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn write_protect(&self, r: VaRange, on: bool, mode: FaultMode) -> Result<(), UffdError> {
        self.with_uffd(mode, |u| u.write_protect(r.start.get(), r.len(), on))
    }

    fn wake(&self, r: VaRange, mode: FaultMode) {
        if mode == FaultMode::Thread {
            self.with_uffd(mode, |u| {
                let _ = u.wake(r.start.get(), r.len());
            })
        }
    }

    fn present_prefix(&self, addr: VirtAddr, pages: usize) -> usize {
        sys::resident_prefix(addr.get(), pages)
    }

    fn read_present(&self, addr: VirtAddr, dst: &mut [u8]) -> Option<usize> {
        self.res.read_nofault(self.off(addr), dst).ok()
    }

    fn read(&self, addr: VirtAddr, dst: &mut [u8]) {
        let _zone = sys::NoFaultZone::enter(sys::OWN_COPY_ZONE);
        self.res
            .read(self.off(addr), dst)
            .expect("read of a range inside the reservation")
    }

    fn write(&self, addr: VirtAddr, src: &[u8]) {
        let _zone = sys::NoFaultZone::enter(sys::OWN_COPY_ZONE);
        self.res
            .write(self.off(addr), src)
            .expect("write of a range inside the reservation")
    }

    fn read_if_there(&self, addr: VirtAddr, dst: &mut [u8]) -> usize {
        match self.nofault(|r| r.read_nofault(self.off(addr), dst)) {
            Some(n) => n,
            None => {
                // Raw: only what the kernel has now (a page the program dropped would fault,
                // and in a thread-mode mapping wait for the handler thread).
                let n = self.present_prefix(addr, dst.len() / PAGE_SIZE) * PAGE_SIZE;
                self.read(addr, &mut dst[..n]);
                n
            }
        }
    }

    fn write_if_there(&self, addr: VirtAddr, src: &[u8]) -> usize {
        // No scan between the kernel's pin of the pages and its copy (see `copy_gate`).
        let copied = {
            let _gate = self.copy_gate.read().unwrap_or_else(|p| p.into_inner());
            self.nofault(|r| r.write_nofault(self.off(addr), src))
        };
        match copied {
            Some(n) => n,
            None => {
                let n = self.present_prefix(addr, src.len() / PAGE_SIZE) * PAGE_SIZE;
                self.write(addr, &src[..n]);
                n
            }
        }
    }

    fn copy_to(&self, addr: VirtAddr, dst: &Region, off: usize, len: usize) {
        let _zone = sys::NoFaultZone::enter(sys::OWN_COPY_ZONE);
        self.res
            .copy_to(self.off(addr), dst, off, len)
            .expect("copy of a range inside the reservation to a frame")
    }

    fn cpu_read(
        &self,
        addr: VirtAddr,
        dst: &mut [u8],
        _fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<(), Signal> {
        sys::cpu_read(addr.get(), dst);
        Ok(())
    }

    fn cpu_write(
        &self,
        addr: VirtAddr,
        src: &[u8],
        _fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<(), Signal> {
        sys::cpu_write(addr.get(), src);
        Ok(())
    }

    fn cpu_fetch_add(
        &self,
        addr: VirtAddr,
        v: u64,
        _fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<u64, Signal> {
        Ok(sys::cpu_fetch_add_u64(addr.get(), v))
    }

    fn user_mode_only(&self) -> bool {
        self.sig.uffd.user_mode_only()
    }

    fn map_file(
        &self,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
        shared: bool,
    ) -> io::Result<()> {
        // Only writable shared mappings need write tracking: the kernel turns its own
        // fault-around off on ranges registered for write-protect (a warm sequential read then
        // takes a minor fault per 4 KiB page: 0.26x the kernel's mmap, against 1.00x without).
        let track = shared && prot.writable();
        let mut g = lock(&self.file);
        if g.is_none() {
            *g = Some((
                ThreadService::start(
                    std::sync::Arc::new(Uffd::open_file(self.force_umo, false)?),
                    "hetmem-events",
                )?,
                sys::PagemapScanner::new()?,
            ));
        }
        let (svc, _) = g.as_ref().expect("made above");
        self.map_registered(&svc.uffd, r, fd, file_off, prot, shared, track)
    }

    fn map_file_sync(
        &self,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
    ) -> io::Result<()> {
        let mut g = lock(&self.file_sync);
        if g.is_none() {
            *g = Some(ThreadService::start(
                std::sync::Arc::new(Uffd::open_file(self.force_umo, true)?),
                "hetmem-events",
            )?);
        }
        let svc = g.as_ref().expect("made above");
        self.map_registered(&svc.uffd, r, fd, file_off, prot, true, true)
    }

    fn file_write_protect(&self, r: VaRange, on: bool) -> io::Result<()> {
        let g = lock(&self.file_sync);
        let Some(svc) = g.as_ref() else {
            return Ok(());
        };
        svc.uffd
            .write_protect(r.start.get(), r.len(), on)
            .map_err(io::Error::from)
    }

    fn forget_moved(&self, moved: VaRange, mode: FaultMode) -> io::Result<()> {
        self.unregister(moved, Registered::Anon(mode))
    }

    fn disown(&self, r: VaRange) {
        // Adopted memory is never unmapped by hetmem anyway.
        if self.res.is_adopted() {
            return;
        }
        // Kept sorted, overlapping and adjacent ranges merged: one entry per hole, however
        // many munmaps made it.
        let mut d = lock(&self.disowned);
        let mut merged = r;
        d.retain(|x| {
            if x.start <= merged.end && merged.start <= x.end {
                merged.start = merged.start.min(x.start);
                merged.end = merged.end.max(x.end);
                false
            } else {
                true
            }
        });
        let at = d.partition_point(|x| x.start < merged.start);
        d.insert(at, merged);
    }

    fn adopted(&self) -> bool {
        self.res.is_adopted()
    }

    fn pages_with_data(&self, r: VaRange) -> io::Result<Vec<bool>> {
        self.res.pages_with_data(self.off(r.start), r.len())
    }

    fn range_shared(&self, r: VaRange) -> bool {
        self.res
            .range_shared(self.off(r.start), r.len())
            .unwrap_or(true)
    }

    fn register_adopted(&self, r: VaRange, mode: FaultMode) -> io::Result<()> {
        if !self.res.is_adopted() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let off = self.off(r.start);
        match mode {
            FaultMode::Signal => self.sig.uffd.register(&self.res, off, r.len(), true),
            FaultMode::Thread => self.thread_uffd()?.register(&self.res, off, r.len(), true),
        }
    }

    fn inherit_on_fork(&self, r: VaRange) -> io::Result<()> {
        self.res.inherit_on_fork(self.off(r.start), r.len())
    }

    fn track_writes(&self, r: VaRange) -> io::Result<()> {
        let g = lock(&self.file);
        let Some((svc, _)) = g.as_ref() else {
            return Ok(());
        };
        // Registering again with the same userfaultfd updates the mode of the range.
        svc.uffd
            .register(&self.res, self.off(r.start), r.len(), true)?;
        svc.uffd
            .write_protect(r.start.get(), r.len(), true)
            .map_err(io::Error::from)
    }

    fn scan_written(&self, r: VaRange) -> io::Result<Vec<VaRange>> {
        let g = lock(&self.file);
        // Device stores through the kernel in flight land before the scan (see `copy_gate`).
        let _gate = self.copy_gate.write().unwrap_or_else(|p| p.into_inner());
        let Some((_, scanner)) = g.as_ref() else {
            return Ok(Vec::new());
        };
        Ok(scanner
            .written_and_reprotect(r.start.get(), r.end.get())?
            .into_iter()
            .map(|(s, e)| VaRange {
                start: VirtAddr(s),
                end: VirtAddr(e),
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// The in-memory model
// ---------------------------------------------------------------------------------------------

/// The signal a CPU access ended with ([`Mm::cpu_read`], [`Mm::cpu_write`],
/// [`Mm::cpu_fetch_add`]). Only `ModelMm` reports one: on the real kernel the thread gets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    /// The page the access faulted on.
    pub addr: VirtAddr,
    /// `SIGBUS`: hetmem did not serve the fault (past the end of a file mapping, a fill that
    /// failed, a store at a dirty bound whose writeback failed). `SIGSEGV`: no mapping there, or
    /// its protection forbids the access.
    pub signo: i32,
}

impl From<Signal> for crate::error::Error {
    fn from(s: Signal) -> crate::error::Error {
        crate::error::Error::Signal {
            addr: s.addr,
            signo: s.signo,
        }
    }
}

/// Faults one access may take in a row on one page before the model calls it a fault loop (the
/// real kernel would retry it forever: a hang). Every legitimate retry (a page being removed,
/// a racing eviction) ends once another thread makes progress, which takes a few retries.
#[cfg(any(test, feature = "testing"))]
const FAULT_LOOP_BOUND: usize = 10_000;

#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
struct ModelPage {
    data: Box<[u8]>,
    wp: bool,
}

#[cfg(any(test, feature = "testing"))]
/// How a file mapping tracks stores: the write-protect mode its userfaultfd was registered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WpMode {
    /// Not registered for write-protect (read-only shared, or private).
    None,
    /// `UFFD_FEATURE_WP_ASYNC`: a store to a protected page goes through and clears its bit.
    Async,
    /// Synchronous: a store to a protected page faults into hetmem.
    Sync,
}

#[cfg(any(test, feature = "testing"))]
/// What a file mapping maps.
#[derive(Debug, Clone)]
struct ModelFile {
    /// The memfd (a duplicate of the descriptor: its presence of pages and its size).
    fd: std::sync::Arc<std::os::fd::OwnedFd>,
    /// A shared mapping of the memfd of the mapping's whole original length, through which the
    /// model reads and writes the pages the mapping maps. Never touched at a hole (which it
    /// would fill with zeros): every access checks first that the memfd holds the page.
    view: std::sync::Arc<Region>,
    /// Byte offset in `view` of this mapping's first page.
    view_off: usize,
    /// File offset of this mapping's first page.
    off: u64,
    shared: bool,
    wp: WpMode,
}

#[cfg(any(test, feature = "testing"))]
/// A mapping of the model: pages `start..end` (the key of `ModelState::vmas` is `start`).
#[derive(Debug, Clone)]
struct ModelVma {
    end: usize,
    prot: Prot,
    file: Option<ModelFile>,
}

#[cfg(any(test, feature = "testing"))]
/// Where an access to a page goes when the kernel lets it through.
enum Target {
    /// The anonymous page (or a private copy of a file page) in `ModelState::pages`.
    Anon,
    /// The memfd's page, at this byte offset of the view.
    Shmem(std::sync::Arc<Region>, usize),
}

#[cfg(any(test, feature = "testing"))]
/// What the kernel does with an access to a page.
enum Step {
    Go(Target),
    /// A fault into hetmem: a userfault (missing page, write-protected page with synchronous
    /// write-protect) or a SIGBUS past the end of a file, which hetmem's handler sees too.
    Fault,
    /// A signal hetmem never sees (no mapping, or a protection that forbids the access).
    Signal(i32),
}

#[cfg(any(test, feature = "testing"))]
/// The model's page tables (one lock).
#[derive(Debug, Default)]
struct ModelState {
    /// Present anonymous pages, and private copies of file pages, by page number.
    pages: std::collections::HashMap<usize, ModelPage>,
    /// The mappings by first page number, as `map`/`map_file` made them and `protect`,
    /// `track_writes` and `unmap` split them.
    vmas: std::collections::BTreeMap<usize, ModelVma>,
    /// Pages of file mappings registered for write-protect whose protection is off: on the
    /// kernel, a present entry without the uffd-wp bit or an *empty* entry without a marker.
    /// A store with asynchronous write-protect puts its page here; a scan reports and removes
    /// them. A page leaves the memfd (punch, truncate, eviction) without leaving this set: the
    /// kernel's zap keeps a marker where the entry was protected and leaves an empty entry, which
    /// a scan reports as written, where it was not.
    unprotected: std::collections::HashSet<usize>,
    /// Pages whose installs fail ([`Mm::fail_installs`]).
    failing: Option<(usize, usize)>,
}

#[cfg(any(test, feature = "testing"))]
fn page_bytes() -> u64 {
    PAGE_SIZE as u64
}

#[cfg(any(test, feature = "testing"))]
/// The memfd's size.
fn file_size(fd: &std::os::fd::OwnedFd) -> u64 {
    rustix::fs::fstat(fd).map_or(0, |s| s.st_size as u64)
}

#[cfg(any(test, feature = "testing"))]
/// Whether the memfd holds the page at `off` (`SEEK_DATA`: the kernel's own view of it; a hole
/// is what makes a mapping of it fault MISSING).
fn has_page(fd: &std::os::fd::OwnedFd, off: u64) -> bool {
    rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(off)).is_ok_and(|d| d < off + page_bytes())
}

#[cfg(any(test, feature = "testing"))]
impl ModelState {
    fn vma(&self, vpn: usize) -> Option<(usize, &ModelVma)> {
        self.vmas
            .range(..=vpn)
            .next_back()
            .filter(|(_, v)| vpn < v.end)
            .map(|(&s, v)| (s, v))
    }

    /// Splits the mapping that holds page `vpn` (not as its first page) in two at it.
    fn split(&mut self, vpn: usize) {
        let Some((start, v)) = self.vma(vpn).map(|(s, v)| (s, v.clone())) else {
            return;
        };
        if start == vpn {
            return;
        }
        let mut tail = v;
        if let Some(f) = tail.file.as_mut() {
            let skip = (vpn - start) * PAGE_SIZE;
            f.view_off += skip;
            f.off += skip as u64;
        }
        self.vmas.get_mut(&start).expect("found above").end = vpn;
        self.vmas.insert(vpn, tail);
    }

    /// The mappings of pages `first..last`, split so that they lie wholly inside it.
    fn vmas_in(
        &mut self,
        first: usize,
        last: usize,
    ) -> impl Iterator<Item = (&usize, &mut ModelVma)> {
        self.split(first);
        self.split(last);
        self.vmas.range_mut(first..last)
    }

    /// Drops the mappings of pages `first..last` and everything they held.
    fn remove(&mut self, first: usize, last: usize) {
        let keys: Vec<usize> = self.vmas_in(first, last).map(|(&k, _)| k).collect();
        for k in keys {
            self.vmas.remove(&k);
        }
        self.pages.retain(|&p, _| !(first..last).contains(&p));
        self.unprotected.retain(|&p| !(first..last).contains(&p));
    }

    /// What the kernel does with an access (a store when `write`) to page `vpn`.
    fn resolve(&mut self, vpn: usize, write: bool) -> Step {
        let Some((start, v)) = self.vma(vpn) else {
            return Step::Signal(libc::SIGSEGV);
        };
        if !v.prot.readable() || (write && !v.prot.writable()) {
            return Step::Signal(libc::SIGSEGV);
        }
        let Some(f) = v.file.clone() else {
            return match self.pages.get(&vpn) {
                Some(pg) if !(write && pg.wp) => Step::Go(Target::Anon),
                _ => Step::Fault,
            };
        };
        let idx = vpn - start;
        let (off, view_off) = (
            f.off + (idx * PAGE_SIZE) as u64,
            f.view_off + idx * PAGE_SIZE,
        );
        if !f.shared
            && let Some(pg) = self.pages.get(&vpn)
        {
            // A private copy (made by a store, or installed by hetmem).
            return if write && pg.wp {
                Step::Fault
            } else {
                Step::Go(Target::Anon)
            };
        }
        // Past the file's last page the kernel raises SIGBUS, which hetmem's handler sees (and
        // serves if the file has grown meanwhile); a hole in the memfd is a MISSING userfault.
        if off >= file_size(&f.fd).div_ceil(page_bytes()) * page_bytes() || !has_page(&f.fd, off) {
            return Step::Fault;
        }
        if !f.shared {
            if !write {
                return Step::Go(Target::Shmem(f.view, view_off));
            }
            // Copy on write: the page becomes a private anonymous page.
            let mut data = vec![0u8; PAGE_SIZE].into_boxed_slice();
            f.view
                .read(view_off, &mut data)
                .expect("model view of the memfd in range");
            self.pages.insert(vpn, ModelPage { data, wp: false });
            return Step::Go(Target::Anon);
        }
        if write && f.wp != WpMode::None && !self.unprotected.contains(&vpn) {
            if f.wp == WpMode::Sync {
                return Step::Fault;
            }
            // Asynchronous write-protect: the kernel lets the store through and records it.
            self.unprotected.insert(vpn);
        }
        Step::Go(Target::Shmem(f.view, view_off))
    }

    /// Copies `n` bytes at `in_page` of page `vpn` (reached as `t`) into `dst`.
    fn load(&self, t: &Target, vpn: usize, in_page: usize, dst: &mut [u8]) {
        match t {
            Target::Anon => {
                let pg = self.pages.get(&vpn).expect("resolved present");
                dst.copy_from_slice(&pg.data[in_page..in_page + dst.len()]);
            }
            Target::Shmem(view, off) => view
                .read(off + in_page, dst)
                .expect("model view of the memfd in range"),
        }
    }

    /// Copies `src` to `in_page` of page `vpn` (reached as `t`).
    fn store(&mut self, t: &Target, vpn: usize, in_page: usize, src: &[u8]) {
        match t {
            Target::Anon => {
                let pg = self.pages.get_mut(&vpn).expect("resolved present");
                pg.data[in_page..in_page + src.len()].copy_from_slice(src);
            }
            Target::Shmem(view, off) => view
                .write(off + in_page, src)
                .expect("model view of the memfd in range"),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
/// An in-memory model of [`Mm`], exact enough that the core's code runs on it unchanged: the
/// mappings with their protections, anonymous pages with a write-protect bit, and file
/// mappings of a page cache's memfd with the kernel's semantics:
///
/// * a shared file mapping shows the memfd's pages: a page the memfd holds is mapped on
///   access; a hole faults (MISSING) into hetmem, which fills the cache and retries; past the
///   file's last page the access gets SIGBUS, which hetmem's handler sees; hetmem's punches,
///   truncations and evictions of the memfd therefore remove pages from every mapping at once,
///   as the kernel's zap does;
/// * write-protect per page: asynchronous (a store goes through and marks the page written)
///   or synchronous (a store to a protected page faults into hetmem); a scan
///   ([`Mm::scan_written`], `PAGEMAP_SCAN`) reports and re-protects the pages whose protection
///   is off, including, as the kernel does, an entry that a punch emptied after a store;
/// * a private file mapping (`map_file` with `shared` false) follows the memfd until a store
///   copies the page (hetmem's own private file mappings are anonymous memory filled from the
///   cache: [`Mm::map`] and [`Mm::install`]).
///
/// CPU accesses ([`Mm::cpu_read`] and the others) call the core's fault handler where the
/// kernel would raise a fault, and return the signal where it would send one. hetmem's own
/// copies ([`Mm::read`], [`Mm::write`], [`Mm::copy_to`]) panic where the kernel would fault
/// (their no-fault zones abort there). Nothing blocks: the model's one lock is the `sync`
/// facade's, so under `shuttle` each access is one step, and the memfd is reached through
/// non-blocking system calls (its size, `SEEK_DATA`) and a shared mapping of it.
///
/// With real threads a file page is checked and then accessed without excluding the cache's
/// punches (which take no lock of the model): a store racing a punch could refill the hole with
/// zeros. File mappings of the model are meant for `shuttle`, which runs one thread at a time
/// and switches only at the facade's operations.
#[derive(Debug)]
pub struct ModelMm {
    range: VaRange,
    st: Mutex<ModelState>,
}

#[cfg(any(test, feature = "testing"))]
#[cfg(any(test, feature = "testing"))]
impl ModelMm {
    /// A model reservation of `len` bytes at a fixed fake address.
    pub fn new(len: usize) -> ModelMm {
        let start = VirtAddr(0x1000_0000_0000);
        ModelMm {
            range: VaRange {
                start,
                end: start.add(len),
            },
            st: Mutex::new(ModelState::default()),
        }
    }

    /// Runs `op` on each page of `addr..addr+len` the way the CPU does: where the kernel would
    /// fault, calls `fault` (without the model's lock) and retries; where it would signal,
    /// returns the signal. `op(state, target, vpn, offset in page, offset in the buffer, bytes)`.
    fn cpu_access(
        &self,
        addr: VirtAddr,
        len: usize,
        write: bool,
        fault: &dyn Fn(VirtAddr, bool) -> bool,
        mut op: impl FnMut(&mut ModelState, &Target, usize, usize, usize, usize),
    ) -> Result<(), Signal> {
        let mut done = 0;
        while done < len {
            let a = addr.add(done);
            let in_page = a.get() % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - done);
            let mut faults = 0;
            loop {
                {
                    let mut st = lock(&self.st);
                    match st.resolve(a.page().0, write) {
                        Step::Go(t) => {
                            op(&mut st, &t, a.page().0, in_page, done, n);
                            break;
                        }
                        Step::Signal(signo) => {
                            return Err(Signal {
                                addr: a.page_down(),
                                signo,
                            });
                        }
                        Step::Fault => {}
                    }
                }
                if !fault(a.page_down(), write) {
                    return Err(Signal {
                        addr: a.page_down(),
                        signo: libc::SIGBUS,
                    });
                }
                faults += 1;
                assert!(
                    faults <= FAULT_LOOP_BOUND,
                    "model: the {} at {a} faulted {faults} times in a row, each fault served: \
                     a fault loop (the real kernel would hang here)",
                    if write { "store" } else { "load" }
                );
                // The first retry follows the served fault at once, as on the CPU. An access
                // that faults again waits for another thread (a page being removed, say): it
                // yields, so that a scheduler that keeps running the highest-priority thread
                // (PCT lowers the priority of one that yields) never spins it forever.
                if faults > 1 {
                    crate::sync::thread::yield_now();
                }
            }
            done += n;
        }
        Ok(())
    }

    /// hetmem's own access to `addr..addr+len` (a store when `write`): `op` as in
    /// [`ModelMm::cpu_access`]; panics where the kernel would fault or signal (a fault inside a
    /// no-fault zone aborts the process: a bug of the core).
    fn own_access(
        &self,
        addr: VirtAddr,
        len: usize,
        write: bool,
        mut op: impl FnMut(&mut ModelState, &Target, usize, usize, usize, usize),
    ) {
        let mut st = lock(&self.st);
        let mut done = 0;
        while done < len {
            let a = addr.add(done);
            let in_page = a.get() % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - done);
            let what = if write { "wrote" } else { "read" };
            match st.resolve(a.page().0, write) {
                Step::Go(t) => op(&mut st, &t, a.page().0, in_page, done, n),
                Step::Fault => panic!(
                    "hetmem {what} a page at {a} that would fault (missing, write-protected, or \
                     past the end of its file): core bug"
                ),
                Step::Signal(s) => panic!(
                    "hetmem {what} a page at {a} that is not mapped or not accessible \
                     (signal {s}): core bug"
                ),
            }
            done += n;
        }
    }

    /// Creates a file mapping (see [`Mm::map_file`]).
    fn map_fd(
        &self,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
        shared: bool,
        wp: WpMode,
    ) -> io::Result<()> {
        let view = Region::new(r.len(), PAGE_SIZE, Prot::None)?;
        view.map_fd(0, r.len(), Prot::ReadWrite, fd, file_off, true)?;
        let file = ModelFile {
            fd: std::sync::Arc::new(fd.try_clone_to_owned()?),
            view: std::sync::Arc::new(view),
            view_off: 0,
            off: file_off,
            shared,
            wp,
        };
        let (first, last) = (r.start.page().0, r.end.page().0);
        let mut st = lock(&self.st);
        st.remove(first, last);
        st.vmas.insert(
            first,
            ModelVma {
                end: last,
                prot,
                file: Some(file),
            },
        );
        Ok(())
    }
}

#[cfg(any(test, feature = "testing"))]
#[cfg(any(test, feature = "testing"))]
impl Mm for ModelMm {
    fn reservation(&self) -> VaRange {
        self.range
    }
    fn fail_installs(&self, r: Option<VaRange>) -> bool {
        lock(&self.st).failing = r.map(|r| (r.start.page().0, r.end.page().0));
        true
    }
    fn map(&self, r: VaRange, prot: Prot, _mode: FaultMode) -> io::Result<()> {
        let (first, last) = (r.start.page().0, r.end.page().0);
        let mut st = lock(&self.st);
        st.remove(first, last);
        st.vmas.insert(
            first,
            ModelVma {
                end: last,
                prot,
                file: None,
            },
        );
        Ok(())
    }
    fn protect(&self, r: VaRange, prot: Prot) -> io::Result<()> {
        let mut st = lock(&self.st);
        for (_, v) in st.vmas_in(r.start.page().0, r.end.page().0) {
            v.prot = prot;
        }
        Ok(())
    }
    fn unmap(&self, r: VaRange, _registered: &[(VaRange, Registered)]) -> io::Result<()> {
        lock(&self.st).remove(r.start.page().0, r.end.page().0);
        Ok(())
    }
    fn install(
        &self,
        dst: VirtAddr,
        src: &Region,
        off: usize,
        len: usize,
        _mode: FaultMode,
    ) -> Result<(), UffdError> {
        let mut st = lock(&self.st);
        for p in 0..len / PAGE_SIZE {
            let vpn = dst.page().0 + p;
            if st.failing.is_some_and(|(s, e)| (s..e).contains(&vpn)) {
                return Err(UffdError::Os(libc::ENOMEM));
            }
            let Some((start, v)) = st.vma(vpn) else {
                return Err(UffdError::Os(libc::ENOENT));
            };
            let mut data = vec![0u8; PAGE_SIZE].into_boxed_slice();
            match v.file.clone().filter(|f| f.shared) {
                Some(f) => {
                    // UFFDIO_COPY into a shared mapping of the memfd adds the page to the memfd
                    // (not past its end), unprotected.
                    let foff = f.off + ((vpn - start) * PAGE_SIZE) as u64;
                    if foff >= file_size(&f.fd).div_ceil(page_bytes()) * page_bytes() {
                        return Err(UffdError::Os(libc::EFAULT));
                    }
                    if has_page(&f.fd, foff) {
                        continue;
                    }
                    src.read(off + p * PAGE_SIZE, &mut data)
                        .expect("model install source in range");
                    f.view
                        .write(f.view_off + (vpn - start) * PAGE_SIZE, &data)
                        .expect("model view of the memfd in range");
                    if f.wp != WpMode::None {
                        st.unprotected.insert(vpn);
                    }
                }
                None => {
                    if st.pages.contains_key(&vpn) {
                        continue;
                    }
                    src.read(off + p * PAGE_SIZE, &mut data)
                        .expect("model install source in range");
                    st.pages.insert(vpn, ModelPage { data, wp: false });
                }
            }
        }
        Ok(())
    }
    fn map_zero_pages(&self, r: VaRange, _mode: FaultMode) -> Result<(), UffdError> {
        let mut st = lock(&self.st);
        for vpn in r.start.page().0..r.end.page().0 {
            if st.failing.is_some_and(|(s, e)| (s..e).contains(&vpn)) {
                return Err(UffdError::Os(libc::ENOMEM));
            }
            if st.vma(vpn).is_none() {
                return Err(UffdError::Os(libc::ENOENT));
            }
            st.pages.entry(vpn).or_insert_with(|| ModelPage {
                data: vec![0u8; PAGE_SIZE].into_boxed_slice(),
                wp: true,
            });
        }
        Ok(())
    }
    fn zap(&self, r: VaRange) -> io::Result<()> {
        // Anonymous pages (and private copies) go; a shared file mapping's pages stay in the
        // memfd (the next access maps them again), and the zap keeps their protection state.
        let mut st = lock(&self.st);
        for p in r.start.page().0..r.end.page().0 {
            st.pages.remove(&p);
        }
        Ok(())
    }
    fn write_protect(&self, r: VaRange, on: bool, _mode: FaultMode) -> Result<(), UffdError> {
        let mut st = lock(&self.st);
        for p in r.start.page().0..r.end.page().0 {
            if let Some(pg) = st.pages.get_mut(&p) {
                pg.wp = on;
            }
        }
        Ok(())
    }
    fn wake(&self, _r: VaRange, _mode: FaultMode) {}
    fn read(&self, addr: VirtAddr, dst: &mut [u8]) {
        self.own_access(addr, dst.len(), false, |st, t, vpn, in_page, done, n| {
            st.load(t, vpn, in_page, &mut dst[done..done + n])
        });
    }
    fn write(&self, addr: VirtAddr, src: &[u8]) {
        self.own_access(addr, src.len(), true, |st, t, vpn, in_page, done, n| {
            st.store(t, vpn, in_page, &src[done..done + n])
        });
    }
    fn copy_to(&self, addr: VirtAddr, dst: &Region, off: usize, len: usize) {
        let mut buf = vec![0u8; len];
        self.read(addr, &mut buf);
        dst.write(off, &buf)
            .expect("model copy_to destination in range");
    }
    fn cpu_read(
        &self,
        addr: VirtAddr,
        dst: &mut [u8],
        fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<(), Signal> {
        self.cpu_access(
            addr,
            dst.len(),
            false,
            fault,
            |st, t, vpn, in_page, done, n| st.load(t, vpn, in_page, &mut dst[done..done + n]),
        )
    }
    fn cpu_write(
        &self,
        addr: VirtAddr,
        src: &[u8],
        fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<(), Signal> {
        self.cpu_access(
            addr,
            src.len(),
            true,
            fault,
            |st, t, vpn, in_page, done, n| st.store(t, vpn, in_page, &src[done..done + n]),
        )
    }
    fn cpu_fetch_add(
        &self,
        addr: VirtAddr,
        v: u64,
        fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> Result<u64, Signal> {
        let mut old = 0;
        self.cpu_access(addr, 8, true, fault, |st, t, vpn, in_page, _, _| {
            let mut b = [0u8; 8];
            st.load(t, vpn, in_page, &mut b);
            old = u64::from_ne_bytes(b);
            st.store(t, vpn, in_page, &old.wrapping_add(v).to_ne_bytes());
        })?;
        Ok(old)
    }
    fn user_mode_only(&self) -> bool {
        false
    }
    fn map_file(
        &self,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
        shared: bool,
    ) -> io::Result<()> {
        // As the kernel side: only writable shared mappings track stores, protected from the
        // start (every entry gets a marker).
        let wp = if shared && prot.writable() {
            WpMode::Async
        } else {
            WpMode::None
        };
        self.map_fd(r, fd, file_off, prot, shared, wp)
    }
    fn map_file_sync(
        &self,
        r: VaRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        prot: Prot,
    ) -> io::Result<()> {
        self.map_fd(r, fd, file_off, prot, true, WpMode::Sync)
    }
    fn file_write_protect(&self, r: VaRange, on: bool) -> io::Result<()> {
        let mut st = lock(&self.st);
        let (first, last) = (r.start.page().0, r.end.page().0);
        let sync: Vec<(usize, usize)> = st
            .vmas
            .range(..last)
            .filter(|(_, v)| v.end > first)
            .filter(|(_, v)| v.file.as_ref().is_some_and(|f| f.wp == WpMode::Sync))
            .map(|(&s, v)| (s.max(first), v.end.min(last)))
            .collect();
        for (s, e) in sync {
            for p in s..e {
                if on {
                    st.unprotected.remove(&p);
                } else {
                    st.unprotected.insert(p);
                }
            }
        }
        Ok(())
    }
    fn scan_written(&self, r: VaRange) -> io::Result<Vec<VaRange>> {
        let mut st = lock(&self.st);
        let (first, last) = (r.start.page().0, r.end.page().0);
        // PM_SCAN_CHECK_WPASYNC: every mapping in the range must track stores asynchronously.
        let all_async = st
            .vmas
            .range(..last)
            .filter(|(_, v)| v.end > first)
            .all(|(_, v)| {
                v.file
                    .as_ref()
                    .is_some_and(|f| f.shared && f.wp == WpMode::Async)
            });
        if !all_async {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut hits: Vec<usize> = st
            .unprotected
            .iter()
            .copied()
            .filter(|p| (first..last).contains(p) && st.vma(*p).is_some())
            .collect();
        hits.sort_unstable();
        let mut out: Vec<VaRange> = Vec::new();
        for p in hits {
            // Reported, and protected again (PM_SCAN_WP_MATCHING).
            st.unprotected.remove(&p);
            let a = crate::addr::Vpn(p).addr();
            match out.last_mut() {
                Some(run) if run.end == a => run.end = a.add(PAGE_SIZE),
                _ => out.push(VaRange {
                    start: a,
                    end: a.add(PAGE_SIZE),
                }),
            }
        }
        Ok(out)
    }
    fn track_writes(&self, r: VaRange) -> io::Result<()> {
        let mut st = lock(&self.st);
        let (first, last) = (r.start.page().0, r.end.page().0);
        for (_, v) in st.vmas_in(first, last) {
            if let Some(f) = v.file.as_mut().filter(|f| f.shared && f.wp != WpMode::Sync) {
                f.wp = WpMode::Async;
            }
        }
        st.unprotected.retain(|&p| !(first..last).contains(&p));
        Ok(())
    }
    fn forget_moved(&self, _moved: VaRange, _mode: FaultMode) -> io::Result<()> {
        Ok(())
    }
    fn disown(&self, _r: VaRange) {}
}
