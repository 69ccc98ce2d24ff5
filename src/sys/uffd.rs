//! userfaultfd: the ioctls hetmem uses and its messages (faults, REMAP events).

#![allow(unsafe_code)]

use super::*;

// ---------------------------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------------------------

const UFFDIO: u8 = 0xAA;
const OP_API: Opcode = opcode::read_write::<uapi::uffdio_api>(UFFDIO, uapi::_UFFDIO_API as u8);
const OP_REGISTER: Opcode =
    opcode::read_write::<uapi::uffdio_register>(UFFDIO, uapi::_UFFDIO_REGISTER as u8);
const OP_UNREGISTER: Opcode =
    opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_UNREGISTER as u8);
const OP_WAKE: Opcode = opcode::read::<uapi::uffdio_range>(UFFDIO, uapi::_UFFDIO_WAKE as u8);
const OP_COPY: Opcode = opcode::read_write::<uapi::uffdio_copy>(UFFDIO, uapi::_UFFDIO_COPY as u8);
const OP_WRITEPROTECT: Opcode =
    opcode::read_write::<uapi::uffdio_writeprotect>(UFFDIO, uapi::_UFFDIO_WRITEPROTECT as u8);
const OP_MOVE: Opcode = opcode::read_write::<uapi::uffdio_move>(UFFDIO, uapi::_UFFDIO_MOVE as u8);
const OP_ZEROPAGE: Opcode =
    opcode::read_write::<uapi::uffdio_zeropage>(UFFDIO, uapi::_UFFDIO_ZEROPAGE as u8);

/// Runs an ioctl that populates missing pages (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`) over `len`
/// bytes at `dst` until all of them are populated, resuming after a partial success:
/// `op(from, to)` issues it for the bytes `from..to` (offsets from `dst`) and returns its result
/// and the bytes it populated before an error. A page already there (EEXIST) is stepped over: Ok
/// means every page of the range is populated, whoever did it. EAGAIN means the mappings are
/// changing (a direct mremap, munmap or madvise posted an event that has not been read yet, or
/// was read but the thread that called it has not yet left the kernel; the window,
/// `mmap_changing`, closes once the event is read and that thread runs again): `wait` reads what
/// is pending if the caller is the fd's reader (nobody else would: an mremap posts UNMAP of the
/// old range after its REMAP, which the reader may be following with this very fill), then
/// yields to let the other thread run, bounded ([`Patience`]). After such a wait, the parts of the range a
/// program's drop (a REMOVE read and not followed yet) covers are not filled: the drop may have
/// run already, and a fill after it would leave the data it dropped in place (found by review:
/// a migration back to system memory racing the program's madvise); those pages stay missing,
/// as the drop leaves them.
///
/// With `over_drops`, every page is filled, dropped or not (the zero page mapped under a copy
/// that faulted on a dropped page: [`Uffd::zeropage_over_drops`]).
fn fill_resuming(
    dst: usize,
    len: usize,
    over_drops: bool,
    mut op: impl FnMut(usize, usize) -> (Result<(), UffdError>, i64),
    mut wait: impl FnMut(),
) -> Result<(), UffdError> {
    let not_dropped = |dst, done, len| {
        if over_drops {
            (done, len)
        } else {
            not_dropped(dst, done, len)
        }
    };
    let (mut done, mut to) = not_dropped(dst, 0, len);
    let mut patience = Patience::new();
    while done < len {
        match op(done, to) {
            (Ok(()), _) if to == len => return Ok(()),
            (Ok(()), _) => {
                done = to;
                (done, to) = not_dropped(dst, done, len);
            }
            (Err(_), n) if n > 0 => done += n as usize,
            (Err(UffdError::Exists), _) => done += PAGE_SIZE,
            (Err(UffdError::Again), _) if patience.more() => {
                wait();
                rustix::thread::sched_yield();
                (done, to) = not_dropped(dst, done, len);
            }
            (Err(other), _) => return Err(other),
        }
    }
    Ok(())
}

/// From offset `done` of the `len` bytes at `dst`: the next part not covered by a REMOVE read
/// and not followed yet, as offsets `(from, to)` (`from == len`: none is left).
fn not_dropped(dst: usize, mut done: usize, len: usize) -> (usize, usize) {
    loop {
        let mut first: Option<(usize, usize)> = None;
        removes_pending_in(dst + done, dst + len, |s, e| {
            if first.is_none_or(|(fs, _)| s < fs) {
                first = Some((s, e));
            }
        });
        match first {
            Some((s, e)) if s <= dst + done => {
                // Dropped from here on: step over it.
                done = (e - dst).next_multiple_of(PAGE_SIZE).min(len);
                if done >= len {
                    return (len, len);
                }
            }
            Some((s, _)) => return (done, (s - dst) & !(PAGE_SIZE - 1)),
            None => return (done, len),
        }
    }
}

/// Reads of userfaultfd messages in progress (any thread), and `UFFD_EVENT_REMOVE`s read and
/// not followed yet (their ranges in [`PENDING_REMOVES`]). The program's `madvise` returns as
/// soon as its event is *read*; until the reader has followed it, an access to pages in device
/// memory would still find the data the program dropped. So the paths that give a page's data
/// out (a CPU fault, a device command) first wait for both to be empty
/// ([`wait_removes_followed`]): a read started before the program's madvise returned, and the
/// REMOVE it read is recorded before the read ends.
static MSG_READS: AtomicUsize = AtomicUsize::new(0);
static REMOVES_UNFOLLOWED: AtomicUsize = AtomicUsize::new(0);

/// Most distinct ranges of REMOVEs read and not followed at once: the reader reads no message
/// while the table is full (it follows one first). A reader waiting for a lock reads and keeps
/// the events meanwhile; a program dropping the same ranges again and again (an allocator)
/// takes one slot per range (found from outside: with one slot per event the table filled
/// while the reader waited for a device's lock, and the device's fault behind the events was
/// never read: a hang). A full table is a hazard in itself: what the reader waits for (a lock
/// holder's fill, a migration's own drop of pages shared with a child, whose event must be
/// read) may need it to read, and a program's next `madvise` keeps the mappings marked
/// changing until it does (found from outside, with 256 slots: a program dropping random
/// ranges in a loop while it forked, a device migrating; the reader waited for a migration
/// whose drop waited for the reader, for good). So the table is large (1.5 MiB of zeroed
/// static memory, touched only as far as it is used), and every scan of it stops at its
/// high-water mark ([`PENDING_SLOTS_HIGH`]).
const PENDING_REMOVE_SLOTS: usize = 65536;

/// Slots of [`PENDING_REMOVES`] in use, and one past the last slot used since the table was
/// last empty (no slot at or past it is in use). Written under [`PENDING_REMOVES_WRITE`].
static PENDING_SLOTS_USED: AtomicUsize = AtomicUsize::new(0);
static PENDING_SLOTS_HIGH: AtomicUsize = AtomicUsize::new(0);

/// The slots of [`PENDING_REMOVES`] that may be in use.
fn pending_slots() -> &'static [PendingRemove] {
    &PENDING_REMOVES[..PENDING_SLOTS_HIGH
        .load(Ordering::SeqCst)
        .min(PENDING_REMOVE_SLOTS)]
}

/// A range of REMOVEs read and not followed yet: `end` 0 for a free slot, `count` the REMOVEs
/// of exactly that range.
struct PendingRemove {
    start: AtomicUsize,
    end: AtomicUsize,
    count: AtomicUsize,
}

/// The ranges of the REMOVEs read and not followed yet. Written by the readers of userfaultfd
/// messages, one at a time ([`PENDING_REMOVES_WRITE`]); read by every thread that copies device
/// data into the CPU view ([`removes_pending_in`]), with no lock.
#[allow(clippy::declare_interior_mutable_const)]
const FREE_SLOT: PendingRemove = PendingRemove {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    count: AtomicUsize::new(0),
};
static PENDING_REMOVES: [PendingRemove; PENDING_REMOVE_SLOTS] = [FREE_SLOT; PENDING_REMOVE_SLOTS];

