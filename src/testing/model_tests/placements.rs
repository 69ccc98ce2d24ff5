//! Schedule exploration of file pages in device memory (docs/filesystem-contract.md,
//! "placements"): the page cache ([`FileCache`]) with shared file mappings of it in model spaces
//! ([`Space::new_model`]) and a device-private software device mirroring one of them, whose
//! migration commands move the file's pages through the cache ([`FileCache::place_on_device`]).
//! A placed page's only copy is its device frame; the memfd holds a hole there, so every CPU
//! mapping of it faults and brings it back.
//!
//! * [`truncate_punch_vs_placement`]: a truncate into the middle of a page (then an extension)
//!   and a hole punch race a migration of the file's pages to the device, a device write and
//!   read, and CPU loads from another address space: no page past the new end stays on the
//!   device, no frame leaks (the device's used bytes are what is placed), the tail past the end
//!   of file reads as zeros from the CPU and from the device, and after fsync the file is what the
//!   order the operations took makes it.
//! * [`device_writes_vs_writeback_fsync`]: device writes to device-private file pages race
//!   background writeback, two fsyncs and reads through the cache: each fsync holds every device
//!   write completed before it began, the pages stay on the device, and a last fsync leaves
//!   nothing to write.
//! * [`direct_write_vs_device_dirtying`]: a direct write to half of a device-private page races
//!   device writes of the whole page: every read is a state the page went through, the page
//!   stays on the device, and the file after fsync holds the halves of the order taken.
//! * [`device_release_vs_cpu_fault`]: device eviction (`SoftDevice::release`) of dirty
//!   device-private file pages races CPU loads and stores from another address space (a first
//!   access through a private mapping included) and a device that writes and places the pages
//!   again: no byte is lost, and each page ends in exactly one place (a device frame and a hole
//!   in the memfd, or the memfd and no frame).
//! * [`device_writes_through_intercepting_mapping_vs_fsync`]: a device writes a page through a
//!   mapping that intercepts stores (the cache makes the page dirty and records the device's write
//!   access) and reads it from two contexts while fsyncs and background writeback revoke that
//!   access (a PROTECTION event) to protect the page again, and CPU stores go to the next page: no
//!   write is lost, and the device never writes a protected page (the model panics where the
//!   kernel would fault inside hetmem's copy).
//! * [`cpu_store_vs_private_placement`]: CPU stores through a mapping that intercepts them race
//!   the placement of their page in device-private memory (and a device read, and an fsync): a
//!   store lands before the page's bytes are copied to the device or waits for the move and
//!   brings the page back; none is lost.
//! * [`coherent_placement_with_a_second_device`]: a device-coherent device places the file's
//!   pages and writes one of them through the intercepting mapping while the CPU stores to the
//!   other in place, a second, device-private device reads both (remotely), and an fsync runs:
//!   every observation is a round no older than the last write completed before it, no page is
//!   ever on the private device or in two places, the coherent device's memory is its pages, and
//!   its release brings them back unchanged (fails when writeback stops revoking the device's
//!   write access before protecting the page again).
//! * [`cpu_store_vs_replica_creation`]: CPU stores through an intercepting mapping race the
//!   creation of read-only replicas of their page on the device, device reads and an fsync: no
//!   device read is older than the last store completed before it, replicas left hold the last
//!   bytes, the device holds exactly the replicas (fails when a store to a replicated page does
//!   not drop its replicas first).
//!
//! Each was checked to fail on a mutation of the code it guards (see docs/testing.md). Bugs
//! they found, fixed: the placement of a file's partial last page copied the previous page's
//! bytes into the frame past the end of file; a truncate into a device-private page (and an
//! extension past one) zeroed its tail in the memfd, where the page is a hole, which put a page
//! of zeros in front of the frame for every CPU mapping; a device read fault that raced a
//! revocation of the device's write access read the grant before the revocation ended and
//! mapped the page writable again; the first access through a private mapping copied zeros (the
//! memfd's hole) for a device-private page instead of its frame.

use super::*;
use crate::pagecache::{CacheConfig, FileCache, FileHandle, PagePlacement};
use crate::space::FileMapOptions;
use crate::sync::{AtomicU32, Ordering};

/// A cached file of `pages` pages (page `p` holds `val(1, p)`) behind an in-memory backend, a
/// model space mapping it (shared, read-write, stores intercepted: device-private placement is
/// allowed there) and a device-private software device mirroring that space.
struct World {
    file: Arc<MemFile>,
    cache: Arc<FileCache>,
    h: Arc<FileHandle>,
    space: Space,
    dev: Arc<SoftDevice>,
    m: Arc<DeviceMirror>,
    /// The mapping of the whole file in `space`.
    base: VirtAddr,
}

impl World {
    fn new(pages: usize) -> World {
        let mut data = Vec::with_capacity(pages * PAGE_SIZE);
        for p in 0..pages {
            data.extend(fill(val(1, p), PAGE_SIZE));
        }
        let file = Arc::new(MemFile {
            data: crate::sync::Mutex::new(data),
        });
        let cfg = CacheConfig {
            budget: 16 * PAGE_SIZE,
            dirty_bound: 16 * PAGE_SIZE,
        };
        let cache = FileCache::with_backend(Box::new(file.clone()), true, cfg).expect("cache");
        let h = Arc::new(cache.handle());
        let space = Space::new_model(4 << 20).expect("model space");
        let dev = Arc::new(SoftDevice::private(2 << 20).expect("device"));
        let m = Arc::new(dev.mirror(&space).expect("mirror"));
        let base = map(&space, &h, pages, Prot::ReadWrite, true);
        World {
            file,
            cache,
            h,
            space,
            dev,
            m,
            base,
        }
    }

    /// Page `p` of the mapping in `space`.
    fn page(&self, p: usize) -> VirtAddr {
        self.base.add(p * PAGE_SIZE)
    }

    /// The backend's bytes (the file on "disk").
    fn disk(&self) -> Vec<u8> {
        crate::sync::lock(&self.file.data).clone()
    }

    /// The whole file through the cache.
    fn view(&self) -> Vec<u8> {
        let len = self.h.len() as usize;
        let mut v = vec![0u8; len];
        assert_eq!(self.h.read_at(0, &mut v).expect("read_at"), len);
        v
    }

