//! `hetmem run`: seeded, reproducible workloads run by real CPU accesses and the software device
//! under a placement policy, each reported against the offline oracle
//! ([`crate::policy::oracle`]) for the same accesses.
//!
//! | workload | what it does, over `pages` pages of anonymous memory, `rounds` times |
//! |---|---|
//! | `streaming` | the device reads every page in order |
//! | `pingpong` | the device reads every page, then the CPU reads every page (one word each) |
//! | `random` | the device reads `pages` pages chosen at random (seeded), the CPU reads one in eight of them |
//! | `stencil` | the device reads every page (the interior's sweep), then the CPU reads the halo: the first and the last sixteenth of the pages |
//! | `graph` | the device reads `pages` pages drawn from a skewed (power-law-like) distribution: a few hot pages, a long cold tail (seeded) |
//! | `oversubscribed` | `streaming` with device memory for two thirds of the pages (150 % oversubscription): migrating means evicting; the oracle here is the Belady placement for that capacity ([`crate::policy::oracle::with_capacity`]), not the unbounded bound |
//!
//! The device is device-private (PCIe 5 link model), or device-coherent (NVLink-C2C: the CPU
//! reads pages there in place, a cache line over the link each). A policy decides what a device
//! fault does: `default` maps the pages remotely (reads over the link), `uvm` ([`UvmPolicy`])
//! migrates on demand with its density prefetcher and thrashing detection, `coherent-aware`
//! ([`CoherentAwarePolicy`]) migrates whole units and never brings back what the CPU can use in
//! place. Link bytes are what the link
//! model was charged (migrations, device reads of system memory); the oracle's are the least any
//! placement could move for the same accesses (a device read is a whole page, a CPU read a
//! 64-byte line). Every byte read is checked against what was written.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::addr::PAGE_SIZE;
use crate::device::{DeviceConfig, SoftDevice};
use crate::error::{Error, Result};
use crate::link::{LinkProfile, Traffic};
use crate::policy::adaptive::AdaptivePolicy;
use crate::policy::oracle::{Access, Agent, Costs, lower_bound, with_capacity};
use crate::policy::uvm::UvmPolicy;
use crate::policy::{CoherentAwarePolicy, DefaultPolicy, Policy};
use crate::pool::MemoryKind;
use crate::space::{Space, SpaceConfig};
use crate::sys::Prot;

/// The workloads, by name.
pub const WORKLOADS: [&str; 6] = [
    "streaming",
    "pingpong",
    "random",
    "stencil",
    "graph",
    "oversubscribed",
];
/// The policies, by name.
pub const POLICIES: [&str; 4] = ["default", "uvm", "coherent-aware", "adaptive"];

/// What one run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The workload.
    pub workload: &'static str,
    /// The policy.
    pub policy: &'static str,
    /// The device's memory: `private` or `coherent`.
    pub device: &'static str,
    /// The device's link model (`pcie5`, `nvlink-c2c`, ...): the modelled device times'.
    pub profile: &'static str,
    /// Pages, rounds, seed.
    pub pages: usize,
    /// Rounds.
    pub rounds: usize,
    /// Seed of the random workload.
    pub seed: u64,
    /// Wall time on this machine.
    pub wall_s: f64,
    /// Modelled device time (the link model).
    pub modelled_device_s: f64,
    /// Bytes over the link: migrations, device reads of system memory.
    pub link_bytes: u64,
    /// The least bytes any placement could move for the same accesses (the oracle with
    /// [`Costs::bytes`]).
    pub oracle_bytes: u64,
    /// The least modelled device time any placement could reach (the oracle with the link
    /// profile's costs).
    pub oracle_device_s: f64,
    /// CPU faults.
    pub cpu_faults: u64,
    /// Fault passes of the device's reads.
    pub device_faults: u64,
    /// Every byte read matched.
    pub verified: bool,
}

/// The word every page holds: its page number, plus one.
fn word(p: usize) -> u32 {
    p as u32 + 1
}

