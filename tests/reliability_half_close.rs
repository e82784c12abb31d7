//! Half-close and CLOSE_WAIT (issue 6, scenario 3): the seed bug's sockets sat in
//! CLOSE_WAIT — the peer's FIN had arrived and the server never closed its side.
//!
//! - 100 subscribers that `shutdown(SHUT_WR)` while events flow and keep reading:
//!   an SSE client never half-closes while it listens, so a half-close ends the
//!   stream. Each is reclaimed at once (`peer_closed`, all 100 within 1 s of the
//!   half-closes), each reader sees the server's end of the stream (EOF), and a
//!   subscriber next to them receives every event in order.
//! - 100 subscribers held by a process that exits (`plenum load misbehave --mode
//!   vanish`: a child holds the streams and is killed): reclaimed as `peer_closed`
//!   within 1 s of the process's exit (the topic is idle, so the kernel closes the
//!   dead process's sockets with FIN, not RST).
//!
//! Both then look for CLOSE_WAIT with `ss -tn state close-wait` on the server's
//! port: none may be left. (1 s is a correctness bound with room for a loaded
//! 2-core machine; the measured figures are printed.)

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::flow::*;
use common::*;

const HALF_CLOSERS: usize = 100;
const VANISHING: usize = 100;
const EVENTS_PER_SECOND: u64 = 500;
const EVENT_BYTES: usize = 1024;

/// Asserts that no socket on `port` is in CLOSE_WAIT.
fn assert_no_close_wait(port: u16) {
    let close_wait = sockets_in_state("close-wait", port);
    assert!(
        close_wait.is_empty(),
        "{} sockets left in CLOSE_WAIT on port {port}:\n{}",
        close_wait.len(),
        close_wait.join("\n")
    );
}

/// Asserts that `ss` sees at least `at_least` established sockets on `port`, so that
/// an empty CLOSE_WAIT list means something.
fn assert_ss_sees(port: u16, at_least: usize) {
    let established = sockets_in_state("established", port);
    assert!(
        established.len() >= at_least,
        "ss shows {} established sockets on port {port}, expected at least {at_least}: the ss filter is not seeing the server",
        established.len()
    );
}

