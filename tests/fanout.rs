//! Fan-out: every subscriber receives exactly the events of its topics, in strictly
//! increasing id order, none lost and none duplicated — also an event published to
//! two topics reaching a subscriber of both — and the SSE framing of event data.

#[macro_use]
mod common;

use std::collections::HashMap;

use common::*;

const TOPICS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
const SUBSCRIBERS: usize = 200;

/// (what, event type, published body, expected `data:` lines)
type FrameCase = (
    &'static str,
    Option<&'static str>,
    &'static [u8],
    &'static [&'static str],
);
const EVENTS_PER_PUBLISHER: usize = 60;

/// Subscriber `i` listens to topic `i % 4`; every fifth also to the next topic.
fn subscription(i: usize) -> Vec<&'static str> {
    let mut topics = vec![TOPICS[i % 4]];
    if i.is_multiple_of(5) {
        topics.push(TOPICS[(i + 1) % 4]);
    }
    topics
}

/// Event `k` goes to topic `k % 4`; every seventh also to topic `(k + 1) % 4`, so
/// the two-topic subscribers of that pair must get it exactly once.
fn destination(k: usize) -> Vec<&'static str> {
    let mut topics = vec![TOPICS[k % 4]];
    if k.is_multiple_of(7) {
        topics.push(TOPICS[(k + 1) % 4]);
    }
    topics
}

backend_tests! {
    fn every_subscriber_gets_exactly_its_topics_in_id_order(backend: Backend) {
        let server = Server::start(backend, &["--shards", "2"]);
        let server = &server;
        let mut clients: Vec<(Vec<&str>, SseClient)> = (0..SUBSCRIBERS)
            .map(|i| (subscription(i), server.subscribe(&subscription(i))))
            .collect();
        // Contract reading: once a client has read the opening `:ok`, its subscription
        // is live and every event published afterwards reaches it.
        server.wait_for_metrics(IO_TIMEOUT, "every subscriber counted", |m| {
            m.subscribers_open() == SUBSCRIBERS as f64
        });

        // Two publishers at once, each on its own keep-alive connection, so the
        // sequencer sees concurrent publishes.
        let published: Vec<(u64, Vec<&str>, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|p| {
                    scope.spawn(move || {
                        let mut publisher = server.publisher();
                        (0..EVENTS_PER_PUBLISHER)
                            .map(|n| {
                                let k = p * EVENTS_PER_PUBLISHER + n;
                                let topics = destination(k);
                                let data = payload(k as u64, 100);
                                let id = publisher.publish(&topics, None, data.as_bytes());
                                (id, topics, data)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut all_ids: Vec<u64> = published.iter().map(|(id, _, _)| *id).collect();
        all_ids.sort_unstable();
        all_ids.dedup();
        assert_eq!(all_ids.len(), published.len(), "publish answered a duplicate id");
        // A sentinel on every topic, published last: everything a subscriber receives
        // before it is the complete set it will ever get from the events above.
        let sentinel = server.publish(&TOPICS, None, "sentinel");
        assert!(sentinel > *all_ids.last().unwrap(), "ids must increase across publishes");

        let data_by_id: HashMap<u64, &str> =
            published.iter().map(|(id, _, data)| (*id, data.as_str())).collect();
        let mut deliveries = 0usize;
        for (index, (topics, client)) in clients.iter_mut().enumerate() {
            let mut expected: Vec<u64> = published
                .iter()
                .filter(|(_, to, _)| to.iter().any(|t| topics.contains(t)))
                .map(|(id, _, _)| *id)
                .collect();
            expected.sort_unstable();
            let context = format!("subscriber {index} on {topics:?}");
            let mut received = Vec::new();
            loop {
                let event = client.expect_event(IO_TIMEOUT, &context);
                assert_eq!(event.event, None, "{context}: unexpected event type");
                let id = event.id();
                if id == sentinel {
                    assert_eq!(event.data(), "sentinel");
                    break;
                }
                assert_eq!(
                    Some(&event.data().as_str()),
                    data_by_id.get(&id),
                    "{context}: data of id {id}"
                );
                received.push(id);
            }
            assert_strictly_increasing(&received, &context);
            assert_eq!(received, expected, "{context}: lost, extra or duplicated events");
            assert!(client.unknown_lines().is_empty(), "{context}: {:?}", client.unknown_lines());
            deliveries += received.len() + 1;
        }

        let published_total = (published.len() + 1) as f64;
        server.wait_for_metrics(IO_TIMEOUT, "published and delivered counters", |m| {
            m.counter("plenum_events_published_total") == published_total
                && m.counter("plenum_frames_delivered_total") == deliveries as f64
        });
    }

    fn data_lines_split_on_every_line_end(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["frames"]);
        // (what, event type, body, expected data: lines)
        let cases: &[FrameCase] = &[
            ("CRLF, CR and LF each split once", None, b"a\r\nb\rc\nd", &["a", "b", "c", "d"]),
            ("an empty body is one empty data line", None, b"", &[""]),
            ("empty lines inside are kept", None, b"a\n\nb", &["a", "", "b"]),
            ("CR CR is two line ends", None, b"a\r\rb", &["a", "", "b"]),
            // Contract reading: the body is split on line ends, so a trailing line end
            // leaves an empty last line; the client reassembles exactly "x\n".
            ("a trailing line end leaves an empty last line", None, b"x\n", &["x", ""]),
            ("leading spaces and colons survive", None, b" lead: x", &[" lead: x"]),
            ("UTF-8 and an event type", Some("greeting"), "héllo ✓".as_bytes(), &["héllo ✓"]),
        ];
        for (what, event_type, body, lines) in cases {
            let id = server.publish(&["frames"], *event_type, body);
            let event = client.expect_event(IO_TIMEOUT, what);
            assert_eq!(event.id(), id, "{what}: id line must be the id publish answered");
            assert_eq!(event.event.as_deref(), *event_type, "{what}: event line");
            assert_eq!(event.data_lines, *lines, "{what}: data lines");
        }
        assert!(client.unknown_lines().is_empty(), "{:?}", client.unknown_lines());
    }
}
