//! The offline oracle: for a sequence of page accesses by the CPU and one device, how cheap any
//! placement policy could have made them, under a cost model of the link, so that a policy's
//! cost can be reported as a ratio to that limit.
//!
//! # The model
//!
//! Every page starts in system memory. Before any access a page may move between system and
//! device memory (a migration: [`Costs::migrate_ns`] per page, 4 KiB over the link). An access
//! costs nothing where the page is local to whoever accesses it (the CPU in system memory, the
//! device in its memory); otherwise it is remote ([`Costs::remote_ns`] for its bytes) where the
//! memory allows it: the device can always read system memory over the link; the CPU can read
//! device-coherent memory in place, but a page in device-private memory must come back before
//! the CPU touches it (a migration). Reads and writes cost the same here (no replicas).
//!
//! # Two answers
//!
//! * [`lower_bound`]: the least cost with unbounded device memory, which decouples the pages: a
//!   dynamic program per page over its two places at each of its accesses (migrate before the
//!   access or not, then access locally or remotely). No policy can do better, whatever device
//!   memory it has.
//! * [`with_capacity`]: a placement that respects a device of `capacity` pages, made offline: each
//!   page follows its own optimal plan (the dynamic program's), and when a page is due on a full
//!   device, the device-resident page whose next device access lies farthest ahead (Belady's
//!   rule; never used again first) goes back to system memory first, paying its migration. A
//!   policy can do this well (it is a placement), so the least cost lies between the two answers;
//!   where capacity does not bind they are equal.
//!
//! Each answer gives the cost and what makes it up: migrations and remote bytes
//! ([`Bound::bytes_moved`] is the bytes over the link either way).

use std::collections::{BTreeMap, HashMap};

use crate::addr::PAGE_SIZE;
use crate::link::LinkProfile;
use crate::pool::MemoryKind;

/// Who accesses a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Agent {
    /// The CPU.
    Cpu,
    /// The device.
    Device,
}

/// One access of a trace: `bytes` of page `page` (a page number), by `by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The page (any page numbering: only equality matters).
    pub page: u64,
    /// Who accessed it.
    pub by: Agent,
    /// Bytes accessed (what a remote access moves over the link).
    pub bytes: u32,
}

/// The cost model: nanoseconds per migration of a page and per remote access.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    /// One page migrated either way.
    pub migrate_ns: f64,
    /// Latency of one remote access.
    pub remote_latency_ns: f64,
    /// Nanoseconds per byte of a remote access.
    pub remote_ns_per_byte: f64,
}

impl Costs {
    /// The costs of a link profile: a migration is one operation of 4 KiB over the link (its
    /// latency plus 4 KiB at its bandwidth), a remote access one operation of its bytes.
    pub fn from_profile(p: &LinkProfile) -> Costs {
        let ns_per_byte = 1.0 / p.link_gbps; // 1 GB/s is 1 byte per ns
        Costs {
            migrate_ns: p.link_latency_us * 1e3 + PAGE_SIZE as f64 * ns_per_byte,
            remote_latency_ns: p.link_latency_us * 1e3,
            remote_ns_per_byte: ns_per_byte,
        }
    }

    /// Costs that count bytes over the link: a migration costs its 4 KiB, a remote access its
    /// bytes (no latency). The least cost is then the least traffic any placement could reach.
    pub fn bytes() -> Costs {
        Costs {
            migrate_ns: PAGE_SIZE as f64,
            remote_latency_ns: 0.0,
            remote_ns_per_byte: 1.0,
        }
    }

    /// One remote access of `bytes`.
    pub fn remote_ns(&self, bytes: u32) -> f64 {
        self.remote_latency_ns + bytes as f64 * self.remote_ns_per_byte
    }
}

/// What a placement of a trace costs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bound {
    /// Modelled time over the link, nanoseconds.
    pub cost_ns: f64,
    /// Pages migrated (either way).
    pub migrations: u64,
    /// Bytes of remote accesses.
    pub remote_bytes: u64,
}

