//! Metrics: per-shard counters, summed at scrape time into Prometheus text.
//!
//! Each shard writes only its own [`ShardStats`] (relaxed atomics on its own
//! cache lines, so no contention); a scrape reads them all. Latency is an
//! `hdrhistogram` per shard, recorded once per frame per fan-out pass (not
//! per delivery) and merged at scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::conn::CloseReason;
use crate::hub::Hub;

/// Counters one shard writes and the scrape reads.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardStats {
    pub connections_open: AtomicI64,
    pub subscribers_open: AtomicI64,
    /// Topics with at least one subscriber on this shard (the topic index's
    /// size), stored by the shard once per loop turn.
    pub topics: AtomicI64,
    pub accepted: AtomicU64,
    pub closed: [AtomicU64; CloseReason::ALL.len()],
    pub frames_delivered: AtomicU64,
    pub bytes_written: AtomicU64,
    pub heartbeats: AtomicU64,
    pub outbox_bytes: AtomicI64,
    pub replays: AtomicU64,
    pub replays_too_old: AtomicU64,
    /// Replays that history overtook (it evicted events not yet sent): each
    /// got a further gap signal and went on from the oldest event held.
    pub replays_overtaken: AtomicU64,
    /// Times this shard fell so far behind that history no longer held what
    /// it missed, and closed its subscribers.
    pub resyncs_lost: AtomicU64,
    /// io_uring: multishot accepts armed again after they ended.
    pub uring_accept_rearms: AtomicU64,
    /// io_uring: accepts that found the registered file table full (`-ENFILE`;
    /// the kernel dropped that connection).
    pub uring_accept_table_full: AtomicU64,
    /// io_uring: polls that found completions held back by a full completion queue.
    pub uring_cq_overflows: AtomicU64,
    /// Publish-to-write latency in microseconds.
    pub latency_us: Mutex<Histogram<u64>>,
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            connections_open: AtomicI64::new(0),
            subscribers_open: AtomicI64::new(0),
            topics: AtomicI64::new(0),
            accepted: AtomicU64::new(0),
            closed: std::array::from_fn(|_| AtomicU64::new(0)),
            frames_delivered: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            outbox_bytes: AtomicI64::new(0),
            replays: AtomicU64::new(0),
            replays_too_old: AtomicU64::new(0),
            replays_overtaken: AtomicU64::new(0),
            resyncs_lost: AtomicU64::new(0),
            uring_accept_rearms: AtomicU64::new(0),
            uring_accept_table_full: AtomicU64::new(0),
            uring_cq_overflows: AtomicU64::new(0),
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            ),
        }
    }
}

/// Adds to a counter that only the calling shard writes.
#[inline]
pub fn add(counter: &AtomicU64, value: u64) {
    counter.fetch_add(value, Ordering::Relaxed);
}

#[inline]
pub fn add_signed(gauge: &AtomicI64, value: i64) {
    gauge.fetch_add(value, Ordering::Relaxed);
}

