//! What the tests of `plenum load` share: running the tool, and reading the
//! JSON report it writes.

#![allow(dead_code)] // Each test binary uses a different part.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub fn plenum() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plenum"))
}

/// A path in this test process's own temporary folder.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plenum-load-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs `command` to its end and prints what it printed (shown when a test fails).
pub fn run(command: &mut Command) -> Output {
    let output = command.output().expect("running plenum");
    eprintln!("stdout:\n{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("stderr:\n{}", String::from_utf8_lossy(&output.stderr));
    output
}

pub fn read_json(path: &PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Runs `plenum ARGS --json FILE`; returns its exit code and the report.
pub fn load_report(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    static REPORTS: AtomicUsize = AtomicUsize::new(0);
    let json = temp_path(&format!(
        "report-{}.json",
        REPORTS.fetch_add(1, Ordering::Relaxed)
    ));
    let output = run(plenum().args(args).arg("--json").arg(&json));
    (output.status.code(), read_json(&json))
}
