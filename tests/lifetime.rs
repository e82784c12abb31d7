//! Stream lifetime: with `--stream-lifetime-max 1s --stream-lifetime-jitter 0` a
//! stream ends after 1 s with `retry: <--retry-hint ms>` and an orderly close, counted
//! as `lifetime`; a client that reconnects with `Last-Event-ID` each time loses
//! nothing while events keep flowing. With jitter, lifetimes spread.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

backend_tests! {
    fn stream_ends_with_retry_hint_after_its_lifetime(backend: Backend) {
        let server = Server::start(backend, &[
            "--stream-lifetime-max", "1s",
            "--stream-lifetime-jitter", "0",
            "--retry-hint", "1500ms",
        ]);
        let before = server.metrics().closed("lifetime");
        let opened = Instant::now();
        let mut client = server.subscribe(&["t"]);
        let id = server.publish(&["t"], None, "during");
        assert_eq!(client.expect_event(IO_TIMEOUT, "event within the lifetime").id(), id);
        let (items, end) = client.read_until_end(Duration::from_secs(4));
        let lived = opened.elapsed();
        assert_eq!(items, vec![SseItem::Retry(1500)], "the stream must end with exactly `retry: 1500`");
        assert_eq!(end, StreamEnd::Eof, "a lifetime end is an orderly close");
        assert!(
            lived >= Duration::from_millis(900) && lived <= Duration::from_secs(3),
            "stream lived {lived:?}, expected about 1 s"
        );
        server.wait_for_metrics(IO_TIMEOUT, "counted as lifetime", |m| {
            m.closed("lifetime") == before + 1.0
        });
    }

    fn reconnecting_with_last_event_id_across_lifetimes_loses_nothing(backend: Backend) {
        let server = Server::start(backend, &["--stream-lifetime-max", "1s", "--stream-lifetime-jitter", "0"]);
        let server = &server;
        let final_id = AtomicU64::new(0);
        let final_id = &final_id;
        let mut client = server.subscribe(&["t"]);
        let (published, received, ends, retries) = std::thread::scope(|scope| {
            let publisher = scope.spawn(move || {
                let mut publisher = server.publisher();
                let started = Instant::now();
                let mut ids = Vec::new();
                while started.elapsed() < Duration::from_millis(3500) {
                    ids.push(publisher.publish(&["t"], None, format!("e{}", ids.len()).as_bytes()));
                    std::thread::sleep(Duration::from_millis(20)); // pacing
                }
                final_id.store(*ids.last().unwrap(), Ordering::Relaxed);
                ids
            });
            let mut received: Vec<u64> = Vec::new();
            let mut ends = 0usize;
            let mut retries = 0usize;
            let mut retry_before_end = false;
            loop {
                let last = final_id.load(Ordering::Relaxed);
                if last != 0 && received.last() == Some(&last) {
                    break;
                }
                match client.next_item(IO_TIMEOUT) {
                    Ok(SseItem::Event(event)) => {
                        assert!(!event.is_gap(), "resume must be exact: {event:?}");
                        received.push(event.id());
                    }
                    Ok(SseItem::Retry(_)) => {
                        retries += 1;
                        retry_before_end = true;
                    }
                    Ok(SseItem::Comment(_)) => {}
                    Err(StreamEnd::Eof) => {
                        assert!(retry_before_end, "stream {ends} ended without a retry hint");
                        retry_before_end = false;
                        ends += 1;
                        let resume = Subscribe::topics(&["t"]);
                        let resume = match received.last() {
                            Some(id) => resume.last_event_id_header(id),
                            None => resume,
                        };
                        client = server.subscribe_with(&resume);
                    }
                    Err(end) => panic!("stream failed: {end:?}"),
                }
            }
            (publisher.join().unwrap(), received, ends, retries)
        });
        assert!(ends >= 3, "3.5 s of 1 s lifetimes must end at least 3 streams, ended {ends}");
        assert!(retries >= ends, "every ended stream carries a retry hint first");
        assert_eq!(received, published, "events lost or duplicated across lifetime ends");
        server.wait_for_metrics(IO_TIMEOUT, "lifetime ends counted", |m| {
            m.closed("lifetime") >= ends as f64
        });
    }

    fn jitter_spreads_stream_lifetimes(backend: Backend) {
        let server = Server::start(backend, &["--stream-lifetime-max", "2s", "--stream-lifetime-jitter", "50"]);
        let opened = Instant::now();
        let clients: Vec<SseClient> = (0..6).map(|_| server.subscribe(&["t"])).collect();
        let lifetimes: Vec<Duration> = std::thread::scope(|scope| {
            let handles: Vec<_> = clients
                .into_iter()
                .map(|mut client| {
                    scope.spawn(move || {
                        let (_, end) = client.read_until_end(Duration::from_secs(5));
                        assert_eq!(end, StreamEnd::Eof, "stream did not end within 2 s + 50%");
                        opened.elapsed()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for lived in &lifetimes {
            assert!(
                *lived >= Duration::from_millis(900) && *lived <= Duration::from_millis(3400),
                "lifetime {lived:?} outside 2 s ± 50%"
            );
        }
        let spread = *lifetimes.iter().max().unwrap() - *lifetimes.iter().min().unwrap();
        assert!(spread >= Duration::from_millis(50), "six jittered lifetimes all within {spread:?}: {lifetimes:?}");
    }

    fn no_event_follows_the_retry_hint_of_an_ended_stream(backend: Backend) {
        // Regression: a stream ended by its lifetime while its `retry:` hint was
        // still queued (behind a backlog on epoll, always in flight on io_uring)
        // went on taking live events, written after the hint.
        let server = Server::start(backend, &[
            "--stream-lifetime-max", "1s",
            "--stream-lifetime-jitter", "0",
            "--retry-hint", "1500ms",
        ]);
        let subscribed_at = Instant::now();
        let mut client = server.subscribe_with(&Subscribe::topics(&["t"]).recv_buffer(4096));
        // A backlog: events the client does not read yet.
        let mut publisher = server.publisher();
        for n in 0..200u64 {
            publisher.publish(&["t"], None, payload(n, 1024).as_bytes());
        }
        server.wait_for_metrics(IO_TIMEOUT, "the subscriber is backlogged", |m| {
            m.counter("plenum_outbox_bytes") > 0.0
        });
        // Past the lifetime (1 s, no jitter) and a sweep: the stream has been ended.
        let ended_by = subscribed_at + Duration::from_millis(1500);
        std::thread::sleep(ended_by.saturating_duration_since(Instant::now())); // a known deadline
        for n in 200..220u64 {
            publisher.publish(&["t"], None, payload(n, 1024).as_bytes());
        }
        let (items, end) = client.read_until_end(Duration::from_secs(10));
        assert_eq!(end, StreamEnd::Eof, "the ended stream closes");
        let retry_at = items
            .iter()
            .position(|item| *item == SseItem::Retry(1500))
            .expect("the stream carries the retry hint");
        assert_eq!(
            &items[retry_at + 1..],
            &[] as &[SseItem],
            "nothing may follow the retry hint ({} events before it)",
            retry_at
        );
    }
}
