//! GPU tests of `NcclCommunicator`: one rank on one GPU, and 2 and 4 ranks (one thread and
//! one GPU each, when the machine has that many) against the same collectives among CPU
//! ranks over TCP. Compiled in CI (`scripts/check_cuda_build.sh`); run on a CUDA machine
//! with `cargo test --release --features cuda,nccl --test nccl -- --ignored` (as
//! `scripts/gpu_check.sh` does).
#![cfg(feature = "nccl")]

mod common;

use anyhow::Result;
use bsfa_train::device::open_cuda;
use bsfa_train::dist::env::RankEnv;
use bsfa_train::dist::nccl::NcclCommunicator;
use bsfa_train::dist::tcp::TcpCommunicator;
use bsfa_train::dist::{Communicator, SingleRank};
use candle_core::{DType, Device, Tensor};
use std::time::Duration;

/// GPUs this process sees.
fn gpus() -> usize {
    bsfa_train::device::cuda_devices().unwrap_or(0)
}

/// Rank `rank` of `world` threads, joined over TCP at `port`.
fn tcp_rank(rank: usize, world: usize, port: u16) -> Result<TcpCommunicator> {
    TcpCommunicator::connect(&RankEnv::local(rank, world, port), Duration::from_secs(60))
}

/// What each rank's collectives gave: NCCL on its GPU, TCP on the CPU, for the same inputs.
struct Outcome {
    nccl: Vec<Vec<f32>>,
    tcp: Vec<Vec<f32>>,
}

