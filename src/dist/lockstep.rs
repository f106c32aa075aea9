//! Bounded waits for local asynchronous work (NCCL's initialisation, a CUDA stream) that
//! every rank leaves in the same round.
//!
//! A rank polling its own work cannot hear the other ranks, so the polling goes in rounds:
//! after each poll every rank shares, through the control [`Communicator`], whether it is
//! busy, done or failed (and why). All ranks read the same reports, hence leave together:
//! with `Ok` once every rank is done, or with an error naming the first rank that failed,
//! timed out or was stopped by a signal. A rank that dies or hangs between two rounds fails
//! the control collective itself, which names it as well.

use super::{Communicator, PeerFailed};
use crate::interrupt::Interrupted;
use anyhow::{bail, Context, Result};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Pause between rounds while some rank is busy: short next to NCCL's start-up or a
/// collective, long next to one round trip of the control channel.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A rank's report in one round: one of these bytes, followed by a failure's message.
const BUSY: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;

/// One bounded wait of all ranks for their local work.
pub(crate) struct Wait<'a> {
    /// What the ranks wait for, in messages ("NCCL initialisation").
    pub(crate) phase: &'a str,
    /// How long a rank may stay busy (`--dist-timeout`).
    pub(crate) timeout: Duration,
    /// Whether a SIGINT or SIGTERM ends the wait on the rank that received it.
    pub(crate) interruptible: bool,
}

impl Wait<'_> {
    /// Polls this rank's work (`poll` is `Ok(true)` once it is done, `Ok(false)` while it is
    /// busy) in rounds with the other ranks until it is done on every rank. Every rank must
    /// call this at the same point. Errors: this rank's own failure, timeout or signal (the
    /// caller names this rank), or a [`PeerFailed`] naming another rank's.
    pub(crate) fn run(
        &self,
        control: &dyn Communicator,
        mut poll: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let mine = self.progress(poll(), deadline);
            let reports = control.all_gather_bytes(&encode(&mine));
            if let Err(message) = mine {
                // Every other rank has just read why (unless the control channel failed too).
                // A signal stays recognisable, so the process exits as signalled.
                return Err(
                    match crate::interrupt::requested().filter(|_| self.interruptible) {
                        Some(signal) => anyhow::Error::new(Interrupted(signal)).context(message),
                        None => anyhow::anyhow!("{message}"),
                    },
                );
            }
            let reports = reports.with_context(|| format!("waiting for {}", self.phase))?;
            if all_done(&reports)? {
                return Ok(());
            }
            sleep(POLL_INTERVAL);
        }
    }

    /// This rank's report for one round: whether its work is done, or why it stops.
    fn progress(&self, polled: Result<bool>, deadline: Instant) -> Result<bool, String> {
        let done = polled.map_err(|e| format!("{} failed: {e:#}", self.phase))?;
        if let Some(signal) = crate::interrupt::requested().filter(|_| self.interruptible) {
            let name = crate::interrupt::signal_name(signal);
            return Err(format!("{} stopped by {name}", self.phase));
        }
        if !done && Instant::now() >= deadline {
            return Err(format!(
                "{} did not finish within {} s; raise --dist-timeout if it needs longer, \
                 otherwise a GPU or a peer is stuck",
                self.phase,
                self.timeout.as_secs_f64()
            ));
        }
        Ok(done)
    }
}

/// A report as bytes for the control channel.
fn encode(progress: &Result<bool, String>) -> Vec<u8> {
    match progress {
        Ok(false) => vec![BUSY],
        Ok(true) => vec![DONE],
        Err(message) => [&[FAILED], message.as_bytes()].concat(),
    }
}

