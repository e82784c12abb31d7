//! `plenum load publish`: paced `POST`s over keep-alive connections.
//!
//! How it works:
//! 1. Event k (k = 0, 1, …) is due at `start + k / rate`: the schedule comes
//!    from the clock, not from sleeps, so it does not drift. A due event goes
//!    out on the first idle connection; when all `--connections` are busy it
//!    waits (and its lateness is reported) rather than being dropped.
//! 2. The body is `--body` with `{seq}` (seq-start + k) and `{ts}` (Unix
//!    nanoseconds when the request is built, just before it is written)
//!    substituted, padded with a space and `x`s to `--payload-bytes`.
//! 3. One request in flight per connection (no pipelining); the response
//!    head is parsed with httparse and the body skipped (Content-Length or
//!    chunked). A connection the server closes is reopened.
//! 4. The run ends when `--count` events are answered, or at `--duration`
//!    (requests still unanswered then are counted as such).
//!
//! For sequence checks on the subscriber side use one connection: with
//! several, requests race each other to the server and may be published out
//! of order.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::http::{self, Body, HttpUrl};
use super::report::{thousands, write_json, Percentiles};
use super::sys::{self, flags, CpuTime, Epoll};
use super::track::latency_histogram;

/// Most publish connections.
const CONNECTIONS_MAX: usize = 10_000;

/// Largest body, in bytes.
const PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Delay before reopening a connection whose attempt failed.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Delay before reopening a connection the server closed (keeps a server
/// that closes every connection at once from turning this into a busy loop).
const RECONNECT_AFTER_CLOSE_DELAY: Duration = Duration::from_millis(10);

/// Longest epoll wait.
const WAIT_MAX: Duration = Duration::from_millis(100);

/// Sends started per loop turn, at most.
const SENDS_PER_TURN_MAX: usize = 4096;

/// `plenum load publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Publish endpoint, e.g. http://127.0.0.1:8080/publish?topic=a.
    #[arg(long, value_name = "URL", value_parser = super::parse_url)]
    pub url: HttpUrl,
    /// Events per second (0 = as fast as the connections allow).
    #[arg(long, value_name = "PER_SEC", default_value_t = 1.0)]
    pub rate: f64,
    /// Events to publish (default: until --duration).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Hard bound on the whole run.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = super::parse_duration)]
    pub duration: Duration,
    /// Body template: {seq} and {ts} (Unix ns at send) are substituted.
    #[arg(long, value_name = "TEMPLATE", default_value = "seq={seq} ts={ts}")]
    pub body: String,
    /// Pad each body with a space and 'x's to this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub payload_bytes: usize,
    /// Send `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Keep-alive connections (one request in flight on each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: usize,
    /// The first {seq}.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seq_start: u64,
    /// A request unanswered this long counts as timed out and its connection is reopened.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = super::parse_duration)]
    pub request_timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// The publish report.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PublishReport {
    pub command: String,
    pub url: String,
    pub rate_per_s: f64,
    pub count: Option<u64>,
    pub duration_s: f64,
    pub connections: usize,
    pub payload_bytes: usize,
    pub elapsed_s: f64,
    /// Requests written.
    pub sent: u64,
    /// Answered with a 2xx status.
    pub ok: u64,
    /// Answers by status code.
    pub responses: BTreeMap<String, u64>,
    /// Requests lost to the network, by reason (refused, reset, timeout, ...).
    pub errors: BTreeMap<String, u64>,
    /// Requests still unanswered at the end.
    pub unanswered: u64,
    /// Events per second actually sent (over the sending period).
    pub achieved_rate_per_s: f64,
    /// How late the latest send was against the schedule, ms.
    pub send_late_max_ms: f64,
    /// Request written → response complete.
    pub response_time: Percentiles,
    pub first_seq: u64,
    pub last_seq: u64,
    pub client_cpu: CpuTime,
    pub passed: bool,
}

/// Where a publish connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No socket; may connect at `PubConn::retry_at`.
    Closed,
    /// connect() in progress.
    Connecting,
    /// Connected, no request in flight.
    Idle,
    /// Writing a request.
    Sending,
    /// Reading the response head.
    Head,
    /// Skipping the response body.
    Body,
}

