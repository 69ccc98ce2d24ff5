//! The kernel boundary: what hetmem's core asks of the operating system for the CPU's view of
//! an address space, behind one trait ([`Mm`]) with two implementations:
//!
//! * [`KernelMm`]: the real one. A reserved range of anonymous private memory; mappings are
//!   carved out of it and registered with a userfaultfd (MISSING and WP modes). Faults are
//!   served in the faulting thread (SIGBUS mode) or by a handler thread (thread mode), chosen per
//!   mapping ([`FaultMode`]).
//! * `ModelMm`: an in-memory model of the same contract (a map of present pages with a
//!   write-protect bit). CPU accesses through it call the core's fault handler directly, so the
//!   core's state machine can be explored under `shuttle`, which cannot drive userfaultfd or
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

use std::io;

use crate::addr::{PAGE_SIZE, VaRange, VirtAddr};
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

/// The operating-system side of an address space (see the module doc for the contract).
pub trait Mm: Send + Sync {
    /// The reserved range.
    fn reservation(&self) -> VaRange;
    /// Creates a mapping over a free (never-registered) part of the reservation.
    fn map(&self, r: VaRange, prot: Prot, mode: FaultMode) -> io::Result<()>;
    /// Changes the protection of a mapped range.
    fn protect(&self, r: VaRange, prot: Prot) -> io::Result<()>;
    /// Unmaps a range: its pages are dropped and accesses fault with SIGSEGV.
    fn unmap(&self, r: VaRange) -> io::Result<()>;
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
    /// Drops the pages of `r` (the next access faults).
    fn zap(&self, r: VaRange) -> io::Result<()>;
    /// Sets or clears write protection of the present pages of `r` (clearing wakes writers).
    fn write_protect(&self, r: VaRange, on: bool, mode: FaultMode) -> Result<(), UffdError>;
    /// Wakes threads waiting on faults in `r` (thread mode).
    fn wake(&self, r: VaRange, mode: FaultMode);
    /// Copies out of present pages.
    fn read(&self, addr: VirtAddr, dst: &mut [u8]);
    /// Copies into present, writable pages.
    fn write(&self, addr: VirtAddr, src: &[u8]);
    /// Copies `len` bytes of present pages at `addr` into `dst[off..]`.
    fn copy_to(&self, addr: VirtAddr, dst: &Region, off: usize, len: usize);
    /// A user CPU read (real loads: may fault into the core through `fault`).
    fn cpu_read(&self, addr: VirtAddr, dst: &mut [u8], fault: &dyn Fn(VirtAddr, bool) -> bool);
    /// A user CPU write (real stores: may fault into the core through `fault`).
    fn cpu_write(&self, addr: VirtAddr, src: &[u8], fault: &dyn Fn(VirtAddr, bool) -> bool);
    /// A user CPU atomic fetch-add on an aligned `u64`.
    fn cpu_fetch_add(&self, addr: VirtAddr, v: u64, fault: &dyn Fn(VirtAddr, bool) -> bool) -> u64;
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
    /// Maps the range `r` of the reservation again (PROT_NONE, unregistered, never replacing
    /// a mapping: a direct mremap left it unmapped, and the program may have mapped something
    /// else there meanwhile, EEXIST then).
    fn restore_reservation(&self, r: VaRange) -> io::Result<()>;
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
        })
    }
}

