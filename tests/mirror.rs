//! Mirroring as mm/hmm.c and mmu_notifier.h define it: range_fault's results and errors, the
//! sequence protocol, and which invalidation events each operation raises.

mod common;
use common::*;
use hetmem::hmm::*;
use hetmem::*;
use std::sync::{Arc, Mutex, Weak};

/// A notifier callback that records every invalidation and bumps the sequence.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<NotifyRange>>,
}

impl IntervalOps for Recorder {
    fn invalidate(&self, n: &IntervalNotifier, range: &NotifyRange, cur_seq: u64) -> bool {
        let mut ev = self.events.lock().unwrap();
        n.set_seq(cur_seq);
        ev.push(*range);
        true
    }
}

fn recorder(space: &Space) -> (Arc<Recorder>, Arc<IntervalNotifier>) {
    let rec = Arc::new(Recorder::default());
    let ops: Weak<dyn IntervalOps> = {
        let w: Weak<Recorder> = Arc::downgrade(&rec);
        w
    };
    let n = space
        .insert_notifier(space.range().start, usize::MAX, ops)
        .unwrap();
    (rec, n)
}

fn fault(
    n: &Arc<IntervalNotifier>,
    start: VirtAddr,
    pages: usize,
    flags: u64,
    owner: Option<Owner>,
) -> Result<Vec<u64>> {
    let mut r = HmmRange {
        notifier: n,
        notifier_seq: n.read_begin(),
        start,
        end: start.add(pages * PAGE),
        hmm_pfns: vec![0; pages],
        default_flags: flags,
        pfn_flags_mask: 0,
        dev_private_owner: owner,
    };
    range_fault(&mut r).map(|()| r.hmm_pfns)
}

#[test]
fn range_fault_results_and_errors() {
    let _w = watchdog("range_fault_results", 30);
    let space = Space::new().unwrap();
    let (_rec, n) = recorder(&space);
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    // Not present, no fault requested: 0.
    assert_eq!(fault(&n, a, 4, 0, None).unwrap(), vec![0; 4]);
    // Fault requested: valid and writable (the mapping is writable).
    let p = fault(&n, a, 4, HMM_PFN_REQ_FAULT, None).unwrap();
    assert!(
        p.iter()
            .all(|w| w & (HMM_PFN_VALID | HMM_PFN_WRITE) == HMM_PFN_VALID | HMM_PFN_WRITE)
    );
    assert!(p.iter().all(|w| hmm_pfn_order(*w) == 0));
    // Read-only mapping: a write request is EPERM; a read request gives valid, not writable.
    space.protect(a, 4 * PAGE, Prot::Read).unwrap();
    let e = fault(&n, a, 4, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, None).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    let p = fault(&n, a, 4, HMM_PFN_REQ_FAULT, None).unwrap();
    assert!(
        p.iter()
            .all(|w| w & (HMM_PFN_VALID | HMM_PFN_WRITE) == HMM_PFN_VALID)
    );
    // No read permission: EFAULT with a fault request, HMM_PFN_ERROR without.
    space.protect(a, 4 * PAGE, Prot::None).unwrap();
    assert_eq!(
        fault(&n, a, 4, HMM_PFN_REQ_FAULT, None)
            .unwrap_err()
            .errno(),
        libc::EFAULT
    );
    assert_eq!(fault(&n, a, 4, 0, None).unwrap(), vec![HMM_PFN_ERROR; 4]);
    // No mapping: the same.
    let hole = a.add(4 * PAGE);
    assert_eq!(
        fault(&n, hole, 1, HMM_PFN_REQ_FAULT, None)
            .unwrap_err()
            .errno(),
        libc::EFAULT
    );
    assert_eq!(fault(&n, hole, 1, 0, None).unwrap(), vec![HMM_PFN_ERROR]);
    // Per-page requests through pfn_flags_mask.
    space.protect(a, 4 * PAGE, Prot::ReadWrite).unwrap();
    let b = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    let mut r = HmmRange {
        notifier: &n,
        notifier_seq: n.read_begin(),
        start: b,
        end: b.add(4 * PAGE),
        hmm_pfns: vec![0, HMM_PFN_REQ_FAULT, 0, HMM_PFN_REQ_FAULT],
        default_flags: 0,
        pfn_flags_mask: HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE,
        dev_private_owner: None,
    };
    range_fault(&mut r).unwrap();
    let valid: Vec<bool> = r.hmm_pfns.iter().map(|w| w & HMM_PFN_VALID != 0).collect();
    assert_eq!(valid, vec![false, true, false, true]);
}

