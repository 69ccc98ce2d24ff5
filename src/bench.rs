//! `hetmem bench`: figures measured in one run, each against a baseline measured in the same run.
//!
//! # What is measured, and against what
//!
//! | figure | hetmem side | baseline (bare kernel primitives, same run) |
//! |---|---|---|
//! | `fault_back_4k_us` | median time of one CPU load that faults a device-private 4 KiB page back (after [`DeviceMirror::migrate_range_to_device`]) | `uffd_in_thread_4k_us`: a bare SIGBUS-mode userfaultfd whose handler does one `UFFDIO_COPY` of the page, served in the faulting thread |
//! | `fault_back_4k_busy_us` | the same, while another thread of the process spins on its own memory | `uffd_in_thread_4k_busy_us`, same sibling |
//! | `first_touch_4k_us` | mean per page of a sequential sweep (one store a page) over a fresh mapping | `kernel_first_touch_4k_us`: the same sweep over plain anonymous memory, the faster of base pages and `MADV_HUGEPAGE` (where transparent huge pages are `always` or `madvise`); both variants are reported (`kernel_first_touch_base_pages_4k_us`, `kernel_first_touch_hugepage_4k_us`) and the THP setting is in the note |
//! | `first_touch_random_4k_us` | the same in a random page order | `kernel_first_touch_random_4k_us`: the kernel's random sweep, the faster variant |
//! | `first_touch_random_large_4k_us` | the same over a large mapping (`MapOptions::large`: a first touch fills its whole 2 MiB unit, as the kernel does with `MADV_HUGEPAGE`) | `kernel_first_touch_random_4k_us` |
//! | `fault_back_2threads_speedup` | speedup (time with 1 thread / time with 2) of faulting back every page of a mapping (device-private 4 KiB pages, one load each), the 2 threads on disjoint halves | `uffd_in_thread_2threads_speedup`: the same speedup for the bare in-thread userfaultfd (`uffd_in_thread_4k_us`'s handler) over disjoint halves of its range |
//! | `first_touch_2threads_speedup` | the same speedup for the first touch (one store a page, in order) of a fresh mapping | `kernel_first_touch_2threads_speedup`: the same for plain anonymous memory with `MADV_HUGEPAGE` where transparent huge pages are offered (hetmem fills whole 2 MiB units with huge pages); the transparent huge page setting is given beside it |
//! | `fault_during_migration_kfaults_per_s` | thousands of fault-backs per second (one thread loading device-private pages of mapping A one by one: each fault takes the space's lock) while another thread migrates a mapping B (2 MiB of 4 KiB pages) of the **same** space to the device and back, over and over | `fault_during_migration_other_space_kfaults_per_s`: the same with B in **another** space (a mirror of the same device there) |
//! | `migrate_4k_gbps`, `migrate_2m_gbps` | system → device → system round trips, bytes moved in both directions | `migrate_primitive_*_gbps`: the same syscalls hetmem issues, in a bare loop (write-protect each 2 MiB run, copy into a pool, `MADV_DONTNEED` the run; back: `UFFDIO_COPY` per 4 KiB page or per 2 MiB chunk) |
//! | `cpu_read_coherent_gbps` | CPU streaming reads of pages resident in device-coherent memory | `cpu_read_system_gbps`: the same reads of system-resident pages |
//! | `pingpong_coherent_bytes_moved` | bytes migrated by a workload alternating device phases (prefetch to the device, device reads everything) and CPU phases (CPU reads everything) over the same range (256 MiB, 4 rounds), with a coherent device | `pingpong_private_bytes_moved`: the same workload with a device-private device |
//! | `file_seq_read_gbps` | warm: every byte of a file (256 MiB) read in order, 64 KiB per copy, through a fresh shared read-only [`Space::map_file`] mapping of a [`FileCache`] that holds the whole file (filled once through `read_at`, so the kernel's page cache holds it too); timed from before `map_file` (the first access to each page faults) | `kernel_mmap_seq_read_gbps`: the same reads through a fresh kernel `mmap` (shared, read-only) of the file, timed from before `mmap` |
//! | `file_seq_read_warm_kernel_cache_gbps` | the same, with the file in the kernel's page cache only (read with `read(2)` first, untimed): a fresh `FileCache` each time, whose fill reads from the kernel's cache | `kernel_mmap_seq_read_gbps` |
//! | `file_seq_read_cold_gbps` | the same, cold: the kernel's page cache of the file dropped first (`POSIX_FADV_DONTNEED`) and a fresh `FileCache` | `kernel_mmap_seq_read_cold_gbps`: a fresh kernel `mmap` after the same drop, the faster (in this run) of the default read-around and `MADV_SEQUENTIAL` (both reported: `kernel_mmap_seq_read_cold_default_gbps`, `kernel_mmap_seq_read_cold_madv_sequential_gbps`; the note says which) |
//! | `file_seq_read_cold_bytes_read` | bytes hetmem read from storage per cold sequential sweep (`read_bytes` of `/proc/self/io` around the sweep) | `kernel_mmap_seq_read_cold_bytes_read`: the same for the baseline's sweep |
//! | `file_rand_read_4k_us` | cold: mean time of a first read of a whole 4 KiB page, one random page per 256 KiB block, blocks in random order (no page lies in another's fault-around or read-around window), through a fresh mapping of a fresh `FileCache` told the pattern ([`crate::pagecache::Access::Random`], as the baseline tells the kernel), kernel cache dropped; `file_rand_read_4k_default_us`: the same with hetmem's default advice (a fault right after the previous one doubles its window) | `kernel_mmap_rand_read_4k_us`: the same pages through a fresh kernel `mmap` with `MADV_RANDOM` after the same drop (the default read-around, which reads up to `read_ahead_kb` per fault, is reported beside it: `kernel_mmap_rand_read_4k_default_readaround_us`) |
//! | `file_rand_read_4k_bytes_read` | bytes hetmem read from storage per cold random sweep | `kernel_mmap_rand_read_4k_bytes_read` (`MADV_RANDOM`; the default read-around's: `kernel_mmap_rand_read_4k_default_readaround_bytes_read`) |
//! | `file_resident_bytes_ratio` | after a cold sequential read through a hetmem mapping: (hetmem's cache bytes + the kernel's page cache of the file, counted with `mincore`) / file size | `kernel_mmap_resident_bytes_ratio`: the kernel's page cache of the file / file size after the baseline's cold sequential read |
//! | `file_rand_read_warm_4k_us` | the same pages, warm (as `file_seq_read_gbps`) | `kernel_mmap_rand_read_warm_4k_us` |
//! | `largefile_private_wall_ms`, `largefile_coherent_wall_ms`, `largefile_replica_wall_ms` | a large file (256 MiB; 16 MiB with `--quick`) processed in place, with no staging copy: a fresh [`FileCache`] of it, mapped shared and writable; 4 rounds (2 with `--quick`) of: the device reads all of it ([`DeviceMirror::read`] of the mapping), the CPU stores one word to 1 % of its pages (every hundredth page, a different one each round), the device reads all of it again; then `fsync`. Timed from opening the cache to the end of `fsync`. `private`: the pages are migrated into device-private memory ([`DeviceMirror::migrate_range_to_device`] on the mapping, which intercepts stores, as a private placement needs) before **every** device phase, as a runtime prefetching a kernel's input does: a CPU store faults its page back, the next phase moves it again. `coherent`: the pages are placed in device-coherent memory once, before the first phase; the CPU uses them there. `replica`: the device (device-private) makes read-only replicas of the pages ([`DeviceMirror::replicate_range`] on the mapping, which intercepts stores, as a writable file's replicas need) before **every** device phase, as a runtime does for read-mostly input: the first copies the file, each later one only the pages whose replicas a CPU store dropped (rather than replicating once and letting the device read those pages over the link in every later phase); the CPU keeps using the system copy | `largefile_mirror_wall_ms`: the same with the pages in system memory (a plain shared writable mapping), the device mirroring them (reading them over the link) |
//! | `largefile_<placement>_bytes_moved` | bytes of migration copies, both directions, as the link model was charged for them: placements, replicas (a copy to the device is charged as a migration, one operation per page), CPU fault-backs, writeback reading device-private pages where they are (the note splits them by direction) | none: the mirror's is 0 (its traffic is in `largefile_mirror_link_bytes`) |
//! | `largefile_<placement>_link_bytes` | every byte charged to the link model: migrations, device accesses to system memory, CPU accesses to coherent memory (hetmem cannot see them; the workload declares a 64-byte line per store and each page writeback reads) | `largefile_mirror_link_bytes` |
//! | `largefile_<placement>_cpu_faults`, `largefile_<placement>_device_faults` | CPU faults of the space (`SpaceStats::cpu_faults`); fault passes of the device's reads (`CmdOut::faults`, not pages) | the mirror's (where not 0) |
//! | `largefile_<placement>_writeback_bytes` | pages the `fsync` wrote back (`FileCache::stats`) × page size | the mirror's |
//! | `largefile_<placement>_modelled_device_ms` | modelled device time of the run (the link model: PCIe 5 for the private, the replica and the mirroring device, NVLink-C2C for the coherent one; the note costs the same traffic under the other profile) | the mirror's |
//! | `largefile_private_coherent_bytes_moved_ratio`, `largefile_private_replica_bytes_moved_ratio` | `largefile_private_bytes_moved` / `largefile_coherent_bytes_moved`, / `largefile_replica_bytes_moved` | – |
//! | `largefile_readall_<placement>_bytes_moved`, `largefile_readall_private_coherent_bytes_moved_ratio`, `largefile_readall_private_replica_bytes_moved_ratio` | the same rounds with a CPU phase that also reads every page (one word each) before its stores, one run of each placement: the private placement brings the whole file back in every CPU phase and moves it again, coherent pages are read in place and replicas stay valid (with 4 rounds private moves 9 times the file, coherent and replica once) | – |
//! | `largefile_oracle_private_link_bytes`, `largefile_oracle_coherent_link_bytes` | the least link traffic any placement could reach for the `largefile` accesses ([`crate::policy::oracle::lower_bound`]: a device read is a whole page, a CPU store a 64-byte line; minimising modelled time under the placement's link profile) | – |
//! | `largefile_<placement>_link_bytes_vs_oracle` | the placement's link bytes / the oracle's for its memory kind (a replica can go below it: the oracle keeps one copy of a page) | – |
//! | `policies_<workload>_best_link_bytes` | `hetmem run`'s workloads ([`crate::workload`]: streaming, pingpong, random, stencil, graph, oversubscribed; 64 MiB, 16 MiB with `--quick`, 4 rounds, seed 1) under every policy: the least link bytes any policy moved (the note names it) | `policies_<workload>_oracle_bytes`: the oracle's least bytes for the same accesses (replicas can go below it) |
//! | `policies_pingpong_best_vs_uvm_link_bytes` | the best policy's link bytes on pingpong | `policies_pingpong_uvm_link_bytes`: the UVM-like policy's |
//! | `policies_oversubscribed_best_device_ms` | the least modelled device time any policy reached on the oversubscribed stream (150 % of device memory) | `policies_oversubscribed_oracle_device_ms`: the oracle's (the Belady placement for the device's capacity) |
//! | `memcpy_gbps` | a plain memory copy, for context | – |
//! | `scale_first_touch_16g_us`, `scale_migrate_16g_us`, `scale_fault_back_16g_us` (and `_4g_`) | per page, a sample of 2048 pages (256 with `--quick`) spread evenly over a fresh anonymous mapping of 16 GiB (4 GiB) in a 64 GiB space, with a device of 4 GiB: first touch (one store), migration to the device (one page per command), fault-back (one load); only the sample is backed, so the figures show how per-page costs grow with the mapping (page entries, lookups), not the memory (with `--quick`: 1 GiB, 256 MiB, 64 MiB and a 256 MiB device) | the same at 1 GiB (`scale_*_1g_us`); `scale_kernel_first_touch_*`: the kernel's own first touch of the same sample in plain anonymous memory of each size, against its 1 GiB figure (what its page tables add) |
//! | `metadata_bytes_per_page` | hetmem's own state per page | – |
//!
//! # Method
//!
//! Every timed figure is repeated until stable. Each group of measurements is warmed up once
//! (discarded), then repeated at least 7 and at most 25 times (the file figures, whose
//! repetitions read the file several times over, 5 to 15; every group 4 to 6 with `--quick`,
//! [`MIN_REPETITIONS`] being the fewest anywhere) until the median of each of the group's
//! per-repetition ratios moved by at most 2 % over the last 3 repetitions: each hetmem figure's
//! ratio to each baseline it may have (where the baseline is the faster of two kernel variants,
//! to both), a figure without a baseline its value. hetmem and its baseline alternate within
//! each repetition, so that drift in the machine (another tenant of the VM's host, frequency
//! changes) hits both alike, and a ratio is taken within one repetition. A figure is the median
//! of its repetitions (a fault-back repetition's own figure is the median of its timed faults; a
//! first touch's, the mean per page of its sweep), and reports its spread (`spread` in the
//! JSON, a line under it in the table): the repetitions, their minimum and maximum, beside a
//! baseline the range of the per-repetition ratios, and whether the repetitions stopped because
//! they were stable or at the most allowed (`stable: false`, "not stable" in the table: the
//! figure is no surer than its range). Memory is "already backed" on both sides: a sweep over
//! memory that was freed just before reuses pages the VM already holds (on memory the VM must
//! first get from its host a fault costs ≈ 10× more, which would measure the host).
//!
//! Counts are not timed: bytes moved or read from storage, faults, bytes written back, the link
//! model's device time, pages resident, metadata per page, and ratios of counts. A count is
//! taken in every repetition of its group (the ping-pong's and the metadata figure once: the
//! same operations on the same pages, and a constant) and is `exact` (in the JSON; no spread
//! line in the table) where every repetition gave the same; where one did not, it is reported
//! as a timed figure is, the median with its spread.
//!
//! The thread figures are repeated until stable as above (a repetition's figure is a speedup,
//! the ratio of two timings, or a rate). A speedup is measured on fresh threads started together
//! by a `Barrier`, timed from the first thread's start to the last one's end; the 1-thread run
//! uses the same harness. The fault-during-migration faulting thread starts its clock once the
//! migrating thread has gone round once, and stops at the end of A (4096 pages) or after 100 ms
//! (20 ms with `--quick`). It faults device-private pages back rather than first-touching fresh
//! ones: each fault-back is one fault, one page and one hold of the space's lock, whereas a
//! first touch fills up to 8 MiB per fault (fault-around). The thread figures assume a free core
//! per thread: on a machine busy with other work the two threads time-share a core, and the
//! same-space figure then measures the scheduler more than the lock (measured on this 2-core VM
//! with a build beside it: ≈ 0.9× instead of ≈ 0.007× idle).
//!
//! The file figures use a temporary file in `std::env::temp_dir()` (256 MiB; 16 MiB with
//! `--quick`) of non-zero data, written and synced once, removed at the end; every read is
//! checked against the data. Both sides read with the same raw copies; the random figures time
//! the accesses only (not the `mmap`/`map_file` call). A "cold" sweep is cold on the host side
//! only if the VM's disk is: the guest's page cache is dropped, the host's is not. Every cold
//! baseline is the kernel as a tuned user would advise it for the pattern (`MADV_RANDOM` for
//! random reads: without it a fault on a device with a large `read_ahead_kb` reads up to that much
//! around it; for sequential reads the faster of the default and `MADV_SEQUENTIAL` in this run),
//! and each cold sweep counts the bytes the process read from storage (`read_bytes` of
//! `/proc/self/io`, every thread of the process, taken around the sweep).
//!
//! The `largefile` group runs its four placements in turn in each repetition, each on a fresh
//! cache of the same file (after the warm-up the kernel's page cache holds the file: the fills
//! read from it), and checks every device read and, after each `fsync`, the whole file against
//! a model of every store. Its counts (bytes, faults, modelled time) come out the same in every
//! run — the same operations on the same pages — so one run would give them; they are taken
//! from every repetition anyway, exact where they agree (else with their spread). The wall times
//! are repeated until stable (until the ratios of `private`, `coherent` and `replica` to
//! `mirror` all are: 7 to 25 repetitions, 4 to 6 with `--quick`). What the run leaves behind is
//! not timed: the cache goes with its device frames, which hold nothing unwritten after the
//! `fsync`.
//!
//! With 1 % of the pages written per round, a device-private placement moves what a coherent
//! one does (the file, once) plus each written page three times (back on the store, to the
//! device at the next phase, read by writeback): ≈ 1.1× the coherent placement's bytes, not a
//! multiple. A replica placement moves the file once plus each written page once (its replica
//! again at the next phase; the store itself moves nothing back, and writeback reads the system
//! copy): the private placement moves ≈ 1.04× (`--quick`) to 1.08× its bytes, not a multiple
//! either. The workload's shape decides this, not the placements: every placement brings the
//! whole file to the device once, and the CPU only stores, to few pages. With a fraction `w` of
//! the file written per round over `R` rounds, private moves `1 + 3Rw` files, replica `1 + Rw`
//! and coherent 1: against replica the ratio stays below 3× however much is written, and
//! against coherent it reaches 5× only when more than the whole file is written (`Rw > 4/3`).
//! A ≥ 5× difference needs CPU **reads** between device phases, which fault device-private
//! pages back but read a replica's system copy or a coherent page in place: the
//! `largefile_readall_*` figures run the same rounds with a CPU phase that reads every page
//! (private moves `1 + 2R` files plus the written pages, coherent and replica about 1: 9× with
//! 4 rounds), as the `pingpong_*` figures do for anonymous memory. The mirror moves nothing but
//! reads the whole file over the link in every device phase.
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
use crate::link::{LinkModel, LinkProfile, Traffic};
use crate::pagecache::{Access, CacheConfig, FileCache, FileHandle};
use crate::pool::MemoryKind;
use crate::space::{FileMapOptions, MapOptions, Probe, Space, SpaceConfig};
use crate::sys::{
    self, FaultTarget, FileAccess, LARGE_PAGE_SIZE, Prot, Region, Uffd, UffdDelivery, UffdError,
};

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
    /// Which way the value (and so the ratio) is better.
    pub better: Better,
    /// How the timed repetitions behind `value` spread: every figure that is not exact has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
    /// A count (bytes, faults, a model's output), not a timing, that came out the same in every
    /// repetition it was taken in (or is the same by construction, taken once): it has no
    /// spread.
    pub exact: bool,
    /// What else the reader needs to read the figure (a system setting, a side measurement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Which way a figure, and its ratio to the baseline, is better.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Smaller is better (times, bytes, faults).
    Lower,
    /// Larger is better (bandwidths, rates, speedups).
    Higher,
}

