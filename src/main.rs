//! The `hetmem` command line: `demo`, `bench`, `info`.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hetmem",
    version,
    about = "Heterogeneous memory manager: CPU and device memory in one address space"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an end-to-end scenario on the built-in software device and show what happened:
    /// anonymous memory to the device and back, then a large file processed in device and CPU
    /// phases with its pages in each placement (mirrored, device-private, device-coherent,
    /// read-only replicas), every byte verified.
    Demo {
        /// Size of the large file, in MiB.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// Also draw the large file's traffic and device memory over its phases, per placement,
        /// into this SVG file.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// The link model of every device (pcie4, pcie5, nvlink-c2c, xgmi); default: each
        /// device's kind's (pcie5 for device-private, nvlink-c2c for device-coherent).
        #[arg(long)]
        profile: Option<String>,
        /// Only the placements a device of this kind offers (private: mirrored, device-private,
        /// replicas, on demand; coherent: mirrored, device-coherent); default: all of them.
        #[arg(long, value_parser = ["private", "coherent"])]
        device: Option<String>,
    },
    /// Measure fault, migration and first-touch costs against baselines measured in the same run.
    Bench {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Smaller sizes, fewer repetitions.
        #[arg(long)]
        quick: bool,
        /// Run only these groups of figures (comma-separated): fault_back, first_touch,
        /// threads, contention, migrate, coherent, pingpong, file, largefile, policies, memcpy,
        /// metadata, scale.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Run a seeded workload on the software device under a placement policy (every policy when
    /// none is given), every byte verified, against the offline oracle's least traffic and
    /// least modelled time for the same accesses.
    Run {
        /// The workload.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(hetmem::workload::WORKLOADS))]
        workload: String,
        /// The policy (all of them when left out).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(hetmem::workload::POLICIES))]
        policy: Option<String>,
        /// The device's memory.
        #[arg(long, default_value = "private", value_parser = ["private", "coherent"])]
        device: String,
        /// Memory the workload uses, in MiB.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Rounds.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Seed of the random workload.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Write the accesses (one JSON line each, the last policy's run) to this file, for
        /// `hetmem replay`.
        #[arg(long)]
        trace: Option<std::path::PathBuf>,
        /// The device's link model (pcie4, pcie5, nvlink-c2c, xgmi): the modelled device times
        /// are costed on it; default: the device kind's (pcie5 for device-private, nvlink-c2c for
        /// device-coherent).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(LINK_PROFILES))]
        profile: Option<String>,
    },
    /// Replay an access trace (`hetmem run --trace`) under each placement policy, without
    /// running the program again: the bytes each would move, against the oracle's least.
    Replay {
        /// The trace file.
        trace: std::path::PathBuf,
        /// The policy (all of them when left out).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(hetmem::workload::POLICIES))]
        policy: Option<String>,
        /// The device's memory.
        #[arg(long, default_value = "private", value_parser = ["private", "coherent"])]
        device: String,
        /// Device memory in MiB (default: room for every page up to the trace's highest, as
        /// `hetmem run` sizes its device).
        #[arg(long)]
        capacity: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show how hetmem can serve faults on this machine: kernel, privileges, userfaultfd mode and
    /// features, and what follows for programs using hetmem.
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match run() {
        // `hetmem bench --json | head`: a closed pipe is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // hetmem's debug events (migrations, evictions, writeback, faults served outside signal
    // handlers) on stderr when asked for, e.g. `HETMEM_LOG=hetmem=debug`; silent otherwise.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("HETMEM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.cmd {
        Command::Demo {
            size,
            json,
            plot,
            profile,
            device,
        } => demo(size, json, plot, profile.as_deref(), device.as_deref())?,
        Command::Run {
            workload,
            policy,
            device,
            size,
            rounds,
            seed,
            json,
            trace,
            profile,
        } => run_workload(
            &workload,
            (policy.as_deref(), profile.as_deref()),
            &device,
            (size, rounds, seed),
            json,
            trace.as_deref(),
        )?,
        Command::Replay {
            trace,
            policy,
            device,
            capacity,
            json,
        } => replay(&trace, policy.as_deref(), &device, capacity, json)?,
        Command::Bench { json, quick, only } => bench(json, quick, only)?,
        Command::Info { json } => info(json)?,
    }
    Ok(())
}

/// The link models `--profile` names.
const LINK_PROFILES: [&str; 4] = ["pcie4", "pcie5", "nvlink-c2c", "xgmi"];

/// The large file's rounds in the demo.
const DEMO_ROUNDS: usize = 4;

fn demo(
    size_mib: usize,
    json: bool,
    plot: Option<std::path::PathBuf>,
    profile: Option<&str>,
    device: Option<&str>,
) -> anyhow::Result<()> {
    let device = device.map(|d| {
        if d == "coherent" {
            hetmem::MemoryKind::Coherent
        } else {
            hetmem::MemoryKind::Private
        }
    });
    let profile = match profile {
        None => None,
        Some(n) => Some(hetmem::link::LinkProfile::by_name(n).ok_or_else(|| {
            anyhow::anyhow!("--profile must be one of pcie4, pcie5, nvlink-c2c, xgmi, not {n}")
        })?),
    };
    anyhow::ensure!(
        (1..=16 << 10).contains(&size_mib),
        "--size must be 1 to 16384 MiB, not {size_mib}"
    );
    let mut out = std::io::stdout().lock();
    let mut quiet = Vec::new();
    let anon = if json {
        hetmem::demo::run(&mut quiet)
    } else {
        hetmem::demo::run(&mut out)
    }
    .context("demo failed")?;
    let pb = indicatif::ProgressBar::new(hetmem::bench::demo_run_count(device) as u64);
    if json {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let runs = hetmem::bench::largefile_placements(
        size_mib << 20,
        DEMO_ROUNDS,
        false,
        profile,
        device,
        &mut |p| {
            pb.set_message(format!("large file, {p} placement"));
            pb.inc(1);
        },
    )
    .context("demo (large file) failed")?;
    pb.finish_and_clear();
    if let Some(path) = &plot {
        plot_runs(path, &runs, size_mib).with_context(|| format!("drawing {}", path.display()))?;
    }
    if json {
        let report = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "kernel": kernel_release(),
            "machine": machine(),
            "userfaultfd": uffd_kind(),
            "anonymous": {
                "pages_to_device": anon.pages_to_device,
                "pages_to_system": anon.pages_to_system,
                "cpu_faults": anon.cpu_faults,
                "verified": anon.verified,
            },
            "file_mib": size_mib,
            "rounds": DEMO_ROUNDS,
            "runs": runs,
        });
        print_json(&mut out, &report)?;
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "hetmem demo, part 2: a {size_mib} MiB file processed in place, {DEMO_ROUNDS} rounds of: the \
         device reads all of it, the CPU stores to 1 % of its pages, the device reads all of it; \
         then fsync. Once per placement of the file's pages; on-demand: nothing placed ahead, \
         the device's faults place pages under the space's policy (uvm: migrate, with the \
         UVM-like prefetcher; adaptive: hetmem's own, reads make read-only replicas)."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<10} {:<8} {:<11} {:>9} {:>11} {:>10} {:>10} {:>11} {:>9} {:>7} {:>10} {:>9}",
        "placement",
        "policy",
        "link",
        "wall",
        "device time",
        "to device",
        "to system",
        "link bytes",
        "vs oracle",
        "faults",
        "writeback",
        "verified"
    )?;
    writeln!(out, "{}", "-".repeat(126))?;
    for r in &runs {
        writeln!(
            out,
            "{:<10} {:<8} {:<11} {:>7.0}ms {:>9.1}ms {:>7.1}MiB {:>7.1}MiB {:>8.1}MiB {:>8.2}x {:>7} {:>7.1}MiB {:>9}",
            r.placement,
            r.policy,
            r.profile,
            r.wall_s * 1e3,
            r.modelled_device_s * 1e3,
            mib(r.bytes_to_device),
            mib(r.bytes_to_system),
            mib(r.link_bytes),
            r.link_bytes as f64 / r.oracle_bytes.max(1) as f64,
            r.cpu_faults,
            mib(r.writeback_bytes),
            if r.verified { "yes" } else { "NO" }
        )?;
    }
    writeln!(out, "{}", "-".repeat(126))?;
    writeln!(
        out,
        "wall: this machine (the software device copies with the CPU); device time: modelled by \
         the link model of each device (pcie5 for device-private, nvlink-c2c for \
         device-coherent); vs oracle: link bytes / the least any placement could move for the \
         same accesses (policy::oracle; replicas keep a second copy and can go below it); \
         verified: every device read, the CPU's data and the file after fsync matched a model \
         of every write"
    )?;
    Ok(())
}

