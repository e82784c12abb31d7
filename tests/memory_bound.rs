//! Memory bound: waves of 2,000 stalled subscribers (tiny receive window, never
//! read) under a sustained flood of 1 KiB events for 30 s (set
//! `PLENUM_MEMORY_BOUND_SECS=10` to shorten by hand). The server's RSS, sampled every
//! 200 ms, stays under the bound computed from the flags (DESIGN.md invariant 1);
//! every stalled subscriber is closed with `write_stall` or `slow_consumer`; a healthy
//! subscriber next to them receives every event in order.
//!
//! The bound, with the flags below:
//!
//! ```text
//! RSS ≤ base                                   RSS measured right after start
//!     + connections × 2 KiB                    per-connection state
//!     + history_bytes_max + history_events_max × 256 B   history and per-event overhead
//!     + stalled × outbox_bytes_hard            every outbox full
//!     + shards × shard_inbox_events × 8 B      inbox slots (pointers)
//!     + connections × request_head_bytes_max   request heads in flight
//!     + publishers × publish_body_bytes_max    publish bodies in flight
//! ```
//!
//! Outboxes hold references to shared frames, not copies, so real use is far below
//! the `stalled × outbox_bytes_hard` term. A second, tighter check asserts that:
//! each outbox is then at most (hard / event bytes + 1) references of ≤ 64 B each,
//! plus one outbox worth of frames that may outlive history, plus 32 MiB of
//! allocator slack. A server that copied frames into outboxes (2,000 × 256 KiB =
//! 500 MiB) fails it.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

const STALLED_PER_WAVE: usize = 2000;
const EVENT_BYTES: usize = 1024;
/// Events per second: what two shared cores take in a debug build with 2,000
/// stalled sockets being filled, while the healthy reader keeps up.
const EVENTS_PER_SECOND: u64 = 200;
const SHARDS: u64 = 2;
const HISTORY_BYTES_MAX: u64 = 8 * MIB;
const HISTORY_EVENTS_MAX: u64 = 10_000;
const OUTBOX_BYTES_HARD: u64 = 256 * KIB;
const SHARD_INBOX_EVENTS: u64 = 8192;
const REQUEST_HEAD_BYTES_MAX: u64 = 8 * KIB;
const PUBLISH_BODY_BYTES_MAX: u64 = 64 * KIB;
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a wave of stalled subscribers needs events flowing to be closed.
const WAVE_MARGIN: Duration = Duration::from_secs(8);

const PER_CONNECTION_BYTES_MAX: u64 = 2 * KIB;
const PER_EVENT_OVERHEAD_BYTES: u64 = 256;
const OUTBOX_REFERENCE_BYTES_MAX: u64 = 64;
const ALLOCATOR_SLACK_BYTES: u64 = 32 * MIB;

