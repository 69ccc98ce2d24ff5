//! Replay: what a placement [`Policy`] would have moved for a recorded access trace, without
//! running the program again. The mechanisms are simulated the way hetmem runs them, page by
//! page:
//!
//! * a device access to a page its page table maps costs nothing in device memory and the
//!   access's bytes over the link for a page in system memory; to a page it does not map, the
//!   device faults and asks [`Policy::device_fault`]: [`Placement::Migrate`] migrates the
//!   request and its [`Prefetch`] window to the device (4 KiB each over the link; when the device
//!   is full, [`Policy::device_full`] decides: evict the next page round robin, or leave the page
//!   where it is) and maps them; [`Placement::MapRemote`] maps them where they are;
//!   [`Placement::Replicate`] gives the device read-only copies (4 KiB each; when the device is
//!   full, [`Policy::device_full`] decides: drop the oldest replica outside the fault's window,
//!   which costs nothing, or leave the page where it is) and leaves the pages where they are;
//!   a policy's access counters ([`Policy::access_counters`]) count the device's remote
//!   accesses per region, and a region that reaches the threshold is placed as
//!   [`Policy::remote_accesses`] says (the trace's pages in it);
//! * a CPU access to a page in device-private memory asks [`Policy::cpu_fault`] and brings the
//!   page back (4 KiB; the device's entry goes); in device-coherent memory it reads in place
//!   (its bytes over the link); in system memory, replicated or not, it costs nothing (trace
//!   accesses are reads).
//!
//! Prefetch windows are aligned blocks of the page numbering (the trace's pages, as one mapping,
//! up to the highest page the trace names),
//! `MigrateBackPage` and `MigrateBack` both bring back the faulting page (the trace has no
//! 2 MiB units). The result is a [`Bound`] (its `cost_ns` counts bytes), comparable with the
//! oracle's ([`super::oracle::lower_bound`] with [`super::oracle::Costs::bytes`]).
//!
//! # Trace lines
//!
//! One access per line, JSON: `{"ev":"access","by":"device","page":12,"bytes":4096}` (`by` is
//! `device` or `cpu`). [`Access::to_line`] writes one, [`parse_access_line`] reads one.

use std::collections::HashMap;

use super::oracle::{Access, Agent, Bound};
use super::{
    AccessCounters, CpuFault, DeviceFault, DeviceFull, DeviceFullAction, Placement, Policy,
    Prefetch, RemoteAccesses,
};
use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::error::{Error, Result};
use crate::pool::{MemoryKind, Owner};

impl Access {
    /// The access as a trace line (see the module doc).
    pub fn to_line(&self) -> String {
        let by = match self.by {
            Agent::Cpu => "cpu",
            Agent::Device => "device",
        };
        format!(
            "{{\"ev\":\"access\",\"by\":\"{by}\",\"page\":{},\"bytes\":{}}}",
            self.page, self.bytes
        )
    }
}

/// Reads a trace line back ([`Error::Invalid`] if it is not an access line).
pub fn parse_access_line(line: &str) -> Result<Access> {
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|_| Error::Invalid("a trace line is one JSON object"))?;
    if v.get("ev").and_then(|x| x.as_str()) != Some("access") {
        return Err(Error::Invalid("not an access line"));
    }
    let by = match v.get("by").and_then(|x| x.as_str()) {
        Some("cpu") => Agent::Cpu,
        Some("device") => Agent::Device,
        _ => return Err(Error::Invalid("an access's `by` is cpu or device")),
    };
    let num = |k: &str| v.get(k).and_then(|x| x.as_u64());
    let page = num("page").ok_or(Error::Invalid("an access needs a page"))?;
    let bytes = num("bytes")
        .filter(|b| *b <= PAGE_SIZE as u64)
        .ok_or(Error::Invalid("an access's bytes are at most a page"))? as u32;
    Ok(Access { page, by, bytes })
}

/// Where a page is in the simulation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loc {
    System,
    Device,
    /// In system memory, with a read-only copy on the device.
    Replica,
}

