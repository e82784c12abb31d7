//! The io_uring backend: one ring per shard, connections as direct descriptors.
//!
//! The shard speaks a readiness contract (see [`crate::backend`]); io_uring
//! completes operations instead. This backend bridges the two by *readiness
//! emulation*:
//!
//! 1. **Accept.** A multishot accept per listener allocates each connection a
//!    slot in the ring's sparse registered file table (`IORING_FILE_INDEX_ALLOC`):
//!    connections never enter the process fd table, so `RLIMIT_NOFILE` bounds
//!    each ring's table, not the process. The peer address is read with the
//!    `SO_PEERNAME` socket command (multishot accept has no per-connection
//!    address buffer); then [`Event::Accepted`] carries the table index as the
//!    [`Handle`]. A multishot accept that ends (a completion without
//!    `IORING_CQE_F_MORE`) is re-armed and counted; one that ends in `-ENFILE`
//!    (the table is full: the kernel drops that connection) is counted and
//!    re-armed when a close frees a slot or after [`RETRY_DELAY`], never in a loop.
//! 2. **Readiness.** [`Backend::register`] arms a multishot poll for
//!    `POLLIN | POLLRDHUP | POLLERR | POLLHUP`, so a FIN is seen while the
//!    connection is idle, as with `EPOLLRDHUP`. Its completions become
//!    [`Event::Ready`]. `POLLERR` first reads `SO_ERROR` with a socket command,
//!    so that [`Backend::take_error`] can answer without a syscall on a
//!    descriptor the process does not have.
//! 3. **Operations.** [`Backend::send`] and [`Backend::recv`] push the
//!    operation and answer [`Io::Blocked`]; its completion is stored in the
//!    slot and reported as `Ready { writable }` / `Ready { readable }`; the
//!    shard's next call with the same buffers returns the stored result. At
//!    most one send and one receive are in flight per connection. Receives
//!    carry `MSG_DONTWAIT`, so they run during the submit and never wait in
//!    the kernel (an empty socket answers `-EAGAIN`, which is swallowed: the
//!    poll reports the next data), and they land in a pooled buffer of the
//!    backend's that the shard's next `recv` copies out: the shard rewrites
//!    its request buffer between calls and shares one discard buffer among
//!    its streams, so the kernel never writes shard memory (the
//!    copy is of request heads only). Sends wait in the kernel until the socket has
//!    room (the kernel's internal poll retries them: one completion per
//!    progress, no `EAGAIN` round trips); a stalled one is cancelled when the
//!    write-stall close comes (step 5). A single buffer goes out as `SEND`;
//!    several (a backlogged outbox) as `SENDMSG`, whose `msghdr` and iovec
//!    array are copied into a [`Message`] the backend owns until the
//!    completion, because the caller's iovec array lives on its stack.
//! 4. **Batching.** Entries are pushed during the shard's turn and submitted
//!    once, in [`Backend::poll`], together with the wait for completions (the
//!    shard's timer tick is the wait's timeout). A fan-out pass with more
//!    entries than the submission queue holds submits in chunks. A completion
//!    queue overflow (`IORING_SQ_CQ_OVERFLOW`; the kernel keeps the entries,
//!    `IORING_FEAT_NODROP`) is flushed and drained in the same poll.
//! 5. **Close**, in stages: cancel every operation on the descriptor
//!    (`ASYNC_CANCEL` by fixed file, all matches), then `SO_LINGER 0` by a
//!    socket command for a reset close, then the fixed-file `CLOSE`, as one
//!    hard-linked chain so they run in that order. [`Backend::close`] answers
//!    `false`; [`Event::Closed`] follows when every completion that names the
//!    slot has arrived, so the shard frees buffers only when the kernel holds
//!    no reference to them.
//! 6. **Wake-ups.** A `READ` of the shard waker's eventfd is kept in flight;
//!    its completion is [`Event::Wake`] and it is re-armed.
//!
//! `user_data` layout: bits 56–63 the [`Op`], bits 32–55 the low 24 bits of
//! the token's generation, bits 0–31 the slot (or listener, query, table
//! index, by op). Every operation's final completion (`IORING_CQE_F_MORE`
//! clear) is counted against [`Uring::inflight`]; dropping the backend
//! cancels everything and waits for them, so no operation outlives the
//! memory it points at.

pub mod probe;

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{Backend, Event, Handle, Io, Token};
use crate::conn::IOVECS_PER_WRITE_MAX;
use crate::metrics::{self, ShardStats};

/// Submission-queue entries per ring (128 KiB of entries). A pass that pushes
/// more submits in chunks: one `io_uring_enter` per 2,048 sends costs little.
const SQ_ENTRIES: u32 = 2048;
/// Completion-queue entries per ring (256 KiB): eight times the submission
/// queue, since multishot polls and accepts post more completions than they
/// take entries and a fan-out pass is reaped only at the next poll. More than
/// this waits in the kernel's overflow list and is flushed by the next poll.
/// Both rings are mapped into the process, so their size counts in its RSS.
const CQ_ENTRIES: u32 = 8 * SQ_ENTRIES;
/// Delay before re-arming an accept that ended in an error, so an error the
/// kernel keeps answering costs one attempt per delay, not a spinning loop.
const RETRY_DELAY: Duration = Duration::from_millis(50);
/// Reap rounds per poll while the completion queue keeps overflowing.
const REAP_ROUNDS_MAX: usize = 8;
/// Submits tried to make room in a full submission queue.
const SUBMIT_ATTEMPTS_MAX: usize = 64;
/// `SENDMSG` buffers kept for reuse; more are freed.
const MESSAGES_POOLED_MAX: usize = 256;
/// Bytes one receive asks for (the shard reads requests in 16 KiB chunks).
const RECV_BYTES_MAX: usize = 16 * 1024;
/// Receive buffers kept for reuse; more are freed.
const RECEIVES_POOLED_MAX: usize = 16;
/// How long dropping the backend waits for cancelled operations.
const DROP_WAIT_MAX: Duration = Duration::from_secs(2);

const POLL_MASK: u32 = (libc::POLLIN | libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32;
const GENERATION_BITS: u32 = 24;
const GENERATION_MASK: u32 = (1 << GENERATION_BITS) - 1;
/// `slot_of_fixed` value of a table index no registered connection holds.
const NO_SLOT: u32 = u32::MAX;
const NO_MESSAGE: u32 = u32::MAX;
const NO_BUFFER: u32 = u32::MAX;

/// `SO_LINGER {on, 0 s}`: a close that resets. A static, so the kernel may
/// read it whenever the linked socket command runs.
static LINGER_RESET: libc::linger = libc::linger {
    l_onoff: 1,
    l_linger: 0,
};

/// Logged once per process: resets need socket commands.
static RESETS_UNAVAILABLE_LOGGED: AtomicBool = AtomicBool::new(false);

/// What an entry's completion is about; the top byte of its `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    /// Multishot accept; index = listener.
    Accept = 1,
    /// `SO_PEERNAME` of a fresh connection; index = query.
    Peer,
    /// The waker eventfd's read; index unused.
    Wake,
    /// A one-shot poll of the eventfd, used if its read answers `EAGAIN`.
    WakePoll,
    /// Multishot readiness poll; index = slot.
    Poll,
    Recv,
    Send,
    /// `SO_ERROR` after `POLLERR`; index = query.
    SockError,
    Cancel,
    Linger,
    Close,
    /// Close of a connection never registered; index = table index.
    Discard,
    /// Cancels issued by `stop_accepting` and `drop`.
    Teardown,
}

