//! Bad input: each malformed or hostile request gets its documented status and a
//! one-line `text/plain` body, and affects nobody else — a healthy subscriber keeps
//! receiving events after every case. Also the edges of a correct request: a head
//! trickled in within the deadline works, one trickled past it is closed
//! (`handshake_timeout`), `Expect: 100-continue`, chunked bodies, keep-alive and
//! pipelining, a publish followed by a half-close, and bytes a subscriber sends after
//! its request (discarded).
//!
//! The `503` of the connection limits is in `connection_limit.rs`.

#[macro_use]
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "s3cret";

struct Case {
    what: &'static str,
    request: Vec<u8>,
    status: u16,
    /// For 405: a method the `Allow` header must list.
    allow: Option<&'static str>,
}

fn case(what: &'static str, request: impl Into<Vec<u8>>, status: u16) -> Case {
    Case {
        what,
        request: request.into(),
        status,
        allow: None,
    }
}

/// A publish request with the token, so the token is never what fails.
fn publish(target: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nHost: plenum.test\r\nAuthorization: Bearer {TOKEN}\r\n{extra_headers}"
    );
    if !extra_headers
        .to_ascii_lowercase()
        .contains("content-length")
        && !extra_headers
            .to_ascii_lowercase()
            .contains("transfer-encoding")
    {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: plenum.test\r\n\r\n").into_bytes()
}

