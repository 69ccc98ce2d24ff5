//! `hetmem bench`: figures measured in one run, each against a baseline measured in the same run.
//!
//! # What is measured, and against what
//!
//! | figure | hetmem side | baseline (bare kernel primitives, same run) |
//! |---|---|---|
//! | `fault_back_4k_us` | median time of one CPU load that faults a device-private 4 KiB page back (after [`DeviceMirror::migrate_range_to_device`]) | `uffd_in_thread_4k_us`: a bare SIGBUS-mode userfaultfd whose handler does one `UFFDIO_COPY` of the page, served in the faulting thread |
//! | `fault_back_4k_busy_us` | the same, while another thread of the process spins on its own memory | `uffd_in_thread_4k_busy_us`, same sibling |
//! | `first_touch_4k_us` | mean per page of a sequential sweep (one store a page) over a fresh mapping | `kernel_first_touch_4k_us`: the same sweep over plain anonymous memory |
//! | `first_touch_random_4k_us` | the same in a random page order | `kernel_first_touch_4k_us` (the random kernel sweep is reported beside it) |
//! | `migrate_4k_gbps`, `migrate_2m_gbps` | system → device → system round trips, bytes moved in both directions | `migrate_primitive_*_gbps`: the same syscalls hetmem issues, in a bare loop (write-protect each 2 MiB run, copy into a pool, `MADV_DONTNEED` the run; back: `UFFDIO_COPY` per 4 KiB page or per 2 MiB chunk) |
//! | `cpu_read_coherent_gbps` | CPU streaming reads of pages resident in device-coherent memory | `cpu_read_system_gbps`: the same reads of system-resident pages |
//! | `pingpong_coherent_bytes_moved` | bytes migrated by a workload alternating device phases (prefetch to the device, device reads everything) and CPU phases (CPU reads everything) over the same range (256 MiB, 4 rounds), with a coherent device | `pingpong_private_bytes_moved`: the same workload with a device-private device |
//! | `file_seq_read_gbps` | warm: every byte of a file (256 MiB) read in order, 64 KiB per copy, through a fresh shared read-only [`Space::map_file`] mapping of a [`FileCache`] that holds the whole file (filled once through `read_at`, so the kernel's page cache holds it too); timed from before `map_file` (the first access to each page faults) | `kernel_mmap_seq_read_gbps`: the same reads through a fresh kernel `mmap` (shared, read-only) of the file, timed from before `mmap` |
//! | `file_seq_read_cold_gbps` | the same, cold: the kernel's page cache of the file dropped first (`POSIX_FADV_DONTNEED`) and a fresh `FileCache` | `kernel_mmap_seq_read_cold_gbps`: a fresh kernel `mmap` after the same drop |
//! | `file_rand_read_4k_us` | cold: mean time of a first read of a whole 4 KiB page, one random page per 256 KiB block, blocks in random order (no page lies in another's fault-around or read-around window), through a fresh mapping of a fresh `FileCache`, kernel cache dropped | `kernel_mmap_rand_read_4k_us`: the same pages through a fresh kernel `mmap` after the same drop |
//! | `file_rand_read_warm_4k_us` | the same pages, warm (as `file_seq_read_gbps`) | `kernel_mmap_rand_read_warm_4k_us` |
//! | `memcpy_gbps` | a plain memory copy, for context | – |
//! | `metadata_bytes_per_page` | hetmem's own state per page | – |
//!
//! # Method
//!
//! Every measurement is warmed up once (discarded), then repeated; a figure is the median of the
//! repetitions (fault latencies: the median of every timed fault). hetmem and its baseline
//! alternate within each repetition, so that drift in the machine (another tenant of the VM's
//! host, frequency changes) hits both alike. Memory is "already backed" on both sides: a sweep
//! over memory that was freed just before reuses pages the VM already holds (on memory the VM
//! must first get from its host a fault costs ≈ 10× more, which would measure the host).
//!
//! The file figures use a temporary file in `std::env::temp_dir()` (256 MiB; 16 MiB with
//! `--quick`) of non-zero data, written and synced once, removed at the end; every read is
//! checked against the data. Both sides read with the same raw copies; the random figures time
//! the accesses only (not the `mmap`/`map_file` call). A "cold" sweep is cold on the host side
//! only if the VM's disk is: the guest's page cache is dropped, the host's is not.
//!
//! Nothing here sleeps; the busy sibling is a spinning thread stopped by a flag.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::device::{DeviceConfig, DeviceMirror, SoftDevice};
use crate::error::{Error, Result};
use crate::pagecache::{CacheConfig, FileCache, FileHandle};
use crate::pool::MemoryKind;
use crate::space::{MapOptions, Space, SpaceConfig};
use crate::sys::{self, FaultTarget, LARGE_PAGE_SIZE, Prot, Region, Uffd, UffdDelivery, UffdError};

