//! The host check's decision: a pure function from a [`HostSnapshot`] and what
//! the server will need ([`Needs`]) to one [`Line`] per knob.
//!
//! A line is `Fix` when the knob would stop N connections (the report is then
//! blocking and `plenum check-host` exits 1), `Warn` when N connections work
//! but something degrades under a burst or a stall, `Ok` otherwise. Every line
//! that is not `Ok` carries the exact command to run and the guide section
//! that explains it. Numbers the rules lean on were measured on this project's
//! machine (Linux 6.18); the guide shows how to measure them on yours.

use serde::Serialize;

use super::snapshot::HostSnapshot;
use crate::backend::uring::probe::{files_per_ring_for, FILES_PER_RING_KERNEL_MAX};

/// Descriptors a process needs beside its connections: listeners, epoll and
/// event fds, stdio, log files. `--connections-max` defaults to the open-file
/// limit minus this.
pub const FD_RESERVE: u64 = 256;

/// Descriptors per io_uring shard outside the ring's table: listener, ring, eventfd.
pub const FDS_PER_URING_SHARD: u64 = 4;

/// Kernel memory of one idle TCP socket: the larger `/proc/meminfo` `Slab`
/// growth per socket of two runs of 10,000 idle loopback pairs on Linux 6.18
/// (4,103 and 4,466 B; the socket's own slab objects are 3.7 KB of it), by
/// tuning/measure_socket_memory.py.
pub const KERNEL_BYTES_PER_IDLE_SOCKET: u64 = 4_500;

/// Plenum's own memory per idle connection: the design target (README, Measured).
pub const USER_BYTES_PER_CONNECTION_TARGET: u64 = 1_024;

/// A stalled socket holds its whole send buffer in `tcp_mem`, plus about 4 %
/// of buffer overhead (measured: 266 KiB per socket with `SO_SNDBUF` 128 KiB,
/// which the kernel doubles to 256 KiB).
const STALLED_OVERHEAD_DIVISOR: u64 = 25;

/// `net.core.netdev_max_backlog` suggested for 10,000 connections and more.
pub const NETDEV_MAX_BACKLOG_SUGGESTED: u64 = 16_384;

/// Guide sections the lines point at; each is a heading in tuning/GUIDE.md.
pub mod section {
    pub const OPEN_FILES: &str = "open-file-limits";
    pub const SYSTEM_FILES: &str = "system-wide-open-files";
    pub const BACKLOG: &str = "listen-backlog";
    pub const PORTS: &str = "ephemeral-ports";
    pub const TCP_MEMORY: &str = "tcp-memory";
    pub const KEEPALIVE: &str = "keepalive-and-dead-peers";
    pub const CONNTRACK: &str = "connection-tracking";
    pub const INPUT_QUEUE: &str = "packet-input-queue";
    pub const IO_URING: &str = "io_uring-availability";
    pub const SHARDS: &str = "shard-count";
    pub const MEMORY: &str = "memory-per-connection";
    /// Every section above, for the test that they exist in the guide.
    pub const ALL: &[&str] = &[
        OPEN_FILES,
        SYSTEM_FILES,
        BACKLOG,
        PORTS,
        TCP_MEMORY,
        KEEPALIVE,
        CONNTRACK,
        INPUT_QUEUE,
        IO_URING,
        SHARDS,
        MEMORY,
    ];
}

/// The I/O backend the server will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Connections are process descriptors: the open-file limit bounds them.
    Epoll,
    /// Connections are direct descriptors in each ring's table: the limit is per ring.
    Uring,
}

/// What the server will be asked to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// Connections per process (`--connections-max`).
    pub connections: u64,
    pub backend: Backend,
    /// Shard threads (`--shards`); with io_uring, one ring and one table each.
    pub shards: u64,
    /// Listen backlog per shard listener (`--backlog`).
    pub backlog: u64,
    /// `SO_SNDBUF` per socket (`--socket-send-buffer-bytes`); 0 = autotuning.
    pub socket_send_buffer_bytes: u64,
}

/// How a knob stands for N connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Status {
    /// Enough for N.
    Ok,
    /// N works; a burst or a stall degrades something.
    Warn,
    /// Stops N connections: blocking.
    Fix,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fix => "FIX",
        }
    }
}

/// One knob's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    /// The sysctl or limit, as an administrator would name it.
    pub knob: &'static str,
    pub current: String,
    pub needed: String,
    pub status: Status,
    /// Exact shell command(s) or `plenum serve` flags; empty when `Ok`.
    /// Alternatives are separated by ` ; or ` .
    pub fix_command: String,
    /// Why, in one sentence; may be empty.
    pub note: String,
    /// Anchor in tuning/GUIDE.md.
    pub guide_section: &'static str,
}

/// Every line, and whether any is blocking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub lines: Vec<Line>,
    pub blocking: bool,
}

impl Report {
    pub fn blocking_lines(&self) -> impl Iterator<Item = &Line> {
        self.lines.iter().filter(|line| line.status == Status::Fix)
    }
}

