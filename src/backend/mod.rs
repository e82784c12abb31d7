//! I/O backends: the only code that talks to the kernel's event interfaces.
//!
//! A shard drives exactly one backend. The connection state machine above it
//! knows nothing of epoll or io_uring; it speaks this contract:
//!
//! 1. **Accept.** The backend accepts on the shard's listeners and reports
//!    [`Event::Accepted`] with a [`Handle`] and the peer address. The shard
//!    either [`Backend::register`]s the handle under a [`Token`] or closes it.
//! 2. **Readiness.** [`Event::Ready`] says a registered connection may have
//!    progressed: `readable` (data or EOF to receive), `writable` (a blocked
//!    send may proceed), `hangup` (the peer sent FIN — `EPOLLRDHUP`/`POLLRDHUP`
//!    — or the socket is fully closed), `error` (a socket error is pending:
//!    read it with [`Backend::take_error`]). Events may be spurious: a
//!    `readable` with nothing to read yields [`Io::Blocked`]. Events for a token
//!    whose slot was reused carry the old generation and must be dropped.
//! 3. **Operations.** [`Backend::recv`] and [`Backend::send`] never block.
//!    [`Io::Blocked`] means "not now": the backend reports the connection
//!    again when it can progress. A completion-based backend (io_uring)
//!    starts the operation and answers `Blocked`; its result is returned by
//!    the *next* call for that token, after the `Ready` event. So after
//!    `Blocked` the caller must pass the same buffers again (same addresses,
//!    same order; more may be appended) and keep them alive and unchanged
//!    until then — in practice: the outbox's front frame and the request
//!    buffer are not touched while an operation is in flight. (The shard
//!    does rewrite its request buffer between two `recv` calls — it
//!    zero-fills the room it offers — and shares one discard buffer among
//!    its streams, so the io_uring backend receives into buffers of its own
//!    and copies out on the second call; only send buffers are relied on.)
//! 4. **Close.** [`Backend::close`] (with `reset` for an `SO_LINGER 0` abort)
//!    returns `true` if the slot may be reused at once, or `false` if
//!    operations are still in flight; then [`Event::Closed`] follows once the
//!    kernel holds no reference to the connection's buffers, and only then
//!    may the shard drop them.
//! 5. **Wake-ups.** The hub wakes a shard through its [`Waker`];
//!    the backend reports [`Event::Wake`].

pub mod epoll;
pub mod uring;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A connection's identity in events: slot index and generation. The
/// generation changes every time a slot is reused, so a late event for the
/// previous occupant is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u64);

impl Token {
    /// The largest slot index a token can carry; higher values are reserved
    /// for the backends' own descriptors (listeners, the waker).
    pub const SLOT_MAX: u32 = u32::MAX - 1024;

    pub fn new(slot: u32, generation: u32) -> Token {
        debug_assert!(slot <= Self::SLOT_MAX);
        Token(((generation as u64) << 32) | slot as u64)
    }

    pub fn from_raw(raw: u64) -> Token {
        Token(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn slot(self) -> u32 {
        self.0 as u32
    }

    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// The backend's name for a connection: a file descriptor (epoll) or a
/// direct-descriptor index in the ring's file table (io_uring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle(pub u32);

/// What the backend reports to its shard.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    Accepted {
        handle: Handle,
        peer: SocketAddr,
    },
    Ready {
        token: Token,
        readable: bool,
        writable: bool,
        hangup: bool,
        error: bool,
    },
    Closed {
        token: Token,
    },
    Wake,
}

/// The result of a non-blocking operation.
#[derive(Debug)]
pub enum Io {
    /// This many bytes moved (never 0 for a send of non-empty buffers).
    Done(usize),
    /// The peer finished sending (receive only).
    Eof,
    /// Not now; a `Ready` event follows when it can progress.
    Blocked,
    Failed(io::Error),
}

/// The operations a shard needs; see the module documentation.
pub trait Backend {
    fn name(&self) -> &'static str;
    /// Waits up to `timeout` (zero: do not wait) and appends events.
    fn poll(&mut self, events: &mut Vec<Event>, timeout: Duration) -> io::Result<()>;
    fn register(&mut self, handle: Handle, token: Token) -> io::Result<()>;
    fn recv(&mut self, handle: Handle, token: Token, buf: &mut [u8]) -> Io;
    fn send(&mut self, handle: Handle, token: Token, bufs: &[IoSlice<'_>]) -> Io;
    /// The socket's pending error (`SO_ERROR`), if any.
    fn take_error(&mut self, handle: Handle) -> Option<io::Error>;
    /// Closes the connection; see the module documentation for the return value.
    fn close(&mut self, handle: Handle, token: Token, reset: bool) -> bool;
    /// Closes an accepted connection that was never registered.
    fn discard(&mut self, handle: Handle);
    /// Stops accepting: closes the listeners (shutdown).
    fn stop_accepting(&mut self);
}

/// Converts an address the kernel filled in (accept) to a `SocketAddr`.
pub fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which
            // is smaller than sockaddr_storage and has no stricter alignment.
            let v4 =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let v6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(v6.sin6_port))))
        }
        _ => None,
    }
}

/// Wakes a sleeping shard from another thread: an `eventfd` plus a flag so
/// that a burst of publishes costs one syscall per shard, not one per event.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
    /// True between a wake-up write and the shard's `disarm`: further wakes
    /// are free. Invariant: whenever an item is pushed into the shard's inbox
    /// and then `wake` is called, either this flag was false (and the eventfd
    /// is written) or the shard has not yet disarmed, and will drain the inbox
    /// after it does.
    armed: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker {
            fd,
            armed: AtomicBool::new(false),
        })
    }

    /// Wakes the shard unless a wake-up is already pending.
    pub fn wake(&self) {
        if !self.armed.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            // A failure can only be EAGAIN (counter saturated: already awake).
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Called by the shard before it drains its inbox.
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// Resets the eventfd counter after its readiness was reported.
    pub fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from an eventfd we own;
        // EAGAIN (nothing to read) is harmless.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
