//! hetmem creates no thread per address space: one process-wide thread reads every space's
//! userfaultfd events, started when the first device (or space) is made. A program written for
//! the kernel's test device opens the device first, then maps its memory, punches holes in it and
//! maps over them with `MAP_FIXED`/`mremap`; a thread created later, during a command, got its
//! stack in such a hole and was overwritten (the kernel's hmm-tests, `migrate_remap_fault`,
//! under the drop-in test device). Its own binary: other tests' threads would change the count.

mod common;
use common::*;
use hetmem::*;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn spaces_come_and_go_without_creating_threads() {
    let _w = watchdog("threads", 30);
    let dev = SoftDevice::private(8 << 20).unwrap();
    let before = threads();
    for _ in 0..8 {
        let space = small_space();
        let m = dev.mirror(&space).unwrap();
        let a = space.map_anon(16 * PAGE, Prot::ReadWrite).unwrap();
        space.cpu_write(a, &[7; 64]).unwrap();
        m.migrate_range_to_device(a, 16 * PAGE).unwrap();
        let mut b = [0u8; 64];
        space.cpu_read(a, &mut b).unwrap();
        assert_eq!(b, [7; 64]);
        assert_eq!(threads(), before, "a space made a thread");
    }
    assert_eq!(threads(), before);
}
