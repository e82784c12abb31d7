//! The integration-test harness: real `plenum serve` processes, real sockets, no mocks.
//!
//! What it offers, and why each piece looks the way it does:
//!
//! - [`backend_tests!`] turns `fn name(backend: Backend) { .. }` into two `#[test]`s,
//!   `name_epoll` and `name_uring`, so every behaviour is checked on both I/O backends.
//!   The io_uring variant skips (with a printed reason) while [`URING_ENABLED`] is
//!   false, or when the server says io_uring is unavailable at start; under `CI=true`
//!   an unavailable backend is a failure, not a skip.
//! - [`Server`] spawns `plenum serve --listen 127.0.0.1:0 --backend B ..`, reads the
//!   `listening ADDR` line from its stdout (bounded wait), keeps the tail of its stderr
//!   for failure messages, and kills the process on drop. Each test has its own server
//!   and port.
//! - [`SseClient`] is a blocking subscriber with an incremental SSE parser that follows
//!   the WHATWG line rules (CRLF, CR and LF all end a line, also split across reads).
//! - [`HttpConn`] is a blocking HTTP/1.1 client (keep-alive aware) for publishing,
//!   scraping and sending deliberately malformed requests.
//! - [`Metrics`] is a parsed `/metrics` scrape with label-order-insensitive lookup.
//! - [`wait_until`] polls server-side state that has no client-visible event (a
//!   metric). Tests never use a bare sleep to synchronise with the server.
//!
//! Environment: `CI=true` turns skips into failures; `PLENUM_TEST_SERVER_BIN=PATH`
//! runs the suite against another server build; `PLENUM_MEMORY_BOUND_SECS=N`
//! shortens the memory-bound flood (default 30 s). The suite expects
//! `--test-threads=1` (heavy tests share 2 cores and the host's TCP memory), but
//! every test has its own server and port and relies on no global state.

#![allow(dead_code)] // Each test crate uses a different part of the harness.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub mod flow;
pub mod netns;
pub mod nginx;
pub mod reliability;

/// The io_uring backend (`--backend uring`) is built: every `*_uring` test runs. While false,
/// every `*_uring` test prints a SKIP line and returns, so only epoll runs.
pub const URING_ENABLED: bool = true;

/// Default bound for one blocking network step (connect, a response, an event).
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server may take to print `listening ADDR`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of server stderr kept for failure messages.
const STDERR_LINES_KEPT: usize = 400;

// ---------------------------------------------------------------------------
// Backends, skipping, the test macro
// ---------------------------------------------------------------------------

/// The I/O backend a test server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Epoll,
    Uring,
}

impl Backend {
    /// The value of `--backend`.
    pub fn flag(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::Uring => "uring",
        }
    }

    /// Whether a `plenum_info{backend=..}` label names this backend.
    pub fn matches_label(self, label: &str) -> bool {
        match self {
            Backend::Epoll => label == "epoll",
            Backend::Uring => label == "uring" || label == "io_uring",
        }
    }
}

/// True when running under CI (`CI=true`): skips become failures.
pub fn is_ci() -> bool {
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true") | Ok("TRUE") | Ok("1")
    )
}

/// Panic payload that [`run_backend_test`] turns into a printed SKIP.
pub struct Skip(pub String);

/// Ends the current test as skipped with `reason` — or fails it under `CI=true`, where
/// every test must run. Uses `resume_unwind` so no panic message is printed for a skip.
pub fn skip(reason: impl Into<String>) -> ! {
    let reason = reason.into();
    if is_ci() {
        panic!("cannot run here, and CI=true turns skips into failures: {reason}");
    }
    std::panic::resume_unwind(Box::new(Skip(reason)))
}

/// Writes a line straight to the process's stderr, past libtest's output capture, so
/// SKIP lines are visible in a normal `cargo test` run.
pub fn print_uncaptured(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Runs one backend's variant of a test, turning a [`Skip`] into a printed line.
pub fn run_backend_test(name: &str, backend: Backend, body: impl FnOnce(Backend)) {
    let full_name = format!("{name}_{}", backend.flag());
    if backend == Backend::Uring && !URING_ENABLED {
        print_uncaptured(&format!("SKIP {full_name}: io_uring backend not built yet"));
        return;
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(backend))) {
        Ok(()) => {}
        Err(payload) => match payload.downcast::<Skip>() {
            Ok(skip) => print_uncaptured(&format!("SKIP {full_name}: {}", skip.0)),
            Err(payload) => std::panic::resume_unwind(payload),
        },
    }
}

