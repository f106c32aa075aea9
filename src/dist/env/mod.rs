//! Where a process learns its place in a job, from the variables its launcher set:
//!
//! | launcher | rank, world | local rank, local world | rank 0's host |
//! |---|---|---|---|
//! | torchrun, `--nproc-per-node` | `RANK`, `WORLD_SIZE` | `LOCAL_RANK`, `LOCAL_WORLD_SIZE` | `MASTER_ADDR` |
//! | plain variables (Kubeflow PyTorchJob) | `RANK`, `WORLD_SIZE` | one rank per pod (all local when `MASTER_ADDR` is loopback) | `MASTER_ADDR` |
//! | Open MPI | `OMPI_COMM_WORLD_RANK`, `_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK`, `_LOCAL_SIZE` | `MASTER_ADDR`, or loopback on one node |
//! | MPICH, Intel MPI (PMI) | `PMI_RANK`, `PMI_SIZE` | `MPI_LOCALRANKID`, `MPI_LOCALNRANKS` | same |
//! | MVAPICH2 | `MV2_COMM_WORLD_RANK`, `_SIZE` | `MV2_COMM_WORLD_LOCAL_RANK`, `_LOCAL_SIZE` | same |
//! | Slurm `srun` | `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` | `SLURM_LOCALID`, `SLURM_STEP_TASKS_PER_NODE` | first host of `SLURM_STEP_NODELIST` |
//!
//! The first launcher in this order whose variables are set wins: torchrun and MPI run
//! inside Slurm allocations and inherit its variables. `MASTER_ADDR` and `MASTER_PORT`
//! always win when set. A Kubeflow pod with `PET_NPROC_PER_NODE` above one and no
//! `LOCAL_RANK` is a node whose ranks this process starts ([`Placement::Node`]), as torchrun
//! would.

use crate::dist::hostlist;
use anyhow::{bail, Context, Result};

mod secret;
pub use secret::{generate as generate_secret, hex, random_bytes, JobSecret, SECRET_VAR};

/// The most ranks a job may have (2^20): rank 0's rendezvous holds one TCP connection, one
/// file descriptor, per rank, and Linux caps a process's descriptors at 2^20 (`fs.nr_open`'s
/// default). A larger world size is a launcher's mistake, not a job to try.
pub const MAX_WORLD_SIZE: usize = 1 << 20;

/// Port rank 0 listens on when `MASTER_PORT` is unset (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Base of the ports Slurm steps derive from their job id when `MASTER_PORT` is unset.
const SLURM_PORT_BASE: u16 = 15000;

/// Ports above the base that Slurm job ids spread over.
const SLURM_PORT_SPAN: u64 = 40000;

/// The launcher whose variables placed this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun, `python -m torch.distributed.run`, or our `--nproc-per-node`.
    Torchrun,
    /// `RANK` and `WORLD_SIZE` alone, as a Kubeflow PyTorchJob sets them.
    Plain,
    /// Open MPI's `mpirun`.
    OpenMpi,
    /// MPICH's or Intel MPI's Hydra (`PMI_*`).
    Pmi,
    /// MVAPICH2's `mpirun_rsh`.
    Mvapich,
    /// A Slurm `srun` step.
    Slurm,
}

impl Launcher {
    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Torchrun => "torchrun",
            Self::Plain => "RANK/WORLD_SIZE",
            Self::OpenMpi => "Open MPI",
            Self::Pmi => "MPICH/PMI",
            Self::Mvapich => "MVAPICH2",
            Self::Slurm => "Slurm",
        }
    }
}

/// This process's rank in a multi-process job and how to reach rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// Rank on this machine.
    pub local_rank: usize,
    /// Ranks on this machine: share its cores.
    pub local_world: usize,
    /// The CUDA ordinal of this rank's GPU among those it can see.
    pub gpu: usize,
    /// Host of rank 0.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
    /// Set when torchrun's agent serves its store on `MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE`): the restart count of this attempt. Rank 0 then
    /// listens on a free port and publishes it in that store.
    pub agent_store_attempt: Option<u64>,
    /// The key every rank proves it holds when it joins (see [`JobSecret`]).
    pub secret: JobSecret,
}

