//! Slow consumers: a stalled reader (tiny receive window, never reads) next to a
//! healthy subscriber on the same topic while events flow. The stalled one is closed
//! by the policy under test — hard outbox limit, soft limit held too long, or the
//! write-stall deadline — and counted by reason; the healthy one receives every
//! event in order; the stalled one received a gap-free prefix before its close
//! (closed, never silently skipped). A reader that is only briefly slow is not closed.

#[macro_use]
mod common;

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const EVENTS: usize = 200;
const EVENT_BYTES: usize = 4096;
/// The publisher stays at most this many events ahead of the healthy reader, so the
/// healthy subscriber never has a backlog (it must not trip the limits under test).
const HEALTHY_WINDOW: usize = 8;
/// Receive buffer of the stalled reader (the kernel doubles it, with a floor).
const STALLED_RECV_BUFFER: usize = 4096;

struct Outcome {
    published: Vec<u64>,
    /// When publishing started (the stall cannot have begun before).
    started: Instant,
    /// When the server was seen to have closed the stalled reader.
    closed_seen: Instant,
    stalled: TcpStream,
    metrics: Metrics,
}

/// Runs the scenario and waits (up to `close_within`) until the stalled reader is
/// closed with one of `reasons`.
fn stalled_next_to_healthy(server: &Server, reasons: &[&str], close_within: Duration) -> Outcome {
    let mut healthy = server.subscribe(&["feed"]);
    let stalled = Subscribe::topics(&["feed"])
        .recv_buffer(STALLED_RECV_BUFFER)
        .send_only(server.addr())
        .expect("stalled subscriber connects");
    server.wait_for_metrics(IO_TIMEOUT, "both subscribers registered", |m| {
        m.subscribers_open() == 2.0
    });
    let before = server.metrics();
    let reason_count = |m: &Metrics| reasons.iter().map(|r| m.closed(r)).sum::<f64>();
    let count_before = reason_count(&before);

    let started = Instant::now();
    let (published, received) = std::thread::scope(|scope| {
        let (progress, progress_rx) = mpsc::channel::<u64>();
        let reader = scope.spawn(move || {
            let mut events = Vec::with_capacity(EVENTS);
            for _ in 0..EVENTS {
                let event = healthy.expect_event(IO_TIMEOUT, "healthy subscriber");
                let _ = progress.send(event.id());
                events.push(event);
            }
            (healthy, events)
        });
        let mut publisher = server.publisher();
        let mut published = Vec::with_capacity(EVENTS);
        let mut acknowledged = 0usize;
        for n in 0..EVENTS {
            while published.len() - acknowledged >= HEALTHY_WINDOW {
                progress_rx
                    .recv_timeout(IO_TIMEOUT)
                    .expect("the healthy subscriber stopped receiving");
                acknowledged += 1;
            }
            published.push(publisher.publish(
                &["feed"],
                None,
                payload(n as u64, EVENT_BYTES).as_bytes(),
            ));
        }
        let (healthy, events) = reader.join().unwrap();
        drop(healthy);
        (published, events)
    });
    let received_ids: Vec<u64> = received.iter().map(Event::id).collect();
    assert_eq!(
        received_ids, published,
        "the healthy subscriber must receive every event in order"
    );
    for (n, event) in received.iter().enumerate() {
        assert_eq!(
            event.data(),
            payload(n as u64, EVENT_BYTES),
            "healthy data of event {n}"
        );
    }

    let metrics = server.wait_for_metrics(
        close_within,
        &format!("the stalled reader closed with {reasons:?}"),
        |m| reason_count(m) == count_before + 1.0,
    );
    Outcome {
        published,
        started,
        closed_seen: Instant::now(),
        stalled,
        metrics,
    }
}

/// Reads what the stalled reader got before its close: the events must be a
/// gap-free prefix of `published`. Returns how the stream ended.
fn assert_stalled_got_prefix(stalled: TcpStream, published: &[u64]) -> StreamEnd {
    let mut stream = stalled;
    let mut bytes = Vec::new();
    let deadline = Instant::now() + IO_TIMEOUT;
    let end = loop {
        match read_some(&mut stream, &mut bytes, deadline) {
            Ok(0) => break StreamEnd::Eof,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                break StreamEnd::Reset
            }
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => break StreamEnd::Timeout,
            Err(error) => break StreamEnd::Error(error.kind()),
        }
    };
    assert!(
        end.is_closed(),
        "the stalled reader's connection must be closed, got {end:?}"
    );
    let body_start = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(bytes.len());
    let mut parser = SseParser::default();
    let mut items = VecDeque::new();
    parser.feed(&bytes[body_start..], &mut items);
    let ids: Vec<u64> = items
        .into_iter()
        .filter_map(|item| match item {
            SseItem::Event(event) => Some(event.id()),
            _ => None,
        })
        .collect();
    assert_eq!(
        ids,
        published[..ids.len()],
        "the stalled reader must get a gap-free prefix before being closed"
    );
    end
}