impl Better {
    /// The direction that goes with `unit`: times, byte counts, fault counts and bytes held per
    /// byte of data (`B/B`) are better lower, everything else (GB/s, k/s, speedups) higher.
    pub fn for_unit(unit: &str) -> Better {
        match unit {
            "ns" | "us" | "ms" | "s" | "bytes" | "faults" | "B/B" => Better::Lower,
            _ => Better::Higher,
        }
    }

    /// `"lower"` or `"higher"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
        }
    }
}

/// The spread of a figure's timed repetitions (the figure is their median).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Spread {
    /// Timed repetitions (after one discarded warm-up): at least [`MIN_REPETITIONS`].
    pub reps: usize,
    /// The smallest repetition.
    pub min: f64,
    /// The largest repetition.
    pub max: f64,
    /// The smallest per-repetition ratio to the baseline (both sides measured in the same
    /// repetition); `None` on a baseline.
    pub ratio_min: Option<f64>,
    /// The largest per-repetition ratio to the baseline; `None` on a baseline.
    pub ratio_max: Option<f64>,
    /// Whether the repetitions stopped because the figures of their group were stable (the
    /// median of each one's per-repetition ratios to its baseline moved by at most 2 % over
    /// the last 3 repetitions), rather than at the most repetitions allowed.
    pub stable: bool,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// Smaller sizes and fewer repetitions (for smoke tests of the bench itself).
    pub quick: bool,
    /// Run only these groups of figures ([`GROUPS`]); empty runs every group.
    pub only: Vec<String>,
}

/// The groups of figures, as `hetmem bench --only` names them.
pub const GROUPS: &[(&str, &str)] = &[
    (
        "fault_back",
        "fault-back of device-private pages, alone and with a busy sibling",
    ),
    ("first_touch", "first touch, sequential and random"),
    ("threads", "2-thread speedups of fault-back and first touch"),
    (
        "contention",
        "CPU faults while a migration runs in the same space or another",
    ),
    (
        "migrate",
        "migration round trips, 4 KiB pages and 2 MiB units",
    ),
    ("coherent", "CPU reads of coherent-resident pages"),
    (
        "pingpong",
        "bytes moved by a CPU/device ping-pong, coherent vs private",
    ),
    (
        "file",
        "file mappings: warm and cold, sequential and random, bytes read, residency",
    ),
    (
        "largefile",
        "a large file in device and CPU phases: mirrored, device-private, coherent",
    ),
    (
        "policies",
        "hetmem run's workloads under every policy, against the oracle",
    ),
    ("memcpy", "memcpy bandwidth"),
    ("metadata", "metadata per page"),
    (
        "scale",
        "per-page fault and migration costs in mappings of 1, 4 and 16 GiB",
    ),
];

impl BenchOptions {
    /// Whether group `g` runs.
    pub fn wants(&self, g: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == g)
    }

    /// Checks that every group in `only` exists.
    pub fn validate(&self) -> Result<()> {
        match self
            .only
            .iter()
            .find(|o| !GROUPS.iter().any(|(g, _)| g == o))
        {
            Some(_) => Err(Error::Invalid(
                "unknown bench group (see `hetmem bench --help` for the list)",
            )),
            None => Ok(()),
        }
    }
}

/// Sizes and repetition counts of one run.
struct Sizes {
    /// Timed repetitions of the fault-back, first-touch, migration, coherent-read and memcpy
    /// figures: at least, at most (until stable).
    reps: (usize, usize),
    /// Pages faulted back per repetition.
    fault_pages: usize,
    /// Bytes swept per first-touch repetition.
    touch_bytes: usize,
    /// Bytes per migration round trip (4 KiB pages / 2 MiB units).
    mig4k_bytes: usize,
    mig2m_bytes: usize,
    memcpy_bytes: usize,
    /// Bytes of the coherent read and ping-pong workloads.
    shared_bytes: usize,
    pingpong_rounds: usize,
    /// Bytes of the temporary file of the file-mapping figures.
    file_bytes: usize,
    /// One random page is read per block of this many bytes (random sweeps).
    file_rand_block: usize,
    /// Timed repetitions of the cold and of the warm file figures: at least, at most (until
    /// stable).
    file_reps: (usize, usize),
    /// Pages faulted back per run of the thread figures (and pages of mapping A in the
    /// fault-during-migration figure).
    thread_fault_pages: usize,
    /// Bytes first-touched per run of the 2-thread first-touch figure.
    thread_touch_bytes: usize,
    /// Timed repetitions of the thread figures: at least, at most (until stable).
    thread_min_reps: usize,
    thread_max_reps: usize,
    /// Longest a faulting thread runs in one fault-during-migration measurement.
    thread_fault_budget: std::time::Duration,
    /// Bytes of the `largefile` file, its rounds, and its repetitions (at least, at most: until
    /// stable).
    largefile_bytes: usize,
    largefile_rounds: usize,
    largefile_min_reps: usize,
    largefile_max_reps: usize,
    /// The mappings of the `scale` figures (smallest first), the device's capacity there, and
    /// the pages sampled in each.
    scale_bytes: [usize; 3],
    scale_device: usize,
    scale_pages: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                reps: (4, 6),
                fault_pages: 256,
                touch_bytes: 8 << 20,
                mig4k_bytes: 4 << 20,
                mig2m_bytes: 8 << 20,
                memcpy_bytes: 16 << 20,
                shared_bytes: 16 << 20,
                pingpong_rounds: 2,
                file_bytes: 16 << 20,
                file_rand_block: 256 << 10,
                file_reps: (4, 6),
                thread_fault_pages: 1024,
                thread_touch_bytes: 8 << 20,
                thread_min_reps: 4,
                thread_max_reps: 6,
                thread_fault_budget: std::time::Duration::from_millis(20),
                largefile_bytes: 16 << 20,
                largefile_rounds: 2,
                largefile_min_reps: 4,
                largefile_max_reps: 6,
                scale_bytes: [64 << 20, 256 << 20, 1 << 30],
                scale_device: 256 << 20,
                scale_pages: 256,
            }
        } else {
            Sizes {
                reps: (7, 25),
                fault_pages: 4096,
                touch_bytes: 64 << 20,
                mig4k_bytes: 32 << 20,
                mig2m_bytes: 64 << 20,
                memcpy_bytes: 64 << 20,
                shared_bytes: 256 << 20,
                pingpong_rounds: 4,
                file_bytes: 256 << 20,
                file_rand_block: 256 << 10,
                file_reps: (5, 15),
                thread_fault_pages: 4096,
                thread_touch_bytes: 64 << 20,
                thread_min_reps: 7,
                thread_max_reps: 25,
                thread_fault_budget: std::time::Duration::from_millis(100),
                largefile_bytes: 256 << 20,
                largefile_rounds: 4,
                largefile_min_reps: 7,
                largefile_max_reps: 25,
                scale_bytes: [1 << 30, 4 << 30, 16 << 30],
                scale_device: 4 << 30,
                scale_pages: 2048,
            }
        }
    }
}

/// Runs every benchmark; `progress` is told what runs next.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<BenchResult>> {
    opts.validate()?;
    let sz = Sizes::new(opts.quick);
    let mut out = Vec::new();
    let space = Space::with_config(SpaceConfig {
        size: 4 << 30,
        stash: 2 << 20,
        ..SpaceConfig::default()
    })?;

    if opts.wants("fault_back") {
        progress("fault-back of device-private 4 KiB pages vs a bare in-thread userfaultfd");
        let r = fault_back(&space, &sz, false)?;
        push_reps(
            &mut out,
            ("fault_back_4k_us", "uffd_in_thread_4k_us"),
            "us",
            &r,
            None,
        );
    }

    if opts.wants("fault_back") {
        progress("fault-back with a busy sibling thread vs a bare in-thread userfaultfd");
        let r = fault_back(&space, &sz, true)?;
        push_reps(
            &mut out,
            ("fault_back_4k_busy_us", "uffd_in_thread_4k_busy_us"),
            "us",
            &r,
            None,
        );
    }

    if opts.wants("first_touch") {
        progress("first touch (sequential and random) vs kernel anonymous memory");
        let t = first_touch(&space, &sz)?;
        push_first_touch(&mut out, &t);
    }

    if opts.wants("threads") {
        progress(
            "fault-back by 2 threads vs 1 (speedup) vs the same for a bare in-thread userfaultfd",
        );
        let r = fault_back_2threads(&space, &sz)?;
        push_reps(
            &mut out,
            (
                "fault_back_2threads_speedup",
                "uffd_in_thread_2threads_speedup",
            ),
            "x",
            &r,
            None,
        );
    }

    if opts.wants("threads") {
        progress(
            "first touch by 2 threads vs 1 (speedup) vs the same for the kernel's first touch",
        );
        let r = first_touch_2threads(&space, &sz)?;
        push_reps(
            &mut out,
            (
                "first_touch_2threads_speedup",
                "kernel_first_touch_2threads_speedup",
            ),
            "x",
            &r,
            Some(format!(
                "transparent huge pages: {} (kernel side: MADV_HUGEPAGE where offered; hetmem fills whole 2 MiB units with huge pages)",
                thp_setting()
            )),
        );
    }

    if opts.wants("contention") {
        progress("CPU faults while another thread migrates: same space vs another space");
        let (r, note) = fault_during_migration(&space, &sz)?;
        push_reps(
            &mut out,
            (
                "fault_during_migration_kfaults_per_s",
                "fault_during_migration_other_space_kfaults_per_s",
            ),
            "k/s",
            &r,
            Some(note),
        );
    }

    if opts.wants("migrate") {
        progress("migration round trips of 4 KiB pages vs the bare primitives");
        let r = migrate(&space, sz.mig4k_bytes, false, sz.reps)?;
        push_reps(
            &mut out,
            ("migrate_4k_gbps", "migrate_primitive_4k_gbps"),
            "GB/s",
            &r,
            None,
        );
    }

    if opts.wants("migrate") {
        progress("migration round trips of 2 MiB units vs the bare primitives");
        let r = migrate(&space, sz.mig2m_bytes, true, sz.reps)?;
        push_reps(
            &mut out,
            ("migrate_2m_gbps", "migrate_primitive_2m_gbps"),
            "GB/s",
            &r,
            None,
        );
    }

    if opts.wants("coherent") {
        progress("CPU reads of coherent-resident vs system-resident pages");
        let r = cpu_read_coherent(&space, sz.shared_bytes.min(64 << 20), sz.reps)?;
        push_reps(
            &mut out,
            ("cpu_read_coherent_gbps", "cpu_read_system_gbps"),
            "GB/s",
            &r,
            None,
        );
    }

    if opts.wants("pingpong") {
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
        // Counts of pages moved: the same in every run, so taken once.
        push_counts(
            &mut out,
            ("pingpong_coherent_bytes_moved", &[c]),
            ("pingpong_private_bytes_moved", &[p]),
            "bytes",
        );
    }

    if opts.wants("file") {
        progress("file mappings (warm and cold, sequential and random) vs the kernel's mmap");
        let f = file_reads(&space, &sz)?;
        push_file_figures(&mut out, &f);
    }

    if opts.wants("policies") {
        progress("workloads under every policy, against the oracle");
        policy_figures(&mut out, sz.shared_bytes.min(64 << 20))?;
    }

    if opts.wants("largefile") {
        progress("a large file in device and CPU phases: mirrored vs device-private vs coherent");
        let (runs, readall, stable) = largefile(&space, &sz)?;
        push_largefile(&mut out, &runs, stable, &sz);
        push_largefile_readall(&mut out, &readall, &sz);
    }

    if opts.wants("memcpy") {
        progress("memcpy bandwidth");
        let s = memcpy_gbps(sz.memcpy_bytes, sz.reps)?;
        out.push(s.timed("memcpy_gbps", "memcpy", "GB/s", None));
    }

    if opts.wants("scale") {
        progress("per-page costs in mappings of 1, 4 and 16 GiB (a sample of pages in each)");
        let s = scale(&sz)?;
        for (what, unit) in SCALE_MEASURES.map(|w| (w, "us")) {
            let large = format!("scale_{what}_16g_{unit}");
            let mid = format!("scale_{what}_4g_{unit}");
            let small = format!("scale_{what}_1g_{unit}");
            let (sl, sm, ss) = (
                format!("{what}_2"),
                format!("{what}_1"),
                format!("{what}_0"),
            );
            let mut f = s.timed(&large, &sl, unit, Some((&small, &ss)));
            f.note = Some(scale_note(&sz));
            out.push(f);
            let mut f = s.timed(&mid, &sm, unit, Some((&small, &ss)));
            f.note = Some(scale_note(&sz));
            out.push(f);
            out.push(s.timed(&small, &ss, unit, None));
        }
    }

    if opts.wants("metadata") {
        progress("metadata per page");
        // A constant of the build: exact.
        out.push(count_figure(
            "metadata_bytes_per_page",
            &[Space::metadata_bytes_per_page() as f64],
            None,
            "bytes",
            true,
        ));
    }

    Ok(out)
}

/// Formats bytes read from storage (or "unknown").
fn fmt_bytes(v: Option<f64>) -> String {
    match v {
        Some(b) if b >= (1 << 20) as f64 => format!("{:.1} MiB", b / (1 << 20) as f64),
        Some(b) => format!("{:.0} KiB", b / 1024.0),
        None => "unknown".into(),
    }
}

/// Pushes the bytes read from storage per sweep, a count taken in every repetition of `s`:
/// hetmem's (sample `io_` + `h`) as `name`, against the kernel's (`io_` + `base.1`) as
/// `base.0` (a baseline only when the kernel read something in every repetition: a ratio to 0
/// means nothing).
fn push_bytes(
    out: &mut Vec<BenchResult>,
    s: &Samples,
    (name, h): (&str, &str),
    base: (&str, &str),
) {
    let (hs, ks) = (format!("io_{h}"), format!("io_{}", base.1));
    if !s.has(&hs) || !s.has(&ks) {
        return;
    }
    if s.col(&ks).iter().all(|k| *k > 0.0) {
        out.push(s.count(name, &hs, "bytes", Some((base.0, &ks))));
    } else {
        out.push(s.count(name, &hs, "bytes", None));
    }
    out.push(s.count(base.0, &ks, "bytes", None));
}

