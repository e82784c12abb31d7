//! `plenum serve`: start-up, the shard threads, signals and shutdown.
//!
//! Start-up, in order: raise the open-file limit, resolve and validate the
//! configuration, bind every shard's listeners, create the hub, start one
//! thread per shard (pinned to a CPU when there are enough), wait until each
//! has its event loop, then print `listening ADDR` lines. Shutdown: on
//! SIGTERM or SIGINT, `/healthz` turns 503 and the shards drain (see
//! [`crate::shard`]); the process exits when they are done or when
//! `--shutdown-timeout` has passed, whichever comes first.

use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use anyhow::Context;

use crate::backend::epoll::Epoll;
use crate::backend::uring::{self, probe, Uring};
use crate::backend::{Backend, Waker};
use crate::config::{BackendChoice, Config, ServeArgs};
use crate::http::Limits;
use crate::hub::Hub;
use crate::metrics::ShardStats;
use crate::shard::{Shard, Shared};

/// Messages from the shard threads and the signal thread to the main thread.
enum Notice {
    Started,
    StartFailed(String),
    Stopped { shard: usize, error: Option<String> },
    Signal(i32),
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let open_files_max =
        crate::net::raise_open_file_limit().context("reading the open-file limit")?;
    let config = args.resolve(open_files_max)?;
    init_logging(&config.log_level);
    let chosen = choose_backend(&config, open_files_max)?;
    // One warning per host knob that would stop `--connections-max`
    // connections, instead of EMFILE under load later.
    for warning in crate::check::startup_warnings(
        config.connections_max as u64,
        chosen.name(),
        config.shards,
        config.backlog,
        config.socket_send_buffer_bytes as u64,
    ) {
        log::warn!("{warning}");
    }
    let listeners = crate::net::bind_all(&config)?;
    let addresses: Vec<_> = listeners[0]
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;

    let wakers = (0..config.shards)
        .map(|_| Waker::new())
        .collect::<Result<Vec<_>, _>>()?;
    let hub = Arc::new(Hub::new(
        wakers,
        config.shard_inbox_events,
        config.history_events_max,
        config.history_bytes_max,
    ));
    let limits = Limits {
        head_bytes_max: config.request_head_bytes_max,
        body_bytes_max: config.publish_body_bytes_max,
        topics_max: config.topics_per_connection_max,
        authorization: config
            .publish_token
            .as_ref()
            .map(|token| format!("Bearer {token}")),
    };
    let shared = Arc::new(Shared {
        stats: (0..config.shards)
            .map(|_| Arc::new(ShardStats::default()))
            .collect(),
        hub,
        backend_name: chosen.name(),
        limits,
        connections_open: AtomicUsize::new(0),
        per_ip: Mutex::new(HashMap::new()),
        draining: AtomicBool::new(false),
        config: config.clone(),
    });

    let (notices, inbox) = mpsc::channel::<Notice>();
    let cpus = allowed_cpus();
    let mut threads = Vec::new();
    for (index, listeners) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let notices = notices.clone();
        let cpu = (config.shards <= cpus.len()).then(|| cpus[index]);
        let thread = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu);
                }
                let waker_fd = shared.hub.feed(index).waker.raw_fd();
                match chosen {
                    Chosen::Epoll => {
                        let backend = Epoll::new(listeners, waker_fd);
                        run_shard(index, backend, shared, &notices);
                    }
                    Chosen::Uring(options) => {
                        let stats = shared.stats[index].clone();
                        let backend = Uring::new(listeners, waker_fd, options, stats);
                        run_shard(index, backend, shared, &notices);
                    }
                }
            })
            .context("starting a shard thread")?;
        threads.push(thread);
    }
    for _ in 0..config.shards {
        match inbox
            .recv()
            .context("a shard thread ended during start-up")?
        {
            Notice::Started => {}
            Notice::StartFailed(reason) => anyhow::bail!("{reason}"),
            _ => anyhow::bail!("a shard stopped during start-up"),
        }
    }
    spawn_signal_thread(notices)?;

    log::info!(
        "plenum {} serving: backend={} shards={} connections_max={} listen={}",
        env!("CARGO_PKG_VERSION"),
        chosen.name(),
        config.shards,
        config.connections_max,
        addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    {
        let mut stdout = std::io::stdout().lock();
        for address in &addresses {
            writeln!(stdout, "listening {address}")?;
        }
        stdout.flush()?;
    }

    let mut running = config.shards;
    let mut failed = false;
    let mut shutdown_started: Option<Instant> = None;
    loop {
        let notice = match shutdown_started {
            None => inbox.recv().ok(),
            Some(started) => {
                let left = config.shutdown_timeout.saturating_sub(started.elapsed());
                inbox.recv_timeout(left).ok()
            }
        };
        match notice {
            Some(Notice::Signal(signal)) => {
                if shutdown_started.is_some() {
                    log::warn!("second signal {signal}: exiting now");
                    return Ok(ExitCode::FAILURE);
                }
                log::info!(
                    "signal {signal}: draining (at most {:?})",
                    config.shutdown_timeout
                );
                shutdown_started = Some(Instant::now());
                begin_shutdown(&shared);
            }
            Some(Notice::Stopped { shard, error }) => {
                running -= 1;
                if let Some(error) = error {
                    log::error!("shard {shard} failed: {error}");
                    failed = true;
                    if shutdown_started.is_none() {
                        shutdown_started = Some(Instant::now());
                        begin_shutdown(&shared);
                    }
                }
                if running == 0 {
                    break;
                }
            }
            Some(_) => {}
            None => {
                log::warn!(
                    "shutdown timeout reached with {running} shard(s) still draining: exiting"
                );
                break;
            }
        }
    }
    log::info!("stopped");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The backend the shards run, after the probe.
#[derive(Debug, Clone, Copy)]
enum Chosen {
    Epoll,
    Uring(uring::Options),
}

impl Chosen {
    fn name(self) -> &'static str {
        match self {
            Chosen::Epoll => "epoll",
            Chosen::Uring(_) => "uring",
        }
    }
}

