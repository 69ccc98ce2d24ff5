//! Model-based property test: random sequences of operations on anonymous memory — CPU reads and
//! writes at random offsets and sizes, device reads and writes, migrations both ways, permission
//! changes, unmap and map, pins, device-exclusive access, device release, injected device
//! allocation failures — over a normal and a large (2 MiB unit) mapping, run on the real kernel
//! (userfaultfd) and checked step by step against a plain in-memory model.
//!
//! CI runs `CASES × OPS` operations (≥ 100,000). `HETMEM_SOAK=N` multiplies the number of cases
//! by N for a longer soak. A failure prints proptest's seed and the shrunk sequence.

mod common;
use common::*;
use hetmem::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const SMALL_PAGES: usize = 48;
const LARGE_PAGES: usize = 1024; // two 2 MiB units
const CASES: u32 = 220;
const OPS: usize = 480;

#[derive(Clone, Debug)]
enum Op {
    CpuWrite {
        m: usize,
        off: usize,
        len: usize,
        byte: u8,
    },
    CpuRead {
        m: usize,
        off: usize,
        len: usize,
    },
    DevRead {
        m: usize,
        page: usize,
        n: usize,
    },
    DevWrite {
        m: usize,
        page: usize,
        n: usize,
        byte: u8,
    },
    ToDev {
        m: usize,
        page: usize,
        n: usize,
    },
    ToSys {
        m: usize,
        page: usize,
        n: usize,
    },
    Protect {
        m: usize,
        page: usize,
        n: usize,
        prot: u8,
    },
    Unmap {
        m: usize,
        page: usize,
        n: usize,
    },
    Remap {
        m: usize,
    },
    Pin {
        m: usize,
        page: usize,
        n: usize,
        long: bool,
    },
    Unpin,
    Exclusive {
        m: usize,
        page: usize,
        n: usize,
    },
    Release,
    FailNextAlloc,
}

fn pages_of(m: usize) -> usize {
    if m == 0 { SMALL_PAGES } else { LARGE_PAGES }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let m = prop_oneof![3 => Just(0usize), 1 => Just(1usize)];
    let range = (m, any::<u16>(), 1usize..64).prop_map(|(m, p, n)| {
        let pages = pages_of(m);
        let page = p as usize % pages;
        (m, page, n.min(pages - page))
    });
    prop_oneof![
        6 => (range.clone(), any::<u16>(), 1usize..9000, any::<u8>()).prop_map(|((m, page, _), o, len, byte)| {
            let off = page * PAGE + o as usize % PAGE;
            Op::CpuWrite { m, off, len: len.min(pages_of(m) * PAGE - off), byte }
        }),
        5 => (range.clone(), any::<u16>(), 1usize..9000).prop_map(|((m, page, _), o, len)| {
            let off = page * PAGE + o as usize % PAGE;
            Op::CpuRead { m, off, len: len.min(pages_of(m) * PAGE - off) }
        }),
        4 => range.clone().prop_map(|(m, page, n)| Op::DevRead { m, page, n }),
        3 => (range.clone(), any::<u8>()).prop_map(|((m, page, n), byte)| Op::DevWrite { m, page, n, byte }),
        5 => range.clone().prop_map(|(m, page, n)| Op::ToDev { m, page, n }),
        3 => range.clone().prop_map(|(m, page, n)| Op::ToSys { m, page, n }),
        2 => (range.clone(), 0u8..3).prop_map(|((m, page, n), prot)| Op::Protect { m, page, n, prot }),
        1 => range.clone().prop_map(|(m, page, n)| Op::Unmap { m, page, n }),
        2 => (0usize..2).prop_map(|m| Op::Remap { m }),
        1 => (range.clone(), any::<bool>()).prop_map(|((m, page, n), long)| Op::Pin { m, page, n, long }),
        1 => Just(Op::Unpin),
        2 => range.prop_map(|(m, page, n)| Op::Exclusive { m, page, n }),
        1 => Just(Op::Release),
        1 => Just(Op::FailNextAlloc),
    ]
}

