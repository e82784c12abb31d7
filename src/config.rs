//! Every knob of `plenum serve`, in one place.
//!
//! Settings arrive from three layers: the command line, an optional TOML file
//! (`--config`, keys are the flag names) and the defaults written here. Both
//! input layers deserialize into [`ServeArgs`], whose fields are all optional;
//! [`ServeArgs::resolve`] merges them (command line first) and validates the
//! result into a [`Config`] of concrete, typed values. Impossible combinations
//! are rejected here, once, with a message that says what to change; the rest
//! of the server trusts a `Config`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// A size in bytes, written with a unit: `128KiB`, `1MiB`, `512` (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| {
            format!("`{text}` is not a size: expected a number with a unit, like 256KiB")
        })?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" | "KB" | "kB" => 1 << 10,
            "MiB" | "M" | "MB" => 1 << 20,
            "GiB" | "G" | "GB" => 1 << 30,
            other => {
                return Err(format!(
                    "`{other}` is not a size unit: use B, KiB, MiB or GiB"
                ));
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        if bytes != 0 && bytes.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", bytes >> 30)
        } else if bytes != 0 && bytes.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", bytes >> 20)
        } else if bytes != 0 && bytes.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", bytes >> 10)
        } else {
            write!(f, "{bytes}B")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(bytes) => Ok(ByteSize(bytes)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written with a unit: `30s`, `100ms`, `15m`, `0` (off where allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text == "0" {
            return Ok(Span(Duration::ZERO));
        }
        humantime::parse_duration(text).map(Span).map_err(|error| {
            format!("`{text}` is not a duration ({error}): use a unit, like 30s or 250ms")
        })
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which I/O backend the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// io_uring where the start-up probe succeeds, else epoll (the reason is logged).
    Auto,
    /// io_uring with direct descriptors; start-up fails if the kernel or the
    /// container does not allow it.
    Uring,
    /// Edge-triggered epoll with non-blocking syscalls.
    Epoll,
}

impl BackendChoice {
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Uring => "uring",
            BackendChoice::Epoll => "epoll",
        }
    }
}