    /// Whether file page `p` is in this world's device's private memory.
    fn on_device(&self, p: usize) -> bool {
        on_device(&self.cache, &self.dev, p)
    }

    /// Each of the file's pages is in exactly one place: in device-private memory with a hole in
    /// the memfd, or in the memfd with no device frame (or nowhere, uncached); and the device
    /// holds exactly the frames of the placed pages (none leaked).
    fn check_places(&self, what: &str) {
        let pages = (self.h.len() as usize).div_ceil(PAGE_SIZE);
        let mut placed = 0;
        for p in 0..pages {
            let in_memfd = memfd_has(&self.cache, p);
            match self.cache.placement(p as u64) {
                PagePlacement::DevicePrivate { owner } => {
                    assert_eq!(
                        owner,
                        self.dev.owner(),
                        "{what}: page {p} on another device"
                    );
                    assert!(
                        !in_memfd,
                        "{what}: page {p} is in device memory and in the memfd (two copies)"
                    );
                    placed += 1;
                }
                PagePlacement::System => {
                    assert!(in_memfd, "{what}: page {p} is cached but in no memory");
                }
                PagePlacement::Uncached => {
                    assert!(!in_memfd, "{what}: page {p} is uncached but in the memfd");
                }
                PagePlacement::DeviceCoherent { .. } => {
                    panic!("{what}: page {p} in coherent memory, never placed there")
                }
            }
        }
        assert_eq!(
            self.cache.device_pages(),
            placed,
            "{what}: the cache counts placed pages that are not in the file"
        );
        assert_eq!(
            self.dev.used(),
            placed * PAGE_SIZE,
            "{what}: device frames leaked (used bytes beyond the placed pages)"
        );
    }

    /// CPU loads of every page of the mapping show `want` (the file's bytes).
    fn check_loads(&self, want: &[u8]) {
        for (p, page) in want.chunks(PAGE_SIZE).enumerate() {
            assert!(
                load(&self.space, self.page(p)).as_deref() == Some(page),
                "the mapping shows other data than the file at page {p}"
            );
        }
    }

    /// Drops in order: the mirror (threads are joined, so this is the last handle), then the
    /// device (evicting what it still holds back into the cache), then the space.
    fn finish(self) {
        let World { m, dev, space, .. } = self;
        drop(Arc::into_inner(m).expect("threads joined: last mirror handle"));
        drop(Arc::into_inner(dev).expect("threads joined: last device handle"));
        drop(space);
    }
}

/// Maps `pages` pages of the file from its start in `space`, shared.
fn map(
    space: &Space,
    h: &FileHandle,
    pages: usize,
    prot: Prot,
    intercept_stores: bool,
) -> VirtAddr {
    space
        .map_file_with(
            h,
            0,
            pages * PAGE_SIZE,
            FileMapOptions {
                prot,
                shared: true,
                intercept_stores,
            },
        )
        .expect("map file")
}

fn on_device(cache: &FileCache, dev: &SoftDevice, p: usize) -> bool {
    cache.placement(p as u64) == PagePlacement::DevicePrivate { owner: dev.owner() }
}

/// Whether the cache's memfd holds file page `p` (`SEEK_DATA`, as the model kernel decides
/// whether a mapping of it faults).
fn memfd_has(cache: &FileCache, p: usize) -> bool {
    let off = (p * PAGE_SIZE) as u64;
    rustix::fs::seek(cache.memfd().as_fd(), rustix::fs::SeekFrom::Data(off))
        .is_ok_and(|d| d < off + PAGE_SIZE as u64)
}

/// A CPU load of the page at `a`: its bytes, or `None` for SIGBUS (any other error fails).
fn load(space: &Space, a: VirtAddr) -> Option<Vec<u8>> {
    let mut b = vec![0u8; PAGE_SIZE];
    match space.cpu_read(a, &mut b) {
        Ok(()) => Some(b),
        Err(Error::Signal { signo, .. }) if signo == libc::SIGBUS => None,
        Err(e) => panic!("load at {a}: {e}"),
    }
}

/// A device read of one page at `a`.
fn dev_read(m: &DeviceMirror, a: VirtAddr) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    m.read(a, PAGE_SIZE, &mut b).expect("device read");
    b
}

/// The round of page `p`'s value in `b` (a run of one value; zeros are round 0).
fn round(b: &[u8], p: usize, what: &str) -> u32 {
    round_of(uniform(b, what), p, what)
}

/// Checks states of something as they are observed: they must go forward along one of the
/// `orders` (states may repeat and be skipped, never go back).
#[derive(Debug)]
struct Order {
    orders: &'static [&'static [u32]],
    /// Position reached along each order (`None`: that order is ruled out).
    pos: Vec<Option<usize>>,
}

impl Order {
    fn new(orders: &'static [&'static [u32]]) -> Order {
        Order {
            orders,
            pos: vec![Some(0); orders.len()],
        }
    }

    fn see(&mut self, s: u32, what: &str) {
        for (k, order) in self.orders.iter().enumerate() {
            self.pos[k] = match (self.pos[k], order.iter().position(|&o| o == s)) {
                (Some(at), Some(i)) if i >= at => Some(i),
                _ => None,
            };
        }
        assert!(
            self.pos.iter().any(Option::is_some),
            "{what}: state {s:#x} after states that no order of the operations allows \
             ({:?} along {:?})",
            self.pos,
            self.orders
        );
    }
}

/// `AtomicU32`s, all 0 (the facade's: scheduling points under shuttle).
fn flags<const N: usize>() -> Arc<[AtomicU32; N]> {
    Arc::new(std::array::from_fn(|_| AtomicU32::new(0)))
}

// ---------------------------------------------------------------------------------------------
// (1) truncate and hole punch vs placement
// ---------------------------------------------------------------------------------------------

/// Where in page 1 the truncation falls.
const CUT: usize = PAGE_SIZE / 2;

/// Page 0's states: the original, punched (zeros), the device's write. The punch and the write
/// go in either order.
const P0_ORDERS: &[&[u32]] = &[&[1, 0, 2], &[1, 2, 0]];

