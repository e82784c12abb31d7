//! `plenum check-host`: will this host hold N connections, and if not, what to change.
//!
//! 1. Read the host once into a [`HostSnapshot`] (`/proc/sys`, `RLIMIT_NOFILE`,
//!    `/proc/meminfo`, the io_uring probe).
//! 2. Decide every knob with the pure [`rules::evaluate`] against [`Needs`]
//!    (connections, backend, shards, backlog, socket send buffer).
//! 3. Print one line per knob — current, needed, OK/WARN/FIX, the exact
//!    command — and exit 1 when any line is blocking (`FIX`).
//!
//! `plenum serve` runs the same rules at start through [`startup_warnings`]
//! and logs one warning per blocking knob, so a host that cannot hold
//! `--connections-max` is named at start instead of by `EMFILE` under load.
//! Every line points at its section of tuning/GUIDE.md.

pub mod rules;
pub mod snapshot;

use std::process::ExitCode;

pub use rules::{evaluate, Backend, Line, Needs, Report, Status};
pub use snapshot::HostSnapshot;

use crate::backend::uring::probe::files_per_ring_for;
use crate::config::ByteSize;

/// `plenum check-host` flags; names and defaults match `plenum serve`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Connections the server must hold (its `--connections-max`).
    #[arg(long, value_name = "N")]
    pub connections: u64,
    /// The I/O backend `plenum serve` will use.
    #[arg(long, value_enum, default_value = "epoll", value_name = "B")]
    pub backend: Backend,
    /// Shard threads; default: the CPUs this process may run on.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub shards: Option<u64>,
    /// Listen backlog per shard listener (`plenum serve --backlog`).
    #[arg(long, default_value_t = 4096, value_name = "B")]
    pub backlog: u64,
    /// `SO_SNDBUF` per socket (`B`, `KiB`, `MiB`, `GiB`); `0` = kernel autotuning.
    #[arg(long, default_value = "128KiB", value_name = "SIZE")]
    pub socket_send_buffer_bytes: ByteSize,
    /// Print the snapshot and the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the check: prints the report, exit code 1 when anything is blocking.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let needs = Needs {
        connections: args.connections,
        backend: args.backend,
        shards: args.shards.unwrap_or_else(available_parallelism),
        backlog: args.backlog,
        socket_send_buffer_bytes: args.socket_send_buffer_bytes.0,
    };
    // Probe io_uring for either backend: with epoll it tells whether io_uring
    // is a way around a low open-file limit.
    let host = HostSnapshot::read(Some(files_per_ring_for(needs.connections, needs.shards)));
    let report = evaluate(&host, &needs);
    if args.json {
        let document = serde_json::json!({ "needs": needs, "host": host, "report": report });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print!("{}", render(&host, &needs, &report));
    }
    Ok(if report.blocking {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The text report: a header, one line per knob, a verdict.
pub fn render(host: &HostSnapshot, needs: &Needs, report: &Report) -> String {
    use std::fmt::Write;

    let mut text = String::new();
    let _ = writeln!(
        text,
        "plenum check-host: {} connections, backend {}, {} shards, backlog {}, socket send \
         buffer {} B (kernel {}, {} CPUs, {} memory)",
        needs.connections,
        backend_name(needs.backend),
        needs.shards,
        needs.backlog,
        needs.socket_send_buffer_bytes,
        host.kernel_release,
        host.cpus,
        rules::human_bytes(host.memory_total_bytes),
    );
    for line in &report.lines {
        let _ = write!(
            text,
            "{:<4} {:<30} current: {} | needed: {}",
            line.status.label(),
            line.knob,
            line.current,
            line.needed
        );
        if !line.fix_command.is_empty() {
            let _ = write!(text, " | fix: {}", line.fix_command);
        }
        if !line.note.is_empty() {
            let _ = write!(text, " | {}", line.note);
        }
        if line.status != Status::Ok {
            let _ = write!(text, " | see tuning/GUIDE.md#{}", line.guide_section);
        }
        text.push('\n');
    }
    let blocking: Vec<&str> = report.blocking_lines().map(|line| line.knob).collect();
    if blocking.is_empty() {
        let _ = writeln!(
            text,
            "result: nothing blocks {} connections",
            needs.connections
        );
    } else {
        let _ = writeln!(
            text,
            "result: BLOCKED by {} for {} connections",
            blocking.join(", "),
            needs.connections
        );
    }
    text
}

/// The checks `plenum serve` runs at start: one warning per blocking knob,
/// each naming the knob, the values, the fix and the guide section.
/// `backend` is `epoll`, `uring` or `auto` (treated as io_uring when the
/// probe succeeds, else epoll).
pub fn startup_warnings(
    connections_max: u64,
    backend: &str,
    shards: usize,
    backlog: u32,
    socket_send_buffer_bytes: u64,
) -> Vec<String> {
    let shards = (shards as u64).max(1);
    let probe = match backend {
        "epoll" => None,
        _ => Some(files_per_ring_for(connections_max, shards)),
    };
    let host = HostSnapshot::read(probe);
    let backend = match backend {
        "epoll" => Backend::Epoll,
        "uring" => Backend::Uring,
        _ if matches!(host.uring, Some(Ok(_))) => Backend::Uring,
        _ => Backend::Epoll,
    };
    let needs = Needs {
        connections: connections_max,
        backend,
        shards,
        backlog: u64::from(backlog),
        socket_send_buffer_bytes,
    };
    evaluate(&host, &needs)
        .blocking_lines()
        .map(|line| {
            let mut warning = format!(
                "{} cannot hold --connections-max {connections_max}: current {}, needed {}",
                line.knob, line.current, line.needed
            );
            if !line.fix_command.is_empty() {
                warning.push_str(&format!("; fix: {}", line.fix_command));
            }
            warning.push_str(&format!("; see tuning/GUIDE.md#{}", line.guide_section));
            warning
        })
        .collect()
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Epoll => "epoll",
        Backend::Uring => "uring",
    }
}

fn available_parallelism() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_report_names_the_blocker_and_its_section() {
        let host = rules::tests::this_machine();
        let needs = Needs {
            connections: 100_000,
            backend: Backend::Epoll,
            shards: 2,
            backlog: 4096,
            socket_send_buffer_bytes: 131_072,
        };
        let text = render(&host, &needs, &evaluate(&host, &needs));
        assert!(text.contains("FIX  RLIMIT_NOFILE"), "{text}");
        assert!(
            text.contains("see tuning/GUIDE.md#open-file-limits"),
            "{text}"
        );
        assert!(text.contains("result: BLOCKED by RLIMIT_NOFILE"), "{text}");
    }
}