struct PubConn {
    socket: Option<Socket>,
    phase: Phase,
    generation: u32,
    retry_at: Instant,
    /// The request being written and how much of it is out.
    request: Vec<u8>,
    written: usize,
    /// Response head bytes when it spans reads.
    head: Vec<u8>,
    body: Body,
    status: u16,
    close_after: bool,
    sent_at: Instant,
}

/// Expands the body template for one event, padded to `payload_bytes`.
pub fn render_body(
    template: &str,
    seq: u64,
    ts_unix_ns: u64,
    payload_bytes: usize,
    out: &mut Vec<u8>,
) {
    out.clear();
    let mut rest = template;
    // Bounded: each pass consumes at least one byte of the template.
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("{seq}") {
            out.extend_from_slice(seq.to_string().as_bytes());
            rest = after;
        } else if let Some(after) = rest.strip_prefix("{ts}") {
            out.extend_from_slice(ts_unix_ns.to_string().as_bytes());
            rest = after;
        } else {
            let next = rest[1..].find('{').map_or(rest.len(), |index| index + 1);
            out.extend_from_slice(&rest.as_bytes()[..next]);
            rest = &rest[next..];
        }
    }
    if payload_bytes > out.len() {
        let pad = payload_bytes - out.len();
        out.push(b' ');
        out.resize(out.len() + pad - 1, b'x');
    }
}

