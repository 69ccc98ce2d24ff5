//! The policy seam and the event trace: the default policy is today's behaviour (every other
//! test runs under it), a second policy at each decision point changes what is observable, and
//! the trace of a small scenario has exactly the expected events.

mod common;
use common::*;
use hetmem::pagecache::{CacheConfig, FileCache};
use hetmem::policy::trace::{Direction, EventKind, FaultState, RingSink, TraceEvent, Tracer};
use hetmem::policy::*;
use hetmem::*;
use std::sync::Arc;

/// The events of `ring`, with their times checked (non-decreasing) and cleared.
fn events(ring: &RingSink) -> Vec<TraceEvent> {
    let mut evs = ring.take();
    assert_eq!(ring.dropped(), 0);
    for w in evs.windows(2) {
        assert!(w[0].t_ns <= w[1].t_ns, "times in order: {w:?}");
    }
    for e in &mut evs {
        e.t_ns = 0;
    }
    evs
}

fn traced(space: &Space) -> Arc<RingSink> {
    let (t, ring) = Tracer::ring(4096).unwrap();
    space.set_trace(Some(t));
    ring
}

fn migrate(m: &DeviceMirror, a: VirtAddr, pages: usize) -> Result<CmdOut> {
    m.migrate_range_to_device(a, pages * PAGE)
}

fn page(a: VirtAddr, p: usize) -> VirtAddr {
    a.add(p * PAGE)
}

#[test]
fn a_trace_of_four_pages_to_the_device_and_back_has_exactly_its_events() {
    let _w = watchdog("trace_four_pages", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    let data = pattern(4 * PAGE, |i| i ^ 0x5a5a);
    space.cpu_write(a, &data).unwrap();
    let ring = traced(&space);
    assert_eq!(migrate(&m, a, 4).unwrap().cpages, 4);
    // The CPU faults each page back with a real load.
    for p in 0..4 {
        let want = u32::from_ne_bytes(data[p * PAGE..p * PAGE + 4].try_into().unwrap());
        assert_eq!(space.load_u32(page(a, p)).unwrap(), want);
    }
    let (id, dev_id) = (space.id(), dev.owner());
    let mut want = vec![TraceEvent::moved(
        EventKind::Migrate,
        Direction::ToDevice,
        id,
        a,
        4,
        dev_id,
    )];
    for p in 0..4 {
        want.push(TraceEvent::cpu_fault(
            id,
            page(a, p),
            false,
            FaultState::Device,
            dev_id,
        ));
        want.push(TraceEvent::moved(
            EventKind::Migrate,
            Direction::ToSystem,
            id,
            page(a, p),
            1,
            dev_id,
        ));
    }
    assert_eq!(events(&ring), want);
    let mut back = vec![0u8; 4 * PAGE];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, data);
    // Off: nothing more is recorded.
    space.set_trace(None);
    assert_eq!(migrate(&m, a, 4).unwrap().cpages, 4);
    assert!(ring.take().is_empty());
}

#[test]
fn the_line_format_reads_back_what_was_recorded() {
    let _w = watchdog("trace_lines", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(8 * PAGE, Prot::ReadWrite).unwrap();
    let ring = traced(&space);
    // First touch (a CPU fault on a missing page), a migration, a store faulting one page back.
    space.store_u32(a, 7).unwrap();
    assert_eq!(migrate(&m, a, 8).unwrap().cpages, 8);
    space.store_u32(page(a, 5), 9).unwrap();
    let mut out = Vec::new();
    let n = ring.drain_lines(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let parsed: Vec<TraceEvent> = text
        .lines()
        .map(|l| TraceEvent::parse_line(l).unwrap())
        .collect();
    assert_eq!(parsed.len(), n);
    let kinds: Vec<(EventKind, Direction, FaultState, bool)> = parsed
        .iter()
        .map(|e| (e.kind, e.dir, e.state, e.write))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                EventKind::CpuFault,
                Direction::None,
                FaultState::Missing,
                true
            ),
            (
                EventKind::Migrate,
                Direction::ToDevice,
                FaultState::None,
                false
            ),
            (
                EventKind::CpuFault,
                Direction::None,
                FaultState::Device,
                true
            ),
            (
                EventKind::Migrate,
                Direction::ToSystem,
                FaultState::None,
                false
            ),
        ],
        "{text}"
    );
    assert_eq!(parsed[1].pages, 8);
    assert_eq!(parsed[1].bytes, 8 * PAGE as u64);
    assert_eq!(parsed[3].addr, page(a, 5).get() as u64);
    assert!(text.starts_with("{\"t\":"), "{text}");
}