impl PendingRemove {
    fn is(&self, start: usize, end: usize) -> bool {
        self.end.load(Ordering::SeqCst) == end && self.start.load(Ordering::SeqCst) == start
    }
}

/// Serialises the writers of [`PENDING_REMOVES`] (each thread-mode handler thread reads
/// REMOVEs, as the event reader does); its readers take no lock.
static PENDING_REMOVES_WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn note_remove(start: usize, end: usize) {
    let _w = PENDING_REMOVES_WRITE
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // One pass: the slot of this very range, else the first free one.
    let mut free = None;
    for (i, p) in pending_slots().iter().enumerate() {
        if p.is(start, end) {
            p.count.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if free.is_none() && p.end.load(Ordering::SeqCst) == 0 {
            free = Some(i);
        }
    }
    let high = PENDING_SLOTS_HIGH.load(Ordering::SeqCst);
    let slot = match free {
        Some(i) => i,
        None if high < PENDING_REMOVE_SLOTS => high,
        // Not reached: the readers read nothing once the table counts as full, which leaves
        // [`PENDING_HEADROOM`] slots for those that checked at the same time.
        None => return,
    };
    let p = &PENDING_REMOVES[slot];
    // `end` last: it publishes the slot; then the high-water mark takes it in.
    p.start.store(start, Ordering::SeqCst);
    p.count.store(1, Ordering::SeqCst);
    p.end.store(end, Ordering::SeqCst);
    PENDING_SLOTS_USED.fetch_add(1, Ordering::SeqCst);
    if slot == high {
        PENDING_SLOTS_HIGH.store(high + 1, Ordering::SeqCst);
    }
}

/// Slots kept free when the table counts as full: the readers check it without the writers'
/// lock, so a few may each record one more REMOVE (found by review).
const PENDING_HEADROOM: usize = 64;

fn table_full() -> bool {
    PENDING_SLOTS_USED.load(Ordering::SeqCst) + PENDING_HEADROOM >= PENDING_REMOVE_SLOTS
}

/// Waits (yielding: it may run in signal context) until no userfaultfd message is being read
/// and every REMOVE read has been followed (see `MSG_READS`). On a reader thread (which
/// follows them) and in a forked child (no reader) it returns at once.
pub fn wait_removes_followed() {
    // `MSG_READS` first: a read that ended before it was loaded counted its REMOVE before (a
    // check the other way round could miss one read meanwhile: found by review).
    if MSG_READS.load(Ordering::SeqCst) == 0 && REMOVES_UNFOLLOWED.load(Ordering::SeqCst) == 0 {
        return;
    }
    if READER.with(|r| !r.borrow().0.is_empty()) {
        return;
    }
    while MSG_READS.load(Ordering::SeqCst) != 0 || REMOVES_UNFOLLOWED.load(Ordering::SeqCst) != 0 {
        rustix::thread::sched_yield();
    }
}

/// Calls `f(s, e)` for each part of `start..end` that a REMOVE read and not followed yet covers,
/// once no message is being read. A thread that has just copied device data into the CPU view
/// (a migration back, a fault-back) calls it: the program's drop of those pages may have run
/// between the event's read and the copy, and would leave the copy in place, stale, for good
/// (found by review); the caller drops such parts again (they read zeros, a valid outcome of a
/// drop concurrent with the copy).
pub fn removes_pending_in(start: usize, end: usize, mut f: impl FnMut(usize, usize)) {
    // `MSG_READS` first (as in `wait_removes_followed`).
    if MSG_READS.load(Ordering::SeqCst) == 0 && REMOVES_UNFOLLOWED.load(Ordering::SeqCst) == 0 {
        return;
    }
    while MSG_READS.load(Ordering::SeqCst) != 0 {
        rustix::thread::sched_yield();
    }
    for p in pending_slots() {
        // `end` first: a slot published after this load is one this call need not see.
        let re = p.end.load(Ordering::SeqCst);
        let rs = p.start.load(Ordering::SeqCst);
        // A slot freed and taken again between the two loads would give a range nobody
        // dropped (found by review): `end` again; a change means the range read was followed.
        if re != 0 && p.end.load(Ordering::SeqCst) == re && rs < end && start < re {
            f(rs.max(start), re.min(end));
        }
    }
}

/// The reader followed the REMOVE of `start..end` it read (or dropped it unfollowed).
pub fn remove_followed(start: usize, end: usize) {
    let _w = PENDING_REMOVES_WRITE
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = pending_slots().iter().find(|p| p.is(start, end))
        && p.count.fetch_sub(1, Ordering::SeqCst) <= 1
    {
        p.end.store(0, Ordering::SeqCst);
        if PENDING_SLOTS_USED.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Empty: scans stop at once again.
            PENDING_SLOTS_HIGH.store(0, Ordering::SeqCst);
        }
    }
    REMOVES_UNFOLLOWED.fetch_sub(1, Ordering::SeqCst);
}

/// hetmem's own drops in place that raise REMOVE events (pages the sink could not take),
/// recorded before the drop, so that the reader tells their events from the program's as it
/// reads them: they are neither followed nor counted as the program's drops (a fill skipping
/// them, or a copy dropped again over them, would lose data: found by a test). Bounded (a drop
/// of a range whose userfaultfd reports no REMOVE is never consumed; the oldest goes first).
static OWN_REMOVES: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

fn own_removes() -> std::sync::MutexGuard<'static, Vec<(usize, usize)>> {
    OWN_REMOVES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a drop of hetmem's own of `start..end` that raises REMOVE events.
pub fn record_own_remove(start: usize, end: usize) {
    let mut o = own_removes();
    if o.len() >= 64 {
        o.remove(0);
    }
    o.push((start, end));
}

/// Forgets a drop recorded with [`record_own_remove`] that raised no event after all.
///
/// Every record inside the range goes: a drop that failed part-way (a run across an mlocked
/// mapping) raised the events of the mappings before the failure, which consumed the record's
/// front, and left the rest recorded as `(end of those, end)`; looked up as `(start, end)`, that
/// rest stayed, and the program's next drop there was taken for hetmem's own and not followed
/// (found by reading the code after a flaky test).
pub fn cancel_own_remove(start: usize, end: usize) {
    own_removes().retain(|&(s, e)| !(start <= s && e <= end));
}

/// Forgets the recorded drops overlapping `start..end` (the range is unregistered: their events
/// were read by now, or never will be).
pub fn forget_own_removes(start: usize, end: usize) {
    own_removes().retain(|&(s, e)| e <= start || end <= s);
}

/// Whether the REMOVE of `start..end` is one of hetmem's own drops (consumed). The kernel
/// reports a drop as one event per mapping it spans, in address order: an event of ours starts
/// where the part of the drop not reported yet starts (a program's drop inside ours that
/// starts elsewhere is the program's: found by review).
fn take_own_remove(start: usize, end: usize) -> bool {
    let mut o = own_removes();
    let Some(i) = o.iter().position(|&(s, e)| s == start && end <= e) else {
        return false;
    };
    let (_, e) = o.swap_remove(i);
    if end < e {
        o.push((end, e));
    }
    true
}

/// In a forked child: no reader reads or follows anything (the parent's counts are void).
pub fn forget_unfollowed_removes() {
    REMOVES_UNFOLLOWED.store(0, Ordering::SeqCst);
    MSG_READS.store(0, Ordering::SeqCst);
    for p in pending_slots() {
        p.end.store(0, Ordering::SeqCst);
    }
    PENDING_SLOTS_USED.store(0, Ordering::SeqCst);
    PENDING_SLOTS_HIGH.store(0, Ordering::SeqCst);
}

/// A reader thread's fds, and the messages (with their fd) it read while one of its own fills
/// waited.
type ReaderState = (Vec<i32>, std::collections::VecDeque<(i32, UffdMsg)>);

