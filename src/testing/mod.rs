//! Test support shared by the property tests, the fuzz targets and the crate's own schedule
//! exploration (not part of hetmem's API): the model checkers of anonymous memory (`check`) and
//! of the page cache (`check_file`), and the shuttle tests (`model_tests`, unit-test build only).

pub mod check;
pub mod check_file;

#[cfg(test)]
mod model_tests;