/// Decides every knob. Pure: the same snapshot and needs give the same report.
pub fn evaluate(host: &HostSnapshot, needs: &Needs) -> Report {
    let lines = vec![
        open_file_limit(host, needs),
        nr_open(host, needs),
        file_max(host, needs),
        io_uring(host, needs),
        somaxconn(host, needs),
        syn_backlog(host, needs),
        tcp_mem(host, needs),
        tcp_wmem(host, needs),
        wmem_max(host, needs),
        tcp_rmem(host),
        conntrack(host, needs),
        netdev_backlog(host, needs),
        local_ports(host, needs),
        keepalive(host),
        memory(host, needs),
        shards(host, needs),
    ];
    let blocking = lines.iter().any(|line| line.status == Status::Fix);
    Report { lines, blocking }
}

fn line(knob: &'static str, guide_section: &'static str) -> Line {
    Line {
        knob,
        current: String::new(),
        needed: String::new(),
        status: Status::Ok,
        fix_command: String::new(),
        note: String::new(),
        guide_section,
    }
}

fn show(value: Option<u64>) -> String {
    value.map_or_else(|| "absent".to_string(), |v| v.to_string())
}

fn show_limit(value: u64) -> String {
    if value == u64::MAX {
        "unlimited".into()
    } else {
        value.to_string()
    }
}

/// Bytes as a short human figure: 2.2 GiB, 266 KiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A limit to suggest for `need`: the next power of two, at least 65,536, so
/// the command leaves room and reads as a round number (131072, 1048576).
pub fn suggested_limit(need: u64) -> u64 {
    need.max(65_536).next_power_of_two()
}

/// The smallest shard count whose per-ring table fits under `hard`, if any
/// count up to 4,096 does.
pub fn shards_for(connections: u64, hard: u64) -> Option<u64> {
    let cap = hard.min(u64::from(FILES_PER_RING_KERNEL_MAX));
    // Bounded search; the table size only shrinks as shards grow.
    (1..=4_096).find(|&shards| files_per_ring_for(connections, shards) <= cap)
}

fn uring_works(host: &HostSnapshot) -> Option<bool> {
    host.uring.as_ref().map(|probe| probe.is_ok())
}

fn open_file_limit(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("RLIMIT_NOFILE", section::OPEN_FILES);
    let hard = host.nofile_hard;
    out.current = format!(
        "soft {}, hard {}",
        show_limit(host.nofile_soft),
        show_limit(hard)
    );
    let need = match needs.backend {
        Backend::Epoll => {
            let need = needs.connections + FD_RESERVE;
            out.needed = format!(
                "hard >= {need} ({} connections + {FD_RESERVE})",
                needs.connections
            );
            need
        }
        Backend::Uring => {
            let slots = files_per_ring_for(needs.connections, needs.shards);
            let process = needs.shards * FDS_PER_URING_SHARD + FD_RESERVE;
            out.needed = format!(
                "hard >= {slots} per ring (ceil({} / {} shards) + 1/16 + 64)",
                needs.connections, needs.shards
            );
            if slots > u64::from(FILES_PER_RING_KERNEL_MAX) {
                out.status = Status::Fix;
                let shards = shards_for(needs.connections, u64::MAX).unwrap_or(4_096);
                out.fix_command = format!("plenum serve --backend uring --shards {shards}");
                out.note =
                    format!("a ring's table holds at most {FILES_PER_RING_KERNEL_MAX} descriptors");
                return out;
            }
            slots.max(process)
        }
    };
    if hard >= need {
        if host.nofile_soft < need {
            out.note = "plenum serve raises the soft limit to the hard limit at start".into();
        }
        return out;
    }
    out.status = Status::Fix;
    let target = suggested_limit(need);
    let mut fixes = Vec::new();
    let nr_open_too_low = host.nr_open.is_some_and(|nr_open| nr_open < target);
    let raise = if nr_open_too_low {
        format!("sysctl -w fs.nr_open={target} && ulimit -n {target}")
    } else {
        format!("ulimit -n {target}")
    };
    fixes.push(raise);
    fixes.push(format!(
        "LimitNOFILE={target} in plenum.service (tuning/plenum.service)"
    ));
    let alternative = match needs.backend {
        Backend::Epoll if uring_works(host) != Some(false) => shards_for(needs.connections, hard)
            .map(|shards| format!("plenum serve --backend uring --shards {shards}")),
        Backend::Uring => shards_for(needs.connections, hard)
            .map(|shards| format!("plenum serve --backend uring --shards {shards}")),
        Backend::Epoll => None,
    };
    if host.can_raise_nofile_hard {
        out.note = "raise the hard limit as root (before plenum starts)".into();
        fixes.extend(alternative);
    } else {
        out.note = format!(
            "this process cannot raise its hard limit (no CAP_SYS_RESOURCE: a container or \
             sandbox caps it at {})",
            show_limit(hard)
        );
        if let Some(alternative) = alternative {
            // The one fix that works without privileges comes first.
            fixes.insert(0, alternative);
            out.note.push_str(match needs.backend {
                Backend::Epoll => "; io_uring keeps connections out of the process table",
                Backend::Uring => "; more shards spread the connections over more rings",
            });
        }
    }
    out.fix_command = fixes.join(" ; or ");
    out
}

