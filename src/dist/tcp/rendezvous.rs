//! Starting a job: rank 0 listens (see `listen`) and admits one connection from every other
//! rank; each other rank connects (retrying while rank 0 starts) and proves it belongs to
//! the job (`auth`'s handshake).
//!
//! Rank 0 listens on `MASTER_PORT`, except under torchrun's agent store: the agent serves
//! its `TCPStore` on `MASTER_PORT` itself, so rank 0 listens on a port the system picks (no
//! collision possible) and publishes `host:port` and a random token in that store, under a
//! key of this restart attempt; the other ranks read both there, and the token goes into
//! the handshake's key. Every wait polls at least every 200 ms, so that a SIGINT/SIGTERM
//! (or the end of `--dist-timeout`) ends it within moments.

use super::auth::introduce;
use super::listen::{accept_all, listen};
use super::store::StoreClient;
use crate::dist::env::{JobSecret, RankEnv, SECRET_VAR};
use crate::interrupt;
use anyhow::{bail, Context, Result};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long a connection may take over its handshake. A real rank answers within
/// milliseconds; rank 0 drops a connection that takes longer (while admitting others), and
/// a rank gives up on a "rank 0" that does not answer.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection to one other rank.
pub(super) struct Peer {
    pub(super) rank: usize,
    pub(super) stream: TcpStream,
}

/// The bounds of a join: when it gives up, how long one handshake may take, and what ends
/// it early (a signal, in a real run).
pub(super) struct Wait<'a> {
    pub(super) timeout: Duration,
    pub(super) deadline: Instant,
    pub(super) handshake: Duration,
    pub(super) stop: &'a dyn Fn() -> Result<()>,
}

impl<'a> Wait<'a> {
    /// A join that gives up after `timeout` (`--dist-timeout`).
    pub(super) fn new(
        timeout: Duration,
        handshake: Duration,
        stop: &'a dyn Fn() -> Result<()>,
    ) -> Result<Self> {
        let deadline = Instant::now().checked_add(timeout).with_context(|| {
            format!(
                "--dist-timeout {} s is beyond what this system's clock can count",
                timeout.as_secs()
            )
        })?;
        Ok(Self {
            timeout,
            deadline,
            handshake,
            stop,
        })
    }

    /// Whether the join is out of time.
    pub(super) fn expired(&self) -> bool {
        Instant::now() > self.deadline
    }

    /// The deadline of a handshake starting now.
    pub(super) fn handshake_deadline(&self) -> Instant {
        (Instant::now() + self.handshake).min(self.deadline)
    }

    /// Sleeps `pause` in short steps, failing as soon as `stop` does.
    pub(super) fn pause(&self, pause: Duration) -> Result<()> {
        let until = Instant::now() + pause;
        loop {
            (self.stop)()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// Connects this rank to the others: rank 0 gets one peer per other rank (in rank order),
/// every other rank gets rank 0. A signal ends the wait.
pub(super) fn join(env: &RankEnv, timeout: Duration) -> Result<Vec<Peer>> {
    join_with(
        env,
        &Wait::new(timeout, HANDSHAKE_TIMEOUT, &interrupt::check)?,
    )
}

/// [`join`] under any bounds (tests stop it without a signal).
pub(super) fn join_with(env: &RankEnv, wait: &Wait) -> Result<Vec<Peer>> {
    if env.rank == 0 {
        let (listener, key) = listen(env, wait)?;
        return accept_all(env, &listener, &key, wait);
    }
    let (address, key) = match env.agent_store_attempt {
        Some(attempt) => {
            let mut store = open_store(env, wait)?;
            let published = lookup_root(&mut store, attempt, env, wait)?;
            let (address, token) = published
                .split_once(' ')
                .context("rank 0's entry in torchrun's store has no token: mixed versions?")?;
            (address.to_string(), env.secret.with_token(token.as_bytes()))
        }
        None => (
            format!("{}:{}", env.master_addr, env.master_port),
            env.secret.clone(),
        ),
    };
    Ok(vec![Peer {
        rank: 0,
        stream: connect_to_root(env, &address, &key, wait)?,
    }])
}

/// The store key under which rank 0 publishes its address in restart attempt `attempt`.
pub(super) fn root_key(attempt: u64) -> String {
    format!("bsfa-train/attempt-{attempt}/rank-0-address")
}

/// Connects to torchrun's store on `MASTER_ADDR:MASTER_PORT`.
pub(super) fn open_store(env: &RankEnv, wait: &Wait) -> Result<StoreClient> {
    let address = format!("{}:{}", env.master_addr, env.master_port);
    let stream = retry_connect(&address, wait).with_context(|| {
        format!(
            "rank {} could not reach torchrun's store at {address} (MASTER_ADDR/MASTER_PORT)",
            env.rank
        )
    })?;
    StoreClient::new(stream, Duration::from_secs(30))
        .with_context(|| format!("torchrun's store at {address}"))
}

/// Waits until rank 0 published its address in the store, and returns the entry.
fn lookup_root(
    store: &mut StoreClient,
    attempt: u64,
    env: &RankEnv,
    wait: &Wait,
) -> Result<String> {
    let key = root_key(attempt);
    while !store.check(&key)? {
        if wait.expired() {
            bail!(
                "rank {} waited for rank 0 to publish its address in torchrun's store; did \
                 rank 0 start?",
                env.rank
            );
        }
        wait.pause(Duration::from_millis(20))?;
    }
    String::from_utf8(store.get(&key)?).context("rank 0's address in the store is not text")
}

/// A leaf: connects to rank 0 at `address`, retrying while it starts, and proves that it
/// belongs to the job (and checks that rank 0 does).
fn connect_to_root(
    env: &RankEnv,
    address: &str,
    key: &JobSecret,
    wait: &Wait,
) -> Result<TcpStream> {
    let mut stream = retry_connect(address, wait).with_context(|| {
        format!(
            "rank {} could not reach rank 0 at {address} within {} s (MASTER_ADDR/\
                 MASTER_PORT)",
            env.rank,
            wait.timeout.as_secs()
        )
    })?;
    stream.set_write_timeout(Some(wait.handshake))?;
    let deadline = wait.handshake_deadline();
    introduce(&mut stream, key, env.rank, env.world, deadline, wait.stop).with_context(|| {
        format!(
            "rank {} could not join rank 0 at {address}; rank 0 drops ranks that do not \
             prove the job's secret: do all ranks have the same {SECRET_VAR} (or none), and \
             is this port not another job's?",
            env.rank
        )
    })?;
    Ok(stream)
}

/// Connects to `address` (`host:port`), retrying until the join's deadline while the
/// other end starts or its name does not resolve yet; each try is bounded, so a signal is
/// noticed.
pub(super) fn retry_connect(address: &str, wait: &Wait) -> Result<TcpStream> {
    loop {
        let tried = address.to_socket_addrs().map(|addrs| {
            addrs
                .filter_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
                .next()
        });
        match tried {
            Ok(Some(stream)) => return Ok(stream),
            Err(e) if wait.expired() => {
                return Err(e).with_context(|| format!("cannot resolve '{address}'"))
            }
            _ if wait.expired() => bail!("nothing answered at {address}"),
            _ => wait.pause(Duration::from_millis(100))?,
        }
    }
}
