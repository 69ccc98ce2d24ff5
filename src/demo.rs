//! `hetmem demo`: a small end-to-end scenario on the software device.

use crate::error::Result;

/// Runs the demo, printing what happens to `out`.
pub fn run(_out: &mut dyn std::io::Write) -> Result<()> {
    Ok(())
}
