//! The C API of hetmem: address spaces (new, or adopted plain memory), mappings, software
//! devices and their mirrors, migration, the test device's commands in the kernel's shape, and
//! the file cache. C and C++ runtimes are where heterogeneous memory managers live; this is how
//! they reach hetmem.
//!
//! # Conventions
//!
//! * Objects are opaque handles made by a `*_new`/`*_open`/`*_adopt` function and released by
//!   the matching `*_free`/`*_close` (a null handle is ignored there).
//! * Every other function returns 0 on success or a negative errno (`-EINVAL`, `-ENOMEM`, …,
//!   the errno of [`hetmem::Error::errno`]); `hetmem_last_error` then gives the message of the
//!   calling thread's last failure. Out-parameters are written only on success.
//! * Addresses and lengths are bytes; ranges must be page-aligned (4096), as in the Rust API.
//! * A panic inside hetmem never crosses into C: the call returns `-EIO` with the panic's
//!   message.
//!
//! # Safety
//!
//! This crate is the FFI boundary: the only `unsafe` outside `hetmem::sys`, each block with the
//! caller's obligation it relies on (documented on the function: valid handles, buffers of the
//! stated size, NUL-terminated paths).

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use hetmem::policy::hints::{Advice, HintPolicy};
use hetmem::{
    AdoptConfig, CacheConfig, Cmd, DeviceConfig, DeviceMirror, DmirrorCmd, FileCache, FileHandle,
    MemoryKind, Pin, Prot, SoftDevice, Space, SpaceConfig, VirtAddr,
};

/// hetmem's heap, apart from the C library's `malloc` arena: the program that calls (or preloads)
/// this library may overflow its own heap blocks (the kernel's hmm-tests `snapshot` case does, by
/// 4089 bytes), which must not reach hetmem's objects.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An address space (`hetmem::Space`).
pub struct HetmemSpace(Space, std::sync::Mutex<Option<Arc<HintPolicy>>>);

impl HetmemSpace {
    fn new(space: Space) -> HetmemSpace {
        HetmemSpace(space, std::sync::Mutex::new(None))
    }
}

/// A software device (`hetmem::SoftDevice`).
pub struct HetmemDevice(SoftDevice);

/// A device's mirror of an address space (`hetmem::DeviceMirror`).
pub struct HetmemMirror(DeviceMirror);

/// A cached file (`hetmem::FileHandle` on a `hetmem::FileCache`).
pub struct HetmemFile(FileHandle);

/// Pinned pages (`hetmem::Pin`): released by [`hetmem_pin_free`].
pub struct HetmemPin {
    /// Held until the handle is freed (its drop releases the pin).
    _pin: Pin,
}

/// The argument of [`hetmem_mirror_cmd`], laid out as the kernel's `struct hmm_dmirror_cmd`.
#[repr(C)]
#[derive(Debug)]
pub struct HetmemDmirrorCmd {
    /// Start address (page-aligned).
    pub addr: u64,
    /// The buffer: `npages * 4096` bytes for READ, WRITE, MIGRATE_TO_DEV and EXCLUSIVE, `npages`
    /// bytes for SNAPSHOT, unused otherwise.
    pub ptr: u64,
    /// Pages (for FLAGS: the flag word).
    pub npages: u64,
    /// Out: pages processed.
    pub cpages: u64,
    /// Out: fault passes.
    pub faults: u64,
}

/// Readable memory.
pub const HETMEM_PROT_READ: c_int = 1;
/// Writable memory (with [`HETMEM_PROT_READ`]).
pub const HETMEM_PROT_WRITE: c_int = 2;

/// Device-private memory (the CPU cannot map it: a CPU access migrates the page back).
pub const HETMEM_DEVICE_PRIVATE: c_int = 0;
/// Device-coherent memory (the CPU maps it in place).
pub const HETMEM_DEVICE_COHERENT: c_int = 1;

/// [`hetmem_space_adopt_flags`]: pages in device-private memory read as swapped out in
/// `/proc/self/pagemap` (`PM_SWAP`), as the kernel reports its device-private entries
/// (`SpaceConfig::device_private_as_swap`: one more ioctl per run migrated to such memory).
pub const HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP: u32 = 1;