/// The file-mapping figures (see [`file_reads`] for the sample names). Each cold baseline is the
/// kernel as a tuned user would map the file (random: `MADV_RANDOM`; sequential: the faster of
/// the default and `MADV_SEQUENTIAL`, measured in the same run); the other variant is reported
/// beside it, and every cold figure says how many bytes each side read from storage.
fn push_file_figures(out: &mut Vec<BenchResult>, f: &FileFigures) {
    let (c, w) = (&f.cold, &f.warm);
    let ra = f
        .read_ahead_kb
        .map_or_else(|| "unknown".into(), |k| k.to_string());
    out.push(w.timed(
        "file_seq_read_gbps",
        "seq_warm_h",
        "GB/s",
        Some(("kernel_mmap_seq_read_gbps", "seq_warm_k")),
    ));
    out.push(w.timed("kernel_mmap_seq_read_gbps", "seq_warm_k", "GB/s", None));
    let mut x = w.timed(
        "file_seq_read_warm_kernel_cache_gbps",
        "seq_warm_kernel_cache_h",
        "GB/s",
        Some(("kernel_mmap_seq_read_gbps", "seq_warm_k")),
    );
    x.note = Some(format!(
        "the file in the kernel's page cache only: a fresh hetmem cache fills from it; bytes \
         read from storage by hetmem: {}",
        fmt_bytes(w.io("seq_warm_kernel_cache_h"))
    ));
    out.push(x);

    // Cold sequential: the faster kernel variant (by the median) is the baseline.
    let (kn, ks) = (c.median("seq_k_normal"), c.median("seq_k_sequential"));
    let (best_name, which) = if ks > kn {
        ("seq_k_sequential", "MADV_SEQUENTIAL")
    } else {
        ("seq_k_normal", "the default read-around")
    };
    let mut x = c.timed(
        "file_seq_read_cold_gbps",
        "seq_h",
        "GB/s",
        Some(("kernel_mmap_seq_read_cold_gbps", best_name)),
    );
    x.note = Some(format!(
        "baseline: kernel mmap with {which} (the faster: default {kn:.2} GB/s, MADV_SEQUENTIAL \
         {ks:.2} GB/s; read_ahead_kb {ra}); bytes read from storage per sweep: hetmem {}, \
         kernel {} (default {}, MADV_SEQUENTIAL {})",
        fmt_bytes(c.io("seq_h")),
        fmt_bytes(c.io(best_name)),
        fmt_bytes(c.io("seq_k_normal")),
        fmt_bytes(c.io("seq_k_sequential")),
    ));
    out.push(x);
    let mut b = c.timed("kernel_mmap_seq_read_cold_gbps", best_name, "GB/s", None);
    b.note = Some(format!("kernel mmap with {which}"));
    out.push(b);
    out.push(c.timed(
        "kernel_mmap_seq_read_cold_default_gbps",
        "seq_k_normal",
        "GB/s",
        None,
    ));
    out.push(c.timed(
        "kernel_mmap_seq_read_cold_madv_sequential_gbps",
        "seq_k_sequential",
        "GB/s",
        None,
    ));
    push_bytes(
        out,
        c,
        ("file_seq_read_cold_bytes_read", "seq_h"),
        ("kernel_mmap_seq_read_cold_bytes_read", best_name),
    );

    // Cold random: both sides told the pattern (hetmem `Access::Random`, the kernel
    // MADV_RANDOM); each side's default beside it.
    let (kd, hd) = (c.median("rand_k_normal"), c.median("rand_h_normal"));
    let mut r = c.timed(
        "file_rand_read_4k_us",
        "rand_h",
        "us",
        Some(("kernel_mmap_rand_read_4k_us", "rand_k_random")),
    );
    r.note = Some(format!(
        "hetmem told Access::Random (its default: {hd:.1} us, {}); baseline: kernel mmap with \
         MADV_RANDOM (default read-around: {kd:.1} us; read_ahead_kb {ra}); bytes read from \
         storage per sweep: hetmem {}, kernel {} (default read-around {})",
        fmt_bytes(c.io("rand_h_normal")),
        fmt_bytes(c.io("rand_h")),
        fmt_bytes(c.io("rand_k_random")),
        fmt_bytes(c.io("rand_k_normal")),
    ));
    out.push(r);
    out.push(c.timed(
        "file_rand_read_4k_default_us",
        "rand_h_normal",
        "us",
        Some(("kernel_mmap_rand_read_4k_us", "rand_k_random")),
    ));
    let mut b = c.timed("kernel_mmap_rand_read_4k_us", "rand_k_random", "us", None);
    b.note = Some("kernel mmap with MADV_RANDOM".into());
    out.push(b);
    out.push(c.timed(
        "kernel_mmap_rand_read_4k_default_readaround_us",
        "rand_k_normal",
        "us",
        None,
    ));
    push_bytes(
        out,
        c,
        ("file_rand_read_4k_bytes_read", "rand_h"),
        ("kernel_mmap_rand_read_4k_bytes_read", "rand_k_random"),
    );
    if c.has("io_rand_k_normal") {
        out.push(c.count(
            "kernel_mmap_rand_read_4k_default_readaround_bytes_read",
            "io_rand_k_normal",
            "bytes",
            None,
        ));
    }

    out.push(w.timed(
        "file_rand_read_warm_4k_us",
        "rand_warm_h",
        "us",
        Some(("kernel_mmap_rand_read_warm_4k_us", "rand_warm_k")),
    ));
    out.push(w.timed(
        "kernel_mmap_rand_read_warm_4k_us",
        "rand_warm_k",
        "us",
        None,
    ));

    // Memory held after a cold sequential read: both caches, per byte of the file (a count).
    let res_best = format!("res_{best_name}");
    let mut m = c.count(
        "file_resident_bytes_ratio",
        "res_seq_h",
        "B/B",
        Some(("kernel_mmap_resident_bytes_ratio", &res_best)),
    );
    m.note = Some(
        "after a cold sequential read through a fresh mapping: (hetmem's cache + the kernel's \
         page cache of the file, by mincore) / file size; baseline: the kernel's page cache \
         after the baseline's read"
            .into(),
    );
    out.push(m);
    out.push(c.count("kernel_mmap_resident_bytes_ratio", &res_best, "B/B", None));
}

/// The first-touch figures (see [`first_touch`] for the sample names): each kernel baseline is
/// the faster (by the median) of the kernel on base pages and with `MADV_HUGEPAGE` (where
/// available), measured in the same repetitions; both variants are reported.
fn push_first_touch(out: &mut Vec<BenchResult>, s: &Samples) {
    let best = |base: &'static str, huge: &'static str| {
        if s.has(huge) && s.median(huge) < s.median(base) {
            (huge, "MADV_HUGEPAGE")
        } else {
            (base, "base pages (no MADV_HUGEPAGE)")
        }
    };
    let (seq, seq_which) = best("seq_k", "seq_kh");
    let (rnd, rnd_which) = best("rnd_k", "rnd_kh");
    let fmt = |v: &str| {
        if s.has(v) {
            format!("{:.3} us", s.median(v))
        } else {
            "n/a".to_string()
        }
    };
    let variants = |base: &str, huge: &str| {
        format!(
            "base pages {}, MADV_HUGEPAGE {}; transparent huge pages: {}",
            fmt(base),
            fmt(huge),
            thp_setting()
        )
    };
    let note = format!(
        "baseline: the kernel with {seq_which} (the faster variant); {}",
        variants("seq_k", "seq_kh")
    );
    let base = Some(("kernel_first_touch_4k_us", seq));
    let mut f = s.timed("first_touch_4k_us", "seq_h", "us", base);
    f.note = Some(note.clone());
    out.push(f);
    let rnd_note = format!(
        "baseline: the kernel's random sweep with {rnd_which} (the faster variant); {}",
        variants("rnd_k", "rnd_kh")
    );
    let rnd_base = Some(("kernel_first_touch_random_4k_us", rnd));
    let mut f = s.timed("first_touch_random_4k_us", "rnd_h", "us", rnd_base);
    f.note = Some(rnd_note.clone());
    out.push(f);
    let mut f = s.timed("first_touch_random_large_4k_us", "rnd_hl", "us", rnd_base);
    f.note = Some(format!(
        "a large mapping (MapOptions::large, hetmem's MADV_HUGEPAGE: a first touch fills its \
         whole 2 MiB unit); {rnd_note}"
    ));
    out.push(f);
    let mut f = s.timed("kernel_first_touch_4k_us", seq, "us", None);
    f.note = Some(note);
    out.push(f);
    let mut f = s.timed("kernel_first_touch_random_4k_us", rnd, "us", None);
    f.note = Some(rnd_note);
    out.push(f);
    out.push(s.timed("kernel_first_touch_base_pages_4k_us", "seq_k", "us", None));
    if s.has("seq_kh") {
        out.push(s.timed("kernel_first_touch_hugepage_4k_us", "seq_kh", "us", None));
    }
}

fn figure(name: &str, value: f64, unit: &str, base: Option<(&str, f64)>) -> BenchResult {
    BenchResult {
        name: name.to_string(),
        value,
        unit: unit.to_string(),
        baseline: base.map(|(n, _)| n.to_string()),
        baseline_value: base.map(|(_, v)| v),
        ratio: base.map(|(_, v)| value / v),
        better: Better::for_unit(unit),
        spread: None,
        exact: false,
        note: None,
    }
}

/// The `policies` group: each of [`crate::workload::WORKLOADS`] under every policy over `len`
/// bytes (4 rounds, seed 1): the best policy's link bytes against the oracle's, the UVM-like
/// policy's on pingpong against the best, and on the oversubscribed stream the best modelled
/// device time against the oracle's. Counts (the same in every run): taken once.
fn policy_figures(out: &mut Vec<BenchResult>, len: usize) -> Result<()> {
    let pages = len / PAGE_SIZE;
    for w in crate::workload::WORKLOADS {
        let runs = crate::workload::POLICIES
            .iter()
            .map(|p| crate::workload::run(w, p, false, pages, 4, 1))
            .collect::<Result<Vec<_>>>()?;
        if runs.iter().any(|r| !r.verified) {
            return Err(Error::Invalid("bench: a workload's run was not verified"));
        }
        let best = runs
            .iter()
            .min_by_key(|r| r.link_bytes)
            .expect("at least one policy");
        let oracle = best.oracle_bytes as f64;
        let name = format!("policies_{w}_best_link_bytes");
        let base = format!("policies_{w}_oracle_bytes");
        let mut f = count_figure(
            &name,
            &[best.link_bytes as f64],
            Some((&base, &[oracle])),
            "bytes",
            true,
        );
        f.note = Some(format!("policy: {}", best.policy));
        out.push(f);
        out.push(count_figure(&base, &[oracle], None, "bytes", true));
        if w == "pingpong" {
            let uvm = runs.iter().find(|r| r.policy == "uvm").expect("uvm runs");
            let base = "policies_pingpong_uvm_link_bytes";
            let mut f = count_figure(
                "policies_pingpong_best_vs_uvm_link_bytes",
                &[best.link_bytes as f64],
                Some((base, &[uvm.link_bytes as f64])),
                "bytes",
                true,
            );
            f.note = Some(format!("policy: {}", best.policy));
            out.push(f);
            out.push(count_figure(
                base,
                &[uvm.link_bytes as f64],
                None,
                "bytes",
                true,
            ));
        }
        if w == "oversubscribed" {
            let fastest = runs
                .iter()
                .min_by(|a, b| a.modelled_device_s.total_cmp(&b.modelled_device_s))
                .expect("at least one policy");
            let base = "policies_oversubscribed_oracle_device_ms";
            let oracle_ms = [fastest.oracle_device_s * 1e3];
            let mut f = count_figure(
                "policies_oversubscribed_best_device_ms",
                &[fastest.modelled_device_s * 1e3],
                Some((base, &oracle_ms)),
                "ms",
                true,
            );
            f.note = Some(format!("policy: {}", fastest.policy));
            out.push(f);
            out.push(count_figure(base, &oracle_ms, None, "ms", true));
        }
    }
    Ok(())
}

/// Pushes a count (taken in each of the repetitions given) against its baseline's, and the
/// baseline as its own result ([`count_figure`]).
fn push_counts(out: &mut Vec<BenchResult>, fig: (&str, &[f64]), base: (&str, &[f64]), unit: &str) {
    out.push(count_figure(fig.0, fig.1, Some(base), unit, true));
    out.push(count_figure(base.0, base.1, None, unit, true));
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
            let t = Instant::now();
            let v = self
                .dst
                .load_u32(p * PAGE_SIZE)
                .map_err(os("load bench mapping"))?;
            samples.push(micros(t));
            std::hint::black_box(v);
        }
        Ok(())
    }
}

