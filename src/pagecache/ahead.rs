//! Read-ahead: once CPU (or device) faults read a file in order at the largest fault-around
//! window, the windows after the faulting one are handed to a background thread of the cache,
//! which reads them from the file and stages them while the faulting thread goes on with what
//! it has. One stream per cache, read in order, so that the kernel's own readahead on the file
//! keeps its deep I/O (two threads filling alternate windows read slower than one: their strided
//! reads defeat it; docs/performance.md, "Files").
//!
//! # Locks and staleness
//!
//! [`Ahead`] lives in `CacheState` (the cache lock). The thread takes a window (the uncached,
//! fillable pages from its cursor, up to 2 MiB) under the lock, reads it from the file with no
//! lock held, and stages it under the lock only if nothing could have made the read stale
//! meanwhile: [`Ahead::stale`] moves with every state change of a page in the window in flight
//! (`FileCache::set_state`: a write, a fill by another path, a drop) and with every removal
//! (`FileCache::begin_removal`: truncate, hole punch, direct write, memory failure, device
//! placement), so a read that raced with any of them is dropped, never staged; its pages are
//! filled afresh by whoever needs them next. Nothing waits for the thread but faults whose page
//! it was assigned ([`Ahead::covers`]): they wait on `FileCache::ahead_wait`, a mutex and
//! condition variable outside the lock watch (as `flush_wait`), with the cache lock released,
//! window after window until their page is no longer assigned (staged, or dropped and then
//! filled by the fault itself). A CPU fault holds no other lock meanwhile; a device's fault
//! (`range_fault`) and a pin hold their space's lock, as they do across a fill of their own.

use super::*;

/// Largest fault-around window of a file fault, in pages (2 MiB), and the read-ahead's window.
pub(super) const MAX_WINDOW: u64 = (2 << 20) / PAGE;
/// How far the read-ahead runs ahead of the last fault that waited for it or handed it work,
/// in windows (8 MiB, as a `read_ahead_kb` of 8192 would).
const DEPTH: u64 = 4;

/// The read-ahead's assignment and progress (under the cache lock).
#[derive(Debug, Default)]
pub(super) struct Ahead {
    /// The window being read with no lock held: pages `.0..(.1)`.
    pub(super) in_flight: Option<(u64, u64)>,
    /// Moves with every change that may make the read in flight stale (see the module doc).
    pub(super) stale: u64,
    /// The next page to read, and where the assignment ends (exclusive; none when equal).
    pub(super) next: u64,
    pub(super) until: u64,
}

impl Ahead {
    /// Whether page `p` is the read-ahead's: in flight or still to be read.
    pub(super) fn covers(&self, p: u64) -> bool {
        self.in_flight.is_some_and(|(s, e)| s <= p && p < e) || (self.next <= p && p < self.until)
    }

    /// Page `p` changed state (or is about to be removed): a read of it in flight is stale.
    pub(super) fn touch(&mut self, p: u64) {
        if self.in_flight.is_some_and(|(s, e)| s <= p && p < e) {
            self.stale += 1;
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.is_none() && self.next >= self.until
    }
}

/// What [`FileCache::fault_fill`] does about the read-ahead for a fault at a page.
pub(super) enum AheadStep {
    /// The page is the read-ahead's: wait for its next window with no lock held
    /// ([`FileCache::wait_ahead`], passing the count), then retry the access.
    Wait(u64),
    /// Not the read-ahead's: fill it in this thread.
    Fill,
}

impl FileCache {
    /// Starts the cache's read-ahead thread (with its first mapping; only for a cache over a
    /// file: fills of a cache without storage read nothing).
    pub(super) fn start_read_ahead(&self) {
        if !self.backend.has_storage() {
            return;
        }
        // Its own buffer, made on the thread: the fault path never allocates for it.
        self.start_background(
            &self.ahead_bell,
            "hetmem-readahead",
            || vec![0u8; (MAX_WINDOW * PAGE) as usize],
            |c, buf| c.read_ahead_round(buf),
        );
    }

    /// For a fault at page `p` (cache lock held): if the read-ahead was assigned the page,
    /// extends its assignment to [`DEPTH`] windows past `p` and says to wait for it.
    pub(super) fn ahead_step(&self, st: &mut CacheState, p: u64) -> AheadStep {
        if !st.ahead.covers(p) {
            return AheadStep::Fill;
        }
        let until = (p + DEPTH * MAX_WINDOW).min(st.pages.len());
        st.ahead.until = st.ahead.until.max(until);
        AheadStep::Wait(self.ahead_done.load(Ordering::SeqCst))
    }

