//! Crash consistency of hetmem's page cache for files: what `fsync` returned Ok for survives the
//! process being killed (`docs/filesystem-contract.md`, invariant 1 and "process exit").
//!
//! A child process (this test binary, re-executed on its ignored test `child_writer`) first
//! extends the file with `set_len` to a seeded number of pages, maps all of it shared
//! (`Space::map_file`) and prints `MAPPED`. It then writes records of pseudo-random bytes at
//! pseudo-random offsets, in batches; after each batch it fsyncs and prints `FSYNCED
//! <generation>`. A record inside the mapping is written, as the seed chooses, through
//! `FileHandle::write_at`, through the mapping with `Space::cpu_write`, or through the mapping
//! with real CPU stores (`space::Probe::store_u32`, partial words read-modify-written); a record
//! past the mapping goes through `write_at` and grows the file. A small budget and dirty bound
//! make `write_at` also write back and evict unmapped pages in the background; the mapping's
//! stores reach the file only through the fsync (which collects them). Everything (the file's
//! initial content, the mapped size, the batches and their paths, where the parent kills the
//! child) derives from one seed, so the parent replays the same sequence.
//!
//! The parent waits for `MAPPED` (the file is then at least the mapped size, on disk), then the
//! child waits for a byte on its stdin before each step (a record or an fsync), so the
//! parent decides how far it gets: it lets the child fsync generations 1..=K and write J records
//! of batch K+1 (it reads each step's line), then sends one more go byte and SIGKILLs the child
//! at once: the child dies before, inside or just after its record J+1 (a write that may be
//! writing back pages under the dirty bound or the budget), with unsynced data in its cache. The
//! parent then reads the file: every byte must hold its value at generation K, or a value that
//! one of the records 1..=J+1 of batch K+1 writes there (past the length of generation K: zero or
//! such a value), and the file is at least as long as at generation K (the mapped size
//! included). Bytes written through the mapping are held to the same rule as `write_at`'s.
//!
//! CI runs `SEEDS` seeds (each a random K, J and sequence); `HETMEM_SOAK=N` runs N× more. A
//! failure prints the seed; `HETMEM_DURABILITY_SEED=<seed>` reruns from it.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use hetmem::pagecache::{CacheConfig, FileCache};
use hetmem::{Prot, Space, VirtAddr};

const SEEDS: u64 = 10;
/// Records land within this many pages.
const FILE_PAGES: usize = 24;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// How the child writes a record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// `FileHandle::write_at`.
    WriteAt,
    /// `Space::cpu_write` through the shared mapping.
    CpuWrite,
    /// Real CPU stores (`space::Probe::store_u32`) through the shared mapping.
    Stores,
}

struct Record {
    off: usize,
    data: Vec<u8>,
    path: Path,
}

/// Everything one seed decides.
struct Plan {
    /// The file's content before the child starts.
    initial: Vec<u8>,
    /// The child extends the file to this many bytes (whole pages, at least the initial
    /// length) and maps all of them shared before its first step.
    map_len: usize,
    /// Batch `g - 1` is written before fsync `g` (generation g); the last batch has no fsync
    /// after it.
    batches: Vec<Vec<Record>>,
    /// Generations the child is let fsync.
    k: usize,
    /// Records of batch `k` (0-based: the one after generation k) the parent waits for before
    /// the kill.
    j: usize,
}

impl Plan {
    fn new(seed: u64) -> Plan {
        let mut r = Rng(seed);
        let initial_len = r.below(8 * PAGE + 1);
        let initial = r.bytes(initial_len);
        let min_pages = initial_len.div_ceil(PAGE).max(1);
        let map_len = (min_pages + r.below(FILE_PAGES - min_pages + 1)) * PAGE;
        let generations = 8 + r.below(10);
        let batches: Vec<Vec<Record>> = (0..=generations)
            .map(|_| {
                (0..1 + r.below(30))
                    .map(|_| {
                        let len = 1 + r.below(2 * PAGE + 100);
                        let off = r.below(FILE_PAGES * PAGE - len);
                        let path = match r.below(3) {
                            _ if off + len > map_len => Path::WriteAt,
                            0 => Path::WriteAt,
                            1 => Path::CpuWrite,
                            _ => Path::Stores,
                        };
                        Record {
                            off,
                            data: r.bytes(len),
                            path,
                        }
                    })
                    .collect()
            })
            .collect();
        let k = r.below(generations + 1);
        let j = r.below(batches[k].len().min(8) + 1);
        Plan {
            initial,
            map_len,
            batches,
            k,
            j,
        }
    }
}

fn apply(content: &mut Vec<u8>, rec: &Record) {
    let end = rec.off + rec.data.len();
    if content.len() < end {
        content.resize(end, 0);
    }
    content[rec.off..end].copy_from_slice(&rec.data);
}

fn seeds() -> (u64, u64) {
    let base = seed_from_env("HETMEM_DURABILITY_SEED");
    (base, SEEDS * u64::from(soak()))
}

