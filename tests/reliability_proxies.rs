//! The seed bug through proxies (issue 6, scenario 1): 100 subscribers reach Plenum
//! through an intermediary while 1,000 events/s of 1 KiB flow; then half of them
//! are killed (their sockets closed with unread bytes, as the kernel does for a
//! killed browser: an RST to the intermediary). Each variant asserts that every
//! upstream connection of a dead client is reclaimed by the mechanism named, with
//! that close reason counted and no other, that the living half receive every event
//! in order with no gap or duplicate, and that Plenum's RSS stays under the bound
//! computed from its flags ([`RssBound`], in `tests/common/flow.rs`).
//!
//! - (a) a real nginx with the usual SSE settings, and (b) the same with
//!   `proxy_ignore_client_abort on`. What nginx 1.22 does (seen in its error log
//!   and in Plenum's counters): with the default it watches the client connection
//!   and, on the client's RST, ends the request ("client prematurely closed
//!   connection" / 499) and closes the upstream connection at once; with
//!   `proxy_ignore_client_abort on` it stops watching the client, but its next
//!   write of an event to the dead client fails ("... while sending to client")
//!   and that too closes the upstream at once, because events flow. Plenum sees
//!   the upstream close (`peer_closed` for a FIN; `reset` when nginx closed while
//!   unread event bytes were still in its upstream socket, which makes the kernel
//!   send RST instead of FIN) and reclaims within 1 s. On an idle stream,
//!   `proxy_ignore_client_abort on` leaves nginx nothing to write, so only
//!   Plenum's heartbeats reveal the dead clients: the first draws an RST, the
//!   second write fails, and nginx closes the upstream (~2 heartbeats).
//! - (c) a draining intermediary written here: after its client is gone it keeps
//!   reading from Plenum and discarding, so Plenum sees no FIN, no stall and no
//!   error. Only the stream lifetime (`--stream-lifetime-max 2s`, jitter 10 %) ends
//!   those zombies (`lifetime`, after a `retry:` hint); the living clients behind
//!   the same proxy are ended by the same bound every ~2 s and reconnect with
//!   `Last-Event-ID`, and still miss nothing.
//! - (d) a frozen intermediary: after its client is gone it stops reading but keeps
//!   the upstream connection open; Plenum's send buffer and then the outbox fill,
//!   and the outbox hard limit (`slow_consumer`) or the write-stall deadline
//!   (`write_stall`) closes it.

#[macro_use]
mod common;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::flow::*;
use common::nginx::Nginx;
use common::*;

const CLIENTS: usize = 100;
const DOOMED: usize = 50;
const EVENTS_PER_SECOND: u64 = 1000;
const EVENT_BYTES: usize = 1024;
/// Readers and the test proxy wake for 16 KiB at a time, not for every event (no
/// latency is measured here), so the test's own threads leave the 2 cores to
/// Plenum and nginx.
const READ_LOW_WATER_BYTES: usize = 16 * 1024;
/// Events flow this long before the kill.
const FLOW_BEFORE_KILL: Duration = Duration::from_secs(2);

const SHARDS: u64 = 2;
const HISTORY_EVENTS_MAX: u64 = 10_000;
const HISTORY_BYTES_MAX: u64 = 16 * MIB;
const OUTBOX_BYTES_HARD: u64 = MIB;
const SHARD_INBOX_EVENTS: u64 = 8192;
const REQUEST_HEAD_BYTES_MAX: u64 = 8 * KIB;
const PUBLISH_BODY_BYTES_MAX: u64 = 64 * KIB;

/// The flags every variant shares (the terms of the memory bound), plus `extra`.
fn server_flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--shards",
        "2",
        "--history-events-max",
        "10000",
        "--history-bytes-max",
        "16MiB",
        "--outbox-bytes-hard",
        "1MiB",
        "--shard-inbox-events",
        "8192",
        "--request-head-bytes-max",
        "8KiB",
        "--publish-body-bytes-max",
        "64KiB",
    ];
    flags.extend_from_slice(extra);
    flags
}

