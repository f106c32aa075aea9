//! A [`Communicator`] over TCP for CPU ranks: every leaf rank holds one connection to rank
//! 0, which combines each collective (in rank order, so every rank gets the same bits) and
//! sends the result back. A star, not a ring: simple, deterministic, and plenty for a
//! few ranks on one machine; GPU jobs move their tensors through NCCL instead and use this
//! only to start up and to report failures.
//!
//! Every frame carries the collective's kind and sequence number, so ranks that run
//! different code paths fail with an error instead of mixing their data. A rank that errors
//! sends an abort frame; a rank that dies closes its connection; a rank that hangs hits the
//! read timeout. In each case rank 0 tells the others, and every rank fails with an error
//! naming the rank at fault.
//!
//! Layout: `rendezvous` connects the ranks at start (`listen` is rank 0's side of it, `auth`
//! the handshake that proves a rank belongs to the job), `frame` is the wire format,
//! `values` turns tensors into bytes and back, and this file runs the collectives.

mod auth;
mod frame;
#[cfg(test)]
mod hostile_tests;
mod listen;
mod rendezvous;
mod store;
#[cfg(test)]
mod tests;
mod values;

use super::env::RankEnv;
use super::{Communicator, PeerFailed};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use frame::{recv, send, Failure, Op, ABORT, DATA};
use rendezvous::{join, Peer};
use std::cell::RefCell;
use std::sync::Mutex;
use std::time::Duration;
use values::Values;

struct Links {
    /// Rank 0: one peer per other rank, in rank order. Others: rank 0 alone.
    peers: Vec<Peer>,
    seq: u64,
    /// Set once a collective failed: every later call fails the same way.
    failed: Option<String>,
}

/// Collectives among CPU processes over TCP through rank 0.
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

impl TcpCommunicator {
    /// Joins the job `env` describes: rank 0 listens (see `rendezvous`) and waits for every
    /// other rank, which connect (retrying until rank 0 is up). `timeout` bounds both the
    /// start and every wait for a peer inside a collective; a signal ends the start.
    pub fn connect(env: &RankEnv, timeout: Duration) -> Result<Self> {
        Self::over(join(env, timeout)?, env, timeout)
    }

    /// The communicator over the connections a join made.
    fn over(peers: Vec<Peer>, env: &RankEnv, timeout: Duration) -> Result<Self> {
        for peer in &peers {
            peer.stream.set_nodelay(true)?;
            peer.stream.set_read_timeout(Some(timeout))?;
            peer.stream.set_write_timeout(Some(timeout))?;
        }
        Ok(Self {
            rank: env.rank,
            world: env.world,
            timeout,
            links: Mutex::new(Links {
                peers,
                seq: 0,
                failed: None,
            }),
        })
    }

