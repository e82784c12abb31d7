//! Socket options: accepted sockets carry `SO_KEEPALIVE`, `TCP_KEEPIDLE`,
//! `TCP_KEEPINTVL`, `TCP_KEEPCNT`, `TCP_USER_TIMEOUT`, `TCP_NODELAY` and `SO_SNDBUF`
//! as the flags say (set once on the listener and inherited on Linux).
//!
//! epoll: the server's accepted socket is fetched into this process with
//! `pidfd_open` + `pidfd_getfd` (we are root) — found by matching the socket inodes
//! in `/proc/PID/fd` against the `/proc/net/tcp` entry for the client's port — and
//! read with `getsockopt`. `SO_SNDBUF` reads back doubled by the kernel.
//!
//! io_uring: connections live in the ring's direct-descriptor table, not the fd
//! table, so `pidfd_getfd` cannot reach them. There the test checks what `ss -tnoim`
//! shows: the keepalive timer (armed, at most the idle time) and the send buffer
//! (`skmem` `tb`). `ss` shows neither `TCP_NODELAY` nor `TCP_USER_TIMEOUT`, nor the
//! keepalive interval and count: those stay unverified on io_uring.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use common::*;

/// The option values a test expects on an accepted socket (`None`: not checked).
struct Expected {
    keepalive: bool,
    keepidle_s: Option<i32>,
    keepintvl_s: Option<i32>,
    keepcnt: Option<i32>,
    user_timeout_ms: i32,
    sndbuf_set: Option<i32>,
}

fn socket_inode_of_connection(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let hex_v4 = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("tests listen on IPv4"),
    };
    let (local, remote) = (hex_v4(local), hex_v4(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 9 && fields[1] == local && fields[2] == remote)
            .then(|| fields[9].parse().ok())
            .flatten()
    })
}

/// The server's fd number for the socket with `inode`.
fn fd_of_inode(pid: u32, inode: u64) -> Option<i32> {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .find_map(|entry| {
            let entry = entry.ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            (target.to_string_lossy() == wanted)
                .then(|| entry.file_name().to_string_lossy().parse().ok())?
        })
}

