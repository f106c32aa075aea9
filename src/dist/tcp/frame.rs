//! The wire format between ranks: every frame is a header (tag, collective kind, sequence
//! number, payload length) and a payload. Reads and writes run under the stream's
//! deadlines, and a failed one is classified (left, silent, aborted, out of step) before
//! it becomes a message. The handshake's frames are read by [`read_handshake`], with short
//! polls that notice a deadline or a signal.

use anyhow::{bail, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// First bytes of a hello: a connection from something else is refused.
pub(super) const MAGIC: &[u8; 4] = b"BSFA";
/// Bumped when frames change: mixed binaries fail at the start. 2: the handshake proves
/// the job's secret (challenge, hello, welcome).
pub(super) const PROTOCOL_VERSION: u32 = 2;

/// Frame tags.
pub(super) const DATA: u8 = 0;
pub(super) const ABORT: u8 = 1;
pub(super) const HELLO: u8 = 2;
pub(super) const CHALLENGE: u8 = 3;
pub(super) const WELCOME: u8 = 4;

/// Collective kinds, checked on every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
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
pub(super) const HEADER: usize = 1 + 1 + 8 + 8;

/// Largest payload of a frame after the handshake. The largest legitimate one is one
/// collective's values: a gradient bucket (16M elements, or one larger tensor alone), a
/// broadcast parameter, or an all-gather of small control messages; f32 or f64. 64 GiB is
/// a single tensor of 16G f32 values, beyond what a CPU rank trains. Payloads are read as
/// they arrive, never allocated from the header alone, so a lying header costs no memory.
pub(super) const MAX_PAYLOAD: u64 = 1 << 36;

/// Memory reserved up front for a payload: more is allocated only as bytes arrive.
const FIRST_ALLOCATION: u64 = 1 << 26;

/// How long one read of the handshake waits before looking at the deadline and for a
/// signal again.
const POLL: Duration = Duration::from_millis(200);

/// Why talking to a peer failed, before it becomes a message.
pub(super) enum Failure {
    /// The peer (or, through rank 0, another rank) reported an error.
    Aborted { rank: usize, message: String },
    /// The connection closed: the process exited or was killed.
    Left,
    /// Nothing arrived within the timeout.
    Silent,
    /// The peer ran another collective than this rank.
    OutOfStep(String),
    /// Any other socket error.
    Io(std::io::Error),
}

/// Writes one frame: `tag` with collective `op` number `seq` and `payload`.
pub(super) fn send(
    stream: &mut TcpStream,
    tag: u8,
    op: u8,
    seq: u64,
    payload: &[u8],
) -> Result<(), Failure> {
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(Failure::Io(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "a message of {} bytes is over the {MAX_PAYLOAD}-byte limit of one frame",
                payload.len()
            ),
        )));
    }
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
pub(super) fn recv(stream: &mut TcpStream, op: Op, seq: u64) -> Result<Vec<u8>, Failure> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header).map_err(io_failure)?;
    let len = u64::from_le_bytes(header[10..18].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(Failure::OutOfStep(format!(
            "it announced a frame of {len} bytes, over the {MAX_PAYLOAD}-byte limit"
        )));
    }
    let mut payload = Vec::with_capacity(len.min(FIRST_ALLOCATION) as usize);
    (&mut *stream)
        .take(len)
        .read_to_end(&mut payload)
        .map_err(io_failure)?;
    if payload.len() as u64 != len {
        return Err(Failure::Left);
    }
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

/// What a socket error means for the peer.
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

/// Reads one handshake frame of tag `tag` and exactly `len` bytes of payload (every
/// handshake frame has a fixed size, so nothing is allocated from what a stranger claims),
/// until `deadline`, calling `stop` between polls: its error ends the wait.
pub(super) fn read_handshake(
    stream: &mut TcpStream,
    tag: u8,
    len: usize,
    deadline: Instant,
    stop: &dyn Fn() -> Result<()>,
) -> Result<Vec<u8>> {
    let mut header = [0u8; HEADER];
    read_full(stream, &mut header, deadline, stop)?;
    let their_len = u64::from_le_bytes(header[10..18].try_into()?);
    if header[0] != tag || their_len != len as u64 {
        bail!(
            "it sent a frame of tag {} and {their_len} bytes where one of tag {tag} and {len} \
             bytes was due (not a bsfa-train rank of this version)",
            header[0]
        );
    }
    let mut payload = vec![0u8; len];
    read_full(stream, &mut payload, deadline, stop)?;
    Ok(payload)
}

/// Fills `buf` from `stream` in polls of at most [`POLL`], until `deadline`, calling `stop`
/// between polls.
pub(super) fn read_full(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    stop: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        stop()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("it sent nothing more in time");
        }
        stream.set_read_timeout(Some(left.min(POLL)))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => bail!("it closed the connection"),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
