//! The one facade through which hetmem takes its locks, condition variables, atomics and
//! threads.
//!
//! In the crate's own unit-test build (`cfg(test)`, the tests under `src/`) these are
//! `shuttle`'s types, so that every unit test explores thread schedules of the core's state
//! machine (run inside `shuttle::check_random`/`check_pct`). Everywhere else (the library as
//! users link it, and the integration tests under `tests/`, which drive the real kernel) they
//! are `std`'s.
//!
//! The SIGBUS handler's process-wide tables use `std` atomics directly: the signal path is not
//! modelled (shuttle cannot drive signals), and those tables are lock-free.
//!
//! # Poisoning
//!
//! A thread that panics while it holds a lock poisons it. What [`lock`] and [`wait`] then do
//! depends on what the lock protects, and on what can panic while it is held:
//!
//! | lock (the type it protects) | what can panic while it is held | a poisoned lock |
//! |---|---|---|
//! | an address space's state (`SpaceState`) | hetmem's invariant checks (an `expect` naming the invariant), and user code called under it: the space's [`Policy`](crate::policy::Policy), its [`TraceSink`](crate::policy::trace::TraceSink), a device's [`IntervalOps`](crate::notifier::IntervalOps) | ends the process |
//! | a file cache's state (`CacheState`) | invariant checks, and the cache's [`FileBackend`](crate::pagecache::FileBackend) (user code: reads, writes, punches, syncs under it) | ends the process |
//! | a device's page table (`DevPageTable`) | invariant checks, and device copies through a [`FrameStore`](crate::pool::FrameStore) (user code) | ends the process |
//! | a pool's free lists (`PoolState`) | invariant checks only, each made before the critical section's first write (a free of a frame that is not allocated large) | recovered |
//! | slots: a file cache's removal lock (`()`, no data), its evictor's doorbell, its trace slot, a mirror's notifier, the kernel side's userfaultfd services | nothing between two writes: a critical section reads, clones, takes or replaces the whole value (the services also make system calls under it, which change no protected data) | recovered |
//! | test machinery (`FaultyBackend`'s plan, `ModelMm`'s pages, the page-cache checker's record of failed calls; `testing` feature) | a plan is replaced whole; a page's bytes are copied after the bounds checks; the record is one push, take or assignment | recovered |
//!
//! The three state locks end the process because their operations make several writes under one
//! holding (a claim and the MIGRATING marks of its pages; a page's state and the dirty count; a
//! device entry and the frame it names), so a panic between two of them leaves state no later
//! operation may trust: a frame two pages use, a page left in a state whose owner is gone (every
//! fault on it waits forever), a device still mapping a freed frame (another space's data).
//! Recovering the data would turn the panic into silent corruption or a hang. Propagating the
//! poison as a panic in every later user is no better: the CPU fault service takes these locks in
//! the SIGBUS handler, where a panic cannot unwind and aborts without a word, and in the handler
//! thread, whose death leaves every later fault of its mappings waiting. So the first thread that
//! finds such a lock poisoned aborts the process, with a message naming the lock's type and where
//! it was taken (written with `write(2)`: it may be the SIGBUS handler); the panic's own message
//! was printed by the thread that panicked.
//!
//! The other locks recover the data, which is consistent at every point where a holder can panic
//! (see the table); refusing it would only spread one panic to unrelated threads. A new lock kind
//! is recovered unless its type is listed in `ends_process_when_poisoned` (next to [`lock`]):
//! list it there unless every critical section leaves its data consistent wherever it can panic.
//! The few `std` locks hetmem takes directly (the process-wide tables of address spaces and
//! device ids, a doorbell's flags, the flush waiters' `()`) recover too, for the slots' reason:
//! each critical section writes one whole entry or flag.
//!
//! # Lock watch
//!
//! Every lock taken through [`lock`] can be watched: in debug builds always, in release builds
//! when the environment variable `HETMEM_LOCK_WATCH` holds a bound in milliseconds when the first
//! lock is taken. A watched lock held longer than the bound (1 s in debug builds) is reported on
//! stderr twice: while it is still held, by a monitor thread (`hetmem-lockwatch`), with the
//! holder's thread id and the place where it took the lock (so a deadlock names its culprit),
//! and when it is released, by the holder itself, with its stack. Unwatched, a lock costs one
//! relaxed atomic load more.