/// Checks page 1 as observed (`what`): its head is always the original, its tail the original
/// until the truncation, zeros after, never back (`*cut`: seen cut already; `cut_before`: the
/// truncation had ended when the observation began).
fn see_p1(b: &[u8], cut: &mut bool, cut_before: bool, what: &str) {
    assert_eq!(
        uniform(&b[..CUT], what),
        val(1, 1),
        "{what}: page 1's head is not the file's (the truncation into it lost the device copy?)"
    );
    let tail = uniform(&b[CUT..], what);
    if tail == 0 {
        *cut = true;
    } else {
        assert_eq!(
            tail,
            val(1, 1),
            "{what}: page 1's tail holds {tail:#x}, bytes nobody wrote there"
        );
        assert!(!*cut, "{what}: page 1's tail is back after the truncation");
        assert!(
            !cut_before,
            "{what}: page 1's tail past the end of file is not zeros after the truncation"
        );
    }
}

/// The file has three pages, mapped in space A (stores intercepted) and read-only in space B. A
/// device mirroring A migrates all three to its memory (through the cache: device-private),
/// then writes page 0 and reads page 1; one thread truncates the file into page 1 (page 2 goes,
/// page 1's tail becomes zeros) and extends it back to two pages (the tail stays zeros), one
/// punches page 0; the main thread loads the pages from B (bringing placed pages back), twice.
fn truncate_punch_vs_placement_body() {
    let w = World::new(3);
    let other = Space::new_model(4 << 20).expect("model space");
    let b = map(&other, &w.h, 3, Prot::Read, false);
    let bp = move |p: usize| b.add(p * PAGE_SIZE);
    // [punched, cut, device write done, write began after the punch, punch began after the
    // write]
    let f = flags::<5>();
    let (punched, cut, wdone, w_after_p, p_after_w) = (0, 1, 2, 3, 4);
    let migrator = {
        let (m, f, base) = (w.m.clone(), f.clone(), w.base);
        thread::spawn(move || {
            match m.migrate_range_to_device(base, 3 * PAGE_SIZE) {
                Ok(out) => assert_eq!(out.cpages, 3),
                // A page was truncated, punched or brought back by a CPU load before the device
                // mapped it.
                Err(e @ Error::NotPresent { .. }) => assert_eq!(e.errno(), libc::ENOENT),
                Err(e) => panic!("migrate to device: {e}"),
            }
            f[w_after_p].store(f[punched].load(Ordering::SeqCst), Ordering::SeqCst);
            m.write(base, PAGE_SIZE, &fill(val(2, 0), PAGE_SIZE))
                .expect("device write of page 0");
            f[wdone].store(1, Ordering::SeqCst);
            let c = f[cut].load(Ordering::SeqCst) == 1;
            let b1 = dev_read(&m, base.add(PAGE_SIZE));
            see_p1(&b1, &mut false, c, "device read of page 1");
        })
    };
    let truncater = {
        let (h, f) = (w.h.clone(), f.clone());
        thread::spawn(move || {
            h.set_len((PAGE_SIZE + CUT) as u64).expect("truncate");
            f[cut].store(1, Ordering::SeqCst);
            // Back to two pages: page 1's tail, past the old end, reads as zeros.
            h.set_len(2 * PAGE_SIZE as u64).expect("extend");
        })
    };
    let puncher = {
        let (h, f) = (w.h.clone(), f.clone());
        thread::spawn(move || {
            f[p_after_w].store(f[wdone].load(Ordering::SeqCst), Ordering::SeqCst);
            h.punch_hole(0, PAGE_SIZE as u64).expect("punch");
            f[punched].store(1, Ordering::SeqCst);
        })
    };
    let (mut p0, mut p1_cut, mut p2_gone) = (Order::new(P0_ORDERS), false, false);
    for _ in 0..2 {
        let punched_before = f[punched].load(Ordering::SeqCst) == 1;
        let b0 = load(&other, bp(0)).expect("page 0 is never past the end");
        let r0 = round(&b0, 0, "load of page 0");
        assert!(
            r0 != 1 || !punched_before,
            "load of page 0: the original after the punch"
        );
        p0.see(r0, "load of page 0");
        let cut_before = f[cut].load(Ordering::SeqCst) == 1;
        let b1 = load(&other, bp(1)).expect("page 1 is never past the end");
        see_p1(&b1, &mut p1_cut, cut_before, "load of page 1");
        let cut_before = f[cut].load(Ordering::SeqCst) == 1;
        match load(&other, bp(2)) {
            Some(b2) => {
                assert!(!p2_gone, "page 2 is back after the truncation");
                assert!(!cut_before, "page 2 loads after the truncation");
                assert_eq!(round(&b2, 2, "load of page 2"), 1);
            }
            None => p2_gone = true,
        }
    }
    join(migrator);
    join(truncater);
    join(puncher);
    assert_eq!(w.h.len(), 2 * PAGE_SIZE as u64, "file length");
    w.check_places("after the race");
    // Page 0: the order of the punch and the device write decides.
    let view = w.view();
    let v0 = uniform(&view[..PAGE_SIZE], "page 0 through the cache");
    if f[w_after_p].load(Ordering::SeqCst) == 1 {
        assert_eq!(
            v0,
            val(2, 0),
            "the device wrote page 0 after its punch: lost"
        );
    } else if f[p_after_w].load(Ordering::SeqCst) == 1 {
        assert_eq!(v0, 0, "page 0 was punched after the device wrote it");
    } else {
        assert!(v0 == 0 || v0 == val(2, 0), "page 0 holds {v0:#x}");
    }
    let mut want = fill(v0, PAGE_SIZE);
    want.extend(fill(val(1, 1), CUT));
    want.resize(2 * PAGE_SIZE, 0);
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after fsync");
    assert!(w.view() == want, "read_at after fsync");
    let page1 = want[PAGE_SIZE..].to_vec();
    assert!(
        dev_read(&w.m, w.page(0)) == want[..PAGE_SIZE],
        "device read of page 0"
    );
    assert!(dev_read(&w.m, w.page(1)) == page1, "device read of page 1");
    w.check_places("after fsync");
    // Everything comes back to system memory; the file and both mappings agree.
    w.dev.release().expect("release");
    assert_eq!(w.dev.used(), 0, "a release leaves nothing in device memory");
    w.check_places("after the release");
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after the release and fsync");
    for (s, a) in [(&w.space, w.base), (&other, b)] {
        assert!(
            load(s, a).as_deref() == Some(&want[..PAGE_SIZE]),
            "page 0 differs from the file"
        );
        assert!(
            load(s, a.add(PAGE_SIZE)) == Some(page1.clone()),
            "page 1 differs from the file"
        );
        assert!(
            load(s, a.add(2 * PAGE_SIZE)).is_none(),
            "page 2, past the end of the file, is not SIGBUS"
        );
    }
    drop(other);
    w.finish();
}