thread_local! {
    /// On a reader thread of userfaultfds ([`Uffd::become_reader`]): see [`ReaderState`]
    /// ([`Uffd::next_msg`]).
    static READER: std::cell::RefCell<ReaderState> =
        const { std::cell::RefCell::new((Vec::new(), std::collections::VecDeque::new())) };
}

/// How a userfaultfd delivers faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdDelivery {
    /// `UFFD_FEATURE_SIGBUS`: the faulting thread gets SIGBUS and serves the fault itself.
    Signal,
    /// Faults are queued as messages and served by a handler thread.
    Thread,
}

/// `UFFDIO_COPY` of a zero-filled page to the missing page at `addr` on `fd`, or over a marker
/// there ([`Uffd::mark_missing`]), which `UFFDIO_ZEROPAGE` refuses as if a page were there
/// (EEXIST). EEXIST from this copy: a page is there.
fn copy_zero_page(
    fd: std::os::fd::BorrowedFd<'_>,
    addr: usize,
    dontwake: bool,
) -> Result<(), UffdError> {
    #[repr(C, align(4096))]
    struct ZeroPage([u8; PAGE_SIZE]);
    static ZERO_PAGE: ZeroPage = ZeroPage([0; PAGE_SIZE]);
    let mut c = uapi::uffdio_copy {
        dst: addr as u64,
        src: ZERO_PAGE.0.as_ptr() as u64,
        len: PAGE_SIZE as u64,
        mode: if dontwake {
            uapi::UFFDIO_COPY_MODE_DONTWAKE as u64
        } else {
            0
        },
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; the kernel reads one page from a static
    // of zeros and writes only into a range registered with `fd`, hetmem's.
    unsafe { rustix::ioctl::ioctl(fd, Updater::<OP_COPY, _>::new(&mut c)) }.map_err(uffd_err)
}

/// Errors of the resolving ioctls, each with one meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdError {
    /// EEXIST: the destination is already populated (a racing fault won).
    Exists,
    /// EAGAIN: the mappings are changing; retry after draining events.
    Again,
    /// EBUSY (MOVE): a pinned or shared source page.
    Busy,
    /// Any other errno.
    Os(i32),
}

impl From<UffdError> for io::Error {
    fn from(e: UffdError) -> io::Error {
        io::Error::from_raw_os_error(match e {
            UffdError::Exists => libc::EEXIST,
            UffdError::Again => libc::EAGAIN,
            UffdError::Busy => libc::EBUSY,
            UffdError::Os(n) => n,
        })
    }
}

fn uffd_err(e: rustix::io::Errno) -> UffdError {
    match e {
        rustix::io::Errno::EXIST => UffdError::Exists,
        rustix::io::Errno::AGAIN => UffdError::Again,
        rustix::io::Errno::BUSY => UffdError::Busy,
        other => UffdError::Os(other.raw_os_error()),
    }
}

/// A fault read from a thread-mode userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UffdFault {
    /// Faulting address (page-aligned by the kernel unless EXACT_ADDRESS).
    pub addr: usize,
    /// The access was a write.
    pub write: bool,
    /// The fault is a write-protect fault.
    pub wp: bool,
    /// The faulting thread's id (`UFFD_FEATURE_THREAD_ID`), 0 when unknown.
    pub tid: u32,
}

/// A message read from a userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMsg {
    /// A page fault (thread-mode delivery).
    Fault(UffdFault),
    /// `UFFD_EVENT_REMAP`: the program moved `from..from + len` to `to` with mremap(2); the
    /// moved range is still registered with this fd.
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Length moved.
        len: usize,
    },
    /// `UFFD_EVENT_UNMAP`: the program unmapped `start..end` (asked for by adopted memory).
    Unmap {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// `UFFD_EVENT_REMOVE`: the program dropped the pages of `start..end` with
    /// `madvise(MADV_DONTNEED/MADV_FREE/MADV_REMOVE)` (asked for by the signal-mode userfaultfd
    /// of a space, where the kernel has `UFFDIO_MOVE`: see [`ZapSink`]).
    Remove {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// Another event (not enabled by hetmem).
    Other(u8),
}

/// A userfaultfd.
///
/// # Invariants
///
/// `fd` is a userfaultfd on which the UFFDIO_API handshake has completed.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    user_mode_only: bool,
    delivery: UffdDelivery,
    /// `UFFD_FEATURE_WP_UNPOPULATED` on an anonymous range: [`Uffd::mark_missing`] leaves
    /// markers, which `UFFDIO_ZEROPAGE` and `UFFDIO_MOVE` refuse (EEXIST) and
    /// [`Uffd::zeropage`] fills over (module doc of `crate::mm`, "Device-private pages in
    /// pagemap").
    markers: bool,
}

impl Uffd {
    /// Opens a userfaultfd delivering faults as `delivery` says.
    ///
    /// A plain userfaultfd is tried first (it also serves kernel-mode accesses, e.g. a `read(2)`
    /// into a managed buffer, in thread mode); where the system refuses it to this user
    /// (`vm.unprivileged_userfaultfd = 0`: EPERM), a `UFFD_USER_MODE_ONLY` one is opened instead.
    /// `force_umo` asks for the latter directly (to run as an unprivileged user would).
    pub fn open(delivery: UffdDelivery, force_umo: bool) -> io::Result<Uffd> {
        Self::open_with(delivery, force_umo, false, false, false)
    }

    /// [`Uffd::open`], also asking for `UFFD_EVENT_UNMAP`: the program's munmap of a registered
    /// range (or mremap shrinking it, or mmap with MAP_FIXED over it) is reported, and *waits
    /// until the event is read*. Such a userfaultfd must have a reader for as long as anything
    /// is registered with it; hetmem's own unmaps unregister first, so that they raise no event.
    /// With `remove_events`, also `UFFD_EVENT_REMOVE` (the program's `madvise(MADV_DONTNEED)`
    /// and the like, which wait until the event is read too: hetmem's own drops of pages must
    /// then go through a [`ZapSink`], or be told apart from the program's).
    /// With `markers`, also `UFFD_FEATURE_WP_UNPOPULATED`, for [`Uffd::mark_missing`]: on
    /// anonymous memory it also makes a write-protect of missing pages leave markers there.
    pub fn open_events(
        delivery: UffdDelivery,
        force_umo: bool,
        remove_events: bool,
        markers: bool,
    ) -> io::Result<Uffd> {
        Self::open_with(delivery, force_umo, true, remove_events, markers)
    }

    fn open_with(
        delivery: UffdDelivery,
        force_umo: bool,
        unmap_events: bool,
        remove_events: bool,
        markers: bool,
    ) -> io::Result<Uffd> {
        // MOVE is not requested: hetmem's paths copy (see docs/architecture.md), and asking for a
        // feature the kernel lacks would fail the handshake.
        // EVENT_REMAP: a direct mremap(2) of a managed range is reported (and waits until the
        // event is read), so that hetmem follows it instead of losing device-resident data.
        let mut want = (uapi::UFFD_FEATURE_THREAD_ID | uapi::UFFD_FEATURE_EVENT_REMAP) as u64;
        if delivery == UffdDelivery::Signal {
            want |= uapi::UFFD_FEATURE_SIGBUS as u64;
        }
        if unmap_events {
            want |= uapi::UFFD_FEATURE_EVENT_UNMAP as u64;
        }
        if remove_events {
            want |= uapi::UFFD_FEATURE_EVENT_REMOVE as u64;
        }
        if markers {
            want |= uapi::UFFD_FEATURE_WP_UNPOPULATED as u64;
        }
        let mut uffd = Self::handshake(delivery, force_umo, want)?;
        uffd.markers = markers;
        Ok(uffd)
    }

