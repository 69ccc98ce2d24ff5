//! `hetmem demo`: a small end-to-end scenario on the software device, with no setup.
//!
//! 1. the CPU writes a pattern into a fresh anonymous mapping (first-touch faults);
//! 2. the device reads it through its mirror (range_fault, no migration);
//! 3. the range migrates to device-private memory;
//! 4. the device updates every value in its own memory;
//! 5. the CPU reads the range back: each access faults and migrates its page back;
//! 6. a second round trip is done with explicit migrations (to device, to system);
//! 7. every value is checked at each step.
//!
//! It prints one line per step: pages moved each way, CPU faults, and wall time. The command
//! (`hetmem demo`) then runs a large file in device and CPU phases once per placement of its
//! pages ([`crate::bench::largefile_placements`]) and prints them side by side.

use std::io::Write;
use std::time::Instant;

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::device::SoftDevice;
use crate::error::{Error, Result};
use crate::link::LinkReport;
use crate::space::{Residency, Space, SpaceStats};
use crate::sys::Prot;

/// Size of the demo's mapping.
pub const DEMO_BYTES: usize = 16 << 20;

/// What the demo did, for tests.
#[derive(Clone, Debug, Default)]
pub struct DemoReport {
    /// Pages moved to device memory.
    pub pages_to_device: u64,
    /// Pages moved back to system memory.
    pub pages_to_system: u64,
    /// CPU faults served.
    pub cpu_faults: u64,
    /// Every check passed.
    pub verified: bool,
}

struct Step<'a> {
    out: &'a mut dyn Write,
    last: SpaceStats,
    last_link: LinkReport,
    t0: Instant,
}

impl Step<'_> {
    fn line(&mut self, space: &Space, dev: &SoftDevice, what: &str) -> Result<()> {
        let s = space.stats();
        let l = dev.link_report();
        let dt = self.t0.elapsed();
        writeln!(
            self.out,
            "{:<46} {:>9} {:>9} {:>9} {:>10.2} ms {:>10.2} ms",
            what,
            s.pages_to_device - self.last.pages_to_device,
            s.pages_to_system - self.last.pages_to_system,
            s.cpu_faults - self.last.cpu_faults,
            dt.as_secs_f64() * 1e3,
            l.since(&self.last_link).total_ns() as f64 / 1e6,
        )
        .map_err(|e| Error::os("write demo output", e))?;
        self.last = s;
        self.last_link = l;
        self.t0 = Instant::now();
        Ok(())
    }
}

fn check(
    space: &Space,
    a: VirtAddr,
    words: usize,
    f: impl Fn(u32) -> u32,
    what: &str,
) -> Result<()> {
    let mut buf = vec![0u8; words * 4];
    space.cpu_read(a, &mut buf)?;
    verify(&buf, f, what)
}

fn verify(buf: &[u8], f: impl Fn(u32) -> u32, what: &str) -> Result<()> {
    for (i, c) in buf.chunks_exact(4).enumerate() {
        let v = u32::from_ne_bytes(c.try_into().expect("4 bytes"));
        if v != f(i as u32) {
            return Err(Error::Invalid(if what.is_empty() {
                "data mismatch"
            } else {
                "data mismatch (see demo step)"
            }));
        }
    }
    Ok(())
}

