//! Listeners and the socket options every connection inherits.
//!
//! Each shard gets its own `SO_REUSEPORT` listener per address, so the kernel
//! spreads incoming connections over the shards without a shared accept
//! queue. The first shard binds (port 0 lets the kernel pick) and the others
//! bind to the port it got.
//!
//! The TCP options that make dead peers visible are set once, on the
//! listener; Linux copies them into every accepted socket (`tests/
//! socket_options.rs` checks that): keepalive idle/interval/count,
//! `TCP_USER_TIMEOUT`, `TCP_NODELAY` and the send-buffer cap. Setting them on
//! the listener is also what lets the io_uring backend, whose connections are
//! direct descriptors, have them without a syscall per connection.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use crate::config::Config;

/// Binds `config.shards` listeners per address: `result[shard]` holds that
/// shard's listeners, one per `--listen` address, in order.
pub fn bind_all(config: &Config) -> anyhow::Result<Vec<Vec<TcpListener>>> {
    let mut per_shard: Vec<Vec<TcpListener>> = (0..config.shards).map(|_| Vec::new()).collect();
    for &requested in &config.listen {
        let mut address = requested;
        for listeners in per_shard.iter_mut() {
            let listener = bind(address, config).map_err(|error| {
                let hint = match error.raw_os_error() {
                    Some(libc::EADDRINUSE) => " (another process holds this port)",
                    Some(libc::EACCES) => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
                    Some(libc::EADDRNOTAVAIL) => " (no interface has this address)",
                    _ => "",
                };
                anyhow::anyhow!("cannot listen on {address}: {error}{hint}")
            })?;
            // Port 0: the others reuse the port the first one got.
            address = listener.local_addr()?;
            listeners.push(listener);
        }
    }
    Ok(per_shard)
}

fn bind(address: SocketAddr, config: &Config) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    apply_connection_options(&socket, config)?;
    socket.bind(&address.into())?;
    socket.listen(config.backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// The options accepted sockets inherit from the listener.
fn apply_connection_options(socket: &Socket, config: &Config) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    if !config.keepalive_idle.is_zero() {
        let keepalive = TcpKeepalive::new()
            .with_time(config.keepalive_idle)
            .with_interval(config.keepalive_interval)
            .with_retries(config.keepalive_count);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    if !config.tcp_user_timeout.is_zero() {
        socket.set_tcp_user_timeout(Some(config.tcp_user_timeout))?;
    }
    if config.socket_send_buffer_bytes > 0 {
        socket.set_send_buffer_size(config.socket_send_buffer_bytes)?;
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_open_file_limit() -> io::Result<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit the kernel fills.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a live, initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX))
}
