//! Config: impossible or malformed settings are refused at start with a non-zero
//! exit and a message naming the problem (and nothing is listened on); a TOML
//! `--config` file is honoured, and a flag on the command line wins over it.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// Asserts that `plenum serve <args>` exits non-zero without listening, with a
/// message on stderr that contains one of `keywords` (case-insensitive).
fn assert_rejected(backend: Backend, args: &[&str], keywords: &[&str]) {
    let failure = match Server::try_start(backend, args) {
        Ok(server) => panic!(
            "plenum serve {args:?} started on {}; it must be rejected",
            server.addr()
        ),
        Err(failure) => failure,
    };
    assert!(
        !failure.timed_out,
        "{args:?}: hung instead of exiting:\n{}",
        failure.stderr
    );
    let status = failure
        .status
        .unwrap_or_else(|| panic!("{args:?}: did not exit"));
    assert!(
        !status.success(),
        "{args:?}: exit status must be non-zero, got {status}"
    );
    let message = failure.stderr.to_lowercase();
    assert!(
        keywords.iter().any(|k| message.contains(&k.to_lowercase())),
        "{args:?}: the message must name the problem (one of {keywords:?}), got:\n{}",
        failure.stderr
    );
    assert!(
        !failure.stdout.contains("listening"),
        "{args:?}: printed a listening line"
    );
}

/// A TOML file in the temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("plenum-test-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

backend_tests! {
    fn impossible_settings_are_rejected_at_start(backend: Backend) {
        assert_rejected(backend, &["--outbox-bytes-soft", "2MiB", "--outbox-bytes-hard", "1MiB"], &["outbox-bytes-soft", "soft"]);
        // Soft over the default hard limit (1 MiB) is as impossible.
        assert_rejected(backend, &["--outbox-bytes-soft", "2MiB"], &["outbox-bytes-soft", "soft"]);
        assert_rejected(backend, &["--shards", "0"], &["shards"]);
        assert_rejected(backend, &["--no-such-flag", "1"], &["no-such-flag"]);
    }

    fn malformed_sizes_and_durations_are_rejected(backend: Backend) {
        assert_rejected(backend, &["--outbox-bytes-hard", "12XB"], &["outbox-bytes-hard", "12XB"]);
        assert_rejected(backend, &["--history-bytes-max", "lots"], &["history-bytes-max", "lots"]);
        assert_rejected(backend, &["--write-stall-timeout", "5parsecs"], &["write-stall-timeout", "5parsecs"]);
        assert_rejected(backend, &["--heartbeat-interval", "soon"], &["heartbeat-interval", "soon"]);
    }

    fn public_listen_needs_a_token_or_explicit_anonymous_publishing(backend: Backend) {
        assert_rejected(backend, &["--listen", "0.0.0.0:0"], &["publish-token", "allow-anonymous-publish", "anonymous"]);
        // Both ways out start (and are reached through loopback).
        for extra in [&["--publish-token", "t0ken"][..], &["--allow-anonymous-publish"][..]] {
            let args: Vec<&str> = ["--listen", "0.0.0.0:0"].iter().chain(extra).copied().collect();
            let server = Server::start(backend, &args);
            assert_eq!(server.get("/healthz").unwrap().status, 200, "{args:?}");
        }
    }

    fn missing_or_invalid_config_file_is_rejected(backend: Backend) {
        assert_rejected(backend, &["--config", "/nonexistent/plenum.toml"], &["/nonexistent/plenum.toml"]);
        let file = ConfigFile::new("soft-over-hard", "outbox-bytes-soft = \"2MiB\"\noutbox-bytes-hard = \"1MiB\"\n");
        assert_rejected(backend, &["--config", file.path()], &["outbox-bytes-soft", "soft"]);
        let file = ConfigFile::new("not-toml", "this is = = not toml\n");
        assert_rejected(backend, &["--config", file.path()], &[file.path(), "toml", "config"]);
    }

    fn config_file_is_honoured_and_the_command_line_wins(backend: Backend) {
        let file = ConfigFile::new(
            "honoured",
            "heartbeat-interval = \"200ms\"\n\
             topics-per-connection-max = 2\n\
             history-events-max = 3\n",
        );
        let server = Server::start(backend, &["--config", file.path(), "--topics-per-connection-max", "3"]);

        // From the file: 200 ms heartbeats (the default is 15 s).
        let mut quiet = server.subscribe(&["quiet"]);
        match quiet.next_item(Duration::from_secs(2)) {
            Ok(SseItem::Comment(text)) => assert_eq!(text, "", "a heartbeat is an empty comment"),
            other => panic!("expected a heartbeat from the file's heartbeat-interval, got {other:?}"),
        }

        // The command line's 3 wins over the file's 2 (and over the default 32).
        let three = server.subscribe(&["a", "b", "c"]);
        drop(three);
        let four = Subscribe::topics(&["a", "b", "c", "d"]);
        match SseClient::try_open(server.addr(), &four) {
            Err(OpenError::Refused(response)) => assert_eq!(response.status, 400, "four topics over the limit of 3"),
            Ok(_) => panic!("four topics accepted: --topics-per-connection-max 3 was not applied"),
            Err(OpenError::Io(error)) => panic!("four topics: {error}"),
        }

        // From the file: history of 3 events, so resuming from the first of 5 is too old.
        let ids: Vec<u64> = (0..5).map(|n| server.publish(&["h"], None, format!("h{n}"))).collect();
        let mut client = server.subscribe_with(&Subscribe::topics(&["h"]).last_event_id_header(ids[0]));
        let first = client.expect_event(IO_TIMEOUT, "resume with a 3-event history");
        assert!(first.is_gap(), "history-events-max from the file not applied: got {first:?}");
        let replayed: Vec<u64> = client.expect_events(3, IO_TIMEOUT, "retained history").iter().map(Event::id).collect();
        assert_eq!(replayed, ids[2..]);
    }
}