/// Writes a complete publish request (head and body) into `out`.
fn write_request(out: &mut Vec<u8>, url: &HttpUrl, token: Option<&str>, body: &[u8]) {
    out.clear();
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(url.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(url.host_header.as_bytes());
    out.extend_from_slice(
        b"\r\nUser-Agent: plenum-load\r\nContent-Type: text/plain\r\nContent-Length: ",
    );
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(token) = token {
        out.extend_from_slice(b"Authorization: Bearer ");
        out.extend_from_slice(token.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

struct Publisher {
    args: PublishArgs,
    epoll: Epoll,
    conns: Vec<PubConn>,
    report: PublishReport,
    response_us: Histogram<u64>,
    body: Vec<u8>,
    scratch: Vec<u8>,
    in_flight: u64,
}

/// Runs `plenum load publish`.
pub fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    if args.connections == 0 || args.connections > CONNECTIONS_MAX {
        bail!("--connections must be 1 to {CONNECTIONS_MAX}");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a number ≥ 0");
    }
    if args.payload_bytes > PAYLOAD_BYTES_MAX {
        bail!("--payload-bytes above {PAYLOAD_BYTES_MAX} is surely a mistake");
    }
    if let Some(token) = &args.token {
        if token.bytes().any(|byte| byte < b' ' || byte == 0x7f) {
            bail!("--token contains control characters");
        }
    }
    sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let now = Instant::now();
    let conns = (0..args.connections)
        .map(|_| PubConn {
            socket: None,
            phase: Phase::Closed,
            generation: 0,
            retry_at: now,
            request: Vec::new(),
            written: 0,
            head: Vec::new(),
            body: Body::Length(0),
            status: 0,
            close_after: false,
            sent_at: now,
        })
        .collect();
    let mut publisher = Publisher {
        report: PublishReport {
            command: "publish".to_owned(),
            url: args.url.to_string(),
            rate_per_s: args.rate,
            count: args.count,
            duration_s: args.duration.as_secs_f64(),
            connections: args.connections,
            payload_bytes: args.payload_bytes,
            first_seq: args.seq_start,
            ..PublishReport::default()
        },
        args,
        epoll: Epoll::new()?,
        conns,
        response_us: latency_histogram(),
        body: Vec::new(),
        scratch: vec![0; 64 * 1024],
        in_flight: 0,
    };
    publisher.run()?;
    let report = publisher.report;
    println!(
        "== plenum load publish: {} for {:.1} s",
        report.url, report.elapsed_s
    );
    println!(
        "sent          {} ({} ok), achieved {:.1}/s of {}/s, latest send {:.1} ms behind schedule",
        thousands(report.sent),
        thousands(report.ok),
        report.achieved_rate_per_s,
        report.rate_per_s,
        report.send_late_max_ms
    );
    println!(
        "responses     {:?}; errors {:?}; unanswered {}",
        report.responses, report.errors, report.unanswered
    );
    println!("response time {}", report.response_time.line());
    println!("client CPU    {:.2} s", report.client_cpu.total_s());
    if let Some(path) = &publisher.args.json {
        write_json(path, &report)?;
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

impl Publisher {
    fn run(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        let deadline = start + self.args.duration;
        let interval =
            (self.args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / self.args.rate));
        let mut ready = sys::ready_list(256);
        let mut next_index: u64 = 0;
        let mut first_send: Option<Instant> = None;
        let mut last_send = start;
        // Bounded by the deadline.
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let due_at = |index: u64| match interval {
                Some(interval) => start + interval.mul_f64(index as f64),
                None => start,
            };
            let more_to_send = self.args.count.is_none_or(|count| next_index < count)
                && due_at(next_index) < deadline;
            if !more_to_send && self.in_flight == 0 {
                break;
            }
            // Connect closed connections whose retry time has come.
            for index in 0..self.conns.len() {
                if self.conns[index].phase == Phase::Closed && self.conns[index].retry_at <= now {
                    self.connect(index);
                }
            }
            // Request timeouts.
            for index in 0..self.conns.len() {
                let conn = &self.conns[index];
                if matches!(conn.phase, Phase::Sending | Phase::Head | Phase::Body)
                    && now.duration_since(conn.sent_at) >= self.args.request_timeout
                {
                    self.lose_request(index, "timeout");
                }
            }
            // Send what is due, on idle connections.
            let mut sends = 0;
            while more_to_send_now(&self.args, next_index, deadline, due_at(next_index), now)
                && sends < SENDS_PER_TURN_MAX
            {
                let Some(index) = self.conns.iter().position(|conn| conn.phase == Phase::Idle)
                else {
                    break;
                };
                let late = now.saturating_duration_since(due_at(next_index));
                self.report.send_late_max_ms = self
                    .report
                    .send_late_max_ms
                    .max(late.as_secs_f64() * 1000.0);
                self.send(index, self.args.seq_start + next_index);
                first_send.get_or_insert(now);
                last_send = now;
                next_index += 1;
                sends += 1;
            }
            let mut wake = (now + WAIT_MAX).min(deadline);
            // Wake for the next due event only when a connection is free to
            // send it; otherwise a response (an epoll event) frees one.
            let is_any_idle = self.conns.iter().any(|conn| conn.phase == Phase::Idle);
            if is_any_idle
                && more_to_send_now(
                    &self.args,
                    next_index,
                    deadline,
                    due_at(next_index),
                    due_at(next_index),
                )
            {
                wake = wake.min(due_at(next_index).max(now));
            }
            if let Some(retry) = self
                .conns
                .iter()
                .filter(|c| c.phase == Phase::Closed)
                .map(|c| c.retry_at)
                .min()
            {
                wake = wake.min(retry.max(now));
            }
            let count = self
                .epoll
                .wait(&mut ready, wake.saturating_duration_since(Instant::now()))?;
            for event in &ready[..count] {
                let (index, generation) = sys::ready_token(event);
                if self
                    .conns
                    .get(index)
                    .is_some_and(|conn| conn.generation == generation && conn.socket.is_some())
                {
                    self.handle(index, sys::ready_flags(event));
                }
            }
        }
        let elapsed = start.elapsed();
        self.report.elapsed_s = elapsed.as_secs_f64();
        self.report.unanswered = self.in_flight;
        self.report.last_seq = self.args.seq_start + next_index.saturating_sub(1);
        if let Some(first) = first_send {
            let period = last_send.duration_since(first).as_secs_f64()
                + interval.map_or(0.0, |i| i.as_secs_f64());
            if period > 0.0 {
                self.report.achieved_rate_per_s = self.report.sent as f64 / period;
            }
        }
        self.report.response_time = Percentiles::from_us(&self.response_us);
        self.report.client_cpu = sys::cpu_time_self();
        self.report.passed = self.report.ok == self.report.sent
            && self.report.sent > 0
            && self
                .args
                .count
                .is_none_or(|count| self.report.sent == count);
        self.conns.clear();
        Ok(())
    }

    fn connect(&mut self, index: usize) {
        let address = self.args.url.address;
        let result = (|| -> io::Result<Socket> {
            let socket = Socket::new(
                Domain::for_address(address),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            socket.set_tcp_nodelay(true)?;
            match socket.connect(&SockAddr::from(address)) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(error) => return Err(error),
            }
            Ok(socket)
        })();
        let conn = &mut self.conns[index];
        conn.generation = conn.generation.wrapping_add(1);
        match result {
            Ok(socket) => {
                let token = sys::token(index, conn.generation);
                if let Err(error) = self.epoll.add(socket.as_raw_fd(), flags::OUT, token) {
                    log::warn!("publish: epoll add failed: {error}");
                    conn.retry_at = Instant::now() + RECONNECT_DELAY;
                    return;
                }
                conn.socket = Some(socket);
                conn.phase = Phase::Connecting;
            }
            Err(error) => {
                *self
                    .report
                    .errors
                    .entry(connect_error_name(&error))
                    .or_default() += 1;
                conn.retry_at = Instant::now() + RECONNECT_DELAY;
            }
        }
    }

    fn set_interest(&self, index: usize, interest: u32) {
        let conn = &self.conns[index];
        if let Some(socket) = &conn.socket {
            let token = sys::token(index, conn.generation);
            if let Err(error) = self.epoll.modify(socket.as_raw_fd(), interest, token) {
                log::warn!("publish: epoll modify failed: {error}");
            }
        }
    }

    fn send(&mut self, index: usize, seq: u64) {
        render_body(
            &self.args.body,
            seq,
            sys::unix_now_ns(),
            self.args.payload_bytes,
            &mut self.body,
        );
        let conn = &mut self.conns[index];
        write_request(
            &mut conn.request,
            &self.args.url,
            self.args.token.as_deref(),
            &self.body,
        );
        conn.written = 0;
        conn.phase = Phase::Sending;
        conn.sent_at = Instant::now();
        self.report.sent += 1;
        self.in_flight += 1;
        self.write_some(index);
    }

    fn write_some(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        let Some(socket) = &conn.socket else { return };
        // Bounded: each pass writes bytes or leaves.
        while conn.written < conn.request.len() {
            match (&*socket).write(&conn.request[conn.written..]) {
                Ok(count) => conn.written += count,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.set_interest(index, flags::OUT);
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.lose_request(index, &connect_error_name(&error));
                    return;
                }
            }
        }
        conn.phase = Phase::Head;
        conn.head.clear();
        self.set_interest(index, flags::IN | flags::RDHUP);
    }

    fn handle(&mut self, index: usize, ready: u32) {
        match self.conns[index].phase {
            Phase::Connecting => {
                let socket = self.conns[index]
                    .socket
                    .as_ref()
                    .expect("connecting has a socket");
                match socket.take_error() {
                    Ok(None) if ready & (flags::ERR | flags::HUP) == 0 => {
                        self.conns[index].phase = Phase::Idle;
                        self.set_interest(index, flags::IN | flags::RDHUP);
                    }
                    Ok(Some(error)) | Err(error) => {
                        self.drop_connection(index, Some(&connect_error_name(&error)))
                    }
                    Ok(None) => self.drop_connection(index, Some("reset")),
                }
            }
            Phase::Sending => self.write_some(index),
            Phase::Head | Phase::Body => self.read_response(index),
            Phase::Idle => {
                // The server closed (or wrote to) an idle keep-alive connection.
                let mut byte = [0u8; 1];
                let socket = self.conns[index]
                    .socket
                    .as_ref()
                    .expect("idle has a socket");
                match (&*socket).read(&mut byte) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    _ => self.drop_connection(index, None),
                }
            }
            Phase::Closed => {}
        }
    }

    fn read_response(&mut self, index: usize) {
        // Bounded: a response is at most the read cap; the loop ends at WouldBlock, EOF or the end.
        for _ in 0..64 {
            let conn = &mut self.conns[index];
            let Some(socket) = &conn.socket else { return };
            let count = match (&*socket).read(&mut self.scratch) {
                Ok(0) => {
                    if conn.phase == Phase::Body && conn.body == Body::UntilClose {
                        self.complete(index, true);
                    } else {
                        self.lose_request(index, "closed_before_response");
                    }
                    return;
                }
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.lose_request(index, &connect_error_name(&error));
                    return;
                }
            };
            let mut data = &self.scratch[..count];
            let buffered;
            if conn.phase == Phase::Head {
                let parsed = if conn.head.is_empty() {
                    http::parse_response_head(data)
                } else {
                    conn.head.extend_from_slice(data);
                    http::parse_response_head(&conn.head)
                };
                match parsed {
                    Ok(None) => {
                        if conn.head.is_empty() {
                            conn.head.extend_from_slice(data);
                        }
                        continue;
                    }
                    Err(_) => {
                        self.lose_request(index, "bad_response");
                        return;
                    }
                    Ok(Some(head)) => {
                        if (100..200).contains(&head.status) {
                            // An interim response (100 Continue): skip it, wait for the real one.
                            let rest = if conn.head.is_empty() {
                                &data[head.head_bytes..]
                            } else {
                                &conn.head[head.head_bytes..]
                            };
                            conn.head = rest.to_vec();
                            continue;
                        }
                        conn.status = head.status;
                        conn.close_after = head.is_connection_close;
                        conn.body = head.body;
                        conn.phase = Phase::Body;
                        if conn.head.is_empty() {
                            data = &data[head.head_bytes..];
                        } else {
                            buffered = std::mem::take(&mut conn.head);
                            data = &buffered[head.head_bytes..];
                        }
                    }
                }
            }
            let done = match &mut conn.body {
                Body::Length(remaining) => {
                    *remaining = remaining.saturating_sub(data.len() as u64);
                    *remaining == 0
                }
                Body::Chunked(decoder) => match decoder.decode(data, |_| {}) {
                    Ok(_) => decoder.is_done(),
                    Err(_) => {
                        self.lose_request(index, "bad_response");
                        return;
                    }
                },
                Body::UntilClose => false,
            };
            if done {
                self.complete(index, false);
                return;
            }
        }
    }

    /// A response is complete.
    fn complete(&mut self, index: usize, connection_ended: bool) {
        let conn = &mut self.conns[index];
        let status = conn.status;
        self.in_flight -= 1;
        *self.report.responses.entry(status.to_string()).or_default() += 1;
        if (200..300).contains(&status) {
            self.report.ok += 1;
        }
        self.response_us
            .saturating_record((conn.sent_at.elapsed().as_micros() as u64).max(1));
        if connection_ended || conn.close_after {
            self.drop_connection(index, None);
        } else {
            conn.phase = Phase::Idle;
        }
    }

    /// The request in flight on `index` is lost; the connection is reopened.
    fn lose_request(&mut self, index: usize, reason: &str) {
        if matches!(
            self.conns[index].phase,
            Phase::Sending | Phase::Head | Phase::Body
        ) {
            self.in_flight -= 1;
            *self.report.errors.entry(reason.to_owned()).or_default() += 1;
        }
        self.drop_connection(index, None);
    }

    fn drop_connection(&mut self, index: usize, connect_failure: Option<&str>) {
        if let Some(reason) = connect_failure {
            *self.report.errors.entry(reason.to_owned()).or_default() += 1;
        }
        let conn = &mut self.conns[index];
        conn.socket = None;
        conn.phase = Phase::Closed;
        conn.generation = conn.generation.wrapping_add(1);
        conn.retry_at = Instant::now()
            + if connect_failure.is_some() {
                RECONNECT_DELAY
            } else {
                RECONNECT_AFTER_CLOSE_DELAY
            };
    }
}

