//! End-to-end tests of `plenum load subscribe` and `plenum load publish`
//! against tiny servers written here (std `TcpListener`, a thread per
//! connection), so they test the tool alone and against no Plenum internals.
//!
//! Every server writes known frames — split across writes at odd places,
//! CRLF and LF line ends, a BOM, comments, multi-line data, chunked encoding —
//! and the tests check the tool's JSON report. Nothing waits on a sleep: the
//! client stops by itself (`--expect-events`, or every slot finished), and
//! `--duration` only bounds a broken run.

mod load_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use load_common::*;

fn unix_now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A parsed request: method, target, headers (lowercase names), body.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request from `stream` (None at EOF). Bounded to 64 KiB.
fn read_request(stream: &mut TcpStream, carry: &mut Vec<u8>) -> Option<Request> {
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(index) = carry.windows(4).position(|w| w == b"\r\n\r\n") {
            break index + 4;
        }
        assert!(carry.len() < 65536, "request head too long");
        let count = stream.read(&mut buffer).ok()?;
        if count == 0 {
            return None;
        }
        carry.extend_from_slice(&buffer[..count]);
    };
    let head = String::from_utf8(carry[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap().split(' ');
    let method = request_line.next().unwrap().to_owned();
    let target = request_line.next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_lowercase(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    carry.drain(..head_end);
    while carry.len() < length {
        let count = stream.read(&mut buffer).ok()?;
        if count == 0 {
            return None;
        }
        carry.extend_from_slice(&buffer[..count]);
    }
    let body = carry.drain(..length).collect();
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

/// Starts a server that hands each connection to `handler` on its own
/// thread; at most `accepts_max` connections. Returns the port.
fn serve(accepts_max: usize, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for _ in 0..accepts_max {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            stream.set_nodelay(true).unwrap();
            // A bound on a handler stuck on a client that never closes.
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let handler = Arc::clone(&handler);
            std::thread::spawn(move || handler(stream));
        }
    });
    port
}

/// Writes `bytes` in three pieces split at odd places (or as three chunks).
fn write_split(stream: &mut TcpStream, bytes: &[u8], chunked: bool) {
    let cuts = [0, bytes.len() / 3, bytes.len() * 2 / 3 + 1, bytes.len()];
    for piece in cuts.windows(2) {
        let piece = &bytes[piece[0]..piece[1].min(bytes.len())];
        if piece.is_empty() {
            continue;
        }
        if chunked {
            let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
            framed.extend_from_slice(piece);
            framed.extend_from_slice(b"\r\n");
            stream.write_all(&framed).unwrap();
        } else {
            stream.write_all(piece).unwrap();
        }
    }
}

/// Blocks until the client closes (bounded by the read timeout).
fn hold_until_client_closes(stream: &mut TcpStream) {
    let mut buffer = [0u8; 256];
    while matches!(stream.read(&mut buffer), Ok(count) if count > 0) {}
}

/// The stream server for the reconnect test.
///
/// `/plain`: a BOM, `:ok`, `retry: 5`, events 1..=5 (CRLF line ends, one
/// event with two data lines), then the server closes. A request with
/// `Last-Event-ID: n` gets a `plenum-gap` signal and events n+1..=10, then
/// the stream stays open.
/// `/chunked`: the same events in chunked encoding, LF line ends; the first
/// stream ends with the last chunk (the TCP connection stays open).
fn stream_handler(mut stream: TcpStream, log: Arc<Mutex<Vec<Request>>>) {
    let mut carry = Vec::new();
    let Some(request) = read_request(&mut stream, &mut carry) else {
        return;
    };
    log.lock().unwrap().push(request.clone());
    if request.header("accept") != Some("text/event-stream") {
        stream
            .write_all(b"HTTP/1.1 406 Not Acceptable\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        return;
    }
    let chunked = request.target.starts_with("/chunked");
    let resume_after: Option<u64> = request
        .header("last-event-id")
        .map(|id| id.parse().unwrap());
    let mut head =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            .to_vec();
    if chunked {
        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).unwrap();
    let newline = if chunked { "\n" } else { "\r\n" };
    let mut preamble = format!("\u{FEFF}:ok{newline}{newline}retry: 5{newline}{newline}");
    if let (Some(after), false) = (resume_after, chunked) {
        preamble.push_str(&format!(
            "event: plenum-gap{newline}data: {{\"reason\":\"too_old\",\"last_event_id\":\"{after}\"}}{newline}{newline}"
        ));
    }
    write_split(&mut stream, preamble.as_bytes(), chunked);
    let seqs = match resume_after {
        None => 1..=5,
        Some(after) => after + 1..=10,
    };
    for seq in seqs {
        let frame = if seq == 3 {
            format!("id: {seq}{newline}: a comment{newline}data: seq={seq} ts={}{newline}data: second line{newline}{newline}", unix_now_ns())
        } else {
            format!(
                "id: {seq}{newline}data: seq={seq} ts={}{newline}{newline}",
                unix_now_ns()
            )
        };
        write_split(&mut stream, frame.as_bytes(), chunked);
    }
    if resume_after.is_none() {
        if chunked {
            stream.write_all(b"0\r\n\r\n").unwrap();
            hold_until_client_closes(&mut stream);
        }
        return; // Dropping the stream: the server ends it.
    }
    hold_until_client_closes(&mut stream);
}

#[test]
fn subscribe_over_two_processes_checks_sequences_across_reconnects() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let server_log = Arc::clone(&log);
    let port = serve(8, move |stream| {
        stream_handler(stream, Arc::clone(&server_log))
    });
    let json = temp_path("subscribe.json");
    let svg = temp_path("subscribe.svg");
    let output = run(plenum().args([
        "load",
        "subscribe",
        "--url",
        &format!("http://127.0.0.1:{port}/plain?topic=a"),
        "--url",
        &format!("http://localhost:{port}/chunked?topic=a"),
        "--connections",
        "4",
        "--processes",
        "2",
        "--reconnect",
        "--expect-events",
        "10",
        "--duration",
        "30s",
        "--progress-interval",
        "0",
        "--server-pid",
        &std::process::id().to_string(),
        "--sample-interval",
        "50ms",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]));
    assert!(output.status.success(), "exit status {:?}", output.status);
    let report = read_json(&json);
    let get = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {report}"))
    };
    assert_eq!(get("processes"), 2);
    assert_eq!(get("connections"), 4);
    assert_eq!(get("connected"), 4);
    assert_eq!(get("failed_total"), 0);
    assert_eq!(get("events_received"), 40);
    assert_eq!(get("events_sequenced"), 40);
    assert_eq!(get("events_per_connection_min"), 10);
    assert_eq!(get("connections_reached_expected"), 4);
    assert_eq!(get("gaps"), 0);
    assert_eq!(get("duplicates"), 0);
    assert_eq!(get("missing_signalled"), 0);
    assert_eq!(
        get("gap_signals"),
        2,
        "the two /plain reconnects began with a gap signal"
    );
    assert_eq!(
        get("closed_by_server"),
        4,
        "every first stream was ended by the server"
    );
    assert_eq!(get("reconnects"), 4);
    assert_eq!(get("open_at_end"), 4);
    assert_eq!(report["latency"]["count"].as_u64(), Some(40));
    assert!(report["latency"]["max_ms"].as_f64().unwrap() < 10_000.0);
    assert_eq!(report["connect_time"]["count"].as_u64(), Some(8));
    assert!(report["stopped_by"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s == "expect_events"));
    assert!(report["checks"]["passed"].as_bool().unwrap());
    assert!(!report["server_samples"].as_array().unwrap().is_empty());
    assert!(report["server"]["rss_bytes_max"].as_u64().unwrap() > 0);
    assert!(!report["windows"].as_array().unwrap().is_empty());
    eprintln!(
        "client CPU per received event: {} µs ({} s for {} events)",
        report["client_cpu_us_per_event"], report["client_cpu_s"], report["events_received"]
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("server RSS"));

    // What the server saw: the headers a browser sends, and Last-Event-ID: 5 on each reconnect.
    let requests = log.lock().unwrap().clone();
    assert_eq!(requests.len(), 8);
    for request in &requests {
        assert_eq!(request.method, "GET");
        assert_eq!(request.header("accept"), Some("text/event-stream"));
        assert_eq!(request.header("cache-control"), Some("no-cache"));
        assert!(request
            .header("host")
            .unwrap()
            .ends_with(&format!(":{port}")));
    }
    let resumed: Vec<_> = requests
        .iter()
        .filter_map(|r| r.header("last-event-id"))
        .collect();
    assert_eq!(resumed, vec!["5"; 4]);
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("checks        passed"), "{summary}");
}