/// A duplicate, in this process, of the server's accepted socket for `client`.
fn fetch_server_socket(server: &Server, client: SocketAddr) -> OwnedFd {
    let inode = socket_inode_of_connection(server.addr(), client)
        .unwrap_or_else(|| panic!("no /proc/net/tcp entry for {} <- {client}", server.addr()));
    let target_fd = fd_of_inode(server.pid(), inode).unwrap_or_else(|| {
        panic!(
            "server pid {} has no fd for socket inode {inode}",
            server.pid()
        )
    });
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, server.pid() as libc::pid_t, 0) };
    if pidfd < 0 {
        skip(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd(2) takes a pidfd, a target fd number and flags, and returns
    // a new fd in this process or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if fd < 0 {
        skip(format!(
            "pidfd_getfd (needs ptrace rights over the server): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn getsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> i32 {
    let mut value: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and length point at a c_int and its size, valid for the call.
    let result = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut length,
        )
    };
    assert_eq!(
        result,
        0,
        "getsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
    value
}

fn check_with_getsockopt(server: &Server, client: SocketAddr, expected: &Expected, context: &str) {
    let fd = fetch_server_socket(server, client);
    let read = |level, name| getsockopt_int(&fd, level, name);
    assert_eq!(
        read(libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0,
        expected.keepalive,
        "{context}: SO_KEEPALIVE"
    );
    if let Some(idle) = expected.keepidle_s {
        assert_eq!(
            read(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            idle,
            "{context}: TCP_KEEPIDLE"
        );
    }
    if let Some(interval) = expected.keepintvl_s {
        assert_eq!(
            read(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            interval,
            "{context}: TCP_KEEPINTVL"
        );
    }
    if let Some(count) = expected.keepcnt {
        assert_eq!(
            read(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            count,
            "{context}: TCP_KEEPCNT"
        );
    }
    assert_eq!(
        read(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
        expected.user_timeout_ms,
        "{context}: TCP_USER_TIMEOUT"
    );
    assert_eq!(
        read(libc::IPPROTO_TCP, libc::TCP_NODELAY),
        1,
        "{context}: TCP_NODELAY"
    );
    if let Some(sndbuf) = expected.sndbuf_set {
        assert_eq!(
            read(libc::SOL_SOCKET, libc::SO_SNDBUF),
            2 * sndbuf,
            "{context}: SO_SNDBUF (reads back doubled)"
        );
    }
}

/// What `ss -tnoim` prints for the server side of the connection to `client`.
fn ss_line(server: &Server, client: SocketAddr) -> String {
    let filter = format!(
        "( sport = :{} and dport = :{} )",
        server.port(),
        client.port()
    );
    let output = match Command::new("ss")
        .args(["-tnoim", "state", "established", &filter])
        .output()
    {
        Ok(output) => output,
        Err(error) => skip(format!("ss (iproute2) is not available: {error}")),
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        text.contains(&format!(":{}", client.port())),
        "ss shows no such connection:\n{text}"
    );
    text
}

fn check_with_ss(server: &Server, client: SocketAddr, expected: &Expected, context: &str) {
    let text = ss_line(server, client);
    let timer = text
        .split("timer:(")
        .nth(1)
        .map(|rest| rest.split(')').next().unwrap_or(""));
    if expected.keepalive {
        let timer = timer.unwrap_or_else(|| panic!("{context}: no timer in ss output:\n{text}"));
        assert!(
            timer.starts_with("keepalive,"),
            "{context}: timer {timer:?}, expected keepalive"
        );
        if let Some(idle) = expected.keepidle_s {
            // "keepalive,6.796ms,0" or "keepalive,6.8sec,0": the number is what is left.
            let left: f64 = timer["keepalive,".len()..]
                .trim_start()
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{context}: unreadable timer {timer:?}"));
            assert!(
                left > 0.0 && left <= idle as f64,
                "{context}: keepalive due in {left}, idle is {idle} s"
            );
        }
    } else {
        assert!(
            !timer.is_some_and(|t| t.starts_with("keepalive")),
            "{context}: keepalive armed:\n{text}"
        );
    }
    if let Some(sndbuf) = expected.sndbuf_set {
        let tb = text
            .split("skmem:(")
            .nth(1)
            .and_then(|rest| rest.split(',').find_map(|field| field.strip_prefix("tb")))
            .and_then(|n| n.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("{context}: no skmem tb in ss output:\n{text}"));
        assert_eq!(tb, 2 * sndbuf, "{context}: send buffer (skmem tb)");
    }
}

fn check_accepted_socket(backend: Backend, flags: &[&str], expected: Expected, context: &str) {
    let server = Server::start(backend, flags);
    let client = server.subscribe(&["options"]);
    let local = client.local_addr();
    if backend == Backend::Epoll {
        check_with_getsockopt(&server, local, &expected, context);
    }
    // `ss`: the only view on io_uring, a cross-check on epoll when installed.
    if backend == Backend::Uring || ss_available() {
        // Let the stream go idle so the keepalive timer (not a retransmit timer) is
        // armed: the client has read `:ok`, its ACK is all the server awaits.
        assert!(
            wait_until(IO_TIMEOUT, || ss_idle(&server, local)),
            "{context}: the server socket did not become idle"
        );
        check_with_ss(&server, local, &expected, context);
    }
    drop(client);
}

fn ss_available() -> bool {
    Command::new("ss")
        .arg("-V")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The server side has nothing unacknowledged (Send-Q 0), per `ss`.
fn ss_idle(server: &Server, client: SocketAddr) -> bool {
    let text = ss_line(server, client);
    text.lines()
        .find(|line| line.contains(&format!(":{}", client.port())))
        .and_then(|line| line.split_whitespace().nth(1).map(|send_q| send_q == "0"))
        .unwrap_or(false)
}

backend_tests! {
    fn accepted_sockets_carry_the_configured_options(backend: Backend) {
        check_accepted_socket(
            backend,
            &[
                "--keepalive-idle", "7s",
                "--keepalive-interval", "3s",
                "--keepalive-count", "4",
                "--tcp-user-timeout", "9s",
                "--socket-send-buffer-bytes", "48KiB",
            ],
            Expected {
                keepalive: true,
                keepidle_s: Some(7),
                keepintvl_s: Some(3),
                keepcnt: Some(4),
                user_timeout_ms: 9000,
                sndbuf_set: Some(48 * 1024),
            },
            "explicit flags",
        );
    }

    fn accepted_sockets_carry_the_documented_defaults(backend: Backend) {
        check_accepted_socket(
            backend,
            &[],
            Expected {
                keepalive: true,
                keepidle_s: Some(60),
                keepintvl_s: Some(10),
                keepcnt: Some(6),
                user_timeout_ms: 30_000,
                sndbuf_set: Some(128 * 1024),
            },
            "defaults",
        );
    }

    fn zero_turns_keepalive_and_user_timeout_off(backend: Backend) {
        check_accepted_socket(
            backend,
            &["--keepalive-idle", "0", "--tcp-user-timeout", "0"],
            Expected {
                keepalive: false,
                keepidle_s: None,
                keepintvl_s: None,
                keepcnt: None,
                user_timeout_ms: 0,
                sndbuf_set: None,
            },
            "keepalive and user timeout off",
        );
    }
}