impl RankEnv {
    /// Rank `rank` of a `world`-rank job whose ranks all run on this machine (threads or
    /// processes), rank 0 listening on `127.0.0.1:port`, rank `r` on GPU `r`.
    pub fn local(rank: usize, world: usize, port: u16) -> Self {
        Self {
            rank,
            world,
            local_rank: rank,
            local_world: world,
            gpu: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Torchrun,
            agent_store_attempt: None,
            // Threads of one test process: a key every rank of this port agrees on.
            secret: JobSecret::derived(&["local", &port.to_string()]),
        }
    }
}

/// The ranks of one node that this process starts itself, as torchrun would: our
/// `--nproc-per-node`, or a Kubeflow pod given `PET_NPROC_PER_NODE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLaunch {
    /// Ranks on this node.
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// None: pick a free port (one node only).
    pub master_port: Option<u16>,
}

/// What the environment makes of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// No launcher, or a world of one.
    Alone,
    /// One rank of a job.
    Rank(RankEnv),
    /// A node whose ranks this process must start.
    Node(NodeLaunch),
}

/// Reads this process's placement from its environment (see the module's table).
pub fn placement() -> Result<Placement> {
    from_vars(|name| std::env::var(name).ok())
}

/// The rank layout alone: None unless this process is one rank of a multi-rank job.
pub fn from_env() -> Result<Option<RankEnv>> {
    Ok(match placement()? {
        Placement::Rank(env) => Some(env),
        _ => None,
    })
}

/// [`placement`] over any variable lookup, for tests.
pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Placement> {
    let vars = Vars(&var);
    let Some(ranks) = ranks(&vars)? else {
        return Ok(Placement::Alone);
    };
    if ranks.world > MAX_WORLD_SIZE {
        bail!(
            "the {} variables give a world size of {} ranks, above the limit of \
             {MAX_WORLD_SIZE} (2^20: rank 0 holds one connection per rank, and a process may \
             open at most 2^20 files); check the launcher's variables (WORLD_SIZE or its \
             equivalent)",
            ranks.launcher.name(),
            ranks.world
        );
    }
    if let Some(node) = kubeflow_node(&vars, &ranks)? {
        return Ok(Placement::Node(node));
    }
    let (rank, world, launcher) = (ranks.rank, ranks.world, ranks.launcher);
    if world == 0 || rank >= world {
        bail!(
            "rank {rank} is not below the world size {world} (from the {} variables)",
            launcher.name()
        );
    }
    if world == 1 {
        return Ok(Placement::Alone);
    }
    let master_addr = master_addr(&vars, &ranks)?;
    let (local_rank, local_world) = match ranks.local {
        Some(local) => local,
        // One rank per pod or host, unless every rank is on this one (loopback).
        None if is_loopback(&master_addr) => (rank, world),
        None => (0, 1),
    };
    if local_rank >= local_world.max(1) {
        bail!(
            "local rank {local_rank} is not below the local world size {local_world} (from \
             the {} variables)",
            launcher.name()
        );
    }
    let agent_store_attempt = match vars.get("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
        Some("True" | "true" | "1") if launcher == Launcher::Torchrun => {
            Some(vars.number("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0) as u64)
        }
        _ => None,
    };
    Ok(Placement::Rank(RankEnv {
        rank,
        world,
        local_rank,
        local_world: local_world.max(1),
        gpu: gpu_ordinal(
            local_rank,
            local_world,
            vars.get("CUDA_VISIBLE_DEVICES").as_deref(),
        ),
        master_port: master_port(&vars, launcher)?,
        master_addr,
        launcher,
        agent_store_attempt,
        secret: secret::from_vars(&|name| vars.get(name), launcher, world)?,
    }))
}

/// The CUDA ordinal of local rank `local_rank` among the GPUs it sees. Every rank of a node
/// seeing all of its GPUs takes the one at its local rank; a rank that sees fewer GPUs than
/// there are local ranks was given its own (Slurm's `--gpus-per-task`, one GPU per
/// container) and takes the first.
pub fn gpu_ordinal(local_rank: usize, local_world: usize, visible: Option<&str>) -> usize {
    let seen = visible.map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count());
    match seen {
        Some(seen) if seen < local_world.max(1) => 0,
        _ => local_rank,
    }
}

/// Variable lookups with the parse errors users need.
struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).map(|v| v.trim().to_string())
    }

    fn number(&self, name: &str) -> Result<Option<usize>> {
        self.get(name)
            .map(|v| {
                v.parse::<usize>().with_context(|| {
                    format!("environment variable {name}='{v}' is not a non-negative integer")
                })
            })
            .transpose()
    }

    fn required(&self, name: &str, because: &str) -> Result<usize> {
        self.number(name)?
            .with_context(|| format!("{because} is set but {name} is not"))
    }
}