impl Op {
    const ALL: [Op; 13] = [
        Op::Accept,
        Op::Peer,
        Op::Wake,
        Op::WakePoll,
        Op::Poll,
        Op::Recv,
        Op::Send,
        Op::SockError,
        Op::Cancel,
        Op::Linger,
        Op::Close,
        Op::Discard,
        Op::Teardown,
    ];

    fn from_u8(value: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == value)
    }
}

fn user_data(op: Op, index: u32, generation: u32) -> u64 {
    ((op as u64) << 56) | (((generation & GENERATION_MASK) as u64) << 32) | index as u64
}

/// `(op, index, generation & GENERATION_MASK)`.
fn decode(data: u64) -> (Option<Op>, u32, u32) {
    (
        Op::from_u8((data >> 56) as u8),
        data as u32,
        (data >> 32) as u32 & GENERATION_MASK,
    )
}

/// Per-slot flags.
const LIVE: u8 = 1;
const CLOSING: u8 = 1 << 1;
const SEND: u8 = 1 << 2;
const RECV: u8 = 1 << 3;
const ERROR_QUERY: u8 = 1 << 4;

/// The backend's record of one shard slot (about 48 bytes).
#[derive(Debug)]
struct Conn {
    /// The shard's token while `LIVE`.
    token: Token,
    /// Index in the registered file table.
    fixed: u32,
    /// Operations whose final completion has not arrived. `Closed` is
    /// reported when this reaches 0 on a closing slot.
    ops: u16,
    flags: u8,
    /// A send's completion, held for the shard's next `send`.
    send_result: Option<i32>,
    recv_result: Option<i32>,
    /// The `Message` of the `SENDMSG` in flight, or `NO_MESSAGE`.
    send_message: u32,
    /// Address of the first buffer in flight (checked: the shard passes the same).
    send_front: usize,
    /// The `receives` buffer of the receive in flight or held, or `NO_BUFFER`.
    recv_buffer: u32,
    /// `SO_ERROR` read after `POLLERR`, for `take_error` (0: none).
    error: i32,
    /// Poll bits held back while `SO_ERROR` is read.
    deferred_mask: u32,
}

impl Default for Conn {
    fn default() -> Conn {
        Conn {
            token: Token::from_raw(0),
            fixed: 0,
            ops: 0,
            flags: 0,
            send_result: None,
            recv_result: None,
            send_message: NO_MESSAGE,
            send_front: 0,
            recv_buffer: NO_BUFFER,
            error: 0,
            deferred_mask: 0,
        }
    }
}

impl Conn {
    fn is(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A `SENDMSG`'s header and iovec array, owned by the backend (boxed, so its
/// address is stable) from the push until the completion.
struct Message {
    header: libc::msghdr,
    iovecs: [libc::iovec; IOVECS_PER_WRITE_MAX],
}

/// Boxed buffers handed out by index and reused; at most `retained_max`
/// free ones keep their allocation. A box's address is stable while the
/// kernel uses it, however the slab grows.
struct Pool<T> {
    items: Vec<Option<Box<T>>>,
    free: Vec<u32>,
    retained_max: usize,
    make: fn() -> Box<T>,
}

impl<T> Pool<T> {
    fn new(retained_max: usize, make: fn() -> Box<T>) -> Pool<T> {
        Pool {
            items: Vec::new(),
            free: Vec::new(),
            retained_max,
            make,
        }
    }

    fn take(&mut self) -> u32 {
        match self.free.pop() {
            Some(index) => {
                let make = self.make;
                self.items[index as usize].get_or_insert_with(make);
                index
            }
            None => {
                self.items.push(Some((self.make)()));
                (self.items.len() - 1) as u32
            }
        }
    }

    fn get(&mut self, index: u32) -> &mut T {
        self.items[index as usize]
            .as_mut()
            .expect("taken pool item")
    }

    /// Returns an item; past `retained_max` free entries, its memory too
    /// (so at most `retained_max` free items hold an allocation).
    fn release(&mut self, index: u32) {
        if self.free.len() >= self.retained_max {
            self.items[index as usize] = None;
        }
        self.free.push(index);
    }
}

/// A socket-command buffer (`SO_PEERNAME`, `SO_ERROR`), boxed for a stable
/// address while the command is in flight.
struct Query {
    /// The table index (peer queries) or slot (error queries) it is for.
    owner: u32,
    /// Listener index (peer queries).
    listener: u32,
    buf: Box<libc::sockaddr_storage>,
}

#[derive(Debug)]
struct Listener {
    socket: Option<TcpListener>,
    ipv6: bool,
    /// A multishot accept is in flight.
    armed: bool,
    /// Re-arm at this time (after an error).
    retry_at: Option<Instant>,
    /// The last accept ended in `-ENFILE`: re-arm when a close frees a slot.
    table_full: bool,
}

/// Settings from start-up.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Slots in the ring's registered file table.
    pub files_per_ring: u32,
    /// `SOCKET_URING_OP_{GET,SET}SOCKOPT` work here (Linux 6.7+).
    pub socket_commands: bool,
}

pub struct Uring {
    /// Dropped by hand in `drop`, only once the kernel is done with it.
    ring: std::mem::ManuallyDrop<IoUring>,
    options: Options,
    listeners: Vec<Listener>,
    accepting: bool,
    /// Set by `drop`: completions re-arm nothing.
    dropping: bool,
    waker_fd: RawFd,
    /// The eventfd read's destination.
    wake_buf: Box<u64>,
    wake_armed: bool,
    wake_retry_at: Option<Instant>,
    /// Indexed by shard slot.
    conns: Vec<Conn>,
    /// Table index → slot of the registered connection holding it.
    slot_of_fixed: Vec<u32>,
    messages: Pool<Message>,
    /// Receive buffers: a receive lands here, and the shard's next `recv`
    /// copies it out, so the kernel never writes the shard's buffers.
    receives: Pool<[u8; RECV_BYTES_MAX]>,
    queries: Vec<Option<Query>>,
    free_queries: Vec<u32>,
    /// Completions taken off the queue while making room to submit;
    /// handled at the start of the next poll.
    backlog: Vec<cqueue::Entry>,
    scratch: Vec<cqueue::Entry>,
    /// Entries pushed whose final completion has not arrived.
    inflight: usize,
    stats: Arc<ShardStats>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("options", &self.options)
            .field("listeners", &self.listeners)
            .field("inflight", &self.inflight)
            .finish_non_exhaustive()
    }
}