#[test]
fn gaps_and_duplicates_are_counted_and_fail_the_run() {
    let port = serve(2, |mut stream| {
        let mut carry = Vec::new();
        if read_request(&mut stream, &mut carry).is_none() {
            return;
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            .unwrap();
        for seq in [1, 2, 4, 4, 5] {
            write_split(
                &mut stream,
                format!("data: seq={seq} ts={}\n\n", unix_now_ns()).as_bytes(),
                false,
            );
        }
        hold_until_client_closes(&mut stream);
    });
    let (code, report) = load_report(&[
        "load",
        "subscribe",
        "--url",
        &format!("http://127.0.0.1:{port}/events"),
        "--connections",
        "2",
        "--processes",
        "2",
        "--expect-events",
        "5",
        "--duration",
        "30s",
    ]);
    assert_eq!(code, Some(2), "failed checks exit with 2");
    assert_eq!(report["events_received"].as_u64(), Some(10));
    assert_eq!(report["gaps"].as_u64(), Some(2));
    assert_eq!(report["missing"].as_u64(), Some(2));
    assert_eq!(report["duplicates"].as_u64(), Some(2));
    assert!(!report["checks"]["passed"].as_bool().unwrap());
}

#[test]
fn failures_are_counted_by_reason() {
    // A port nobody listens on: refused.
    let refused_port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (code, report) = load_report(&[
        "load",
        "subscribe",
        "--url",
        &format!("http://127.0.0.1:{refused_port}/events"),
        "--connections",
        "3",
        "--duration",
        "30s",
    ]);
    assert_eq!(code, Some(2));
    assert_eq!(report["failed"]["refused"].as_u64(), Some(3));
    assert_eq!(report["connected"].as_u64(), Some(0));

    // A server that answers 503, and one that is not an event stream.
    let port = serve(4, |mut stream| {
        let mut carry = Vec::new();
        let Some(request) = read_request(&mut stream, &mut carry) else {
            return;
        };
        let response: &[u8] = if request.target == "/busy" {
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi"
        };
        stream.write_all(response).unwrap();
        hold_until_client_closes(&mut stream);
    });
    let (code, report) = load_report(&[
        "load",
        "subscribe",
        "--url",
        &format!("http://127.0.0.1:{port}/busy"),
        "--url",
        &format!("http://127.0.0.1:{port}/html"),
        "--connections",
        "4",
        "--duration",
        "30s",
    ]);
    assert_eq!(code, Some(2));
    assert_eq!(report["failed"]["http_503"].as_u64(), Some(2));
    assert_eq!(report["failed"]["not_event_stream"].as_u64(), Some(2));

    // A server that never answers (timeout), one that hangs up on the request
    // (closed_before_response) and one that answers garbage (bad_response).
    let port = serve(6, |mut stream| {
        let mut carry = Vec::new();
        let Some(request) = read_request(&mut stream, &mut carry) else {
            return;
        };
        match request.target.as_str() {
            "/silent" => hold_until_client_closes(&mut stream),
            "/hangup" => {}
            _ => {
                stream.write_all(b"SSE/9 banana\r\n\r\n").unwrap();
                hold_until_client_closes(&mut stream);
            }
        }
    });
    let (code, report) = load_report(&[
        "load",
        "subscribe",
        "--url",
        &format!("http://127.0.0.1:{port}/silent"),
        "--url",
        &format!("http://127.0.0.1:{port}/hangup"),
        "--url",
        &format!("http://127.0.0.1:{port}/garbage"),
        "--connections",
        "6",
        "--connect-timeout",
        "300ms",
        "--duration",
        "30s",
    ]);
    assert_eq!(code, Some(2));
    assert_eq!(report["failed"]["timeout"].as_u64(), Some(2));
    assert_eq!(report["failed"]["closed_before_response"].as_u64(), Some(2));
    assert_eq!(report["failed"]["bad_response"].as_u64(), Some(2));
    assert_eq!(report["failed_total"].as_u64(), Some(6));
}

#[test]
fn publish_paces_keep_alive_requests_with_the_body_template() {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let server_bodies = Arc::clone(&bodies);
    let port = serve(4, move |mut stream| {
        let mut carry = Vec::new();
        // Keep-alive: many requests per connection (bounded by the client's count).
        while let Some(request) = read_request(&mut stream, &mut carry) {
            assert_eq!(request.method, "POST");
            assert_eq!(request.header("authorization"), Some("Bearer sesame"));
            server_bodies
                .lock()
                .unwrap()
                .push(String::from_utf8(request.body).unwrap());
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n42",
                )
                .unwrap();
        }
    });
    let (code, report) = load_report(&[
        "load",
        "publish",
        "--url",
        &format!("http://127.0.0.1:{port}/publish?topic=a"),
        "--rate",
        "0",
        "--count",
        "50",
        "--connections",
        "2",
        "--payload-bytes",
        "64",
        "--token",
        "sesame",
        "--duration",
        "30s",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(report["sent"].as_u64(), Some(50));
    assert_eq!(report["ok"].as_u64(), Some(50));
    assert_eq!(report["responses"]["200"].as_u64(), Some(50));
    assert_eq!(report["unanswered"].as_u64(), Some(0));
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 50);
    let mut seqs: Vec<u64> = bodies
        .iter()
        .map(|body| {
            assert_eq!(body.len(), 64);
            assert!(body.ends_with("xxx"));
            let seq = body
                .strip_prefix("seq=")
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            let ts: u128 = body
                .split(' ')
                .nth(1)
                .unwrap()
                .strip_prefix("ts=")
                .unwrap()
                .parse()
                .unwrap();
            assert!(ts <= unix_now_ns());
            seq.parse().unwrap()
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=50).collect::<Vec<u64>>());
}

#[test]
fn sigterm_stops_the_run_and_still_reports() {
    // Each slot's first stream carries one event and ends; the reconnect
    // (with Last-Event-ID) proves the client has read that stream to its end,
    // and is held open until the client stops.
    let (sender, resumed) = std::sync::mpsc::channel();
    let sender = Mutex::new(sender);
    let port = serve(4, move |mut stream| {
        let mut carry = Vec::new();
        let Some(request) = read_request(&mut stream, &mut carry) else {
            return;
        };
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\nretry: 1\n\n")
            .unwrap();
        if request.header("last-event-id").is_none() {
            stream.write_all(b"id: 1\ndata: seq=1\n\n").unwrap();
            return;
        }
        sender.lock().unwrap().send(()).unwrap();
        hold_until_client_closes(&mut stream);
    });
    let json = temp_path("sigterm.json");
    let child = plenum()
        .args([
            "load",
            "subscribe",
            "--url",
            &format!("http://127.0.0.1:{port}/events"),
            "--connections",
            "2",
            "--processes",
            "2",
            "--reconnect",
            "--duration",
            "60s",
            "--json",
            json.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..2 {
        resumed.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    assert_eq!(output.status.code(), Some(0));
    let report = read_json(&json);
    assert_eq!(report["connected"].as_u64(), Some(2));
    assert_eq!(report["events_received"].as_u64(), Some(2));
    assert_eq!(report["reconnects"].as_u64(), Some(2));
    assert!(
        report["stopped_by"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s == "signal"),
        "{report}"
    );
    assert!(report["elapsed_s"].as_f64().unwrap() < 30.0);
}