impl Bound {
    /// Bytes over the link: migrated pages and remote accesses.
    pub fn bytes_moved(&self) -> u64 {
        self.migrations * PAGE_SIZE as u64 + self.remote_bytes
    }

    fn add(&mut self, o: &Bound) {
        self.cost_ns += o.cost_ns;
        self.migrations += o.migrations;
        self.remote_bytes += o.remote_bytes;
    }
}

/// Where a page is.
const SYS: usize = 0;
const DEV: usize = 1;

/// The cost of an access by `by` to a page in `at`, and its remote bytes; `None` where the
/// access is impossible there (the CPU cannot reach device-private memory).
fn access_cost(at: usize, a: &Access, kind: MemoryKind, c: &Costs) -> Option<(f64, u64)> {
    match (at, a.by) {
        (SYS, Agent::Cpu) | (DEV, Agent::Device) => Some((0.0, 0)),
        (SYS, Agent::Device) => Some((c.remote_ns(a.bytes), a.bytes as u64)),
        _ => match kind {
            MemoryKind::Coherent => Some((c.remote_ns(a.bytes), a.bytes as u64)),
            _ => None,
        },
    }
}

/// The optimal plan of one page's accesses (in order): where the page is at each access, and
/// what the plan costs. Ties go to fewer bytes over the link.
fn plan_page(accesses: &[Access], kind: MemoryKind, c: &Costs) -> (Vec<usize>, Bound) {
    let n = accesses.len();
    // best[i][s]: the cheapest way to serve accesses 0..=i with the page in `s` at access i.
    let mut best: Vec<[Option<Bound>; 2]> = Vec::with_capacity(n);
    let mut from: Vec<[usize; 2]> = Vec::with_capacity(n);
    let better = |x: &Bound, y: &Bound| {
        x.cost_ns < y.cost_ns || (x.cost_ns == y.cost_ns && x.bytes_moved() < y.bytes_moved())
    };
    for (i, a) in accesses.iter().enumerate() {
        let mut row: [Option<Bound>; 2] = [None, None];
        let mut back = [SYS; 2];
        for s in [SYS, DEV] {
            let Some((cost, remote)) = access_cost(s, a, kind, c) else {
                continue;
            };
            for p in [SYS, DEV] {
                let prev = if i == 0 {
                    (p == SYS).then(Bound::default)
                } else {
                    best[i - 1][p]
                };
                let Some(mut b) = prev else { continue };
                if p != s {
                    b.cost_ns += c.migrate_ns;
                    b.migrations += 1;
                }
                b.cost_ns += cost;
                b.remote_bytes += remote;
                if row[s].as_ref().is_none_or(|r| better(&b, r)) {
                    row[s] = Some(b);
                    back[s] = p;
                }
            }
        }
        best.push(row);
        from.push(back);
    }
    if n == 0 {
        return (Vec::new(), Bound::default());
    }
    let (mut s, total) = match (best[n - 1][SYS], best[n - 1][DEV]) {
        (Some(x), Some(y)) if better(&y, &x) => (DEV, y),
        (Some(x), _) => (SYS, x),
        (None, Some(y)) => (DEV, y),
        (None, None) => unreachable!("every access is possible in system memory"),
    };
    let mut plan = vec![SYS; n];
    for i in (0..n).rev() {
        plan[i] = s;
        s = from[i][s];
    }
    (plan, total)
}

/// The accesses of each page, in trace order (with their positions in the trace).
fn by_page(trace: &[Access]) -> BTreeMap<u64, (Vec<usize>, Vec<Access>)> {
    let mut m: BTreeMap<u64, (Vec<usize>, Vec<Access>)> = BTreeMap::new();
    for (i, a) in trace.iter().enumerate() {
        let e = m.entry(a.page).or_default();
        e.0.push(i);
        e.1.push(*a);
    }
    m
}