fn rss_bound(server: &Server) -> RssBound {
    // Clients, the publisher, scrapes, and reconnects that overlap a closing stream.
    let connections = CLIENTS as u64 + 10;
    RssBound {
        base: server.rss_bytes(),
        connections,
        history_bytes_max: HISTORY_BYTES_MAX,
        history_events_max: HISTORY_EVENTS_MAX,
        outboxes: connections,
        outbox_bytes_hard: OUTBOX_BYTES_HARD,
        shards: SHARDS,
        shard_inbox_events: SHARD_INBOX_EVENTS,
        requests: connections,
        request_head_bytes_max: REQUEST_HEAD_BYTES_MAX,
        publish_body_bytes_max: PUBLISH_BODY_BYTES_MAX,
    }
}

/// Counters of every close reason but `completed` (scrapes), for "nothing else closed".
const REASONS: [&str; 10] = [
    "peer_closed",
    "reset",
    "timed_out",
    "write_stall",
    "slow_consumer",
    "lifetime",
    "handshake_timeout",
    "bad_request",
    "limit",
    "shutdown",
];

/// Close counts by reason between two scrapes (only the reasons that moved).
fn closes_between(before: &Metrics, after: &Metrics) -> Vec<(&'static str, f64)> {
    REASONS
        .iter()
        .map(|reason| (*reason, after.closed(reason) - before.closed(reason)))
        .filter(|(_, count)| *count != 0.0)
        .collect()
}

/// The scenario: `CLIENTS` subscribers through `entry`, the flow, the kill of
/// `DOOMED` of them after `FLOW_BEFORE_KILL`, then `reclaimed(before_kill,
/// killed_at)` — which waits for and checks the reclaim, returning a line for the
/// report — while the flow goes on for `flow_after_kill`. Then asserts that every
/// living reader received every event in order, and the RSS bound.
fn run(
    server: &Server,
    entry: SocketAddr,
    reconnect: bool,
    flow_after_kill: Duration,
    reclaimed: impl FnOnce(&Metrics, Instant) -> String + Send,
) {
    let bound = rss_bound(server);
    let clients = open_subscribers(entry, "feed", CLIENTS)
        .expect("subscribers open through the intermediary");
    server.wait_for_metrics(IO_TIMEOUT, "every subscriber registered upstream", |m| {
        m.subscribers_open() == CLIENTS as f64
    });
    let flow = Flow::new();
    let flow = &flow;
    let plan = ReaderPlan {
        addr: entry,
        topic: "feed".into(),
        reconnect,
        recv_lowat: Some(READ_LOW_WATER_BYTES),
    };
    let plan = &plan;
    let die = AtomicBool::new(false);
    let die = &die;
    let stop_sampling = AtomicBool::new(false);
    let stop_sampling = &stop_sampling;
    let pid = server.pid();
    let (published, living, reclaim_report, rss) = std::thread::scope(|scope| {
        // On a failed assertion in here: stop the publisher, the sampler and the
        // doomed readers, so that the scope can end and report the failure.
        let _stop_sampler = SetOnDrop(stop_sampling);
        let _stop_publisher = SetOnDrop(&flow.stop);
        let _kill = SetOnDrop(die);
        let sampler = scope.spawn(move || {
            Samples::collect(stop_sampling, Duration::from_millis(100), || {
                proc_rss_bytes(pid)
            })
        });
        let publisher = scope.spawn(move || {
            publish_paced(
                server,
                flow,
                "feed",
                EVENTS_PER_SECOND,
                EVENT_BYTES,
                FLOW_BEFORE_KILL + flow_after_kill,
            )
        });
        let mut readers = Vec::new();
        for (index, client) in clients.into_iter().enumerate() {
            let doomed = index < DOOMED;
            readers.push((
                doomed,
                scope.spawn(move || read_stream(flow, plan, client, doomed.then_some(die))),
            ));
        }
        assert!(
            flow.wait_published(
                EVENTS_PER_SECOND * FLOW_BEFORE_KILL.as_secs(),
                FLOW_BEFORE_KILL * 3
            ),
            "the publisher did not reach {} events",
            EVENTS_PER_SECOND * FLOW_BEFORE_KILL.as_secs()
        );
        let before_kill = server.metrics();
        die.store(true, Ordering::Relaxed);
        let mut living = Vec::new();
        let mut killed_at = Instant::now();
        for (doomed, reader) in readers {
            if doomed {
                let outcome = reader.join().unwrap();
                killed_at = killed_at.max(outcome.died_at.expect("a doomed reader died"));
            } else {
                living.push(reader);
            }
        }
        let reclaim_report = reclaimed(&before_kill, killed_at);
        let published = publisher.join().unwrap();
        let living: Vec<ReaderOutcome> = living.into_iter().map(|r| r.join().unwrap()).collect();
        stop_sampling.store(true, Ordering::Relaxed);
        (published, living, reclaim_report, sampler.join().unwrap())
    });
    for (index, outcome) in living.iter().enumerate() {
        assert_received_all(outcome, &published.ids, &format!("living client {index}"));
    }
    let reconnects: usize = living.iter().map(|o| o.reconnects).sum();
    println!(
        "{} events at {:.0}/s; living clients reconnected {reconnects} times in all; {reclaim_report}",
        published.ids.len(),
        published.rate_per_second()
    );
    bound.assert_holds(&rss, "plenum");
}