/// The model of one mapping: bytes, and per page whether mapped and its protection.
struct MapModel {
    base: VirtAddr,
    bytes: Vec<u8>,
    mapped: Vec<bool>,
    prot: Vec<Prot>,
    large: bool,
}

impl MapModel {
    fn all(&self, page: usize, n: usize, f: impl Fn(bool, Prot) -> bool) -> bool {
        (page..page + n).all(|p| f(self.mapped[p], self.prot[p]))
    }
}

struct World {
    space: Space,
    dev: SoftDevice,
    mirror: DeviceMirror,
    maps: Vec<MapModel>,
    pins: Vec<Pin>,
}

fn world() -> World {
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap(); // smaller than what can be asked: ENOMEM paths
    let mirror = dev.mirror(&space).unwrap();
    let mut maps = Vec::new();
    for (pages, large) in [(SMALL_PAGES, false), (LARGE_PAGES, true)] {
        let base = space
            .map_anon_with(
                pages * PAGE,
                MapOptions {
                    large,
                    ..MapOptions::default()
                },
            )
            .unwrap();
        maps.push(MapModel {
            base,
            bytes: vec![0; pages * PAGE],
            mapped: vec![true; pages],
            prot: vec![Prot::ReadWrite; pages],
            large,
        });
    }
    World {
        space,
        dev,
        mirror,
        maps,
        pins: Vec::new(),
    }
}

fn prot_of(p: u8) -> Prot {
    match p {
        0 => Prot::None,
        1 => Prot::Read,
        _ => Prot::ReadWrite,
    }
}