/// Builds a ring with the flags the loop prefers where the kernel takes them.
fn build_ring(cq_entries: u32) -> io::Result<IoUring> {
    let preferred = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_submit_all()
        .setup_cqsize(cq_entries)
        .build(SQ_ENTRIES);
    match preferred {
        Ok(ring) => Ok(ring),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_cqsize(cq_entries)
            .build(SQ_ENTRIES),
        Err(error) => Err(error),
    }
}

impl Uring {
    /// Creates the ring and its file table, arms the accepts and the waker's
    /// read. Must run on the shard's thread (the ring is single-issuer).
    pub fn new(
        listeners: Vec<TcpListener>,
        waker_fd: RawFd,
        options: Options,
        stats: Arc<ShardStats>,
    ) -> io::Result<Uring> {
        assert!(options.files_per_ring > 0);
        let ring = build_ring(CQ_ENTRIES)?;
        ring.submitter()
            .register_files_sparse(options.files_per_ring)
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!(
                        "registering a file table of {} slots: {error}",
                        options.files_per_ring
                    ),
                )
            })?;
        let listeners = listeners
            .into_iter()
            .map(|socket| {
                let ipv6 = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
                Listener {
                    socket: Some(socket),
                    ipv6,
                    armed: false,
                    retry_at: None,
                    table_full: false,
                }
            })
            .collect();
        let mut backend = Uring {
            ring: std::mem::ManuallyDrop::new(ring),
            options,
            listeners,
            accepting: true,
            dropping: false,
            waker_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
            wake_retry_at: None,
            conns: Vec::new(),
            slot_of_fixed: vec![NO_SLOT; options.files_per_ring as usize],
            messages: Pool::new(MESSAGES_POOLED_MAX, new_message),
            receives: Pool::new(RECEIVES_POOLED_MAX, || Box::new([0; RECV_BYTES_MAX])),
            queries: Vec::new(),
            free_queries: Vec::new(),
            backlog: Vec::new(),
            scratch: Vec::new(),
            inflight: 0,
            stats,
        };
        for index in 0..backend.listeners.len() {
            backend.arm_accept(index)?;
        }
        backend.arm_wake_read()?;
        backend.submit_now()?;
        Ok(backend)
    }

    // ---- submission -------------------------------------------------------

    /// Pushes `entries` contiguously (a linked chain stays in one submit),
    /// submitting first if the queue lacks room.
    ///
    /// # Safety
    ///
    /// Every buffer an entry points at must stay valid, and must not be
    /// moved or (for receives) read or written by anyone else, until the
    /// entry's final completion has been reaped.
    unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        for _ in 0..SUBMIT_ATTEMPTS_MAX {
            let mut queue = self.ring.submission();
            if queue.capacity() - queue.len() >= entries.len() {
                // SAFETY: the caller guarantees the buffers' lifetime; the
                // room was checked just above on the same queue view.
                unsafe { queue.push_multiple(entries) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                drop(queue);
                self.inflight += entries.len();
                return Ok(());
            }
            drop(queue);
            self.submit_now()?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the io_uring submission queue stays full",
        ))
    }

    /// Submits what is queued without waiting. If the kernel refuses because
    /// completions are backed up (`EBUSY`), they are moved to `backlog`.
    fn submit_now(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(error) => match error.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                Some(libc::EBUSY | libc::EAGAIN) => {
                    self.drain_to_backlog();
                    Ok(())
                }
                _ => Err(error),
            },
        }
    }

    fn drain_to_backlog(&mut self) {
        self.backlog.extend(self.ring.completion());
    }

    /// Submits and waits up to `wait` for a completion (the timer tick).
    fn enter(&mut self, mut wait: Duration) -> io::Result<()> {
        for _ in 0..SUBMIT_ATTEMPTS_MAX {
            let result = if wait.is_zero() {
                self.ring.submit()
            } else {
                let timespec = types::Timespec::from(wait);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            };
            match result {
                Ok(_) => return Ok(()),
                Err(error) => match error.raw_os_error() {
                    Some(libc::ETIME | libc::EINTR) => return Ok(()),
                    Some(libc::EBUSY | libc::EAGAIN) => {
                        self.drain_to_backlog();
                        wait = Duration::ZERO;
                    }
                    _ => return Err(error),
                },
            }
        }
        Ok(())
    }

    fn arm_accept(&mut self, index: usize) -> io::Result<()> {
        let listener = &mut self.listeners[index];
        let Some(socket) = listener.socket.as_ref() else {
            return Ok(());
        };
        let entry = opcode::AcceptMulti::new(types::Fd(socket.as_raw_fd()))
            .allocate_file_index(true)
            .build()
            .user_data(user_data(Op::Accept, index as u32, 0));
        listener.armed = true;
        listener.retry_at = None;
        listener.table_full = false;
        // SAFETY: a multishot accept into the file table points at no user
        // memory (no address buffer); the listener's file is referenced by
        // the kernel until the accept ends.
        unsafe { self.push(&[entry]) }
    }

    fn arm_wake_read(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.waker_fd),
            std::ptr::from_mut::<u64>(&mut self.wake_buf).cast(),
            8,
        )
        .build()
        .user_data(user_data(Op::Wake, 0, 0));
        self.wake_armed = true;
        self.wake_retry_at = None;
        // SAFETY: `wake_buf` is a Box owned by the backend: its address is
        // stable and it is freed only after `drop` has waited for every
        // operation; nothing else reads or writes it while the read is in flight.
        unsafe { self.push(&[entry]) }
    }

    fn arm_wake_poll(&mut self) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(self.waker_fd), libc::POLLIN as u32)
            .build()
            .user_data(user_data(Op::WakePoll, 0, 0));
        self.wake_armed = true;
        // SAFETY: a poll points at no user memory.
        unsafe { self.push(&[entry]) }
    }

    fn arm_poll(&mut self, slot: u32) -> io::Result<()> {
        let conn = &mut self.conns[slot as usize];
        let entry = opcode::PollAdd::new(types::Fixed(conn.fixed), POLL_MASK)
            .multi(true)
            .build()
            .user_data(user_data(Op::Poll, slot, conn.token.generation()));
        conn.ops += 1;
        // SAFETY: a poll points at no user memory.
        let pushed = unsafe { self.push(&[entry]) };
        if pushed.is_err() {
            self.conns[slot as usize].ops -= 1;
        }
        pushed
    }

    fn take_query(&mut self, owner: u32, listener: u32) -> u32 {
        // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
        let zeroed = || Box::new(unsafe { std::mem::zeroed::<libc::sockaddr_storage>() });
        match self.free_queries.pop() {
            Some(index) => {
                let query = self.queries[index as usize].get_or_insert_with(|| Query {
                    owner,
                    listener,
                    buf: zeroed(),
                });
                query.owner = owner;
                query.listener = listener;
                index
            }
            None => {
                self.queries.push(Some(Query {
                    owner,
                    listener,
                    buf: zeroed(),
                }));
                (self.queries.len() - 1) as u32
            }
        }
    }

    fn release_query(&mut self, index: u32) {
        self.free_queries.push(index);
    }

    // ---- completions ------------------------------------------------------

    /// The live record for a completion's slot and generation.
    fn conn_for(&mut self, slot: u32, generation: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot as usize)
            .filter(|c| c.is(LIVE) && c.token.generation() & GENERATION_MASK == generation)
    }

    fn complete(&mut self, entry: &cqueue::Entry, events: &mut Vec<Event>) {
        let (op, index, generation) = decode(entry.user_data());
        let result = entry.result();
        let more = cqueue::more(entry.flags());
        if !more {
            self.inflight = self.inflight.saturating_sub(1);
        }
        let Some(op) = op else {
            log::warn!(
                "io_uring: completion with unknown user_data {:#x}",
                entry.user_data()
            );
            return;
        };
        match op {
            Op::Accept => self.accept_completed(index as usize, result, more, events),
            Op::Peer => self.peer_completed(index, result, events),
            Op::Wake | Op::WakePoll => self.wake_completed(op, result, events),
            Op::Poll => self.poll_completed(index, generation, result, more, events),
            Op::Recv => {
                let Some(conn) = self.conn_for(index, generation) else {
                    return;
                };
                conn.ops -= 1;
                conn.flags &= !RECV;
                if conn.is(CLOSING) || result == -libc::EAGAIN {
                    // `EAGAIN`: the socket was empty; the poll reports the next data.
                    let buffer = std::mem::replace(&mut conn.recv_buffer, NO_BUFFER);
                    self.receives.release(buffer);
                    return self.closed_if_done(index, events);
                }
                conn.recv_result = Some(result);
                events.push(ready(conn.token, true, false, false, false));
            }
            Op::Send => {
                let Some(conn) = self.conn_for(index, generation) else {
                    return;
                };
                conn.ops -= 1;
                conn.flags &= !SEND;
                let message = std::mem::replace(&mut conn.send_message, NO_MESSAGE);
                if conn.is(CLOSING) {
                    if message != NO_MESSAGE {
                        self.messages.release(message);
                    }
                    return self.closed_if_done(index, events);
                }
                if result != -libc::EAGAIN {
                    conn.send_result = Some(result);
                }
                events.push(ready(conn.token, false, true, false, false));
                if message != NO_MESSAGE {
                    self.messages.release(message);
                }
            }
            Op::SockError => self.error_completed(index, result, events),
            Op::Cancel | Op::Linger | Op::Close => {
                if op == Op::Linger && result < 0 {
                    log_resets_unavailable(&io::Error::from_raw_os_error(-result).to_string());
                }
                if op == Op::Close && result < 0 {
                    log::warn!(
                        "io_uring: closing a direct descriptor: {}",
                        io::Error::from_raw_os_error(-result)
                    );
                }
                if let Some(conn) = self.conn_for(index, generation) {
                    conn.ops -= 1;
                    self.closed_if_done(index, events);
                }
                if op == Op::Close {
                    self.table_slot_freed();
                }
            }
            Op::Discard => {
                if result < 0 {
                    log::warn!(
                        "io_uring: discarding a connection: {}",
                        io::Error::from_raw_os_error(-result)
                    );
                }
                self.table_slot_freed();
            }
            Op::Teardown => {}
        }
    }

    fn accept_completed(&mut self, index: usize, result: i32, more: bool, events: &mut Vec<Event>) {
        let Some(listener) = self.listeners.get_mut(index) else {
            return;
        };
        if !more {
            listener.armed = false;
        }
        if result >= 0 {
            self.accepted(result as u32, index as u32, events);
            if !more && self.accepting {
                metrics::add(&self.stats.uring_accept_rearms, 1);
                if let Err(error) = self.arm_accept(index) {
                    log::warn!("io_uring: re-arming accept: {error}");
                    self.listeners[index].retry_at = Some(Instant::now() + RETRY_DELAY);
                }
            }
            return;
        }
        let error = -result;
        if error == libc::ENFILE {
            // The table is full: the kernel dropped this connection.
            metrics::add(&self.stats.uring_accept_table_full, 1);
            listener.table_full = true;
        } else if error != libc::ECANCELED {
            log::debug!("io_uring: accept: {}", io::Error::from_raw_os_error(error));
        }
        if !more && self.accepting {
            // Never at once: an error the kernel keeps answering would spin.
            listener.retry_at = Some(Instant::now() + RETRY_DELAY);
        }
    }

    /// A connection landed in the table at `fixed`: read its peer address.
    fn accepted(&mut self, fixed: u32, listener: u32, events: &mut Vec<Event>) {
        if self.options.socket_commands {
            let query = self.take_query(fixed, listener);
            let ipv6 = self.listeners[listener as usize].ipv6;
            let length = if ipv6 {
                std::mem::size_of::<libc::sockaddr_in6>()
            } else {
                std::mem::size_of::<libc::sockaddr_in>()
            };
            let buf = self.queries[query as usize]
                .as_mut()
                .expect("taken query")
                .buf
                .as_mut() as *mut libc::sockaddr_storage;
            let entry = opcode::GetSockOpt::new(
                types::Fixed(fixed),
                libc::SOL_SOCKET as u32,
                libc::SO_PEERNAME as u32,
                buf.cast(),
                length as u32,
            )
            .build()
            .user_data(user_data(Op::Peer, query, 0));
            // SAFETY: `buf` is the boxed storage of query `query`, which stays
            // allocated and untouched until this entry's completion releases it
            // (`peer_completed`); `length` is within its size.
            match unsafe { self.push(&[entry]) } {
                Ok(()) => return,
                Err(error) => {
                    log::warn!("io_uring: reading a peer address: {error}");
                    self.release_query(query);
                }
            }
        }
        let peer = self.unknown_peer(listener);
        events.push(Event::Accepted {
            handle: Handle(fixed),
            peer,
        });
    }

    fn unknown_peer(&self, listener: u32) -> SocketAddr {
        if self.listeners[listener as usize].ipv6 {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        }
    }

    fn peer_completed(&mut self, index: u32, result: i32, events: &mut Vec<Event>) {
        let Some(query) = self.queries.get(index as usize).and_then(Option::as_ref) else {
            return;
        };
        let (fixed, listener) = (query.owner, query.listener);
        let peer = if result >= 0 {
            super::socket_addr(&query.buf)
        } else {
            None
        };
        self.release_query(index);
        let peer = peer.unwrap_or_else(|| self.unknown_peer(listener));
        events.push(Event::Accepted {
            handle: Handle(fixed),
            peer,
        });
    }

    fn wake_completed(&mut self, op: Op, result: i32, events: &mut Vec<Event>) {
        self.wake_armed = false;
        let rearmed = match (op, result) {
            // The eventfd is non-blocking: an empty counter answers EAGAIN at
            // once. Wait for it to become readable, then read again.
            _ if self.dropping => Ok(()),
            (Op::Wake, error) if error == -libc::EAGAIN => self.arm_wake_poll(),
            (Op::Wake | Op::WakePoll, _) if result >= 0 => {
                if op == Op::Wake {
                    events.push(Event::Wake);
                }
                self.arm_wake_read()
            }
            _ => {
                log::warn!(
                    "io_uring: waker read: {}",
                    io::Error::from_raw_os_error(-result)
                );
                events.push(Event::Wake);
                self.wake_retry_at = Some(Instant::now() + RETRY_DELAY);
                Ok(())
            }
        };
        if let Err(error) = rearmed {
            log::warn!("io_uring: re-arming the waker read: {error}");
            self.wake_retry_at = Some(Instant::now() + RETRY_DELAY);
        }
    }

    fn poll_completed(
        &mut self,
        slot: u32,
        generation: u32,
        result: i32,
        more: bool,
        events: &mut Vec<Event>,
    ) {
        let socket_commands = self.options.socket_commands;
        let Some(conn) = self.conn_for(slot, generation) else {
            return;
        };
        if !more {
            conn.ops -= 1;
        }
        if conn.is(CLOSING) {
            return self.closed_if_done(slot, events);
        }
        let token = conn.token;
        if result < 0 {
            if result == -libc::ECANCELED && !more {
                // Ended without our asking (an overflowing completion queue
                // ends multishot polls): arm it again.
                if let Err(error) = self.arm_poll(slot) {
                    log::warn!("io_uring: re-arming a poll: {error}");
                }
            } else {
                conn.error = -result;
                events.push(ready(token, false, false, true, true));
            }
            return;
        }
        let mask = result as u32;
        if mask & libc::POLLERR as u32 != 0 && socket_commands {
            conn.deferred_mask |= mask;
            let querying = conn.is(ERROR_QUERY);
            if !querying && self.query_error(slot).is_err() {
                let conn = &mut self.conns[slot as usize];
                conn.deferred_mask = 0;
                events.push(ready_from_mask(token, mask));
            }
        } else {
            events.push(ready_from_mask(token, mask));
        }
        if !more {
            if let Err(error) = self.arm_poll(slot) {
                log::warn!("io_uring: re-arming a poll: {error}");
            }
        }
    }

    /// Reads `SO_ERROR` with a socket command; `Ready { error }` follows.
    fn query_error(&mut self, slot: u32) -> io::Result<()> {
        let query = self.take_query(slot, 0);
        let buf = self.queries[query as usize]
            .as_mut()
            .expect("taken query")
            .buf
            .as_mut() as *mut libc::sockaddr_storage;
        let conn = &mut self.conns[slot as usize];
        let entry = opcode::GetSockOpt::new(
            types::Fixed(conn.fixed),
            libc::SOL_SOCKET as u32,
            libc::SO_ERROR as u32,
            buf.cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
        .build()
        .user_data(user_data(Op::SockError, query, conn.token.generation()));
        conn.ops += 1;
        conn.flags |= ERROR_QUERY;
        // SAFETY: `buf` is the boxed storage of query `query`, allocated and
        // untouched until `error_completed` releases it; an int fits in it.
        let pushed = unsafe { self.push(&[entry]) };
        if pushed.is_err() {
            let conn = &mut self.conns[slot as usize];
            conn.ops -= 1;
            conn.flags &= !ERROR_QUERY;
            self.release_query(query);
        }
        pushed
    }

    fn error_completed(&mut self, index: u32, result: i32, events: &mut Vec<Event>) {
        let Some(query) = self.queries.get(index as usize).and_then(Option::as_ref) else {
            return;
        };
        let slot = query.owner;
        // SAFETY: the storage is at least an int in size and alignment, and
        // the command has completed, so the kernel no longer writes it.
        let value =
            unsafe { *(query.buf.as_ref() as *const libc::sockaddr_storage).cast::<libc::c_int>() };
        self.release_query(index);
        let Some(conn) = self
            .conns
            .get_mut(slot as usize)
            .filter(|c| c.is(ERROR_QUERY))
        else {
            return;
        };
        conn.ops -= 1;
        conn.flags &= !ERROR_QUERY;
        if conn.is(CLOSING) {
            return self.closed_if_done(slot, events);
        }
        if result >= 0 && value != 0 {
            conn.error = value;
        }
        let mask = std::mem::take(&mut conn.deferred_mask);
        events.push(ready_from_mask(conn.token, mask | libc::POLLERR as u32));
    }

    /// Reports `Closed` once a closing slot has no operation left.
    fn closed_if_done(&mut self, slot: u32, events: &mut Vec<Event>) {
        let conn = &mut self.conns[slot as usize];
        if conn.is(CLOSING) && conn.ops == 0 {
            let token = conn.token;
            debug_assert_eq!(conn.send_message, NO_MESSAGE);
            debug_assert_eq!(conn.recv_buffer, NO_BUFFER);
            *conn = Conn::default();
            events.push(Event::Closed { token });
        }
    }

    /// A table slot was freed: re-arm accepts that stopped on a full table.
    fn table_slot_freed(&mut self) {
        if !self.accepting {
            return;
        }
        for index in 0..self.listeners.len() {
            let listener = &self.listeners[index];
            if listener.table_full && !listener.armed && listener.socket.is_some() {
                metrics::add(&self.stats.uring_accept_rearms, 1);
                if let Err(error) = self.arm_accept(index) {
                    log::warn!("io_uring: re-arming accept: {error}");
                }
            }
        }
    }

    /// Re-arms accepts and the waker read whose retry time has come.
    fn rearm_due(&mut self, now: Instant) {
        for index in 0..self.listeners.len() {
            let listener = &self.listeners[index];
            let due = listener.retry_at.is_some_and(|at| at <= now);
            if due && self.accepting && !listener.armed && listener.socket.is_some() {
                metrics::add(&self.stats.uring_accept_rearms, 1);
                if let Err(error) = self.arm_accept(index) {
                    log::warn!("io_uring: re-arming accept: {error}");
                    self.listeners[index].retry_at = Some(now + RETRY_DELAY);
                }
            }
        }
        if self.wake_retry_at.is_some_and(|at| at <= now) && !self.wake_armed {
            if let Err(error) = self.arm_wake_read() {
                log::warn!("io_uring: re-arming the waker read: {error}");
                self.wake_retry_at = Some(now + RETRY_DELAY);
            }
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.listeners
            .iter()
            .filter_map(|l| l.retry_at)
            .chain(self.wake_retry_at)
            .min()
    }

    #[cfg(test)]
    fn inflight_for_tests(&self) -> usize {
        self.inflight
    }

    /// Takes every completion off the queue and handles it; returns how many.
    fn reap(&mut self, events: &mut Vec<Event>) -> usize {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend(self.ring.completion());
        for entry in &scratch {
            self.complete(entry, events);
        }
        let count = scratch.len();
        self.scratch = scratch;
        count
    }
}

fn new_message() -> Box<Message> {
    Box::new(Message {
        // SAFETY: msghdr is plain data; all zeroes (null pointers, zero
        // lengths) is a valid value.
        header: unsafe { std::mem::zeroed() },
        iovecs: [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; IOVECS_PER_WRITE_MAX],
    })
}

fn ready(token: Token, readable: bool, writable: bool, hangup: bool, error: bool) -> Event {
    Event::Ready {
        token,
        readable,
        writable,
        hangup,
        error,
    }
}

fn ready_from_mask(token: Token, mask: u32) -> Event {
    ready(
        token,
        mask & libc::POLLIN as u32 != 0,
        false,
        mask & (libc::POLLRDHUP | libc::POLLHUP) as u32 != 0,
        mask & libc::POLLERR as u32 != 0,
    )
}

fn log_resets_unavailable(reason: &str) {
    if !RESETS_UNAVAILABLE_LOGGED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "io_uring: SO_LINGER 0 through a socket command is unavailable ({reason}): \
             stall and slow-consumer closes end with FIN instead of a reset"
        );
    }
}