/// [`hetmem_set_policy`]: device faults map pages where they are (the default).
pub const HETMEM_POLICY_DEFAULT: c_int = 0;
/// The UVM-like policy: on-demand migration, density prefetch, thrashing detection, access
/// counters.
pub const HETMEM_POLICY_UVM: c_int = 1;
/// Migrate whole units; never bring back what the CPU can use in place.
pub const HETMEM_POLICY_COHERENT_AWARE: c_int = 2;
/// hetmem's own: device reads make read-only replicas, writes migrate.
pub const HETMEM_POLICY_ADAPTIVE: c_int = 3;

/// [`hetmem_advise`]: withdraw the hints of the range.
pub const HETMEM_ADVICE_NONE: c_int = 0;
/// The range should live in device memory (`cudaMemAdviseSetPreferredLocation` = device).
pub const HETMEM_ADVICE_PREFER_DEVICE: c_int = 1;
/// The range should stay in system memory; devices read it over the link.
pub const HETMEM_ADVICE_PREFER_SYSTEM: c_int = 2;
/// Devices access the range where it is (`cudaMemAdviseSetAccessedBy`).
pub const HETMEM_ADVICE_ACCESSED_BY: c_int = 3;
/// Mostly read: every reading device gets a read-only replica; a write drops them
/// (`cudaMemAdviseSetReadMostly`).
pub const HETMEM_ADVICE_READ_MOSTLY: c_int = 4;

/// [`hetmem_mirror_cmd`] commands, numbered as the kernel's `HMM_DMIRROR_*` ioctls (0x00–0x08).
pub const HETMEM_CMD_READ: u32 = 0;
/// Write the buffer into the range.
pub const HETMEM_CMD_WRITE: u32 = 1;
/// Migrate the range to device memory (the buffer receives the data).
pub const HETMEM_CMD_MIGRATE_TO_DEV: u32 = 2;
/// Migrate the range's device pages back to system memory.
pub const HETMEM_CMD_MIGRATE_TO_SYS: u32 = 3;
/// One byte per page describing the device's view (the kernel's `HMM_DMIRROR_PROT_*` values).
pub const HETMEM_CMD_SNAPSHOT: u32 = 4;
/// Take device-exclusive access (the buffer receives the data).
pub const HETMEM_CMD_EXCLUSIVE: u32 = 5;
/// `-EPERM` if any device-exclusive entry remains in the range.
pub const HETMEM_CMD_CHECK_EXCLUSIVE: u32 = 6;
/// Evict all of the device's memory.
pub const HETMEM_CMD_RELEASE: u32 = 7;
/// Set flags (`npages` is the flag word).
pub const HETMEM_CMD_FLAGS: u32 = 8;

/// Bytes of the per-thread error message, its NUL included (longer messages are cut).
const ERROR_BYTES: usize = 512;

thread_local! {
    /// The calling thread's last error message, NUL-terminated, in a buffer that never moves:
    /// a pointer from [`hetmem_last_error`] stays valid for the thread's life (its text is
    /// replaced by the next failing call).
    static LAST_ERROR: RefCell<[u8; ERROR_BYTES]> = const { RefCell::new([0; ERROR_BYTES]) };
}

fn set_error(msg: String) {
    // During the thread's teardown the message is dropped (never a panic across FFI).
    let _ = LAST_ERROR.try_with(|l| {
        let mut buf = l.borrow_mut();
        let mut n = msg.len().min(ERROR_BYTES - 1);
        while !msg.is_char_boundary(n) {
            n -= 1;
        }
        for (d, s) in buf.iter_mut().zip(msg.as_bytes()[..n].iter()) {
            *d = if *s == 0 { b' ' } else { *s };
        }
        buf[n] = 0;
    });
}

/// A C length as a Rust length: EINVAL above `isize::MAX` (no buffer or mapping is that long).
fn buf_len(len: u64) -> hetmem::Result<usize> {
    usize::try_from(len)
        .ok()
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid("length too large"))
}

/// Runs `f`, turning an error into `-errno` (and the thread's last error message) and a panic
/// into `-EIO`.
fn call(f: impl FnOnce() -> hetmem::Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            set_error(e.to_string());
            -e.errno()
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            set_error(format!("hetmem panicked: {msg}"));
            -libc::EIO
        }
    }
}

fn invalid(what: &'static str) -> hetmem::Error {
    hetmem::Error::Invalid(what)
}