/// Fault-back time through hetmem (`h`) and through the bare in-thread userfaultfd (`b`),
/// repeated until stable: each repetition's figure is the median of its timed faults.
fn fault_back(space: &Space, sz: &Sizes, busy: bool) -> Result<Samples> {
    let n = sz.fault_pages;
    let len = n * PAGE_SIZE;
    let dev = SoftDevice::private(len + LARGE_PAGE_SIZE)?;
    let mirror = dev.mirror(space)?;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    for p in 0..n {
        space.store_u32(a.add(p * PAGE_SIZE), p as u32)?;
    }
    let bare = BareFault::new(len, space.user_mode_only())?;
    let sibling = if busy {
        Some(BusySibling::start()?)
    } else {
        None
    };
    let (mut h, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let r = repeat_until_stable(sz.reps.0, sz.reps.1, || {
        h.clear();
        b.clear();
        bare.sweep(&mut b)?;
        hetmem_fault_sweep(&mirror, a, n, &mut h)?;
        Ok((median(&mut h), median(&mut b)))
    });
    drop(sibling);
    space.unmap(a, len)?;
    r
}

/// Migrates `n` pages at `a` to the device, then times a first load of each (one fault-back each).
fn hetmem_fault_sweep(
    m: &DeviceMirror,
    a: VirtAddr,
    n: usize,
    samples: &mut Vec<f64>,
) -> Result<()> {
    let out = m.migrate_range_to_device(a, n * PAGE_SIZE)?;
    if out.cpages != n as u64 {
        return Err(Error::Invalid(
            "bench: not every page migrated to the device",
        ));
    }
    let probe = m.space().probe(a, n * PAGE_SIZE)?;
    for p in 0..n {
        let addr = a.add(p * PAGE_SIZE);
        let t = Instant::now();
        let v = probe.load_u32(addr)?;
        samples.push(micros(t));
        std::hint::black_box(v);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// First touch
// ---------------------------------------------------------------------------------------------

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

/// One store per page in `order` (`store(p)` stores to page `p`); mean µs per page.
fn store_sweep(order: &[usize], store: impl Fn(usize) -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    for &p in order {
        store(p)?;
    }
    Ok(micros(t) / order.len() as f64)
}

fn hetmem_touch(space: &Space, len: usize, order: &[usize], large: bool) -> Result<f64> {
    let opts = MapOptions {
        large,
        ..MapOptions::default()
    };
    let a = space.map_anon_with(len, opts)?;
    let probe = space.probe(a, len)?;
    let us = store_sweep(order, |p| probe.store_u32(a.add(p * PAGE_SIZE), p as u32))?;
    space.unmap(a, len)?;
    Ok(us)
}

/// Mean first-touch time per page, sequential (`seq_`) and random (`rnd_`), repeated until
/// stable: hetmem (`h`), the kernel on base pages (`k`) and, where transparent huge pages are
/// available, with `MADV_HUGEPAGE` (`kh`).
fn first_touch(space: &Space, sz: &Sizes) -> Result<Samples> {
    let len = sz.touch_bytes;
    let n = len / PAGE_SIZE;
    let seq: Vec<usize> = (0..n).collect();
    let rnd = permutation(n);
    // Kernel baseline: plain anonymous memory, faulted in and dropped once so that the VM has
    // backed it; every sweep then drops the pages first.
    let k = Region::new(len, PAGE_SIZE, Prot::ReadWrite).map_err(os("kernel baseline mapping"))?;
    k.populate(0, len).map_err(os("populate kernel baseline"))?;
    // The kernel as a tuned user would have it: the same with MADV_HUGEPAGE (2 MiB aligned),
    // where the system offers transparent huge pages.
    let kh = if thp_available() {
        let kh = Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite)
            .map_err(os("kernel huge page baseline mapping"))?;
        kh.advise_hugepage()
            .map_err(os("MADV_HUGEPAGE the kernel baseline"))?;
        kh.populate(0, len)
            .map_err(os("populate kernel huge page baseline"))?;
        Some(kh)
    } else {
        None
    };
    let sweep = |r: &Region, order: &[usize]| -> Result<f64> {
        r.discard(0, len).map_err(os("discard kernel baseline"))?;
        store_sweep(order, |p| {
            r.store_u32(p * PAGE_SIZE, p as u32)
                .map_err(os("store to kernel baseline"))
        })
    };
    // Each hetmem figure against each kernel variant that may be its baseline (the faster).
    let mut watch = vec![
        ("seq_h", Some("seq_k")),
        ("rnd_h", Some("rnd_k")),
        ("rnd_hl", Some("rnd_k")),
    ];
    if kh.is_some() {
        watch.extend([
            ("seq_h", Some("seq_kh")),
            ("rnd_h", Some("rnd_kh")),
            ("rnd_hl", Some("rnd_kh")),
        ]);
    }
    // Hetmem sweeps a fresh mapping each time (unmapped after).
    let mut r = Repeat::new(sz.reps.0, sz.reps.1, &watch);
    while r.again()? {
        r.put("seq_k", sweep(&k, &seq)?);
        if let Some(kh) = &kh {
            r.put("seq_kh", sweep(kh, &seq)?);
        }
        r.put("seq_h", hetmem_touch(space, len, &seq, false)?);
        r.put("rnd_k", sweep(&k, &rnd)?);
        if let Some(kh) = &kh {
            r.put("rnd_kh", sweep(kh, &rnd)?);
        }
        r.put("rnd_h", hetmem_touch(space, len, &rnd, false)?);
        r.put("rnd_hl", hetmem_touch(space, len, &rnd, true)?);
    }
    Ok(r.done())
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

/// Round-trip bandwidth (GB/s of bytes moved, both directions) through hetmem (`h`) and through
/// the bare primitives (`b`), repeated until stable (`reps`: at least, at most).
fn migrate(space: &Space, len: usize, large: bool, reps: (usize, usize)) -> Result<Samples> {
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
        space.store_u32(a.add(p * PAGE_SIZE), p as u32)?;
    }
    let chunk = if large { LARGE_PAGE_SIZE } else { PAGE_SIZE };
    let prim = Primitive::new(len, chunk, space.user_mode_only())?;
    let gbps = |t: Instant| (2 * len) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let mut r = Repeat::new(reps.0, reps.1, &[("h", Some("b"))]);
    while r.again()? {
        let t = Instant::now();
        prim.to_device()?;
        prim.back()?;
        let p = gbps(t);
        let t = Instant::now();
        let out = mirror.migrate_range_to_device(a, len)?;
        let back = mirror.migrate_to_system(a, len)?;
        let h = gbps(t);
        if out.cpages != n as u64 || back.cpages != n as u64 {
            return Err(Error::Invalid("bench: not every page migrated"));
        }
        r.put("h", h);
        r.put("b", p);
    }
    space.unmap(a, len)?;
    Ok(r.done())
}

/// CPU streaming reads (a copy out of managed memory) of `len` bytes resident in
/// device-coherent memory (`h`), and of the same bytes in system memory (`b`); GB/s, repeated
/// until stable (`reps`: at least, at most).
fn cpu_read_coherent(space: &Space, len: usize, reps: (usize, usize)) -> Result<Samples> {
    let dev = SoftDevice::new(DeviceConfig {
        kind: MemoryKind::Coherent,
        capacity: len,
    })?;
    let m = dev.mirror(space)?;
    let sys_a = space.map_anon(len, Prot::ReadWrite)?;
    let coh_a = space.map_anon(len, Prot::ReadWrite)?;
    let fill: Vec<u8> = (0..len).map(|i| i as u8).collect();
    space.cpu_write(sys_a, &fill)?;
    space.cpu_write(coh_a, &fill)?;
    m.migrate_range_to_device(coh_a, len)?;
    let mut buf = vec![0u8; len];
    let mut r = Repeat::new(reps.0, reps.1, &[("h", Some("b"))]);
    while r.again()? {
        let t = Instant::now();
        space.cpu_read(sys_a, &mut buf)?;
        let s = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        space.cpu_read(coh_a, &mut buf)?;
        let c = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        r.put("b", s);
        r.put("h", c);
    }
    if buf != fill {
        return Err(Error::Invalid("bench: coherent read returned wrong data"));
    }
    drop(m);
    space.unmap(sys_a, len)?;
    space.unmap(coh_a, len)?;
    Ok(r.done())
}

/// A workload alternating device and CPU phases over `len` bytes for `rounds` rounds; returns
/// the bytes hetmem migrated (both directions).
fn pingpong(space: &Space, kind: MemoryKind, len: usize, rounds: usize) -> Result<f64> {
    let dev = SoftDevice::new(DeviceConfig {
        kind,
        capacity: len,
    })?;
    let m = dev.mirror(space)?;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    let fill: Vec<u8> = (0..len).map(|i| (i / PAGE_SIZE) as u8).collect();
    space.cpu_write(a, &fill)?;
    let before = space.stats();
    let mut buf = vec![0u8; len];
    for _ in 0..rounds {
        // Device phase: the runtime prefetches the range to the device, which reads it all.
        m.migrate_range_to_device(a, len)?;
        m.read(a, len, &mut buf)?;
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

/// Plain memory copies of `len` bytes (`memcpy`), GB/s, repeated until stable (`reps`: at
/// least, at most).
fn memcpy_gbps(len: usize, reps: (usize, usize)) -> Result<Samples> {
    let s = Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("memcpy source"))?;
    let d = Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite).map_err(os("memcpy destination"))?;
    s.populate(0, len).map_err(os("populate"))?;
    d.populate(0, len).map_err(os("populate"))?;
    let mut r = Repeat::new(reps.0, reps.1, &[("memcpy", None)]);
    while r.again()? {
        let t = Instant::now();
        s.copy_to(0, &d, 0, len).map_err(os("memcpy"))?;
        let g = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        r.put("memcpy", g);
    }
    Ok(r.done())
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
        // Inside the live mapping made above (read-only: nothing writes it); faults are served
        // by hetmem in this thread. A plain memcpy, as the kernel side's.
        sys::cpu_read_raw(a.get() + off, buf);
        Ok(())
    });
    space.unmap(a, len)?;
    r
}

/// The same sweep over a fresh kernel mmap (shared, read-only) of a fresh open of the file,
/// advised for `access` (`madvise`, right after `mmap`): timed from before `mmap` to the end of
/// the sweep (`munmap` is not timed).
fn kernel_file_sweep(f: &TempFile, len: usize, how: &Sweep<'_>, access: FileAccess) -> Result<f64> {
    let file = f.open()?;
    let mut buf = vec![0u8; FILE_CHUNK];
    let t = Instant::now();
    let m = sys::map_file_readonly(&file, len).map_err(os("mmap the bench file"))?;
    if access != FileAccess::Normal {
        m.advise(access).map_err(os("madvise the bench mmap"))?;
    }
    file_sweep(len, how, &mut buf, t, |off, buf| {
        m.read(off, buf).map_err(os("read the bench mmap"))
    })
}

/// Bytes this process has read from storage so far (`read_bytes` of `/proc/self/io`: reads that
/// reached the block layer, by every thread of the process), if the kernel reports it.
fn storage_read_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// Runs `f`; also returns the bytes the process read from storage meanwhile, if known.
fn counting_reads<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Option<f64>)> {
    let before = storage_read_bytes();
    let v = f()?;
    let after = storage_read_bytes();
    Ok((
        v,
        before.zip(after).map(|(b, a)| a.saturating_sub(b) as f64),
    ))
}

/// The `read_ahead_kb` of the block device that holds `path` (or of the whole disk, for a
/// partition), if found.
fn read_ahead_kb(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let sys = format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    ["queue/read_ahead_kb", "../queue/read_ahead_kb"]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{sys}/{q}")).ok())
        .and_then(|s| s.trim().parse().ok())
}

impl TempFile {
    /// Bytes of the first `len` bytes of the file in the kernel's page cache (`mincore` on a
    /// fresh read-only mapping, which itself reads nothing).
    fn kernel_resident_bytes(&self, len: usize) -> Result<usize> {
        let file = self.open()?;
        let m = sys::map_file_readonly(&file, len).map_err(os("mmap the bench file"))?;
        let pages = m.resident_pages().map_err(os("mincore the bench mmap"))?;
        Ok(pages * PAGE_SIZE)
    }

    /// Reads the whole file with `read` (untimed), so that the kernel's page cache holds it.
    fn warm_kernel_cache(&self) -> Result<()> {
        use std::io::Read;
        let mut f = self.open()?;
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf).map_err(os("read the bench file"))? > 0 {}
        Ok(())
    }
}

/// The file-mapping figures: the cold and the warm repetitions (see [`file_reads`] for the
/// names), each group repeated until stable, and the read-ahead setting of the file's device.
struct FileFigures {
    cold: Samples,
    warm: Samples,
    read_ahead_kb: Option<u64>,
}

/// Sequential and random reads of a file through fresh hetmem mappings and through fresh kernel
/// mmaps: cold (neither page cache holds the file; the kernel as a tuned user would map it, and
/// with its default read-around), warm (both hold all of it), and warm in the kernel's page cache
/// only (a fresh hetmem cache fills from it); bytes read from storage by each cold sweep; and the
/// memory both caches hold after a cold sequential read.
fn file_reads(space: &Space, sz: &Sizes) -> Result<FileFigures> {
    let len = sz.file_bytes;
    let tf = TempFile::new(len)?;
    let cfg = CacheConfig {
        budget: len + LARGE_PAGE_SIZE,
        ..CacheConfig::default()
    };
    // Random pages: one per block, at a pseudo-random page of the block, blocks in a random
    // order; far enough apart that no sample lies in the fault-around or read-around window of
    // another (hetmem: 64 KiB; the kernel: up to 128 KiB centred on the fault, with MADV_RANDOM
    // none; its default read-around on a device with a large `read_ahead_kb` is wider: that is
    // why the baseline is MADV_RANDOM).
    let per_block = sz.file_rand_block / PAGE_SIZE;
    let pages: Vec<usize> = permutation(len / sz.file_rand_block)
        .into_iter()
        .map(|b| b * per_block + (b.wrapping_mul(0x9E37_79B9) >> 7) % per_block)
        .collect();
    let rand = Sweep::Rand(&pages);
    let resident = |cached: usize| -> Result<f64> {
        Ok((cached + tf.kernel_resident_bytes(len)?) as f64 / len as f64)
    };

    // Cold: the kernel's page cache dropped before each sweep, and a fresh hetmem cache. Each
    // returns the figure, the bytes read from storage, and the bytes both caches hold after the
    // sweep per byte of the file.
    let hetmem_cold = |how: &Sweep<'_>, access: Access| -> Result<(f64, Option<f64>, f64)> {
        tf.drop_kernel_cache()?;
        let ((v, cache), io) = counting_reads(|| {
            let cache = FileCache::open(&tf.path, false, cfg)?;
            cache.set_access(access);
            let v = hetmem_file_sweep(space, &cache.handle(), len, how)?;
            Ok((v, cache))
        })?;
        Ok((v, io, resident(cache.cached_bytes())?))
    };
    let kernel_cold = |how: &Sweep<'_>, access| -> Result<(f64, Option<f64>, f64)> {
        tf.drop_kernel_cache()?;
        let (v, io) = counting_reads(|| kernel_file_sweep(&tf, len, how, access))?;
        Ok((v, io, resident(0)?))
    };
    // Names: `seq`/`rand`, then `h` (hetmem) or `k` (the kernel) with its advice; the bytes read
    // from storage under `io_` + name, the memory held after the sweep under `res_` + name.
    // Stable: hetmem against each kernel variant that may be its baseline.
    let mut cold = Repeat::new(
        sz.file_reps.0,
        sz.file_reps.1,
        &[
            ("seq_h", Some("seq_k_normal")),
            ("seq_h", Some("seq_k_sequential")),
            ("rand_h", Some("rand_k_random")),
            ("rand_h_normal", Some("rand_k_random")),
        ],
    );
    while cold.again()? {
        let mut put = |name: &str, r: (f64, Option<f64>, f64)| {
            cold.put(name, r.0);
            cold.put_io(name, r.1);
            cold.put(&format!("res_{name}"), r.2);
        };
        put(
            "seq_k_normal",
            kernel_cold(&Sweep::Seq, FileAccess::Normal)?,
        );
        put(
            "seq_k_sequential",
            kernel_cold(&Sweep::Seq, FileAccess::Sequential)?,
        );
        put("seq_h", hetmem_cold(&Sweep::Seq, Access::Normal)?);
        put("rand_k_random", kernel_cold(&rand, FileAccess::Random)?);
        put("rand_k_normal", kernel_cold(&rand, FileAccess::Normal)?);
        put("rand_h", hetmem_cold(&rand, Access::Random)?);
        put("rand_h_normal", hetmem_cold(&rand, Access::Normal)?);
    }

    // Warm: one hetmem cache filled through `read_at` (which also fills the kernel's page cache);
    // every sweep maps the file afresh, so its first access to each page still faults. Warm in
    // the kernel's cache only: a fresh hetmem cache each time, its fill reading from the kernel's
    // page cache (made to hold the whole file first, untimed).
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
    let mut warm = Repeat::new(
        sz.file_reps.0,
        sz.file_reps.1,
        &[
            ("seq_warm_h", Some("seq_warm_k")),
            ("seq_warm_kernel_cache_h", Some("seq_warm_k")),
            ("rand_warm_h", Some("rand_warm_k")),
        ],
    );
    while warm.again()? {
        tf.warm_kernel_cache()?;
        let ks = kernel_file_sweep(&tf, len, &Sweep::Seq, FileAccess::Normal)?;
        let hs = hetmem_file_sweep(space, &h, len, &Sweep::Seq)?;
        tf.warm_kernel_cache()?;
        let (hk, hk_io) = counting_reads(|| {
            let fresh = FileCache::open(&tf.path, false, cfg)?;
            hetmem_file_sweep(space, &fresh.handle(), len, &Sweep::Seq)
        })?;
        // The fresh cache's fill dropped the kernel's copy (held once): warm it again, or the
        // kernel's warm random figure would be a cold one with its default read-around.
        tf.warm_kernel_cache()?;
        let kr = kernel_file_sweep(&tf, len, &rand, FileAccess::Normal)?;
        let hr = hetmem_file_sweep(space, &h, len, &rand)?;
        warm.put("seq_warm_k", ks);
        warm.put("seq_warm_h", hs);
        warm.put("seq_warm_kernel_cache_h", hk);
        warm.put_io("seq_warm_kernel_cache_h", hk_io);
        warm.put("rand_warm_k", kr);
        warm.put("rand_warm_h", hr);
    }
    Ok(FileFigures {
        cold: cold.done(),
        warm: warm.done(),
        read_ahead_kb: read_ahead_kb(&tf.path),
    })
}

// ---------------------------------------------------------------------------------------------
// Repetitions: until stable
// ---------------------------------------------------------------------------------------------

/// The median of each watched ratio (or value) may move by at most this much (relative) over the
/// last [`STABLE_WINDOW`] repetitions for the repetitions to count as stable.
const STABLE_TOLERANCE: f64 = 0.02;
const STABLE_WINDOW: usize = 3;

/// The fewest timed repetitions behind a timed figure, in every mode and group: the stability
/// rule looks back over 3 repetitions, so it needs one more.
pub const MIN_REPETITIONS: usize = STABLE_WINDOW + 1;

/// Repeats one group of measurements until stable, as a loop:
/// `while r.again()? { ...; r.put("name", v); }`. The first pass is a warm-up (discarded); each
/// pass measures the same names in the same order, hetmem and its baselines alternating within
/// it (so that drift in the machine hits both alike). The timed passes stop after at least `min`
/// and at most `max` of them, as soon as every watched figure is stable: the median of its
/// per-repetition ratios to its baseline (or of its values, for a figure without one) moved by
/// at most [`STABLE_TOLERANCE`] over the last [`STABLE_WINDOW`] repetitions.
struct Repeat {
    min: usize,
    max: usize,
    /// (figure, its baseline) by name, as given.
    watch: Vec<(String, Option<String>)>,
    /// The same as columns (known once the warm-up has named the measurements).
    watched: Vec<(usize, Option<usize>)>,
    names: Vec<String>,
    rows: Vec<Vec<f64>>,
    /// The measurements of the pass under way.
    pass: Vec<(String, f64)>,
    passes: usize,
    stable: bool,
}

