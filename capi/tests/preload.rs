//! The drop-in test device: builds `preload/hmm_dmirror.c` (the preloaded library that emulates
//! `/dev/hmm_dmirror0..3` on hetmem) and `tests/c/dmirror_test.c` (a program written against the
//! kernel's test-device interface only, knowing nothing of hetmem), and runs the program with
//! `LD_PRELOAD`: every case gets the kernel's answers. A watchdog kills it if it hangs.

mod common;
use common::*;

#[test]
fn a_test_device_program_runs_unmodified_under_the_preloaded_library() {
    let deps = lib_dir();
    let manifest = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header_dir = header_dir();
    let dir = scratch("preload");
    let lib = dir.join("libhmm_dmirror.so");
    let prog = dir.join("dmirror_test");
    // DT_RPATH, not DT_RUNPATH: it comes before LD_LIBRARY_PATH, which `cargo test` sets to
    // directories that may hold an older `libhetmem_c.so` (one `cargo build` left in
    // target/release: the program then missed a new function).
    let rpath = format!("-Wl,--disable-new-dtags,-rpath,{}", deps.display());
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
    let (ok, stdout, stderr) = run_bounded(&prog, &[], &[("LD_PRELOAD", &lib)]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "under the preloaded library:\n{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        15,
        "{stdout}"
    );
}
