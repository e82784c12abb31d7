//! Reliability, scenario 7: churn.
//!
//! Several client threads run connect / subscribe / disconnect cycles as fast
//! as the machine allows, each cycle one of (seeded): subscribe to 1–3 of 500
//! topics and close (FIN), the same and reset (RST), subscribe resuming from a
//! `Last-Event-ID` and close, abort in the middle of the request head (FIN or
//! RST), and two keep-alive publishes then close. 20,000 cycles by default,
//! 200,000 with `PLENUM_TIER=heavy` (`PLENUM_CHURN_CYCLES=N` overrides both).
//!
//! Afterwards the server is back at its baseline: open descriptors
//! (`/proc/PID/fd`), `plenum_connections_open`, `plenum_subscribers_open` and
//! `plenum_topics` (the topic index entries) exactly; every accepted connection
//! is accounted for by a close reason; and RSS is within the allocator slack
//! of the baseline taken after a warm-up (see [`RSS_SLACK_BYTES`]).
//!
//! The seed is printed; `PLENUM_TEST_SEED=<seed>` replays the same mix.

#[macro_use]
mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::reliability::{test_seed, Rng, ShardMetrics};
use common::*;

const THREADS: usize = 4;
const TOPICS: u64 = 500;
const WARM_UP_CYCLES: usize = 4_000;

/// How far RSS may stay above the post-warm-up baseline after the run.
///
/// Measured first (2 cores, mimalloc, 2 shards, history of 100 events so it is
/// full after the warm-up): RSS 5.8-6.3 MiB at start, 6.2-6.5 MiB after the
/// 4,000-cycle warm-up, and within +0.13 MiB of that after 20,000 more cycles
/// (and -0.02 MiB after 200,000). Without a leak, RSS may still move by what
/// the allocator keeps: mimalloc holds freed pages of each thread's heap for
/// reuse and purges them lazily, and the shards' slot, generation and topic
/// tables keep the capacity of the peak concurrency (a few hundred entries).
/// 1 MiB covers that noise several times over, while a leak of 50 bytes per
/// cycle (1 MB over 20,000 cycles, 10 MB over 200,000) would fail.
const RSS_SLACK_BYTES: u64 = 1024 * 1024;

fn cycles() -> usize {
    if let Ok(text) = std::env::var("PLENUM_CHURN_CYCLES") {
        return text
            .trim()
            .parse()
            .expect("PLENUM_CHURN_CYCLES is a number");
    }
    match std::env::var("PLENUM_TIER").as_deref() {
        Ok("heavy") => 200_000,
        _ => 20_000,
    }
}

fn topic(rng: &mut Rng) -> String {
    format!("churn-{}", rng.range(0, TOPICS))
}

/// One cycle of a random kind. Returns the kind's index, for the tally.
fn cycle(server: &Server, rng: &mut Rng, last_id: &AtomicU64) -> usize {
    let kind = rng.range(0, 100);
    match kind {
        // Subscribe to 1-3 topics, then FIN or RST.
        0..=54 => {
            let topics: Vec<String> = (0..rng.range(1, 4)).map(|_| topic(rng)).collect();
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            let mut request = Subscribe::topics(&topics);
            if kind >= 45 {
                // Resume from a recent id: the replay path (history is bounded).
                request = request.last_event_id_header(last_id.load(Ordering::Relaxed));
            }
            let client = server.subscribe_with(&request);
            if !(25..45).contains(&kind) {
                drop(client);
                0
            } else {
                close_with_reset(client.into_stream());
                1
            }
        }
        // Abort in the middle of the request head.
        55..=74 => {
            let mut stream = connect_tcp(server.addr(), None, None).expect("connect");
            let head = Subscribe::topics(&[&topic(rng)]).request_bytes();
            let cut = rng.range(1, head.len() as u64 - 2) as usize;
            stream.write_all(&head[..cut]).expect("partial head");
            if rng.chance(1, 2) {
                close_with_reset(stream);
            }
            2
        }
        // Two publishes on one keep-alive connection, then FIN.
        _ => {
            let mut publisher = server.publisher();
            let topic = topic(rng);
            publisher.publish(&[&topic], None, b"churn");
            let id = publisher.publish(&[&topic], None, b"churn");
            last_id.store(id, Ordering::Relaxed);
            3
        }
    }
}