/// Resolves `--backend`: `auto` probes io_uring and falls back to epoll with
/// the reason in one log line; `uring` fails start-up with the reason.
fn choose_backend(config: &Config, open_files_max: usize) -> anyhow::Result<Chosen> {
    if config.backend == BackendChoice::Epoll {
        return Ok(Chosen::Epoll);
    }
    let wanted = probe::files_per_ring_for(config.connections_max as u64, config.shards as u64);
    let files_per_ring = wanted
        .min(open_files_max as u64)
        .min(probe::FILES_PER_RING_KERNEL_MAX as u64)
        .max(1) as u32;
    if wanted > files_per_ring as u64 {
        log::warn!(
            "--connections-max {} over {} shards needs {wanted} direct descriptors per ring, \
             but a ring holds at most {files_per_ring} (RLIMIT_NOFILE, or the kernel's maximum): \
             past that, connections are dropped by the kernel, not answered 503; use more \
             --shards (tuning/GUIDE.md#open-file-limits)",
            config.connections_max,
            config.shards,
        );
    }
    match probe::probe(files_per_ring) {
        Ok(capabilities) => {
            if !capabilities.socket_commands {
                log::warn!(
                    "io_uring socket commands are unavailable (Linux 6.7+): stall closes end \
                     without a reset and peer addresses are unknown"
                );
            }
            Ok(Chosen::Uring(uring::Options {
                files_per_ring,
                socket_commands: capabilities.socket_commands,
            }))
        }
        Err(reason) if config.backend == BackendChoice::Auto => {
            log::warn!("io_uring unavailable, using epoll: {reason}");
            Ok(Chosen::Epoll)
        }
        Err(reason) => anyhow::bail!("--backend uring: io_uring unavailable: {reason}"),
    }
}

/// Runs one shard's loop on `backend` and reports start and stop to the main thread.
fn run_shard<B: Backend>(
    index: usize,
    backend: std::io::Result<B>,
    shared: Arc<Shared>,
    notices: &mpsc::Sender<Notice>,
) {
    let backend = match backend {
        Ok(backend) => backend,
        Err(error) => {
            let _ = notices.send(Notice::StartFailed(format!(
                "shard {index}: backend: {error}"
            )));
            return;
        }
    };
    let name = backend.name();
    let _ = notices.send(Notice::Started);
    let error = Shard::new(index, backend, shared)
        .run()
        .err()
        .map(|e| format!("{name}: {e}"));
    let _ = notices.send(Notice::Stopped {
        shard: index,
        error,
    });
}

fn begin_shutdown(shared: &Shared) {
    shared.draining.store(true, Ordering::Release);
    for feed in shared.hub.feeds() {
        feed.waker.wake();
    }
}

fn spawn_signal_thread(notices: mpsc::Sender<Notice>) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if notices.send(Notice::Signal(signal)).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

fn init_logging(level: &str) {
    let _ = env_logger::Builder::new()
        .parse_filters(level)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .try_init();
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set. The kernel
    // fills at most size_of::<cpu_set_t>() bytes.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: as above; the set is live for the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The configuration a test or bench would start with.
pub fn default_config() -> Config {
    ServeArgs::default()
        .resolve(1024)
        .expect("defaults are valid")
}