    /// A fault filled `..end` at the largest window (cache lock held): hands the next
    /// [`DEPTH`] windows to the read-ahead if it is idle, and rings it. Returns the end of its
    /// assignment (where this thread's sequential run goes on) if it took them.
    pub(super) fn hand_ahead(&self, st: &mut CacheState, end: u64) -> Option<u64> {
        if !st.ahead.idle() || end >= st.pages.len() {
            return None;
        }
        let bell = lock(&self.ahead_bell);
        let b = bell.as_ref()?;
        st.ahead.next = end;
        st.ahead.until = (end + DEPTH * MAX_WINDOW).min(st.pages.len());
        b.ring();
        Some(st.ahead.until)
    }

    /// Waits, with no lock held, until the read-ahead ends a window after `seen` (its count
    /// when the caller found its page assigned).
    pub(super) fn wait_ahead(&self, seen: u64) {
        let (m, cv) = &self.ahead_wait;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        while self.ahead_done.load(Ordering::SeqCst) == seen {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until the read-ahead has nothing in flight and nothing assigned (its windows
    /// staged or dropped). For tests and measurements: a read through the cache never needs
    /// it.
    pub fn wait_read_ahead(&self) {
        loop {
            let seen = {
                let st = lock(&self.st);
                if st.ahead.idle() {
                    return;
                }
                self.ahead_done.load(Ordering::SeqCst)
            };
            self.wait_ahead(seen);
        }
    }

    /// One window ended (staged or dropped): wakes the faults waiting for it.
    fn ahead_window_done(&self) {
        self.ahead_done.fetch_add(1, Ordering::SeqCst);
        let (m, cv) = &self.ahead_wait;
        let _g = m.lock().unwrap_or_else(|p| p.into_inner());
        cv.notify_all();
    }

    /// The read-ahead thread's work: windows in order until its assignment ends.
    fn read_ahead_round(&self, buf: &mut [u8]) {
        while let Some((s, e, stale, want)) = self.take_window() {
            let n = (e - s) as usize * PAGE_SIZE;
            let buf = &mut buf[..n];
            let read = self.read_file(s * PAGE, &mut buf[..want]);
            let (got, failed) = match read {
                Ok(got) => (got, false),
                Err(_) => (0, true),
            };
            buf[got..].fill(0);
            let mut st = lock(&self.st);
            st.ahead.in_flight = None;
            let fresh = !failed && st.ahead.stale == stale;
            if fresh && self.stage(s * PAGE, buf).is_ok() {
                self.backend.drop_cached(s * PAGE, got as u64);
                for q in s..e {
                    self.set_state(&mut st, q, PageState::Clean);
                }
                st.stats.pages_filled += e - s;
                st.stats.pages_read_ahead += e - s;
                self.wake_evictor_if_over(&st);
            } else {
                // Stale, or the file or the memfd failed: dropped, and the rest of the
                // assignment with it (a fault fills in its own thread, and reports the error).
                st.stats.read_ahead_dropped += 1;
                st.ahead.until = st.ahead.next;
            }
            drop(st);
            self.ahead_window_done();
        }
    }

    /// Takes the next window of the assignment under the cache lock: the uncached, fillable
    /// pages from the cursor (cached ones are passed over), at most [`MAX_WINDOW`]. Returns
    /// its pages, the staleness count and the bytes of the file to read; `None` when the
    /// assignment is done (or meets pages being removed: it ends there).
    fn take_window(&self) -> Option<(u64, u64, u64, usize)> {
        let mut st = lock(&self.st);
        let end = st.ahead.until.min(st.pages.len());
        let fillable = |st: &CacheState, p: u64| {
            st.pages.get(p) == PageState::Uncached
                && (st.poisoned.is_empty() || !st.poisoned.contains(&p))
                && !st.blocked.iter().any(|&(f, l)| f <= p && p < l)
        };
        let mut s = st.ahead.next;
        while s < end && !fillable(&st, s) {
            if st.blocked.iter().any(|&(f, l)| f <= s && s < l) {
                break;
            }
            s += 1;
        }
        let lim = (s + MAX_WINDOW).min(end);
        let mut e = s;
        while e < lim && fillable(&st, e) {
            e += 1;
        }
        if s == e {
            // Done, or pages being removed: the assignment ends.
            st.ahead.next = st.ahead.until;
            drop(st);
            self.ahead_window_done();
            return None;
        }
        st.ahead.next = e;
        st.ahead.in_flight = Some((s, e));
        let want = (st.disk_size.min(st.size))
            .saturating_sub(s * PAGE)
            .min((e - s) * PAGE) as usize;
        Some((s, e, st.ahead.stale, want))
    }
}
