//! End-to-end tests of `plenum load misbehave`, `plenum load watch` and
//! `subscribe --source-ips`, against tiny servers written here.
//!
//! Each server reacts to the misbehaviour the way a careful SSE server
//! would (close a stalled reader, close a half-closed peer, time out a
//! dribbled request head), and the test checks that the tool saw it. The
//! tools stop by themselves once every connection is closed; `--duration`
//! only bounds a broken run.

mod load_common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use load_common::*;

/// Reads a request head (bounded); false if the peer closed first.
fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return false,
            Ok(count) => head.extend_from_slice(&byte[..count]),
        }
        assert!(head.len() < 65536);
    }
    true
}

const STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n:ok\n\n";

/// Serves `accepts` connections, each on its own thread; each handler's
/// result goes to the returned channel.
fn serve<T: Send + 'static>(
    accepts: usize,
    handler: fn(TcpStream) -> T,
) -> (u16, mpsc::Receiver<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..accepts {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let sender = sender.clone();
            std::thread::spawn(move || {
                let _ = sender.send(handler(stream));
            });
        }
    });
    (port, receiver)
}

fn misbehave(port: u16, mode: &str, extra: &[&str]) -> serde_json::Value {
    let url = format!("http://127.0.0.1:{port}/events?topic=a");
    let mut args = vec![
        "load",
        "misbehave",
        "--url",
        &url,
        "--mode",
        mode,
        "--connections",
        "2",
        "--duration",
        "30s",
    ];
    args.extend_from_slice(extra);
    let (code, report) = load_report(&args);
    assert_eq!(code, Some(0));
    report
}

#[test]
fn stall_is_closed_by_a_server_with_a_write_deadline() {
    let (port, results) = serve(2, |mut stream| {
        if !read_head(&mut stream) {
            return "no request";
        }
        stream.write_all(STREAM_HEAD).unwrap();
        // A write deadline: a write that makes no progress for 300 ms ends the stream.
        stream
            .set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let block = vec![b'x'; 64 * 1024];
        for _ in 0..100_000 {
            if let Err(error) = stream.write_all(&block) {
                assert!(
                    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                    "{error}"
                );
                // Close with a reset, as Plenum does on a write stall: a FIN would
                // wait behind the unsent bytes, which a stalled reader never takes.
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return "stalled";
            }
        }
        "never stalled"
    });
    let report = misbehave(port, "stall", &["--receive-buffer-bytes", "4096"]);
    assert_eq!(
        results.recv_timeout(Duration::from_secs(30)).unwrap(),
        "stalled"
    );
    assert_eq!(
        results.recv_timeout(Duration::from_secs(30)).unwrap(),
        "stalled"
    );
    assert_eq!(report["connected"].as_u64(), Some(2));
    assert_eq!(report["requests_sent"].as_u64(), Some(2));
    assert_eq!(
        report["server_closed"].as_u64().unwrap() + report["server_reset"].as_u64().unwrap(),
        2
    );
    assert_eq!(report["server_close_after"]["count"].as_u64(), Some(2));
    assert_eq!(report["open_at_end"].as_u64(), Some(0));
}

#[test]
fn reset_reaches_the_server_as_an_rst() {
    let (port, results) = serve(2, |mut stream| {
        if !read_head(&mut stream) {
            return "no request".to_owned();
        }
        stream.write_all(STREAM_HEAD).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buffer = [0u8; 64];
        match stream.read(&mut buffer) {
            Err(error) if error.kind() == ErrorKind::ConnectionReset => "reset".to_owned(),
            other => format!("{other:?}"),
        }
    });
    let report = misbehave(port, "reset", &[]);
    assert_eq!(
        results.recv_timeout(Duration::from_secs(30)).unwrap(),
        "reset"
    );
    assert_eq!(
        results.recv_timeout(Duration::from_secs(30)).unwrap(),
        "reset"
    );
    assert_eq!(report["client_closed"].as_u64(), Some(2));
    assert_eq!(report["responses_seen"].as_u64(), Some(2));
}

