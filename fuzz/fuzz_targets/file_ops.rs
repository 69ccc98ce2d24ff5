//! Coverage-guided fuzzing of hetmem's page cache for files: the input is decoded into a world
//! setup and a bounded sequence of `hetmem::testing::check_file::Op`s, applied to a fresh `World` (a real
//! temporary file cached by a `FileCache` over a `FaultyBackend`, two handles, a device-private
//! and a device-coherent `SoftDevice` the file's pages are placed on, and optionally a `Space`
//! with a shared and a private mapping of the file that both devices mirror) and checked after
//! each step and at the end against the model — the same checker as the property test
//! `tests/file_cache_model.rs`. A mismatch panics with the failing op, its index and the ops
//! before it.
//!
//! Input format: a 7-byte header (missing bytes read as 0), then 12-byte records, one op each (a
//! trailing partial record is ignored; at most `MAX_OPS` ops).
//!
//! Header:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | bit 0: sparse (the whole file is read back only every `SPARSE` ops); bits 1–2: mappings (0 none, 1 shared mapping intercepting stores, 2 shared mapping tracking stores asynchronously, 3 none), each with the private mapping and the devices' mirrors; bit 3: shared anonymous memory (a cache without a file) instead of a file |
//! | 1–2 | initial length of the file, 16-bit little-endian, modulo 4 pages + 1 |
//! | 3–6 | seed of the initial contents, 32-bit little-endian (`check_file::data`) |
//!
//! Record:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | op kind, modulo 21, in the order of `hetmem::testing::check_file::Op` (0 Write, 1 Read, 2 SetLen, 3 Punch, 4 Fsync, 5 DirectRead, 6 DirectWrite, 7 NewHandle, 8 Fault, 9 MapStore, 10 MapLoad, 11 Private, 12 PrivateMigrate, 13 Remap, 14 DeviceRemoval, 15 Pin, 16 Device, 17 Place, 18 Unplace, 19 Release, 20 Replicate) |
//! | 1 | flags: bit 0 handle; bit 1 the op's choice (Fsync: fdatasync, Private: store, PrivateMigrate: to the device, Remap: unmap, Pin: long-term, Device: write, DeviceRemoval, Place, Unplace, Release: the device-coherent device); bit 2 Pin: the private mapping, Device: through the device-coherent device, Place, Unplace and Replicate: through the device's mirror; bit 3 Pin: unpin; bits 4–6 fault kind, modulo 6 (0 FailWrites, 1 ShortWrite, 2 FailSync, 3 FailRead, 4 FailStaging, 5 Clear); bit 7 fault errno (0 EIO, ENOMEM for staging; 1 ENOSPC) |
//! | 2–5 | `a`, 32-bit little-endian: byte offset (I/O and mapping ops), page (Punch, PrivateMigrate, Pin, Device, Place, Unplace, Replicate) or new length (SetLen); wrapped into range |
//! | 6–7 | `b`, 16-bit little-endian: bytes (I/O), words (mapping ops), pages, or the count of failing writes (FailWrites); clamped into range |
//! | 8–11 | data seed, 32-bit little-endian (writes, stores) |
//!
//! Ranges are those of `Op::clamped`: offsets within the first `WINDOW` pages (`MAP_LEN` bytes
//! for mapping ops, rounded down to a word), I/O of up to `MAX_IO` bytes, 1–3 pages (1–4 for
//! PrivateMigrate, 1–`MAX_PLACE` for Place, Unplace and Replicate), at most 2 failing writes.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use hetmem::testing::check_file::{Fault, Op, World, apply, check_all, data};
use libfuzzer_sys::fuzz_target;

/// Bytes of the header.
const HEADER: usize = 7;
/// Bytes per encoded op.
const RECORD: usize = 12;
/// At most this many ops per input.
const MAX_OPS: usize = 256;
/// Largest initial file (4 pages, as in the property test).
const MAX_INITIAL: usize = 4 * 4096;

/// The world's setup, as decoded from the header.
#[derive(Debug)]
struct Setup {
    sparse: bool,
    /// Shared anonymous memory instead of a file (`World::new_anonymous`).
    anon: bool,
    /// `Some(intercept_stores)`: the mappings and the device.
    mapped: Option<bool>,
    len: usize,
    seed: u32,
}

impl Setup {
    fn decode(h: &[u8]) -> Setup {
        let mut b = [0u8; HEADER];
        b[..h.len()].copy_from_slice(h);
        Setup {
            sparse: b[0] & 1 != 0,
            anon: b[0] & 8 != 0,
            mapped: match (b[0] >> 1) & 3 {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            },
            len: u16::from_le_bytes([b[1], b[2]]) as usize % (MAX_INITIAL + 1),
            seed: u32::from_le_bytes([b[3], b[4], b[5], b[6]]),
        }
    }
}

