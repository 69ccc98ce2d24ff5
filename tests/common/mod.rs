//! Shared helpers for the integration tests: a watchdog (a hang in a fault path fails the test
//! in seconds instead of hanging CI) and the data patterns of the kernel's selftests.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

/// Fails (aborts) the test process with a message if the guard is not dropped within `secs`.
/// Every test that can block on a fault holds one.
pub struct Watchdog {
    tx: Option<mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

pub fn watchdog(name: &'static str, secs: u64) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs)) {
            eprintln!(
                "WATCHDOG: test `{name}` did not finish within {secs} s: a fault path is probably hung"
            );
            std::process::abort();
        }
    });
    Watchdog {
        tx: Some(tx),
        handle: Some(handle),
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub const PAGE: usize = 4096;
/// N of the selftests: 4 MiB of pages.
pub const NPAGES: usize = (4 << 20) / PAGE;
/// P of the selftests: the PMD size.
pub const PMD: usize = 2 << 20;

/// `ptr[i] = i` as 32-bit ints, for `bytes` bytes.
pub fn pattern(bytes: usize, f: impl Fn(u32) -> u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes);
    for i in 0..(bytes / 4) as u32 {
        v.extend_from_slice(&f(i).to_ne_bytes());
    }
    v
}

/// Reads a buffer as 32-bit ints.
pub fn ints(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}
