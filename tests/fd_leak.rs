//! fd leak: thousands of connect / subscribe / disconnect cycles of every kind —
//! close (FIN), reset (RST), abort in the middle of the request head, keep-alive
//! publishes — leave the server's open descriptors and connection slots exactly where
//! they started, and every accepted connection is accounted for by a close reason.

#[macro_use]
mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

const CYCLES: usize = 3000;

backend_tests! {
    fn connect_disconnect_cycles_return_fds_and_slots_to_baseline(backend: Backend) {
        let server = Server::start(backend, &["--shards", "2"]);
        // The harness's own start-up scrape may still be closing on the server
        // side: the baseline is the count once it has settled.
        let fds_baseline = settled_fd_count(&server);
        let open_baseline = server.baseline_connections_open();
        let mut watcher = server.subscribe(&["leak"]);

        for cycle in 0..CYCLES {
            match cycle % 4 {
                0 => {
                    // Subscribe, then close (FIN).
                    let client = server.subscribe(&["leak"]);
                    drop(client);
                }
                1 => {
                    // Subscribe, then reset (RST).
                    let client = server.subscribe(&["leak"]);
                    close_with_reset(client.into_stream());
                }
                2 => {
                    // Abort in the middle of the request head.
                    let mut stream = connect_tcp(server.addr(), None, None).unwrap();
                    stream.write_all(b"GET /events?topic=leak HTTP/1.1\r\nHost: pl").unwrap();
                    if cycle % 8 == 2 {
                        close_with_reset(stream);
                    }
                }
                _ => {
                    // Two publishes on one keep-alive connection, then close.
                    let mut publisher = server.publisher();
                    publisher.publish(&["leak"], None, b"one");
                    publisher.publish(&["leak"], None, b"two");
                }
            }
        }
        // The watcher saw every publish, so the server processed every cycle's traffic.
        let events = watcher.expect_events(CYCLES / 4 * 2, IO_TIMEOUT, "watcher");
        assert_strictly_increasing(&events.iter().map(Event::id).collect::<Vec<_>>(), "watcher");
        drop(watcher);

        let metrics = server.wait_for_metrics(
            Duration::from_secs(5),
            "connections back to the baseline",
            |m| m.connections_open() <= open_baseline && m.subscribers_open() == 0.0,
        );
        assert!(
            wait_until(Duration::from_secs(5), || server.fd_count() <= fds_baseline),
            "open fds {} did not return to the baseline {fds_baseline}",
            server.fd_count()
        );
        assert_eq!(settled_fd_count(&server), fds_baseline, "fewer fds than at start?");
        // Every accepted connection is either open (this scrape) or closed by a reason.
        let accepted = metrics.counter("plenum_connections_accepted_total");
        let closed = metrics.sum("plenum_connections_closed_total");
        assert!(accepted >= (CYCLES + 1) as f64, "accepted {accepted}, expected at least {}", CYCLES + 1);
        assert_eq!(
            accepted,
            closed + metrics.connections_open(),
            "accepted = closed + open must hold:\n{}",
            metrics.plenum_lines()
        );
    }
}

/// The server's fd count once it has not changed for 200 ms (at most 5 s).
fn settled_fd_count(server: &Server) -> usize {
    let mut last = server.fd_count();
    let mut stable_since = std::time::Instant::now();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let now = server.fd_count();
        if now != last {
            last = now;
            stable_since = std::time::Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(200) {
            break;
        }
    }
    last
}