/// Runs `workload` under `policy` over `pages` pages for `rounds` rounds (`seed` for the random
/// one). Errors: an unknown workload or policy (EINVAL), a wrong byte read.
pub fn run(
    workload: &str,
    policy: &str,
    coherent: bool,
    pages: usize,
    rounds: usize,
    seed: u64,
) -> Result<RunReport> {
    run_traced(workload, policy, coherent, pages, rounds, seed).map(|(r, _)| r)
}

/// The policy named `name` (`default`, `uvm`, `coherent-aware`).
pub fn policy_named(name: &str) -> Result<(&'static str, Arc<dyn Policy>)> {
    Ok(match name {
        "default" => ("default", Arc::new(DefaultPolicy)),
        "uvm" => ("uvm", Arc::new(UvmPolicy::new())),
        "coherent-aware" => ("coherent-aware", Arc::new(CoherentAwarePolicy)),
        "adaptive" => ("adaptive", Arc::new(AdaptivePolicy::new())),
        _ => {
            return Err(Error::Invalid(
                "unknown policy (default, uvm, coherent-aware, adaptive)",
            ));
        }
    })
}

/// [`run`], also returning the accesses it made (for `hetmem run --trace`, and
/// [`crate::policy::replay`]).
pub fn run_traced(
    workload: &str,
    policy: &str,
    coherent: bool,
    pages: usize,
    rounds: usize,
    seed: u64,
) -> Result<(RunReport, Vec<Access>)> {
    run_on(workload, policy, coherent, None, pages, rounds, seed)
}