/// Rank `rank`'s inputs: integers below 61 (sums of up to 4 are exact in f32 and bf16 in
/// any order) and fractions of magnitude below 1/3 (the order may change the last bits).
fn inputs(rank: usize, device: &Device) -> Result<Vec<Tensor>> {
    let n = 1000;
    let whole: Vec<f32> = (0..n).map(|i| ((i * 7 + rank * 13) % 61) as f32).collect();
    let fraction: Vec<f32> = (0..n)
        .map(|i| ((i as f32 + 1.0) * (rank as f32 + 1.0)).sin() / 3.0)
        .collect();
    let whole = Tensor::from_vec(whole, n, device)?;
    let fraction = Tensor::from_vec(fraction, (10, n / 10), device)?;
    Ok(vec![
        whole.clone(),
        fraction.clone(),
        fraction.t()?,
        whole.to_dtype(DType::BF16)?,
    ])
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Runs the collectives on `world` ranks, each a thread with GPU `rank`.
fn collectives_on(world: usize) -> Vec<Outcome> {
    let (control_port, cpu_port) = (common::ranks::free_port(), common::ranks::free_port());
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || -> Result<Outcome> {
                let device = open_cuda(rank)?;
                let control = tcp_rank(rank, world, control_port)?;
                let nccl =
                    NcclCommunicator::new(Box::new(control), &device, Duration::from_secs(60))?;
                let cpu = tcp_rank(rank, world, cpu_port)?;
                assert_eq!((nccl.rank(), nccl.world()), (rank, world));
                let mut outcome = Outcome {
                    nccl: vec![],
                    tcp: vec![],
                };
                let on_gpu = inputs(rank, &device)?;
                let on_cpu = inputs(rank, &Device::Cpu)?;
                for (g, c) in on_gpu.iter().zip(&on_cpu) {
                    outcome.nccl.push(flat(&nccl.all_reduce_sum(g)?)?);
                    outcome.tcp.push(flat(&cpu.all_reduce_sum(c)?)?);
                    // Broadcast from the last rank: every rank gets its values exactly.
                    outcome.nccl.push(flat(&nccl.broadcast(g, world - 1)?)?);
                    outcome.tcp.push(flat(&cpu.broadcast(c, world - 1)?)?);
                }
                nccl.barrier()?;
                let gathered = nccl.all_gather_bytes(&[rank as u8])?;
                assert_eq!(
                    gathered,
                    (0..world).map(|r| vec![r as u8]).collect::<Vec<_>>()
                );
                Ok(outcome)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("rank thread").expect("rank"))
        .collect()
}

/// NCCL's results equal the TCP ranks': exactly for integer values and broadcasts, within
/// f32 rounding of a different summation order otherwise; and every rank got the same.
fn check_against_tcp(world: usize) {
    let outcomes = collectives_on(world);
    for (rank, o) in outcomes.iter().enumerate() {
        for (i, (nccl, tcp)) in o.nccl.iter().zip(&o.tcp).enumerate() {
            let worst = nccl
                .iter()
                .zip(tcp)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Results 2j and 2j + 1 are input j's sum and broadcast.
            let exact = i % 2 == 1 || i / 2 == 0 || i / 2 == 3;
            // A sum of `world` terms below 1/3 in another order: a rounding per addition.
            let bound = if exact {
                0.0
            } else {
                world as f32 * f32::EPSILON
            };
            assert!(
                worst <= bound,
                "rank {rank}, result {i}: {worst:e} > {bound:e}"
            );
        }
        assert_eq!(o.nccl, outcomes[0].nccl, "rank {rank} differs from rank 0");
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs"]
fn two_ranks_agree_with_tcp_ranks() {
    if gpus() < 2 {
        eprintln!("skipped: {} GPU(s), 2 needed", gpus());
        return;
    }
    check_against_tcp(2);
}

#[test]
#[ignore = "needs 4 CUDA GPUs"]
fn four_ranks_agree_with_tcp_ranks() {
    if gpus() < 4 {
        eprintln!("skipped: {} GPU(s), 4 needed", gpus());
        return;
    }
    check_against_tcp(4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn one_rank_collectives_return_their_input() -> Result<()> {
    let device = open_cuda(0)?;
    let comm = NcclCommunicator::new(Box::new(SingleRank), &device, Duration::from_secs(60))?;
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    let base = Tensor::arange(0f32, 24., &device)?.reshape((4, 6))?;
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::U32] {
        let t = base.to_dtype(dtype)?;
        // Contiguous, transposed (strided) and offset views all go through.
        let views = [t.clone(), t.t()?, t.narrow(0, 1, 2)?];
        for v in views {
            let expected = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for out in [comm.all_reduce_sum(&v)?, comm.broadcast(&v, 0)?] {
                assert_eq!(out.dims(), v.dims());
                assert_eq!(out.dtype(), dtype);
                let got = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(got, expected, "{dtype:?} {:?}", v.layout());
            }
        }
    }
    // Errors, not hangs: a root outside the world, a CPU tensor, an unsupported dtype.
    assert!(comm.broadcast(&base, 1).is_err());
    assert!(comm.all_reduce_sum(&base.to_device(&Device::Cpu)?).is_err());
    // A device on the per-thread default stream is refused (device::open_cuda says why).
    let default_stream = Device::new_cuda(0)?;
    let refused = NcclCommunicator::new(
        Box::new(SingleRank),
        &default_stream,
        Duration::from_secs(60),
    );
    assert!(refused.is_err());
    if let Ok(t) = base.to_dtype(DType::I16) {
        assert!(comm.all_reduce_sum(&t).is_err());
    }
    comm.barrier()?;
    assert_eq!(comm.all_gather_bytes(b"x")?, vec![b"x".to_vec()]);
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn an_aborted_communicator_fails_at_once_and_drops_quietly() -> Result<()> {
    let device = open_cuda(0)?;
    let comm = NcclCommunicator::new(Box::new(SingleRank), &device, Duration::from_secs(60))?;
    let t = Tensor::ones(8, DType::F32, &device)?;
    comm.all_reduce_sum(&t)?;
    comm.abort("the test stops");
    let e = comm.all_reduce_sum(&t).unwrap_err();
    assert!(format!("{e:#}").contains("aborted"), "{e:#}");
    assert!(comm.barrier().is_err());
    // Dropping an aborted communicator neither destroys it again nor panics.
    drop(comm);
    Ok(())
}