/// Boxes `v` into `*out` (checked non-null by the caller).
fn put<T>(out: *mut *mut T, v: T) {
    // SAFETY: every caller checked `out` non-null; the caller of the API guarantees it points
    // at writable storage for one pointer.
    unsafe { *out = Box::into_raw(Box::new(v)) };
}

/// Frees a handle made by [`put`] (null: nothing), catching a panic in its drop.
///
/// # Safety
///
/// `h` is null or was made by [`put`] and not freed yet; it is not used afterwards.
unsafe fn release<T>(h: *mut T) {
    if !h.is_null() {
        // SAFETY: made by `put` (Box::into_raw) and not freed yet: the caller's obligation.
        let b = unsafe { Box::from_raw(h) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(b)));
    }
}

/// The object behind a handle, or EINVAL for a null one.
fn obj<'a, T>(h: *mut T) -> hetmem::Result<&'a T> {
    // SAFETY: a non-null handle was made by this API and not freed yet (the caller's
    // obligation): it points at a live `T`, only ever shared.
    unsafe { h.as_ref() }.ok_or_else(|| invalid("a null handle"))
}

fn prot_of(prot: c_int) -> hetmem::Result<Prot> {
    match prot {
        0 => Ok(Prot::None),
        HETMEM_PROT_READ => Ok(Prot::Read),
        p if p == HETMEM_PROT_READ | HETMEM_PROT_WRITE => Ok(Prot::ReadWrite),
        _ => Err(invalid(
            "protection must be 0, HETMEM_PROT_READ or HETMEM_PROT_READ | HETMEM_PROT_WRITE",
        )),
    }
}

/// The message of the calling thread's last failed call (empty if none; at most 511 bytes).
/// The pointer stays valid for the thread's life; the next failing call replaces the text.
#[unsafe(no_mangle)]
pub extern "C" fn hetmem_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|l| l.as_ptr().cast::<c_char>().cast_const())
        .unwrap_or(c"".as_ptr())
}

/// A new address space of `size` bytes of address space (0: the default, 64 GiB), nothing
/// committed.
///
/// # Safety
///
/// `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_space_new(size: u64, out: *mut *mut HetmemSpace) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(invalid("a null out-pointer"));
        }
        let mut cfg = SpaceConfig::default();
        if size != 0 {
            cfg.size = usize::try_from(size).map_err(|_| invalid("size too large"))?;
        }
        put(out, HetmemSpace::new(Space::with_config(cfg)?));
        Ok(())
    })
}

/// Adopts `len` bytes at `addr`, anonymous private memory the program mapped itself (`mmap`, or
/// a large `malloc`), as a new address space over exactly that range (`Space::adopt`): devices
/// mirror and migrate it while the program keeps using its own pointers. Freeing the space (and
/// its mirrors) gives every page back as plain memory. The program must not `munmap` the range
/// meanwhile.
///
/// # Safety
///
/// `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_space_adopt(
    addr: *mut c_void,
    len: u64,
    out: *mut *mut HetmemSpace,
) -> c_int {
    // SAFETY: the caller's obligations are those of `hetmem_space_adopt_flags`.
    unsafe { hetmem_space_adopt_flags(addr, len, 0, out) }
}

/// [`hetmem_space_adopt`] with `flags`: 0, or [`HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP`]. An
/// unknown flag is refused (`-EINVAL`).
///
/// # Safety
///
/// `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_space_adopt_flags(
    addr: *mut c_void,
    len: u64,
    flags: u32,
    out: *mut *mut HetmemSpace,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(invalid("a null out-pointer"));
        }
        if flags & !HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP != 0 {
            return Err(invalid("unknown adopt flags"));
        }
        let len = buf_len(len)?;
        let cfg = AdoptConfig {
            device_private_as_swap: flags & HETMEM_ADOPT_DEVICE_PRIVATE_AS_SWAP != 0,
            ..AdoptConfig::default()
        };
        // SAFETY: the C caller lends the range (the contract documented above, which is
        // `Space::adopt`'s: its memory, kept mapped, reached through raw pointers).
        let space = unsafe { Space::adopt_with(VirtAddr(addr as usize), len, cfg)? };
        put(out, HetmemSpace::new(space));
        Ok(())
    })
}

/// Releases a space handle (mirrors keep the space alive until they are freed too).
///
/// # Safety
///
/// `space` is null or a handle of this API not freed yet; it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_space_free(space: *mut HetmemSpace) {
    // SAFETY: the caller's obligation (above).
    unsafe { release(space) }
}

