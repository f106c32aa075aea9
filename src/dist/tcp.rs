//! A [`Communicator`] over TCP for CPU ranks: every leaf rank holds one connection to rank
//! 0, which combines each collective (in rank order, so every rank gets the same bits) and
//! sends the result back. A star, not a ring: simple, deterministic, and plenty for a
//! few ranks on one machine; GPU jobs move their tensors through NCCL instead and use this
//! only to start up and to report failures.
//!
//! Every frame carries the collective's kind and sequence number, so ranks that run
//! different code paths fail with an error instead of mixing their data. A rank that errors
//! sends an abort frame; a rank that dies closes its connection; a rank that hangs hits the
//! read timeout. In each case rank 0 tells the others, and every rank fails with an error
//! naming the rank at fault.

use super::env::RankEnv;
use super::{Communicator, PeerFailed};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::cell::RefCell;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"BSFA";
const PROTOCOL_VERSION: u32 = 1;

/// Frame tags.
const DATA: u8 = 0;
const ABORT: u8 = 1;
const HELLO: u8 = 2;

/// Collective kinds, checked on every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce = 1,
    Broadcast = 2,
    Gather = 3,
}

impl Op {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "all-reduce",
            2 => "broadcast",
            3 => "all-gather",
            _ => "an unknown collective",
        }
    }
}

/// Header: tag, op, sequence number, payload length.
const HEADER: usize = 1 + 1 + 8 + 8;

/// Largest payload accepted: a corrupt header must not allocate terabytes.
const MAX_PAYLOAD: u64 = 1 << 40;

/// Why talking to a peer failed, before it becomes a message.
enum Failure {
    /// The peer (or, through rank 0, another rank) reported an error.
    Aborted {
        rank: usize,
        message: String,
    },
    /// The connection closed: the process exited or was killed.
    Left,
    /// Nothing arrived within the timeout.
    Silent,
    /// The peer ran another collective than this rank.
    OutOfStep(String),
    Io(std::io::Error),
}

struct Peer {
    rank: usize,
    stream: TcpStream,
}

struct Links {
    /// Rank 0: one peer per other rank, in rank order. Others: rank 0 alone.
    peers: Vec<Peer>,
    seq: u64,
    /// Set once a collective failed: every later call fails the same way.
    failed: Option<String>,
}

/// Collectives among CPU processes over TCP through rank 0.
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

impl TcpCommunicator {
    /// Joins the job `env` describes: rank 0 listens on `MASTER_PORT` and waits for every
    /// other rank, which connect (retrying until rank 0 is up). `timeout` bounds both the
    /// start and every wait for a peer inside a collective.
    pub fn connect(env: &RankEnv, timeout: Duration) -> Result<Self> {
        let peers = if env.rank == 0 {
            accept_all(env, timeout)?
        } else {
            vec![Peer {
                rank: 0,
                stream: connect_to_root(env, timeout)?,
            }]
        };
        for peer in &peers {
            peer.stream.set_nodelay(true)?;
            peer.stream.set_read_timeout(Some(timeout))?;
            peer.stream.set_write_timeout(Some(timeout))?;
        }
        Ok(Self {
            rank: env.rank,
            world: env.world,
            timeout,
            links: Mutex::new(Links {
                peers,
                seq: 0,
                failed: None,
            }),
        })
    }