    /// One collective round: every leaf sends `mine` to rank 0, which folds the
    /// contributions in rank order (`fold(rank, payload)`, its own first), then sends
    /// `reply(rank)` to each leaf. Returns rank 0's reply to this rank (rank 0: `reply(0)`).
    fn round(
        &self,
        op: Op,
        mine: &[u8],
        fold: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>,
        reply: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| anyhow::anyhow!("communicator poisoned"))?;
        if let Some(failure) = &links.failed {
            bail!("{failure}");
        }
        links.seq += 1;
        let seq = links.seq;
        let outcome = if self.rank == 0 {
            self.root_round(&mut links.peers, op, seq, mine, fold, reply)
        } else {
            let root = &mut links.peers[0];
            match send(&mut root.stream, DATA, op as u8, seq, mine) {
                Ok(()) => recv(&mut root.stream, op, seq),
                // Rank 0 closed the connection after another rank failed: the abort it sent
                // first, naming that rank, may be waiting to be read.
                Err(Failure::Left) => match recv(&mut root.stream, op, seq) {
                    Err(aborted @ Failure::Aborted { .. }) => Err(aborted),
                    _ => Err(Failure::Left),
                },
                Err(failure) => Err(failure),
            }
            .map_err(|failure| self.describe(0, failure))
        };
        if let Err(e) = &outcome {
            links.failed = Some(format!("{e:#}"));
        }
        outcome
    }

    fn root_round(
        &self,
        peers: &mut [Peer],
        op: Op,
        seq: u64,
        mine: &[u8],
        fold: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>,
        reply: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        fold(0, mine.to_vec())?;
        for i in 0..peers.len() {
            let rank = peers[i].rank;
            match recv(&mut peers[i].stream, op, seq) {
                Ok(payload) => fold(rank, payload)?,
                Err(failure) => {
                    let error = self.describe(rank, failure);
                    broadcast_abort(peers, rank, &format!("{error:#}"));
                    return Err(error);
                }
            }
        }
        for i in 0..peers.len() {
            let payload = reply(peers[i].rank);
            if let Err(failure) = send(&mut peers[i].stream, DATA, op as u8, seq, &payload) {
                let rank = peers[i].rank;
                let error = self.describe(rank, failure);
                broadcast_abort(peers, rank, &format!("{error:#}"));
                return Err(error);
            }
        }
        Ok(reply(0))
    }

    /// The error for a failure talking to `rank`.
    fn describe(&self, rank: usize, failure: Failure) -> anyhow::Error {
        let world = self.world;
        let message = match failure {
            Failure::Aborted { rank, message } => {
                format!("rank {rank} of {world} failed: {message}")
            }
            Failure::Left => format!(
                "rank {rank} of {world} left the job: its connection closed (the process exited \
                 or was killed; see its output for why)"
            ),
            Failure::Silent => format!(
                "rank {rank} of {world} sent nothing for {} s (--dist-timeout): it is stuck, far \
                 slower than this rank, or gone",
                self.timeout.as_secs()
            ),
            Failure::OutOfStep(what) => format!(
                "rank {rank} of {world} is out of step with rank {}: {what}; the ranks ran \
                 different code paths (different configs or binaries?)",
                self.rank
            ),
            Failure::Io(e) => format!("connection to rank {rank} of {world} failed: {e}"),
        };
        anyhow::Error::new(PeerFailed(message))
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let values = Values::of(t)?;
        let bytes = values.to_bytes();
        let sum: RefCell<Option<Values>> = RefCell::new(None);
        let result = self.round(
            Op::AllReduce,
            &bytes,
            &mut |rank, payload| {
                let part = values.like(&payload).with_context(|| {
                    format!(
                        "rank {rank} sent {} bytes for an all-reduce of {}",
                        payload.len(),
                        bytes.len()
                    )
                })?;
                let mut sum = sum.borrow_mut();
                match sum.as_mut() {
                    Some(sum) => sum.add(&part),
                    None => *sum = Some(part),
                }
                Ok(())
            },
            &mut |_| {
                sum.borrow()
                    .as_ref()
                    .map(Values::to_bytes)
                    .unwrap_or_default()
            },
        )?;
        values
            .like(&result)
            .context("rank 0 sent an all-reduce result of the wrong size")?
            .tensor(t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            bail!("broadcast from rank {root} in a job of {}", self.world);
        }
        let values = Values::of(t)?;
        let mine = if self.rank == root {
            values.to_bytes()
        } else {
            Vec::new()
        };
        let data = RefCell::new(Vec::new());
        let result = self.round(
            Op::Broadcast,
            &mine,
            &mut |rank, payload| {
                if rank == root {
                    *data.borrow_mut() = payload;
                }
                Ok(())
            },
            &mut |rank| {
                if rank == root {
                    Vec::new()
                } else {
                    data.borrow().clone()
                }
            },
        )?;
        if self.rank == root {
            return Ok(t.clone());
        }
        values
            .like(&result)
            .with_context(|| format!("rank {root} broadcast a tensor of another size"))?
            .tensor(t)
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let parts: RefCell<Vec<Vec<u8>>> = RefCell::new(Vec::with_capacity(self.world));
        let packed = self.round(
            Op::Gather,
            bytes,
            &mut |_, payload| {
                parts.borrow_mut().push(payload);
                Ok(())
            },
            &mut |_| {
                let mut out = Vec::new();
                for part in parts.borrow().iter() {
                    out.extend((part.len() as u64).to_le_bytes());
                    out.extend(part);
                }
                out
            },
        )?;
        let mut out = Vec::with_capacity(self.world);
        let mut rest = &packed[..];
        while rest.len() >= 8 {
            let len = u64::from_le_bytes(rest[..8].try_into()?) as usize;
            let end = 8usize.checked_add(len).filter(|&e| e <= rest.len());
            let end = end.context("rank 0 sent a malformed all-gather result")?;
            out.push(rest[8..end].to_vec());
            rest = &rest[end..];
        }
        if out.len() != self.world || !rest.is_empty() {
            bail!("rank 0 sent {} parts for {} ranks", out.len(), self.world);
        }
        Ok(out)
    }

    fn abort(&self, message: &str) {
        let Ok(mut links) = self.links.lock() else {
            return;
        };
        if links.failed.is_some() {
            // Already failed through a collective: rank 0 has told everyone.
            return;
        }
        links.failed = Some(format!("this rank aborted: {message}"));
        let mut payload = (self.rank as u32).to_le_bytes().to_vec();
        payload.extend(message.as_bytes());
        for peer in &mut links.peers {
            // Best effort with a short deadline: the job is ending either way.
            let _ = peer.stream.set_write_timeout(Some(Duration::from_secs(5)));
            let _ = send(&mut peer.stream, ABORT, 0, 0, &payload);
        }
    }
}

/// Rank 0 passes `rank`'s failure on to every other leaf, best effort.
fn broadcast_abort(peers: &mut [Peer], rank: usize, message: &str) {
    let mut payload = (rank as u32).to_le_bytes().to_vec();
    payload.extend(message.as_bytes());
    for peer in peers.iter_mut().filter(|p| p.rank != rank) {
        let _ = peer.stream.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = send(&mut peer.stream, ABORT, 0, 0, &payload);
    }
}
