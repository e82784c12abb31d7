//! Start-up probe: can this kernel (and this container) run the io_uring backend?
//!
//! The backend needs more than "io_uring exists": multishot accept into direct
//! descriptors (`IORING_FILE_INDEX_ALLOC`, Linux 5.19), a sparse registered file
//! table as large as one shard's share of the connections, and the opcodes the
//! loop submits. An opcode probe cannot see flags such as multishot, so the
//! probe also *does* the one operation that matters most, on loopback:
//!
//! 1. Read `kernel.io_uring_disabled` and the seccomp mode, to explain an `EPERM`.
//! 2. Set up a small ring (single issuer and cooperative task running when the
//!    kernel takes them, plain otherwise).
//! 3. `IORING_REGISTER_PROBE`: every opcode the backend uses is supported.
//! 4. Register a sparse file table of `files_per_ring` slots. The kernel bounds
//!    it by `RLIMIT_NOFILE` (the soft limit of the registering process) and by
//!    `IORING_MAX_FIXED_FILES` (2^20); both answer `EMFILE`.
//! 5. Multishot-accept one loopback connection into that table and check the
//!    completion carries a direct index and `IORING_CQE_F_MORE`.
//! 6. Socket commands: `SOCKET_URING_OP_SETSOCKOPT` (Linux 6.7) setting
//!    `SO_LINGER {1, 0}` on the accepted direct descriptor, which is exactly
//!    what a stall close does. `EOPNOTSUPP`/`EINVAL` means the kernel lacks it.
//! 7. Close the direct descriptor (fixed-file close), cancel the accept, and
//!    drop the ring; every step is bounded by a one-second ring timeout.
//!
//! Every failure becomes one line that says what to check.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Linux's `IORING_MAX_FIXED_FILES`: the largest registered file table.
pub const FILES_PER_RING_KERNEL_MAX: u32 = 1 << 20;

/// What the probe found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Direct-descriptor slots one ring could register (the registered-table size probed).
    pub files_per_ring_max: u32,
    /// `SOCKET_URING_OP_SETSOCKOPT` is available (Linux 6.7+): stall closes can reset.
    pub socket_commands: bool,
    /// The ring took `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN`.
    pub single_issuer: bool,
    /// The kernel release the probe ran on (`uname -r`).
    pub kernel_release: String,
}

/// Connection slots to register per ring for `connections_max` over `shards`.
///
/// `SO_REUSEPORT` spreads connections by a hash of the 4-tuple, not evenly, so
/// each ring gets its even share plus 1/16 and 64 slots of headroom: for
/// 100,000 connections on 6 shards a shard's share of 16,667 has a standard
/// deviation near 120, and the headroom is over 1,100 slots. The process-wide
/// limit (`--connections-max`, answered with a 503) is what N enforces.
pub fn files_per_ring_for(connections_max: u64, shards: u64) -> u64 {
    let shards = shards.max(1);
    let share = connections_max.div_ceil(shards);
    share + share / 16 + 64
}

/// Probes io_uring for everything the backend requires, asking for a
/// registered file table of `files_per_ring` slots. `Err` carries a one-line
/// reason fit for a log line that names what to check.
pub fn probe(files_per_ring: u32) -> Result<Capabilities, String> {
    let files_per_ring = files_per_ring.max(1);
    let kernel_release = kernel_release();

    let (mut ring, single_issuer) = setup_ring()?;
    check_opcodes(&ring, &kernel_release)?;
    if let Err(error) = ring.submitter().register_files_sparse(files_per_ring) {
        return Err(table_error(&error, files_per_ring, &kernel_release));
    }
    let socket_commands = accept_and_setsockopt(&mut ring, &kernel_release)?;
    Ok(Capabilities {
        files_per_ring_max: files_per_ring,
        socket_commands,
        single_issuer,
        kernel_release,
    })
}

/// Builds an 8-entry ring, with the flags the backend prefers where accepted.
fn setup_ring() -> Result<(IoUring, bool), String> {
    let preferred = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(8);
    match preferred {
        Ok(ring) => Ok((ring, true)),
        // EINVAL: a kernel before 6.0 that does not know one of the flags.
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .build(8)
            .map(|ring| (ring, false))
            .map_err(|error| setup_error(&error)),
        Err(error) => Err(setup_error(&error)),
    }
}