/// `plenum serve` flags. Every field is optional so that the command line and
/// the TOML file can be merged; the defaults live in [`ServeArgs::resolve`].
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file of settings; keys are the flag names. The command line wins.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on, repeatable (IPv4 or IPv6); port 0 picks a free port.
    /// [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Shard threads, each with its own listener and event loop. [default: CPUs available]
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// I/O backend: auto (io_uring if the probe passes, else epoll), uring, epoll. [default: auto]
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// Listen backlog per listener (capped by net.core.somaxconn). [default: 4096]
    #[arg(long, value_name = "N")]
    pub backlog: Option<u32>,
    /// Connections per process; above it new connections get 503. [default: open-file limit - 256]
    #[arg(long, value_name = "N")]
    pub connections_max: Option<usize>,
    /// Connections from one client address; 0 = no limit. [default: 0]
    #[arg(long, value_name = "N")]
    pub connections_per_ip_max: Option<usize>,
    /// Publishing requires `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "TOKEN", env = "PLENUM_PUBLISH_TOKEN")]
    pub publish_token: Option<String>,
    /// Allow a non-loopback listen address without a publish token.
    #[arg(long)]
    #[serde(default)]
    pub allow_anonymous_publish: bool,
    /// Largest publish body. [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    pub publish_body_bytes_max: Option<ByteSize>,
    /// Largest request head. [default: 8KiB]
    #[arg(long, value_name = "SIZE")]
    pub request_head_bytes_max: Option<ByteSize>,
    /// Topics one subscriber or one event may name. [default: 32]
    #[arg(long, value_name = "N")]
    pub topics_per_connection_max: Option<usize>,
    /// Events kept for Last-Event-ID replay. [default: 10000]
    #[arg(long, value_name = "N")]
    pub history_events_max: Option<usize>,
    /// Bytes of encoded events kept for replay. [default: 64MiB]
    #[arg(long, value_name = "SIZE")]
    pub history_bytes_max: Option<ByteSize>,
    /// Capacity of each shard's inbox, in events. [default: 8192]
    #[arg(long, value_name = "N")]
    pub shard_inbox_events: Option<usize>,
    /// Soft outbox limit per subscriber; 0 = off. [default: 256KiB]
    #[arg(long, value_name = "SIZE")]
    pub outbox_bytes_soft: Option<ByteSize>,
    /// How long a subscriber may stay above the soft limit. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub outbox_soft_duration: Option<Span>,
    /// Hard outbox limit per subscriber: closed at once above it. [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    pub outbox_bytes_hard: Option<ByteSize>,
    /// Pending bytes without write progress this long closes the connection; 0 = off. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub write_stall_timeout: Option<Span>,
    /// A comment is written to a stream quiet for this long; 0 = off. [default: 15s]
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_interval: Option<Span>,
    /// Time from accept to a complete request head. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub handshake_timeout: Option<Span>,
    /// Time from the request head to a complete publish body. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub body_timeout: Option<Span>,
    /// Idle keep-alive connections (non-stream) are closed after this. [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub http_idle_timeout: Option<Span>,
    /// Streams are ended after this long (± jitter); 0 = off. [default: 15m]
    #[arg(long, value_name = "DURATION")]
    pub stream_lifetime_max: Option<Span>,
    /// Jitter of the stream lifetime, in percent. [default: 10]
    #[arg(long, value_name = "PERCENT")]
    pub stream_lifetime_jitter: Option<u8>,
    /// The `retry:` value written before the server ends a stream. [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub retry_hint: Option<Span>,
    /// TCP keepalive idle time; 0 = keepalive off. [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub keepalive_idle: Option<Span>,
    /// TCP keepalive probe interval. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub keepalive_interval: Option<Span>,
    /// TCP keepalive probes before the connection is dropped. [default: 6]
    #[arg(long, value_name = "N")]
    pub keepalive_count: Option<u32>,
    /// TCP_USER_TIMEOUT; 0 = kernel default. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub tcp_user_timeout: Option<Span>,
    /// SO_SNDBUF of every socket; 0 = kernel autotuning. [default: 128KiB]
    #[arg(long, value_name = "SIZE")]
    pub socket_send_buffer_bytes: Option<ByteSize>,
    /// On SIGTERM/SIGINT, the process exits within this. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<Span>,
    /// Log level: error, warn, info, debug, trace. [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

/// The validated settings the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub shards: usize,
    pub backend: BackendChoice,
    pub backlog: u32,
    pub connections_max: usize,
    /// `0` = no per-address limit.
    pub connections_per_ip_max: usize,
    pub publish_token: Option<String>,
    pub publish_body_bytes_max: usize,
    pub request_head_bytes_max: usize,
    pub topics_per_connection_max: usize,
    pub history_events_max: usize,
    pub history_bytes_max: usize,
    pub shard_inbox_events: usize,
    /// `0` = off.
    pub outbox_bytes_soft: usize,
    pub outbox_soft_duration: Duration,
    pub outbox_bytes_hard: usize,
    /// Zero = off.
    pub write_stall_timeout: Duration,
    /// Zero = off.
    pub heartbeat_interval: Duration,
    pub handshake_timeout: Duration,
    pub body_timeout: Duration,
    pub http_idle_timeout: Duration,
    /// Zero = off.
    pub stream_lifetime_max: Duration,
    pub stream_lifetime_jitter_percent: u8,
    pub retry_hint: Duration,
    /// Zero = keepalive off.
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// Zero = kernel default.
    pub tcp_user_timeout: Duration,
    /// `0` = kernel autotuning.
    pub socket_send_buffer_bytes: usize,
    pub shutdown_timeout: Duration,
    pub log_level: String,
}

/// File descriptors kept back from `--connections-max`'s default for
/// listeners, epoll and eventfds, logs and the metrics scrape.
pub const FD_RESERVE: usize = 256;

/// The most headers one request may carry; more is answered `431`.
pub const REQUEST_HEADERS_MAX: usize = 64;

