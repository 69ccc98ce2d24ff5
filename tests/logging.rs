//! hetmem's debug events through `tracing` (target `hetmem`): migrations, evictions, writeback
//! and CPU faults served in the handler thread are reported to an installed subscriber; faults
//! served in the SIGBUS handler are not (a subscriber is not async-signal-safe).

mod common;
use common::*;

use std::fmt::Write as _;
use std::sync::Mutex;

use hetmem::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber, span};

/// Every event of target `hetmem`, as "message field=value ...".
static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Collect;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        if f.name() == "message" {
            self.0.insert_str(0, &format!("{v:?} "));
        } else {
            let _ = write!(self.0, "{}={:?} ", f.name(), v);
        }
    }
}

impl Subscriber for Collect {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.target() == "hetmem"
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut l = Line(String::new());
        e.record(&mut l);
        EVENTS.lock().unwrap().push(l.0);
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

fn events_matching(what: &str) -> Vec<String> {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.contains(what))
        .cloned()
        .collect()
}

#[test]
fn migrations_evictions_writeback_and_handler_thread_faults_are_reported() {
    let _w = watchdog("debug events", 60);
    let space = small_space();
    let dev = SoftDevice::private(8 << 20).unwrap();
    let mirror = dev.mirror(&space).unwrap();
    let a = space.map_anon(8 * PAGE_SIZE, Prot::ReadWrite).unwrap();
    space.cpu_write(a, &[1]).unwrap();
    mirror.migrate_range_to_device(a, 8 * PAGE_SIZE).unwrap();
    tracing::subscriber::set_global_default(Collect).unwrap();

    at("migration");
    mirror.migrate_to_system(a, 8 * PAGE_SIZE).unwrap();
    let m = events_matching("migration finalized");
    assert!(
        m.iter().any(|e| e.contains("migrated=8")),
        "a migration of 8 pages back: {m:?}"
    );

    at("signal-mode fault");
    mirror.migrate_range_to_device(a, 8 * PAGE_SIZE).unwrap();
    let mut b = [0u8; 1];
    space.cpu_read(a, &mut b).unwrap(); // served in this thread's SIGBUS handler
    assert_eq!(b, [1]);
    assert!(
        events_matching("CPU fault").is_empty(),
        "no event from the signal handler"
    );

    at("thread-mode fault");
    let t = space
        .map_anon_with(
            4 * PAGE_SIZE,
            MapOptions {
                mode: FaultMode::Thread,
                ..MapOptions::default()
            },
        )
        .unwrap();
    space.cpu_write(t, &[7]).unwrap(); // served by the handler thread
    let f = events_matching("CPU fault");
    assert!(
        f.iter().any(|e| e.contains(&format!("addr={t}"))),
        "the handler thread's fault: {f:?}"
    );

    at("eviction");
    let evicted = dev.release().unwrap();
    assert!(evicted > 0);
    assert!(
        !events_matching("device frames evicted").is_empty(),
        "eviction reported"
    );

    at("writeback");
    let file = TempFile::new("logging", &vec![0u8; 2 * PAGE_SIZE]);
    let h = FileCache::open(&file.0, true, CacheConfig::default())
        .unwrap()
        .handle();
    h.write_at(0, &[9; 16]).unwrap();
    h.fsync().unwrap();
    assert_eq!(&file.disk()[..16], &[9; 16]);
    assert!(
        events_matching("written back")
            .iter()
            .any(|e| e.contains("pages=1")),
        "writeback reported"
    );
}
