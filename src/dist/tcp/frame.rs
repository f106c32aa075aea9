//! The wire format between ranks: every frame is a header (tag, collective kind, sequence
//! number, payload length) and a payload. Reads and writes run under the stream's
//! deadlines, and a failed one is classified (left, silent, aborted, out of step) before
//! it becomes a message.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

/// First bytes of a hello: a connection from something else is refused.
pub(super) const MAGIC: &[u8; 4] = b"BSFA";
/// Bumped when frames change: mixed binaries fail at the start.
pub(super) const PROTOCOL_VERSION: u32 = 1;

/// Frame tags.
pub(super) const DATA: u8 = 0;
pub(super) const ABORT: u8 = 1;
pub(super) const HELLO: u8 = 2;

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

/// Largest payload accepted: a corrupt header must not allocate terabytes.
const MAX_PAYLOAD: u64 = 1 << 40;

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