impl ServeArgs {
    /// Loads the `--config` file (if any) under the command line, applies the
    /// defaults and validates. `open_files_max` is the process's open-file
    /// limit after raising the soft limit, used for `--connections-max`'s default.
    pub fn resolve(self, open_files_max: usize) -> anyhow::Result<Config> {
        let merged = match &self.config {
            None => self,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                let file: ServeArgs = toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?;
                self.over(file)
            }
        };
        merged.validate(open_files_max)
    }

    /// `self` (the command line) where set, else `file`.
    fn over(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config,
            listen: if self.listen.is_empty() {
                file.listen
            } else {
                self.listen
            },
            shards: self.shards.or(file.shards),
            backend: self.backend.or(file.backend),
            backlog: self.backlog.or(file.backlog),
            connections_max: self.connections_max.or(file.connections_max),
            connections_per_ip_max: self.connections_per_ip_max.or(file.connections_per_ip_max),
            publish_token: self.publish_token.or(file.publish_token),
            allow_anonymous_publish: self.allow_anonymous_publish || file.allow_anonymous_publish,
            publish_body_bytes_max: self.publish_body_bytes_max.or(file.publish_body_bytes_max),
            request_head_bytes_max: self.request_head_bytes_max.or(file.request_head_bytes_max),
            topics_per_connection_max: self
                .topics_per_connection_max
                .or(file.topics_per_connection_max),
            history_events_max: self.history_events_max.or(file.history_events_max),
            history_bytes_max: self.history_bytes_max.or(file.history_bytes_max),
            shard_inbox_events: self.shard_inbox_events.or(file.shard_inbox_events),
            outbox_bytes_soft: self.outbox_bytes_soft.or(file.outbox_bytes_soft),
            outbox_soft_duration: self.outbox_soft_duration.or(file.outbox_soft_duration),
            outbox_bytes_hard: self.outbox_bytes_hard.or(file.outbox_bytes_hard),
            write_stall_timeout: self.write_stall_timeout.or(file.write_stall_timeout),
            heartbeat_interval: self.heartbeat_interval.or(file.heartbeat_interval),
            handshake_timeout: self.handshake_timeout.or(file.handshake_timeout),
            body_timeout: self.body_timeout.or(file.body_timeout),
            http_idle_timeout: self.http_idle_timeout.or(file.http_idle_timeout),
            stream_lifetime_max: self.stream_lifetime_max.or(file.stream_lifetime_max),
            stream_lifetime_jitter: self.stream_lifetime_jitter.or(file.stream_lifetime_jitter),
            retry_hint: self.retry_hint.or(file.retry_hint),
            keepalive_idle: self.keepalive_idle.or(file.keepalive_idle),
            keepalive_interval: self.keepalive_interval.or(file.keepalive_interval),
            keepalive_count: self.keepalive_count.or(file.keepalive_count),
            tcp_user_timeout: self.tcp_user_timeout.or(file.tcp_user_timeout),
            socket_send_buffer_bytes: self
                .socket_send_buffer_bytes
                .or(file.socket_send_buffer_bytes),
            shutdown_timeout: self.shutdown_timeout.or(file.shutdown_timeout),
            log_level: self.log_level.or(file.log_level),
        }
    }

    fn validate(self, open_files_max: usize) -> anyhow::Result<Config> {
        let span = |value: Option<Span>, default: &str| -> Duration {
            value.map_or_else(
                || default.parse::<Span>().expect("valid default").0,
                |s| s.0,
            )
        };
        let size = |value: Option<ByteSize>, default: &str| -> usize {
            let bytes = value
                .unwrap_or_else(|| default.parse().expect("valid default"))
                .0;
            usize::try_from(bytes).unwrap_or(usize::MAX)
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let config = Config {
            listen: if self.listen.is_empty() {
                vec!["127.0.0.1:8080".parse().expect("valid default")]
            } else {
                self.listen
            },
            shards: self.shards.unwrap_or(cpus),
            backend: self.backend.unwrap_or(BackendChoice::Auto),
            backlog: self.backlog.unwrap_or(4096),
            connections_max: self
                .connections_max
                .unwrap_or_else(|| open_files_max.saturating_sub(FD_RESERVE).max(1)),
            connections_per_ip_max: self.connections_per_ip_max.unwrap_or(0),
            publish_token: self.publish_token.filter(|token| !token.is_empty()),
            publish_body_bytes_max: size(self.publish_body_bytes_max, "1MiB"),
            request_head_bytes_max: size(self.request_head_bytes_max, "8KiB"),
            topics_per_connection_max: self.topics_per_connection_max.unwrap_or(32),
            history_events_max: self.history_events_max.unwrap_or(10_000),
            history_bytes_max: size(self.history_bytes_max, "64MiB"),
            shard_inbox_events: self.shard_inbox_events.unwrap_or(8192),
            outbox_bytes_soft: size(self.outbox_bytes_soft, "256KiB"),
            outbox_soft_duration: span(self.outbox_soft_duration, "10s"),
            outbox_bytes_hard: size(self.outbox_bytes_hard, "1MiB"),
            write_stall_timeout: span(self.write_stall_timeout, "30s"),
            heartbeat_interval: span(self.heartbeat_interval, "15s"),
            handshake_timeout: span(self.handshake_timeout, "10s"),
            body_timeout: span(self.body_timeout, "10s"),
            http_idle_timeout: span(self.http_idle_timeout, "60s"),
            stream_lifetime_max: span(self.stream_lifetime_max, "15m"),
            stream_lifetime_jitter_percent: self.stream_lifetime_jitter.unwrap_or(10),
            retry_hint: span(self.retry_hint, "1s"),
            keepalive_idle: span(self.keepalive_idle, "60s"),
            keepalive_interval: span(self.keepalive_interval, "10s"),
            keepalive_count: self.keepalive_count.unwrap_or(6),
            tcp_user_timeout: span(self.tcp_user_timeout, "30s"),
            socket_send_buffer_bytes: size(self.socket_send_buffer_bytes, "128KiB"),
            shutdown_timeout: span(self.shutdown_timeout, "10s"),
            log_level: self.log_level.unwrap_or_else(|| "info".into()),
        };
        config.check(self.allow_anonymous_publish)?;
        Ok(config)
    }
}

