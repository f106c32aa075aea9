//! Rank 0's side of the rendezvous: where it listens, and how it admits the other ranks.
//!
//! **Where.** On the interface of `MASTER_ADDR`, so that a job whose ranks all run on one
//! machine (`MASTER_ADDR` loopback) cannot be reached from the network at all: a loopback
//! address or `localhost` binds loopback; an address of this machine binds that address; a
//! host name binds the first address it resolves to that belongs to this machine (a name
//! resolving to loopback only when every rank is on this machine: Debian maps its own host
//! name to 127.0.1.1, which the other machines do not reach). Anything else (a NAT'ed or
//! virtual address, a name this machine cannot resolve) listens on every interface, and
//! says so on stderr. Under torchrun's agent store the address this rank reaches the store
//! from is the one the others reach this machine by.
//!
//! **Admitting.** Each connection gets its own thread for the handshake (`auth::admit`),
//! bounded by [`HANDSHAKE_TIMEOUT`](super::rendezvous::HANDSHAKE_TIMEOUT), while the
//! accept loop goes on: a connection that sends nothing, garbage, a huge frame header or a
//! wrong proof is dropped with a warning naming its address, and rank 0 waits on for the
//! real rank until `--dist-timeout`. Nothing a connection sends before its proof is acted
//! on. Only a peer that proved the secret and then contradicts the job (another world
//! size, a rank twice) fails the job: it is one of its ranks, misconfigured.

use super::auth::admit;
use super::rendezvous::{open_store, root_key, Peer, Wait};
use crate::dist::env::{hex, random_bytes, JobSecret, RankEnv};
use anyhow::{bail, Context, Result};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Connections in their handshake at once; more are dropped at once, so that a flood of
/// connections costs rank 0 a bounded number of threads.
const MAX_PENDING: usize = 64;

/// Dropped connections reported on stderr; after that rank 0 stays quiet about them.
const MAX_WARNINGS: usize = 16;

/// Rank 0's listening socket (see the module's doc) and the key of this attempt's
/// handshakes: on `MASTER_PORT`, or under torchrun's agent store on a free port, published
/// in the store with a fresh token that goes into the key.
pub(super) fn listen(env: &RankEnv, wait: &Wait) -> Result<(TcpListener, JobSecret)> {
    let Some(attempt) = env.agent_store_attempt else {
        return Ok((bind(env, env.master_port, None)?, env.secret.clone()));
    };
    let mut store = open_store(env, wait)?;
    // The store's host is rank 0's (torchrun's agent of node 0 serves it), so the address
    // this end of the connection has is one the other ranks reach this machine by.
    let here = store.local_ip().filter(|ip| !ip.is_loopback());
    let listener = bind(env, 0, here)?;
    let address = match here {
        Some(ip) => SocketAddr::new(ip, listener.local_addr()?.port()).to_string(),
        None => format!("{}:{}", env.master_addr, listener.local_addr()?.port()),
    };
    let token = hex(&random_bytes::<32>()?);
    store.set(&root_key(attempt), format!("{address} {token}").as_bytes())?;
    Ok((listener, env.secret.with_token(token.as_bytes())))
}

/// Listens on `port` of `preferred`, or else of `MASTER_ADDR`'s interface (see the
/// module's doc).
pub(super) fn bind(env: &RankEnv, port: u16, preferred: Option<IpAddr>) -> Result<TcpListener> {
    let taken = || {
        format!(
            "rank 0 cannot listen on port {port} (MASTER_PORT): another job may hold it; \
             pick a free port"
        )
    };
    let candidates = match preferred {
        Some(ip) => vec![ip],
        None => local_candidates(env),
    };
    for ip in candidates {
        match TcpListener::bind((ip, port)) {
            Ok(listener) => return Ok(listener),
            // Not an address of this machine.
            Err(e) if e.kind() == ErrorKind::AddrNotAvailable => continue,
            Err(e) => return Err(e).with_context(taken),
        }
    }
    let every: IpAddr = match env.master_addr.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
        _ => Ipv4Addr::UNSPECIFIED.into(),
    };
    eprintln!(
        "rank 0: MASTER_ADDR={} is not an address of this machine (NAT, a virtual address, \
         or a name it cannot resolve): listening on every interface ({every}:{port})",
        env.master_addr
    );
    TcpListener::bind((every, port)).with_context(taken)
}

