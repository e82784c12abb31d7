//! Dead peers: a subscriber whose peer goes away while the stream is idle — FIN
//! (half-close or close), RST, or the client process dying — is reclaimed and
//! counted by reason within 1 s, with nothing written to it. The 1 s is a
//! correctness bound (the target is under 10 ms, measured by the bench, not here).
//!
//! Not tested here: `timed_out` (keepalive / `TCP_USER_TIMEOUT`) needs a peer that
//! vanishes without FIN or RST, which loopback cannot produce without a network
//! namespace and packet filter; `socket_options.rs` checks the options are set.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const RECLAIM_BOUND: Duration = Duration::from_secs(1);

/// Opens an idle subscriber, lets `hang_up` end it from the client side, then
/// asserts that within 1 s the server has freed it and counted exactly one more
/// close with a reason in `reasons` (and none with any other reason).
fn assert_reclaimed(
    server: &Server,
    reasons: &[&str],
    open_idle: impl FnOnce(&Server) -> Box<dyn FnOnce()>,
) {
    let connections_idle = server.baseline_connections_open();
    let hang_up = open_idle(server);
    let before = server.wait_for_metrics(IO_TIMEOUT, "the subscriber registered", |m| {
        m.subscribers_open() == 1.0
    });
    let closed_before = before.sum("plenum_connections_closed_total");
    let expected_before: f64 = reasons.iter().map(|r| before.closed(r)).sum();

    let hung_up_at = Instant::now();
    hang_up();
    let after = server.wait_for_metrics(
        RECLAIM_BOUND,
        &format!("an idle subscriber reclaimed within {RECLAIM_BOUND:?} with reason {reasons:?}"),
        |m| {
            m.subscribers_open() == 0.0
                && m.connections_open() <= connections_idle
                && reasons.iter().map(|r| m.closed(r)).sum::<f64>() == expected_before + 1.0
        },
    );
    let elapsed = hung_up_at.elapsed();
    // Only the subscriber (and completed scrapes) closed: nothing else was counted
    // under a different reason.
    let other_closes = after.sum("plenum_connections_closed_total")
        - closed_before
        - 1.0
        - (after.closed("completed") - before.closed("completed"));
    assert_eq!(
        other_closes,
        0.0,
        "unexpected close reasons:\n{}",
        after.plenum_lines()
    );
    println!("reclaimed in {elapsed:?}");
}

/// A client process (curl, else python3) subscribed to `topic`; returns it once it
/// has printed the `:ok` opening comment.
fn spawn_client_process(server: &Server, topic: &str) -> std::process::Child {
    let url = format!("http://{}/events?topic={topic}", server.addr());
    let script = format!(
        "import socket,sys,time\ns=socket.create_connection(('{}',{}))\n\
         s.sendall(b'GET /events?topic={topic} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
         d=b''\nwhile b':ok' not in d: d+=s.recv(4096)\nprint(':ok',flush=True)\ntime.sleep(600)\n",
        server.addr().ip(),
        server.port()
    );
    let candidates: [(&str, Vec<String>); 2] = [
        ("curl", vec!["-sN".into(), url]),
        ("python3", vec!["-c".into(), script]),
    ];
    for (program, args) in candidates {
        let Ok(mut child) = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            continue;
        };
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim() == ":ok" {
                    let _ = sender.send(());
                }
            }
        });
        if receiver.recv_timeout(IO_TIMEOUT).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} did not receive the `:ok` opening comment");
        }
        return child;
    }
    skip("neither curl nor python3 is installed to act as a client process")
}

backend_tests! {
    fn half_close_of_idle_subscriber_is_reclaimed_as_peer_closed(backend: Backend) {
        let server = Server::start(backend, &[]);
        let (sender, receiver) = mpsc::channel();
        assert_reclaimed(&server, &["peer_closed"], |server| {
            let client = server.subscribe(&["idle"]);
            Box::new(move || {
                shutdown_write(client.stream());
                sender.send(client).unwrap();
            })
        });
        // The server closed its side too: the client sees the end of the stream.
        let mut client = receiver.recv().unwrap();
        let (items, end) = client.read_until_end(RECLAIM_BOUND);
        assert!(items.is_empty(), "nothing may be written to a half-closed subscriber: {items:?}");
        assert!(end.is_closed(), "the server must close a half-closed subscriber, got {end:?}");
    }

    fn close_of_idle_subscriber_is_reclaimed_as_peer_closed(backend: Backend) {
        let server = Server::start(backend, &[]);
        assert_reclaimed(&server, &["peer_closed"], |server| {
            let client = server.subscribe(&["idle"]);
            Box::new(move || drop(client))
        });
    }

    fn reset_of_idle_subscriber_is_reclaimed_as_reset(backend: Backend) {
        let server = Server::start(backend, &[]);
        assert_reclaimed(&server, &["reset"], |server| {
            let client = server.subscribe(&["idle"]);
            Box::new(move || close_with_reset(client.into_stream()))
        });
    }

    fn killed_client_process_is_reclaimed(backend: Backend) {
        let server = Server::start(backend, &[]);
        // The kernel closes a killed process's sockets: FIN, or RST if unread bytes
        // were left in its receive buffer. Either reason is right.
        assert_reclaimed(&server, &["peer_closed", "reset"], |server| {
            let mut child = spawn_client_process(server, "idle");
            Box::new(move || {
                child.kill().unwrap();
                child.wait().unwrap();
            })
        });
    }

    fn peer_gone_while_events_flow_to_others_is_reclaimed(backend: Backend) {
        // The idle subscriber's topic never gets an event; another topic is busy.
        let server = Server::start(backend, &[]);
        let mut busy = server.subscribe(&["busy"]);
        let closed_before = server.metrics().closed("peer_closed");
        let idle = server.subscribe(&["idle"]);
        for n in 0..20 {
            let id = server.publish(&["busy"], None, format!("b{n}"));
            assert_eq!(busy.expect_event(IO_TIMEOUT, "busy stream").id(), id);
        }
        drop(idle);
        server.wait_for_metrics(RECLAIM_BOUND, "idle subscriber reclaimed", |m| {
            m.subscribers_open() == 1.0 && m.closed("peer_closed") == closed_before + 1.0
        });
        let id = server.publish(&["busy"], None, "after");
        assert_eq!(busy.expect_event(IO_TIMEOUT, "busy stream after the close").id(), id);
    }
}
