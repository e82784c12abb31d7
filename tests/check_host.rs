//! `plenum check-host` on this machine, and the tuning guide's promises:
//! the open-file limit blocks 100,000 connections on epoll here and io_uring
//! with 6 shards gets past it; every section the check points at exists; the
//! guide's commands are copy-pasteable (no placeholders) and name only real
//! `plenum serve` flags.

use std::path::Path;
use std::process::Command;

use plenum::backend::uring::probe::files_per_ring_for;
use plenum::check::rules::section;

fn check_host(arguments: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_plenum"))
        .arg("check-host")
        .args(arguments)
        .output()
        .expect("run plenum check-host");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.code().is_some(),
        "check-host killed: {stderr}"
    );
    (output.status.code().unwrap_or(-1), stdout)
}

fn line_for<'a>(report: &'a str, knob: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(knob))
        .unwrap_or_else(|| panic!("no {knob} line in:\n{report}"))
}

fn hard_open_file_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .expect("getrlimit")
        .1
}

fn is_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

#[test]
fn epoll_at_100000_is_blocked_by_the_open_file_limit() {
    let (code, report) = check_host(&["--connections", "100000", "--backend", "epoll"]);
    let hard = hard_open_file_limit();
    let line = line_for(&report, "RLIMIT_NOFILE");
    if hard >= 100_000 + 256 {
        eprintln!("note: hard open-file limit {hard} holds 100,000 here; checking it passes");
        assert!(line.starts_with("OK"), "{report}");
        return;
    }
    assert_eq!(code, 1, "a blocked host must exit 1:\n{report}");
    assert!(line.starts_with("FIX"), "{report}");
    assert!(line.contains(&format!("hard {hard}")), "{line}");
    assert!(line.contains("hard >= 100256"), "{line}");
    assert!(
        line.contains("see tuning/GUIDE.md#open-file-limits"),
        "{line}"
    );
    let verdict = report.lines().last().unwrap_or_default();
    assert!(
        verdict.starts_with("result: BLOCKED by RLIMIT_NOFILE"),
        "{report}"
    );
}

#[test]
fn uring_with_6_shards_passes_the_open_file_check() {
    let (code, report) = check_host(&[
        "--connections",
        "100000",
        "--backend",
        "uring",
        "--shards",
        "6",
    ]);
    let io_uring = line_for(&report, "io_uring");
    if io_uring.contains("unavailable") {
        assert!(!is_ci(), "io_uring must work under CI:\n{report}");
        eprintln!("skipped: io_uring is unavailable here: {io_uring}");
        return;
    }
    let needed = files_per_ring_for(100_000, 6);
    let hard = hard_open_file_limit();
    let line = line_for(&report, "RLIMIT_NOFILE");
    assert!(
        line.contains(&format!("hard >= {needed} per ring")),
        "{line}"
    );
    if hard < needed {
        eprintln!("skipped: hard open-file limit {hard} is below {needed} slots per ring");
        return;
    }
    assert!(line.starts_with("OK"), "{report}");
    let verdict = report.lines().last().unwrap_or_default();
    assert!(!verdict.contains("RLIMIT_NOFILE"), "{report}");
    // Nothing else should block 100,000 on a host tuned like this one.
    if !report.lines().any(|line| line.starts_with("FIX")) {
        assert_eq!(code, 0, "{report}");
    }
}

#[test]
fn the_json_report_carries_the_blocking_flag() {
    let (code, text) = check_host(&["--connections", "100", "--backend", "epoll", "--json"]);
    let document: serde_json::Value = serde_json::from_str(&text).expect("JSON report");
    let blocking = document["report"]["blocking"]
        .as_bool()
        .expect("report.blocking");
    assert_eq!(code, i32::from(blocking), "{text}");
    let lines = document["report"]["lines"].as_array().expect("lines");
    assert!(lines.iter().any(|line| line["knob"] == "RLIMIT_NOFILE"));
    assert_eq!(document["needs"]["connections"], 100);
}

#[test]
fn a_bad_size_is_refused_with_the_units() {
    let (code, _) = check_host(&["--connections", "100", "--socket-send-buffer-bytes", "12kb"]);
    assert_eq!(code, 2, "clap's usage error");
    // Sizes parse exactly as `plenum serve` parses them.
    let (code, text) = check_host(&[
        "--connections",
        "100",
        "--socket-send-buffer-bytes",
        "64K",
        "--json",
    ]);
    assert_ne!(code, 2, "64K is a size to plenum serve: {text}");
    let document: serde_json::Value = serde_json::from_str(&text).expect("JSON report");
    assert_eq!(document["needs"]["socket_send_buffer_bytes"], 65_536);
}

fn guide() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/GUIDE.md"))
        .expect("tuning/GUIDE.md")
}

/// GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_section_the_check_points_at_exists_in_the_guide() {
    let guide = guide();
    let anchors: Vec<String> = guide
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(anchor)
        .collect();
    for wanted in section::ALL {
        assert!(
            anchors.iter().any(|a| a == wanted),
            "no section #{wanted} in tuning/GUIDE.md: {anchors:?}"
        );
    }
    // And the guide's own links to its sections resolve.
    for link in guide.split("](#").skip(1) {
        let target = link.split(')').next().unwrap_or_default();
        assert!(anchors.iter().any(|a| a == target), "broken link #{target}");
    }
}