/// Sets the placement policy of `space` ([`HETMEM_POLICY_DEFAULT`], [`HETMEM_POLICY_UVM`],
/// [`HETMEM_POLICY_COHERENT_AWARE`], [`HETMEM_POLICY_ADAPTIVE`]); the hints given so far
/// ([`hetmem_advise`]) are withdrawn.
///
/// # Safety
///
/// `space` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_set_policy(space: *mut HetmemSpace, policy: c_int) -> c_int {
    call(|| {
        let s = obj(space)?;
        let p: Arc<dyn hetmem::policy::Policy> = match policy {
            HETMEM_POLICY_DEFAULT => Arc::new(hetmem::policy::DefaultPolicy),
            HETMEM_POLICY_UVM => Arc::new(hetmem::policy::uvm::UvmPolicy::new()),
            HETMEM_POLICY_COHERENT_AWARE => Arc::new(hetmem::policy::CoherentAwarePolicy),
            HETMEM_POLICY_ADAPTIVE => Arc::new(hetmem::policy::adaptive::AdaptivePolicy::new()),
            _ => return Err(invalid("an unknown policy")),
        };
        let mut hints = s.1.lock().unwrap_or_else(|e| e.into_inner());
        *hints = None;
        s.0.set_policy(p);
        Ok(())
    })
}

/// Hints where `len` bytes at `addr` of `space` should live ([`HETMEM_ADVICE_PREFER_DEVICE`],
/// [`HETMEM_ADVICE_PREFER_SYSTEM`], [`HETMEM_ADVICE_ACCESSED_BY`],
/// [`HETMEM_ADVICE_READ_MOSTLY`]; [`HETMEM_ADVICE_NONE`] withdraws the range's hints), the
/// `cudaMemAdvise` set over the space's policy, which decides elsewhere. At most 64 hinted
/// ranges at once (ENOMEM beyond).
///
/// # Safety
///
/// `space` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_advise(
    space: *mut HetmemSpace,
    addr: *mut c_void,
    len: u64,
    advice: c_int,
) -> c_int {
    call(|| {
        let s = obj(space)?;
        let len = buf_len(len)?;
        let advice = match advice {
            HETMEM_ADVICE_NONE => None,
            HETMEM_ADVICE_PREFER_DEVICE => Some(Advice::PreferDevice),
            HETMEM_ADVICE_PREFER_SYSTEM => Some(Advice::PreferSystem),
            HETMEM_ADVICE_ACCESSED_BY => Some(Advice::AccessedBy),
            HETMEM_ADVICE_READ_MOSTLY => Some(Advice::ReadMostly),
            _ => return Err(invalid("an unknown advice")),
        };
        let mut hints = s.1.lock().unwrap_or_else(|e| e.into_inner());
        let h = match &*hints {
            Some(h) => h.clone(),
            None => {
                // The first hint: hints over the space's policy from now on.
                let h = Arc::new(HintPolicy::new(s.0.policy()));
                s.0.set_policy(h.clone());
                *hints = Some(h.clone());
                h
            }
        };
        let a = VirtAddr(addr as usize);
        match advice {
            Some(adv) => h.advise(a, len, adv),
            None => {
                h.clear(a, len);
                Ok(())
            }
        }
    })
}

/// Maps `len` bytes of anonymous memory in `space` with protection `prot`
/// ([`HETMEM_PROT_READ`], `| `[`HETMEM_PROT_WRITE`]); `*out` receives its address.
///
/// # Safety
///
/// `space` is a live handle; `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_map_anon(
    space: *mut HetmemSpace,
    len: u64,
    prot: c_int,
    out: *mut *mut c_void,
) -> c_int {
    call(|| {
        let s = obj(space)?;
        if out.is_null() {
            return Err(invalid("a null out-pointer"));
        }
        let len = buf_len(len)?;
        let a = s.0.map_anon(len, prot_of(prot)?)?;
        // SAFETY: `out` checked non-null; the caller guarantees it is writable.
        unsafe { *out = a.get() as *mut c_void };
        Ok(())
    })
}

/// Unmaps `len` bytes at `addr` of `space` (a mapping made by [`hetmem_map_anon`] or
/// [`hetmem_map_file`]).
///
/// # Safety
///
/// `space` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_unmap(
    space: *mut HetmemSpace,
    addr: *mut c_void,
    len: u64,
) -> c_int {
    call(|| {
        let len = buf_len(len)?;
        obj(space)?.0.unmap(VirtAddr(addr as usize), len)
    })
}