fn setup_error(error: &io::Error) -> String {
    let disabled = read_trimmed("/proc/sys/kernel/io_uring_disabled");
    let seccomp = seccomp_mode();
    match error.raw_os_error() {
        Some(libc::EPERM) => match disabled.as_deref() {
            Some("2") => "io_uring_setup: EPERM: io_uring is disabled for every process \
                 (kernel.io_uring_disabled=2); run `sysctl -w kernel.io_uring_disabled=0` \
                 or use --backend epoll (tuning/GUIDE.md#io_uring-availability)"
                .into(),
            Some("1") => "io_uring_setup: EPERM: io_uring is limited to CAP_SYS_ADMIN and \
                 the kernel.io_uring_group group (kernel.io_uring_disabled=1); run \
                 `sysctl -w kernel.io_uring_disabled=0` or use --backend epoll \
                 (tuning/GUIDE.md#io_uring-availability)"
                .into(),
            other => format!(
                "io_uring_setup: EPERM with kernel.io_uring_disabled={}: blocked by a seccomp \
                 filter (this process: {seccomp}; container runtimes' default profiles deny \
                 io_uring since 2023); allow io_uring_setup, io_uring_enter and \
                 io_uring_register in the profile or use --backend epoll \
                 (tuning/GUIDE.md#io_uring-availability)",
                other.unwrap_or("absent"),
            ),
        },
        Some(libc::ENOSYS) => "io_uring_setup: ENOSYS: this kernel has no io_uring (built \
             without CONFIG_IO_URING, or older than 5.1); use --backend epoll"
            .into(),
        Some(libc::ENOMEM) => "io_uring_setup: ENOMEM: ring memory refused; before Linux 5.12 \
             it counts against RLIMIT_MEMLOCK (`ulimit -l`) \
             (tuning/GUIDE.md#io_uring-availability)"
            .into(),
        _ => format!("io_uring_setup: {error}"),
    }
}

/// The opcodes the backend submits, with the kernel that brought each.
const OPCODES: &[(u8, &str)] = &[
    (opcode::AcceptMulti::CODE, "IORING_OP_ACCEPT (5.5)"),
    (opcode::PollAdd::CODE, "IORING_OP_POLL_ADD (5.1)"),
    (opcode::Send::CODE, "IORING_OP_SEND (5.6)"),
    (opcode::SendMsg::CODE, "IORING_OP_SENDMSG (5.3)"),
    (opcode::Recv::CODE, "IORING_OP_RECV (5.6)"),
    (opcode::Close::CODE, "IORING_OP_CLOSE (5.6)"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL (5.5)"),
    (opcode::Timeout::CODE, "IORING_OP_TIMEOUT (5.4)"),
    (opcode::Read::CODE, "IORING_OP_READ (5.6)"),
];

fn check_opcodes(ring: &IoUring, kernel_release: &str) -> Result<(), String> {
    let mut probe = io_uring::Probe::new();
    if let Err(error) = ring.submitter().register_probe(&mut probe) {
        return Err(format!(
            "io_uring_register(PROBE): {error}: kernel {kernel_release} is older than 5.6; \
             the io_uring backend needs Linux 5.19+ (use --backend epoll)"
        ));
    }
    match OPCODES.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some((_, name)) => Err(format!(
            "kernel {kernel_release} lacks {name}; the io_uring backend needs Linux 5.19+ \
             (use --backend epoll)"
        )),
        None => Ok(()),
    }
}

fn table_error(error: &io::Error, files_per_ring: u32, kernel_release: &str) -> String {
    match error.raw_os_error() {
        Some(libc::EMFILE) => {
            let (soft, hard) = nofile_limits();
            if files_per_ring > FILES_PER_RING_KERNEL_MAX {
                format!(
                    "a registered file table of {files_per_ring} slots exceeds the kernel's \
                     maximum of {FILES_PER_RING_KERNEL_MAX} per ring: use more --shards"
                )
            } else {
                format!(
                    "a registered file table of {files_per_ring} slots exceeds RLIMIT_NOFILE \
                     (soft {soft}, hard {hard}): raise the limit (ulimit -n, LimitNOFILE=) or \
                     use more --shards (tuning/GUIDE.md#open-file-limits)"
                )
            }
        }
        Some(libc::EINVAL) => format!(
            "io_uring_register(FILES2, sparse): EINVAL: kernel {kernel_release} has no sparse \
             file tables (Linux 5.19+ needed; use --backend epoll)"
        ),
        Some(libc::ENOMEM) => format!(
            "io_uring_register(FILES2): ENOMEM for {files_per_ring} slots: too little memory \
             (or RLIMIT_MEMLOCK before Linux 5.12)"
        ),
        _ => format!("io_uring_register(FILES2, {files_per_ring} sparse slots): {error}"),
    }
}

