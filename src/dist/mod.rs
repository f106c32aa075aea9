//! Data parallelism: the [`Communicator`] every rank talks through, the launcher that
//! spawns ranks on one machine, and where a process learns its rank.
//!
//! Two implementations sit behind the trait: [`tcp::TcpCommunicator`] (CPU tensors over
//! TCP through rank 0, for CPU ranks, tests, and the control channel of GPU runs) and, with
//! the `nccl` feature, `nccl::NcclCommunicator` (CUDA tensors through NCCL).

#[cfg(feature = "nccl")]
pub mod nccl;

use anyhow::Result;
use candle_core::Tensor;

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