fn send_result(result: i32) -> Io {
    if result >= 0 {
        Io::Done(result as usize)
    } else {
        Io::Failed(io::Error::from_raw_os_error(-result))
    }
}

impl Backend for Uring {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Duration) -> io::Result<()> {
        let now = Instant::now();
        self.rearm_due(now);
        if !self.backlog.is_empty() {
            let backlog = std::mem::take(&mut self.backlog);
            for entry in &backlog {
                self.complete(entry, events);
            }
        }
        let mut wait = if events.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        if let Some(at) = self.next_retry() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        self.enter(wait)?;
        for _ in 0..REAP_ROUNDS_MAX {
            self.reap(events);
            if !self.ring.submission().cq_overflow() {
                break;
            }
            // Completions the queue could not hold wait in the kernel
            // (IORING_FEAT_NODROP); an enter flushes them.
            metrics::add(&self.stats.uring_cq_overflows, 1);
            self.submit_now()?;
        }
        Ok(())
    }

    fn register(&mut self, handle: Handle, token: Token) -> io::Result<()> {
        let slot = token.slot();
        if self.conns.len() <= slot as usize {
            self.conns.resize_with(slot as usize + 1, Conn::default);
        }
        let conn = &mut self.conns[slot as usize];
        assert!(
            conn.flags == 0 && conn.ops == 0,
            "slot {slot} registered while the backend still holds it"
        );
        let Some(owner) = self.slot_of_fixed.get_mut(handle.0 as usize) else {
            return Err(io::Error::other("direct descriptor outside the file table"));
        };
        *owner = slot;
        *conn = Conn {
            token,
            fixed: handle.0,
            flags: LIVE,
            ..Conn::default()
        };
        if let Err(error) = self.arm_poll(slot) {
            self.conns[slot as usize] = Conn::default();
            self.slot_of_fixed[handle.0 as usize] = NO_SLOT;
            return Err(error);
        }
        Ok(())
    }

    fn recv(&mut self, _handle: Handle, token: Token, buf: &mut [u8]) -> Io {
        let slot = token.slot();
        let conn = &mut self.conns[slot as usize];
        debug_assert!(conn.is(LIVE) && !conn.is(CLOSING) && conn.token == token);
        if let Some(result) = conn.recv_result.take() {
            let buffer = std::mem::replace(&mut conn.recv_buffer, NO_BUFFER);
            let received = self.receives.get(buffer);
            let outcome = match result {
                0 if !buf.is_empty() => Io::Eof,
                count if count > 0 => {
                    // The receive asked for at most the length the shard passed then.
                    let count = (count as usize).min(buf.len());
                    buf[..count].copy_from_slice(&received[..count]);
                    Io::Done(count)
                }
                result => send_result(result),
            };
            self.receives.release(buffer);
            return outcome;
        }
        if conn.is(RECV) {
            return Io::Blocked;
        }
        let length = buf.len().min(RECV_BYTES_MAX) as u32;
        let buffer = self.receives.take();
        let destination = self.receives.get(buffer).as_mut_ptr();
        let conn = &mut self.conns[slot as usize];
        let entry = opcode::Recv::new(types::Fixed(conn.fixed), destination, length)
            .flags(libc::MSG_DONTWAIT)
            .build()
            .user_data(user_data(Op::Recv, slot, token.generation()));
        conn.ops += 1;
        conn.flags |= RECV;
        conn.recv_buffer = buffer;
        // SAFETY: `destination` is a boxed pool buffer of RECV_BYTES_MAX
        // (>= `length`) bytes, owned by the backend and held by this slot
        // from here until the completion (or the shard's next `recv`)
        // releases it; nothing else reads or writes it meanwhile.
        match unsafe { self.push(&[entry]) } {
            Ok(()) => Io::Blocked,
            Err(error) => {
                let conn = &mut self.conns[slot as usize];
                conn.ops -= 1;
                conn.flags &= !RECV;
                conn.recv_buffer = NO_BUFFER;
                self.receives.release(buffer);
                Io::Failed(error)
            }
        }
    }

    fn send(&mut self, _handle: Handle, token: Token, bufs: &[IoSlice<'_>]) -> Io {
        let slot = token.slot();
        let conn = &mut self.conns[slot as usize];
        debug_assert!(conn.is(LIVE) && !conn.is(CLOSING) && conn.token == token);
        if let Some(result) = conn.send_result.take() {
            debug_assert_eq!(
                Some(conn.send_front),
                bufs.first().map(|b| b.as_ptr() as usize),
                "a send completed for other buffers than the shard passed again"
            );
            return send_result(result);
        }
        if conn.is(SEND) {
            return Io::Blocked;
        }
        let Some(first) = bufs.first() else {
            return Io::Done(0);
        };
        let (fixed, front) = (conn.fixed, first.as_ptr() as usize);
        let data = user_data(Op::Send, slot, token.generation());
        let (entry, message) = if bufs.len() == 1 {
            let length = first.len().min(u32::MAX as usize) as u32;
            let entry = opcode::Send::new(types::Fixed(fixed), first.as_ptr(), length)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(data);
            (entry, NO_MESSAGE)
        } else {
            let index = self.messages.take();
            let message = self.messages.get(index);
            let count = bufs.len().min(IOVECS_PER_WRITE_MAX);
            for (iovec, buf) in message.iovecs.iter_mut().zip(&bufs[..count]) {
                *iovec = libc::iovec {
                    iov_base: buf.as_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
            }
            message.header.msg_iov = message.iovecs.as_mut_ptr();
            message.header.msg_iovlen = count as _;
            let entry = opcode::SendMsg::new(types::Fixed(fixed), &message.header)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
                .user_data(data);
            (entry, index)
        };
        let conn = &mut self.conns[slot as usize];
        conn.ops += 1;
        conn.flags |= SEND;
        conn.send_front = front;
        conn.send_message = message;
        // SAFETY: the bytes are the shard's frames (`Arc<Frame>` held by the
        // connection's outbox from the `Blocked` answer until the shard has
        // taken this result, and by the slot until `Closed`, which waits for
        // this completion). The iovec array and msghdr were copied into the
        // boxed `Message`, which stays allocated and untouched until the
        // completion releases it.
        match unsafe { self.push(&[entry]) } {
            Ok(()) => Io::Blocked,
            Err(error) => {
                let conn = &mut self.conns[slot as usize];
                conn.ops -= 1;
                conn.flags &= !SEND;
                conn.send_message = NO_MESSAGE;
                if message != NO_MESSAGE {
                    self.messages.release(message);
                }
                Io::Failed(error)
            }
        }
    }

    fn take_error(&mut self, handle: Handle) -> Option<io::Error> {
        let slot = *self.slot_of_fixed.get(handle.0 as usize)?;
        let conn = self.conns.get_mut(slot as usize)?;
        match std::mem::take(&mut conn.error) {
            0 => None,
            error => Some(io::Error::from_raw_os_error(error)),
        }
    }

    fn close(&mut self, handle: Handle, token: Token, reset: bool) -> bool {
        let slot = token.slot();
        let socket_commands = self.options.socket_commands;
        let conn = &mut self.conns[slot as usize];
        assert!(
            conn.is(LIVE) && !conn.is(CLOSING) && conn.token == token && conn.fixed == handle.0,
            "close of a slot the backend does not hold"
        );
        conn.flags |= CLOSING;
        conn.send_result = None;
        if conn.recv_result.take().is_some() {
            let buffer = std::mem::replace(&mut conn.recv_buffer, NO_BUFFER);
            self.receives.release(buffer);
        }
        let conn = &mut self.conns[slot as usize];
        let generation = token.generation();
        let fixed = types::Fixed(conn.fixed);
        self.slot_of_fixed[handle.0 as usize] = NO_SLOT;
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(fixed).all())
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(user_data(Op::Cancel, slot, generation));
        let close =
            opcode::Close::new(fixed)
                .build()
                .user_data(user_data(Op::Close, slot, generation));
        let linger = opcode::SetSockOpt::new(
            fixed,
            libc::SOL_SOCKET as u32,
            libc::SO_LINGER as u32,
            std::ptr::from_ref(&LINGER_RESET).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
        .build()
        .flags(squeue::Flags::IO_HARDLINK)
        .user_data(user_data(Op::Linger, slot, generation));
        let with_reset;
        let without_reset;
        let chain: &[squeue::Entry] = if reset && socket_commands {
            with_reset = [cancel, linger, close];
            &with_reset
        } else {
            if reset {
                log_resets_unavailable("the kernel lacks socket commands");
            }
            without_reset = [cancel, close];
            &without_reset
        };
        // SAFETY: the cancel and the close point at no user memory; the
        // socket command points at a static. Hard links keep the order:
        // operations are cancelled while the table still holds the file.
        match unsafe { self.push(chain) } {
            Ok(()) => self.conns[slot as usize].ops += chain.len() as u16,
            Err(error) => {
                // Only a kernel that stops consuming entries gets here; the
                // slot then stays closing (and leaks) rather than letting the
                // shard free buffers the kernel may still use.
                log::error!("io_uring: cannot close a connection: {error}");
            }
        }
        false
    }

    fn discard(&mut self, handle: Handle) {
        let entry = opcode::Close::new(types::Fixed(handle.0))
            .build()
            .user_data(user_data(Op::Discard, handle.0, 0));
        // SAFETY: a close points at no user memory.
        if let Err(error) = unsafe { self.push(&[entry]) } {
            log::error!("io_uring: cannot discard a connection: {error}");
        }
    }

    fn stop_accepting(&mut self) {
        self.accepting = false;
        for index in 0..self.listeners.len() {
            self.listeners[index].retry_at = None;
            if !self.listeners[index].armed {
                continue;
            }
            let entry = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(user_data(
                Op::Accept,
                index as u32,
                0,
            )))
            .build()
            .user_data(user_data(Op::Teardown, 0, 0));
            // SAFETY: a cancel points at no user memory.
            if let Err(error) = unsafe { self.push(&[entry]) } {
                log::warn!("io_uring: cancelling an accept: {error}");
            }
        }
        // The cancels run during this submit; the kernel holds its own
        // reference to each listener until its accept has ended, so closing
        // ours next cannot leave an operation on a closed descriptor.
        if let Err(error) = self.submit_now() {
            log::warn!("io_uring: submitting accept cancels: {error}");
        }
        for listener in &mut self.listeners {
            listener.socket = None;
        }
    }
}