    /// Opens a userfaultfd (plain, or user-mode-only where the plain one is refused or
    /// `force_umo` asks for it) and completes the UFFDIO_API handshake asking for `want`.
    fn handshake(delivery: UffdDelivery, force_umo: bool, want: u64) -> io::Result<Uffd> {
        let base = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        let umo = rustix::mm::UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
        let (fd, user_mode_only) = if force_umo {
            // SAFETY: the fd is only used through this module's ioctls on hetmem's own regions.
            (unsafe { rustix::mm::userfaultfd(base | umo) }?, true)
        } else {
            // SAFETY: as above.
            match unsafe { rustix::mm::userfaultfd(base) } {
                Ok(fd) => (fd, false),
                Err(rustix::io::Errno::PERM) => {
                    // SAFETY: as above.
                    (unsafe { rustix::mm::userfaultfd(base | umo) }?, true)
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut api = uapi::uffdio_api {
            api: uapi::UFFD_API as u64,
            features: want,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `api` is.
        unsafe { rustix::ioctl::ioctl(&fd, Updater::<OP_API, _>::new(&mut api)) }?;
        Ok(Uffd {
            fd,
            user_mode_only,
            delivery,
            markers: false,
        })
    }

    /// Opens the userfaultfd of file mappings: SIGBUS delivery for MISSING faults, and
    /// asynchronous write-protect (`UFFD_FEATURE_WP_ASYNC`, on shmem, unpopulated entries
    /// included) for dirty tracking with [`PagemapScanner`]: stores to protected pages go through
    /// and are recorded by the kernel, without a fault.
    ///
    /// With `sync_wp`, write-protect is synchronous instead: a store to a protected page
    /// faults (SIGBUS in the faulting thread), so that hetmem sees every first store.
    ///
    /// Asks for `UFFD_EVENT_UNMAP` as [`Uffd::open_events`] does (and needs a reader likewise).
    pub fn open_file(force_umo: bool, sync_wp: bool) -> io::Result<Uffd> {
        let mut want = (uapi::UFFD_FEATURE_SIGBUS
            | uapi::UFFD_FEATURE_EVENT_REMAP
            | uapi::UFFD_FEATURE_EVENT_UNMAP
            | uapi::UFFD_FEATURE_WP_UNPOPULATED
            | uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) as u64;
        if !sync_wp {
            want |= uapi::UFFD_FEATURE_WP_ASYNC as u64;
        }
        Self::handshake(UffdDelivery::Signal, force_umo, want)
    }

    /// Whether this fd was opened with `UFFD_USER_MODE_ONLY` (kernel-mode accesses to missing
    /// pages then fail with EFAULT instead of being served).
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// How faults are delivered.
    pub fn delivery(&self) -> UffdDelivery {
        self.delivery
    }

    /// Registers `region[off..off+len]` for MISSING (and WP if `wp`) faults.
    pub fn register(&self, region: &Region, off: usize, len: usize, wp: bool) -> io::Result<()> {
        region.check(off, len)?;
        let mut mode = uapi::UFFDIO_REGISTER_MODE_MISSING as u64;
        if wp {
            mode |= uapi::UFFDIO_REGISTER_MODE_WP as u64;
        }
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range {
                start: (region.base + off) as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`; the range is inside a region
        // hetmem owns (checked), so registration affects no memory other code relies on.
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_REGISTER, _>::new(&mut reg)) }?;
        Ok(())
    }

    /// `UFFDIO_MOVE` (this fd asked for `UFFD_FEATURE_MOVE`: [`ZapSink`]): moves the pages of
    /// `src..src + len` to `dst..dst + len` (registered with this fd, every page missing), holes
    /// in `src` stepped over. No copy, and no event on the userfaultfd `src` is registered with.
    /// `src` must be anonymous private memory, writable, with the protection and lock state of
    /// `dst`, and its pages must not be shared with another process (a child after a fork)
    /// nor pinned: EINVAL, EBUSY otherwise. Returns the bytes done (moved or stepped over) before
    /// the error, with it; Ok: all of them. EAGAIN (a page being migrated or locked by the
    /// kernel) is retried, bounded.
    ///
    /// Holes are stepped over here, not by the kernel (`UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`): on
    /// Linux 6.18 a move with that mode never returns when a page of `src` is dropped while it
    /// runs (a `madvise` of the program's racing a migration). The kernel's loop keeps the
    /// EAGAIN of the page that went away, steps over the hole it finds when it looks again, and
    /// retries it forever (its error is never reset; measured with a plain program beside this
    /// one: 3 runs of 3 stuck, 0 of 3 without the mode). Without the mode a hole ends the call
    /// with ENOENT: the run of empty entries from there ([`empty_prefix`], at least the page
    /// the kernel found empty) is stepped over and the move goes on after it. The same race can
    /// leave a page moved on a retry the kernel does not count: the next call finds `dst`
    /// taken (EEXIST), returned to the caller ([`ZapSink::take`] moves on to another slot).
    pub fn move_pages(&self, dst: usize, src: usize, len: usize) -> (Result<(), UffdError>, usize) {
        let mut done = 0usize;
        let mut again = 0;
        while done < len {
            let mut m = uapi::uffdio_move {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: 0,
                move_: 0,
            };
            // SAFETY: UFFDIO_MOVE takes a `struct uffdio_move`. It moves page-table entries of
            // anonymous memory between two ranges of this process: `src`, a range hetmem
            // manages (its pages are being dropped, no Rust object lives there), and `dst`, the
            // sink registered with this fd, which only this module touches.
            let r = unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_MOVE, _>::new(&mut m)) }
                .map_err(uffd_err);
            match r {
                Ok(()) => return (Ok(()), len),
                Err(_) if m.move_ > 0 => done += m.move_ as usize,
                // A hole at `src + done`, maybe the first of a run: nothing to move there.
                Err(UffdError::Os(libc::ENOENT)) => {
                    let left = (len - done) / PAGE_SIZE;
                    done += empty_prefix(src + done, left).max(1) * PAGE_SIZE;
                }
                Err(UffdError::Again) if again < 1000 => {
                    again += 1;
                    rustix::thread::sched_yield();
                }
                Err(e) => return (Err(e), done),
            }
        }
        (Ok(()), len)
    }

    /// `UFFDIO_MOVE` of `len` bytes from `src` (anonymous private memory of this process that
    /// hetmem owns and no Rust object lives in: a staging buffer) to the missing pages of
    /// `dst..dst + len` (registered with this fd), with no hole allowed in `src` and no retry:
    /// the zeroed huge pages of first touches (`mm::HugeZero`). A transparent huge page moves
    /// as one PMD where both sides are aligned and `dst`'s PMD is empty. Returns the bytes
    /// moved before an error, with it (a hole in `src`: EAGAIN or ENOENT after the pages
    /// before it; a protection or lock state that differs: EINVAL); Ok: all of them.
    /// A range the program dropped and whose REMOVE event is not followed yet is refused
    /// (EAGAIN, nothing moved): a fill there goes through [`Uffd::fill`], which steps over it.
    pub fn move_whole(&self, dst: usize, src: usize, len: usize) -> (Result<(), UffdError>, usize) {
        let mut dropped = false;
        removes_pending_in(dst, dst + len, |_, _| dropped = true);
        if dropped {
            return (Err(UffdError::Again), 0);
        }
        let mut m = uapi::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: 0,
            move_: 0,
        };
        // SAFETY: UFFDIO_MOVE takes a `struct uffdio_move`. It moves page-table entries of
        // anonymous memory between two ranges of this process: `src`, a staging mapping no Rust
        // object lives in (the caller's), and `dst`, missing pages of a range registered with
        // this fd, which hetmem manages.
        let r = unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_MOVE, _>::new(&mut m)) }
            .map_err(uffd_err);
        (r, m.move_.max(0) as usize)
    }

    /// `UFFDIO_COPY`: fills the missing pages at `dst..dst+len` (registered with this fd) with
    /// `src[src_off..src_off+len]`, waking any thread waiting on them.
    pub fn copy(
        &self,
        dst: usize,
        src: &Region,
        src_off: usize,
        len: usize,
    ) -> Result<(), UffdError> {
        src.check(src_off, len)
            .map_err(|_| UffdError::Os(libc::EFAULT))?;
        let mut c = uapi::uffdio_copy {
            dst: dst as u64,
            src: (src.base + src_off) as u64,
            len: len as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`. The kernel writes only into
        // userfaultfd-registered ranges (hetmem's reservations), never into Rust objects, and
        // reads `src` from a live region (checked).
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_COPY, _>::new(&mut c)) }
            .map_err(uffd_err)
    }

    /// Fills every missing page of `dst..dst+len` from `src[src_off..]` with `UFFDIO_COPY`,
    /// resuming after a partial copy: Ok means every page of the range is now populated (pages
    /// that already were are left as they are: EEXIST on a page is not an error here). An error
    /// means some pages may be populated and others not; calling again completes the range.
    /// With `wp`, the new pages are write-protected (`UFFDIO_COPY_MODE_WP`: a store to them
    /// faults), atomically with their installation.
    pub fn fill(
        &self,
        dst: usize,
        src: &Region,
        src_off: usize,
        len: usize,
        wp: bool,
    ) -> Result<(), UffdError> {
        src.check(src_off, len)
            .map_err(|_| UffdError::Os(libc::EFAULT))?;
        let mode = if wp {
            uapi::UFFDIO_COPY_MODE_WP as u64
        } else {
            0
        };
        fill_resuming(
            dst,
            len,
            false,
            |done, to| {
                let mut c = uapi::uffdio_copy {
                    dst: (dst + done) as u64,
                    src: (src.base + src_off + done) as u64,
                    len: (to - done) as u64,
                    mode,
                    copy: 0,
                };
                // SAFETY: as in `copy`.
                let r =
                    unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_COPY, _>::new(&mut c)) };
                // `copy` holds the bytes copied before an error (or a negative errno).
                (r.map_err(uffd_err), c.copy)
            },
            || self.defer_pending(),
        )
    }

    /// `UFFDIO_WRITEPROTECT`: sets (`on`) or clears the write-protect bit of the present pages
    /// in `addr..addr+len`; clearing wakes writers waiting there.
    ///
    /// EAGAIN (the mappings are changing: an event of the program's munmap, mremap or madvise is
    /// not read yet) is retried as a fill retries it (see `fill_resuming`): a program's madvise
    /// during a migration failed the migration's write-protect (found by a test).
    pub fn write_protect(&self, addr: usize, len: usize, on: bool) -> Result<(), UffdError> {
        let mut patience = Patience::new();
        loop {
            let mut w = uapi::uffdio_writeprotect {
                range: uapi::uffdio_range {
                    start: addr as u64,
                    len: len as u64,
                },
                mode: if on { 1 } else { 0 },
            };
            // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`; it changes PTE
            // permissions only.
            let r = unsafe {
                rustix::ioctl::ioctl(&self.fd, Updater::<OP_WRITEPROTECT, _>::new(&mut w))
            }
            .map_err(uffd_err);
            match r {
                Err(UffdError::Again) if patience.more() => {
                    self.defer_pending();
                    rustix::thread::sched_yield();
                }
                r => return r,
            }
        }
    }

    /// Leaves a marker on each missing page of `addr..addr + len` (write-protect of missing
    /// pages, `UFFD_FEATURE_WP_UNPOPULATED`; the range is registered for write-protect with this
    /// fd, which was opened with markers: EOPNOTSUPP otherwise). `/proc/self/pagemap` then
    /// reports the page as swapped out (`PM_SWAP`), as it reports the kernel's device-private
    /// entries, and an access still faults as missing. `UFFDIO_COPY` replaces a marker;
    /// `UFFDIO_ZEROPAGE` and `UFFDIO_MOVE` refuse it (EEXIST: [`Uffd::zeropage`] copies a zero
    /// page over it instead; a move's caller falls back to a copy); the program's
    /// `MADV_DONTNEED`, an unmap and an unregister remove it. A present page in the range would
    /// be write-protected: the caller passes missing pages only.
    pub fn mark_missing(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        if !self.markers {
            return Err(UffdError::Os(libc::EOPNOTSUPP));
        }
        self.write_protect(addr, len, true)
    }

    /// `UFFDIO_ZEROPAGE`: maps the kernel's shared zero page, read-only, at the missing pages of
    /// `addr..addr+len` (a page already there is stepped over, as in [`Uffd::fill`]); wakes the
    /// threads waiting there unless `dontwake`. A marker ([`Uffd::mark_missing`]), which the
    /// ioctl refuses as if a page were there, gets a zero-filled page of its own
    /// (`UFFDIO_COPY`, which replaces it atomically, or fails with EEXIST over a real page).
    pub fn zeropage(&self, addr: usize, len: usize, dontwake: bool) -> Result<(), UffdError> {
        self.zeropage_as(addr, len, dontwake, false)
    }

    /// [`Uffd::zeropage`], also over pages a program's drop not followed yet covers (which a
    /// fill leaves missing): for a copy of hetmem's that faulted on such a page and must read
    /// it as the drop leaves it (`sys::FaultTarget::fill_dropped_page`).
    pub fn zeropage_over_drops(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.zeropage_as(addr, len, false, true)
    }

    fn zeropage_as(
        &self,
        addr: usize,
        len: usize,
        dontwake: bool,
        over_drops: bool,
    ) -> Result<(), UffdError> {
        fill_resuming(
            addr,
            len,
            over_drops,
            |done, to| {
                let mut z = uapi::uffdio_zeropage {
                    range: uapi::uffdio_range {
                        start: (addr + done) as u64,
                        len: (to - done) as u64,
                    },
                    mode: if dontwake {
                        uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64
                    } else {
                        0
                    },
                    zeropage: 0,
                };
                // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`; it maps the zero page
                // into missing entries of a registered range, touching no Rust memory.
                let r = unsafe {
                    rustix::ioctl::ioctl(&self.fd, Updater::<OP_ZEROPAGE, _>::new(&mut z))
                };
                let mut r = r.map_err(uffd_err);
                if self.markers && matches!(r, Err(UffdError::Exists)) && z.zeropage <= 0 {
                    // The first page refused: a marker, or a page there (stepped over either
                    // way once this copy fills the former and fails on the latter). Another
                    // error of the copy is the fill's (EAGAIN: retried).
                    match copy_zero_page(self.fd.as_fd(), addr + done, dontwake) {
                        Ok(()) | Err(UffdError::Exists) => {}
                        Err(e) => r = Err(e),
                    }
                }
                // `zeropage` holds the bytes mapped before an error (or a negative errno).
                (r, z.zeropage)
            },
            || self.defer_pending(),
        )
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on faults in `addr..addr+len`.
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut r = uapi::uffdio_range {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_WAKE, _>::new(&mut r)) }
            .map_err(uffd_err)
    }

