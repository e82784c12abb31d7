//! Steady event flows for the reliability suite: a paced publisher, readers that
//! keep every id they receive, samplers of the server's memory, and the memory bound
//! computed from the server's flags.
//!
//! How the pieces fit: the test opens its subscribers, starts [`publish_paced`] and
//! one [`read_stream`] per subscriber on scoped threads; when the publisher has
//! published its last event it stores that id in [`Flow::final_id`], and each reader
//! stops once it has received it. A reader never panics: it returns what it saw (and
//! why it stopped early, if it did), so one failed reader does not leave the others
//! waiting, and the test asserts on every outcome at the end.
//!
//! Event bodies are `seq=<n> ts=<unix-nanos> ` padded to the wanted size, the same
//! convention as `plenum load publish`, so readers can measure publish-to-receive
//! latency.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use super::{payload, Server, SseClient, SseItem, StreamEnd, Subscribe};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Unix time in nanoseconds.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// An event body of exactly `bytes` bytes (at least the header's length) that
/// starts with `seq=<seq> ts=<now in unix nanos> `.
pub fn event_body(seq: u64, bytes: usize) -> Vec<u8> {
    let header = format!("seq={seq} ts={} ", unix_nanos());
    let mut body = header.into_bytes();
    if body.len() < bytes {
        body.extend_from_slice(payload(seq, bytes - body.len()).as_bytes());
    }
    body
}

