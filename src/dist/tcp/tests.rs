//! The communicator end to end: ranks as threads on loopback, collectives, and each way a
//! rank can fail.

use super::*;
use candle_core::{DType, Device};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("an ephemeral port");
    listener.local_addr().expect("a bound address").port()
}

/// Runs `body(comm)` on `world` ranks, each a thread with its own communicator.
fn on_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    body: impl Fn(TcpCommunicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let port = free_port();
    let body = Arc::new(body);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let body = Arc::clone(&body);
            std::thread::spawn(move || {
                let env = RankEnv::local(rank, world, port);
                let comm = TcpCommunicator::connect(&env, timeout).expect("rendezvous");
                body(comm)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

#[test]
fn collectives_agree_on_every_rank() {
    let results = on_ranks(3, Duration::from_secs(20), |comm| -> Result<_> {
        let r = comm.rank() as f32;
        // Rank r contributes r + i / 10 to element i.
        let mine = Tensor::from_vec(
            (0..5).map(|i| r + i as f32 / 10.0).collect::<Vec<_>>(),
            (5,),
            &Device::Cpu,
        )?;
        let sum: Vec<f32> = comm.all_reduce_sum(&mine)?.to_vec1()?;
        let wide = Tensor::new(&[comm.rank() as f64 * 1e-12 + 1.0], &Device::Cpu)?;
        let wide: Vec<f64> = comm.all_reduce_sum(&wide)?.to_vec1()?;
        let from_two: Vec<f32> = comm.broadcast(&(&mine * 2.0)?, 2)?.to_vec1()?;
        let gathered = comm.all_gather_bytes(&vec![comm.rank() as u8; comm.rank()])?;
        comm.barrier()?;
        Ok((sum, wide, from_two, gathered))
    });
    for result in results {
        let (sum, wide, from_two, gathered) = result.expect("collectives");
        let expected: Vec<f32> = (0..5).map(|i| 3.0 + 3.0 * i as f32 / 10.0).collect();
        for (a, b) in sum.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{sum:?} vs {expected:?}");
        }
        // f64 travels as f64: 3e-12 survives next to 3.
        assert!((wide[0] - 3.0 - 3e-12).abs() < 1e-15, "{wide:?}");
        let two: Vec<f32> = (0..5).map(|i| 2.0 * (2.0 + i as f32 / 10.0)).collect();
        assert_eq!(from_two, two);
        assert_eq!(gathered, vec![vec![], vec![1u8], vec![2u8, 2]]);
    }
}

/// The error every rank but the culprit reports, as text.
fn errors_of(results: Vec<Option<String>>) -> Vec<String> {
    results.into_iter().flatten().collect()
}

#[test]
fn a_rank_that_leaves_fails_every_other_rank_naming_it() {
    let results = on_ranks(3, Duration::from_secs(20), |comm| {
        if comm.rank() == 1 {
            // Dropping the communicator closes the connection, as a killed process would.
            drop(comm);
            return None;
        }
        let t = Tensor::zeros(4, DType::F32, &Device::Cpu).expect("a tensor");
        let err = comm.all_reduce_sum(&t).expect_err("rank 1 is gone");
        // Later calls fail the same way, at once.
        let again = comm.barrier().expect_err("still failed");
        assert_eq!(format!("{err:#}"), format!("{again:#}"));
        Some(format!("{err:#}"))
    });
    let errors = errors_of(results);
    assert_eq!(errors.len(), 2);
    for e in errors {
        assert!(e.contains("rank 1 of 3"), "{e}");
    }
}

#[test]
fn an_abort_reaches_every_rank_with_its_message() {
    let results = on_ranks(3, Duration::from_secs(20), |comm| {
        if comm.rank() == 2 {
            comm.abort("loss is NaN at step 7");
            return None;
        }
        let err = comm.barrier().expect_err("rank 2 aborted");
        Some(format!("{err:#}"))
    });
    for e in errors_of(results) {
        assert!(e.contains("rank 2 of 3 failed"), "{e}");
        assert!(e.contains("loss is NaN at step 7"), "{e}");
    }
}

#[test]
fn different_collectives_are_caught() {
    let results = on_ranks(2, Duration::from_secs(20), |comm| {
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).expect("a tensor");
        let outcome = if comm.rank() == 0 {
            comm.all_reduce_sum(&t).map(|_| ())
        } else {
            comm.broadcast(&t, 0).map(|_| ())
        };
        outcome.err().map(|e| format!("{e:#}"))
    });
    let errors = errors_of(results);
    assert!(!errors.is_empty());
    assert!(
        errors.iter().any(|e| e.contains("out of step")),
        "{errors:?}"
    );
}

#[test]
fn a_silent_rank_times_out() {
    let started = Instant::now();
    let results = on_ranks(2, Duration::from_secs(1), |comm| {
        if comm.rank() == 1 {
            // Alive but never joins the collective.
            std::thread::sleep(Duration::from_secs(3));
            return None;
        }
        let err = comm.barrier().expect_err("rank 1 is silent");
        Some(format!("{err:#}"))
    });
    let errors = errors_of(results);
    assert!(
        errors[0].contains("rank 1 of 2 sent nothing for 1 s"),
        "{errors:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
