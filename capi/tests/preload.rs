//! The drop-in test device: builds `preload/hmm_dmirror.c` (the preloaded library that emulates
//! `/dev/hmm_dmirror0..3` on hetmem) and `tests/c/dmirror_test.c` (a program written against the
//! kernel's test-device interface only, knowing nothing of hetmem), and runs the program with
//! `LD_PRELOAD`: every case gets the kernel's answers. A watchdog kills it if it hangs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

fn cc(args: &[&std::ffi::OsStr]) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e}"));
    assert!(
        out.status.success(),
        "{cc} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `exe` with `env`, killed after 60 s; returns (success, stdout, stderr).
fn run_bounded(exe: &Path, env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut cmd = Command::new(exe);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        // The whole process group: the program forks a child per case.
        let _ = Command::new("pkill")
            .args(["-9", "-f", &exe.display().to_string()])
            .status();
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("WATCHDOG: {} did not finish within 60 s", exe.display());
    }
    let out = waiter.join().unwrap().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_test_device_program_runs_unmodified_under_the_preloaded_library() {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header_dir = PathBuf::from(env!("HETMEM_GENERATED_H"))
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("hetmem-preload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libhmm_dmirror.so");
    let prog = dir.join("dmirror_test");
    let rpath = format!("-Wl,-rpath,{}", deps.display());
    let inc = format!("-I{}", header_dir.display());
    let libdir = format!("-L{}", deps.display());
    let shim_src = manifest.join("preload/hmm_dmirror.c");
    let prog_src = manifest.join("tests/c/dmirror_test.c");
    cc(&[
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        "-O2".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        shim_src.as_os_str(),
        inc.as_ref(),
        libdir.as_ref(),
        "-lhetmem_c".as_ref(),
        "-ldl".as_ref(),
        rpath.as_ref(),
        "-o".as_ref(),
        lib.as_os_str(),
    ]);
    cc(&[
        "-std=c11".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        "-O1".as_ref(),
        prog_src.as_os_str(),
        "-o".as_ref(),
        prog.as_os_str(),
    ]);
    let (ok, stdout, stderr) = run_bounded(&prog, &[("LD_PRELOAD", &lib)]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "under the preloaded library:\n{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        7,
        "{stdout}"
    );
}