/// Runs `count` cycles over [`THREADS`] threads; returns the tally by kind.
fn churn(server: &Server, count: usize, seed: u64, round: u64) -> [usize; 4] {
    // A publisher of its own, closed at once (the server's shared one would stay open).
    let last_id = AtomicU64::new(server.publisher().publish(&["churn-0"], None, b"first"));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let last_id = &last_id;
                let mut rng = Rng::derive(seed, round * 100 + thread as u64);
                scope.spawn(move || {
                    let mut tally = [0usize; 4];
                    for _ in (thread..count).step_by(THREADS) {
                        tally[cycle(server, &mut rng, last_id)] += 1;
                    }
                    tally
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("churn thread"))
            .fold([0; 4], |mut sum, tally| {
                for (s, t) in sum.iter_mut().zip(tally) {
                    *s += t;
                }
                sum
            })
    })
}

/// Waits until nothing but the scrape itself is open, then returns the fewest
/// descriptors and the least RSS seen over a short sampling window (a scrape's
/// own connection may still be closing when `/proc` is read).
fn settle(server: &Server, what: &str) -> (usize, u64, Metrics) {
    let metrics = server.wait_for_metrics(
        Duration::from_secs(10),
        &format!("{what}: connections back to baseline"),
        |m| m.connections_open() <= 1.0 && m.subscribers_open() == 0.0 && m.topics() == 0.0,
    );
    let mut fds = usize::MAX;
    let mut rss = u64::MAX;
    // Sampling, not synchronisation: the condition never ends the wait early.
    wait_until(Duration::from_millis(300), || {
        fds = fds.min(server.fd_count());
        rss = rss.min(server.rss_bytes());
        false
    });
    (fds, rss, metrics)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

backend_tests! {
    fn churn_returns_fds_slots_topics_and_memory_to_baseline(backend: Backend) {
        let seed = test_seed();
        let count = cycles();
        // A short history fills during the warm-up, so its (bounded) growth is not
        // mistaken for churn growth.
        let server = Server::start(backend, &["--shards", "2", "--history-events-max", "100"]);
        let (fds_start, rss_start, _) = settle(&server, "start");

        churn(&server, WARM_UP_CYCLES, seed, 0);
        let (fds_base, rss_base, _) = settle(&server, "after the warm-up");
        assert_eq!(fds_base, fds_start, "descriptors after the warm-up");

        let started = Instant::now();
        let tally = churn(&server, count, seed, 1);
        let elapsed = started.elapsed();
        let rss_peak = server.rss_bytes();
        let (fds_end, rss_end, metrics) = settle(&server, "after the churn");

        let rate = count as f64 / elapsed.as_secs_f64();
        eprintln!(
            "{count} cycles in {elapsed:.1?} ({rate:.0}/s, {THREADS} threads; FIN {}, RST {}, head aborts {}, publish pairs {}); \
             RSS start {:.2} MiB, after warm-up {:.2} MiB, at the end of the churn {:.2} MiB, settled {:.2} MiB; fds {fds_end} (baseline {fds_base}); seed {seed}",
            tally[0], tally[1], tally[2], tally[3],
            mib(rss_start), mib(rss_base), mib(rss_peak), mib(rss_end)
        );
        assert_eq!(fds_end, fds_base, "open descriptors after {count} cycles (seed {seed})");
        assert_eq!(metrics.per_shard("plenum_topics"), vec![0.0, 0.0], "topic index entries per shard");
        let accepted = metrics.counter("plenum_connections_accepted_total");
        let closed = metrics.sum("plenum_connections_closed_total");
        assert!(accepted >= (count + WARM_UP_CYCLES) as f64, "accepted {accepted}");
        assert_eq!(accepted, closed + metrics.connections_open(), "accepted = closed + open:\n{}", metrics.plenum_lines());
        assert!(
            rss_end <= rss_base + RSS_SLACK_BYTES,
            "RSS {:.2} MiB after {count} cycles, baseline {:.2} MiB + slack {:.2} MiB (seed {seed})",
            mib(rss_end), mib(rss_base), mib(RSS_SLACK_BYTES)
        );
    }
}
