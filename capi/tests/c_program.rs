//! Builds the C test program `tests/c/hetmem_test.c` with the system's C compiler against the
//! generated header and `libhetmem_c.so`, and runs it: every case (one forked child each) must
//! pass. A watchdog kills the program if it does not finish in bounded time.

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn the_c_test_program_passes() {
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
    let header = PathBuf::from(env!("HETMEM_GENERATED_H"));
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/hetmem_test.c");
    let out_dir = std::env::temp_dir().join(format!("hetmem-c-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join("hetmem_test");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(header.parent().unwrap())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&deps)
        .arg(format!("-Wl,-rpath,{}", deps.display()))
        .arg("-lhetmem_c")
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e}"));
    assert!(
        built.status.success(),
        "the C test program did not build:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let child = Command::new(&exe)
        .arg(&out_dir)
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
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("WATCHDOG: the C test program did not finish within 60 s");
    }
    let out = waiter.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&out_dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the C test program failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        5,
        "{stdout}"
    );
}