#[test]
fn device_release_is_traced_as_eviction_of_whole_units() {
    let _w = watchdog("trace_evict", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space
        .map_anon_with(
            PMD,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(a, &pattern(PMD, |i| i)).unwrap();
    let ring = traced(&space);
    assert_eq!(migrate(&m, a, PMD / PAGE).unwrap().cpages, 512);
    assert_eq!(dev.release().unwrap(), 512);
    let (id, o) = (space.id(), dev.owner());
    assert_eq!(
        events(&ring),
        vec![
            TraceEvent::moved(EventKind::Migrate, Direction::ToDevice, id, a, 512, o),
            TraceEvent::moved(EventKind::Evict, Direction::ToSystem, id, a, 512, o),
        ]
    );
    let mut back = vec![0u8; PMD];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(PMD, |i| i));
}

#[test]
fn file_writeback_is_traced_with_its_bytes() {
    let _w = watchdog("trace_writeback", 30);
    let f = TempFile::new("trace-wb", &[]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let h = cache.handle();
    let (t, ring) = Tracer::ring(64).unwrap();
    cache.set_trace(Some(t));
    // A partial last page writes what the file holds of it.
    h.write_at(0, &vec![3u8; 2 * PAGE + 100]).unwrap();
    h.fsync().unwrap();
    assert_eq!(
        events(&ring),
        vec![TraceEvent::writeback(0, 3, 2 * PAGE as u64 + 100)]
    );
    // Two runs of dirty pages: one event each.
    h.write_at(0, b"ab").unwrap();
    h.write_at(5 * PAGE as u64, &vec![4u8; PAGE]).unwrap();
    h.fsync().unwrap();
    assert_eq!(
        events(&ring),
        vec![
            TraceEvent::writeback(0, 1, PAGE as u64),
            TraceEvent::writeback(5, 1, PAGE as u64),
        ]
    );
    cache.set_trace(None);
    h.write_at(0, b"y").unwrap();
    h.fsync().unwrap();
    assert!(ring.take().is_empty());
}

#[test]
fn one_tracer_shared_by_a_space_and_a_file_gives_one_trace() {
    let _w = watchdog("trace_shared", 30);
    let f = TempFile::new("trace-shared", &vec![1u8; 4 * PAGE]);
    let cache = FileCache::open(&f.0, true, CacheConfig::default()).unwrap();
    let space = Space::new().unwrap();
    let (t, ring) = Tracer::ring(64).unwrap();
    space.set_trace(Some(t.clone()));
    cache.set_trace(Some(t));
    let a = space
        .map_file(&cache.handle(), 0, 4 * PAGE, Prot::ReadWrite, true)
        .unwrap();
    space.store_u32(page(a, 2), 0xfeed).unwrap();
    space.msync(a, 4 * PAGE).unwrap();
    // The store's fault (served by the file's cache), then the page written back by msync.
    assert_eq!(
        events(&ring),
        vec![
            TraceEvent::cpu_fault(space.id(), page(a, 2), true, FaultState::File, Owner(0)),
            TraceEvent::writeback(2, 1, PAGE as u64),
        ]
    );
    assert_eq!(f.disk()[2 * PAGE..2 * PAGE + 4], 0xfeedu32.to_ne_bytes());
}

// --- a second policy at each decision point -------------------------------------------------

/// Brings back only the faulting page of a 2 MiB unit.
#[derive(Debug)]
struct PageBack;
impl Policy for PageBack {
    fn cpu_fault(&self, _: &CpuFault) -> CpuFaultAction {
        CpuFaultAction::MigrateBackPage
    }
}

/// A 2 MiB unit in device memory; the CPU loads one word of page 3. Returns the space, the
/// unit's address and the device (kept alive).
fn unit_on_device(policy: Option<Arc<dyn Policy>>) -> (Space, VirtAddr, SoftDevice) {
    let space = Space::new().unwrap();
    if let Some(p) = policy {
        space.set_policy(p);
    }
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space
        .map_anon_with(
            PMD,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(a, &pattern(PMD, |i| i)).unwrap();
    assert_eq!(migrate(&m, a, 512).unwrap().cpages, 512);
    let before = space.stats().pages_to_system;
    assert_eq!(space.load_u32(page(a, 3)).unwrap(), (3 * PAGE / 4) as u32);
    assert!(space.stats().pages_to_system > before);
    (space, a, dev)
}

#[test]
fn a_cpu_fault_policy_can_bring_back_only_the_faulting_page_of_a_unit() {
    let _w = watchdog("policy_cpu_fault", 30);
    // Default: the whole unit comes back.
    let (space, a, dev) = unit_on_device(None);
    assert_eq!(space.stats().pages_to_system, 512);
    assert_eq!(space.residency(page(a, 100)), Residency::System);
    assert_eq!(dev.used(), 0);
    // The page policy: one page back, the rest of the unit stays in device memory.
    let (space, a, dev) = unit_on_device(Some(Arc::new(PageBack)));
    assert_eq!(space.stats().pages_to_system, 1);
    assert_eq!(space.residency(page(a, 3)), Residency::System);
    assert_eq!(
        space.residency(page(a, 100)),
        Residency::Device(dev.owner())
    );
    assert_eq!(dev.used(), 511 * PAGE);
    // Every byte is where it belongs (the other pages fault back one by one).
    let mut back = vec![0u8; PMD];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(PMD, |i| i));
    assert_eq!(space.stats().pages_to_system, 512);
    assert_eq!(dev.used(), 0);
}

/// Device faults migrate to the device (or map remotely), whole 2 MiB windows.
#[derive(Debug)]
struct UnitFaults(Placement);
impl Policy for UnitFaults {
    fn device_fault(&self, _: &DeviceFault) -> DeviceFaultDecision {
        DeviceFaultDecision {
            placement: self.0,
            prefetch: Prefetch::UNIT,
        }
    }
}

/// A device reads page 5 of a fresh 2 MiB mapping (base pages) under `policy`; returns what it
/// saw of the mapping: residency of pages 5 and 300, pages mapped by the device.
fn device_reads_page_5(policy: Option<Arc<dyn Policy>>) -> (Residency, Residency, usize, Owner) {
    let space = Space::new().unwrap();
    if let Some(p) = policy {
        space.set_policy(p);
    }
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(PMD, Prot::ReadWrite).unwrap();
    let mut buf = vec![1u8; PAGE];
    let out = m.read(page(a, 5), PAGE, &mut buf).unwrap();
    assert_eq!(out.cpages, 1);
    assert_eq!(out.faults, 1);
    assert!(buf.iter().all(|&b| b == 0), "a fresh page reads zeros");
    (
        space.residency(page(a, 5)),
        space.residency(page(a, 300)),
        m.mapped_pages(),
        dev.owner(),
    )
}

#[test]
fn a_device_fault_policy_can_migrate_and_prefetch_whole_units() {
    let _w = watchdog("policy_device_fault", 30);
    // Default: the page asked for, mapped remotely (filled in system memory).
    let (p5, p300, mapped, _) = device_reads_page_5(None);
    assert_eq!(
        (p5, p300, mapped),
        (Residency::System, Residency::Untouched, 1)
    );
    // Remote with a 2 MiB prefetch window: the whole unit is filled and mapped.
    let (p5, p300, mapped, _) =
        device_reads_page_5(Some(Arc::new(UnitFaults(Placement::MapRemote))));
    assert_eq!(
        (p5, p300, mapped),
        (Residency::System, Residency::System, 512)
    );
    // Migrate on fault, 2 MiB window: the whole unit moves to the device, mapped locally.
    let (p5, p300, mapped, o) = device_reads_page_5(Some(Arc::new(UnitFaults(Placement::Migrate))));
    assert_eq!(
        (p5, p300, mapped),
        (Residency::Device(o), Residency::Device(o), 512)
    );
}

#[test]
fn a_prefetch_window_is_clamped_to_the_mapping_and_the_request_keeps_its_errors() {
    let _w = watchdog("policy_prefetch_clamp", 30);
    let space = Space::new().unwrap();
    space.set_policy(Arc::new(UnitFaults(Placement::Migrate)));
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    // A 3-page mapping: the 2 MiB window is the mapping.
    let a = space.map_anon(3 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(3 * PAGE, |i| i)).unwrap();
    let mut buf = vec![0u8; PAGE];
    m.read(page(a, 1), PAGE, &mut buf).unwrap();
    assert_eq!(buf, pattern(3 * PAGE, |i| i)[PAGE..2 * PAGE]);
    assert_eq!(m.mapped_pages(), 3);
    for p in 0..3 {
        assert_eq!(space.residency(page(a, p)), Residency::Device(dev.owner()));
    }
    // A read-only mapping: a device write is still EPERM, whatever the policy.
    let b = space.map_anon(PAGE, Prot::Read).unwrap();
    let mut one = vec![0u8; PAGE];
    assert_eq!(
        m.cmd(
            Cmd::Write,
            &mut DmirrorCmd {
                addr: b.get() as u64,
                buf: &mut one,
                npages: 1,
                cpages: 0,
                faults: 0,
            }
        ),
        -libc::EPERM
    );
}

/// When the device is full, evict (the clock's next victim) and retry.
#[derive(Debug)]
struct Evicting;
impl Policy for Evicting {
    fn device_full(&self, _: &DeviceFull) -> DeviceFullAction {
        DeviceFullAction::EvictAndRetry
    }
}

#[test]
fn a_device_full_policy_can_evict_where_the_default_declines() {
    let _w = watchdog("policy_device_full", 60);
    for evicting in [false, true] {
        let space = Space::new().unwrap();
        if evicting {
            space.set_policy(Arc::new(Evicting));
        }
        // 2 MiB of device memory: 512 base frames.
        let dev = SoftDevice::private(PMD).unwrap();
        let m = dev.mirror(&space).unwrap();
        let a = space.map_anon(513 * PAGE, Prot::ReadWrite).unwrap();
        let data = pattern(513 * PAGE, |i| i.wrapping_mul(7));
        space.cpu_write(a, &data).unwrap();
        assert_eq!(migrate(&m, a, 512).unwrap().cpages, 512);
        assert_eq!(dev.used(), PMD, "full");
        let ring = traced(&space);
        let last = page(a, 512);
        let r = migrate(&m, last, 1);
        if evicting {
            assert_eq!(r.unwrap().cpages, 1);
            assert_eq!(space.residency(last), Residency::Device(dev.owner()));
            // The clock hand starts at frame 0: the page in it (page 0) went back.
            assert_eq!(space.residency(a), Residency::System);
            assert_eq!(
                events(&ring),
                vec![
                    TraceEvent::moved(
                        EventKind::Evict,
                        Direction::ToSystem,
                        space.id(),
                        a,
                        1,
                        dev.owner()
                    ),
                    TraceEvent::moved(
                        EventKind::Migrate,
                        Direction::ToDevice,
                        space.id(),
                        last,
                        1,
                        dev.owner()
                    ),
                ]
            );
        } else {
            assert_eq!(r.unwrap_err().errno(), libc::ENOENT, "declined");
            assert_eq!(space.residency(last), Residency::System);
            assert_eq!(space.residency(a), Residency::Device(dev.owner()));
            assert!(events(&ring).is_empty());
        }
        assert_eq!(dev.used(), PMD);
        let mut back = vec![0u8; 513 * PAGE];
        space.cpu_read(a, &mut back).unwrap();
        assert_eq!(back, data);
    }
}

#[test]
fn the_default_policy_is_in_place_and_replaceable() {
    let space = Space::new().unwrap();
    assert_eq!(format!("{:?}", space.policy()), "DefaultPolicy");
    space.set_policy(Arc::new(Evicting));
    assert_eq!(format!("{:?}", space.policy()), "Evicting");
}

/// The UVM-like policy through the real mechanisms: a device reading a range page by page
/// migrates it on demand, in 64 KiB blocks that grow to whole units as the faults stay
/// sequential (far fewer device faults than pages); a page the CPU keeps pulling back is then
/// read remotely and stays in system memory; the data is right throughout.
#[test]
fn the_uvm_like_policy_migrates_on_demand_and_stops_thrashing_pages() {
    let _w = watchdog("uvm policy", 60);
    let space = small_space();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let len = 4 << 20;
    let a = space.map_anon(len, Prot::ReadWrite).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i / PAGE) as u8 ^ (i as u8)).collect();
    space.cpu_write(a, &data).unwrap();
    space.set_policy(Arc::new(hetmem::policy::uvm::UvmPolicy::new()));
    at("sequential device reads");
    let mut page = vec![0u8; PAGE];
    let mut faults = 0;
    for p in 0..len / PAGE {
        let out = m.read(a.add(p * PAGE), PAGE, &mut page).unwrap();
        faults += out.faults;
        assert_eq!(page, data[p * PAGE..(p + 1) * PAGE], "page {p}");
    }
    for p in (0..len / PAGE).step_by(97) {
        assert_eq!(
            space.residency(a.add(p * PAGE)),
            Residency::Device(dev.owner()),
            "page {p} was read but not migrated"
        );
    }
    assert!(
        faults < (len / PAGE / 8) as u64,
        "{faults} device fault passes for {} pages: no prefetch",
        len / PAGE
    );
    at("thrashing page");
    let t = a.add(100 * PAGE);
    let mut b = [0u8; 8];
    for _ in 0..hetmem::policy::uvm::UvmPolicy::THRASH_LIMIT {
        space.cpu_read(t, &mut b).unwrap(); // pulls the page (its unit) back
        m.read(t, PAGE, &mut page).unwrap(); // the device faults it in again
    }
    // Pulled back THRASH_LIMIT times: pinned, the device now reads it where it is.
    space.cpu_read(t, &mut b).unwrap();
    m.read(t, PAGE, &mut page).unwrap();
    assert_eq!(
        space.residency(t),
        Residency::System,
        "a thrashing page migrated again"
    );
    assert_eq!(page, data[100 * PAGE..101 * PAGE]);
}

