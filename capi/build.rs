//! Generates the C header from the API's source with cbindgen, into `OUT_DIR/hetmem.h`; the
//! committed copy (`include/hetmem.h`, for users who do not build) is checked against it by
//! `tests/header.rs`.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let cfg = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(cfg)
        .generate()
        .expect("the C header")
        .write_to_file(out.join("hetmem.h"));
    println!(
        "cargo:rustc-env=HETMEM_GENERATED_H={}",
        out.join("hetmem.h").display()
    );
}
