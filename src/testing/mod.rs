//! Test support shared by the property tests, the fuzz targets and the crate's own schedule
//! exploration (not part of hetmem's API): the model checkers of anonymous memory (`check`) and
//! of the page cache (`check_file`), and the shuttle tests (`model_tests`, unit-test build only).
//! Compiled only with the `testing` feature (the checkers) or in the unit-test build.

#[cfg(feature = "testing")]
pub mod check;
#[cfg(feature = "testing")]
pub mod check_file;

#[cfg(test)]
mod model_tests;