/// Is event `index` due by `now` and still within the run?
fn more_to_send_now(
    args: &PublishArgs,
    index: u64,
    deadline: Instant,
    due: Instant,
    now: Instant,
) -> bool {
    args.count.is_none_or(|count| index < count) && due < deadline && due <= now
}

fn connect_error_name(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".to_owned(),
        Some(libc::ETIMEDOUT) => "timeout".to_owned(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset".to_owned(),
        Some(errno) => format!("errno_{errno}"),
        None => "other".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_template() {
        let mut out = Vec::new();
        render_body("seq={seq} ts={ts}", 7, 123, 0, &mut out);
        assert_eq!(out, b"seq=7 ts=123");
        render_body("{seq}{seq}-{x}{ts", 1, 2, 0, &mut out);
        assert_eq!(out, b"11-{x}{ts");
        render_body("seq={seq} ts={ts}", 7, 123, 20, &mut out);
        assert_eq!(out, b"seq=7 ts=123 xxxxxxx");
        assert_eq!(out.len(), 20);
        render_body("seq={seq}", 7, 123, 6, &mut out);
        assert_eq!(out, b"seq=7 ");
        render_body("", 7, 123, 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn request_format() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/publish?topic=a").unwrap();
        let mut out = Vec::new();
        write_request(&mut out, &url, Some("secret"), b"seq=1");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /publish?topic=a HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(text.contains("Content-Length: 5\r\n"));
        assert!(text.contains("Authorization: Bearer secret\r\n"));
        assert!(text.ends_with("\r\n\r\nseq=1"));
    }
}