/// `backend_tests! { fn name(backend: Backend) { body } ... }` generates
/// `#[test] fn name_epoll()` and `#[test] fn name_uring()` for each function.
#[macro_export]
macro_rules! backend_tests {
    ($( $(#[$meta:meta])* fn $name:ident($backend:ident : Backend) $body:block )*) => {
        $(
            paste::paste! {
                $(#[$meta])*
                #[test]
                fn [<$name _epoll>]() {
                    $crate::common::run_backend_test(
                        stringify!($name),
                        $crate::common::Backend::Epoll,
                        #[allow(unused_variables)]
                        |$backend: $crate::common::Backend| $body,
                    );
                }

                $(#[$meta])*
                #[test]
                fn [<$name _uring>]() {
                    $crate::common::run_backend_test(
                        stringify!($name),
                        $crate::common::Backend::Uring,
                        #[allow(unused_variables)]
                        |$backend: $crate::common::Backend| $body,
                    );
                }
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `condition` every 10 ms until it holds (true) or `timeout` passes (false).
/// For server-side state with no client-visible event; never a substitute for
/// waiting on an event the client can see.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that `ids` strictly increase (the order and no-duplicate invariant).
pub fn assert_strictly_increasing(ids: &[u64], context: &str) {
    for pair in ids.windows(2) {
        assert!(
            pair[0] < pair[1],
            "{context}: ids not strictly increasing: {} then {} (all: {ids:?})",
            pair[0],
            pair[1]
        );
    }
}

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// Why a server did not come up.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status, if the process exited (None: it was killed after the start timeout).
    pub status: Option<ExitStatus>,
    pub stderr: String,
    pub stdout: String,
    pub timed_out: bool,
}

/// Tail of a child's stderr, collected by a thread.
#[derive(Default)]
struct LogTail {
    lines: VecDeque<String>,
    total: usize,
}

impl LogTail {
    fn text(&self) -> String {
        let mut out = String::new();
        if self.total > self.lines.len() {
            out.push_str(&format!(
                "[.. {} earlier lines dropped ..]\n",
                self.total - self.lines.len()
            ));
        }
        for line in &self.lines {
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

fn collect_lines(
    reader: impl Read + Send + 'static,
    tail: Arc<Mutex<LogTail>>,
    forward: Option<mpsc::Sender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let reader = BufReader::new(reader);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if let Some(forward) = &forward {
                let _ = forward.send(line.clone());
            }
            let mut tail = tail.lock().unwrap();
            tail.total += 1;
            tail.lines.push_back(line);
            if tail.lines.len() > STDERR_LINES_KEPT {
                tail.lines.pop_front();
            }
        }
    })
}

/// A running `plenum serve`. Killed (SIGKILL) on drop if still running.
pub struct Server {
    child: Mutex<Child>,
    pid: u32,
    addr: SocketAddr,
    backend: Backend,
    token: Option<String>,
    stderr: Arc<Mutex<LogTail>>,
    stdout: Arc<Mutex<LogTail>>,
    publisher: Mutex<Option<Publisher>>,
}

fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    for (index, arg) in args.iter().enumerate() {
        if *arg == flag {
            return args.get(index + 1).copied();
        }
        if let Some(value) = arg.strip_prefix(&prefix) {
            return Some(value);
        }
    }
    None
}

impl Server {
    /// Starts `plenum serve --listen 127.0.0.1:0 --backend B <args>` and waits for
    /// `listening ADDR`. `--listen` / `--backend` in `args` replace the defaults.
    /// Panics with the server's stderr if it does not come up; skips the test when the
    /// io_uring backend is unavailable (see [`skip`]).
    pub fn start(backend: Backend, args: &[&str]) -> Server {
        match Server::try_start(backend, args) {
            Ok(server) => server,
            Err(failure) => panic!(
                "plenum serve {args:?} did not start (exit {:?}, timed out: {}).\n--- stderr ---\n{}\n--- stdout ---\n{}",
                failure.status, failure.timed_out, failure.stderr, failure.stdout
            ),
        }
    }

    /// Like [`Server::start`], but returns the failure instead of panicking (for
    /// config validation tests). Still skips when io_uring is unavailable.
    pub fn try_start(backend: Backend, args: &[&str]) -> Result<Server, StartFailure> {
        // `PLENUM_TEST_SERVER_BIN` runs the suite against another build of the server.
        let program = std::env::var_os("PLENUM_TEST_SERVER_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_plenum").into());
        let mut command = Command::new(&program);
        command.arg("serve");
        if flag_value(args, "--listen").is_none() {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if flag_value(args, "--backend").is_none() {
            command.args(["--backend", backend.flag()]);
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot spawn {program:?}: {error}"));
        let pid = child.id();

        let stderr = Arc::new(Mutex::new(LogTail::default()));
        let stdout = Arc::new(Mutex::new(LogTail::default()));
        let stderr_thread = collect_lines(child.stderr.take().unwrap(), stderr.clone(), None);
        let (line_sender, line_receiver) = mpsc::channel();
        let stdout_thread = collect_lines(
            child.stdout.take().unwrap(),
            stdout.clone(),
            Some(line_sender),
        );

        let deadline = Instant::now() + START_TIMEOUT;
        let listening = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match line_receiver.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("listening ") {
                        let addr: SocketAddr = rest.trim().parse().unwrap_or_else(|error| {
                            panic!("start-up line {line:?} does not hold an address: {error}")
                        });
                        break Ok(addr);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    break Err(true);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break Err(false),
            }
        };

        let addr = match listening {
            Ok(addr) => addr,
            Err(timed_out) => {
                let status = wait_child(&mut child, Duration::from_secs(5));
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let _ = stderr_thread.join();
                let _ = stdout_thread.join();
                let failure = StartFailure {
                    status,
                    stderr: stderr.lock().unwrap().text(),
                    stdout: stdout.lock().unwrap().text(),
                    timed_out,
                };
                if backend == Backend::Uring && failure.stderr.contains("io_uring") {
                    skip(format!(
                        "io_uring backend unavailable: {}",
                        failure.stderr.trim()
                    ));
                }
                return Err(failure);
            }
        };
        // A wildcard listen address is reached through loopback.
        let addr = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
            }
            _ => addr,
        };

        let server = Server {
            child: Mutex::new(child),
            pid,
            addr,
            backend,
            token: flag_value(args, "--publish-token").map(str::to_string),
            stderr,
            stdout,
            publisher: Mutex::new(None),
        };
        server.assert_backend_in_use();
        Ok(server)
    }

    /// `plenum_info{backend=..}` must name the backend the test asked for, so a uring
    /// test that silently ran on epoll fails.
    fn assert_backend_in_use(&self) {
        let metrics = self.metrics();
        let info = metrics.series("plenum_info");
        assert!(
            !info.is_empty(),
            "/metrics has no plenum_info series:\n{}",
            metrics.raw
        );
        let backend_label = info[0].0.get("backend").cloned().unwrap_or_default();
        assert!(
            self.backend.matches_label(&backend_label),
            "asked for --backend {} but plenum_info says backend={backend_label:?}",
            self.backend.flag()
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The publish token given with `--publish-token`, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The last lines the server wrote to stderr.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().text()
    }

    /// Everything after the start-up line the server wrote to stdout (tail).
    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().text()
    }

    // --- HTTP conveniences -------------------------------------------------

    /// One request on a fresh connection with `Connection: close`.
    pub fn get(&self, path: &str) -> io::Result<Response> {
        let mut conn = HttpConn::connect(self.addr)?;
        conn.request("GET", path, &[("Connection", "close")], b"")
    }

    /// `GET /metrics`, parsed; errors if the scrape failed or was not a 200.
    pub fn try_metrics(&self) -> io::Result<Metrics> {
        Self::scrape(HttpConn::connect(self.addr)?)
    }

    /// `GET /metrics` from a given local address (for per-address limits).
    pub fn try_metrics_from(&self, source: IpAddr) -> io::Result<Metrics> {
        Self::scrape(HttpConn::connect_from(self.addr, Some(source), None)?)
    }

    fn scrape(mut conn: HttpConn) -> io::Result<Metrics> {
        let response = conn.request("GET", "/metrics", &[("Connection", "close")], b"")?;
        if response.status != 200 {
            return Err(io::Error::other(format!(
                "GET /metrics answered {}: {}",
                response.status,
                response.text()
            )));
        }
        Ok(Metrics::parse(&response.text()))
    }

    /// `GET /metrics`, parsed; panics (with server stderr) if it fails.
    pub fn metrics(&self) -> Metrics {
        self.try_metrics().unwrap_or_else(|error| {
            panic!(
                "GET /metrics failed: {error}\n--- server stderr ---\n{}",
                self.stderr_text()
            )
        })
    }

    /// `plenum_connections_open` with no client connected but the scrape itself: the
    /// least of three scrapes (a previous scrape's connection may still be closing).
    pub fn baseline_connections_open(&self) -> f64 {
        (0..3)
            .map(|_| self.metrics().connections_open())
            .fold(f64::INFINITY, f64::min)
    }

    /// Polls `/metrics` until `predicate` holds; panics after `timeout` with `what`
    /// and the last scrape. Returns the scrape that satisfied the predicate.
    pub fn wait_for_metrics(
        &self,
        timeout: Duration,
        what: &str,
        mut predicate: impl FnMut(&Metrics) -> bool,
    ) -> Metrics {
        let mut last: Option<Metrics> = None;
        let satisfied = wait_until(timeout, || match self.try_metrics() {
            Ok(metrics) => {
                let ok = predicate(&metrics);
                last = Some(metrics);
                ok
            }
            Err(_) => false,
        });
        match (satisfied, last) {
            (true, Some(metrics)) => metrics,
            (_, last) => panic!(
                "timed out after {timeout:?} waiting for: {what}\n--- last /metrics ---\n{}\n--- server stderr ---\n{}",
                last.map(|m| m.plenum_lines()).unwrap_or_else(|| "(no successful scrape)".into()),
                self.stderr_text()
            ),
        }
    }

    /// Publishes on the server's shared keep-alive publisher; returns the id.
    /// Adds the `--publish-token` automatically.
    pub fn publish(&self, topics: &[&str], event: Option<&str>, data: impl AsRef<[u8]>) -> u64 {
        let mut guard = self.publisher.lock().unwrap();
        let publisher = guard.get_or_insert_with(|| self.publisher());
        publisher.publish(topics, event, data.as_ref())
    }

    /// A new keep-alive publisher (one connection) for this server, with the token.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.addr, self.token.clone())
    }

    /// A subscriber on `topics` (waits for the `:ok` opening comment).
    pub fn subscribe(&self, topics: &[&str]) -> SseClient {
        SseClient::open(self.addr, &Subscribe::topics(topics))
    }

    /// A subscriber with options (Last-Event-ID, buffer sizes, source address).
    pub fn subscribe_with(&self, request: &Subscribe) -> SseClient {
        SseClient::open(self.addr, request)
    }

    // --- the process ------------------------------------------------------

    /// Resident set size from `/proc/PID/status` (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        proc_rss_bytes(self.pid).unwrap_or_else(|| panic!("no VmRSS for pid {}", self.pid))
    }

    /// Number of open file descriptors, from `/proc/PID/fd`.
    pub fn fd_count(&self) -> usize {
        proc_fd_count(self.pid).unwrap_or_else(|error| panic!("/proc/{}/fd: {error}", self.pid))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the server.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped: the
        // Child is only waited on through this struct).
        let result = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        assert_eq!(
            result,
            0,
            "kill({}, {signal}) failed: {}",
            self.pid,
            io::Error::last_os_error()
        );
    }

    /// SIGTERM.
    pub fn term(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child.lock().unwrap(), timeout)
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.child.lock().unwrap().try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let mut child = self
            .child
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            // Captured by libtest and shown with the failure.
            eprintln!(
                "--- plenum serve (pid {}, {}) stderr tail ---\n{}",
                self.pid,
                self.addr,
                self.stderr.lock().unwrap_or_else(|p| p.into_inner()).text()
            );
        }
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// VmRSS of a process, in bytes.
pub fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open descriptors of a process.
pub fn proc_fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

// ---------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------

/// A parsed HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the server announced it will close the connection.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|value| value.to_ascii_lowercase().contains("close"))
    }

    /// The error-body contract: `text/plain`, one non-empty line (a trailing line end
    /// is allowed).
    pub fn assert_one_line_text(&self, context: &str) {
        let content_type = self.header("content-type").unwrap_or("");
        assert!(
            content_type.starts_with("text/plain"),
            "{context}: Content-Type {content_type:?}, expected text/plain"
        );
        let text = self.text();
        let line = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        assert!(
            !line.trim().is_empty(),
            "{context}: empty body, expected a one-line reason"
        );
        assert!(
            !line.contains('\n') && !line.contains('\r'),
            "{context}: body is not one line: {text:?}"
        );
    }
}

