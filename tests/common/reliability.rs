//! Helpers for the reliability suite (`tests/reliability_*.rs`): a seeded
//! random source whose seed is printed, a server started on a given port (for
//! restarts), per-shard metric lookups, and subscribers spread over every shard.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{print_uncaptured, Backend, Metrics, Server, SseClient, StartFailure, Subscribe};

/// A small deterministic generator (SplitMix64): enough for choosing moments
/// and kinds of disconnects, and reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// An independent stream for worker `index` of a test seeded with `seed`.
    pub fn derive(seed: u64, index: u64) -> Rng {
        let mut rng = Rng(seed ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..high` (`high > low`).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(high > low, "empty range {low}..{high}");
        low + self.next_u64() % (high - low)
    }

    /// True with probability `numerator / denominator`.
    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.next_u64() % denominator < numerator
    }
}

/// The seed of this test process: `PLENUM_TEST_SEED` if set, else the clock.
/// Printed (uncaptured) the first time, so any failing run can be replayed with
/// `PLENUM_TEST_SEED=<seed>`; tests also put it in their failure messages.
pub fn test_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = match std::env::var("PLENUM_TEST_SEED") {
            Ok(text) => text
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("PLENUM_TEST_SEED={text:?} is not a u64")),
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5EED),
        };
        print_uncaptured(&format!(
            "seed {seed} (replay with PLENUM_TEST_SEED={seed})"
        ));
        seed
    })
}

/// Starts a server listening on `127.0.0.1:port` (a restart on the port of a
/// previous process). The previous process's sockets may still be in
/// TIME_WAIT, which `SO_REUSEADDR` on the listener allows; if the port is
/// briefly held by something else, the start is retried for a few seconds.
pub fn start_on_port(backend: Backend, port: u16, args: &[&str]) -> Server {
    let listen = format!("127.0.0.1:{port}");
    let mut all: Vec<&str> = vec!["--listen", &listen];
    all.extend_from_slice(args);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Server::try_start(backend, &all) {
            Ok(server) => return server,
            Err(failure) if is_addr_in_use(&failure) && Instant::now() < deadline => {
                // Polling a resource we do not control; nothing to wait on.
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(failure) => panic!(
                "plenum serve on port {port} did not start (exit {:?}).\n--- stderr ---\n{}",
                failure.status, failure.stderr
            ),
        }
    }
}

fn is_addr_in_use(failure: &StartFailure) -> bool {
    let text = failure.stderr.to_ascii_lowercase();
    text.contains("address already in use") || text.contains("addrinuse")
}

/// Per-shard lookups on a scrape.
pub trait ShardMetrics {
    /// The values of `name{shard=..}`, indexed by shard.
    fn per_shard(&self, name: &str) -> Vec<f64>;
    /// Sum of `plenum_topics` over shards (topic index entries).
    fn topics(&self) -> f64;
}

impl ShardMetrics for Metrics {
    fn per_shard(&self, name: &str) -> Vec<f64> {
        let mut values: Vec<(usize, f64)> = self
            .series(name)
            .into_iter()
            .filter_map(|(labels, value)| Some((labels.get("shard")?.parse().ok()?, value)))
            .collect();
        values.sort_by_key(|(shard, _)| *shard);
        let mut out = vec![0.0; values.last().map_or(0, |(shard, _)| shard + 1)];
        for (shard, value) in values {
            out[shard] = value;
        }
        out
    }

    fn topics(&self) -> f64 {
        self.sum("plenum_topics")
    }
}

/// Opens subscribers on `topics` until there are at least `count` and every one
/// of `shards` shards has at least one (the kernel spreads connections over the
/// `SO_REUSEPORT` listeners by hash, so a few more may be needed). Assumes no
/// other subscriber is open. Panics if 64 subscribers do not cover every shard.
pub fn subscribers_on_every_shard(
    server: &Server,
    request: &Subscribe,
    shards: usize,
    count: usize,
) -> Vec<SseClient> {
    let mut clients = Vec::new();
    loop {
        let per_shard = server.metrics().per_shard("plenum_subscribers_open");
        let covered = per_shard.len() == shards && per_shard.iter().all(|&n| n >= 1.0);
        if covered && clients.len() >= count {
            return clients;
        }
        assert!(
            clients.len() < 64,
            "64 subscribers did not cover all {shards} shards: per shard {per_shard:?}"
        );
        clients.push(server.subscribe_with(request));
    }
}

/// What the kernel and the server say about one client connection, for a
/// failure message: `ss` lines for the client's port (both ends, with queue
/// sizes), the listeners' accept queues, and the server's per-shard gauges.
pub fn diagnose_connection(server: &Server, local: std::net::SocketAddr) -> String {
    let ss = |filter: String| -> String {
        std::process::Command::new("ss")
            .args(["-tanoi", &filter])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_else(|error| format!("(ss failed: {error})"))
    };
    let metrics = server.try_metrics().map(|m| {
        format!(
            "connections_open {:?}, subscribers_open {:?}",
            m.per_shard("plenum_connections_open"),
            m.per_shard("plenum_subscribers_open")
        )
    });
    format!(
        "client {local}\n--- ss (client port) ---\n{}--- ss (server port) ---\n{}--- server ---\n{metrics:?}",
        ss(format!("( sport = :{0} or dport = :{0} )", local.port())),
        ss(format!("( sport = :{} )", server.port())),
    )
}
