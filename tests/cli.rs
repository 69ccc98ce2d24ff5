//! The `hetmem` command line: `info` (text and `--json`), as this user and, where the tests run as
//! root, as an unprivileged one (`nobody`).

mod common;
use common::*;

use std::process::Command;

/// Runs the `hetmem` binary with `args` (as `uid`/`gid` if given, from a copy that user can
/// reach); returns its stdout, failing the test if it did not succeed.
fn hetmem(args: &[&str], as_user: Option<u32>) -> String {
    let out = match as_user {
        None => Command::new(env!("CARGO_BIN_EXE_hetmem"))
            .args(args)
            .output()
            .unwrap(),
        Some(id) => {
            use std::os::unix::fs::PermissionsExt;
            use std::os::unix::process::CommandExt;
            // The build directory may not be reachable for `nobody` (e.g. under /root).
            let dir = std::env::temp_dir().join(format!(
                "hetmem-cli-{}-{}",
                std::process::id(),
                args.join("-")
            ));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let bin = dir.join("hetmem");
            std::fs::copy(env!("CARGO_BIN_EXE_hetmem"), &bin).unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
            let out = Command::new(&bin)
                .args(args)
                .current_dir(&dir)
                .uid(id)
                .gid(id)
                .output()
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            out
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hetmem {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Checks the keys of `hetmem info --json` and returns the object.
fn info_json(as_user: Option<u32>) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&hetmem(&["info", "--json"], as_user))
        .expect("info --json is one JSON object");
    let kernel = v["kernel"].as_str().expect("kernel");
    assert!(
        !kernel.is_empty() && kernel != "unknown",
        "kernel: {kernel}"
    );
    assert!(v["uid"].is_u64() && v["euid"].is_u64(), "{v}");
    let kind = v["userfaultfd"].as_str().expect("userfaultfd");
    assert!(
        ["plain", "user-mode-only"].contains(&kind),
        "userfaultfd: {kind} (the tests need one)"
    );
    assert_eq!(v["plain_userfaultfd"].as_bool(), Some(kind == "plain"));
    assert_eq!(v["user_mode_only_userfaultfd"].as_bool(), Some(true));
    let features = v["features"].as_array().expect("features");
    assert!(!features.is_empty(), "no userfaultfd feature reported");
    // hetmem runs here, so what its default (signal) mode needs is offered.
    assert!(features.iter().any(|f| f == "SIGBUS"), "{features:?}");
    let uses = v["uses"].as_array().expect("uses");
    assert!(!uses.is_empty());
    for u in uses {
        assert!(u["feature"].is_string() && u["offered"].is_boolean(), "{u}");
        assert!(!u["for"].as_str().unwrap_or("").is_empty(), "{u}");
    }
    for name in ["SIGBUS", "EVENT_REMAP", "WP_ASYNC"] {
        assert!(
            uses.iter().any(|u| u["feature"] == name),
            "{name} not in uses"
        );
    }
    assert!(v["not_used"].as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!(v["space"]["ok"], true, "{v}");
    assert_eq!(
        v["space"]["user_mode_only"].as_bool(),
        Some(kind == "user-mode-only")
    );
    assert!(v["thp"].is_string());
    assert!(v["read_ahead_kb"].is_u64() || v["read_ahead_kb"].is_null());
    let follows = v["follows"].as_array().expect("follows");
    assert!(!follows.is_empty());
    v
}

#[test]
fn info_json_reports_kernel_features_and_uses() {
    let _w = watchdog("info_json", 60);
    let v = info_json(None);
    let follows = v["follows"].to_string();
    if v["userfaultfd"] == "plain" {
        assert!(follows.contains("thread mode serves"), "{follows}");
    } else {
        assert!(follows.contains("EFAULT in both fault modes"), "{follows}");
    }
}

#[test]
fn info_text_names_features_and_what_follows() {
    let _w = watchdog("info_text", 60);
    let out = hetmem(&["info"], None);
    for s in [
        "kernel:",
        "uid / euid:",
        "vm.unprivileged_userfaultfd:",
        "userfaultfd:",
        "SIGBUS",
        "MOVE",
        "what follows:",
    ] {
        assert!(out.contains(s), "no {s:?} in:\n{out}");
    }
}

/// As `nobody` with `vm.unprivileged_userfaultfd = 0` (the common default), only a
/// user-mode-only userfaultfd opens, and `info` says what that means.
#[test]
fn info_unprivileged() {
    let _w = watchdog("info_unprivileged", 60);
    if hetmem::sys::geteuid() != 0 {
        info_json(None);
        return;
    }
    let v = info_json(Some(65534));
    assert_eq!(v["euid"], 65534);
    let sysctl =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if sysctl.trim() == "0" {
        assert_eq!(v["userfaultfd"], "user-mode-only", "{v}");
        assert_eq!(v["unprivileged_userfaultfd"], 0);
        assert!(v["plain_userfaultfd_error"].is_string(), "{v}");
        assert!(
            v["follows"]
                .to_string()
                .contains("EFAULT in both fault modes"),
            "{v}"
        );
    }
}

/// `hetmem bench --only GROUP` runs that group only (its figures, no others) and records the
/// choice in the JSON's options; an unknown group is a clear error, not an empty run.
#[test]
fn bench_only_runs_the_named_groups() {
    let _w = watchdog("cli_bench_only", 60);
    let out = hetmem(
        &["bench", "--quick", "--json", "--only", "metadata,memcpy"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["memcpy_gbps", "metadata_bytes_per_page"],
        "{names:?}"
    );
    assert_eq!(
        v["options"]["only"],
        serde_json::json!(["metadata", "memcpy"])
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["bench", "--only", "nonsense"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown bench group"), "{err}");
}

/// `hetmem demo --json`: the anonymous-memory scenario and one run of the large-file workload
/// per placement, each verified, with the oracle's bytes beside each; the private placement
/// moves pages both ways, the coherent one only to the device, the mirror none; no placement
/// that keeps one copy of a page moves fewer link bytes than the oracle.
#[test]
fn demo_json_compares_every_placement_against_the_oracle() {
    let _w = watchdog("demo --json", 120);
    let v: serde_json::Value =
        serde_json::from_str(&hetmem(&["demo", "--size", "8", "--json"], None)).unwrap();
    assert_eq!(v["anonymous"]["verified"], true);
    assert_eq!(v["file_mib"], 8);
    // The machine and version it ran on.
    assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert!(v["machine"]["memory_gib"].as_f64().unwrap() > 0.0);
    assert!(v["version"].is_string() && v["kernel"].is_string());
    let runs = v["runs"].as_array().unwrap();
    let names: Vec<&str> = runs
        .iter()
        .map(|r| r["placement"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "mirror",
            "private",
            "coherent",
            "replica",
            "on-demand",
            "on-demand"
        ]
    );
    let policies: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(
        policies,
        [
            "default", "default", "default", "default", "uvm", "adaptive"
        ]
    );
    let get = |p: &str, k: &str| {
        runs.iter().find(|r| r["placement"] == p).unwrap()[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{p}.{k}"))
    };
    for r in runs {
        assert_eq!(r["verified"], true, "{r}");
        assert!(r["wall_s"].as_f64().unwrap() > 0.0);
        assert!(r["modelled_device_s"].as_f64().unwrap() > 0.0);
        assert!(r["oracle_bytes"].as_u64().unwrap() >= 8 << 20, "{r}");
    }
    assert_eq!(get("mirror", "bytes_to_device"), 0);
    assert!(get("mirror", "link_bytes") >= 2 * get("mirror", "oracle_bytes"));
    assert!(get("private", "bytes_to_device") >= 8 << 20);
    assert!(get("private", "bytes_to_system") > 0);
    assert_eq!(get("coherent", "bytes_to_system"), 0);
    for p in ["private", "coherent", "on-demand"] {
        assert!(
            get(p, "link_bytes") >= get(p, "oracle_bytes"),
            "{p} below the oracle"
        );
    }
    // On demand, the device's faults place the file (the UVM-like policy migrates them).
    assert!(get("on-demand", "bytes_to_device") >= 8 << 20);
    // The same stores everywhere: the same bytes written back.
    let wb = get("mirror", "writeback_bytes");
    assert!(wb > 0);
    for p in ["private", "coherent", "replica", "on-demand"] {
        assert_eq!(get(p, "writeback_bytes"), wb, "{p}");
    }
    // On demand under hetmem's policy: the device's reads make replicas, which never come back
    // (a CPU store drops one), with the same bytes written back.
    let adaptive = runs.iter().find(|r| r["policy"] == "adaptive").unwrap();
    assert!(adaptive["bytes_to_device"].as_u64().unwrap() >= 8 << 20);
    assert_eq!(adaptive["bytes_to_system"], 0);
    assert_eq!(adaptive["writeback_bytes"].as_u64().unwrap(), wb);
}

/// `--profile` puts every device of the demo on one link model; an unknown one is refused.
#[test]
fn demo_profile_sets_every_devices_link() {
    let _w = watchdog("demo --profile", 120);
    let v: serde_json::Value = serde_json::from_str(&hetmem(
        &["demo", "--size", "4", "--profile", "pcie4", "--json"],
        None,
    ))
    .unwrap();
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(r["profile"], "pcie4", "{r}");
        assert_eq!(r["verified"], true);
    }
    // The devices really use it: the mirror's reads over a PCIe 4 link (25 GB/s) take longer
    // than over its default PCIe 5 (50 GB/s), for the same bytes.
    let default: serde_json::Value =
        serde_json::from_str(&hetmem(&["demo", "--size", "4", "--json"], None)).unwrap();
    let mirror_time = |v: &serde_json::Value| v["runs"][0]["modelled_device_s"].as_f64().unwrap();
    assert_eq!(default["runs"][0]["placement"], "mirror");
    assert!(
        mirror_time(&v) > mirror_time(&default),
        "pcie4 {} vs pcie5 {}",
        mirror_time(&v),
        mirror_time(&default)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["demo", "--profile", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--profile must be one of"));
}

/// A demo size out of range is a clear error, not a huge allocation.
/// `hetmem demo --device coherent|private` runs only the placements a device of that kind
/// offers, the mirrored one on a device of that kind (its default link: NVLink-C2C for a
/// coherent device), every one verified; an unknown kind is refused by name.
#[test]
fn demo_device_runs_the_placements_of_that_kind() {
    let _w = watchdog("demo --device", 120);
    let run = |kind: &str| -> serde_json::Value {
        serde_json::from_str(&hetmem(
            &["demo", "--size", "4", "--device", kind, "--json"],
            None,
        ))
        .unwrap()
    };
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["verified"], true, "{r}");
                r["placement"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let coherent = run("coherent");
    assert_eq!(names(&coherent), ["mirror", "coherent"]);
    assert_eq!(coherent["runs"][0]["profile"], "nvlink-c2c");
    let private = run("private");
    assert_eq!(
        names(&private),
        ["mirror", "private", "replica", "on-demand", "on-demand"]
    );
    assert_eq!(private["runs"][0]["profile"], "pcie5");
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["demo", "--device", "system"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("possible values: private, coherent"), "{err}");
}

#[test]
fn demo_refuses_a_size_out_of_range() {
    for size in ["0", "100000"] {
        let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
            .args(["demo", "--size", size])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--size must be 1 to 16384 MiB"), "{err}");
    }
}

/// `hetmem demo --plot FILE.svg` draws the large file's link traffic and device memory over its
/// phases: an SVG with a line and a legend entry per placement.
#[test]
fn demo_plot_draws_every_placement() {
    let _w = watchdog("demo --plot", 120);
    let path = std::env::temp_dir().join(format!("hetmem-demo-{}.svg", std::process::id()));
    hetmem(
        &[
            "demo",
            "--size",
            "8",
            "--json",
            "--plot",
            path.to_str().unwrap(),
        ],
        None,
    );
    let svg = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(svg.starts_with("<svg"), "not an SVG");
    for p in [
        "mirror (default)",
        "private (default)",
        "coherent (default)",
        "replica (default)",
        "on-demand (uvm)",
        "on-demand (adaptive)",
    ] {
        assert_eq!(svg.matches(p).count(), 2, "{p}: one legend entry per chart");
    }
    assert!(svg.contains("bytes over the link so far") && svg.contains("device memory in use"));
}

/// `hetmem run WORKLOAD --json`: one run per policy, each verified and against the oracle; an
/// unknown workload is a clear error.
#[test]
fn run_reports_each_policy_against_the_oracle() {
    let _w = watchdog("run", 60);
    let v: serde_json::Value =
        serde_json::from_str(&hetmem(&["run", "random", "--size", "2", "--json"], None)).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let policies: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["default", "uvm", "coherent-aware", "adaptive"]);
    assert_eq!(runs[0]["profile"], "pcie5");
    // Another link model costs the same accesses differently: the same bytes, another time.
    let slow: serde_json::Value = serde_json::from_str(&hetmem(
        &[
            "run",
            "random",
            "--size",
            "2",
            "--json",
            "--policy",
            "default",
            "--profile",
            "pcie4",
        ],
        None,
    ))
    .unwrap();
    let slow = &slow["runs"][0];
    assert_eq!(slow["profile"], "pcie4");
    assert_eq!(slow["link_bytes"], runs[0]["link_bytes"]);
    assert!(
        slow["modelled_device_s"].as_f64().unwrap()
            > runs[0]["modelled_device_s"].as_f64().unwrap()
    );
    for r in runs {
        assert_eq!(r["verified"], true);
        assert_eq!(r["workload"], "random");
        assert!(r["oracle_bytes"].as_u64().unwrap() > 0);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["run", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Refused by name, with every workload listed.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'nope'")
            && err.contains("streaming, pingpong, random, stencil, graph, oversubscribed"),
        "{err}"
    );
}

/// `hetmem run --trace FILE` records the accesses; `hetmem replay FILE` replays them under each
/// policy without running the program: under the policy the run used, the simulation moves
/// exactly the bytes the run did; mapping remotely moves the device's reads; nothing beats the
/// oracle. A malformed trace is an error naming its line.
#[test]
fn replay_of_a_run_trace_reproduces_the_run() {
    let _w = watchdog("replay", 60);
    let path = std::env::temp_dir().join(format!("hetmem-trace-{}.jsonl", std::process::id()));
    let p = path.to_str().unwrap();
    let run: serde_json::Value = serde_json::from_str(&hetmem(
        &[
            "run", "random", "--size", "2", "--policy", "uvm", "--json", "--trace", p,
        ],
        None,
    ))
    .unwrap();
    let ran = run["runs"][0]["link_bytes"].as_u64().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&hetmem(&["replay", p, "--json"], None)).unwrap();
    let oracle = v["oracle_bytes"].as_u64().unwrap();
    assert_eq!(oracle, run["runs"][0]["oracle_bytes"].as_u64().unwrap());
    let bytes = |policy: &str| {
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["policy"] == policy)
            .unwrap()["bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(bytes("uvm"), ran, "the replay of the run's own policy");
    let device_reads = 512 * 4096 * 4; // 512 pages read per round, 4 rounds
    assert_eq!(bytes("default"), device_reads);
    for p in ["default", "uvm", "coherent-aware"] {
        assert!(bytes(p) >= oracle, "{p} below the oracle");
    }
    // hetmem's own policy on the oversubscribed stream (12 MiB through 8 MiB of device memory):
    // the replay, told the device's size, moves what the run did, as little as the oracle.
    let run: serde_json::Value = serde_json::from_str(&hetmem(
        &[
            "run",
            "oversubscribed",
            "--size",
            "12",
            "--policy",
            "adaptive",
            "--json",
            "--trace",
            p,
        ],
        None,
    ))
    .unwrap();
    let ran = &run["runs"][0];
    let v: serde_json::Value = serde_json::from_str(&hetmem(
        &[
            "replay",
            p,
            "--capacity",
            "8",
            "--policy",
            "adaptive",
            "--json",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(v["runs"][0]["bytes"], ran["link_bytes"]);
    assert_eq!(ran["link_bytes"], ran["oracle_bytes"]);
    std::fs::write(
        &path,
        "{\"ev\":\"access\",\"by\":\"cpu\",\"page\":1,\"bytes\":64}\nnonsense\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(["replay", p])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(":2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