#[cfg(not(test))]
mod imp {
    pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
    pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, TryLockError, Weak};
    pub use std::thread;
}

#[cfg(test)]
#[allow(clippy::items_after_test_module)]
mod imp {
    pub use shuttle::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
    pub use shuttle::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, TryLockError, Weak};
    pub use shuttle::thread;
}

pub use imp::*;
pub use std::sync::atomic::Ordering;

/// A held lock taken through [`lock`]: the guard, and its slot in the lock watch.
pub struct Guard<'a, T> {
    /// Always `Some` while the guard is usable (`None` only inside [`wait`]).
    g: Option<MutexGuard<'a, T>>,
    watch: Option<watch::Held>,
}

impl<T> std::ops::Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.g.as_ref().expect("a guard is held until dropped")
    }
}

impl<T> std::ops::DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.g.as_mut().expect("a guard is held until dropped")
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        if let Some(h) = self.watch.take() {
            h.release();
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Guard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// Locks `m`, watching how long it is held (see the module doc). If a panicking thread poisoned
/// it, the data is recovered, or the process ends, by the kind of lock (module doc,
/// "Poisoning").
#[track_caller]
pub fn lock<T>(m: &Mutex<T>) -> Guard<'_, T> {
    let at = std::panic::Location::caller();
    let g = match spin_then_lock(m) {
        Ok(g) => g,
        Err(p) => recover_or_abort::<T, _>(p.into_inner(), at),
    };
    let watch = watch::hold(at, level_of::<T>);
    Guard { g: Some(g), watch }
}

/// Takes `m` if it is free now (`None` if another thread holds it); otherwise as [`lock`].
#[track_caller]
pub fn try_lock<T>(m: &Mutex<T>) -> Option<Guard<'_, T>> {
    let at = std::panic::Location::caller();
    let g = match m.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => recover_or_abort::<T, _>(p.into_inner(), at),
        Err(TryLockError::WouldBlock) => return None,
    };
    let watch = watch::hold(at, level_of::<T>);
    Some(Guard { g: Some(g), watch })
}

/// Takes `m`, spinning a few microseconds first when it is held: hetmem's critical sections are
/// short, and on a VM a thread that sleeps on a held lock pays a futex wake-up (≈ 15 µs,
/// DESIGN.md §3) that costs more than the wait.
#[cfg(not(test))]
fn spin_then_lock<T>(m: &Mutex<T>) -> std::sync::LockResult<std::sync::MutexGuard<'_, T>> {
    // Between two tries the spinner backs off (1, 2, 4 … up to `SPIN_BACKOFF_MAX` pauses): a
    // failed try takes the lock's cache line exclusively, and the holder's data shares that
    // line, so tries in a tight loop slow the very critical section they wait for.
    let mut pauses = 1;
    let mut spent = 0;
    while spent < SPIN_PAUSES {
        match m.try_lock() {
            Ok(g) => return Ok(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Err(p),
            Err(std::sync::TryLockError::WouldBlock) => {
                for _ in 0..pauses {
                    std::hint::spin_loop();
                }
                spent += pauses;
                pauses = (pauses * 2).min(SPIN_BACKOFF_MAX);
            }
        }
    }
    m.lock()
}

/// Under the schedule explorer every acquisition is a scheduling point: no spinning.
#[cfg(test)]
fn spin_then_lock<T>(m: &Mutex<T>) -> std::sync::LockResult<MutexGuard<'_, T>> {
    m.lock()
}

/// Pauses [`spin_then_lock`] spends before it sleeps (a few microseconds).
#[cfg(not(test))]
const SPIN_PAUSES: u32 = 2000;

