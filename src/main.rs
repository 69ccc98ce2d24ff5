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
    /// Run an end-to-end scenario on the built-in software device and show what happened.
    Demo,
    /// Measure fault, migration and first-touch costs against baselines measured in the same run.
    Bench {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Smaller sizes, fewer repetitions.
        #[arg(long)]
        quick: bool,
    },
    /// Show how hetmem can serve faults on this machine (privileges, userfaultfd mode).
    Info,
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
    match cli.cmd {
        Command::Demo => {
            let mut out = std::io::stdout().lock();
            hetmem::demo::run(&mut out).context("demo failed")?;
        }
        Command::Bench { json, quick } => bench(json, quick)?,
        Command::Info => info()?,
    }
    Ok(())
}

fn bench(json: bool, quick: bool) -> anyhow::Result<()> {
    let pb = indicatif::ProgressBar::new_spinner();
    if json {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let opts = hetmem::bench::BenchOptions { quick };
    let results = hetmem::bench::run(&opts, &mut |what| pb.set_message(what.to_string()))
        .context("bench failed")?;
    pb.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &serde_json::json!({ "results": results }))?;
        writeln!(out)?;
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
        "{:<w$} {:>12} {:<6}  {:<w$} {:>12}  {:>7}",
        "figure", "value", "unit", "baseline (same run)", "value", "ratio"
    )?;
    writeln!(out, "{}", "-".repeat(2 * w + 44))?;
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
            "{:<w$} {:>12} {:<6}  {:<w$} {:>12}  {:>7}",
            r.name,
            v,
            unit,
            r.baseline.as_deref().unwrap_or("-"),
            bv,
            r.ratio.map(ratio).unwrap_or_else(|| "-".into()),
        )?;
        // Figures repeated until stable: their spread (and, beside a baseline, the range of
        // the per-repetition ratios) on a line of their own.
        if let Some(sp) = &r.spread {
            let ratios = match (sp.ratio_min, sp.ratio_max) {
                (Some(lo), Some(hi)) => {
                    format!(", ratio per repetition {}..{}", ratio(lo), ratio(hi))
                }
                _ => String::new(),
            };
            writeln!(
                out,
                "    {} repetitions: {}..{} {}{}",
                sp.reps,
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
    Ok(())
}

fn info() -> anyhow::Result<()> {
    let space = hetmem::Space::with_config(hetmem::SpaceConfig {
        size: 2 << 20,
        ..Default::default()
    })
    .context("cannot create an address space (userfaultfd unavailable?)")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "effective uid:        {}", hetmem::sys::geteuid())?;
    writeln!(
        out,
        "userfaultfd:          {}",
        if space.user_mode_only() {
            "user-mode-only (unprivileged): system calls that touch a device-resident page get EFAULT in every mode"
        } else {
            "full: thread-mode mappings also serve system calls that touch device-resident pages"
        }
    )?;
    writeln!(
        out,
        "default fault mode:   signal (served in the faulting thread)"
    )?;
    Ok(())
}