/// One figure, with the baseline it is compared to (measured in the same run).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BenchResult {
    /// Name, with the unit as suffix (`fault_back_4k_us`).
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// Unit (`us`, `GB/s`, `bytes`).
    pub unit: String,
    /// Name of the baseline figure, if any.
    pub baseline: Option<String>,
    /// The baseline's value.
    pub baseline_value: Option<f64>,
    /// `value / baseline_value`.
    pub ratio: Option<f64>,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// Smaller sizes and fewer repetitions (for smoke tests of the bench itself).
    pub quick: bool,
}

/// Sizes and repetition counts of one run.
struct Sizes {
    /// Pages faulted back per repetition.
    fault_pages: usize,
    fault_reps: usize,
    /// Bytes swept per first-touch repetition.
    touch_bytes: usize,
    touch_reps: usize,
    /// Bytes per migration round trip (4 KiB pages / 2 MiB units).
    mig4k_bytes: usize,
    mig2m_bytes: usize,
    mig_reps: usize,
    memcpy_bytes: usize,
    /// Bytes of the coherent read and ping-pong workloads.
    shared_bytes: usize,
    pingpong_rounds: usize,
    /// Bytes of the temporary file of the file-mapping figures.
    file_bytes: usize,
    /// One random page is read per block of this many bytes (random sweeps).
    file_rand_block: usize,
    file_reps: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                fault_pages: 256,
                fault_reps: 2,
                touch_bytes: 8 << 20,
                touch_reps: 2,
                mig4k_bytes: 4 << 20,
                mig2m_bytes: 8 << 20,
                mig_reps: 2,
                memcpy_bytes: 16 << 20,
                shared_bytes: 16 << 20,
                pingpong_rounds: 2,
                file_bytes: 16 << 20,
                file_rand_block: 256 << 10,
                file_reps: 2,
            }
        } else {
            Sizes {
                fault_pages: 4096,
                fault_reps: 10,
                touch_bytes: 64 << 20,
                touch_reps: 9,
                mig4k_bytes: 32 << 20,
                mig2m_bytes: 64 << 20,
                mig_reps: 15,
                memcpy_bytes: 64 << 20,
                shared_bytes: 256 << 20,
                pingpong_rounds: 4,
                file_bytes: 256 << 20,
                file_rand_block: 256 << 10,
                file_reps: 5,
            }
        }
    }
}

