//! Coverage-guided fuzzing of hetmem's operation sequences: the input is decoded into a bounded
//! sequence of `hetmem::testing::check::Op`s, applied to a fresh `World` (a real `Space` on userfaultfd, a
//! `SoftDevice` and its mirror) and checked after each step and at the end against the in-memory
//! model — the same checker as the property test `tests/model.rs`. A mismatch panics with the
//! failing op, its index and the ops before it.
//!
//! Input format: 8-byte records, one op each (a trailing partial record is ignored; at most
//! `MAX_OPS` ops):
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | op kind, modulo 18 (0 CpuWrite, 1 CpuRead, 2 DevRead, 3 DevWrite, 4 ToDev, 5 ToSys, 6 Protect, 7 Unmap, 8 Remap, 9 Pin, 10 Unpin, 11 Exclusive, 12 Release, 13 FailNextAlloc, 14 CohRead, 15 CohWrite, 16 CohToDev, 17 CohToSys: the coherent device's ops) |
//! | 1 | flags: bit 0 mapping (0 normal, 1 large), bit 1 long-term pin, bits 2–3 protection (0 none, 1 read, 2–3 read-write) |
//! | 2–4 | `a`, 24-bit little-endian: first page, or byte offset for CPU ops (wrapped into the mapping) |
//! | 5–6 | `b`, 16-bit little-endian: pages, or bytes for CPU ops (clamped to 1 ..= the end of the mapping) |
//! | 7 | data byte for writes |

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use hetmem::testing::check::{Op, World, apply, check_all};
use libfuzzer_sys::fuzz_target;

/// Bytes per encoded op.
const RECORD: usize = 8;
/// At most this many ops per input.
const MAX_OPS: usize = 512;

/// One op as decoded from the input, before clamping into range.
#[derive(Clone, Copy, Debug)]
struct FuzzOp {
    kind: u8,
    flags: u8,
    a: u32,
    b: u16,
    byte: u8,
}

impl<'a> Arbitrary<'a> for FuzzOp {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let r = u.bytes(RECORD)?;
        Ok(FuzzOp {
            kind: r[0],
            flags: r[1],
            a: u32::from_le_bytes([r[2], r[3], r[4], 0]),
            b: u16::from_le_bytes([r[5], r[6]]),
            byte: r[7],
        })
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (RECORD, Some(RECORD))
    }
}

impl FuzzOp {
    /// The checker's op, clamped into range.
    fn to_op(self) -> Op {
        let m = (self.flags & 1) as usize;
        let long = self.flags & 2 != 0;
        let prot = (self.flags >> 2) & 3;
        let (a, b, byte) = (self.a as usize, self.b as usize, self.byte);
        let (page, n, off, len) = (a, b, a, b);
        let op = match self.kind % 18 {
            0 => Op::CpuWrite { m, off, len, byte },
            1 => Op::CpuRead { m, off, len },
            2 => Op::DevRead { m, page, n },
            3 => Op::DevWrite { m, page, n, byte },
            4 => Op::ToDev { m, page, n },
            5 => Op::ToSys { m, page, n },
            6 => Op::Protect { m, page, n, prot },
            7 => Op::Unmap { m, page, n },
            8 => Op::Remap { m },
            9 => Op::Pin { m, page, n, long },
            10 => Op::Unpin,
            11 => Op::Exclusive { m, page, n },
            12 => Op::Release,
            13 => Op::FailNextAlloc,
            14 => Op::CohRead { m, page, n },
            15 => Op::CohWrite { m, page, n, byte },
            16 => Op::CohToDev { m, page, n },
            _ => Op::CohToSys { m, page, n },
        };
        op.clamped()
    }
}

/// The decoded input: the ops, in range.
#[derive(Debug)]
struct Ops(Vec<Op>);

impl<'a> Arbitrary<'a> for Ops {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut ops = Vec::new();
        while ops.len() < MAX_OPS && u.len() >= RECORD {
            ops.push(FuzzOp::arbitrary(u)?.to_op());
        }
        Ok(Ops(ops))
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Self::arbitrary(&mut u)
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (0, Some(RECORD * MAX_OPS))
    }
}

fuzz_target!(|input: Ops| {
    let ops = input.0;
    if std::env::var_os("HETMEM_FUZZ_PRINT").is_some() {
        for (i, op) in ops.iter().enumerate() {
            eprintln!("op {i}: {op:?}");
        }
    }
    let mut w = World::new().expect("world setup");
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = apply(&mut w, op) {
            panic!(
                "op {i} of {}: {op:?}: {e}\nops before it: {:#?}",
                ops.len(),
                &ops[..i]
            );
        }
    }
    if let Err(e) = check_all(&w) {
        panic!("after {} ops: {e}\nops: {ops:#?}", ops.len());
    }
});
