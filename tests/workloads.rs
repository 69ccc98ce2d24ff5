//! `hetmem run`'s workloads under each policy, against the offline oracle: every byte read is
//! verified, and the traffic is what each policy's decisions make it (streaming: mapping
//! remotely reads the data over the link every round, on-demand migration moves it once, which is
//! the oracle's least; ping-pong: remote reads are the least, and the UVM-like policy's thrashing
//! detection keeps its migrations within a bound; random: on-demand migration beats remote reads).

mod common;
use common::*;

use hetmem::workload::run;

const MIB: u64 = 1 << 20;

#[test]
fn every_workload_under_every_policy_is_verified_and_measured_against_the_oracle() {
    let _w = watchdog("workloads", 120);
    let pages = (4 * MIB) as usize / PAGE;
    let get = |w: &str, p: &str| {
        let r = run(w, p, pages, 4, 1).unwrap_or_else(|e| panic!("{w} {p}: {e}"));
        assert!(r.verified, "{w} {p}");
        assert!(r.oracle_bytes > 0 && r.link_bytes > 0, "{w} {p}: {r:?}");
        r
    };
    let (d, u) = (get("streaming", "default"), get("streaming", "uvm"));
    assert_eq!(d.link_bytes, 4 * 4 * MIB, "remote reads every round");
    assert_eq!(u.link_bytes, 4 * MIB, "migrated once");
    assert_eq!(u.oracle_bytes, 4 * MIB, "the oracle moves it once");
    let (d, u) = (get("pingpong", "default"), get("pingpong", "uvm"));
    assert_eq!(d.link_bytes, d.oracle_bytes, "remote reads are the least");
    assert!(
        u.link_bytes <= d.oracle_bytes * 3 / 2,
        "thrashing detection bounds the UVM-like policy: {} vs {}",
        u.link_bytes,
        d.oracle_bytes
    );
    assert!(u.cpu_faults > 0, "the CPU pulled pages back");
    let (d, u) = (get("random", "default"), get("random", "uvm"));
    assert!(
        u.link_bytes < d.link_bytes,
        "on-demand migration beats remote reads on a random reuse pattern"
    );
    assert!(u.link_bytes as f64 <= 1.3 * u.oracle_bytes as f64, "{u:?}");
}

#[test]
fn unknown_workloads_policies_and_sizes_are_typed_errors() {
    assert!(matches!(
        run("nope", "default", 1, 1, 0),
        Err(hetmem::Error::Invalid(_))
    ));
    assert!(matches!(
        run("streaming", "nope", 1, 1, 0),
        Err(hetmem::Error::Invalid(_))
    ));
    assert!(matches!(
        run("streaming", "default", 0, 1, 0),
        Err(hetmem::Error::ZeroLength)
    ));
    assert!(matches!(
        run("streaming", "default", usize::MAX, 1, 0),
        Err(hetmem::Error::Invalid(_))
    ));
}