/// Rank and world as one launcher's variables give them.
struct Ranks {
    rank: usize,
    world: usize,
    local: Option<(usize, usize)>,
    launcher: Launcher,
}

fn ranks(vars: &Vars) -> Result<Option<Ranks>> {
    if let Some(world) = vars.number("WORLD_SIZE")? {
        let rank = vars.required("RANK", "WORLD_SIZE")?;
        let local = match vars.number("LOCAL_RANK")? {
            Some(local_rank) => Some((
                local_rank,
                vars.number("LOCAL_WORLD_SIZE")?.unwrap_or(world),
            )),
            None => None,
        };
        let torchrun = local.is_some() || vars.get("TORCHELASTIC_RUN_ID").is_some();
        let launcher = if torchrun {
            Launcher::Torchrun
        } else {
            Launcher::Plain
        };
        return Ok(Some(Ranks {
            rank,
            world,
            local,
            launcher,
        }));
    }
    for (launcher, prefix_rank, prefix_size, local_rank, local_size) in [
        (
            Launcher::OpenMpi,
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
        (
            Launcher::Pmi,
            "PMI_RANK",
            "PMI_SIZE",
            "MPI_LOCALRANKID",
            "MPI_LOCALNRANKS",
        ),
        (
            Launcher::Mvapich,
            "MV2_COMM_WORLD_RANK",
            "MV2_COMM_WORLD_SIZE",
            "MV2_COMM_WORLD_LOCAL_RANK",
            "MV2_COMM_WORLD_LOCAL_SIZE",
        ),
    ] {
        if let Some(world) = vars.number(prefix_size)? {
            let rank = vars.required(prefix_rank, prefix_size)?;
            let local = match (vars.number(local_rank)?, vars.number(local_size)?) {
                (Some(r), Some(n)) => Some((r, n)),
                _ => None,
            };
            return Ok(Some(Ranks {
                rank,
                world,
                local,
                launcher,
            }));
        }
    }
    if let Some(world) = vars.number("SLURM_STEP_NUM_TASKS")? {
        let rank = vars.required("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")?;
        let local_rank = vars.number("SLURM_LOCALID")?.unwrap_or(0);
        let local_world = match vars.get("SLURM_STEP_TASKS_PER_NODE") {
            Some(list) => {
                hostlist::tasks_on_node(&list, vars.number("SLURM_NODEID")?.unwrap_or(0))?
            }
            None => world.div_ceil(vars.number("SLURM_STEP_NUM_NODES")?.unwrap_or(1).max(1)),
        };
        return Ok(Some(Ranks {
            rank,
            world,
            local: Some((local_rank, local_world)),
            launcher: Launcher::Slurm,
        }));
    }
    Ok(None)
}

/// A Kubeflow PyTorchJob pod running this binary itself (not torchrun) with
/// `PET_NPROC_PER_NODE` above one: `RANK` is then the pod's node rank and `WORLD_SIZE`
/// counts every process of every pod.
fn kubeflow_node(vars: &Vars, ranks: &Ranks) -> Result<Option<NodeLaunch>> {
    if ranks.launcher != Launcher::Plain {
        return Ok(None);
    }
    let nproc = match vars.get("PET_NPROC_PER_NODE") {
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n > 1 => n,
            // `auto` or 1: one process per pod, as `RANK` and `WORLD_SIZE` say.
            _ => return Ok(None),
        },
        None => return Ok(None),
    };
    let node_rank = vars.number("PET_NODE_RANK")?.unwrap_or(ranks.rank);
    let nnodes = match vars.get("PET_NNODES") {
        Some(n) => n.parse::<usize>().with_context(|| {
            format!(
                "PET_NNODES='{n}': elastic node ranges need torchrun in the pod; run \
                 `torchrun bsfa-train ...` as the container's command"
            )
        })?,
        None => ranks.world / nproc,
    };
    if nnodes * nproc != ranks.world || node_rank >= nnodes {
        bail!(
            "the Kubeflow variables disagree: WORLD_SIZE={} but PET_NNODES={nnodes} x \
             PET_NPROC_PER_NODE={nproc}, node rank {node_rank}",
            ranks.world
        );
    }
    let master_addr = vars
        .get("PET_MASTER_ADDR")
        .or_else(|| vars.get("MASTER_ADDR"))
        .filter(|a| !a.is_empty())
        .context("a Kubeflow pod needs MASTER_ADDR (the operator sets it)")?;
    let port = vars
        .get("PET_MASTER_PORT")
        .or_else(|| vars.get("MASTER_PORT"));
    let master_port = port.map(|p| parse_port(&p)).transpose()?;
    Ok(Some(NodeLaunch {
        nproc,
        nnodes,
        node_rank,
        master_addr,
        master_port: Some(master_port.unwrap_or(DEFAULT_MASTER_PORT)),
    }))
}