/// Runs every benchmark; `progress` is told what runs next.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<BenchResult>> {
    let sz = Sizes::new(opts.quick);
    let mut out = Vec::new();
    let space = Space::with_config(SpaceConfig {
        size: 4 << 30,
        stash: 2 << 20,
        ..SpaceConfig::default()
    })?;

    progress("fault-back of device-private 4 KiB pages vs a bare in-thread userfaultfd");
    let (h, b) = fault_back(&space, &sz, false)?;
    push_pair(
        &mut out,
        ("fault_back_4k_us", h),
        ("uffd_in_thread_4k_us", b),
        "us",
    );

    progress("fault-back with a busy sibling thread vs a bare in-thread userfaultfd");
    let (h, b) = fault_back(&space, &sz, true)?;
    push_pair(
        &mut out,
        ("fault_back_4k_busy_us", h),
        ("uffd_in_thread_4k_busy_us", b),
        "us",
    );

    progress("first touch (sequential and random) vs kernel anonymous memory");
    let t = first_touch(&space, &sz)?;
    out.push(figure(
        "first_touch_4k_us",
        t.seq,
        "us",
        Some(("kernel_first_touch_4k_us", t.kernel_seq)),
    ));
    out.push(figure(
        "first_touch_random_4k_us",
        t.rnd,
        "us",
        Some(("kernel_first_touch_4k_us", t.kernel_seq)),
    ));
    out.push(figure("kernel_first_touch_4k_us", t.kernel_seq, "us", None));
    out.push(figure(
        "kernel_first_touch_random_4k_us",
        t.kernel_rnd,
        "us",
        None,
    ));

    progress("migration round trips of 4 KiB pages vs the bare primitives");
    let (h, b) = migrate(&space, sz.mig4k_bytes, false, sz.mig_reps)?;
    push_pair(
        &mut out,
        ("migrate_4k_gbps", h),
        ("migrate_primitive_4k_gbps", b),
        "GB/s",
    );

    progress("migration round trips of 2 MiB units vs the bare primitives");
    let (h, b) = migrate(&space, sz.mig2m_bytes, true, sz.mig_reps)?;
    push_pair(
        &mut out,
        ("migrate_2m_gbps", h),
        ("migrate_primitive_2m_gbps", b),
        "GB/s",
    );

    progress("CPU reads of coherent-resident vs system-resident pages");
    let (c, sys_) = cpu_read_coherent(&space, sz.shared_bytes.min(64 << 20), sz.mig_reps)?;
    push_pair(
        &mut out,
        ("cpu_read_coherent_gbps", c),
        ("cpu_read_system_gbps", sys_),
        "GB/s",
    );

    progress("CPU/device ping-pong: bytes moved with a coherent vs a private device");
    let c = pingpong(
        &space,
        MemoryKind::Coherent,
        sz.shared_bytes,
        sz.pingpong_rounds,
    )?;
    let p = pingpong(
        &space,
        MemoryKind::Private,
        sz.shared_bytes,
        sz.pingpong_rounds,
    )?;
    push_pair(
        &mut out,
        ("pingpong_coherent_bytes_moved", c),
        ("pingpong_private_bytes_moved", p),
        "bytes",
    );

    progress("file mappings (warm and cold, sequential and random) vs the kernel's mmap");
    let f = file_reads(&space, &sz)?;
    push_pair(
        &mut out,
        ("file_seq_read_gbps", f.seq_warm.0),
        ("kernel_mmap_seq_read_gbps", f.seq_warm.1),
        "GB/s",
    );
    push_pair(
        &mut out,
        ("file_seq_read_cold_gbps", f.seq_cold.0),
        ("kernel_mmap_seq_read_cold_gbps", f.seq_cold.1),
        "GB/s",
    );
    push_pair(
        &mut out,
        ("file_rand_read_4k_us", f.rand_cold.0),
        ("kernel_mmap_rand_read_4k_us", f.rand_cold.1),
        "us",
    );
    push_pair(
        &mut out,
        ("file_rand_read_warm_4k_us", f.rand_warm.0),
        ("kernel_mmap_rand_read_warm_4k_us", f.rand_warm.1),
        "us",
    );

    progress("memcpy bandwidth");
    out.push(figure(
        "memcpy_gbps",
        memcpy_gbps(sz.memcpy_bytes, sz.mig_reps)?,
        "GB/s",
        None,
    ));

    progress("metadata per page");
    out.push(figure(
        "metadata_bytes_per_page",
        Space::metadata_bytes_per_page() as f64,
        "bytes",
        None,
    ));
    Ok(out)
}

fn figure(name: &str, value: f64, unit: &str, base: Option<(&str, f64)>) -> BenchResult {
    BenchResult {
        name: name.to_string(),
        value,
        unit: unit.to_string(),
        baseline: base.map(|(n, _)| n.to_string()),
        baseline_value: base.map(|(_, v)| v),
        ratio: base.map(|(_, v)| value / v),
    }
}

/// Pushes a figure and its baseline (as its own result).
fn push_pair(out: &mut Vec<BenchResult>, fig: (&str, f64), base: (&str, f64), unit: &str) {
    out.push(figure(fig.0, fig.1, unit, Some(base)));
    out.push(figure(base.0, base.1, unit, None));
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::os(what, e)
}

