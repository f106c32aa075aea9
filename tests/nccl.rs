//! GPU smoke test of `NcclCommunicator` with one rank (one GPU): run on a CUDA machine with
//! `cargo test --release --features cuda,nccl --test nccl -- --ignored`.
#![cfg(feature = "nccl")]

use anyhow::Result;
use bsfa_train::dist::nccl::NcclCommunicator;
use bsfa_train::dist::{Communicator, SingleRank};
use candle_core::{DType, Device, Tensor};
use std::time::Duration;

#[test]
#[ignore = "needs a CUDA GPU"]
fn one_rank_collectives_return_their_input() -> Result<()> {
    let device = Device::new_cuda(0)?;
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
    let device = Device::new_cuda(0)?;
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