#[test]
fn truncate_punch_vs_placement() {
    explore(150, 150, truncate_punch_vs_placement_body);
}

// ---------------------------------------------------------------------------------------------
// (2) device writes to device-private pages vs writeback and fsync
// ---------------------------------------------------------------------------------------------

/// Rounds the writers write (round 1 is the file's original content).
const LAST: u32 = 3;

/// A thread storing rounds 2..=[`LAST`] of page `p`'s value at `a` through `space` (each store
/// whole, then `done` says which round completed).
fn spawn_storer(
    space: &Space,
    a: VirtAddr,
    p: usize,
    done: &Arc<AtomicU32>,
) -> thread::JoinHandle<()> {
    let (space, done) = (space.clone(), done.clone());
    thread::spawn(move || {
        for r in 2..=LAST {
            space
                .cpu_write(a, &fill(val(r, p), PAGE_SIZE))
                .expect("a store");
            done.store(r, Ordering::SeqCst);
        }
    })
}

/// A thread that fsyncs `w`'s file and checks that page 0 on disk holds a round no older than
/// the last store `done` said completed before the fsync began.
fn spawn_syncer(w: &World, done: &Arc<AtomicU32>) -> thread::JoinHandle<()> {
    let (h, file, done) = (w.h.clone(), w.file.clone(), done.clone());
    thread::spawn(move || {
        let d = done.load(Ordering::SeqCst);
        h.fsync().expect("fsync");
        let disk = crate::sync::lock(&file.data).clone();
        check_at_least(&disk[..PAGE_SIZE], 0, d, "file page 0 after fsync");
    })
}

/// Checks what page `p` shows (`what`): a round no older than `done`, the last write completed
/// before the observation began, and one that was written.
fn check_at_least(b: &[u8], p: usize, done: u32, what: &str) -> u32 {
    check_rounds(b, p, done, LAST, what)
}

/// [`check_at_least`] with `last` the last round written.
fn check_rounds(b: &[u8], p: usize, done: u32, last: u32, what: &str) -> u32 {
    let r = round(b, p, what);
    assert!(
        r >= done && r <= last,
        "{what}: page {p} holds round {r}; round {done} was completed before this began"
    );
    r
}

/// The file has two pages, both placed in device-private memory before the threads start. The
/// device writes each page, rounds 2..=LAST; one thread runs background writeback then an fsync
/// through a second handle, one runs an fsync, each checking that the file holds every write
/// completed before it began and that the pages are still on the device; a reader reads them
/// through the cache (from the frames, without moving them).
fn device_writes_vs_writeback_fsync_body() {
    let w = World::new(2);
    w.m.migrate_range_to_device(w.base, 2 * PAGE_SIZE)
        .expect("place");
    assert!(w.on_device(0) && w.on_device(1), "placed");
    let done = Arc::new([AtomicU32::new(1), AtomicU32::new(1)]);
    let snapshot = |done: &[AtomicU32; 2]| [0, 1].map(|p| done[p].load(Ordering::SeqCst));
    let check_file = |file: &MemFile, d: [u32; 2], what: &str| {
        let disk = crate::sync::lock(&file.data).clone();
        assert_eq!(disk.len(), 2 * PAGE_SIZE, "{what}: file length");
        for p in 0..2 {
            check_at_least(&disk[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], p, d[p], what);
        }
    };
    let devw = {
        let (m, done, base) = (w.m.clone(), done.clone(), w.base);
        thread::spawn(move || {
            for r in 2..=LAST {
                for p in 0..2 {
                    m.write(
                        base.add(p * PAGE_SIZE),
                        PAGE_SIZE,
                        &fill(val(r, p), PAGE_SIZE),
                    )
                    .expect("device write");
                    done[p].store(r, Ordering::SeqCst);
                }
            }
        })
    };
    let syncer = {
        let (h, file, done, cache, dev) = (
            w.h.clone(),
            w.file.clone(),
            done.clone(),
            w.cache.clone(),
            w.dev.clone(),
        );
        thread::spawn(move || {
            let d = snapshot(&done);
            h.fsync().expect("fsync");
            check_file(&file, d, "file after fsync");
            for p in 0..2 {
                assert!(
                    on_device(&cache, &dev, p),
                    "fsync moved page {p} out of device memory"
                );
            }
        })
    };
    let flusher = {
        let (cache, file, done) = (w.cache.clone(), w.file.clone(), done.clone());
        let h = Arc::new(w.cache.handle());
        thread::spawn(move || {
            cache.writeback_round();
            let d = snapshot(&done);
            h.fsync().expect("fsync of a second handle");
            check_file(&file, d, "file after the second handle's fsync");
        })
    };
    let reader = {
        let (h, done) = (w.h.clone(), done.clone());
        thread::spawn(move || {
            let mut last = [1u32; 2];
            for _ in 0..2 {
                for p in 0..2 {
                    let d = done[p].load(Ordering::SeqCst);
                    let mut b = vec![0u8; PAGE_SIZE];
                    h.read_at((p * PAGE_SIZE) as u64, &mut b).expect("read_at");
                    let r = check_at_least(&b, p, d.max(last[p]), "read_at");
                    last[p] = r;
                }
            }
        })
    };
    join(devw);
    join(syncer);
    join(flusher);
    join(reader);
    w.h.fsync().expect("final fsync");
    let want: Vec<u8> = (0..2).flat_map(|p| fill(val(LAST, p), PAGE_SIZE)).collect();
    assert!(
        w.disk() == want,
        "file after the last fsync: a device write is lost"
    );
    assert!(w.view() == want, "read_at after the last fsync");
    assert!(w.on_device(0) && w.on_device(1), "writeback moved pages");
    w.check_places("after the last fsync");
    // Everything was written back: another fsync writes nothing.
    let written = w.cache.stats().pages_written_back;
    w.h.fsync().expect("fsync");
    assert_eq!(
        w.cache.stats().pages_written_back,
        written,
        "an fsync with no write since the last one wrote pages"
    );
    let mut b = vec![0u8; 2 * PAGE_SIZE];
    w.m.read(w.base, 2 * PAGE_SIZE, &mut b)
        .expect("device read");
    assert!(b == want, "the device reads other data than the file");
    w.dev.release().expect("release");
    w.check_places("after the release");
    // Back in system memory, every page shows the file's data.
    w.check_loads(&want);
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after the release and fsync");
    w.finish();
}