fn nr_open(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("fs.nr_open", section::OPEN_FILES);
    out.current = show(host.nr_open);
    let need = match needs.backend {
        Backend::Epoll => needs.connections + FD_RESERVE,
        Backend::Uring => files_per_ring_for(needs.connections, needs.shards),
    };
    out.needed = format!(">= {need} (ceiling of RLIMIT_NOFILE)");
    if let Some(nr_open) = host.nr_open {
        if nr_open < need && host.nofile_hard < need {
            out.status = Status::Fix;
            out.fix_command = format!("sysctl -w fs.nr_open={}", suggested_limit(need));
            out.note = "no process may raise RLIMIT_NOFILE above fs.nr_open".into();
        }
    }
    out
}

fn file_max(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("fs.file-max", section::SYSTEM_FILES);
    out.current = match host.files_open_now {
        Some(open) => format!("{} ({open} open now)", show(host.file_max)),
        None => show(host.file_max),
    };
    // Direct descriptors are open files too: both backends count here.
    let need = host.files_open_now.unwrap_or(0) + needs.connections + FD_RESERVE;
    out.needed = format!(">= {need} (open now + connections + {FD_RESERVE})");
    if let Some(file_max) = host.file_max {
        if file_max < need {
            out.status = Status::Fix;
            out.fix_command = format!("sysctl -w fs.file-max={}", suggested_limit(need * 2));
            out.note = "past it, accept fails with ENFILE for every process".into();
        }
    }
    out
}

fn io_uring(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("io_uring", section::IO_URING);
    let disabled = host
        .io_uring_disabled
        .map_or_else(String::new, |v| format!(", kernel.io_uring_disabled={v}"));
    match &host.uring {
        None => out.current = format!("not probed{disabled}"),
        Some(Ok(capabilities)) => {
            out.current = format!(
                "available (kernel {}{disabled}, socket commands {})",
                capabilities.kernel_release,
                if capabilities.socket_commands {
                    "yes"
                } else {
                    "no"
                }
            );
            if needs.backend == Backend::Uring && !capabilities.socket_commands {
                out.status = Status::Warn;
                out.note = "no io_uring socket commands (Linux 6.7+): stall closes end with \
                            FIN instead of a reset"
                    .into();
            }
        }
        Some(Err(reason)) => {
            out.current = format!("unavailable: {reason}");
            if needs.backend == Backend::Uring {
                out.status = Status::Fix;
                out.fix_command = match host.io_uring_disabled {
                    Some(value) if value != 0 => {
                        "sysctl -w kernel.io_uring_disabled=0 ; or plenum serve --backend epoll"
                            .into()
                    }
                    _ => "plenum serve --backend epoll".into(),
                };
            }
        }
    }
    out.needed = match needs.backend {
        Backend::Uring => "setup, opcodes, multishot accept into a sparse table (Linux 5.19+)",
        Backend::Epoll => "not used by --backend epoll",
    }
    .into();
    out
}

fn somaxconn(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.core.somaxconn", section::BACKLOG);
    out.current = show(host.somaxconn);
    out.needed = format!(">= {} (--backlog)", needs.backlog);
    if host.somaxconn.is_some_and(|value| value < needs.backlog) {
        out.status = Status::Warn;
        out.fix_command = format!("sysctl -w net.core.somaxconn={}", needs.backlog);
        out.note = "the kernel silently caps every listen backlog at somaxconn".into();
    }
    out
}

fn syn_backlog(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.ipv4.tcp_max_syn_backlog", section::BACKLOG);
    out.current = match host.tcp_syncookies {
        Some(cookies) => format!(
            "{} (tcp_syncookies={cookies})",
            show(host.tcp_max_syn_backlog)
        ),
        None => show(host.tcp_max_syn_backlog),
    };
    out.needed = format!(">= {} (--backlog) when syncookies are off", needs.backlog);
    let low = host
        .tcp_max_syn_backlog
        .is_some_and(|value| value < needs.backlog);
    if low {
        if host.tcp_syncookies == Some(0) {
            out.status = Status::Warn;
            out.fix_command = format!("sysctl -w net.ipv4.tcp_max_syn_backlog={}", needs.backlog);
            out.note = "without syncookies a reconnect burst past it is dropped".into();
        } else {
            out.note = "syncookies answer a full SYN queue, so the lower value only matters \
                        in a burst"
                .into();
        }
    }
    out
}

