//! What the host check reads: `/proc/sys`, resource limits, `/proc/meminfo`,
//! and the io_uring probe, gathered once into a plain value so the decision
//! (`rules`) is a pure function that tests can feed any host they like.

use serde::Serialize;

use crate::backend::uring::probe::{self, Capabilities};

/// One reading of every value the check decides on. `None` means the file is
/// absent (a module not loaded, an older kernel) or unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSnapshot {
    /// `uname -r`.
    pub kernel_release: String,
    /// CPUs this process may run on.
    pub cpus: u64,
    /// `MemTotal` from `/proc/meminfo`.
    pub memory_total_bytes: u64,
    /// The page size `tcp_mem` counts in.
    pub page_size_bytes: u64,
    /// `RLIMIT_NOFILE` soft limit when the check started (`ulimit -Sn`).
    pub nofile_soft: u64,
    /// `RLIMIT_NOFILE` hard limit (`ulimit -Hn`); `plenum serve` raises soft to it.
    pub nofile_hard: u64,
    /// The process holds `CAP_SYS_RESOURCE`, so it could raise its hard limit
    /// up to `fs.nr_open` (root in a sandbox often does not).
    pub can_raise_nofile_hard: bool,
    /// `fs.nr_open`: the ceiling of any process's `RLIMIT_NOFILE`.
    pub nr_open: Option<u64>,
    /// `fs.file-max`: open files in the whole system.
    pub file_max: Option<u64>,
    /// First field of `fs.file-nr`: files open in the whole system now.
    pub files_open_now: Option<u64>,
    /// `net.core.somaxconn`: caps every listen backlog.
    pub somaxconn: Option<u64>,
    /// `net.ipv4.tcp_max_syn_backlog`.
    pub tcp_max_syn_backlog: Option<u64>,
    /// `net.ipv4.tcp_syncookies`.
    pub tcp_syncookies: Option<u64>,
    /// `net.ipv4.ip_local_port_range`, inclusive.
    pub ip_local_port_range: Option<(u64, u64)>,
    /// `net.ipv4.tcp_mem` in pages: low, pressure, high.
    pub tcp_mem_pages: Option<[u64; 3]>,
    /// `net.ipv4.tcp_rmem` in bytes: min, default, max.
    pub tcp_rmem: Option<[u64; 3]>,
    /// `net.ipv4.tcp_wmem` in bytes: min, default, max (the autotuning cap).
    pub tcp_wmem: Option<[u64; 3]>,
    /// `net.core.wmem_max`: the largest `SO_SNDBUF` a process may ask for.
    pub wmem_max: Option<u64>,
    /// `net.netfilter.nf_conntrack_max`; `None` when conntrack is not loaded.
    pub nf_conntrack_max: Option<u64>,
    /// `net.netfilter.nf_conntrack_count`.
    pub nf_conntrack_count: Option<u64>,
    /// `net.core.netdev_max_backlog`.
    pub netdev_max_backlog: Option<u64>,
    /// `net.ipv4.tcp_keepalive_time` in seconds (informational: Plenum sets its own).
    pub tcp_keepalive_time_s: Option<u64>,
    /// `kernel.io_uring_disabled` (Linux 6.6+): 0 all, 1 privileged or group, 2 nobody.
    pub io_uring_disabled: Option<u64>,
    /// The io_uring probe, or `None` when it was not run.
    #[serde(serialize_with = "serialize_probe")]
    pub uring: Option<Result<Capabilities, String>>,
}

fn serialize_probe<S: serde::Serializer>(
    probe: &Option<Result<Capabilities, String>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match probe {
        None => serializer.serialize_none(),
        Some(Ok(capabilities)) => serializer.serialize_str(&format!(
            "available: {} slots per ring, socket commands {}",
            capabilities.files_per_ring_max,
            if capabilities.socket_commands {
                "yes"
            } else {
                "no"
            }
        )),
        Some(Err(reason)) => serializer.serialize_str(&format!("unavailable: {reason}")),
    }
}

