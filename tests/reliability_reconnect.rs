//! Reliability, scenario 5: no loss across reconnects.
//!
//! 1. Fifty subscribers drop their connections at random moments (seeded: after
//!    a random number of events, by FIN, by RST, by a half-close, or after
//!    leaving events unread in the socket; some also abort a handshake before
//!    reconnecting) and come back after a random absence with `Last-Event-ID`,
//!    alternately as the header and as the `lastEventID` query parameter, while
//!    a publisher sends a steady ~300 events/s. Every subscriber ends with
//!    exactly the publisher's acknowledged ids, in order, no duplicates, no gap
//!    signal, and every resume is counted as a replay.
//! 2. With a history of 20 events, subscribers that stay away until more than
//!    20 events have passed see the `plenum-gap` signal (`too_old`, echoing the
//!    id they sent) first, then the retained history, then live events, with
//!    no gap after the signal; a subscriber that never left misses nothing.
//!
//! The seed is printed at the start; `PLENUM_TEST_SEED=<seed>` replays a run.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::reliability::{diagnose_connection, test_seed, Rng};
use common::*;

const SUBSCRIBERS: usize = 50;
const EVENTS: u64 = 2400;
/// ~300 events/s.
const PUBLISH_INTERVAL: Duration = Duration::from_micros(3333);
const TOPIC: &str = "reconnect";

/// Published events as acknowledged: ids indexed by `seq`, and how many so far.
#[derive(Default)]
struct Published {
    ids: Mutex<Vec<u64>>,
    count: AtomicUsize,
    last_id: AtomicU64,
}

/// Publishes `events` events with data `seq=N` at a steady pace (the pace is
/// the load, not a synchronisation), recording each acknowledged id.
fn publish_steadily(server: &Server, published: &Published, events: u64, interval: Duration) {
    let mut publisher = server.publisher();
    let started = Instant::now();
    for seq in 0..events {
        let due = started + interval * seq as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = publisher.publish(&[TOPIC], None, format!("seq={seq}").as_bytes());
        published.ids.lock().unwrap().push(id);
        published.last_id.store(id, Ordering::Release);
        published.count.fetch_add(1, Ordering::AcqRel);
    }
}

fn seq_of(event: &Event, context: &str) -> u64 {
    event
        .data()
        .strip_prefix("seq=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{context}: not a seq= event: {event:?}"))
}

/// How a subscriber leaves.
#[derive(Clone, Copy, Debug)]
enum Leave {
    Fin,
    Reset,
    HalfClose,
    /// Stop reading for a moment (events pile up unread), then FIN.
    UnreadThenFin,
}

#[derive(Default, Debug)]
struct SubscriberRun {
    received: Vec<u64>,
    reconnects: usize,
    aborted_handshakes: usize,
    header_resumes: usize,
    query_resumes: usize,
}