impl Drop for ThreadService {
    fn drop(&mut self) {
        let _ = sys::signal_stop(&self.stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The real kernel boundary: a reservation of anonymous private memory and userfaultfds.
pub struct KernelMm {
    res: Region,
    /// The signal-mode userfaultfd, with its event reader.
    sig: ThreadService,
    thr: Mutex<Option<ThreadService>>,
    /// The userfaultfd of file mappings (with its event reader) and the pagemap scanner, made
    /// on first use.
    file: Mutex<Option<(ThreadService, sys::PagemapScanner)>>,
    /// The userfaultfd of file mappings with synchronous write-protect (with its event
    /// reader), made on first use.
    file_sync: Mutex<Option<ThreadService>>,
    force_umo: bool,
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
    /// `user_mode_only` opens user-mode-only userfaultfds even where a full one is allowed.
    pub fn new(len: usize, user_mode_only: bool) -> io::Result<KernelMm> {
        sys::check_page_size()?;
        let res = Region::new(len, crate::addr::LARGE_PAGE_SIZE, Prot::None)?;
        let sig = ThreadService::start(
            std::sync::Arc::new(Uffd::open(UffdDelivery::Signal, user_mode_only)?),
            "hetmem-events",
        )?;
        sys::install_sigbus_handler()?;
        Ok(KernelMm {
            res,
            sig,
            thr: Mutex::new(None),
            file: Mutex::new(None),
            file_sync: Mutex::new(None),
            force_umo: user_mode_only,
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
        let uffd = std::sync::Arc::new(Uffd::open(UffdDelivery::Thread, self.force_umo)?);
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
            let _ = self.res.remap_fresh(off, r.len(), Prot::None);
            return Err(e);
        }
        Ok(())
    }
}

/// The reader of a userfaultfd (see [`ThreadService`]): serves each fault message through the
/// fault registry and wakes the faulting thread; follows each direct mremap (REMAP event) through
/// the registry too. The window of pending moves ([`sys::RemapWindow`]) opens before the read,
/// so that a signal-mode access to a moved range made after the program's mremap returned (the
/// kernel releases it when the event is read) waits for the move to be followed. It never
/// touches managed memory itself.
fn serve_uffd(uffd: &Uffd, stop: &std::os::fd::OwnedFd) {
    loop {
        match uffd.wait(stop) {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
        let _window = sys::RemapWindow::open();
        while let Ok(Some(m)) = uffd.read_msg() {
            match m {
                sys::UffdMsg::Fault(f) => {
                    let page = f.addr & !(PAGE_SIZE - 1);
                    sys::dispatch_thread_fault(page, f.write || f.wp, f.tid);
                    // Whatever the outcome, wake the faulting thread: it retries the access and
                    // faults again if the page is still missing.
                    let _ = uffd.wake(page, PAGE_SIZE);
                }
                sys::UffdMsg::Remap { from, to, len } => {
                    sys::dispatch_remap(from, to, len);
                }
                sys::UffdMsg::Other(_) => {}
            }
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

    fn unmap(&self, r: VaRange) -> io::Result<()> {
        // MAP_FIXED PROT_NONE drops the pages and the registration at once: afterwards an access
        // gets SIGSEGV, as on any unmapped address.
        self.res.remap_fresh(self.off(r.start), r.len(), Prot::None)
    }

    fn install(
        &self,
        dst: VirtAddr,
        src: &Region,
        off: usize,
        len: usize,
        mode: FaultMode,
    ) -> Result<(), UffdError> {
        self.with_uffd(mode, |u| u.fill(dst.get(), src, off, len))
    }

    fn zap(&self, r: VaRange) -> io::Result<()> {
        self.res.discard(self.off(r.start), r.len())
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

    fn read(&self, addr: VirtAddr, dst: &mut [u8]) {
        let _zone =
            sys::NoFaultZone::enter("hetmem's own copy of managed memory (under a hetmem lock)");
        self.res
            .read(self.off(addr), dst)
            .expect("read of a range inside the reservation")
    }

    fn write(&self, addr: VirtAddr, src: &[u8]) {
        let _zone =
            sys::NoFaultZone::enter("hetmem's own copy of managed memory (under a hetmem lock)");
        self.res
            .write(self.off(addr), src)
            .expect("write of a range inside the reservation")
    }

    fn copy_to(&self, addr: VirtAddr, dst: &Region, off: usize, len: usize) {
        let _zone =
            sys::NoFaultZone::enter("hetmem's own copy of managed memory (under a hetmem lock)");
        self.res
            .copy_to(self.off(addr), dst, off, len)
            .expect("copy of a range inside the reservation to a frame")
    }

    fn cpu_read(&self, addr: VirtAddr, dst: &mut [u8], _fault: &dyn Fn(VirtAddr, bool) -> bool) {
        sys::cpu_read(addr.get(), dst)
    }

    fn cpu_write(&self, addr: VirtAddr, src: &[u8], _fault: &dyn Fn(VirtAddr, bool) -> bool) {
        sys::cpu_write(addr.get(), src)
    }

    fn cpu_fetch_add(
        &self,
        addr: VirtAddr,
        v: u64,
        _fault: &dyn Fn(VirtAddr, bool) -> bool,
    ) -> u64 {
        sys::cpu_fetch_add_u64(addr.get(), v)
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
        self.with_uffd(mode, |u| u.unregister_moved(moved.start.get(), moved.len()))
    }

    fn restore_reservation(&self, r: VaRange) -> io::Result<()> {
        self.res.map_hole_again(self.off(r.start), r.len())
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

#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
struct ModelPage {
    data: Box<[u8]>,
    wp: bool,
}

/// An in-memory model of [`Mm`]: a map from page number to present page. CPU accesses call the
/// core's fault handler when the page is missing (or write-protected, for stores), exactly as
/// the kernel raises a userfault.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
pub struct ModelMm {
    range: VaRange,
    pages: Mutex<std::collections::HashMap<usize, ModelPage>>,
}

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
            pages: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn each_page(addr: VirtAddr, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        // f(vpn, offset in page, byte offset in the buffer) for each page touched
        let mut done = 0;
        while done < len {
            let a = addr.get() + done;
            let in_page = a % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - done);
            f(a / PAGE_SIZE, in_page, done);
            done += n;
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl Mm for ModelMm {
    fn reservation(&self) -> VaRange {
        self.range
    }
    fn map(&self, _r: VaRange, _prot: Prot, _mode: FaultMode) -> io::Result<()> {
        Ok(())
    }
    fn protect(&self, _r: VaRange, _prot: Prot) -> io::Result<()> {
        Ok(())
    }
    fn unmap(&self, r: VaRange) -> io::Result<()> {
        self.zap(r)
    }
    fn install(
        &self,
        dst: VirtAddr,
        src: &Region,
        off: usize,
        len: usize,
        _mode: FaultMode,
    ) -> Result<(), UffdError> {
        let mut pages = lock(&self.pages);
        for p in 0..len / PAGE_SIZE {
            if pages.contains_key(&(dst.page().0 + p)) {
                continue;
            }
            let mut data = vec![0u8; PAGE_SIZE].into_boxed_slice();
            src.read(off + p * PAGE_SIZE, &mut data)
                .expect("model install source in range");
            pages.insert(dst.page().0 + p, ModelPage { data, wp: false });
        }
        Ok(())
    }
    fn zap(&self, r: VaRange) -> io::Result<()> {
        let mut pages = lock(&self.pages);
        for p in r.start.page().0..r.end.page().0 {
            pages.remove(&p);
        }
        Ok(())
    }
    fn write_protect(&self, r: VaRange, on: bool, _mode: FaultMode) -> Result<(), UffdError> {
        let mut pages = lock(&self.pages);
        for p in r.start.page().0..r.end.page().0 {
            if let Some(pg) = pages.get_mut(&p) {
                pg.wp = on;
            }
        }
        Ok(())
    }
    fn wake(&self, _r: VaRange, _mode: FaultMode) {}
    fn read(&self, addr: VirtAddr, dst: &mut [u8]) {
        let pages = lock(&self.pages);
        let len = dst.len();
        Self::each_page(addr, len, |vpn, in_page, done| {
            let n = (PAGE_SIZE - in_page).min(len - done);
            let pg = pages
                .get(&vpn)
                .expect("hetmem read a missing page: core bug");
            dst[done..done + n].copy_from_slice(&pg.data[in_page..in_page + n]);
        });
    }
    fn write(&self, addr: VirtAddr, src: &[u8]) {
        let mut pages = lock(&self.pages);
        Self::each_page(addr, src.len(), |vpn, in_page, done| {
            let n = (PAGE_SIZE - in_page).min(src.len() - done);
            let pg = pages
                .get_mut(&vpn)
                .expect("hetmem wrote a missing page: core bug");
            assert!(!pg.wp, "hetmem wrote a write-protected page: core bug");
            pg.data[in_page..in_page + n].copy_from_slice(&src[done..done + n]);
        });
    }
    fn copy_to(&self, addr: VirtAddr, dst: &Region, off: usize, len: usize) {
        let mut buf = vec![0u8; len];
        self.read(addr, &mut buf);
        dst.write(off, &buf)
            .expect("model copy_to destination in range");
    }
    fn cpu_read(&self, addr: VirtAddr, dst: &mut [u8], fault: &dyn Fn(VirtAddr, bool) -> bool) {
        let len = dst.len();
        let mut done = 0;
        while done < len {
            let a = addr.add(done);
            let n = (PAGE_SIZE - a.get() % PAGE_SIZE).min(len - done);
            loop {
                {
                    let pages = lock(&self.pages);
                    if let Some(pg) = pages.get(&a.page().0) {
                        let o = a.get() % PAGE_SIZE;
                        dst[done..done + n].copy_from_slice(&pg.data[o..o + n]);
                        break;
                    }
                }
                assert!(fault(a.page_down(), false), "model: SIGSEGV on read at {a}");
            }
            done += n;
        }
    }
    fn cpu_write(&self, addr: VirtAddr, src: &[u8], fault: &dyn Fn(VirtAddr, bool) -> bool) {
        let len = src.len();
        let mut done = 0;
        while done < len {
            let a = addr.add(done);
            let n = (PAGE_SIZE - a.get() % PAGE_SIZE).min(len - done);
            loop {
                {
                    let mut pages = lock(&self.pages);
                    if let Some(pg) = pages.get_mut(&a.page().0)
                        && !pg.wp
                    {
                        let o = a.get() % PAGE_SIZE;
                        pg.data[o..o + n].copy_from_slice(&src[done..done + n]);
                        break;
                    }
                }
                assert!(fault(a.page_down(), true), "model: SIGSEGV on write at {a}");
            }
            done += n;
        }
    }
    fn cpu_fetch_add(&self, addr: VirtAddr, v: u64, fault: &dyn Fn(VirtAddr, bool) -> bool) -> u64 {
        loop {
            {
                let mut pages = lock(&self.pages);
                if let Some(pg) = pages.get_mut(&addr.page().0)
                    && !pg.wp
                {
                    let o = addr.get() % PAGE_SIZE;
                    let old = u64::from_ne_bytes(pg.data[o..o + 8].try_into().expect("8 bytes"));
                    pg.data[o..o + 8].copy_from_slice(&old.wrapping_add(v).to_ne_bytes());
                    return old;
                }
            }
            assert!(
                fault(addr.page_down(), true),
                "model: SIGSEGV on atomic at {addr}"
            );
        }
    }
    fn user_mode_only(&self) -> bool {
        false
    }
    fn map_file(
        &self,
        _r: VaRange,
        _fd: std::os::fd::BorrowedFd<'_>,
        _file_off: u64,
        _prot: Prot,
        _shared: bool,
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the in-memory kernel model has no file mappings",
        ))
    }
    fn scan_written(&self, _r: VaRange) -> io::Result<Vec<VaRange>> {
        Ok(Vec::new())
    }
    fn track_writes(&self, _r: VaRange) -> io::Result<()> {
        Ok(())
    }
    fn forget_moved(&self, _moved: VaRange, _mode: FaultMode) -> io::Result<()> {
        Ok(())
    }
    fn restore_reservation(&self, _r: VaRange) -> io::Result<()> {
        Ok(())
    }
    fn map_file_sync(
        &self,
        _r: VaRange,
        _fd: std::os::fd::BorrowedFd<'_>,
        _file_off: u64,
        _prot: Prot,
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the in-memory kernel model has no file mappings",
        ))
    }
    fn file_write_protect(&self, _r: VaRange, _on: bool) -> io::Result<()> {
        Ok(())
    }
}
