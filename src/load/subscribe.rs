//! `plenum load subscribe`: N event streams, spread over processes.
//!
//! The parent process plans and reports; child processes (this binary re-run
//! as the hidden `load subscribe-child PLAN_JSON`) hold the connections:
//!
//! 1. The parent splits N connections over P children (default
//!    ⌈N / 18,000⌉, so each stays under the 20,000 open files a process may
//!    have here), gives each a contiguous range of global slot numbers, an
//!    equal share of the connect rate, and one absolute deadline.
//! 2. Each child raises its soft `RLIMIT_NOFILE` to the hard limit and runs
//!    one thread: an edge-triggered epoll loop over a slab of slots. Slot `g`
//!    (global number) connects to URL `g mod U` from source address `g mod S`,
//!    so round-robin is global across children.
//! 3. Per slot: non-blocking connect (after `IP_BIND_ADDRESS_NO_PORT` + bind
//!    when source addresses are given) → write the GET → parse the response
//!    head with httparse → decode the body (plain, Content-Length or chunked)
//!    → SSE parser → [`TrackerSink`] (sequence checks, latency).
//! 4. A stream the server ends is reopened with `Last-Event-ID` when
//!    `--reconnect` is given, after the server's `retry:` hint (or
//!    `--reconnect-delay`); the slot's tracker survives, so sequences are
//!    checked across the reconnect.
//! 5. At the deadline (or when every slot has `--expect-events` events, or
//!    on SIGINT/SIGTERM) the child closes everything and prints one JSON line
//!    ([`ChildReport`]) on stdout; the parent merges them, adds its own
//!    samples of `--server-pid`, prints a summary, writes `--json`/`--svg`.
//!    A child that has not reported 15 s after the deadline is killed and
//!    counted as lost (a failed check), so the run is bounded either way.
//!
//! Memory per slot is the slot struct (a few hundred bytes) plus a carry-over
//! for an unfinished line; reads go into one scratch buffer per process.
//! Timers are queues, not per-slot objects: handshake deadlines are a FIFO
//! (one timeout for all, so they expire in order) and reopen times a heap.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::http::{self, Body, HttpUrl};
use super::report::{
    decode_histogram, encode_histogram, merge_histogram, thousands, write_json, Percentiles,
};
use super::sse::SseParser;
use super::sys::{self, flags, CpuTime, Epoll};
use super::track::{latency_histogram, EventStats, StreamTracker, TrackerSink};
use super::watch::{self, ProcSample, SampleSummary};

/// Connections one child process holds at most by default (under the
/// 20,000 open files per process here, with room for the process's own).
pub const CONNECTIONS_PER_PROCESS_DEFAULT: u64 = 18_000;

/// Descriptors a child keeps free beyond its connections.
const FDS_SPARE: u64 = 64;

/// Bytes of the per-process read buffer.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Reads from one socket per loop turn before others get a turn.
const READS_PER_TURN_MAX: usize = 16;

/// Connection attempts started per loop turn, at most.
const OPENS_PER_TURN_MAX: usize = 512;

/// epoll events handled per wait.
const READY_EVENTS_MAX: usize = 1024;

/// Longest epoll wait, so signals and deadlines are seen promptly.
const WAIT_MAX: Duration = Duration::from_millis(100);

/// Delay before reopening a slot whose attempt failed (not a server close).
const RETRY_AFTER_FAILURE_MIN: Duration = Duration::from_millis(100);

/// Time the parent gives children past the deadline to report.
const CHILD_REPORT_GRACE: Duration = Duration::from_secs(15);

/// Bytes of a child's report the parent reads, at most.
const CHILD_REPORT_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// `plenum load subscribe`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubscribeArgs {
    /// Event stream URL, e.g. http://127.0.0.1:8080/events?topic=a (http only;
    /// host an IP literal or localhost). Repeatable: connections round-robin.
    #[arg(long = "url", value_name = "URL", required = true, value_parser = super::parse_url)]
    pub urls: Vec<HttpUrl>,
    /// Connections to hold.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: u64,
    /// Child processes to spread them over [default: ⌈connections / 18000⌉].
    #[arg(long, value_name = "P")]
    pub processes: Option<u64>,
    /// Source addresses, round-robin: a list and/or inclusive IPv4 ranges,
    /// e.g. 127.0.0.2-127.0.0.20 (bound with IP_BIND_ADDRESS_NO_PORT).
    #[arg(long, value_name = "LIST", value_parser = super::parse_source_ips)]
    pub source_ips: Option<IpList>,
    /// New connections per second, over all processes, reconnects included
    /// (0 = no limit).
    #[arg(long, value_name = "PER_SEC", default_value_t = 10_000.0)]
    pub connect_rate: f64,
    /// Time from connect() to a complete response head before a connection
    /// counts as failed (timeout).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = super::parse_duration)]
    pub connect_timeout: Duration,
    /// Hard bound on the whole run.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = super::parse_duration)]
    pub duration: Duration,
    /// Stop early once every connection has received this many events.
    #[arg(long, value_name = "N")]
    pub expect_events: Option<u64>,
    /// Reopen streams the server ends (and failed attempts), sending
    /// Last-Event-ID, as a browser's EventSource does.
    #[arg(long)]
    pub reconnect: bool,
    /// Reconnect delay when the server sent no `retry:` hint.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = super::parse_duration)]
    pub reconnect_delay: Duration,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart (latency percentiles, server RSS over time).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Sample this process's RSS, fds, threads and CPU during the run.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Time between server samples.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = super::parse_duration)]
    pub sample_interval: Duration,
    /// Length of the latency windows in the report and chart.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = super::parse_duration)]
    pub window: Duration,
    /// Each child prints a progress line to stderr this often (0 = never).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = super::parse_duration)]
    pub progress_interval: Duration,
}

/// A list of addresses (an alias, so clap takes it as one value, not many).
pub type IpList = Vec<IpAddr>;