/// One subscriber's life: read a random number of events, leave, stay away a
/// random while, resume with its last id; until it has the last event.
fn flaky_subscriber(
    server: &Server,
    mut client: SseClient,
    mut rng: Rng,
    index: usize,
    seed: u64,
) -> SubscriberRun {
    let context = |what: &str| format!("subscriber {index} (seed {seed}): {what}");
    let mut run = SubscriberRun::default();
    let mut expected_seq = 0u64;
    loop {
        let budget = rng.range(1, 160);
        for _ in 0..budget {
            let event = client.expect_event(IO_TIMEOUT, &context("reading"));
            assert!(
                !event.is_gap(),
                "{}",
                context(&format!("gap signal within history: {event:?}"))
            );
            let seq = seq_of(&event, &context("reading"));
            assert_eq!(
                seq,
                expected_seq,
                "{}",
                context(&format!(
                    "after {} reconnects: got seq {seq}, expected {expected_seq} (id {})",
                    run.reconnects,
                    event.id()
                ))
            );
            expected_seq += 1;
            run.received.push(event.id());
            if seq == EVENTS - 1 {
                return run;
            }
        }
        let last = *run.received.last().expect("read at least one event");
        let leave = match rng.range(0, 4) {
            0 => Leave::Fin,
            1 => Leave::Reset,
            2 => Leave::HalfClose,
            _ => Leave::UnreadThenFin,
        };
        match leave {
            Leave::Fin => drop(client),
            Leave::Reset => close_with_reset(client.into_stream()),
            Leave::HalfClose => {
                shutdown_write(client.stream());
                drop(client);
            }
            Leave::UnreadThenFin => {
                // Client behaviour being modelled (a busy reader), not a wait on the server.
                std::thread::sleep(Duration::from_millis(rng.range(1, 30)));
                drop(client);
            }
        }
        // Away for a while: the client's own pace, not a synchronisation.
        std::thread::sleep(Duration::from_millis(rng.range(0, 60)));
        if rng.chance(1, 5) {
            // A reconnect attempt that gives up before the answer.
            if let Ok(mut conn) = HttpConn::connect(server.addr()) {
                let _ = conn.send(&Subscribe::topics(&[TOPIC]).request_bytes());
                if rng.chance(1, 2) {
                    close_with_reset(conn.stream);
                }
            }
            run.aborted_handshakes += 1;
        }
        let request = if run.reconnects % 2 == 0 {
            run.header_resumes += 1;
            Subscribe::topics(&[TOPIC]).last_event_id_header(last)
        } else {
            run.query_resumes += 1;
            Subscribe::topics(&[TOPIC]).last_event_id_query(last)
        };
        run.reconnects += 1;
        let mut conn = HttpConn::connect(server.addr())
            .unwrap_or_else(|error| panic!("{}", context(&format!("reconnect failed: {error}"))));
        let local = conn.stream.local_addr().unwrap();
        // Kept open past a failure, so the diagnosis sees the connection's state.
        let _kept = conn.stream.try_clone().unwrap();
        conn.send(&request.request_bytes()).unwrap();
        client = SseClient::open_on(conn).unwrap_or_else(|error| {
            panic!(
                "{}\n{}",
                context(&format!("resume after {last} failed: {error:?}")),
                diagnose_connection(server, local)
            )
        });
    }
}