/// `tcp_mem` bytes one stalled socket holds: its effective send buffer plus overhead.
pub fn stalled_socket_bytes(host: &HostSnapshot, socket_send_buffer_bytes: u64) -> u64 {
    let buffer = if socket_send_buffer_bytes == 0 {
        // Autotuning grows a stalled socket's buffer to tcp_wmem max (measured).
        host.tcp_wmem.map_or(4 << 20, |wmem| wmem[2])
    } else {
        // SO_SNDBUF is capped at wmem_max, then doubled by the kernel.
        2 * socket_send_buffer_bytes.min(host.wmem_max.unwrap_or(u64::MAX))
    };
    buffer + buffer / STALLED_OVERHEAD_DIVISOR
}

fn tcp_mem(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.ipv4.tcp_mem", section::TCP_MEMORY);
    let Some([low, pressure, high]) = host.tcp_mem_pages else {
        out.current = "absent".into();
        return out;
    };
    let page = host.page_size_bytes.max(1);
    let high_bytes = high * page;
    out.current = format!(
        "{low} {pressure} {high} pages (high {})",
        human_bytes(high_bytes)
    );
    let per_socket = stalled_socket_bytes(host, needs.socket_send_buffer_bytes);
    let all_stalled = needs.connections.saturating_mul(per_socket);
    out.needed = format!(
        "high >= {} pages for all {} stalled ({} each); idle sockets hold none",
        all_stalled.div_ceil(page),
        needs.connections,
        human_bytes(per_socket)
    );
    if all_stalled <= high_bytes {
        return out;
    }
    out.status = Status::Warn;
    let fit = high_bytes / per_socket.max(1);
    out.note = format!(
        "at most {fit} subscribers ({:.1} %) can stall at once before tcp_mem starves every \
         socket on the host; --write-stall-timeout bounds how long they hold it",
        fit as f64 * 100.0 / needs.connections.max(1) as f64
    );
    let mut fixes = Vec::new();
    // 1. A smaller send buffer that lets every subscriber stall within tcp_mem high.
    if let Some(buffer) = send_buffer_fitting(high_bytes, needs.connections) {
        fixes.push(format!(
            "plenum serve --socket-send-buffer-bytes {}KiB",
            buffer / 1024
        ));
    }
    // 2. A larger tcp_mem, sound only while it stays a modest share of memory.
    let quarter_of_memory = host.memory_total_bytes / 4;
    if host.memory_total_bytes > 0 && all_stalled <= quarter_of_memory {
        fixes.push(tcp_mem_command(all_stalled.div_ceil(page)));
    }
    // 3. Neither alone: tcp_mem at a quarter of memory and the smallest buffer.
    if fixes.is_empty() && host.memory_total_bytes > 0 {
        let pages = quarter_of_memory / page;
        let buffer = send_buffer_fitting(quarter_of_memory, needs.connections).unwrap_or(4096);
        let fit = quarter_of_memory / stalled_socket_bytes(host, buffer).max(1);
        fixes.push(format!(
            "{} && plenum serve --socket-send-buffer-bytes {}KiB",
            tcp_mem_command(pages),
            buffer / 1024
        ));
        out.note.push_str(&format!(
            "; with this fix {fit} ({:.1} %) can",
            fit as f64 * 100.0 / needs.connections.max(1) as f64
        ));
    }
    out.fix_command = fixes.join(" ; or ");
    out
}

/// The largest power-of-two `SO_SNDBUF`, at least 4 KiB, with which
/// `connections` stalled sockets fit in `budget_bytes` of `tcp_mem`.
fn send_buffer_fitting(budget_bytes: u64, connections: u64) -> Option<u64> {
    let per_socket = budget_bytes / connections.max(1);
    let buffer = per_socket * STALLED_OVERHEAD_DIVISOR / (STALLED_OVERHEAD_DIVISOR + 1) / 2;
    (buffer >= 4096).then(|| 1u64 << (63 - buffer.leading_zeros()))
}

/// `tcp_mem` with `high_pages` as high, pressure at 3/4 and low at 1/2 of it.
fn tcp_mem_command(high_pages: u64) -> String {
    format!(
        "sysctl -w net.ipv4.tcp_mem=\"{} {} {high_pages}\"",
        high_pages / 2,
        high_pages * 3 / 4
    )
}

fn tcp_wmem(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.ipv4.tcp_wmem", section::TCP_MEMORY);
    out.current = host
        .tcp_wmem
        .map_or_else(|| "absent".into(), |[a, b, c]| format!("{a} {b} {c}"));
    if needs.socket_send_buffer_bytes != 0 {
        out.needed = "not used: --socket-send-buffer-bytes fixes SO_SNDBUF".into();
        return out;
    }
    out.needed = "a cap on each socket's send buffer".into();
    out.status = Status::Warn;
    out.fix_command = "plenum serve --socket-send-buffer-bytes 128KiB".into();
    out.note = format!(
        "with autotuning a stalled subscriber holds up to tcp_wmem max ({}) of kernel memory",
        human_bytes(host.tcp_wmem.map_or(4 << 20, |wmem| wmem[2]))
    );
    out
}