#[test]
fn device_writes_vs_writeback_fsync() {
    explore(150, 150, device_writes_vs_writeback_fsync_body);
}

// ---------------------------------------------------------------------------------------------
// (3) direct write vs device dirtying of the same page
// ---------------------------------------------------------------------------------------------

/// Half a page.
const HALF_PAGE: usize = PAGE_SIZE / 2;

/// The direct write's value (written to the first half of page 0).
const DIRECT: u32 = (7 << 16) | 1;

/// Page 0 is placed in device-private memory. The device writes it whole, rounds 2..=LAST; a
/// direct write writes its first half; a reader reads it through the cache twice. The page stays
/// on the device (the direct write updates the frame in place); every read shows in its second
/// half a round no older than the last device write completed before it, in its first half that
/// or the direct write's data; the file after fsync holds the halves of the order taken.
fn direct_write_vs_device_dirtying_body() {
    let w = World::new(1);
    w.m.migrate_range_to_device(w.base, PAGE_SIZE)
        .expect("place");
    assert!(w.on_device(0), "placed");
    // [device rounds done, the device round done when the direct write began, direct write
    // done, and for each device round: whether the direct write was done when it began]
    let f = flags::<7>();
    let (done, began, ddone, after) = (0, 1, 2, 3);
    f[done].store(1, Ordering::SeqCst);
    let devw = {
        let (m, f, a) = (w.m.clone(), f.clone(), w.page(0));
        thread::spawn(move || {
            for r in 2..=LAST {
                f[after + r as usize].store(f[ddone].load(Ordering::SeqCst), Ordering::SeqCst);
                m.write(a, PAGE_SIZE, &fill(val(r, 0), PAGE_SIZE))
                    .expect("device write");
                f[done].store(r, Ordering::SeqCst);
            }
        })
    };
    let direct = {
        let (h, f) = (w.h.clone(), f.clone());
        thread::spawn(move || {
            f[began].store(f[done].load(Ordering::SeqCst), Ordering::SeqCst);
            h.direct_write(0, &fill(DIRECT, HALF_PAGE))
                .expect("direct write");
            f[ddone].store(1, Ordering::SeqCst);
        })
    };
    let reader = {
        let (h, f) = (w.h.clone(), f.clone());
        thread::spawn(move || {
            for _ in 0..2 {
                let (d, dd) = (
                    f[done].load(Ordering::SeqCst),
                    f[ddone].load(Ordering::SeqCst) == 1,
                );
                let mut b = vec![0u8; PAGE_SIZE];
                h.read_at(0, &mut b).expect("read_at");
                check_at_least(&b[HALF_PAGE..], 0, d, "read_at, second half");
                let head = uniform(&b[..HALF_PAGE], "read_at, first half");
                if head != DIRECT {
                    let r = check_at_least(&b[..HALF_PAGE], 0, d, "read_at, first half");
                    assert!(
                        !dd || r > f[began].load(Ordering::SeqCst),
                        "read_at: the first half holds round {r}, written before the direct \
                         write, which completed before this read began"
                    );
                }
            }
        })
    };
    join(devw);
    join(direct);
    join(reader);
    assert!(w.on_device(0), "page 0 left device memory");
    w.check_places("after the race");
    let view = w.view();
    let head = uniform(&view[..HALF_PAGE], "first half");
    if f[began].load(Ordering::SeqCst) == LAST {
        assert_eq!(
            head, DIRECT,
            "the direct write, after the last device write, is lost"
        );
    } else if f[after + LAST as usize].load(Ordering::SeqCst) == 1 {
        assert_eq!(
            head,
            val(LAST, 0),
            "the last device write, after the direct write, is lost"
        );
    } else {
        assert!(
            head == DIRECT || head == val(LAST, 0),
            "first half holds {head:#x}"
        );
    }
    let mut want = fill(head, HALF_PAGE);
    want.extend(fill(val(LAST, 0), HALF_PAGE));
    assert!(
        view == want,
        "read_at: the second half is not the last device write"
    );
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after fsync");
    assert!(dev_read(&w.m, w.page(0)) == want, "device read");
    assert!(w.on_device(0), "page 0 left device memory");
    w.check_loads(&want);
    w.check_places("after a CPU load");
    w.finish();
}

#[test]
fn direct_write_vs_device_dirtying() {
    explore(150, 150, direct_write_vs_device_dirtying_body);
}

// ---------------------------------------------------------------------------------------------
// (4) device eviction vs CPU faults from another address space
// ---------------------------------------------------------------------------------------------

