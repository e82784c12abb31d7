//! A private, real nginx reverse proxy in front of a test server.
//!
//! Each [`Nginx`] has its own prefix directory (under the system temp dir, removed
//! on drop), its own config, pid file, error log and temp paths, and listens on a
//! free `127.0.0.1` port; nothing is shared with a system nginx or with another
//! test. It runs in the foreground (`daemon off`) as one process
//! (`master_process off`), so the test owns exactly the PID it spawned and kills
//! only that on drop. One process changes nothing in how the proxy module treats
//! an upstream; it only avoids a master/worker pair whose worker would outlive a
//! killed master.
//!
//! The location is the usual SSE recipe: `proxy_buffering off`, HTTP/1.1 to the
//! upstream with the `Connection` header cleared, a read timeout far above the
//! heartbeat, and `chunked_transfer_encoding off` so the client gets the stream
//! close-delimited, byte for byte as Plenum sent it (the harness's SSE client
//! does not decode chunks). `proxy_pass_header X-Accel-Buffering` passes that
//! header on (nginx consumes it otherwise), so the harness's stream-header check
//! holds end to end.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::flow::TempDir;
use super::{skip, wait_until, START_TIMEOUT};

/// The nginx binary: `/usr/sbin/nginx` (Debian's `nginx-light`), else `nginx` on PATH.
fn nginx_binary() -> Option<PathBuf> {
    let debian = Path::new("/usr/sbin/nginx");
    if debian.exists() {
        return Some(debian.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.exists())
    })
}

/// A running private nginx. Killed (its own PID only) on drop.
pub struct Nginx {
    child: Child,
    addr: SocketAddr,
    error_log: PathBuf,
    // Dropped after the process is killed (field order).
    dir: TempDir,
}

/// A port that was free a moment ago (nginx cannot report a port it picked itself).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl Nginx {
    /// Starts nginx proxying every path to `upstream`, with `extra` directives added
    /// to the location (e.g. `proxy_ignore_client_abort on;`). Skips the test when
    /// nginx is not installed.
    pub fn start(upstream: SocketAddr, extra: &str) -> Nginx {
        let Some(binary) = nginx_binary() else {
            skip("nginx is not installed (tests/run.sh installs the Debian package nginx-light)")
        };
        let mut last_error = String::new();
        // A free port can be taken between our probe and nginx's bind: retry.
        for _attempt in 0..5 {
            let dir = TempDir::new("plenum-nginx");
            let port = free_port();
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let error_log = dir.path().join("error.log");
            let config = config_text(dir.path(), addr, upstream, extra);
            let config_path = dir.path().join("nginx.conf");
            std::fs::write(&config_path, config).expect("write nginx.conf");
            let mut child = Command::new(&binary)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&config_path)
                .arg("-e")
                .arg(&error_log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|error| panic!("cannot spawn {binary:?}: {error}"));
            let up = wait_until(START_TIMEOUT, || {
                matches!(child.try_wait(), Ok(Some(_))) || TcpStream::connect(addr).is_ok()
            });
            match child.try_wait() {
                Ok(None) if up => {
                    return Nginx {
                        child,
                        addr,
                        error_log,
                        dir,
                    }
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = std::fs::read_to_string(&error_log).unwrap_or_default();
                    if !last_error.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("nginx did not start:\n{last_error}");
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// nginx's error log so far (client aborts are logged at `info`).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// The error-log lines that contain `needle`.
    pub fn error_log_lines(&self, needle: &str) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// The config file, for messages.
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nginx.conf")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.error_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- nginx (pid {}, {}) error.log tail ---\n{}",
                self.child.id(),
                self.addr,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn config_text(dir: &Path, listen: SocketAddr, upstream: SocketAddr, extra: &str) -> String {
    let dir = dir.display();
    format!(
        r#"# Private nginx for one Plenum reliability test.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
worker_rlimit_nofile 8192;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream plenum {{
        server {upstream};
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://plenum;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
            chunked_transfer_encoding off;
            proxy_pass_header X-Accel-Buffering;
            {extra}
        }}
    }}
}}
"#
    )
}
