//! Benchmarks of the hot paths: frame encode, outbox push/flush, and one
//! shard's fan-out pass over many subscribers.
//!
//! The fan-out bench drives a real [`Shard`] through a scripted backend: it
//! accepts N connections that each send one `GET /events` request, then
//! "writes" by discarding the bytes, so the figure is the cost of Plenum's
//! own loop per delivered frame, without the kernel's TCP work (which
//! `plenum load` measures end to end).
//!
//! `cargo test --benches` runs each bench once on tiny inputs so they keep
//! compiling and working; `cargo bench` measures.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use plenum::backend::{Backend, Event, Handle, Io, Token, Waker};
use plenum::conn::Outbox;
use plenum::http::Limits;
use plenum::hub::{Frame, Hub, Topic};
use plenum::metrics::ShardStats;
use plenum::shard::{Shard, Shared};

/// A backend that accepts `pending` connections, hands each one request,
/// and discards whatever is sent.
struct Scripted {
    pending: VecDeque<Event>,
    requests: HashMap<u32, &'static [u8]>,
    registered: Vec<Token>,
    bytes_sent: usize,
}

const REQUEST: &[u8] = b"GET /events?topic=bench HTTP/1.1\r\nHost: bench\r\n\r\n";

impl Scripted {
    fn new(connections: u32) -> Scripted {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        Scripted {
            pending: (0..connections)
                .map(|i| Event::Accepted {
                    handle: Handle(i),
                    peer,
                })
                .collect(),
            requests: HashMap::new(),
            registered: Vec::new(),
            bytes_sent: 0,
        }
    }
}

impl Backend for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn poll(&mut self, events: &mut Vec<Event>, _timeout: Duration) -> io::Result<()> {
        events.extend(self.pending.drain(..));
        for token in self.registered.drain(..) {
            events.push(Event::Ready {
                token,
                readable: true,
                writable: true,
                hangup: false,
                error: false,
            });
        }
        Ok(())
    }
    fn register(&mut self, handle: Handle, token: Token) -> io::Result<()> {
        self.requests.insert(handle.0, REQUEST);
        self.registered.push(token);
        Ok(())
    }
    fn recv(&mut self, handle: Handle, _token: Token, buf: &mut [u8]) -> Io {
        match self.requests.remove(&handle.0) {
            Some(request) => {
                buf[..request.len()].copy_from_slice(request);
                Io::Done(request.len())
            }
            None => Io::Blocked,
        }
    }
    fn send(&mut self, _handle: Handle, _token: Token, bufs: &[IoSlice<'_>]) -> Io {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.bytes_sent += total;
        Io::Done(total)
    }
    fn take_error(&mut self, _handle: Handle) -> Option<io::Error> {
        None
    }
    fn close(&mut self, _handle: Handle, _token: Token, _reset: bool) -> bool {
        true
    }
    fn discard(&mut self, _handle: Handle) {}
    fn stop_accepting(&mut self) {}
}

/// A shard with `subscribers` streams on topic `bench`, and its hub.
fn shard_with_subscribers(subscribers: u32) -> (Shard<Scripted>, Arc<Hub>) {
    let mut config = plenum::server::default_config();
    config.connections_max = 1_000_000;
    let hub = Arc::new(Hub::new(vec![Waker::new().unwrap()], 1024, 1000, 64 << 20));
    let shared = Arc::new(Shared {
        limits: Limits {
            head_bytes_max: config.request_head_bytes_max,
            body_bytes_max: config.publish_body_bytes_max,
            topics_max: config.topics_per_connection_max,
            authorization: None,
        },
        config,
        hub: hub.clone(),
        stats: vec![Arc::new(ShardStats::default())],
        backend_name: "scripted",
        connections_open: AtomicUsize::new(0),
        per_ip: Mutex::new(HashMap::new()),
        draining: AtomicBool::new(false),
    });
    let mut shard = Shard::new(0, Scripted::new(subscribers), shared);
    // Turn 1 accepts; turn 2 reads each request and subscribes.
    shard.turn().unwrap();
    shard.turn().unwrap();
    assert_eq!(shard.connections(), subscribers as usize);
    let before = shard_bytes(&mut shard);
    hub.publish(Box::new(["bench".into()]), None, "probe");
    shard.turn().unwrap();
    assert!(
        shard_bytes(&mut shard) > before,
        "the probe event reached the subscribers"
    );
    (shard, hub)
}

/// Bytes the scripted backend has "sent".
fn shard_bytes(shard: &mut Shard<Scripted>) -> usize {
    shard.backend().bytes_sent
}

fn tiny() -> bool {
    // `cargo test --benches` passes no `--bench` argument: run tiny inputs once.
    !std::env::args().any(|arg| arg == "--bench")
}

fn frame_encode(c: &mut Criterion) {
    let data = "x".repeat(200);
    let topics: Box<[Topic]> = Box::new(["bench".into()]);
    let mut group = c.benchmark_group("frame_encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("200B", |b| {
        b.iter(|| {
            Frame::event(
                1_882_875_186_266_505_216,
                1,
                topics.clone(),
                Some("tick"),
                &data,
            )
        })
    });
    group.finish();
}

fn outbox(c: &mut Criterion) {
    let frames: Vec<Arc<Frame>> = (0..16).map(|_| Frame::control(vec![b'x'; 256])).collect();
    let mut group = c.benchmark_group("outbox");
    group.throughput(Throughput::Elements(frames.len() as u64));
    group.bench_function("push16_gather_advance", |b| {
        b.iter(|| {
            let mut outbox = Outbox::new(0);
            for frame in &frames {
                outbox.push(frame.clone(), 0);
            }
            let mut iovecs = [IoSlice::new(&[]); 64];
            let count = outbox.gather(&mut iovecs);
            let total: usize = iovecs[..count].iter().map(|s| s.len()).sum();
            outbox.advance(total);
            outbox.is_empty()
        })
    });
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let sizes: &[u32] = if tiny() { &[10] } else { &[1_000, 10_000] };
    let data = "x".repeat(200);
    let mut group = c.benchmark_group("fan_out");
    for &subscribers in sizes {
        let (mut shard, hub) = shard_with_subscribers(subscribers);
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new("200B_event", subscribers),
            &subscribers,
            |b, _| {
                b.iter_batched(
                    || hub.publish(Box::new(["bench".into()]), None, &data),
                    |_| shard.turn().unwrap(),
                    // One event per turn, as at a low publish rate: a batch of
                    // publishes first would be one multi-frame pass (or overflow).
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();
}

criterion_group!(benches, frame_encode, outbox, fan_out);
criterion_main!(benches);
