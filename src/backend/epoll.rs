//! The epoll backend: edge-triggered readiness, non-blocking syscalls.
//!
//! Every connection is registered once with `EPOLLIN | EPOLLOUT | EPOLLRDHUP |
//! EPOLLET` and never modified: with edge triggering the kernel reports each
//! transition once, and the shard keeps its own record of what is blocked.
//! `EPOLLRDHUP` is what reports a peer's FIN while the server has nothing to
//! write (the CLOSE_WAIT zombie). Listeners and the waker's eventfd are
//! registered with reserved tokens above [`Token::SLOT_MAX`].

use std::io::{self, IoSlice};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::{Backend, Event, Handle, Io, Token};

/// Reserved tokens have generation 0 and a slot above [`Token::SLOT_MAX`].
const WAKER_TOKEN: u64 = u32::MAX as u64;
/// Listener `i` is registered as `LISTENER_TOKEN_BASE - i`.
const LISTENER_TOKEN_BASE: u64 = u32::MAX as u64 - 1;
/// Accepts per listener per poll: the rest wait for the next turn, so a
/// connect storm cannot starve the connections already served.
const ACCEPTS_PER_TURN_MAX: usize = 256;
const EVENTS_PER_POLL_MAX: usize = 1024;

#[derive(Debug)]
pub struct Epoll {
    epoll: OwnedFd,
    listeners: Vec<TcpListener>,
    /// Listeners that may still have connections queued (edge-triggered:
    /// no new event arrives for them until they were drained).
    accept_pending: Vec<bool>,
    ready: Vec<libc::epoll_event>,
}

impl Epoll {
    /// Creates the epoll instance and registers the listeners (non-blocking)
    /// and the waker's eventfd.
    pub fn new(listeners: Vec<TcpListener>, waker_fd: RawFd) -> io::Result<Epoll> {
        // SAFETY: no memory arguments; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let accept_pending = vec![true; listeners.len()];
        let backend = Epoll {
            epoll,
            listeners,
            accept_pending,
            ready: Vec::with_capacity(EVENTS_PER_POLL_MAX),
        };
        for (i, listener) in backend.listeners.iter().enumerate() {
            listener.set_nonblocking(true)?;
            backend.add(
                listener.as_raw_fd(),
                LISTENER_TOKEN_BASE - i as u64,
                libc::EPOLLIN | libc::EPOLLET,
            )?;
        }
        backend.add(waker_fd, WAKER_TOKEN, libc::EPOLLIN | libc::EPOLLET)?;
        Ok(backend)
    }

    fn add(&self, fd: RawFd, data: u64, flags: i32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: flags as u32,
            u64: data,
        };
        // SAFETY: `event` is a live, initialised epoll_event; the kernel copies it.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Accepts up to the per-turn budget from listener `index`.
    fn accept_from(&mut self, index: usize, events: &mut Vec<Event>) {
        let fd = self.listeners[index].as_raw_fd();
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
            let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: `storage` and `len` are live and sized for any address family.
            let conn = unsafe {
                libc::accept4(
                    fd,
                    (&mut storage as *mut libc::sockaddr_storage).cast(),
                    &mut len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if conn < 0 {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EAGAIN) => self.accept_pending[index] = false,
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => continue,
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        // Out of descriptors or memory: leave the connection queued and
                        // retry on the next turn (the poll timeout is not zero then, so
                        // this does not spin).
                        log::warn!(
                            "accept: {error}; connections wait in the backlog (see tuning/GUIDE.md#open-file-limits)"
                        );
                        self.accept_pending[index] = false;
                    }
                    _ => log::warn!("accept: {error}"),
                }
                return;
            }
            match super::socket_addr(&storage) {
                Some(peer) => events.push(Event::Accepted {
                    handle: Handle(conn as u32),
                    peer,
                }),
                None => {
                    // SAFETY: `conn` is a descriptor we own and nobody else saw.
                    unsafe { libc::close(conn) };
                }
            }
        }
        // Budget spent: more may be queued.
        self.accept_pending[index] = true;
    }
}