fn uffd_os(what: &'static str) -> impl FnOnce(UffdError) -> Error {
    move |e| Error::os(what, e.into())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn micros(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// A second thread of the process spinning on its own memory until dropped.
struct BusySibling {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl BusySibling {
    fn start() -> Result<BusySibling> {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicBool::new(false));
        let (s, st) = (stop.clone(), started.clone());
        let handle = std::thread::Builder::new()
            .name("bench-busy".into())
            .spawn(move || {
                let counter = AtomicU64::new(0);
                st.store(true, Ordering::Release);
                while !s.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                counter.load(Ordering::Relaxed)
            })
            .map_err(os("spawn busy sibling"))?;
        // Wait (spinning, no sleep) until the sibling runs, so that every timed fault has it.
        while !started.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        Ok(BusySibling {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for BusySibling {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault-back vs a bare in-thread userfaultfd
// ---------------------------------------------------------------------------------------------

/// The fault handler of the bare baseline: one `UFFDIO_COPY` of the faulting page from `src`.
struct BareTarget {
    uffd: Uffd,
    src: Region,
    base: usize,
    len: usize,
}

impl FaultTarget for BareTarget {
    fn handle_fault(&self, addr: usize, _write: bool) -> bool {
        let page = addr & !(PAGE_SIZE - 1);
        if page < self.base || page >= self.base + self.len {
            return false;
        }
        matches!(
            self.uffd.copy(page, &self.src, page - self.base, PAGE_SIZE),
            Ok(()) | Err(UffdError::Exists) | Err(UffdError::Again)
        )
    }
    fn remapped(&self, _from: usize, _to: usize, _len: usize) {}
}

/// A SIGBUS-mode userfaultfd range served by [`BareTarget`]. Field order is drop order: the
/// registry entry goes first, then the mapping, then the target (fd and source).
struct BareFault {
    _range: sys::FaultRange,
    dst: Region,
    _target: Arc<BareTarget>,
}

impl BareFault {
    fn new(len: usize, umo: bool) -> Result<BareFault> {
        let dst =
            Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("bench mapping"))?;
        let src = Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("bench source"))?;
        for p in 0..len / PAGE_SIZE {
            src.write(p * PAGE_SIZE, &(p as u32).to_ne_bytes())
                .map_err(os("fill bench source"))?;
        }
        let uffd = Uffd::open(UffdDelivery::Signal, umo).map_err(os("open userfaultfd"))?;
        uffd.register(&dst, 0, len, false)
            .map_err(os("register bench mapping"))?;
        sys::install_sigbus_handler().map_err(os("install SIGBUS handler"))?;
        let base = dst.base();
        let target = Arc::new(BareTarget {
            uffd,
            src,
            base,
            len,
        });
        let t: Arc<dyn FaultTarget> = target.clone();
        let range =
            sys::register_fault_range(base, base + len, t).map_err(os("register fault range"))?;
        Ok(BareFault {
            _range: range,
            dst,
            _target: target,
        })
    }

    /// Drops every page, then times a first load of each (one fault each).
    fn sweep(&self, samples: &mut Vec<f64>) -> Result<()> {
        self.dst
            .discard(0, self.dst.len())
            .map_err(os("discard bench mapping"))?;
        for p in 0..self.dst.len() / PAGE_SIZE {
            let a = self.dst.base() + p * PAGE_SIZE;
            let t = Instant::now();
            let v = sys::probe_load_u32(a);
            samples.push(micros(t));
            std::hint::black_box(v);
        }
        Ok(())
    }
}

/// Median fault-back time through hetmem and through the bare in-thread userfaultfd.
fn fault_back(space: &Space, sz: &Sizes, busy: bool) -> Result<(f64, f64)> {
    let n = sz.fault_pages;
    let len = n * PAGE_SIZE;
    let dev = SoftDevice::private(len + LARGE_PAGE_SIZE)?;
    let mirror = dev.mirror(space)?;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    for p in 0..n {
        sys::probe_store_u32(a.get() + p * PAGE_SIZE, p as u32);
    }
    let bare = BareFault::new(len, space.user_mode_only())?;
    let sibling = if busy {
        Some(BusySibling::start()?)
    } else {
        None
    };
    let (mut hs, mut bs) = (
        Vec::with_capacity(n * sz.fault_reps),
        Vec::with_capacity(n * sz.fault_reps),
    );
    let (mut wh, mut wb) = (Vec::new(), Vec::new());
    for rep in 0..=sz.fault_reps {
        let (h, b) = if rep == 0 {
            (&mut wh, &mut wb)
        } else {
            (&mut hs, &mut bs)
        };
        bare.sweep(b)?;
        hetmem_fault_sweep(&mirror, a, n, h)?;
    }
    drop(sibling);
    space.unmap(a, len)?;
    Ok((median(&mut hs), median(&mut bs)))
}

/// Migrates `n` pages at `a` to the device, then times a first load of each (one fault-back each).
fn hetmem_fault_sweep(
    m: &DeviceMirror,
    a: VirtAddr,
    n: usize,
    samples: &mut Vec<f64>,
) -> Result<()> {
    let out = m.migrate_range_to_device(a.get() as u64, n as u64)?;
    if out.cpages != n as u64 {
        return Err(Error::Invalid(
            "bench: not every page migrated to the device",
        ));
    }
    for p in 0..n {
        let addr = a.get() + p * PAGE_SIZE;
        let t = Instant::now();
        let v = sys::probe_load_u32(addr);
        samples.push(micros(t));
        std::hint::black_box(v);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// First touch
// ---------------------------------------------------------------------------------------------

struct Touch {
    seq: f64,
    rnd: f64,
    kernel_seq: f64,
    kernel_rnd: f64,
}

/// A random permutation of `0..n` (xorshift64*, Fisher-Yates; fixed seed).
fn permutation(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..n).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let j = (r % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// One store per page at `base` in `order`; mean µs per page.
fn store_sweep(base: usize, order: &[usize]) -> f64 {
    let t = Instant::now();
    for &p in order {
        sys::probe_store_u32(base + p * PAGE_SIZE, p as u32);
    }
    micros(t) / order.len() as f64
}

fn hetmem_touch(space: &Space, len: usize, order: &[usize]) -> Result<f64> {
    let a = space.map_anon(len, Prot::ReadWrite)?;
    let us = store_sweep(a.get(), order);
    space.unmap(a, len)?;
    Ok(us)
}

fn first_touch(space: &Space, sz: &Sizes) -> Result<Touch> {
    let len = sz.touch_bytes;
    let n = len / PAGE_SIZE;
    let seq: Vec<usize> = (0..n).collect();
    let rnd = permutation(n);
    // Kernel baseline: plain anonymous memory, faulted in and dropped once so that the VM has
    // backed it; every sweep then drops the pages first.
    let k = Region::new(len, PAGE_SIZE, Prot::ReadWrite).map_err(os("kernel baseline mapping"))?;
    k.populate(0, len).map_err(os("populate kernel baseline"))?;
    let ksweep = |order: &[usize]| -> Result<f64> {
        k.discard(0, len).map_err(os("discard kernel baseline"))?;
        Ok(store_sweep(k.base(), order))
    };
    // Warm-up on both sides (hetmem: another mapping of the same size, unmapped after).
    ksweep(&seq)?;
    hetmem_touch(space, len, &seq)?;
    let (mut hs, mut hr, mut ks, mut kr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..sz.touch_reps {
        ks.push(ksweep(&seq)?);
        hs.push(hetmem_touch(space, len, &seq)?);
        kr.push(ksweep(&rnd)?);
        hr.push(hetmem_touch(space, len, &rnd)?);
    }
    Ok(Touch {
        seq: median(&mut hs),
        rnd: median(&mut hr),
        kernel_seq: median(&mut ks),
        kernel_rnd: median(&mut kr),
    })
}

// ---------------------------------------------------------------------------------------------
// Migration round trips
// ---------------------------------------------------------------------------------------------

/// The bare sequence of kernel primitives hetmem uses to migrate anonymous memory to a device
/// pool and back, at the same granularity (`chunk`: 4 KiB pages or 2 MiB units):
/// to the device, per 2 MiB run: `UFFDIO_WRITEPROTECT`, copy each chunk into the pool,
/// `MADV_DONTNEED` the run; back: one `UFFDIO_COPY` per chunk from the pool.
struct Primitive {
    dst: Region,
    pool: Region,
    uffd: Uffd,
    chunk: usize,
}

impl Primitive {
    fn new(len: usize, chunk: usize, umo: bool) -> Result<Primitive> {
        let dst =
            Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("primitive mapping"))?;
        let pool =
            Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("primitive pool"))?;
        pool.populate(0, len)
            .map_err(os("populate primitive pool"))?;
        let uffd = Uffd::open(UffdDelivery::Signal, umo).map_err(os("open userfaultfd"))?;
        uffd.register(&dst, 0, len, true)
            .map_err(os("register primitive mapping"))?;
        let p = Primitive {
            dst,
            pool,
            uffd,
            chunk,
        };
        p.back()?;
        Ok(p)
    }

    fn to_device(&self) -> Result<()> {
        let len = self.dst.len();
        for run in (0..len).step_by(LARGE_PAGE_SIZE) {
            let rl = LARGE_PAGE_SIZE.min(len - run);
            self.uffd
                .write_protect(self.dst.base() + run, rl, true)
                .map_err(uffd_os("write-protect"))?;
            for o in (run..run + rl).step_by(self.chunk) {
                self.dst
                    .copy_to(o, &self.pool, o, self.chunk)
                    .map_err(os("copy to pool"))?;
            }
            self.dst.discard(run, rl).map_err(os("discard"))?;
        }
        Ok(())
    }

    fn back(&self) -> Result<()> {
        for o in (0..self.dst.len()).step_by(self.chunk) {
            match self
                .uffd
                .copy(self.dst.base() + o, &self.pool, o, self.chunk)
            {
                Ok(()) | Err(UffdError::Exists) => {}
                Err(e) => return Err(uffd_os("copy back")(e)),
            }
        }
        Ok(())
    }
}

/// Round-trip bandwidth (GB/s of bytes moved, both directions) through hetmem and through the
/// bare primitives.
fn migrate(space: &Space, len: usize, large: bool, reps: usize) -> Result<(f64, f64)> {
    let n = len / PAGE_SIZE;
    let dev = SoftDevice::private(len + 2 * LARGE_PAGE_SIZE)?;
    let mirror = dev.mirror(space)?;
    let a = space.map_anon_with(
        len,
        MapOptions {
            large,
            ..MapOptions::default()
        },
    )?;
    for p in 0..n {
        sys::probe_store_u32(a.get() + p * PAGE_SIZE, p as u32);
    }
    let chunk = if large { LARGE_PAGE_SIZE } else { PAGE_SIZE };
    let prim = Primitive::new(len, chunk, space.user_mode_only())?;
    let gbps = |t: Instant| (2 * len) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let (mut hs, mut ps) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let t = Instant::now();
        prim.to_device()?;
        prim.back()?;
        let p = gbps(t);
        let t = Instant::now();
        let out = mirror.migrate_range_to_device(a.get() as u64, n as u64)?;
        let back = mirror.migrate_to_system(a.get() as u64, n as u64)?;
        let h = gbps(t);
        if out.cpages != n as u64 || back.cpages != n as u64 {
            return Err(Error::Invalid("bench: not every page migrated"));
        }
        if rep > 0 {
            hs.push(h);
            ps.push(p);
        }
    }
    space.unmap(a, len)?;
    Ok((median(&mut hs), median(&mut ps)))
}

/// CPU streaming reads (a copy out of managed memory) of `len` bytes resident in
/// device-coherent memory, and of the same bytes in system memory; GB/s, median of `reps`.
fn cpu_read_coherent(space: &Space, len: usize, reps: usize) -> Result<(f64, f64)> {
    let dev = SoftDevice::new(DeviceConfig {
        kind: MemoryKind::Coherent,
        capacity: len,
    })?;
    let m = dev.mirror(space)?;
    let n = len / PAGE_SIZE;
    let sys_a = space.map_anon(len, Prot::ReadWrite)?;
    let coh_a = space.map_anon(len, Prot::ReadWrite)?;
    let fill: Vec<u8> = (0..len).map(|i| i as u8).collect();
    space.cpu_write(sys_a, &fill)?;
    space.cpu_write(coh_a, &fill)?;
    m.migrate_range_to_device(coh_a.get() as u64, n as u64)?;
    let mut buf = vec![0u8; len];
    let (mut cs, mut ss) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let t = Instant::now();
        space.cpu_read(sys_a, &mut buf)?;
        let s = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        space.cpu_read(coh_a, &mut buf)?;
        let c = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        if rep > 0 {
            ss.push(s);
            cs.push(c);
        }
    }
    if buf != fill {
        return Err(Error::Invalid("bench: coherent read returned wrong data"));
    }
    drop(m);
    space.unmap(sys_a, len)?;
    space.unmap(coh_a, len)?;
    Ok((median(&mut cs), median(&mut ss)))
}

/// A workload alternating device and CPU phases over `len` bytes for `rounds` rounds; returns
/// the bytes hetmem migrated (both directions).
fn pingpong(space: &Space, kind: MemoryKind, len: usize, rounds: usize) -> Result<f64> {
    let dev = SoftDevice::new(DeviceConfig {
        kind,
        capacity: len,
    })?;
    let m = dev.mirror(space)?;
    let n = len / PAGE_SIZE;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    let fill: Vec<u8> = (0..len).map(|i| (i / PAGE_SIZE) as u8).collect();
    space.cpu_write(a, &fill)?;
    let before = space.stats();
    let mut buf = vec![0u8; len];
    for _ in 0..rounds {
        // Device phase: the runtime prefetches the range to the device, which reads it all.
        m.migrate_range_to_device(a.get() as u64, n as u64)?;
        m.read(a.get() as u64, n as u64, &mut buf)?;
        // CPU phase: the CPU reads it all.
        space.cpu_read(a, &mut buf)?;
    }
    if buf != fill {
        return Err(Error::Invalid("bench: ping-pong returned wrong data"));
    }
    let after = space.stats();
    drop(m);
    space.unmap(a, len)?;
    let pages = (after.pages_to_device - before.pages_to_device)
        + (after.pages_to_system - before.pages_to_system);
    Ok((pages as usize * PAGE_SIZE) as f64)
}

fn memcpy_gbps(len: usize, reps: usize) -> Result<f64> {
    let s = Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("memcpy source"))?;
    let d = Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("memcpy destination"))?;
    s.populate(0, len).map_err(os("populate"))?;
    d.populate(0, len).map_err(os("populate"))?;
    let mut v = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        s.copy_to(0, &d, 0, len).map_err(os("memcpy"))?;
        let g = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        if rep > 0 {
            v.push(g);
        }
    }
    Ok(median(&mut v))
}

// ---------------------------------------------------------------------------------------------
// File mappings vs the kernel's mmap
// ---------------------------------------------------------------------------------------------

/// Bytes copied per read in the sequential sweeps (a buffer that stays in the L2 cache).
const FILE_CHUNK: usize = 64 << 10;

/// The `u64` at byte `off` (8-byte aligned) of the bench file: non-zero everywhere, and
/// different at every offset, so that a read of the wrong page is seen.
fn file_word(off: usize) -> u64 {
    off as u64 | 1 << 63
}

/// A temporary file of `len` bytes of [`file_word`]s, on disk (synced), removed on drop.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(len: usize) -> Result<TempFile> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("hetmem-bench-{}-{stamp}.dat", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(os("create the bench file"))?;
        // From here on the file is removed on every way out.
        let tf = TempFile { path };
        let mut chunk = vec![0u8; 1 << 20];
        for base in (0..len).step_by(chunk.len()) {
            let n = chunk.len().min(len - base);
            for (i, w) in chunk[..n].chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&file_word(base + i * 8).to_ne_bytes());
            }
            f.write_all(&chunk[..n])
                .map_err(os("write the bench file"))?;
        }
        // On disk: the kernel drops clean pages only (POSIX_FADV_DONTNEED skips dirty ones).
        f.sync_all().map_err(os("sync the bench file"))?;
        Ok(tf)
    }

    /// A fresh open file description (so a fresh readahead state, as a new `open` would have).
    fn open(&self) -> Result<std::fs::File> {
        std::fs::File::open(&self.path).map_err(os("open the bench file"))
    }

    /// Drops the file's pages from the kernel's page cache (`POSIX_FADV_DONTNEED`: the file is
    /// clean, and no mapping of it is alive when this is called).
    fn drop_kernel_cache(&self) -> Result<()> {
        let f = self.open()?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
            .map_err(|e| Error::os("fadvise(DONTNEED) the bench file", e.into()))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How a mapping is swept.
enum Sweep<'a> {
    /// Every byte in order, `FILE_CHUNK` bytes per copy; the result is GB/s.
    Seq,
    /// One whole 4 KiB page at each of these page numbers, in this order; the result is the
    /// mean µs per page.
    Rand(&'a [usize]),
}

/// Whether `buf`, read at file offset `off`, starts with the file's data.
fn check_file_data(buf: &[u8], off: usize) -> Result<()> {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[..8]);
    if u64::from_ne_bytes(w) != file_word(off) {
        return Err(Error::Invalid("bench: a file mapping returned wrong data"));
    }
    Ok(())
}