/// Runs the demo, printing what happens to `out`.
pub fn run(out: &mut dyn Write) -> Result<DemoReport> {
    let w = |out: &mut dyn Write, s: String| {
        writeln!(out, "{s}").map_err(|e| Error::os("write demo output", e))
    };
    let space = Space::new()?;
    let dev = SoftDevice::private(64 << 20)?;
    let mirror = dev.mirror(&space)?;
    let pages = DEMO_BYTES / PAGE_SIZE;
    let words = DEMO_BYTES / 4;
    w(
        out,
        format!(
            "hetmem demo: {} MiB of anonymous memory, a device-private software device with 64 MiB",
            DEMO_BYTES >> 20
        ),
    )?;
    w(
        out,
        format!(
            "userfaultfd: {}",
            if space.user_mode_only() {
                "user-mode-only (unprivileged)"
            } else {
                "full (privileged)"
            }
        ),
    )?;
    w(out, String::new())?;
    w(
        out,
        format!(
            "{:<46} {:>9} {:>9} {:>9} {:>13} {:>13}",
            "step", "to dev", "to sys", "faults", "wall time", "device time"
        ),
    )?;
    w(out, "-".repeat(106))?;
    let a = space.map_anon(DEMO_BYTES, Prot::ReadWrite)?;
    let mut step = Step {
        out,
        last: space.stats(),
        last_link: dev.link_report(),
        t0: Instant::now(),
    };

    // 1. CPU writes i into word i.
    let data: Vec<u8> = (0..words as u32).flat_map(|i| i.to_ne_bytes()).collect();
    space.cpu_write(a, &data)?;
    step.line(&space, &dev, "1. CPU writes the pattern (first touch)")?;

    // 2. The device reads through its mirror.
    let mut buf = vec![0u8; DEMO_BYTES];
    let o = mirror.read(a, DEMO_BYTES, &mut buf)?;
    verify(&buf, |i| i, "device read")?;
    step.line(
        &space,
        &dev,
        &format!("2. device reads via its mirror ({} fault pass)", o.faults),
    )?;

    // 3. Migrate to device memory.
    let o = mirror.migrate_to_device(a, DEMO_BYTES, &mut buf)?;
    verify(&buf, |i| i, "migrate")?;
    if space.residency(a) != Residency::Device(dev.owner()) || o.cpages != pages as u64 {
        return Err(Error::NotPresent { addr: a });
    }
    step.line(&space, &dev, "3. migrate to device-private memory")?;

    // 4. The device adds 1 to every value, in its own memory.
    for v in buf.chunks_exact_mut(4) {
        let x = u32::from_ne_bytes((&*v).try_into().expect("4 bytes")) + 1;
        v.copy_from_slice(&x.to_ne_bytes());
    }
    mirror.write(a, DEMO_BYTES, &buf)?;
    step.line(
        &space,
        &dev,
        "4. device updates every value in device memory",
    )?;

    // 5. CPU reads back: each page faults and migrates back.
    check(&space, a, words, |i| i + 1, "cpu read")?;
    step.line(
        &space,
        &dev,
        "5. CPU reads back (faults migrate pages back)",
    )?;

    // 6. Explicit round trip.
    mirror.migrate_range_to_device(a, DEMO_BYTES)?;
    step.line(&space, &dev, "6a. migrate to device again (prefetch)")?;
    let o = mirror.migrate_to_system(a, DEMO_BYTES)?;
    if o.cpages != pages as u64 {
        return Err(Error::NotPresent { addr: a });
    }
    step.line(&space, &dev, "6b. migrate to system (no CPU faults)")?;
    check(&space, a, words, |i| i + 1, "final")?;
    step.line(&space, &dev, "7. CPU verifies all values")?;

    let s = space.stats();
    let out = step.out;
    w(out, "-".repeat(106))?;
    w(
        out,
        format!(
            "total: {} pages to device, {} pages to system, {} CPU faults; all {} values verified",
            s.pages_to_device, s.pages_to_system, s.cpu_faults, words
        ),
    )?;
    let link = dev.link_report();
    w(
        out,
        format!(
            "wall time: measured on this machine (the software device copies with the CPU); \
             device time: modelled for a {} link ({:.1} ms device-local, {:.1} ms over the link, \
             {:.1} ms migration copies)",
            dev.link().profile().name,
            link.device_local_ns as f64 / 1e6,
            link.device_remote_ns as f64 / 1e6,
            link.migration_ns as f64 / 1e6
        ),
    )?;
    space.unmap(a, DEMO_BYTES)?;
    Ok(DemoReport {
        pages_to_device: s.pages_to_device,
        pages_to_system: s.pages_to_system,
        cpu_faults: s.cpu_faults,
        verified: true,
    })
}