/// `bytes` in MiB, for the tables.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Writes `v` as one line of JSON.
fn print_json(out: &mut impl Write, v: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// The device memory `--device` names: private or coherent.
fn memory_kind(device: &str) -> anyhow::Result<hetmem::MemoryKind> {
    match device {
        "private" => Ok(hetmem::MemoryKind::Private),
        "coherent" => Ok(hetmem::MemoryKind::Coherent),
        _ => anyhow::bail!("--device must be private or coherent, not {device}"),
    }
}

fn run_workload(
    workload: &str,
    (policy, profile): (Option<&str>, Option<&str>),
    device: &str,
    (size_mib, rounds, seed): (usize, usize, u64),
    json: bool,
    trace: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=16 << 10).contains(&size_mib),
        "--size must be 1 to 16384 MiB, not {size_mib}"
    );
    anyhow::ensure!(
        (1..=1000).contains(&rounds),
        "--rounds must be 1 to 1000, not {rounds}"
    );
    let coherent = memory_kind(device)? == hetmem::MemoryKind::Coherent;
    let policies: Vec<&str> = match policy {
        Some(p) => vec![p],
        None => hetmem::workload::POLICIES.to_vec(),
    };
    let pages = (size_mib << 20) / hetmem::PAGE_SIZE;
    let mut reports = Vec::new();
    let mut accesses = Vec::new();
    for p in policies {
        let link = profile.and_then(hetmem::link::LinkProfile::by_name);
        let (r, t) = hetmem::workload::run_on(workload, p, coherent, link, pages, rounds, seed)
            .with_context(|| format!("hetmem run {workload} --policy {p}"))?;
        reports.push(r);
        accesses = t;
    }
    if let Some(path) = trace {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        );
        for a in &accesses {
            writeln!(f, "{}", a.to_line())?;
        }
        f.flush()?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        print_json(
            &mut out,
            &serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "kernel": kernel_release(),
                "machine": machine(),
                "runs": reports,
            }),
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{workload}: {size_mib} MiB, {rounds} rounds, seed {seed}, a device-{device} device ({} link)",
        reports.first().map_or("-", |r| r.profile)
    )?;
    writeln!(
        out,
        "{:<14} {:>9} {:>12} {:>12} {:>11} {:>12} {:>9} {:>9} {:>9}",
        "policy",
        "wall",
        "device time",
        "oracle time",
        "link bytes",
        "oracle bytes",
        "vs oracle",
        "faults",
        "verified"
    )?;
    for r in &reports {
        writeln!(
            out,
            "{:<14} {:>7.0}ms {:>10.1}ms {:>10.1}ms {:>8.1}MiB {:>9.1}MiB {:>8.2}x {:>9} {:>9}",
            r.policy,
            r.wall_s * 1e3,
            r.modelled_device_s * 1e3,
            r.oracle_device_s * 1e3,
            mib(r.link_bytes),
            mib(r.oracle_bytes),
            r.link_bytes as f64 / r.oracle_bytes.max(1) as f64,
            r.cpu_faults,
            if r.verified { "yes" } else { "NO" }
        )?;
    }
    Ok(())
}

