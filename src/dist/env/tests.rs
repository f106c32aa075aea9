//! Every launcher's variables, as each one sets them, and the errors for bad values.

use super::*;
use std::collections::HashMap;

fn layout(vars: &[(&str, &str)]) -> Result<Placement> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    from_vars(|name| vars.get(name).cloned())
}

fn rank_env(vars: &[(&str, &str)]) -> RankEnv {
    match layout(vars) {
        Ok(Placement::Rank(env)) => env,
        other => panic!("not a rank: {other:?}"),
    }
}

#[test]
fn torchrun_variables_win_over_mpi_and_slurm() {
    let env = rank_env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node7"),
        ("MASTER_PORT", "1234"),
        ("OMPI_COMM_WORLD_RANK", "0"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("SLURM_PROCID", "0"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ]);
    assert_eq!(
        env,
        RankEnv {
            rank: 3,
            world: 8,
            local_rank: 1,
            local_world: 2,
            gpu: 1,
            master_addr: "node7".into(),
            master_port: 1234,
            launcher: Launcher::Torchrun,
            agent_store_attempt: Some(2),
            // torchrun's TORCHELASTIC_RUN_ID is unset here.
            secret: JobSecret::derived(&["torchrun", "8", ""]),
        }
    );
}

#[test]
fn slurm_steps_find_rank_zero_and_their_node() {
    let env = rank_env(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_STEP_NUM_TASKS", "7"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "2"),
        ("SLURM_STEP_NUM_NODES", "3"),
        ("SLURM_STEP_TASKS_PER_NODE", "3,2(x2)"),
        ("SLURM_STEP_NODELIST", "gpu[07-09],cpu1"),
        ("SLURM_JOB_ID", "123456"),
        ("SLURM_STEP_ID", "1"),
        ("CUDA_VISIBLE_DEVICES", "3"),
    ]);
    assert_eq!(
        (env.rank, env.world, env.local_rank, env.local_world),
        (5, 7, 1, 2)
    );
    assert_eq!(env.master_addr, "gpu07");
    // 15000 + (123456 * 8 + 1) mod 40000
    assert_eq!(env.master_port, 42649);
    assert_eq!(env.gpu, 0, "--gpus-per-task: each task sees its own GPU");
    assert_eq!(env.launcher, Launcher::Slurm);
    // One node without a node list; MASTER_ADDR and MASTER_PORT win when set.
    let env = rank_env(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_STEP_NUM_TASKS", "4"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_STEP_NUM_NODES", "1"),
        ("MASTER_PORT", "999"),
    ]);
    assert_eq!((env.local_world, env.gpu), (4, 1));
    assert_eq!(
        (env.master_addr.as_str(), env.master_port),
        ("127.0.0.1", 999)
    );
    let err = layout(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_STEP_NUM_TASKS", "8"),
        ("SLURM_STEP_NUM_NODES", "2"),
    ])
    .unwrap_err();
    assert!(format!("{err:#}").contains("MASTER_ADDR"), "{err:#}");
}

#[test]
fn kubeflow_pods_use_their_own_gpu_or_start_their_node() {
    // One process per pod: pod 3 is local rank 0.
    let env = rank_env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("MASTER_ADDR", "job-master-0"),
        ("MASTER_PORT", "23456"),
        ("PET_NPROC_PER_NODE", "auto"),
    ]);
    assert_eq!((env.local_rank, env.local_world, env.gpu), (0, 1, 0));
    assert_eq!(env.launcher, Launcher::Plain);
    // Plain variables on one machine stay local.
    let env = rank_env(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
    ]);
    assert_eq!((env.local_rank, env.local_world), (1, 2));
    // PET_NPROC_PER_NODE > 1 without torchrun: this pod starts its ranks.
    let node = layout(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "8"),
        ("MASTER_ADDR", "job-master-0"),
        ("MASTER_PORT", "23456"),
        ("PET_NPROC_PER_NODE", "4"),
        ("PET_NNODES", "2"),
        ("PET_NODE_RANK", "1"),
    ])
    .unwrap();
    assert_eq!(
        node,
        Placement::Node(NodeLaunch {
            nproc: 4,
            nnodes: 2,
            node_rank: 1,
            master_addr: "job-master-0".into(),
            master_port: Some(23456),
        })
    );
    let err = layout(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "6"),
        ("MASTER_ADDR", "m"),
        ("PET_NPROC_PER_NODE", "4"),
        ("PET_NNODES", "2"),
    ])
    .unwrap_err();
    assert!(format!("{err:#}").contains("disagree"), "{err:#}");
}