    /// One collective round: every leaf sends `mine` to rank 0, which folds the
    /// contributions in rank order (`fold(rank, payload)`, its own first), then sends
    /// `reply(rank)` to each leaf. Returns rank 0's reply to this rank (rank 0: `reply(0)`).
    fn round(
        &self,
        op: Op,
        mine: &[u8],
        fold: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>,
        reply: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| anyhow::anyhow!("communicator poisoned"))?;
        if let Some(failure) = &links.failed {
            bail!("{failure}");
        }
        links.seq += 1;
        let seq = links.seq;
        let outcome = if self.rank == 0 {
            self.root_round(&mut links.peers, op, seq, mine, fold, reply)
        } else {
            let root = &mut links.peers[0];
            send(&mut root.stream, DATA, op as u8, seq, mine)
                .and_then(|_| recv(&mut root.stream, op, seq))
                .map_err(|failure| self.describe(0, failure))
        };
        if let Err(e) = &outcome {
            links.failed = Some(format!("{e:#}"));
        }
        outcome
    }

    fn root_round(
        &self,
        peers: &mut [Peer],
        op: Op,
        seq: u64,
        mine: &[u8],
        fold: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>,
        reply: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        fold(0, mine.to_vec())?;
        for i in 0..peers.len() {
            let rank = peers[i].rank;
            match recv(&mut peers[i].stream, op, seq) {
                Ok(payload) => fold(rank, payload)?,
                Err(failure) => {
                    let error = self.describe(rank, failure);
                    broadcast_abort(peers, rank, &format!("{error:#}"));
                    return Err(error);
                }
            }
        }
        for i in 0..peers.len() {
            let payload = reply(peers[i].rank);
            if let Err(failure) = send(&mut peers[i].stream, DATA, op as u8, seq, &payload) {
                let rank = peers[i].rank;
                let error = self.describe(rank, failure);
                broadcast_abort(peers, rank, &format!("{error:#}"));
                return Err(error);
            }
        }
        Ok(reply(0))
    }

    /// The error for a failure talking to `rank`.
    fn describe(&self, rank: usize, failure: Failure) -> anyhow::Error {
        let world = self.world;
        let message = match failure {
            Failure::Aborted { rank, message } => {
                format!("rank {rank} of {world} failed: {message}")
            }
            Failure::Left => format!(
                "rank {rank} of {world} left the job: its connection closed (the process exited \
                 or was killed; see its output for why)"
            ),
            Failure::Silent => format!(
                "rank {rank} of {world} sent nothing for {} s (--dist-timeout): it is stuck, far \
                 slower than this rank, or gone",
                self.timeout.as_secs()
            ),
            Failure::OutOfStep(what) => format!(
                "rank {rank} of {world} is out of step with rank {}: {what}; the ranks ran \
                 different code paths (different configs or binaries?)",
                self.rank
            ),
            Failure::Io(e) => format!("connection to rank {rank} of {world} failed: {e}"),
        };
        anyhow::Error::new(PeerFailed(message))
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let values = Values::of(t)?;
        let bytes = values.to_bytes();
        let sum: RefCell<Option<Values>> = RefCell::new(None);
        let result = self.round(
            Op::AllReduce,
            &bytes,
            &mut |rank, payload| {
                let part = values.like(&payload).with_context(|| {
                    format!(
                        "rank {rank} sent {} bytes for an all-reduce of {}",
                        payload.len(),
                        bytes.len()
                    )
                })?;
                let mut sum = sum.borrow_mut();
                match sum.as_mut() {
                    Some(sum) => sum.add(&part),
                    None => *sum = Some(part),
                }
                Ok(())
            },
            &mut |_| {
                sum.borrow()
                    .as_ref()
                    .map(Values::to_bytes)
                    .unwrap_or_default()
            },
        )?;
        values
            .like(&result)
            .context("rank 0 sent an all-reduce result of the wrong size")?
            .tensor(t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            bail!("broadcast from rank {root} in a job of {}", self.world);
        }
        let values = Values::of(t)?;
        let mine = if self.rank == root {
            values.to_bytes()
        } else {
            Vec::new()
        };
        let data = RefCell::new(Vec::new());
        let result = self.round(
            Op::Broadcast,
            &mine,
            &mut |rank, payload| {
                if rank == root {
                    *data.borrow_mut() = payload;
                }
                Ok(())
            },
            &mut |rank| {
                if rank == root {
                    Vec::new()
                } else {
                    data.borrow().clone()
                }
            },
        )?;
        if self.rank == root {
            return Ok(t.clone());
        }
        values
            .like(&result)
            .with_context(|| format!("rank {root} broadcast a tensor of another size"))?
            .tensor(t)
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let parts: RefCell<Vec<Vec<u8>>> = RefCell::new(Vec::with_capacity(self.world));
        let packed = self.round(
            Op::Gather,
            bytes,
            &mut |_, payload| {
                parts.borrow_mut().push(payload);
                Ok(())
            },
            &mut |_| {
                let mut out = Vec::new();
                for part in parts.borrow().iter() {
                    out.extend((part.len() as u64).to_le_bytes());
                    out.extend(part);
                }
                out
            },
        )?;
        let mut out = Vec::with_capacity(self.world);
        let mut rest = &packed[..];
        while rest.len() >= 8 {
            let len = u64::from_le_bytes(rest[..8].try_into()?) as usize;
            let end = 8usize.checked_add(len).filter(|&e| e <= rest.len());
            let end = end.context("rank 0 sent a malformed all-gather result")?;
            out.push(rest[8..end].to_vec());
            rest = &rest[end..];
        }
        if out.len() != self.world || !rest.is_empty() {
            bail!("rank 0 sent {} parts for {} ranks", out.len(), self.world);
        }
        Ok(out)
    }

    fn abort(&self, message: &str) {
        let Ok(mut links) = self.links.lock() else {
            return;
        };
        if links.failed.is_some() {
            // Already failed through a collective: rank 0 has told everyone.
            return;
        }
        links.failed = Some(format!("this rank aborted: {message}"));
        let mut payload = (self.rank as u32).to_le_bytes().to_vec();
        payload.extend(message.as_bytes());
        for peer in &mut links.peers {
            // Best effort with a short deadline: the job is ending either way.
            let _ = peer.stream.set_write_timeout(Some(Duration::from_secs(5)));
            let _ = send(&mut peer.stream, ABORT, 0, 0, &payload);
        }
    }
}

