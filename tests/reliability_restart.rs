//! Reliability, scenario 8: restart.
//!
//! 1. Under load — 20 subscribers reading and a publisher sending ~500
//!    events/s — the server gets SIGTERM. `/healthz` answers `503 draining`
//!    (asked on a connection whose request head was left incomplete before the
//!    signal, and completed once the drain has visibly begun, so the answer
//!    cannot race the drain), every stream ends cleanly (`retry:` then an
//!    orderly close), each subscriber's events are exactly a prefix of what the
//!    publisher had acknowledged, and the process exits 0 within
//!    `--shutdown-timeout`.
//! 2. A new process is started on the same port. The subscribers reconnect
//!    with the ids they last saw, from the previous epoch: each gets the
//!    `plenum-gap` signal `too_old` (echoing its id) first, then the new run's
//!    history, then live events.
//!
//! What is lost across a restart (history is in memory, in one process):
//!
//! - every event of the previous run: the new process has no history, so no
//!   subscriber can replay what it missed, whatever its id (hence `too_old`);
//! - events acknowledged to a publisher during the drain but not yet written
//!   to a subscriber whose stream had already ended (the test reports how many
//!   per subscriber); a publish that races the drain may also be refused or
//!   unanswered (connection closed), and the publisher must retry it against
//!   the new process;
//! - all subscriptions (each client reconnects) and all counters (metrics
//!   restart from zero).
//!
//! What is kept: ids keep increasing (the new epoch's first id is above every
//! id of the old run), so a client's `Last-Event-ID` is never mistaken for a
//! newer event. A later scale-out issue is to keep history outside the process.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::reliability::start_on_port;
use common::*;

const SUBSCRIBERS: usize = 20;
const TOPIC: &str = "restart";
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_MS: u64 = 1000;
/// The process may take a moment past the drain to be reaped.
const EXIT_MARGIN: Duration = Duration::from_millis(500);

/// What one subscriber saw of the first run.
struct FirstRun {
    ids: Vec<u64>,
    /// The last non-comment item was `retry: RETRY_MS`.
    ended_with_retry: bool,
    end: StreamEnd,
}

fn read_to_the_end(mut client: SseClient, retry_seen: &AtomicBool) -> FirstRun {
    let mut ids = Vec::new();
    let mut last_control = None;
    let end = loop {
        match client.next_item(SHUTDOWN_TIMEOUT * 3) {
            Ok(SseItem::Event(event)) => {
                ids.push(event.id());
                last_control = None;
            }
            Ok(SseItem::Retry(ms)) => {
                retry_seen.store(true, Ordering::Release);
                last_control = Some(ms);
            }
            Ok(SseItem::Comment(_)) => {}
            Err(end) => break end,
        }
    };
    FirstRun {
        ids,
        ended_with_retry: last_control == Some(RETRY_MS),
        end,
    }
}