/// The file has two pages, mapped (stores intercepted) in space A, which the device mirrors,
/// and in space B. Both pages are placed in device-private memory and written by the device
/// (round 2) before the threads start: their only copies are dirty frames. One thread releases
/// the device's memory (device eviction); a CPU thread in B loads page 1 through a private
/// mapping (its first access copies the page from the frame or the memfd, wherever it is),
/// loads page 0 and stores to page 1 (round 3), each faulting its page back; the device writes page 0 (round 3), places both
/// pages again and reads them. Every observation is no older than the writes completed before
/// it; at the end each page is in exactly one place, and fsync writes the last writes.
fn device_release_vs_cpu_fault_body() {
    let w = World::new(2);
    let other = Space::new_model(4 << 20).expect("model space");
    let b = map(&other, &w.h, 2, Prot::ReadWrite, true);
    // A private mapping in B too: its first access copies the page from where it is.
    let private = other
        .map_file(&w.h, 0, 2 * PAGE_SIZE, Prot::Read, false)
        .expect("map file privately");
    w.m.migrate_range_to_device(w.base, 2 * PAGE_SIZE)
        .expect("place");
    let data: Vec<u8> = (0..2).flat_map(|p| fill(val(2, p), PAGE_SIZE)).collect();
    w.m.write(w.base, 2 * PAGE_SIZE, &data)
        .expect("device write");
    assert!(w.on_device(0) && w.on_device(1), "placed");
    let done = Arc::new([AtomicU32::new(2), AtomicU32::new(2)]);
    let evictor = {
        let dev = w.dev.clone();
        thread::spawn(move || {
            dev.release().expect("release");
        })
    };
    let cpu = {
        let (other, done) = (other.clone(), done.clone());
        thread::spawn(move || {
            let first = load(&other, private.add(PAGE_SIZE)).expect("inside the file");
            check_at_least(
                &first,
                1,
                2,
                "first load of page 1 through B's private mapping",
            );
            let d = done[0].load(Ordering::SeqCst);
            let b0 = load(&other, b).expect("inside the file");
            check_at_least(&b0, 0, d, "load of page 0 from B");
            other
                .cpu_write(b.add(PAGE_SIZE), &fill(val(3, 1), PAGE_SIZE))
                .expect("store to page 1 from B");
            assert!(
                load(&other, private.add(PAGE_SIZE)) == Some(first),
                "B's private page changed after its first access"
            );
            done[1].store(3, Ordering::SeqCst);
            let d = done[0].load(Ordering::SeqCst);
            let b0 = load(&other, b).expect("inside the file");
            check_at_least(&b0, 0, d, "load of page 0 from B");
        })
    };
    let device = {
        let (m, done, base) = (w.m.clone(), done.clone(), w.base);
        thread::spawn(move || {
            m.write(base, PAGE_SIZE, &fill(val(3, 0), PAGE_SIZE))
                .expect("device write");
            done[0].store(3, Ordering::SeqCst);
            match m.migrate_range_to_device(base, 2 * PAGE_SIZE) {
                Ok(_) => {}
                // A page was brought back (released, or faulted by B) before the device
                // mapped it.
                Err(e @ Error::NotPresent { .. }) => assert_eq!(e.errno(), libc::ENOENT),
                Err(e) => panic!("migrate to device: {e}"),
            }
            for p in 0..2 {
                let d = done[p].load(Ordering::SeqCst);
                let r = dev_read(&m, base.add(p * PAGE_SIZE));
                check_at_least(&r, p, d, "device read");
            }
        })
    };
    join(evictor);
    join(cpu);
    join(device);
    w.check_places("after the race");
    let want: Vec<u8> = (0..2).flat_map(|p| fill(val(3, p), PAGE_SIZE)).collect();
    assert!(w.view() == want, "read_at: a write is lost");
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after fsync: a write is lost");
    w.dev.release().expect("release");
    assert_eq!(w.dev.used(), 0, "a release leaves nothing in device memory");
    w.check_places("after the last release");
    for p in 0..2 {
        // Written back by the fsync, so clean: back in the memfd, or (device-private) dropped
        // with no copy back, to be read from the file again.
        assert!(
            matches!(
                w.cache.placement(p as u64),
                PagePlacement::System | PagePlacement::Uncached
            ),
            "page {p} after the release"
        );
    }
    let mut all = vec![0u8; 2 * PAGE_SIZE];
    for (s, a) in [(&w.space, w.base), (&other, b)] {
        s.cpu_read(a, &mut all).expect("load");
        assert!(all == want, "a mapping shows other data than the file");
    }
    w.m.read(w.base, 2 * PAGE_SIZE, &mut all)
        .expect("device read");
    assert!(all == want, "the device reads other data than the file");
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after the last fsync");
    drop(other);
    w.finish();
}

#[test]
fn device_release_vs_cpu_fault() {
    explore(150, 150, device_release_vs_cpu_fault_body);
}

// ---------------------------------------------------------------------------------------------
// (5) device writes through a mapping that intercepts stores vs fsync
// ---------------------------------------------------------------------------------------------

/// Rounds the device writes in [`device_writes_through_intercepting_mapping_vs_fsync`] (one
/// more than the CPU: a write after a read that raced a revocation is what finds a stale grant).
const DEV_LAST: u32 = LAST + 1;