/// Sweeps `len` bytes through `read` (a raw copy out of a mapping at a byte offset) into `buf`
/// (`FILE_CHUNK` bytes). A sequential figure counts the time since `t` (taken before the
/// mapping was made, so that work done when mapping counts too); a random one only the accesses.
fn file_sweep(
    len: usize,
    how: &Sweep<'_>,
    buf: &mut [u8],
    t: Instant,
    read: impl Fn(usize, &mut [u8]) -> Result<()>,
) -> Result<f64> {
    match how {
        Sweep::Seq => {
            for off in (0..len).step_by(FILE_CHUNK) {
                let n = FILE_CHUNK.min(len - off);
                read(off, &mut buf[..n])?;
                check_file_data(buf, off)?;
            }
            Ok(len as f64 / t.elapsed().as_secs_f64() / 1e9)
        }
        Sweep::Rand(pages) => {
            // A latency per access: the mapping's creation is not part of it.
            let t = Instant::now();
            for &p in pages.iter() {
                read(p * PAGE_SIZE, &mut buf[..PAGE_SIZE])?;
                check_file_data(buf, p * PAGE_SIZE)?;
            }
            Ok(micros(t) / pages.len() as f64)
        }
    }
}

/// One sweep over a fresh hetmem mapping (shared, read-only) of the file behind `h`: timed from
/// before `map_file` to the end of the sweep (the unmap after is not timed).
fn hetmem_file_sweep(space: &Space, h: &FileHandle, len: usize, how: &Sweep<'_>) -> Result<f64> {
    let mut buf = vec![0u8; FILE_CHUNK];
    let t = Instant::now();
    let a = space.map_file(h, 0, len, Prot::Read, true)?;
    let r = file_sweep(len, how, &mut buf, t, |off, buf| {
        // Inside the live mapping made above; faults are served by hetmem in this thread.
        sys::cpu_read(a.get() + off, buf);
        Ok(())
    });
    space.unmap(a, len)?;
    r
}