/// One op as decoded from the input, before clamping into range.
#[derive(Clone, Copy, Debug)]
struct FuzzOp {
    kind: u8,
    flags: u8,
    a: u32,
    b: u16,
    seed: u32,
}

impl<'a> Arbitrary<'a> for FuzzOp {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let r = u.bytes(RECORD)?;
        Ok(FuzzOp {
            kind: r[0],
            flags: r[1],
            a: u32::from_le_bytes([r[2], r[3], r[4], r[5]]),
            b: u16::from_le_bytes([r[6], r[7]]),
            seed: u32::from_le_bytes([r[8], r[9], r[10], r[11]]),
        })
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (RECORD, Some(RECORD))
    }
}

impl FuzzOp {
    /// The checker's op, clamped into range.
    fn to_op(self) -> Op {
        let h = (self.flags & 1) as usize;
        let choice = self.flags & 2 != 0;
        let (bit2, coherent, mirror) = (self.flags & 4 != 0, choice, self.flags & 4 != 0);
        let (a, b, seed) = (self.a as usize, self.b as usize, self.seed);
        let (off, len, page, pages, words) = (a, b, a, b, b);
        let op = match self.kind % 21 {
            0 => Op::Write { h, off, len, seed },
            1 => Op::Read { h, off, len },
            2 => Op::SetLen { len: a },
            3 => Op::Punch { page, pages },
            4 => Op::Fsync {
                h,
                data_only: choice,
            },
            5 => Op::DirectRead { h, off, len },
            6 => Op::DirectWrite { h, off, len, seed },
            7 => Op::NewHandle,
            8 => {
                let enospc = self.flags & 0x80 != 0;
                let io = if enospc { libc::ENOSPC } else { libc::EIO };
                Op::Fault(match ((self.flags >> 4) & 7) % 6 {
                    0 => Fault::FailWrites(b as u32, io),
                    1 => Fault::ShortWrite,
                    2 => Fault::FailSync(io),
                    3 => Fault::FailRead(io),
                    4 => Fault::FailStaging(if enospc { libc::ENOSPC } else { libc::ENOMEM }),
                    _ => Fault::Clear,
                })
            }
            9 => Op::MapStore { off, words, seed },
            10 => Op::MapLoad { off, words },
            11 => Op::Private {
                off,
                words,
                store: choice.then_some(seed),
            },
            12 => Op::PrivateMigrate {
                page,
                pages,
                to_device: choice,
            },
            13 => Op::Remap { unmap: choice },
            14 => Op::DeviceRemoval { coherent },
            15 => {
                let (private, unpin) = (bit2, self.flags & 8 != 0);
                Op::Pin((!unpin).then_some((page, pages, choice, private)))
            }
            16 => Op::Device {
                page,
                pages,
                write: choice.then_some(seed),
                coherent: bit2,
            },
            17 => Op::Place {
                page,
                pages,
                coherent,
                mirror,
            },
            18 => Op::Unplace {
                page,
                pages,
                coherent,
                mirror,
            },
            19 => Op::Release { coherent },
            _ => Op::Replicate {
                page,
                pages,
                mirror,
            },
        };
        op.clamped()
    }
}

/// The decoded input: the setup and the ops, in range.
#[derive(Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let h = u.bytes(u.len().min(HEADER))?;
        let setup = Setup::decode(h);
        let mut ops = Vec::new();
        while ops.len() < MAX_OPS && u.len() >= RECORD {
            ops.push(FuzzOp::arbitrary(u)?.to_op());
        }
        Ok(Input { setup, ops })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Self::arbitrary(&mut u)
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (0, Some(HEADER + RECORD * MAX_OPS))
    }
}

fuzz_target!(|input: Input| {
    let Input { setup, ops } = input;
    if std::env::var_os("HETMEM_FUZZ_PRINT").is_some() {
        eprintln!("setup: {setup:?}");
        for (i, op) in ops.iter().enumerate() {
            eprintln!("op {i}: {op:?}");
        }
    }
    let initial = data(setup.seed, setup.len);
    let world = if setup.anon {
        World::new_anonymous(&initial, setup.sparse, setup.mapped)
    } else {
        World::new(&initial, setup.sparse, setup.mapped)
    };
    let mut w = match world {
        Ok(w) => w,
        Err(e) => panic!("world setup ({setup:?}): {e}"),
    };
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = apply(&mut w, op) {
            panic!(
                "op {i} of {} ({setup:?}): {op:?}: {e}\nops before it: {:#?}",
                ops.len(),
                &ops[..i]
            );
        }
    }
    if let Err(e) = check_all(w) {
        panic!("after {} ops ({setup:?}): {e}\nops: {ops:#?}", ops.len());
    }
});
