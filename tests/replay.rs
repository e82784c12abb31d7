//! Replay: a client that reconnects with `Last-Event-ID` (header, `lastEventID` query
//! parameter, or both — the header wins) continues exactly where it stopped, with no
//! gap and no duplicate at the seam while events keep being published; an id the
//! server cannot continue from exactly gets the `plenum-gap` signal first (`too_old`
//! for ids older than history or from an earlier run, `unknown` for ids it never
//! issued), then the retained history, then live events. Both are counted.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

/// How a reconnecting client sends its last event id.
#[derive(Clone, Copy, Debug)]
enum Resume {
    Header,
    Query,
    /// The real id in the header and an older one in the query: if the server used
    /// the query, the client would see duplicates.
    HeaderAndOlderQuery,
}

const LIVE_EVENTS: usize = 400;
const EVENTS_PER_CONNECTION: usize = 55;

/// A publisher thread publishes `LIVE_EVENTS` on "live" (and noise on "other") while
/// the client drops its connection every `EVENTS_PER_CONNECTION` events and resumes.
/// The concatenation of everything received must be exactly the published ids.
fn resume_while_publishing(backend: Backend, how: Resume) {
    let server = Server::start(backend, &[]);
    let server = &server;
    // Subscribed before the first publish, so the first connection sees every event.
    let first = server.subscribe(&["live"]);
    let (published, received, reconnects) = std::thread::scope(|scope| {
        let publisher = scope.spawn(move || {
            let mut publisher = server.publisher();
            let mut live = Vec::new();
            for n in 0..LIVE_EVENTS {
                live.push(publisher.publish(&["live"], None, payload(n as u64, 64).as_bytes()));
                if n % 5 == 0 {
                    publisher.publish(&["other"], None, b"noise");
                }
                // Pacing, not synchronisation: spread the events over the reconnects.
                std::thread::sleep(Duration::from_millis(2));
            }
            live
        });

        let mut received: Vec<u64> = Vec::new();
        let mut reconnects = 0usize;
        let mut client = Some(first);
        loop {
            let mut current = client.take().unwrap_or_else(|| {
                let last = *received
                    .last()
                    .expect("read at least one event before resuming");
                let oldest = received[0];
                let request = match how {
                    Resume::Header => Subscribe::topics(&["live"]).last_event_id_header(last),
                    Resume::Query => Subscribe::topics(&["live"]).last_event_id_query(last),
                    Resume::HeaderAndOlderQuery => Subscribe::topics(&["live"])
                        .last_event_id_header(last)
                        .last_event_id_query(oldest),
                };
                reconnects += 1;
                server.subscribe_with(&request)
            });
            for _ in 0..EVENTS_PER_CONNECTION {
                let event = current.expect_event(IO_TIMEOUT, "resumed stream");
                assert!(
                    !event.is_gap(),
                    "exact resume must not signal a gap: {event:?}"
                );
                received.push(event.id());
                if received.len() == LIVE_EVENTS {
                    break;
                }
            }
            if received.len() == LIVE_EVENTS {
                break;
            }
            // Dropping `current` closes the connection with unread events in flight.
        }
        (publisher.join().unwrap(), received, reconnects)
    });

    assert!(
        reconnects >= 3,
        "the test must exercise several seams, got {reconnects}"
    );
    assert_strictly_increasing(&received, &format!("{how:?}"));
    assert_eq!(received, published, "{how:?}: gap or duplicate at a seam");
    server.wait_for_metrics(IO_TIMEOUT, "every resume counted as a replay", |m| {
        m.counter("plenum_replays_total") == reconnects as f64
            && m.counter("plenum_replays_too_old_total") == 0.0
    });
}

/// Opens a subscription resuming from `last_event_id` (header) and asserts the gap
/// signal with `reason`, then returns the client positioned after it.
fn expect_gap(server: &Server, topics: &[&str], last_event_id: &str, reason: &str) -> SseClient {
    let mut client =
        server.subscribe_with(&Subscribe::topics(topics).last_event_id_header(last_event_id));
    let event = client.expect_event(IO_TIMEOUT, "gap signal");
    assert!(event.is_gap(), "expected plenum-gap first, got {event:?}");
    assert_eq!(event.id, None, "the gap signal must carry no id line");
    assert_eq!(
        event.gap(),
        (reason.to_string(), last_event_id.to_string()),
        "gap payload"
    );
    client
}