backend_tests! {
    fn stalled_reader_is_closed_while_healthy_one_gets_everything(backend: Backend) {
        let server = Server::start(backend, &[
            "--outbox-bytes-hard", "64KiB",
            "--outbox-bytes-soft", "0",
            "--write-stall-timeout", "2s",
            "--socket-send-buffer-bytes", "16KiB",
        ]);
        let outcome = stalled_next_to_healthy(&server, &["write_stall", "slow_consumer"], Duration::from_secs(6));
        assert_stalled_got_prefix(outcome.stalled, &outcome.published);
        server.wait_for_metrics(IO_TIMEOUT, "no outbox bytes left", |m| {
            m.counter("plenum_outbox_bytes") == 0.0
        });
    }

    fn hard_limit_closes_at_once_as_slow_consumer(backend: Backend) {
        let server = Server::start(backend, &[
            "--outbox-bytes-hard", "64KiB",
            "--outbox-bytes-soft", "0",
            "--write-stall-timeout", "0",
            "--socket-send-buffer-bytes", "16KiB",
        ]);
        // 800 KiB for a reader that takes under ~50 KiB: the hard limit trips during
        // the burst, so the close is seen well within the wait.
        let outcome = stalled_next_to_healthy(&server, &["slow_consumer"], Duration::from_secs(2));
        assert_eq!(outcome.metrics.closed("write_stall"), 0.0, "write stall is off");
        assert_stalled_got_prefix(outcome.stalled, &outcome.published);
    }

    fn soft_limit_held_too_long_closes_as_slow_consumer(backend: Backend) {
        let server = Server::start(backend, &[
            "--outbox-bytes-soft", "32KiB",
            "--outbox-soft-duration", "2s",
            "--outbox-bytes-hard", "64MiB",
            "--write-stall-timeout", "0",
            "--socket-send-buffer-bytes", "16KiB",
        ]);
        let outcome = stalled_next_to_healthy(&server, &["slow_consumer"], Duration::from_secs(8));
        let after = outcome.closed_seen - outcome.started;
        // Over the soft limit only after publishing began, so not closed before 2 s
        // (10% slack for a coarse timer).
        assert!(after >= Duration::from_millis(1800), "closed after {after:?}, before the soft duration");
        assert_eq!(outcome.metrics.closed("write_stall"), 0.0, "write stall is off");
        assert_stalled_got_prefix(outcome.stalled, &outcome.published);
    }

    fn write_stall_alone_closes_with_reset(backend: Backend) {
        let server = Server::start(backend, &[
            "--write-stall-timeout", "1s",
            "--outbox-bytes-soft", "0",
            "--outbox-bytes-hard", "64MiB",
            "--socket-send-buffer-bytes", "16KiB",
        ]);
        let outcome = stalled_next_to_healthy(&server, &["write_stall"], Duration::from_secs(6));
        let after = outcome.closed_seen - outcome.started;
        assert!(after >= Duration::from_millis(900), "closed after {after:?}, before the stall timeout");
        assert_eq!(outcome.metrics.closed("slow_consumer"), 0.0, "outbox limits are out of reach");
        let end = assert_stalled_got_prefix(outcome.stalled, &outcome.published);
        // Closed with SO_LINGER 0 so the unsent bytes leave kernel memory: an RST.
        assert_eq!(end, StreamEnd::Reset, "a write-stall close must reset the connection");
    }

    fn briefly_slow_reader_under_soft_duration_is_not_closed(backend: Backend) {
        let server = Server::start(backend, &[
            "--outbox-bytes-soft", "32KiB",
            "--outbox-soft-duration", "3s",
            "--outbox-bytes-hard", "64MiB",
            "--write-stall-timeout", "0",
            "--socket-send-buffer-bytes", "16KiB",
        ]);
        let mut slow = server.subscribe_with(&Subscribe::topics(&["feed"]).recv_buffer(STALLED_RECV_BUFFER));
        let mut publisher = server.publisher();
        let published: Vec<u64> = (0..EVENTS)
            .map(|n| publisher.publish(&["feed"], None, payload(n as u64, EVENT_BYTES).as_bytes()))
            .collect();
        // The client's behaviour, not synchronisation: it stays away a moment (well
        // under the soft duration) with a backlog over the soft limit, then reads.
        std::thread::sleep(Duration::from_millis(300));
        let ids: Vec<u64> = slow
            .expect_events(EVENTS, IO_TIMEOUT, "briefly slow reader")
            .iter()
            .map(Event::id)
            .collect();
        assert_eq!(ids, published, "a briefly slow reader gets every event");
        let metrics = server.metrics();
        assert_eq!(metrics.closed("slow_consumer"), 0.0, "closed although it caught up in time");
        assert_eq!(metrics.subscribers_open(), 1.0);
    }
}