impl Repeat {
    /// `watch`: the figures that must be stable, each with its baseline (measured in the same
    /// pass) or alone.
    fn new(min: usize, max: usize, watch: &[(&str, Option<&str>)]) -> Repeat {
        let min = min.max(MIN_REPETITIONS);
        Repeat {
            min,
            max: max.max(min),
            watch: watch
                .iter()
                .map(|(f, b)| (f.to_string(), b.map(str::to_string)))
                .collect(),
            watched: Vec::new(),
            names: Vec::new(),
            rows: Vec::new(),
            pass: Vec::new(),
            passes: 0,
            stable: false,
        }
    }

    /// Records measurement `name` of this pass.
    fn put(&mut self, name: &str, v: f64) {
        self.pass.push((name.to_string(), v));
    }

    /// Records the bytes read from storage by `name`'s sweep (as `io_` + `name`), when known.
    fn put_io(&mut self, name: &str, v: Option<f64>) {
        if let Some(v) = v {
            self.put(&format!("io_{name}"), v);
        }
    }

    /// Ends the pass under way (if any); whether to run another.
    fn again(&mut self) -> Result<bool> {
        let pass = std::mem::take(&mut self.pass);
        self.passes += 1;
        match self.passes {
            // The warm-up starts.
            1 => return Ok(true),
            // The warm-up is over: it named the measurements.
            2 => {
                self.names = pass.into_iter().map(|(n, _)| n).collect();
                let col = |n: &str| {
                    self.names.iter().position(|x| x == n).ok_or(Error::Invalid(
                        "bench: a figure watched for stability was not measured",
                    ))
                };
                self.watched = self
                    .watch
                    .iter()
                    .map(|(f, b)| Ok((col(f)?, b.as_deref().map(col).transpose()?)))
                    .collect::<Result<_>>()?;
                return Ok(true);
            }
            _ => {
                if pass.len() != self.names.len()
                    || pass.iter().zip(&self.names).any(|((n, _), m)| n != m)
                {
                    return Err(Error::Invalid(
                        "bench: a repetition measured other figures than the warm-up",
                    ));
                }
                self.rows.push(pass.into_iter().map(|(_, v)| v).collect());
            }
        }
        let k = self.rows.len();
        self.stable = k >= self.min && self.watched.iter().all(|&w| self.settled(w));
        Ok(!self.stable && k < self.max)
    }

    /// Whether the median of `w`'s per-repetition ratios (or values) moved by at most
    /// [`STABLE_TOLERANCE`] over the last [`STABLE_WINDOW`] repetitions.
    fn settled(&self, (f, b): (usize, Option<usize>)) -> bool {
        let v: Vec<f64> = self
            .rows
            .iter()
            .map(|r| b.map_or(r[f], |b| r[f] / r[b]))
            .collect();
        let now = median(&mut v.clone());
        let before = median(&mut v[..v.len() - STABLE_WINDOW].to_vec());
        (now - before).abs() <= STABLE_TOLERANCE * now.abs()
    }

    /// The timed repetitions (once [`Repeat::again`] said no more).
    fn done(self) -> Samples {
        Samples {
            names: self.names,
            rows: self.rows,
            stable: self.stable,
        }
    }
}

/// The timed repetitions of one group of measurements ([`Repeat`]): a row per repetition, a
/// column per measurement. A figure is the median of its column.
struct Samples {
    names: Vec<String>,
    rows: Vec<Vec<f64>>,
    /// Whether the repetitions stopped because the watched figures were stable (rather than
    /// at the most allowed).
    stable: bool,
}

impl Samples {
    /// The repetitions of measurement `name` (none if it was not measured).
    fn col(&self, name: &str) -> Vec<f64> {
        match self.names.iter().position(|n| n == name) {
            Some(i) => self.rows.iter().map(|r| r[i]).collect(),
            None => Vec::new(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// The median of `name`'s repetitions (NaN if it was not measured).
    fn median(&self, name: &str) -> f64 {
        median(&mut self.col(name))
    }

    /// The median bytes read from storage by `name`'s sweeps, when known.
    fn io(&self, name: &str) -> Option<f64> {
        let name = format!("io_{name}");
        self.has(&name).then(|| self.median(&name))
    }

    /// A timed figure `name` of measurement `sample`, with its spread; against `base` (the
    /// baseline's name and measurement), with the range of the per-repetition ratios.
    fn timed(
        &self,
        name: &str,
        sample: &str,
        unit: &str,
        base: Option<(&str, &str)>,
    ) -> BenchResult {
        self.figure(spread_figure, name, sample, unit, base)
    }

    /// A count `name` of measurement `sample` (see [`count_figure`]).
    fn count(
        &self,
        name: &str,
        sample: &str,
        unit: &str,
        base: Option<(&str, &str)>,
    ) -> BenchResult {
        self.figure(count_figure, name, sample, unit, base)
    }

    /// Figure `name` of measurement `sample` (and `base`'s), made by `make` from the columns.
    fn figure(
        &self,
        make: MakeFigure,
        name: &str,
        sample: &str,
        unit: &str,
        base: Option<(&str, &str)>,
    ) -> BenchResult {
        let b = base.map(|(n, s)| (n, self.col(s)));
        make(
            name,
            &self.col(sample),
            b.as_ref().map(|(n, v)| (*n, v.as_slice())),
            unit,
            self.stable,
        )
    }
}

/// How a figure is made from its samples ([`spread_figure`], [`count_figure`]): name, values,
/// the baseline's name and values, unit, whether the repetitions became stable.
type MakeFigure = fn(&str, &[f64], Option<(&str, &[f64])>, &str, bool) -> BenchResult;

/// Runs `rep` (one repetition: a (hetmem, baseline) pair, measured one after the other) until
/// stable ([`Repeat`]); the samples are `h` (hetmem) and `b` (the baseline).
fn repeat_until_stable(
    min: usize,
    max: usize,
    mut rep: impl FnMut() -> Result<(f64, f64)>,
) -> Result<Samples> {
    let mut r = Repeat::new(min, max, &[("h", Some("b"))]);
    while r.again()? {
        let (h, b) = rep()?;
        r.put("h", h);
        r.put("b", b);
    }
    Ok(r.done())
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Pushes a figure (the median of `s`'s `h`) and its baseline (the median of its `b`) with
/// their spreads; the figure's spread also gives the range of the per-repetition ratios.
fn push_reps(
    out: &mut Vec<BenchResult>,
    names: (&str, &str),
    unit: &str,
    s: &Samples,
    note: Option<String>,
) {
    let mut f = s.timed(names.0, "h", unit, Some((names.1, "b")));
    f.note = note;
    out.push(f);
    out.push(s.timed(names.1, "b", unit, None));
}

/// A figure that is the median of repetitions `v`, with their spread (`stable`: whether the
/// repetitions stopped because they were stable); against `base` (the baseline's name and its
/// repetitions, measured in the same repetitions as `v`), with the range of the per-repetition
/// ratios.
fn spread_figure(
    name: &str,
    v: &[f64],
    base: Option<(&str, &[f64])>,
    unit: &str,
    stable: bool,
) -> BenchResult {
    let (lo, hi) = min_max(v);
    let ratios = base.map(|(_, b)| {
        let r: Vec<f64> = v.iter().zip(b).map(|(h, b)| h / b).collect();
        min_max(&r)
    });
    let mut f = figure(
        name,
        median(&mut v.to_vec()),
        unit,
        base.map(|(n, b)| (n, median(&mut b.to_vec()))),
    );
    f.spread = Some(Spread {
        reps: v.len(),
        min: lo,
        max: hi,
        ratio_min: ratios.map(|r| r.0),
        ratio_max: ratios.map(|r| r.1),
        stable,
    });
    f
}

/// A count (bytes, faults, a model's output: not a timing) taken in each of repetitions `v`
/// (against `base`, as [`spread_figure`]): exact where it came out the same in every repetition
/// (and so did the baseline's), else the median with its spread.
fn count_figure(
    name: &str,
    v: &[f64],
    base: Option<(&str, &[f64])>,
    unit: &str,
    stable: bool,
) -> BenchResult {
    let same = |v: &[f64]| !v.is_empty() && v.iter().all(|x| *x == v[0]);
    if same(v) && base.is_none_or(|(_, b)| same(b)) {
        let mut f = figure(name, v[0], unit, base.map(|(n, b)| (n, b[0])));
        f.exact = true;
        f
    } else {
        spread_figure(name, v, base, unit, stable)
    }
}

// ---------------------------------------------------------------------------------------------
// Threads: two threads on disjoint halves; faults while another thread migrates
// ---------------------------------------------------------------------------------------------

/// Runs `work(lo, hi)` over pages `0..n` split into `threads` disjoint contiguous parts, one
/// fresh thread each, started together (a [`Barrier`](std::sync::Barrier)); returns the seconds
/// from the first thread's start to the last one's end.
fn timed_threads(threads: usize, n: usize, work: &(dyn Fn(usize, usize) + Sync)) -> Result<f64> {
    let barrier = std::sync::Barrier::new(threads);
    let spans = std::thread::scope(|s| -> Result<Vec<(Instant, Instant)>> {
        let mut hs = Vec::with_capacity(threads);
        for i in 0..threads {
            let barrier = &barrier;
            let (lo, hi) = (i * n / threads, (i + 1) * n / threads);
            let h = std::thread::Builder::new()
                .name(format!("bench-worker-{i}"))
                .spawn_scoped(s, move || {
                    barrier.wait();
                    let t = Instant::now();
                    work(lo, hi);
                    (t, Instant::now())
                })
                .map_err(os("spawn bench worker"))?;
            hs.push(h);
        }
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| Error::Invalid("bench: a worker thread panicked"))
            })
            .collect()
    })?;
    let start = spans.iter().map(|s| s.0).min().expect("one thread or more");
    let end = spans.iter().map(|s| s.1).max().expect("one thread or more");
    Ok(end.duration_since(start).as_secs_f64())
}

/// One repetition of a 2-thread speedup: `prepare` (untimed; gives what `touch` needs), the
/// whole range by one thread, `finish` (untimed); the same again with two threads on disjoint
/// halves. `touch(t, p)` touches page `p`. Returns time(1 thread) / time(2 threads).
fn speedup_2threads<T: Sync>(
    n: usize,
    prepare: &mut dyn FnMut() -> Result<T>,
    finish: &mut dyn FnMut(T) -> Result<()>,
    touch: &(dyn Fn(&T, usize) + Sync),
) -> Result<f64> {
    let mut time = |threads: usize| -> Result<f64> {
        let target = prepare()?;
        let t = timed_threads(threads, n, &|lo, hi| {
            for p in lo..hi {
                touch(&target, p);
            }
        });
        finish(target)?;
        t
    };
    let t1 = time(1)?;
    let t2 = time(2)?;
    Ok(t1 / t2)
}

/// A real load of page `p` of the mapping at `a` (one fault-back), through `probe`.
fn load_page(probe: &Probe, a: VirtAddr, p: usize) {
    let v = probe.load_u32(a.add(p * PAGE_SIZE));
    std::hint::black_box(v.expect("a page of the probed mapping"));
}

/// A real store to page `p` of the mapping at `a` (a first touch), through `probe`.
fn store_page(probe: &Probe, a: VirtAddr, p: usize) {
    let r = probe.store_u32(a.add(p * PAGE_SIZE), p as u32);
    r.expect("a page of the probed mapping");
}

/// A real load of page `p` of a bench region (one in-thread userfaultfd fault).
fn load_region_page(r: &Region, p: usize) {
    let v = r.load_u32(p * PAGE_SIZE);
    std::hint::black_box(v.expect("a page of the bench region"));
}

/// A real store to page `p` of a bench region (a first touch of the kernel's).
fn store_region_page(r: &Region, p: usize) {
    let v = r.store_u32(p * PAGE_SIZE, p as u32);
    v.expect("a page of the bench region");
}

/// Speedup of 2 threads over 1 faulting device-private pages back (disjoint halves of one
/// mapping), and the same for the bare in-thread userfaultfd (disjoint halves of its range).
fn fault_back_2threads(space: &Space, sz: &Sizes) -> Result<Samples> {
    let n = sz.thread_fault_pages;
    let len = n * PAGE_SIZE;
    let dev = SoftDevice::private(len + LARGE_PAGE_SIZE)?;
    let mirror = dev.mirror(space)?;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    let probe = space.probe(a, len)?;
    for p in 0..n {
        store_page(&probe, a, p);
    }
    let bare = BareFault::new(len, space.user_mode_only())?;
    let dst = &bare.dst;
    let r = repeat_until_stable(sz.thread_min_reps, sz.thread_max_reps, || {
        let b = speedup_2threads(
            n,
            &mut || dst.discard(0, len).map_err(os("discard bench mapping")),
            &mut |()| Ok(()),
            &|(), p| load_region_page(dst, p),
        )?;
        let h = speedup_2threads(
            n,
            &mut || {
                let out = mirror.migrate_range_to_device(a, n * PAGE_SIZE)?;
                if out.cpages != n as u64 {
                    return Err(Error::Invalid(
                        "bench: not every page migrated to the device",
                    ));
                }
                Ok(())
            },
            &mut |()| Ok(()),
            &|(), p| load_page(&probe, a, p),
        )?;
        Ok((h, b))
    });
    space.unmap(a, len)?;
    r
}

/// The system's transparent huge page setting (the bracketed word of
/// /sys/kernel/mm/transparent_hugepage/enabled), or "unknown".
fn thp_setting() -> String {
    sys::thp_setting("enabled").unwrap_or_else(|| "unknown".into())
}

/// Whether anonymous memory can get 2 MiB transparent huge pages with `MADV_HUGEPAGE`.
fn thp_available() -> bool {
    sys::anon_huge_pages_offered()
}

/// Speedup of 2 threads over 1 first-touching a fresh hetmem mapping (disjoint halves), and the
/// same for the kernel's first touch of plain anonymous memory (already backed, as in
/// [`first_touch`]).
fn first_touch_2threads(space: &Space, sz: &Sizes) -> Result<Samples> {
    let len = sz.thread_touch_bytes;
    let n = len / PAGE_SIZE;
    // The kernel as a tuned user has it (as in [`first_touch`]): with `MADV_HUGEPAGE` where
    // transparent huge pages are offered, as hetmem's own first touch of whole units.
    let k = Region::new(len, LARGE_PAGE_SIZE, Prot::ReadWrite)
        .map_err(os("kernel baseline mapping"))?;
    if thp_available() {
        k.advise_hugepage()
            .map_err(os("MADV_HUGEPAGE the kernel baseline"))?;
    }
    k.populate(0, len).map_err(os("populate kernel baseline"))?;
    repeat_until_stable(sz.thread_min_reps, sz.thread_max_reps, || {
        let b = speedup_2threads(
            n,
            &mut || k.discard(0, len).map_err(os("discard kernel baseline")),
            &mut |()| Ok(()),
            &|(), p| store_region_page(&k, p),
        )?;
        let h = speedup_2threads(
            n,
            &mut || {
                let a = space.map_anon(len, Prot::ReadWrite)?;
                Ok((a, space.probe(a, len)?))
            },
            &mut |(a, _)| space.unmap(a, len),
            &|(a, probe), p| store_page(probe, *a, p),
        )?;
        Ok((h, b))
    })
}

/// CPU fault-backs per second (thousands) on mapping A of `ma`'s space — one thread loading
/// device-private pages one by one, each a fault that takes the space's lock — while another
/// thread migrates mapping B (2 MiB of 4 KiB pages: one `migrate_vma` each way) to the device
/// and back through `mb`, over and over. Both threads start together (a
/// [`Barrier`](std::sync::Barrier)); the faulting thread starts its clock once B's first round
/// trip is done (so that every timed fault has the migrations beside it) and stops at the end of
/// A or after `budget`, whichever comes first. Also returns B's round trips per second.
fn faults_during_migration(
    ma: &DeviceMirror,
    a: VirtAddr,
    n: usize,
    mb: &DeviceMirror,
    b: VirtAddr,
    budget: std::time::Duration,
) -> Result<(f64, f64)> {
    let nb = LARGE_PAGE_SIZE / PAGE_SIZE;
    let probe = ma.space().probe(a, n * PAGE_SIZE)?;
    let out = ma.migrate_range_to_device(a, n * PAGE_SIZE)?;
    if out.cpages != n as u64 {
        return Err(Error::Invalid(
            "bench: not every page migrated to the device",
        ));
    }
    // `stop`: the faulting thread is done (or was never started); `trips`: B's round trips so
    // far; `gone`: the migrating thread has returned (so nobody waits for its first trip).
    let (stop, trips, gone) = (
        AtomicBool::new(false),
        AtomicU64::new(0),
        AtomicBool::new(false),
    );
    let barrier = std::sync::Barrier::new(2);
    let migrate_b = || -> Result<f64> {
        barrier.wait();
        let t = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let to = mb.migrate_range_to_device(b, LARGE_PAGE_SIZE)?;
            let back = mb.migrate_to_system(b, LARGE_PAGE_SIZE)?;
            if to.cpages != nb as u64 || back.cpages != nb as u64 {
                return Err(Error::Invalid("bench: not every page of B migrated"));
            }
            trips.fetch_add(1, Ordering::Release);
        }
        Ok(trips.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64())
    };
    let fault_a = || -> f64 {
        barrier.wait();
        // Spin (no sleep) until B has gone round once.
        while trips.load(Ordering::Acquire) == 0 && !gone.load(Ordering::Acquire) {
            std::hint::spin_loop();
            std::thread::yield_now();
        }
        let t = Instant::now();
        let mut done = n;
        for p in 0..n {
            load_page(&probe, a, p);
            if t.elapsed() > budget {
                done = p + 1;
                break;
            }
        }
        let rate = done as f64 / t.elapsed().as_secs_f64() / 1e3;
        stop.store(true, Ordering::Relaxed);
        rate
    };
    std::thread::scope(|s| -> Result<(f64, f64)> {
        let migrator = std::thread::Builder::new()
            .name("bench-migrator".into())
            .spawn_scoped(s, || {
                let r = migrate_b();
                gone.store(true, Ordering::Release);
                r
            })
            .map_err(os("spawn bench migrator"))?;
        let faulter = match std::thread::Builder::new()
            .name("bench-faulter".into())
            .spawn_scoped(s, fault_a)
        {
            Ok(f) => f,
            Err(e) => {
                // The migrator waits at the barrier: let it through, and stop it.
                stop.store(true, Ordering::Relaxed);
                barrier.wait();
                return Err(Error::os("spawn bench faulter", e));
            }
        };
        let rate = faulter
            .join()
            .map_err(|_| Error::Invalid("bench: the faulting thread panicked"))?;
        let b_trips = migrator
            .join()
            .map_err(|_| Error::Invalid("bench: the migrating thread panicked"))??;
        Ok((rate, b_trips))
    })
}

/// [`faults_during_migration`] with B in the same space as A (same device mirror) and with B in
/// another space (a mirror of the same device there), alternately; the note gives B's round
/// trips per second in each case.
fn fault_during_migration(space: &Space, sz: &Sizes) -> Result<(Samples, String)> {
    let n = sz.thread_fault_pages;
    let len = n * PAGE_SIZE;
    let other = Space::with_config(SpaceConfig {
        size: 64 << 20,
        stash: 2 << 20,
        ..SpaceConfig::default()
    })?;
    let dev = SoftDevice::private(len + 4 * LARGE_PAGE_SIZE)?;
    let m_same = dev.mirror(space)?;
    let m_other = dev.mirror(&other)?;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    let b_same = space.map_anon(LARGE_PAGE_SIZE, Prot::ReadWrite)?;
    let b_other = other.map_anon(LARGE_PAGE_SIZE, Prot::ReadWrite)?;
    for p in 0..n {
        space.store_u32(a.add(p * PAGE_SIZE), p as u32)?;
    }
    for p in 0..LARGE_PAGE_SIZE / PAGE_SIZE {
        space.store_u32(b_same.add(p * PAGE_SIZE), p as u32)?;
        other.store_u32(b_other.add(p * PAGE_SIZE), p as u32)?;
    }
    let budget = sz.thread_fault_budget;
    let (mut trips_same, mut trips_other) = (Vec::new(), Vec::new());
    let r = repeat_until_stable(sz.thread_min_reps, sz.thread_max_reps, || {
        let (o, to) = faults_during_migration(&m_same, a, n, &m_other, b_other, budget)?;
        let (s, ts) = faults_during_migration(&m_same, a, n, &m_same, b_same, budget)?;
        trips_same.push(ts);
        trips_other.push(to);
        Ok((s, o))
    });
    space.unmap(a, len)?;
    space.unmap(b_same, LARGE_PAGE_SIZE)?;
    other.unmap(b_other, LARGE_PAGE_SIZE)?;
    let note = format!(
        "A: fault-back, one 4 KiB device-private page per load; B: 2 MiB of 4 KiB pages to the \
         device and back, repeatedly; B's round trips/s: same space {:.0}, other space {:.0}",
        median(&mut trips_same[1..].to_vec()),
        median(&mut trips_other[1..].to_vec())
    );
    Ok((r?, note))
}

// ---------------------------------------------------------------------------------------------
// A large file in alternating device and CPU phases
// ---------------------------------------------------------------------------------------------

/// The measurements of the `scale` group, each at the three sizes.
const SCALE_MEASURES: [&str; 4] = ["first_touch", "migrate", "fault_back", "kernel_first_touch"];

/// What the `scale` figures measured (sizes as run).
fn scale_note(sz: &Sizes) -> String {
    let gib = |b: usize| {
        if b >= 1 << 30 {
            format!("{} GiB", b >> 30)
        } else {
            format!("{} MiB", b >> 20)
        }
    };
    format!(
        "per page, {} pages spread evenly over a mapping of {} (baseline: {}; middle: {}) in a \
         space of 64 GiB, device of {}: a first touch (one store), a migration to the device \
         (one page per command), a fault-back (one load); the kernel's own first touch of the same \
         sample in plain anonymous memory of the same size (scale_kernel_first_touch_*) shows \
         what its page tables add; hetmem's cost per page should grow no more than that",
        sz.scale_pages,
        gib(sz.scale_bytes[2]),
        gib(sz.scale_bytes[0]),
        gib(sz.scale_bytes[1]),
        gib(sz.scale_device)
    )
}

/// The `scale` group: for each mapping size of [`Sizes::scale_bytes`], a sample of
/// [`Sizes::scale_pages`] pages spread evenly over a fresh anonymous mapping of that size is
/// first-touched (one store each), migrated to the device one page per command, and faulted back
/// (one load each); the measurements are the mean microseconds per page (`first_touch_K`,
/// `migrate_K`, `fault_back_K`, K the size's index). Only the sampled pages (and their
/// fault-around runs) are ever backed: the figures show how the per-page costs grow with the
/// size of the mapping (page entries, lookups), not the machine's memory.
fn scale(sz: &Sizes) -> Result<Samples> {
    let space = Space::with_config(SpaceConfig {
        size: 64 << 30,
        stash: 2 << 20,
        ..SpaceConfig::default()
    })?;
    let dev = SoftDevice::private(sz.scale_device)?;
    let m = dev.mirror(&space)?;
    let n = sz.scale_pages;
    let watch: Vec<(String, Option<String>)> = ["first_touch", "migrate", "fault_back"]
        .iter()
        .map(|w| (format!("{w}_2"), Some(format!("{w}_0"))))
        .collect();
    let watch_ref: Vec<(&str, Option<&str>)> = watch
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_deref()))
        .collect();
    let mut r = Repeat::new(sz.reps.0, sz.reps.1, &watch_ref);
    while r.again()? {
        let mut row = [[0f64; 3]; 4];
        for (k, &len) in sz.scale_bytes.iter().enumerate() {
            let a = space.map_anon(len, Prot::ReadWrite)?;
            let probe = space.probe(a, len)?;
            let stride = (len / n) & !(PAGE_SIZE - 1);
            let page = |i: usize| a.add(i * stride);
            let t = Instant::now();
            for i in 0..n {
                probe.store_u32(page(i), i as u32 + 1)?;
            }
            row[0][k] = micros(t) / n as f64;
            let t = Instant::now();
            for i in 0..n {
                m.migrate_range_to_device(page(i), PAGE_SIZE)?;
            }
            row[1][k] = micros(t) / n as f64;
            let t = Instant::now();
            for i in 0..n {
                if probe.load_u32(page(i))? != i as u32 + 1 {
                    return Err(Error::Invalid("bench: a sampled page lost its value"));
                }
            }
            row[2][k] = micros(t) / n as f64;
            space.unmap(a, len)?;
            // The kernel's own first touch of the same sample in plain anonymous memory of the
            // same size: how much of the growth is the kernel's (its page tables).
            let kr =
                Region::new(len, PAGE_SIZE, Prot::ReadWrite).map_err(os("scale kernel mapping"))?;
            let t = Instant::now();
            for i in 0..n {
                kr.store_u32(i * stride, i as u32 + 1)
                    .map_err(os("store to the scale kernel mapping"))?;
            }
            row[3][k] = micros(t) / n as f64;
        }
        for (what, at) in SCALE_MEASURES.iter().zip(&row) {
            for (k, v) in at.iter().enumerate() {
                r.put(&format!("{what}_{k}"), *v);
            }
        }
    }
    Ok(r.done())
}