/// The least cost of `trace` with unbounded device memory of `kind` (see the module doc): no
/// policy does better.
pub fn lower_bound(trace: &[Access], kind: MemoryKind, c: &Costs) -> Bound {
    let mut total = Bound::default();
    for (_, acc) in by_page(trace).values() {
        total.add(&plan_page(acc, kind, c).1);
    }
    total
}

/// The cost of `trace` on a device of `capacity` pages of `kind` under the offline placement of
/// the module doc (each page's optimal plan, Belady's rule when the device is full). A
/// placement a policy could make: the least cost lies between [`lower_bound`] and this.
pub fn with_capacity(trace: &[Access], kind: MemoryKind, c: &Costs, capacity: usize) -> Bound {
    let pages = by_page(trace);
    // Where each access wants its page, from each page's plan.
    let mut want = vec![SYS; trace.len()];
    for (pos, acc) in pages.values() {
        let (plan, _) = plan_page(acc, kind, c);
        for (k, &i) in pos.iter().enumerate() {
            want[i] = plan[k];
        }
    }
    // The next access (position) by the device to each page, from each position on.
    let mut next_dev = vec![usize::MAX; trace.len()];
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for i in (0..trace.len()).rev() {
        let a = &trace[i];
        next_dev[i] = seen.get(&a.page).copied().unwrap_or(usize::MAX);
        if a.by == Agent::Device {
            seen.insert(a.page, i);
        }
    }
    let mut at: HashMap<u64, usize> = HashMap::new();
    // Device-resident pages, by the position of their next device access.
    let mut resident: BTreeMap<(usize, u64), ()> = BTreeMap::new();
    let mut key_of: HashMap<u64, usize> = HashMap::new();
    let mut total = Bound::default();
    for (i, a) in trace.iter().enumerate() {
        let here = *at.get(&a.page).unwrap_or(&SYS);
        let mut goal = want[i];
        if goal == DEV && here == SYS && capacity == 0 {
            goal = SYS;
        }
        if goal == DEV && here == SYS && resident.len() >= capacity {
            // Full: Belady's rule with bypass. The candidate victim is the resident page used
            // farthest ahead by the device; it goes only if this page's next device use (after
            // this access, which can be served where the page is) comes sooner; else this page
            // stays where it is.
            let &(far, victim) = resident.keys().next_back().expect("full, so not empty");
            if far > next_dev[i] {
                resident.remove(&(far, victim));
                key_of.remove(&victim);
                at.insert(victim, SYS);
                total.cost_ns += c.migrate_ns;
                total.migrations += 1;
            } else {
                goal = SYS;
            }
        }
        if goal != here {
            total.cost_ns += c.migrate_ns;
            total.migrations += 1;
            at.insert(a.page, goal);
            if goal == SYS
                && let Some(k) = key_of.remove(&a.page)
            {
                resident.remove(&(k, a.page));
            }
        }
        let (cost, remote) = match access_cost(goal, a, kind, c) {
            Some(x) => x,
            // Only the CPU on a device-private page: it comes back first.
            None => {
                total.cost_ns += c.migrate_ns;
                total.migrations += 1;
                at.insert(a.page, SYS);
                if let Some(k) = key_of.remove(&a.page) {
                    resident.remove(&(k, a.page));
                }
                (0.0, 0)
            }
        };
        total.cost_ns += cost;
        total.remote_bytes += remote;
        // Re-key the page by its next device access.
        if at.get(&a.page) == Some(&DEV) {
            if let Some(k) = key_of.remove(&a.page) {
                resident.remove(&(k, a.page));
            }
            resident.insert((next_dev[i], a.page), ());
            key_of.insert(a.page, next_dev[i]);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migrating costs 10, a remote access 1 + 0 per byte: easy to add up by hand.
    const C: Costs = Costs {
        migrate_ns: 10.0,
        remote_latency_ns: 1.0,
        remote_ns_per_byte: 0.0,
    };

    fn acc(page: u64, by: Agent) -> Access {
        Access {
            page,
            by,
            bytes: 64,
        }
    }

    fn dev(page: u64) -> Access {
        acc(page, Agent::Device)
    }

    fn cpu(page: u64) -> Access {
        acc(page, Agent::Cpu)
    }

    #[test]
    fn an_empty_trace_costs_nothing() {
        assert_eq!(lower_bound(&[], MemoryKind::Private, &C), Bound::default());
        assert_eq!(
            with_capacity(&[], MemoryKind::Private, &C, 4),
            Bound::default()
        );
    }

    #[test]
    fn a_page_the_device_reads_often_migrates_once() {
        // 20 device reads: remote 20 × 1 = 20; migrate once: 10.
        let t = vec![dev(7); 20];
        let b = lower_bound(&t, MemoryKind::Private, &C);
        assert_eq!(b.cost_ns, 10.0);
        assert_eq!((b.migrations, b.remote_bytes), (1, 0));
        assert_eq!(b.bytes_moved(), 4096);
        // Five reads: remote (5) beats migrating (10).
        let b = lower_bound(&t[..5], MemoryKind::Private, &C);
        assert_eq!((b.cost_ns, b.migrations, b.remote_bytes), (5.0, 0, 5 * 64));
    }

    #[test]
    fn private_memory_ping_pong_stays_remote_and_coherent_memory_migrates_once() {
        // Rounds of 15 device reads then 1 CPU read, 4 rounds.
        let mut t = Vec::new();
        for _ in 0..4 {
            t.extend(std::iter::repeat_n(dev(1), 15));
            t.push(cpu(1));
        }
        // Private: a CPU access needs the page in system memory. Per round: remote 15, or
        // migrate there and back (20): remote wins, 60 in all.
        let p = lower_bound(&t, MemoryKind::Private, &C);
        assert_eq!((p.cost_ns, p.migrations), (60.0, 0));
        // Coherent: migrate once (10), the 4 CPU reads remote (4): 14.
        let c = lower_bound(&t, MemoryKind::Coherent, &C);
        assert_eq!((c.cost_ns, c.migrations, c.remote_bytes), (14.0, 1, 4 * 64));
    }

    #[test]
    fn device_phases_longer_than_a_round_trip_migrate_each_way() {
        // Private, 2 rounds of 30 device reads then 1 CPU read: per round migrate there (10)
        // and back (10) beats 30 remote reads: 40 in all, 4 migrations.
        let mut t = Vec::new();
        for _ in 0..2 {
            t.extend(std::iter::repeat_n(dev(3), 30));
            t.push(cpu(3));
        }
        let b = lower_bound(&t, MemoryKind::Private, &C);
        assert_eq!((b.cost_ns, b.migrations), (40.0, 4));
    }

    #[test]
    fn pages_are_independent_without_a_capacity() {
        let mut t = vec![dev(1); 20];
        t.extend(vec![dev(2); 3]);
        // Page 1 migrates (10), page 2 is read remotely (3).
        let b = lower_bound(&t, MemoryKind::Private, &C);
        assert_eq!((b.cost_ns, b.migrations), (13.0, 1));
        assert_eq!(with_capacity(&t, MemoryKind::Private, &C, 8), b);
    }

    #[test]
    fn a_full_device_evicts_the_page_used_farthest_ahead() {
        // Capacity 1. Pages 1 and 2 are each read 20 times by the device, first all of 1, then
        // all of 2, then 1 again 20 times. Unbounded: each migrates once (20). With one frame:
        // 1 in (10), 1 out for 2 (10), 2 in (10), 2 out for 1 (10), 1 in (10): 50.
        let mut t = vec![dev(1); 20];
        t.extend(vec![dev(2); 20]);
        t.extend(vec![dev(1); 20]);
        let lb = lower_bound(&t, MemoryKind::Private, &C);
        assert_eq!((lb.cost_ns, lb.migrations), (20.0, 2));
        let b = with_capacity(&t, MemoryKind::Private, &C, 1);
        assert_eq!((b.cost_ns, b.migrations), (50.0, 5));
        assert!(b.cost_ns >= lb.cost_ns);
    }

    #[test]
    fn a_page_used_later_than_the_residents_stays_in_system_memory() {
        // Capacity 1: page 1 is resident and used again soon; page 2 is read 20 times now but
        // page 1's next use comes first, so Belady keeps page 1 and page 2 is read remotely.
        let mut t = vec![dev(1); 20];
        let mut interleaved = Vec::new();
        for _ in 0..20 {
            interleaved.push(dev(1));
            interleaved.push(dev(2));
        }
        t.extend(interleaved);
        let b = with_capacity(&t, MemoryKind::Private, &C, 1);
        // Page 1: one migration (10); page 2: 20 remote reads (20).
        assert_eq!(
            (b.cost_ns, b.migrations, b.remote_bytes),
            (30.0, 1, 20 * 64)
        );
    }

    #[test]
    fn the_capacity_answer_never_beats_the_lower_bound_and_meets_it_with_room() {
        // Random traces (a fixed generator): with room for every page the two answers agree;
        // with less, the placement costs at least the bound.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..300 {
            let n = 1 + next(120) as usize;
            let pages = 1 + next(6);
            let t: Vec<Access> = (0..n)
                .map(|_| Access {
                    page: next(pages),
                    by: if next(3) == 0 {
                        Agent::Cpu
                    } else {
                        Agent::Device
                    },
                    bytes: 64 * (1 + next(64)) as u32,
                })
                .collect();
            for kind in [MemoryKind::Private, MemoryKind::Coherent] {
                let lb = lower_bound(&t, kind, &C);
                let all = with_capacity(&t, kind, &C, pages as usize);
                assert!(
                    (all.cost_ns - lb.cost_ns).abs() < 1e-9,
                    "{t:?}: {all:?} vs {lb:?}"
                );
                for cap in 0..pages as usize {
                    let b = with_capacity(&t, kind, &C, cap);
                    assert!(
                        b.cost_ns >= lb.cost_ns - 1e-9,
                        "{t:?} cap {cap}: {b:?} < {lb:?}"
                    );
                }
                // Never worse than leaving every page in system memory (remote device accesses).
                let stay: f64 = t
                    .iter()
                    .filter(|a| a.by == Agent::Device)
                    .map(|a| C.remote_ns(a.bytes))
                    .sum();
                assert!(lb.cost_ns <= stay + 1e-9);
            }
        }
    }

    #[test]
    fn the_bytes_costs_count_the_least_traffic() {
        // A page the device reads twice: migrating (4 KiB) beats two remote page reads (8 KiB);
        // read once, either moves 4 KiB.
        let page = |by| Access {
            page: 1,
            by,
            bytes: PAGE_SIZE as u32,
        };
        let b = lower_bound(
            &[page(Agent::Device); 2],
            MemoryKind::Private,
            &Costs::bytes(),
        );
        assert_eq!((b.bytes_moved(), b.migrations), (4096, 1));
        assert_eq!(b.cost_ns, 4096.0);
        // Coherent ping-pong of lines: migrate once, the CPU's lines read in place.
        let mut t = Vec::new();
        for _ in 0..4 {
            t.push(page(Agent::Device));
            t.push(Access {
                page: 1,
                by: Agent::Cpu,
                bytes: 64,
            });
        }
        let b = lower_bound(&t, MemoryKind::Coherent, &Costs::bytes());
        assert_eq!(b.bytes_moved(), 4096 + 4 * 64);
    }

    #[test]
    fn costs_of_a_link_profile() {
        let c = Costs::from_profile(&LinkProfile::PCIE5);
        // 1 µs latency, 50 GB/s: 4 KiB in 81.92 ns.
        assert!((c.migrate_ns - (1000.0 + 4096.0 / 50.0)).abs() < 1e-9);
        assert!((c.remote_ns(64) - (1000.0 + 64.0 / 50.0)).abs() < 1e-9);
    }
}