fn replay(
    path: &std::path::Path,
    policy: Option<&str>,
    device: &str,
    capacity_mib: Option<usize>,
    json: bool,
) -> anyhow::Result<()> {
    use hetmem::policy::oracle::{Costs, lower_bound, with_capacity};
    let kind = memory_kind(device)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut trace = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        trace.push(
            hetmem::policy::replay::parse_access_line(line)
                .with_context(|| format!("{}:{}", path.display(), i + 1))?,
        );
    }
    let pages = trace
        .iter()
        .map(|a| a.page)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    // By default, room for every page up to the highest one, in whole 2 MiB units, and one unit
    // more (as `hetmem run` sizes its device).
    let highest = trace
        .iter()
        .map(|a| a.page)
        .max()
        .map_or(0, |p| p as usize + 1);
    let room = highest.div_ceil(512) * 512 + 512;
    let capacity = capacity_mib.map_or(room, |m| (m << 20) / hetmem::PAGE_SIZE);
    let oracle = if capacity >= highest {
        lower_bound(&trace, kind, &Costs::bytes())
    } else {
        with_capacity(&trace, kind, &Costs::bytes(), capacity)
    };
    let names: Vec<&str> = match policy {
        Some(p) => vec![p],
        None => hetmem::workload::POLICIES.to_vec(),
    };
    let mut rows = Vec::new();
    for n in names {
        let (name, p) = hetmem::workload::policy_named(n)?;
        let b = hetmem::policy::replay::simulate(&trace, &*p, kind, capacity);
        rows.push((name, b));
    }
    let mut out = std::io::stdout().lock();
    if json {
        let runs: Vec<_> = rows
            .iter()
            .map(|(n, b)| {
                serde_json::json!({
                    "policy": n,
                    "bytes": b.bytes_moved(),
                    "migrations": b.migrations,
                    "remote_bytes": b.remote_bytes,
                })
            })
            .collect();
        print_json(
            &mut out,
            &serde_json::json!({
                "accesses": trace.len(),
                "pages": pages,
                "capacity_pages": capacity,
                "device": device,
                "oracle_bytes": oracle.bytes_moved(),
                "runs": runs,
            }),
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: {} accesses to {pages} pages, device-{device} memory for {capacity} pages; the \
         oracle's least: {:.1} MiB",
        path.display(),
        trace.len(),
        mib(oracle.bytes_moved())
    )?;
    writeln!(
        out,
        "{:<14} {:>11} {:>11} {:>13} {:>9}",
        "policy", "bytes", "migrations", "remote bytes", "vs oracle"
    )?;
    for (n, b) in &rows {
        writeln!(
            out,
            "{:<14} {:>8.1}MiB {:>11} {:>10.1}MiB {:>8.2}x",
            n,
            mib(b.bytes_moved()),
            b.migrations,
            mib(b.remote_bytes),
            b.bytes_moved() as f64 / oracle.bytes_moved().max(1) as f64
        )?;
    }
    Ok(())
}

