//! A client of PyTorch's c10d `TCPStore`, the key-value store torchrun's agent serves on
//! `MASTER_PORT` and shares with its workers (`TORCHELASTIC_USE_AGENT_STORE=True`).
//!
//! Only the three requests rendezvous needs, in the store's wire format (native byte order,
//! little-endian on every platform torchrun runs on): a request is one query byte and its
//! arguments; strings and values are a `u64` length and the bytes.
//!
//! | request | query byte | arguments | reply |
//! |---|---|---|---|
//! | validate | 0 | `u32` magic `0x3C85F7CE` | none |
//! | set | 1 | key, value | none |
//! | get | 3 | key | value |
//! | check | 5 | `u64` key count, keys | `u8`: 0 ready, 1 not ready |
//!
//! The numbering is the `QueryType` enum of c10d's `TCPStoreBackend.hpp`, unchanged since
//! PyTorch 1.x (new queries are appended).

use super::frame::read_full;
use crate::interrupt;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const CHECK: u8 = 5;
/// `c10d::detail::validationMagicNumber`.
const MAGIC: u32 = 0x3C85_F7CE;
/// `CheckResponseType::READY`.
const READY: u8 = 0;

/// One connection to a `TCPStore` server.
pub(super) struct StoreClient {
    stream: TcpStream,
    /// How long one reply may take.
    timeout: Duration,
}

impl StoreClient {
    /// Wraps a connection to the store and introduces itself as the store requires.
    pub(super) fn new(stream: TcpStream, timeout: Duration) -> Result<Self> {
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut client = Self { stream, timeout };
        let mut request = vec![VALIDATE];
        request.extend(MAGIC.to_le_bytes());
        client.send(&request)?;
        Ok(client)
    }

    /// The address of this end of the connection, when the system knows it.
    pub(super) fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.stream.local_addr().ok().map(|a| a.ip())
    }

    /// Sets `key` to `value`.
    pub(super) fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut request = vec![SET];
        push_bytes(&mut request, key.as_bytes());
        push_bytes(&mut request, value);
        self.send(&request)
    }

    /// Whether `key` is set, without waiting for it.
    pub(super) fn check(&mut self, key: &str) -> Result<bool> {
        let mut request = vec![CHECK];
        request.extend(1u64.to_le_bytes());
        push_bytes(&mut request, key.as_bytes());
        self.send(&request)?;
        let mut reply = [0u8; 1];
        self.read(&mut reply)
            .context("the store did not answer a check")?;
        Ok(reply[0] == READY)
    }

    /// The value of `key`, which must be set (see [`StoreClient::check`]).
    pub(super) fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        let mut request = vec![GET];
        push_bytes(&mut request, key.as_bytes());
        self.send(&request)?;
        let mut len = [0u8; 8];
        self.read(&mut len)
            .context("the store did not answer a get")?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            bail!("the store answered a get with {len} bytes: not a value of ours");
        }
        let mut value = vec![0u8; len as usize];
        self.read(&mut value)
            .context("the store did not answer a get")?;
        Ok(value)
    }

    /// Fills `buf` with the store's reply, in short polls that notice a signal.
    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        read_full(&mut self.stream, buf, deadline, &interrupt::check)
    }

    fn send(&mut self, request: &[u8]) -> Result<()> {
        self.stream
            .write_all(request)
            .context("the connection to torchrun's store broke")
    }
}

fn push_bytes(request: &mut Vec<u8>, bytes: &[u8]) {
    request.extend((bytes.len() as u64).to_le_bytes());
    request.extend(bytes);
}