/// The file has two pages in system memory, mapped with stores intercepted. The device writes
/// page 0 through that mapping (the cache makes the page dirty and records the device's write
/// access), rounds 2..=DEV_LAST, reading both pages after each write, and another device context
/// reads page 0 twice (a read fault that races a revocation must not map the page writable
/// again: the writer's next write would land in a protected page); a CPU thread stores to page 1
/// through the mapping; one thread fsyncs and one runs background writeback then an fsync of a
/// second handle: both must revoke the device's write access (a PROTECTION event) before they
/// protect page 0 again. Each fsync holds every write completed before it began; a device write
/// into a protected page panics in the model (the kernel would fault inside hetmem's copy); at
/// the end the file holds the last writes, and nothing is left dirty.
fn device_writes_through_intercepting_mapping_vs_fsync_body() {
    let w = World::new(2);
    let done = Arc::new([AtomicU32::new(1), AtomicU32::new(1)]);
    let snapshot = |done: &[AtomicU32; 2]| [0, 1].map(|p| done[p].load(Ordering::SeqCst));
    let last = [DEV_LAST, LAST];
    let check_file = move |file: &MemFile, d: [u32; 2], what: &str| {
        let disk = crate::sync::lock(&file.data).clone();
        assert_eq!(disk.len(), 2 * PAGE_SIZE, "{what}: file length");
        for p in 0..2 {
            check_rounds(
                &disk[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                p,
                d[p],
                last[p],
                what,
            );
        }
    };
    let devw = {
        let (m, done, base) = (w.m.clone(), done.clone(), w.base);
        thread::spawn(move || {
            for r in 2..=DEV_LAST {
                m.write(base, PAGE_SIZE, &fill(val(r, 0), PAGE_SIZE))
                    .expect("device write through the intercepting mapping");
                done[0].store(r, Ordering::SeqCst);
                let d = snapshot(&done);
                let mut b = vec![0u8; 2 * PAGE_SIZE];
                m.read(base, 2 * PAGE_SIZE, &mut b).expect("device read");
                for p in 0..2 {
                    let b = &b[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
                    check_rounds(b, p, d[p], last[p], "device read");
                }
            }
        })
    };
    let cpuw = {
        let (space, done, a) = (w.space.clone(), done.clone(), w.page(1));
        thread::spawn(move || {
            for r in 2..=LAST {
                space
                    .cpu_write(a, &fill(val(r, 1), PAGE_SIZE))
                    .expect("intercepted store");
                done[1].store(r, Ordering::SeqCst);
            }
        })
    };
    // Another device context reading page 0 (its faults map the page for the writer too).
    let devr = {
        let (m, done, a) = (w.m.clone(), done.clone(), w.page(0));
        thread::spawn(move || {
            for _ in 0..2 {
                let d = done[0].load(Ordering::SeqCst);
                check_rounds(&dev_read(&m, a), 0, d, DEV_LAST, "device read of page 0");
            }
        })
    };
    let syncer = {
        let (h, file, done) = (w.h.clone(), w.file.clone(), done.clone());
        thread::spawn(move || {
            for _ in 0..2 {
                let d = snapshot(&done);
                h.fsync().expect("fsync");
                check_file(&file, d, "file after fsync");
            }
        })
    };
    let flusher = {
        let (cache, file, done) = (w.cache.clone(), w.file.clone(), done.clone());
        let h = Arc::new(w.cache.handle());
        thread::spawn(move || {
            cache.writeback_round();
            let d = snapshot(&done);
            h.fsync().expect("fsync of a second handle");
            check_file(&file, d, "file after the second handle's fsync");
        })
    };
    join(devw);
    join(cpuw);
    join(devr);
    join(syncer);
    join(flusher);
    w.h.fsync().expect("final fsync");
    let want: Vec<u8> = (0..2)
        .flat_map(|p| fill(val(last[p], p), PAGE_SIZE))
        .collect();
    assert!(
        w.disk() == want,
        "file after the last fsync: a write is lost"
    );
    assert_eq!(
        w.cache.dirty_bytes(),
        0,
        "fsync left pages dirty (the device's write access was not revoked)"
    );
    assert!(w.view() == want, "read_at after fsync");
    let mut b = vec![0u8; 2 * PAGE_SIZE];
    w.m.read(w.base, 2 * PAGE_SIZE, &mut b)
        .expect("device read");
    assert!(b == want, "the device reads other data than the file");
    w.check_loads(&want);
    // The device asks for write access again, and its write reaches the file.
    w.m.write(w.base, PAGE_SIZE, &fill(val(DEV_LAST + 1, 0), PAGE_SIZE))
        .expect("device write after fsync");
    w.h.fsync().expect("fsync");
    assert!(
        w.disk()[..PAGE_SIZE] == fill(val(DEV_LAST + 1, 0), PAGE_SIZE)[..],
        "a device write after an fsync is lost"
    );
    w.check_places("at the end");
    w.finish();
}

#[test]
fn device_writes_through_intercepting_mapping_vs_fsync() {
    explore(
        150,
        150,
        device_writes_through_intercepting_mapping_vs_fsync_body,
    );
}

// ---------------------------------------------------------------------------------------------
// (6) CPU stores vs placement in device-private memory
// ---------------------------------------------------------------------------------------------

/// The file has two pages, mapped with stores intercepted. A CPU thread stores to page 0
/// (rounds 2..=LAST; from round 3 on the page is dirty and writable, so a store takes no fault
/// unless the cache protects the page again); the device migrates both pages to its memory
/// (through the cache: device-private) and reads page 0; one thread fsyncs. A store lands before
/// the placement copies the page, or faults and brings the page back: every read and the fsync
/// hold every store completed before they began, and the file at the end holds the last one.
fn cpu_store_vs_private_placement_body() {
    let w = World::new(2);
    let done = Arc::new(AtomicU32::new(1));
    let storer = spawn_storer(&w.space, w.page(0), 0, &done);
    let migrator = {
        let (m, done, base) = (w.m.clone(), done.clone(), w.base);
        thread::spawn(move || {
            let mut buf = vec![0u8; 2 * PAGE_SIZE];
            let d = done.load(Ordering::SeqCst);
            match m.migrate_to_device(base, 2 * PAGE_SIZE, &mut buf) {
                Ok(_) => {
                    check_at_least(&buf[..PAGE_SIZE], 0, d, "migrated copy of page 0");
                    assert_eq!(round(&buf[PAGE_SIZE..], 1, "migrated copy of page 1"), 1);
                }
                // A store brought page 0 back before the device mapped it.
                Err(e @ Error::NotPresent { .. }) => assert_eq!(e.errno(), libc::ENOENT),
                Err(e) => panic!("migrate to device: {e}"),
            }
            let d = done.load(Ordering::SeqCst);
            check_at_least(&dev_read(&m, base), 0, d, "device read of page 0");
        })
    };
    let syncer = spawn_syncer(&w, &done);
    join(storer);
    join(migrator);
    join(syncer);
    w.check_places("after the race");
    let want: Vec<u8> = [fill(val(LAST, 0), PAGE_SIZE), fill(val(1, 1), PAGE_SIZE)].concat();
    assert!(w.view() == want, "read_at: a store is lost");
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after fsync: a store is lost");
    assert!(
        dev_read(&w.m, w.page(0)) == want[..PAGE_SIZE],
        "device read"
    );
    w.check_loads(&want);
    w.check_places("at the end");
    w.finish();
}

#[test]
fn cpu_store_vs_private_placement() {
    explore(150, 150, cpu_store_vs_private_placement_body);
}

/// Device-coherent placement with a second, device-private device in the same space: the
/// coherent device places both pages of the file in its memory and writes page 1 (through the
/// mapping that intercepts stores: the cache makes the page dirty first) while the CPU stores to
/// page 0 in place, the device-private device reads both pages (the coherent frames, remotely),
/// and an fsync runs. Every observation is a round no older than the last write completed before
/// it, no page ever sits on the private device or in two places, the coherent device's memory is
/// exactly the pages placed on it, and the file after a last fsync holds the last rounds.
fn coherent_placement_with_a_second_device_body() {
    let w = World::new(2);
    let cdev = Arc::new(SoftDevice::coherent(2 << 20).expect("coherent device"));
    let cm = Arc::new(cdev.mirror(&w.space).expect("coherent mirror"));
    let (cpu_done, dev_done) = (Arc::new(AtomicU32::new(1)), Arc::new(AtomicU32::new(1)));
    let storer = spawn_storer(&w.space, w.page(0), 0, &cpu_done);
    let coherent = {
        let (cm, done, base) = (cm.clone(), dev_done.clone(), w.base);
        thread::spawn(move || {
            cm.migrate_range_to_device(base, 2 * PAGE_SIZE)
                .expect("coherent placement");
            for r in 2..=LAST {
                cm.write(base.add(PAGE_SIZE), PAGE_SIZE, &fill(val(r, 1), PAGE_SIZE))
                    .expect("coherent device write");
                done.store(r, Ordering::SeqCst);
            }
        })
    };
    let reader = {
        let (m, cd, dd, base) = (w.m.clone(), cpu_done.clone(), dev_done.clone(), w.base);
        thread::spawn(move || {
            let (c, d) = (cd.load(Ordering::SeqCst), dd.load(Ordering::SeqCst));
            check_at_least(&dev_read(&m, base), 0, c, "private device's read of page 0");
            check_at_least(
                &dev_read(&m, base.add(PAGE_SIZE)),
                1,
                d,
                "private device's read of page 1",
            );
        })
    };
    let syncer = {
        let (h, file, cd, dd) = (
            w.h.clone(),
            w.file.clone(),
            cpu_done.clone(),
            dev_done.clone(),
        );
        thread::spawn(move || {
            let (c, d) = (cd.load(Ordering::SeqCst), dd.load(Ordering::SeqCst));
            h.fsync().expect("fsync");
            let disk = crate::sync::lock(&file.data).clone();
            check_at_least(&disk[..PAGE_SIZE], 0, c, "file page 0 after fsync");
            check_at_least(&disk[PAGE_SIZE..], 1, d, "file page 1 after fsync");
        })
    };
    join(storer);
    join(coherent);
    join(reader);
    join(syncer);
    let places = |what: &str| {
        let mut on_coherent = 0;
        for p in 0..2 {
            match w.cache.placement(p as u64) {
                PagePlacement::DeviceCoherent { owner } => {
                    assert_eq!(owner, cdev.owner(), "{what}: page {p} on another device");
                    assert!(
                        memfd_has(&w.cache, p),
                        "{what}: a coherent page is in the memfd"
                    );
                    on_coherent += 1;
                }
                PagePlacement::DevicePrivate { .. } => {
                    panic!("{what}: page {p} on the private device, never placed there")
                }
                PagePlacement::System => assert!(memfd_has(&w.cache, p), "{what}: page {p}"),
                PagePlacement::Uncached => {}
            }
        }
        assert_eq!(w.dev.used(), 0, "{what}: frames on the private device");
        assert_eq!(
            cdev.used(),
            on_coherent * PAGE_SIZE,
            "{what}: the coherent device's memory is not its pages"
        );
        on_coherent
    };
    assert_eq!(places("after the race"), 2, "both pages stay coherent");
    let want: Vec<u8> = [fill(val(LAST, 0), PAGE_SIZE), fill(val(LAST, 1), PAGE_SIZE)].concat();
    assert!(w.view() == want, "read_at: a write is lost");
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after fsync: a write is lost");
    w.check_loads(&want);
    for p in 0..2 {
        assert!(
            dev_read(&cm, w.page(p)) == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            "the coherent device reads other data than the file at page {p}"
        );
    }
    // The coherent device's release brings the pages back to system memory, bytes unchanged.
    cdev.release().expect("release");
    assert_eq!(places("after the release"), 0);
    assert!(w.view() == want, "the release changed the data");
    drop(Arc::into_inner(cm).expect("threads joined: last coherent mirror handle"));
    drop(Arc::into_inner(cdev).expect("threads joined: last coherent device handle"));
    w.finish();
}

#[test]
fn coherent_placement_with_a_second_device() {
    explore(150, 150, coherent_placement_with_a_second_device_body);
}

/// CPU stores through a mapping that intercepts them race the creation of read-only replicas of
/// their page on the device (`DeviceMirror::replicate_range`), device reads of the page (the
/// replica where there is one) and an fsync: a replica is made of a page's bytes before a store,
/// or the store drops it; a device read never returns a round older than the last store
/// completed before it began; at the end the device's replicas (if any) hold the last round, the
/// device holds exactly their frames, and the file after fsync holds every store.
fn cpu_store_vs_replica_creation_body() {
    let w = World::new(2);
    let done = Arc::new(AtomicU32::new(1));
    let storer = spawn_storer(&w.space, w.page(0), 0, &done);
    let replicator = {
        let (m, done, base) = (w.m.clone(), done.clone(), w.base);
        thread::spawn(move || {
            for _ in 0..2 {
                m.replicate_range(base, 2 * PAGE_SIZE).expect("replicate");
                let d = done.load(Ordering::SeqCst);
                check_at_least(&dev_read(&m, base), 0, d, "device read of page 0");
                assert_eq!(
                    round(
                        &dev_read(&m, base.add(PAGE_SIZE)),
                        1,
                        "device read of page 1"
                    ),
                    1
                );
            }
        })
    };
    let syncer = spawn_syncer(&w, &done);
    join(storer);
    join(replicator);
    join(syncer);
    let want: Vec<u8> = [fill(val(LAST, 0), PAGE_SIZE), fill(val(1, 1), PAGE_SIZE)].concat();
    // Every replica left holds the page's bytes; the device holds exactly the replicas.
    let mut replicas = 0;
    for p in 0..2 {
        let owners = w.cache.replica_owners(p as u64);
        assert!(
            owners.iter().all(|o| *o == w.dev.owner()),
            "page {p}: a replica on another device"
        );
        assert!(owners.len() <= 1, "page {p}: two replicas on one device");
        replicas += owners.len();
        assert_eq!(
            w.cache.placement(p as u64),
            PagePlacement::System,
            "page {p}: a replicated page stays in system memory"
        );
        assert!(
            dev_read(&w.m, w.page(p)) == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            "page {p}: the device reads a stale replica"
        );
    }
    assert_eq!(
        w.dev.used(),
        replicas * PAGE_SIZE,
        "device frames are not exactly the replicas"
    );
    assert!(w.view() == want, "read_at: a store is lost");
    w.h.fsync().expect("fsync");
    assert!(w.disk() == want, "file after fsync: a store is lost");
    w.finish();
}

#[test]
fn cpu_store_vs_replica_creation() {
    explore(150, 150, cpu_store_vs_replica_creation_body);
}
