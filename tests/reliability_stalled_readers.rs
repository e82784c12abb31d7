//! Slow and stalled readers next to healthy ones (issue 6, scenario 4): 100
//! healthy subscribers and waves of 1,000 stalled readers (`plenum load misbehave
//! --mode stall`: 4 KiB receive buffer, never read) on the same topic, under 1,000
//! events/s of 1 KiB.
//!
//! 1. Healthy only: 5,000 events (5 s; 20 s with `PLENUM_TIER=heavy`), the
//!    latency baseline.
//! 2. Healthy next to stalled readers: 15,000 events (15 s; 60 s heavy), with one
//!    wave of 1,000 stalled readers after another: each wave is opened at once,
//!    and the next starts when Plenum has closed every one of the last.
//!
//! The healthy subscribers of each phase are one `plenum load subscribe` process
//! (100 streams on one epoll loop, `--expect-events` = the events of the phase),
//! which checks the `seq=` of every event per stream (no gap, no duplicate, no
//! step back) and measures publish-to-receive latency from `ts=`; 100 reader
//! threads in the test would take both cores of a small machine themselves.
//!
//! Asserts: every healthy subscriber receives every event, in order, no gap, no
//! duplicate; every stalled reader is closed as `slow_consumer` or `write_stall`
//! and nothing else closes; the stalled readers see their close (an RST: a FIN
//! would wait behind the bytes they never read, and the send queue would hold
//! kernel memory until the kernel gave up); Plenum's RSS stays under the bound from
//! its flags, and under the tighter bound of outboxes that hold references to
//! shared frames, not copies; and the host's TCP memory (`mem` of
//! `/proc/net/sockstat`, pages, host-wide) grows by no more than
//!
//! ```text
//! stalled × (2 × socket-send-buffer-bytes     the kernel doubles SO_SNDBUF
//!            + 2 × 4 KiB + 2 pages)           the stalled client's receive buffer, rounding
//!   + 32 MiB                                  healthy traffic and other tests on the host
//! ```
//!
//! over its level before the first wave. Without the cap each stalled socket
//! would autotune up to `tcp_wmem` max (4 MiB here): 1,000 of them could take
//! 4 GiB. Reports (prints, does not assert) the healthy subscribers' p99
//! publish-to-receive latency without and with the stalled readers.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::flow::*;
use common::*;

const HEALTHY: usize = 100;
const STALLED_PER_WAVE: u64 = 1000;
const EVENTS_PER_SECOND: u64 = 1000;
const EVENT_BYTES: usize = 1024;
const STALLED_RECV_BUFFER: u64 = 4096;

const SHARDS: u64 = 2;
const HISTORY_EVENTS_MAX: u64 = 10_000;
const HISTORY_BYTES_MAX: u64 = 16 * MIB;
const OUTBOX_BYTES_HARD: u64 = MIB;
const SHARD_INBOX_EVENTS: u64 = 8192;
const REQUEST_HEAD_BYTES_MAX: u64 = 8 * KIB;
const PUBLISH_BODY_BYTES_MAX: u64 = 64 * KIB;
const SOCKET_SEND_BUFFER_BYTES: u64 = 64 * KIB;
/// Bytes per outbox entry (a frame reference and its bookkeeping), at most.
const OUTBOX_REFERENCE_BYTES_MAX: u64 = 64;
const ALLOCATOR_SLACK_BYTES: u64 = 32 * MIB;
const KERNEL_SLACK_BYTES: u64 = 32 * MIB;
/// No wave starts this close to the end of the flow: it needs events to be closed.
const WAVE_MARGIN: Duration = Duration::from_secs(3);

/// One wave of stalled readers, as `plenum load misbehave` reported it.
struct Wave {
    /// When the misbehave process started and ended.
    started: Instant,
    ended: Instant,
    connected: u64,
    server_reset: u64,
    server_closed: u64,
    open_at_end: u64,
    close_after: String,
}