/// Where the `largefile` workload keeps the file's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilePlacement {
    /// In system memory: the device mirrors them (reads them over the link).
    Mirror,
    /// Migrated into device-private memory before every device phase.
    Private,
    /// Placed in device-coherent memory once: the CPU uses them in place.
    Coherent,
    /// Read-only replicas in device-private memory, made before every device phase (only the
    /// pages without one are copied): the system copy stays, a CPU store drops its page's
    /// replica.
    Replica,
    /// Device-private memory, on demand: nothing is placed ahead; the space's policy is the
    /// UVM-like one ([`crate::policy::uvm::UvmPolicy`]), whose device faults migrate the pages
    /// (prefetching by density) and whose thrashing detection maps pages the CPU keeps pulling
    /// back remotely. Run by the demo (not one of the bench's placements).
    OnDemand,
    /// On demand under hetmem's own policy ([`crate::policy::adaptive::AdaptivePolicy`]):
    /// device reads make read-only replicas (a CPU store drops its page's), device writes
    /// migrate. Run by the demo.
    OnDemandAdaptive,
}

impl FilePlacement {
    /// Every placement, the baseline (`Mirror`) first.
    const ALL: [FilePlacement; 4] = [Self::Mirror, Self::Private, Self::Coherent, Self::Replica];

    fn name(self) -> &'static str {
        match self {
            Self::Mirror => "mirror",
            Self::Private => "private",
            Self::Coherent => "coherent",
            Self::Replica => "replica",
            Self::OnDemand | Self::OnDemandAdaptive => "on-demand",
        }
    }

    /// The space's placement policy during the run.
    fn policy(self) -> &'static str {
        match self {
            Self::OnDemand => "uvm",
            Self::OnDemandAdaptive => "adaptive",
            _ => "default",
        }
    }

    /// The link profile of this placement's device: its kind's default (PCIe 5 for a
    /// device-private device, NVLink-C2C for a coherent one).
    fn profile(self) -> LinkProfile {
        match self {
            Self::Coherent => LinkProfile::NVLINK_C2C,
            _ => LinkProfile::PCIE5,
        }
    }

    /// The profile the notes also cost this placement's traffic under: the other kind's.
    fn other_profile(self) -> LinkProfile {
        match self {
            Self::Coherent => LinkProfile::PCIE5,
            _ => LinkProfile::NVLINK_C2C,
        }
    }

    /// The device of this placement, its link model of [`Self::profile`].
    fn device(self, len: usize) -> Result<SoftDevice> {
        self.device_with(len, self.profile())
    }

    /// [`Self::device`] with the link model of `profile`.
    fn device_with(self, len: usize, profile: LinkProfile) -> Result<SoftDevice> {
        self.device_of(len, self.kind(), profile)
    }

    /// The kind of device memory this placement uses (the mirrored placement's device is
    /// device-private unless told otherwise: it never migrates).
    fn kind(self) -> MemoryKind {
        match self {
            Self::Coherent => MemoryKind::Coherent,
            _ => MemoryKind::Private,
        }
    }

    /// The device of this placement with memory of `kind` and the link model of `profile`.
    fn device_of(self, len: usize, kind: MemoryKind, profile: LinkProfile) -> Result<SoftDevice> {
        let capacity = match self {
            // It never migrates: a pool of one 2 MiB unit.
            Self::Mirror => LARGE_PAGE_SIZE,
            _ => len + LARGE_PAGE_SIZE,
        };
        SoftDevice::with_link(DeviceConfig { kind, capacity }, profile)
    }
}

/// The runs [`largefile_placements`] makes: the bench's placements, then on demand.
const DEMO_RUNS: [FilePlacement; PLACEMENTS + 2] = [
    FilePlacement::Mirror,
    FilePlacement::Private,
    FilePlacement::Coherent,
    FilePlacement::Replica,
    FilePlacement::OnDemand,
    FilePlacement::OnDemandAdaptive,
];

/// The runs [`largefile_placements`] makes for `device` (`None`: all of them): the placements
/// a device of that kind offers — mirrored (on a device of that kind), then device-private,
/// replicas and on demand for a private device, device-coherent for a coherent one.
fn demo_runs(device: Option<MemoryKind>) -> impl Iterator<Item = FilePlacement> {
    DEMO_RUNS.into_iter().filter(move |p| match (device, p) {
        (None, _) | (_, FilePlacement::Mirror) => true,
        (Some(k), FilePlacement::Coherent) => k == MemoryKind::Coherent,
        (Some(k), _) => k == MemoryKind::Private,
    })
}

/// How many runs [`largefile_placements`] makes for `device` (one per placement it offers, and
/// on demand for a device-private one).
pub fn demo_run_count(device: Option<MemoryKind>) -> usize {
    demo_runs(device).count()
}

/// The number of placements ([`FilePlacement::ALL`]).
const PLACEMENTS: usize = FilePlacement::ALL.len();

/// The CPU phase stores to one page in this many (1 %), at a different offset each round.
const LARGEFILE_STRIDE: usize = 100;

/// Bytes declared to the link model per CPU store to a device-coherent page: the cache line,
/// fetched for ownership over the link (one operation, so one link latency, per store).
const CACHE_LINE: u64 = 64;

/// The `largefile` file's contents as the workload wrote them: the first `u32` of page `p` is
/// `stores[p]` where that is non-zero, the file's original data ([`file_word`]) elsewhere.
struct FileModel {
    stores: Vec<u32>,
    /// The next value stored (never 0; every store writes a new one, so a lost store shows).
    next: u32,
}

impl FileModel {
    fn new(pages: usize) -> FileModel {
        FileModel {
            stores: vec![0; pages],
            next: 1,
        }
    }

    /// Records a store to page `p`; returns the value to store.
    fn store(&mut self, p: usize) -> u32 {
        let v = self.next;
        self.next = self.next.checked_add(1).unwrap_or(1);
        self.stores[p] = v;
        v
    }

    /// The first 8 bytes of page `p`.
    fn head(&self, p: usize) -> [u8; 8] {
        let mut w = file_word(p * PAGE_SIZE).to_ne_bytes();
        if self.stores[p] != 0 {
            w[..4].copy_from_slice(&self.stores[p].to_ne_bytes());
        }
        w
    }

    /// Whether `buf` (the whole file, as the device read it) holds the model's data at the
    /// start and the end of every page.
    fn check_pages(&self, buf: &[u8]) -> Result<()> {
        for (p, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
            let tail = file_word((p + 1) * PAGE_SIZE - 8).to_ne_bytes();
            if page[..8] != self.head(p) || page[PAGE_SIZE - 8..] != tail {
                return Err(Error::Invalid("bench: the device read wrong file data"));
            }
        }
        Ok(())
    }