backend_tests! {
    fn sigterm_under_load_drains_cleanly_and_a_restarted_server_signals_too_old(backend: Backend) {
        let args = ["--shards", "2", "--shutdown-timeout", "3s", "--retry-hint", "1s"];
        let first = Server::start(backend, &args);
        let port = first.port();
        let clients: Vec<SseClient> = (0..SUBSCRIBERS).map(|_| first.subscribe(&[TOPIC])).collect();
        let before = first.get("/healthz").expect("/healthz before the signal");
        assert_eq!((before.status, before.text().trim()), (200, "ok"));
        // A /healthz request whose head is not complete yet: not idle, so the drain
        // keeps it open until its force deadline.
        let mut health = HttpConn::connect(first.addr()).unwrap();
        health.send(b"GET /healthz HTTP/1.1\r\nHost: plenum.test\r\n").unwrap();

        let acked = Mutex::new(Vec::new());
        let acked_count = AtomicUsize::new(0);
        let retry_seen = AtomicBool::new(false);
        let (runs, publish_error, exit, drained_after, health_answer) = std::thread::scope(|scope| {
            let (acked, acked_count, retry_seen, first) = (&acked, &acked_count, &retry_seen, &first);
            let publisher = scope.spawn(move || {
                let mut publisher = first.publisher();
                let started = Instant::now();
                for n in 0u32.. {
                    // ~500 events/s: the load's pace, not a synchronisation.
                    if let Some(wait) = (started + Duration::from_millis(2) * n).checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    match publisher.publish_response(&[TOPIC], None, format!("old-{n}").as_bytes()) {
                        Ok(response) if response.status == 200 => {
                            acked.lock().unwrap().push(parse_id(&response.text()));
                            acked_count.fetch_add(1, Ordering::AcqRel);
                        }
                        Ok(response) => return format!("answered {}", response.status),
                        Err(error) => return format!("{:?}", error.kind()),
                    }
                }
                unreachable!()
            });
            let readers: Vec<_> = clients
                .into_iter()
                .map(|client| scope.spawn(move || read_to_the_end(client, retry_seen)))
                .collect();
            assert!(
                wait_until(IO_TIMEOUT, || acked_count.load(Ordering::Acquire) >= 500),
                "the load did not get going"
            );
            let signalled = Instant::now();
            first.term();
            // The drain has begun once a stream gets its retry hint.
            assert!(wait_until(SHUTDOWN_TIMEOUT, || retry_seen.load(Ordering::Acquire)), "no stream ended after SIGTERM");
            health.send(b"\r\n").unwrap();
            let health_answer = health.read_response(IO_TIMEOUT).expect("/healthz during the drain");
            let (health_end, _) = health.read_to_end(IO_TIMEOUT);
            assert!(health_end.is_closed(), "the /healthz connection must close during a drain");
            let runs: Vec<FirstRun> = readers.into_iter().map(|r| r.join().expect("subscriber")).collect();
            let drained_after = signalled.elapsed();
            let exit = first.wait_exit(SHUTDOWN_TIMEOUT + EXIT_MARGIN);
            let exit = exit.map(|status| (status, signalled.elapsed()));
            (runs, publisher.join().expect("publisher"), exit, drained_after, health_answer)
        });

        // 1. The drain.
        assert_eq!(
            (health_answer.status, health_answer.text().trim()),
            (503, "draining"),
            "/healthz while draining"
        );
        let (status, exited_after) = exit.unwrap_or_else(|| panic!("still running {:?} after SIGTERM", SHUTDOWN_TIMEOUT + EXIT_MARGIN));
        assert!(status.success(), "a drained server exits 0, got {status}");
        assert!(exited_after <= SHUTDOWN_TIMEOUT + EXIT_MARGIN, "exited {exited_after:?} after SIGTERM");
        let acked = acked.into_inner().unwrap();
        assert_strictly_increasing(&acked, "acknowledged ids");
        let mut lost = Vec::new();
        for (index, run) in runs.iter().enumerate() {
            assert_eq!(run.end, StreamEnd::Eof, "subscriber {index}: the stream must end with an orderly close");
            assert!(run.ended_with_retry, "subscriber {index}: the stream must end with `retry: {RETRY_MS}`");
            assert_strictly_increasing(&run.ids, &format!("subscriber {index}"));
            // A prefix of the acknowledged ids; at most one more, published but
            // unacknowledged when the publisher's connection closed.
            let delivered_acked = run.ids.iter().take_while(|id| acked.contains(id)).count();
            assert_eq!(&run.ids[..delivered_acked], &acked[..delivered_acked], "subscriber {index}: a gap before the end");
            assert!(run.ids.len() - delivered_acked <= 1, "subscriber {index}: ids never acknowledged: {:?}", &run.ids[delivered_acked..]);
            lost.push(acked.len() - delivered_acked);
        }
        eprintln!(
            "SIGTERM after {} acknowledged events: streams ended within {drained_after:?}, exit 0 after {exited_after:?}; \
             the publisher stopped with {publish_error}; acknowledged but not delivered per subscriber: {lost:?}",
            acked.len()
        );

        // 2. The restart, on the same port.
        let second = start_on_port(backend, port, &args);
        let new_ids: Vec<u64> = (0..5).map(|n| second.publish(&[TOPIC], None, format!("new-{n}"))).collect();
        assert!(
            new_ids[0] > *acked.last().unwrap(),
            "the new epoch's ids must be above the old run's: {} vs {}",
            new_ids[0],
            acked.last().unwrap()
        );
        let mut resumed = Vec::new();
        for (index, run) in runs.iter().enumerate() {
            let last = *run.ids.last().expect("every subscriber saw events before the signal");
            let request = if index % 2 == 0 {
                Subscribe::topics(&[TOPIC]).last_event_id_header(last)
            } else {
                Subscribe::topics(&[TOPIC]).last_event_id_query(last)
            };
            let mut client = second.subscribe_with(&request);
            let gap = client.expect_event(IO_TIMEOUT, "gap signal after the restart");
            assert!(gap.is_gap(), "subscriber {index}: expected plenum-gap first, got {gap:?}");
            assert_eq!(gap.gap(), ("too_old".to_string(), last.to_string()), "subscriber {index}");
            let replayed: Vec<u64> = client.expect_events(new_ids.len(), IO_TIMEOUT, "the new run's history").iter().map(Event::id).collect();
            assert_eq!(replayed, new_ids, "subscriber {index}: the new run's history after the gap");
            resumed.push(client);
        }
        let live = second.publish(&[TOPIC], None, "live");
        for (index, client) in resumed.iter_mut().enumerate() {
            assert_eq!(client.expect_event(IO_TIMEOUT, "live after the restart").id(), live, "subscriber {index}");
        }
        second.wait_for_metrics(IO_TIMEOUT, "every reconnect signalled too_old", |m| {
            m.counter("plenum_replays_too_old_total") == SUBSCRIBERS as f64
        });
    }
}
