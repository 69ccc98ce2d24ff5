//! The one facade through which hetmem takes its locks, condition variables, atomics and
//! threads.
//!
//! In the crate's own unit-test build (`cfg(test)`, the tests under `src/`) these are
//! [`shuttle`]'s types, so that every unit test explores thread schedules of the core's state
//! machine (run inside `shuttle::check_random`/`check_pct`). Everywhere else (the library as
//! users link it, and the integration tests under `tests/`, which drive the real kernel) they
//! are `std`'s.
//!
//! The SIGBUS handler's process-wide tables use `std` atomics directly: the signal path is not
//! modelled (shuttle cannot drive signals), and those tables are lock-free.

#[cfg(not(test))]
mod imp {
    pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
    pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
    pub use std::thread;
}

#[cfg(test)]
#[allow(clippy::items_after_test_module)]
mod imp {
    pub use shuttle::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
    pub use shuttle::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
    pub use shuttle::thread;
}

pub use imp::*;
pub use std::sync::atomic::Ordering;

/// Locks `m`, recovering the data if a panicking thread poisoned it: hetmem's invariants are
/// re-established at every unlock point, so a poisoned lock holds consistent state.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
