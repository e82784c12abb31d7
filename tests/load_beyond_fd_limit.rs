//! More connections than one process may open: 21,000 subscribers on one
//! Plenum process while the open-file limit here is 20,000 per process.
//!
//! Two things are proved at once: the io_uring backend holds connections as
//! direct descriptors (outside the process fd table: the server's fd count
//! stays small), and `plenum load subscribe` spreads its connections over
//! processes and source addresses so that no client process passes the limit
//! either. Every subscriber receives the published events, in order.
//!
//! The connection count is fixed by what it proves (above 20,000), not scaled
//! down; on a machine whose limit is higher the test still holds 21,000.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const SUBSCRIBERS: usize = 21_000;
const EVENTS: usize = 3;

#[test]
fn one_uring_process_holds_more_subscribers_than_the_open_file_limit() {
    let name = "one_uring_process_holds_more_subscribers_than_the_open_file_limit";
    run_backend_test(
        name,
        Backend::Uring,
        holds_more_subscribers_than_the_open_file_limit,
    );
}

fn holds_more_subscribers_than_the_open_file_limit(backend: Backend) {
    let flags = [
        "--shards",
        "2",
        "--connections-max",
        "22000",
        "--log-level",
        "warn",
    ];
    let server = match Server::try_start(backend, &flags) {
        Ok(server) => server,
        Err(failure) => skip(format!("io_uring unavailable: {}", failure.stderr.trim())),
    };
    let url = format!("http://{}/events?topic=many", server.addr());
    let report = std::env::temp_dir().join(format!("plenum-beyond-{}.json", std::process::id()));
    let mut subscribers = Command::new(env!("CARGO_BIN_EXE_plenum"))
        .args(["load", "subscribe", "--url", &url])
        .args([
            "--connections",
            &SUBSCRIBERS.to_string(),
            "--processes",
            "2",
        ])
        .args(["--source-ips", "127.0.0.2-127.0.0.3", "--connect-rate", "0"])
        .args(["--expect-events", &EVENTS.to_string(), "--duration", "120s"])
        .args(["--progress-interval", "0", "--json"])
        .arg(&report)
        .spawn()
        .expect("start plenum load subscribe");

    let metrics =
        server.wait_for_metrics(Duration::from_secs(90), "every subscriber connected", |m| {
            m.subscribers_open() >= SUBSCRIBERS as f64
        });
    assert_eq!(metrics.subscribers_open(), SUBSCRIBERS as f64);
    let fds = server.fd_count();
    assert!(
        fds < 1_000,
        "connections must not be in the server's fd table (it has {fds} fds)"
    );

    let mut publisher = server.publisher();
    for i in 0..EVENTS {
        publisher.publish(&["many"], None, format!("seq={} ts=0", i + 1).as_bytes());
    }
    let status = subscribers.wait().expect("plenum load subscribe ends");
    let text = std::fs::read_to_string(&report).expect("the load report");
    let _ = std::fs::remove_file(&report);
    assert!(
        status.success(),
        "plenum load subscribe reported a failed check: {text}"
    );
    let field = |name: &str| -> u64 {
        let start = text
            .find(&format!("\"{name}\":"))
            .unwrap_or_else(|| panic!("{name} in {text}"));
        text[start + name.len() + 3..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("connected"), SUBSCRIBERS as u64);
    assert_eq!(field("events_received"), (SUBSCRIBERS * EVENTS) as u64);
    assert_eq!(field("gaps"), 0);
    assert_eq!(field("duplicates"), 0);
}