fn apply(w: &mut World, op: &Op) -> Result<(), TestCaseError> {
    match *op {
        Op::CpuWrite { m, off, len, byte } => {
            let mm = &mut w.maps[m];
            let (p0, p1) = (off / PAGE, (off + len - 1) / PAGE + 1);
            let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
            let r = w.space.cpu_write(mm.base.add(off), &data);
            if mm.all(p0, p1 - p0, |m, p| m && p.writable()) {
                prop_assert!(r.is_ok(), "cpu write failed: {:?}", r);
                mm.bytes[off..off + len].copy_from_slice(&data);
            } else {
                prop_assert!(r.is_err(), "cpu write to an unwritable range succeeded");
            }
        }
        Op::CpuRead { m, off, len } => {
            let mm = &w.maps[m];
            let (p0, p1) = (off / PAGE, (off + len - 1) / PAGE + 1);
            let mut buf = vec![0u8; len];
            let r = w.space.cpu_read(mm.base.add(off), &mut buf);
            if mm.all(p0, p1 - p0, |m, p| m && p.readable()) {
                prop_assert!(r.is_ok(), "cpu read failed: {:?}", r);
                prop_assert!(
                    buf == mm.bytes[off..off + len],
                    "cpu read returned stale data at {:#x}",
                    off
                );
            } else {
                prop_assert!(r.is_err());
            }
        }
        Op::DevRead { m, page, n } => {
            let mm = &w.maps[m];
            let mut buf = vec![0u8; n * PAGE];
            let r = w
                .mirror
                .read(mm.base.add(page * PAGE).get() as u64, n as u64, &mut buf);
            if mm.all(page, n, |m, p| m && p.readable()) {
                prop_assert!(r.is_ok(), "device read failed: {:?}", r);
                prop_assert!(
                    buf == mm.bytes[page * PAGE..(page + n) * PAGE],
                    "device read stale data"
                );
            } else {
                prop_assert!(r.is_err(), "device read of an unreadable range succeeded");
            }
        }
        Op::DevWrite { m, page, n, byte } => {
            let mm = &mut w.maps[m];
            if !mm.all(page, n, |m, p| m && p.writable()) {
                return Ok(()); // partial device writes up to the first refused page: not modelled
            }
            let data = vec![byte; n * PAGE];
            let r = w
                .mirror
                .write(mm.base.add(page * PAGE).get() as u64, n as u64, &data);
            prop_assert!(r.is_ok(), "device write failed: {:?}", r);
            mm.bytes[page * PAGE..(page + n) * PAGE].copy_from_slice(&data);
        }
        Op::ToDev { m, page, n } => {
            let mm = &w.maps[m];
            let mut buf = vec![0u8; n * PAGE];
            let r = w.mirror.migrate_to_device(
                mm.base.add(page * PAGE).get() as u64,
                n as u64,
                &mut buf,
            );
            match r {
                Ok(_) => prop_assert!(
                    buf == mm.bytes[page * PAGE..(page + n) * PAGE],
                    "migrate returned wrong data"
                ),
                Err(e) if mm.all(page, n, |m, p| m && p.readable()) => prop_assert!(
                    matches!(e, Error::NotPresent { .. }),
                    "unexpected migrate error {e}"
                ),
                Err(_) => {}
            }
        }
        Op::ToSys { m, page, n } => {
            let mm = &w.maps[m];
            let r = w
                .mirror
                .migrate_to_system(mm.base.add(page * PAGE).get() as u64, n as u64);
            if mm.all(page, n, |m, _| m) {
                prop_assert!(r.is_ok(), "migrate to system failed: {:?}", r);
            }
        }
        Op::Protect { m, page, n, prot } => {
            let mm = &mut w.maps[m];
            let r = w
                .space
                .protect(mm.base.add(page * PAGE), n * PAGE, prot_of(prot));
            if mm.all(page, n, |m, _| m) {
                prop_assert!(r.is_ok());
                mm.prot[page..page + n].fill(prot_of(prot));
            } else {
                prop_assert!(
                    matches!(r, Err(Error::NotMapped { .. })),
                    "protect across a hole must fail"
                );
            }
        }
        Op::Unmap { m, page, n } => {
            let mm = &mut w.maps[m];
            w.space.unmap(mm.base.add(page * PAGE), n * PAGE).unwrap();
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
                w.space
                    .map_anon_at(mm.base.add(s * PAGE), (p - s) * PAGE, opts)
                    .unwrap();
                mm.mapped[s..p].fill(true);
                mm.prot[s..p].fill(Prot::ReadWrite);
            }
        }
        Op::Pin { m, page, n, long } => {
            let mm = &w.maps[m];
            let r = w.space.pin(mm.base.add(page * PAGE), n * PAGE, long);
            if mm.all(page, n, |m, p| m && p.readable()) {
                prop_assert!(r.is_ok(), "pin failed: {:?}", r);
                if w.pins.len() >= 4 {
                    w.pins.remove(0);
                }
                w.pins.push(r.unwrap());
                // A pinned page is in system memory.
                prop_assert_eq!(
                    w.space.residency(mm.base.add(page * PAGE)),
                    Residency::System
                );
            } else {
                prop_assert!(r.is_err());
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
                .exclusive(mm.base.add(page * PAGE).get() as u64, n as u64, &mut buf);
            if r.is_ok() {
                prop_assert!(
                    buf == mm.bytes[page * PAGE..(page + n) * PAGE],
                    "exclusive returned wrong data"
                );
            }
        }
        Op::Release => {
            w.dev.release().unwrap();
            prop_assert_eq!(w.dev.used(), 0, "release leaves no page in device memory");
        }
        Op::FailNextAlloc => w.dev.fail_next_alloc(),
    }
    Ok(())
}

fn check_all(w: &World) -> Result<(), TestCaseError> {
    for mm in &w.maps {
        for p in 0..mm.mapped.len() {
            if mm.mapped[p] && mm.prot[p].readable() {
                let mut b = vec![0u8; PAGE];
                w.space.cpu_read(mm.base.add(p * PAGE), &mut b).unwrap();
                prop_assert!(
                    b == mm.bytes[p * PAGE..(p + 1) * PAGE],
                    "final check: page {} differs",
                    p
                );
            }
        }
    }
    Ok(())
}

#[test]
fn random_operations_match_the_model() {
    let soak: u32 = std::env::var("HETMEM_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let _w = watchdog("model", 300 * soak as u64);
    let cfg = Config {
        cases: CASES * soak,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(cfg);
    runner
        .run(&proptest::collection::vec(op_strategy(), OPS), |ops| {
            let mut w = world();
            for op in &ops {
                apply(&mut w, op)?;
            }
            check_all(&w)
        })
        .unwrap();
}