/// How reading a stream to its end finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The deadline passed with the connection still open.
    Timeout,
    /// Orderly close (FIN).
    Eof,
    /// `ECONNRESET` (the peer sent RST).
    Reset,
    /// Any other error.
    Error(io::ErrorKind),
}

impl StreamEnd {
    fn from_error(error: &io::Error) -> StreamEnd {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => StreamEnd::Timeout,
            io::ErrorKind::ConnectionReset => StreamEnd::Reset,
            io::ErrorKind::UnexpectedEof => StreamEnd::Eof,
            kind => StreamEnd::Error(kind),
        }
    }

    /// The connection is gone (EOF, reset or another error), not merely quiet.
    pub fn is_closed(self) -> bool {
        self != StreamEnd::Timeout
    }
}

/// Reads once from `stream` into `buf` with an absolute deadline. `Ok(0)` is EOF;
/// a passed deadline is `TimedOut`.
pub fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        stream.set_read_timeout(Some(remaining.max(Duration::from_millis(1))))?;
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
            }
            Err(error) => return Err(error),
        }
    }
}

/// A TCP connection to the server, optionally bound to a local address and with a
/// receive buffer set before connecting (so the window is small from the handshake on).
pub fn connect_tcp(
    addr: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer_bytes: Option<usize>,
) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if let Some(bytes) = recv_buffer_bytes {
        socket.set_recv_buffer_size(bytes)?;
    }
    if let Some(source) = source {
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Closes a stream with RST instead of FIN (`SO_LINGER` 0).
pub fn close_with_reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

/// A blocking HTTP/1.1 client connection (keep-alive aware).
pub struct HttpConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Responses read on this connection (to tell a reused connection from a fresh one).
    pub responses_read: usize,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> io::Result<HttpConn> {
        HttpConn::connect_from(addr, None, None)
    }

    pub fn connect_from(
        addr: SocketAddr,
        source: Option<IpAddr>,
        recv_buffer_bytes: Option<usize>,
    ) -> io::Result<HttpConn> {
        let stream = connect_tcp(addr, source, recv_buffer_bytes)?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::new(),
            responses_read: 0,
        })
    }

    /// Writes all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends `bytes` one byte at a time, `gap` apart.
    pub fn send_slowly(&mut self, bytes: &[u8], gap: Duration) -> io::Result<()> {
        for byte in bytes {
            self.stream.write_all(std::slice::from_ref(byte))?;
            std::thread::sleep(gap);
        }
        Ok(())
    }

    /// Bytes read past the last parsed response.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads a response head (status line and headers); the rest stays buffered.
    pub fn read_head(&mut self, timeout: Duration) -> io::Result<Response> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return parse_response_head(&head);
            }
            if self.buf.len() > 64 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head over 64 KiB",
                ));
            }
            let had = self.buf.len();
            if read_some(&mut self.stream, &mut self.buf, deadline)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {had} bytes of a response head: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Reads one whole response: head, then a body delimited by `Content-Length`,
    /// chunked encoding, or the end of the connection. 1xx, 204 and 304 have no body.
    pub fn read_response(&mut self, timeout: Duration) -> io::Result<Response> {
        let deadline = Instant::now() + timeout;
        let mut response = self.read_head(timeout)?;
        let bodyless = response.status < 200 || response.status == 204 || response.status == 304;
        if !bodyless {
            let chunked = response
                .header("transfer-encoding")
                .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
            if chunked {
                response.body = self.read_chunked_body(deadline)?;
            } else if let Some(length) = response.header("content-length") {
                let length: usize = length.trim().parse().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad Content-Length {length:?}"),
                    )
                })?;
                while self.buf.len() < length {
                    if read_some(&mut self.stream, &mut self.buf, deadline)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "EOF inside a response body",
                        ));
                    }
                }
                response.body = self.buf.drain(..length).collect();
            } else {
                loop {
                    match read_some(&mut self.stream, &mut self.buf, deadline) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => break,
                        Err(error) => return Err(error),
                    }
                }
                response.body = std::mem::take(&mut self.buf);
            }
        }
        self.responses_read += 1;
        Ok(response)
    }

    fn read_chunked_body(&mut self, deadline: Instant) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(end) = find(&self.buf, b"\r\n") {
                    break end;
                }
                if read_some(&mut self.stream, &mut self.buf, deadline)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "EOF in chunk size",
                    ));
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
            let size = usize::from_str_radix(&size_text, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {size_text:?}"),
                )
            })?;
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                if read_some(&mut self.stream, &mut self.buf, deadline)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "EOF in a chunk",
                    ));
                }
            }
            if size == 0 {
                // No trailers expected: the terminating CRLF follows at once.
                self.buf.drain(..2);
                return Ok(body);
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Sends one request and reads its response. Adds `Host`, and `Content-Length`
    /// for a POST or a non-empty body, unless given in `headers`.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut request = format!("{method} {target} HTTP/1.1\r\nHost: plenum.test\r\n");
        let has = |name: &str| {
            headers
                .iter()
                .any(|(key, _)| key.eq_ignore_ascii_case(name))
        };
        for (key, value) in headers {
            request.push_str(&format!("{key}: {value}\r\n"));
        }
        if (method == "POST" || !body.is_empty())
            && !has("content-length")
            && !has("transfer-encoding")
        {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes)?;
        self.read_response(IO_TIMEOUT)
    }

    /// Reads until the connection ends or `timeout` passes; returns how it ended and
    /// everything read (including bytes buffered before).
    pub fn read_to_end(&mut self, timeout: Duration) -> (StreamEnd, Vec<u8>) {
        let deadline = Instant::now() + timeout;
        loop {
            match read_some(&mut self.stream, &mut self.buf, deadline) {
                Ok(0) => return (StreamEnd::Eof, std::mem::take(&mut self.buf)),
                Ok(_) => {}
                Err(error) => {
                    return (StreamEnd::from_error(&error), std::mem::take(&mut self.buf))
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Parses a response head strictly: CRLF line ends, `HTTP/1.x NNN reason`.
pub fn parse_response_head(head: &str) -> io::Result<Response> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?} in {head:?}")))?;
        headers.push((key.trim().to_string(), value.trim().to_string()));
    }
    Ok(Response {
        status,
        reason,
        headers,
        body: Vec::new(),
    })
}

/// `/publish?topic=..&topic=..[&event=..]`, percent-encoded.
pub fn publish_target(topics: &[&str], event: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for topic in topics {
        query.append_pair("topic", topic);
    }
    if let Some(event) = event {
        query.append_pair("event", event);
    }
    format!("/publish?{}", query.finish())
}

/// A keep-alive publishing client. Reconnects (once) only when a reused connection
/// turns out to have been closed by the server before the request was answered.
pub struct Publisher {
    addr: SocketAddr,
    token: Option<String>,
    source: Option<IpAddr>,
    conn: Option<HttpConn>,
}

impl Publisher {
    pub fn new(addr: SocketAddr, token: Option<String>) -> Publisher {
        Publisher {
            addr,
            token,
            source: None,
            conn: None,
        }
    }

    /// Publishes from the local address `source` (for per-address limits).
    pub fn with_source(mut self, source: IpAddr) -> Publisher {
        self.source = Some(source);
        self.conn = None;
        self
    }

    /// Publishes and returns the id; panics unless the answer is `200` with an id.
    pub fn publish(&mut self, topics: &[&str], event: Option<&str>, data: &[u8]) -> u64 {
        let response = self
            .publish_response(topics, event, data)
            .unwrap_or_else(|error| panic!("publish to {topics:?} failed: {error}"));
        assert_eq!(
            response.status,
            200,
            "publish to {topics:?} answered {} {:?}",
            response.status,
            response.text()
        );
        parse_id(&response.text())
    }

    /// Publishes and returns the raw response.
    pub fn publish_response(
        &mut self,
        topics: &[&str],
        event: Option<&str>,
        data: &[u8],
    ) -> io::Result<Response> {
        let target = publish_target(topics, event);
        let authorization = self.token.as_ref().map(|token| format!("Bearer {token}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(authorization) = &authorization {
            headers.push(("Authorization", authorization));
        }
        for attempt in 0..2 {
            if self.conn.is_none() {
                self.conn = Some(HttpConn::connect_from(self.addr, self.source, None)?);
            }
            let conn = self.conn.as_mut().unwrap();
            let reused = conn.responses_read > 0;
            match conn.request("POST", &target, &headers, data) {
                Ok(response) => {
                    if response.closes() {
                        self.conn = None;
                    }
                    return Ok(response);
                }
                Err(error) => {
                    self.conn = None;
                    let stale = matches!(
                        error.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    );
                    if !(attempt == 0 && reused && stale) {
                        return Err(error);
                    }
                }
            }
        }
        unreachable!()
    }
}

/// Parses the id a publish answered (decimal u64, maybe with a line end).
pub fn parse_id(text: &str) -> u64 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("publish answered {text:?}, expected a decimal u64 id"))
}

