//! Starting a job: rank 0 listens on `MASTER_PORT` and takes one connection from every
//! other rank; each other rank connects (retrying while rank 0 starts) and introduces
//! itself with a hello frame naming its rank, the world size and the protocol version.

use super::frame::{send, HEADER, HELLO, MAGIC, PROTOCOL_VERSION};
use crate::dist::env::RankEnv;
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The connection to one other rank.
pub(super) struct Peer {
    pub(super) rank: usize,
    pub(super) stream: TcpStream,
}

/// Rank 0: listens and takes one connection from every other rank.
pub(super) fn accept_all(env: &RankEnv, timeout: Duration) -> Result<Vec<Peer>> {
    let listener = TcpListener::bind(("0.0.0.0", env.master_port)).with_context(|| {
        format!(
            "rank 0 cannot listen on port {} (MASTER_PORT): another job may hold it; pick a \
             free port",
            env.master_port
        )
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
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
                        env.master_port
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
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

/// A leaf: connects to rank 0, retrying while it starts, and introduces itself.
pub(super) fn connect_to_root(env: &RankEnv, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let address = format!("{}:{}", env.master_addr, env.master_port);
    let mut stream = loop {
        match TcpStream::connect(&address) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "rank {} could not reach rank 0 at {address} within {} s (MASTER_ADDR/\
                         MASTER_PORT)",
                        env.rank,
                        timeout.as_secs()
                    )
                })
            }
        }
    };
    let mut payload = MAGIC.to_vec();
    payload.extend(PROTOCOL_VERSION.to_le_bytes());
    payload.extend((env.rank as u32).to_le_bytes());
    payload.extend((env.world as u32).to_le_bytes());
    send(&mut stream, HELLO, 0, 0, &payload)
        .map_err(|_| anyhow::anyhow!("rank {} lost rank 0 while joining", env.rank))?;
    Ok(stream)
}
