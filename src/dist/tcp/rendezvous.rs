//! Starting a job: rank 0 listens and takes one connection from every other rank; each
//! other rank connects (retrying while rank 0 starts) and introduces itself with a hello
//! frame naming its rank, the world size and the protocol version.
//!
//! Rank 0 listens on `MASTER_PORT`, except under torchrun's agent store: the agent serves
//! its `TCPStore` on `MASTER_PORT` itself, so rank 0 listens on a port the system picks (no
//! collision possible) and publishes `host:port` in that store, under a key of this restart
//! attempt; the other ranks read it there. Every wait notices a SIGINT/SIGTERM within
//! moments.

use super::frame::{send, HEADER, HELLO, MAGIC, PROTOCOL_VERSION};
use super::store::StoreClient;
use crate::dist::env::RankEnv;
use crate::interrupt;
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The connection to one other rank.
pub(super) struct Peer {
    pub(super) rank: usize,
    pub(super) stream: TcpStream,
}

/// Connects this rank to the others: rank 0 gets one peer per other rank (in rank order),
/// every other rank gets rank 0.
pub(super) fn join(env: &RankEnv, timeout: Duration) -> Result<Vec<Peer>> {
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let listener = listen(env, deadline)?;
        return accept_all(env, &listener, timeout);
    }
    let address = match env.agent_store_attempt {
        Some(attempt) => {
            let mut store = open_store(env, deadline)?;
            lookup_root(&mut store, attempt, env, deadline)?
        }
        None => format!("{}:{}", env.master_addr, env.master_port),
    };
    Ok(vec![Peer {
        rank: 0,
        stream: connect_to_root(
            env,
            &address,
            deadline.saturating_duration_since(Instant::now()),
        )?,
    }])
}

/// The store key under which rank 0 publishes its address in restart attempt `attempt`.
fn root_key(attempt: u64) -> String {
    format!("bsfa-train/attempt-{attempt}/rank-0-address")
}

/// Rank 0's listening socket: on `MASTER_PORT`, or under torchrun's agent store on a free
/// port, published in the store.
fn listen(env: &RankEnv, deadline: Instant) -> Result<TcpListener> {
    let Some(attempt) = env.agent_store_attempt else {
        return TcpListener::bind(("0.0.0.0", env.master_port)).with_context(|| {
            format!(
                "rank 0 cannot listen on port {} (MASTER_PORT): another job may hold it; \
                 pick a free port",
                env.master_port
            )
        });
    };
    let listener = TcpListener::bind(("0.0.0.0", 0)).context("rank 0 cannot listen")?;
    let port = listener.local_addr()?.port();
    let mut store = open_store(env, deadline)?;
    // The store's host is rank 0's (torchrun's agent of node 0 serves it), so the name the
    // other ranks reach the store by reaches rank 0 too; a non-loopback address of this
    // end of the connection is as good and needs no name service.
    let host = match store.local_ip() {
        Some(ip) if !ip.is_loopback() => ip.to_string(),
        _ => env.master_addr.clone(),
    };
    store.set(&root_key(attempt), format!("{host}:{port}").as_bytes())?;
    Ok(listener)
}

/// Connects to torchrun's store on `MASTER_ADDR:MASTER_PORT`.
fn open_store(env: &RankEnv, deadline: Instant) -> Result<StoreClient> {
    let address = format!("{}:{}", env.master_addr, env.master_port);
    let stream = retry_connect(&address, deadline).with_context(|| {
        format!(
            "rank {} could not reach torchrun's store at {address} (MASTER_ADDR/MASTER_PORT)",
            env.rank
        )
    })?;
    StoreClient::new(stream, Duration::from_secs(30))
        .with_context(|| format!("torchrun's store at {address}"))
}

/// Waits until rank 0 published its address in the store, and returns it.
fn lookup_root(
    store: &mut StoreClient,
    attempt: u64,
    env: &RankEnv,
    deadline: Instant,
) -> Result<String> {
    let key = root_key(attempt);
    while !store.check(&key)? {
        if Instant::now() > deadline {
            bail!(
                "rank {} waited for rank 0 to publish its address in torchrun's store; did \
                 rank 0 start?",
                env.rank
            );
        }
        interrupt::sleep(Duration::from_millis(20))?;
    }
    String::from_utf8(store.get(&key)?).context("rank 0's address in the store is not text")
}