/// Whether every rank reported done, or a [`PeerFailed`] naming the first that failed.
fn all_done(reports: &[Vec<u8>]) -> Result<bool> {
    let world = reports.len();
    let mut done = true;
    for (rank, report) in reports.iter().enumerate() {
        match report.split_first() {
            Some((&DONE, [])) => {}
            Some((&BUSY, [])) => done = false,
            Some((&FAILED, message)) => bail!(PeerFailed(format!(
                "rank {rank} of {world} failed: {}",
                String::from_utf8_lossy(message)
            ))),
            _ => bail!(PeerFailed(format!(
                "rank {rank} of {world} sent a malformed progress report: is every rank \
                 running the same build?"
            ))),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::caused_by_peer;
    use candle_core::Tensor;
    use std::sync::{Barrier, Mutex};

    /// Ranks as threads of this process, gathering through shared memory.
    struct Threads<'a> {
        rank: usize,
        slots: &'a Mutex<Vec<Vec<u8>>>,
        barrier: &'a Barrier,
    }

    impl Communicator for Threads<'_> {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world(&self) -> usize {
            self.slots.lock().unwrap().len()
        }

        fn all_reduce_sum(&self, _: &Tensor) -> Result<Tensor> {
            bail!("not used")
        }

        fn broadcast(&self, _: &Tensor, _: usize) -> Result<Tensor> {
            bail!("not used")
        }

        fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
            self.slots.lock().unwrap()[self.rank] = bytes.to_vec();
            self.barrier.wait();
            let all = self.slots.lock().unwrap().clone();
            // Nobody writes the next round's report before everyone has read this one.
            self.barrier.wait();
            Ok(all)
        }

        fn abort(&self, _: &str) {}
    }

    /// Runs `wait` on `world` thread ranks, rank r polling with `poll(r, n)` on its n-th
    /// poll (from 1); returns each rank's outcome and number of polls.
    fn on_ranks(
        world: usize,
        wait: &Wait,
        poll: impl Fn(usize, usize) -> Result<bool> + Sync,
    ) -> Vec<(Result<()>, usize)> {
        let slots = Mutex::new(vec![Vec::new(); world]);
        let barrier = Barrier::new(world);
        std::thread::scope(|s| {
            let ranks: Vec<_> = (0..world)
                .map(|rank| {
                    let (slots, barrier, poll) = (&slots, &barrier, &poll);
                    s.spawn(move || {
                        let comm = Threads {
                            rank,
                            slots,
                            barrier,
                        };
                        let mut polls = 0;
                        let outcome = wait.run(&comm, || {
                            polls += 1;
                            poll(rank, polls)
                        });
                        (outcome, polls)
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        })
    }

    fn wait(timeout: Duration) -> Wait<'static> {
        Wait {
            phase: "the test's work",
            timeout,
            interruptible: false,
        }
    }

    #[test]
    fn every_rank_leaves_in_the_round_the_slowest_is_done() {
        let outcomes = on_ranks(
            3,
            &wait(Duration::from_secs(60)),
            |rank, n| Ok(n > 3 * rank),
        );
        for (outcome, polls) in outcomes {
            outcome.unwrap();
            assert_eq!(polls, 7, "the slowest rank is done at its 7th poll");
        }
    }

    #[test]
    fn a_failure_stops_every_rank_naming_it() {
        let outcomes = on_ranks(3, &wait(Duration::from_secs(60)), |rank, n| {
            if rank == 1 && n == 3 {
                bail!("boom")
            }
            Ok(false)
        });
        for (rank, (outcome, polls)) in outcomes.into_iter().enumerate() {
            let e = outcome.unwrap_err();
            assert_eq!(polls, 3);
            assert_eq!(caused_by_peer(&e), rank != 1, "{e:#}");
            let message = format!("{e:#}");
            let expected = "the test's work failed: boom";
            match rank {
                1 => assert_eq!(message, expected),
                _ => assert_eq!(message, format!("rank 1 of 3 failed: {expected}")),
            }
        }
    }

    #[test]
    fn a_busy_rank_times_out_naming_the_setting() {
        let outcomes = on_ranks(2, &wait(Duration::from_millis(20)), |rank, _| Ok(rank == 0));
        let [(done, _), (busy, _)] = <[_; 2]>::try_from(outcomes).ok().unwrap();
        let why = format!("{:#}", busy.unwrap_err());
        assert!(
            why.starts_with("the test's work did not finish within 0.02 s")
                && why.contains("raise --dist-timeout"),
            "{why}"
        );
        let done = done.unwrap_err();
        assert!(caused_by_peer(&done), "{done:#}");
        assert_eq!(format!("{done:#}"), format!("rank 1 of 2 failed: {why}"));
    }

    #[test]
    fn a_malformed_report_is_an_error() {
        let e = all_done(&[vec![DONE], vec![7]]).unwrap_err();
        assert!(caused_by_peer(&e) && format!("{e:#}").contains("rank 1 of 2 sent a malformed"));
    }
}
