//! Silent peers (issue 6, scenario 2): subscribers in their own network namespace,
//! joined to the host by a veth pair; then the link is cut so that nothing — no
//! FIN, no RST, no ICMP, no local route error — ever reaches the server again
//! (`tests/common/netns.rs` says how). Only TCP's own timers can find these peers:
//!
//! - heartbeats on: the first heartbeat written after the cut is never
//!   acknowledged, and `TCP_USER_TIMEOUT` kills the connection that long after it
//!   was sent: reclaimed as `timed_out` within
//!   `[user timeout, heartbeat interval + sweep period + RTO + user timeout + slack]`
//!   of the cut. The RTO term: Linux counts the user timeout from about the first
//!   retransmission (`retrans_stamp`), one RTO (≥ 200 ms) after the send — seen
//!   here with `ss -ti`: heartbeat sent, retransmitted 0.23 s later, connection
//!   dead 3.4 s after the send;
//! - heartbeats off: the stream is idle, so keepalive probes it; `keepalive-count`
//!   unanswered probes kill it: `timed_out` within
//!   `[idle + (count − 1) × interval, idle + count × interval + slack]` of the cut
//!   (the last packet received before the cut is at most one probe interval old).
//!
//! The lower bounds show the mechanism named is the one that acted (not an error
//! the cut itself produced). Needs root and iproute2; skips with the reason when
//! run by hand without them, fails under `CI=true`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::*;

const SUBSCRIBERS: usize = 20;
/// Timer granularity of the kernel (jiffies) and of our metric polling.
const EARLY_TOLERANCE: Duration = Duration::from_millis(150);
const LATE_SLACK: Duration = Duration::from_millis(750);
/// Linux's minimum retransmission timeout.
const TCP_RTO_MIN: Duration = Duration::from_millis(200);

/// When the server was seen to reclaim the first and the last of the subscribers.
struct Reclaim {
    first: Duration,
    last: Duration,
}

/// Opens [`SUBSCRIBERS`] idle subscribers from inside a namespace, runs `before_cut`,
/// cuts the link and measures, by polling `/metrics`, when they are reclaimed; asserts
/// every one was closed as `timed_out` and nothing else was closed.
fn cut_and_measure(
    backend: Backend,
    flags: &[&str],
    wait_at_most: Duration,
    before_cut: impl FnOnce(&Server),
) -> Reclaim {
    let netns = NetNs::create();
    let listen = format!("{}:0", netns.host_ip());
    let mut args = vec!["--listen", listen.as_str(), "--allow-anonymous-publish"];
    args.extend_from_slice(flags);
    let server = Server::start(backend, &args);
    let addr = server.addr();
    let clients: Vec<SseClient> = netns.run_inside(|| {
        (0..SUBSCRIBERS)
            .map(|_| SseClient::open(addr, &Subscribe::topics(&["quiet"])))
            .collect()
    });
    for client in &clients {
        assert_eq!(
            client.local_addr().ip(),
            std::net::IpAddr::V4(netns.ns_ip()),
            "the subscriber must connect from inside the namespace"
        );
    }
    server.wait_for_metrics(IO_TIMEOUT, "every subscriber registered", |m| {
        m.subscribers_open() == SUBSCRIBERS as f64
    });
    before_cut(&server);
    let before = server.metrics();

    let cut_at = Instant::now();
    netns.cut();
    let timed_out_before = before.closed("timed_out");
    let mut first = None;
    let mut last_metrics = None;
    let done = wait_until(wait_at_most, || {
        let Ok(metrics) = server.try_metrics() else {
            return false;
        };
        let reclaimed = metrics.closed("timed_out") - timed_out_before;
        if reclaimed > 0.0 && first.is_none() {
            first = Some(cut_at.elapsed());
        }
        let finished = reclaimed >= SUBSCRIBERS as f64 && metrics.subscribers_open() == 0.0;
        last_metrics = Some(metrics);
        finished
    });
    let last = cut_at.elapsed();
    let metrics = last_metrics.expect("at least one scrape");
    assert!(
        done,
        "after {wait_at_most:?}, {} of {SUBSCRIBERS} silent subscribers were reclaimed as timed_out:\n{}\n--- server stderr ---\n{}",
        metrics.closed("timed_out") - timed_out_before,
        metrics.plenum_lines(),
        server.stderr_text()
    );
    assert_eq!(
        metrics.closed("timed_out") - timed_out_before,
        SUBSCRIBERS as f64,
        "exactly the silent subscribers close as timed_out"
    );
    for reason in [
        "peer_closed",
        "reset",
        "write_stall",
        "slow_consumer",
        "lifetime",
        "handshake_timeout",
        "bad_request",
        "limit",
    ] {
        assert_eq!(
            metrics.closed(reason),
            before.closed(reason),
            "a silent peer must not close as {reason}:\n{}",
            metrics.plenum_lines()
        );
    }
    drop(clients);
    Reclaim {
        first: first.unwrap_or(last),
        last,
    }
}