    /// Whether the file (read back through the kernel after `fsync`) is exactly the model.
    fn check_file(&self, tf: &TempFile, len: usize) -> Result<()> {
        use std::io::Read;
        let mut f = tf.open()?;
        let mut got = vec![0u8; 1 << 20];
        let mut want = vec![0u8; 1 << 20];
        for base in (0..len).step_by(got.len()) {
            let n = got.len().min(len - base);
            f.read_exact(&mut got[..n])
                .map_err(os("read back the bench file"))?;
            for (i, w) in want[..n].chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&file_word(base + i * 8).to_ne_bytes());
            }
            for p in (base..base + n).step_by(PAGE_SIZE) {
                let o = p - base;
                want[o..o + 8].copy_from_slice(&self.head(p / PAGE_SIZE));
            }
            if got[..n] != want[..n] {
                return Err(Error::Invalid(
                    "bench: the file on disk after fsync is not what was written",
                ));
            }
        }
        Ok(())
    }
}

/// What one run of the `largefile` workload did. The counts are the same in every run (the
/// same operations on the same pages); the wall time is not.
#[derive(Clone, Copy, Debug, Default)]
struct LargeFileRun {
    /// From opening the cache to the end of `fsync`.
    wall_ms: f64,
    counts: LargeFileCounts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct LargeFileCounts {
    /// Bytes of migration copies, both directions (the link model's migration charges).
    moved: u64,
    /// Of which to the device: pages placed (or replicated) by the device phases.
    to_device: u64,
    /// Bytes of the device's accesses to system memory over the link.
    device_remote: u64,
    /// Bytes of CPU accesses to device-coherent memory (declared by the workload).
    cpu_remote: u64,
    /// CPU faults of the space ([`crate::space::SpaceStats`]).
    cpu_faults: u64,
    /// Fault passes of the device reads (`CmdOut::faults`).
    device_faults: u64,
    /// Bytes written back by `fsync` (pages written back × page size).
    writeback: u64,
    /// Modelled device time, the device's own link profile.
    device_ns: u64,
    /// The same traffic under [`FilePlacement::other_profile`].
    other_ns: u64,
}

impl LargeFileCounts {
    /// Every byte the link model was charged for (migrations, device accesses to system
    /// memory, declared CPU accesses to coherent memory).
    fn link(&self) -> u64 {
        self.moved + self.device_remote + self.cpu_remote
    }
}

/// The traffic kinds charged over the link, and the device's own.
const TRAFFIC: [Traffic; 4] = [
    Traffic::DeviceLocal,
    Traffic::DeviceRemote,
    Traffic::Migration,
    Traffic::CpuRemote,
];

/// What a device phase does with the file's pages before the device reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prepare {
    /// Nothing: the device reads them where they are.
    Nothing,
    /// Migrates them to the device ([`DeviceMirror::migrate_range_to_device`]).
    Migrate,
    /// Replicates them on the device ([`DeviceMirror::replicate_range`]: only the pages
    /// without a replica are copied).
    Replicate,
}

/// One device phase: the device migrates or replicates the file's pages to itself first, as
/// `prep` says (returns the pages placed or replicated), then reads all of the mapping at `a`
/// into `buf`, which is checked against the model (adds the read's fault passes to `faults`).
#[allow(clippy::too_many_arguments)]
fn largefile_device_phase(
    m: &DeviceMirror,
    cache: &FileCache,
    a: VirtAddr,
    n: usize,
    prep: Prepare,
    buf: &mut [u8],
    model: &FileModel,
    faults: &mut u64,
) -> Result<u64> {
    // Pages placed ahead by the migration or the replication, or by the device's faults under
    // a policy that places on demand: the cache's device pages and replicas before and after
    // (nothing drops a replica or brings a page back during a device phase).
    let before = cache.device_pages() + cache.replica_pages();
    match prep {
        Prepare::Nothing => {}
        Prepare::Migrate => {
            m.migrate_range_to_device(a, n * PAGE_SIZE)?;
        }
        Prepare::Replicate => {
            m.replicate_range(a, n * PAGE_SIZE)?;
        }
    }
    let out = m.read(a, n * PAGE_SIZE, buf)?;
    let placed = (cache.device_pages() + cache.replica_pages()).saturating_sub(before) as u64;
    if out.cpages != n as u64 {
        return Err(Error::Invalid("bench: the device did not read every page"));
    }
    *faults += out.faults;
    model.check_pages(buf)?;
    Ok(placed)
}

/// One run of the `largefile` workload with placement `p` on `dev` (mirrored into `space` by
/// `m`): a fresh cache of the file, mapped shared and writable (intercepting stores for the
/// private and replica placements, which need it); `rounds` rounds of a device read of everything, a CPU
/// store to 1 % of the pages (spread out: one page in [`LARGEFILE_STRIDE`], a different one
/// each round), a device read of everything; `fsync`. Timed from opening the cache to the end
/// of `fsync`; then (untimed) the mapping and the cache go, and the file is checked against
/// `model`.
#[allow(clippy::too_many_arguments)]
fn largefile_run(
    space: &Space,
    tf: &TempFile,
    len: usize,
    rounds: usize,
    cpu_reads_all: bool,
    p: FilePlacement,
    dev: &SoftDevice,
    m: &DeviceMirror,
    model: &mut FileModel,
    buf: &mut [u8],
    series: &mut Vec<[u64; 2]>,
) -> Result<LargeFileRun> {
    let n = len / PAGE_SIZE;
    let link = dev.link();
    let traffic0 = TRAFFIC.map(|t| link.traffic(t));
    let report0 = dev.link_report();
    let faults0 = space.stats().cpu_faults;
    let cfg = CacheConfig {
        budget: len + LARGE_PAGE_SIZE,
        ..CacheConfig::default()
    };
    match p {
        FilePlacement::OnDemand => {
            space.set_policy(std::sync::Arc::new(crate::policy::uvm::UvmPolicy::new()))
        }
        FilePlacement::OnDemandAdaptive => space.set_policy(std::sync::Arc::new(
            crate::policy::adaptive::AdaptivePolicy::new(),
        )),
        _ => {}
    }
    let t = Instant::now();
    let cache = FileCache::open(&tf.path, true, cfg)?;
    let h = cache.handle();
    let a = space.map_file_with(
        &h,
        0,
        len,
        FileMapOptions {
            prot: Prot::ReadWrite,
            shared: true,
            intercept_stores: matches!(
                p,
                FilePlacement::Private
                    | FilePlacement::Replica
                    | FilePlacement::OnDemand
                    | FilePlacement::OnDemandAdaptive
            ),
        },
    )?;
    let mut c = LargeFileCounts::default();
    // After each phase: the bytes over the link so far and the device memory in use.
    let sample = |series: &mut Vec<[u64; 2]>| {
        let link_bytes: u64 = [
            Traffic::Migration,
            Traffic::DeviceRemote,
            Traffic::CpuRemote,
        ]
        .into_iter()
        .map(|t| {
            let i = TRAFFIC
                .iter()
                .position(|x| *x == t)
                .expect("a traffic kind");
            link.traffic(t).bytes - traffic0[i].bytes
        })
        .sum();
        series.push([link_bytes, dev.used() as u64]);
    };
    sample(series);
    let mut work = || -> Result<()> {
        let probe = space.probe(a, len)?;
        for r in 0..rounds {
            // Private: migrate before every device phase (a runtime prefetching a kernel's
            // input). Coherent: once, before the first. Replica: replicate before every device
            // phase (a runtime replicating read-mostly input: only the pages the CPU wrote
            // since, whose replicas their stores dropped, are copied again).
            let prep = |first: bool| match p {
                FilePlacement::Mirror => Prepare::Nothing,
                FilePlacement::Private => Prepare::Migrate,
                FilePlacement::Coherent if first => Prepare::Migrate,
                FilePlacement::Coherent => Prepare::Nothing,
                FilePlacement::Replica => Prepare::Replicate,
                // The device's faults place the pages (the space's policy).
                FilePlacement::OnDemand | FilePlacement::OnDemandAdaptive => Prepare::Nothing,
            };
            c.to_device += largefile_device_phase(
                m,
                &cache,
                a,
                n,
                prep(r == 0),
                buf,
                model,
                &mut c.device_faults,
            )?;
            sample(series);
            if cpu_reads_all {
                // The CPU reads every page (its first word) before it stores.
                for pg in 0..n {
                    let v = probe.load_u32(a.add(pg * PAGE_SIZE))?;
                    if v.to_ne_bytes() != model.head(pg)[..4] {
                        return Err(Error::Invalid("bench: the CPU read wrong file data"));
                    }
                    if p == FilePlacement::Coherent {
                        dev.declare_cpu_access(CACHE_LINE);
                    }
                }
            }
            for pg in (r % LARGEFILE_STRIDE..n).step_by(LARGEFILE_STRIDE) {
                let v = model.store(pg);
                probe.store_u32(a.add(pg * PAGE_SIZE), v)?;
                if p == FilePlacement::Coherent {
                    dev.declare_cpu_access(CACHE_LINE);
                }
            }
            c.to_device += largefile_device_phase(
                m,
                &cache,
                a,
                n,
                prep(false),
                buf,
                model,
                &mut c.device_faults,
            )?;
            sample(series);
        }
        let wb0 = cache.stats().pages_written_back;
        h.fsync()?;
        let wb = cache.stats().pages_written_back - wb0;
        if p == FilePlacement::Coherent {
            // Writeback reads the pages where they are, in device memory: CPU accesses over
            // the link that hetmem does not charge (they do not fault).
            for _ in 0..wb {
                dev.declare_cpu_access(PAGE_SIZE as u64);
            }
        }
        c.writeback = wb * PAGE_SIZE as u64;
        Ok(())
    };
    let res = work();
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    space.set_policy(std::sync::Arc::new(crate::policy::DefaultPolicy));
    let unmapped = space.unmap(a, len);
    res?;
    unmapped?;
    c.cpu_faults = space.stats().cpu_faults - faults0;
    let d = TRAFFIC.map(|t| link.traffic(t));
    let other = LinkModel::new(p.other_profile());
    for (i, t) in TRAFFIC.into_iter().enumerate() {
        let (bytes, ops) = (d[i].bytes - traffic0[i].bytes, d[i].ops - traffic0[i].ops);
        match t {
            Traffic::Migration => c.moved = bytes,
            Traffic::DeviceRemote => c.device_remote = bytes,
            Traffic::CpuRemote => c.cpu_remote = bytes,
            Traffic::DeviceLocal => {}
        }
        c.other_ns += other.cost_ns(t, bytes, ops);
    }
    c.to_device *= PAGE_SIZE as u64;
    c.device_ns = dev.link_report().since(&report0).total_ns();
    // The cache goes (its device frames with it: everything was written back), then the file
    // is checked.
    drop(h);
    drop(cache);
    if dev.used() != 0 {
        return Err(Error::Invalid(
            "bench: device memory still in use after the file's cache went away",
        ));
    }
    model.check_file(tf, len)?;
    Ok(LargeFileRun { wall_ms, counts: c })
}

/// The `largefile` runs: one run of each placement per repetition (in the order of
/// [`FilePlacement::ALL`]), repeated until the wall-time ratios to the mirror are stable; the
/// warm-up repetition is left out. Also returns whether they became stable (rather than
/// stopping at the most allowed).
#[allow(clippy::type_complexity)]
fn largefile(
    space: &Space,
    sz: &Sizes,
) -> Result<(
    Vec<[LargeFileRun; PLACEMENTS]>,
    [LargeFileCounts; PLACEMENTS],
    bool,
)> {
    let len = sz.largefile_bytes;
    let tf = TempFile::new(len)?;
    let devs = FilePlacement::ALL
        .iter()
        .map(|p| p.device(len))
        .collect::<Result<Vec<_>>>()?;
    let mirrors = devs
        .iter()
        .map(|d| d.mirror(space))
        .collect::<Result<Vec<_>>>()?;
    let mut model = FileModel::new(len / PAGE_SIZE);
    let mut buf = vec![0u8; len];
    let mut runs = Vec::new();
    let names = FilePlacement::ALL.map(FilePlacement::name);
    let watch: Vec<_> = names[1..].iter().map(|p| (*p, Some(names[0]))).collect();
    let mut rep = Repeat::new(sz.largefile_min_reps, sz.largefile_max_reps, &watch);
    while rep.again()? {
        let mut r = [LargeFileRun::default(); PLACEMENTS];
        for (i, p) in FilePlacement::ALL.into_iter().enumerate() {
            r[i] = largefile_run(
                space,
                &tf,
                len,
                sz.largefile_rounds,
                false,
                p,
                &devs[i],
                &mirrors[i],
                &mut model,
                &mut buf,
                &mut Vec::new(),
            )?;
        }
        runs.push(r);
        for (p, x) in names.iter().zip(&r) {
            rep.put(p, x.wall_ms);
        }
    }
    runs.remove(0);
    // The same rounds with a CPU phase that also reads every page: the counts only (exact),
    // one run of each placement.
    let mut readall = [LargeFileCounts::default(); PLACEMENTS];
    for (i, p) in FilePlacement::ALL.into_iter().enumerate() {
        readall[i] = largefile_run(
            space,
            &tf,
            len,
            sz.largefile_rounds,
            true,
            p,
            &devs[i],
            &mirrors[i],
            &mut model,
            &mut buf,
            &mut Vec::new(),
        )?
        .counts;
    }
    Ok((runs, readall, rep.done().stable))
}