impl HostSnapshot {
    /// Reads this host. With `probe_files_per_ring = Some(n)` the io_uring
    /// probe runs asking for a table of `n` slots (clamped to the hard limit,
    /// so a too-small limit is reported by the open-file rule, not as
    /// "io_uring unavailable").
    pub fn read(probe_files_per_ring: Option<u64>) -> HostSnapshot {
        let (nofile_soft, nofile_hard) = nofile_limits();
        let uring = probe_files_per_ring.map(|slots| {
            let slots = slots
                .min(nofile_hard)
                .min(u64::from(probe::FILES_PER_RING_KERNEL_MAX))
                .max(1);
            // The kernel bounds the table by the *soft* limit; plenum serve
            // raises soft to hard at start, and so does the check.
            raise_nofile_soft_to_hard();
            probe::probe(slots as u32)
        });
        HostSnapshot {
            kernel_release: sysctl_text("kernel/osrelease").unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            memory_total_bytes: meminfo_total_bytes().unwrap_or(0),
            page_size_bytes: page_size_bytes().unwrap_or(4096),
            nofile_soft,
            nofile_hard,
            can_raise_nofile_hard: has_capability(CAP_SYS_RESOURCE),
            nr_open: sysctl_u64("fs/nr_open"),
            file_max: sysctl_u64("fs/file-max"),
            files_open_now: sysctl_numbers("fs/file-nr").and_then(|n| n.first().copied()),
            somaxconn: sysctl_u64("net/core/somaxconn"),
            tcp_max_syn_backlog: sysctl_u64("net/ipv4/tcp_max_syn_backlog"),
            tcp_syncookies: sysctl_u64("net/ipv4/tcp_syncookies"),
            ip_local_port_range: sysctl_numbers("net/ipv4/ip_local_port_range")
                .and_then(|n| Some((*n.first()?, *n.get(1)?))),
            tcp_mem_pages: sysctl_triple("net/ipv4/tcp_mem"),
            tcp_rmem: sysctl_triple("net/ipv4/tcp_rmem"),
            tcp_wmem: sysctl_triple("net/ipv4/tcp_wmem"),
            wmem_max: sysctl_u64("net/core/wmem_max"),
            nf_conntrack_max: sysctl_u64("net/netfilter/nf_conntrack_max"),
            nf_conntrack_count: sysctl_u64("net/netfilter/nf_conntrack_count"),
            netdev_max_backlog: sysctl_u64("net/core/netdev_max_backlog"),
            tcp_keepalive_time_s: sysctl_u64("net/ipv4/tcp_keepalive_time"),
            io_uring_disabled: sysctl_u64("kernel/io_uring_disabled"),
            uring,
        }
    }
}

fn sysctl_text(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{name}"))
        .ok()
        .map(|text| text.trim().to_string())
}

fn sysctl_numbers(name: &str) -> Option<Vec<u64>> {
    let text = sysctl_text(name)?;
    text.split_whitespace()
        .map(|word| word.parse().ok())
        .collect()
}

fn sysctl_u64(name: &str) -> Option<u64> {
    sysctl_numbers(name)?.first().copied()
}

fn sysctl_triple(name: &str) -> Option<[u64; 3]> {
    match sysctl_numbers(name)?.as_slice() {
        [a, b, c] => Some([*a, *b, *c]),
        _ => None,
    }
}

fn meminfo_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

const CAP_SYS_RESOURCE: u32 = 24;

/// Whether the effective capability set (`CapEff` in `/proc/self/status`) has `bit`.
fn has_capability(bit: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|set| set & (1 << bit) != 0)
}

/// `RLIMIT_NOFILE` as (soft, hard); `RLIM_INFINITY` reads as `u64::MAX`.
pub fn nofile_limits() -> (u64, u64) {
    rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as `plenum serve` does at
/// start. Never fails the caller: a limit it cannot raise is what the check
/// reports anyway.
pub fn raise_nofile_soft_to_hard() {
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        if soft < hard {
            let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
        }
    }
}

/// The kernel's page size (the unit of `tcp_mem`), from `/proc/self/smaps`.
fn page_size_bytes() -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let line = smaps
        .lines()
        .find_map(|line| line.strip_prefix("KernelPageSize:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}
