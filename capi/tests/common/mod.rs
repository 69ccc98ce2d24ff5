//! Shared by the C-program tests: the C compiler, and running a program with a watchdog.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

/// Where `libhetmem_c.so` is: next to the test binary.
pub fn lib_dir() -> PathBuf {
    let deps = std::env::current_exe()
        .expect("the test binary's path")
        .parent()
        .expect("its directory")
        .to_path_buf();
    assert!(
        deps.join("libhetmem_c.so").exists(),
        "libhetmem_c.so next to the test binary in {}",
        deps.display()
    );
    deps
}

/// The directory of the header cbindgen generated for this build.
pub fn header_dir() -> PathBuf {
    PathBuf::from(env!("HETMEM_GENERATED_H"))
        .parent()
        .expect("the header's directory")
        .to_path_buf()
}

/// Runs the C compiler (`$CC`, else `cc`) with `args`; fails the test with its messages.
pub fn cc(args: &[&OsStr]) {
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

/// Runs `exe` with `args` and `env`, killed (with the children it forked) if it has not finished
/// after 60 s; returns (success, stdout, stderr).
pub fn run_bounded(exe: &Path, args: &[&OsStr], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut cmd = Command::new(exe);
    cmd.args(args);
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

/// A fresh scratch directory for this test process.
pub fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hetmem-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