/// What one child process does (sent as JSON on its command line).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChildPlan {
    pub child_index: u64,
    pub urls: Vec<HttpUrl>,
    /// Global number of this child's first slot.
    pub slot_base: u64,
    /// Slots (connections) this child holds.
    pub slot_count: u64,
    pub source_ips: Vec<IpAddr>,
    /// This child's share of the connect rate (0 = no limit).
    pub connect_rate_per_s: f64,
    pub connect_timeout_ms: u64,
    /// The run ends at this Unix time.
    pub deadline_unix_ms: u64,
    /// Latency windows count from this Unix time.
    pub run_start_unix_ns: u64,
    pub window_ns: u64,
    pub expect_events: Option<u64>,
    pub reconnect: bool,
    pub reconnect_delay_ms: u64,
    pub progress_interval_ms: u64,
}

/// What one child reports (one JSON line on its stdout).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    pub child_index: u64,
    pub connections: u64,
    /// Slots that opened a stream at least once.
    pub connected: u64,
    /// Streams open when the child stopped.
    pub open_at_end: u64,
    pub connect_attempts: u64,
    pub streams_opened: u64,
    /// Failed attempts by reason.
    pub failed: BTreeMap<String, u64>,
    /// Open streams the server ended cleanly (FIN, or end of body).
    pub closed_by_server: u64,
    /// Open streams that ended with an error (RST, ...).
    pub reset_by_server: u64,
    /// Streams abandoned because the body was not valid (bad chunking, line too long).
    pub stream_errors: BTreeMap<String, u64>,
    /// Streams reopened after the server ended them.
    pub reconnects: u64,
    /// Attempts retried after a failed attempt.
    pub retries: u64,
    pub events: u64,
    pub events_sequenced: u64,
    pub gaps: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub gap_signals: u64,
    pub missing_signalled: u64,
    pub latency_negative: u64,
    pub events_per_connection_min: u64,
    pub events_per_connection_max: u64,
    /// Slots that reached `--expect-events`.
    pub connections_reached_expected: u64,
    pub bytes_received: u64,
    /// Publish-to-receive latency, µs (base64 V2 histogram).
    pub latency_us: String,
    /// connect() to complete 200 response head, µs (base64 V2 histogram).
    pub connect_us: String,
    /// Latency windows: (index, base64 V2 histogram).
    pub windows: Vec<(u64, String)>,
    pub cpu: CpuTime,
    pub elapsed_s: f64,
    /// Why the child stopped: duration, expect_events, all_finished, signal.
    pub stopped_by: String,
}

