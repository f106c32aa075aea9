//! Where a process learns its place in a job: the variables torchrun (and our own
//! `--nproc-per-node` launcher) set, or those of a Slurm `srun` step.

use anyhow::{bail, Context, Result};

/// Port rank 0 listens on when `MASTER_PORT` is unset (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// This process's rank in a multi-process job and how to reach rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// Rank on this machine: picks the GPU.
    pub local_rank: usize,
    /// Ranks on this machine: share its cores.
    pub local_world: usize,
    /// Host of rank 0.
    pub master_addr: String,
    pub master_port: u16,
}

/// Reads the job layout from the environment: torchrun's `RANK`, `WORLD_SIZE`,
/// `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` first, else a Slurm step's
/// `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, `SLURM_STEP_NUM_NODES`. None for a
/// single process (no such variables, or a world of one).
pub fn from_env() -> Result<Option<RankEnv>> {
    from_vars(|name| std::env::var(name).ok())
}

/// [`from_env`] over any variable lookup, for tests.
pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
    let number = |name: &str| -> Result<Option<usize>> {
        var(name)
            .map(|v| {
                v.trim().parse::<usize>().with_context(|| {
                    format!("environment variable {name}='{v}' is not a non-negative integer")
                })
            })
            .transpose()
    };
    let (rank, world, local_rank, local_world, launcher) =
        if let Some(world) = number("WORLD_SIZE")? {
            let rank = number("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
            let local_world = number("LOCAL_WORLD_SIZE")?.unwrap_or(world);
            (rank, world, local_rank, local_world, "torchrun")
        } else if let Some(world) = number("SLURM_STEP_NUM_TASKS")? {
            let rank = number("SLURM_PROCID")?
                .context("SLURM_STEP_NUM_TASKS is set but SLURM_PROCID is not")?;
            let local_rank = number("SLURM_LOCALID")?.unwrap_or(0);
            let nodes = number("SLURM_STEP_NUM_NODES")?.unwrap_or(1).max(1);
            (rank, world, local_rank, world.div_ceil(nodes), "slurm")
        } else {
            return Ok(None);
        };
    if world == 0 || rank >= world {
        bail!("rank {rank} is not below the world size {world} (from the {launcher} environment)");
    }
    if world == 1 {
        return Ok(None);
    }
    let master_addr = match var("MASTER_ADDR") {
        Some(addr) if !addr.trim().is_empty() => addr.trim().to_string(),
        _ if launcher == "slurm" && number("SLURM_STEP_NUM_NODES")?.unwrap_or(1) <= 1 => {
            "127.0.0.1".to_string()
        }
        _ => bail!(
            "MASTER_ADDR is not set: every rank needs rank 0's host name. Under Slurm, e.g. \
             `export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)`"
        ),
    };
    let master_port = match var("MASTER_PORT") {
        Some(port) => port
            .trim()
            .parse::<u16>()
            .with_context(|| format!("MASTER_PORT='{port}' is not a port number"))?,
        None => DEFAULT_MASTER_PORT,
    };
    Ok(Some(RankEnv {
        rank,
        world,
        local_rank,
        local_world: local_world.max(1),
        master_addr,
        master_port,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn layout(vars: &[(&str, &str)]) -> Result<Option<RankEnv>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn torchrun_variables_win_over_slurm() -> Result<()> {
        let env = layout(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
        ])?
        .expect("a multi-rank job");
        assert_eq!(
            env,
            RankEnv {
                rank: 3,
                world: 8,
                local_rank: 1,
                local_world: 2,
                master_addr: "node7".into(),
                master_port: 1234
            }
        );
        Ok(())
    }

    #[test]
    fn slurm_step_on_one_node_needs_no_master_addr() -> Result<()> {
        let env = layout(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_NUM_NODES", "1"),
        ])?
        .expect("a multi-rank job");
        assert_eq!((env.rank, env.world, env.local_rank), (1, 4, 1));
        assert_eq!(env.local_world, 4);
        assert_eq!(env.master_addr, "127.0.0.1");
        assert_eq!(env.master_port, DEFAULT_MASTER_PORT);
        let err = layout(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_STEP_NUM_NODES", "2"),
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("MASTER_ADDR"), "{err:#}");
        Ok(())
    }

    #[test]
    fn single_process_and_bad_values() -> Result<()> {
        assert_eq!(layout(&[])?, None);
        assert_eq!(layout(&[("RANK", "0"), ("WORLD_SIZE", "1")])?, None);
        let err = layout(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{err:#}").contains("not below"), "{err:#}");
        let err = layout(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{err:#}").contains("RANK='x'"), "{err:#}");
        let err = layout(&[("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{err:#}").contains("RANK is not"), "{err:#}");
        Ok(())
    }
}