backend_tests! {
    fn rss_stays_bounded_with_thousands_of_stalled_subscribers(backend: Backend) {
        let run_for = duration_from_env("PLENUM_MEMORY_BOUND_SECS", Duration::from_secs(30));
        let server = Server::start(backend, &[
            "--shards", &SHARDS.to_string(),
            "--history-bytes-max", "8MiB",
            "--history-events-max", &HISTORY_EVENTS_MAX.to_string(),
            "--outbox-bytes-hard", "256KiB",
            "--outbox-bytes-soft", "0",
            "--write-stall-timeout", "2s",
            "--socket-send-buffer-bytes", "16KiB",
            "--shard-inbox-events", &SHARD_INBOX_EVENTS.to_string(),
            "--request-head-bytes-max", "8KiB",
            "--publish-body-bytes-max", "64KiB",
            "--connections-max", "10000",
        ]);
        let server = &server;
        let base = server.rss_bytes();

        // healthy + publisher + a scrape, next to one wave of stalled subscribers.
        let connections = STALLED_PER_WAVE as u64 + 3;
        let fixed = base
            + connections * PER_CONNECTION_BYTES_MAX
            + HISTORY_BYTES_MAX
            + HISTORY_EVENTS_MAX * PER_EVENT_OVERHEAD_BYTES
            + SHARDS * SHARD_INBOX_EVENTS * 8
            + connections * REQUEST_HEAD_BYTES_MAX
            + PUBLISH_BODY_BYTES_MAX;
        let bound = fixed + STALLED_PER_WAVE as u64 * OUTBOX_BYTES_HARD;
        let references_per_outbox = OUTBOX_BYTES_HARD / EVENT_BYTES as u64 + 1;
        let sharing_bound = fixed
            + STALLED_PER_WAVE as u64 * references_per_outbox * OUTBOX_REFERENCE_BYTES_MAX
            + OUTBOX_BYTES_HARD
            + ALLOCATOR_SLACK_BYTES;

        let mut healthy = server.subscribe(&["flood"]);
        let flood_started = Instant::now();
        let stop = AtomicBool::new(false);
        let stop = &stop;
        // The last published id, once known (0 before): the healthy reader stops there.
        let last_id = AtomicU64::new(0);
        let last_id = &last_id;
        let (published, samples, stalled_total, healthy_ids) = std::thread::scope(|scope| {
            let sampler = scope.spawn(move || {
                let started = Instant::now();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = proc_rss_bytes(server.pid()) {
                        samples.push((started.elapsed(), rss));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                samples
            });
            let publisher = scope.spawn(move || {
                let mut publisher = server.publisher();
                let started = Instant::now();
                let mut ids = Vec::new();
                let mut n = 0u64;
                while started.elapsed() < run_for {
                    ids.push(publisher.publish(&["flood"], None, payload(n, EVENT_BYTES).as_bytes()));
                    n += 1;
                    // Rate pacing: the n-th event is due at n / rate seconds.
                    let due = Duration::from_micros(n * 1_000_000 / EVENTS_PER_SECOND);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                // Handed back so its close does not count before the check below.
                (ids, publisher)
            });
            let reader = scope.spawn(move || {
                let mut ids: Vec<u64> = Vec::new();
                let mut quiet_since = Instant::now();
                loop {
                    let last = last_id.load(Ordering::Relaxed);
                    if last != 0 && ids.last().is_some_and(|id| *id >= last) {
                        break;
                    }
                    match healthy.next_event(Duration::from_millis(200)) {
                        Ok(event) => {
                            ids.push(event.id());
                            quiet_since = Instant::now();
                        }
                        Err(StreamEnd::Timeout) => assert!(
                            last == 0 || quiet_since.elapsed() < IO_TIMEOUT,
                            "the healthy subscriber stopped receiving before the last event"
                        ),
                        Err(end) => panic!("healthy subscriber's stream ended: {end:?}"),
                    }
                }
                (healthy, ids)
            });

            // Waves of stalled subscribers, each from its own loopback address (no
            // ephemeral-port pressure), until the flood ends.
            let mut stalled_total = 0usize;
            let mut wave = 0usize;
            // A wave needs events flowing until it is closed: none starts in the
            // flood's last WAVE_MARGIN.
            while flood_started.elapsed() + WAVE_MARGIN < run_for || wave == 0 {
                let source = loopback(10 + (wave % 200) as u8);
                let request = Subscribe::topics(&["flood"]).recv_buffer(4096).source_ip(source);
                let sockets: Vec<_> = (0..STALLED_PER_WAVE)
                    .map(|_| request.send_only(server.addr()).expect("stalled subscriber connects"))
                    .collect();
                stalled_total += sockets.len();
                server.wait_for_metrics(
                    WRITE_STALL_TIMEOUT + Duration::from_secs(15),
                    &format!("wave {wave}: all {stalled_total} stalled subscribers closed as write_stall or slow_consumer"),
                    |m| m.closed("write_stall") + m.closed("slow_consumer") == stalled_total as f64,
                );
                drop(sockets);
                wave += 1;
            }
            let (published, _publisher_connection) = publisher.join().unwrap();
            last_id.store(*published.last().unwrap(), Ordering::Relaxed);
            let (_healthy, healthy_ids) = reader.join().unwrap();
            stop.store(true, Ordering::Relaxed);
            let metrics = server.metrics();
            for reason in ["peer_closed", "reset", "timed_out", "handshake_timeout", "bad_request", "lifetime"] {
                assert_eq!(
                    metrics.closed(reason),
                    0.0,
                    "no connection may close as {reason}:\n{}",
                    metrics.plenum_lines()
                );
            }
            (published, sampler.join().unwrap(), stalled_total, healthy_ids)
        });

        assert!(stalled_total >= STALLED_PER_WAVE, "at least one full wave ran");
        assert_eq!(healthy_ids, published, "the healthy subscriber must receive every event in order");
        assert!(samples.len() >= 5, "too few RSS samples: {samples:?}");
        let (peak_at, peak) = samples.iter().copied().max_by_key(|(_, rss)| *rss).unwrap();
        println!(
            "base {} MiB, peak {} MiB at {peak_at:?}, bound {} MiB, sharing bound {} MiB, {stalled_total} stalled, {} events",
            base / MIB, peak / MIB, bound / MIB, sharing_bound / MIB, published.len()
        );
        if let Some((at, rss)) = samples.iter().find(|(_, rss)| *rss > bound) {
            panic!("RSS {rss} B at {at:?} exceeds the bound {bound} B (base {base} B)");
        }
        assert!(
            peak <= sharing_bound,
            "peak RSS {peak} B exceeds the frame-sharing bound {sharing_bound} B: outboxes seem to copy frames"
        );
    }
}