fn expect_ids(client: &mut SseClient, ids: &[u64], context: &str) {
    let got: Vec<u64> = client
        .expect_events(ids.len(), IO_TIMEOUT, context)
        .iter()
        .map(Event::id)
        .collect();
    assert_eq!(got, ids, "{context}");
}

/// After a replay the stream continues live: one more event arrives next.
fn expect_live(server: &Server, client: &mut SseClient, topic: &str) {
    let id = server.publish(&[topic], None, "live after replay");
    assert_eq!(
        client.expect_event(IO_TIMEOUT, "live after replay").id(),
        id
    );
}

backend_tests! {
    fn resume_with_header_continues_exactly(backend: Backend) {
        resume_while_publishing(backend, Resume::Header);
    }

    fn resume_with_query_parameter_continues_exactly(backend: Backend) {
        resume_while_publishing(backend, Resume::Query);
    }

    fn header_wins_over_query_parameter(backend: Backend) {
        resume_while_publishing(backend, Resume::HeaderAndOlderQuery);
    }

    fn replay_holds_only_the_subscribed_topics(backend: Backend) {
        let server = Server::start(backend, &[]);
        let first = server.publish(&["a"], None, "a0");
        let mut mine = Vec::new();
        for n in 0..10 {
            mine.push(server.publish(&["a"], None, format!("a{n}")));
            server.publish(&["b"], None, format!("b{n}"));
        }
        mine.push(server.publish(&["a", "b"], None, "both"));
        let mut client = server.subscribe_with(&Subscribe::topics(&["a"]).last_event_id_header(first));
        expect_ids(&mut client, &mine, "replay of topic a only");
        expect_live(&server, &mut client, "a");
    }

    fn too_old_id_gets_gap_signal_then_retained_history(backend: Backend) {
        let server = Server::start(backend, &["--history-events-max", "5"]);
        let ids: Vec<u64> = (0..20).map(|n| server.publish(&["t"], None, format!("e{n}"))).collect();
        let mut client = expect_gap(&server, &["t"], &ids[2].to_string(), "too_old");
        expect_ids(&mut client, &ids[15..], "retained history after the gap signal");
        expect_live(&server, &mut client, "t");
        server.wait_for_metrics(IO_TIMEOUT, "the gap counted", |m| {
            m.counter("plenum_replays_too_old_total") == 1.0
        });
    }

    fn id_just_before_retained_history_resumes_without_gap(backend: Backend) {
        // History keeps ids[15..20]; a client holding ids[14] misses nothing, so it
        // resumes exactly. A client holding ids[13] missed ids[14]: too_old.
        let server = Server::start(backend, &["--history-events-max", "5"]);
        let ids: Vec<u64> = (0..20).map(|n| server.publish(&["t"], None, format!("e{n}"))).collect();
        let mut exact = server.subscribe_with(&Subscribe::topics(&["t"]).last_event_id_header(ids[14]));
        expect_ids(&mut exact, &ids[15..], "exact resume at the history boundary");
        let mut gap = expect_gap(&server, &["t"], &ids[13].to_string(), "too_old");
        expect_ids(&mut gap, &ids[15..], "history after the gap");
        server.wait_for_metrics(IO_TIMEOUT, "one exact replay, one gap", |m| {
            m.counter("plenum_replays_too_old_total") == 1.0
        });
    }

    fn earlier_epoch_id_is_too_old(backend: Backend) {
        let old_ids: Vec<u64> = {
            let old = Server::start(backend, &[]);
            (0..3).map(|n| old.publish(&["t"], None, format!("old{n}"))).collect()
        }; // The first server is killed here.
        let server = Server::start(backend, &[]);
        let new_ids: Vec<u64> = (0..2).map(|n| server.publish(&["t"], None, format!("new{n}"))).collect();
        assert!(
            new_ids[0] > *old_ids.last().unwrap(),
            "a restarted server's ids must exceed the previous run's: {new_ids:?} vs {old_ids:?}"
        );
        let old_last = old_ids.last().unwrap().to_string();
        let mut client = expect_gap(&server, &["t"], &old_last, "too_old");
        expect_ids(&mut client, &new_ids, "this run's history after the gap");
        expect_live(&server, &mut client, "t");
        server.wait_for_metrics(IO_TIMEOUT, "the gap counted", |m| {
            m.counter("plenum_replays_too_old_total") == 1.0
        });
    }

    fn unknown_ids_get_gap_signal_then_history(backend: Backend) {
        let server = Server::start(backend, &[]);
        let ids: Vec<u64> = (0..3).map(|n| server.publish(&["t"], None, format!("e{n}"))).collect();
        let ahead = (ids[2] + 1000).to_string();
        let unknown = ["not-a-number", ahead.as_str(), "99999999999999999999999"];
        for id in unknown {
            let mut client = expect_gap(&server, &["t"], id, "unknown");
            expect_ids(&mut client, &ids, &format!("whole history after unknown id {id:?}"));
        }
        // The query parameter path gives the same signal.
        let mut client = server.subscribe_with(&Subscribe::topics(&["t"]).last_event_id_query("garbage"));
        let event = client.expect_event(IO_TIMEOUT, "gap via query");
        assert_eq!(event.gap(), ("unknown".to_string(), "garbage".to_string()));
        server.wait_for_metrics(IO_TIMEOUT, "every gap counted", |m| {
            m.counter("plenum_replays_too_old_total") == (unknown.len() + 1) as f64
        });
    }

    fn replay_overtaken_by_history_gets_a_second_gap_signal_and_goes_on(backend: Backend) {
        // Pages of 64 KiB (half the hard limit) of 32 KiB events, small socket
        // buffers, a history of 8 events and a subscriber that does not read:
        // its replay stops after the first page, and 8 more publishes evict
        // what it has not been sent yet.
        let server = Server::start(
            backend,
            &[
                "--history-events-max", "8",
                "--outbox-bytes-hard", "128KiB",
                "--outbox-bytes-soft", "0",
                "--socket-send-buffer-bytes", "4KiB",
                "--write-stall-timeout", "60s",
            ],
        );
        let data = |n: usize| format!("{n:>6}").repeat(32 * 1024 / 6);
        let first: Vec<u64> = (0..8).map(|n| server.publish(&["t"], None, data(n))).collect();
        let mut client = server.subscribe_with(
            &Subscribe::topics(&["t"]).last_event_id_header(first[0]).recv_buffer(4096),
        );
        server.wait_for_metrics(IO_TIMEOUT, "the first page stuck in the outbox", |m| {
            m.sum("plenum_outbox_bytes") > 0.0
        });
        let second: Vec<u64> = (8..16).map(|n| server.publish(&["t"], None, data(n))).collect();
        // Now read: the first page, the signal naming its last event, then all
        // that history holds, then live.
        let page = client.expect_event(IO_TIMEOUT, "first page");
        assert_eq!(page.id(), first[1], "replay starts right after the resume id");
        let mut sent = vec![page.id()];
        let gap = loop {
            let event = client.expect_event(IO_TIMEOUT, "first page, then the gap signal");
            if event.is_gap() {
                break event;
            }
            assert_eq!(event.data(), data(sent.len() + 1), "first page in order");
            sent.push(event.id());
        };
        assert!(sent.len() < 7, "the replay must have stopped part-way: it sent {sent:?}");
        assert_eq!(gap.id, None, "the gap signal carries no id");
        assert_eq!(
            gap.gap(),
            ("too_old".to_string(), sent.last().unwrap().to_string()),
            "the signal names the last event sent"
        );
        expect_ids(&mut client, &second, "what history holds after the signal");
        expect_live(&server, &mut client, "t");
        server.wait_for_metrics(IO_TIMEOUT, "one replay, overtaken once, never closed", |m| {
            m.counter("plenum_replays_total") == 1.0
                && m.counter("plenum_replays_overtaken_total") == 1.0
                && m.counter("plenum_replays_too_old_total") == 1.0
                && m.closed("slow_consumer") == 0.0
        });
    }
}
