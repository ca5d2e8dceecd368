//! Hand-encoded MQTT packets for the soak's raw-socket clients.
//!
//! The soak's attackers send what no client library will (wildcard topics in PUBLISH, reserved
//! bits, an MQTT 3.1 CONNECT), and its honest sensors need to know which reading each PUBACK
//! acknowledges, which rumqttc's `AsyncClient` does not tell. Only what the soak sends and reads
//! is covered: CONNECT (3.1, 3.1.1, 5), PUBLISH, SUBSCRIBE, PINGREQ, DISCONNECT; incoming
//! packets are returned as (first byte, body) without further decoding.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub const DISCONNECT: [u8; 2] = [0xE0, 0];
pub const PINGREQ: [u8; 2] = [0xC0, 0];

/// Packet types (the high nibble of the first byte) the soak looks at.
pub const CONNACK: u8 = 2;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;
pub const DISCONNECT_TYPE: u8 = 14;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1: protocol name "MQIsdp", level 3.
    V31,
    V311,
    V5,
}

/// A CONNECT, with the knobs the attacks need.
pub struct Connect<'a> {
    pub version: Version,
    pub client_id: &'a str,
    /// Seconds; rumqttd refuses 0 (no keep-alive) with "server unavailable".
    pub keep_alive: u16,
    /// Will topic, payload and QoS.
    pub will: Option<(&'a str, &'a [u8], u8)>,
    /// Sets bit 0 of the connect flags, which MQTT reserves (must be 0).
    pub reserved_flag: bool,
}

impl<'a> Connect<'a> {
    pub fn v311(client_id: &'a str) -> Self {
        Connect {
            version: Version::V311,
            client_id,
            keep_alive: 60,
            will: None,
            reserved_flag: false,
        }
    }

    pub fn v5(client_id: &'a str) -> Self {
        Connect {
            version: Version::V5,
            ..Connect::v311(client_id)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        let (name, level) = match self.version {
            Version::V31 => ("MQIsdp", 3),
            Version::V311 => ("MQTT", 4),
            Version::V5 => ("MQTT", 5),
        };
        string(&mut b, name);
        b.push(level);
        let mut flags = 0x02; // clean session
        if let Some((_, _, qos)) = self.will {
            flags |= 0x04 | (qos & 3) << 3;
        }
        if self.reserved_flag {
            flags |= 0x01;
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        let v5 = self.version == Version::V5;
        if v5 {
            b.push(0); // no properties
        }
        string(&mut b, self.client_id);
        if let Some((topic, payload, _)) = self.will {
            if v5 {
                b.push(0); // no will properties
            }
            string(&mut b, topic);
            bytes(&mut b, payload);
        }
        packet(0x10, &b)
    }
}

/// A PUBLISH. `props`: `None` for MQTT 3.1.1; `Some` (user properties, maybe none) for MQTT 5.
pub fn publish(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
    props: Option<&[(&str, &str)]>,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(topic.len() + payload.len() + 16);
    string(&mut b, topic);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if let Some(props) = props {
        let mut p = Vec::new();
        for (k, v) in props {
            p.push(0x26); // user property
            string(&mut p, k);
            string(&mut p, v);
        }
        varint(&mut b, p.len());
        b.extend_from_slice(&p);
    }
    b.extend_from_slice(payload);
    packet(0x30 | (qos & 3) << 1 | u8::from(retain), &b)
}

/// A SUBSCRIBE of (filter, options byte) pairs.
pub fn subscribe(pkid: u16, filters: &[(String, u8)], v5: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(filters.len() * 24 + 4);
    b.extend_from_slice(&pkid.to_be_bytes());
    if v5 {
        b.push(0);
    }
    for (f, opts) in filters {
        string(&mut b, f);
        b.push(*opts);
    }
    packet(0x82, &b)
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(body.len() + 5);
    p.push(first);
    varint(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

fn varint(b: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        b.push(byte);
        if n == 0 {
            break;
        }
    }
}

fn string(b: &mut Vec<u8>, s: &str) {
    bytes(b, s.as_bytes());
}

fn bytes(b: &mut Vec<u8>, s: &[u8]) {
    // Every string the soak sends is far below 64 KiB.
    b.extend_from_slice(&(s.len().min(u16::MAX as usize) as u16).to_be_bytes());
    b.extend_from_slice(&s[..s.len().min(u16::MAX as usize)]);
}

/// The next packet as (first byte, body); `None` when the peer closed the connection. A packet
/// larger than `max` is an error.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut first = [0u8; 1];
    if r.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let mut len = 0usize;
    for i in 0..4 {
        let b = r.read_u8().await?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "packet too large",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some((first[0], body)))
}

/// A TCP connection to `addr` from `src` (any address of 127.0.0.0/8 on loopback), so that
/// attackers and honest sensors come from different source addresses.
pub async fn tcp_from(src: Option<Ipv4Addr>, addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::from((ip, 0)))?;
    }
    let s = sock.connect(addr).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// What the broker answered to a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connack {
    /// CONNACK with return (3.1.1) or reason (5) code 0.
    Accepted,
    /// CONNACK with this non-zero code.
    Refused(u8),
    /// Another packet first (e.g. an MQTT 5 DISCONNECT), by type.
    Other(u8),
    /// Closed without an answer.
    Closed,
    /// No answer in time.
    Timeout,
    /// The TCP connection itself failed.
    NoConnection,
}