/// The fenced code blocks of a Markdown text, with their info strings.
fn code_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => current = Some((info.trim().to_string(), String::new())),
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "unclosed code block");
    blocks
}

/// What a copy-paste placeholder looks like: `<name>`, `$N` or `$1`-style
/// variables nobody set, `XXX`, `YOUR_…`.
fn placeholders(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let bytes: Vec<char> = text.chars().collect();
    for (i, c) in bytes.iter().enumerate() {
        match c {
            '<' => {
                let rest: String = bytes[i + 1..].iter().take_while(|&&c| c != '\n').collect();
                if let Some(end) = rest.find('>') {
                    let inner = &rest[..end];
                    if !inner.is_empty()
                        && inner
                            .chars()
                            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | ' ' | '.'))
                        && inner.chars().next().is_some_and(char::is_alphabetic)
                    {
                        found.push(format!("<{inner}>"));
                    }
                }
            }
            '$' => {
                if let Some(next) = bytes.get(i + 1) {
                    if next.is_ascii_uppercase() || next.is_ascii_digit() {
                        let name: String = bytes[i..]
                            .iter()
                            .take_while(|c| c.is_alphanumeric() || **c == '$' || **c == '_')
                            .collect();
                        found.push(name);
                    }
                }
            }
            _ => {}
        }
    }
    for word in ["XXX", "YOUR_", "your-", "CHANGEME", "TODO"] {
        if text.contains(word) {
            found.push(word.to_string());
        }
    }
    found
}

#[test]
fn the_placeholder_finder_finds_placeholders() {
    assert_eq!(placeholders("ulimit -n <limit>"), vec!["<limit>"]);
    assert_eq!(placeholders("plenum serve --shards $N"), vec!["$N"]);
    assert_eq!(placeholders("kill $1"), vec!["$1"]);
    assert_eq!(placeholders("sysctl -w fs.nr_open=XXX"), vec!["XXX"]);
    assert!(placeholders("grep x /proc/$(pgrep -o plenum)/limits 2>&1 < in").is_empty());
    assert!(placeholders("proxy_set_header Host $host;").is_empty());
}

#[test]
fn the_guides_commands_have_no_placeholders() {
    let guide = guide();
    let blocks = code_blocks(&guide);
    assert!(blocks.len() > 20, "the guide should be full of commands");
    for (info, body) in &blocks {
        if info == "text" {
            continue; // program output, not a command
        }
        assert!(
            matches!(info.as_str(), "sh" | "nginx" | "ini"),
            "code block without a known language: {info:?}\n{body}"
        );
        let found = placeholders(body);
        assert!(found.is_empty(), "placeholders {found:?} in:\n{body}");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning");
    for file in ["sysctl.conf", "plenum.service", "nginx.conf"] {
        let text = std::fs::read_to_string(dir.join(file)).expect(file);
        let found = placeholders(&text);
        assert!(found.is_empty(), "placeholders {found:?} in tuning/{file}");
    }
}

/// Flags the guide, the unit and check-host's fixes give `plenum serve` are
/// flags the README documents.
#[test]
fn the_guide_names_only_real_serve_flags() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let service = std::fs::read_to_string(root.join("tuning/plenum.service")).expect("unit");
    let mut texts = vec![guide(), service];
    let (_, report) = check_host(&["--connections", "1000000", "--backend", "epoll"]);
    texts.push(report);
    for text in &texts {
        for line in text.lines().filter(|line| line.contains("plenum serve")) {
            let serve = &line[line.find("plenum serve").unwrap_or(0)..];
            for flag in serve
                .split(|c: char| c.is_whitespace() || matches!(c, '`' | '(' | ')' | ','))
                .filter(|word| word.starts_with("--") && word.len() > 2)
            {
                let flag = flag.split('=').next().unwrap_or(flag);
                assert!(
                    readme.contains(&format!("`{flag} ")) || readme.contains(&format!("`{flag}`")),
                    "{flag} (in {line:?}) is not a documented plenum serve flag"
                );
            }
        }
    }
}

#[test]
fn startup_warnings_name_each_blocking_knob_and_its_section() {
    let hard = hard_open_file_limit();
    let epoll = plenum::check::startup_warnings(100_000, "epoll", 2, 4096, 128 * 1024);
    if hard < 100_000 + 256 {
        let warning = epoll
            .iter()
            .find(|warning| warning.starts_with("RLIMIT_NOFILE"))
            .unwrap_or_else(|| panic!("no open-file warning in {epoll:?}"));
        assert!(
            warning.contains("see tuning/GUIDE.md#open-file-limits"),
            "{warning}"
        );
        assert!(warning.contains("--connections-max 100000"), "{warning}");
    }
    let uring = plenum::check::startup_warnings(100_000, "uring", 6, 4096, 128 * 1024);
    if hard >= files_per_ring_for(100_000, 6) {
        assert!(
            !uring
                .iter()
                .any(|warning| warning.starts_with("RLIMIT_NOFILE")),
            "{uring:?}"
        );
    }
    for warning in epoll.iter().chain(&uring) {
        assert!(!warning.contains('\n'), "one line each: {warning}");
    }
}
