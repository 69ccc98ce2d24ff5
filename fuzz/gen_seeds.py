#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets: fuzz/corpus/ops/seed-* and
fuzz/corpus/file_ops/seed-*.

`ops`: each op is an 8-byte record (see the doc comment of fuzz_targets/ops.rs):
kind, flags (bit 0 large mapping, bit 1 long pin, bits 2-3 prot), a (u24 LE: page or byte
offset), b (u16 LE: pages or bytes), data byte.

`file_ops`: a 7-byte header (flags: bit 0 sparse, bits 1-2 mappings; u16 LE initial length;
u32 LE seed of the initial contents), then 12-byte records (see the doc comment of
fuzz_targets/file_ops.rs): kind, flags (bit 0 handle, bit 1 the op's choice, bit 2 pin the
private mapping / device access through the device-coherent device / place or bring back
through the device's mirror, bit 3 unpin, bits 4-6 fault kind, bit 7 ENOSPC), a (u32 LE: byte
offset, page or length), b (u16 LE: bytes, words, pages or a count), data seed (u32 LE).
"""
import os
import struct

KINDS = ["CpuWrite", "CpuRead", "DevRead", "DevWrite", "ToDev", "ToSys", "Protect", "Unmap",
         "Remap", "Pin", "Unpin", "Exclusive", "Release", "FailNextAlloc", "CohRead", "CohWrite",
         "CohToDev", "CohToSys"]
PAGE = 4096
MAX_WORDS = 3 * PAGE // 4


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

FILE_KINDS = ["Write", "Read", "SetLen", "Punch", "Fsync", "DirectRead", "DirectWrite",
              "NewHandle", "Fault", "MapStore", "MapLoad", "Private", "PrivateMigrate", "Remap",
              "DeviceRemoval", "Pin", "Device", "Place", "Unplace", "Release", "Replicate"]
FAULTS = ["FailWrites", "ShortWrite", "FailSync", "FailRead", "FailStaging", "Clear"]
MAPPINGS = {None: 0, "intercept": 1, "tracked": 2}


def header(sparse=False, mapping=None, length=0, seed=0):
    flags = int(sparse) | (MAPPINGS[mapping] << 1)
    return struct.pack("<BHI", flags, length, seed)


def fop(kind, h=0, choice=False, a=0, b=1, seed=0, fault="Clear", enospc=False, private=False,
        unpin=False, mirror=False, coherent=False):
    """`private` (Pin), `mirror` (Place, Unplace, Replicate) and `coherent` (Device) are bit 2; the
    device-coherent device of DeviceRemoval, Place, Unplace and Release is `choice`."""
    bit2 = private or mirror or coherent
    flags = h | (int(choice) << 1) | (int(bit2) << 2) | (int(unpin) << 3) | \
        (FAULTS.index(fault) << 4) | (int(enospc) << 7)
    return struct.pack("<BBIHI", FILE_KINDS.index(kind), flags, a, b, seed)


def place(page, pages, coherent=False, mirror=False):
    return fop("Place", choice=coherent, mirror=mirror, a=page, b=pages)


def unplace(page, pages, coherent=False, mirror=False):
    return fop("Unplace", choice=coherent, mirror=mirror, a=page, b=pages)


def replicate(page, pages, mirror=False):
    return fop("Replicate", mirror=mirror, a=page, b=pages)


def fault(kind, n=1, enospc=False):
    return fop("Fault", fault=kind, b=n, enospc=enospc)


FILE_SEEDS = {
    # Writes and reads through the cache and around it, past the end of file, with fsyncs.
    "seed-write-read": (header(length=5000, seed=1), [
        fop("Write", a=100, b=3 * PAGE, seed=2),
        fop("Read", h=1, a=0, b=2 * PAGE),
        fop("Write", a=14 * PAGE + 10, b=PAGE, seed=3),
        fop("Fsync"),
        fop("DirectRead", h=1, a=3 * PAGE - 7, b=PAGE),
        fop("DirectWrite", a=2 * PAGE + 1, b=2 * PAGE, seed=4),
        fop("Read", a=2 * PAGE, b=3 * PAGE),
        fop("Write", h=1, a=8 * PAGE, b=3 * PAGE, seed=5),
        fop("Fsync", h=1, choice=True),
    ]),
    # Truncation (unaligned, aligned, to zero), extension, hole punch, a new handle.
    "seed-truncate-punch": (header(length=4 * PAGE, seed=6), [
        fop("Write", a=4 * PAGE, b=3 * PAGE, seed=7),
        fop("SetLen", a=3 * PAGE + 100),
        fop("Read", a=3 * PAGE, b=PAGE),
        fop("SetLen", a=10 * PAGE),
        fop("Punch", a=1, b=2),
        fop("Write", a=2 * PAGE + 50, b=100, seed=8),
        fop("Punch", a=9, b=3),
        fop("NewHandle"),
        fop("Fsync", h=1),
        fop("SetLen", a=0),
        fop("Write", a=5 * PAGE, b=10, seed=9),
        fop("Fsync"),
    ]),
    # Writeback faults reported by fsync on both handles, the dirty bound refusing writes,
    # short writes, failed syncs and reads, staging faults.
    "seed-fsync-faults": (header(length=2 * PAGE, seed=10), [
        fault("FailWrites", n=2),
        fop("Write", a=0, b=3 * PAGE, seed=11),
        fop("Write", a=3 * PAGE, b=3 * PAGE, seed=12),
        fop("Write", a=6 * PAGE, b=3 * PAGE, seed=13),
        fop("Fsync"),
        fop("Fsync", h=1, choice=True),
        fault("ShortWrite"),
        fop("Write", a=PAGE, b=PAGE, seed=14),
        fop("Fsync"),
        fault("FailSync", enospc=True),
        fop("Fsync", h=1),
        fault("FailWrites", n=1, enospc=True),
        fop("DirectWrite", a=100, b=200, seed=15),
        fop("DirectRead", a=0, b=PAGE),
        fault("FailRead"),
        fop("Read", a=12 * PAGE, b=PAGE),
        fault("FailStaging"),
        fop("Write", a=13 * PAGE, b=PAGE, seed=16),
        fault("FailStaging", enospc=True),
        fop("Read", a=14 * PAGE, b=2 * PAGE),
        fault("Clear"),
        fop("Fsync"),
    ]),
    # Stores and loads through a shared mapping that intercepts stores, with eviction, protect
    # and unmap cycles, pins and device reads (device writes are refused).
    "seed-map-intercept": (header(mapping="intercept", length=3 * PAGE, seed=17), [
        fop("MapStore", a=100, b=300, seed=18),
        fop("MapLoad", a=0, b=PAGE // 4),
        fop("Write", a=4 * PAGE, b=3 * PAGE, seed=19),
        fop("Write", a=8 * PAGE, b=3 * PAGE, seed=20),
        fop("MapStore", a=9 * PAGE, b=2 * PAGE // 4, seed=21),
        fop("Pin", a=0, b=2),
        fop("Write", a=12 * PAGE, b=3 * PAGE, seed=22),
        fop("Device", a=0, b=3),
        fop("Device", choice=True, a=1, b=1, seed=23),
        fop("Remap"),
        fop("MapStore", a=8, b=4, seed=24),
        fop("Fsync"),
        fop("Remap", choice=True),
        fop("MapLoad", a=9 * PAGE, b=100),
        fop("Pin", unpin=True),
        fop("Punch", a=0, b=1),
        fop("MapLoad", a=0, b=16),
    ]),
    # A shared mapping whose stores are tracked asynchronously, device writes through it, the
    # device removed and replaced.
    "seed-map-tracked-device": (header(mapping="tracked", length=4 * PAGE, seed=25), [
        fop("Device", choice=True, a=0, b=2, seed=26),
        fop("MapStore", a=3 * PAGE, b=PAGE // 4, seed=27),
        fop("Device", a=0, b=3),
        fop("Fsync", h=1),
        fop("DeviceRemoval"),
        fop("Device", choice=True, a=2, b=3, seed=28),
        fop("SetLen", a=2 * PAGE + 12),
        fop("MapLoad", a=0, b=MAX_WORDS),
        fop("Write", a=6 * PAGE, b=PAGE, seed=29),
        fop("Device", a=4, b=3),
        fop("Fsync", choice=True),
    ]),
    # The private mapping: snapshots, copy on write, truncation, migration to the device and
    # back, pinned private pages, device removal.
    "seed-private": (header(sparse=True, mapping="intercept", length=4 * PAGE, seed=30), [
        fop("Private", a=0, b=10),
        fop("Private", choice=True, a=PAGE + 8, b=20, seed=31),
        fop("Write", a=0, b=2 * PAGE, seed=32),
        fop("Private", a=0, b=PAGE // 4),
        fop("SetLen", a=PAGE),
        fop("Private", a=PAGE, b=30),
        fop("PrivateMigrate", choice=True, a=0, b=2),
        fop("Private", a=4, b=4),
        fop("Pin", choice=True, private=True, a=1, b=1),
        fop("PrivateMigrate", choice=True, a=0, b=2),
        fop("PrivateMigrate", a=0, b=2),
        fop("PrivateMigrate", choice=True, a=0, b=4),
        fop("DeviceRemoval"),
        fop("Private", choice=True, a=PAGE, b=8, seed=33),
        fop("Remap", choice=True),
        fop("Private", a=0, b=8),
    ]),
    # Placements through the cache on both devices, with no mapping: reads of the frames,
    # write_at bringing pages back, a direct write into a placed page, truncation into a
    # placed partial last page then extension (its tail reads as zeros), a punch, the
    # device-coherent device full (4 free frames), eviction of placed pages, release,
    # removal, faults during a placement's fill and a return's copy back.
    "seed-place-cache": (header(length=4 * PAGE + 100, seed=50), [
        fop("Write", a=4 * PAGE, b=3 * PAGE, seed=51),
        place(0, 6),
        fop("Read", a=PAGE - 3, b=2 * PAGE),
        fop("Write", a=2 * PAGE + 5, b=10, seed=52),
        fop("DirectWrite", h=1, a=3 * PAGE + 7, b=20, seed=53),
        fop("SetLen", a=5 * PAGE + 100),
        fop("SetLen", a=7 * PAGE),
        fop("Read", a=5 * PAGE, b=3 * PAGE),
        place(0, 6, coherent=True),
        place(6, 6, coherent=True),
        fop("Punch", a=4, b=2),
        fop("Fsync"),
        fault("FailRead"),
        fop("SetLen", a=12 * PAGE),
        place(7, 5, coherent=True),
        fault("FailStaging"),
        unplace(0, 6),
        fault("Clear"),
        fop("Write", a=9 * PAGE, b=3 * PAGE, seed=54),
        fop("Write", a=0, b=3 * PAGE, seed=55),
        fop("Release", choice=True),
        place(8, 4),
        fop("DeviceRemoval"),
        fop("Fsync", h=1),
    ]),
    # Placements through the mirrors of a mapping that intercepts stores: the device writes
    # its own frames (written back in place by fsync), CPU loads and stores bring private pages
    # back, the other device's access brings them back too, the device-coherent device writes
    # through the intercepting mapping, the private mapping's first access reads a private
    # page's frame, pins (a long-term pin moves coherent pages too), writes that evict pages the
    # device wrote, returns through the mirrors, release and removal.
    "seed-place-intercept": (header(mapping="intercept", length=4 * PAGE, seed=60), [
        place(0, 4, mirror=True),
        fop("Device", choice=True, a=0, b=3, seed=61),
        fop("Fsync"),
        fop("MapLoad", a=PAGE + 8, b=4),
        fop("MapStore", a=2 * PAGE, b=8, seed=62),
        fop("Device", coherent=True, a=3, b=1),
        place(4, 4, coherent=True, mirror=True),
        fop("Device", choice=True, a=4, b=2, seed=63),
        fop("Private", a=0, b=16),
        place(0, 2),
        fop("Private", a=4, b=4),
        fop("Pin", choice=True, a=4, b=2),
        place(4, 4),
        fop("Pin", unpin=True),
        place(0, 1),
        fop("Device", choice=True, a=0, b=1, seed=64),
        fop("Write", a=10 * PAGE, b=3 * PAGE, seed=65),
        fop("Write", a=13 * PAGE, b=3 * PAGE, seed=66),
        fop("Read", a=0, b=3 * PAGE),
        unplace(4, 4, coherent=True, mirror=True),
        place(5, 6, mirror=True),
        fop("SetLen", a=6 * PAGE + 1),
        fop("Release"),
        place(0, 6, coherent=True),
        fop("DeviceRemoval", choice=True),
        fop("Fsync", h=1, choice=True),
    ]),
    # A mapping that does not intercept stores: device-private placement refused (through the
    # cache and the mirror), device-coherent placement in place, CPU stores and device writes
    # to coherent pages tracked and written back, release.
    "seed-place-tracked": (header(mapping="tracked", length=6 * PAGE, seed=70), [
        place(0, 4),
        place(0, 4, mirror=True),
        place(0, 4, coherent=True, mirror=True),
        fop("MapStore", a=PAGE, b=16, seed=71),
        fop("Device", choice=True, a=2, b=2, seed=72),
        fop("Device", choice=True, coherent=True, a=0, b=1, seed=73),
        fop("Fsync"),
        fop("Punch", a=3, b=1),
        place(4, 2, coherent=True),
        fop("Release", choice=True),
        fop("Fsync", h=1),
    ]),
    # Read-only replicas on the device-private device, with a mapping that intercepts stores:
    # through the cache and the mirror, the device reads its copies, CPU loads keep them; a
    # placed page is skipped; every write drops them first (a CPU store, a device write of
    # either device, write_at, a direct write, truncation into a partial last page, a punch,
    # a pin), as do a return and the device's release and removal; the device full.
    "seed-replicate": (header(mapping="intercept", length=6 * PAGE + 100, seed=80), [
        place(5, 1, coherent=True),
        replicate(0, 6),
        fop("Device", a=0, b=3),
        fop("MapLoad", a=PAGE + 8, b=4),
        fop("MapStore", a=PAGE, b=4, seed=81),
        fop("Device", choice=True, a=2, b=1, seed=82),
        fop("Device", choice=True, coherent=True, a=3, b=1, seed=83),
        fop("Write", a=4 * PAGE + 9, b=10, seed=84),
        replicate(0, 7, mirror=True),
        fop("DirectWrite", a=100, b=50, seed=85),
        fop("SetLen", a=5 * PAGE + 7),
        fop("SetLen", a=6 * PAGE),
        fop("Device", a=4, b=2),
        fop("Punch", a=1, b=1),
        fop("Pin", a=2, b=1),
        fop("Pin", unpin=True),
        replicate(0, 6),
        unplace(0, 2),
        fop("Release"),
        replicate(0, 6, mirror=True),
        fop("DeviceRemoval"),
        fop("Fsync"),
    ]),
    # A sparse world: many writes, few full reads, so eviction happens inside operations.
    "seed-sparse-evict": (header(sparse=True, length=0), [
        fop("Write", h=i % 2, a=(i * 5 % 16) * PAGE + i, b=3 * PAGE, seed=40 + i)
        for i in range(12)
    ] + [
        fop("SetLen", a=16 * PAGE),
        fop("Read", a=15 * PAGE, b=3 * PAGE),
        fop("Fsync"),
    ]),
}

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
here = os.path.join(root, "ops")
os.makedirs(here, exist_ok=True)
for name, ops in SEEDS.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(b"".join(ops))

here = os.path.join(root, "file_ops")
os.makedirs(here, exist_ok=True)
for name, (head, ops) in FILE_SEEDS.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(head + b"".join(ops))