/// Placement hints through the real mechanisms, and an asynchronous prefetch: a range hinted
/// for the device migrates on the device's first read (whole units), a range hinted for system
/// memory or accessed-by stays there while the device reads it, an unhinted range follows the
/// fallback (map remotely); `prefetch_async` moves a range in the background and its handle
/// says when; every byte is right throughout.
#[test]
fn hints_place_ranges_and_an_async_prefetch_completes() {
    use hetmem::policy::hints::{Advice, HintPolicy};
    let _w = watchdog("hints", 60);
    let space = small_space();
    let dev = SoftDevice::private(32 << 20).unwrap();
    let m = Arc::new(dev.mirror(&space).unwrap());
    let unit = 2 << 20;
    let a = space
        .map_anon_with(
            4 * unit,
            MapOptions {
                large: false,
                ..MapOptions::default()
            },
        )
        .unwrap();
    let data: Vec<u8> = (0..4 * unit).map(|i| (i / PAGE) as u8 ^ 0x5a).collect();
    space.cpu_write(a, &data).unwrap();
    let hints = Arc::new(HintPolicy::new(Arc::new(DefaultPolicy)));
    space.set_policy(hints.clone());
    hints.advise(a, unit, Advice::PreferDevice).unwrap();
    hints
        .advise(a.add(unit), unit, Advice::PreferSystem)
        .unwrap();
    hints
        .advise(a.add(2 * unit), unit, Advice::AccessedBy)
        .unwrap();
    let mut page = vec![0u8; PAGE];
    for r in 0..3 {
        let p = a.add(r * unit + 5 * PAGE);
        m.read(p, PAGE, &mut page).unwrap();
        assert_eq!(page, data[r * unit + 5 * PAGE..r * unit + 6 * PAGE]);
    }
    // Preferred on the device: the whole unit moved on the first read.
    for k in [0, 5, 511] {
        assert_eq!(
            space.residency(a.add(k * PAGE)),
            Residency::Device(dev.owner()),
            "page {k}"
        );
    }
    // Preferred in system memory, and accessed-by: read where they are.
    assert_eq!(space.residency(a.add(unit + 5 * PAGE)), Residency::System);
    assert_eq!(
        space.residency(a.add(2 * unit + 5 * PAGE)),
        Residency::System
    );
    // A CPU read of a device-preferred page brings back that page only.
    let mut b = [0u8; 4];
    space.cpu_read(a.add(5 * PAGE), &mut b).unwrap();
    assert_eq!(b, data[5 * PAGE..5 * PAGE + 4]);
    assert_eq!(space.residency(a.add(5 * PAGE)), Residency::System);
    assert_eq!(
        space.residency(a.add(6 * PAGE)),
        Residency::Device(dev.owner())
    );
    // The unhinted unit, prefetched in the background.
    let h = m.prefetch_async(a.add(3 * unit), unit);
    let out = h.wait().unwrap();
    assert_eq!(out.cpages, (unit / PAGE) as u64);
    assert_eq!(
        space.residency(a.add(3 * unit)),
        Residency::Device(dev.owner())
    );
    let mut back = vec![0u8; 4 * unit];
    space.cpu_read(a, &mut back).unwrap();
    assert!(back == data, "a byte changed");
}