// ---------------------------------------------------------------------------
// SSE
// ---------------------------------------------------------------------------

/// One dispatched SSE block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    /// One entry per `data:` line.
    pub data_lines: Vec<String>,
}

impl Event {
    /// The data as a client's `MessageEvent.data` (lines joined with `\n`).
    pub fn data(&self) -> String {
        self.data_lines.join("\n")
    }

    /// The numeric id; panics if absent or not a u64.
    pub fn id(&self) -> u64 {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("event without id: {self:?}"));
        id.parse()
            .unwrap_or_else(|_| panic!("id {id:?} is not a decimal u64"))
    }

    pub fn is_gap(&self) -> bool {
        self.event.as_deref() == Some("plenum-gap")
    }

    /// The `plenum-gap` payload: (reason, last_event_id).
    pub fn gap(&self) -> (String, String) {
        assert!(self.is_gap(), "not a plenum-gap event: {self:?}");
        let value: serde_json::Value = serde_json::from_str(&self.data())
            .unwrap_or_else(|error| panic!("plenum-gap data is not JSON ({error}): {self:?}"));
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_else(|| panic!("plenum-gap data lacks string {name:?}: {self:?}"))
                .to_string()
        };
        (field("reason"), field("last_event_id"))
    }
}

/// One thing read from an event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SseItem {
    /// A comment line, without the leading `:` (`":ok"` is `Comment("ok")`, a
    /// heartbeat `":"` is `Comment("")`).
    Comment(String),
    /// A `retry:` field with a valid number.
    Retry(u64),
    /// A block with at least one `id`, `event` or `data` field, ended by a blank line.
    Event(Event),
}