#[test]
fn half_close_is_answered_with_a_close() {
    let (port, results) = serve(2, |mut stream| {
        if !read_head(&mut stream) {
            return "no request";
        }
        stream.write_all(STREAM_HEAD).unwrap();
        let mut buffer = [0u8; 64];
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => "fin",
            _ => "no fin",
        }
    });
    let report = misbehave(port, "half-close", &[]);
    assert_eq!(
        results.recv_timeout(Duration::from_secs(30)).unwrap(),
        "fin"
    );
    assert_eq!(
        results.recv_timeout(Duration::from_secs(30)).unwrap(),
        "fin"
    );
    assert_eq!(report["server_closed"].as_u64(), Some(2));
}

#[test]
fn slowloris_is_cut_off_by_a_header_deadline() {
    let (port, results) = serve(2, |mut stream| {
        // A header deadline of 300 ms from accept.
        let started = Instant::now();
        let mut received = 0;
        let mut byte = [0u8; 64];
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        while started.elapsed() < Duration::from_millis(300) {
            match stream.read(&mut byte) {
                Ok(0) => return (received, "peer closed"),
                Ok(count) => received += count,
                Err(_) => break,
            }
        }
        (received, "deadline")
    });
    let report = misbehave(port, "slowloris", &["--byte-interval", "50ms"]);
    for _ in 0..2 {
        let (received, how) = results.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(how, "deadline");
        assert!(
            (1..30).contains(&received),
            "one byte per 50 ms for 300 ms, got {received}"
        );
    }
    assert_eq!(report["requests_sent"].as_u64(), Some(0));
    assert_eq!(
        report["server_closed"].as_u64().unwrap() + report["server_reset"].as_u64().unwrap(),
        2
    );
}

#[test]
fn vanish_kills_the_holder_and_the_server_sees_the_close() {
    let (port, results) = serve(2, |mut stream| {
        if !read_head(&mut stream) {
            return "no request";
        }
        stream.write_all(STREAM_HEAD).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buffer = [0u8; 64];
        match stream.read(&mut buffer) {
            Ok(0) => "fin",
            Err(error) if error.kind() == ErrorKind::ConnectionReset => "reset",
            _ => "still open",
        }
    });
    let report = misbehave(port, "vanish", &[]);
    for _ in 0..2 {
        let how = results.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(how == "fin" || how == "reset", "{how}");
    }
    assert_eq!(report["client_closed"].as_u64(), Some(2));
}

#[test]
fn subscribe_spreads_connections_over_source_addresses() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sender, peers) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..4 {
            let Ok((mut stream, peer)) = listener.accept() else {
                return;
            };
            let _ = sender.send(peer.ip().to_string());
            std::thread::spawn(move || {
                if read_head(&mut stream) {
                    stream.write_all(STREAM_HEAD).unwrap();
                    stream.write_all(b"data: seq=1\n\n").unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let _ = stream.read(&mut [0u8; 16]);
                }
            });
        }
    });
    let url = format!("http://127.0.0.1:{port}/events");
    let (code, report) = load_report(&[
        "load",
        "subscribe",
        "--url",
        &url,
        "--connections",
        "4",
        "--processes",
        "2",
        "--source-ips",
        "127.0.0.2-127.0.0.3",
        "--expect-events",
        "1",
        "--duration",
        "30s",
    ]);
    assert_eq!(code, Some(0));
    let mut counts = BTreeMap::new();
    for _ in 0..4 {
        *counts
            .entry(peers.recv_timeout(Duration::from_secs(30)).unwrap())
            .or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([("127.0.0.2".to_owned(), 2), ("127.0.0.3".to_owned(), 2)])
    );
    assert_eq!(report["source_ips"].as_u64(), Some(2));
}

#[test]
fn watch_samples_a_process() {
    let pid = std::process::id().to_string();
    let (code, report) = load_report(&[
        "load",
        "watch",
        "--pid",
        &pid,
        "--interval",
        "20ms",
        "--duration",
        "100ms",
    ]);
    assert_eq!(code, Some(0));
    let samples = report["samples"].as_array().unwrap();
    assert!(samples.len() >= 3, "{report}");
    assert!(samples
        .iter()
        .all(|s| s["rss_bytes"].as_u64().unwrap() > 0 && s["threads"].as_u64().unwrap() >= 1));
    assert!(report["summary"]["fds_max"].as_u64().unwrap() >= 3);
}