/// Maps device faults remotely and migrates a 64 KiB region after 48 remote accesses.
#[derive(Debug)]
struct CountingPolicy;

impl Policy for CountingPolicy {
    fn access_counters(&self) -> Option<AccessCounters> {
        Some(AccessCounters {
            granularity: 64 << 10,
            threshold: 48,
        })
    }
    fn remote_accesses(&self, n: &RemoteAccesses) -> Placement {
        assert_eq!(n.end.get() - n.start.get(), 64 << 10);
        assert_eq!(n.accesses, 48);
        Placement::Migrate
    }
}

#[test]
fn access_counters_migrate_a_region_the_device_keeps_reading_remotely() {
    let _w = watchdog("access_counters", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(16 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    // Two 64 KiB regions of 16 pages, aligned.
    let base = space.map_anon(4 << 20, Prot::ReadWrite).unwrap();
    let a = VirtAddr((base.get() + (1 << 20)) & !((1 << 20) - 1));
    let data = pattern(32 * PAGE, |i| i * 3 + 1);
    space.cpu_write(a, &data).unwrap();
    space.set_policy(Arc::new(CountingPolicy));
    let remote = || {
        dev.link()
            .traffic(hetmem::link::Traffic::DeviceRemote)
            .bytes
    };
    let mut buf = vec![0u8; 16 * PAGE];
    // Region 0 read twice: 32 remote accesses, under the threshold.
    for _ in 0..2 {
        m.read(a, 16 * PAGE, &mut buf).unwrap();
        assert_eq!(buf, data[..16 * PAGE]);
    }
    assert_eq!(space.residency(a), Residency::System);
    // The third read reaches 48: after it, the region is in device memory.
    m.read(a, 16 * PAGE, &mut buf).unwrap();
    for p in 0..16 {
        assert_eq!(
            space.residency(page(a, p)),
            Residency::Device(dev.owner()),
            "page {p}"
        );
    }
    // Region 1, read once, stays where it is; region 0's reads are now local.
    m.read(page(a, 16), 16 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data[16 * PAGE..]);
    assert_eq!(space.residency(page(a, 16)), Residency::System);
    let before = remote();
    m.read(a, 16 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data[..16 * PAGE]);
    assert_eq!(remote(), before, "local reads");
    // Without counters (the default policy) nothing moves however often the device reads.
    space.set_policy(Arc::new(DefaultPolicy));
    for _ in 0..8 {
        m.read(page(a, 16), 16 * PAGE, &mut buf).unwrap();
    }
    assert_eq!(space.residency(page(a, 16)), Residency::System);
}

/// Maps remotely; migrates after 32 remote accesses in a 1 GiB region.
#[derive(Debug)]
struct WideCountingPolicy;

impl Policy for WideCountingPolicy {
    fn access_counters(&self) -> Option<AccessCounters> {
        Some(AccessCounters {
            granularity: 1 << 30,
            threshold: 32,
        })
    }
    fn remote_accesses(&self, _: &RemoteAccesses) -> Placement {
        Placement::Migrate
    }
}

#[test]
fn access_counters_serve_the_mapping_whose_pages_were_accessed() {
    // A region's aligned start lies before the mapping the device read (in another mapping, or
    // in none): the notification is about the pages of the mapping that was read, and only
    // they move.
    let _w = watchdog("access_counters_mapping", 30);
    let space = Space::new().unwrap();
    let dev = SoftDevice::private(32 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(1 << 20, Prot::ReadWrite).unwrap();
    let b = space.map_anon(8 << 20, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(1 << 20, |i| i)).unwrap();
    let data = pattern(8 << 20, |i| !i);
    space.cpu_write(b, &data).unwrap();
    space.set_policy(Arc::new(WideCountingPolicy));
    let mut buf = vec![0u8; 32 * PAGE];
    m.read(b, 32 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data[..32 * PAGE]);
    assert_eq!(space.residency(b), Residency::Device(dev.owner()));
    assert_eq!(
        space.residency(page(b, 2047)),
        Residency::Device(dev.owner())
    );
    assert_eq!(
        space.residency(a),
        Residency::System,
        "the other mapping stays"
    );
    m.read(b, 32 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, data[..32 * PAGE]);
}