/// The `ts=` value of an event body, if present.
pub fn body_ts(data: &str) -> Option<u64> {
    let rest = &data[data.find("ts=")? + 3..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// State shared by the publisher and the readers of one flow.
#[derive(Default)]
pub struct Flow {
    /// The id of the last event published; 0 while the publisher is still running.
    pub final_id: AtomicU64,
    /// Events published so far.
    pub published: AtomicU64,
    /// Set by the test to stop the publisher early.
    pub stop: AtomicBool,
    /// Readers put the latency of events whose seq is at or above this (when not
    /// 0) into [`ReaderOutcome::latency_after_us`], the rest into `latency_before_us`.
    pub latency_split_seq: AtomicU64,
}

impl Flow {
    pub fn new() -> Flow {
        Flow::default()
    }

    /// Waits until at least `count` events have been published (false on timeout).
    pub fn wait_published(&self, count: u64, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.published.load(Ordering::Relaxed) >= count)
    }
}

/// What the paced publisher did.
pub struct Published {
    /// Ids in publish order.
    pub ids: Vec<u64>,
    pub elapsed: Duration,
    /// The keep-alive publisher, handed back so that its close does not count
    /// among the closes the test checks.
    pub connection: super::Publisher,
}

impl Published {
    pub fn rate_per_second(&self) -> f64 {
        self.ids.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Publishes `rate` events per second of `event_bytes` bytes to `topic` for
/// `duration` (or until [`Flow::stop`]), on one keep-alive connection. Pacing: the
/// n-th event is due at n / rate; a publisher that fell behind catches up without
/// sleeping. Stores the last id in [`Flow::final_id`] before returning.
pub fn publish_paced(
    server: &Server,
    flow: &Flow,
    topic: &str,
    rate: u64,
    event_bytes: usize,
    duration: Duration,
) -> Published {
    publish(server, flow, topic, rate, event_bytes, |seq, elapsed| {
        elapsed < duration || seq == 0
    })
}

/// Like [`publish_paced`], but publishes exactly `count` events (fewer only if
/// [`Flow::stop`] is set).
pub fn publish_count(
    server: &Server,
    flow: &Flow,
    topic: &str,
    rate: u64,
    event_bytes: usize,
    count: u64,
) -> Published {
    publish(server, flow, topic, rate, event_bytes, |seq, _| seq < count)
}

fn publish(
    server: &Server,
    flow: &Flow,
    topic: &str,
    rate: u64,
    event_bytes: usize,
    mut more: impl FnMut(u64, Duration) -> bool,
) -> Published {
    let mut publisher = server.publisher();
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut seq = 0u64;
    while more(seq, started.elapsed()) && !flow.stop.load(Ordering::Relaxed) {
        ids.push(publisher.publish(&[topic], None, &event_body(seq, event_bytes)));
        seq += 1;
        flow.published.store(seq, Ordering::Relaxed);
        let due = Duration::from_nanos(seq * 1_000_000_000 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait); // pacing, not synchronisation
        }
    }
    let elapsed = started.elapsed();
    if let Some(last) = ids.last() {
        flow.final_id.store(*last, Ordering::Relaxed);
    }
    Published {
        ids,
        elapsed,
        connection: publisher,
    }
}

/// How a reader (re)connects.
#[derive(Clone)]
pub struct ReaderPlan {
    /// Where to connect: the server, or a proxy in front of it.
    pub addr: SocketAddr,
    pub topic: String,
    /// Reopen a stream that ends, with `Last-Event-ID` (as a browser's EventSource).
    pub reconnect: bool,
    /// `SO_RCVLOWAT`: a read waits for this many bytes (or its 100 ms timeout, when
    /// it returns what there is). Cuts the reader threads' wake-ups — 100 threads
    /// woken for every 1 KiB event take both cores of a small machine — at the
    /// price of up to `bytes / rate` of added latency; leave `None` where latency
    /// is measured.
    pub recv_lowat: Option<usize>,
}

/// What one reader saw.
pub struct ReaderOutcome {
    /// Ids received, in order, over all its connections.
    pub ids: Vec<u64>,
    /// Streams reopened after an end.
    pub reconnects: usize,
    /// `plenum-gap` signals received.
    pub gap_signals: usize,
    /// `retry:` hints received.
    pub retries: usize,
    /// Publish-to-receive latency (µs) of events before the split seq.
    pub latency_before_us: Histogram<u64>,
    /// ... and at or after it.
    pub latency_after_us: Histogram<u64>,
    /// Set when the reader stopped because it was told to die.
    pub died_at: Option<Instant>,
    /// Why the reader stopped before the final event, if it did.
    pub failure: Option<String>,
    /// The open stream of a reader that received the final event, handed back so
    /// that its close does not count among the closes the test checks.
    pub client: Option<SseClient>,
}

/// A latency histogram in microseconds, 1 µs to 100 s, 3 significant digits.
pub fn latency_histogram_us() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("histogram bounds")
}

/// A reader gives up after this long without an event while events flow.
pub const READER_QUIET_MAX: Duration = Duration::from_secs(5);

/// Reads `client`'s stream until it has received [`Flow::final_id`], keeping every
/// id. With `die`, the reader closes its socket (abruptly: unread bytes make it an
/// RST) as soon as `die` is set, and returns. With `plan.reconnect`, an ended
/// stream is reopened with `Last-Event-ID`.
pub fn read_stream(
    flow: &Flow,
    plan: &ReaderPlan,
    client: SseClient,
    die: Option<&AtomicBool>,
) -> ReaderOutcome {
    let mut outcome = ReaderOutcome {
        ids: Vec::new(),
        reconnects: 0,
        gap_signals: 0,
        retries: 0,
        latency_before_us: latency_histogram_us(),
        latency_after_us: latency_histogram_us(),
        died_at: None,
        failure: None,
        client: None,
    };
    if let Some(bytes) = plan.recv_lowat {
        set_recv_lowat(client.stream(), bytes);
    }
    let mut client = Some(client);
    let mut quiet_since = Instant::now();
    loop {
        if die.is_some_and(|die| die.load(Ordering::Relaxed)) {
            drop(client.take());
            outcome.died_at = Some(Instant::now());
            return outcome;
        }
        let final_id = flow.final_id.load(Ordering::Relaxed);
        if final_id != 0 && outcome.ids.last().is_some_and(|id| *id >= final_id) {
            outcome.client = client;
            return outcome;
        }
        let Some(stream) = client.as_mut() else {
            // Reconnecting (only with plan.reconnect).
            let mut request = Subscribe::topics(&[&plan.topic]);
            if let Some(last) = outcome.ids.last() {
                request = request.last_event_id_header(last);
            }
            match SseClient::try_open(plan.addr, &request) {
                Ok(reopened) => {
                    if let Some(bytes) = plan.recv_lowat {
                        set_recv_lowat(reopened.stream(), bytes);
                    }
                    outcome.reconnects += 1;
                    client = Some(reopened);
                }
                Err(error) => {
                    outcome.failure = Some(format!("reconnect failed: {error:?}"));
                    return outcome;
                }
            }
            continue;
        };
        match stream.next_item(Duration::from_millis(100)) {
            Ok(SseItem::Event(event)) => {
                quiet_since = Instant::now();
                if event.is_gap() {
                    outcome.gap_signals += 1;
                    continue;
                }
                outcome.ids.push(event.id());
                if let Some(ts) = body_ts(&event.data()) {
                    let latency_us = unix_nanos().saturating_sub(ts) / 1000;
                    let seq = body_seq(&event.data()).unwrap_or(0);
                    let split = flow.latency_split_seq.load(Ordering::Relaxed);
                    let histogram = if split != 0 && seq >= split {
                        &mut outcome.latency_after_us
                    } else {
                        &mut outcome.latency_before_us
                    };
                    histogram.saturating_record(latency_us.max(1));
                }
            }
            Ok(SseItem::Retry(_)) => outcome.retries += 1,
            Ok(SseItem::Comment(_)) => {}
            Err(StreamEnd::Timeout) => {
                let flowing = flow.published.load(Ordering::Relaxed) > 0;
                if flowing && quiet_since.elapsed() > READER_QUIET_MAX {
                    outcome.failure = Some(format!(
                        "no event for {READER_QUIET_MAX:?} while events flow (last id {:?})",
                        outcome.ids.last()
                    ));
                    return outcome;
                }
            }
            Err(end) if plan.reconnect => {
                let _ = end;
                client = None;
            }
            Err(end) => {
                outcome.failure = Some(format!(
                    "stream ended ({end:?}) after {} events",
                    outcome.ids.len()
                ));
                return outcome;
            }
        }
    }
}

/// Sets `SO_RCVLOWAT` on `stream`.
pub fn set_recv_lowat(stream: &std::net::TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = bytes as libc::c_int;
    // SAFETY: setsockopt on an open socket we borrow, with a pointer to a c_int
    // that lives for the call and its exact size.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "SO_RCVLOWAT: {}", io::Error::last_os_error());
}

/// The `seq=` value of an event body, if present.
pub fn body_seq(data: &str) -> Option<u64> {
    let rest = data.strip_prefix("seq=")?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Asserts that a reader received exactly `published` (every event, in order, no
/// duplicate, no gap) and stopped for no other reason.
pub fn assert_received_all(outcome: &ReaderOutcome, published: &[u64], who: &str) {
    if let Some(failure) = &outcome.failure {
        panic!("{who}: {failure}");
    }
    assert_eq!(
        outcome.gap_signals, 0,
        "{who}: received a plenum-gap signal"
    );
    if outcome.ids != published {
        let first_difference = outcome
            .ids
            .iter()
            .zip(published)
            .position(|(a, b)| a != b)
            .unwrap_or(outcome.ids.len().min(published.len()));
        panic!(
            "{who}: received {} events, published {}; first difference at index {first_difference}: got {:?}, expected {:?}",
            outcome.ids.len(),
            published.len(),
            outcome.ids.get(first_difference..(first_difference + 3).min(outcome.ids.len())),
            published.get(first_difference..(first_difference + 3).min(published.len())),
        );
    }
}

/// Periodic samples of one number (RSS, kernel TCP memory) taken on a thread until
/// stopped.
pub struct Samples {
    pub values: Vec<(Duration, u64)>,
}

impl Samples {
    /// Samples `read` every `interval` until `stop` is set.
    pub fn collect(
        stop: &AtomicBool,
        interval: Duration,
        mut read: impl FnMut() -> Option<u64>,
    ) -> Samples {
        let started = Instant::now();
        let mut values = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some(value) = read() {
                values.push((started.elapsed(), value));
            }
            std::thread::sleep(interval); // sampling period
        }
        Samples { values }
    }

    /// The largest sample and when it was taken.
    pub fn peak(&self) -> (Duration, u64) {
        self.values
            .iter()
            .copied()
            .max_by_key(|(_, value)| *value)
            .expect("at least one sample")
    }

    pub fn first_above(&self, bound: u64) -> Option<(Duration, u64)> {
        self.values
            .iter()
            .copied()
            .find(|(_, value)| *value > bound)
    }
}

/// `mem` of the `TCP:` line of `/proc/net/sockstat`: pages of kernel memory held
/// by TCP sockets, host-wide (the figure `tcp_mem` limits).
pub fn sockstat_tcp_mem_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|line| line.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The page size, for `/proc/net/sockstat` figures.
pub fn page_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// The server's memory bound from its flags (README, "Memory"; DESIGN.md
/// invariant 1):
///
/// ```text
/// RSS ≤ base                                      measured right after start
///     + connections × 2 KiB                       per-connection state (Conn, topic index, slab)
///     + history_bytes_max + history_events_max × 256 B   history and per-event overhead
///     + outboxes × outbox_bytes_hard              every backlogged outbox full
///     + shards × shard_inbox_events × 16 B        inbox slots
///     + requests × (request_head_bytes_max + publish_body_bytes_max)   requests in flight
/// ```
#[derive(Clone, Debug)]
pub struct RssBound {
    pub base: u64,
    pub connections: u64,
    pub history_bytes_max: u64,
    pub history_events_max: u64,
    /// Connections that may hold a (full) outbox at the same time.
    pub outboxes: u64,
    pub outbox_bytes_hard: u64,
    pub shards: u64,
    pub shard_inbox_events: u64,
    /// Requests that may be in flight at once (subscriptions being opened, publishes).
    pub requests: u64,
    pub request_head_bytes_max: u64,
    pub publish_body_bytes_max: u64,
}

pub const PER_CONNECTION_BYTES_MAX: u64 = 2 * KIB;
pub const PER_EVENT_OVERHEAD_BYTES: u64 = 256;
pub const INBOX_SLOT_BYTES: u64 = 16;

impl RssBound {
    pub fn bytes(&self) -> u64 {
        self.base
            + self.connections * PER_CONNECTION_BYTES_MAX
            + self.history_bytes_max
            + self.history_events_max * PER_EVENT_OVERHEAD_BYTES
            + self.outboxes * self.outbox_bytes_hard
            + self.shards * self.shard_inbox_events * INBOX_SLOT_BYTES
            + self.requests * (self.request_head_bytes_max + self.publish_body_bytes_max)
    }

    /// The formula with this run's numbers, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} MiB = base {} MiB + {} conns × 2 KiB + history {} MiB + {} events × 256 B + {} outboxes × {} KiB + {} shards × {} × 16 B + {} requests × ({} KiB + {} KiB)",
            self.bytes() / MIB,
            self.base / MIB,
            self.connections,
            self.history_bytes_max / MIB,
            self.history_events_max,
            self.outboxes,
            self.outbox_bytes_hard / KIB,
            self.shards,
            self.shard_inbox_events,
            self.requests,
            self.request_head_bytes_max / KIB,
            self.publish_body_bytes_max / KIB,
        )
    }

    /// Asserts every sample is under the bound; prints the peak.
    pub fn assert_holds(&self, samples: &Samples, context: &str) {
        let (peak_at, peak) = samples.peak();
        println!(
            "{context}: RSS base {:.1} MiB, peak {:.1} MiB at {peak_at:.1?}; bound {}",
            self.base as f64 / MIB as f64,
            peak as f64 / MIB as f64,
            self.describe()
        );
        if let Some((at, rss)) = samples.first_above(self.bytes()) {
            panic!(
                "{context}: RSS {rss} B at {at:?} exceeds the bound {}",
                self.describe()
            );
        }
    }
}

