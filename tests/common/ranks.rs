//! Starting jobs in the background and watching them: what the tests of stops, signals and
//! several ranks need beyond running the binary to its end.

use super::BIN;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Waits for `child`, killing it after `limit`; returns its output and how long it ran.
pub fn wait_bounded(child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // The test fails on the elapsed time below; this only ends a hang.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let output = child.wait_with_output().expect("the job ends");
    drop(watchdog);
    (output, started.elapsed())
}

/// Starts the binary with extra environment variables, its output captured.
pub fn spawn(args: &[String], envs: &[(&str, String)]) -> Child {
    Command::new(BIN)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.clone())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts")
}

/// Lines in the run's metrics.jsonl so far.
pub fn logged_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A TCP port free right now, for a job's rank 0.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    listener.local_addr().unwrap().port()
}