/// Incremental SSE parser (WHATWG rules). Feed it any byte split.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    block: Event,
    block_has_field: bool,
    /// Lines with a field name other than id/event/data/retry (or a bad retry).
    pub unknown_lines: Vec<String>,
    /// Lines that were not valid UTF-8.
    pub invalid_utf8_lines: usize,
}

impl SseParser {
    pub fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<SseItem>) {
        for &byte in bytes {
            if self.after_cr {
                self.after_cr = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                b'\n' => self.end_line(out),
                _ => self.line.push(byte),
            }
        }
    }

    fn end_line(&mut self, out: &mut VecDeque<SseItem>) {
        let raw = std::mem::take(&mut self.line);
        let line = match String::from_utf8(raw) {
            Ok(line) => line,
            Err(error) => {
                self.invalid_utf8_lines += 1;
                String::from_utf8_lossy(error.as_bytes()).into_owned()
            }
        };
        if line.is_empty() {
            if self.block_has_field {
                out.push_back(SseItem::Event(std::mem::take(&mut self.block)));
                self.block_has_field = false;
            }
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            out.push_back(SseItem::Comment(comment.to_string()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "id" => {
                self.block.id = Some(value.to_string());
                self.block_has_field = true;
            }
            "event" => {
                self.block.event = Some(value.to_string());
                self.block_has_field = true;
            }
            "data" => {
                self.block.data_lines.push(value.to_string());
                self.block_has_field = true;
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                out.push_back(SseItem::Retry(value.parse().unwrap_or(u64::MAX)));
            }
            _ => self.unknown_lines.push(line.clone()),
        }
    }
}

/// What to subscribe to, and how.
#[derive(Clone, Debug, Default)]
pub struct Subscribe {
    pub topics: Vec<String>,
    /// Sent as the `Last-Event-ID` header.
    pub header_last_event_id: Option<String>,
    /// Sent as the `lastEventID` query parameter.
    pub query_last_event_id: Option<String>,
    /// `SO_RCVBUF` set before connecting.
    pub recv_buffer_bytes: Option<usize>,
    /// Local address to connect from.
    pub source: Option<IpAddr>,
}

impl Subscribe {
    pub fn topics(topics: &[&str]) -> Subscribe {
        Subscribe {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            ..Subscribe::default()
        }
    }

    pub fn last_event_id_header(mut self, id: impl ToString) -> Subscribe {
        self.header_last_event_id = Some(id.to_string());
        self
    }

    pub fn last_event_id_query(mut self, id: impl ToString) -> Subscribe {
        self.query_last_event_id = Some(id.to_string());
        self
    }

    pub fn recv_buffer(mut self, bytes: usize) -> Subscribe {
        self.recv_buffer_bytes = Some(bytes);
        self
    }

    pub fn source_ip(mut self, source: IpAddr) -> Subscribe {
        self.source = Some(source);
        self
    }

    /// The request target, percent-encoded.
    pub fn target(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for topic in &self.topics {
            query.append_pair("topic", topic);
        }
        if let Some(id) = &self.query_last_event_id {
            query.append_pair("lastEventID", id);
        }
        format!("/events?{}", query.finish())
    }

    /// The whole request head.
    pub fn request_bytes(&self) -> Vec<u8> {
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: plenum.test\r\nAccept: text/event-stream\r\n",
            self.target()
        );
        if let Some(id) = &self.header_last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        request.into_bytes()
    }

    /// Connects and sends the request, reading nothing: a subscriber that never reads
    /// (a stalled reader when combined with a small receive buffer).
    pub fn send_only(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let mut stream = connect_tcp(addr, self.source, self.recv_buffer_bytes)?;
        stream.write_all(&self.request_bytes())?;
        Ok(stream)
    }
}