/// Rank 0: takes one connection from every other rank.
fn accept_all(env: &RankEnv, listener: &TcpListener, timeout: Duration) -> Result<Vec<Peer>> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let mut peers: Vec<Peer> = Vec::with_capacity(env.world - 1);
    while peers.len() + 1 < env.world {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let rank = read_hello(&mut stream, env.world).with_context(|| {
                    format!("a connection from {from} is not a rank of this job")
                })?;
                if rank == 0 || peers.iter().any(|p| p.rank == rank) {
                    bail!("two processes claim rank {rank}: check RANK / SLURM_PROCID");
                }
                peers.push(Peer { rank, stream });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let mut missing: Vec<usize> = (1..env.world)
                        .filter(|r| !peers.iter().any(|p| p.rank == *r))
                        .collect();
                    missing.truncate(8);
                    bail!(
                        "rank 0 waited {} s for ranks {missing:?} (of {}) to connect to port {}; \
                         did they start, with the same MASTER_ADDR/MASTER_PORT?",
                        timeout.as_secs(),
                        env.world,
                        port
                    );
                }
                interrupt::sleep(Duration::from_millis(20))?;
            }
            Err(e) => return Err(e).context("rank 0 cannot accept connections"),
        }
    }
    peers.sort_by_key(|p| p.rank);
    Ok(peers)
}

/// Reads a joining rank's hello and returns its rank, checking it belongs to this job.
fn read_hello(stream: &mut TcpStream, world: usize) -> Result<usize> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header)?;
    let len = u64::from_le_bytes(header[10..18].try_into()?);
    if header[0] != HELLO || len != 16 {
        bail!("unexpected first frame");
    }
    let mut payload = [0u8; 16];
    stream.read_exact(&mut payload)?;
    if &payload[..4] != MAGIC {
        bail!("wrong magic");
    }
    let version = u32::from_le_bytes(payload[4..8].try_into()?);
    let rank = u32::from_le_bytes(payload[8..12].try_into()?) as usize;
    let their_world = u32::from_le_bytes(payload[12..16].try_into()?) as usize;
    if version != PROTOCOL_VERSION {
        bail!("rank {rank} speaks protocol {version}, rank 0 speaks {PROTOCOL_VERSION}: mixed binaries");
    }
    if their_world != world || rank >= world {
        bail!("rank {rank} believes the world size is {their_world}, rank 0 that it is {world}");
    }
    Ok(rank)
}

/// A leaf: connects to rank 0 at `address`, retrying while it starts, and introduces
/// itself.
fn connect_to_root(env: &RankEnv, address: &str, timeout: Duration) -> Result<TcpStream> {
    let mut stream = retry_connect(address, Instant::now() + timeout).with_context(|| {
        format!(
            "rank {} could not reach rank 0 at {address} within {} s (MASTER_ADDR/\
                 MASTER_PORT)",
            env.rank,
            timeout.as_secs()
        )
    })?;
    let mut payload = MAGIC.to_vec();
    payload.extend(PROTOCOL_VERSION.to_le_bytes());
    payload.extend((env.rank as u32).to_le_bytes());
    payload.extend((env.world as u32).to_le_bytes());
    send(&mut stream, HELLO, 0, 0, &payload)
        .map_err(|_| anyhow::anyhow!("rank {} lost rank 0 while joining", env.rank))?;
    Ok(stream)
}

/// Connects to `address` (`host:port`), retrying until `deadline` while the other end starts
/// or its name does not resolve yet; each try is bounded, so a signal is noticed.
fn retry_connect(address: &str, deadline: Instant) -> Result<TcpStream> {
    loop {
        let tried = address.to_socket_addrs().map(|addrs| {
            addrs
                .filter_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
                .next()
        });
        match tried {
            Ok(Some(stream)) => return Ok(stream),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("cannot resolve '{address}'"))
            }
            _ if Instant::now() > deadline => bail!("nothing answered at {address}"),
            _ => interrupt::sleep(Duration::from_millis(100))?,
        }
    }
}
