#!/usr/bin/env python3
"""Writes the seed corpus of the `ops` fuzz target into fuzz/corpus/ops/seed-*.

Each op is an 8-byte record (see the doc comment of fuzz_targets/ops.rs):
kind, flags (bit 0 large mapping, bit 1 long pin, bits 2-3 prot), a (u24 LE: page or byte
offset), b (u16 LE: pages or bytes), data byte.
"""
import os
import struct

KINDS = ["CpuWrite", "CpuRead", "DevRead", "DevWrite", "ToDev", "ToSys", "Protect", "Unmap",
         "Remap", "Pin", "Unpin", "Exclusive", "Release", "FailNextAlloc"]
PAGE = 4096


def op(kind, large=False, a=0, b=1, byte=0, long=False, prot=2):
    flags = int(large) | (int(long) << 1) | (prot << 2)
    return struct.pack("<BB", KINDS.index(kind), flags) + a.to_bytes(3, "little") + \
        struct.pack("<HB", b, byte)


SEEDS = {
    # CPU and device accesses to the normal mapping, across page boundaries.
    "seed-cpu-dev": [
        op("CpuWrite", a=100, b=9000, byte=7),
        op("DevRead", a=0, b=4),
        op("DevWrite", a=2, b=3, byte=0xAB),
        op("CpuRead", a=PAGE - 10, b=3 * PAGE),
        op("DevRead", a=0, b=8),
    ],
    # Migration to the device and back: by CPU fault, by command, by device release.
    "seed-migrate": [
        op("CpuWrite", a=0, b=8 * PAGE, byte=1),
        op("ToDev", a=0, b=8),
        op("CpuRead", a=3 * PAGE + 5, b=100),
        op("ToDev", a=4, b=8),
        op("DevWrite", a=6, b=2, byte=9),
        op("ToSys", a=0, b=12),
        op("ToDev", a=0, b=12),
        op("Release"),
        op("CpuRead", a=0, b=12 * PAGE),
    ],
    # The large mapping: whole 2 MiB units, then partial operations that split them.
    "seed-large": [
        op("CpuWrite", large=True, a=0, b=PAGE, byte=3),
        op("ToDev", large=True, a=0, b=512),
        op("CpuRead", large=True, a=511 * PAGE, b=2 * PAGE),
        op("ToDev", large=True, a=512, b=512),
        op("Protect", large=True, a=600, b=4, prot=1),
        op("Exclusive", large=True, a=700, b=3),
        op("CpuWrite", large=True, a=700 * PAGE + 8, b=64, byte=5),
        op("Unmap", large=True, a=10, b=2),
        op("DevRead", large=True, a=0, b=16),
        op("Remap", large=True),
    ],
    # Protections, holes and pins.
    "seed-prot-pin": [
        op("CpuWrite", a=0, b=15 * PAGE, byte=0x10),
        op("Protect", a=4, b=4, prot=0),
        op("CpuRead", a=3 * PAGE, b=2 * PAGE),
        op("Protect", a=4, b=4, prot=1),
        op("CpuWrite", a=5 * PAGE, b=10, byte=1),
        op("Unmap", a=20, b=5),
        op("Protect", a=18, b=10, prot=1),
        op("ToDev", a=8, b=4),
        op("Pin", a=8, b=2, long=True),
        op("ToDev", a=8, b=4),
        op("Pin", a=30, b=3),
        op("Unpin"),
        op("Remap"),
        op("DevRead", a=18, b=10),
    ],
    # Injected allocation failures and a full device (4 MiB: less than both mappings).
    "seed-fail-alloc": [
        op("FailNextAlloc"),
        op("ToDev", a=0, b=16),
        op("ToDev", large=True, a=0, b=1024),
        op("ToDev", a=0, b=48),
        op("FailNextAlloc"),
        op("CpuRead", large=True, a=0, b=PAGE),
        op("Exclusive", a=1, b=2),
        op("DevWrite", a=1, b=1, byte=0xFF),
        op("Release"),
    ],
}

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "ops")
os.makedirs(here, exist_ok=True)
for name, ops in SEEDS.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(b"".join(ops))