backend_tests! {
    fn silent_peer_is_reclaimed_by_tcp_user_timeout_after_an_unacknowledged_heartbeat(backend: Backend) {
        let heartbeat = Duration::from_secs(1);
        let user_timeout = Duration::from_secs(3);
        // The sweep visits each connection once per quarter of the shortest timeout
        // (here the heartbeat): a heartbeat is due at most that much late.
        let sweep = heartbeat / 4;
        let upper = heartbeat + sweep + TCP_RTO_MIN + user_timeout + LATE_SLACK;
        let reclaim = cut_and_measure(
            backend,
            &["--heartbeat-interval", "1s", "--tcp-user-timeout", "3s"],
            upper + Duration::from_secs(5),
            |server| {
                // Heartbeats are flowing (and acknowledged) before the cut.
                server.wait_for_metrics(Duration::from_secs(3), "a heartbeat to every subscriber", |m| {
                    m.counter("plenum_heartbeats_total") >= SUBSCRIBERS as f64
                });
            },
        );
        println!(
            "heartbeat 1s + TCP_USER_TIMEOUT 3s: {SUBSCRIBERS} silent peers reclaimed as timed_out {:.2?} .. {:.2?} after the cut (window {:?} .. {upper:?})",
            reclaim.first, reclaim.last, user_timeout
        );
        assert!(
            reclaim.first + EARLY_TOLERANCE >= user_timeout,
            "reclaimed {:?} after the cut: before TCP_USER_TIMEOUT ({user_timeout:?}) could have expired",
            reclaim.first
        );
        assert!(
            reclaim.last <= upper,
            "the last silent peer was reclaimed {:?} after the cut, above heartbeat + sweep + RTO + user timeout + slack = {upper:?}",
            reclaim.last
        );
    }

    fn silent_idle_peer_is_reclaimed_by_keepalive_when_heartbeats_are_off(backend: Backend) {
        let idle = Duration::from_secs(1);
        let interval = Duration::from_secs(1);
        let count = 2u32;
        let lower = idle + interval * (count - 1);
        let upper = idle + interval * count + LATE_SLACK;
        let mut heartbeats_before = 0.0;
        let reclaim = cut_and_measure(
            backend,
            &[
                "--heartbeat-interval", "0",
                "--keepalive-idle", "1s",
                "--keepalive-interval", "1s",
                "--keepalive-count", "2",
                "--tcp-user-timeout", "0",
            ],
            upper + Duration::from_secs(5),
            |server| heartbeats_before = server.metrics().counter("plenum_heartbeats_total"),
        );
        println!(
            "keepalive 1s/1s×2, no heartbeat: {SUBSCRIBERS} silent peers reclaimed as timed_out {:.2?} .. {:.2?} after the cut (window {lower:?} .. {upper:?})",
            reclaim.first, reclaim.last
        );
        assert_eq!(heartbeats_before, 0.0, "heartbeats are off: nothing is written to an idle stream");
        assert!(
            reclaim.first + EARLY_TOLERANCE >= lower,
            "reclaimed {:?} after the cut, before {count} keepalive probes could have gone unanswered ({lower:?})",
            reclaim.first
        );
        assert!(
            reclaim.last <= upper,
            "the last silent peer was reclaimed {:?} after the cut, above idle + interval × count + slack = {upper:?}",
            reclaim.last
        );
    }
}
