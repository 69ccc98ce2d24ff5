//! The committed header (`include/hetmem.h`, for C users who do not build the crate) is the one
//! cbindgen generates from the source now.

#[test]
fn the_committed_header_is_current() {
    let generated = std::fs::read_to_string(env!("HETMEM_GENERATED_H")).unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/hetmem.h")).unwrap();
    assert!(
        generated == committed,
        "capi/include/hetmem.h is stale: copy {} over it",
        env!("HETMEM_GENERATED_H")
    );
}