/// How nginx noticed its clients were gone, from its error log (`info` level):
/// one line per aborted request.
#[derive(Debug)]
struct NginxAborts {
    /// "epoll_wait() reported that client prematurely closed connection, so
    /// upstream connection is closed too": nginx watched the client connection.
    noticed_close: usize,
    /// "writev() failed (32: Broken pipe)" or "(104: Connection reset by peer)"
    /// while writing an event to the client.
    failed_write: usize,
}

impl NginxAborts {
    fn count(log: &str) -> NginxAborts {
        let lines = || log.lines().filter(|line| line.contains("/events?topic="));
        NginxAborts {
            noticed_close: lines()
                .filter(|line| line.contains("client prematurely closed connection"))
                .count(),
            failed_write: lines()
                .filter(|line| {
                    line.contains("failed (32: Broken pipe)")
                        || line.contains("failed (104: Connection reset by peer)")
                })
                .count(),
        }
    }
}

/// (a) and (b): through nginx with `extra` in its location; `check` asserts how
/// nginx noticed the aborts.
fn through_nginx(backend: Backend, extra: &str, check: impl Fn(&NginxAborts) + Send + Sync) {
    let server = Server::start(backend, &server_flags(&[]));
    let nginx = Nginx::start(server.addr(), extra);
    let (server_ref, nginx_ref, check) = (&server, &nginx, &check);
    run(
        &server,
        nginx.addr(),
        false,
        Duration::from_secs(2),
        |before, killed_at| {
            let after = server_ref.wait_for_metrics(
            AT_ONCE,
            &format!("the {DOOMED} upstream connections of killed clients closed by nginx and reclaimed"),
            |m| {
                m.subscribers_open() == (CLIENTS - DOOMED) as f64
                    && m.closed("peer_closed") + m.closed("reset")
                        == before.closed("peer_closed") + before.closed("reset") + DOOMED as f64
            },
        );
            let elapsed = killed_at.elapsed();
            let closes = closes_between(before, &after);
            for (reason, _) in &closes {
                assert!(
                *reason == "peer_closed" || *reason == "reset",
                "an upstream closed by nginx must count as peer_closed (FIN) or reset (RST), not {reason}: {closes:?}"
            );
            }
            // Why nginx closed them, in its own words (the living clients are still
            // open, so every abort logged so far is a killed client's).
            let log = nginx_ref.error_log();
            let aborts = NginxAborts::count(&log);
            assert_eq!(
            aborts.noticed_close + aborts.failed_write, DOOMED,
            "nginx must log one client abort per killed client: {aborts:?}; its error log:\n{log}"
        );
            check(&aborts);
            format!(
            "nginx: {aborts:?}, and closed the upstreams; Plenum reclaimed all {DOOMED} within {elapsed:.2?} of the kill: {closes:?}"
        )
        },
    );
}

// ---------------------------------------------------------------------------
// The test's own intermediary (variants c and d)
// ---------------------------------------------------------------------------

/// What the intermediary does with the upstream stream once its client is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterClientLoss {
    /// Keep reading from Plenum and discard (no FIN, no stall, no error upstream).
    Drain,
    /// Stop reading, keep the connection open.
    Freeze,
}

/// How the upstream stream of one proxied connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpstreamEnd {
    /// FIN right after a `retry:` line: the server ended the stream itself.
    EofAfterRetry,
    /// FIN without a `retry:` hint first.
    Eof,
    /// RST or another error.
    Error(io::ErrorKind),
}