fn cases() -> Vec<Case> {
    let mut long_head = b"GET /events?topic=a HTTP/1.1\r\nHost: plenum.test\r\nX-Fill: ".to_vec();
    long_head.extend(std::iter::repeat_n(b'f', 9 * 1024));
    long_head.extend_from_slice(b"\r\n\r\n");
    let mut many_headers = String::from("GET /events?topic=a HTTP/1.1\r\nHost: plenum.test\r\n");
    for n in 0..64 {
        many_headers.push_str(&format!("X-H{n}: v\r\n"));
    }
    many_headers.push_str("\r\n"); // 65 headers with Host, a small head

    let mut cases = vec![
        case("garbage request line", &b"\x01\x02\x03 nonsense\r\n\r\n"[..], 400),
        case("request line without version", "GET /events?topic=a\r\n\r\n", 400),
        case("unsupported HTTP version", "GET /events?topic=a HTTP/2.0\r\nHost: x\r\n\r\n", 400),
        case("header line without colon", "GET /events?topic=a HTTP/1.1\r\nHost plenum\r\n\r\n", 400),
        case("space in header name", "GET /events?topic=a HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400),
        case("unknown path", get("/nope"), 404),
        case("root path", get("/"), 404),
        Case { allow: Some("GET"), ..case("POST to /events", "POST /events?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405) },
        Case { allow: Some("POST"), ..case("GET /publish", format!("GET /publish?topic=a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"), 405) },
        Case { allow: Some("GET"), ..case("DELETE /metrics", "DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405) },
        // The body is not sent: a declared length over the limit is refused up front.
        case("Content-Length over --publish-body-bytes-max", publish("/publish?topic=a", "Content-Length: 2048\r\n", b""), 413),
        case(
            "chunked body over --publish-body-bytes-max",
            publish(
                "/publish?topic=a",
                "Transfer-Encoding: chunked\r\n",
                format!("320\r\n{}\r\n320\r\n{}\r\n0\r\n\r\n", "x".repeat(800), "y".repeat(800)).as_bytes(),
            ),
            413,
        ),
        case("request head over 8 KiB", long_head, 431),
        case("more than 64 headers", many_headers, 431),
        case("five topics to subscribe (max 4)", get("/events?topic=a&topic=b&topic=c&topic=d&topic=e"), 400),
        case("five topics to publish (max 4)", publish("/publish?topic=a&topic=b&topic=c&topic=d&topic=e", "", b"x"), 400),
        case("subscribe without topic", get("/events"), 400),
        case("subscribe with other parameters only", get("/events?lastEventID=1"), 400),
        case("publish without topic", publish("/publish", "", b"x"), 400),
        case("publish with event type only", publish("/publish?event=greeting", "", b"x"), 400),
        case("non-UTF-8 data", publish("/publish?topic=a", "", &[b'o', b'k', 0xff, 0xfe]), 400),
        case(
            "Content-Length and Transfer-Encoding",
            publish("/publish?topic=a", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        case("bad chunk size", publish("/publish?topic=a", "Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"), 400),
        case(
            "publish without token",
            "POST /publish?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
            401,
        ),
        case(
            "publish with wrong token",
            "POST /publish?topic=a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Length: 1\r\n\r\nx",
            401,
        ),
    ];
    for (name, escaped) in [("CR", "%0D"), ("LF", "%0A"), ("NUL", "%00")] {
        let what: &'static str = Box::leak(format!("subscribe topic with {name}").into_boxed_str());
        cases.push(case(what, get(&format!("/events?topic=a{escaped}b")), 400));
        let what: &'static str = Box::leak(format!("publish topic with {name}").into_boxed_str());
        cases.push(case(
            what,
            publish(&format!("/publish?topic=a{escaped}b"), "", b"x"),
            400,
        ));
        let what: &'static str = Box::leak(format!("event type with {name}").into_boxed_str());
        cases.push(case(
            what,
            publish(&format!("/publish?topic=a&event=x{escaped}y"), "", b"x"),
            400,
        ));
    }
    cases
}

backend_tests! {
    fn malformed_requests_get_their_status_and_others_keep_receiving(backend: Backend) {
        let server = Server::start(backend, &[
            "--topics-per-connection-max", "4",
            "--publish-body-bytes-max", "1KiB",
            "--publish-token", TOKEN,
        ]);
        let mut healthy = server.subscribe(&["a"]);
        let bad_requests_before = server.metrics().closed("bad_request");
        let mut closing_cases = 0.0;
        for case in cases() {
            let what = case.what;
            let mut conn = HttpConn::connect(server.addr()).expect("connect");
            // A server may answer and close before reading everything: a failed write
            // is fine, the answer is what counts.
            let _ = conn.stream.write_all(&case.request);
            let response = conn
                .read_response(IO_TIMEOUT)
                .unwrap_or_else(|error| panic!("{what}: no response ({error})"));
            assert_eq!(response.status, case.status, "{what}: status (body {:?})", response.text());
            response.assert_one_line_text(what);
            if let Some(method) = case.allow {
                let allow = response.header("allow").unwrap_or_else(|| panic!("{what}: 405 without Allow"));
                assert!(
                    allow.split(',').any(|m| m.trim() == method),
                    "{what}: Allow {allow:?} must list {method}"
                );
            }
            // Contract reading: after a malformed request (400, 413, 431) the byte
            // stream cannot be trusted, so the server closes (`bad_request`).
            if matches!(case.status, 400 | 413 | 431) {
                closing_cases += 1.0;
                let (end, rest) = conn.read_to_end(IO_TIMEOUT);
                assert!(end.is_closed(), "{what}: connection still open after {}", case.status);
                assert!(rest.is_empty(), "{what}: bytes after the response: {:?}", String::from_utf8_lossy(&rest));
            }
            // Nobody else is affected.
            let id = server.publish(&["a"], None, what);
            let event = healthy.expect_event(IO_TIMEOUT, &format!("healthy subscriber after {what}"));
            assert_eq!((event.id(), event.data()), (id, what.to_string()), "after {what}");
        }
        server.wait_for_metrics(IO_TIMEOUT, "malformed requests counted as bad_request", |m| {
            m.closed("bad_request") >= bad_requests_before + closing_cases
        });
        server.wait_for_metrics(IO_TIMEOUT, "the healthy subscriber is still there", |m| {
            m.subscribers_open() == 1.0
        });
    }

    fn request_head_trickled_within_deadline_is_served(backend: Backend) {
        let server = Server::start(backend, &["--handshake-timeout", "5s"]);
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        let request = Subscribe::topics(&["slow"]).request_bytes();
        // ~80 bytes, 10 ms apart: under a second, each byte its own segment.
        conn.send_slowly(&request, Duration::from_millis(10)).unwrap();
        let mut client = match SseClient::open_on(conn) {
            Ok(client) => client,
            Err(error) => panic!("trickled request refused: {error:?}"),
        };
        let id = server.publish(&["slow"], None, "made it");
        assert_eq!(client.expect_event(IO_TIMEOUT, "after a trickled head").id(), id);
    }

    fn slowloris_past_handshake_timeout_is_closed(backend: Backend) {
        let server = Server::start(backend, &["--handshake-timeout", "1s"]);
        let before = server.metrics().closed("handshake_timeout");
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        let started = Instant::now();
        conn.send(b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\n").unwrap();
        // Keep trickling header bytes (never the blank line) from another thread,
        // as a slowloris client does, until the server closes the connection.
        let mut writer = conn.stream.try_clone().unwrap();
        let trickle = std::thread::spawn(move || {
            for byte in b"X-Slow: ".iter().cycle().take(60) {
                if writer.write_all(std::slice::from_ref(byte)).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (end, _) = conn.read_to_end(Duration::from_secs(4));
        let elapsed = started.elapsed();
        assert!(end.is_closed(), "a head still incomplete after the handshake timeout must be closed");
        assert!(
            elapsed >= Duration::from_millis(900),
            "closed after {elapsed:?}, before the 1 s handshake timeout"
        );
        server.wait_for_metrics(IO_TIMEOUT, "closed as handshake_timeout", |m| {
            m.closed("handshake_timeout") == before + 1.0
        });
        trickle.join().unwrap();
    }

    fn expect_100_continue_is_answered_before_the_body(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["a"]);
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        conn.send(b"POST /publish?topic=a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").unwrap();
        let interim = conn.read_response(Duration::from_secs(2)).expect("100 Continue before the body");
        assert_eq!(interim.status, 100, "interim response");
        conn.send(b"hello").unwrap();
        let response = conn.read_response(IO_TIMEOUT).unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        let id = parse_id(&response.text());
        let event = client.expect_event(IO_TIMEOUT, "the 100-continue publish");
        assert_eq!((event.id(), event.data()), (id, "hello".to_string()));
    }

    fn chunked_publish_is_accepted(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["a"]);
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        let response = conn
            .request(
                "POST",
                "/publish?topic=a",
                &[("Transfer-Encoding", "chunked")],
                b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
            )
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        let id = parse_id(&response.text());
        let event = client.expect_event(IO_TIMEOUT, "the chunked publish");
        assert_eq!((event.id(), event.data()), (id, "hello world".to_string()));
    }

    fn keep_alive_serves_three_publishes_on_one_connection(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["a"]);
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            let response = conn.request("POST", "/publish?topic=a", &[], format!("ka{n}").as_bytes()).unwrap();
            assert_eq!(response.status, 200, "publish {n} on the kept-alive connection");
            assert!(!response.closes(), "publish {n}: the server announced Connection: close");
            ids.push(parse_id(&response.text()));
        }
        assert_strictly_increasing(&ids, "keep-alive publishes");
        let got: Vec<u64> = client.expect_events(3, IO_TIMEOUT, "keep-alive publishes").iter().map(Event::id).collect();
        assert_eq!(got, ids);
    }

    fn pipelined_publishes_are_answered_in_order(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["a"]);
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        let mut requests = Vec::new();
        for n in 0..3 {
            requests.extend(format!("POST /publish?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\npp{n}").bytes());
        }
        conn.send(&requests).unwrap();
        let ids: Vec<u64> = (0..3)
            .map(|n| {
                let response = conn.read_response(IO_TIMEOUT).unwrap_or_else(|e| panic!("pipelined response {n}: {e}"));
                assert_eq!(response.status, 200, "pipelined publish {n}");
                parse_id(&response.text())
            })
            .collect();
        assert_strictly_increasing(&ids, "pipelined publishes");
        let events = client.expect_events(3, IO_TIMEOUT, "pipelined publishes");
        let got: Vec<(u64, String)> = events.iter().map(|e| (e.id(), e.data())).collect();
        let want: Vec<(u64, String)> = ids.iter().enumerate().map(|(n, id)| (*id, format!("pp{n}"))).collect();
        assert_eq!(got, want);
    }

    fn publish_followed_by_half_close_is_still_answered(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["a"]);
        let mut conn = HttpConn::connect(server.addr()).unwrap();
        conn.send(b"POST /publish?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlast").unwrap();
        shutdown_write(&conn.stream);
        let response = conn.read_response(IO_TIMEOUT).expect("a fully read request is answered after a half-close");
        assert_eq!(response.status, 200, "{}", response.text());
        let id = parse_id(&response.text());
        let event = client.expect_event(IO_TIMEOUT, "the half-closed publish");
        assert_eq!((event.id(), event.data()), (id, "last".to_string()));
    }

    fn bytes_a_subscriber_sends_after_its_request_are_discarded(backend: Backend) {
        let server = Server::start(backend, &[]);
        let mut client = server.subscribe(&["a"]);
        let first = server.publish(&["a"], None, "before");
        assert_eq!(client.expect_event(IO_TIMEOUT, "before the junk").id(), first);
        // 64 KiB of junk, including what looks like more requests.
        let mut junk = Vec::new();
        while junk.len() < 64 * 1024 {
            junk.extend_from_slice(b"GET /events?topic=b HTTP/1.1\r\nHost: x\r\n\r\nPOST /publish?topic=a HTTP/1.1\r\nContent-Length: 3\r\n\r\nbad");
        }
        client.stream().write_all(&junk).unwrap();
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(server.publish(&["a"], None, format!("after{n}")));
        }
        let got: Vec<(u64, String)> = client.expect_events(5, IO_TIMEOUT, "after the junk").iter().map(|e| (e.id(), e.data())).collect();
        let want: Vec<(u64, String)> = ids.iter().enumerate().map(|(n, id)| (*id, format!("after{n}"))).collect();
        assert_eq!(got, want, "the junk must neither publish nor disturb the stream");
        assert!(client.unknown_lines().is_empty(), "junk echoed into the stream: {:?}", client.unknown_lines());
        let metrics = server.wait_for_metrics(IO_TIMEOUT, "six publishes counted", |m| {
            m.counter("plenum_events_published_total") >= 6.0
        });
        assert_eq!(metrics.counter("plenum_events_published_total"), 6.0, "the junk published something");
        assert_eq!(metrics.subscribers_open(), 1.0, "the subscriber sending junk is still subscribed");
    }
}