/// A blocking SSE subscriber.
pub struct SseClient {
    conn: HttpConn,
    parser: SseParser,
    pending: VecDeque<SseItem>,
    /// The response head of the subscription.
    pub head: Response,
    /// Comments skipped by [`SseClient::next_event`] (after the opening `:ok`).
    pub comments_skipped: usize,
    /// `retry:` values skipped by [`SseClient::next_event`].
    pub retries_skipped: Vec<u64>,
    /// The id of the last event returned.
    pub last_id: Option<u64>,
}

/// Why a subscription did not open.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    /// A complete non-200 answer.
    Refused(Response),
}

impl SseClient {
    /// Subscribes, asserts `200` with the stream headers and the `:ok` comment first.
    /// Panics on any failure.
    pub fn open(addr: SocketAddr, request: &Subscribe) -> SseClient {
        match SseClient::try_open(addr, request) {
            Ok(client) => client,
            Err(OpenError::Io(error)) => panic!("subscribe {} failed: {error}", request.target()),
            Err(OpenError::Refused(response)) => panic!(
                "subscribe {} answered {} {:?}",
                request.target(),
                response.status,
                response.text()
            ),
        }
    }

    /// Subscribes; a non-200 answer is `Refused` with its body read.
    pub fn try_open(addr: SocketAddr, request: &Subscribe) -> Result<SseClient, OpenError> {
        let mut conn = HttpConn::connect_from(addr, request.source, request.recv_buffer_bytes)
            .map_err(OpenError::Io)?;
        conn.send(&request.request_bytes()).map_err(OpenError::Io)?;
        SseClient::open_on(conn)
    }