/// The same sweep over a fresh kernel mmap (shared, read-only) of a fresh open of the file:
/// timed from before `mmap` to the end of the sweep (`munmap` is not timed).
fn kernel_file_sweep(f: &TempFile, len: usize, how: &Sweep<'_>) -> Result<f64> {
    let file = f.open()?;
    let mut buf = vec![0u8; FILE_CHUNK];
    let t = Instant::now();
    let m = sys::map_file_readonly(&file, len).map_err(os("mmap the bench file"))?;
    file_sweep(len, how, &mut buf, t, |off, buf| {
        m.read(off, buf).map_err(os("read the bench mmap"))
    })
}

/// (hetmem, kernel) pairs of the file-mapping figures.
struct FileFigures {
    seq_warm: (f64, f64),
    seq_cold: (f64, f64),
    rand_cold: (f64, f64),
    rand_warm: (f64, f64),
}

/// Collects the medians of (hetmem, kernel) samples.
#[derive(Default)]
struct PairSamples(Vec<f64>, Vec<f64>);

impl PairSamples {
    fn push(&mut self, h: f64, k: f64) {
        self.0.push(h);
        self.1.push(k);
    }
    fn medians(mut self) -> (f64, f64) {
        (median(&mut self.0), median(&mut self.1))
    }
}

