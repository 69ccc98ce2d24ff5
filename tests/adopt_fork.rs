//! `fork()` of a process with adopted memory in device memory ([`Space::adopt`]; space module
//! `fork`).

mod common;
use common::*;

use hetmem::sys::ChildExit;
use hetmem::*;

mod plain;
use plain::{Plain, adopt_plain};

fn word(p: usize) -> u32 {
    0xad00_0000 | p as u32
}

/// `fork()` with adopted pages in device memory: the child sees the parent's data, every page
/// (hetmem's fork handler copies them into the CPU view for the fork), and its stores stay its
/// own; the parent's pages are still on the device afterwards, with the parent's values.
#[test]
fn fork_child_sees_adopted_pages_that_were_in_device_memory() {
    let _w = watchdog("fork_adopted", 60);
    const N: usize = 64;
    let mem = Plain::new(N * PAGE, libc::PROT_READ | libc::PROT_WRITE);
    for p in 0..N {
        mem.store(p * PAGE, word(p));
    }
    let space = adopt_plain(mem.at(0), N * PAGE).unwrap();
    let dev = SoftDevice::private(4 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    m.migrate_range_to_device(mem.at(0), N * PAGE).unwrap();
    let mut snap = vec![0u8; N];
    m.snapshot(mem.at(0), N * PAGE, &mut snap).unwrap();
    assert!(snap.iter().all(|f| f & 0xF0 == snap::DEV_PRIVATE_LOCAL));
    let mem_ref = &mem;
    // SAFETY: the child makes plain loads and stores to the test's own mapping (volatile
    // accesses: no allocation, no lock) and exits with a code.
    let st = unsafe {
        sys::fork_and_wait(|| {
            for p in 0..N {
                if mem_ref.load(p * PAGE) != word(p) {
                    return 10;
                }
                mem_ref.store(p * PAGE, 0xc41d);
            }
            if mem_ref.load(0) != 0xc41d {
                return 11;
            }
            0
        })
    }
    .unwrap();
    assert_eq!(
        st,
        ChildExit::Exited(0),
        "the child's view of the parent's data"
    );
    // The parent: its pages are still on the device (a fork moves nothing), with its values.
    m.snapshot(mem.at(0), N * PAGE, &mut snap).unwrap();
    assert!(snap.iter().all(|f| f & 0xF0 == snap::DEV_PRIVATE_LOCAL));
    let mut buf = vec![0u8; N * PAGE];
    m.read(mem.at(0), N * PAGE, &mut buf).unwrap();
    for p in 0..N {
        let w = u32::from_ne_bytes(buf[p * PAGE..p * PAGE + 4].try_into().unwrap());
        assert_eq!(w, word(p), "parent's page {p} on the device");
        assert_eq!(mem.load(p * PAGE), word(p), "parent's page {p}");
    }
}