/// Percentiles of a list of durations, for the printed figures.
fn spread(mut durations: Vec<Duration>) -> String {
    durations.sort();
    let at = |q: f64| durations[((durations.len() - 1) as f64 * q) as usize];
    format!(
        "p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

backend_tests! {
    fn half_closed_subscribers_are_reclaimed_at_once_while_events_flow(backend: Backend) {
        let server = Server::start(backend, &[]);
        let server = &server;
        let port = server.port();
        let control = server.subscribe(&["feed"]);
        let clients = open_subscribers(server.addr(), "feed", HALF_CLOSERS).expect("subscribers open");
        server.wait_for_metrics(IO_TIMEOUT, "every subscriber registered", |m| {
            m.subscribers_open() == (HALF_CLOSERS + 1) as f64
        });
        assert_ss_sees(port, HALF_CLOSERS + 1);
        let before = server.metrics();

        let flow = Flow::new();
        let flow = &flow;
        let half_close = AtomicBool::new(false);
        let half_close = &half_close;
        let plan = ReaderPlan { addr: server.addr(), topic: "feed".into(), reconnect: false, recv_lowat: None };
        let plan = &plan;
        let (published, control_outcome, ends, reclaimed_after, after) = std::thread::scope(|scope| {
            let publisher = scope.spawn(move || {
                publish_paced(server, flow, "feed", EVENTS_PER_SECOND, EVENT_BYTES, Duration::from_secs(3))
            });
            let control = scope.spawn(move || read_stream(flow, plan, control, None));
            let half_closers: Vec<_> = clients
                .into_iter()
                .map(|mut client| {
                    scope.spawn(move || {
                        // Read the flow until told to half-close...
                        while !half_close.load(Ordering::Relaxed) {
                            match client.next_item(Duration::from_millis(20)) {
                                Ok(_) | Err(StreamEnd::Timeout) => {}
                                Err(end) => return Err(format!("stream ended before the half-close: {end:?}")),
                            }
                        }
                        // ...then send FIN and keep reading until the server ends the stream.
                        shutdown_write(client.stream());
                        let shut_at = Instant::now();
                        let (_, end) = client.read_until_end(Duration::from_secs(3));
                        Ok((end, shut_at.elapsed()))
                    })
                })
                .collect();
            assert!(flow.wait_published(EVENTS_PER_SECOND, Duration::from_secs(5)), "events flow");
            half_close.store(true, Ordering::Relaxed);
            let half_closed_at = Instant::now();
            let after = server.wait_for_metrics(
                AT_ONCE,
                &format!("{HALF_CLOSERS} half-closed subscribers reclaimed as peer_closed"),
                |m| {
                    m.subscribers_open() == 1.0
                        && m.closed("peer_closed") == before.closed("peer_closed") + HALF_CLOSERS as f64
                },
            );
            let reclaimed_after = half_closed_at.elapsed();
            let ends: Vec<_> = half_closers.into_iter().map(|h| h.join().unwrap()).collect();
            let published = publisher.join().unwrap();
            (published, control.join().unwrap(), ends, reclaimed_after, after)
        });

        let mut eof_after = Vec::new();
        for (index, end) in ends.into_iter().enumerate() {
            let (end, elapsed) = end.unwrap_or_else(|error| panic!("half-closer {index}: {error}"));
            assert_eq!(end, StreamEnd::Eof, "half-closer {index}: the server must end the stream with FIN");
            assert!(elapsed <= AT_ONCE, "half-closer {index}: stream ended {elapsed:?} after the half-close");
            eof_after.push(elapsed);
        }
        assert_received_all(&control_outcome, &published.ids, "the subscriber next to the half-closers");
        for reason in ["reset", "timed_out", "write_stall", "slow_consumer", "lifetime", "handshake_timeout", "bad_request", "limit"] {
            assert_eq!(after.closed(reason), before.closed(reason), "nothing may close as {reason}:\n{}", after.plenum_lines());
        }
        assert_no_close_wait(port);
        println!(
            "{HALF_CLOSERS} half-closes under {:.0} events/s: all reclaimed (peer_closed) {reclaimed_after:.2?} after; each reader saw EOF {}",
            published.rate_per_second(),
            spread(eof_after)
        );
    }

    fn subscribers_of_a_process_that_exits_are_reclaimed_at_once(backend: Backend) {
        let server = Server::start(backend, &[]);
        let port = server.port();
        // A subscriber that stays: ss must see it, so an empty CLOSE_WAIT list means something.
        let _control = server.subscribe(&["other"]);
        assert_ss_sees(port, 1);
        let before = server.metrics();
        let dir = TempDir::new("plenum-vanish");
        let report_path = dir.path().join("vanish.json");
        let url = format!("http://{}/events?topic=idle", server.addr());
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_plenum"))
            .args(["load", "misbehave", "--mode", "vanish", "--connections", &VANISHING.to_string()])
            .args(["--url", &url, "--duration", "20s", "--json"])
            .arg(&report_path)
            .output()
            .expect("run plenum load misbehave");
        let exited_at = Instant::now();
        assert!(
            output.status.success(),
            "plenum load misbehave --mode vanish failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&report_path).expect("the misbehave report"),
        )
        .expect("the report is JSON");
        assert_eq!(
            report["client_closed"].as_u64(),
            Some(VANISHING as u64),
            "every stream must have been open (response seen) when the process was killed: {report}"
        );
        let after = server.wait_for_metrics(
            AT_ONCE,
            &format!("{VANISHING} streams of the killed process reclaimed as peer_closed"),
            |m| {
                m.subscribers_open() == 1.0
                    && m.closed("peer_closed") == before.closed("peer_closed") + VANISHING as f64
            },
        );
        let reclaimed_after = exited_at.elapsed();
        for reason in ["reset", "timed_out", "write_stall", "slow_consumer", "lifetime", "handshake_timeout", "bad_request", "limit"] {
            assert_eq!(after.closed(reason), before.closed(reason), "nothing may close as {reason}:\n{}", after.plenum_lines());
        }
        assert_no_close_wait(port);
        println!(
            "{VANISHING} streams of a SIGKILLed process: all reclaimed (peer_closed) at most {reclaimed_after:.2?} after the process exited"
        );
    }
}