#[test]
fn sequence_protocol_busy_and_retry() {
    let _w = watchdog("sequence_protocol", 30);
    let space = Space::new().unwrap();
    let (_rec, n) = recorder(&space);
    let a = space.map_anon(4 * PAGE, Prot::ReadWrite).unwrap();
    let seq = n.read_begin();
    assert!(!n.read_retry(seq));
    // An invalidation between read_begin and range_fault: EBUSY, and read_retry says so.
    space.protect(a, PAGE, Prot::Read).unwrap();
    assert!(n.read_retry(seq));
    let mut r = HmmRange {
        notifier: &n,
        notifier_seq: seq,
        start: a,
        end: a.add(4 * PAGE),
        hmm_pfns: vec![0; 4],
        default_flags: HMM_PFN_REQ_FAULT,
        pfn_flags_mask: 0,
        dev_private_owner: None,
    };
    assert_eq!(range_fault(&mut r).unwrap_err().errno(), libc::EBUSY);
    r.notifier_seq = n.read_begin();
    range_fault(&mut r).unwrap();
}

#[test]
fn device_private_pages_of_the_owner_are_reported_not_faulted() {
    let _w = watchdog("owner_reporting", 30);
    let space = Space::new().unwrap();
    let (_rec, n) = recorder(&space);
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space
        .map_anon_with(
            2 << 20,
            MapOptions {
                large: true,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(a, &pattern(2 << 20, |i| i)).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    m.migrate_to_device(a, 512 * PAGE, &mut buf).unwrap();
    // The owner sees device entries with order 9 (one 2 MiB frame), without a fault.
    let p = fault(&n, a, 512, HMM_PFN_REQ_FAULT, Some(dev.owner())).unwrap();
    assert!(
        p.iter()
            .all(|w| w & HMM_PFN_VALID != 0 && hmm_pfn_order(*w) == 9)
    );
    assert!(matches!(hmm_pfn_split(p[0]).1, PageTarget::Device { .. }));
    assert_eq!(space.residency(a), Residency::Device(dev.owner()));
    // Without a fault request, another owner sees "not present".
    assert_eq!(fault(&n, a, 512, 0, None).unwrap(), vec![0; 512]);
    // With one, the pages come back to system memory first (EBUSY once: the migration back
    // invalidated the range; the retry sees system pages).
    let e = fault(&n, a, 512, HMM_PFN_REQ_FAULT, None).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    let p = fault(&n, a, 512, HMM_PFN_REQ_FAULT, None).unwrap();
    assert!(matches!(hmm_pfn_split(p[0]).1, PageTarget::System(_)));
    assert_eq!(space.residency(a), Residency::System);
    let mut back = vec![0u8; 2 << 20];
    space.cpu_read(a, &mut back).unwrap();
    assert_eq!(back, pattern(2 << 20, |i| i));
}

#[test]
fn each_operation_raises_its_event() {
    let _w = watchdog("events", 30);
    let space = Space::new().unwrap();
    let (rec, n) = recorder(&space);
    let dev = SoftDevice::private(8 << 20).unwrap();
    let m = dev.mirror(&space).unwrap();
    let a = space.map_anon(8 * PAGE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &pattern(8 * PAGE, |i| i)).unwrap();
    let take = |rec: &Recorder| std::mem::take(&mut *rec.events.lock().unwrap());

    space.protect(a, 2 * PAGE, Prot::Read).unwrap();
    let ev = take(&rec);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].event, ev[0].start, ev[0].end),
        (NotifyEvent::ProtectionVma, a, a.add(2 * PAGE))
    );

    let mut buf = vec![0u8; 2 * PAGE];
    m.migrate_to_device(a.add(4 * PAGE), 2 * PAGE, &mut buf)
        .unwrap();
    let ev = take(&rec);
    assert!(
        ev.iter()
            .any(|e| e.event == NotifyEvent::Migrate && e.owner == Some(dev.owner()))
    );

    // A CPU fault on a device page: MIGRATE with no owner (the CPU initiated it).
    assert_eq!(
        space.load_u32(a.add(4 * PAGE)).unwrap(),
        (4 * PAGE / 4) as u32
    );
    let ev = take(&rec);
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].event, ev[0].owner), (NotifyEvent::Migrate, None));

    m.exclusive(a.add(6 * PAGE), PAGE, &mut buf[..PAGE])
        .unwrap();
    let ev = take(&rec);
    assert!(
        ev.iter()
            .any(|e| e.event == NotifyEvent::Exclusive && e.owner == Some(dev.owner()))
    );
    // A CPU access revokes it: CLEAR.
    space.store_u32(a.add(6 * PAGE), 1).unwrap();
    let ev = take(&rec);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event, NotifyEvent::Clear);
    m.check_exclusive(a, 8 * PAGE).unwrap();

    space.unmap(a, 8 * PAGE).unwrap();
    let ev = take(&rec);
    assert_eq!(
        (ev[0].event, ev[0].start, ev[0].end),
        (NotifyEvent::Unmap, a, a.add(8 * PAGE))
    );

    drop(m);
    space.remove_notifier(&n);
    // A second notifier sees RELEASE when the address space goes away.
    let (rec2, _n2) = recorder(&space);
    drop(space);
    let ev = take(&rec2);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event, NotifyEvent::Release);
    assert_eq!(dev.used(), 0, "frames of a dead address space are freed");
}
