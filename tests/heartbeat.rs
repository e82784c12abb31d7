//! Heartbeats: a stream quiet for `--heartbeat-interval` gets the comment `:` (an
//! empty comment line), again each interval it stays quiet, counted in
//! `plenum_heartbeats_total`; a stream whose events come faster than the interval
//! gets none; `0` turns heartbeats off.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;

backend_tests! {
    fn quiet_stream_gets_heartbeats_each_interval(backend: Backend) {
        let server = Server::start(backend, &["--heartbeat-interval", "300ms"]);
        let mut client = server.subscribe(&["quiet"]);
        let opened = Instant::now();
        let window = Duration::from_millis(1600);
        let mut arrivals = Vec::new();
        loop {
            let remaining = window.saturating_sub(opened.elapsed());
            if remaining.is_zero() {
                break;
            }
            match client.next_item(remaining) {
                Ok(SseItem::Comment(text)) => {
                    assert_eq!(text, "", "a heartbeat is the comment `:` alone");
                    arrivals.push(opened.elapsed());
                }
                Ok(other) => panic!("a quiet stream got {other:?}"),
                Err(StreamEnd::Timeout) => break,
                Err(end) => panic!("stream ended: {end:?}"),
            }
        }
        // 1.6 s of quiet at 300 ms: 5 due; a coarse timer may fire late, never early.
        assert!(arrivals.len() >= 2, "too few heartbeats in {window:?}: {arrivals:?}");
        assert!(arrivals.len() <= 6, "heartbeats come faster than the interval: {arrivals:?}");
        assert!(arrivals[0] >= Duration::from_millis(250), "first heartbeat before the stream was quiet 300 ms: {arrivals:?}");
        for pair in arrivals.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(200), "heartbeats closer than the interval: {arrivals:?}");
        }
        server.wait_for_metrics(IO_TIMEOUT, "heartbeats counted", |m| {
            m.counter("plenum_heartbeats_total") >= arrivals.len() as f64
        });
    }

    fn no_heartbeat_while_events_flow_faster_than_the_interval(backend: Backend) {
        let server = Server::start(backend, &["--heartbeat-interval", "300ms"]);
        let server = &server;
        let mut client = server.subscribe(&["busy"]);
        let (published, comments, received) = std::thread::scope(|scope| {
            let publisher = scope.spawn(move || {
                let mut publisher = server.publisher();
                (0..30)
                    .map(|n| {
                        let id = publisher.publish(&["busy"], None, format!("b{n}").as_bytes());
                        std::thread::sleep(Duration::from_millis(50)); // one event per 50 ms
                        id
                    })
                    .collect::<Vec<u64>>()
            });
            let mut received = Vec::new();
            let mut comments = 0;
            while received.len() < 30 {
                match client.next_item(IO_TIMEOUT) {
                    Ok(SseItem::Event(event)) => received.push(event.id()),
                    // Before the first event the stream may have been quiet long enough.
                    Ok(SseItem::Comment(_)) if !received.is_empty() => comments += 1,
                    Ok(SseItem::Comment(_)) => {}
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(end) => panic!("stream ended: {end:?}"),
                }
            }
            (publisher.join().unwrap(), comments, received)
        });
        assert_eq!(received, published);
        assert_eq!(comments, 0, "heartbeats were written to a stream with an event every 50 ms");
    }

    fn zero_interval_turns_heartbeats_off(backend: Backend) {
        let server = Server::start(backend, &["--heartbeat-interval", "0"]);
        let mut client = server.subscribe(&["quiet"]);
        let (items, end) = client.read_until_end(Duration::from_secs(1));
        assert!(items.is_empty(), "heartbeat-interval 0 must write nothing: {items:?}");
        assert_eq!(end, StreamEnd::Timeout, "the stream stays open");
        assert_eq!(server.metrics().counter("plenum_heartbeats_total"), 0.0);
    }
}
