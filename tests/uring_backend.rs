//! The io_uring backend, end to end: a real `plenum serve --backend uring`
//! process, real loopback sockets.
//!
//! Each test starts its own server. Where io_uring is unavailable (the
//! server exits with a reason naming io_uring), the test prints
//! `SKIP: <reason>` and passes, except under `CI=true`, where it fails: CI's
//! kernel has io_uring.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts `plenum serve --backend uring` with `extra` flags. `None` means
/// the test is skipped (io_uring unavailable and not under CI).
fn start(name: &str, extra: &[&str]) -> Option<Server> {
    let log = std::env::temp_dir().join(format!("plenum-uring-{name}-{}.log", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_plenum"))
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", "uring"])
        .args(["--log-level", "warn"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .expect("start plenum");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    // Bounded: the server prints `listening` or exits (EOF) at start-up.
    let _ = BufReader::new(stdout).read_line(&mut line);
    if let Some(addr) = line.trim().strip_prefix("listening ") {
        let addr = addr.parse().expect("listening address");
        return Some(Server { child, addr });
    }
    let status = child.wait().expect("wait");
    let reason = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success() && reason.contains("io_uring"),
        "the server failed to start for another reason than io_uring: {status}: {reason}"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("io_uring is unavailable under CI: {}", reason.trim());
    }
    println!("SKIP: {}", reason.trim());
    None
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
}

/// A raw request answered with `Connection: close`; returns the whole answer.
fn request(addr: SocketAddr, head: &str, body: &[u8]) -> String {
    let mut stream = connect(addr);
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn metrics(addr: SocketAddr) -> String {
    request(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"",
    )
}

/// Sum of every sample whose name and labels start with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with([' ', '{']) || prefix.ends_with('}'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) until `check` holds on a fresh scrape; returns the scrape.
fn wait_for(addr: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(addr);
        if check(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn publish(addr: SocketAddr, topic: &str, data: &[u8]) -> String {
    let head = format!(
        "POST /publish?topic={topic} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    );
    let answer = request(addr, &head, data);
    assert!(answer.starts_with("HTTP/1.1 200"), "publish: {answer}");
    answer
}

/// Opens a stream and reads up to the `:ok` comment.
fn subscribe(addr: SocketAddr, topic: &str) -> TcpStream {
    let mut stream = connect(addr);
    let head = format!("GET /events?topic={topic} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(head.as_bytes()).expect("subscribe");
    let text = read_until(&mut stream, ":ok\n\n");
    assert!(text.starts_with("HTTP/1.1 200"), "subscribe: {text}");
    stream
}

/// Reads until `needle` arrives (bounded by the read timeout and 1 MiB).
fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while seen.len() < 1 << 20 {
        if String::from_utf8_lossy(&seen).contains(needle) {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

#[test]
fn subscribe_publish_receive() {
    let Some(server) = start("fanout", &["--shards", "2"]) else {
        return;
    };
    let text = metrics(server.addr);
    assert!(text.contains("plenum_info{backend=\"uring\""), "{text}");
    let mut streams: Vec<TcpStream> = (0..8).map(|_| subscribe(server.addr, "news")).collect();
    wait_for(server.addr, "8 subscribers", |t| {
        metric(t, "plenum_subscribers_open") == 8.0
    });
    let mut ids = Vec::new();
    for i in 0..5 {
        let answer = publish(server.addr, "news", format!("event {i}").as_bytes());
        ids.push(answer.lines().last().unwrap_or_default().trim().to_string());
    }
    for stream in &mut streams {
        let text = read_until(stream, "data: event 4\n\n");
        let mut position = 0;
        for (i, id) in ids.iter().enumerate() {
            let frame = format!("id: {id}\ndata: event {i}\n\n");
            let found = text[position..]
                .find(&frame)
                .unwrap_or_else(|| panic!("missing or out of order: {frame:?} in {text:?}"));
            position += found + frame.len();
        }
    }
}

#[test]
fn fin_while_idle_is_reclaimed() {
    let Some(server) = start("fin", &["--shards", "1"]) else {
        return;
    };
    let stream = subscribe(server.addr, "idle");
    wait_for(server.addr, "a subscriber", |t| {
        metric(t, "plenum_subscribers_open") == 1.0
    });
    let before = metric(
        &metrics(server.addr),
        "plenum_connections_closed_total{reason=\"peer_closed\"}",
    );
    let fin = Instant::now();
    stream.shutdown(Shutdown::Write).expect("FIN");
    let text = wait_for(server.addr, "the FIN to be reclaimed", |t| {
        metric(t, "plenum_connections_closed_total{reason=\"peer_closed\"}") == before + 1.0
    });
    println!("FIN to reclaim (including scrapes): {:?}", fin.elapsed());
    // The scrape itself is the one open connection.
    assert_eq!(metric(&text, "plenum_connections_open"), 1.0, "{text}");
    assert_eq!(metric(&text, "plenum_subscribers_open"), 0.0, "{text}");
}

#[test]
fn stalled_reader_is_closed_with_a_reset() {
    let Some(server) = start(
        "stall",
        &[
            "--shards",
            "1",
            "--write-stall-timeout",
            "1s",
            "--socket-send-buffer-bytes",
            "4KiB",
            "--outbox-bytes-soft",
            "0",
            "--outbox-bytes-hard",
            "16MiB",
        ],
    ) else {
        return;
    };
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(&server.addr.into()).expect("connect");
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /events?topic=stall HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("subscribe");
    wait_for(server.addr, "a subscriber", |t| {
        metric(t, "plenum_subscribers_open") == 1.0
    });
    // Far more than both socket buffers hold: the rest waits in the outbox
    // (and one send waits in the kernel) while the client reads nothing.
    let data = vec![b'x'; 16 * 1024];
    for _ in 0..40 {
        publish(server.addr, "stall", &data);
    }
    let stalled = Instant::now();
    let text = wait_for(server.addr, "the write-stall close", |t| {
        metric(t, "plenum_connections_closed_total{reason=\"write_stall\"}") == 1.0
    });
    let elapsed = stalled.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "stall close took {elapsed:?}"
    );
    assert_eq!(metric(&text, "plenum_subscribers_open"), 0.0, "{text}");
    assert_eq!(metric(&text, "plenum_outbox_bytes"), 0.0, "{text}");
    // SO_LINGER 0 through the socket command: the peer sees a reset.
    let mut sink = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        match stream.read(&mut sink) {
            Ok(0) => break "EOF".to_string(),
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => break "still data".to_string(),
            Err(error) => break format!("{:?}", error.kind()),
        }
    };
    assert_eq!(outcome, "ConnectionReset", "the stall close did not reset");
}

#[test]
fn connection_limit_answers_503() {
    let Some(server) = start("limit", &["--shards", "1", "--connections-max", "2"]) else {
        return;
    };
    let first = subscribe(server.addr, "a");
    let _second = subscribe(server.addr, "a");
    let mut third = connect(server.addr);
    third
        .write_all(b"GET /events?topic=a HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    let mut answer = String::new();
    let _ = third.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(first);
    let text = wait_for(server.addr, "room for a scrape", |t| {
        t.contains("plenum_connections_open")
    });
    assert!(
        metric(&text, "plenum_connections_closed_total{reason=\"limit\"}") >= 1.0,
        "{text}"
    );
}

/// Direct descriptors never enter the process fd table, and 2,000
/// connect/disconnect cycles leave no slot, descriptor or count behind.
#[test]
fn no_fd_or_slot_leak_after_2000_cycles() {
    let Some(server) = start("leak", &["--shards", "2"]) else {
        return;
    };
    wait_for(server.addr, "start-up", |t| t.contains("plenum_info"));
    let fds_before = open_fds(server.pid());

    // Held connections do not show in /proc/PID/fd at all.
    let held: Vec<TcpStream> = (0..300).map(|_| subscribe(server.addr, "held")).collect();
    wait_for(server.addr, "300 subscribers", |t| {
        metric(t, "plenum_subscribers_open") == 300.0
    });
    let fds_held = open_fds(server.pid());
    assert!(
        fds_held <= fds_before + 4,
        "300 connections added {} descriptors to the process fd table",
        fds_held - fds_before
    );
    drop(held);

    for i in 0..2000 {
        if i % 2 == 0 {
            drop(subscribe(server.addr, "cycle"));
        } else {
            // Connect and leave before sending anything.
            drop(connect(server.addr));
        }
    }
    let text = wait_for(server.addr, "every connection reclaimed", |t| {
        metric(t, "plenum_connections_open") == 1.0 && metric(t, "plenum_subscribers_open") == 0.0
    });
    assert!(
        metric(&text, "plenum_connections_accepted_total") >= 2300.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "plenum_uring_accept_table_full_total"),
        0.0,
        "{text}"
    );
    let fds_after = open_fds(server.pid());
    assert!(
        fds_after <= fds_before + 4,
        "fd count grew from {fds_before} to {fds_after}"
    );
}

/// An RST from an idle subscriber: `POLLERR`, `SO_ERROR` read through a
/// socket command, closed as `reset` (as on epoll).
#[test]
fn reset_while_idle_is_closed_as_reset() {
    let Some(server) = start("reset", &["--shards", "1"]) else {
        return;
    };
    let stream = subscribe(server.addr, "idle");
    wait_for(server.addr, "a subscriber", |t| {
        metric(t, "plenum_subscribers_open") == 1.0
    });
    let socket = socket2::Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    drop(socket);
    let text = wait_for(server.addr, "the reset to be reclaimed", |t| {
        metric(t, "plenum_subscribers_open") == 0.0
    });
    assert_eq!(
        metric(&text, "plenum_connections_closed_total{reason=\"reset\"}"),
        1.0,
        "{text}"
    );
}

/// SIGTERM: the listeners close (accept cancelled), streams end with a
/// `retry:` hint, and the process exits cleanly, the ring torn down.
#[test]
fn shutdown_ends_streams_and_exits_cleanly() {
    let Some(mut server) = start("shutdown", &["--shards", "2"]) else {
        return;
    };
    let mut streams: Vec<TcpStream> = (0..4).map(|_| subscribe(server.addr, "bye")).collect();
    wait_for(server.addr, "4 subscribers", |t| {
        metric(t, "plenum_subscribers_open") == 4.0
    });
    let killed = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    for stream in &mut streams {
        let mut rest = String::new();
        let _ = stream.read_to_string(&mut rest);
        assert!(rest.contains("retry: "), "no retry hint: {rest:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "still accepting after shutdown"
    );
}

/// Starts the server with `io_uring_setup` denied by a seccomp filter (what
/// container runtimes' default profiles do); returns the child and its log.
fn start_without_io_uring(name: &str, backend: &str) -> (Child, std::path::PathBuf) {
    use std::os::unix::process::CommandExt;
    let log = std::env::temp_dir().join(format!("plenum-noring-{name}-{}.log", std::process::id()));
    // A classic BPF program: load the syscall number; io_uring_setup (425 on
    // x86_64, aarch64 and the other generic tables) → errno EPERM; else allow.
    const SYS_IO_URING_SETUP: u32 = 425;
    let filter = [
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: SYS_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x0005_0000 | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        },
    ];
    let mut command = Command::new(env!("CARGO_BIN_EXE_plenum"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--backend",
            backend,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&log).expect("log file"));
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl(2), which is async-signal-safe; `filter` was moved into the
    // closure, so the program it points at is in the child's memory.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    (command.spawn().expect("start plenum"), log)
}

/// Without io_uring, `--backend uring` fails fast with a reason naming it,
/// and `--backend auto` falls back to epoll with the reason in one log line.
#[test]
fn without_io_uring_uring_fails_fast_and_auto_falls_back() {
    let (mut child, log) = start_without_io_uring("uring", "uring");
    let status = child.wait().expect("wait");
    let reason = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "started without io_uring: {reason}");
    assert!(reason.contains("io_uring"), "{reason}");

    let (mut child, log) = start_without_io_uring("auto", "auto");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let server = Server {
        child,
        addr: line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("auto did not start: {line:?}"))
            .parse()
            .expect("address"),
    };
    let text = metrics(server.addr);
    assert!(text.contains("plenum_info{backend=\"epoll\""), "{text}");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("io_uring unavailable, using epoll: io_uring_setup: EPERM"),
        "{logged}"
    );
}