/// The longest back-off between two tries of [`spin_then_lock`], in pauses.
#[cfg(not(test))]
const SPIN_BACKOFF_MAX: u32 = 16;

/// Whether a poisoned lock protecting a `T` ends the process instead of being recovered: the
/// state locks, whose critical sections make several writes that a panic can separate (module
/// doc, "Poisoning"). Known from the type, as [`level_of`] knows the lock order.
fn ends_process_when_poisoned<T>() -> bool {
    let name = std::any::type_name::<T>();
    ["::SpaceState", "::CacheState", "::DevPageTable"]
        .iter()
        .any(|kind| name.ends_with(kind))
}

/// The guard of a poisoned lock, if its kind recovers; otherwise aborts the process with a
/// message (async-signal-safe: the SIGBUS handler may be the thread that finds it).
fn recover_or_abort<T, G>(g: G, at: &'static std::panic::Location<'static>) -> G {
    if !ends_process_when_poisoned::<T>() {
        return g;
    }
    let mut digits = [0u8; 10];
    crate::sys::abort_with(&[
        b"hetmem: a thread panicked while it held a lock of ",
        std::any::type_name::<T>().as_bytes(),
        b", whose data may be half-updated: aborting (the lock was taken again at ",
        at.file().as_bytes(),
        b":",
        decimal(at.line(), &mut digits),
        b")\n",
    ])
}

/// `v` in decimal, formatted into `buf` without allocating.
fn decimal(mut v: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// The level of a lock in hetmem's lock order (docs/architecture.md, "Locks and their order"),
/// known from the type it protects; a lock may be taken only while every lock the thread holds
/// has a lower level. `None`: not ordered (checked by nothing).
fn level_of<T>() -> Option<u8> {
    let name = std::any::type_name::<T>();
    Some(match name {
        "()" => 0, // FileCache::removal
        n if n.ends_with("space::SpaceState") => 10,
        n if n.ends_with("pagecache::CacheState") => 15,
        n if n.contains("mm::ThreadService") => 17,
        n if n.ends_with("mm::ModelState") => 18,
        n if n.ends_with("device::DevPageTable") => 20,
        n if n.ends_with("pool::PoolState") || n.contains("pagecache::Doorbell") => 30,
        _ => return None,
    })
}

/// Waits on `cv`, releasing the lock `g` holds meanwhile (as `Condvar::wait`), and returns it
/// held again (a lock poisoned meanwhile is treated as by [`lock`]).
#[track_caller]
pub fn wait<'a, T>(cv: &Condvar, mut g: Guard<'a, T>) -> Guard<'a, T> {
    let inner = g.g.take().expect("a guard is held until dropped");
    if let Some(h) = g.watch.take() {
        h.release();
    }
    drop(g);
    let at = std::panic::Location::caller();
    let inner = match cv.wait(inner) {
        Ok(g) => g,
        Err(p) => recover_or_abort::<T, _>(p.into_inner(), at),
    };
    let watch = watch::hold(at, level_of::<T>);
    Guard {
        g: Some(inner),
        watch,
    }
}

/// Lock-order violations the lock watch has reported in this process, and acquisitions of
/// ordered locks it has checked.
pub fn lock_order_stats() -> (u64, u64) {
    (watch::violations(), watch::checks())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lock_taken_out_of_order_is_counted() {
        let at = std::panic::Location::caller();
        let (v0, c0) = super::lock_order_stats();
        super::watch::enter_level(10, at);
        super::watch::enter_level(15, at); // in order
        super::watch::enter_level(5, at); // out of order
        super::watch::leave_level(5);
        super::watch::leave_level(15);
        super::watch::leave_level(10);
        let (v1, c1) = super::lock_order_stats();
        assert_eq!(v1 - v0, 1);
        assert_eq!(c1 - c0, 3);
        super::watch::enter_level(5, at); // nothing held any more: in order
        super::watch::leave_level(5);
        assert_eq!(super::lock_order_stats().0, v1);
    }

    #[test]
    fn only_the_state_locks_end_the_process_when_poisoned() {
        // Known by the type's name, as the state types of space, pagecache and device are (this
        // module sits below them and names none of them).
        struct SpaceState;
        struct DevPageTable;
        struct Doorbell;
        assert!(super::ends_process_when_poisoned::<SpaceState>());
        assert!(super::ends_process_when_poisoned::<DevPageTable>());
        assert!(!super::ends_process_when_poisoned::<()>());
        assert!(!super::ends_process_when_poisoned::<Option<Doorbell>>());
        let mut b = [0u8; 10];
        assert_eq!(super::decimal(0, &mut b), b"0");
        assert_eq!(super::decimal(907, &mut b), b"907");
        assert_eq!(super::decimal(u32::MAX, &mut b), b"4294967295");
    }
}