/// The `largefile` figures (see the module doc), as `largefile_<placement>_<what>`: the
/// other placements' against the mirror's same figure (where that is not 0).
/// Wall times are medians of the repetitions, with their spread (`stable`: whether the
/// repetitions stopped because the wall-time ratios were stable); the counts are the same in
/// every repetition, so exact (where one was not, it is the median with its spread).
fn push_largefile(
    out: &mut Vec<BenchResult>,
    runs: &[[LargeFileRun; PLACEMENTS]],
    stable: bool,
    sz: &Sizes,
) {
    let name = |i: usize, what: &str| format!("largefile_{}_{what}", FilePlacement::ALL[i].name());
    let mib = |b: usize| b >> 20;
    // Wall time: repeated until stable.
    let wall: Vec<Vec<f64>> = (0..PLACEMENTS)
        .map(|i| runs.iter().map(|r| r[i].wall_ms).collect())
        .collect();
    let base = name(0, "wall_ms");
    for i in 1..PLACEMENTS {
        let mut f = spread_figure(
            &name(i, "wall_ms"),
            &wall[i],
            Some((&base, &wall[0])),
            "ms",
            stable,
        );
        f.note = Some(format!(
            "from opening a fresh cache of the file ({} MiB) to the end of fsync: {} rounds of \
             a device read of it all, CPU stores to 1 % of its pages, a device read of it all",
            mib(sz.largefile_bytes),
            sz.largefile_rounds
        ));
        out.push(f);
    }
    out.push(spread_figure(&base, &wall[0], None, "ms", stable));

    // The counts, as taken in every repetition: exact where they agree (they should).
    let count = |i: usize, f: &dyn Fn(&LargeFileCounts) -> f64| -> Vec<f64> {
        runs.iter().map(|r| f(&r[i].counts)).collect()
    };
    let c = |i: usize| runs[0][i].counts;
    type Get = fn(&LargeFileCounts) -> f64;
    let whats: [(&str, &str, Get); 6] = [
        ("bytes_moved", "bytes", |c| c.moved as f64),
        ("link_bytes", "bytes", |c| c.link() as f64),
        ("cpu_faults", "faults", |c| c.cpu_faults as f64),
        ("device_faults", "faults", |c| c.device_faults as f64),
        ("writeback_bytes", "bytes", |c| c.writeback as f64),
        ("modelled_device_ms", "ms", |c| c.device_ns as f64 / 1e6),
    ];
    for (what, unit, get) in whats {
        let mv = count(0, &get);
        let note = |i: usize| -> Option<String> {
            let c = c(i);
            let b = |v: u64| fmt_bytes(Some(v as f64));
            match what {
                "bytes_moved" if i == 0 => Some(
                    "migration copies (the link model's migration charges): none, the device \
                     reads the pages over the link (largefile_mirror_link_bytes)"
                        .into(),
                ),
                "bytes_moved" if FilePlacement::ALL[i] == FilePlacement::Replica => Some(format!(
                    "migration copies (the link model's migration charges): to the device \
                         {} (replicas made before the device phases: the file once, then each \
                         page a CPU store took the replica of), from it {} (a store drops the \
                         replica and moves nothing; writeback reads the system copy)",
                    b(c.to_device),
                    b(c.moved - c.to_device)
                )),
                "bytes_moved" => Some(format!(
                    "migration copies (the link model's migration charges): to the device {} \
                     (pages placed by the device phases), from it {} (CPU faults bringing pages \
                     back, writeback reading pages where they are)",
                    b(c.to_device),
                    b(c.moved - c.to_device)
                )),
                "link_bytes" => Some(format!(
                    "every byte charged to the link: migrations {}, device reads of system \
                     memory {}, CPU accesses to coherent memory {} (declared: a {CACHE_LINE}-byte \
                     line per store, each page written back)",
                    b(c.moved),
                    b(c.device_remote),
                    b(c.cpu_remote)
                )),
                "device_faults" => Some("fault passes of the device reads (CmdOut::faults)".into()),
                "modelled_device_ms" => Some(format!(
                    "modelled by the link model ({}); the same traffic over {}: {:.1} ms",
                    FilePlacement::ALL[i].profile().name,
                    FilePlacement::ALL[i].other_profile().name,
                    c.other_ns as f64 / 1e6
                )),
                _ => None,
            }
        };
        let base = name(0, what);
        // Against the mirror's only where that is not 0 (a ratio to 0 means nothing).
        let mirror = mv
            .iter()
            .all(|v| *v > 0.0)
            .then_some((base.as_str(), &mv[..]));
        for i in 1..PLACEMENTS {
            let mut f = count_figure(&name(i, what), &count(i, &get), mirror, unit, stable);
            f.note = note(i);
            out.push(f);
        }
        let mut f = count_figure(&base, &mv, None, unit, stable);
        f.note = note(0);
        out.push(f);
    }

    // The bytes a device-private placement moves per byte a coherent or a replica one moves
    // (per repetition).
    let p = count(1, &|c| c.moved as f64);
    for (i, other) in [(2, "coherent"), (3, "replica")] {
        debug_assert_eq!(FilePlacement::ALL[i].name(), other);
        let o = count(i, &|c| c.moved as f64);
        if o.iter().all(|o| *o > 0.0) {
            let r: Vec<f64> = p.iter().zip(&o).map(|(p, o)| p / o).collect();
            let mut f = count_figure(
                &format!("largefile_private_{other}_bytes_moved_ratio"),
                &r,
                None,
                "x",
                stable,
            );
            f.note = Some(format!(
                "largefile_private_bytes_moved / largefile_{other}_bytes_moved: private {}, \
                 {other} {}",
                fmt_bytes(Some(median(&mut p.clone()))),
                fmt_bytes(Some(median(&mut o.clone())))
            ));
            out.push(f);
        }
    }

    // Against the offline oracle: the least link traffic any placement could reach for the
    // same accesses (crate::policy::oracle with byte costs), per memory kind.
    let trace = largefile_accesses(sz.largefile_bytes, sz.largefile_rounds, false);
    let oracle = |kind: MemoryKind| {
        crate::policy::oracle::lower_bound(&trace, kind, &crate::policy::oracle::Costs::bytes())
    };
    let private = oracle(MemoryKind::Private);
    let coherent = oracle(MemoryKind::Coherent);
    for (kind, b) in [("private", &private), ("coherent", &coherent)] {
        let mut f = count_figure(
            &format!("largefile_oracle_{kind}_link_bytes"),
            &[b.bytes_moved() as f64],
            None,
            "bytes",
            true,
        );
        f.note = Some(format!(
            "the least link traffic any placement could reach for the same accesses with \
             device-{kind} memory (a device read is a whole page, a CPU store a {CACHE_LINE}-byte \
             line): {} migrations, {} of remote accesses",
            b.migrations,
            fmt_bytes(Some(b.remote_bytes as f64))
        ));
        out.push(f);
    }
    for (i, fp) in FilePlacement::ALL.iter().enumerate() {
        let o = if *fp == FilePlacement::Coherent {
            &coherent
        } else {
            &private
        };
        if o.bytes_moved() == 0 {
            continue;
        }
        let r: Vec<f64> = count(i, &|c| c.link() as f64)
            .iter()
            .map(|l| l / o.bytes_moved() as f64)
            .collect();
        let mut f = count_figure(&name(i, "link_bytes_vs_oracle"), &r, None, "B/B", stable);
        f.note = Some(format!(
            "largefile_{}_link_bytes / largefile_oracle_{}_link_bytes{}",
            fp.name(),
            if *fp == FilePlacement::Coherent {
                "coherent"
            } else {
                "private"
            },
            if *fp == FilePlacement::Replica {
                " (the oracle places pages in one memory at a time: a replica, which keeps the \
                 system copy so that a CPU store moves nothing back, can go below it)"
            } else {
                ""
            }
        ));
        out.push(f);
    }
}

/// One placement's run of the `largefile` workload, as the demo reports it.
#[derive(Clone, Debug, Serialize)]
pub struct PlacementRun {
    /// `mirror`, `private`, `coherent`, `replica` or `on-demand` (device-private, placed by
    /// the device's faults).
    pub placement: &'static str,
    /// The space's placement policy: `default`, or `uvm` for `on-demand`.
    pub policy: &'static str,
    /// The link profile of the device (`pcie5`, `nvlink-c2c`).
    pub profile: &'static str,
    /// Wall time on this machine, from opening the file's cache to the end of `fsync`.
    pub wall_s: f64,
    /// Modelled device time (the link model).
    pub modelled_device_s: f64,
    /// Bytes migrated to the device (placements, replicas).
    pub bytes_to_device: u64,
    /// Bytes migrated back (CPU faults, writeback reading device pages).
    pub bytes_to_system: u64,
    /// Every byte over the link (migrations, device reads of system memory, CPU accesses to
    /// coherent memory).
    pub link_bytes: u64,
    /// CPU faults.
    pub cpu_faults: u64,
    /// Fault passes of the device's reads.
    pub device_faults: u64,
    /// Bytes `fsync` wrote back.
    pub writeback_bytes: u64,
    /// The offline oracle's link bytes for the same accesses (its memory kind and profile).
    pub oracle_bytes: u64,
    /// Every device read, the file after `fsync` and the CPU's data matched the model.
    pub verified: bool,
    /// At the start and after each device phase: bytes over the link so far, and device memory
    /// in use (bytes).
    pub series: Vec<[u64; 2]>,
}

/// The `largefile` workload (`len` bytes, `rounds` rounds; with `cpu_reads_all` the CPU phase
/// also reads every page) once for each placement, in a fresh space: what `hetmem demo` shows.
/// Each device has its kind's link profile, or `profile` for all of them. With `device`, only
/// the placements a device of that kind offers run ([`demo_run_count`]), the mirrored one on a
/// device of that kind. `progress` is told each placement before it runs. A run whose data does
/// not match the model is an error.
pub fn largefile_placements(
    len: usize,
    rounds: usize,
    cpu_reads_all: bool,
    profile: Option<LinkProfile>,
    device: Option<MemoryKind>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<PlacementRun>> {
    if device == Some(MemoryKind::System) {
        return Err(Error::Invalid(
            "the large file's device must be device-private or device-coherent memory",
        ));
    }
    let len = len.div_ceil(LARGE_PAGE_SIZE).max(1) * LARGE_PAGE_SIZE;
    let space = Space::with_config(SpaceConfig {
        size: (4 * len).max(1 << 30),
        stash: 2 << 20,
        ..SpaceConfig::default()
    })?;
    let tf = TempFile::new(len)?;
    let mut model = FileModel::new(len / PAGE_SIZE);
    let mut buf = vec![0u8; len];
    let trace = largefile_accesses(len, rounds, cpu_reads_all);
    let mut out = Vec::new();
    for p in demo_runs(device) {
        progress(p.name());
        let kind = match (p, device) {
            (FilePlacement::Mirror, Some(k)) => k,
            _ => p.kind(),
        };
        let prof = profile.unwrap_or(match kind {
            MemoryKind::Coherent => LinkProfile::NVLINK_C2C,
            _ => p.profile(),
        });
        let dev = p.device_of(len, kind, prof)?;
        let m = dev.mirror(&space)?;
        let mut series = Vec::new();
        let r = largefile_run(
            &space,
            &tf,
            len,
            rounds,
            cpu_reads_all,
            p,
            &dev,
            &m,
            &mut model,
            &mut buf,
            &mut series,
        )?;
        let oracle = crate::policy::oracle::lower_bound(
            &trace,
            kind,
            &crate::policy::oracle::Costs::bytes(),
        );
        let c = r.counts;
        out.push(PlacementRun {
            placement: p.name(),
            policy: p.policy(),
            profile: prof.name,
            wall_s: r.wall_ms / 1e3,
            modelled_device_s: c.device_ns as f64 / 1e9,
            bytes_to_device: c.to_device,
            bytes_to_system: c.moved - c.to_device.min(c.moved),
            link_bytes: c.link(),
            cpu_faults: c.cpu_faults,
            device_faults: c.device_faults,
            writeback_bytes: c.writeback,
            oracle_bytes: oracle.bytes_moved(),
            verified: true,
            series,
        });
    }
    Ok(out)
}

/// The `largefile_readall_*` figures: the workload with a CPU phase that reads every page
/// before its stores (the CPU uses all of the file in every round), bytes moved per placement,
/// and the private placement's against the coherent and the replica ones (exact counts).
fn push_largefile_readall(
    out: &mut Vec<BenchResult>,
    c: &[LargeFileCounts; PLACEMENTS],
    sz: &Sizes,
) {
    for (i, p) in FilePlacement::ALL.iter().enumerate() {
        let mut f = count_figure(
            &format!("largefile_readall_{}_bytes_moved", p.name()),
            &[c[i].moved as f64],
            None,
            "bytes",
            true,
        );
        f.note = Some(format!(
            "the largefile rounds ({} MiB, {} rounds) with a CPU phase that reads every page \
             (one word each) before its stores: migration copies, both ways",
            sz.largefile_bytes >> 20,
            sz.largefile_rounds
        ));
        out.push(f);
    }
    let private = c[1].moved as f64;
    for (i, other) in [(2, "coherent"), (3, "replica")] {
        let o = c[i].moved as f64;
        if o > 0.0 {
            let mut f = count_figure(
                &format!("largefile_readall_private_{other}_bytes_moved_ratio"),
                &[private / o],
                None,
                "x",
                true,
            );
            f.note = Some(format!(
                "largefile_readall_private_bytes_moved / largefile_readall_{other}_bytes_moved: \
                 every CPU phase brings every device-private page back, and the next device \
                 phase moves it again; coherent pages are read in place, replicas stay valid"
            ));
            out.push(f);
        }
    }
}

/// The accesses of the `largefile` workload, as [`crate::policy::oracle`] takes them: each
/// round, the device reads every page whole, the CPU stores one line to one page in
/// [`LARGEFILE_STRIDE`] (a different one each round), the device reads every page again.
fn largefile_accesses(
    bytes: usize,
    rounds: usize,
    cpu_reads_all: bool,
) -> Vec<crate::policy::oracle::Access> {
    use crate::policy::oracle::{Access, Agent};
    let n = bytes / PAGE_SIZE;
    let read_all = |t: &mut Vec<Access>| {
        t.extend((0..n).map(|p| Access {
            page: p as u64,
            by: Agent::Device,
            bytes: PAGE_SIZE as u32,
        }))
    };
    let mut t = Vec::new();
    for r in 0..rounds {
        read_all(&mut t);
        if cpu_reads_all {
            t.extend((0..n).map(|p| Access {
                page: p as u64,
                by: Agent::Cpu,
                bytes: CACHE_LINE as u32,
            }));
        }
        t.extend(
            (r % LARGEFILE_STRIDE..n)
                .step_by(LARGEFILE_STRIDE)
                .map(|p| Access {
                    page: p as u64,
                    by: Agent::Cpu,
                    bytes: CACHE_LINE as u32,
                }),
        );
        read_all(&mut t);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs [`Repeat`] (at least `min`, at most `max`) over passes that measure `h` and `b` as
    /// `pass(i)` gives them (pass 0 is the warm-up).
    fn drive(min: usize, max: usize, pass: impl Fn(usize) -> (f64, f64)) -> Samples {
        let mut r = Repeat::new(min, max, &[("h", Some("b"))]);
        let mut i = 0;
        while r.again().unwrap() {
            let (h, b) = pass(i);
            r.put("h", h);
            r.put("b", b);
            i += 1;
        }
        r.done()
    }

    #[test]
    fn steady_ratios_stop_at_the_least_repetitions() {
        // The machine drifts (both sides alike): the ratio does not.
        let s = drive(2, 25, |i| (2.0 * (1 + i) as f64, (1 + i) as f64));
        assert!(s.stable);
        assert_eq!(
            s.rows.len(),
            MIN_REPETITIONS,
            "the minimum is raised to the rule's"
        );
        // The warm-up is left out.
        assert_eq!(s.col("b"), vec![2.0, 3.0, 4.0, 5.0]);
        let f = s.timed("fig", "h", "us", Some(("base", "b")));
        let sp = f.spread.as_ref().unwrap();
        assert_eq!((sp.reps, sp.min, sp.max), (4, 4.0, 10.0));
        assert_eq!((sp.ratio_min, sp.ratio_max), (Some(2.0), Some(2.0)));
        assert_eq!(
            (f.value, f.baseline_value, f.ratio),
            (7.0, Some(3.5), Some(2.0))
        );
        assert!(sp.stable && !f.exact);
    }

    #[test]
    fn drifting_ratios_run_to_the_most_allowed_and_say_so() {
        let s = drive(7, 9, |i| (1.1f64.powi(i as i32), 1.0));
        assert!(!s.stable);
        assert_eq!(s.rows.len(), 9);
        let f = s.timed("fig", "h", "x", Some(("base", "b")));
        let sp = f.spread.unwrap();
        assert!(!sp.stable);
        assert!(sp.min <= f.value && f.value <= sp.max);
        assert!(sp.ratio_min.unwrap() < sp.ratio_max.unwrap());
    }

    #[test]
    fn a_ratio_settles_once_its_median_stops_moving() {
        // Noisy ratios around 1.0: 0.5, 1.5 alternating, then 1.0 from pass 5 on.
        let s = drive(4, 25, |i| {
            (if i < 5 { [0.5, 1.5][i % 2] } else { 1.0 }, 1.0)
        });
        assert!(s.stable);
        let n = s.rows.len();
        assert!((MIN_REPETITIONS..25).contains(&n), "{n} repetitions");
    }

    #[test]
    fn a_figure_watched_alone_settles_on_its_value() {
        let mut r = Repeat::new(4, 6, &[("v", None)]);
        while r.again().unwrap() {
            r.put("v", 3.0);
        }
        let s = r.done();
        assert!(s.stable && s.rows.len() == 4);
        assert_eq!(
            s.timed("v", "v", "GB/s", None).spread.unwrap().ratio_min,
            None
        );
    }

    #[test]
    fn repetitions_must_measure_what_the_warm_up_did() {
        let mut r = Repeat::new(4, 6, &[("h", Some("b"))]);
        assert!(r.again().unwrap());
        r.put("h", 1.0);
        r.put("b", 1.0);
        assert!(r.again().unwrap());
        r.put("h", 1.0);
        assert!(matches!(r.again(), Err(Error::Invalid(_))));

        let mut r = Repeat::new(4, 6, &[("h", Some("missing"))]);
        assert!(r.again().unwrap());
        r.put("h", 1.0);
        assert!(matches!(r.again(), Err(Error::Invalid(_))));
    }

    #[test]
    fn a_count_is_exact_only_when_every_repetition_agrees() {
        let f = count_figure(
            "n",
            &[8.0, 8.0, 8.0],
            Some(("m", &[4.0, 4.0, 4.0])),
            "bytes",
            false,
        );
        assert!(f.exact && f.spread.is_none());
        assert_eq!((f.value, f.ratio), (8.0, Some(2.0)));
        let f = count_figure("n", &[8.0], None, "bytes", true);
        assert!(f.exact && f.spread.is_none());
        // The count or its baseline's varied: a median with its spread, not exact.
        for (v, b) in [
            ([8.0, 9.0, 8.0], [4.0, 4.0, 4.0]),
            ([8.0; 3], [4.0, 2.0, 4.0]),
        ] {
            let f = count_figure("n", &v, Some(("m", &b)), "bytes", true);
            assert!(!f.exact);
            let sp = f.spread.unwrap();
            assert_eq!(sp.reps, 3);
            assert!(sp.min <= f.value && f.value <= sp.max);
        }
    }
}
