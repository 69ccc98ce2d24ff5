//! The link model: modelled device time.
//!
//! The software device runs on this CPU, so its accesses and transfers cannot be slower or faster
//! than the CPU's. To show the trade-offs of a real system, every device access and transfer is
//! also *charged* to a link model: bytes at a bandwidth, plus a latency per operation, for four
//! kinds of traffic. Reports show real wall time and this modelled device time side by side,
//! labelled as such. The figures of the named profiles come from public specifications (practical,
//! not peak, bandwidths):
//!
//! | profile | device memory (local) | link (remote access, migration) | coherent CPU access |
//! |---|---|---|---|
//! | `pcie4` | HBM 2 TB/s | PCIe 4.0 x16 ≈ 25 GB/s, 1 µs | — |
//! | `pcie5` | HBM 3 TB/s | PCIe 5.0 x16 ≈ 50 GB/s, 1 µs | — |
//! | `nvlink-c2c` | HBM 3 TB/s | Grace Hopper NVLink-C2C ≈ 450 GB/s per direction, 0.5 µs | yes |
//! | `xgmi` | HBM 2 TB/s | MI250X Infinity Fabric CPU–GPU ≈ 72 GB/s, 0.8 µs | yes |
//!
//! CPU accesses to pages resident in device-coherent memory never fault, so hetmem cannot see
//! them: they are charged from what the workload declares ([`LinkModel::charge`] with
//! [`Traffic::CpuRemote`]).

use crate::sync::{AtomicU64, Ordering};

/// A named set of bandwidths and latencies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkProfile {
    /// Name (`pcie5`, ...).
    pub name: &'static str,
    /// Device accesses to its own memory, GB/s.
    pub local_gbps: f64,
    /// Accesses and copies over the link (device to system memory, migrations, CPU to coherent
    /// device memory), GB/s.
    pub link_gbps: f64,
    /// Latency per operation over the link, µs.
    pub link_latency_us: f64,
}

impl LinkProfile {
    /// PCIe 4.0 x16.
    pub const PCIE4: LinkProfile = LinkProfile {
        name: "pcie4",
        local_gbps: 2000.0,
        link_gbps: 25.0,
        link_latency_us: 1.0,
    };
    /// PCIe 5.0 x16.
    pub const PCIE5: LinkProfile = LinkProfile {
        name: "pcie5",
        local_gbps: 3000.0,
        link_gbps: 50.0,
        link_latency_us: 1.0,
    };
    /// Grace Hopper NVLink-C2C (coherent).
    pub const NVLINK_C2C: LinkProfile = LinkProfile {
        name: "nvlink-c2c",
        local_gbps: 3000.0,
        link_gbps: 450.0,
        link_latency_us: 0.5,
    };
    /// MI250X Infinity Fabric (coherent).
    pub const XGMI: LinkProfile = LinkProfile {
        name: "xgmi",
        local_gbps: 2000.0,
        link_gbps: 72.0,
        link_latency_us: 0.8,
    };

    /// Every named profile.
    pub const ALL: [LinkProfile; 4] = [Self::PCIE4, Self::PCIE5, Self::NVLINK_C2C, Self::XGMI];

    /// The profile with this name.
    pub fn by_name(name: &str) -> Option<LinkProfile> {
        Self::ALL.into_iter().find(|p| p.name == name)
    }
}

/// Kinds of traffic charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// The device accessing its own memory.
    DeviceLocal,
    /// The device accessing system memory (or another device's) over the link.
    DeviceRemote,
    /// A migration copy between device and system memory.
    Migration,
    /// The CPU accessing device-coherent memory (declared by the workload).
    CpuRemote,
}

/// Modelled time charged so far, per kind of traffic, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkReport {
    /// Device accesses to its own memory.
    pub device_local_ns: u64,
    /// Device accesses over the link.
    pub device_remote_ns: u64,
    /// Migration copies.
    pub migration_ns: u64,
    /// CPU accesses to coherent device memory.
    pub cpu_remote_ns: u64,
}

impl LinkReport {
    /// Total modelled time.
    pub fn total_ns(&self) -> u64 {
        self.device_local_ns + self.device_remote_ns + self.migration_ns + self.cpu_remote_ns
    }

