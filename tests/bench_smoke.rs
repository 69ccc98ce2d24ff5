//! Smoke test of `hetmem bench --quick`: every figure is produced, finite and positive. No
//! timing is asserted (the figures depend on the machine).

mod common;
use common::*;

use hetmem::bench::{BenchOptions, run};

const EXPECTED: &[&str] = &[
    "fault_back_4k_us",
    "uffd_in_thread_4k_us",
    "fault_back_4k_busy_us",
    "uffd_in_thread_4k_busy_us",
    "first_touch_4k_us",
    "first_touch_random_4k_us",
    "kernel_first_touch_4k_us",
    "migrate_4k_gbps",
    "migrate_primitive_4k_gbps",
    "migrate_2m_gbps",
    "migrate_primitive_2m_gbps",
    "cpu_read_coherent_gbps",
    "cpu_read_system_gbps",
    "pingpong_coherent_bytes_moved",
    "pingpong_private_bytes_moved",
    "file_seq_read_gbps",
    "kernel_mmap_seq_read_gbps",
    "file_seq_read_cold_gbps",
    "kernel_mmap_seq_read_cold_gbps",
    "file_rand_read_4k_us",
    "kernel_mmap_rand_read_4k_us",
    "file_rand_read_warm_4k_us",
    "kernel_mmap_rand_read_warm_4k_us",
    "memcpy_gbps",
    "metadata_bytes_per_page",
];

#[test]
fn quick_bench_reports_every_figure() {
    let _w = watchdog("quick_bench_reports_every_figure", 120);
    let mut steps = Vec::new();
    let results = run(&BenchOptions { quick: true }, &mut |s| {
        steps.push(s.to_string())
    })
    .unwrap();
    assert!(!steps.is_empty(), "progress was never reported");
    for name in EXPECTED {
        let r = results
            .iter()
            .find(|r| r.name == *name)
            .unwrap_or_else(|| panic!("missing figure {name}"));
        assert!(r.value.is_finite() && r.value > 0.0, "{name} = {}", r.value);
    }
    for r in &results {
        match (&r.baseline, r.baseline_value, r.ratio) {
            (Some(b), Some(v), Some(ratio)) => {
                assert!(v.is_finite() && v > 0.0, "{}: baseline {b} = {v}", r.name);
                assert!(
                    ratio.is_finite() && ratio > 0.0,
                    "{}: ratio {ratio}",
                    r.name
                );
                assert!(
                    results.iter().any(|x| x.name == *b && x.baseline.is_none()),
                    "baseline {b} not reported on its own"
                );
            }
            (None, None, None) => {}
            _ => panic!(
                "{}: baseline, baseline_value and ratio must come together",
                r.name
            ),
        }
    }
}
