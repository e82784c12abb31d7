//! A shard: one thread, one backend, its own connections, topics and timers.
//!
//! The loop, each turn:
//!
//! 1. Poll the backend (the timeout is the next timer tick, or zero while
//!    work is left over) and handle its events: accepts, readiness, wakes.
//! 2. Drain the inbox: frames from the hub, in id order. A jump in the
//!    sequence numbers, or the hub's `missed` flag, means frames were lost to
//!    a full inbox; they are recovered from history first. Each frame is
//!    written to every local subscriber of its topics: straight to the
//!    socket when the subscriber is caught up, into its outbox otherwise.
//! 3. On a tick, sweep a slice of the connections for deadlines: handshake,
//!    body and idle timeouts, heartbeats, write stalls, the soft outbox
//!    limit, stream lifetimes, shutdown.
//! 4. Reap the connections marked for closing during the turn. Nothing is
//!    closed in the middle of a fan-out pass, so the topic lists it walks
//!    never change under it.
//!
//! Nothing in the loop blocks: a slow subscriber costs at most one
//! non-blocking write attempt per frame, then waits in its own outbox.

mod topics;

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Event, Handle, Io, Token};
use crate::config::Config;
use crate::conn::{CloseReason, Conn, Outbox, Phase, IOVECS_PER_WRITE_MAX};
use crate::http::{self, BodyKind, BodyReader, ChunkedDecoder, Rejection, Request, Route, Status};
use crate::hub::{EventId, Frame, Hub, Page, Resume, Topic};
use crate::metrics::{self, ShardStats};

pub use topics::TopicIndex;

/// A [`Writer`] over the shard's fields other than the slots, so that a
/// connection borrowed from the slots can be written to.
macro_rules! writer {
    ($shard:expr) => {
        Writer {
            backend: &mut $shard.backend,
            counters: &mut $shard.counters,
            config: &$shard.shared.config,
            now_ms: $shard.now_ms,
        }
    };
}

/// How often the loop wakes for timers when nothing else happens.
const TICK_MS: u64 = 50;
/// Frames taken from the inbox per turn, so a publish storm cannot starve
/// accepts and reads.
const INBOX_FRAMES_PER_TURN_MAX: usize = 1024;
/// Bytes read per `recv` for a request body, and the discard buffer's size.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// The first read of a request head; later reads double the buffer.
const HEAD_READ_FIRST_BYTES: usize = 1024;
/// Request bytes read from one connection per turn. A client that keeps its
/// socket full (endless trailers, a pipelined flood) is read again on the
/// next turn instead of holding the loop until its deadline.
const READ_BYTES_PER_TURN_MAX: usize = 4 * READ_CHUNK_BYTES;
/// Bytes a subscriber may send after its request in one readiness event
/// before it is closed as misbehaving (they are read and discarded).
const SUBSCRIBER_INPUT_BYTES_MAX: usize = 256 * 1024;
/// Connections per shard being answered `503` at once; above it, new
/// connections over the limit are closed without an answer.
const REJECTIONS_IN_FLIGHT_MAX: usize = 64;

/// State every shard shares: the hub, settings, process-wide limits, stats.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub stats: Vec<Arc<ShardStats>>,
    pub backend_name: &'static str,
    pub limits: http::Limits,
    /// Open connections in the process (limit `--connections-max`).
    pub connections_open: AtomicUsize,
    /// Open connections per client address (only with `--connections-per-ip-max`).
    pub per_ip: Mutex<HashMap<IpAddr, u32>>,
    pub draining: AtomicBool,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Counters kept in plain integers during a turn and added to the shared
/// atomics once per turn, so the per-delivery path has no atomic operation.
#[derive(Debug, Default)]
struct TurnCounters {
    frames_delivered: u64,
    bytes_written: u64,
    heartbeats: u64,
    outbox_bytes_delta: i64,
}

/// Frames every connection of the shard shares.
#[derive(Debug)]
struct StaticFrames {
    stream_head: Arc<Frame>,
    heartbeat: Arc<Frame>,
    retry: Arc<Frame>,
    continue_100: Arc<Frame>,
    limit: Arc<Frame>,
    draining: Arc<Frame>,
}

/// The write path: direct writes, outboxes and their limits. Borrowed out
/// of the shard so that it can be used while the topic index is borrowed.
struct Writer<'a, B: Backend> {
    backend: &'a mut B,
    counters: &'a mut TurnCounters,
    config: &'a Config,
    now_ms: u64,
}

/// What a flush left behind.
#[derive(Debug, PartialEq, Eq)]
enum Flushed {
    /// Nothing pending (the outbox is gone).
    Empty,
    /// Waiting for the socket to drain.
    Pending,
}

