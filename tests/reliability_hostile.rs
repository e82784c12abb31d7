//! Reliability, scenario 6: hostile input, next to healthy subscribers.
//!
//! A table of hostile requests — malformed, oversized, slow (slowloris head,
//! slow body, silence), pipelined, non-UTF-8, NUL/CR/LF-injecting (raw and
//! percent-encoded), huge headers, header floods, many topics, huge bodies,
//! chunked abuse and truncated requests — is played one case at a time against
//! a two-shard server. Each case must be answered or closed as the README
//! documents: the exact statuses, then an orderly close counted as
//! `bad_request`; or no answer and a close counted under the documented reason
//! (`handshake_timeout` for the header and body deadlines, `peer_closed` /
//! `reset` for truncated requests); and it must publish exactly the events it
//! should (checked by a witness subscriber and `plenum_events_published_total`).
//!
//! Throughout, healthy subscribers on both shards receive a steady stream (one
//! event every 10 ms): every event, in order, within a bounded
//! publish-to-receive latency, so no case crashed or stalled a shard.
//! `tests/bad_input.rs` holds the basic malformed-request table; the cases here
//! are the ones it lacks. The property tests and the fuzz target for the same
//! path are in `tests/property_request.rs`, `fuzz/` and `tests/fuzz_corpus.rs`.

#[macro_use]
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::reliability::{subscribers_on_every_shard, ShardMetrics};
use common::*;

const HEAD_MAX: usize = 64 * 1024;
const BODY_MAX: usize = 64 * 1024;
const TOPICS_MAX: usize = 32;
/// `--handshake-timeout` and `--body-timeout`.
const DEADLINE: Duration = Duration::from_secs(1);
/// The bound on a healthy subscriber's publish-to-receive latency during the
/// table. A shard blocked by a case for a deadline's length would exceed it;
/// it leaves room for a CI machine whose 2 cores are shared.
const LATENCY_BOUND: Duration = Duration::from_millis(250);
const TICK_INTERVAL: Duration = Duration::from_millis(10);
/// Writes this large go from a helper thread: the server may stop reading.
const BIG_WRITE_BYTES: usize = 32 * 1024;

/// How a case's bytes are sent.
enum Send {
    /// One write.
    All(Vec<u8>),
    /// All the bytes, then a half-close (FIN).
    ThenFin(Vec<u8>),
    /// All the bytes, then a reset (RST).
    ThenReset(Vec<u8>),
    /// `first`, then `drip` one byte every 100 ms, until the server closes.
    Trickle { first: Vec<u8>, drip: Vec<u8> },
    /// `first`, then `unit` repeated as fast as possible until the server closes.
    Endless { first: Vec<u8>, unit: Vec<u8> },
    /// Connect and send nothing.
    Nothing,
}

/// What the server must do.
enum Expect {
    /// These responses in order. With `closed`, the server then closes
    /// (`bad_request`); without, the connection stays open and the client
    /// closes it (`peer_closed`).
    Answers { statuses: Vec<u16>, closed: bool },
    /// No answer; the connection is closed and counted under this reason. With
    /// `after_deadline`, not before the deadline (and not long after it).
    Silent {
        reason: &'static str,
        after_deadline: bool,
    },
    /// A `200` event stream, checked by the function; then the client closes it.
    Stream(fn(&Server, &mut SseClient)),
}

struct Case {
    what: String,
    send: Send,
    expect: Expect,
    /// Data of the events the case publishes, all to the topic `witness`.
    witness: Vec<String>,
}

impl Case {
    fn new(what: impl Into<String>, send: Send, expect: Expect) -> Case {
        Case {
            what: what.into(),
            send,
            expect,
            witness: Vec::new(),
        }
    }

    fn publishes(mut self, data: &[&str]) -> Case {
        self.witness = data.iter().map(|d| d.to_string()).collect();
        self
    }
}

/// One request, answered `status` and closed.
fn refused(what: impl Into<String>, request: impl Into<Vec<u8>>, status: u16) -> Case {
    Case::new(
        what,
        Send::All(request.into()),
        Expect::Answers {
            statuses: vec![status],
            closed: true,
        },
    )
}

/// Requests answered with `statuses`; the connection stays open.
fn answered(what: impl Into<String>, request: impl Into<Vec<u8>>, statuses: Vec<u16>) -> Case {
    Case::new(
        what,
        Send::All(request.into()),
        Expect::Answers {
            statuses,
            closed: false,
        },
    )
}