/// The addresses of `MASTER_ADDR` to try to listen on, best first: binding one that is not
/// this machine's fails, which is how the others are told apart from local ones.
fn local_candidates(env: &RankEnv) -> Vec<IpAddr> {
    let host = env.master_addr.as_str();
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return vec![ip];
    }
    if host.eq_ignore_ascii_case("localhost") {
        return vec![Ipv4Addr::LOCALHOST.into()];
    }
    let every_rank_here = env.local_world == env.world;
    (host, 0)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| !ip.is_loopback() || every_rank_here)
        .collect()
}

/// The outcome of one connection's handshake, from its thread.
struct Handshake {
    from: SocketAddr,
    outcome: Result<(usize, usize, TcpStream)>,
}

/// Rank 0: admits one connection from every other rank (see the module's doc).
pub(super) fn accept_all(
    env: &RankEnv,
    listener: &TcpListener,
    key: &JobSecret,
    wait: &Wait,
) -> Result<Vec<Peer>> {
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let (done, pending) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    // Handshakes still running when this returns stop at their next poll.
    let _stop_handshakes = SetOnDrop(Arc::clone(&done));
    let (tx, rx) = mpsc::channel::<Handshake>();
    let mut peers: Vec<Peer> = Vec::with_capacity(env.world - 1);
    let mut dropped = 0usize;
    while peers.len() + 1 < env.world {
        (wait.stop)()?;
        match listener.accept() {
            Ok((stream, from)) if pending.load(Ordering::SeqCst) >= MAX_PENDING => {
                drop(stream);
                warn(
                    &mut dropped,
                    from,
                    "too many connections in their handshake",
                );
            }
            Ok((stream, from)) => {
                pending.fetch_add(1, Ordering::SeqCst);
                let (tx, key, done, pending) =
                    (tx.clone(), key.clone(), done.clone(), pending.clone());
                let (deadline, handshake) = (wait.handshake_deadline(), wait.handshake);
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let stop = || match done.load(Ordering::SeqCst) {
                        true => bail!("rank 0 stopped admitting ranks"),
                        false => Ok(()),
                    };
                    let outcome = prepare(&stream, handshake)
                        .and_then(|_| admit(&mut stream, &key, deadline, &stop))
                        .map(|(rank, world)| (rank, world, stream));
                    pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(Handshake { from, outcome });
                });
                continue;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The client gave up before it was accepted.
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(e).context("rank 0 cannot accept connections"),
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Handshake { from, outcome }) => match outcome {
                Ok((rank, world, stream)) => {
                    check_rank(env, &peers, rank, world, from)?;
                    peers.push(Peer { rank, stream });
                }
                Err(why) => warn(&mut dropped, from, &format!("{why:#}")),
            },
            Err(_) if wait.expired() => bail!(
                "rank 0 waited {} s for ranks {:?} (of {}) to connect to port {port}; did \
                 they start, with the same MASTER_ADDR/MASTER_PORT?",
                wait.timeout.as_secs(),
                missing(env, &peers),
                env.world
            ),
            Err(_) => {}
        }
    }
    peers.sort_by_key(|p| p.rank);
    Ok(peers)
}

/// A new connection as a handshake reads it: blocking, with short polls (`frame`).
fn prepare(stream: &TcpStream, handshake: Duration) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(handshake))?;
    Ok(())
}

/// Checks that a peer that proved the job's secret fits the job: it is one of its ranks,
/// so a contradiction is a misconfiguration, and fails the job.
fn check_rank(
    env: &RankEnv,
    peers: &[Peer],
    rank: usize,
    world: usize,
    from: SocketAddr,
) -> Result<()> {
    if world != env.world {
        bail!(
            "rank {rank} (from {from}) believes the world size is {world}, rank 0 that it is {}",
            env.world
        );
    }
    if rank == 0 || rank >= world || peers.iter().any(|p| p.rank == rank) {
        bail!(
            "two processes claim rank {rank} (the second from {from}): check RANK / SLURM_PROCID"
        );
    }
    Ok(())
}

/// Up to 8 ranks that have not joined yet.
fn missing(env: &RankEnv, peers: &[Peer]) -> Vec<usize> {
    let mut missing: Vec<usize> = (1..env.world)
        .filter(|r| !peers.iter().any(|p| p.rank == *r))
        .collect();
    missing.truncate(8);
    missing
}

/// Reports a dropped connection, up to [`MAX_WARNINGS`] of them.
fn warn(dropped: &mut usize, from: SocketAddr, why: &str) {
    *dropped += 1;
    if *dropped <= MAX_WARNINGS {
        eprintln!("rank 0: dropped a connection from {from}: {why}; waiting on for the ranks");
    }
    if *dropped == MAX_WARNINGS {
        eprintln!("rank 0: further dropped connections are not reported");
    }
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
