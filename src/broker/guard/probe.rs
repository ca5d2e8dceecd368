//! The liveness probe: a real CONNECT/CONNACK/DISCONNECT against rumqttd's internal listener,
//! as the gateway's own probe client (not through the public listener, so a flood of
//! connections cannot make it fail).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{Login, Packet};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::broker::frame::{encode, read_frame, FrameError, PacketType};

use super::Guard;

/// Why a visit to rumqttd's internal listener (the probe, or ending a stored session) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("could not encode CONNECT")]
    Encode,
    #[error("send CONNECT: {0}")]
    Send(std::io::Error),
    #[error("reading CONNACK: {0:?}")]
    Read(FrameError),
    #[error("connection closed without CONNACK")]
    Closed,
    /// Not a CONNACK accepting the connection: its first bytes.
    #[error("refused: {0:02x?}")]
    Refused(Vec<u8>),
    #[error("no CONNACK within {0:?}")]
    Timeout(Duration),
}

/// Liveness probe: a real CONNECT/CONNACK (and DISCONNECT) against rumqttd's internal listener
/// at `addr`, as the gateway's probe client. It does not go through the public listener, so a
/// flood of connections that fills `broker.max_connections` cannot make it fail.
pub async fn probe(
    addr: SocketAddr,
    v5: bool,
    guard: &Guard,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let id = format!(
        "{}-{}",
        guard.probe_id,
        guard.probes.fetch_add(1, Ordering::Relaxed)
    );
    visit(addr, v5, guard, id, timeout, &"the liveness probe").await
}

/// A clean CONNECT/CONNACK and DISCONNECT as `client_id` on rumqttd's internal listener at
/// `addr` (the probe; ending a stored session: a clean connect discards it).
pub(super) async fn visit(
    addr: SocketAddr,
    v5: bool,
    guard: &Guard,
    client_id: String,
    timeout: Duration,
    who: &(dyn std::fmt::Display + Sync),
) -> Result<(), ProbeError> {
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(ProbeError::Connect)?;
        let connect = rumqttd::protocol::Connect {
            keep_alive: 10,
            client_id,
            clean_session: true,
        };
        let login = Some(Login {
            username: String::new(),
            password: guard.secret.clone(),
        });
        let out = encode(v5, Packet::Connect(connect, None, None, None, login))
            .ok_or(ProbeError::Encode)?;
        s.write_all(&out).await.map_err(ProbeError::Send)?;
        let mut buf = BytesMut::new();
        let f = read_frame(&mut s, &mut buf, 1 << 16)
            .await
            .map_err(ProbeError::Read)?
            .ok_or(ProbeError::Closed)?;
        if PacketType::of(f[0]) != Some(PacketType::Connack) || f.get(3).copied() != Some(0) {
            return Err(ProbeError::Refused(f[..f.len().min(5)].to_vec()));
        }
        Ok(s)
    };
    let mut s = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r?,
        Err(_) => return Err(ProbeError::Timeout(timeout)),
    };
    // Answered. Leave as a client should, and as the guard does (module docs).
    if s.write_all(&[0xe0, 0x00]).await.is_ok() {
        guard.await_close_after_disconnect(&mut s, who).await;
    }
    Ok(())
}