    /// Makes the calling thread this fd's reader: its fills read what is pending while they
    /// wait for the mappings to stop changing ([`Uffd::fill`]), and [`Uffd::next_msg`] returns
    /// those messages first.
    pub fn become_reader(&self) {
        let me = self.fd.as_raw_fd();
        READER.with(|r| {
            let mut r = r.borrow_mut();
            if !r.0.contains(&me) {
                r.0.push(me);
            }
        });
    }

    /// Makes the calling thread the reader of exactly `uffds` (see [`Uffd::become_reader`]):
    /// messages kept for any other fd (closed since, its number maybe reused) are forgotten.
    pub fn become_reader_of(uffds: &[&Uffd]) {
        READER.with(|r| {
            let mut r = r.borrow_mut();
            r.0.clear();
            r.0.extend(uffds.iter().map(|u| u.fd.as_raw_fd()));
            let (fds, kept) = &mut *r;
            kept.retain(|(f, m)| {
                let keep = fds.contains(f);
                if !keep && let UffdMsg::Remove { start, end } = *m {
                    remove_followed(start, end);
                }
                keep
            });
        });
    }

    /// The next message for the fd's reader: one read while a fill waited, else one pending now.
    pub fn next_msg(&self) -> io::Result<Option<UffdMsg>> {
        let me = self.fd.as_raw_fd();
        let kept = READER.with(|r| {
            let mut r = r.borrow_mut();
            let i = r.1.iter().position(|&(f, _)| f == me)?;
            r.1.remove(i).map(|(_, m)| m)
        });
        if let Some(m) = kept {
            return Ok(Some(m));
        }
        self.read_msg()
    }