fn wmem_max(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.core.wmem_max", section::TCP_MEMORY);
    out.current = show(host.wmem_max);
    out.needed = format!(
        ">= {} (--socket-send-buffer-bytes)",
        needs.socket_send_buffer_bytes
    );
    if host
        .wmem_max
        .is_some_and(|max| max < needs.socket_send_buffer_bytes)
    {
        out.status = Status::Warn;
        out.fix_command = format!(
            "sysctl -w net.core.wmem_max={}",
            needs.socket_send_buffer_bytes
        );
        out.note = "SO_SNDBUF is silently capped at wmem_max".into();
    }
    out
}

fn tcp_rmem(host: &HostSnapshot) -> Line {
    let mut out = line("net.ipv4.tcp_rmem", section::TCP_MEMORY);
    out.current = host
        .tcp_rmem
        .map_or_else(|| "absent".into(), |[a, b, c]| format!("{a} {b} {c}"));
    out.needed = "any: subscribers send almost nothing".into();
    out
}

fn conntrack(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.netfilter.nf_conntrack_max", section::CONNTRACK);
    let Some(max) = host.nf_conntrack_max else {
        out.current = "conntrack not loaded".into();
        out.needed = "nothing while conntrack is not loaded".into();
        return out;
    };
    let count = host.nf_conntrack_count.unwrap_or(0);
    out.current = format!("{max} ({count} tracked now)");
    let need = count + needs.connections + needs.connections / 10;
    out.needed = format!(">= {need} (tracked now + connections + 10 %)");
    if max < need {
        out.status = Status::Fix;
        out.fix_command = format!(
            "sysctl -w net.netfilter.nf_conntrack_max={}",
            suggested_limit(need)
        );
        out.note = "a full table drops new connections (\"nf_conntrack: table full\")".into();
    }
    out
}

fn netdev_backlog(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.core.netdev_max_backlog", section::INPUT_QUEUE);
    out.current = show(host.netdev_max_backlog);
    if needs.connections < 10_000 {
        out.needed = "any below 10,000 connections".into();
        return out;
    }
    out.needed = format!(">= {NETDEV_MAX_BACKLOG_SUGGESTED} for reconnect bursts");
    if host
        .netdev_max_backlog
        .is_some_and(|value| value < NETDEV_MAX_BACKLOG_SUGGESTED)
    {
        out.status = Status::Warn;
        out.fix_command =
            format!("sysctl -w net.core.netdev_max_backlog={NETDEV_MAX_BACKLOG_SUGGESTED}");
        out.note = "N clients reconnecting at once overflow the per-CPU input queue, loopback \
                    included (drops: /proc/net/softnet_stat column 2)"
            .into();
    }
    out
}

fn local_ports(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("net.ipv4.ip_local_port_range", section::PORTS);
    let Some((first, last)) = host.ip_local_port_range else {
        out.current = "absent".into();
        return out;
    };
    let ports = last.saturating_sub(first) + 1;
    out.current = format!("{first} {last} ({ports} ports)");
    out.needed = format!(
        "clients on this host: ports x source addresses >= {}",
        needs.connections
    );
    if ports < needs.connections {
        out.status = Status::Warn;
        let wide = 65_535 - 1_024 + 1;
        let addresses_now = needs.connections.div_ceil(ports.max(1));
        let addresses_wide = needs.connections.div_ceil(wide.max(ports));
        out.fix_command = "sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"".into();
        out.note = format!(
            "not a server limit: a load generator or proxy on this host needs \
             {addresses_now} source addresses ({addresses_wide} after the fix) to open {} \
             connections to one server address and port",
            needs.connections
        );
    }
    out
}

fn keepalive(host: &HostSnapshot) -> Line {
    let mut out = line("net.ipv4.tcp_keepalive_time", section::KEEPALIVE);
    out.current = show(host.tcp_keepalive_time_s);
    out.needed = "not used: Plenum sets keepalive and TCP_USER_TIMEOUT per socket".into();
    out
}

fn memory(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("memory (idle connections)", section::MEMORY);
    let kernel = needs.connections * KERNEL_BYTES_PER_IDLE_SOCKET;
    let user = needs.connections * USER_BYTES_PER_CONNECTION_TARGET;
    out.current = format!("MemTotal {}", human_bytes(host.memory_total_bytes));
    out.needed = format!(
        "{} kernel (measured {KERNEL_BYTES_PER_IDLE_SOCKET} B/socket) + {} Plenum (target 1 KiB)",
        human_bytes(kernel),
        human_bytes(user)
    );
    let total = kernel + user;
    if host.memory_total_bytes == 0 {
        return out;
    }
    if total > host.memory_total_bytes {
        out.status = Status::Fix;
        out.note = "more memory, or spread the subscribers over hosts".into();
    } else if total > host.memory_total_bytes / 2 {
        out.status = Status::Warn;
        out.note = "idle connections alone take over half the memory".into();
    }
    out
}