backend_tests! {
    fn subscribers_reconnecting_at_random_moments_receive_every_event_once_in_order(backend: Backend) {
        let seed = test_seed();
        let server = Server::start(backend, &["--shards", "2"]);
        let server = &server;
        // Every subscriber is in before the first publish, so each must see all events.
        let clients: Vec<SseClient> = (0..SUBSCRIBERS).map(|_| server.subscribe(&[TOPIC])).collect();
        let published = Published::default();
        let started = Instant::now();
        let runs: Vec<SubscriberRun> = std::thread::scope(|scope| {
            let published = &published;
            let publisher = scope.spawn(move || publish_steadily(server, published, EVENTS, PUBLISH_INTERVAL));
            let handles: Vec<_> = clients
                .into_iter()
                .enumerate()
                .map(|(index, client)| {
                    let rng = Rng::derive(seed, index as u64);
                    scope.spawn(move || flaky_subscriber(server, client, rng, index, seed))
                })
                .collect();
            publisher.join().expect("publisher");
            handles.into_iter().map(|h| h.join().expect("subscriber")).collect()
        });
        let elapsed = started.elapsed();
        let ids = published.ids.into_inner().unwrap();
        assert_eq!(ids.len() as u64, EVENTS);
        assert_strictly_increasing(&ids, "acknowledged ids");
        for (index, run) in runs.iter().enumerate() {
            assert!(
                run.received == ids,
                "subscriber {index} (seed {seed}): received {} ids, published {}; first difference at {:?}",
                run.received.len(),
                ids.len(),
                run.received.iter().zip(&ids).position(|(a, b)| a != b)
            );
        }
        let reconnects: usize = runs.iter().map(|r| r.reconnects).sum();
        let aborted: usize = runs.iter().map(|r| r.aborted_handshakes).sum();
        let by_header: usize = runs.iter().map(|r| r.header_resumes).sum();
        let by_query: usize = runs.iter().map(|r| r.query_resumes).sum();
        let least = runs.iter().map(|r| r.reconnects).min().unwrap();
        eprintln!(
            "{SUBSCRIBERS} subscribers, {EVENTS} events in {elapsed:?}: {reconnects} resumes \
             ({by_header} by header, {by_query} by query, fewest per subscriber {least}), \
             {aborted} aborted handshakes (seed {seed})"
        );
        assert!(least >= 3, "every subscriber must cross several seams (seed {seed}): fewest {least}");
        assert!(by_header > 0 && by_query > 0, "both resume forms must be exercised");
        server.wait_for_metrics(IO_TIMEOUT, "every resume counted as an exact replay", |m| {
            m.counter("plenum_replays_total") == reconnects as f64
                && m.counter("plenum_replays_too_old_total") == 0.0
        });
    }

    fn subscriber_away_longer_than_history_gets_gap_signal_then_history_then_live(backend: Backend) {
        const EVENTS_SHORT: u64 = 600;
        const HISTORY: u64 = 20;
        let seed = test_seed();
        let server = Server::start(backend, &["--shards", "2", "--history-events-max", "20"]);
        let server = &server;
        let steady = server.subscribe(&[TOPIC]);
        let away: Vec<SseClient> = (0..2).map(|_| server.subscribe(&[TOPIC])).collect();
        let published = Published::default();
        std::thread::scope(|scope| {
            let published = &published;
            // ~200 events/s for 3 s.
            let publisher = scope.spawn(move || publish_steadily(server, published, EVENTS_SHORT, Duration::from_millis(5)));
            let steady = scope.spawn(move || {
                let mut steady = steady;
                (0..EVENTS_SHORT)
                    .map(|seq| {
                        let event = steady.expect_event(IO_TIMEOUT, "the subscriber that stays");
                        assert_eq!(seq_of(&event, "steady"), seq, "the subscriber that stays must miss nothing");
                        event.id()
                    })
                    .collect::<Vec<u64>>()
            });
            for (index, mut client) in away.into_iter().enumerate() {
                scope.spawn(move || {
                    let leave_after = 40 + 30 * index as u64;
                    let mut last = (0, 0);
                    for seq in 0..leave_after {
                        let event = client.expect_event(IO_TIMEOUT, "before leaving");
                        assert_eq!(seq_of(&event, "before leaving"), seq);
                        last = (seq, event.id());
                    }
                    drop(client);
                    // Away until the publisher has acknowledged 3 × history past our last event.
                    let back_at = (last.0 + 1 + 3 * HISTORY) as usize;
                    assert!(
                        wait_until(Duration::from_secs(20), || published.count.load(Ordering::Acquire) >= back_at),
                        "the publisher stalled before event {back_at}"
                    );
                    let request = if index == 0 {
                        Subscribe::topics(&[TOPIC]).last_event_id_header(last.1)
                    } else {
                        Subscribe::topics(&[TOPIC]).last_event_id_query(last.1)
                    };
                    let mut client = server.subscribe_with(&request);
                    let gap = client.expect_event(IO_TIMEOUT, "the gap signal");
                    assert!(gap.is_gap(), "away subscriber {index}: expected plenum-gap first, got {gap:?}");
                    assert_eq!(gap.id, None, "the gap signal carries no id");
                    assert_eq!(gap.gap(), ("too_old".to_string(), last.1.to_string()));
                    // Then the retained history and live events, contiguous to the end.
                    let first = client.expect_event(IO_TIMEOUT, "first event after the gap");
                    let first_seq = seq_of(&first, "after the gap");
                    assert!(
                        first_seq >= last.0 + 1 + 2 * HISTORY,
                        "away subscriber {index}: left after seq {}, resumed at {first_seq}: \
                         history of {HISTORY} cannot have held that",
                        last.0
                    );
                    for seq in first_seq + 1..EVENTS_SHORT {
                        let event = client.expect_event(IO_TIMEOUT, "history then live");
                        assert_eq!(seq_of(&event, "history then live"), seq, "no gap after the signal");
                    }
                    eprintln!(
                        "away subscriber {index}: left after seq {}, gap signal, resumed at seq {first_seq} (seed {seed})",
                        last.0
                    );
                });
            }
            let got = steady.join().expect("steady subscriber");
            // The last event may arrive before its publish is acknowledged.
            publisher.join().expect("publisher");
            let ids = published.ids.lock().unwrap();
            assert!(
                got == *ids,
                "the subscriber that stayed: {} events, {} published, first difference at {:?}",
                got.len(),
                ids.len(),
                got.iter().zip(ids.iter()).position(|(a, b)| a != b)
            );
        });
        server.wait_for_metrics(IO_TIMEOUT, "two gap signals counted", |m| {
            m.counter("plenum_replays_too_old_total") == 2.0 && m.counter("plenum_replays_total") == 2.0
        });
    }
}