/// [`run_traced`] with the device's link model of `profile` (`None`: its kind's default, PCIe 5
/// for device-private memory, NVLink-C2C for device-coherent memory): the modelled device
/// times, the run's and the oracle's, are costed on it.
pub fn run_on(
    workload: &str,
    policy: &str,
    coherent: bool,
    profile: Option<LinkProfile>,
    pages: usize,
    rounds: usize,
    seed: u64,
) -> Result<(RunReport, Vec<Access>)> {
    let workload = WORKLOADS
        .into_iter()
        .find(|w| *w == workload)
        .ok_or(Error::Invalid(
            "unknown workload (streaming, pingpong, random, stencil, graph, oversubscribed)",
        ))?;
    let (policy, pol) = policy_named(policy)?;
    if pages == 0 || rounds == 0 {
        return Err(Error::ZeroLength);
    }
    let len = pages
        .checked_mul(PAGE_SIZE)
        .filter(|l| *l <= 16 << 30)
        .ok_or(Error::Invalid("a workload of at most 16 GiB"))?;
    let space = Space::with_config(SpaceConfig {
        size: (4 * len).max(1 << 30),
        stash: 2 << 20,
        ..SpaceConfig::default()
    })?;
    // Oversubscribed: device memory for two thirds of the pages (whole 2 MiB units, at least one).
    let capacity = if workload == "oversubscribed" {
        (len * 2 / 3 / (2 << 20)).max(1) * (2 << 20)
    } else {
        len + (2 << 20)
    };
    let kind = if coherent {
        MemoryKind::Coherent
    } else {
        MemoryKind::Private
    };
    let dev = match profile {
        Some(profile) => SoftDevice::with_link(DeviceConfig { kind, capacity }, profile)?,
        None if coherent => SoftDevice::coherent(capacity)?,
        None => SoftDevice::private(capacity)?,
    };
    let m = dev.mirror(&space)?;
    let a = space.map_anon(len, Prot::ReadWrite)?;
    let probe = space.probe(a, len)?;
    for p in 0..pages {
        probe.store_u32(a.add(p * PAGE_SIZE), word(p))?;
    }
    space.set_policy(pol);
    let link = dev.link();
    let kinds = [
        Traffic::Migration,
        Traffic::DeviceRemote,
        Traffic::CpuRemote,
    ];
    let before = kinds.map(|t| link.traffic(t).bytes);
    let report0 = dev.link_report();
    let faults0 = space.stats().cpu_faults;
    let mut trace = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut device_faults = 0;
    let mut dev_read = |p: usize, trace: &mut Vec<Access>| -> Result<()> {
        let out = m.read(a.add(p * PAGE_SIZE), PAGE_SIZE, &mut page)?;
        device_faults += out.faults;
        if page[..4] != word(p).to_ne_bytes() {
            return Err(Error::Invalid("the device read a wrong byte"));
        }
        trace.push(Access {
            page: p as u64,
            by: Agent::Device,
            bytes: PAGE_SIZE as u32,
        });
        Ok(())
    };
    let cpu_read = |p: usize, trace: &mut Vec<Access>| -> Result<()> {
        if probe.load_u32(a.add(p * PAGE_SIZE))? != word(p) {
            return Err(Error::Invalid("the CPU read a wrong byte"));
        }
        // A CPU read of a page in device-coherent memory crosses the link (a cache line),
        // without a fault hetmem could see: declared to the link model.
        if coherent
            && matches!(
                space.residency(a.add(p * PAGE_SIZE)),
                crate::space::Residency::Coherent(_)
            )
        {
            dev.declare_cpu_access(64);
        }
        trace.push(Access {
            page: p as u64,
            by: Agent::Cpu,
            bytes: 64,
        });
        Ok(())
    };
    let mut x = seed | 1;
    let mut rand = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let t = Instant::now();
    for _ in 0..rounds {
        match workload {
            "streaming" | "oversubscribed" => {
                for p in 0..pages {
                    dev_read(p, &mut trace)?;
                }
            }
            "pingpong" => {
                for p in 0..pages {
                    dev_read(p, &mut trace)?;
                }
                for p in 0..pages {
                    cpu_read(p, &mut trace)?;
                }
            }
            "stencil" => {
                for p in 0..pages {
                    dev_read(p, &mut trace)?;
                }
                let halo = pages.div_ceil(16);
                for p in (0..halo).chain(pages.saturating_sub(halo)..pages) {
                    cpu_read(p, &mut trace)?;
                }
            }
            "graph" => {
                for _ in 0..pages {
                    // The square of a uniform draw: page p is drawn with density ~ 1/sqrt(p).
                    let u = rand(pages);
                    let p = u * u / pages;
                    dev_read(p, &mut trace)?;
                }
            }
            _ => {
                for k in 0..pages {
                    let p = rand(pages);
                    dev_read(p, &mut trace)?;
                    if k % 8 == 0 {
                        cpu_read(p, &mut trace)?;
                    }
                }
            }
        }
    }
    let wall_s = t.elapsed().as_secs_f64();
    let after = kinds.map(|t| link.traffic(t).bytes);
    let link_bytes = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    let (oracle, fastest) = if workload == "oversubscribed" {
        let frames = capacity / PAGE_SIZE;
        (
            with_capacity(&trace, kind, &Costs::bytes(), frames),
            with_capacity(&trace, kind, &Costs::from_profile(&link.profile()), frames),
        )
    } else {
        (
            lower_bound(&trace, kind, &Costs::bytes()),
            lower_bound(&trace, kind, &Costs::from_profile(&link.profile())),
        )
    };
    Ok((
        RunReport {
            workload,
            policy,
            device: if coherent { "coherent" } else { "private" },
            profile: link.profile().name,
            pages,
            rounds,
            seed,
            wall_s,
            modelled_device_s: dev.link_report().since(&report0).total_ns() as f64 / 1e9,
            link_bytes,
            oracle_bytes: oracle.bytes_moved(),
            oracle_device_s: fastest.cost_ns / 1e9,
            cpu_faults: space.stats().cpu_faults - faults0,
            device_faults,
            verified: true,
        },
        trace,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_names_and_empty_runs_are_errors() {
        assert!(super::run("nope", "default", false, 1, 1, 0).is_err());
        assert!(super::run("streaming", "nope", false, 1, 1, 0).is_err());
    }
}
