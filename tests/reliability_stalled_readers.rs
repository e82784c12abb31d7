//! Slow and stalled readers next to healthy ones (issue 6, scenario 4): 100
//! healthy subscribers and waves of 1,000 stalled readers (`plenum load misbehave
//! --mode stall`: 4 KiB receive buffer, never read) on the same topic, under 1,000
//! events/s of 1 KiB.
//!
//! 1. Healthy only, for `WITHOUT` (5 s): the latency baseline.
//! 2. Then, for `WITH` (15 s; 20 s + 60 s with `PLENUM_TIER=heavy`), one wave of
//!    1,000 stalled readers after another: each wave is opened at once, and the
//!    next starts when Plenum has closed every one of the last.
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
    /// When the misbehave process started and ended (Unix time, 100 ms units).
    started_window: u64,
    ended_window: u64,
    connected: u64,
    server_reset: u64,
    server_closed: u64,
    open_at_end: u64,
    close_after: String,
}

fn run_wave(server: &Server) -> Wave {
    let dir = TempDir::new("plenum-stall");
    let report_path = dir.path().join("stall.json");
    let started_window = unix_nanos() / 100_000_000;
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
        started_window,
        ended_window: unix_nanos() / 100_000_000,
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

        let clients = open_subscribers(server.addr(), "feed", HEALTHY).expect("healthy subscribers open");
        server.wait_for_metrics(IO_TIMEOUT, "every healthy subscriber registered", |m| {
            m.subscribers_open() == HEALTHY as f64
        });
        let before = server.metrics();
        let flow = Flow::new();
        let flow = &flow;
        let plan = ReaderPlan { addr: server.addr(), topic: "feed".into(), reconnect: false };
        let plan = &plan;
        let stop_sampling = AtomicBool::new(false);
        let stop_sampling = &stop_sampling;
        let pid = server.pid();
        let (published, healthy, waves, rss, tcp_mem, kernel_baseline_pages, after) = std::thread::scope(|scope| {
            let _stop_sampling = SetOnDrop(stop_sampling);
            let _stop_publisher = SetOnDrop(&flow.stop);
            let rss = scope.spawn(move || {
                Samples::collect(stop_sampling, Duration::from_millis(100), || proc_rss_bytes(pid))
            });
            let tcp_mem = scope.spawn(move || {
                Samples::collect(stop_sampling, Duration::from_millis(100), sockstat_tcp_mem_pages)
            });
            let publisher = scope.spawn(move || {
                publish_paced(server, flow, "feed", EVENTS_PER_SECOND, EVENT_BYTES, without + with)
            });
            let readers: Vec<_> = clients
                .into_iter()
                .map(|client| scope.spawn(move || read_stream(flow, plan, client, None)))
                .collect();

            // 1. Healthy only.
            assert!(
                flow.wait_published(EVENTS_PER_SECOND * without.as_secs(), without * 3),
                "the publisher fell far behind"
            );
            // 2. Waves of stalled readers; later events count as "with".
            flow.latency_split_seq.store(flow.published.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            let kernel_baseline_pages = sockstat_tcp_mem_pages().expect("/proc/net/sockstat has TCP mem");
            let stalled_started = Instant::now();
            let mut waves = Vec::new();
            while waves.is_empty() || stalled_started.elapsed() + WAVE_MARGIN < with {
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
            let published = publisher.join().unwrap();
            let healthy: Vec<ReaderOutcome> = readers.into_iter().map(|r| r.join().unwrap()).collect();
            let after = server.metrics();
            stop_sampling.store(true, Ordering::Relaxed);
            (published, healthy, waves, rss.join().unwrap(), tcp_mem.join().unwrap(), kernel_baseline_pages, after)
        });

        for (index, outcome) in healthy.iter().enumerate() {
            assert_received_all(outcome, &published.ids, &format!("healthy subscriber {index}"));
        }
        let stalled_total = STALLED_PER_WAVE * waves.len() as u64;
        for (index, wave) in waves.iter().enumerate() {
            assert_eq!(wave.connected, STALLED_PER_WAVE, "wave {index}: every stalled reader connected");
            assert_eq!(
                (wave.server_reset, wave.server_closed, wave.open_at_end),
                (STALLED_PER_WAVE, 0, 0),
                "wave {index}: every stalled reader must be reset by the server (reset, FIN, still open)"
            );
        }
        let stalled_closes = after.closed("slow_consumer") + after.closed("write_stall")
            - before.closed("slow_consumer") - before.closed("write_stall");
        assert_eq!(stalled_closes, stalled_total as f64, "every stalled reader closed by the slow-consumer or stall rule");
        for reason in ["peer_closed", "reset", "timed_out", "lifetime", "handshake_timeout", "bad_request", "limit"] {
            assert_eq!(after.closed(reason), before.closed(reason), "nothing may close as {reason}:\n{}", after.plenum_lines());
        }

        let mut without_us = latency_histogram_us();
        let mut with_us = latency_histogram_us();
        for outcome in &healthy {
            without_us.add(&outcome.latency_before_us).unwrap();
            with_us.add(&outcome.latency_after_us).unwrap();
        }
        println!(
            "{} events at {:.0}/s to {HEALTHY} healthy subscribers; {} waves × {STALLED_PER_WAVE} stalled readers (closed: slow_consumer {}, write_stall {}; first wave closed after {}, last after {})",
            published.ids.len(),
            published.rate_per_second(),
            waves.len(),
            after.closed("slow_consumer") - before.closed("slow_consumer"),
            after.closed("write_stall") - before.closed("write_stall"),
            waves[0].close_after,
            waves[waves.len() - 1].close_after,
        );
        println!("healthy latency without stalled readers: {}", latency_line(&without_us));
        println!("healthy latency with stalled readers:    {}", latency_line(&with_us));
        // Is the delay the stalled readers' doing? The worst latency in 100 ms
        // windows while a wave is open against windows between waves (both after
        // the first wave, under the same flow).
        let mut worst_by_window = std::collections::BTreeMap::<u64, u64>::new();
        for outcome in &healthy {
            for (window, worst) in &outcome.latency_worst_by_window {
                let entry = worst_by_window.entry(*window).or_default();
                *entry = (*entry).max(*worst);
            }
        }
        let wave_open = |window: u64| {
            waves.iter().any(|wave| (wave.started_window..=wave.ended_window).contains(&window))
        };
        let worst_ms = |open: bool| {
            worst_by_window
                .iter()
                .filter(|(window, _)| **window >= waves[0].started_window && wave_open(**window) == open)
                .map(|(_, worst)| *worst as f64 / 1000.0)
                .fold(0.0, f64::max)
        };
        println!(
            "healthy worst latency per 100 ms: {:.0} ms while a wave of stalled readers is open, {:.0} ms between waves",
            worst_ms(true),
            worst_ms(false),
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