impl<B: Backend> Writer<'_, B> {
    /// Writes `frame` to `conn`: directly if it is caught up, else queued.
    fn write(
        &mut self,
        token: Token,
        conn: &mut Conn,
        frame: &Arc<Frame>,
    ) -> Result<(), CloseReason> {
        if conn.outbox.is_some() || conn.send_blocked {
            return self.enqueue(conn, frame);
        }
        let length = frame.len();
        match self
            .backend
            .send(conn.handle, token, &[IoSlice::new(&frame.bytes)])
        {
            Io::Done(written) => {
                self.wrote(conn, written);
                if written < length {
                    self.push(conn, frame.clone(), written);
                    return self.flush(token, conn).map(|_| ());
                }
                Ok(())
            }
            Io::Blocked => {
                conn.send_blocked = true;
                self.push(conn, frame.clone(), 0);
                Ok(())
            }
            Io::Eof => Err(CloseReason::PeerClosed),
            Io::Failed(error) => Err(close_reason_for_write(&error)),
        }
    }

    /// Queues `frame` behind what is pending, enforcing the outbox limits.
    fn enqueue(&mut self, conn: &mut Conn, frame: &Arc<Frame>) -> Result<(), CloseReason> {
        if conn.outbox_bytes() + frame.len() > self.config.outbox_bytes_hard {
            return Err(CloseReason::SlowConsumer);
        }
        self.push(conn, frame.clone(), 0);
        Ok(())
    }

    fn push(&mut self, conn: &mut Conn, frame: Arc<Frame>, offset: usize) {
        let now_ms = self.now_ms;
        let outbox = conn
            .outbox
            .get_or_insert_with(|| Box::new(Outbox::new(now_ms)));
        let before = outbox.bytes();
        outbox.push(frame, offset);
        self.counters.outbox_bytes_delta += (outbox.bytes() - before) as i64;
        self.track_soft_limit(conn);
    }

    fn track_soft_limit(&self, conn: &mut Conn) {
        let soft = self.config.outbox_bytes_soft;
        if let Some(outbox) = conn.outbox.as_mut() {
            if soft > 0 && outbox.bytes() > soft {
                if outbox.over_soft_since_ms == 0 {
                    outbox.over_soft_since_ms = self.now_ms.max(1);
                }
            } else {
                outbox.over_soft_since_ms = 0;
            }
        }
    }

    fn wrote(&mut self, conn: &mut Conn, written: usize) {
        self.counters.bytes_written += written as u64;
        conn.last_write_ms = self.now_ms;
    }

    /// Writes what the outbox holds until it is empty or the socket is full.
    fn flush(&mut self, token: Token, conn: &mut Conn) -> Result<Flushed, CloseReason> {
        loop {
            if conn.send_blocked {
                return Ok(Flushed::Pending);
            }
            let Some(outbox) = conn.outbox.as_mut() else {
                return Ok(Flushed::Empty);
            };
            if outbox.is_empty() {
                conn.outbox = None;
                return Ok(Flushed::Empty);
            }
            let result = {
                let mut iovecs = [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
                let count = outbox.gather(&mut iovecs);
                self.backend.send(conn.handle, token, &iovecs[..count])
            };
            match result {
                Io::Done(written) => {
                    outbox.advance(written);
                    outbox.progress_ms = self.now_ms;
                    self.counters.outbox_bytes_delta -= written as i64;
                    self.wrote(conn, written);
                    self.track_soft_limit(conn);
                }
                Io::Blocked => conn.send_blocked = true,
                Io::Eof => return Err(CloseReason::PeerClosed),
                Io::Failed(error) => return Err(close_reason_for_write(&error)),
            }
        }
    }
}

fn close_reason_for_write(error: &std::io::Error) -> CloseReason {
    match error.raw_os_error() {
        Some(libc::EPIPE) => CloseReason::PeerClosed,
        _ => CloseReason::from_error(error),
    }
}

/// One shard's event loop and everything it owns.
pub struct Shard<B: Backend> {
    index: usize,
    backend: B,
    shared: Arc<Shared>,
    stats: Arc<ShardStats>,
    started: Instant,
    now_ms: u64,
    /// Connection slots; `generations[i]` survives vacancy so a late event
    /// for a previous occupant is recognised.
    slots: Vec<Option<Conn>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    topics: TopicIndex,
    /// The last frame this shard fanned out: sequence number and id.
    last_seq: u64,
    last_id: EventId,
    frames: StaticFrames,
    counters: TurnCounters,
    events: Vec<Event>,
    to_close: Vec<u32>,
    /// Subscribers with frames queued by a batched pass, to flush after it.
    dirty: Vec<u32>,
    pass: Vec<Arc<Frame>>,
    /// Receives and discards what subscribers send after their request.
    discard: Box<[u8]>,
    sweep_cursor: usize,
    sweep_period_ms: u64,
    next_tick_ms: u64,
    rng: u64,
    /// More inbox frames are waiting than one turn takes.
    inbox_more: bool,
    /// Connections that used their read budget with bytes possibly left in
    /// the socket: read again next turn (edge-triggered readiness will not
    /// report them again).
    read_more: Vec<Token>,
    rejections_in_flight: usize,
    draining_since_ms: Option<u64>,
}

