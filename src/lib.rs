//! hetmem: a heterogeneous memory manager in user space.
//!
//! The CPU and a device share one address space ([`Space`]); pages live in system memory or in
//! device memory ([`device::SoftDevice`], the built-in software device) and move between them
//! with the Linux HMM design: mirroring with interval notifiers ([`hmm`]), three-phase
//! migration ([`migrate`]), device-private memory whose CPU accesses fault the page back, and
//! device-exclusive access for device atomics. CPU faults are real page faults, served through
//! userfaultfd ([`mm`]). Where the mechanisms leave a choice (migrate or map remotely, how much to
//! prefetch, what to do when device memory is full), a [`policy::Policy`] decides, and an event
//! trace ([`policy::trace`]) records what happened.
//!
//! `unsafe` lives in the system-call layer (`sys`) only; locks come through one facade (`sync`);
//! both are internals, hidden from these docs. See `docs/architecture.md`.

#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![deny(missing_docs)]

/// A debug-level [`tracing`] event of target `hetmem` (a migration finalized, device frames
/// evicted, a writeback, a file range placed, a CPU fault served outside a signal handler),
/// except in hetmem's SIGBUS handler: a subscriber may allocate or take locks, which is not
/// async-signal-safe there (faults served in a signal handler are counted in `SpaceStats` and
/// recorded by the event trace instead). Silent unless the program installs a subscriber; with
/// none, an event costs a thread-local read and a load of `tracing`'s global level.
macro_rules! debug_event {
    ($($arg:tt)*) => {
        if !$crate::sys::in_signal_handler() {
            tracing::debug!(target: "hetmem", $($arg)*);
        }
    };
}

// The tree follows the kernel objects (see docs/architecture.md, "Modules", for which module
// uses which: there is no cycle, and `tests/layers.rs` keeps it so): the foundations
// (`addr`, `error`, `sync`, `sys`, and `link`, the link model pools charge copies to), the
// kernel boundary (`mm`), frames (`pool`), interval notifiers (`notifier`), placement
// (`policy`), the page cache (`pagecache`), the address space (`space`), mirroring (`hmm`),
// migration (`migrate`), devices (`device`), and the binary's jobs (`bench`, `demo`).
pub mod addr;
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "cli")]
pub mod demo;
pub mod device;
pub mod error;
pub mod hmm;
pub mod link;
pub mod migrate;
pub mod mm;
pub mod notifier;
pub mod pagecache;
pub mod policy;
pub mod pool;
pub mod space;
#[cfg(feature = "cli")]
pub mod workload;
// Internals: the lock facade (public for the crate's tests and fuzz targets; not part of the
// API, hidden from the docs).
#[doc(hidden)]
pub mod sync;
// Internals: the system-call layer, where every `unsafe` block lives (public for the crate's
// tests and fuzz targets; not part of the API, hidden from the docs). `Prot` is re-exported.
#[doc(hidden)]
pub mod sys;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

pub use addr::{PAGE_SIZE, VaRange, VirtAddr, Vpn};
pub use device::{
    Cmd, CmdOut, DeviceConfig, DeviceMirror, DmirrorCmd, FLAG_FAIL_ALLOC, SoftDevice, snap,
};
pub use error::{Error, Result};
pub use mm::FaultMode;
pub use pagecache::{Access, CacheConfig, FileCache, FileHandle};
pub use pool::{FrameOwner, FrameStore, HostFrames, MemoryKind, Owner, Region};
pub use space::{
    AdoptConfig, FileMapOptions, MapOptions, Mapping, Pin, Residency, Space, SpaceConfig,
    SpaceStats,
};
pub use sys::{LARGE_PAGE_SIZE, Prot};