fn closed_silently(what: impl Into<String>, send: Send, reason: &'static str) -> Case {
    Case::new(
        what,
        send,
        Expect::Silent {
            reason,
            after_deadline: false,
        },
    )
}

fn timed_out(what: impl Into<String>, send: Send) -> Case {
    Case::new(
        what,
        send,
        Expect::Silent {
            reason: "handshake_timeout",
            after_deadline: true,
        },
    )
}

fn streams(
    what: impl Into<String>,
    request: impl Into<Vec<u8>>,
    check: fn(&Server, &mut SseClient),
) -> Case {
    Case::new(what, Send::All(request.into()), Expect::Stream(check))
}

fn get(target: &str, headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: plenum.test\r\n{headers}\r\n").into_bytes()
}

/// A publish to `witness` (or `target`) with a `Content-Length` body.
fn post(target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {target} HTTP/1.1\r\nHost: plenum.test\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn post_chunked(target: &str, chunked: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {target} HTTP/1.1\r\nHost: plenum.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(chunked);
    bytes
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const W: &str = "/publish?topic=witness";

/// After the stream opens: a live event arrives next, and nothing was injected.
fn live_event_next(server: &Server, client: &mut SseClient, topic: &str) {
    let id = server.publish(&[topic], None, "live");
    let event = client.expect_event(IO_TIMEOUT, "live event on the hostile stream");
    assert_eq!((event.id(), event.data()), (id, "live".to_string()));
    assert!(
        client.unknown_lines().is_empty(),
        "injected lines: {:?}",
        client.unknown_lines()
    );
}

/// The table; one row per push reads best.
#[allow(clippy::vec_init_then_push)]
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();

    // --- malformed ---------------------------------------------------------
    cases.push(refused(
        "TLS ClientHello on the plain port",
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00"[..],
        400,
    ));
    cases.push(refused(
        "HTTP/2 connection preface",
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        400,
    ));
    cases.push(refused("a lone NUL", &b"\0\r\n\r\n"[..], 400));
    cases.push(refused(
        "obs-fold header continuation",
        get("/events?topic=a", "X-A: one\r\n two\r\n"),
        400,
    ));
    cases.push(refused(
        "absolute-form target (not a known path)",
        get("http://plenum.test/events?topic=a", ""),
        404,
    ));
    cases.push(refused("asterisk target", get("*", ""), 404));
    cases.push(refused(
        "lower-case method",
        &b"get /events?topic=a HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        405,
    ));
    cases.push(refused(
        "unsupported Expect",
        post(W, "Expect: 200-ok\r\n", b"x"),
        417,
    ));
    cases.push(refused(
        "Transfer-Encoding gzip, chunked",
        concat(&[
            b"POST /publish?topic=witness HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"1\r\nx\r\n0\r\n\r\n",
        ]),
        400,
    ));
    cases.push(refused("Transfer-Encoding chunked twice", concat(&[b"POST /publish?topic=witness HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n0\r\n\r\n"]), 400));
    cases.push(refused("conflicting Content-Length headers", &b"POST /publish?topic=witness HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy"[..], 400));
    cases.push(refused(
        "Content-Length with a sign",
        &b"POST /publish?topic=witness HTTP/1.1\r\nContent-Length: +1\r\n\r\nx"[..],
        400,
    ));
    cases.push(answered(
        "empty lines before the request line",
        &b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        vec![200],
    ));

    // --- oversized ---------------------------------------------------------
    let fill = |head_bytes: usize| {
        let start = "GET /events?topic=edge HTTP/1.1\r\nX-Fill: ";
        let mut head = start.as_bytes().to_vec();
        head.extend(std::iter::repeat_n(b'f', head_bytes - start.len() - 4));
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head.len(), head_bytes);
        head
    };
    cases.push(streams(
        "head of exactly --request-head-bytes-max",
        fill(HEAD_MAX),
        |server, client| live_event_next(server, client, "edge"),
    ));
    cases.push(refused(
        "head one byte over --request-head-bytes-max",
        fill(HEAD_MAX + 1),
        431,
    ));
    let mut huge_header = b"GET /events?topic=a HTTP/1.1\r\nX-Huge: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'h', 1024 * 1024));
    huge_header.extend_from_slice(b"\r\n\r\n");
    cases.push(refused("1 MiB header", huge_header, 431));
    let long_target = format!("/events?topic=a&pad={}", "p".repeat(HEAD_MAX));
    cases.push(refused(
        "request target over the head limit",
        get(&long_target, ""),
        431,
    ));
    let flood: String = (0..2000).map(|n| format!("h{n}: v\r\n")).collect();
    cases.push(refused(
        "header flood: 2,000 small headers",
        get("/events?topic=a", &flood),
        431,
    ));
    let flood_sent_fast: String = (0..65).map(|n| format!("x-{n}:\r\n")).collect();
    cases.push(refused(
        "65 empty headers",
        get("/events?topic=a", &flood_sent_fast),
        431,
    ));

    // --- many topics -------------------------------------------------------
    let topics = |count: usize, distinct: bool| -> String {
        (0..count)
            .map(|n| {
                if distinct {
                    format!("topic=t{n}")
                } else {
                    "topic=same".to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    cases.push(streams(
        "32 topics (the maximum) subscribe",
        get(&format!("/events?{}", topics(TOPICS_MAX, true)), ""),
        |server, client| live_event_next(server, client, "t31"),
    ));
    cases.push(refused(
        "33 topics",
        get(&format!("/events?{}", topics(TOPICS_MAX + 1, true)), ""),
        400,
    ));
    cases.push(refused(
        "33 copies of one topic",
        get(&format!("/events?{}", topics(TOPICS_MAX + 1, false)), ""),
        400,
    ));
    cases.push(refused(
        "5,000 topics in one head",
        get(&format!("/events?{}", topics(5000, true)), ""),
        400,
    ));
    cases.push(refused(
        "publish to 33 topics",
        post(
            &format!("/publish?{}", topics(TOPICS_MAX + 1, true)),
            "",
            b"x",
        ),
        400,
    ));
    cases.push(refused(
        "topic of 1,025 bytes",
        get(&format!("/events?topic={}", "t".repeat(1025)), ""),
        400,
    ));
    cases.push(refused("empty topic", get("/events?topic=", ""), 400));

    // --- huge bodies -------------------------------------------------------
    cases.push(refused(
        "Content-Length 1 MiB, body sent",
        post(W, "", &vec![b'b'; 1024 * 1024]),
        413,
    ));
    cases.push(refused("Content-Length 2^64", &b"POST /publish?topic=witness HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n"[..], 400));
    let mut many_chunks = Vec::new();
    for _ in 0..80 {
        many_chunks.extend_from_slice(b"400\r\n");
        many_chunks.extend(std::iter::repeat_n(b'c', 1024));
        many_chunks.extend_from_slice(b"\r\n");
    }
    many_chunks.extend_from_slice(b"0\r\n\r\n");
    cases.push(refused(
        "chunked: 80 chunks of 1 KiB (limit 64 KiB)",
        post_chunked(W, &many_chunks),
        413,
    ));
    cases.push(refused(
        "chunked: one chunk of 2^64-1 bytes",
        post_chunked(W, b"FFFFFFFFFFFFFFFF\r\nx"),
        413,
    ));

    // --- chunked abuse -----------------------------------------------------
    cases.push(refused(
        "chunk size with a leading space",
        post_chunked(W, b" 5\r\nhello\r\n0\r\n\r\n"),
        400,
    ));
    cases.push(refused(
        "negative chunk size",
        post_chunked(W, b"-5\r\nhello\r\n0\r\n\r\n"),
        400,
    ));
    cases.push(refused(
        "0x-prefixed chunk size",
        post_chunked(W, b"0x5\r\nhello\r\n0\r\n\r\n"),
        400,
    ));
    cases.push(refused(
        "chunk size of 17 digits",
        post_chunked(W, b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
        400,
    ));
    cases.push(refused(
        "chunk data without its CRLF",
        post_chunked(W, b"2\r\nabXX0\r\n\r\n"),
        400,
    ));
    cases.push(refused(
        "chunk data ended by a bare LF",
        post_chunked(W, b"2\r\nab\n0\r\n\r\n"),
        400,
    ));
    let overlong_size_line = concat(&[b"1;", &vec![b'e'; 5000], b"\r\nx\r\n0\r\n\r\n"]);
    cases.push(refused(
        "chunk-size line of 5,000 bytes (extension)",
        post_chunked(W, &overlong_size_line),
        400,
    ));
    let overlong_trailer = concat(&[b"1\r\nx\r\n0\r\nT: ", &vec![b't'; 5000], b"\r\n\r\n"]);
    cases.push(refused(
        "trailer line of 5,000 bytes",
        post_chunked(W, &overlong_trailer),
        400,
    ));
    let mut extension_flood = Vec::new();
    for _ in 0..500 {
        extension_flood.extend_from_slice(b"1");
        for n in 0..400 {
            extension_flood.extend_from_slice(format!(";e{n}").as_bytes());
        }
        extension_flood.extend_from_slice(b"\r\nx\r\n");
    }
    extension_flood.extend_from_slice(b"0\r\n\r\n");
    cases.push(
        answered(
            "chunk extension flood: 500 chunks with 400 extensions each (ignored)",
            post_chunked(W, &extension_flood),
            vec![200],
        )
        .publishes(&[&"x".repeat(500)]),
    );
    cases.push(timed_out(
        "endless trailers",
        Send::Endless {
            first: post_chunked(W, b"1\r\nx\r\n0\r\n"),
            unit: b"T: v\r\n".repeat(512),
        },
    ));

    // --- slow --------------------------------------------------------------
    cases.push(timed_out("connect and say nothing", Send::Nothing));
    cases.push(timed_out(
        "slowloris: header bytes one by one, never the blank line",
        Send::Trickle {
            first: b"GET /events?topic=a HTTP/1.1\r\n".to_vec(),
            drip: b"X-Slow: 1\r\n".to_vec(),
        },
    ));
    cases.push(timed_out(
        "slow Content-Length body past --body-timeout",
        Send::Trickle {
            first: b"POST /publish?topic=witness HTTP/1.1\r\nContent-Length: 100\r\n\r\n".to_vec(),
            drip: b"s".repeat(100),
        },
    ));
    cases.push(timed_out(
        "slow chunked body past --body-timeout",
        Send::Trickle {
            first: post_chunked(W, b""),
            drip: b"1\r\ns\r\n".to_vec(),
        },
    ));

    // --- pipelined ---------------------------------------------------------
    let many: Vec<u8> = (0..200)
        .flat_map(|n| post(W, "", format!("p{n}").as_bytes()))
        .collect();
    let many_data: Vec<String> = (0..200).map(|n| format!("p{n}")).collect();
    let mut case = answered("200 publishes in one write", many, vec![200; 200]);
    case.witness = many_data;
    cases.push(case);
    cases.push(
        Case::new(
            "valid, invalid, valid: the third is never read",
            Send::All(concat(&[
                &post(W, "", b"first"),
                &get("/events?topic=%0A", ""),
                &post(W, "", b"third"),
            ])),
            Expect::Answers {
                statuses: vec![200, 400],
                closed: true,
            },
        )
        .publishes(&["first"]),
    );
    cases.push(
        Case::new(
            "valid publish then garbage",
            Send::All(concat(&[
                &post(W, "", b"before garbage"),
                b"\x01\x02garbage\r\n\r\n",
            ])),
            Expect::Answers {
                statuses: vec![200, 400],
                closed: true,
            },
        )
        .publishes(&["before garbage"]),
    );
    cases.push(
        answered(
            "Expect: 100-continue with the body already sent",
            post(W, "Expect: 100-continue\r\n", b"eager"),
            vec![100, 200],
        )
        .publishes(&["eager"]),
    );

    // --- non-UTF-8 ---------------------------------------------------------
    cases.push(refused(
        "raw 0xFF in the topic",
        &b"GET /events?topic=\xff HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        400,
    ));
    cases.push(refused(
        "percent-encoded invalid UTF-8 topic",
        get("/events?topic=%C3%28", ""),
        400,
    ));
    cases.push(refused(
        "percent-encoded invalid UTF-8 publish topic",
        post("/publish?topic=%FF", "", b"x"),
        400,
    ));
    cases.push(refused(
        "percent-encoded invalid UTF-8 event type",
        post("/publish?topic=witness&event=%FE", "", b"x"),
        400,
    ));
    cases.push(refused(
        "raw 0xFF in the Last-Event-ID header",
        &b"GET /events?topic=a HTTP/1.1\r\nLast-Event-ID: 12\xff\r\n\r\n"[..],
        400,
    ));
    cases.push(refused(
        "percent-encoded invalid UTF-8 lastEventID",
        get("/events?topic=a&lastEventID=%FF", ""),
        400,
    ));
    cases.push(refused(
        "overlong UTF-8 in data",
        post(W, "", b"\xc0\xaf"),
        400,
    ));
    cases.push(refused(
        "UTF-16 surrogate in data",
        post(W, "", b"\xed\xa0\x80"),
        400,
    ));
    cases.push(refused(
        "data cut in the middle of a character",
        post(W, "", b"caf\xc3"),
        400,
    ));
    cases.push(
        answered(
            "a character split across two chunks",
            post_chunked(W, b"4\r\ncaf\xc3\r\n1\r\n\xa9\r\n0\r\n\r\n"),
            vec![200],
        )
        .publishes(&["caf\u{e9}"]),
    );
    cases.push(streams(
        "raw UTF-8 topic",
        get("/events?topic=caf\u{e9}", ""),
        |server, client| live_event_next(server, client, "caf\u{e9}"),
    ));

    // --- NUL / CR / LF injection -------------------------------------------
    cases.push(refused(
        "raw CR in the target",
        &b"GET /events?topic=a\rb HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        400,
    ));
    cases.push(refused(
        "raw NUL in the target",
        &b"GET /events?topic=a\0b HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        400,
    ));
    cases.push(refused(
        "raw NUL in a header value",
        &b"GET /events?topic=a HTTP/1.1\r\nLast-Event-ID: 1\0\r\n\r\n"[..],
        400,
    ));
    cases.push(refused(
        "topic with CRLF and a field",
        get("/events?topic=a%0D%0Aevent:%20evil", ""),
        400,
    ));
    cases.push(refused(
        "event type with CRLF and a field",
        post("/publish?topic=witness&event=x%0D%0Adata:%20evil", "", b"x"),
        400,
    ));
    cases.push(
        answered(
            "data with CR, LF and field-like lines",
            post(W, "", b"a\r\nid: 999\revent: evil\n\ndata: x\r\nretry: 1"),
            vec![200],
        )
        .publishes(&["a\nid: 999\nevent: evil\n\ndata: x\nretry: 1"]),
    );
    cases.push(answered("data with NUL", post(W, "", b"a\0b"), vec![200]).publishes(&["a\0b"]));
    cases.push(streams(
        "lastEventID with percent-encoded CR/LF fields",
        get(
            "/events?topic=inj&lastEventID=1%0D%0Aevent:%20evil%0A%0Adata:%20x",
            "",
        ),
        |server, client| {
            let gap = client.expect_event(IO_TIMEOUT, "gap signal");
            assert_eq!(gap.event.as_deref(), Some("plenum-gap"), "{gap:?}");
            let (reason, sent) = gap.gap();
            assert_eq!(reason, "unknown");
            assert!(
                !sent.contains(['\r', '\n']),
                "control characters echoed: {sent:?}"
            );
            live_event_next(server, client, "inj");
        },
    ));
    cases.push(streams(
        "Last-Event-ID with quotes and backslashes (JSON injection)",
        get(
            "/events?topic=inj2",
            "Last-Event-ID: 1\"},\"reason\":\"x\\\"\r\n",
        ),
        |server, client| {
            let gap = client.expect_event(IO_TIMEOUT, "gap signal");
            // `gap()` parses the data as JSON: it must still be valid.
            let (reason, sent) = gap.gap();
            assert_eq!(
                reason, "unknown",
                "the id must not override the reason: {gap:?}"
            );
            assert!(!sent.contains('"'), "{sent:?}");
            live_event_next(server, client, "inj2");
        },
    ));

    // --- truncated ---------------------------------------------------------
    cases.push(closed_silently(
        "request line cut, then FIN",
        Send::ThenFin(b"GET /events?to".to_vec()),
        "peer_closed",
    ));
    cases.push(closed_silently(
        "head cut, then FIN",
        Send::ThenFin(b"GET /events?topic=a HTTP/1.1\r\nHo".to_vec()),
        "peer_closed",
    ));
    cases.push(closed_silently(
        "head cut, then RST",
        Send::ThenReset(b"GET /events?topic=a HTTP/1.1\r\nHo".to_vec()),
        "reset",
    ));
    cases.push(closed_silently(
        "Content-Length body cut, then FIN",
        Send::ThenFin(
            b"POST /publish?topic=witness HTTP/1.1\r\nContent-Length: 10\r\n\r\nhalf".to_vec(),
        ),
        "peer_closed",
    ));
    cases.push(closed_silently(
        "chunk cut, then FIN",
        Send::ThenFin(post_chunked(W, b"5\r\nhel")),
        "peer_closed",
    ));
    cases.push(closed_silently(
        "last chunk missing, then FIN",
        Send::ThenFin(post_chunked(W, b"5\r\nhello\r\n")),
        "peer_closed",
    ));
    cases.push(closed_silently(
        "trailers cut, then RST",
        Send::ThenReset(post_chunked(W, b"0\r\nT: v\r\n")),
        "reset",
    ));
    cases
}

// ---------------------------------------------------------------------------
// The steady stream and its healthy subscribers
// ---------------------------------------------------------------------------

/// What the ticker published: the send instant of each `tick=N`.
#[derive(Default)]
struct Ticks {
    sent: Mutex<Vec<Instant>>,
    stop: AtomicBool,
    published: AtomicU64,
    /// The case being played (its index), for attributing latency.
    case: std::sync::atomic::AtomicUsize,
}

/// Stops the ticker when dropped, also when a case panics (else the scope
/// would wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn ticker(server: &Server, ticks: &Ticks) {
    let mut publisher = server.publisher();
    let started = Instant::now();
    let mut seq = 0u64;
    while !ticks.stop.load(Ordering::Acquire) {
        // The steady pace is the load, not a synchronisation.
        let due = started + TICK_INTERVAL * seq as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        ticks.sent.lock().unwrap().push(Instant::now());
        publisher.publish(&["tick"], None, format!("tick={seq}").as_bytes());
        seq += 1;
        ticks.published.store(seq, Ordering::Release);
    }
}

/// Reads the steady stream until the ticker has stopped and every tick arrived.
/// Returns the latencies seen.
fn healthy_reader(
    mut client: SseClient,
    ticks: &Ticks,
    index: usize,
) -> (SseClient, Vec<(Duration, usize)>) {
    let mut latencies = Vec::new();
    let mut next = 0u64;
    loop {
        if ticks.stop.load(Ordering::Acquire) && next == ticks.published.load(Ordering::Acquire) {
            return (client, latencies);
        }
        let event = match client.next_event(Duration::from_millis(100)) {
            Ok(event) => event,
            // Quiet for a moment: the ticker may have stopped. Latency is judged
            // from the ticks' send times, not from how long this poll waited.
            Err(StreamEnd::Timeout) => {
                let sent = ticks.sent.lock().unwrap().get(next as usize).copied();
                if let Some(sent) = sent {
                    assert!(
                        sent.elapsed() < IO_TIMEOUT,
                        "healthy subscriber {index}: tick {next} not received {:?} after it was sent",
                        sent.elapsed()
                    );
                }
                continue;
            }
            Err(end) => {
                panic!("healthy subscriber {index}: stream ended ({end:?}) after tick {next}")
            }
        };
        let received = Instant::now();
        let seq: u64 = event
            .data()
            .strip_prefix("tick=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("healthy subscriber {index}: unexpected {event:?}"));
        assert_eq!(
            seq, next,
            "healthy subscriber {index}: a gap or a duplicate in the steady stream"
        );
        next += 1;
        let sent = ticks.sent.lock().unwrap()[seq as usize];
        latencies.push((
            received.duration_since(sent),
            ticks.case.load(Ordering::Acquire),
        ));
    }
}

// ---------------------------------------------------------------------------
// Playing one case
// ---------------------------------------------------------------------------

/// Writes `bytes`, from a helper thread when large (the server may stop
/// reading; a failed write is fine, the answer is what counts).
fn write_all_detached(stream: &TcpStream, bytes: Vec<u8>) -> Option<std::thread::JoinHandle<()>> {
    let mut writer = stream.try_clone().unwrap();
    if bytes.len() < BIG_WRITE_BYTES {
        let _ = writer.write_all(&bytes);
        return None;
    }
    Some(std::thread::spawn(move || {
        let _ = writer.write_all(&bytes);
    }))
}

/// Keeps writing (one byte per 100 ms, or `unit` as fast as the socket takes it)
/// until a write fails or 10 s pass.
fn keep_writing(
    stream: &TcpStream,
    bytes: Vec<u8>,
    gap: Option<Duration>,
) -> std::thread::JoinHandle<()> {
    let mut writer = stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            let result = match gap {
                Some(gap) => {
                    let mut result = Ok(());
                    for byte in &bytes {
                        result = writer.write_all(std::slice::from_ref(byte));
                        if result.is_err() {
                            break;
                        }
                        // The client's pace (a slowloris), not a synchronisation.
                        std::thread::sleep(gap);
                    }
                    result
                }
                None => writer.write_all(&bytes),
            };
            if result.is_err() {
                return;
            }
        }
    })
}

/// Close reasons a case is accounted by.
const REASONS: [&str; 4] = ["bad_request", "handshake_timeout", "peer_closed", "reset"];

fn play(server: &Server, case: Case, witness: &mut SseClient) -> Duration {
    let what = case.what.as_str();
    let before = server.metrics();
    let started = Instant::now();
    let mut conn =
        HttpConn::connect(server.addr()).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let mut reset = false;
    let writer = match case.send {
        Send::All(bytes) => write_all_detached(&conn.stream, bytes),
        Send::ThenFin(bytes) => {
            conn.send(&bytes).unwrap();
            shutdown_write(&conn.stream);
            None
        }
        Send::ThenReset(bytes) => {
            conn.send(&bytes).unwrap();
            // Let the server accept and read the bytes before the reset (an RST
            // discards what the server has not read, and "cut after these
            // bytes" is the case): each scrape counts itself as one open.
            wait_until(IO_TIMEOUT, || {
                server.metrics().connections_open() > before.connections_open()
            });
            socket2::SockRef::from(&conn.stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            reset = true;
            None
        }
        Send::Trickle { first, drip } => {
            conn.send(&first).unwrap();
            Some(keep_writing(
                &conn.stream,
                drip,
                Some(Duration::from_millis(100)),
            ))
        }
        Send::Endless { first, unit } => {
            conn.send(&first).unwrap();
            Some(keep_writing(&conn.stream, unit, None))
        }
        Send::Nothing => None,
    };

    let mut expected: std::collections::HashMap<&str, f64> =
        REASONS.iter().map(|r| (*r, 0.0)).collect();
    match case.expect {
        Expect::Answers { statuses, closed } => {
            for (index, status) in statuses.iter().enumerate() {
                let response = conn.read_response(IO_TIMEOUT).unwrap_or_else(|e| {
                    panic!("{what}: response {index} (of {statuses:?}) missing: {e}")
                });
                assert_eq!(
                    response.status,
                    *status,
                    "{what}: response {index}: body {:?}",
                    response.text()
                );
                if *status >= 400 {
                    response.assert_one_line_text(what);
                }
            }
            if closed {
                let (end, rest) = conn.read_to_end(IO_TIMEOUT);
                assert!(end.is_closed(), "{what}: still open after the refusal");
                assert!(
                    rest.is_empty(),
                    "{what}: bytes after the refusal: {:?}",
                    String::from_utf8_lossy(&rest)
                );
                *expected.get_mut("bad_request").unwrap() += 1.0;
            } else {
                assert!(
                    conn.buffered().is_empty(),
                    "{what}: unexpected bytes {:?}",
                    String::from_utf8_lossy(conn.buffered())
                );
                drop(conn);
                *expected.get_mut("peer_closed").unwrap() += 1.0;
            }
        }
        Expect::Silent {
            reason,
            after_deadline,
        } => {
            if reset {
                // Our side is gone (this drop sends the RST): only the
                // server's count can tell what it did.
                drop(conn);
            } else {
                let (end, rest) = conn.read_to_end(DEADLINE * 4);
                let elapsed = started.elapsed();
                assert!(
                    end.is_closed(),
                    "{what}: not closed within {:?}",
                    DEADLINE * 4
                );
                assert!(
                    rest.is_empty(),
                    "{what}: expected no answer, got {:?}",
                    String::from_utf8_lossy(&rest)
                );
                if after_deadline {
                    assert!(
                        elapsed >= DEADLINE - Duration::from_millis(100),
                        "{what}: closed after {elapsed:?}, before the deadline"
                    );
                }
            }
            *expected.get_mut(reason).unwrap() += 1.0;
        }
        Expect::Stream(check) => {
            let mut client =
                SseClient::open_on(conn).unwrap_or_else(|e| panic!("{what}: no stream: {e:?}"));
            check(server, &mut client);
            drop(client);
            *expected.get_mut("peer_closed").unwrap() += 1.0;
        }
    }
    let elapsed = started.elapsed();
    if let Some(writer) = writer {
        writer.join().unwrap();
    }

    let published_before = before.counter("plenum_events_published_total");
    let witness_count = case.witness.len() as f64;
    server.wait_for_metrics(
        IO_TIMEOUT,
        &format!("{what}: closes counted by reason, events published"),
        |m| {
            REASONS.iter().all(|r| m.closed(r) - before.closed(r) == expected[r])
            // The ticker publishes too, and the stream checks publish one event.
            && m.counter("plenum_events_published_total") >= published_before + witness_count
        },
    );
    for data in &case.witness {
        let event = witness.expect_event(IO_TIMEOUT, &format!("{what}: the witness"));
        assert_eq!(event.event, None, "{what}: event type injected");
        assert_eq!(&event.data(), data, "{what}: witness data");
    }
    assert!(
        witness.unknown_lines().is_empty(),
        "{what}: injected lines {:?}",
        witness.unknown_lines()
    );
    elapsed
}

backend_tests! {
    fn hostile_requests_are_refused_as_documented_while_both_shards_keep_streaming(backend: Backend) {
        let head_max = HEAD_MAX.to_string();
        let body_max = BODY_MAX.to_string();
        let topics_max = TOPICS_MAX.to_string();
        let server = Server::start(backend, &[
            "--shards", "2",
            "--handshake-timeout", "1s",
            "--body-timeout", "1s",
            "--request-head-bytes-max", &head_max,
            "--publish-body-bytes-max", &body_max,
            "--topics-per-connection-max", &topics_max,
        ]);
        let server = &server;
        let healthy = subscribers_on_every_shard(server, &Subscribe::topics(&["tick"]), 2, 4);
        let healthy_count = healthy.len();
        let mut witness = server.subscribe(&["witness"]);
        let ticks = Ticks::default();
        let cases = cases();
        let case_count = cases.len();
        let names: Vec<String> = cases.iter().map(|c| c.what.clone()).collect();
        let (clients, latencies): (Vec<SseClient>, Vec<Vec<(Duration, usize)>>) = std::thread::scope(|scope| {
            let ticks = &ticks;
            let ticker = scope.spawn(move || ticker(server, ticks));
            let readers: Vec<_> = healthy
                .into_iter()
                .enumerate()
                .map(|(index, client)| scope.spawn(move || healthy_reader(client, ticks, index)))
                .collect();
            let stop = StopOnDrop(&ticks.stop);
            let mut slowest = (Duration::ZERO, String::new());
            for case in cases {
                let what = case.what.clone();
                eprintln!("case: {what}");
                ticks.case.fetch_add(1, Ordering::AcqRel);
                let elapsed = play(server, case, &mut witness);
                if elapsed > slowest.0 {
                    slowest = (elapsed, what);
                }
                assert!(server.is_running(), "the server died after {:?}", slowest.1);
            }
            eprintln!("{case_count} cases; slowest {:?} ({})", slowest.0, slowest.1);
            drop(stop);
            ticker.join().expect("ticker");
            readers.into_iter().map(|r| r.join().expect("healthy subscriber")).unzip()
        });

        let ticks_sent = ticks.published.load(Ordering::Acquire);
        let mut all: Vec<(Duration, usize)> = latencies.iter().flatten().copied().collect();
        all.sort();
        let p99 = all[all.len() * 99 / 100].0;
        let (max, max_case) = *all.last().unwrap();
        let max_case = max_case.checked_sub(1).map_or("(before the first case)", |i| names[i].as_str());
        eprintln!(
            "{healthy_count} healthy subscribers, {ticks_sent} ticks each, all received in order; \
             latency p50 {:?}, p99 {p99:?}, max {max:?} (during {max_case:?})",
            all[all.len() / 2].0
        );
        let mut worst_by_case: std::collections::BTreeMap<usize, Duration> = Default::default();
        for &(latency, case) in &all {
            let worst = worst_by_case.entry(case).or_default();
            *worst = (*worst).max(latency);
        }
        let mut worst: Vec<(Duration, usize)> = worst_by_case.into_iter().map(|(c, l)| (l, c)).collect();
        worst.sort();
        for (latency, case) in worst.iter().rev().take(5) {
            let name = case.checked_sub(1).map_or("(before the first case)", |i| names[i].as_str());
            eprintln!("  worst latency {latency:?} during {name:?}");
        }
        for (index, seen) in latencies.iter().enumerate() {
            assert_eq!(seen.len() as u64, ticks_sent, "healthy subscriber {index}");
        }
        assert!(
            max <= LATENCY_BOUND,
            "a healthy subscriber waited {max:?} for an event during {max_case:?} (bound {LATENCY_BOUND:?})"
        );
        let metrics = server.wait_for_metrics(IO_TIMEOUT, "only the healthy subscribers and the witness remain", |m| {
            m.subscribers_open() == (healthy_count + 1) as f64
        });
        let per_shard = metrics.per_shard("plenum_subscribers_open");
        assert!(per_shard.iter().all(|&n| n >= 1.0), "a shard lost its subscribers: {per_shard:?}");
        drop(clients);
    }
}