/// Renders every metric in Prometheus text format.
pub fn render(
    backend: &str,
    shards: &[std::sync::Arc<ShardStats>],
    hub: &Hub,
    draining: bool,
) -> String {
    let mut out = String::with_capacity(4096);
    let load = |f: &dyn Fn(&ShardStats) -> u64| shards.iter().map(|s| f(s)).sum::<u64>();
    let _ = writeln!(
        out,
        "# HELP plenum_info The server; the backend in use.\n# TYPE plenum_info gauge"
    );
    let _ = writeln!(
        out,
        "plenum_info{{backend=\"{backend}\",version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# TYPE plenum_shards gauge\nplenum_shards {}",
        shards.len()
    );
    let _ = writeln!(
        out,
        "# TYPE plenum_draining gauge\nplenum_draining {}",
        u8::from(draining)
    );

    let _ = writeln!(
        out,
        "# HELP plenum_connections_open Open connections.\n# TYPE plenum_connections_open gauge"
    );
    for (i, shard) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "plenum_connections_open{{shard=\"{i}\"}} {}",
            shard.connections_open.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP plenum_subscribers_open Open event streams.\n# TYPE plenum_subscribers_open gauge"
    );
    for (i, shard) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "plenum_subscribers_open{{shard=\"{i}\"}} {}",
            shard.subscribers_open.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP plenum_topics Topics with at least one subscriber.\n# TYPE plenum_topics gauge"
    );
    for (i, shard) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "plenum_topics{{shard=\"{i}\"}} {}",
            shard.topics.load(Ordering::Relaxed)
        );
    }
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        &mut out,
        "plenum_connections_accepted_total",
        "Connections accepted.",
        load(&|s| s.accepted.load(Ordering::Relaxed)),
    );
    let _ = writeln!(out, "# HELP plenum_connections_closed_total Connections closed, by reason.\n# TYPE plenum_connections_closed_total counter");
    for reason in CloseReason::ALL {
        let value = load(&|s| s.closed[reason.index()].load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "plenum_connections_closed_total{{reason=\"{}\"}} {value}",
            reason.name()
        );
    }
    counter(
        &mut out,
        "plenum_events_published_total",
        "Events accepted by /publish.",
        hub.published(),
    );
    counter(
        &mut out,
        "plenum_frames_delivered_total",
        "Event frames handed to subscribers.",
        load(&|s| s.frames_delivered.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "plenum_bytes_written_total",
        "Bytes written to sockets.",
        load(&|s| s.bytes_written.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "plenum_heartbeats_total",
        "Heartbeat comments written.",
        load(&|s| s.heartbeats.load(Ordering::Relaxed)),
    );
    let outbox: i64 = shards
        .iter()
        .map(|s| s.outbox_bytes.load(Ordering::Relaxed))
        .sum();
    let _ = writeln!(out, "# HELP plenum_outbox_bytes Bytes pending in outboxes.\n# TYPE plenum_outbox_bytes gauge\nplenum_outbox_bytes {outbox}");
    {
        let history = hub.history();
        let _ = writeln!(
            out,
            "# TYPE plenum_history_events gauge\nplenum_history_events {}",
            history.len()
        );
        let _ = writeln!(
            out,
            "# TYPE plenum_history_bytes gauge\nplenum_history_bytes {}",
            history.bytes()
        );
    }
    counter(
        &mut out,
        "plenum_replays_total",
        "Subscriptions resumed from a Last-Event-ID.",
        load(&|s| s.replays.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "plenum_replays_too_old_total",
        "Gap signals sent.",
        load(&|s| s.replays_too_old.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "plenum_replays_overtaken_total",
        "Replays that history overtook before they were sent; each got a further gap signal.",
        load(&|s| s.replays_overtaken.load(Ordering::Relaxed)),
    );
    let overflows: u64 = hub
        .feeds()
        .iter()
        .map(|f| f.overflows.load(Ordering::Relaxed))
        .sum();
    counter(
        &mut out,
        "plenum_inbox_overflows_total",
        "Events a full shard inbox could not take.",
        overflows,
    );
    counter(
        &mut out,
        "plenum_resyncs_lost_total",
        "Times a shard fell behind history and closed its subscribers.",
        load(&|s| s.resyncs_lost.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "plenum_uring_accept_rearms_total",
        "io_uring: multishot accepts armed again after they ended.",
        load(&|s| s.uring_accept_rearms.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "plenum_uring_accept_table_full_total",
        "io_uring: connections dropped by the kernel because the registered file table was full.",
        load(&|s| s.uring_accept_table_full.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "plenum_uring_cq_overflows_total",
        "io_uring: polls that found completions held back by a full completion queue.",
        load(&|s| s.uring_cq_overflows.load(Ordering::Relaxed)),
    );

    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for shard in shards {
        let histogram = shard.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        let _ = merged.add(&*histogram);
    }
    let _ = writeln!(
        out,
        "# HELP plenum_publish_to_write_seconds From publish to the end of a shard's fan-out pass.\n# TYPE plenum_publish_to_write_seconds summary"
    );
    for quantile in [0.5, 0.9, 0.99, 0.999] {
        let seconds = merged.value_at_quantile(quantile) as f64 / 1e6;
        let _ = writeln!(
            out,
            "plenum_publish_to_write_seconds{{quantile=\"{quantile}\"}} {seconds}"
        );
    }
    let _ = writeln!(
        out,
        "plenum_publish_to_write_seconds_count {}",
        merged.len()
    );
    out
}