    /// `self - earlier`, per kind.
    pub fn since(&self, earlier: &LinkReport) -> LinkReport {
        LinkReport {
            device_local_ns: self.device_local_ns - earlier.device_local_ns,
            device_remote_ns: self.device_remote_ns - earlier.device_remote_ns,
            migration_ns: self.migration_ns - earlier.migration_ns,
            cpu_remote_ns: self.cpu_remote_ns - earlier.cpu_remote_ns,
        }
    }
}

/// Bytes and operations charged so far to one kind of traffic (see [`LinkModel::traffic`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCount {
    /// Bytes moved.
    pub bytes: u64,
    /// Operations (each paid the link's latency, except for local traffic).
    pub ops: u64,
}

/// A device's link model: a profile and the time charged to it.
#[derive(Debug)]
pub struct LinkModel {
    profile: LinkProfile,
    ns: [AtomicU64; 4],
    bytes: [AtomicU64; 4],
    ops: [AtomicU64; 4],
}

impl LinkModel {
    /// A model with nothing charged yet.
    pub fn new(profile: LinkProfile) -> LinkModel {
        LinkModel {
            profile,
            ns: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            ops: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The profile.
    pub fn profile(&self) -> LinkProfile {
        self.profile
    }

    /// The modelled time of `ops` operations moving `bytes` bytes of traffic `t`, in ns.
    pub fn cost_ns(&self, t: Traffic, bytes: u64, ops: u64) -> u64 {
        let p = &self.profile;
        let (gbps, lat_us) = match t {
            Traffic::DeviceLocal => (p.local_gbps, 0.0),
            Traffic::DeviceRemote | Traffic::Migration | Traffic::CpuRemote => {
                (p.link_gbps, p.link_latency_us)
            }
        };
        // bytes / (GB/s) = ns; plus latency per operation.
        (bytes as f64 / gbps + lat_us * 1e3 * ops as f64).round() as u64
    }

    /// Charges `ops` operations moving `bytes` bytes of traffic `t`.
    pub fn charge(&self, t: Traffic, bytes: u64, ops: u64) {
        let i = t as usize;
        self.ns[i].fetch_add(self.cost_ns(t, bytes, ops), Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        self.ops[i].fetch_add(ops, Ordering::Relaxed);
    }

    /// The bytes and operations charged so far to traffic `t` (what the time was charged for:
    /// the same counts cost [`LinkModel::cost_ns`] under another profile).
    pub fn traffic(&self, t: Traffic) -> TrafficCount {
        let i = t as usize;
        TrafficCount {
            bytes: self.bytes[i].load(Ordering::Relaxed),
            ops: self.ops[i].load(Ordering::Relaxed),
        }
    }

    /// What was charged so far.
    pub fn report(&self) -> LinkReport {
        let g = |i: usize| self.ns[i].load(Ordering::Relaxed);
        LinkReport {
            device_local_ns: g(0),
            device_remote_ns: g(1),
            migration_ns: g(2),
            cpu_remote_ns: g(3),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_follow_the_profile() {
        shuttle::check_random(
            || {
                let m = LinkModel::new(LinkProfile::PCIE5);
                // 50 GB/s: 50 bytes per ns; 1 µs per operation over the link.
                assert_eq!(m.cost_ns(Traffic::Migration, 50_000, 1), 1000 + 1000);
                assert_eq!(m.cost_ns(Traffic::DeviceLocal, 3_000_000, 1), 1000);
                m.charge(Traffic::DeviceRemote, 50_000, 0);
                m.charge(Traffic::CpuRemote, 0, 2);
                let r = m.report();
                assert_eq!(
                    (r.device_remote_ns, r.cpu_remote_ns, r.total_ns()),
                    (1000, 2000, 3000)
                );
                assert_eq!(
                    m.traffic(Traffic::CpuRemote),
                    TrafficCount { bytes: 0, ops: 2 }
                );
                assert_eq!(m.traffic(Traffic::DeviceRemote).bytes, 50_000);
                assert_eq!(
                    LinkProfile::by_name("nvlink-c2c"),
                    Some(LinkProfile::NVLINK_C2C)
                );
            },
            1,
        );
    }
}