/// `SO_LINGER {on, 0 s}`: close with a reset. A static, so the kernel may read
/// it whenever the socket command runs, even after the probe gave up waiting.
static LINGER_RESET: libc::linger = libc::linger {
    l_onoff: 1,
    l_linger: 0,
};

/// The probe's step timeout, a static for the same reason.
static STEP_TIMEOUT: types::Timespec = types::Timespec::new().sec(1);

const USER_DATA_ACCEPT: u64 = 1;
const USER_DATA_TIMEOUT: u64 = 2;
const USER_DATA_SETSOCKOPT: u64 = 3;
const USER_DATA_CLOSE: u64 = 4;
const USER_DATA_CANCEL: u64 = 5;

/// Steps 5 to 7: a multishot accept into the table, `SO_LINGER` through a
/// socket command, a fixed-file close. Returns whether socket commands work.
fn accept_and_setsockopt(ring: &mut IoUring, kernel_release: &str) -> Result<bool, String> {
    // Loopback can be missing in an unusual network namespace; that is not the
    // kernel's fault, so fall back to the opcode table and the kernel version.
    let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
        return Ok(socket_commands_by_version(ring, kernel_release));
    };
    let Ok(address) = listener.local_addr() else {
        return Ok(socket_commands_by_version(ring, kernel_release));
    };
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .allocate_file_index(true)
        .build()
        .user_data(USER_DATA_ACCEPT);
    push(ring, &accept)?;
    ring.submit()
        .map_err(|error| format!("io_uring_enter: {error}"))?;
    let client = TcpStream::connect_timeout(&address, Duration::from_secs(1))
        .map_err(|error| format!("io_uring probe: loopback connect failed: {error}"))?;

    let accepted = wait_for(ring, USER_DATA_ACCEPT)?;
    if accepted.result() < 0 {
        return Err(format!(
            "multishot accept into a direct descriptor failed: {} (kernel {kernel_release}; \
             Linux 5.19+ needed; use --backend epoll)",
            io::Error::from_raw_os_error(-accepted.result())
        ));
    }
    if !cqueue::more(accepted.flags()) {
        return Err(format!(
            "accept is not multishot on kernel {kernel_release} (Linux 5.19+ needed; use \
             --backend epoll)"
        ));
    }
    let slot = accepted.result() as u32;

    let setsockopt = opcode::SetSockOpt::new(
        types::Fixed(slot),
        libc::SOL_SOCKET as u32,
        libc::SO_LINGER as u32,
        std::ptr::from_ref(&LINGER_RESET).cast(),
        std::mem::size_of::<libc::linger>() as u32,
    )
    .build()
    .user_data(USER_DATA_SETSOCKOPT);
    push(ring, &setsockopt)?;
    let set = wait_for(ring, USER_DATA_SETSOCKOPT)?;
    let socket_commands = set.result() == 0;

    let close = opcode::Close::new(types::Fixed(slot))
        .build()
        .user_data(USER_DATA_CLOSE);
    push(ring, &close)?;
    let closed = wait_for(ring, USER_DATA_CLOSE)?;
    if closed.result() < 0 {
        return Err(format!(
            "closing a direct descriptor failed: {} (kernel {kernel_release})",
            io::Error::from_raw_os_error(-closed.result())
        ));
    }
    let cancel = opcode::AsyncCancel::new(USER_DATA_ACCEPT)
        .build()
        .user_data(USER_DATA_CANCEL);
    push(ring, &cancel)?;
    // The cancel's own completion follows the accept's final one; either may
    // come first, and both are bounded by the timeout in `wait_for`.
    let _ = wait_for(ring, USER_DATA_CANCEL);
    drop(client);
    Ok(socket_commands)
}

/// Without a loopback socket to try it on: `IORING_OP_URING_CMD` in the opcode
/// table and Linux 6.7+ (when `SOCKET_URING_OP_SETSOCKOPT` arrived).
fn socket_commands_by_version(ring: &IoUring, kernel_release: &str) -> bool {
    let mut probe = io_uring::Probe::new();
    let has_uring_cmd = ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(opcode::UringCmd16::CODE);
    has_uring_cmd && kernel_version(kernel_release) >= (6, 7)
}

