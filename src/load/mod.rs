//! `plenum load`: a load generator and dead-peer tester for any SSE server.
//!
//! It speaks only HTTP/1.1 and `text/event-stream`, so it measures Plenum and
//! any other server the same way. The subcommands:
//!
//! - `subscribe` ([`subscribe`]): N streaming connections spread over child
//!   processes and source addresses, each process one thread on raw epoll;
//!   checks each stream's `seq=` sequence and records `ts=` latency.
//! - `publish` ([`publish`]): paced `POST`s with a `{seq}`/`{ts}` body template
//!   over keep-alive connections.
//! - `misbehave` ([`misbehave`]): connections that stall, half-close, reset,
//!   vanish or dribble their request, and how long the server takes to notice.
//! - `watch` ([`watch`]): samples a server's RSS, fds, threads and CPU.
//!
//! Every loop is bounded by a count or a deadline (`--duration` everywhere),
//! and the tool only connects to the addresses it is given.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

pub mod chart;
pub mod http;
pub mod misbehave;
pub mod publish;
pub mod report;
pub mod sse;
pub mod subscribe;
pub mod sys;
pub mod track;
pub mod watch;

/// What `plenum load subscribe --help` says after the flags.
const SUBSCRIBE_AFTER_HELP: &str = "\
Events whose data holds `seq=<n>` are checked per connection (the first seq sets the \
baseline; then each must be the previous + 1: a jump is a gap, a repeat or step back a \
duplicate), also across --reconnect; `event: plenum-gap` is counted as a gap signal and \
resets the baseline. With `ts=<unix-nanos>` the publish-to-receive latency is recorded. \
Use `plenum load publish` (one connection) to produce such events.

Exit status: 0 when every connection connected, no attempt failed, no gap or duplicate \
was seen and --expect-events (if given) was met; 2 when a check failed; 1 on an error.

Example (100,000 streams from 19 source addresses, 6 processes):
  plenum load subscribe --url http://127.0.0.1:8080/events?topic=a --connections 100000 \\
    --source-ips 127.0.0.2-127.0.0.20 --reconnect --duration 90s --server-pid $(pidof plenum) \\
    --json report.json --svg report.svg";

/// `plenum load`: load generator for any SSE server.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    #[command(subcommand)]
    pub command: LoadCommand,
}

/// The `plenum load` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LoadCommand {
    /// Open N event streams and check what arrives (sequence, latency).
    #[command(after_help = SUBSCRIBE_AFTER_HELP)]
    Subscribe(Box<subscribe::SubscribeArgs>),
    /// Publish events at a steady rate with a `{seq}`/`{ts}` body template.
    Publish(Box<publish::PublishArgs>),
    /// Open connections that misbehave, to test a server's dead-peer handling.
    Misbehave(Box<misbehave::MisbehaveArgs>),
    /// Sample a process's RSS, fds, threads and CPU time from /proc.
    Watch(watch::WatchArgs),
    /// Internal: one `subscribe` child process (plan as JSON).
    #[command(hide = true)]
    SubscribeChild {
        /// The child's plan, as JSON.
        plan: String,
    },
    /// Internal: the process that `misbehave --mode vanish` kills (plan as JSON).
    #[command(hide = true)]
    VanishChild {
        /// The child's plan, as JSON.
        plan: String,
    },
}

/// Runs one `plenum load` subcommand to completion.
pub fn run(args: LoadArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        LoadCommand::Subscribe(args) => subscribe::run(*args),
        LoadCommand::Publish(args) => publish::run(*args),
        LoadCommand::Misbehave(args) => misbehave::run(*args),
        LoadCommand::Watch(args) => watch::run(args),
        LoadCommand::SubscribeChild { plan } => subscribe::run_child(&plan),
        LoadCommand::VanishChild { plan } => misbehave::run_vanish_child(&plan),
    }
}

/// Parses a duration: a number with a unit (`ns`, `us`, `ms`, `s`, `m`, `h`);
/// a plain number is seconds. Fractions are allowed (`1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with a unit, like 500ms, 10s, 2m"))?;
    let seconds_per_unit = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (ns, us, ms, s, m, h)"
            ))
        }
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds > 365.0 * 24.0 * 3600.0 {
        return Err(format!("{text:?}: longer than a year"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Most source addresses one range may expand to.
pub const SOURCE_IPS_MAX: usize = 65_536;

/// Parses source addresses: a comma-separated list of addresses and inclusive
/// IPv4 ranges, e.g. `127.0.0.2-127.0.0.20,127.0.1.1`.
pub fn parse_source_ips(text: &str) -> Result<Vec<IpAddr>, String> {
    let mut ips = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        if let Some((first, last)) = part.split_once('-') {
            let first: std::net::Ipv4Addr = first
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: bad IPv4 range start"))?;
            let last: std::net::Ipv4Addr = last
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: bad IPv4 range end"))?;
            let (first, last) = (u32::from(first), u32::from(last));
            if last < first {
                return Err(format!("{part:?}: the range ends before it starts"));
            }
            if (last - first) as usize >= SOURCE_IPS_MAX
                || ips.len() + ((last - first) as usize) >= SOURCE_IPS_MAX
            {
                return Err(format!("{part:?}: more than {SOURCE_IPS_MAX} addresses"));
            }
            ips.extend((first..=last).map(|ip| IpAddr::V4(ip.into())));
        } else {
            ips.push(
                part.parse()
                    .map_err(|_| format!("{part:?}: not an IP address"))?,
            );
            if ips.len() > SOURCE_IPS_MAX {
                return Err(format!("more than {SOURCE_IPS_MAX} addresses"));
            }
        }
    }
    if ips.is_empty() {
        return Err("no source address given".to_owned());
    }
    Ok(ips)
}

/// Parses a URL argument for clap.
pub fn parse_url(text: &str) -> Result<http::HttpUrl, String> {
    http::HttpUrl::parse(text).map_err(|error| format!("{error:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("100000h").is_err());
    }

    #[test]
    fn source_ips() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4,::1").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(ips[2], "127.0.0.4".parse::<IpAddr>().unwrap());
        assert!(parse_source_ips("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_source_ips("127.0.0.0-127.255.255.255").is_err());
        assert!(parse_source_ips("").is_err());
        assert!(parse_source_ips("localhost").is_err());
    }
}