impl<B: Backend> Shard<B> {
    pub fn new(index: usize, backend: B, shared: Arc<Shared>) -> Shard<B> {
        let config = &shared.config;
        let retry = format!("retry: {}\n\n", config.retry_hint.as_millis());
        let limit = http::response(
            Status(503),
            "text/plain",
            b"connection limit reached\n",
            false,
            &[],
        );
        let frames = StaticFrames {
            stream_head: http::stream_head(),
            heartbeat: Frame::control(&b":\n"[..]),
            retry: Frame::control(retry.into_bytes()),
            continue_100: Frame::control(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]),
            limit,
            draining: http::response(Status(503), "text/plain", b"draining\n", false, &[]),
        };
        let timeouts = [
            config.heartbeat_interval,
            config.write_stall_timeout,
            config.handshake_timeout,
            config.body_timeout,
            config.http_idle_timeout,
            config.outbox_soft_duration,
            config.stream_lifetime_max,
        ];
        let shortest_ms = timeouts
            .iter()
            .filter(|d| !d.is_zero())
            .map(|d| d.as_millis() as u64)
            .min()
            .unwrap_or(1000);
        let first_id = shared.hub.first_id();
        Shard {
            index,
            backend,
            stats: shared.stats[index].clone(),
            started: Instant::now(),
            now_ms: 0,
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            topics: TopicIndex::default(),
            last_seq: 0,
            last_id: first_id.saturating_sub(1),
            frames,
            counters: TurnCounters::default(),
            events: Vec::with_capacity(1024),
            to_close: Vec::new(),
            dirty: Vec::new(),
            pass: Vec::with_capacity(INBOX_FRAMES_PER_TURN_MAX),
            discard: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            sweep_cursor: 0,
            sweep_period_ms: (shortest_ms / 4).clamp(TICK_MS, 1000),
            next_tick_ms: TICK_MS,
            rng: 0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) << 17) ^ first_id,
            inbox_more: false,
            read_more: Vec::new(),
            rejections_in_flight: 0,
            draining_since_ms: None,
            shared,
        }
    }

    /// Runs the loop until shutdown has closed every connection.
    pub fn run(mut self) -> std::io::Result<()> {
        while self.turn()? {}
        Ok(())
    }

    /// One turn of the loop (see the module documentation). Returns false
    /// once the shard has drained after shutdown. Public so that a scripted
    /// backend can drive a shard step by step (benches, simulations).
    pub fn turn(&mut self) -> std::io::Result<bool> {
        let read_more = std::mem::take(&mut self.read_more);
        let timeout = if self.inbox_more || !read_more.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_millis(self.next_tick_ms.saturating_sub(self.clock()))
        };
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let polled = self.backend.poll(&mut events, timeout);
        self.now_ms = self.clock();
        for &event in &events {
            self.handle(event);
        }
        self.events = events;
        for &token in &read_more {
            let slot = token.slot();
            let live = self.generations.get(slot as usize) == Some(&token.generation())
                && self.slots[slot as usize]
                    .as_ref()
                    .is_some_and(|c| c.closing.is_none());
            if live {
                self.read_request(slot);
            }
        }
        polled?;
        self.drain_inbox();
        if self.now_ms >= self.next_tick_ms {
            self.tick();
            self.next_tick_ms = self.now_ms + TICK_MS;
        }
        self.reap();
        self.publish_counters();
        let drained = self.draining_since_ms.is_some() && self.slots.iter().all(Option::is_none);
        Ok(!drained)
    }

    /// The backend (benches and simulations inspect a scripted one).
    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Connections in use (occupied slots).
    pub fn connections(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn clock(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn token(&self, slot: u32) -> Token {
        Token::new(slot, self.generations[slot as usize])
    }

    fn conn(&mut self, slot: u32) -> &mut Conn {
        self.slots[slot as usize].as_mut().expect("occupied slot")
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Accepted { handle, peer } => self.accept(handle, peer.ip()),
            Event::Ready {
                token,
                readable,
                writable,
                hangup,
                error,
            } => {
                let slot = token.slot();
                let live = self.generations.get(slot as usize) == Some(&token.generation())
                    && self.slots[slot as usize]
                        .as_ref()
                        .is_some_and(|c| c.closing.is_none());
                if live {
                    self.ready(slot, readable, writable, hangup, error);
                }
            }
            Event::Closed { token } => {
                let slot = token.slot();
                if self.generations.get(slot as usize) == Some(&token.generation()) {
                    self.release(slot);
                }
            }
            Event::Wake => {
                let feed = self.shared.hub.feed(self.index);
                feed.waker.disarm();
                feed.waker.clear();
            }
        }
    }

    // ---- accept -----------------------------------------------------------

    fn accept(&mut self, handle: Handle, peer: IpAddr) {
        metrics::add(&self.stats.accepted, 1);
        let shared = &self.shared;
        let config = &shared.config;
        // While draining, new connections are refused like those over a
        // limit, but answered `503 draining` and counted as `shutdown`.
        let draining = shared.is_draining();
        let mut over_limit = draining;
        if !over_limit {
            let open = shared.connections_open.fetch_add(1, Ordering::AcqRel);
            if open >= config.connections_max {
                shared.connections_open.fetch_sub(1, Ordering::AcqRel);
                over_limit = true;
            } else if config.connections_per_ip_max > 0 {
                let mut per_ip = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
                let count = per_ip.entry(peer).or_insert(0);
                if *count as usize >= config.connections_per_ip_max {
                    if *count == 0 {
                        per_ip.remove(&peer);
                    }
                    drop(per_ip);
                    shared.connections_open.fetch_sub(1, Ordering::AcqRel);
                    over_limit = true;
                } else {
                    *count += 1;
                }
            }
        }
        if over_limit && self.rejections_in_flight >= REJECTIONS_IN_FLIGHT_MAX {
            self.backend.discard(handle);
            let reason = if draining {
                CloseReason::Shutdown
            } else {
                CloseReason::Limit
            };
            metrics::add(&self.stats.closed[reason.index()], 1);
            return;
        }
        let deadline_ms = self.now_ms + config.handshake_timeout.as_millis() as u64;
        let slot = self.allocate(Conn::new(handle, peer, self.now_ms, deadline_ms));
        if let Err(error) = self.backend.register(handle, self.token(slot)) {
            log::warn!("cannot register a connection from {peer}: {error}");
            self.backend.discard(handle);
            if !over_limit {
                self.forget_open(peer);
            }
            self.slots[slot as usize] = None;
            self.free_slot(slot);
            return;
        }
        if over_limit {
            self.rejections_in_flight += 1;
            let conn = self.conn(slot);
            conn.rejected = true;
            conn.inbound = None;
            let (frame, reason) = if draining {
                (self.frames.draining.clone(), CloseReason::Shutdown)
            } else {
                (self.frames.limit.clone(), CloseReason::Limit)
            };
            self.respond_and_close(slot, &frame, reason);
        } else {
            metrics::add_signed(&self.stats.connections_open, 1);
        }
    }

    fn allocate(&mut self, conn: Conn) -> u32 {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(conn);
                slot
            }
            None => {
                let slot = self.slots.len() as u32;
                assert!(slot <= Token::SLOT_MAX, "slot space exhausted");
                self.slots.push(Some(conn));
                self.generations.push(0);
                slot
            }
        }
    }

    fn free_slot(&mut self, slot: u32) {
        debug_assert!(self.slots[slot as usize].is_none());
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        self.free.push(slot);
    }

    /// Undoes the process-wide and per-address counts of an accepted connection.
    fn forget_open(&self, peer: IpAddr) {
        self.shared.connections_open.fetch_sub(1, Ordering::AcqRel);
        if self.shared.config.connections_per_ip_max > 0 {
            let mut per_ip = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = per_ip.get_mut(&peer) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&peer);
                }
            }
        }
    }

    // ---- readiness --------------------------------------------------------

    fn ready(&mut self, slot: u32, readable: bool, writable: bool, hangup: bool, error: bool) {
        if error {
            let handle = self.conn(slot).handle;
            let reason = self
                .backend
                .take_error(handle)
                .map_or(CloseReason::Reset, |e| CloseReason::from_error(&e));
            self.mark_close(slot, reason);
            return;
        }
        if writable && self.conn(slot).send_blocked {
            self.conn(slot).send_blocked = false;
            self.flush(slot);
            if self.conn(slot).closing.is_some() {
                return;
            }
        }
        match self.conn(slot).phase {
            Phase::Stream => {
                if hangup {
                    // An SSE client never half-closes while listening: FIN is the end.
                    self.mark_close(slot, CloseReason::PeerClosed);
                } else if readable {
                    self.discard_input(slot);
                }
            }
            Phase::Head | Phase::Body => {
                if readable || hangup {
                    self.read_request(slot);
                }
            }
        }
    }

    /// Reads and drops what a subscriber sends after its request.
    fn discard_input(&mut self, slot: u32) {
        let token = self.token(slot);
        let handle = self.conn(slot).handle;
        let mut discarded = 0;
        loop {
            match self.backend.recv(handle, token, &mut self.discard) {
                Io::Done(n) => {
                    discarded += n;
                    if discarded > SUBSCRIBER_INPUT_BYTES_MAX {
                        self.mark_close(slot, CloseReason::BadRequest);
                        return;
                    }
                }
                Io::Eof => return self.mark_close(slot, CloseReason::PeerClosed),
                Io::Blocked => return,
                Io::Failed(error) => return self.mark_close(slot, CloseReason::from_error(&error)),
            }
        }
    }

    /// Reads request bytes until the socket is empty, handling each request.
    fn read_request(&mut self, slot: u32) {
        let token = self.token(slot);
        let head_max = self.shared.config.request_head_bytes_max;
        let mut read_bytes = 0;
        loop {
            self.process_input(slot);
            let conn = self.slots[slot as usize].as_mut().expect("occupied slot");
            if conn.closing.is_some()
                || conn.phase == Phase::Stream
                || conn.close_after_flush.is_some()
            {
                // A stream discards further input; a closing connection reads no more.
                if conn.phase == Phase::Stream && conn.closing.is_none() {
                    self.discard_input(slot);
                }
                return;
            }
            let Some(inbound) = conn.inbound.as_mut() else {
                return;
            };
            if read_bytes >= READ_BYTES_PER_TURN_MAX {
                self.read_more.push(token);
                return;
            }
            let filled = inbound.buf.len();
            // Head bytes beyond the limit are never read: the parse answers 431 first.
            let room = if conn.phase == Phase::Head {
                (head_max + 1).saturating_sub(filled)
            } else {
                READ_CHUNK_BYTES
            };
            // A head is read into a buffer that starts at 1 KiB and doubles:
            // most heads are a few hundred bytes, and a burst of handshakes
            // should not hold (or zero) 16 KiB per connection.
            let chunk = if conn.phase == Phase::Head {
                room.min(filled.max(HEAD_READ_FIRST_BYTES))
            } else {
                room.min(READ_CHUNK_BYTES)
            };
            if chunk == 0 {
                return;
            }
            inbound.buf.resize(filled + chunk, 0);
            let result = self
                .backend
                .recv(conn.handle, token, &mut inbound.buf[filled..]);
            let received = if let Io::Done(n) = result { n } else { 0 };
            inbound.buf.truncate(filled + received);
            read_bytes += received;
            match result {
                Io::Done(_) => {}
                Io::Blocked => return,
                Io::Eof => {
                    // Answer what was fully read, then close: a subscriber's
                    // stream ends at once (a half-close is the end), a
                    // request's answer is flushed first.
                    conn.peer_done = true;
                    self.process_input(slot);
                    let conn = self.conn(slot);
                    if conn.closing.is_some() || conn.close_after_flush.is_some() {
                        return;
                    }
                    if conn.phase == Phase::Stream || conn.outbox.is_none() {
                        self.mark_close(slot, CloseReason::PeerClosed);
                    } else {
                        conn.close_after_flush = Some(CloseReason::PeerClosed);
                    }
                    return;
                }
                Io::Failed(error) => return self.mark_close(slot, CloseReason::from_error(&error)),
            }
        }
    }

    /// Handles every complete request (or body) in the connection's buffer.
    fn process_input(&mut self, slot: u32) {
        loop {
            let limits = &self.shared.limits;
            let conn = self.slots[slot as usize].as_mut().expect("occupied slot");
            if conn.closing.is_some() || conn.close_after_flush.is_some() {
                return;
            }
            let Some(inbound) = conn.inbound.as_mut() else {
                return;
            };
            match conn.phase {
                Phase::Stream => return,
                Phase::Head => {
                    if inbound.buf.is_empty() {
                        return;
                    }
                    match http::parse_head(&inbound.buf, limits) {
                        Ok(None) => return,
                        Err(rejection) => return self.reject(slot, &rejection),
                        Ok(Some(request)) => {
                            inbound.buf.drain(..request.head_len);
                            self.dispatch(slot, request);
                        }
                    }
                }
                Phase::Body => {
                    let body_max = limits.body_bytes_max;
                    let reader = inbound
                        .body_reader
                        .as_mut()
                        .expect("body phase has a reader");
                    match reader.feed(&inbound.buf, &mut inbound.body, body_max) {
                        Err(rejection) => return self.reject(slot, &rejection),
                        Ok((used, done)) => {
                            inbound.buf.drain(..used);
                            if !done {
                                return;
                            }
                            let request = inbound.request.take().expect("body phase has a request");
                            let body = std::mem::take(&mut inbound.body);
                            inbound.body_reader = None;
                            self.publish(slot, request, body);
                        }
                    }
                }
            }
        }
    }

    fn dispatch(&mut self, slot: u32, request: Request) {
        let config = &self.shared.config;
        match request.route {
            Route::Events {
                ref topics,
                ref last_event_id,
            } => {
                let (topics, last_event_id) = (topics.clone(), last_event_id.clone());
                self.start_stream(slot, topics, last_event_id);
            }
            Route::Publish { .. } => {
                let reader = match request.body {
                    BodyKind::Length(0) => None,
                    BodyKind::Length(remaining) => Some(BodyReader::Length { remaining }),
                    BodyKind::Chunked => Some(BodyReader::Chunked(ChunkedDecoder::default())),
                };
                match reader {
                    None => self.publish(slot, request, Vec::new()),
                    Some(reader) => {
                        let deadline_ms = self.now_ms + config.body_timeout.as_millis() as u64;
                        let expect_continue = request.expect_continue;
                        let conn = self.conn(slot);
                        conn.phase = Phase::Body;
                        conn.deadline_ms = deadline_ms;
                        let inbound = conn.inbound.as_mut().expect("reading a request");
                        inbound.request = Some(request);
                        inbound.body_reader = Some(reader);
                        if expect_continue {
                            let frame = self.frames.continue_100.clone();
                            self.send(slot, &frame);
                        }
                    }
                }
            }
            Route::Metrics => {
                let text = metrics::render(
                    self.shared.backend_name,
                    &self.shared.stats,
                    &self.shared.hub,
                    self.shared.is_draining(),
                );
                self.answer(
                    slot,
                    &request,
                    Status(200),
                    "text/plain; version=0.0.4",
                    text.as_bytes(),
                );
            }
            Route::Healthz => {
                if self.shared.is_draining() {
                    self.answer(slot, &request, Status(503), "text/plain", b"draining\n");
                } else {
                    self.answer(slot, &request, Status(200), "text/plain", b"ok\n");
                }
            }
        }
    }

    fn publish(&mut self, slot: u32, request: Request, body: Vec<u8>) {
        let Route::Publish { topics, event_type } = &request.route else {
            unreachable!("publish route")
        };
        let Ok(data) = std::str::from_utf8(&body) else {
            return self.reject(slot, &Rejection::new(400, "data is not UTF-8"));
        };
        let id = self.shared.hub.publish(
            topics.clone().into_boxed_slice(),
            event_type.as_deref(),
            data,
        );
        self.conn(slot).phase = Phase::Head;
        self.answer(
            slot,
            &request,
            Status(200),
            "text/plain",
            format!("{id}\n").as_bytes(),
        );
    }

    /// Answers a non-stream request and keeps the connection (keep-alive) or closes it.
    fn answer(
        &mut self,
        slot: u32,
        request: &Request,
        status: Status,
        content_type: &str,
        body: &[u8],
    ) {
        let keep_alive =
            request.keep_alive && !self.conn(slot).peer_done && !self.shared.is_draining();
        let frame = http::response(status, content_type, body, keep_alive, &[]);
        if keep_alive {
            let deadline_ms = self.now_ms + self.shared.config.http_idle_timeout.as_millis() as u64;
            let conn = self.conn(slot);
            conn.phase = Phase::Head;
            conn.deadline_ms = deadline_ms;
            self.send(slot, &frame);
        } else {
            self.respond_and_close(slot, &frame, CloseReason::Completed);
        }
    }

    fn reject(&mut self, slot: u32, rejection: &Rejection) {
        let message = format!("{}\n", rejection.message);
        let allow: Vec<(&str, &str)> = rejection
            .allow
            .map(|methods| ("Allow", methods))
            .into_iter()
            .collect();
        let frame = http::response(
            Status(rejection.status),
            "text/plain",
            message.as_bytes(),
            false,
            &allow,
        );
        log::debug!(
            "{} answered {}: {}",
            self.conn(slot).peer,
            rejection.status,
            rejection.message
        );
        self.respond_and_close(slot, &frame, CloseReason::BadRequest);
    }

    /// Writes a last frame, then closes once it is flushed — or, if the peer
    /// does not take it, when the flush deadline (the handshake timeout) passes.
    fn respond_and_close(&mut self, slot: u32, frame: &Arc<Frame>, reason: CloseReason) {
        let deadline_ms = self.now_ms + self.shared.config.handshake_timeout.as_millis() as u64;
        let conn = self.conn(slot);
        conn.close_after_flush = Some(reason);
        conn.deadline_ms = deadline_ms;
        self.send(slot, frame);
        self.close_if_flushed(slot);
    }

    fn close_if_flushed(&mut self, slot: u32) {
        let conn = self.conn(slot);
        if let (Some(reason), None, None) = (conn.close_after_flush, &conn.outbox, conn.closing) {
            self.mark_close(slot, reason);
        }
    }

    // ---- streams ----------------------------------------------------------

    fn start_stream(&mut self, slot: u32, topics: Vec<Topic>, last_event_id: Option<String>) {
        let config = &self.shared.config;
        let lifetime_ms = config.stream_lifetime_max.as_millis() as u64;
        let deadline_ms = if lifetime_ms == 0 {
            u64::MAX
        } else {
            let jitter_ms = lifetime_ms * config.stream_lifetime_jitter_percent as u64 / 100;
            let offset = if jitter_ms == 0 {
                0
            } else {
                self.random() % (2 * jitter_ms + 1)
            };
            self.now_ms + lifetime_ms - jitter_ms + offset
        };
        let last_id = self.last_id;
        {
            let conn = self.conn(slot);
            conn.phase = Phase::Stream;
            conn.deadline_ms = deadline_ms;
            conn.inbound = None;
            conn.last_id = last_id;
        }
        metrics::add_signed(&self.stats.subscribers_open, 1);
        for topic in &topics {
            let subscription = self.topics.join(topic, slot);
            self.conn(slot).subscriptions.push(subscription);
        }
        let head = self.frames.stream_head.clone();
        self.send(slot, &head);
        if let Some(text) = last_event_id {
            self.resume(slot, &text);
        }
    }

    /// Positions a resuming subscriber in history and starts its replay.
    ///
    /// The position and the first page are taken under one hold of the
    /// history, so a publish cannot evict the events between them: the first
    /// page always starts exactly where the position (or the gap signal) says.
    fn resume(&mut self, slot: u32, text: &str) {
        metrics::add(&self.stats.replays, 1);
        let topics = self.replay_topics(slot);
        let budget = self.replay_budget();
        let (cursor, signal, page) = {
            let history = self.shared.hub.history();
            let (cursor, signal) = match text.trim().parse::<EventId>() {
                Ok(id) => match history.resume(id) {
                    Resume::Exact => (id, None),
                    Resume::TooOld => (history.before_oldest(), Some("too_old")),
                    Resume::Unknown => (history.before_oldest(), Some("unknown")),
                },
                Err(_) => (history.before_oldest(), Some("unknown")),
            };
            let page = history.page(cursor, self.last_id, &topics, budget);
            (cursor, signal, page)
        };
        if let Some(reason) = signal {
            let sent: String = text
                .chars()
                .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
                .collect();
            self.send_gap(slot, reason, &sent);
        }
        let conn = self.conn(slot);
        conn.replay_cursor = Some(cursor);
        conn.last_id = cursor;
        if self.deliver_page(slot, page) {
            self.pump_replay(slot);
        }
    }

    /// Tells a subscriber that events after `last_event_id` may be missing
    /// (see "Gap signal" in the README). It carries no `id:` line.
    fn send_gap(&mut self, slot: u32, reason: &str, last_event_id: &str) {
        metrics::add(&self.stats.replays_too_old, 1);
        let frame = Frame::control(
            format!(
                "event: plenum-gap\ndata: {{\"reason\":\"{reason}\",\"last_event_id\":\"{last_event_id}\"}}\n\n"
            )
            .into_bytes(),
        );
        self.send(slot, &frame);
    }

    fn replay_topics(&self, slot: u32) -> Vec<Topic> {
        let conn = self.slots[slot as usize].as_ref().expect("occupied slot");
        conn.subscriptions
            .iter()
            .map(|s| self.topics.name(s.topic).clone())
            .collect()
    }

    /// Bytes of history per replay page: small enough that a page on top of
    /// an empty outbox never trips the hard limit.
    fn replay_budget(&self) -> usize {
        (self.shared.config.outbox_bytes_hard / 2).clamp(1, 256 * 1024)
    }

    /// Moves the next page of history into a replaying subscriber's outbox.
    /// Pages are bounded so that replay never trips the outbox limits; the
    /// next page follows when the outbox has drained.
    ///
    /// If history evicts events this subscriber has not been sent yet (it
    /// drains more slowly than events are published and evicted), it gets a
    /// gap signal naming the last event it was sent, and the replay goes on
    /// from the oldest event still held: the same answer a reconnect would
    /// get, without the reconnect.
    fn pump_replay(&mut self, slot: u32) {
        loop {
            let conn = self.slots[slot as usize].as_ref().expect("occupied slot");
            let Some(cursor) = conn.replay_cursor else {
                return;
            };
            if conn.closing.is_some() || conn.outbox.is_some() {
                return;
            }
            let last_sent = conn.last_id;
            let topics = self.replay_topics(slot);
            let budget = self.replay_budget();
            let (overtaken, page) = {
                let history = self.shared.hub.history();
                let oldest = history.before_oldest();
                let page = history.page(cursor.max(oldest), self.last_id, &topics, budget);
                (cursor < oldest, page)
            };
            if overtaken {
                metrics::add(&self.stats.replays_overtaken, 1);
                self.send_gap(slot, "too_old", &last_sent.to_string());
            }
            if !self.deliver_page(slot, page) {
                return;
            }
        }
    }

    /// Sends one page of replay and moves the subscriber's cursor past it.
    /// Returns whether more pages follow.
    fn deliver_page(&mut self, slot: u32, page: Page) -> bool {
        for frame in &page.frames {
            self.counters.frames_delivered += 1;
            self.send(slot, frame);
        }
        let shard_last_id = self.last_id;
        let conn = self.conn(slot);
        if conn.closing.is_some() {
            return false;
        }
        if let Some(last) = page.frames.last() {
            conn.last_id = last.id;
        }
        if page.complete {
            conn.replay_cursor = None;
            conn.last_id = conn.last_id.max(shard_last_id);
            return false;
        }
        conn.replay_cursor = Some(page.scanned_through);
        true
    }

    /// Ends a stream: the `retry:` hint, then close once flushed.
    fn end_stream(&mut self, slot: u32, reason: CloseReason) {
        if self.conn(slot).close_after_flush.is_some() {
            return;
        }
        let frame = self.frames.retry.clone();
        self.conn(slot).replay_cursor = None;
        self.respond_and_close(slot, &frame, reason);
    }

    // ---- writing ----------------------------------------------------------

    /// Writes a frame to a connection, marking it for closing on failure.
    fn send(&mut self, slot: u32, frame: &Arc<Frame>) {
        let token = self.token(slot);
        let conn = self.slots[slot as usize].as_mut().expect("occupied slot");
        if conn.closing.is_some() {
            return;
        }
        if let Err(reason) = writer!(self).write(token, conn, frame) {
            self.mark_close(slot, reason);
        }
    }

    fn flush(&mut self, slot: u32) {
        let token = self.token(slot);
        let conn = self.slots[slot as usize].as_mut().expect("occupied slot");
        match writer!(self).flush(token, conn) {
            Err(reason) => self.mark_close(slot, reason),
            Ok(Flushed::Pending) => {}
            Ok(Flushed::Empty) => {
                self.pump_replay(slot);
                self.close_if_flushed(slot);
            }
        }
    }

    // ---- fan-out ----------------------------------------------------------

    /// Takes frames from the inbox and writes each to its subscribers.
    fn drain_inbox(&mut self) {
        let hub = self.shared.hub.clone();
        let feed = hub.feed(self.index);
        let missed = feed.missed.swap(false, Ordering::AcqRel);
        self.pass.clear();
        while self.pass.len() < INBOX_FRAMES_PER_TURN_MAX {
            match feed.inbox.pop() {
                Some(frame) => self.pass.push(frame),
                None => break,
            }
        }
        self.inbox_more = self.pass.len() == INBOX_FRAMES_PER_TURN_MAX;
        if self.pass.is_empty() && !missed {
            return;
        }
        let pass = std::mem::take(&mut self.pass);
        // One frame: written straight to each caught-up subscriber. Several
        // (the shard is behind, or recovering): queued per subscriber and
        // flushed with one vectored write each, so a shard that falls behind
        // pays one syscall per subscriber per pass, not per frame.
        let batched = missed || pass.len() > 1;
        if missed {
            self.recover(None);
        }
        for frame in &pass {
            if frame.seq <= self.last_seq {
                continue; // already recovered from history
            }
            if frame.seq > self.last_seq + 1 {
                self.recover(Some(frame.seq));
            }
            self.fan_out(frame, batched);
        }
        self.flush_dirty();
        let now = Instant::now();
        {
            let mut latency = self
                .stats
                .latency_us
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for frame in &pass {
                let micros = now.duration_since(frame.published_at).as_micros() as u64;
                let _ = latency.record(micros.max(1));
            }
        }
        self.pass = pass;
        self.pass.clear();
    }

    /// Fans out, from history, the frames after `last_seq` (and before
    /// `until_seq`) that the inbox could not hold. If history no longer has
    /// them, this shard's subscribers missed events: they are closed, and
    /// replay (or the gap signal) on reconnect tells them what they missed.
    fn recover(&mut self, until_seq: Option<u64>) {
        let recovered = self.shared.hub.history().after_seq(self.last_seq);
        match recovered {
            Some(frames) => {
                for frame in frames
                    .iter()
                    .filter(|f| until_seq.is_none_or(|until| f.seq < until))
                {
                    self.fan_out(frame, true);
                }
            }
            None => {
                log::warn!(
                    "shard {} fell behind the history (inbox full for too long): closing its subscribers",
                    self.index
                );
                metrics::add(&self.stats.resyncs_lost, 1);
                for slot in 0..self.slots.len() as u32 {
                    if self.slots[slot as usize]
                        .as_ref()
                        .is_some_and(|c| c.phase == Phase::Stream)
                    {
                        self.mark_close(slot, CloseReason::SlowConsumer);
                    }
                }
                let history = self.shared.hub.history();
                let newest_seq = history.newest_seq();
                let newest_id = history.newest();
                drop(history);
                let skip_to = until_seq.map_or(newest_seq, |until| until - 1);
                if skip_to > self.last_seq {
                    self.last_seq = skip_to;
                    if until_seq.is_none() {
                        self.last_id = newest_id;
                    }
                }
            }
        }
    }

    /// Writes one frame to every live subscriber of its topics on this shard,
    /// or with `batched`, queues it and lists the subscriber for
    /// [`Self::flush_dirty`].
    fn fan_out(&mut self, frame: &Arc<Frame>, batched: bool) {
        debug_assert_eq!(frame.seq, self.last_seq + 1);
        self.last_seq = frame.seq;
        self.last_id = frame.id;
        let Shard {
            topics,
            slots,
            generations,
            backend,
            counters,
            shared,
            now_ms,
            to_close,
            dirty,
            ..
        } = self;
        let mut writer = Writer {
            backend,
            counters,
            config: &shared.config,
            now_ms: *now_ms,
        };
        for topic in frame.topics.iter() {
            let Some(subscribers) = topics.subscribers(topic) else {
                continue;
            };
            for &slot in subscribers {
                let conn = slots[slot as usize]
                    .as_mut()
                    .expect("subscribed slot is occupied");
                // Skips replaying and closing streams, and a second topic of
                // an event already written to this subscriber.
                if !conn.takes_live_frames() || conn.last_id >= frame.id {
                    continue;
                }
                conn.last_id = frame.id;
                writer.counters.frames_delivered += 1;
                let token = Token::new(slot, generations[slot as usize]);
                let written = if batched {
                    if !conn.dirty {
                        conn.dirty = true;
                        dirty.push(slot);
                    }
                    writer.enqueue(conn, frame)
                } else {
                    writer.write(token, conn, frame)
                };
                if let Err(reason) = written {
                    // Marked only: reaped after the pass.
                    conn.closing = Some(reason);
                    to_close.push(slot);
                }
            }
        }
    }

    /// Flushes every subscriber a batched pass queued frames for.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            let conn = self.slots[slot as usize]
                .as_mut()
                .expect("dirty slot is occupied");
            conn.dirty = false;
            if conn.closing.is_none() {
                self.flush(slot);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    // ---- timers -----------------------------------------------------------

    fn tick(&mut self) {
        if self.shared.is_draining() {
            self.drain_connections();
        }
        let count = self.slots.len();
        if count == 0 {
            return;
        }
        // Every connection is visited once per sweep period, a slice per tick.
        let per_tick = (count as u64 * TICK_MS)
            .div_ceil(self.sweep_period_ms)
            .max(1) as usize;
        for _ in 0..per_tick.min(count) {
            if self.sweep_cursor >= self.slots.len() {
                self.sweep_cursor = 0;
            }
            let slot = self.sweep_cursor as u32;
            self.sweep_cursor += 1;
            if self.slots[slot as usize]
                .as_ref()
                .is_some_and(|c| c.closing.is_none())
            {
                self.check_deadlines(slot);
            }
        }
    }

    fn check_deadlines(&mut self, slot: u32) {
        let now_ms = self.now_ms;
        let config = &self.shared.config;
        let stall_ms = config.write_stall_timeout.as_millis() as u64;
        let soft_ms = config.outbox_soft_duration.as_millis() as u64;
        let heartbeat_ms = config.heartbeat_interval.as_millis() as u64;
        let conn = self.slots[slot as usize].as_ref().expect("occupied slot");
        if let Some(outbox) = &conn.outbox {
            if stall_ms > 0 && now_ms.saturating_sub(outbox.progress_ms) >= stall_ms {
                return self.mark_close(slot, CloseReason::WriteStall);
            }
            if outbox.over_soft_since_ms != 0
                && now_ms.saturating_sub(outbox.over_soft_since_ms) >= soft_ms
            {
                return self.mark_close(slot, CloseReason::SlowConsumer);
            }
        }
        match conn.phase {
            Phase::Head | Phase::Body => {
                if now_ms >= conn.deadline_ms {
                    let reason = conn
                        .close_after_flush
                        .unwrap_or(CloseReason::HandshakeTimeout);
                    self.mark_close(slot, reason);
                }
            }
            Phase::Stream => {
                if now_ms >= conn.deadline_ms {
                    // The first deadline ends the stream; the second (the flush
                    // deadline `end_stream` set) closes it if the end was not taken.
                    match conn.close_after_flush {
                        Some(reason) => self.mark_close(slot, reason),
                        None => self.end_stream(slot, CloseReason::Lifetime),
                    }
                } else if heartbeat_ms > 0
                    && conn.outbox.is_none()
                    && now_ms.saturating_sub(conn.last_write_ms) >= heartbeat_ms
                {
                    self.counters.heartbeats += 1;
                    let frame = self.frames.heartbeat.clone();
                    self.send(slot, &frame);
                }
            }
        }
    }

    /// Shutdown: stop accepting, end streams with a retry hint, close idle
    /// connections; after most of `--shutdown-timeout`, close the rest.
    fn drain_connections(&mut self) {
        let first = self.draining_since_ms.is_none();
        let since = *self.draining_since_ms.get_or_insert(self.now_ms);
        let force_ms = self.shared.config.shutdown_timeout.as_millis() as u64 * 8 / 10;
        let force = self.now_ms.saturating_sub(since) >= force_ms;
        if first {
            self.backend.stop_accepting();
        }
        if !first && !force {
            return;
        }
        for slot in 0..self.slots.len() as u32 {
            let Some(conn) = self.slots[slot as usize].as_ref() else {
                continue;
            };
            if conn.closing.is_some() {
                continue;
            }
            if force {
                self.mark_close(slot, CloseReason::Shutdown);
                continue;
            }
            match conn.phase {
                Phase::Stream => self.end_stream(slot, CloseReason::Shutdown),
                Phase::Head
                    if conn.inbound.as_ref().is_none_or(|i| i.buf.is_empty())
                        && conn.outbox.is_none() =>
                {
                    self.mark_close(slot, CloseReason::Shutdown)
                }
                _ => {}
            }
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64: jitter only, not security.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    // ---- teardown ---------------------------------------------------------

    fn mark_close(&mut self, slot: u32, reason: CloseReason) {
        let conn = self.conn(slot);
        if conn.closing.is_none() {
            conn.closing = Some(reason);
            self.to_close.push(slot);
        }
    }

    /// Closes every connection marked during the turn, in named stages:
    /// leave the topic index, settle the counts, close the socket, and free
    /// the slot (now, or when the backend reports the close complete).
    fn reap(&mut self) {
        while let Some(slot) = self.to_close.pop() {
            let token = self.token(slot);
            let conn = self.slots[slot as usize]
                .as_mut()
                .expect("marked slot is occupied");
            let reason = conn.closing.expect("marked");
            // Stage 1: leave the topic index.
            let subscriptions = std::mem::take(&mut conn.subscriptions);
            for subscription in subscriptions {
                if let Some(moved) = self.topics.leave(subscription) {
                    let moved_conn = self.slots[moved as usize]
                        .as_mut()
                        .expect("subscribed slot is occupied");
                    for own in moved_conn.subscriptions.iter_mut() {
                        if own.topic == subscription.topic {
                            own.position = subscription.position;
                        }
                    }
                }
            }
            // Stage 2: counts and the log line.
            let conn = self.slots[slot as usize]
                .as_mut()
                .expect("marked slot is occupied");
            let (peer, phase, rejected, handle) =
                (conn.peer, conn.phase, conn.rejected, conn.handle);
            self.counters.outbox_bytes_delta -= conn.outbox_bytes() as i64;
            if phase == Phase::Stream {
                metrics::add_signed(&self.stats.subscribers_open, -1);
            }
            if rejected {
                self.rejections_in_flight -= 1;
            } else {
                metrics::add_signed(&self.stats.connections_open, -1);
                self.forget_open(peer);
            }
            metrics::add(&self.stats.closed[reason.index()], 1);
            match reason {
                CloseReason::PeerClosed
                | CloseReason::Completed
                | CloseReason::Lifetime
                | CloseReason::Shutdown => {
                    log::debug!("close {peer}: {}", reason.name())
                }
                _ => log::info!("close {peer}: {}", reason.name()),
            }
            // Stage 3: the socket. Stage 4: the slot, once the kernel is done with it.
            if self.backend.close(handle, token, reason.resets()) {
                self.release(slot);
            }
        }
    }

    /// Frees a closed connection's slot and buffers.
    fn release(&mut self, slot: u32) {
        let conn = self.slots[slot as usize].take();
        debug_assert!(conn.as_ref().is_some_and(|c| c.closing.is_some()));
        drop(conn);
        self.free_slot(slot);
    }

    fn publish_counters(&mut self) {
        // A relaxed store per turn: the topic index changes only on this thread.
        self.stats
            .topics
            .store(self.topics.len() as i64, Ordering::Relaxed);
        let counters = std::mem::take(&mut self.counters);
        if counters.frames_delivered > 0 {
            metrics::add(&self.stats.frames_delivered, counters.frames_delivered);
        }
        if counters.bytes_written > 0 {
            metrics::add(&self.stats.bytes_written, counters.bytes_written);
        }
        if counters.heartbeats > 0 {
            metrics::add(&self.stats.heartbeats, counters.heartbeats);
        }
        if counters.outbox_bytes_delta != 0 {
            metrics::add_signed(&self.stats.outbox_bytes, counters.outbox_bytes_delta);
        }
    }
}
