//! Self-tests of the test harness (`tests/common`): the SSE parser, the metrics
//! parser and the response-head parser. They need no server, so a broken harness is
//! caught here rather than misread as a server bug.

mod common;

use std::collections::VecDeque;

use common::{parse_response_head, Event, Metrics, SseItem, SseParser};

fn parse_in_pieces(bytes: &[u8], piece: usize) -> Vec<SseItem> {
    let mut parser = SseParser::default();
    let mut out = VecDeque::new();
    for chunk in bytes.chunks(piece) {
        parser.feed(chunk, &mut out);
    }
    assert!(
        parser.unknown_lines.is_empty(),
        "{:?}",
        parser.unknown_lines
    );
    out.into_iter().collect()
}

#[test]
fn sse_parser_handles_every_line_end_at_every_split() {
    let stream = b":ok\n\nid: 7\r\nevent: greeting\rdata: a\r\ndata:b\ndata\n\n:\nretry: 1500\n\n";
    let expected = vec![
        SseItem::Comment("ok".into()),
        SseItem::Event(Event {
            id: Some("7".into()),
            event: Some("greeting".into()),
            data_lines: vec!["a".into(), "b".into(), "".into()],
        }),
        SseItem::Comment(String::new()),
        SseItem::Retry(1500),
    ];
    for piece in 1..=stream.len() {
        assert_eq!(
            parse_in_pieces(stream, piece),
            expected,
            "split every {piece} bytes"
        );
    }
}

#[test]
fn sse_parser_does_not_merge_cr_and_a_later_lf() {
    // "\r" then "\n" is one line end; "\r\r" is two (an empty line dispatches).
    let items = parse_in_pieces(b"data: x\r\rdata: y\n\n", 1);
    assert_eq!(items.len(), 2, "{items:?}");
}

#[test]
fn sse_parser_needs_a_blank_line_to_dispatch() {
    let items = parse_in_pieces(b"id: 1\ndata: x\n", 3);
    assert!(items.is_empty(), "{items:?}");
}

#[test]
fn gap_event_payload_is_read() {
    let event = Event {
        id: None,
        event: Some("plenum-gap".into()),
        data_lines: vec![r#"{"reason":"too_old","last_event_id":"42"}"#.into()],
    };
    assert_eq!(event.gap(), ("too_old".to_string(), "42".to_string()));
}

#[test]
fn metrics_lookup_ignores_label_order_and_sums_shards() {
    let text = "# HELP x y\n# TYPE plenum_connections_open gauge\n\
        plenum_connections_open{shard=\"0\"} 3\n\
        plenum_connections_open{shard=\"1\"} 4\n\
        plenum_connections_closed_total{reason=\"write_stall\"} 2\n\
        plenum_info{version=\"0.1.0\",backend=\"epoll\"} 1\n\
        plenum_publish_to_write_seconds{quantile=\"0.99\"} 1.5e-5\n\
        plenum_shards 2\n";
    let metrics = Metrics::parse(text);
    assert_eq!(metrics.connections_open(), 7.0);
    assert_eq!(metrics.closed("write_stall"), 2.0);
    assert_eq!(metrics.closed("reset"), 0.0);
    assert_eq!(
        metrics.get("plenum_info{backend=\"epoll\",version=\"0.1.0\"}"),
        Some(1.0)
    );
    assert_eq!(metrics.get("plenum_shards"), Some(2.0));
    assert_eq!(
        metrics.get("plenum_publish_to_write_seconds{quantile=\"0.99\"}"),
        Some(1.5e-5)
    );
    assert_eq!(metrics.series("plenum_info")[0].0["backend"], "epoll");
}

#[test]
fn response_head_parser_is_strict() {
    let head =
        parse_response_head("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 3")
            .unwrap();
    assert_eq!(head.status, 405);
    assert_eq!(head.header("allow"), Some("GET"));
    assert!(parse_response_head("HTTP/1.1 200 OK\r\nno colon here").is_err());
    assert!(parse_response_head("SSH-2.0 x").is_err());
}
