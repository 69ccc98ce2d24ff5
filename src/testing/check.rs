//! The model checker shared by the model-based property test (`tests/model.rs`) and the fuzz
//! target (`fuzz/fuzz_targets/ops.rs`). Not part of hetmem's API.
//!
//! A [`World`] is a real [`Space`] with two anonymous mappings (a normal one of [`SMALL_PAGES`]
//! pages and a large, 2 MiB-unit one of [`LARGE_PAGES`] pages), a device-private [`SoftDevice`]
//! smaller than what the operations can ask for (so ENOMEM paths run), its [`DeviceMirror`], and
//! a plain in-memory model of each mapping ([`MapModel`]: bytes, mapped pages, protections).
//! [`apply`] runs one [`Op`] on the real objects and checks its outcome against the model (and
//! updates the model); [`check_all`] reads every readable page back and compares it with the
//! model. Both return the first mismatch as an error message; neither depends on a test
//! framework.
//!
//! An `Op` must be *in range* (see [`Op::in_range`]): mapping index 0 or 1, page ranges and byte
//! ranges inside the mapping and non-empty. The property test's strategy only produces such ops;
//! the fuzz target clamps its decoded input with [`Op::clamped`].

use crate::{DeviceMirror, Result as HResult};
use crate::{Error, MapOptions, PAGE_SIZE, Pin, Prot, Residency, SoftDevice, Space, VirtAddr};

/// Pages of mapping 0 (normal pages).
pub const SMALL_PAGES: usize = 48;
/// Pages of mapping 1 (large: two 2 MiB units).
pub const LARGE_PAGES: usize = 1024;
/// Capacity of the world's device: 4 MiB, smaller than what the operations can ask for.
pub const DEVICE_BYTES: usize = 4 << 20;
/// At most this many pins are held at once (the oldest is dropped first).
pub const MAX_PINS: usize = 4;

const PAGE: usize = PAGE_SIZE;

/// Pages of mapping `m` (0: [`SMALL_PAGES`], otherwise [`LARGE_PAGES`]).
pub fn pages_of(m: usize) -> usize {
    if m == 0 { SMALL_PAGES } else { LARGE_PAGES }
}

