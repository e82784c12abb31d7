//! Connection limits: above `--connections-max` a new connection is answered `503`
//! with a one-line body and closed (`limit`), and a freed slot can be used again;
//! above `--connections-per-ip-max` the same happens to one client address while
//! others are still served and the existing streams keep receiving.

#[macro_use]
mod common;

use std::io::Write;

use common::*;

/// Opens a connection, sends a subscribe request and expects `503` then a close.
fn assert_refused(server: &Server, source: Option<std::net::IpAddr>, context: &str) {
    let mut conn = HttpConn::connect_from(server.addr(), source, None).expect("connect");
    // The server may answer before reading the request: a failed write is fine.
    let _ = conn
        .stream
        .write_all(&Subscribe::topics(&["t"]).request_bytes());
    let response = conn
        .read_response(IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("{context}: no answer ({e})"));
    assert_eq!(response.status, 503, "{context}: {}", response.text());
    response.assert_one_line_text(context);
    let (end, _) = conn.read_to_end(IO_TIMEOUT);
    assert!(end.is_closed(), "{context}: connection left open after 503");
}

backend_tests! {
    fn connections_over_the_process_limit_get_503(backend: Backend) {
        let server = Server::start(backend, &["--connections-max", "50"]);
        let mut clients: Vec<SseClient> = (0..50).map(|_| server.subscribe(&["t"])).collect();
        assert_refused(&server, None, "the 51st connection");

        // Free one slot: the scrape needs it, then a subscriber can have it again.
        drop(clients.pop());
        let metrics = server.wait_for_metrics(IO_TIMEOUT, "a slot freed and the refusal counted", |m| {
            m.subscribers_open() == 49.0 && m.closed("limit") >= 1.0
        });
        assert!(metrics.closed("limit") >= 1.0);
        let mut again = None;
        assert!(
            wait_until(IO_TIMEOUT, || {
                again = SseClient::try_open(server.addr(), &Subscribe::topics(&["t"])).ok();
                again.is_some()
            }),
            "a freed slot must be usable again"
        );
        clients.push(again.unwrap());
        assert_refused(&server, None, "over the limit again");

        // The streams at the limit are healthy. (Publishing needs a slot: free one.)
        // The scrape that saw the freed slot holds a connection until the
        // server reads its FIN, so a publish right after it may still find
        // the limit reached (503, correctly): retry until the slot is free.
        drop(clients.pop());
        assert!(wait_until(IO_TIMEOUT, || server.try_metrics().is_ok_and(|m| m.subscribers_open() == 49.0)));
        let mut id = None;
        assert!(
            wait_until(IO_TIMEOUT, || {
                let response = server.publisher().publish_response(&["t"], None, b"to all");
                id = response.ok().filter(|r| r.status == 200).map(|r| parse_id(&r.text()));
                id.is_some()
            }),
            "a publish must get the freed slot"
        );
        let id = id.unwrap();
        for (n, client) in clients.iter_mut().enumerate() {
            assert_eq!(client.expect_event(IO_TIMEOUT, &format!("subscriber {n}")).id(), id);
        }
    }

    fn connections_over_the_per_address_limit_get_503(backend: Backend) {
        let server = Server::start(backend, &["--connections-per-ip-max", "5"]);
        let (first, second, scraper, publisher) = (loopback(1), loopback(2), loopback(3), loopback(4));
        let mut clients: Vec<SseClient> = (0..5)
            .map(|_| server.subscribe_with(&Subscribe::topics(&["t"]).source_ip(first)))
            .collect();
        assert_refused(&server, Some(first), "the 6th connection from 127.0.0.1");
        for _ in 0..5 {
            clients.push(server.subscribe_with(&Subscribe::topics(&["t"]).source_ip(second)));
        }
        assert_refused(&server, Some(second), "the 6th connection from 127.0.0.2");
        let counted = wait_until(IO_TIMEOUT, || {
            server
                .try_metrics_from(scraper)
                .is_ok_and(|m| m.closed("limit") >= 2.0 && m.subscribers_open() == 10.0)
        });
        assert!(counted, "two refusals counted as limit and ten subscribers open (scraped from a third address)");

        let mut publisher = server.publisher().with_source(publisher);
        let id = publisher.publish(&["t"], None, b"to all ten");
        for (n, client) in clients.iter_mut().enumerate() {
            assert_eq!(client.expect_event(IO_TIMEOUT, &format!("subscriber {n}")).id(), id);
        }

        // A slot freed on one address is usable by that address again.
        drop(clients.remove(0));
        assert!(
            wait_until(IO_TIMEOUT, || SseClient::try_open(server.addr(), &Subscribe::topics(&["t"]).source_ip(first)).is_ok()),
            "127.0.0.1 must get its freed slot back"
        );
    }
}