/// Whether the lock watch is on in this process (see the module doc).
pub fn lock_watch_bound() -> Option<std::time::Duration> {
    watch::bound()
}

mod watch {
    //! The lock watch's table of held locks: fixed, lock-free, allocated once.
    use crate::sys::AtomicLocation;
    use std::panic::Location;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    const SLOTS: usize = 256;
    /// Bound in ms; 0 off; u64::MAX not decided yet.
    static BOUND_MS: AtomicU64 = AtomicU64::new(u64::MAX);
    static HELD_SINCE: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
    static HELD_TID: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
    static HELD_AT: [AtomicLocation; SLOTS] = [const { AtomicLocation::new() }; SLOTS];
    /// Reported already by the monitor (not again until released).
    static REPORTED: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

    fn now_ns() -> u64 {
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 | 1
    }

    pub(super) fn bound() -> Option<Duration> {
        let mut b = BOUND_MS.load(Ordering::Relaxed);
        if b == u64::MAX {
            b = decide();
        }
        (b != 0).then(|| Duration::from_millis(b))
    }

    #[cold]
    fn decide() -> u64 {
        let env = std::env::var("HETMEM_LOCK_WATCH")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let b = match env {
            Some(ms) => ms.clamp(1, u64::MAX - 1),
            None if cfg!(debug_assertions) && !cfg!(test) => 1000,
            None => 0,
        };
        if BOUND_MS
            .compare_exchange(u64::MAX, b, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && b != 0
        {
            let _ = EPOCH.get_or_init(Instant::now);
            let _ = std::thread::Builder::new()
                .name("hetmem-lockwatch".into())
                .spawn(move || monitor(Duration::from_millis(b)));
        }
        BOUND_MS.load(Ordering::SeqCst)
    }

    thread_local! {
        static TID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        /// The levels of the ordered locks this thread holds, most recent last (at most
        /// `DEPTH`; deeper nesting is not checked).
        static LEVELS: std::cell::Cell<([u8; DEPTH], usize)> =
            const { std::cell::Cell::new(([0; DEPTH], 0)) };
    }
    const DEPTH: usize = 16;
    static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
    static CHECKS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn violations() -> u64 {
        VIOLATIONS.load(Ordering::SeqCst)
    }

    pub(super) fn checks() -> u64 {
        CHECKS.load(Ordering::SeqCst)
    }

    /// A watched lock's slot, and its level if ordered.
    pub(super) struct Held {
        slot: usize,
        at: &'static Location<'static>,
        level: Option<u8>,
    }

    /// Checks that a lock of `level` may be taken now (every lock this thread holds has a lower
    /// level) and records it.
    pub(super) fn enter_level(level: u8, at: &'static Location<'static>) {
        CHECKS.fetch_add(1, Ordering::Relaxed);
        LEVELS.with(|c| {
            let (mut v, n) = c.get();
            if let Some(&top) = v[..n.min(DEPTH)].iter().max()
                && top >= level
            {
                VIOLATIONS.fetch_add(1, Ordering::SeqCst);
                if !crate::sys::in_signal_handler() {
                    eprintln!(
                        "hetmem lock watch: lock order violated: a lock of level {level} taken at \
                         {at} while this thread holds one of level {top} (see docs/architecture.md, \
                         \"Locks and their order\"):\n{}",
                        std::backtrace::Backtrace::force_capture()
                    );
                }
            }
            if n < DEPTH {
                v[n] = level;
            }
            c.set((v, n + 1));
        });
    }

    pub(super) fn leave_level(level: u8) {
        LEVELS.with(|c| {
            let (mut v, n) = c.get();
            let k = n.min(DEPTH);
            if let Some(i) = v[..k].iter().rposition(|&l| l == level) {
                v.copy_within(i + 1..k, i);
            }
            c.set((v, n.saturating_sub(1)));
        });
    }

    /// `level` gives the lock's level (computed from its type name: only when watched).
    pub(super) fn hold(at: &'static Location<'static>, level: fn() -> Option<u8>) -> Option<Held> {
        if BOUND_MS.load(Ordering::Relaxed) == 0 {
            return None;
        }
        bound()?;
        let level = level();
        // Not in the crate's unit-test build: shuttle runs its tasks as coroutines of one OS
        // thread, which would share this thread-local stack of levels.
        let level = if cfg!(test) { None } else { level };
        if let Some(l) = level {
            enter_level(l, at);
        }
        let tid = TID.with(|t| {
            if t.get() == 0 {
                t.set(rustix::thread::gettid().as_raw_nonzero().get() as u32);
            }
            t.get()
        });
        let Some(slot) = (0..SLOTS).find(|&i| {
            HELD_TID[i]
                .compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        }) else {
            if let Some(l) = level {
                leave_level(l);
            }
            return None;
        };
        HELD_AT[slot].store(at);
        HELD_SINCE[slot].store(now_ns(), Ordering::SeqCst);
        Some(Held { slot, at, level })
    }

    impl Held {
        pub(super) fn release(self) {
            if let Some(l) = self.level {
                leave_level(l);
            }
            let since = HELD_SINCE[self.slot].swap(0, Ordering::SeqCst);
            let held = Duration::from_nanos(now_ns().saturating_sub(since));
            REPORTED[self.slot].store(0, Ordering::SeqCst);
            HELD_TID[self.slot].store(0, Ordering::SeqCst);
            if let Some(b) = bound()
                && held > b
                && !crate::sys::in_signal_handler()
            {
                eprintln!(
                    "hetmem lock watch: a lock taken at {} was held for {:.3} s (bound {} ms); \
                     the holder released it here:\n{}",
                    self.at,
                    held.as_secs_f64(),
                    b.as_millis(),
                    std::backtrace::Backtrace::force_capture()
                );
            }
        }
    }

    /// Reports every lock held past the bound, once per holding, while it is still held.
    fn monitor(bound: Duration) {
        let (m, cv) = (std::sync::Mutex::new(()), std::sync::Condvar::new());
        let tick = (bound / 4).max(Duration::from_millis(1));
        loop {
            // A timed wait that nothing signals: the monitor's period.
            let g = m.lock().unwrap_or_else(|p| p.into_inner());
            drop(cv.wait_timeout(g, tick));
            let now = now_ns();
            for i in 0..SLOTS {
                let since = HELD_SINCE[i].load(Ordering::SeqCst);
                if since == 0 || now.saturating_sub(since) <= bound.as_nanos() as u64 {
                    continue;
                }
                if REPORTED[i].swap(1, Ordering::SeqCst) != 0 {
                    continue;
                }
                let at = HELD_AT[i]
                    .load()
                    .map_or_else(|| "?".to_string(), |l| l.to_string());
                eprintln!(
                    "hetmem lock watch: thread {} has held a lock taken at {} for {:.3} s \
                     (bound {} ms) and still holds it (stacks: gdb -p {} -batch -ex 'thread \
                     apply all bt')",
                    HELD_TID[i].load(Ordering::SeqCst),
                    at,
                    Duration::from_nanos(now - since).as_secs_f64(),
                    bound.as_millis(),
                    std::process::id()
                );
            }
        }
    }
}
