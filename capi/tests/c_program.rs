//! Builds the C test program `tests/c/hetmem_test.c` with the system's C compiler against the
//! generated header and `libhetmem_c.so`, and runs it: every case (one forked child each) must
//! pass. A watchdog kills the program if it does not finish in bounded time.

mod common;
use common::*;

#[test]
fn the_c_test_program_passes() {
    let deps = lib_dir();
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/hetmem_test.c");
    let dir = scratch("c");
    let exe = dir.join("hetmem_test");
    let (inc, libdir) = (
        format!("-I{}", header_dir().display()),
        format!("-L{}", deps.display()),
    );
    // DT_RPATH, not DT_RUNPATH: it comes before LD_LIBRARY_PATH, which `cargo test` sets to
    // directories that may hold an older `libhetmem_c.so` (one `cargo build` left in
    // target/release: the program then missed a new function).
    let rpath = format!("-Wl,--disable-new-dtags,-rpath,{}", deps.display());
    cc(&[
        "-std=c11".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        "-O1".as_ref(),
        inc.as_ref(),
        src.as_os_str(),
        "-o".as_ref(),
        exe.as_os_str(),
        libdir.as_ref(),
        rpath.as_ref(),
        "-lhetmem_c".as_ref(),
    ]);
    let (ok, stdout, stderr) = run_bounded(&exe, &[dir.as_os_str()], &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "the C test program failed:\n{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        7,
        "{stdout}"
    );
}