fn result(rc: isize) -> Io {
    if rc >= 0 {
        return Io::Done(rc as usize);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Io::Blocked,
        _ => Io::Failed(error),
    }
}

impl Backend for Epoll {
    fn name(&self) -> &'static str {
        "epoll"
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Duration) -> io::Result<()> {
        let accepting = self.accept_pending.iter().any(|&pending| pending);
        let timeout_ms = if accepting {
            0
        } else {
            timeout.as_millis().min(i32::MAX as u128) as i32
        };
        self.ready.clear();
        // SAFETY: `ready` has capacity for EVENTS_PER_POLL_MAX events; the kernel
        // writes at most that many and we set the length to what it reports.
        let count = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.ready.as_mut_ptr(),
                EVENTS_PER_POLL_MAX as i32,
                timeout_ms,
            )
        };
        if count < 0 {
            let error = io::Error::last_os_error();
            return if error.raw_os_error() == Some(libc::EINTR) {
                Ok(())
            } else {
                Err(error)
            };
        }
        // SAFETY: the kernel initialised the first `count` entries.
        unsafe { self.ready.set_len(count as usize) };
        for i in 0..self.ready.len() {
            let ready = self.ready[i];
            let (flags, data) = (ready.events as i32, ready.u64);
            if data == WAKER_TOKEN {
                events.push(Event::Wake);
            } else if data <= LISTENER_TOKEN_BASE && data > Token::SLOT_MAX as u64 {
                let index = (LISTENER_TOKEN_BASE - data) as usize;
                if let Some(pending) = self.accept_pending.get_mut(index) {
                    *pending = true;
                }
            } else {
                events.push(Event::Ready {
                    token: Token::from_raw(data),
                    readable: flags & libc::EPOLLIN != 0,
                    writable: flags & libc::EPOLLOUT != 0,
                    hangup: flags & (libc::EPOLLRDHUP | libc::EPOLLHUP) != 0,
                    error: flags & libc::EPOLLERR != 0,
                });
            }
        }
        for index in 0..self.listeners.len() {
            if self.accept_pending[index] {
                self.accept_from(index, events);
            }
        }
        Ok(())
    }

    fn register(&mut self, handle: Handle, token: Token) -> io::Result<()> {
        self.add(
            handle.0 as RawFd,
            token.raw(),
            libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET,
        )
    }

    fn recv(&mut self, handle: Handle, _token: Token, buf: &mut [u8]) -> Io {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
        let rc = unsafe { libc::recv(handle.0 as RawFd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        match result(rc) {
            Io::Done(0) if !buf.is_empty() => Io::Eof,
            other => other,
        }
    }

    fn send(&mut self, handle: Handle, _token: Token, bufs: &[IoSlice<'_>]) -> Io {
        // SAFETY: IoSlice is ABI-compatible with iovec; every slice is live for
        // the call. MSG_NOSIGNAL turns a write to a closed peer into EPIPE
        // instead of SIGPIPE.
        let rc = unsafe {
            let mut message: libc::msghdr = std::mem::zeroed();
            message.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            message.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
            libc::sendmsg(
                handle.0 as RawFd,
                &message,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        result(rc)
    }

    fn take_error(&mut self, handle: Handle) -> Option<io::Error> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live and sized for SO_ERROR's int.
        let rc = unsafe {
            libc::getsockopt(
                handle.0 as RawFd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            Some(io::Error::last_os_error())
        } else if value != 0 {
            Some(io::Error::from_raw_os_error(value))
        } else {
            None
        }
    }

    fn close(&mut self, handle: Handle, _token: Token, reset: bool) -> bool {
        let fd = handle.0 as RawFd;
        if reset {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: `linger` is live and of the size passed.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }
        // SAFETY: the shard owns `fd` and closes it exactly once; closing also
        // removes it from the epoll set.
        unsafe { libc::close(fd) };
        true
    }

    fn discard(&mut self, handle: Handle) {
        // SAFETY: an accepted, unregistered descriptor we own.
        unsafe { libc::close(handle.0 as RawFd) };
    }

    fn stop_accepting(&mut self) {
        self.listeners.clear();
        self.accept_pending.clear();
    }
}
