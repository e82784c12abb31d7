//! A full shard inbox loses nothing: the shard recovers the frames it could not
//! take from history, in order, and the overflow is counted.
//!
//! How the overflow is forced, deterministically: with one shard, a publish is
//! handled on the same thread that drains the inbox, and the inbox is drained
//! only after the turn's readiness events are handled. Fifty publishes
//! pipelined in one write are all handled in one turn, so an inbox of two
//! events must overflow 48 times before the shard drains it.

#[macro_use]
mod common;

use common::*;

const PUBLISHES: usize = 50;

backend_tests! {
    fn a_full_inbox_is_recovered_from_history_in_order(backend: Backend) {
        let server = Server::start(backend, &["--shards", "1", "--shard-inbox-events", "2"]);
        let mut subscriber = server.subscribe(&["flood"]);

        let mut pipelined = Vec::new();
        for i in 0..PUBLISHES {
            let body = format!("n={i}");
            pipelined.extend_from_slice(
                format!(
                    "POST {} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                    publish_target(&["flood"], None),
                    body.len()
                )
                .as_bytes(),
            );
        }
        let mut publisher = HttpConn::connect(server.addr()).unwrap();
        publisher.send(&pipelined).unwrap();
        let mut ids = Vec::new();
        for _ in 0..PUBLISHES {
            let response = publisher.read_response(IO_TIMEOUT).unwrap();
            assert_eq!(response.status, 200);
            ids.push(parse_id(&response.text()));
        }

        let events = subscriber.expect_events(PUBLISHES, IO_TIMEOUT, "subscriber");
        let received: Vec<u64> = events.iter().map(Event::id).collect();
        assert_eq!(received, ids, "every event, in publish order, none duplicated");
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event.data(), format!("n={i}"));
        }
        let overflows = server.metrics().counter("plenum_inbox_overflows_total");
        assert!(
            overflows >= (PUBLISHES - 2) as f64,
            "the inbox of 2 must have overflowed (saw {overflows}): the test did not test recovery"
        );
    }
}