#[derive(Clone, Debug)]
struct ProxiedConn {
    upstream_opened: Instant,
    /// When a write to the client failed.
    client_lost: Option<Instant>,
    upstream_end: Option<(Instant, UpstreamEnd)>,
    /// The last bytes received from upstream before its end (for messages).
    tail_at_end: String,
}

#[derive(Default)]
struct ProxyState {
    conns: Mutex<Vec<ProxiedConn>>,
    /// Upstream connections a frozen proxy holds without reading.
    frozen: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

/// A minimal HTTP/1.1 intermediary: reads the request head, opens its own upstream
/// connection to Plenum, forwards the head, then copies the response bytes to the
/// client until the upstream ends. One thread per connection.
struct TestProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
}

impl TestProxy {
    fn start(
        upstream: SocketAddr,
        policy: AfterClientLoss,
        upstream_recv_buffer: Option<usize>,
    ) -> TestProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("proxy listener");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        let accept_state = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let state = accept_state.clone();
                std::thread::spawn(move || {
                    let _ =
                        proxy_connection(client, upstream, policy, upstream_recv_buffer, &state);
                });
            }
        });
        TestProxy { addr, state }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxied connections whose client was lost.
    fn zombies(&self) -> Vec<ProxiedConn> {
        self.state
            .conns
            .lock()
            .unwrap()
            .iter()
            .filter(|conn| conn.client_lost.is_some())
            .cloned()
            .collect()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        self.state.frozen.lock().unwrap().clear();
    }
}

