//! `plenum load misbehave`: connections that die or stall in the ways real
//! clients do, to test any server's dead-peer handling.
//!
//! Each connection subscribes (the same GET as `subscribe`), then:
//!
//! | mode | what the client does | what a good server does |
//! |---|---|---|
//! | `stall` | sets a small `SO_RCVBUF` before connect, then never reads | notices the write stall and closes (write-stall deadline, outbox limits) |
//! | `half-close` | `shutdown(SHUT_WR)` after the request, keeps reading | sees the FIN and closes at once |
//! | `reset` | waits for the first response bytes, then closes with `SO_LINGER` 0 (RST) | frees the connection at once |
//! | `vanish` | a child process holds the streams and is killed with SIGKILL | frees them — see below |
//! | `slowloris` | sends the request head one byte per `--byte-interval` | closes it at its header deadline |
//!
//! For every connection the tool watches (without reading, in `stall` mode:
//! `EPOLLRDHUP` and `EPOLLERR` need no read) for the server closing it, and
//! reports how long that took.
//!
//! A stalled reader only sees a server's close if it is a reset: a FIN is
//! queued behind the bytes the server could not send, which this client
//! never takes, so a server that closes a stalled stream with a plain
//! `close()` shows here as "still open at end" (and on the server host as a
//! socket in FIN-WAIT-1 until the kernel gives up on it).
//!
//! About `vanish`: a killed process is not a silent peer. The kernel closes
//! its sockets, sending FIN (or RST when unread data is queued), so on
//! loopback this tests abrupt process death, which the server sees at once.
//! A truly vanished peer (cable pulled, NAT state dropped: no FIN ever) can
//! only be made by taking the network away under the connection, e.g. a
//! client in its own network namespace whose veth link is then deleted, or
//! a firewall rule that drops the flow; that needs root and a setup this
//! tool does not do. The server's keepalive / `TCP_USER_TIMEOUT` handling is
//! what such a test exercises.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::http::{self, HttpUrl};
use super::report::{thousands, write_json, Percentiles};
use super::sys::{self, flags, Epoll};
use super::track::latency_histogram;

/// Fewer connections than the per-process open-file limit allows, with room.
const CONNECTIONS_MAX: u64 = 18_000;

/// Longest epoll wait.
const WAIT_MAX: Duration = Duration::from_millis(100);

/// How a misbehaving connection misbehaves.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Subscribe, then never read again (small receive buffer).
    Stall,
    /// Subscribe, then shutdown(SHUT_WR) and keep reading.
    HalfClose,
    /// Subscribe, then close with SO_LINGER 0 (the server gets an RST).
    Reset,
    /// Subscribe from a child process, then SIGKILL it (see the module docs).
    Vanish,
    /// Send the request head one byte per --byte-interval.
    Slowloris,
    /// Internal (vanish child): subscribe and read normally.
    #[value(skip)]
    Hold,
}

/// `plenum load misbehave`.
#[derive(Debug, Clone, clap::Args)]
pub struct MisbehaveArgs {
    /// Event stream URL, e.g. http://127.0.0.1:8080/events?topic=a.
    #[arg(long, value_name = "URL", value_parser = super::parse_url)]
    pub url: HttpUrl,
    /// Connections (at most 18000).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: u64,
    /// What the connections do.
    #[arg(long, value_name = "MODE", value_enum)]
    pub mode: Mode,
    /// Hard bound on the run.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = super::parse_duration)]
    pub duration: Duration,
    /// New connections per second (0 = no limit).
    #[arg(long, value_name = "PER_SEC", default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// `stall`: SO_RCVBUF set before connect, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    pub receive_buffer_bytes: usize,
    /// `slowloris`: time between request bytes.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = super::parse_duration)]
    pub byte_interval: Duration,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// What happened to the connections.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MisbehaveReport {
    pub command: String,
    pub mode: String,
    pub url: String,
    pub connections: u64,
    pub duration_s: f64,
    pub elapsed_s: f64,
    /// TCP connections established.
    pub connected: u64,
    /// Failed connection attempts by reason.
    pub failed: BTreeMap<String, u64>,
    /// Requests written completely.
    pub requests_sent: u64,
    /// Connections on which response bytes arrived (not known in `stall`).
    pub responses_seen: u64,
    /// Connections the server closed with a FIN.
    pub server_closed: u64,
    /// Connections the server reset (RST or another error).
    pub server_reset: u64,
    /// Connections still open at the end.
    pub open_at_end: u64,
    /// `reset`: RSTs this tool sent. `vanish`: connections held by the killed child.
    pub client_closed: u64,
    /// From the misbehaviour starting (request sent; connect for slowloris)
    /// to the server closing.
    pub server_close_after: Percentiles,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to be opened.
    Pending,
    Connecting,
    /// Writing the request (slowloris: one byte at a time).
    Sending,
    /// Request sent; misbehaving.
    Open,
    /// Finished.
    Closed,
}