/// Changes the protection of `len` bytes at `addr` of `space` (`Space::protect`: devices lose
/// what they may no longer do, as with `mprotect`), adopted memory included.
///
/// # Safety
///
/// `space` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_protect(
    space: *mut HetmemSpace,
    addr: *mut c_void,
    len: u64,
    prot: c_int,
) -> c_int {
    call(|| {
        let len = buf_len(len)?;
        obj(space)?
            .0
            .protect(VirtAddr(addr as usize), len, prot_of(prot)?)
    })
}

/// Pins the pages of `addr..addr + len` of `space` (`get_user_pages`/`pin_user_pages`;
/// `Space::pin`): missing pages are filled, pages in device-private memory or held exclusively
/// by a device come back to system memory first, and no page of the range migrates until the
/// pin is released ([`hetmem_pin_free`]). `long_term` non-zero is `FOLL_LONGTERM`: pages in
/// device-coherent memory come back to system memory too (a short-term pin leaves them in
/// place). All or nothing: on an error no page is pinned.
///
/// # Safety
///
/// `space` is a live handle; `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_pin(
    space: *mut HetmemSpace,
    addr: *mut c_void,
    len: u64,
    long_term: c_int,
    out: *mut *mut HetmemPin,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(invalid("a null out-pointer"));
        }
        let len = buf_len(len)?;
        let pin = obj(space)?
            .0
            .pin(VirtAddr(addr as usize), len, long_term != 0)?;
        put(out, HetmemPin { _pin: pin });
        Ok(())
    })
}

/// Releases a pin ([`hetmem_pin`]): its pages may migrate again.
///
/// # Safety
///
/// `pin` is null or a handle of this API not freed yet; it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_pin_free(pin: *mut HetmemPin) {
    // SAFETY: the caller's obligation (above).
    unsafe { release(pin) }
}

/// A new software device with `capacity` bytes of memory of `kind` ([`HETMEM_DEVICE_PRIVATE`]
/// or [`HETMEM_DEVICE_COHERENT`]).
///
/// # Safety
///
/// `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_device_new(
    kind: c_int,
    capacity: u64,
    out: *mut *mut HetmemDevice,
) -> c_int {
    call(|| {
        if out.is_null() {
            return Err(invalid("a null out-pointer"));
        }
        let kind = match kind {
            HETMEM_DEVICE_PRIVATE => MemoryKind::Private,
            HETMEM_DEVICE_COHERENT => MemoryKind::Coherent,
            _ => return Err(invalid("kind must be HETMEM_DEVICE_PRIVATE or _COHERENT")),
        };
        let capacity = usize::try_from(capacity).map_err(|_| invalid("capacity too large"))?;
        put(
            out,
            HetmemDevice(SoftDevice::new(DeviceConfig { kind, capacity })?),
        );
        Ok(())
    })
}

/// Releases a device handle.
///
/// # Safety
///
/// `dev` is null or a handle of this API not freed yet; it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_device_free(dev: *mut HetmemDevice) {
    // SAFETY: the caller's obligation (above).
    unsafe { release(dev) }
}

/// Binds `dev` to `space`: a mirror through which the device accesses the space.
///
/// # Safety
///
/// `dev` and `space` are live handles; `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_mirror_new(
    dev: *mut HetmemDevice,
    space: *mut HetmemSpace,
    out: *mut *mut HetmemMirror,
) -> c_int {
    call(|| {
        let (d, s) = (obj(dev)?, obj(space)?);
        if out.is_null() {
            return Err(invalid("a null out-pointer"));
        }
        put(out, HetmemMirror(d.0.mirror(&s.0)?));
        Ok(())
    })
}

/// Releases a mirror handle.
///
/// # Safety
///
/// `m` is null or a handle of this API not freed yet; it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_mirror_free(m: *mut HetmemMirror) {
    // SAFETY: the caller's obligation (above).
    unsafe { release(m) }
}

/// Migrates `len` bytes at `addr` to the device's memory and maps them on the device
/// (`DeviceMirror::migrate_range_to_device`: no copy to a buffer).
///
/// # Safety
///
/// `m` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_migrate_to_device(
    m: *mut HetmemMirror,
    addr: *mut c_void,
    len: u64,
) -> c_int {
    call(|| {
        let len = buf_len(len)?;
        obj(m)?
            .0
            .migrate_range_to_device(VirtAddr(addr as usize), len)
            .map(|_| ())
    })
}