fn proxy_connection(
    mut client: TcpStream,
    upstream_addr: SocketAddr,
    policy: AfterClientLoss,
    upstream_recv_buffer: Option<usize>,
    state: &ProxyState,
) -> io::Result<()> {
    // 1. The request head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    while !head.ends_with(b"\r\n\r\n") {
        let n = client.read(&mut byte[..1])?;
        if n == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    // 2. Our own upstream connection.
    let mut upstream = connect_tcp(upstream_addr, None, upstream_recv_buffer)?;
    upstream.write_all(&head)?;
    upstream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let index = {
        let mut conns = state.conns.lock().unwrap();
        conns.push(ProxiedConn {
            upstream_opened: Instant::now(),
            client_lost: None,
            upstream_end: None,
            tail_at_end: String::new(),
        });
        conns.len() - 1
    };
    let record =
        |update: &dyn Fn(&mut ProxiedConn)| update(&mut state.conns.lock().unwrap()[index]);
    // 3. Copy until the upstream ends.
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let mut client_alive = true;
    loop {
        if state.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match upstream.read(&mut buf) {
            Ok(0) => {
                let retry = String::from_utf8_lossy(&tail).ends_with("\nretry: 100\n\n");
                let end = if retry {
                    UpstreamEnd::EofAfterRetry
                } else {
                    UpstreamEnd::Eof
                };
                let now = Instant::now();
                let text = String::from_utf8_lossy(&tail);
                // Everything from the last `retry:` (if any), else the last 200 bytes.
                let from = text
                    .rfind("retry:")
                    .unwrap_or(text.len().saturating_sub(200));
                let last = format!("[{} bytes before] {}", from, &text[from..]);
                record(&|conn| {
                    conn.upstream_end = Some((now, end));
                    conn.tail_at_end = last.clone();
                });
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Ok(n) => {
                if tail.is_empty() {
                    // The response head is through: from now on wake for 16 KiB at a time.
                    set_recv_lowat(&upstream, READ_LOW_WATER_BYTES);
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 4096 {
                    tail.drain(..tail.len() - 4096);
                }
                if client_alive && client.write_all(&buf[..n]).is_err() {
                    client_alive = false;
                    let now = Instant::now();
                    record(&|conn| conn.client_lost = Some(now));
                    if policy == AfterClientLoss::Freeze {
                        state.frozen.lock().unwrap().push(upstream);
                        return Ok(());
                    }
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(error) => {
                let now = Instant::now();
                record(&|conn| conn.upstream_end = Some((now, UpstreamEnd::Error(error.kind()))));
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
    }
}

backend_tests! {
    fn nginx_closes_the_upstream_of_killed_clients_and_plenum_reclaims_at_once(backend: Backend) {
        // Either way is nginx closing the upstream at once: it notices the RST
        // through epoll, or its next write of an event fails first.
        through_nginx(backend, "", |_| {});
    }

    fn nginx_ignoring_client_abort_closes_the_upstream_on_its_first_failed_write(backend: Backend) {
        // nginx no longer watches the client; only the failed write tells it.
        through_nginx(backend, "proxy_ignore_client_abort on;", |aborts| {
            assert_eq!(aborts.noticed_close, 0, "with proxy_ignore_client_abort on, nginx must not act on the client's close itself: {aborts:?}");
        });
    }

    fn nginx_ignoring_client_abort_on_an_idle_stream_closes_the_upstream_after_heartbeats(backend: Backend) {
        // No events: nginx, told to ignore client aborts, writes nothing to the dead
        // clients, so nothing tells it they are gone — until Plenum's heartbeats
        // reach it. The first heartbeat to a closed client draws an RST, the next
        // write fails, and nginx closes the upstream. Without heartbeats these
        // upstreams would live until the stream lifetime.
        let heartbeat = Duration::from_secs(1);
        let sweep = heartbeat / 4;
        let bound = (heartbeat + sweep) * 2 + Duration::from_secs(1);
        let server = Server::start(backend, &server_flags(&["--heartbeat-interval", "1s"]));
        let nginx = Nginx::start(server.addr(), "proxy_ignore_client_abort on;");
        let mut clients = open_subscribers(nginx.addr(), "idle", 10).expect("subscribers open through nginx");
        server.wait_for_metrics(IO_TIMEOUT, "every subscriber registered upstream", |m| m.subscribers_open() == 10.0);
        let before = server.metrics();
        let heartbeats_before = before.counter("plenum_heartbeats_total");
        let living = clients.split_off(5);
        drop(clients); // nothing unread: a FIN to nginx, which does not look
        let killed_at = Instant::now();
        let after = server.wait_for_metrics(bound, "the idle upstreams of 5 closed clients closed by nginx", |m| {
            m.subscribers_open() == 5.0
        });
        let elapsed = killed_at.elapsed();
        let closes = closes_between(&before, &after);
        let aborts = NginxAborts::count(&nginx.error_log());
        println!(
            "idle streams, proxy_ignore_client_abort on: upstreams closed {elapsed:.2?} after the clients, after {} heartbeats; nginx {aborts:?}; closes {closes:?}",
            after.counter("plenum_heartbeats_total") - heartbeats_before
        );
        assert_eq!(
            (aborts.noticed_close, aborts.failed_write),
            (0, 5),
            "nginx learns of the dead clients only from a failed write of a heartbeat; its error log:\n{}",
            nginx.error_log()
        );
        for (reason, _) in &closes {
            assert!(*reason == "peer_closed" || *reason == "reset", "unexpected close reason {reason}: {closes:?}");
        }
        drop(living);
    }

    fn draining_proxy_zombies_end_at_stream_lifetime_while_live_clients_resume_without_loss(backend: Backend) {
        let lifetime = Duration::from_secs(2);
        let jitter = 0.10;
        // The sweep visits each stream once per quarter of the shortest timeout (the
        // lifetime here), so an end is due at most that much late.
        let sweep = lifetime / 4;
        // The proxy sees Plenum's FIN only after copying what came before it; with
        // ~150 busy threads on 2 shared cores it lags by up to a few hundred ms.
        let slack = Duration::from_secs(1);
        let earliest = lifetime.mul_f64(1.0 - jitter);
        let latest = lifetime.mul_f64(1.0 + jitter) + sweep + slack;
        let server = Server::start(backend, &server_flags(&[
            "--stream-lifetime-max", "2s",
            "--stream-lifetime-jitter", "10",
            "--retry-hint", "100ms",
        ]));
        let proxy = TestProxy::start(server.addr(), AfterClientLoss::Drain, None);
        let server_ref = &server;
        let proxy_ref = &proxy;
        run(&server, proxy.addr(), true, Duration::from_secs(5), |before, killed_at| {
            // Every zombie (an upstream whose client is gone) ends by its lifetime.
            // A doomed client whose stream was just being ended and reopened when
            // it died leaves no zombie: most of the 50 do. Once all have ended
            // (a lifetime after the kill), no new zombie can appear: a dead client
            // is noticed at the proxy's next write, within milliseconds.
            let zombies_ended = wait_until(latest + Duration::from_secs(1), || {
                let zombies = proxy_ref.zombies();
                zombies.len() >= DOOMED * 4 / 5 && zombies.iter().all(|z| z.upstream_end.is_some())
            });
            let zombies = proxy_ref.zombies();
            let after = server_ref.metrics();
            assert!(
                zombies_ended,
                "{} zombies, {} ended by their lifetime: {zombies:?}\n{}",
                zombies.len(),
                zombies.iter().filter(|z| z.upstream_end.is_some()).count(),
                after.plenum_lines()
            );
            let mut lived = Vec::new();
            let mut after_death = Vec::new();
            for zombie in &zombies {
                let (ended, how) = zombie.upstream_end.unwrap();
                assert_eq!(
                    how,
                    UpstreamEnd::EofAfterRetry,
                    "a zombie must be ended by the server's lifetime bound (retry, then FIN): {zombie:?}; closes so far {:?}",
                    closes_between(before, &after)
                );
                let age = ended - zombie.upstream_opened;
                assert!(
                    age + Duration::from_millis(100) >= earliest && age <= latest,
                    "a zombie stream lived {age:?}, outside the lifetime window {earliest:?} .. {latest:?}"
                );
                lived.push(age);
                after_death.push(ended.saturating_duration_since(zombie.client_lost.unwrap()));
            }
            // Plenum saw nothing but lifetime ends: no FIN, no RST, no stall.
            let closes = closes_between(before, &after);
            for (reason, _) in &closes {
                assert_eq!(*reason, "lifetime", "behind a draining proxy every close is a lifetime end: {closes:?}");
            }
            assert!(
                after.closed("lifetime") - before.closed("lifetime") >= zombies.len() as f64,
                "every zombie counted as lifetime: {closes:?}"
            );
            lived.sort();
            after_death.sort();
            format!(
                "{} zombies behind the draining proxy ended by lifetime after {:.2?} .. {:.2?} of life ({:.2?} .. {:.2?} after their client died, {:.2?} after the kill); closes {closes:?}",
                zombies.len(),
                lived[0],
                lived[lived.len() - 1],
                after_death[0],
                after_death[after_death.len() - 1],
                killed_at.elapsed(),
            )
        });
    }

    fn frozen_proxy_zombies_are_closed_by_the_slow_consumer_or_stall_rule(backend: Backend) {
        let write_stall = Duration::from_secs(2);
        let sweep = write_stall / 4;
        // Filling the proxy's receive buffer and Plenum's send buffer at 1 MB/s.
        let fill = Duration::from_secs(1);
        let bound = fill + write_stall + sweep + Duration::from_secs(1);
        let server = Server::start(backend, &server_flags(&[
            "--write-stall-timeout", "2s",
            "--socket-send-buffer-bytes", "64KiB",
        ]));
        // A 64 KiB receive buffer on the proxy's upstream side keeps the fill short;
        // a real proxy's larger buffer only delays the same outcome.
        let proxy = TestProxy::start(server.addr(), AfterClientLoss::Freeze, Some(64 * 1024));
        let server_ref = &server;
        let proxy_ref = &proxy;
        run(&server, proxy.addr(), false, Duration::from_secs(4), |before, killed_at| {
            let after = server_ref.wait_for_metrics(
                bound,
                &format!("the frozen upstreams of {DOOMED} killed clients closed as slow_consumer or write_stall"),
                |m| {
                    m.subscribers_open() == (CLIENTS - DOOMED) as f64
                        && m.closed("slow_consumer") + m.closed("write_stall")
                            == before.closed("slow_consumer") + before.closed("write_stall") + DOOMED as f64
                },
            );
            let elapsed = killed_at.elapsed();
            let zombies = proxy_ref.zombies();
            assert_eq!(zombies.len(), DOOMED, "every killed client left a frozen upstream");
            let closes = closes_between(before, &after);
            for (reason, _) in &closes {
                assert!(
                    *reason == "slow_consumer" || *reason == "write_stall",
                    "a frozen upstream must close as slow_consumer or write_stall, not {reason}: {closes:?}"
                );
            }
            format!("{DOOMED} frozen upstreams reclaimed within {elapsed:.2?} of the kill (bound {bound:?}): {closes:?}")
        });
    }
}
