//! The rendezvous against connections that are not ranks of the job: garbage, silence,
//! forged hellos and aborts, huge frame headers, a fake rank 0. Every one is dropped and
//! the real rank still joins. All on 127.0.0.1, every wait bounded.

use super::auth::introduce;
use super::frame::{recv, send, Failure, Op, ABORT, CHALLENGE, HEADER, HELLO, WELCOME};
use super::listen::bind;
use super::rendezvous::{join_with, Peer, Wait};
use super::*;
use crate::dist::env::JobSecret;
use crate::interrupt::{interrupted_by, Interrupted};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// Every join here gives up after this: tests end even when the rendezvous is broken.
const TIMEOUT: Duration = Duration::from_secs(8);

fn never() -> Result<()> {
    Ok(())
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("an ephemeral port");
    listener.local_addr().expect("a bound address").port()
}

/// Runs the join of `rank` of a 2-rank job on `port` in a thread (handshakes limited to
/// `handshake`); its outcome arrives on the returned channel.
fn start_rank(rank: usize, port: u16, handshake: Duration) -> mpsc::Receiver<Result<Vec<Peer>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let env = RankEnv::local(rank, 2, port);
        let outcome = Wait::new(TIMEOUT, handshake, &never).and_then(|w| join_with(&env, &w));
        let _ = tx.send(outcome);
    });
    rx
}

/// The outcome of a join started by [`start_rank`], failing the test past [`TIMEOUT`].
fn outcome(rx: &mpsc::Receiver<Result<Vec<Peer>>>) -> Result<Vec<Peer>> {
    rx.recv_timeout(TIMEOUT + Duration::from_secs(5))
        .expect("the join ended in time")
}

/// A stranger's connection to rank 0 at `port`, once it listens.
fn stranger(port: u16) -> TcpStream {
    let started = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => return stream,
            Err(_) if started.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("rank 0 never listened: {e}"),
        }
    }
}

/// Reads what rank 0 sends `stream` until it closes the connection; panics if it does not
/// within `limit`. Returns the bytes read.
fn until_dropped(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut seen = Vec::new();
    match stream.read_to_end(&mut seen) {
        Ok(_) => seen,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => seen,
        Err(e) => panic!("rank 0 kept the connection open: {e}"),
    }
}

/// Rank 0 of a 2-rank job on a new port and, once `meddle` has had the stranger's
/// connection, the real rank 1; both run a barrier. Returns each side's barrier outcome.
fn job_despite(meddle: impl FnOnce(TcpStream)) -> (Result<()>, Result<()>) {
    let port = free_port();
    let root = start_rank(0, port, Duration::from_secs(5));
    meddle(stranger(port));
    let leaf = start_rank(1, port, Duration::from_secs(5));
    let barrier = move |rx: &mpsc::Receiver<Result<Vec<Peer>>>, rank| {
        let peers = outcome(rx)?;
        let comm = TcpCommunicator::over(peers, &RankEnv::local(rank, 2, port), TIMEOUT)?;
        comm.barrier()
    };
    let leaf = std::thread::spawn(move || barrier(&leaf, 1).map_err(|e| format!("{e:#}")));
    let root = barrier(&root, 0);
    (root, leaf.join().unwrap().map_err(anyhow::Error::msg))
}

fn assert_both_ok((root, leaf): (Result<()>, Result<()>)) {
    root.expect("rank 0 joined the real rank 1");
    leaf.expect("rank 1 joined");
}

#[test]
fn garbage_is_dropped_and_the_real_rank_still_joins() {
    assert_both_ok(job_despite(|mut s| {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x13\x37garbage garbage")
            .unwrap();
        until_dropped(&mut s, Duration::from_secs(5));
    }));
}

#[test]
fn a_huge_frame_header_is_dropped_before_anything_is_allocated() {
    assert_both_ok(job_despite(|mut s| {
        let mut header = [0u8; HEADER];
        header[0] = HELLO;
        header[10..18].copy_from_slice(&(1u64 << 40).to_le_bytes());
        s.write_all(&header).unwrap();
        until_dropped(&mut s, Duration::from_secs(5));
    }));
}