/// Migrates the device's pages of `len` bytes at `addr` back to system memory.
///
/// # Safety
///
/// `m` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_migrate_to_system(
    m: *mut HetmemMirror,
    addr: *mut c_void,
    len: u64,
) -> c_int {
    call(|| {
        let len = buf_len(len)?;
        obj(m)?
            .0
            .migrate_to_system(VirtAddr(addr as usize), len)
            .map(|_| ())
    })
}

/// The device reads `len` bytes at `addr` into `buf` (faulting in what it has not mapped).
///
/// # Safety
///
/// `m` is a live handle; `buf` points at `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_device_read(
    m: *mut HetmemMirror,
    addr: *mut c_void,
    len: u64,
    buf: *mut c_void,
) -> c_int {
    call(|| {
        let len = buf_len(len)?;
        if buf.is_null() {
            return Err(invalid("a null buffer"));
        }
        // SAFETY: the caller guarantees `buf` points at `len` writable bytes, not hetmem's.
        let b = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, len) };
        obj(m)?.0.read(VirtAddr(addr as usize), len, b).map(|_| ())
    })
}

/// The device writes `len` bytes of `buf` at `addr`.
///
/// # Safety
///
/// `m` is a live handle; `buf` points at `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_device_write(
    m: *mut HetmemMirror,
    addr: *mut c_void,
    len: u64,
    buf: *const c_void,
) -> c_int {
    call(|| {
        let len = buf_len(len)?;
        if buf.is_null() {
            return Err(invalid("a null buffer"));
        }
        // SAFETY: the caller guarantees `buf` points at `len` readable bytes, not hetmem's.
        let b = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
        obj(m)?.0.write(VirtAddr(addr as usize), len, b).map(|_| ())
    })
}

/// Runs a test-device command with the kernel's convention (`HMM_DMIRROR_*` ioctls on
/// `/dev/hmm_dmirrorN`): returns 0 and sets `c->cpages`/`c->faults`, or a negative errno exactly
/// where the kernel's test device does. `cmd` is one of the `HETMEM_CMD_*` values.
///
/// # Safety
///
/// `m` is a live handle; `c` points at a command whose `ptr` points at the buffer its command
/// needs (see [`HetmemDmirrorCmd::ptr`]).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_mirror_cmd(
    m: *mut HetmemMirror,
    cmd: u32,
    c: *mut HetmemDmirrorCmd,
) -> c_int {
    let mut rc = 0;
    let r = call(|| {
        let mirror = obj(m)?;
        // SAFETY: the caller guarantees `c` points at a live command it does not touch meanwhile.
        let c = unsafe { c.as_mut() }.ok_or_else(|| invalid("a null command"))?;
        let command = match cmd {
            HETMEM_CMD_READ => Cmd::Read,
            HETMEM_CMD_WRITE => Cmd::Write,
            HETMEM_CMD_MIGRATE_TO_DEV => Cmd::MigrateToDev,
            HETMEM_CMD_MIGRATE_TO_SYS => Cmd::MigrateToSys,
            HETMEM_CMD_SNAPSHOT => Cmd::Snapshot,
            HETMEM_CMD_EXCLUSIVE => Cmd::Exclusive,
            HETMEM_CMD_CHECK_EXCLUSIVE => Cmd::CheckExclusive,
            HETMEM_CMD_RELEASE => Cmd::Release,
            HETMEM_CMD_FLAGS => Cmd::Flags,
            _ => return Err(invalid("unknown command")),
        };
        let pages = usize::try_from(c.npages).unwrap_or(usize::MAX);
        let buf_len = match command {
            Cmd::Read | Cmd::Write | Cmd::MigrateToDev | Cmd::Exclusive => {
                pages.checked_mul(hetmem::PAGE_SIZE)
            }
            Cmd::Snapshot => Some(pages),
            _ => Some(0),
        }
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid("the buffer's size overflows"))?;
        let mut none = [0u8; 0];
        let buf: &mut [u8] = if buf_len == 0 {
            &mut none
        } else if c.ptr == 0 {
            return Err(invalid("a null buffer"));
        } else {
            // SAFETY: the caller guarantees `ptr` points at the `buf_len` bytes this command
            // needs, its own memory (not hetmem's), untouched while the call runs.
            unsafe { std::slice::from_raw_parts_mut(c.ptr as *mut u8, buf_len) }
        };
        let mut k = DmirrorCmd {
            addr: c.addr,
            buf,
            npages: c.npages,
            cpages: 0,
            faults: 0,
        };
        rc = mirror.0.cmd(command, &mut k);
        if rc == 0 {
            c.cpages = k.cpages;
            c.faults = k.faults;
        } else {
            set_error(format!(
                "command {cmd} failed: {}",
                std::io::Error::from_raw_os_error(-rc)
            ));
        }
        Ok(())
    });
    if r != 0 { r } else { rc }
}