    /// On the fd's reader thread: reads every pending message and keeps it for
    /// [`Uffd::next_msg`] (reading an event ends the caller's wait on it, and with it the window
    /// in which fills get EAGAIN). Elsewhere: nothing.
    fn defer_pending(&self) {
        let me = self.fd.as_raw_fd();
        if !READER.with(|r| r.borrow().0.contains(&me)) {
            return;
        }
        while let Ok(Some(m)) = self.read_msg() {
            Self::keep(self.fd.as_fd(), m);
        }
    }

    /// A message a reader read while it waited: kept for [`Uffd::next_msg`], but for a
    /// thread-mode fault of hetmem's own copy on a page the program dropped, served at once
    /// (the zero page, as `serve_msgs` does): its copier may hold the very lock the reader
    /// waits for.
    fn keep(fd: std::os::fd::BorrowedFd<'_>, m: UffdMsg) {
        if let UffdMsg::Fault(f) = m
            && Self::zone_fault(fd, &f)
        {
            return;
        }
        READER.with(|r| r.borrow_mut().1.push_back((fd.as_raw_fd(), m)));
    }

    /// Serves fault `f`, read from this fd, at once if it is a thread-mode fault of hetmem's own
    /// copy on a page the program dropped ([`super::thread_fault_in_zone`]): the drop's zeros
    /// (the copy then reads or writes them), the faulting thread woken (also where the page is
    /// there already: EEXIST wakes nobody). False when it is another fault.
    pub fn serve_zone_fault(&self, f: &UffdFault) -> bool {
        Self::zone_fault(self.fd.as_fd(), f)
    }

    fn zone_fault(fd: std::os::fd::BorrowedFd<'_>, f: &UffdFault) -> bool {
        let page = f.addr & !(PAGE_SIZE - 1);
        if !super::thread_fault_in_zone(page, f.wp, f.tid) {
            return false;
        }
        Self::zero_and_wake(fd, page);
        super::note_zone_refill(page);
        true
    }

    /// Whether the calling thread reads userfaultfd messages (an event reader, or the handler
    /// thread of thread-mode mappings): a lock it waits for may be held by a thread that waits
    /// for it to read a message, so it waits with [`Uffd::drain_on_reader`].
    pub fn on_reader() -> bool {
        READER.with(|r| !r.borrow().0.is_empty())
    }

    /// Whether the calling reader thread keeps messages for this fd (read while it waited
    /// during another fd's serving): they must be served without waiting for the fd to become
    /// readable again (it will not: they were read already).
    pub fn has_kept(&self) -> bool {
        let me = self.fd.as_raw_fd();
        READER.with(|r| r.borrow().1.iter().any(|&(f, _)| f == me))
    }

    /// On a reader thread, while it serves a message (between [`Uffd::become_reader_of`] and
    /// the end of its serving): reads every message pending on the fds it reads and keeps them
    /// for [`Uffd::next_msg`]. A reader that must wait (for a space's lock, which a thread
    /// filling pages may hold) calls it while it waits: reading an event ends its caller's wait
    /// and the window (`mmap_changing`) in which that thread's fills get EAGAIN. Elsewhere:
    /// nothing.
    pub fn drain_on_reader() {
        Self::drain_reading(true);
    }

    /// [`Uffd::drain_on_reader`] for a reader that holds a space's state lock (the follow of a
    /// program's drop, waiting for the kernel's drop): every message is kept, a thread-mode
    /// fault of a zone too, which serving would ask the space whose lock this thread holds
    /// (`thread_fault_in_zone`: it would spin, then abort; found by review). The zone's copier
    /// waits until the follow ends; the follow waits for none of its locks.
    pub fn drain_on_reader_holding_state() {
        Self::drain_reading(false);
    }