#[test]
fn a_forged_hello_without_the_secret_is_refused() {
    assert_both_ok(job_despite(|mut s| {
        let forged = JobSecret::derived(&["a guess"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let refused = introduce(&mut s, &forged, 1, 2, deadline, &never);
        assert!(refused.is_err(), "rank 0 welcomed a forger");
    }));
}

#[test]
fn a_forged_abort_never_reaches_rank_0() {
    let (root, leaf) = job_despite(|mut s| {
        let forged = JobSecret::derived(&["a guess"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let _ = introduce(&mut s, &forged, 1, 2, deadline, &never);
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend(b"pwned: the disk is full");
        let _ = send(&mut s, ABORT, 0, 0, &payload);
        // Held open while the real rank joins.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
    });
    if let Err(e) = &root {
        assert!(!format!("{e:#}").contains("pwned"), "{e:#}");
    }
    assert_both_ok((root, leaf));
}

#[test]
fn a_silent_connection_blocks_nobody_and_is_dropped_after_its_handshake_time() {
    let port = free_port();
    let started = Instant::now();
    let root = start_rank(0, port, Duration::from_secs(2));
    let mut silent = stranger(port);
    let leaf = start_rank(1, port, Duration::from_secs(2));
    outcome(&root).expect("rank 0 admitted rank 1 despite the silent connection");
    outcome(&leaf).expect("rank 1 joined");
    // Not held up by the silent connection's 2 s.
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
    // Its handshake thread drops it after its 2 s, though the join is over.
    let seen = until_dropped(&mut silent, Duration::from_secs(6));
    assert_eq!(seen[0], CHALLENGE, "it was challenged, then dropped");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_stop_ends_rank_0s_wait_beside_a_silent_connection() {
    let port = free_port();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let root = std::thread::spawn(move || {
        let env = RankEnv::local(0, 2, port);
        let stop = || match flag.load(Ordering::SeqCst) {
            true => Err(Interrupted(libc::SIGTERM).into()),
            false => Ok(()),
        };
        let wait = Wait::new(Duration::from_secs(60), Duration::from_secs(60), &stop)?;
        join_with(&env, &wait).map(|_| ())
    });
    let _silent = stranger(port);
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let err = root.join().unwrap().expect_err("the stop ends the join");
    assert_eq!(interrupted_by(&err), Some(libc::SIGTERM), "{err:#}");
    assert!(
        signalled.elapsed() < Duration::from_secs(1),
        "{:?}",
        signalled.elapsed()
    );
}

#[test]
fn a_rank_refuses_a_rank_0_that_cannot_prove_the_secret() {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let leaf = start_rank(1, port, Duration::from_secs(5));
    let (mut fake, _) = listener.accept().unwrap();
    let mut opening = b"BSFA".to_vec();
    opening.extend(super::frame::PROTOCOL_VERSION.to_le_bytes());
    opening.extend([7u8; 32]);
    send(&mut fake, CHALLENGE, 0, 0, &opening)
        .map_err(|_| ())
        .unwrap();
    let mut hello = [0u8; HEADER + 80];
    fake.read_exact(&mut hello).unwrap();
    send(&mut fake, WELCOME, 0, 0, &[0u8; 32])
        .map_err(|_| ())
        .unwrap();
    let err = outcome(&leaf).err().expect("the fake rank 0 is refused");
    assert!(
        format!("{err:#}").contains("not rank 0 of this job"),
        "{err:#}"
    );
}

#[test]
fn a_frame_header_of_2_to_the_40_bytes_fails_without_allocating() {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut receiver, _) = listener.accept().unwrap();
    receiver.set_read_timeout(Some(TIMEOUT)).unwrap();
    for len in [1u64 << 40, 1 << 35] {
        let mut header = [0u8; HEADER];
        header[1] = Op::AllReduce as u8;
        header[2..10].copy_from_slice(&1u64.to_le_bytes());
        header[10..18].copy_from_slice(&len.to_le_bytes());
        sender.write_all(&header).unwrap();
        if len == 1 << 35 {
            // Under the limit, but the bytes never come: only what arrives is allocated.
            sender.write_all(&[0u8; 100]).unwrap();
            sender.shutdown(std::net::Shutdown::Write).unwrap();
        }
        match recv(&mut receiver, Op::AllReduce, 1) {
            Err(Failure::OutOfStep(why)) if len == 1 << 40 => {
                assert!(why.contains("over the"), "{why}")
            }
            Err(Failure::Left) if len == 1 << 35 => {}
            Err(_) => panic!("a frame of {len} bytes failed the wrong way"),
            Ok(_) => panic!("a frame of {len} bytes was accepted"),
        }
    }
}

#[test]
fn rank_0_listens_on_loopback_when_master_addr_is_loopback() {
    for host in ["127.0.0.1", "localhost"] {
        let mut env = RankEnv::local(0, 2, 0);
        env.master_addr = host.into();
        let listener = bind(&env, 0, None).unwrap();
        let ip = listener.local_addr().unwrap().ip();
        assert_eq!(ip, IpAddr::V4(Ipv4Addr::LOCALHOST), "MASTER_ADDR={host}");
    }
    // An address of no interface here (TEST-NET-3): every interface, nothing sent anywhere.
    let mut env = RankEnv::local(0, 2, 0);
    env.master_addr = "203.0.113.7".into();
    let listener = bind(&env, 0, None).unwrap();
    assert!(listener.local_addr().unwrap().ip().is_unspecified());
}