/// Replays `trace` under `policy` with a device of `kind` and room for `capacity` pages: the
/// bytes it would move (see the module doc).
pub fn simulate(trace: &[Access], policy: &dyn Policy, kind: MemoryKind, capacity: usize) -> Bound {
    let owner = Owner(1);
    let mut loc: HashMap<u64, Loc> = HashMap::new();
    let mut mapped: HashMap<u64, bool> = HashMap::new();
    // Device-resident pages in the order they arrived (the round-robin hand).
    let mut resident: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let mut b = Bound::default();
    // Replicas in the order they were made (the oldest is dropped first).
    let mut reps: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let addr = |p: u64| VirtAddr((p as usize).wrapping_mul(PAGE_SIZE) & ((1 << 47) - 1));
    // Access counters: per region, the device's remote accesses since the last notification.
    let counting = AccessCounters::unpack(AccessCounters::pack(policy.access_counters()));
    let mut counts: HashMap<u64, u32> = HashMap::new();
    let last_page = trace.iter().map(|a| a.page).max().unwrap_or(0);
    // The question a full device asks about page `p` with `used` pages in use.
    let full = |p: u64, used: usize| DeviceFull {
        owner,
        kind,
        addr: addr(p),
        capacity_pages: capacity,
        used_pages: used,
    };
    let migrate_in = |p: u64,
                      loc: &mut HashMap<u64, Loc>,
                      mapped: &mut HashMap<u64, bool>,
                      resident: &mut std::collections::VecDeque<u64>,
                      reps: &mut std::collections::VecDeque<u64>,
                      b: &mut Bound| {
        if loc.get(&p) == Some(&Loc::Device) {
            return;
        }
        if loc.get(&p) == Some(&Loc::Replica) {
            // The migration's invalidation drops the replica first.
            reps.retain(|&r| r != p);
            loc.insert(p, Loc::System);
        }
        if resident.len() + reps.len() >= capacity {
            match policy.device_full(&full(p, resident.len() + reps.len())) {
                // A replica is the cheapest victim: dropped, nothing copied back.
                DeviceFullAction::EvictAndRetry if !reps.is_empty() => {
                    let v = reps.pop_front().expect("not empty");
                    loc.insert(v, Loc::System);
                    mapped.remove(&v);
                }
                DeviceFullAction::EvictAndRetry if !resident.is_empty() => {
                    let v = resident.pop_front().expect("not empty");
                    loc.insert(v, Loc::System);
                    mapped.remove(&v);
                    b.migrations += 1;
                    b.cost_ns += PAGE_SIZE as f64;
                }
                _ => return,
            }
        }
        loc.insert(p, Loc::Device);
        resident.push_back(p);
        b.migrations += 1;
        b.cost_ns += PAGE_SIZE as f64;
    };
    for a in trace {
        let here = *loc.get(&a.page).unwrap_or(&Loc::System);
        match a.by {
            Agent::Device => {
                if !mapped.contains_key(&a.page) {
                    let d = policy.device_fault(&DeviceFault {
                        owner,
                        kind,
                        start: addr(a.page),
                        end: addr(a.page + 1),
                        write: false,
                    });
                    let block = match d.prefetch {
                        Prefetch::Request => 1,
                        p => p.block_pages() as u64,
                    };
                    let first = a.page / block * block;
                    // Clamped to the mapping: the trace's pages.
                    for p in first..(first + block).min(last_page + 1) {
                        match d.placement {
                            Placement::Migrate => migrate_in(
                                p,
                                &mut loc,
                                &mut mapped,
                                &mut resident,
                                &mut reps,
                                &mut b,
                            ),
                            Placement::Replicate if kind == MemoryKind::Coherent => migrate_in(
                                p,
                                &mut loc,
                                &mut mapped,
                                &mut resident,
                                &mut reps,
                                &mut b,
                            ),
                            Placement::Replicate
                                if loc.get(&p).is_none_or(|l| *l == Loc::System) =>
                            {
                                if resident.len() + reps.len() >= capacity {
                                    let victim = reps
                                        .iter()
                                        .position(|v| !(first..first + block).contains(v));
                                    let q = full(p, resident.len() + reps.len());
                                    match (policy.device_full(&q), victim) {
                                        (DeviceFullAction::EvictAndRetry, Some(i)) => {
                                            let v = reps.remove(i).expect("found");
                                            loc.insert(v, Loc::System);
                                            mapped.remove(&v);
                                        }
                                        _ => {
                                            mapped.insert(p, true);
                                            continue;
                                        }
                                    }
                                }
                                loc.insert(p, Loc::Replica);
                                reps.push_back(p);
                                b.migrations += 1;
                                b.cost_ns += PAGE_SIZE as f64;
                            }
                            _ => {}
                        }
                        mapped.insert(p, true);
                    }
                }
                if loc
                    .get(&a.page)
                    .is_none_or(|l| !matches!(l, Loc::Device | Loc::Replica))
                {
                    b.remote_bytes += a.bytes as u64;
                    b.cost_ns += a.bytes as f64;
                    if let Some((log2, threshold)) = counting {
                        let region = a.page >> log2;
                        let n = counts.entry(region).or_insert(0);
                        *n += 1;
                        if *n >= threshold {
                            *n = 0;
                            let (s, e) =
                                (region << log2, ((region + 1) << log2).min(last_page + 1));
                            let notice = RemoteAccesses {
                                owner,
                                kind,
                                start: addr(region << log2),
                                end: addr((region + 1) << log2),
                                accesses: threshold,
                            };
                            match policy.remote_accesses(&notice) {
                                Placement::MapRemote => {}
                                Placement::Replicate if kind == MemoryKind::Private => {
                                    for p in s..e {
                                        if loc.get(&p).is_none_or(|l| *l == Loc::System)
                                            && resident.len() + reps.len() < capacity
                                        {
                                            loc.insert(p, Loc::Replica);
                                            reps.push_back(p);
                                            mapped.insert(p, true);
                                            b.migrations += 1;
                                            b.cost_ns += PAGE_SIZE as f64;
                                        }
                                    }
                                }
                                _ => {
                                    for p in s..e {
                                        migrate_in(
                                            p,
                                            &mut loc,
                                            &mut mapped,
                                            &mut resident,
                                            &mut reps,
                                            &mut b,
                                        );
                                        mapped.insert(p, true);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Agent::Cpu => match (here, kind) {
                (Loc::System | Loc::Replica, _) => {}
                (Loc::Device, MemoryKind::Coherent) => {
                    b.remote_bytes += a.bytes as u64;
                    b.cost_ns += a.bytes as f64;
                }
                (Loc::Device, _) => {
                    let _ = policy.cpu_fault(&CpuFault {
                        addr: addr(a.page),
                        write: false,
                        owner,
                        kind,
                        large: false,
                    });
                    loc.insert(a.page, Loc::System);
                    mapped.remove(&a.page);
                    resident.retain(|&r| r != a.page);
                    b.migrations += 1;
                    b.cost_ns += PAGE_SIZE as f64;
                }
            },
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::super::DefaultPolicy;
    use super::super::adaptive::AdaptivePolicy;
    use super::super::oracle::{Costs, lower_bound};
    use super::super::uvm::UvmPolicy;
    use super::*;

    fn dev(page: u64) -> Access {
        Access {
            page,
            by: Agent::Device,
            bytes: PAGE_SIZE as u32,
        }
    }

    #[test]
    fn lines_round_trip_and_bad_lines_are_errors() {
        let a = Access {
            page: 12,
            by: Agent::Cpu,
            bytes: 64,
        };
        assert_eq!(parse_access_line(&a.to_line()).unwrap(), a);
        assert!(parse_access_line("{}").is_err());
        assert!(parse_access_line("not json").is_err());
        assert!(parse_access_line(r#"{"ev":"access","by":"gpu","page":1,"bytes":1}"#).is_err());
        assert!(parse_access_line(r#"{"ev":"access","by":"cpu","page":1,"bytes":99999}"#).is_err());
    }

    #[test]
    fn streaming_under_the_default_policy_reads_remotely_every_round() {
        // 4 rounds over 16 pages: the device maps them remotely once, reads 4 KiB each time.
        let t: Vec<Access> = (0..4).flat_map(|_| (0..16).map(dev)).collect();
        let b = simulate(&t, &DefaultPolicy, MemoryKind::Private, 64);
        assert_eq!((b.migrations, b.remote_bytes), (0, 4 * 16 * 4096));
    }

    #[test]
    fn streaming_under_the_uvm_like_policy_migrates_once_and_meets_the_oracle() {
        let t: Vec<Access> = (0..4).flat_map(|_| (0..64).map(dev)).collect();
        let b = simulate(&t, &UvmPolicy::new(), MemoryKind::Private, 1024);
        let o = lower_bound(&t, MemoryKind::Private, &Costs::bytes());
        assert_eq!(b.bytes_moved(), o.bytes_moved());
        assert_eq!(b.migrations, 64);
    }

    #[test]
    fn ping_pong_under_the_adaptive_policy_replicates_once_and_the_cpu_reads_in_place() {
        // 4 rounds of: the device reads 64 pages, the CPU reads each. Replicas: 64 pages
        // move once; the oracle (one copy of each page) must move a page per access pair.
        let t: Vec<Access> = (0..4)
            .flat_map(|_| {
                (0..64).map(dev).chain((0..64).map(|p| Access {
                    page: p,
                    by: Agent::Cpu,
                    bytes: 64,
                }))
            })
            .collect();
        let b = simulate(&t, &AdaptivePolicy::new(), MemoryKind::Private, 1024);
        assert_eq!((b.migrations, b.remote_bytes), (64, 0));
        let o = lower_bound(&t, MemoryKind::Private, &Costs::bytes());
        assert_eq!(o.bytes_moved(), 4 * 64 * 4096);
        // The UVM-like policy migrates and pulls back: at least twice its bytes.
        let u = simulate(&t, &UvmPolicy::new(), MemoryKind::Private, 1024);
        assert!(
            u.bytes_moved() >= 2 * b.bytes_moved(),
            "{}",
            u.bytes_moved()
        );
    }

    #[test]
    fn a_stream_larger_than_the_device_keeps_what_fits_under_the_adaptive_policy() {
        // 12 pages (one per 2 MiB region: no prefetch window) streamed 3 times through room
        // for 8. Round 1: 8 replicas, then the last 4 (new pages) take the place of the oldest
        // 4. Rounds 2 and 3: those 4, having lost their place once, are read over the link: 12
        // copies + 2 × 4 remote reads, as many bytes as Belady's 8 copies + 3 × 4 remote reads.
        let t: Vec<Access> = (0..3).flat_map(|_| (0..12).map(|k| dev(k * 512))).collect();
        let b = simulate(&t, &AdaptivePolicy::new(), MemoryKind::Private, 8);
        assert_eq!(b.migrations, 12);
        assert_eq!(b.remote_bytes, 2 * 4 * 4096);
    }

    #[test]
    fn the_coherent_aware_policy_moves_a_page_once_and_the_cpu_reads_it_in_place() {
        // 3 rounds of: the device reads 8 pages, the CPU reads a line of each. On a coherent
        // device the first fault migrates the whole unit (here the 8 pages of the trace), and
        // the CPU's reads cross the link (64 bytes each) without moving anything back.
        let t: Vec<Access> = (0..3)
            .flat_map(|_| {
                (0..8).map(dev).chain((0..8).map(|p| Access {
                    page: p,
                    by: Agent::Cpu,
                    bytes: 64,
                }))
            })
            .collect();
        let b = simulate(
            &t,
            &super::super::CoherentAwarePolicy,
            MemoryKind::Coherent,
            1024,
        );
        assert_eq!(b.migrations, 8);
        assert_eq!(b.remote_bytes, 3 * 8 * 64);
        // On a device-private device the CPU's reads bring each page back, every round.
        let p = simulate(
            &t,
            &super::super::CoherentAwarePolicy,
            MemoryKind::Private,
            1024,
        );
        assert_eq!(p.migrations, 3 * 8 * 2);
    }

    #[test]
    fn access_counters_migrate_a_region_after_its_threshold() {
        // Map remotely; migrate a 64 KiB region (16 pages) after 48 remote accesses.
        #[derive(Debug)]
        struct Counting;
        impl Policy for Counting {
            fn access_counters(&self) -> Option<AccessCounters> {
                Some(AccessCounters {
                    granularity: 64 << 10,
                    threshold: 48,
                })
            }
            fn remote_accesses(&self, _: &RemoteAccesses) -> Placement {
                Placement::Migrate
            }
        }
        // 5 rounds over 32 pages (two regions), region 1 read in the first round only.
        let t: Vec<Access> = (0..5)
            .flat_map(|r| (0..if r == 0 { 32 } else { 16 }).map(dev))
            .collect();
        let b = simulate(&t, &Counting, MemoryKind::Private, 1024);
        // Region 0: 3 rounds remote (the 48th access migrates its 16 pages), then local;
        // region 1: one round remote, never migrated.
        assert_eq!(b.migrations, 16);
        assert_eq!(b.remote_bytes, (3 * 16 + 16) * 4096);
    }

    #[test]
    fn a_full_device_evicts_round_robin_or_leaves_pages_where_they_are() {
        // 8 pages, room for 4, streamed twice under on-demand migration with eviction: every
        // access migrates (and from the fifth on, evicts).
        let t: Vec<Access> = (0..2).flat_map(|_| (0..8).map(dev)).collect();
        let b = simulate(&t, &UvmPolicy::new(), MemoryKind::Private, 4);
        assert!(b.migrations >= 16, "{}", b.migrations);
        // The default policy declines when full, but it never migrates anyway.
        let d = simulate(&t, &DefaultPolicy, MemoryKind::Private, 4);
        assert_eq!(d.migrations, 0);
    }
}
