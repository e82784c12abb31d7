//! Graceful shutdown: on SIGTERM (or SIGINT) `/healthz` turns `503 draining`, every
//! stream ends with a `retry:` hint and an orderly close, and the process exits
//! successfully within `--shutdown-timeout`. A stalled subscriber with pending bytes
//! keeps the drain going for a moment, so the `503` can be seen.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads a stream to its end and asserts it ended with `retry: <ms>` then EOF.
fn assert_ends_with_retry(client: &mut SseClient, retry_ms: u64, context: &str) {
    let (items, end) = client.read_until_end(SHUTDOWN_TIMEOUT + Duration::from_secs(1));
    assert_eq!(
        end,
        StreamEnd::Eof,
        "{context}: the stream must end with an orderly close"
    );
    let last_non_comment = items
        .iter()
        .rev()
        .find(|item| !matches!(item, SseItem::Comment(_)));
    assert_eq!(
        last_non_comment,
        Some(&SseItem::Retry(retry_ms)),
        "{context}: the stream must end with `retry: {retry_ms}`, got {items:?}"
    );
}

backend_tests! {
    fn sigterm_drains_with_503_and_retry_hints_then_exits_in_time(backend: Backend) {
        let server = Server::start(backend, &[
            "--shutdown-timeout", "3s",
            "--retry-hint", "1s",
            "--socket-send-buffer-bytes", "16KiB",
            "--outbox-bytes-soft", "0",
            "--outbox-bytes-hard", "64MiB",
            "--write-stall-timeout", "0",
        ]);
        let mut healthy = server.subscribe(&["t"]);
        let _stalled = Subscribe::topics(&["t"]).recv_buffer(4096).send_only(server.addr()).unwrap();
        let mut health = HttpConn::connect(server.addr()).unwrap();
        let first = health.request("GET", "/healthz", &[], b"").unwrap();
        assert_eq!((first.status, first.text().trim().to_string()), (200, "ok".to_string()), "healthz before shutdown");
        server.wait_for_metrics(IO_TIMEOUT, "both subscribers registered", |m| m.subscribers_open() == 2.0);
        // Give the stalled subscriber a backlog the drain cannot flush.
        let ids: Vec<u64> = (0..100).map(|n| server.publish(&["t"], None, payload(n, 4096))).collect();
        let got: Vec<u64> = healthy.expect_events(ids.len(), IO_TIMEOUT, "before shutdown").iter().map(Event::id).collect();
        assert_eq!(got, ids);

        let signalled = Instant::now();
        server.term();
        let (statuses, healthy_result) = std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                assert_ends_with_retry(&mut healthy, 1000, "healthy subscriber at SIGTERM");
                signalled.elapsed()
            });
            // Ask /healthz on the kept-alive connection and on new ones until the
            // process is gone. A request that raced ahead of the signal may still be 200.
            let mut statuses = Vec::new();
            let mut health = Some(health);
            while server.is_running() && signalled.elapsed() < SHUTDOWN_TIMEOUT + Duration::from_secs(1) {
                if let Some(conn) = health.as_mut() {
                    match conn.request("GET", "/healthz", &[], b"") {
                        Ok(response) => {
                            statuses.push((response.status, response.text().trim().to_string()));
                            if response.closes() {
                                health = None;
                            }
                        }
                        Err(_) => health = None,
                    }
                }
                if let Ok(response) = server.get("/healthz") {
                    statuses.push((response.status, response.text().trim().to_string()));
                    if response.status == 503 {
                        if let Ok(metrics) = server.try_metrics() {
                            assert_eq!(metrics.get("plenum_draining"), Some(1.0), "plenum_draining while draining");
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20)); // polling interval
            }
            (statuses, reader.join())
        });
        let healthy_ended_after = healthy_result.expect("healthy subscriber");
        assert!(healthy_ended_after <= SHUTDOWN_TIMEOUT, "streams must end within the shutdown timeout");

        let status = server
            .wait_exit((SHUTDOWN_TIMEOUT + Duration::from_secs(1)).saturating_sub(signalled.elapsed()))
            .unwrap_or_else(|| panic!("still running {:?} after SIGTERM (shutdown timeout 3 s)", signalled.elapsed()));
        assert!(status.success(), "a graceful shutdown exits 0, got {status}");

        let first_503 = statuses.iter().position(|(status, _)| *status == 503).unwrap_or_else(|| {
            panic!("/healthz never answered 503 while draining (answers seen: {statuses:?})")
        });
        assert_eq!(statuses[first_503].1, "draining", "503 body");
        assert!(
            statuses[first_503..].iter().all(|(status, _)| *status == 503),
            "/healthz went back to 200 after draining began: {statuses:?}"
        );
    }

    fn sigint_ends_streams_and_exits(backend: Backend) {
        let server = Server::start(backend, &["--shutdown-timeout", "3s", "--retry-hint", "2s"]);
        let mut client = server.subscribe(&["t"]);
        let signalled = Instant::now();
        server.signal(libc::SIGINT);
        assert_ends_with_retry(&mut client, 2000, "subscriber at SIGINT");
        let status = server
            .wait_exit(SHUTDOWN_TIMEOUT + Duration::from_secs(1))
            .unwrap_or_else(|| panic!("still running {:?} after SIGINT", signalled.elapsed()));
        assert!(status.success(), "a graceful shutdown exits 0, got {status}");
        assert!(signalled.elapsed() <= SHUTDOWN_TIMEOUT + Duration::from_secs(1));
    }
}