    /// Reads a subscription's answer on a connection whose request was already sent
    /// (for requests written by hand, e.g. one byte at a time).
    pub fn open_on(mut conn: HttpConn) -> Result<SseClient, OpenError> {
        let head = conn.read_head(IO_TIMEOUT).map_err(OpenError::Io)?;
        if head.status != 200 {
            // Re-read as a whole response to get the body: push the head back.
            let mut body_conn = conn;
            let mut response = head;
            if let Some(length) = response
                .header("content-length")
                .and_then(|l| l.trim().parse::<usize>().ok())
            {
                let deadline = Instant::now() + IO_TIMEOUT;
                while body_conn.buf.len() < length {
                    match read_some(&mut body_conn.stream, &mut body_conn.buf, deadline) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let take = length.min(body_conn.buf.len());
                response.body = body_conn.buf.drain(..take).collect();
            }
            return Err(OpenError::Refused(response));
        }
        let mut client = SseClient {
            conn,
            parser: SseParser::default(),
            pending: VecDeque::new(),
            head,
            comments_skipped: 0,
            retries_skipped: Vec::new(),
            last_id: None,
        };
        client.assert_stream_headers();
        match client.next_item(IO_TIMEOUT) {
            Ok(SseItem::Comment(text)) if text == "ok" => {}
            other => panic!("stream did not start with the `:ok` comment: got {other:?}"),
        }
        Ok(client)
    }

    fn assert_stream_headers(&self) {
        let head = &self.head;
        let content_type = head.header("content-type").unwrap_or("");
        assert!(
            content_type.starts_with("text/event-stream"),
            "Content-Type {content_type:?}, expected text/event-stream"
        );
        assert_eq!(
            head.header("cache-control").map(str::trim),
            Some("no-cache"),
            "Cache-Control"
        );
        assert_eq!(
            head.header("x-accel-buffering")
                .map(|v| v.trim().to_ascii_lowercase()),
            Some("no".to_string()),
            "X-Accel-Buffering"
        );
        assert!(
            head.header("content-encoding").is_none(),
            "a stream must not be compressed"
        );
    }

    /// The underlying socket (for shutdown, linger, options).
    pub fn stream(&self) -> &TcpStream {
        &self.conn.stream
    }

    pub fn into_stream(self) -> TcpStream {
        self.conn.stream
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.conn.stream.local_addr().unwrap()
    }

    pub fn set_nodelay(&self, nodelay: bool) {
        self.conn.stream.set_nodelay(nodelay).unwrap();
    }

    /// Unknown lines the parser saw (must stay empty on a conforming stream).
    pub fn unknown_lines(&self) -> &[String] {
        &self.parser.unknown_lines
    }

    /// The next comment, retry or event, within `timeout`.
    pub fn next_item(&mut self, timeout: Duration) -> Result<SseItem, StreamEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            if !self.conn.buf.is_empty() {
                let bytes = std::mem::take(&mut self.conn.buf);
                self.parser.feed(&bytes, &mut self.pending);
                continue;
            }
            match read_some(&mut self.conn.stream, &mut self.conn.buf, deadline) {
                Ok(0) => return Err(StreamEnd::Eof),
                Ok(_) => {}
                Err(error) => return Err(StreamEnd::from_error(&error)),
            }
        }
    }

    /// The next event (comments and retries are counted and skipped).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Event, StreamEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_item(remaining)? {
                SseItem::Comment(_) => self.comments_skipped += 1,
                SseItem::Retry(ms) => self.retries_skipped.push(ms),
                SseItem::Event(event) => {
                    if let Some(id) = event.id.as_deref().and_then(|id| id.parse().ok()) {
                        self.last_id = Some(id);
                    }
                    return Ok(event);
                }
            }
        }
    }

    /// The next event; panics with `context` if the stream ends or times out.
    pub fn expect_event(&mut self, timeout: Duration, context: &str) -> Event {
        self.next_event(timeout)
            .unwrap_or_else(|end| panic!("{context}: expected an event, stream gave {end:?}"))
    }

    /// `count` events, each within `timeout` of the previous one.
    pub fn expect_events(&mut self, count: usize, timeout: Duration, context: &str) -> Vec<Event> {
        (0..count)
            .map(|index| {
                self.expect_event(timeout, &format!("{context} (event {index} of {count})"))
            })
            .collect()
    }

    /// Reads items until the stream ends or `timeout` passes.
    pub fn read_until_end(&mut self, timeout: Duration) -> (Vec<SseItem>, StreamEnd) {
        let deadline = Instant::now() + timeout;
        let mut items = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_item(remaining) {
                Ok(item) => items.push(item),
                Err(end) => return (items, end),
            }
        }
    }

    /// Asserts that nothing but comments arrives within `quiet` (no event, no end).
    pub fn assert_no_event_within(&mut self, quiet: Duration, context: &str) {
        let deadline = Instant::now() + quiet;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return;
            }
            match self.next_item(remaining) {
                Ok(SseItem::Comment(_)) => self.comments_skipped += 1,
                Ok(other) => panic!("{context}: expected nothing, got {other:?}"),
                Err(StreamEnd::Timeout) => return,
                Err(end) => panic!("{context}: stream ended ({end:?})"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// A parsed Prometheus text scrape. Keys are normalised as `name{a="x",b="y"}` with
/// labels sorted, so lookups do not depend on the server's label order.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    values: HashMap<String, f64>,
    series: Vec<(String, BTreeMap<String, String>, f64)>,
    pub raw: String,
}

/// Splits `name{labels}` into the name and its labels.
fn parse_series(text: &str) -> Option<(String, BTreeMap<String, String>)> {
    let text = text.trim();
    let Some(open) = text.find('{') else {
        return Some((text.to_string(), BTreeMap::new()));
    };
    let name = text[..open].to_string();
    let inner = text[open + 1..].strip_suffix('}')?;
    let mut labels = BTreeMap::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                other => value.push(other),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
    Some((name, labels))
}

fn series_key(name: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics {
            raw: text.to_string(),
            ..Metrics::default()
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The value follows the closing brace (labels may hold spaces) or the name.
            let split_at = match line.rfind('}') {
                Some(brace) => brace + 1,
                None => line.find(char::is_whitespace).unwrap_or(line.len()),
            };
            let (series, rest) = line.split_at(split_at);
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                other => match other.parse() {
                    Ok(value) => value,
                    Err(_) => continue,
                },
            };
            let Some((name, labels)) = parse_series(series) else {
                continue;
            };
            metrics.values.insert(series_key(&name, &labels), value);
            metrics.series.push((name, labels, value));
        }
        metrics
    }

    /// The value of one series, e.g. `plenum_connections_closed_total{reason="reset"}`.
    pub fn get(&self, series: &str) -> Option<f64> {
        let (name, labels) = parse_series(series)?;
        self.values.get(&series_key(&name, &labels)).copied()
    }

    /// Like [`Metrics::get`], but an absent series counts as 0 (a counter that never
    /// moved may not be printed).
    pub fn counter(&self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0)
    }

    /// Sum over every label set of `name` (e.g. per-shard gauges).
    pub fn sum(&self, name: &str) -> f64 {
        self.series
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v)
            .sum()
    }

    /// Every label set of `name` with its value.
    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.series
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, labels, value)| (labels.clone(), *value))
            .collect()
    }

    /// `plenum_connections_closed_total{reason=..}` (0 if absent).
    pub fn closed(&self, reason: &str) -> f64 {
        self.counter(&format!(
            "plenum_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    /// Sum of `plenum_connections_open` over shards.
    pub fn connections_open(&self) -> f64 {
        self.sum("plenum_connections_open")
    }

    /// Sum of `plenum_subscribers_open` over shards.
    pub fn subscribers_open(&self) -> f64 {
        self.sum("plenum_subscribers_open")
    }

    /// The `plenum_*` lines, for failure messages.
    pub fn plenum_lines(&self) -> String {
        self.raw
            .lines()
            .filter(|line| line.starts_with("plenum_"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Half-closes a socket's write side (sends FIN).
pub fn shutdown_write(stream: &TcpStream) {
    stream.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
}

/// `127.0.0.N` — the loopback range, for tests that need several client addresses.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A payload of `bytes` printable bytes that encodes `n` (so copies are recognisable).
pub fn payload(n: u64, bytes: usize) -> String {
    let mut text = format!("event-{n}:");
    while text.len() < bytes {
        text.push((b'a' + (text.len() % 26) as u8) as char);
    }
    text.truncate(bytes);
    text
}

/// Seconds to run a long test for: `default`, or the env var `name` if set.
pub fn duration_from_env(name: &str, default: Duration) -> Duration {
    match std::env::var(name) {
        Ok(value) => Duration::from_secs_f64(
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}={value:?} is not a number of seconds")),
        ),
        Err(_) => default,
    }
}
