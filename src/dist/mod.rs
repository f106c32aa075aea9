//! Data parallelism: the [`Communicator`] every rank talks through, the launcher that
//! spawns ranks on one machine, and where a process learns its rank.
//!
//! Two implementations sit behind the trait: [`tcp::TcpCommunicator`] (CPU tensors over
//! TCP through rank 0, for CPU ranks, tests, and the control channel of GPU runs) and, with
//! the `nccl` feature, `nccl::NcclCommunicator` (CUDA tensors through NCCL).

mod collectives;
pub mod env;
mod hostlist;
pub mod launch;
#[cfg(any(feature = "nccl", test))]
mod lockstep;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

pub use collectives::{
    agree, all_gather_array, all_gather_f64, average_gradients, broadcast_params, share_path,
};

use crate::device::DeviceKind;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;
use std::time::Duration;

/// Collective operations among the ranks of one training job. Every rank must call the
/// same operations in the same order; each call blocks until all ranks took part (or fails
/// with an error naming the rank that failed, left or timed out).
pub trait Communicator: Send + Sync {
    /// This process's rank, `0..world`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world(&self) -> usize;

    /// The element-wise sum of `t` over all ranks (same shape and dtype everywhere, on this
    /// rank's device). Every rank receives the same bits.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Rank `root`'s `t` on every rank (every rank passes a tensor of the same shape and
    /// dtype; only the root's values matter).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Every rank's `bytes`, in rank order: small control messages, not tensors.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_gather_bytes(&[]).map(|_| ())
    }

    /// Tells the other ranks, best effort, that this rank is stopping with `message`, so
    /// they fail at once with an error naming it instead of waiting for a timeout.
    fn abort(&self, message: &str);
}

/// An error caused by another rank (it failed, left, hung or ran other code), as opposed to
/// one of this rank's own: launchers use the difference to name the rank at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerFailed(pub String);

/// Exit status of a rank that stops because another rank failed.
pub const PEER_FAILED_STATUS: u8 = 3;

/// Whether `e` (or any error in its chain) is a [`PeerFailed`].
pub fn caused_by_peer(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<PeerFailed>())
}

/// The communicator of a job with one rank: every collective is the identity.
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }

    fn abort(&self, _message: &str) {}
}

/// A process's part in a training job: how it talks to the other ranks and its device.
pub struct Job {
    pub comm: Arc<dyn Communicator>,
    pub device: Device,
}

impl Job {
    /// A job of one process on the device `device` names.
    pub fn single(device: DeviceKind) -> Result<Self> {
        Ok(Self {
            comm: Arc::new(SingleRank),
            device: crate::device::select(device, 0)?,
        })
    }

    /// Joins the job the environment describes (see [`env::from_env`]), or runs alone when
    /// it describes none. CUDA ranks talk through NCCL when built with it, CPU ranks (and
    /// CUDA ranks of a build without NCCL, through host copies) over TCP.
    /// `timeout` bounds every wait for the other ranks.
    pub fn from_env(device: DeviceKind, timeout: Duration) -> Result<Self> {
        let Some(layout) = env::from_env()? else {
            return Self::single(device);
        };
        let device = crate::device::select(device, layout.gpu)?;
        let tcp = tcp::TcpCommunicator::connect(&layout, timeout).with_context(|| {
            format!(
                "rank {} of {} could not join the job",
                layout.rank, layout.world
            )
        })?;
        Ok(Self {
            comm: connect_device(tcp, &device, timeout)?,
            device,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Rank 0 writes metrics, progress, summaries and the shared part of checkpoints.
    pub fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }
}

#[cfg(feature = "nccl")]
fn connect_device(
    tcp: tcp::TcpCommunicator,
    device: &Device,
    timeout: Duration,
) -> Result<Arc<dyn Communicator>> {
    if device.is_cuda() {
        return Ok(Arc::new(nccl::NcclCommunicator::new(
            Box::new(tcp),
            device,
            timeout,
        )?));
    }
    Ok(Arc::new(tcp))
}

#[cfg(not(feature = "nccl"))]
fn connect_device(
    tcp: tcp::TcpCommunicator,
    _device: &Device,
    _timeout: Duration,
) -> Result<Arc<dyn Communicator>> {
    Ok(Arc::new(tcp))
}