impl Drop for Uring {
    /// Cancels every operation and waits (bounded) for their completions, so
    /// the kernel is done with every buffer before the shard frees them: the
    /// backend is dropped before the shard's connections (field order).
    fn drop(&mut self) {
        self.accepting = false;
        self.dropping = true;
        for conn in &mut self.conns {
            // Their completions must not re-arm anything now.
            conn.flags |= CLOSING;
        }
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(user_data(Op::Teardown, 0, 0));
        // SAFETY: a cancel points at no user memory.
        if unsafe { self.push(&[entry]) }.is_err() {
            log::error!("io_uring: cannot cancel operations at shutdown");
        }
        let started = Instant::now();
        let mut events = Vec::new();
        // Bounded in time: each turn waits at most 10 ms.
        while self.inflight > 0 && started.elapsed() < DROP_WAIT_MAX {
            if self.enter(Duration::from_millis(10)).is_err() {
                break;
            }
            self.reap(&mut events);
            events.clear();
        }
        if self.inflight == 0 {
            // SAFETY: the ring is dropped once, here, and never used again.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.ring) };
        } else {
            // The kernel may still write the backend's own buffers (the
            // waker's, the socket-command buffers): leak them and the ring
            // rather than free memory it may write. Receives cannot be
            // pending (MSG_DONTWAIT runs them during the submit), and sends
            // only read, so the shard's buffers are safe to free.
            log::error!(
                "io_uring: {} operations still in flight at shutdown; leaking the ring",
                self.inflight
            );
            std::mem::forget(std::mem::take(&mut self.messages.items));
            std::mem::forget(std::mem::take(&mut self.receives.items));
            std::mem::forget(std::mem::take(&mut self.queries));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Waker;
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;

    #[test]
    fn user_data_round_trips_with_a_masked_generation() {
        let data = user_data(Op::Send, Token::SLOT_MAX, 0xABCD_EF12);
        assert_eq!(
            decode(data),
            (
                Some(Op::Send),
                Token::SLOT_MAX,
                0xABCD_EF12 & GENERATION_MASK
            )
        );
        for op in Op::ALL {
            assert_eq!(decode(user_data(op, 7, 1)).0, Some(op));
        }
        assert_eq!(decode(0).0, None);
    }

    /// A backend on a fresh listener, or `None` (with the reason printed)
    /// where io_uring is unavailable outside CI.
    fn backend(waker: &Waker) -> Option<(Uring, std::net::SocketAddr)> {
        backend_with_table(waker, 64)
    }

    fn backend_with_table(
        waker: &Waker,
        files_per_ring: u32,
    ) -> Option<(Uring, std::net::SocketAddr)> {
        let capabilities = match probe::probe(files_per_ring) {
            Ok(capabilities) => capabilities,
            Err(reason) if std::env::var("CI").as_deref() != Ok("true") => {
                println!("SKIP: {reason}");
                return None;
            }
            Err(reason) => panic!("io_uring unavailable under CI: {reason}"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let options = Options {
            files_per_ring,
            socket_commands: capabilities.socket_commands,
        };
        let stats = Arc::new(ShardStats::default());
        let uring = Uring::new(vec![listener], waker.raw_fd(), options, stats).expect("ring");
        Some((uring, address))
    }

    /// Polls until `found` picks an event (bounded: 200 polls of 10 ms).
    fn poll_until<T>(uring: &mut Uring, mut found: impl FnMut(&Event) -> Option<T>) -> T {
        let mut events = Vec::new();
        for _ in 0..200 {
            events.clear();
            uring
                .poll(&mut events, Duration::from_millis(10))
                .expect("poll");
            if let Some(value) = events.iter().find_map(&mut found) {
                return value;
            }
        }
        panic!("the expected event never came");
    }

    #[test]
    fn wakes_come_through_the_ring_again_and_again() {
        let waker = Waker::new().expect("waker");
        let Some((mut uring, _)) = backend(&waker) else {
            return;
        };
        for _ in 0..3 {
            waker.wake();
            poll_until(&mut uring, |e| matches!(e, Event::Wake).then_some(()));
            waker.disarm();
            waker.clear();
        }
    }

    /// The whole contract on one connection: accept (with the peer's
    /// address), receive and send by readiness emulation, staged close.
    #[test]
    fn one_connection_through_the_contract() {
        let waker = Waker::new().expect("waker");
        let Some((mut uring, address)) = backend(&waker) else {
            return;
        };
        let mut client = TcpStream::connect(address).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let (handle, peer) = poll_until(&mut uring, |e| match *e {
            Event::Accepted { handle, peer } => Some((handle, peer)),
            _ => None,
        });
        if uring.options.socket_commands {
            assert_eq!(peer, client.local_addr().expect("local address"));
        }
        let token = Token::new(5, 0x0100_0007);
        uring.register(handle, token).expect("register");

        client.write_all(b"hello").expect("write");
        let mut buf = [0u8; 64];
        poll_until(&mut uring, |e| {
            matches!(e, Event::Ready { token: t, readable: true, .. } if *t == token).then_some(())
        });
        assert!(matches!(uring.recv(handle, token, &mut buf), Io::Blocked));
        poll_until(&mut uring, |e| {
            matches!(e, Event::Ready { token: t, readable: true, .. } if *t == token).then_some(())
        });
        match uring.recv(handle, token, &mut buf) {
            Io::Done(5) => assert_eq!(&buf[..5], b"hello"),
            other => panic!("recv: {other:?}"),
        }

        let (first, second) = (b"one ".to_vec(), b"two".to_vec());
        let bufs = [IoSlice::new(&first), IoSlice::new(&second)];
        assert!(matches!(uring.send(handle, token, &bufs), Io::Blocked));
        poll_until(&mut uring, |e| {
            matches!(e, Event::Ready { token: t, writable: true, .. } if *t == token).then_some(())
        });
        assert!(matches!(uring.send(handle, token, &bufs), Io::Done(7)));
        let mut received = [0u8; 7];
        client.read_exact(&mut received).expect("read");
        assert_eq!(&received, b"one two");

        assert!(!uring.close(handle, token, true));
        poll_until(&mut uring, |e| {
            matches!(e, Event::Closed { token: t } if *t == token).then_some(())
        });
        assert_eq!(uring.inflight_for_tests(), 2, "accept and waker read only");
        let mut rest = [0u8; 1];
        let ended = client.read(&mut rest);
        assert!(
            matches!(ended, Ok(0)) || ended.is_err(),
            "the peer still sees an open connection: {ended:?}"
        );
    }

    /// A full table: the kernel drops the connection (`-ENFILE`), which is
    /// counted; the accept is re-armed after a delay, not in a loop, and at
    /// once when a close frees a slot.
    #[test]
    fn a_full_table_is_counted_and_rearmed_without_spinning() {
        let waker = Waker::new().expect("waker");
        let Some((mut uring, address)) = backend_with_table(&waker, 2) else {
            return;
        };
        let stats = uring.stats.clone();
        let _first = TcpStream::connect(address).expect("connect");
        let _second = TcpStream::connect(address).expect("connect");
        let mut handles = Vec::new();
        let mut events = Vec::new();
        for _ in 0..200 {
            events.clear();
            uring
                .poll(&mut events, Duration::from_millis(10))
                .expect("poll");
            handles.extend(events.iter().filter_map(|e| match *e {
                Event::Accepted { handle, .. } => Some(handle),
                _ => None,
            }));
            if handles.len() == 2 {
                break;
            }
        }
        assert_eq!(handles.len(), 2);
        let mut dropped = TcpStream::connect(address).expect("connect");
        dropped
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(300) {
            events.clear();
            uring
                .poll(&mut events, Duration::from_millis(10))
                .expect("poll");
            assert!(events.is_empty(), "{events:?}");
        }
        assert_eq!(stats.uring_accept_table_full.load(Ordering::Relaxed), 1);
        let rearms = stats.uring_accept_rearms.load(Ordering::Relaxed);
        assert!(rearms <= 2, "{rearms} re-arms in 300 ms: spinning");
        let mut byte = [0u8; 1];
        assert!(
            !matches!(dropped.read(&mut byte), Ok(1)),
            "the dropped connection is served"
        );

        // The close is submitted by the next poll; a connection arriving
        // before it would still find the table full.
        uring.discard(handles[0]);
        for _ in 0..5 {
            events.clear();
            uring
                .poll(&mut events, Duration::from_millis(10))
                .expect("poll");
        }
        let _third = TcpStream::connect(address).expect("connect");
        poll_until(&mut uring, |e| {
            matches!(e, Event::Accepted { .. }).then_some(())
        });
    }
}