fn run_wave(server: &Server) -> Wave {
    let dir = TempDir::new("plenum-stall");
    let report_path = dir.path().join("stall.json");
    let started = Instant::now();
    let url = format!("http://{}/events?topic=feed", server.addr());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_plenum"))
        .args(["load", "misbehave", "--mode", "stall", "--url", &url])
        .args([
            "--connections",
            &STALLED_PER_WAVE.to_string(),
            "--connect-rate",
            "0",
        ])
        .args(["--receive-buffer-bytes", &STALLED_RECV_BUFFER.to_string()])
        .args(["--duration", "20s", "--json"])
        .arg(&report_path)
        .output()
        .expect("run plenum load misbehave --mode stall");
    assert!(
        output.status.success(),
        "plenum load misbehave --mode stall failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).expect("the stall report"))
            .expect("the stall report is JSON");
    let number = |key: &str| report[key].as_u64().unwrap_or(0);
    let close_after = &report["server_close_after"];
    Wave {
        started,
        ended: Instant::now(),
        connected: number("connected"),
        server_reset: number("server_reset"),
        server_closed: number("server_closed"),
        open_at_end: number("open_at_end"),
        close_after: format!(
            "p50 {:.0} ms, max {:.0} ms",
            close_after["p50_ms"].as_f64().unwrap_or(0.0),
            close_after["max_ms"].as_f64().unwrap_or(0.0)
        ),
    }
}

/// What `plenum load subscribe` reported for one phase's healthy subscribers.
struct Healthy {
    report: serde_json::Value,
    /// When the process was started (its report's windows count from about here).
    started: Instant,
}

impl Healthy {
    fn number(&self, key: &str) -> u64 {
        self.report[key].as_u64().unwrap_or(u64::MAX)
    }

    fn latency_line(&self) -> String {
        let latency = &self.report["latency"];
        let ms = |key: &str| latency[key].as_f64().unwrap_or(f64::NAN);
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms over {} events",
            ms("p50_ms"),
            ms("p99_ms"),
            ms("p999_ms"),
            ms("max_ms"),
            latency["count"]
        )
    }

    /// The worst per-second p99 latency (ms) among the report's windows that
    /// overlap (`overlapping`) or do not overlap any of `spans`.
    fn worst_window_p99_ms(&self, spans: &[(Instant, Instant)], overlapping: bool) -> f64 {
        let windows = self.report["windows"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        windows
            .iter()
            .filter(|window| {
                let start =
                    self.started + Duration::from_secs_f64(window["t_s"].as_f64().unwrap_or(0.0));
                let end = start + Duration::from_secs(1);
                spans.iter().any(|(from, to)| start < *to && end > *from) == overlapping
            })
            .filter_map(|window| window["p99_ms"].as_f64())
            .fold(0.0, f64::max)
    }

    /// Every stream received every event of the phase, in order; the server closed none.
    fn assert_received_all(&self, events: u64, phase: &str) {
        let report = &self.report;
        let expected = [
            ("connected", HEALTHY as u64),
            ("connections_reached_expected", HEALTHY as u64),
            ("events_per_connection_min", events),
            ("events_per_connection_max", events),
            ("gaps", 0),
            ("duplicates", 0),
            ("gap_signals", 0),
            ("closed_by_server", 0),
            ("reset_by_server", 0),
            ("failed_total", 0),
        ];
        for (key, value) in expected {
            assert_eq!(
                self.number(key),
                value,
                "{phase}: healthy subscribers' {key}; report:\n{report:#}"
            );
        }
        assert_eq!(
            report["checks"]["passed"].as_bool(),
            Some(true),
            "{phase}: {report:#}"
        );
    }
}

/// Runs one phase: `HEALTHY` subscribers (a `plenum load subscribe` process), then
/// `events` events at `EVENTS_PER_SECOND`, with `during` run on this thread while
/// they flow. Returns the subscribers' report once each has received every event.
fn phase(server: &Server, events: u64, during: impl FnOnce(&Flow)) -> (Healthy, Published) {
    let dir = TempDir::new("plenum-healthy");
    let started = Instant::now();
    let report_path = dir.path().join("healthy.json");
    let url = format!("http://{}/events?topic=feed", server.addr());
    let mut subscribers = std::process::Command::new(env!("CARGO_BIN_EXE_plenum"))
        .args([
            "load",
            "subscribe",
            "--url",
            &url,
            "--connections",
            &HEALTHY.to_string(),
        ])
        .args([
            "--expect-events",
            &events.to_string(),
            "--progress-interval",
            "0",
        ])
        .args([
            "--duration",
            &format!("{}s", events / EVENTS_PER_SECOND * 3 + 30),
            "--json",
        ])
        .arg(&report_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start plenum load subscribe");
    let registered = wait_until(IO_TIMEOUT, || {
        server
            .try_metrics()
            .is_ok_and(|m| m.subscribers_open() == HEALTHY as f64)
    });
    if !registered {
        let _ = subscribers.kill();
        let _ = subscribers.wait();
        panic!(
            "the {HEALTHY} healthy subscribers did not register:\n{}",
            server.metrics().plenum_lines()
        );
    }
    let flow = Flow::new();
    let published = std::thread::scope(|scope| {
        let _stop_publisher = SetOnDrop(&flow.stop);
        let flow = &flow;
        let publisher = scope.spawn(move || {
            publish_count(server, flow, "feed", EVENTS_PER_SECOND, EVENT_BYTES, events)
        });
        during(flow);
        publisher.join().unwrap()
    });
    assert_eq!(
        published.ids.len() as u64,
        events,
        "the publisher published every event"
    );
    let output = subscribers
        .wait_with_output()
        .expect("plenum load subscribe ran");
    let report = std::fs::read_to_string(&report_path).unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap_or_else(|error| {
        panic!(
            "no report from plenum load subscribe ({error}; exit {}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (Healthy { report, started }, published)
}

backend_tests! {
    fn healthy_subscribers_lose_nothing_next_to_a_thousand_stalled_readers(backend: Backend) {
        let heavy = std::env::var("PLENUM_TIER").as_deref() == Ok("heavy");
        let (without, with) = if heavy {
            (Duration::from_secs(20), Duration::from_secs(60))
        } else {
            (Duration::from_secs(5), Duration::from_secs(15))
        };
        let server = Server::start(backend, &[
            "--shards", "2",
            "--history-events-max", "10000",
            "--history-bytes-max", "16MiB",
            "--outbox-bytes-hard", "1MiB",
            "--write-stall-timeout", "2s",
            "--socket-send-buffer-bytes", "64KiB",
            "--shard-inbox-events", "8192",
            "--request-head-bytes-max", "8KiB",
            "--publish-body-bytes-max", "64KiB",
            "--connections-max", "5000",
        ]);
        let server = &server;
        let connections = STALLED_PER_WAVE + HEALTHY as u64 + 10;
        let bound = RssBound {
            base: server.rss_bytes(),
            connections,
            history_bytes_max: HISTORY_BYTES_MAX,
            history_events_max: HISTORY_EVENTS_MAX,
            outboxes: connections,
            outbox_bytes_hard: OUTBOX_BYTES_HARD,
            shards: SHARDS,
            shard_inbox_events: SHARD_INBOX_EVENTS,
            requests: connections,
            request_head_bytes_max: REQUEST_HEAD_BYTES_MAX,
            publish_body_bytes_max: PUBLISH_BODY_BYTES_MAX,
        };
        // Outboxes hold references to the shared frames: at most hard / event + 1 of
        // them each, plus one outbox worth of frames history may already have dropped.
        let references_per_outbox = OUTBOX_BYTES_HARD / EVENT_BYTES as u64 + 1;
        let sharing_bound = bound.bytes() - bound.outboxes * OUTBOX_BYTES_HARD
            + STALLED_PER_WAVE * references_per_outbox * OUTBOX_REFERENCE_BYTES_MAX
            + OUTBOX_BYTES_HARD
            + ALLOCATOR_SLACK_BYTES;
        let page = page_bytes();
        let kernel_bound_bytes = STALLED_PER_WAVE
            * (2 * SOCKET_SEND_BUFFER_BYTES + 2 * STALLED_RECV_BUFFER + 2 * page)
            + KERNEL_SLACK_BYTES;

        let stop_sampling = AtomicBool::new(false);
        let stop_sampling = &stop_sampling;
        let pid = server.pid();
        let (baseline, stalled, before, after, waves, rss, tcp_mem, kernel_baseline_pages) = std::thread::scope(|scope| {
            let _stop_sampling = SetOnDrop(stop_sampling);
            let rss = scope.spawn(move || {
                Samples::collect(stop_sampling, Duration::from_millis(100), || proc_rss_bytes(pid))
            });
            // 1. Healthy only.
            let baseline = phase(server, EVENTS_PER_SECOND * without.as_secs(), |_| {});
            server.wait_for_metrics(IO_TIMEOUT, "the first phase's subscribers gone", |m| {
                m.subscribers_open() == 0.0
            });
            // 2. Waves of stalled readers next to new healthy subscribers.
            let kernel_baseline_pages = sockstat_tcp_mem_pages().expect("/proc/net/sockstat has TCP mem");
            let tcp_mem = scope.spawn(move || {
                Samples::collect(stop_sampling, Duration::from_millis(100), sockstat_tcp_mem_pages)
            });
            let before = server.metrics();
            let events = EVENTS_PER_SECOND * with.as_secs();
            let mut waves = Vec::new();
            let stalled = phase(server, events, |flow| {
                // A wave needs events flowing until it is closed: none starts in the
                // last WAVE_MARGIN of the flow.
                let margin_events = EVENTS_PER_SECOND * WAVE_MARGIN.as_secs();
                while waves.is_empty() || flow.published.load(Ordering::Relaxed) + margin_events < events {
                    let wave = run_wave(server);
                    let stalled_total = STALLED_PER_WAVE * (waves.len() as u64 + 1);
                    // The misbehave process returns once it saw every close.
                    server.wait_for_metrics(
                        Duration::from_secs(5),
                        &format!("all {stalled_total} stalled readers closed as slow_consumer or write_stall"),
                        |m| {
                            m.closed("slow_consumer") + m.closed("write_stall")
                                - before.closed("slow_consumer")
                                - before.closed("write_stall")
                                == stalled_total as f64
                        },
                    );
                    waves.push(wave);
                }
            });
            // The healthy subscribers close themselves once done (peer_closed).
            let after = server.wait_for_metrics(IO_TIMEOUT, "the healthy subscribers gone", |m| {
                m.subscribers_open() == 0.0
            });
            stop_sampling.store(true, Ordering::Relaxed);
            (baseline, stalled, before, after, waves, rss.join().unwrap(), tcp_mem.join().unwrap(), kernel_baseline_pages)
        });
        let (baseline, baseline_published) = baseline;
        let (stalled, stalled_published) = stalled;

        baseline.assert_received_all(baseline_published.ids.len() as u64, "healthy only");
        stalled.assert_received_all(stalled_published.ids.len() as u64, "next to stalled readers");
        let stalled_total = STALLED_PER_WAVE * waves.len() as u64;
        for (index, wave) in waves.iter().enumerate() {
            assert_eq!(wave.connected, STALLED_PER_WAVE, "wave {index}: every stalled reader connected");
            assert_eq!(
                (wave.server_reset, wave.server_closed, wave.open_at_end),
                (STALLED_PER_WAVE, 0, 0),
                "wave {index}: every stalled reader must be reset by the server (reset, FIN, still open)"
            );
        }
        let closed = |reason: &str| after.closed(reason) - before.closed(reason);
        assert_eq!(
            closed("slow_consumer") + closed("write_stall"),
            stalled_total as f64,
            "every stalled reader closed by the slow-consumer or stall rule"
        );
        assert_eq!(closed("peer_closed"), HEALTHY as f64, "only the healthy subscribers' own closes at the end count as peer_closed");
        for reason in ["reset", "timed_out", "lifetime", "handshake_timeout", "bad_request", "limit"] {
            assert_eq!(closed(reason), 0.0, "nothing may close as {reason}:\n{}", after.plenum_lines());
        }

        println!(
            "{} events at {:.0}/s to {HEALTHY} healthy subscribers next to {} waves × {STALLED_PER_WAVE} stalled readers (slow_consumer {}, write_stall {}; closed after: first wave {}, last wave {})",
            stalled_published.ids.len(),
            stalled_published.rate_per_second(),
            waves.len(),
            closed("slow_consumer"),
            closed("write_stall"),
            waves[0].close_after,
            waves[waves.len() - 1].close_after,
        );
        println!(
            "healthy latency without stalled readers ({:.0} events/s): {}",
            baseline_published.rate_per_second(),
            baseline.latency_line()
        );
        println!("healthy latency with stalled readers:    {}", stalled.latency_line());
        // Whether the delay is the stalled readers' doing: the worst one-second p99
        // while a wave is open against the seconds between waves.
        let spans: Vec<(Instant, Instant)> = waves.iter().map(|w| (w.started, w.ended)).collect();
        println!(
            "healthy worst one-second p99: {:.1} ms while a wave of stalled readers is open, {:.1} ms in seconds without one",
            stalled.worst_window_p99_ms(&spans, true),
            stalled.worst_window_p99_ms(&spans, false),
        );

        bound.assert_holds(&rss, "plenum");
        let (peak_at, peak) = rss.peak();
        assert!(
            peak <= sharing_bound,
            "peak RSS {peak} B at {peak_at:?} exceeds the frame-sharing bound {sharing_bound} B: outboxes seem to copy frames"
        );
        println!("frame-sharing bound {:.0} MiB", sharing_bound as f64 / MIB as f64);

        let (kernel_peak_at, kernel_peak) = tcp_mem.peak();
        let kernel_growth_bytes = kernel_peak.saturating_sub(kernel_baseline_pages) * page;
        let tcp_mem_limits = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").unwrap_or_default();
        println!(
            "host TCP memory: {kernel_baseline_pages} pages before the stalled readers, peak {kernel_peak} pages at {kernel_peak_at:.1?} (+{:.1} MiB; bound +{:.1} MiB; tcp_mem {})",
            kernel_growth_bytes as f64 / MIB as f64,
            kernel_bound_bytes as f64 / MIB as f64,
            tcp_mem_limits.trim()
        );
        assert!(
            kernel_growth_bytes <= kernel_bound_bytes,
            "host TCP memory grew by {kernel_growth_bytes} B with {STALLED_PER_WAVE} stalled readers, over the bound {kernel_bound_bytes} B: is the send buffer cap applied?"
        );
    }
}
