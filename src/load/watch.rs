//! `plenum load watch`: samples a process's resources from `/proc`.
//!
//! Each sample reads `/proc/PID/statm` (resident pages), `/proc/PID/stat`
//! (utime + stime in clock ticks, threads) and counts `/proc/PID/fd`. The
//! `subscribe` parent uses the same sampler for `--server-pid`. Samples are
//! paced by the clock (deadline = start + k × interval), so a slow sample does
//! not shift the ones after it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::report::{thousands, write_json};
use super::sys;

/// `plenum load watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The process to watch.
    #[arg(long, value_name = "PID")]
    pub pid: u32,
    /// Time between samples.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = super::parse_duration)]
    pub interval: Duration,
    /// How long to watch (the watch also ends when the process exits).
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = super::parse_duration)]
    pub duration: Duration,
    /// Write the samples as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// One sample of a process.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcSample {
    /// Seconds since the watch started.
    pub t_s: f64,
    /// Resident set size, in bytes.
    pub rss_bytes: u64,
    /// Open file descriptors (io_uring direct descriptors are not counted).
    pub fds: u64,
    /// Threads.
    pub threads: u64,
    /// User + system CPU time used since the process started, in seconds.
    pub cpu_s: f64,
}

/// Reads one sample of `pid`; `None` once the process is gone.
pub fn sample(pid: u32, t_s: f64) -> Option<ProcSample> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (cpu_ticks, threads) = parse_stat(&stat)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count() as u64)
        .unwrap_or(0);
    Some(ProcSample {
        t_s,
        rss_bytes: resident_pages * sys::page_size_bytes(),
        fds,
        threads,
        cpu_s: cpu_ticks as f64 / sys::clock_ticks_per_second() as f64,
    })
}

/// From `/proc/PID/stat`: (utime + stime in ticks, threads). The command name
/// (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 (state) on; utime is field 14, stime 15, num_threads 20.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
    Some((field(14)? + field(15)?, field(20)?))
}

/// Summary of a series of samples.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleSummary {
    pub samples: usize,
    pub rss_bytes_first: u64,
    pub rss_bytes_max: u64,
    pub rss_bytes_last: u64,
    pub fds_max: u64,
    pub threads_max: u64,
    /// CPU seconds used between the first and the last sample.
    pub cpu_s: f64,
    /// Average CPU use between the first and last sample, in percent of one core.
    pub cpu_percent: f64,
}

/// Summarizes samples (empty summary for no samples).
pub fn summarize(samples: &[ProcSample]) -> SampleSummary {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return SampleSummary::default();
    };
    let cpu_s = (last.cpu_s - first.cpu_s).max(0.0);
    let wall_s = last.t_s - first.t_s;
    SampleSummary {
        samples: samples.len(),
        rss_bytes_first: first.rss_bytes,
        rss_bytes_max: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        rss_bytes_last: last.rss_bytes,
        fds_max: samples.iter().map(|s| s.fds).max().unwrap_or(0),
        threads_max: samples.iter().map(|s| s.threads).max().unwrap_or(0),
        cpu_s,
        cpu_percent: if wall_s > 0.0 {
            100.0 * cpu_s / wall_s
        } else {
            0.0
        },
    }
}

#[derive(serde::Serialize)]
struct WatchReport<'a> {
    command: &'static str,
    pid: u32,
    interval_s: f64,
    summary: SampleSummary,
    samples: &'a [ProcSample],
}

/// Runs `plenum load watch`.
pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(!args.interval.is_zero(), "--interval must be above 0");
    let start = Instant::now();
    let samples_max = (args.duration.as_secs_f64() / args.interval.as_secs_f64()).ceil() as u64 + 1;
    let mut samples = Vec::new();
    println!(
        "{:>8} {:>12} {:>8} {:>8} {:>8}",
        "t_s", "rss_kib", "fds", "threads", "cpu_%"
    );
    for index in 0..samples_max {
        let due = start + args.interval.mul_f64(index as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let Some(current) = sample(args.pid, start.elapsed().as_secs_f64()) else {
            if samples.is_empty() {
                anyhow::bail!(
                    "process {} not found (or /proc/{}/ not readable)",
                    args.pid,
                    args.pid
                );
            }
            println!("process {} exited", args.pid);
            break;
        };
        let cpu_percent = match samples.last() {
            Some(previous @ ProcSample { .. }) if current.t_s > previous.t_s => {
                100.0 * (current.cpu_s - previous.cpu_s) / (current.t_s - previous.t_s)
            }
            _ => 0.0,
        };
        println!(
            "{:>8.1} {:>12} {:>8} {:>8} {:>8.1}",
            current.t_s,
            thousands(current.rss_bytes / 1024),
            current.fds,
            current.threads,
            cpu_percent
        );
        samples.push(current);
    }
    let summary = summarize(&samples);
    println!(
        "rss max {} KiB, fds max {}, threads max {}, cpu {:.2} s ({:.1}% of one core)",
        thousands(summary.rss_bytes_max / 1024),
        summary.fds_max,
        summary.threads_max,
        summary.cpu_s,
        summary.cpu_percent
    );
    if let Some(path) = &args.json {
        let report = WatchReport {
            command: "watch",
            pid: args.pid,
            interval_s: args.interval.as_secs_f64(),
            summary,
            samples: &samples,
        };
        write_json(path, &report).context("writing the watch report")?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let stat =
            "1234 (a) b (c)) S 1 1 1 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 2000 300";
        assert_eq!(parse_stat(stat), Some((300, 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn samples_this_process() {
        let me = sample(std::process::id(), 0.0).expect("own /proc entry");
        assert!(me.rss_bytes > 0);
        assert!(me.fds >= 3);
        assert!(me.threads >= 1);
        assert!(sample(u32::MAX - 1, 0.0).is_none());
    }

    #[test]
    fn summary_of_samples() {
        let samples = [
            ProcSample {
                t_s: 0.0,
                rss_bytes: 100,
                fds: 5,
                threads: 2,
                cpu_s: 1.0,
            },
            ProcSample {
                t_s: 2.0,
                rss_bytes: 300,
                fds: 9,
                threads: 2,
                cpu_s: 2.0,
            },
            ProcSample {
                t_s: 4.0,
                rss_bytes: 200,
                fds: 7,
                threads: 3,
                cpu_s: 3.0,
            },
        ];
        let summary = summarize(&samples);
        assert_eq!(
            (
                summary.rss_bytes_max,
                summary.rss_bytes_last,
                summary.fds_max
            ),
            (300, 200, 9)
        );
        assert_eq!(summary.threads_max, 3);
        assert!((summary.cpu_s - 2.0).abs() < 1e-9);
        assert!((summary.cpu_percent - 50.0).abs() < 1e-9);
    }
}
