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

/// Sends SIGTERM to `child`, as a scheduler stopping a job does.
pub fn sigterm(child: &Child) {
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM to {}", child.id());
}

/// Sends SIGTERM to `child`, which waits to start training, and checks that it stops
/// (exit 143) saying it stopped before training started; returns how long it took to stop.
/// `what` names the job in messages.
pub fn stops_before_training(child: Child, what: &str) -> Duration {
    sigterm(&child);
    let signalled = Instant::now();
    let (output, _) = wait_bounded(child, Duration::from_secs(60));
    let took = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{what}: {stderr}");
    assert!(
        stderr.contains("stopped by SIGTERM before training started"),
        "{what}: {stderr}"
    );
    took
}

/// Waits until the run in `out` has logged `lines` metrics lines, failing after a minute.
pub fn wait_until_logged(out: &Path, lines: usize) {
    let started = Instant::now();
    while logged_steps(out) < lines {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
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

/// A background job that is killed (SIGKILL) and reaped when dropped, so that a test
/// failing midway leaves no run behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