#[test]
fn mpi_launchers() {
    let env = rank_env(&[
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ("SLURM_PROCID", "0"),
        ("SLURM_STEP_NUM_TASKS", "1"),
    ]);
    assert_eq!(
        (env.rank, env.world, env.local_rank, env.local_world),
        (1, 2, 1, 2)
    );
    assert_eq!(
        env.master_addr, "127.0.0.1",
        "one node needs no MASTER_ADDR"
    );
    assert_eq!(env.launcher, Launcher::OpenMpi);
    let env = rank_env(&[
        ("PMI_RANK", "2"),
        ("PMI_SIZE", "4"),
        ("MPI_LOCALRANKID", "0"),
        ("MPI_LOCALNRANKS", "2"),
        ("MASTER_ADDR", "h0"),
    ]);
    assert_eq!(
        (env.rank, env.local_rank, env.master_addr.as_str()),
        (2, 0, "h0")
    );
    let err = layout(&[
        ("PMI_RANK", "2"),
        ("PMI_SIZE", "4"),
        ("MPI_LOCALRANKID", "0"),
        ("MPI_LOCALNRANKS", "2"),
    ])
    .unwrap_err();
    assert!(format!("{err:#}").contains("-x MASTER_ADDR"), "{err:#}");
    let env = rank_env(&[
        ("MV2_COMM_WORLD_RANK", "1"),
        ("MV2_COMM_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
    ]);
    assert_eq!((env.rank, env.launcher), (1, Launcher::Mvapich));
}

#[test]
fn gpu_ordinals() {
    assert_eq!(gpu_ordinal(3, 4, None), 3);
    assert_eq!(gpu_ordinal(3, 4, Some("0,1,2,3")), 3);
    assert_eq!(gpu_ordinal(3, 4, Some("5")), 0);
    assert_eq!(gpu_ordinal(1, 2, Some("4,5,6,7")), 1);
}

#[test]
fn single_process_and_bad_values() -> Result<()> {
    assert_eq!(layout(&[])?, Placement::Alone);
    assert_eq!(
        layout(&[("RANK", "0"), ("WORLD_SIZE", "1")])?,
        Placement::Alone
    );
    let err = layout(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
    assert!(format!("{err:#}").contains("not below"), "{err:#}");
    let err = layout(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
    assert!(format!("{err:#}").contains("RANK='x'"), "{err:#}");
    let err = layout(&[("WORLD_SIZE", "2")]).unwrap_err();
    assert!(format!("{err:#}").contains("RANK is not"), "{err:#}");
    let err = layout(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "70000"),
    ])
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("MASTER_PORT='70000'"),
        "{err:#}"
    );
    Ok(())
}

#[test]
fn master_port_0_is_refused() {
    let err = layout(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "0"),
    ])
    .unwrap_err();
    assert!(format!("{err:#}").contains("MASTER_PORT=0"), "{err:#}");
}

/// The secret of rank `rank` of a 4-rank Slurm step of job `job`, with `extra` variables.
fn slurm_secret(rank: &str, job: &str, extra: &[(&str, &str)]) -> Result<JobSecret> {
    let mut vars = vec![
        ("SLURM_PROCID", rank),
        ("SLURM_STEP_NUM_TASKS", "4"),
        ("SLURM_STEP_NODELIST", "node[1-2]"),
        ("SLURM_LOCALID", rank),
        ("SLURM_STEP_TASKS_PER_NODE", "4"),
        ("SLURM_JOB_ID", job),
        ("SLURM_STEP_ID", "0"),
    ];
    vars.extend(extra);
    match layout(&vars)? {
        Placement::Rank(env) => Ok(env.secret),
        other => panic!("not a rank: {other:?}"),
    }
}

#[test]
fn ranks_of_one_job_share_a_secret_and_other_jobs_do_not() -> Result<()> {
    // Derived from the launcher's job ids: alike on every rank, different for each job.
    let (one, two) = (slurm_secret("0", "41", &[])?, slurm_secret("3", "41", &[])?);
    assert_eq!(one, two);
    assert!(!one.explicit);
    assert_ne!(one, slurm_secret("0", "42", &[])?);
    // An explicit secret wins, and its Debug shows no key.
    let explicit = [(SECRET_VAR, "0123456789abcdef0123")];
    let secret = slurm_secret("0", "41", &explicit)?;
    assert!(secret.explicit);
    assert_eq!(secret, slurm_secret("2", "99", &explicit)?);
    assert_eq!(format!("{secret:?}"), "JobSecret(explicit)");
    let err = slurm_secret("0", "41", &[(SECRET_VAR, "short")]).unwrap_err();
    assert!(format!("{err:#}").contains("at least 16"), "{err:#}");
    Ok(())
}

#[test]
fn a_world_size_beyond_the_limit_is_refused() {
    let err = layout(&[("RANK", "0"), ("WORLD_SIZE", "100000000000")])
        .unwrap_err()
        .to_string();
    for needle in ["100000000000 ranks", "limit of 1048576", "WORLD_SIZE"] {
        assert!(err.contains(needle), "{err}");
    }
    let at_limit = format!("{:?}", layout(&[("RANK", "0"), ("WORLD_SIZE", "1048576")]));
    assert!(!at_limit.contains("limit of"), "{at_limit}");
}