fn shards(host: &HostSnapshot, needs: &Needs) -> Line {
    let mut out = line("shards", section::SHARDS);
    out.current = format!("{} CPUs", host.cpus);
    out.needed = format!("{} shards (--shards)", needs.shards);
    if needs.backend == Backend::Epoll && needs.shards > host.cpus {
        out.note = "more shards than CPUs helps only io_uring (one table per ring)".into();
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::uring::probe::Capabilities;

    /// This project's machine: Linux 6.18, 2 CPUs, 24 GiB, a 20,000-file hard
    /// cap that even root cannot raise, io_uring enabled.
    pub(crate) fn this_machine() -> HostSnapshot {
        HostSnapshot {
            kernel_release: "6.18.44-fc-v669".into(),
            cpus: 2,
            memory_total_bytes: 24_684_084 * 1024,
            page_size_bytes: 4096,
            nofile_soft: 20_000,
            nofile_hard: 20_000,
            can_raise_nofile_hard: false,
            nr_open: Some(1_048_576),
            file_max: Some(2_466_170),
            files_open_now: Some(1_000),
            somaxconn: Some(4096),
            tcp_max_syn_backlog: Some(2048),
            tcp_syncookies: Some(1),
            ip_local_port_range: Some((32_768, 60_999)),
            tcp_mem_pages: Some([287_898, 383_867, 575_796]),
            tcp_rmem: Some([4096, 131_072, 33_554_432]),
            tcp_wmem: Some([4096, 16_384, 4_194_304]),
            wmem_max: Some(4_194_304),
            nf_conntrack_max: Some(262_144),
            nf_conntrack_count: Some(10),
            netdev_max_backlog: Some(1000),
            tcp_keepalive_time_s: Some(7200),
            io_uring_disabled: Some(0),
            uring: Some(Ok(Capabilities {
                files_per_ring_max: 20_000,
                socket_commands: true,
                single_issuer: true,
                kernel_release: "6.18.44-fc-v669".into(),
            })),
        }
    }

    fn needs(connections: u64, backend: Backend, shards: u64) -> Needs {
        Needs {
            connections,
            backend,
            shards,
            backlog: 4096,
            socket_send_buffer_bytes: 128 * 1024,
        }
    }

    struct Case {
        name: &'static str,
        host: fn(&mut HostSnapshot),
        needs: Needs,
        knob: &'static str,
        status: Status,
        blocking: bool,
        /// Text the fix command must contain ("" = no fix expected).
        fix_contains: &'static str,
    }

    fn unchanged(_: &mut HostSnapshot) {}

    #[test]
    fn table_of_hosts_and_needs() {
        let cases = [
            Case {
                name: "this machine, epoll, 100k: the 20,000 cap blocks; io_uring is the way out",
                host: unchanged,
                needs: needs(100_000, Backend::Epoll, 2),
                knob: "RLIMIT_NOFILE",
                status: Status::Fix,
                blocking: true,
                fix_contains: "plenum serve --backend uring --shards 6",
            },
            Case {
                name: "this machine, io_uring on 6 shards, 100k: each ring fits under 20,000",
                host: unchanged,
                needs: needs(100_000, Backend::Uring, 6),
                knob: "RLIMIT_NOFILE",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "this machine, io_uring on 5 shards: 21,314 slots per ring do not fit",
                host: unchanged,
                needs: needs(100_000, Backend::Uring, 5),
                knob: "RLIMIT_NOFILE",
                status: Status::Fix,
                blocking: true,
                fix_contains: "--shards 6",
            },
            Case {
                name: "this machine, io_uring on 2 shards, 1M: needs 54 shards",
                host: unchanged,
                needs: needs(1_000_000, Backend::Uring, 2),
                knob: "RLIMIT_NOFILE",
                status: Status::Fix,
                blocking: true,
                fix_contains: "--shards 54",
            },
            Case {
                name: "this machine, epoll, 19,744 connections fit exactly",
                host: unchanged,
                needs: needs(19_744, Backend::Epoll, 2),
                knob: "RLIMIT_NOFILE",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "this machine, epoll, 19,745 connections are one too many",
                host: unchanged,
                needs: needs(19_745, Backend::Epoll, 2),
                knob: "RLIMIT_NOFILE",
                status: Status::Fix,
                blocking: true,
                fix_contains: "ulimit -n 65536",
            },
            Case {
                name: "root host, soft 1024 hard 1M: fine, serve raises soft to hard",
                host: |h| {
                    h.nofile_soft = 1024;
                    h.nofile_hard = 1_048_576;
                    h.can_raise_nofile_hard = true;
                },
                needs: needs(100_000, Backend::Epoll, 2),
                knob: "RLIMIT_NOFILE",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "root host, hard 4096: ulimit first, io_uring as an alternative",
                host: |h| {
                    h.nofile_soft = 1024;
                    h.nofile_hard = 4096;
                    h.can_raise_nofile_hard = true;
                },
                needs: needs(100_000, Backend::Epoll, 2),
                knob: "RLIMIT_NOFILE",
                status: Status::Fix,
                blocking: true,
                fix_contains: "ulimit -n 131072 ; or LimitNOFILE=131072",
            },
            Case {
                name: "1M on epoll needs fs.nr_open raised first",
                host: |h| {
                    h.nofile_hard = 65_536;
                    h.can_raise_nofile_hard = true;
                    h.nr_open = Some(1_048_576);
                },
                needs: needs(1_048_576, Backend::Epoll, 2),
                knob: "fs.nr_open",
                status: Status::Fix,
                blocking: true,
                fix_contains: "sysctl -w fs.nr_open=2097152",
            },
            Case {
                name: "epoll with io_uring unavailable offers no io_uring alternative",
                host: |h| h.uring = Some(Err("io_uring_setup: EPERM".into())),
                needs: needs(100_000, Backend::Epoll, 2),
                knob: "RLIMIT_NOFILE",
                status: Status::Fix,
                blocking: true,
                fix_contains: "ulimit -n 131072",
            },
            Case {
                name: "io_uring disabled by sysctl blocks --backend uring",
                host: |h| {
                    h.io_uring_disabled = Some(2);
                    h.uring = Some(Err("io_uring_setup: EPERM".into()));
                },
                needs: needs(100_000, Backend::Uring, 6),
                knob: "io_uring",
                status: Status::Fix,
                blocking: true,
                fix_contains: "sysctl -w kernel.io_uring_disabled=0",
            },
            Case {
                name: "io_uring blocked by seccomp: only epoll helps",
                host: |h| h.uring = Some(Err("io_uring_setup: EPERM (seccomp)".into())),
                needs: needs(10_000, Backend::Uring, 2),
                knob: "io_uring",
                status: Status::Fix,
                blocking: true,
                fix_contains: "plenum serve --backend epoll",
            },
            Case {
                name: "io_uring unavailable does not matter to epoll",
                host: |h| h.uring = Some(Err("io_uring_setup: ENOSYS".into())),
                needs: needs(10_000, Backend::Epoll, 2),
                knob: "io_uring",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "no socket commands (before 6.7): a warning for uring",
                host: |h| {
                    if let Some(Ok(c)) = h.uring.as_mut() {
                        c.socket_commands = false;
                    }
                },
                needs: needs(10_000, Backend::Uring, 2),
                knob: "io_uring",
                status: Status::Warn,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "somaxconn below --backlog warns",
                host: |h| h.somaxconn = Some(128),
                needs: needs(10_000, Backend::Epoll, 2),
                knob: "net.core.somaxconn",
                status: Status::Warn,
                blocking: false,
                fix_contains: "sysctl -w net.core.somaxconn=4096",
            },
            Case {
                name: "syn backlog below --backlog is fine with syncookies",
                host: unchanged,
                needs: needs(10_000, Backend::Epoll, 2),
                knob: "net.ipv4.tcp_max_syn_backlog",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "syn backlog below --backlog warns without syncookies",
                host: |h| h.tcp_syncookies = Some(0),
                needs: needs(10_000, Backend::Epoll, 2),
                knob: "net.ipv4.tcp_max_syn_backlog",
                status: Status::Warn,
                blocking: false,
                fix_contains: "sysctl -w net.ipv4.tcp_max_syn_backlog=4096",
            },
            Case {
                name: "100k stalled at 128 KiB exceed tcp_mem high: smaller buffer suggested",
                host: unchanged,
                needs: needs(100_000, Backend::Uring, 6),
                knob: "net.ipv4.tcp_mem",
                status: Status::Warn,
                blocking: false,
                fix_contains: "--socket-send-buffer-bytes 8KiB",
            },
            Case {
                name: "1M stalled: tcp_mem at a quarter of memory and a 4 KiB buffer",
                host: |h| h.nf_conntrack_max = None,
                needs: needs(1_000_000, Backend::Uring, 54),
                knob: "net.ipv4.tcp_mem",
                status: Status::Warn,
                blocking: false,
                fix_contains: "\" && plenum serve --socket-send-buffer-bytes 4KiB",
            },
            Case {
                name: "5,000 stalled at 128 KiB fit in tcp_mem high",
                host: unchanged,
                needs: needs(5_000, Backend::Epoll, 2),
                knob: "net.ipv4.tcp_mem",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "autotuned send buffers warn on tcp_wmem",
                host: unchanged,
                needs: Needs {
                    socket_send_buffer_bytes: 0,
                    ..needs(1_000, Backend::Epoll, 2)
                },
                knob: "net.ipv4.tcp_wmem",
                status: Status::Warn,
                blocking: false,
                fix_contains: "--socket-send-buffer-bytes 128KiB",
            },
            Case {
                name: "a send buffer above wmem_max warns",
                host: |h| h.wmem_max = Some(212_992),
                needs: Needs {
                    socket_send_buffer_bytes: 1 << 20,
                    ..needs(1_000, Backend::Epoll, 2)
                },
                knob: "net.core.wmem_max",
                status: Status::Warn,
                blocking: false,
                fix_contains: "sysctl -w net.core.wmem_max=1048576",
            },
            Case {
                name: "conntrack too small blocks",
                host: |h| h.nf_conntrack_max = Some(65_536),
                needs: needs(100_000, Backend::Uring, 6),
                knob: "net.netfilter.nf_conntrack_max",
                status: Status::Fix,
                blocking: true,
                fix_contains: "sysctl -w net.netfilter.nf_conntrack_max=131072",
            },
            Case {
                name: "conntrack not loaded is fine",
                host: |h| {
                    h.nf_conntrack_max = None;
                    h.nf_conntrack_count = None;
                },
                needs: needs(100_000, Backend::Uring, 6),
                knob: "net.netfilter.nf_conntrack_max",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "file-max below N blocks",
                host: |h| h.file_max = Some(50_000),
                needs: needs(100_000, Backend::Uring, 6),
                knob: "fs.file-max",
                status: Status::Fix,
                blocking: true,
                fix_contains: "sysctl -w fs.file-max=262144",
            },
            Case {
                name: "netdev_max_backlog 1000 warns at 100k",
                host: unchanged,
                needs: needs(100_000, Backend::Uring, 6),
                knob: "net.core.netdev_max_backlog",
                status: Status::Warn,
                blocking: false,
                fix_contains: "sysctl -w net.core.netdev_max_backlog=16384",
            },
            Case {
                name: "28,232 ephemeral ports warn for 100k from one client address",
                host: unchanged,
                needs: needs(100_000, Backend::Uring, 6),
                knob: "net.ipv4.ip_local_port_range",
                status: Status::Warn,
                blocking: false,
                fix_contains: "ip_local_port_range=\"1024 65535\"",
            },
            Case {
                name: "1M idle connections fit in 24 GiB (conntrack unloaded)",
                host: |h| h.nf_conntrack_max = None,
                needs: needs(1_000_000, Backend::Uring, 56),
                knob: "memory (idle connections)",
                status: Status::Ok,
                blocking: false,
                fix_contains: "",
            },
            Case {
                name: "10M idle connections do not fit in 24 GiB",
                host: unchanged,
                needs: needs(10_000_000, Backend::Uring, 560),
                knob: "memory (idle connections)",
                status: Status::Fix,
                blocking: true,
                fix_contains: "",
            },
        ];
        for case in &cases {
            let mut host = this_machine();
            (case.host)(&mut host);
            let report = evaluate(&host, &case.needs);
            let line = report
                .lines
                .iter()
                .find(|line| line.knob == case.knob)
                .unwrap_or_else(|| panic!("{}: no line for {}", case.name, case.knob));
            assert_eq!(line.status, case.status, "{}: {line:?}", case.name);
            assert_eq!(report.blocking, case.blocking, "{}: {report:#?}", case.name);
            if case.fix_contains.is_empty() {
                assert!(
                    line.status != Status::Ok || line.fix_command.is_empty(),
                    "{}: {line:?}",
                    case.name
                );
            } else {
                assert!(
                    line.fix_command.contains(case.fix_contains),
                    "{}: fix {:?} lacks {:?}",
                    case.name,
                    line.fix_command,
                    case.fix_contains
                );
            }
        }
    }

    #[test]
    fn every_line_names_a_guide_section_and_fixes_have_commands() {
        let report = evaluate(&this_machine(), &needs(100_000, Backend::Epoll, 2));
        for line in &report.lines {
            assert!(section::ALL.contains(&line.guide_section), "{line:?}");
            if line.status == Status::Fix && line.knob != "memory (idle connections)" {
                assert!(!line.fix_command.is_empty(), "{line:?}");
            }
        }
    }

    #[test]
    fn shard_count_for_this_machine_is_six() {
        assert_eq!(shards_for(100_000, 20_000), Some(6));
        assert_eq!(shards_for(40_000, 20_000), Some(3));
        assert_eq!(shards_for(100_000, 64), None);
    }

    #[test]
    fn stalled_socket_arithmetic_matches_the_measurement() {
        let host = this_machine();
        // Measured on Linux 6.18: 266 KiB per stalled socket at SO_SNDBUF 128 KiB,
        // 4,101 KiB autotuned.
        let capped = stalled_socket_bytes(&host, 128 * 1024);
        assert!((260 * 1024..=275 * 1024).contains(&capped), "{capped}");
        let autotuned = stalled_socket_bytes(&host, 0);
        assert!(
            (4_000 * 1024..=4_300 * 1024).contains(&autotuned),
            "{autotuned}"
        );
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(272_629), "266 KiB");
        assert_eq!(human_bytes(575_796 * 4096), "2.2 GiB");
    }
}
