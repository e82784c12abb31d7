//! Connections: the state one socket is in, and how it ends.
//!
//! A connection's life, in order:
//!
//! 1. **Accept.** The backend reports it; the shard checks the process and
//!    per-address limits (over them: `503`, close as `limit`) and gives it a
//!    slot and a [`Token`](crate::backend::Token).
//! 2. **Read the head** ([`Phase::Head`]) under the handshake deadline,
//!    into a request buffer bounded by `--request-head-bytes-max`.
//! 3. **Route.** `/events` becomes a [`Phase::Stream`]: the request buffer
//!    is freed, the stream head is written, the connection joins its topics
//!    and replays history if it resumes. `/publish` reads its body
//!    ([`Phase::Body`]) under the body deadline, then publishes and answers;
//!    `/metrics` and `/healthz` answer at once. Non-stream connections go
//!    back to [`Phase::Head`] (keep-alive, idle deadline) or close.
//! 4. **Stream.** Frames are written straight to the socket; only a write
//!    that would block gives the connection an [`Outbox`]. Heartbeats,
//!    stall and soft-limit checks come from the shard's timer sweep.
//! 5. **Terminate.** Every end has a [`CloseReason`]. Inside a fan-out pass
//!    a connection is only marked; the shard reaps marked connections at a
//!    safe point (leave the topic index, close the socket, free the slot).

mod outbox;

use std::net::IpAddr;

use smallvec::SmallVec;

pub use outbox::{Outbox, IOVECS_PER_WRITE_MAX};

use crate::backend::Handle;
use crate::http::{BodyReader, Request};
use crate::hub::EventId;

/// Why a connection ended. The same words in code, metrics, logs and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent FIN (including a subscriber's half-close).
    PeerClosed,
    /// The peer sent RST, or another socket error.
    Reset,
    /// Keepalive or `TCP_USER_TIMEOUT` expired (`ETIMEDOUT`).
    TimedOut,
    /// Bytes pending without progress for `--write-stall-timeout`.
    WriteStall,
    /// Outbox over the hard limit, or over the soft limit for too long, or
    /// the shard fell behind history.
    SlowConsumer,
    /// `--stream-lifetime-max` reached.
    Lifetime,
    /// Request head, body or next keep-alive request not complete in time.
    HandshakeTimeout,
    /// The request was answered with a 4xx and closed.
    BadRequest,
    /// Connection limit or per-address limit.
    Limit,
    /// Server shutdown.
    Shutdown,
    /// A non-stream request was answered and the client asked to close.
    Completed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
        CloseReason::PeerClosed,
        CloseReason::Reset,
        CloseReason::TimedOut,
        CloseReason::WriteStall,
        CloseReason::SlowConsumer,
        CloseReason::Lifetime,
        CloseReason::HandshakeTimeout,
        CloseReason::BadRequest,
        CloseReason::Limit,
        CloseReason::Shutdown,
        CloseReason::Completed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Reset => "reset",
            CloseReason::TimedOut => "timed_out",
            CloseReason::WriteStall => "write_stall",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Lifetime => "lifetime",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::BadRequest => "bad_request",
            CloseReason::Limit => "limit",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Completed => "completed",
        }
    }

    /// Index into per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Closes that abort with `SO_LINGER 0`, so the unsent bytes of a peer
    /// that stopped reading leave kernel memory at once.
    pub fn resets(self) -> bool {
        matches!(self, CloseReason::WriteStall | CloseReason::SlowConsumer)
    }

    /// The close reason for a socket error.
    pub fn from_error(error: &std::io::Error) -> CloseReason {
        match error.raw_os_error() {
            Some(libc::ETIMEDOUT) => CloseReason::TimedOut,
            _ => CloseReason::Reset,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading a request head; `deadline_ms` is the handshake or idle deadline.
    Head,
    /// Reading a publish body; `deadline_ms` is the body deadline.
    Body,
    /// An event stream; `deadline_ms` is the end of its lifetime (or `u64::MAX`).
    Stream,
}

/// The request being read: buffer, parsed head, body so far.
#[derive(Debug, Default)]
pub struct Inbound {
    /// Bytes received and not yet consumed.
    pub buf: Vec<u8>,
    /// The head whose body is being read ([`Phase::Body`]).
    pub request: Option<Request>,
    pub body_reader: Option<BodyReader>,
    pub body: Vec<u8>,
}

/// One subscription: a topic in the shard's index and this connection's
/// position in that topic's subscriber list (for O(1) removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub topic: u32,
    pub position: u32,
}

/// One connection. Kept small: an idle subscriber is this struct, its slab
/// slot and one entry per topic in the shard's index.
#[derive(Debug)]
pub struct Conn {
    pub handle: Handle,
    pub phase: Phase,
    /// A send returned `Blocked`: wait for `writable` before sending again.
    pub send_blocked: bool,
    /// Listed in the shard's dirty list (outbox to flush this turn).
    pub dirty: bool,
    /// The peer finished sending (FIN) while a request was being answered.
    pub peer_done: bool,
    /// Close with this reason once the outbox is flushed.
    pub close_after_flush: Option<CloseReason>,
    /// Marked for closing; reaped at the next safe point.
    pub closing: Option<CloseReason>,
    /// Still in the rejection path (answered 503, not counted as open).
    pub rejected: bool,
    pub peer: IpAddr,
    /// The last event id written (or skipped as already seen) on this stream.
    pub last_id: EventId,
    /// Set while replaying history: the id after which replay continues.
    pub replay_cursor: Option<EventId>,
    /// Last successful write (shard ms), for heartbeats.
    pub last_write_ms: u64,
    /// The deadline of the current phase (shard ms).
    pub deadline_ms: u64,
    pub subscriptions: SmallVec<[Subscription; 2]>,
    pub outbox: Option<Box<Outbox>>,
    pub inbound: Option<Box<Inbound>>,
}

impl Conn {
    pub fn new(handle: Handle, peer: IpAddr, now_ms: u64, deadline_ms: u64) -> Conn {
        Conn {
            handle,
            phase: Phase::Head,
            send_blocked: false,
            dirty: false,
            peer_done: false,
            close_after_flush: None,
            closing: None,
            rejected: false,
            peer,
            last_id: 0,
            replay_cursor: None,
            last_write_ms: now_ms,
            deadline_ms,
            subscriptions: SmallVec::new(),
            outbox: None,
            inbound: Some(Box::default()),
        }
    }

    /// A live event stream that takes live frames: not closing, not ended (its
    /// `retry:` hint queued, closing once flushed: nothing may follow the hint),
    /// not replaying.
    pub fn takes_live_frames(&self) -> bool {
        self.phase == Phase::Stream
            && self.closing.is_none()
            && self.close_after_flush.is_none()
            && self.replay_cursor.is_none()
    }

    pub fn outbox_bytes(&self) -> usize {
        self.outbox.as_ref().map_or(0, |outbox| outbox.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_unique_and_indexed() {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let mut names: Vec<_> = CloseReason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CloseReason::ALL.len());
    }

    #[test]
    fn an_idle_subscriber_is_small() {
        // The per-connection constant of the memory bound (README, Measured).
        assert!(
            std::mem::size_of::<Conn>() <= 160,
            "{}",
            std::mem::size_of::<Conn>()
        );
    }
}