fn push(ring: &mut IoUring, entry: &squeue::Entry) -> Result<(), String> {
    // SAFETY: the only user memory the probe's entries point at are statics
    // (`LINGER_RESET`, `STEP_TIMEOUT`), which outlive the ring however long a
    // request stays in flight. Descriptors are no memory hazard: the kernel
    // holds its own reference to the listener's file once the accept is
    // issued, so closing ours early cannot make the ring touch freed memory.
    unsafe { ring.submission().push(entry) }
        .map_err(|_| "io_uring probe: submission queue full".to_string())
}

/// Waits up to one second for the completion tagged `user_data`.
fn wait_for(ring: &mut IoUring, user_data: u64) -> Result<cqueue::Entry, String> {
    let timeout = opcode::Timeout::new(&STEP_TIMEOUT)
        .build()
        .user_data(USER_DATA_TIMEOUT);
    push(ring, &timeout)?;
    let mut found = None;
    // Bounded: each turn consumes at least one completion, and the timeout
    // completes within a second; 16 turns are far more than the probe needs.
    for _ in 0..16 {
        ring.submit_and_wait(1)
            .map_err(|error| format!("io_uring_enter: {error}"))?;
        let mut timed_out = false;
        for entry in ring.completion() {
            match entry.user_data() {
                data if data == user_data && found.is_none() => found = Some(entry),
                USER_DATA_TIMEOUT => timed_out = true,
                _ => {}
            }
        }
        if let Some(entry) = found {
            // Remove the pending timer; both its completion and the
            // removal's arrive, so none is left for the next step.
            let remove = opcode::TimeoutRemove::new(USER_DATA_TIMEOUT)
                .build()
                .user_data(USER_DATA_TIMEOUT);
            if !timed_out {
                push(ring, &remove)?;
                ring.submit_and_wait(2)
                    .map_err(|error| format!("io_uring_enter: {error}"))?;
                ring.completion().for_each(drop);
            }
            return Ok(entry);
        }
        if timed_out {
            break;
        }
    }
    Err(format!(
        "io_uring probe: no completion within a second for step {user_data}"
    ))
}

fn kernel_release() -> String {
    read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into())
}

/// `(major, minor)` from a release string such as `6.18.44-fc-v669`.
pub fn kernel_version(release: &str) -> (u32, u32) {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

fn seccomp_mode() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status
        .lines()
        .find_map(|line| line.strip_prefix("Seccomp:"))
        .map(str::trim)
    {
        Some("0") => "Seccomp: 0, no filter".into(),
        Some("2") => "Seccomp: 2, filtered".into(),
        Some(other) => format!("Seccomp: {other}"),
        None => "seccomp mode unknown".into(),
    }
}

fn nofile_limits() -> (u64, u64) {
    rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_per_ring_has_headroom_over_the_even_share() {
        assert_eq!(files_per_ring_for(100_000, 6), 16_667 + 1_041 + 64);
        assert!(files_per_ring_for(100_000, 6) <= 20_000);
        assert!(files_per_ring_for(100_000, 5) > 20_000);
        assert_eq!(files_per_ring_for(0, 4), 64);
        assert_eq!(files_per_ring_for(10, 0), 10 + 64);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), (6, 18));
        assert_eq!(kernel_version("5.4.0-150-generic"), (5, 4));
        assert_eq!(kernel_version("unknown"), (0, 0));
    }

    /// Runs the real probe: skips with a printed reason where io_uring is not
    /// available, and fails under `CI=true` (CI's kernel has io_uring).
    #[test]
    fn probe_succeeds_where_io_uring_works() {
        match probe(64) {
            Ok(capabilities) => {
                assert_eq!(capabilities.files_per_ring_max, 64);
                if kernel_version(&capabilities.kernel_release) >= (6, 7) {
                    assert!(capabilities.socket_commands, "{capabilities:?}");
                }
            }
            Err(reason) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipped: io_uring unavailable here: {reason}");
            }
            Err(reason) => panic!("io_uring probe failed under CI: {reason}"),
        }
    }

    #[test]
    fn a_table_over_the_open_file_limit_names_the_limit() {
        let (soft, _) = nofile_limits();
        if soft >= u64::from(FILES_PER_RING_KERNEL_MAX) {
            eprintln!("skipped: RLIMIT_NOFILE soft limit {soft} is above the kernel maximum");
            return;
        }
        match probe(soft as u32 + 1) {
            Ok(capabilities) => panic!("a table over RLIMIT_NOFILE registered: {capabilities:?}"),
            Err(reason) if reason.contains("io_uring_setup") => {
                eprintln!("skipped: io_uring unavailable here: {reason}");
            }
            Err(reason) => assert!(reason.contains("RLIMIT_NOFILE"), "{reason}"),
        }
    }
}
