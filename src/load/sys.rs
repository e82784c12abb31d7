//! The load generator's only calls into the kernel that `std`, `socket2` and
//! `rlimit` do not wrap: epoll, `getrusage`, `sysconf`,
//! `IP_BIND_ADDRESS_NO_PORT`. Every `unsafe` block of `load/` is here but one
//! (`kill` of our own child in `subscribe`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix nanoseconds (the clock `ts=` stamps are read against).
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos() as u64)
        .unwrap_or(0)
}

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// Readiness flags as epoll reports them.
pub mod flags {
    pub const IN: u32 = libc::EPOLLIN as u32;
    pub const OUT: u32 = libc::EPOLLOUT as u32;
    pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
    pub const HUP: u32 = libc::EPOLLHUP as u32;
    pub const ERR: u32 = libc::EPOLLERR as u32;
    pub const ET: u32 = libc::EPOLLET as u32;
}

/// One reported event: the token it was registered with and the flags.
pub type Ready = libc::epoll_event;

/// The epoll token of connection `index`: its index in the high half, the
/// generation (bumped at every reuse of the index) in the low half.
pub fn token(index: usize, generation: u32) -> u64 {
    (index as u64) << 32 | u64::from(generation)
}

/// The connection index and generation of a reported event.
pub fn ready_token(event: &Ready) -> (usize, u32) {
    ((event.u64 >> 32) as usize, event.u64 as u32)
}

/// The flags of a reported event.
pub fn ready_flags(event: &Ready) -> u32 {
    event.events
}

/// A zeroed event list of `capacity` entries for [`Epoll::wait`].
pub fn ready_list(capacity: usize) -> Vec<Ready> {
    vec![libc::epoll_event { events: 0, u64: 0 }; capacity]
}

impl Epoll {
    /// Creates an epoll instance (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a
        // new descriptor that we own from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    fn control(
        &self,
        operation: libc::c_int,
        fd: RawFd,
        interest: u32,
        token: u64,
    ) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: interest,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event that lives across the call; the
        // kernel copies it and keeps no pointer to it.
        let result = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), operation, fd, &mut event) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` for `interest`, reported with `token`.
    pub fn add(&self, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, interest, token)
    }

    /// Changes the interest (and token) of a registered `fd`.
    pub fn modify(&self, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd, interest, token)
    }

    /// Waits up to `timeout` for events; returns how many of `list` were filled.
    /// An interrupted wait returns 0.
    pub fn wait(&self, list: &mut [Ready], timeout: Duration) -> io::Result<usize> {
        // Rounded up: a wait shorter than a millisecond truncated to 0 would
        // make a paced loop spin until its next send is due.
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let capacity = list.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: `list` is a valid, writable array of `capacity` epoll_events
        // for the duration of the call; the kernel writes at most that many.
        let count = unsafe {
            libc::epoll_wait(self.fd.as_raw_fd(), list.as_mut_ptr(), capacity, timeout_ms)
        };
        if count < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(error);
        }
        Ok(count as usize)
    }
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// CPU time used, in seconds: (user, system).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuTime {
    pub user_s: f64,
    pub system_s: f64,
}

impl CpuTime {
    /// User plus system time, in seconds.
    pub fn total_s(&self) -> f64 {
        self.user_s + self.system_s
    }
}

fn rusage(who: libc::c_int) -> CpuTime {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage the kernel fills in.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return CpuTime::default();
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    CpuTime {
        user_s: seconds(usage.ru_utime),
        system_s: seconds(usage.ru_stime),
    }
}

/// CPU time of this process plus its waited-for children.
pub fn cpu_time_self_and_children() -> CpuTime {
    let own = rusage(libc::RUSAGE_SELF);
    let children = rusage(libc::RUSAGE_CHILDREN);
    CpuTime {
        user_s: own.user_s + children.user_s,
        system_s: own.system_s + children.system_s,
    }
}

/// CPU time of this process alone.
pub fn cpu_time_self() -> CpuTime {
    rusage(libc::RUSAGE_SELF)
}

/// Clock ticks per second (the unit of `utime`/`stime` in `/proc/PID/stat`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Page size in bytes (the unit of `/proc/PID/statm`).
pub fn page_size_bytes() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: a later `bind(ip:0)` picks no port, so the
/// port is chosen at `connect` from the full 4-tuple, and one source address
/// can hold more than one connection per port number in use.
pub fn set_bind_address_no_port(fd: RawFd) -> io::Result<()> {
    let enable: libc::c_int = 1;
    // SAFETY: `enable` is a valid c_int that lives across the call, and its
    // size is passed; the kernel only reads it.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basics() {
        assert!(unix_now_ns() > 1_600_000_000_000_000_000);
        assert!(clock_ticks_per_second() >= 100);
        assert!(page_size_bytes() >= 4096);
        assert!(raise_nofile_limit().unwrap() > 0);
        let epoll = Epoll::new().unwrap();
        let mut list = ready_list(4);
        assert_eq!(epoll.wait(&mut list, Duration::ZERO).unwrap(), 0);
    }
}