/// Opens and caches the file at `path` (read-write when `writable`), with the default cache
/// configuration.
///
/// # Safety
///
/// `path` is a NUL-terminated string; `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_file_open(
    path: *const c_char,
    writable: bool,
    out: *mut *mut HetmemFile,
) -> c_int {
    call(|| {
        if path.is_null() || out.is_null() {
            return Err(invalid("a null path or out-pointer"));
        }
        // SAFETY: the caller guarantees a NUL-terminated string.
        let p = unsafe { CStr::from_ptr(path) };
        let p = std::path::Path::new(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(p.to_bytes()),
        );
        let cache: Arc<FileCache> = FileCache::open(p, writable, CacheConfig::default())?;
        put(out, HetmemFile(cache.handle()));
        Ok(())
    })
}

/// Writes back every dirty page of the file (CPU and device stores) and syncs it (`fsync`).
///
/// # Safety
///
/// `f` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_file_fsync(f: *mut HetmemFile) -> c_int {
    call(|| obj(f)?.0.fsync())
}

/// `hetmem_file_set_access`: faults adapt (a window doubling while they come in sequence,
/// then read-ahead).
pub const HETMEM_ACCESS_NORMAL: c_int = 0;
/// `hetmem_file_set_access`: every fault reads its own page only (`MADV_RANDOM`).
pub const HETMEM_ACCESS_RANDOM: c_int = 1;
/// `hetmem_file_set_access`: every fault reads 2 MiB, the read-ahead behind (`MADV_SEQUENTIAL`).
pub const HETMEM_ACCESS_SEQUENTIAL: c_int = 2;

/// Tells the file's cache how its mappings will access it (`HETMEM_ACCESS_*`; hetmem's
/// `MADV_RANDOM`/`MADV_SEQUENTIAL`). -EINVAL for another value.
///
/// # Safety
///
/// `f` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_file_set_access(f: *mut HetmemFile, access: c_int) -> c_int {
    call(|| {
        let a = match access {
            HETMEM_ACCESS_NORMAL => hetmem::Access::Normal,
            HETMEM_ACCESS_RANDOM => hetmem::Access::Random,
            HETMEM_ACCESS_SEQUENTIAL => hetmem::Access::Sequential,
            _ => return Err(invalid("an access pattern that is not HETMEM_ACCESS_*")),
        };
        obj(f)?.0.cache().set_access(a);
        Ok(())
    })
}

/// Closes a file handle (the cache stays while mappings of it exist).
///
/// # Safety
///
/// `f` is null or a handle of this API not freed yet; it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_file_close(f: *mut HetmemFile) {
    // SAFETY: the caller's obligation (above).
    unsafe { release(f) }
}

/// Maps `len` bytes of the file from byte `offset` (page-aligned) into `space`, shared (stores
/// reach the file at the next fsync) or private; `*out` receives the address.
///
/// # Safety
///
/// `space` and `f` are live handles; `out` points at storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hetmem_map_file(
    space: *mut HetmemSpace,
    f: *mut HetmemFile,
    offset: u64,
    len: u64,
    prot: c_int,
    shared: bool,
    out: *mut *mut c_void,
) -> c_int {
    call(|| {
        let (s, fh) = (obj(space)?, obj(f)?);
        if out.is_null() {
            return Err(invalid("a null out-pointer"));
        }
        let len = buf_len(len)?;
        let a = s.0.map_file(&fh.0, offset, len, prot_of(prot)?, shared)?;
        // SAFETY: `out` checked non-null; the caller guarantees it is writable.
        unsafe { *out = a.get() as *mut c_void };
        Ok(())
    })
}