impl Config {
    /// Rejects impossible or dangerous combinations with a message naming the flags.
    fn check(&self, allow_anonymous_publish: bool) -> anyhow::Result<()> {
        if self.shards == 0 {
            bail!("--shards must be at least 1");
        }
        if self.shards > 1024 {
            bail!(
                "--shards {} is more than 1024; one shard per core is the usual choice",
                self.shards
            );
        }
        if self.connections_max == 0 {
            bail!("--connections-max must be at least 1");
        }
        if self.outbox_bytes_hard == 0 {
            bail!(
                "--outbox-bytes-hard must be above 0: it is the bound on each subscriber's queue"
            );
        }
        if self.outbox_bytes_soft > self.outbox_bytes_hard {
            bail!(
                "--outbox-bytes-soft ({}) is above --outbox-bytes-hard ({}): the soft limit must not exceed the hard one",
                ByteSize(self.outbox_bytes_soft as u64),
                ByteSize(self.outbox_bytes_hard as u64)
            );
        }
        if self.outbox_bytes_soft > 0 && self.outbox_soft_duration.is_zero() {
            bail!("--outbox-soft-duration must be above 0 when --outbox-bytes-soft is on");
        }
        if self.history_events_max == 0 || self.history_bytes_max == 0 {
            bail!("--history-events-max and --history-bytes-max must be above 0 (replay needs history)");
        }
        if self.shard_inbox_events < 2 {
            bail!("--shard-inbox-events must be at least 2");
        }
        if self.request_head_bytes_max < 256 {
            bail!("--request-head-bytes-max must be at least 256B");
        }
        if self.topics_per_connection_max == 0 {
            bail!("--topics-per-connection-max must be at least 1");
        }
        if self.stream_lifetime_jitter_percent > 50 {
            bail!("--stream-lifetime-jitter must be at most 50 (percent)");
        }
        for (name, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--body-timeout", self.body_timeout),
            ("--http-idle-timeout", self.http_idle_timeout),
            ("--shutdown-timeout", self.shutdown_timeout),
        ] {
            if value.is_zero() {
                bail!("{name} must be above 0");
            }
        }
        if !self.keepalive_idle.is_zero()
            && (self.keepalive_interval.is_zero() || self.keepalive_count == 0)
        {
            bail!("--keepalive-interval and --keepalive-count must be above 0 when --keepalive-idle is on");
        }
        if self.tcp_user_timeout > Duration::from_millis(u32::MAX as u64) {
            bail!("--tcp-user-timeout is above the kernel's maximum (about 49 days)");
        }
        if self.listen.is_empty() {
            bail!("at least one --listen address is needed");
        }
        let exposed = self.listen.iter().find(|addr| !addr.ip().is_loopback());
        if let (Some(addr), None, false) = (exposed, &self.publish_token, allow_anonymous_publish) {
            bail!(
                "refusing to listen on {addr} without --publish-token: anyone could publish. \
                 Set --publish-token (or PLENUM_PUBLISH_TOKEN), or pass --allow-anonymous-publish"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("256KiB".parse::<ByteSize>(), Ok(ByteSize(256 * 1024)));
        assert_eq!("1MiB".parse::<ByteSize>(), Ok(ByteSize(1 << 20)));
        assert_eq!("512".parse::<ByteSize>(), Ok(ByteSize(512)));
        assert_eq!("2 GiB".parse::<ByteSize>(), Ok(ByteSize(2 << 30)));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("KiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(256 * 1024).to_string(), "256KiB");
    }

    #[test]
    fn spans_parse_with_units() {
        assert_eq!("30s".parse::<Span>(), Ok(Span(Duration::from_secs(30))));
        assert_eq!(
            "250ms".parse::<Span>(),
            Ok(Span(Duration::from_millis(250)))
        );
        assert_eq!("0".parse::<Span>(), Ok(Span(Duration::ZERO)));
        assert!("30".parse::<Span>().is_err());
    }

    #[test]
    fn defaults_validate() {
        let config = ServeArgs::default().resolve(20_000).unwrap();
        assert_eq!(config.connections_max, 20_000 - FD_RESERVE);
        assert_eq!(config.outbox_bytes_hard, 1 << 20);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(15));
    }

    #[test]
    fn impossible_combinations_are_rejected() {
        let soft_over_hard = ServeArgs {
            outbox_bytes_soft: Some(ByteSize(2 << 20)),
            ..Default::default()
        };
        let error = soft_over_hard.resolve(1000).unwrap_err().to_string();
        assert!(error.contains("--outbox-bytes-soft"), "{error}");

        let zero_shards = ServeArgs {
            shards: Some(0),
            ..Default::default()
        };
        assert!(zero_shards
            .resolve(1000)
            .unwrap_err()
            .to_string()
            .contains("--shards"));

        let exposed = ServeArgs {
            listen: vec!["0.0.0.0:0".parse().unwrap()],
            ..Default::default()
        };
        assert!(exposed
            .resolve(1000)
            .unwrap_err()
            .to_string()
            .contains("--publish-token"));
    }

    #[test]
    fn backend_defaults_to_auto_and_parses_from_the_file() {
        let config = ServeArgs::default().resolve(1000).unwrap();
        assert_eq!(config.backend, BackendChoice::Auto);
        for (text, choice) in [
            ("auto", BackendChoice::Auto),
            ("uring", BackendChoice::Uring),
            ("epoll", BackendChoice::Epoll),
        ] {
            let file: ServeArgs = toml::from_str(&format!("backend = \"{text}\"\n")).unwrap();
            assert_eq!(file.backend, Some(choice));
            assert_eq!(choice.name(), text);
        }
    }

    #[test]
    fn command_line_wins_over_file() {
        let file: ServeArgs = toml::from_str(
            "shards = 3\noutbox-bytes-hard = \"2MiB\"\nheartbeat-interval = \"5s\"\n",
        )
        .unwrap();
        let cli = ServeArgs {
            shards: Some(1),
            ..Default::default()
        };
        let config = cli.over(file).validate(1000).unwrap();
        assert_eq!(config.shards, 1);
        assert_eq!(config.outbox_bytes_hard, 2 << 20);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
    }
}