/// One operation on the world. `m` is the mapping (0 or 1); `page`/`n` a range of pages of it;
/// `off`/`len` a byte range of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// CPU write of `len` bytes at byte offset `off`: `byte`, `byte + 1`, … (wrapping).
    CpuWrite {
        /// Mapping.
        m: usize,
        /// Byte offset in the mapping.
        off: usize,
        /// Bytes.
        len: usize,
        /// First byte of the pattern.
        byte: u8,
    },
    /// CPU read of `len` bytes at byte offset `off`.
    CpuRead {
        /// Mapping.
        m: usize,
        /// Byte offset in the mapping.
        off: usize,
        /// Bytes.
        len: usize,
    },
    /// Device read (`DMIRROR_READ`) of `n` pages.
    DevRead {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// Device write (`DMIRROR_WRITE`) of `n` pages filled with `byte`.
    DevWrite {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
        /// Fill byte.
        byte: u8,
    },
    /// Migration to device memory (`DMIRROR_MIGRATE_TO_DEV`).
    ToDev {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// Migration to system memory (`DMIRROR_MIGRATE_TO_SYS`).
    ToSys {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// Device read by the coherent device.
    CohRead {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// Device write by the coherent device, `n` pages filled with `byte`.
    CohWrite {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
        /// Fill byte.
        byte: u8,
    },
    /// Migration to the coherent device's memory (`DMIRROR_MIGRATE_TO_DEV`).
    CohToDev {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// Migration out of the coherent device's memory (`DMIRROR_MIGRATE_TO_SYS`).
    CohToSys {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// `mprotect`: 0 none, 1 read, otherwise read-write.
    Protect {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
        /// Protection code (see [`prot_of`]).
        prot: u8,
    },
    /// `munmap` of `n` pages.
    Unmap {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// Maps every hole of mapping `m` again (read-write, zeros).
    Remap {
        /// Mapping.
        m: usize,
    },
    /// Pins `n` pages (short- or long-term); at most [`MAX_PINS`] pins are held.
    Pin {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
        /// Long-term pin.
        long: bool,
    },
    /// Drops the newest pin.
    Unpin,
    /// Device-exclusive access (`DMIRROR_EXCLUSIVE`).
    Exclusive {
        /// Mapping.
        m: usize,
        /// First page.
        page: usize,
        /// Pages.
        n: usize,
    },
    /// Device release: evicts all device memory.
    Release,
    /// Makes the next device allocation fail.
    FailNextAlloc,
}

/// Clamps a page range to a non-empty range inside mapping `m`.
fn clamp_pages(m: usize, page: usize, n: usize) -> (usize, usize, usize) {
    let m = m.min(1);
    let pages = pages_of(m);
    let page = page % pages;
    (m, page, n.clamp(1, pages - page))
}

/// Clamps a byte range to a non-empty range inside mapping `m`.
fn clamp_bytes(m: usize, off: usize, len: usize) -> (usize, usize, usize) {
    let m = m.min(1);
    let bytes = pages_of(m) * PAGE;
    let off = off % bytes;
    (m, off, len.clamp(1, bytes - off))
}

impl Op {
    /// Whether the op's mapping and ranges are valid (what [`apply`] requires).
    pub fn in_range(&self) -> bool {
        self.clone().clamped() == *self
    }

    /// The op with its mapping index, page and byte ranges brought into range (an op already in
    /// range is returned unchanged): `m` above 1 becomes 1, a start past the end wraps around
    /// (modulo the mapping's size), and an empty or overlong length is clamped to 1 or to the end
    /// of the mapping.
    pub fn clamped(self) -> Op {
        match self {
            Op::CpuWrite { m, off, len, byte } => {
                let (m, off, len) = clamp_bytes(m, off, len);
                Op::CpuWrite { m, off, len, byte }
            }
            Op::CpuRead { m, off, len } => {
                let (m, off, len) = clamp_bytes(m, off, len);
                Op::CpuRead { m, off, len }
            }
            Op::DevRead { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::DevRead { m, page, n }
            }
            Op::DevWrite { m, page, n, byte } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::DevWrite { m, page, n, byte }
            }
            Op::ToDev { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::ToDev { m, page, n }
            }
            Op::ToSys { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::ToSys { m, page, n }
            }
            Op::CohRead { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::CohRead { m, page, n }
            }
            Op::CohWrite { m, page, n, byte } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::CohWrite { m, page, n, byte }
            }
            Op::CohToDev { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::CohToDev { m, page, n }
            }
            Op::CohToSys { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::CohToSys { m, page, n }
            }
            Op::Protect { m, page, n, prot } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::Protect {
                    m,
                    page,
                    n,
                    prot: prot.min(2),
                }
            }
            Op::Unmap { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::Unmap { m, page, n }
            }
            Op::Remap { m } => Op::Remap { m: m.min(1) },
            Op::Pin { m, page, n, long } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::Pin { m, page, n, long }
            }
            Op::Exclusive { m, page, n } => {
                let (m, page, n) = clamp_pages(m, page, n);
                Op::Exclusive { m, page, n }
            }
            op @ (Op::Unpin | Op::Release | Op::FailNextAlloc) => op,
        }
    }
}

/// The model of one mapping: bytes, and per page whether mapped and its protection.
pub struct MapModel {
    /// Start of the mapping.
    pub base: VirtAddr,
    /// Expected contents (zeros where unmapped).
    pub bytes: Vec<u8>,
    /// Per page: mapped.
    pub mapped: Vec<bool>,
    /// Per page: protection.
    pub prot: Vec<Prot>,
    /// A large (2 MiB-unit) mapping.
    pub large: bool,
}

impl MapModel {
    /// Whether `f(mapped, prot)` holds for every page of `page..page + n`.
    pub fn all(&self, page: usize, n: usize, f: impl Fn(bool, Prot) -> bool) -> bool {
        (page..page + n).all(|p| f(self.mapped[p], self.prot[p]))
    }
}

/// The real objects and the model (see the module doc).
pub struct World {
    /// The address space.
    pub space: Space,
    /// The device.
    pub dev: SoftDevice,
    /// The device bound to `space`.
    pub mirror: DeviceMirror,
    /// A device-coherent device.
    pub cdev: SoftDevice,
    /// The coherent device bound to `space`.
    pub cmirror: DeviceMirror,
    /// The models of mapping 0 (normal) and 1 (large).
    pub maps: Vec<MapModel>,
    /// Pins held (at most [`MAX_PINS`]).
    pub pins: Vec<Pin>,
}

impl World {
    /// A fresh space with the two mappings, all zeros and read-write, and a fresh device.
    pub fn new() -> HResult<World> {
        let space = Space::new()?;
        let mut bases = Vec::new();
        for (pages, large) in [(SMALL_PAGES, false), (LARGE_PAGES, true)] {
            bases.push(space.map_anon_with(
                pages * PAGE,
                MapOptions {
                    large,
                    ..MapOptions::default()
                },
            )?);
        }
        Self::over(space, [bases[0], bases[1]])
    }

    /// The world over `space`, whose mapping 0 ([`SMALL_PAGES`] normal pages) and mapping 1
    /// ([`LARGE_PAGES`] pages in 2 MiB units, 2 MiB-aligned) start at `bases`, read-write and
    /// all zeros (never touched), with fresh devices. For adopted memory ([`Space::adopt`],
    /// made large with [`Space::advise_large`]), where [`apply`] checks that unmapping is
    /// refused instead.
    pub fn over(space: Space, bases: [VirtAddr; 2]) -> HResult<World> {
        let dev = SoftDevice::private(DEVICE_BYTES)?;
        let mirror = dev.mirror(&space)?;
        let cdev = SoftDevice::new(crate::device::DeviceConfig {
            kind: crate::pool::MemoryKind::Coherent,
            capacity: DEVICE_BYTES,
        })?;
        let cmirror = cdev.mirror(&space)?;
        let maps = [(SMALL_PAGES, false), (LARGE_PAGES, true)]
            .into_iter()
            .zip(bases)
            .map(|((pages, large), base)| MapModel {
                base,
                bytes: vec![0; pages * PAGE],
                mapped: vec![true; pages],
                prot: vec![Prot::ReadWrite; pages],
                large,
            })
            .collect();
        Ok(World {
            space,
            dev,
            mirror,
            cdev,
            cmirror,
            maps,
            pins: Vec::new(),
        })
    }
}

/// The protection of code `p`: 0 none, 1 read, otherwise read-write.
pub fn prot_of(p: u8) -> Prot {
    match p {
        0 => Prot::None,
        1 => Prot::Read,
        _ => Prot::ReadWrite,
    }
}

/// Fails with the formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Applies `op` (which must be in range, see [`Op::in_range`]) to the real objects, checks the
/// outcome against the model and updates the model. Returns the first mismatch.
pub fn apply(w: &mut World, op: &Op) -> Result<(), String> {
    ensure!(op.in_range(), "op out of range: {op:?}");
    match *op {
        Op::CpuWrite { m, off, len, byte } => {
            let mm = &mut w.maps[m];
            let (p0, p1) = (off / PAGE, (off + len - 1) / PAGE + 1);
            let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
            let r = w.space.cpu_write(mm.base.add(off), &data);
            if mm.all(p0, p1 - p0, |m, p| m && p.writable()) {
                ensure!(r.is_ok(), "cpu write failed: {r:?}");
                mm.bytes[off..off + len].copy_from_slice(&data);
            } else {
                ensure!(r.is_err(), "cpu write to an unwritable range succeeded");
            }
        }
        Op::CpuRead { m, off, len } => {
            let mm = &w.maps[m];
            let (p0, p1) = (off / PAGE, (off + len - 1) / PAGE + 1);
            let mut buf = vec![0u8; len];
            let r = w.space.cpu_read(mm.base.add(off), &mut buf);
            if mm.all(p0, p1 - p0, |m, p| m && p.readable()) {
                ensure!(r.is_ok(), "cpu read failed: {r:?}");
                ensure!(
                    buf == mm.bytes[off..off + len],
                    "cpu read returned stale data at {off:#x}"
                );
            } else {
                ensure!(r.is_err(), "cpu read of an unreadable range succeeded");
            }
        }
        Op::DevRead { m, page, n } => dev_read(&w.mirror, &w.maps[m], page, n)?,
        Op::DevWrite { m, page, n, byte } => dev_write(&w.mirror, &mut w.maps[m], page, n, byte)?,
        Op::ToDev { m, page, n } => to_dev(&w.mirror, &w.maps[m], page, n)?,
        Op::ToSys { m, page, n } => to_sys(&w.mirror, &w.maps[m], page, n)?,
        Op::CohRead { m, page, n } => dev_read(&w.cmirror, &w.maps[m], page, n)?,
        Op::CohWrite { m, page, n, byte } => dev_write(&w.cmirror, &mut w.maps[m], page, n, byte)?,
        Op::CohToDev { m, page, n } => to_dev(&w.cmirror, &w.maps[m], page, n)?,
        Op::CohToSys { m, page, n } => to_sys(&w.cmirror, &w.maps[m], page, n)?,
        Op::Protect { m, page, n, prot } => {
            let mm = &mut w.maps[m];
            let r = w
                .space
                .protect(mm.base.add(page * PAGE), n * PAGE, prot_of(prot));
            if mm.all(page, n, |m, _| m) {
                ensure!(r.is_ok(), "protect failed: {r:?}");
                mm.prot[page..page + n].fill(prot_of(prot));
            } else {
                ensure!(
                    matches!(r, Err(Error::NotMapped { .. })),
                    "protect across a hole must fail with NotMapped: {r:?}"
                );
            }
        }
        Op::Unmap { m, page, n } if w.space.is_adopted() => {
            // Adopted memory is the program's: hetmem refuses to unmap it, and nothing changes.
            let r = w.space.unmap(w.maps[m].base.add(page * PAGE), n * PAGE);
            ensure!(
                matches!(r, Err(Error::Invalid(_))),
                "unmap of adopted memory must be refused: {r:?}"
            );
        }
        Op::Unmap { m, page, n } => {
            let mm = &mut w.maps[m];
            let r = w.space.unmap(mm.base.add(page * PAGE), n * PAGE);
            ensure!(r.is_ok(), "unmap failed: {r:?}");
            mm.mapped[page..page + n].fill(false);
            mm.bytes[page * PAGE..(page + n) * PAGE].fill(0);
        }
        Op::Remap { m } => {
            let mm = &mut w.maps[m];
            let mut p = 0;
            while p < mm.mapped.len() {
                if mm.mapped[p] {
                    p += 1;
                    continue;
                }
                let s = p;
                while p < mm.mapped.len() && !mm.mapped[p] {
                    p += 1;
                }
                let opts = MapOptions {
                    large: mm.large,
                    ..MapOptions::default()
                };
                let r = w
                    .space
                    .map_anon_at(mm.base.add(s * PAGE), (p - s) * PAGE, opts);
                ensure!(r.is_ok(), "map of pages {s}..{p} failed: {r:?}");
                mm.mapped[s..p].fill(true);
                mm.prot[s..p].fill(Prot::ReadWrite);
            }
        }
        Op::Pin { m, page, n, long } => {
            let mm = &w.maps[m];
            let r = w.space.pin(mm.base.add(page * PAGE), n * PAGE, long);
            if mm.all(page, n, |m, p| m && p.readable()) {
                let pin = r.map_err(|e| format!("pin failed: {e:?}"))?;
                if w.pins.len() >= MAX_PINS {
                    w.pins.remove(0);
                }
                w.pins.push(pin);
                // A pinned page is in system memory; a short-term pin may also leave it in
                // device-coherent memory (the CPU maps it).
                let res = w.space.residency(mm.base.add(page * PAGE));
                ensure!(
                    res == Residency::System
                        || (!long && res == Residency::Coherent(w.cdev.owner())),
                    "pinned page {page} is not in system memory: {res:?}"
                );
            } else {
                ensure!(r.is_err(), "pin of an unreadable range succeeded");
            }
        }
        Op::Unpin => {
            w.pins.pop();
        }
        Op::Exclusive { m, page, n } => {
            let mm = &w.maps[m];
            let mut buf = vec![0u8; n * PAGE];
            let r = w
                .mirror
                .exclusive(mm.base.add(page * PAGE), n * PAGE, &mut buf);
            if r.is_ok() {
                ensure!(
                    buf == mm.bytes[page * PAGE..(page + n) * PAGE],
                    "exclusive returned wrong data"
                );
            }
        }
        Op::Release => {
            for dev in [&w.dev, &w.cdev] {
                let r = dev.release();
                ensure!(r.is_ok(), "device release failed: {r:?}");
                let used = dev.used();
                ensure!(
                    used == 0,
                    "release leaves no page in device memory, but {used} bytes are used"
                );
            }
        }
        Op::FailNextAlloc => w.dev.fail_next_alloc(),
    }
    Ok(())
}

/// A device read (either device) checked against the model.
fn dev_read(d: &DeviceMirror, mm: &MapModel, page: usize, n: usize) -> Result<(), String> {
    let mut buf = vec![0u8; n * PAGE];
    let r = d.read(mm.base.add(page * PAGE), n * PAGE, &mut buf);
    if mm.all(page, n, |m, p| m && p.readable()) {
        ensure!(r.is_ok(), "device read failed: {r:?}");
        ensure!(
            buf == mm.bytes[page * PAGE..(page + n) * PAGE],
            "device read stale data"
        );
    } else {
        ensure!(r.is_err(), "device read of an unreadable range succeeded");
    }
    Ok(())
}

/// A device write (either device), applied to the model.
fn dev_write(
    d: &DeviceMirror,
    mm: &mut MapModel,
    page: usize,
    n: usize,
    byte: u8,
) -> Result<(), String> {
    if !mm.all(page, n, |m, p| m && p.writable()) {
        return Ok(()); // partial device writes up to the first refused page: not modelled
    }
    let data = vec![byte; n * PAGE];
    let r = d.write(mm.base.add(page * PAGE), n * PAGE, &data);
    ensure!(r.is_ok(), "device write failed: {r:?}");
    mm.bytes[page * PAGE..(page + n) * PAGE].copy_from_slice(&data);
    Ok(())
}

/// A migration to a device's memory: the data read back must be the model's.
fn to_dev(d: &DeviceMirror, mm: &MapModel, page: usize, n: usize) -> Result<(), String> {
    let mut buf = vec![0u8; n * PAGE];
    let r = d.migrate_to_device(mm.base.add(page * PAGE), n * PAGE, &mut buf);
    match r {
        Ok(_) => ensure!(
            buf == mm.bytes[page * PAGE..(page + n) * PAGE],
            "migrate returned wrong data"
        ),
        Err(e) if mm.all(page, n, |m, p| m && p.readable()) => ensure!(
            matches!(e, Error::NotPresent { .. }),
            "unexpected migrate error {e}"
        ),
        Err(_) => {}
    }
    Ok(())
}

/// A migration out of a device's memory.
fn to_sys(d: &DeviceMirror, mm: &MapModel, page: usize, n: usize) -> Result<(), String> {
    let r = d.migrate_to_system(mm.base.add(page * PAGE), n * PAGE);
    if mm.all(page, n, |m, _| m) {
        ensure!(r.is_ok(), "migrate to system failed: {r:?}");
    }
    Ok(())
}

/// Reads every readable page of both mappings and compares it with the model.
pub fn check_all(w: &World) -> Result<(), String> {
    for (i, mm) in w.maps.iter().enumerate() {
        for p in 0..mm.mapped.len() {
            if mm.mapped[p] && mm.prot[p].readable() {
                let mut b = vec![0u8; PAGE];
                let r = w.space.cpu_read(mm.base.add(p * PAGE), &mut b);
                ensure!(
                    r.is_ok(),
                    "final check: reading page {p} of map {i} failed: {r:?}"
                );
                ensure!(
                    b == mm.bytes[p * PAGE..(p + 1) * PAGE],
                    "final check: page {p} of map {i} differs"
                );
            }
        }
    }
    Ok(())
}
