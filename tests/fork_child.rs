//! A forked child makes hetmem objects of its own (space module `fork`, "A child's own
//! hetmem"), as the child of a program written for the kernel's test device opens a device of
//! its own: it adopts the memory it inherited (the parent's hetmem memory, plain memory in the
//! child, pages that were in device memory included), migrates it to a new device, reads it
//! back, and makes a new space. The parent's placement and data are unchanged.
//!
//! A plain `main` (no test harness): the child allocates and takes locks, which is sound only
//! where no other thread of the parent holds one at the fork (hetmem's own tables are held
//! across the fork by its handlers; the harness's threads' are not).

mod common;
use common::*;
use hetmem::*;

const N: usize = 64;

fn word(i: usize) -> u32 {
    0xc0de_0000 ^ i as u32
}

/// The child's work: an exit code (0: everything as the kernel would give it).
fn child(a: VirtAddr) -> i32 {
    let run = || -> Result<i32> {
        let dev = SoftDevice::private(4 << 20)?;
        // SAFETY: the inherited copy is the child's plain memory, reached only through raw
        // addresses and hetmem while adopted.
        let space = unsafe { Space::adopt(a, N * PAGE)? };
        let m = dev.mirror(&space)?;
        m.migrate_range_to_device(a, N * PAGE)?;
        let mut buf = vec![0u8; N * PAGE];
        m.read(a, N * PAGE, &mut buf)?;
        if buf != pattern(N * PAGE, |i| word(i as usize)) {
            return Ok(10);
        }
        space.store_u32(a, 7)?;
        if space.load_u32(a)? != 7 {
            return Ok(11);
        }
        let own = Space::new()?;
        let b = own.map_anon(N * PAGE, Prot::ReadWrite)?;
        own.cpu_write(b, &[3; 64])?;
        let m2 = dev.mirror(&own)?;
        m2.migrate_range_to_device(b, N * PAGE)?;
        let mut back = [0u8; 64];
        own.cpu_read(b, &mut back)?;
        Ok(if back == [3; 64] { 0 } else { 12 })
    };
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("child: {e}");
            20
        }
    }
}

fn main() {
    let _w = watchdog("fork_child", 60);
    let space = small_space();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(N * PAGE, Prot::ReadWrite).unwrap();
    space
        .cpu_write(a, &pattern(N * PAGE, |i| word(i as usize)))
        .unwrap();
    m.migrate_range_to_device(a, N / 2 * PAGE).unwrap();
    // SAFETY: the child runs `child`, which allocates and locks: sound here, where the only
    // other threads are hetmem's (whose tables its fork handlers hold across the fork).
    let pid = unsafe { hetmem::sys::fork_child(|| child(a)) }.unwrap();
    let st = hetmem::sys::wait_child(pid).unwrap();
    assert_eq!(
        st,
        hetmem::sys::ChildExit::Exited(0),
        "the child's own hetmem"
    );
    assert_eq!(space.residency(a), Residency::Device(dev.owner()));
    let mut back = vec![0u8; N * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back == pattern(N * PAGE, |i| word(i as usize)));
    println!("fork_child: ok");
}