/// Draws the demo's large-file runs: bytes over the link so far, and device memory in use, after
/// each device phase, one line per placement.
fn plot_runs(
    path: &std::path::Path,
    runs: &[hetmem::bench::PlacementRun],
    size_mib: usize,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(360);
    let phases = runs
        .iter()
        .map(|r| r.series.len())
        .max()
        .unwrap_or(1)
        .max(2)
        - 1;
    let colors = [BLACK, RED, BLUE, GREEN, MAGENTA];
    for (area, k, title) in [
        (&top, 0, "bytes over the link so far (MiB)"),
        (&bottom, 1, "device memory in use (MiB)"),
    ] {
        let max = runs
            .iter()
            .flat_map(|r| r.series.iter().map(|s| mib(s[k])))
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("hetmem demo: a {size_mib} MiB file, {title}"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..phases as f64, 0f64..max * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("device phase")
            .y_desc("MiB")
            .draw()?;
        for (r, color) in runs.iter().zip(colors.iter().cycle()) {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    r.series
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, mib(s[k]))),
                    color.stroke_width(2),
                ))?
                .label(format!("{} ({})", r.placement, r.policy))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn bench(json: bool, quick: bool, only: Vec<String>) -> anyhow::Result<()> {
    let pb = indicatif::ProgressBar::new_spinner();
    if json {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let opts = hetmem::bench::BenchOptions {
        quick,
        only: only.clone(),
    };
    let results = hetmem::bench::run(&opts, &mut |what| pb.set_message(what.to_string()))
        .context("bench failed")?;
    pb.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if json {
        let report = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "kernel": kernel_release(),
            "machine": machine(),
            "userfaultfd": uffd_kind(),
            "options": { "quick": quick, "only": only },
            "time": rfc3339_utc(std::time::SystemTime::now()),
            "thp": thp_setting(),
            "results": results,
        });
        print_json(&mut out, &report)?;
        return Ok(());
    }
    // The name columns fit the longest name.
    let w = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max(34);
    writeln!(
        out,
        "{:<w$} {:>12} {:<6}  {:<w$} {:>12}  {:>7}  better",
        "figure", "value", "unit", "baseline (same run)", "value", "ratio"
    )?;
    writeln!(out, "{}", "-".repeat(2 * w + 52))?;
    // Byte counts are shown in MiB in the table (the JSON keeps bytes).
    let show = |v: f64, unit: &str| -> (String, String) {
        if unit == "bytes" && v >= (1 << 20) as f64 {
            (format!("{:.1}", v / (1 << 20) as f64), "MiB".into())
        } else {
            (format!("{v:.3}"), unit.into())
        }
    };
    // Ratios to two decimals, three below 0.1 (so that a small one still reads).
    let ratio = |v: f64| -> String {
        if v.abs() < 0.1 {
            format!("{v:.3}x")
        } else {
            format!("{v:.2}x")
        }
    };
    for r in &results {
        let (v, unit) = show(r.value, &r.unit);
        let bv = r
            .baseline_value
            .map(|b| show(b, &r.unit).0)
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<w$} {:>12} {:<6}  {:<w$} {:>12}  {:>7}  {}",
            r.name,
            v,
            unit,
            r.baseline.as_deref().unwrap_or("-"),
            bv,
            r.ratio.map(ratio).unwrap_or_else(|| "-".into()),
            r.better.as_str(),
        )?;
        // Timed figures (repeated until stable): their spread (and, beside a baseline, the
        // range of the per-repetition ratios) on a line of their own. Exact counts have none.
        if let Some(sp) = &r.spread {
            let ratios = match (sp.ratio_min, sp.ratio_max) {
                (Some(lo), Some(hi)) => {
                    format!(", ratio per repetition {}..{}", ratio(lo), ratio(hi))
                }
                _ => String::new(),
            };
            writeln!(
                out,
                "    {} repetitions{}: {}..{} {}{}",
                sp.reps,
                if sp.stable {
                    ""
                } else {
                    " (the most allowed, not stable)"
                },
                show(sp.min, &r.unit).0,
                show(sp.max, &r.unit).0,
                unit,
                ratios
            )?;
        }
        if let Some(note) = &r.note {
            writeln!(out, "    {note}")?;
        }
    }
    writeln!(out, "{}", "-".repeat(2 * w + 52))?;
    for line in [
        "value: the median of the repetitions on the line below it (after one discarded \
         warm-up; hetmem and its baseline alternate within each), repeated until stable (the \
         median of the per-repetition ratios moved by at most 2 % over the last 3);",
        "figures without a repetitions line are exact counts (the same in every repetition).",
        "ratio: value / baseline; better: which way the value, and so its ratio, is better \
         (lower: a ratio below 1x favours hetmem; higher: above 1x).",
    ] {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The running kernel's release (`uname -r`), or "unknown".
/// The machine a run ran on: architecture, CPUs online, memory (from `/proc/meminfo`).
fn machine() -> serde_json::Value {
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    serde_json::json!({
        "arch": std::env::consts::ARCH,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (mem_kib as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0,
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The system's transparent huge page setting (the bracketed word of
/// /sys/kernel/mm/transparent_hugepage/enabled), or "unknown".
fn thp_setting() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let open = s.find('[')?;
            let close = s[open..].find(']')? + open;
            Some(s[open + 1..close].to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The userfaultfd an address space gets here: "plain" where this user may open one,
/// "user-mode-only" where only that opens, "unavailable" where neither does.
fn uffd_kind() -> &'static str {
    if hetmem::sys::kernel_features(false).is_ok() {
        "plain"
    } else if hetmem::sys::kernel_features(true).is_ok() {
        "user-mode-only"
    } else {
        "unavailable"
    }
}

/// `t` as an RFC 3339 UTC timestamp to the second (`2025-01-31T12:34:56Z`).
fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The userfaultfd features `hetmem info` names, with what hetmem does with each:
/// (name, bit, used, what for / why not).
const UFFD_FEATURES: &[(&str, u32, bool, &str)] = {
    use linux_raw_sys::general as u;
    &[
        (
            "WP",
            u::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            true,
            "write-protects anonymous pages while they migrate to a device",
        ),
        (
            "SIGBUS",
            u::UFFD_FEATURE_SIGBUS,
            true,
            "signal mode (the default): faults served in the faulting thread",
        ),
        (
            "THREAD_ID",
            u::UFFD_FEATURE_THREAD_ID,
            true,
            "thread mode: the faulting thread's id in each fault message",
        ),
        (
            "EVENT_REMAP",
            u::UFFD_FEATURE_EVENT_REMAP,
            true,
            "follows a direct mremap(2) of a managed range",
        ),
        (
            "EVENT_REMOVE",
            u::UFFD_FEATURE_EVENT_REMOVE,
            false,
            "it would block madvise(2) until the event is read",
        ),
        (
            "EVENT_UNMAP",
            u::UFFD_FEATURE_EVENT_UNMAP,
            true,
            "follows a direct munmap(2) of a managed range",
        ),
        (
            "EVENT_FORK",
            u::UFFD_FEATURE_EVENT_FORK,
            false,
            "needs CAP_SYS_PTRACE; fork handlers give the child its copy instead",
        ),
        (
            "MISSING_SHMEM",
            u::UFFD_FEATURE_MISSING_SHMEM,
            true,
            "file mappings: missing pages of the memfd-staged cache",
        ),
        (
            "MISSING_HUGETLBFS",
            u::UFFD_FEATURE_MISSING_HUGETLBFS,
            false,
            "no hugetlbfs mappings",
        ),
        (
            "MINOR_SHMEM",
            u::UFFD_FEATURE_MINOR_SHMEM,
            false,
            "the file cache fills with UFFDIO_COPY (CONTINUE measured slower)",
        ),
        (
            "MINOR_HUGETLBFS",
            u::UFFD_FEATURE_MINOR_HUGETLBFS,
            false,
            "no hugetlbfs mappings",
        ),
        (
            "WP_HUGETLBFS_SHMEM",
            u::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            true,
            "file mappings: write-protect of memfd pages (store tracking)",
        ),
        (
            "WP_UNPOPULATED",
            u::UFFD_FEATURE_WP_UNPOPULATED,
            true,
            "file mappings: write-protect of pages not mapped yet",
        ),
        (
            "WP_ASYNC",
            u::UFFD_FEATURE_WP_ASYNC,
            true,
            "file mappings: dirty tracking without faults (PAGEMAP_SCAN)",
        ),
        (
            "POISON",
            u::UFFD_FEATURE_POISON,
            false,
            "a page lost to an (injected) memory failure is refused by the fault service, \
             which lets the access take SIGBUS as the kernel's poison would",
        ),
        (
            "MOVE",
            u::UFFD_FEATURE_MOVE,
            false,
            "migration copies (UFFDIO_COPY)",
        ),
        (
            "EXACT_ADDRESS",
            u::UFFD_FEATURE_EXACT_ADDRESS,
            false,
            "faults are served by whole pages",
        ),
    ]
};

/// `read_ahead_kb` of the block device holding `dir`'s file system, with the device's
/// major:minor; `None` where `dir` is on no block device (tmpfs, overlay) or it is not readable.
fn read_ahead_kb(dir: &std::path::Path) -> Option<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    if major == 0 {
        return None;
    }
    let sys = format!("/sys/dev/block/{major}:{minor}");
    // A partition has no queue/ of its own: its disk (the parent directory) does.
    ["queue/read_ahead_kb", "../queue/read_ahead_kb"]
        .iter()
        .find_map(|p| std::fs::read_to_string(format!("{sys}/{p}")).ok())
        .and_then(|s| s.trim().parse().ok())
        .map(|kb| (format!("{major}:{minor}"), kb))
}

fn info(json: bool) -> anyhow::Result<()> {
    let uid = rustix::process::getuid().as_raw();
    let euid = hetmem::sys::geteuid();
    let sysctl: Option<u32> = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let plain = hetmem::sys::kernel_features(false);
    let umo = hetmem::sys::kernel_features(true);
    let kind = match (&plain, &umo) {
        (Ok(_), _) => "plain",
        (Err(_), Ok(_)) => "user-mode-only",
        _ => "unavailable",
    };
    let bits = plain.as_ref().or(umo.as_ref()).copied().unwrap_or(0);
    let offered = |bit: u32| bits & u64::from(bit) != 0;
    let features: Vec<&str> = UFFD_FEATURES
        .iter()
        .filter(|f| offered(f.1))
        .map(|f| f.0)
        .collect();
    let known = UFFD_FEATURES.iter().fold(0u64, |a, f| a | u64::from(f.1));
    // What an address space of hetmem's gets here (a check that the whole stack works).
    let space = hetmem::Space::with_config(hetmem::SpaceConfig {
        size: 2 << 20,
        ..Default::default()
    })
    .map(|s| s.user_mode_only());
    let thp = thp_setting();
    let tmp = std::env::temp_dir();
    let ra = read_ahead_kb(&tmp);

    // What follows for a program using hetmem.
    let mut follows: Vec<String> = Vec::new();
    match kind {
        "plain" => follows.push(
            "thread mode serves kernel-mode accesses: system calls that touch a missing managed \
             page (read(2) into it, O_DIRECT) are served in Thread-mode mappings, and get EFAULT \
             in Signal-mode mappings (the default)"
                .into(),
        ),
        "user-mode-only" => follows.push(format!(
            "unprivileged (vm.unprivileged_userfaultfd = {}, no CAP_SYS_PTRACE): system calls \
             that touch a missing managed page get EFAULT in both fault modes; move data with \
             Space::cpu_read/cpu_write or a FileCache's read_at/write_at; root or \
             vm.unprivileged_userfaultfd = 1 lifts this",
            sysctl.map_or("?".into(), |v| v.to_string())
        )),
        _ => follows.push(format!(
            "hetmem cannot run here: no userfaultfd opens ({}; a kernel without \
             CONFIG_USERFAULTFD, or a seccomp filter)",
            umo.as_ref().err().map_or(String::new(), |e| e.to_string())
        )),
    }
    if kind == "plain" && sysctl == Some(0) && euid == 0 {
        follows.push(
            "other users here get a user-mode-only userfaultfd (vm.unprivileged_userfaultfd = 0): \
             for them, system calls that touch a missing managed page get EFAULT in both fault \
             modes"
                .into(),
        );
    }
    if kind != "unavailable" {
        follows.push(
            "CPU code is served in both fault modes; a thread that blocks SIGBUS is killed when \
             it touches a device-resident page of a Signal-mode mapping"
                .into(),
        );
        for (name, bit, used, what) in UFFD_FEATURES {
            if *used && !offered(*bit) {
                follows.push(format!(
                    "the kernel lacks {name}: what needs it fails to set up ({what})"
                ));
            }
        }
    }
    if let Err(e) = &space {
        follows.push(format!("creating an address space failed here: {e}"));
    }
    follows.push(match thp.as_str() {
        "never" => "THP never: the kernel's first touch of anonymous memory takes a fault per \
                    4 KiB page, as hetmem's does"
            .into(),
        "always" => "THP always: the kernel's first touch of anonymous memory takes one fault \
                     per 2 MiB page; hetmem installs 4 KiB pages (read first-touch figures \
                     with that in mind)"
            .into(),
        t => format!(
            "THP {t}: the kernel's first touch of anonymous memory takes one fault per 2 MiB \
             page where the program asks (MADV_HUGEPAGE), one per 4 KiB page otherwise; hetmem \
             installs 4 KiB pages"
        ),
    });
    if let Some((_, kb)) = &ra
        && *kb >= 1024
    {
        follows.push(format!(
            "read_ahead_kb = {kb} under {}: each cold fault of a kernel mmap of a file there \
             reads up to {kb} KiB around it unless MADV_RANDOM",
            tmp.display()
        ));
    }

    let mut out = std::io::stdout().lock();
    if json {
        let report = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "kernel": kernel_release(),
            "machine": machine(),
            "uid": uid,
            "euid": euid,
            "unprivileged_userfaultfd": sysctl,
            "userfaultfd": kind,
            "plain_userfaultfd": plain.is_ok(),
            "plain_userfaultfd_error": plain.as_ref().err().map(|e| e.to_string()),
            "user_mode_only_userfaultfd": umo.is_ok(),
            "features_bits": bits,
            "features": features,
            "features_unnamed_bits": bits & !known,
            "uses": UFFD_FEATURES.iter().filter(|f| f.2).map(|f| serde_json::json!({
                "feature": f.0, "offered": offered(f.1), "for": f.3,
            })).collect::<Vec<_>>(),
            "not_used": UFFD_FEATURES.iter().filter(|f| !f.2).map(|f| serde_json::json!({
                "feature": f.0, "offered": offered(f.1), "why": f.3,
            })).collect::<Vec<_>>(),
            "space": match &space {
                Ok(u) => serde_json::json!({ "ok": true, "user_mode_only": u }),
                Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
            },
            "default_fault_mode": "signal",
            "thp": thp,
            "temp_dir": tmp.display().to_string(),
            "read_ahead_kb": ra.as_ref().map(|r| r.1),
            "temp_dir_device": ra.as_ref().map(|r| r.0.clone()),
            "follows": follows,
        });
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "hetmem {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "kernel:                      {}", kernel_release())?;
    writeln!(out, "uid / euid:                  {uid} / {euid}")?;
    writeln!(
        out,
        "vm.unprivileged_userfaultfd: {}",
        sysctl.map_or("unknown".into(), |v| v.to_string())
    )?;
    writeln!(
        out,
        "userfaultfd:                 {kind} (plain: {}; UFFD_USER_MODE_ONLY: {})",
        match &plain {
            Ok(_) => "opens".to_string(),
            Err(e) => format!("refused: {e}"),
        },
        match &umo {
            Ok(_) => "opens".to_string(),
            Err(e) => format!("refused: {e}"),
        }
    )?;
    writeln!(
        out,
        "address space:               {}",
        match &space {
            Ok(true) => "ok (user-mode-only userfaultfd)".to_string(),
            Ok(false) => "ok (plain userfaultfd)".to_string(),
            Err(e) => format!("failed: {e}"),
        }
    )?;
    writeln!(
        out,
        "default fault mode:          signal (served in the faulting thread)"
    )?;
    writeln!(out, "transparent huge pages:      {thp}")?;
    writeln!(
        out,
        "read_ahead_kb:               {}",
        match &ra {
            Some((dev, kb)) => format!("{kb} ({} on block device {dev})", tmp.display()),
            None => format!("- ({} is on no block device)", tmp.display()),
        }
    )?;
    writeln!(
        out,
        "\nuserfaultfd features offered by the kernel ({bits:#x}{}):",
        if bits & !known != 0 {
            format!("; unnamed bits {:#x}", bits & !known)
        } else {
            String::new()
        }
    )?;
    for (name, bit, used, what) in UFFD_FEATURES {
        writeln!(
            out,
            "  {:<3} {name:<19} {}: {what}",
            if offered(*bit) { "yes" } else { "no" },
            if *used { "used" } else { "not used" },
        )?;
    }
    writeln!(out, "\nwhat follows:")?;
    for f in &follows {
        writeln!(out, "  - {f}")?;
    }
    Ok(())
}