/// Sequential and random reads of a file through fresh hetmem mappings and through fresh kernel
/// mmaps, cold (neither page cache holds the file) and warm (both hold all of it).
fn file_reads(space: &Space, sz: &Sizes) -> Result<FileFigures> {
    let len = sz.file_bytes;
    let tf = TempFile::new(len)?;
    let cfg = CacheConfig {
        budget: len + LARGE_PAGE_SIZE,
        ..CacheConfig::default()
    };
    // Random pages: one per block, at a pseudo-random page of the block, blocks in a random
    // order; far enough apart that no sample lies in the fault-around or read-around window of
    // another (hetmem: 64 KiB; the kernel: up to 128 KiB centred on the fault).
    let per_block = sz.file_rand_block / PAGE_SIZE;
    let pages: Vec<usize> = permutation(len / sz.file_rand_block)
        .into_iter()
        .map(|b| b * per_block + (b.wrapping_mul(0x9E37_79B9) >> 7) % per_block)
        .collect();
    let rand = Sweep::Rand(&pages);

    // Cold: the kernel's page cache dropped before each sweep, and a fresh hetmem cache.
    let hetmem_cold = |how: &Sweep<'_>| -> Result<f64> {
        tf.drop_kernel_cache()?;
        let cache = FileCache::open(&tf.path, false, cfg)?;
        hetmem_file_sweep(space, &cache.handle(), len, how)
    };
    let kernel_cold = |how: &Sweep<'_>| -> Result<f64> {
        tf.drop_kernel_cache()?;
        kernel_file_sweep(&tf, len, how)
    };
    let (mut seq_cold, mut rand_cold) = (PairSamples::default(), PairSamples::default());
    for rep in 0..=sz.file_reps {
        let ks = kernel_cold(&Sweep::Seq)?;
        let hs = hetmem_cold(&Sweep::Seq)?;
        let kr = kernel_cold(&rand)?;
        let hr = hetmem_cold(&rand)?;
        if rep > 0 {
            seq_cold.push(hs, ks);
            rand_cold.push(hr, kr);
        }
    }

    // Warm: one hetmem cache filled through `read_at` (which also fills the kernel's page cache);
    // every sweep maps the file afresh, so its first access to each page still faults.
    let cache = FileCache::open(&tf.path, false, cfg)?;
    let h = cache.handle();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..len).step_by(buf.len()) {
        h.read_at(off as u64, &mut buf)?;
    }
    if cache.cached_bytes() < len {
        return Err(Error::Invalid(
            "bench: the warm file cache does not hold the file",
        ));
    }
    let (mut seq_warm, mut rand_warm) = (PairSamples::default(), PairSamples::default());
    for rep in 0..=sz.file_reps {
        let ks = kernel_file_sweep(&tf, len, &Sweep::Seq)?;
        let hs = hetmem_file_sweep(space, &h, len, &Sweep::Seq)?;
        let kr = kernel_file_sweep(&tf, len, &rand)?;
        let hr = hetmem_file_sweep(space, &h, len, &rand)?;
        if rep > 0 {
            seq_warm.push(hs, ks);
            rand_warm.push(hr, kr);
        }
    }
    Ok(FileFigures {
        seq_warm: seq_warm.medians(),
        seq_cold: seq_cold.medians(),
        rand_cold: rand_cold.medians(),
        rand_warm: rand_warm.medians(),
    })
}