/// Rank 0 passes `rank`'s failure on to every other leaf, best effort.
fn broadcast_abort(peers: &mut [Peer], rank: usize, message: &str) {
    let mut payload = (rank as u32).to_le_bytes().to_vec();
    payload.extend(message.as_bytes());
    for peer in peers.iter_mut().filter(|p| p.rank != rank) {
        let _ = peer.stream.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = send(&mut peer.stream, ABORT, 0, 0, &payload);
    }
}

fn send(stream: &mut TcpStream, tag: u8, op: u8, seq: u64, payload: &[u8]) -> Result<(), Failure> {
    let mut header = [0u8; HEADER];
    header[0] = tag;
    header[1] = op;
    header[2..10].copy_from_slice(&seq.to_le_bytes());
    header[10..18].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream
        .write_all(&header)
        .and_then(|_| stream.write_all(payload))
        .map_err(io_failure)
}

/// Reads one frame of collective `op` number `seq`.
fn recv(stream: &mut TcpStream, op: Op, seq: u64) -> Result<Vec<u8>, Failure> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header).map_err(io_failure)?;
    let len = u64::from_le_bytes(header[10..18].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(Failure::OutOfStep(format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).map_err(io_failure)?;
    let their_seq = u64::from_le_bytes(header[2..10].try_into().expect("8 bytes"));
    match header[0] {
        ABORT if payload.len() >= 4 => Err(Failure::Aborted {
            rank: u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize,
            message: String::from_utf8_lossy(&payload[4..]).into_owned(),
        }),
        DATA if header[1] == op as u8 && their_seq == seq => Ok(payload),
        DATA => Err(Failure::OutOfStep(format!(
            "it sent {} #{their_seq} while this rank ran {} #{seq}",
            Op::name(header[1]),
            Op::name(op as u8)
        ))),
        tag => Err(Failure::OutOfStep(format!("unexpected frame tag {tag}"))),
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => Failure::Left,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::Silent,
        _ => Failure::Io(e),
    }
}

/// Rank 0: listens and takes one connection from every other rank.
fn accept_all(env: &RankEnv, timeout: Duration) -> Result<Vec<Peer>> {
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
fn connect_to_root(env: &RankEnv, timeout: Duration) -> Result<TcpStream> {
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

/// A tensor's values as they travel: f64 stays f64, every other float type goes as f32
/// (exact for bf16 and f16), so sums never lose precision in transit.
enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    fn of(t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::F64 => Self::F64(flat.to_vec1()?),
            DType::F32 | DType::BF16 | DType::F16 => {
                Self::F32(flat.to_dtype(DType::F32)?.to_vec1()?)
            }
            other => bail!("collectives carry float tensors, got {other:?}"),
        })
    }

    /// Decodes `bytes` as values of this kind and length.
    fn like(&self, bytes: &[u8]) -> Result<Self> {
        let (len, size) = match self {
            Self::F32(v) => (v.len(), 4),
            Self::F64(v) => (v.len(), 8),
        };
        if bytes.len() != len * size {
            bail!("{} bytes, expected {}", bytes.len(), len * size);
        }
        Ok(match self {
            Self::F32(_) => Self::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect(),
            ),
            Self::F64(_) => Self::F64(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            ),
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn add(&mut self, other: &Self) {
        match (self, other) {
            (Self::F32(a), Self::F32(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
            (Self::F64(a), Self::F64(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
            _ => unreachable!("values decoded with `like` share the kind"),
        }
    }

    /// The values as a tensor shaped, typed and placed like `like`.
    fn tensor(self, like: &Tensor) -> Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let t = match self {
            Self::F32(v) => Tensor::from_vec(v, like.shape(), &cpu)?,
            Self::F64(v) => Tensor::from_vec(v, like.shape(), &cpu)?,
        };
        Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::Arc;

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
                    let env = RankEnv {
                        rank,
                        world,
                        local_rank: rank,
                        local_world: world,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
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
}