/// Runs `plenum load subscribe` (the parent).
pub fn run(args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    let plans = plan(&args, sys::unix_now_ns())?;
    // Children inherit the raised limit; check it here so a wrong split fails
    // before any connection is made, with the fix in the message.
    let nofile = sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let per_child_max = plans.iter().map(|plan| plan.slot_count).max().unwrap_or(0);
    if per_child_max + FDS_SPARE > nofile {
        let usable = nofile.saturating_sub(FDS_SPARE).max(1);
        bail!(
            "{per_child_max} connections per process, but a process may open only {nofile} files: use --processes {} or more",
            args.connections.div_ceil(usable)
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    let exe = std::env::current_exe().context("finding this executable to re-run as children")?;
    let started = Instant::now();
    let deadline = started + args.duration;
    eprintln!(
        "subscribe: {} connections over {} process(es) to {} URL(s), for at most {:?}",
        thousands(args.connections),
        plans.len(),
        args.urls.len(),
        args.duration
    );
    let mut children = Vec::new();
    for plan in &plans {
        let json = serde_json::to_string(plan)?;
        let mut child = Command::new(&exe)
            .args(["load", "subscribe-child", &json])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting child process {}", plan.child_index))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout
                .take(CHILD_REPORT_BYTES_MAX)
                .read_to_string(&mut text);
            text
        });
        children.push((child, reader));
    }

    // Wait for the children, sampling the server meanwhile (bounded by the deadline + grace).
    let mut samples: Vec<ProcSample> = Vec::new();
    let mut next_sample = started;
    let mut running: Vec<bool> = vec![true; children.len()];
    let mut forwarded_stop = false;
    loop {
        let now = Instant::now();
        if let Some(pid) = args.server_pid {
            if now >= next_sample && now < deadline {
                if let Some(sample) = watch::sample(pid, now.duration_since(started).as_secs_f64())
                {
                    samples.push(sample);
                }
                // Paced by the clock; a slow sample skips ahead rather than bursting.
                next_sample += args.sample_interval.max(Duration::from_millis(10));
                if next_sample < now {
                    next_sample = now + args.sample_interval;
                }
            }
        }
        for ((child, _), is_running) in children.iter_mut().zip(running.iter_mut()) {
            if *is_running && child.try_wait()?.is_some() {
                *is_running = false;
            }
        }
        if !running.iter().any(|&r| r) {
            break;
        }
        if stop.load(Ordering::Relaxed) && !forwarded_stop {
            forwarded_stop = true;
            for ((child, _), &is_running) in children.iter().zip(&running) {
                if is_running {
                    terminate(child);
                }
            }
        }
        if now >= deadline + CHILD_REPORT_GRACE {
            for ((child, _), &is_running) in children.iter_mut().zip(&running) {
                if is_running {
                    eprintln!(
                        "subscribe: child {} did not report in time; killing it",
                        child.id()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(pid) = args.server_pid {
        if let Some(sample) = watch::sample(pid, started.elapsed().as_secs_f64()) {
            samples.push(sample);
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();

    let mut reports = Vec::new();
    let mut children_lost = 0;
    for (index, (mut child, reader)) in children.into_iter().enumerate() {
        let status = child.wait()?;
        let text = reader.join().unwrap_or_default();
        match text.lines().rev().find(|line| line.starts_with('{')) {
            Some(line) => reports.push(
                serde_json::from_str::<ChildReport>(line)
                    .with_context(|| format!("child {index}'s report"))?,
            ),
            None => {
                eprintln!("subscribe: child {index} exited ({status}) without a report");
                children_lost += 1;
            }
        }
    }
    let cpu = sys::cpu_time_self_and_children();
    let report = merge(
        &args,
        plans.len() as u64,
        &reports,
        children_lost,
        cpu,
        elapsed_s,
        samples,
    )?;
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.svg {
        super::chart::write_chart(path, &report.windows, &report.server_samples)?;
    }
    Ok(if report.checks.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Asks a child to stop and report (SIGTERM to our own child, by pid).
fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill takes no pointers; `pid` is a child we started and have
        // not yet reaped, so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Splits the run into child plans.
pub fn plan(args: &SubscribeArgs, now_unix_ns: u64) -> anyhow::Result<Vec<ChildPlan>> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if !(args.connect_rate >= 0.0 && args.connect_rate.is_finite()) {
        bail!("--connect-rate must be a number ≥ 0");
    }
    if args.window.is_zero() {
        bail!("--window must be above 0");
    }
    let processes = args
        .processes
        .unwrap_or_else(|| args.connections.div_ceil(CONNECTIONS_PER_PROCESS_DEFAULT))
        .max(1);
    if processes > args.connections {
        bail!(
            "--processes ({processes}) is more than --connections ({})",
            args.connections
        );
    }
    if processes > 1024 {
        bail!("--processes above 1024 is surely a mistake");
    }
    let source_ips = args.source_ips.clone().unwrap_or_default();
    for url in &args.urls {
        if let Some(ip) = source_ips
            .iter()
            .find(|ip| ip.is_ipv4() != url.address.is_ipv4())
        {
            bail!("source address {ip} is not of the same family as {url}");
        }
    }
    let deadline_unix_ms = now_unix_ns / 1_000_000 + args.duration.as_millis() as u64;
    let mut plans = Vec::new();
    let mut slot_base = 0;
    for child_index in 0..processes {
        let slot_count =
            args.connections / processes + u64::from(child_index < args.connections % processes);
        plans.push(ChildPlan {
            child_index,
            urls: args.urls.clone(),
            slot_base,
            slot_count,
            source_ips: source_ips.clone(),
            connect_rate_per_s: args.connect_rate / processes as f64,
            connect_timeout_ms: args.connect_timeout.as_millis() as u64,
            deadline_unix_ms,
            run_start_unix_ns: now_unix_ns,
            window_ns: args.window.as_nanos() as u64,
            expect_events: args.expect_events,
            reconnect: args.reconnect,
            reconnect_delay_ms: args.reconnect_delay.as_millis() as u64,
            progress_interval_ms: args.progress_interval.as_millis() as u64,
        });
        slot_base += slot_count;
    }
    assert_eq!(slot_base, args.connections);
    Ok(plans)
}

/// The parent's report.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SubscribeReport {
    pub command: String,
    pub urls: Vec<String>,
    pub processes: u64,
    pub source_ips: usize,
    pub connect_rate_per_s: f64,
    pub duration_s: f64,
    pub expect_events: Option<u64>,
    pub reconnect: bool,
    pub elapsed_s: f64,
    pub connections: u64,
    pub connected: u64,
    pub open_at_end: u64,
    pub connect_attempts: u64,
    pub failed_total: u64,
    pub failed: BTreeMap<String, u64>,
    pub closed_by_server: u64,
    pub reset_by_server: u64,
    pub stream_errors: BTreeMap<String, u64>,
    pub reconnects: u64,
    pub retries: u64,
    pub events_received: u64,
    pub events_sequenced: u64,
    pub events_per_connection_min: u64,
    pub events_per_connection_max: u64,
    pub connections_reached_expected: u64,
    pub gaps: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub gap_signals: u64,
    pub missing_signalled: u64,
    pub latency_negative: u64,
    pub bytes_received: u64,
    pub latency: Percentiles,
    pub connect_time: Percentiles,
    /// This tool's CPU time (all processes).
    pub client_cpu: CpuTime,
    pub client_cpu_s: f64,
    pub client_cpu_us_per_event: f64,
    pub server_pid: Option<u32>,
    pub server: Option<ServerSummary>,
    pub server_samples: Vec<ProcSample>,
    pub windows: Vec<Window>,
    pub children_lost: u64,
    pub stopped_by: Vec<String>,
    pub checks: Checks,
}

/// The server's resources during the run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ServerSummary {
    #[serde(flatten)]
    pub samples: SampleSummary,
    /// Growth of RSS over the run divided by the connections open at the end.
    pub rss_bytes_per_connection: f64,
    /// Server CPU time per received event, µs.
    pub cpu_us_per_event: f64,
}

/// Latency of one window of the run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Window start, seconds since the run started.
    pub t_s: f64,
    #[serde(flatten)]
    pub latency: Percentiles,
}

/// The pass/fail checks behind the exit code.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Checks {
    pub passed: bool,
    pub failures: Vec<String>,
}

/// Merges child reports into the parent's report.
pub fn merge(
    args: &SubscribeArgs,
    processes: u64,
    reports: &[ChildReport],
    children_lost: u64,
    cpu: CpuTime,
    elapsed_s: f64,
    server_samples: Vec<ProcSample>,
) -> anyhow::Result<SubscribeReport> {
    let mut out = SubscribeReport {
        command: "subscribe".to_owned(),
        urls: args.urls.iter().map(ToString::to_string).collect(),
        processes,
        source_ips: args.source_ips.as_ref().map_or(0, Vec::len),
        connect_rate_per_s: args.connect_rate,
        duration_s: args.duration.as_secs_f64(),
        expect_events: args.expect_events,
        reconnect: args.reconnect,
        elapsed_s,
        connections: args.connections,
        children_lost,
        server_pid: args.server_pid,
        events_per_connection_min: u64::MAX,
        ..SubscribeReport::default()
    };
    let mut latency = latency_histogram();
    let mut connect = latency_histogram();
    let mut windows: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    for report in reports {
        out.connected += report.connected;
        out.open_at_end += report.open_at_end;
        out.connect_attempts += report.connect_attempts;
        for (reason, count) in &report.failed {
            *out.failed.entry(reason.clone()).or_default() += count;
        }
        for (reason, count) in &report.stream_errors {
            *out.stream_errors.entry(reason.clone()).or_default() += count;
        }
        out.closed_by_server += report.closed_by_server;
        out.reset_by_server += report.reset_by_server;
        out.reconnects += report.reconnects;
        out.retries += report.retries;
        out.events_received += report.events;
        out.events_sequenced += report.events_sequenced;
        out.gaps += report.gaps;
        out.missing += report.missing;
        out.duplicates += report.duplicates;
        out.gap_signals += report.gap_signals;
        out.missing_signalled += report.missing_signalled;
        out.latency_negative += report.latency_negative;
        out.bytes_received += report.bytes_received;
        out.connections_reached_expected += report.connections_reached_expected;
        out.events_per_connection_min = out
            .events_per_connection_min
            .min(report.events_per_connection_min);
        out.events_per_connection_max = out
            .events_per_connection_max
            .max(report.events_per_connection_max);
        merge_histogram(&mut latency, &decode_histogram(&report.latency_us)?)?;
        merge_histogram(&mut connect, &decode_histogram(&report.connect_us)?)?;
        for (index, encoded) in &report.windows {
            let histogram = decode_histogram(encoded)?;
            match windows.get_mut(index) {
                Some(existing) => merge_histogram(existing, &histogram)?,
                None => {
                    windows.insert(*index, histogram);
                }
            }
        }
        out.stopped_by.push(report.stopped_by.clone());
    }
    if reports.is_empty() {
        out.events_per_connection_min = 0;
    }
    out.failed_total = out.failed.values().sum();
    out.latency = Percentiles::from_us(&latency);
    out.connect_time = Percentiles::from_us(&connect);
    let window_s = args.window.as_secs_f64();
    out.windows = windows
        .iter()
        .map(|(index, histogram)| Window {
            t_s: *index as f64 * window_s,
            latency: Percentiles::from_us(histogram),
        })
        .collect();
    out.client_cpu = cpu;
    out.client_cpu_s = cpu.total_s();
    if out.events_received > 0 {
        out.client_cpu_us_per_event = 1e6 * out.client_cpu_s / out.events_received as f64;
    }
    if !server_samples.is_empty() {
        let samples = watch::summarize(&server_samples);
        let rss_growth = samples
            .rss_bytes_max
            .saturating_sub(samples.rss_bytes_first) as f64;
        out.server = Some(ServerSummary {
            rss_bytes_per_connection: if out.open_at_end > 0 {
                rss_growth / out.open_at_end as f64
            } else {
                0.0
            },
            cpu_us_per_event: if out.events_received > 0 {
                1e6 * samples.cpu_s / out.events_received as f64
            } else {
                0.0
            },
            samples,
        });
    }
    out.server_samples = server_samples;
    out.checks = checks(&out);
    Ok(out)
}

/// The run passes when every connection connected, nothing failed or broke,
/// no event was missing or duplicated, and `--expect-events` was met.
fn checks(report: &SubscribeReport) -> Checks {
    let mut failures = Vec::new();
    if report.connected < report.connections {
        failures.push(format!(
            "{} of {} connections never connected",
            report.connections - report.connected,
            report.connections
        ));
    }
    if report.failed_total > 0 {
        failures.push(format!(
            "{} connection attempts failed",
            report.failed_total
        ));
    }
    if !report.stream_errors.is_empty() {
        failures.push(format!("stream errors: {:?}", report.stream_errors));
    }
    if report.gaps > 0 {
        failures.push(format!(
            "{} gaps ({} events missing)",
            report.gaps, report.missing
        ));
    }
    if report.duplicates > 0 {
        failures.push(format!("{} duplicates", report.duplicates));
    }
    if report.children_lost > 0 {
        failures.push(format!(
            "{} child processes did not report",
            report.children_lost
        ));
    }
    if let Some(expected) = report.expect_events {
        if report.connections_reached_expected < report.connections {
            failures.push(format!(
                "{} of {} connections received fewer than {expected} events",
                report.connections - report.connections_reached_expected,
                report.connections
            ));
        }
    }
    Checks {
        passed: failures.is_empty(),
        failures,
    }
}

impl SubscribeReport {
    /// The human summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== plenum load subscribe: {} over {:.1} s",
            self.urls.join(" "),
            self.elapsed_s
        );
        let _ = writeln!(
            out,
            "connections   {} connected of {} ({} open at end) over {} process(es); stopped by {}",
            thousands(self.connected),
            thousands(self.connections),
            thousands(self.open_at_end),
            self.processes,
            dedup(&self.stopped_by)
        );
        let _ = writeln!(
            out,
            "attempts      {} ({} failed{}), {} reconnects, {} retries",
            thousands(self.connect_attempts),
            thousands(self.failed_total),
            if self.failed.is_empty() {
                String::new()
            } else {
                format!(": {}", reasons(&self.failed))
            },
            thousands(self.reconnects),
            thousands(self.retries)
        );
        let _ = writeln!(
            out,
            "server ended  {} cleanly, {} with an error{}",
            thousands(self.closed_by_server),
            thousands(self.reset_by_server),
            if self.stream_errors.is_empty() {
                String::new()
            } else {
                format!("; stream errors: {}", reasons(&self.stream_errors))
            }
        );
        let _ = writeln!(
            out,
            "events        {} received ({} sequenced; per connection min {} max {}), {} bytes",
            thousands(self.events_received),
            thousands(self.events_sequenced),
            thousands(self.events_per_connection_min),
            thousands(self.events_per_connection_max),
            thousands(self.bytes_received),
        );
        let _ = writeln!(
            out,
            "sequence      {} gaps ({} missing), {} duplicates, {} gap signals ({} skipped after them)",
            thousands(self.gaps),
            thousands(self.missing),
            thousands(self.duplicates),
            thousands(self.gap_signals),
            thousands(self.missing_signalled)
        );
        let _ = writeln!(out, "latency       {}", self.latency.line());
        let _ = writeln!(out, "connect time  {}", self.connect_time.line());
        let _ = writeln!(
            out,
            "client CPU    {:.2} s (user {:.2}, system {:.2}) = {:.2} µs per event",
            self.client_cpu_s,
            self.client_cpu.user_s,
            self.client_cpu.system_s,
            self.client_cpu_us_per_event
        );
        if let Some(server) = &self.server {
            let _ = writeln!(
                out,
                "server        RSS {} KiB → max {} KiB ({:.0} B per open connection), fds max {}, threads {}, CPU {:.2} s ({:.1}% of a core, {:.2} µs per event)",
                thousands(server.samples.rss_bytes_first / 1024),
                thousands(server.samples.rss_bytes_max / 1024),
                server.rss_bytes_per_connection,
                thousands(server.samples.fds_max),
                server.samples.threads_max,
                server.samples.cpu_s,
                server.samples.cpu_percent,
                server.cpu_us_per_event
            );
        }
        if self.checks.passed {
            let _ = writeln!(out, "checks        passed");
        } else {
            let _ = writeln!(
                out,
                "checks        FAILED: {}",
                self.checks.failures.join("; ")
            );
        }
        out
    }
}

fn reasons(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(reason, count)| format!("{reason} {}", thousands(*count)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn dedup(items: &[String]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
        .iter()
        .map(|(item, count)| format!("{item} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// The child: one thread, one epoll instance, a slab of slots.
// ---------------------------------------------------------------------------

/// Where a slot's connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No socket: waiting to be opened (first time or again).
    Idle,
    /// Non-blocking connect() in progress: waiting for writability.
    Connecting,
    /// Connected; writing the request (`Slot::written` bytes so far).
    Requesting,
    /// Request sent; reading the response head.
    Head,
    /// Reading the event stream.
    Streaming,
    /// Finished for good: the slot is never opened again.
    Done,
}

/// Why a slot is waiting to be opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reopen {
    /// Never opened.
    First,
    /// The server ended its stream.
    AfterServerClose,
    /// An attempt failed.
    AfterFailure,
}

/// One connection slot; it survives reconnects.
struct Slot {
    socket: Option<Socket>,
    /// Bumped whenever the socket changes, so stale epoll events are dropped.
    generation: u32,
    phase: Phase,
    reopen: Reopen,
    /// Request bytes written so far (Requesting).
    written: u32,
    /// When the current attempt started (ns since the child started).
    attempt_started_ns: u64,
    ever_connected: bool,
    /// Counted in the child's `finished` count.
    finished: bool,
    /// Response head bytes, only when the head spans reads.
    head: Vec<u8>,
    body: Body,
    parser: SseParser,
    tracker: StreamTracker,
}

impl Slot {
    fn new() -> Self {
        Slot {
            socket: None,
            generation: 0,
            phase: Phase::Idle,
            reopen: Reopen::First,
            written: 0,
            attempt_started_ns: 0,
            ever_connected: false,
            finished: false,
            head: Vec::new(),
            body: Body::UntilClose,
            parser: SseParser::default(),
            tracker: StreamTracker::default(),
        }
    }
}

// Per-connection memory stays "a few hundred bytes" (264 on x86-64 today),
// plus a carry-over only while a line is split across reads.
const _: () = assert!(std::mem::size_of::<Slot>() <= 320);

/// Why an attempt failed, named from the errno.
fn failure_reason(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".to_owned(),
        Some(libc::ETIMEDOUT) => "timeout".to_owned(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) | Some(libc::ECONNABORTED) => "reset".to_owned(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => "address_unavailable".to_owned(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "fd_limit".to_owned(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable".to_owned(),
        Some(errno) => format!("errno_{errno}"),
        None => "other".to_owned(),
    }
}

/// The state of one child process.
struct Worker {
    plan: ChildPlan,
    epoll: Epoll,
    slots: Vec<Slot>,
    started: Instant,
    stats: EventStats,
    connect_us: Histogram<u64>,
    report: ChildReport,
    /// Next never-opened slot.
    next_first_open: usize,
    /// Slots to reopen: (when, slot, generation).
    reopen_heap: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    /// Handshake deadlines in order: (when, slot, generation).
    handshake_deadlines: VecDeque<(Instant, usize, u32)>,
    /// Slots whose reads were cut short this turn (edge-triggered: revisit).
    revisit: Vec<(usize, u32)>,
    /// Earliest time the next attempt may start (connect rate).
    next_connect_at: Instant,
    /// Slots finished (reached the expected events, or done for good).
    finished: u64,
    open: u64,
    scratch: Vec<u8>,
    request: Vec<u8>,
}

/// Runs one child process from its JSON plan; prints its report on stdout.
pub fn run_child(plan_json: &str) -> anyhow::Result<ExitCode> {
    let plan: ChildPlan = serde_json::from_str(plan_json).context("parsing the child plan")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let nofile = sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    if plan.slot_count + FDS_SPARE > nofile {
        bail!(
            "child {} needs {} connections but may open only {nofile} files: use more --processes (or raise the hard RLIMIT_NOFILE)",
            plan.child_index,
            plan.slot_count
        );
    }
    let mut child = Worker::new(plan)?;
    let stopped_by = child.run(&stop)?;
    let report = child.finish(stopped_by);
    let mut stdout = io::stdout().lock();
    serde_json::to_writer(&mut stdout, &report)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

impl Worker {
    fn new(plan: ChildPlan) -> anyhow::Result<Self> {
        let started = Instant::now();
        let slots = (0..plan.slot_count).map(|_| Slot::new()).collect();
        Ok(Worker {
            epoll: Epoll::new().context("creating an epoll instance")?,
            slots,
            started,
            stats: EventStats::new(plan.run_start_unix_ns, plan.window_ns),
            connect_us: latency_histogram(),
            report: ChildReport {
                child_index: plan.child_index,
                connections: plan.slot_count,
                ..ChildReport::default()
            },
            next_first_open: 0,
            reopen_heap: BinaryHeap::new(),
            handshake_deadlines: VecDeque::new(),
            revisit: Vec::new(),
            next_connect_at: started,
            finished: 0,
            open: 0,
            scratch: vec![0; SCRATCH_BYTES],
            request: Vec::with_capacity(512),
            plan,
        })
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// The event loop; returns why it stopped.
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<&'static str> {
        let now_unix_ms = sys::unix_now_ns() / 1_000_000;
        let deadline = self.started
            + Duration::from_millis(self.plan.deadline_unix_ms.saturating_sub(now_unix_ms));
        let progress_interval = Duration::from_millis(self.plan.progress_interval_ms);
        let mut next_progress = self.started + progress_interval;
        let mut ready = sys::ready_list(READY_EVENTS_MAX);
        let connect_interval = if self.plan.connect_rate_per_s > 0.0 {
            Some(Duration::from_secs_f64(1.0 / self.plan.connect_rate_per_s))
        } else {
            None
        };
        // Bounded: every turn ends by the deadline check below.
        loop {
            let now = Instant::now();
            if stop.load(Ordering::Relaxed) {
                return Ok("signal");
            }
            if now >= deadline {
                return Ok("duration");
            }
            if self.finished == self.plan.slot_count {
                return Ok(if self.plan.expect_events.is_some() {
                    "expect_events"
                } else {
                    "all_finished"
                });
            }
            if !progress_interval.is_zero() && now >= next_progress {
                next_progress += progress_interval;
                self.print_progress();
            }
            self.open_due(now, connect_interval);
            self.expire_handshakes(now);

            // Sleep until the next thing to do, at most WAIT_MAX.
            let mut wake = (now + WAIT_MAX).min(deadline);
            if !self.revisit.is_empty() {
                wake = now;
            }
            if self.has_opens_pending(now) {
                wake = wake.min(self.next_connect_at.max(now));
            }
            if let Some(Reverse((when, _, _))) = self.reopen_heap.peek() {
                wake = wake.min((*when).max(self.next_connect_at));
            }
            if let Some((when, _, _)) = self.handshake_deadlines.front() {
                wake = wake.min(*when);
            }
            let count = self
                .epoll
                .wait(&mut ready, wake.saturating_duration_since(now))?;
            for event in &ready[..count] {
                let (slot, generation) = sys::ready_token(event);
                self.handle(slot, generation, sys::ready_flags(event));
            }
            for (slot, generation) in std::mem::take(&mut self.revisit) {
                self.handle(slot, generation, flags::IN);
            }
        }
    }

    fn has_opens_pending(&self, now: Instant) -> bool {
        self.next_first_open < self.slots.len()
            || self
                .reopen_heap
                .peek()
                .is_some_and(|Reverse((when, _, _))| *when <= now)
    }

    /// Starts the attempts that are due, as the connect rate allows.
    fn open_due(&mut self, now: Instant, connect_interval: Option<Duration>) {
        for _ in 0..OPENS_PER_TURN_MAX {
            if !self.has_opens_pending(now) {
                // Nothing to open: unused rate does not pile up into a burst.
                self.next_connect_at = self.next_connect_at.max(now);
                return;
            }
            if let Some(interval) = connect_interval {
                if now < self.next_connect_at {
                    return;
                }
                self.next_connect_at += interval;
                if self.next_connect_at + Duration::from_secs(1) < now {
                    self.next_connect_at = now;
                }
            }
            let slot = match self.reopen_heap.peek() {
                Some(Reverse((when, slot, generation))) if *when <= now => {
                    let (slot, generation) = (*slot, *generation);
                    self.reopen_heap.pop();
                    if self.slots[slot].generation != generation
                        || self.slots[slot].phase != Phase::Idle
                    {
                        continue;
                    }
                    slot
                }
                _ => {
                    let slot = self.next_first_open;
                    self.next_first_open += 1;
                    slot
                }
            };
            self.start_attempt(slot, now);
        }
    }

    /// Opens a socket for `slot` and starts a non-blocking connect.
    fn start_attempt(&mut self, index: usize, now: Instant) {
        let global = self.plan.slot_base + index as u64;
        let url = &self.plan.urls[(global % self.plan.urls.len() as u64) as usize];
        let source = if self.plan.source_ips.is_empty() {
            None
        } else {
            Some(self.plan.source_ips[(global % self.plan.source_ips.len() as u64) as usize])
        };
        self.report.connect_attempts += 1;
        match self.slots[index].reopen {
            Reopen::First => {}
            Reopen::AfterServerClose => self.report.reconnects += 1,
            Reopen::AfterFailure => self.report.retries += 1,
        }
        let attempt_started_ns = self.now_ns();
        let socket = match connect_socket(url.address, source) {
            Ok(socket) => socket,
            Err(error) => {
                let reason = failure_reason(&error);
                self.fail(index, &reason, true);
                return;
            }
        };
        let slot = &mut self.slots[index];
        slot.generation = slot.generation.wrapping_add(1);
        let interest = flags::IN | flags::OUT | flags::RDHUP | flags::ET;
        if let Err(error) = self.epoll.add(
            socket.as_raw_fd(),
            interest,
            sys::token(index, slot.generation),
        ) {
            let reason = failure_reason(&error);
            self.fail(index, &reason, true);
            return;
        }
        let slot = &mut self.slots[index];
        slot.socket = Some(socket);
        slot.phase = Phase::Connecting;
        slot.written = 0;
        slot.attempt_started_ns = attempt_started_ns;
        slot.head = Vec::new();
        slot.body = Body::UntilClose;
        slot.parser = SseParser::default();
        self.open += 1;
        let timeout = Duration::from_millis(self.plan.connect_timeout_ms);
        self.handshake_deadlines
            .push_back((now + timeout, index, slot.generation));
    }

    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(when, index, generation)) = self.handshake_deadlines.front() {
            if when > now {
                return;
            }
            self.handshake_deadlines.pop_front();
            let slot = &self.slots[index];
            if slot.generation == generation
                && matches!(
                    slot.phase,
                    Phase::Connecting | Phase::Requesting | Phase::Head
                )
            {
                self.fail(index, "timeout", true);
            }
        }
    }

    fn handle(&mut self, index: usize, generation: u32, ready: u32) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        if slot.generation != generation || slot.socket.is_none() {
            return; // A stale event for a socket that has since been closed.
        }
        match slot.phase {
            Phase::Connecting => {
                if ready & (flags::OUT | flags::ERR | flags::HUP) == 0 {
                    return;
                }
                let socket = slot.socket.as_ref().expect("checked above");
                match socket.take_error() {
                    Ok(None) if ready & (flags::ERR | flags::HUP) == 0 => {
                        self.slots[index].phase = Phase::Requesting;
                        self.write_request(index);
                    }
                    Ok(None) => self.fail(index, "reset", true),
                    Ok(Some(error)) | Err(error) => {
                        let reason = failure_reason(&error);
                        self.fail(index, &reason, true);
                    }
                }
            }
            Phase::Requesting => self.write_request(index),
            Phase::Head | Phase::Streaming => self.read(index, ready & flags::RDHUP != 0),
            Phase::Idle | Phase::Done => {}
        }
    }

    fn write_request(&mut self, index: usize) {
        let global = self.plan.slot_base + index as u64;
        let url = &self.plan.urls[(global % self.plan.urls.len() as u64) as usize];
        let slot = &mut self.slots[index];
        let last_id = slot.tracker.last_event_id.as_deref();
        http::write_subscribe_request(&mut self.request, url, last_id);
        let socket = slot
            .socket
            .as_ref()
            .expect("requesting slots have a socket");
        // Bounded: each pass writes bytes or returns.
        while (slot.written as usize) < self.request.len() {
            match (&*socket).write(&self.request[slot.written as usize..]) {
                Ok(0) => break,
                Ok(count) => slot.written += count as u32,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    let reason = failure_reason(&error);
                    self.fail(index, &reason, true);
                    return;
                }
            }
        }
        slot.phase = Phase::Head;
        let interest = flags::IN | flags::RDHUP | flags::ET;
        if let Err(error) = self.epoll.modify(
            socket.as_raw_fd(),
            interest,
            sys::token(index, slot.generation),
        ) {
            let reason = failure_reason(&error);
            self.fail(index, &reason, true);
        }
    }

    /// Reads what the socket has (edge-triggered: until it would block).
    fn read(&mut self, index: usize, peer_closed: bool) {
        let generation = self.slots[index].generation;
        for _ in 0..READS_PER_TURN_MAX {
            let slot = &mut self.slots[index];
            if slot.generation != generation
                || !matches!(slot.phase, Phase::Head | Phase::Streaming)
            {
                return;
            }
            let socket = slot.socket.as_ref().expect("reading slots have a socket");
            let result = (&*socket).read(&mut self.scratch);
            match result {
                Ok(0) => {
                    self.end_of_stream(index, None);
                    return;
                }
                Ok(count) => {
                    self.report.bytes_received += count as u64;
                    let now_unix_ns = sys::unix_now_ns();
                    let mut scratch = std::mem::take(&mut self.scratch);
                    self.received(index, &scratch[..count], now_unix_ns);
                    std::mem::swap(&mut self.scratch, &mut scratch);
                    // A short read drained the socket; a new edge comes with new
                    // data. After RDHUP, read on to see the end of the stream.
                    if count < self.scratch.len() && !peer_closed {
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.end_of_stream(index, Some(&error));
                    return;
                }
            }
        }
        self.revisit.push((index, generation));
    }

    /// Handles bytes read from a slot's socket.
    fn received(&mut self, index: usize, data: &[u8], now_unix_ns: u64) {
        let slot = &mut self.slots[index];
        let buffered_head;
        let mut data = data;
        if slot.phase == Phase::Head {
            let parsed = if slot.head.is_empty() {
                http::parse_response_head(data)
            } else {
                slot.head.extend_from_slice(data);
                http::parse_response_head(&slot.head)
            };
            let head = match parsed {
                Ok(None) => {
                    if slot.head.is_empty() {
                        slot.head.extend_from_slice(data);
                    }
                    return;
                }
                Ok(Some(head)) => head,
                Err(_) => return self.fail(index, "bad_response", true),
            };
            if head.status != 200 {
                return self.fail(index, &format!("http_{}", head.status), false);
            }
            if !head.is_event_stream {
                return self.fail(index, "not_event_stream", false);
            }
            let connect_us = (self.started.elapsed().as_nanos() as u64)
                .saturating_sub(slot.attempt_started_ns)
                / 1000;
            self.connect_us.saturating_record(connect_us.max(1));
            self.report.streams_opened += 1;
            slot.phase = Phase::Streaming;
            slot.body = head.body;
            if !slot.ever_connected {
                slot.ever_connected = true;
                self.report.connected += 1;
            }
            if slot.head.is_empty() {
                data = &data[head.head_bytes..];
            } else {
                buffered_head = std::mem::take(&mut slot.head);
                data = &buffered_head[head.head_bytes..];
            }
            if data.is_empty() && slot.body != Body::Length(0) {
                return;
            }
        }
        debug_assert_eq!(slot.phase, Phase::Streaming);
        let mut sink = TrackerSink {
            tracker: &mut slot.tracker,
            stats: &mut self.stats,
            now_unix_ns,
        };
        let parser = &mut slot.parser;
        let (result, body_ended) = match &mut slot.body {
            Body::UntilClose => (
                parser.feed(data, &mut sink).map_err(|e| e.to_string()),
                false,
            ),
            Body::Length(remaining) => {
                let take = (*remaining).min(data.len() as u64) as usize;
                *remaining -= take as u64;
                (
                    parser
                        .feed(&data[..take], &mut sink)
                        .map_err(|e| e.to_string()),
                    *remaining == 0,
                )
            }
            Body::Chunked(decoder) => {
                let mut parse_error = None;
                let decoded = decoder.decode(data, |piece| {
                    if parse_error.is_none() {
                        parse_error = parser.feed(piece, &mut sink).err();
                    }
                });
                let result = match (decoded, parse_error) {
                    (_, Some(error)) => Err(error.to_string()),
                    (Err(_), None) => Err("bad_chunked_encoding".to_owned()),
                    (Ok(_), None) => Ok(()),
                };
                (result, decoder.is_done())
            }
        };
        let events = slot.tracker.events;
        if let Some(expected) = self.plan.expect_events {
            if events >= expected && !slot.finished {
                slot.finished = true;
                self.finished += 1;
                self.report.connections_reached_expected += 1;
            }
        }
        match result {
            Err(reason) => {
                *self
                    .report
                    .stream_errors
                    .entry(reason.replace(' ', "_"))
                    .or_default() += 1;
                self.close(index);
                self.set_done(index);
            }
            Ok(()) if body_ended => self.end_of_stream(index, None),
            Ok(()) => {}
        }
    }

    /// The server ended the connection (cleanly, or with `error`).
    fn end_of_stream(&mut self, index: usize, error: Option<&io::Error>) {
        match self.slots[index].phase {
            Phase::Head => {
                let reason =
                    error.map_or_else(|| "closed_before_response".to_owned(), failure_reason);
                self.fail(index, &reason, true);
            }
            Phase::Streaming => {
                if error.is_some() {
                    self.report.reset_by_server += 1;
                } else {
                    self.report.closed_by_server += 1;
                }
                self.close(index);
                if self.plan.reconnect {
                    let slot = &self.slots[index];
                    let delay = slot
                        .tracker
                        .retry_ms
                        .map_or(Duration::from_millis(self.plan.reconnect_delay_ms), |ms| {
                            Duration::from_millis(u64::from(ms))
                        });
                    self.schedule_reopen(index, Reopen::AfterServerClose, delay);
                } else {
                    self.set_done(index);
                }
            }
            _ => {}
        }
    }

    /// An attempt failed: count it, close, and retry if allowed.
    fn fail(&mut self, index: usize, reason: &str, may_retry: bool) {
        *self.report.failed.entry(reason.to_owned()).or_default() += 1;
        self.close(index);
        if self.plan.reconnect && may_retry {
            let slot = &self.slots[index];
            let delay = slot
                .tracker
                .retry_ms
                .map_or(Duration::from_millis(self.plan.reconnect_delay_ms), |ms| {
                    Duration::from_millis(u64::from(ms))
                })
                .max(RETRY_AFTER_FAILURE_MIN);
            self.schedule_reopen(index, Reopen::AfterFailure, delay);
        } else {
            self.set_done(index);
        }
    }

    fn schedule_reopen(&mut self, index: usize, reason: Reopen, delay: Duration) {
        let slot = &mut self.slots[index];
        slot.reopen = reason;
        self.reopen_heap
            .push(Reverse((Instant::now() + delay, index, slot.generation)));
    }

    /// Closes the slot's socket (if any) and returns it to Idle.
    fn close(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if slot.socket.take().is_some() {
            // Dropping the socket closes it, which also removes it from epoll.
            self.open -= 1;
        }
        slot.tracker.stream_ended();
        slot.generation = slot.generation.wrapping_add(1);
        slot.phase = Phase::Idle;
        slot.head = Vec::new();
        slot.parser = SseParser::default();
    }

    fn set_done(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.phase = Phase::Done;
        if !slot.finished {
            slot.finished = true;
            self.finished += 1;
        }
    }

    fn print_progress(&self) {
        eprintln!(
            "subscribe[{}] t={:.0}s open {}/{} events {} gaps {} dups {} failed {}",
            self.plan.child_index,
            self.started.elapsed().as_secs_f64(),
            self.open,
            self.plan.slot_count,
            self.stats.events,
            self.stats.gaps,
            self.stats.duplicates,
            self.report.failed.values().sum::<u64>()
        );
    }

    /// Closes everything and builds the report.
    fn finish(mut self, stopped_by: &str) -> ChildReport {
        let open_at_end = self
            .slots
            .iter()
            .filter(|slot| slot.phase == Phase::Streaming)
            .count() as u64;
        let events = self.slots.iter().map(|slot| slot.tracker.events);
        let min = events.clone().min().unwrap_or(0);
        let max = events.max().unwrap_or(0);
        self.slots.clear(); // Closes every socket.
        self.stats.finish_window();
        let windows = std::mem::take(&mut self.stats.windows);
        let stats = &self.stats;
        ChildReport {
            open_at_end,
            events: stats.events,
            events_sequenced: stats.events_sequenced,
            gaps: stats.gaps,
            missing: stats.missing,
            duplicates: stats.duplicates,
            gap_signals: stats.gap_signals,
            missing_signalled: stats.missing_signalled,
            latency_negative: stats.latency_negative,
            events_per_connection_min: min,
            events_per_connection_max: max,
            latency_us: encode_histogram(&stats.latency_us),
            connect_us: encode_histogram(&self.connect_us),
            windows,
            cpu: sys::cpu_time_self(),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            stopped_by: stopped_by.to_owned(),
            ..self.report
        }
    }
}

/// A non-blocking TCP socket, bound to `source` (port chosen at connect),
/// with a connect to `address` started.
fn connect_socket(address: SocketAddr, source: Option<IpAddr>) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            sys::set_bind_address_no_port(socket.as_raw_fd())?;
        }
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match socket.connect(&SockAddr::from(address)) {
        Ok(()) => Ok(socket),
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SubscribeArgs,
    }

    fn args(extra: &[&str]) -> SubscribeArgs {
        let mut argv = vec!["x", "--url", "http://127.0.0.1:1/events?topic=a"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn plans_spread_connections_and_rate() {
        let plans = plan(
            &args(&["--connections", "100000", "--connect-rate", "6000"]),
            0,
        )
        .unwrap();
        assert_eq!(plans.len(), 6);
        assert_eq!(plans.iter().map(|p| p.slot_count).sum::<u64>(), 100_000);
        assert!(plans
            .iter()
            .all(|p| p.slot_count <= CONNECTIONS_PER_PROCESS_DEFAULT));
        assert_eq!(plans[1].slot_base, plans[0].slot_count);
        assert!((plans[0].connect_rate_per_s - 1000.0).abs() < 1e-9);
        let plans = plan(&args(&["--connections", "5", "--processes", "2"]), 0).unwrap();
        assert_eq!(
            (plans[0].slot_count, plans[1].slot_count, plans[1].slot_base),
            (3, 2, 3)
        );
        assert!(plan(&args(&["--connections", "1", "--processes", "2"]), 0).is_err());
        assert!(
            plan(&args(&["--source-ips", "::1"]), 0).is_err(),
            "family mismatch"
        );
    }

    #[test]
    fn failure_reasons() {
        let reason = |errno| failure_reason(&io::Error::from_raw_os_error(errno));
        assert_eq!(reason(libc::ECONNREFUSED), "refused");
        assert_eq!(reason(libc::ECONNRESET), "reset");
        assert_eq!(reason(libc::ETIMEDOUT), "timeout");
        assert_eq!(reason(libc::EADDRNOTAVAIL), "address_unavailable");
        assert_eq!(reason(libc::EACCES), format!("errno_{}", libc::EACCES));
    }
}