    fn drain_reading(serve_zones: bool) {
        if serve_zones {
            Self::serve_kept_zone_faults();
        }
        let fds: Vec<i32> = READER.with(|r| r.borrow().0.clone());
        for fd in fds {
            // SAFETY: `fd` is in the calling reader's current list: an open userfaultfd that
            // the reader keeps alive (its `Arc<Uffd>`) while it serves, which is when this runs.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            while let Ok(Some(m)) = Self::read_msg_from(fd) {
                if serve_zones {
                    Self::keep(fd, m);
                } else {
                    READER.with(|r| r.borrow_mut().1.push_back((fd.as_raw_fd(), m)));
                }
            }
        }
    }

    /// Serves the zone faults among the messages the calling reader keeps (read while it held a
    /// space's lock, [`Uffd::drain_on_reader_holding_state`]): a reader that now waits for a
    /// lock may be waiting for their copier (found from outside: the follow of a drop waited for
    /// a device's page-table lock, whose holder's fault was kept behind the next drop's event).
    fn serve_kept_zone_faults() {
        READER.with(|r| {
            r.borrow_mut().1.retain(|(fd, m)| match m {
                UffdMsg::Fault(f) => {
                    // SAFETY: a kept message's fd is in the calling reader's current list
                    // (`become_reader_of` forgets the others): an open userfaultfd that the
                    // reader keeps alive while it serves, which is when this runs.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                    !Self::zone_fault(fd, f)
                }
                _ => true,
            })
        });
    }

    /// Maps the zero page at `page` (one page; nothing if a page is there; a page of zeros over
    /// a marker) and wakes the
    /// threads waiting on it, on `fd`; errors are ignored (a woken thread whose page is still
    /// missing faults again).
    fn zero_and_wake(fd: std::os::fd::BorrowedFd<'_>, page: usize) {
        let range = uapi::uffdio_range {
            start: page as u64,
            len: PAGE_SIZE as u64,
        };
        let mut z = uapi::uffdio_zeropage {
            range,
            mode: uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`; it maps the zero page into
        // a missing entry of a registered range, touching no Rust memory.
        let r = unsafe { rustix::ioctl::ioctl(fd, Updater::<OP_ZEROPAGE, _>::new(&mut z)) };
        if r.map_err(uffd_err) == Err(UffdError::Exists) {
            // A marker ([`Uffd::mark_missing`]), refused as a page would be (found by review:
            // a thread-mode migration's copy faulted on it forever), or a page there.
            let _ = copy_zero_page(fd, page, true);
        }
        let mut r = range;
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        let _ = unsafe { rustix::ioctl::ioctl(fd, Updater::<OP_WAKE, _>::new(&mut r)) };
    }

    /// On a reader thread while it serves (see [`Uffd::drain_on_reader`]): waits until one of
    /// the fds it reads has a message, or `timeout_ms` passes, whichever is first. A reader
    /// waiting for a space's lock sleeps here instead of spinning, and wakes at once for an
    /// event it must read.
    pub fn wait_on_reader(timeout_ms: i32) {
        use rustix::event::{PollFd, PollFlags, poll};
        let fds: Vec<i32> = READER.with(|r| r.borrow().0.clone());
        // SAFETY: as in `drain_on_reader`: every fd is alive while the reader serves.
        let borrowed: Vec<std::os::fd::BorrowedFd<'_>> = fds
            .iter()
            .map(|&fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
            .collect();
        let mut pfds: Vec<PollFd<'_>> = borrowed
            .iter()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        let ts = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(timeout_ms) * 1_000_000,
        };
        let _ = poll(&mut pfds, Some(&ts));
    }

    /// Reads one pending message, if any (the fd is non-blocking).
    pub fn read_msg(&self) -> io::Result<Option<UffdMsg>> {
        Self::read_msg_from(self.fd.as_fd())
    }

    fn read_msg_from(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Option<UffdMsg>> {
        if table_full() {
            // Follow what was read first (the fd stays readable).
            return Ok(None);
        }
        MSG_READS.fetch_add(1, Ordering::SeqCst);
        let m = Self::read_one(fd);
        let m = match m {
            Ok(Some(UffdMsg::Remove { start, end })) if take_own_remove(start, end) => {
                Ok(Some(UffdMsg::Other(uapi::UFFD_EVENT_REMOVE as u8)))
            }
            Ok(Some(UffdMsg::Remove { start, end })) => {
                note_remove(start, end);
                REMOVES_UNFOLLOWED.fetch_add(1, Ordering::SeqCst);
                m
            }
            m => m,
        };
        MSG_READS.fetch_sub(1, Ordering::SeqCst);
        m
    }

    fn read_one(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Option<UffdMsg>> {
        let mut msg = std::mem::MaybeUninit::<uapi::uffd_msg>::zeroed();
        // SAFETY: reads at most one `uffd_msg` into a buffer of that size.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                msg.as_mut_ptr().cast(),
                std::mem::size_of::<uapi::uffd_msg>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EAGAIN) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n as usize != std::mem::size_of::<uapi::uffd_msg>() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // SAFETY: the kernel wrote a complete message (checked size); zero-init covers padding.
        let msg = unsafe { msg.assume_init() };
        if msg.event as u32 == uapi::UFFD_EVENT_REMAP {
            // SAFETY: `remap` is the active union member for UFFD_EVENT_REMAP.
            let r = unsafe { msg.arg.remap };
            return Ok(Some(UffdMsg::Remap {
                from: r.from as usize,
                to: r.to as usize,
                len: r.len as usize,
            }));
        }
        if msg.event as u32 == uapi::UFFD_EVENT_UNMAP {
            // SAFETY: `remove` is the active union member for UFFD_EVENT_UNMAP.
            let r = unsafe { msg.arg.remove };
            return Ok(Some(UffdMsg::Unmap {
                start: r.start as usize,
                end: r.end as usize,
            }));
        }
        if msg.event as u32 == uapi::UFFD_EVENT_REMOVE {
            // SAFETY: `remove` is the active union member for UFFD_EVENT_REMOVE.
            let r = unsafe { msg.arg.remove };
            return Ok(Some(UffdMsg::Remove {
                start: r.start as usize,
                end: r.end as usize,
            }));
        }
        if msg.event as u32 != uapi::UFFD_EVENT_PAGEFAULT {
            return Ok(Some(UffdMsg::Other(msg.event)));
        }
        // SAFETY: `pagefault` is the active union member for UFFD_EVENT_PAGEFAULT.
        let pf = unsafe { msg.arg.pagefault };
        Ok(Some(UffdMsg::Fault(UffdFault {
            addr: pf.address as usize,
            write: pf.flags & uapi::UFFD_PAGEFAULT_FLAG_WRITE as u64 != 0,
            wp: pf.flags & uapi::UFFD_PAGEFAULT_FLAG_WP as u64 != 0,
            // SAFETY: `ptid` is the active member of `feat` with UFFD_FEATURE_THREAD_ID, which
            // every thread-mode userfaultfd asks for; zero-initialised otherwise.
            tid: unsafe { pf.feat.ptid },
        })))
    }

    /// Unregisters `start..start + len`, which need not lie in a region of hetmem's (a range
    /// that a direct mremap moved out of one): the memory stays as it is, as plain memory, and
    /// unmapping it later raises no event. Every registered mapping in the range must be this
    /// fd's (the kernel refuses the whole call otherwise: EINVAL).
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = uapi::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`; it changes no memory, only
        // which faults this fd reports (the kernel checks the range).
        unsafe { rustix::ioctl::ioctl(&self.fd, Updater::<OP_UNREGISTER, _>::new(&mut r)) }?;
        Ok(())
    }

    /// Waits until the fd is readable or `stop` is readable; returns false when `stop` fired.
    pub fn wait(&self, stop: &OwnedFd) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, poll};
        loop {
            let mut fds = [
                PollFd::new(&self.fd, PollFlags::IN),
                PollFd::new(stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {
                    if !fds[1].revents().is_empty() {
                        return Ok(false);
                    }
                    return Ok(true);
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until one of `uffds` or `wake` (an eventfd of [`stop_fd`], drained here) is
    /// readable; returns which of `uffds` are.
    pub fn wait_any(uffds: &[&Uffd], wake: &OwnedFd) -> io::Result<Vec<bool>> {
        use rustix::event::{PollFd, PollFlags, poll};
        loop {
            let mut fds: Vec<PollFd<'_>> = Vec::new();
            fds.try_reserve_exact(uffds.len() + 1)
                .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
            fds.push(PollFd::new(wake, PollFlags::IN));
            fds.extend(uffds.iter().map(|u| PollFd::new(&u.fd, PollFlags::IN)));
            match poll(&mut fds, None) {
                Ok(_) => {
                    if !fds[0].revents().is_empty() {
                        let mut b = [0u8; 8];
                        let _ = rustix::io::read(wake, &mut b);
                    }
                    return Ok(fds[1..].iter().map(|f| !f.revents().is_empty()).collect());
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Borrow of the fd.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The userfaultfd features this kernel offers (`UFFD_FEATURE_*` bits): a UFFDIO_API handshake
/// asking for no feature on a fresh userfaultfd (closed again), which reports every feature the
/// kernel supports. `user_mode_only` opens the fd with `UFFD_USER_MODE_ONLY`; without it, EPERM
/// means that this user may not open a plain userfaultfd (`vm.unprivileged_userfaultfd = 0` and
/// no `CAP_SYS_PTRACE`).
pub fn kernel_features(user_mode_only: bool) -> io::Result<u64> {
    let mut flags = rustix::mm::UserfaultfdFlags::CLOEXEC;
    if user_mode_only {
        flags |= rustix::mm::UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
    }
    // SAFETY: the fd registers no range and is closed on return: it can affect no memory.
    let fd = unsafe { rustix::mm::userfaultfd(flags) }?;
    let mut api = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `api` is.
    unsafe { rustix::ioctl::ioctl(&fd, Updater::<OP_API, _>::new(&mut api)) }?;
    Ok(api.features)
}

/// An eventfd used to stop a handler thread.
pub fn stop_fd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?)
}

/// Signals an eventfd made by [`stop_fd`].
pub fn signal_stop(fd: &OwnedFd) -> io::Result<()> {
    rustix::io::write(fd, &1u64.to_ne_bytes())?;
    Ok(())
}

/// Where hetmem's own drops of anonymous pages go when the program's drops are followed.
///
/// A space's signal-mode userfaultfd asks for `UFFD_EVENT_REMOVE`, so that the program's
/// `madvise(MADV_DONTNEED)` of managed memory is followed (pages in device memory read zeros
/// afterwards, as the kernel gives). A `MADV_DONTNEED` by hetmem itself (every migration to a
/// device drops the CPU's pages) would raise the event too, and wait until it is read: ≈ 50 µs
/// each instead of 1. So hetmem moves the pages out instead (`UFFDIO_MOVE` on a userfaultfd of
/// its own, which raises no event on the space's), into this sink, a writable anonymous
/// mapping registered with that userfaultfd and asking for no event, and drops them there in
/// bulk (`MADV_DONTNEED` on the sink: no event either) once it is full. Pages the kernel will
/// not move (shared with a child after a fork, pinned, locked, read-only mappings) are dropped
/// in place and raise the event; the space tells those from the program's
/// ([`record_own_remove`]).
pub struct ZapSink {
    uffd: Uffd,
    region: Region,
    /// Bytes of the sink holding moved pages (or holes stepped over) since the last flush.
    used: usize,
}

impl ZapSink {
    /// The sink's size: the most memory of dropped pages not given back to the kernel yet.
    pub const LEN: usize = 4 << 20;

    /// A sink, if the kernel has `UFFDIO_MOVE` (6.8 on): Err otherwise.
    pub fn new(force_umo: bool) -> io::Result<ZapSink> {
        // SIGBUS delivery: nothing ever touches the sink, but an access would die rather than
        // wait for a reader that does not exist.
        let uffd = Uffd::handshake(
            UffdDelivery::Signal,
            force_umo,
            (uapi::UFFD_FEATURE_MOVE | uapi::UFFD_FEATURE_SIGBUS) as u64,
        )?;
        let region = Region::new(Self::LEN, LARGE_PAGE_SIZE, Prot::ReadWrite)?;
        uffd.register(&region, 0, Self::LEN, false)?;
        Ok(ZapSink {
            uffd,
            region,
            used: 0,
        })
    }

    /// Drops the pages of `src..src + len` (anonymous private memory of this process) by moving
    /// them into the sink: the range's entries are empty afterwards (the next access is a
    /// MISSING fault), and no REMOVE event is raised. Returns the bytes done before an error
    /// (see [`Uffd::move_pages`]), with it: the rest must be dropped some other way.
    pub fn take(&mut self, src: usize, len: usize) -> (io::Result<()>, usize) {
        let mut done = 0;
        while done < len {
            let at = src + done;
            // Whole large pages move as one PMD where both sides are aligned.
            if at.is_multiple_of(LARGE_PAGE_SIZE) && len - done >= LARGE_PAGE_SIZE {
                self.used = self.used.next_multiple_of(LARGE_PAGE_SIZE);
            }
            if self.used >= Self::LEN
                && let Err(e) = self.flush()
            {
                return (Err(e), done);
            }
            let n = (len - done).min(Self::LEN - self.used);
            let (r, moved) = self.uffd.move_pages(self.region.base() + self.used, at, n);
            done += moved;
            self.used += moved;
            match r {
                Ok(()) => {}
                // The sink's next slot holds a page: the page at `at + moved` moved there on a
                // retry the kernel did not count ([`Uffd::move_pages`]). That slot is left as
                // it is; the page at `src + done` is moved (or, gone, stepped over) to the next
                // one. Bounded: each time takes a slot, and a flush empties them all.
                Err(UffdError::Exists) => self.used += PAGE_SIZE,
                Err(e) => return (Err(e.into()), done),
            }
        }
        (Ok(()), done)
    }

    /// Gives the moved pages back to the kernel.
    fn flush(&mut self) -> io::Result<()> {
        self.region.discard(0, self.used.min(Self::LEN))?;
        self.used = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests of the table of REMOVEs not followed, one at a time.
    static TABLE_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// On Linux 6.18 a move that met EAGAIN can move the page on its retry without counting it,
    /// then stop at the sink's slot that page now takes (EEXIST). `take` leaves that slot and
    /// goes on: every page of the range moves, none is left holding data. (First handled by
    /// stepping over the source page when pagemap said it held no data: a slot taken for any
    /// other reason then failed every later take at once, and a pagemap that could not be read
    /// would have left a page holding data behind: found by review.) The slot is taken here by
    /// a copy into it, as that retry leaves it.
    #[test]
    fn a_take_goes_past_a_sink_slot_that_holds_a_page() {
        let Ok(mut sink) = ZapSink::new(false).or_else(|_| ZapSink::new(true)) else {
            return;
        };
        let src = Region::new(4 * PAGE_SIZE, PAGE_SIZE, Prot::ReadWrite).unwrap();
        src.write(0, &[1u8; 4 * PAGE_SIZE]).unwrap();
        let other = Region::new(PAGE_SIZE, PAGE_SIZE, Prot::ReadWrite).unwrap();
        other.write(0, &[2u8; PAGE_SIZE]).unwrap();
        // The slot the second page would move to.
        let slot = sink.region.base() + sink.used + PAGE_SIZE;
        sink.uffd.copy(slot, &other, 0, PAGE_SIZE).unwrap();
        let (r, done) = sink.take(src.base(), 4 * PAGE_SIZE);
        r.unwrap();
        assert_eq!(done, 4 * PAGE_SIZE);
        assert_eq!(
            src.pages_with_data(0, 4 * PAGE_SIZE).unwrap(),
            [false; 4],
            "pages left holding data"
        );
        // The slot kept the page it held.
        let mut b = [0u8; 1];
        sink.region.read(PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [2]);
        // And the next take goes on after it.
        src.write(0, &[3u8; 4 * PAGE_SIZE]).unwrap();
        let (r, done) = sink.take(src.base(), 4 * PAGE_SIZE);
        r.unwrap();
        assert_eq!(done, 4 * PAGE_SIZE);
        assert_eq!(src.pages_with_data(0, 4 * PAGE_SIZE).unwrap(), [false; 4]);
    }

    /// Thousands of distinct ranges dropped while the reader waits fit (with 256 slots the
    /// table filled and the reader stopped reading: a hang, found from outside); each is
    /// pending until followed, whichever order they are followed in, and once all are the
    /// scans stop at once again (the high-water mark is back to 0).
    #[test]
    fn thousands_of_distinct_removes_fit_and_each_is_pending_until_followed() {
        // Ranges no test maps: a fill racing this test sees nothing of them.
        let range = |i: usize| (0x10_0000 + i * 0x2000, 0x10_0000 + i * 0x2000 + 0x1000);
        let pending = |i: usize| {
            let (s, e) = range(i);
            let mut seen = false;
            removes_pending_in(s, e, |_, _| seen = true);
            seen
        };
        const N: usize = 5000;
        let _t = TABLE_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..N {
            let (s, e) = range(i);
            note_remove(s, e);
            REMOVES_UNFOLLOWED.fetch_add(1, Ordering::SeqCst);
        }
        let full = table_full();
        let all_pending = (0..N).all(pending);
        // Odd ones first, then even ones.
        for i in (1..N).step_by(2).chain((0..N).step_by(2)) {
            let (s, e) = range(i);
            remove_followed(s, e);
        }
        let any_pending = (0..N).any(pending);
        let high = PENDING_SLOTS_HIGH.load(Ordering::SeqCst);
        let others = REMOVES_UNFOLLOWED.load(Ordering::SeqCst);
        assert!(!full, "{N} distinct REMOVEs filled the table");
        assert!(all_pending, "a range read was not pending");
        assert!(!any_pending, "a range stayed pending after it was followed");
        if others == 0 {
            assert_eq!(
                high, 0,
                "the high-water mark stayed up with the table empty"
            );
        }
    }

    /// A program dropping the same range again and again while the reader waits keeps one slot
    /// of the table of REMOVEs not followed yet (with a slot per event, 64 of them filled it,
    /// the reader stopped reading, and a fault behind them was never read: a hang). The range
    /// stays pending until its last REMOVE is followed.
    #[test]
    fn removes_of_one_range_share_a_slot_until_the_last_is_followed() {
        let _t = TABLE_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        // A range no test maps: a fill racing this test sees nothing of it.
        let (start, end) = (0x1000, 0x3000);
        let pending = || {
            let mut seen = false;
            removes_pending_in(start, end, |_, _| seen = true);
            seen
        };
        let n = PENDING_REMOVE_SLOTS + 44;
        for _ in 0..n {
            note_remove(start, end);
            REMOVES_UNFOLLOWED.fetch_add(1, Ordering::SeqCst);
        }
        // Every REMOVE followed before any assertion: a panic in between would leave them
        // unfollowed, and other tests of this binary waiting for them.
        let full = table_full();
        for _ in 0..n - 1 {
            remove_followed(start, end);
        }
        let pending_before_last = pending();
        remove_followed(start, end);
        assert!(!full, "{n} REMOVEs of one range filled the table");
        assert!(
            pending_before_last,
            "the range stopped being pending before its last REMOVE was followed"
        );
        assert!(
            !pending(),
            "the range stayed pending after every REMOVE was followed"
        );
    }
}