/// Removes the file when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One run: returns a description of the first violation, if any.
fn run_seed(seed: u64) -> Result<(), String> {
    let plan = Plan::new(seed);
    let file = TempFile(
        std::env::temp_dir().join(format!("hetmem-durability-{}-{seed}", std::process::id())),
    );
    std::fs::write(&file.0, &plan.initial).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--ignored"])
        .env("HETMEM_DURABILITY_FILE", &file.0)
        .env("HETMEM_DURABILITY_CHILD_SEED", seed.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut go = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Each line the child prints for the protocol: `MAPPED` once set up, `W` after a record,
    // `FSYNCED g`.
    let mut next = |what: &str| -> Result<String, String> {
        for _ in 0..100 {
            match lines.next() {
                Some(Ok(l)) if l == "MAPPED" || l == "W" || l.starts_with("FSYNCED ") => {
                    return Ok(l);
                }
                Some(Ok(_)) => continue, // the test harness's own lines
                Some(Err(e)) => return Err(format!("reading the child's output: {e}")),
                None => {
                    return Err(format!(
                        "the child ended while the parent waited for {what}"
                    ));
                }
            }
        }
        Err(format!(
            "too many unexpected lines while waiting for {what}"
        ))
    };
    // One go byte per step (a record or an fsync), each answered by its line, up to fsync k and
    // j records of the unsynced batch; then one more go, and the kill at once: the child dies
    // before, inside or just after its record j + 1 (or, at the very end, waiting).
    // The child extends and maps the file before its first go byte: the parent waits for that,
    // so the extension is part of what every kill must leave.
    let mut result = match next("MAPPED") {
        Ok(l) if l == "MAPPED" => Ok(()),
        Ok(l) => Err(format!("expected `MAPPED` from the child, got `{l}`")),
        Err(e) => Err(e),
    };
    let mut step = |want: &str| -> Result<(), String> {
        go.write_all(b"g")
            .map_err(|e| format!("writing to the child: {e}"))?;
        go.flush()
            .map_err(|e| format!("writing to the child: {e}"))?;
        let l = next(want)?;
        if l != want {
            return Err(format!("expected `{want}` from the child, got `{l}`"));
        }
        Ok(())
    };
    // No step at all if the child did not get as far as `MAPPED`.
    let synced_batches = if result.is_ok() {
        &plan.batches[..plan.k]
    } else {
        &[]
    };
    'protocol: for (g, batch) in synced_batches.iter().enumerate() {
        for _ in batch {
            if let Err(e) = step("W") {
                result = Err(e);
                break 'protocol;
            }
        }
        if let Err(e) = step(&format!("FSYNCED {}", g + 1)) {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        for _ in 0..plan.j {
            if let Err(e) = step("W") {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        // The child may have exited already (no step left): the write then fails, harmlessly.
        let _ = go.write_all(b"g").and_then(|()| go.flush());
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    result?;
    use std::os::unix::process::ExitStatusExt;
    if status.signal() != Some(libc::SIGKILL) {
        return Err(format!("the child was not killed by SIGKILL: {status}"));
    }
    check_file(&plan, &std::fs::read(&file.0).unwrap())
}

/// Every byte holds its value at generation k or a value batch k (the unsynced one) writes.
fn check_file(plan: &Plan, disk: &[u8]) -> Result<(), String> {
    let mut synced = plan.initial.clone();
    synced.resize(plan.map_len, 0);
    for b in &plan.batches[..plan.k] {
        for rec in b {
            apply(&mut synced, rec);
        }
    }
    let mut later: Vec<Vec<u8>> = Vec::new();
    // The child can have started record j + 1 of the unsynced batch, no further.
    for rec in plan.batches[plan.k].iter().take(plan.j + 1) {
        let end = rec.off + rec.data.len();
        if later.len() < end {
            later.resize(end, Vec::new());
        }
        for (i, &v) in rec.data.iter().enumerate() {
            later[rec.off + i].push(v);
        }
    }
    if disk.len() < synced.len() {
        return Err(format!(
            "the file is {} bytes, shorter than the {} of generation {}",
            disk.len(),
            synced.len(),
            plan.k
        ));
    }
    if disk.len() > synced.len().max(later.len()) {
        return Err(format!(
            "the file is {} bytes, longer than anything written ({})",
            disk.len(),
            synced.len().max(later.len())
        ));
    }
    for (i, &v) in disk.iter().enumerate() {
        let old = synced.get(i).copied().unwrap_or(0);
        let new = later.get(i).map(Vec::as_slice).unwrap_or(&[]);
        if v != old && !new.contains(&v) {
            return Err(format!(
                "byte {i} (page {}) is {v:#04x}: generation {} has {old:#04x}{}, and the unsynced batch writes {new:02x?} there; {}",
                i / PAGE,
                plan.k,
                if i < synced.len() {
                    ""
                } else {
                    " (past its end)"
                },
                writers(plan, i),
            ));
        }
    }
    Ok(())
}

/// The records that write byte `i`, and how (for a failure's message).
fn writers(plan: &Plan, i: usize) -> String {
    let mut w = Vec::new();
    for (b, batch) in plan.batches[..=plan.k].iter().enumerate() {
        for (n, rec) in batch.iter().enumerate() {
            if (rec.off..rec.off + rec.data.len()).contains(&i) {
                w.push(format!(
                    "batch {} record {n} ({:?}: {:#04x})",
                    b + 1,
                    rec.path,
                    rec.data[i - rec.off]
                ));
            }
        }
    }
    format!(
        "mapped {} bytes; written by [{}]",
        plan.map_len,
        w.join(", ")
    )
}

/// Writes `data` at `addr` with real CPU stores of aligned `u32`s through `probe` (a partial
/// word is loaded, merged and stored back whole).
fn store_bytes(probe: &hetmem::space::Probe, addr: VirtAddr, data: &[u8]) {
    let mut i = 0;
    while i < data.len() {
        let a = addr.get() + i;
        let w = a & !3;
        let lo = a - w;
        let n = (4 - lo).min(data.len() - i);
        let mut word = if n == 4 {
            [0u8; 4]
        } else {
            probe.load_u32(VirtAddr(w)).unwrap().to_ne_bytes()
        };
        word[lo..lo + n].copy_from_slice(&data[i..i + n]);
        probe
            .store_u32(VirtAddr(w), u32::from_ne_bytes(word))
            .unwrap();
        i += n;
    }
}

#[test]
fn fsynced_data_survives_sigkill() {
    let (base, n) = seeds();
    let _w = watchdog("fsynced_data_survives_sigkill", 60 * (n / SEEDS).max(1));
    eprintln!("durability: seeds {base}.. ({n} runs; rerun with HETMEM_DURABILITY_SEED={base})");
    let mut fsyncs = 0;
    let mut records = 0;
    // Acknowledged records by path: write_at, cpu_write, real stores.
    let mut by_path = [0usize; 3];
    for i in 0..n {
        let seed = base.wrapping_add(i);
        at(format!("seed {seed}"));
        let plan = Plan::new(seed);
        fsyncs += plan.k;
        let acked = plan.batches[..plan.k]
            .iter()
            .flatten()
            .chain(plan.batches[plan.k].iter().take(plan.j));
        for rec in acked {
            records += 1;
            by_path[rec.path as usize] += 1;
        }
        if let Err(e) = run_seed(seed) {
            panic!(
                "durability: seed {seed} (k = {}, j = {}; rerun with HETMEM_DURABILITY_SEED={seed}): {e}",
                plan.k, plan.j
            );
        }
    }
    eprintln!(
        "durability: {n} kills, {fsyncs} fsyncs, {records} records acknowledged ({} write_at, {} cpu_write through the mapping, {} real stores through the mapping)",
        by_path[0], by_path[1], by_path[2]
    );
}

/// The child: run by `fsynced_data_survives_sigkill` only (skipped otherwise: ignored, and a
/// no-op without its environment).
#[test]
#[ignore = "the child process of fsynced_data_survives_sigkill"]
fn child_writer() {
    let (Ok(path), Ok(seed)) = (
        std::env::var("HETMEM_DURABILITY_FILE"),
        std::env::var("HETMEM_DURABILITY_CHILD_SEED"),
    ) else {
        return;
    };
    let _w = watchdog("child_writer", 60);
    let plan = Plan::new(seed.parse().unwrap());
    let cfg = CacheConfig {
        budget: 8 * PAGE,
        dirty_bound: 4 * PAGE,
    };
    let cache = FileCache::open(std::path::Path::new(&path), true, cfg).unwrap();
    let h = cache.handle();
    h.set_len(plan.map_len as u64).unwrap();
    let space = Space::new().unwrap();
    let map = space
        .map_file(&h, 0, plan.map_len, Prot::ReadWrite, true)
        .unwrap();
    let probe = space.probe(map, plan.map_len).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "MAPPED").unwrap();
    out.flush().unwrap();
    let mut stdin = std::io::stdin().lock();
    let last = plan.batches.len() - 1;
    // Waits for the parent's go byte before each step; false at its end (EOF).
    let mut go = || {
        let mut b = [0u8; 1];
        matches!(stdin.read(&mut b), Ok(1))
    };
    'steps: for (i, batch) in plan.batches.iter().enumerate() {
        for rec in batch {
            if !go() {
                break 'steps;
            }
            match rec.path {
                Path::WriteAt => h.write_at(rec.off as u64, &rec.data).unwrap(),
                Path::CpuWrite => space.cpu_write(map.add(rec.off), &rec.data).unwrap(),
                Path::Stores => store_bytes(&probe, map.add(rec.off), &rec.data),
            }
            writeln!(out, "W").unwrap();
            out.flush().unwrap();
        }
        if i == last || !go() {
            break;
        }
        h.fsync().unwrap();
        writeln!(out, "FSYNCED {}", i + 1).unwrap();
        out.flush().unwrap();
    }
    // Killed here at the latest (stdin stays open until the parent has killed us).
    let mut rest = Vec::new();
    let _ = stdin.read_to_end(&mut rest);
}