impl Connack {
    pub fn name(self) -> String {
        match self {
            Connack::Accepted => "connack_ok".into(),
            Connack::Refused(c) => format!("connack_{c:#04x}"),
            Connack::Other(t) => format!("packet_type_{t}"),
            Connack::Closed => "closed".into(),
            Connack::Timeout => "timeout".into(),
            Connack::NoConnection => "tcp_failed".into(),
        }
    }
}

/// Connect from `src`, send `connect`, and wait up to `wait` for the answer. The stream is
/// returned when the CONNACK accepted the client.
pub async fn open(
    src: Option<Ipv4Addr>,
    addr: SocketAddr,
    connect: &Connect<'_>,
    wait: Duration,
) -> (Option<TcpStream>, Connack) {
    let attempt = async {
        let Ok(mut s) = tcp_from(src, addr).await else {
            return (None, Connack::NoConnection);
        };
        if s.write_all(&connect.encode()).await.is_err() {
            return (None, Connack::Closed);
        }
        match read_packet(&mut s, 1 << 16).await {
            Ok(Some((h, body))) if h >> 4 == CONNACK => match body.get(1).copied() {
                Some(0) => (Some(s), Connack::Accepted),
                Some(c) => (None, Connack::Refused(c)),
                None => (None, Connack::Other(CONNACK)),
            },
            Ok(Some((h, _))) => (None, Connack::Other(h >> 4)),
            _ => (None, Connack::Closed),
        }
    };
    tokio::time::timeout(wait, attempt)
        .await
        .unwrap_or((None, Connack::Timeout))
}

/// Wait up to `wait` for a packet of type `want`; `Err` names what came instead ("closed",
/// "timeout", "packet_type_N").
pub async fn expect(s: &mut TcpStream, want: u8, wait: Duration) -> Result<Vec<u8>, String> {
    let r = tokio::time::timeout(wait, async {
        loop {
            match read_packet(s, 1 << 20).await {
                Ok(Some((h, body))) if h >> 4 == want => return Ok(body),
                // A PINGRESP or a publish the client did not ask for: keep waiting.
                Ok(Some((h, _))) if h >> 4 == 13 || h >> 4 == 3 => continue,
                Ok(Some((h, body))) => {
                    return Err(if h >> 4 == DISCONNECT_TYPE {
                        format!(
                            "disconnect_{:#04x}",
                            body.first().copied().unwrap_or_default()
                        )
                    } else {
                        format!("packet_type_{}", h >> 4)
                    })
                }
                _ => return Err("closed".to_string()),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| Err("timeout".to_string()))
}
