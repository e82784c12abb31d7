//! A private network namespace joined to the host by a veth pair, for peers that
//! must vanish without a FIN or an RST.
//!
//! 1. [`NetNs::create`] makes a namespace with a unique name
//!    (`plenum-t-<pid>-<n>`), a veth pair (`pl<pid>h<n>` on the host, `pl<pid>n<n>`
//!    inside), a private /30 out of `10.231.0.0/16` (host end `.1`, namespace end
//!    `.2`; traffic only between the two ends), and permanent neighbour entries on
//!    both ends, so no ARP failure can ever report `EHOSTUNREACH` to a socket (the
//!    kernel would then give that error instead of `ETIMEDOUT`).
//! 2. [`NetNs::run_inside`] runs a closure on a thread that has joined the namespace
//!    (`setns`): sockets it creates live in the namespace, wherever they are used
//!    afterwards. No helper process is needed.
//! 3. [`NetNs::cut`] removes the namespace end's address: packets from the host
//!    still leave the host (its route, neighbour and link are untouched, so no
//!    local error reaches the server's sockets) and are dropped silently on arrival
//!    (the namespace does not forward and so sends no ICMP); nothing can be sent
//!    back. That is a peer gone without a trace — a pulled cable or a NAT that
//!    dropped the flow, as the server sees it.
//! 4. Drop deletes the namespace and the veth pair, also when the test panics.
//!    Namespaces left by a killed test run (their pid no longer exists) are deleted
//!    by the next [`NetNs::create`].
//!
//! Needs root and `ip` (iproute2); without them [`NetNs::create`] skips the test
//! with the reason (a failure under `CI=true`).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::skip;

const NAME_PREFIX: &str = "plenum-t-";

pub struct NetNs {
    name: String,
    host_veth: String,
    ns_veth: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> std::io::Result<Output> {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
}

/// Runs `ip args`, panicking with its stderr on failure.
fn ip_ok(args: &[&str]) -> String {
    let output = ip(args).unwrap_or_else(|error| panic!("ip {args:?}: {error}"));
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Deletes namespaces this suite left behind in runs that were killed.
fn delete_stale_namespaces() {
    let Ok(output) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl NetNs {
    /// Creates the namespace, the veth pair and the addresses (see the module docs).
    pub fn create() -> NetNs {
        if !is_root() {
            skip("a network namespace needs root (run the test as root, or under CI)");
        }
        match ip(&["-V"]) {
            Ok(output) if output.status.success() => {}
            _ => skip("`ip` (iproute2) is not installed (tests/run.sh installs it)"),
        }
        delete_stale_namespaces();

        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("{NAME_PREFIX}{pid}-{n}");
        let host_veth = format!("pl{pid}h{n}");
        let ns_veth = format!("pl{pid}n{n}");
        assert!(host_veth.len() <= 15, "interface name {host_veth} too long");

        // A /30 not already on this host: index into 10.231.0.0/16's 16,384 /30s.
        let addresses = ip_ok(&["-o", "-4", "addr", "show"]);
        let mut index = (pid.wrapping_mul(7919).wrapping_add(n * 131)) % 16384;
        let (host_ip, ns_ip) = loop {
            let base = index * 4;
            let host_ip = Ipv4Addr::new(10, 231, (base >> 8) as u8, (base & 0xff) as u8 + 1);
            let ns_ip = Ipv4Addr::new(10, 231, (base >> 8) as u8, (base & 0xff) as u8 + 2);
            let taken = addresses.contains(&format!("inet {host_ip}/"))
                || addresses.contains(&format!("inet {ns_ip}/"));
            if !taken {
                break (host_ip, ns_ip);
            }
            index = (index + 1) % 16384;
        };

        let added = ip(&["netns", "add", &name]).expect("run ip netns add");
        if !added.status.success() {
            skip(format!(
                "cannot create a network namespace: {}",
                String::from_utf8_lossy(&added.stderr).trim()
            ));
        }
        // From here on, Drop cleans up whatever was made.
        let netns = NetNs {
            name,
            host_veth,
            ns_veth,
            host_ip,
            ns_ip,
        };
        let host_mac = format!(
            "02:a7:{:02x}:{:02x}:{:02x}:01",
            (pid >> 8) & 0xff,
            pid & 0xff,
            n & 0xff
        );
        let ns_mac = format!(
            "02:a7:{:02x}:{:02x}:{:02x}:02",
            (pid >> 8) & 0xff,
            pid & 0xff,
            n & 0xff
        );
        let (name, host, inside) = (&netns.name, &netns.host_veth, &netns.ns_veth);
        let host_cidr = format!("{host_ip}/30");
        let ns_cidr = format!("{ns_ip}/30");
        ip_ok(&[
            "link", "add", host, "address", &host_mac, "type", "veth", "peer", "name", inside,
            "address", &ns_mac, "netns", name,
        ]);
        ip_ok(&["addr", "add", &host_cidr, "dev", host]);
        ip_ok(&["link", "set", host, "up"]);
        ip_ok(&["-n", name, "addr", "add", &ns_cidr, "dev", inside]);
        ip_ok(&["-n", name, "link", "set", inside, "up"]);
        ip_ok(&["-n", name, "link", "set", "lo", "up"]);
        ip_ok(&[
            "neigh",
            "replace",
            &ns_ip.to_string(),
            "lladdr",
            &ns_mac,
            "dev",
            host,
            "nud",
            "permanent",
        ]);
        ip_ok(&[
            "-n",
            name,
            "neigh",
            "replace",
            &host_ip.to_string(),
            "lladdr",
            &host_mac,
            "dev",
            inside,
            "nud",
            "permanent",
        ]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end's address (listen here to be reachable from inside).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace end's address (where the peers' connections come from).
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// Runs `body` on a thread inside the namespace; sockets it creates stay there.
    pub fn run_inside<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|error| panic!("open {path}: {error}"));
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: `file` is an open namespace file of type network, alive
                    // for the call; setns(CLONE_NEWNET) changes only this thread's
                    // network namespace (allowed in a multi-threaded process).
                    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        result,
                        0,
                        "setns({path}): {}",
                        std::io::Error::last_os_error()
                    );
                    body()
                })
                .join()
                .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
        })
    }

    /// Cuts the link silently in both directions (see the module docs, step 3).
    pub fn cut(&self) {
        ip_ok(&["-n", &self.name, "addr", "flush", "dev", &self.ns_veth]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace goes once the
        // last socket in it is closed.
        let _ = ip(&["link", "del", &self.host_veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
