//! Publish authorisation: with `--publish-token T`, a publish without
//! `Authorization: Bearer T` — missing, wrong, a prefix or extension of T, another
//! scheme — is answered `401` and publishes nothing; with it, `200`. Subscribing
//! needs no token. Without a token (loopback listen), publishing is open.

#[macro_use]
mod common;

use common::*;

const TOKEN: &str = "s3cret-t0ken";

backend_tests! {
    fn token_is_required_when_configured(backend: Backend) {
        let server = Server::start(backend, &["--publish-token", TOKEN]);
        // Subscribing needs no token.
        let mut client = server.subscribe(&["a"]);
        let refused: [(&str, Option<String>); 6] = [
            ("no Authorization header", None),
            ("wrong token", Some("Bearer wrong".to_string())),
            ("a prefix of the token", Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]))),
            ("the token plus more", Some(format!("Bearer {TOKEN}x"))),
            ("another scheme", Some(format!("Basic {TOKEN}"))),
            ("the bare token", Some(TOKEN.to_string())),
        ];
        for (what, authorization) in &refused {
            let mut conn = HttpConn::connect(server.addr()).unwrap();
            let headers: Vec<(&str, &str)> = authorization
                .iter()
                .map(|value| ("Authorization", value.as_str()))
                .collect();
            let response = conn.request("POST", "/publish?topic=a", &headers, b"forged").unwrap();
            assert_eq!(response.status, 401, "{what}");
            response.assert_one_line_text(what);
        }
        let id = server.publish(&["a"], None, "genuine");
        // The refused ones published nothing: the first event is the genuine one.
        let event = client.expect_event(IO_TIMEOUT, "the authorised publish");
        assert_eq!((event.id(), event.data()), (id, "genuine".to_string()));
        server.wait_for_metrics(IO_TIMEOUT, "exactly one event published", |m| {
            m.counter("plenum_events_published_total") == 1.0
        });
    }

    fn without_a_token_loopback_publishing_is_open(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["a"]);
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        let response = conn.request("POST", "/publish?topic=a", &[], b"open").unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(
            response.header("content-type").unwrap_or("").starts_with("text/plain"),
            "publish answers text/plain"
        );
        let id = parse_id(&response.text());
        assert_eq!(client.expect_event(IO_TIMEOUT, "open publish").id(), id);
    }
}
