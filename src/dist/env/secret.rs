//! The per-job secret every rank proves it holds when it joins (the rendezvous'
//! challenge-response, `dist::tcp::auth`), and where it comes from:
//!
//! 1. `BSFA_TRAIN_JOB_SECRET`, set by whoever starts the ranks (our `--nproc-per-node`
//!    launcher generates a random one for its ranks): a real secret.
//! 2. Otherwise a key derived from what the launcher gives every rank of this job and no
//!    other job: torchrun's `TORCHELASTIC_RUN_ID` (and, under its agent store, a random
//!    token rank 0 publishes there), Slurm's job and step ids, Open MPI's job id and the
//!    address of its `mpirun`. Guessable by anyone who knows the job, so this only keeps out
//!    strangers' stray connections and other jobs that land on the same port; see
//!    docs/distributed.md.

use anyhow::{bail, Result};
use sha2::{Digest, Sha256};

/// The variable that carries an explicit job secret to every rank.
pub const SECRET_VAR: &str = "BSFA_TRAIN_JOB_SECRET";

/// Fewer characters than this in an explicit secret are refused: 16 hex digits are 64 bits.
const MIN_SECRET_CHARS: usize = 16;

/// The key of one job's rendezvous. Its `Debug` shows where it came from, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct JobSecret {
    key: [u8; 32],
    /// True when set explicitly (`BSFA_TRAIN_JOB_SECRET`), false when derived from the
    /// launcher's job ids.
    pub explicit: bool,
}

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.explicit { "explicit" } else { "derived" };
        write!(f, "JobSecret({kind})")
    }
}

impl JobSecret {
    /// The key, for the handshake's MACs.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// A key derived from `parts` (the launcher's job ids), not a secret.
    pub fn derived(parts: &[&str]) -> Self {
        Self {
            key: digest(
                b"bsfa-train derived job key",
                parts.iter().map(|p| p.as_bytes()),
            ),
            explicit: false,
        }
    }

    /// This key mixed with `token` (rank 0's random token of this restart attempt, read by
    /// every rank from torchrun's store).
    pub fn with_token(&self, token: &[u8]) -> Self {
        Self {
            key: digest(
                b"bsfa-train attempt key",
                [&self.key[..], token].into_iter(),
            ),
            explicit: self.explicit,
        }
    }
}

/// SHA-256 of `label` and each part, each prefixed by its length so that parts cannot run
/// into each other.
fn digest<'a>(label: &[u8], parts: impl Iterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(label);
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

/// A fresh random secret for the ranks our launcher starts, as hex.
pub fn generate() -> Result<String> {
    Ok(hex(&random_bytes::<32>()?))
}

/// `N` bytes from the system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("the system's random source failed: {e}"))?;
    Ok(bytes)
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The secret of this job from its variables (`var` looks one up, trimmed), for ranks of a
/// job that `launcher` started with `world` ranks.
pub(super) fn from_vars(
    var: &dyn Fn(&str) -> Option<String>,
    launcher: super::Launcher,
    world: usize,
) -> Result<JobSecret> {
    if let Some(secret) = var(SECRET_VAR) {
        if secret.chars().count() < MIN_SECRET_CHARS {
            bail!(
                "{SECRET_VAR} has {} characters; use at least {MIN_SECRET_CHARS}, e.g. \
                 `export {SECRET_VAR}=$(openssl rand -hex 32)`",
                secret.chars().count()
            );
        }
        return Ok(JobSecret {
            key: digest(
                b"bsfa-train explicit job key",
                [secret.as_bytes()].into_iter(),
            ),
            explicit: true,
        });
    }
    let ids = job_ids(var, launcher);
    let world = world.to_string();
    let mut parts: Vec<&str> = vec![launcher.name(), &world];
    parts.extend(ids.iter().map(String::as_str));
    Ok(JobSecret::derived(&parts))
}

/// The values of the variables `launcher` sets alike on every rank of one job and
/// differently for each job (empty when unset, so each keeps its place). Per-node or
/// per-rank ones (Open MPI's `OMPI_MCA_orte_local_daemon_uri`, `PMIX_SERVER_URI*`) would
/// split the job.
fn job_ids(var: &dyn Fn(&str) -> Option<String>, launcher: super::Launcher) -> Vec<String> {
    use super::Launcher::*;
    let names: &[&str] = match launcher {
        Torchrun => &["TORCHELASTIC_RUN_ID"],
        Slurm => &["SLURM_CLUSTER_NAME", "SLURM_JOB_ID", "SLURM_STEP_ID"],
        OpenMpi => &[
            "OMPI_MCA_orte_hnp_uri",
            "OMPI_MCA_ess_base_jobid",
            "PMIX_NAMESPACE",
        ],
        // Kubeflow's pods, MPICH's Hydra and MVAPICH2 give their ranks no job id.
        Plain | Pmi | Mvapich => &[],
    };
    names
        .iter()
        .map(|name| var(name).unwrap_or_default())
        .collect()
}