struct Conn {
    socket: Option<Socket>,
    phase: Phase,
    generation: u32,
    written: usize,
    /// When the misbehaviour started (for server_close_after).
    since: Instant,
    seen_response: bool,
}

/// The vanish child's plan.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct VanishPlan {
    url: HttpUrl,
    connections: u64,
    duration_ms: u64,
    connect_rate: f64,
}

struct Engine {
    url: HttpUrl,
    mode: Mode,
    receive_buffer_bytes: usize,
    byte_interval: Duration,
    epoll: Epoll,
    conns: Vec<Conn>,
    request: Vec<u8>,
    scratch: Vec<u8>,
    /// Slowloris: when each connection sends its next byte, in order.
    byte_due: VecDeque<(Instant, usize, u32)>,
    close_after_us: Histogram<u64>,
    report: MisbehaveReport,
    /// Connections that reached a settled state (response seen, failed or closed).
    settled: u64,
}

/// Runs `plenum load misbehave`.
pub fn run(args: MisbehaveArgs) -> anyhow::Result<ExitCode> {
    if args.connections == 0 || args.connections > CONNECTIONS_MAX {
        bail!("--connections must be 1 to {CONNECTIONS_MAX} (run several misbehave processes for more)");
    }
    if args.mode == Mode::Vanish {
        return run_vanish(&args);
    }
    sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let mut engine = Engine::new(
        &args.url,
        args.mode,
        args.connections,
        args.receive_buffer_bytes,
        args.byte_interval,
    )?;
    let started = Instant::now();
    engine.run(args.duration, args.connect_rate, &stop, |_| {})?;
    let report = engine.finish(started, args.duration);
    print_report(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(report: &MisbehaveReport) {
    println!(
        "== plenum load misbehave --mode {}: {} for {:.1} s",
        report.mode, report.url, report.elapsed_s
    );
    println!(
        "connections   {} connected of {}, failed {:?}, {} requests sent, {} responses seen",
        thousands(report.connected),
        thousands(report.connections),
        report.failed,
        thousands(report.requests_sent),
        thousands(report.responses_seen)
    );
    println!(
        "server        closed {} (FIN), reset {}, still open at end {}; client closed {}",
        thousands(report.server_closed),
        thousands(report.server_reset),
        thousands(report.open_at_end),
        thousands(report.client_closed)
    );
    println!("closed after  {}", report.server_close_after.line());
    for note in &report.notes {
        println!("note          {note}");
    }
}

/// `vanish`: a child holds the streams; once they are open it is killed.
fn run_vanish(args: &MisbehaveArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let plan = VanishPlan {
        url: args.url.clone(),
        connections: args.connections,
        duration_ms: args.duration.as_millis() as u64,
        connect_rate: args.connect_rate,
    };
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["load", "vanish-child", &serde_json::to_string(&plan)?])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the vanish child")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = io::BufReader::new(stdout)
            .take(64 * 1024)
            .read_line(&mut line);
        let _ = sender.send(line);
    });
    let line = receiver.recv_timeout(args.duration).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let child_report: MisbehaveReport = serde_json::from_str(line.trim()).unwrap_or_default();
    let report = MisbehaveReport {
        command: "misbehave".to_owned(),
        mode: "vanish".to_owned(),
        url: args.url.to_string(),
        connections: args.connections,
        duration_s: args.duration.as_secs_f64(),
        elapsed_s: started.elapsed().as_secs_f64(),
        client_closed: child_report.responses_seen,
        notes: vec![
            "the child holding the streams was killed with SIGKILL; the kernel still closed its sockets (FIN, or RST with unread data), so the server saw the close".to_owned(),
            "a truly silent peer needs the network taken away (network namespace + deleted veth, or a DROP rule); this tool does not do that".to_owned(),
        ],
        ..child_report
    };
    print_report(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The vanish child: opens the streams, prints its report as one line once
/// every stream has a response (or failed), then reads on until killed or
/// the duration ends.
pub fn run_vanish_child(plan_json: &str) -> anyhow::Result<ExitCode> {
    let plan: VanishPlan = serde_json::from_str(plan_json)?;
    sys::raise_nofile_limit()?;
    let stop = AtomicBool::new(false);
    let mut engine = Engine::new(&plan.url, Mode::Hold, plan.connections, 0, Duration::ZERO)?;
    let started = Instant::now();
    let duration = Duration::from_millis(plan.duration_ms);
    let mut announced = false;
    engine.run(duration, plan.connect_rate, &stop, |engine| {
        if !announced && engine.settled == engine.report.connections {
            announced = true;
            let mut report = engine.report.clone();
            report.elapsed_s = started.elapsed().as_secs_f64();
            let mut stdout = io::stdout().lock();
            let _ = serde_json::to_writer(&mut stdout, &report);
            let _ = stdout.write_all(b"\n");
            let _ = stdout.flush();
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

impl Engine {
    fn new(
        url: &HttpUrl,
        mode: Mode,
        connections: u64,
        receive_buffer_bytes: usize,
        byte_interval: Duration,
    ) -> anyhow::Result<Self> {
        let now = Instant::now();
        let mut request = Vec::new();
        http::write_subscribe_request(&mut request, url, None);
        Ok(Engine {
            url: url.clone(),
            mode,
            receive_buffer_bytes,
            byte_interval,
            epoll: Epoll::new()?,
            conns: (0..connections)
                .map(|_| Conn {
                    socket: None,
                    phase: Phase::Pending,
                    generation: 0,
                    written: 0,
                    since: now,
                    seen_response: false,
                })
                .collect(),
            request,
            scratch: vec![0; 64 * 1024],
            byte_due: VecDeque::new(),
            close_after_us: latency_histogram(),
            report: MisbehaveReport {
                command: "misbehave".to_owned(),
                mode: clap::ValueEnum::to_possible_value(&mode)
                    .map_or_else(|| "hold".to_owned(), |value| value.get_name().to_owned()),
                url: url.to_string(),
                connections,
                ..MisbehaveReport::default()
            },
            settled: 0,
        })
    }

    fn run(
        &mut self,
        duration: Duration,
        connect_rate: f64,
        stop: &AtomicBool,
        mut each_turn: impl FnMut(&Engine),
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let deadline = started + duration;
        let interval = (connect_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / connect_rate));
        let mut next_open = 0usize;
        let mut ready = sys::ready_list(1024);
        // Bounded by the deadline.
        loop {
            let now = Instant::now();
            if now >= deadline || stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Nothing left to watch: every connection has been opened and closed.
            if next_open == self.conns.len()
                && self.conns.iter().all(|conn| conn.phase == Phase::Closed)
            {
                return Ok(());
            }
            // Open what the connect rate allows.
            while next_open < self.conns.len() {
                if let Some(interval) = interval {
                    if started + interval.mul_f64(next_open as f64) > now {
                        break;
                    }
                }
                self.open(next_open, now);
                next_open += 1;
            }
            // Slowloris bytes that are due.
            while let Some(&(due, index, generation)) = self.byte_due.front() {
                if due > now {
                    break;
                }
                self.byte_due.pop_front();
                if self.conns[index].generation == generation
                    && self.conns[index].phase == Phase::Sending
                {
                    self.send_bytes(index, now);
                }
            }
            each_turn(self);
            let mut wake = (now + WAIT_MAX).min(deadline);
            if let (Some(interval), true) = (interval, next_open < self.conns.len()) {
                wake = wake.min(started + interval.mul_f64(next_open as f64));
            }
            if let Some(&(due, _, _)) = self.byte_due.front() {
                wake = wake.min(due);
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
    }

    fn open(&mut self, index: usize, now: Instant) {
        let address = self.url.address;
        let receive_buffer_bytes = (self.mode == Mode::Stall).then_some(self.receive_buffer_bytes);
        let result = (|| -> io::Result<Socket> {
            let socket = Socket::new(
                Domain::for_address(address),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            socket.set_tcp_nodelay(true)?;
            if let Some(bytes) = receive_buffer_bytes {
                // Before connect, so the advertised window scale matches the small buffer.
                socket.set_recv_buffer_size(bytes)?;
            }
            match socket.connect(&SockAddr::from(address)) {
                Ok(()) => Ok(socket),
                Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
                Err(error) => Err(error),
            }
        })();
        let conn = &mut self.conns[index];
        conn.generation = conn.generation.wrapping_add(1);
        conn.since = now;
        let socket = match result {
            Ok(socket) => socket,
            Err(error) => return self.failed(index, &error),
        };
        let token = sys::token(index, conn.generation);
        if let Err(error) = self
            .epoll
            .add(socket.as_raw_fd(), flags::OUT | flags::RDHUP, token)
        {
            return self.failed(index, &error);
        }
        let conn = &mut self.conns[index];
        conn.socket = Some(socket);
        conn.phase = Phase::Connecting;
    }

    fn failed(&mut self, index: usize, error: &io::Error) {
        let reason = match error.raw_os_error() {
            Some(libc::ECONNREFUSED) => "refused".to_owned(),
            Some(libc::ETIMEDOUT) => "timeout".to_owned(),
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset".to_owned(),
            Some(errno) => format!("errno_{errno}"),
            None => "other".to_owned(),
        };
        *self.report.failed.entry(reason).or_default() += 1;
        self.close(index);
    }

    fn close(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        conn.socket = None;
        conn.generation = conn.generation.wrapping_add(1);
        if conn.phase != Phase::Closed {
            conn.phase = Phase::Closed;
            if !conn.seen_response {
                self.settled += 1;
            }
        }
    }

    fn set_interest(&self, index: usize, interest: u32) -> io::Result<()> {
        let conn = &self.conns[index];
        let socket = conn.socket.as_ref().expect("an open connection");
        self.epoll.modify(
            socket.as_raw_fd(),
            interest,
            sys::token(index, conn.generation),
        )
    }

    /// Writes request bytes: all of them, or one in slowloris mode.
    fn send_bytes(&mut self, index: usize, now: Instant) {
        let slowloris = self.mode == Mode::Slowloris;
        let conn = &mut self.conns[index];
        let socket = conn.socket.as_ref().expect("sending has a socket");
        let end = if slowloris {
            conn.written + 1
        } else {
            self.request.len()
        };
        let result = (&*socket).write(&self.request[conn.written..end]);
        match result {
            Ok(count) => conn.written += count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                self.report.server_reset += 1;
                self.record_close(index);
                log::debug!("misbehave: write failed: {error}");
                return self.close(index);
            }
        }
        let conn = &mut self.conns[index];
        if conn.written < self.request.len() {
            if slowloris {
                self.byte_due
                    .push_back((now + self.byte_interval, index, conn.generation));
            }
            return;
        }
        // The request is out: start misbehaving.
        conn.phase = Phase::Open;
        self.report.requests_sent += 1;
        if self.mode != Mode::Slowloris {
            conn.since = now;
        }
        let interest = match self.mode {
            Mode::Stall => flags::RDHUP,
            Mode::HalfClose => {
                let socket = conn.socket.as_ref().expect("open has a socket");
                let _ = socket.shutdown(Shutdown::Write);
                flags::IN | flags::RDHUP
            }
            _ => flags::IN | flags::RDHUP,
        };
        if let Err(error) = self.set_interest(index, interest) {
            self.failed(index, &error);
        }
    }

    fn record_close(&mut self, index: usize) {
        let after_us = self.conns[index].since.elapsed().as_micros() as u64;
        self.close_after_us.saturating_record(after_us.max(1));
    }

    fn handle(&mut self, index: usize, ready: u32) {
        let now = Instant::now();
        match self.conns[index].phase {
            Phase::Connecting => {
                let socket = self.conns[index]
                    .socket
                    .as_ref()
                    .expect("connecting has a socket");
                match socket.take_error() {
                    Ok(Some(error)) | Err(error) => return self.failed(index, &error),
                    Ok(None) if ready & (flags::ERR | flags::HUP) != 0 => {
                        return self.failed(index, &io::Error::from_raw_os_error(libc::ECONNRESET))
                    }
                    Ok(None) => {}
                }
                self.report.connected += 1;
                self.conns[index].phase = Phase::Sending;
                if self.mode == Mode::Slowloris {
                    if let Err(error) = self.set_interest(index, flags::RDHUP) {
                        return self.failed(index, &error);
                    }
                }
                self.send_bytes(index, now);
            }
            Phase::Sending if self.mode != Mode::Slowloris && ready & flags::OUT != 0 => {
                self.send_bytes(index, now)
            }
            Phase::Sending | Phase::Open => {
                if ready & flags::ERR != 0 {
                    self.report.server_reset += 1;
                    self.record_close(index);
                    return self.close(index);
                }
                if self.mode == Mode::Stall
                    || (self.mode == Mode::Slowloris && self.conns[index].phase == Phase::Sending)
                {
                    // Not reading: a FIN shows as RDHUP, an RST as HUP/ERR.
                    if ready & (flags::RDHUP | flags::HUP) != 0 {
                        if ready & flags::HUP != 0 && ready & flags::RDHUP == 0 {
                            self.report.server_reset += 1;
                        } else {
                            self.report.server_closed += 1;
                        }
                        self.record_close(index);
                        self.close(index);
                    }
                    return;
                }
                self.read(index);
            }
            Phase::Pending | Phase::Closed => {}
        }
    }

    /// Reads and discards until the socket would block (bounded per call).
    fn read(&mut self, index: usize) {
        for _ in 0..64 {
            let conn = &mut self.conns[index];
            let Some(socket) = &conn.socket else { return };
            match (&*socket).read(&mut self.scratch) {
                Ok(0) => {
                    self.report.server_closed += 1;
                    self.record_close(index);
                    return self.close(index);
                }
                Ok(_) => {
                    if !conn.seen_response {
                        conn.seen_response = true;
                        self.report.responses_seen += 1;
                        self.settled += 1;
                    }
                    if self.mode == Mode::Reset {
                        let socket = conn.socket.as_ref().expect("checked above");
                        let _ = socket.set_linger(Some(Duration::ZERO));
                        self.report.client_closed += 1;
                        return self.close(index); // Dropping the socket sends the RST.
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.report.server_reset += 1;
                    self.record_close(index);
                    return self.close(index);
                }
            }
        }
    }

    fn finish(mut self, started: Instant, duration: Duration) -> MisbehaveReport {
        self.report.open_at_end = self
            .conns
            .iter()
            .filter(|conn| conn.socket.is_some())
            .count() as u64;
        self.conns.clear();
        self.report.elapsed_s = started.elapsed().as_secs_f64();
        self.report.duration_s = duration.as_secs_f64();
        self.report.server_close_after = Percentiles::from_us(&self.close_after_us);
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that answers the stream head, then closes each connection
    /// when the client half-closes (what a good SSE server does).
    #[test]
    fn half_close_is_seen_by_the_server_and_answered_with_a_close() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().unwrap();
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let count = stream.read(&mut buffer).unwrap();
                        head.extend_from_slice(&buffer[..count]);
                    }
                    stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n:ok\n\n",
                        )
                        .unwrap();
                    // Bounded: the client half-closes right after its request.
                    while stream.read(&mut buffer).unwrap_or(0) > 0 {}
                });
            }
        });
        let url = HttpUrl::parse(&format!("http://127.0.0.1:{port}/events")).unwrap();
        let mut engine = Engine::new(&url, Mode::HalfClose, 2, 0, Duration::ZERO).unwrap();
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let mut done = false;
        // Ends by itself once both are closed (stop flag), bounded by 20 s.
        let stop_ref = &stop;
        engine
            .run(Duration::from_secs(20), 0.0, stop_ref, |engine| {
                if engine.report.server_closed == 2 && !done {
                    done = true;
                    stop_ref.store(true, Ordering::Relaxed);
                }
            })
            .unwrap();
        let report = engine.finish(started, Duration::from_secs(20));
        server.join().unwrap();
        assert_eq!(report.connected, 2);
        assert_eq!(report.requests_sent, 2);
        assert_eq!(report.server_closed, 2);
        assert_eq!(report.open_at_end, 0);
    }
}