/// Opens `count` subscribers to `addr` (the server or a proxy) on `topic`, failing
/// with the error of the first that does not open.
pub fn open_subscribers(addr: SocketAddr, topic: &str, count: usize) -> io::Result<Vec<SseClient>> {
    (0..count)
        .map(|_| {
            SseClient::try_open(addr, &Subscribe::topics(&[topic]))
                .map_err(|error| io::Error::other(format!("subscribe via {addr}: {error:?}")))
        })
        .collect()
}

/// Summary of merged latency histograms: `p50 / p99 / max` in ms.
pub fn latency_line(histogram: &Histogram<u64>) -> String {
    if histogram.is_empty() {
        return "no samples".to_string();
    }
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms over {} events",
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.value_at_quantile(0.999) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0,
        histogram.len()
    )
}

/// Default bound for waiting on a reclaim the test expects "at once".
pub const AT_ONCE: Duration = Duration::from_secs(1);

/// TCP sockets on this host (this network namespace) in `state` (an `ss` state
/// name such as `close-wait`) whose local port is `port`, from `ss -Htn`. Skips
/// the test when `ss` (iproute2) is missing.
pub fn sockets_in_state(state: &str, port: u16) -> Vec<String> {
    let filter = format!("( sport = :{port} )");
    let output = std::process::Command::new("ss")
        .args(["-Htn", "state", state, &filter])
        .output();
    let output = match output {
        Ok(output) if output.status.success() => output,
        Ok(output) => panic!(
            "ss -Htn state {state} {filter:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => super::skip(format!(
            "`ss` (iproute2) is needed to look for sockets in {state}: {error}"
        )),
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// A temp directory removed on drop.
pub struct TempDir {
    path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("cannot create {path:?}: {error}"));
        TempDir { path }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Sets a flag when dropped, also while unwinding: put one at the top of a
/// `thread::scope` closure so a failed assertion stops the samplers and the
/// publisher instead of leaving the scope waiting for them forever.
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
