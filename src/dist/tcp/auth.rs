//! The rendezvous' handshake: a rank proves to rank 0, and rank 0 to the rank, that it
//! holds the job's key ([`JobSecret`]), without sending the key:
//!
//! 1. rank 0 → rank r, CHALLENGE: magic, protocol version, 32 random bytes `n0`;
//! 2. rank r → rank 0, HELLO: magic, version, r, world size, 32 random bytes `n1`, and
//!    HMAC-SHA256(key, "hello" ‖ n0 ‖ n1 ‖ r ‖ world);
//! 3. rank 0 → rank r, WELCOME: HMAC-SHA256(key, "welcome" ‖ n0 ‖ n1 ‖ r ‖ world).
//!
//! Each side's fresh nonce keeps a recorded exchange from being replayed to it, the labels
//! keep a HELLO from passing for a WELCOME, and MACs are compared in constant time. Only
//! after this does rank 0 read anything else from a connection (data, aborts). The frames
//! after it carry no MAC: someone on the path between two ranks can still read and change
//! them (see docs/distributed.md).

use super::frame::{read_handshake, send, CHALLENGE, HELLO, MAGIC, PROTOCOL_VERSION, WELCOME};
use crate::dist::env::{random_bytes, JobSecret};
use anyhow::{anyhow, bail, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::TcpStream;
use std::time::Instant;

const NONCE: usize = 32;
const MAC: usize = 32;
/// Magic, version, nonce.
const CHALLENGE_LEN: usize = 4 + 4 + NONCE;
/// Magic, version, rank, world, nonce, MAC.
const HELLO_LEN: usize = 4 + 4 + 4 + 4 + NONCE + MAC;

/// What a HELLO claims and both sides' MACs cover.
struct Claim {
    challenge: [u8; NONCE],
    nonce: [u8; NONCE],
    rank: u32,
    world: u32,
}

impl Claim {
    /// The MAC under `key` of this claim, for `label` ("hello" or "welcome").
    fn mac(&self, key: &JobSecret, label: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.key()).expect("HMAC takes any key");
        mac.update(label);
        mac.update(&self.challenge);
        mac.update(&self.nonce);
        mac.update(&self.rank.to_le_bytes());
        mac.update(&self.world.to_le_bytes());
        mac
    }
}

/// Rank 0's side on a new connection: challenges it, checks its proof, and proves itself.
/// Returns the rank and world size the peer proved.
pub(super) fn admit(
    stream: &mut TcpStream,
    key: &JobSecret,
    deadline: Instant,
    stop: &dyn Fn() -> Result<()>,
) -> Result<(usize, usize)> {
    let challenge = random_bytes::<NONCE>()?;
    let mut opening = header_bytes();
    opening.extend(challenge);
    write(stream, CHALLENGE, &opening)?;
    let hello = read_handshake(stream, HELLO, HELLO_LEN, deadline, stop)?;
    check_header(&hello, "it")?;
    let word = |at: usize| u32::from_le_bytes(hello[at..at + 4].try_into().expect("4 bytes"));
    let claim = Claim {
        challenge,
        nonce: hello[16..16 + NONCE].try_into()?,
        rank: word(8),
        world: word(12),
    };
    if claim
        .mac(key, b"hello")
        .verify_slice(&hello[16 + NONCE..])
        .is_err()
    {
        bail!(
            "it claimed rank {} but did not prove the job's secret (another job, or a \
             different {})",
            claim.rank,
            crate::dist::env::SECRET_VAR
        );
    }
    let welcome = claim.mac(key, b"welcome").finalize().into_bytes();
    write(stream, WELCOME, &welcome)?;
    Ok((claim.rank as usize, claim.world as usize))
}

/// A rank's side: answers rank 0's challenge with its proof, and checks rank 0's.
pub(super) fn introduce(
    stream: &mut TcpStream,
    key: &JobSecret,
    rank: usize,
    world: usize,
    deadline: Instant,
    stop: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let opening = read_handshake(stream, CHALLENGE, CHALLENGE_LEN, deadline, stop)?;
    check_header(&opening, "rank 0")?;
    let claim = Claim {
        challenge: opening[8..].try_into()?,
        nonce: random_bytes::<NONCE>()?,
        rank: rank as u32,
        world: world as u32,
    };
    let mut hello = header_bytes();
    hello.extend(claim.rank.to_le_bytes());
    hello.extend(claim.world.to_le_bytes());
    hello.extend(claim.nonce);
    hello.extend(claim.mac(key, b"hello").finalize().into_bytes());
    write(stream, HELLO, &hello)?;
    let welcome = read_handshake(stream, WELCOME, MAC, deadline, stop)?;
    if claim.mac(key, b"welcome").verify_slice(&welcome).is_err() {
        bail!("it did not prove the job's secret: it is not rank 0 of this job");
    }
    Ok(())
}

/// Magic and protocol version, the start of a CHALLENGE and a HELLO.
fn header_bytes() -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend(PROTOCOL_VERSION.to_le_bytes());
    bytes
}

/// Checks the magic and version at the start of `payload`, sent by `who`.
fn check_header(payload: &[u8], who: &str) -> Result<()> {
    if &payload[..4] != MAGIC {
        bail!("{who} is not a bsfa-train rank (wrong magic)");
    }
    let version = u32::from_le_bytes(payload[4..8].try_into()?);
    if version != PROTOCOL_VERSION {
        bail!(
            "{who} speaks rendezvous protocol {version}, this rank {PROTOCOL_VERSION}: the \
             ranks run different bsfa-train versions"
        );
    }
    Ok(())
}

/// Sends one handshake frame.
fn write(stream: &mut TcpStream, tag: u8, payload: &[u8]) -> Result<()> {
    send(stream, tag, 0, 0, payload).map_err(|_| anyhow!("the connection broke"))
}