fn master_addr(vars: &Vars, ranks: &Ranks) -> Result<String> {
    if let Some(addr) = vars.get("MASTER_ADDR").filter(|a| !a.is_empty()) {
        return Ok(addr);
    }
    let single_node = ranks.local.is_some_and(|(_, n)| n == ranks.world);
    match ranks.launcher {
        Launcher::Slurm => {
            let list = vars
                .get("SLURM_STEP_NODELIST")
                .or_else(|| vars.get("SLURM_JOB_NODELIST"))
                .or_else(|| vars.get("SLURM_NODELIST"));
            match list {
                Some(list) => hostlist::first_host(&list),
                None if single_node => Ok("127.0.0.1".into()),
                None => bail!(
                    "a Slurm step over several nodes without SLURM_STEP_NODELIST: set \
                     MASTER_ADDR to the first node's host name"
                ),
            }
        }
        _ if single_node => Ok("127.0.0.1".into()),
        Launcher::OpenMpi | Launcher::Pmi | Launcher::Mvapich => bail!(
            "MASTER_ADDR is not set: ranks on several hosts need rank 0's host name, e.g. \
             `mpirun -x MASTER_ADDR=$(hostname) ...` (Open MPI) or `mpiexec -genv MASTER_ADDR \
             $(hostname) ...` (MPICH)"
        ),
        _ => bail!(
            "MASTER_ADDR is not set: every rank needs rank 0's host name (torchrun and the \
             Kubeflow operator set it)"
        ),
    }
}

fn master_port(vars: &Vars, launcher: Launcher) -> Result<u16> {
    if let Some(port) = vars.get("MASTER_PORT") {
        return parse_port(&port);
    }
    // Several jobs may share a node: a port from the job id keeps their steps apart.
    match (launcher, vars.number("SLURM_JOB_ID")?) {
        (Launcher::Slurm, Some(job)) => {
            let step = vars.number("SLURM_STEP_ID")?.unwrap_or(0) as u64;
            let spread = (job as u64 * 8 + step) % SLURM_PORT_SPAN;
            Ok(SLURM_PORT_BASE + spread as u16)
        }
        _ => Ok(DEFAULT_MASTER_PORT),
    }
}

/// `MASTER_PORT`'s value as a port number, or an error naming it. Port 0 (let the system
/// pick) is refused: every rank must know rank 0's port before it starts, and a port the
/// system picks would be known to rank 0 alone.
pub fn parse_port(port: &str) -> Result<u16> {
    let number = port
        .trim()
        .parse::<u16>()
        .with_context(|| format!("MASTER_PORT='{port}' is not a port number"))?;
    if number == 0 {
        bail!(
            "MASTER_PORT=0: the other ranks could never find the port the system would pick \
             for rank 0; set a free port every rank knows (e.g. 29500), or unset MASTER_PORT \
             (our --nproc-per-node picks a free one itself)"
        );
    }
    Ok(number)
}

/// Whether `host` names this machine's loopback interface.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests;
