//! MQTT framing (3.1.1 and 5) as the broker guard reads it: the fixed header and its
//! remaining length, whole packets read from a stream, and the few fields the guard checks or
//! edits in a packet (PUBLISH topic, packet id and properties; SUBSCRIBE/UNSUBSCRIBE filters;
//! DISCONNECT properties; CONNACK), plus the packets it writes itself.
//!
//! Everything here works on bytes from an untrusted client and is public so it can be fuzzed:
//!
//! Invariants:
//! - No function panics on any input: a parser returns `None` (or [`FrameError`]) for bytes
//!   that are not what it parses, and never reads past the slice it is given (checked by the
//!   property tests below with arbitrary bytes).
//! - [`read_frame`] returns whole packets only, each at most `max` bytes of remaining length,
//!   and buffers at most one packet beyond what it returns; a remaining length is refused as
//!   soon as its header is read, before its body is.
//! - What is written ([`frame_of`], [`put_var_int`], [`rewrite_publish`]) parses back to the same
//!   header and body.
//! - A packet is never re-encoded except where a function says so: the guard passes the bytes
//!   it read on unchanged.

use std::sync::Arc;

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::core::budget::{Budget, Charge};

/// MQTT control packet types (the high nibble of a packet's first byte); 0 is reserved and
/// has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    Connect = 1,
    Connack = 2,
    Publish = 3,
    Puback = 4,
    Pubrec = 5,
    Pubrel = 6,
    Pubcomp = 7,
    Subscribe = 8,
    Suback = 9,
    Unsubscribe = 10,
    Unsuback = 11,
    Pingreq = 12,
    Pingresp = 13,
    Disconnect = 14,
    /// MQTT 5 only.
    Auth = 15,
}

impl PacketType {
    /// The type of a packet whose first byte is `byte1` (`None`: the reserved type 0).
    pub fn of(byte1: u8) -> Option<PacketType> {
        use PacketType::*;
        Some(match byte1 >> 4 {
            1 => Connect,
            2 => Connack,
            3 => Publish,
            4 => Puback,
            5 => Pubrec,
            6 => Pubrel,
            7 => Pubcomp,
            8 => Subscribe,
            9 => Suback,
            10 => Unsubscribe,
            11 => Unsuback,
            12 => Pingreq,
            13 => Pingresp,
            14 => Disconnect,
            15 => Auth,
            _ => return None,
        })
    }

    /// May a client send this after its CONNECT? (Not CONNECT again, nor the server's packets,
    /// nor AUTH, which the guard does not support: rumqttd's decoders reach `unreachable!()`
    /// on those.)
    pub fn from_client(self) -> bool {
        use PacketType::*;
        matches!(
            self,
            Publish
                | Puback
                | Pubrec
                | Pubrel
                | Pubcomp
                | Subscribe
                | Unsubscribe
                | Pingreq
                | Disconnect
        )
    }

    /// First byte of a packet of this type with no flags set (PUBREL, SUBSCRIBE and
    /// UNSUBSCRIBE must carry 0x02 as well).
    pub fn byte1(self) -> u8 {
        (self as u8) << 4
    }
}

/// CONNACK refusing a connection with `code` (an MQTT 3.1.1 return code or an MQTT 5 reason
/// code, see `Refusal::connack_code`).
pub fn connack_refusal(v5: bool, code: u8) -> Vec<u8> {
    if v5 {
        vec![PacketType::Connack.byte1(), 0x03, 0x00, code, 0x00]
    } else {
        vec![PacketType::Connack.byte1(), 0x02, 0x00, code]
    }
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended inside a packet.
    #[error("the stream failed or ended inside a packet")]
    Io,
    /// A remaining length of more than four bytes.
    #[error("bad remaining length")]
    Malformed,
    /// A packet longer than allowed (its remaining length).
    #[error("packet of {0} bytes")]
    Oversize(usize),
    /// The first byte is not the packet type expected (CONNECT first): its type nibble.
    #[error("packet type {0} where another was expected")]
    Unexpected(u8),
}

/// MQTT variable byte integer at the start of `buf`: (its length in bytes, its value), or `None`
/// if more bytes are needed.
pub fn var_int(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((i + 1, value)));
        }
    }
    Err(FrameError::Malformed)
}

/// Fixed header: (byte 1, header length, remaining length), or `None` if more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, FrameError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    Ok(var_int(&buf[1..])?.map(|(n, len)| (byte1, 1 + n, len)))
}

/// Length of the complete packets at the start of `buf` (up to about `limit` bytes, each at most
/// `max`): what can be passed on in one write.
pub fn complete_frames(buf: &[u8], max: usize, limit: usize) -> usize {
    let mut at = 0;
    while at < limit {
        match parse_header(&buf[at..]) {
            Ok(Some((_, hl, rl))) if rl <= max && buf.len() - at >= hl + rl => at += hl + rl,
            _ => break,
        }
    }
    at
}

/// Packets up to this size are read without a charge on a budget (`broker.max_buffered_bytes`):
/// every connection may hold one that far (1,000 connections: 16 MiB). A larger one takes its
/// whole size from the budget before its body is read, and gives it back once it is read.
pub const BUFFERED_FREE: usize = 16 * 1024;

/// Read one whole MQTT packet into a buffer of its own; `None` on a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<BytesMut>, FrameError> {
    read_held(r, buf, max, None, None)
        .await
        .map(|f| f.map(|(f, _)| f))
}

/// As [`read_frame`], a packet over [`BUFFERED_FREE`] waiting for its size in `budget` before
/// its body is read (a client that sends most of a large packet and stops holds only that).
/// The charge comes back with the packet: hold it as long as the packet is held (a publish
/// waiting for room in the pipeline keeps its share).
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
    budget: &Arc<Budget>,
) -> Result<Option<(BytesMut, Option<Charge>)>, FrameError> {
    read_held(r, buf, max, None, Some(budget)).await
}

/// As [`read_frame`]; with `expect`, fails as soon as the first byte shows another packet type
/// (garbage is refused before its "length" is even read); with `budget`, as
/// [`read_frame_within`] (its charge given back once the packet is read).
pub async fn read_frame_of<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
    expect: Option<PacketType>,
    budget: Option<&Arc<Budget>>,
) -> Result<Option<BytesMut>, FrameError> {
    read_held(r, buf, max, expect, budget)
        .await
        .map(|f| f.map(|(f, _)| f))
}

async fn read_held<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
    expect: Option<PacketType>,
    budget: Option<&Arc<Budget>>,
) -> Result<Option<(BytesMut, Option<Charge>)>, FrameError> {
    // Held while the body is read; given back when the packet is returned (or the read ends).
    let mut charge: Option<Charge> = None;
    loop {
        if let (Some(t), Some(b)) = (expect, buf.first()) {
            if b >> 4 != t as u8 {
                return Err(FrameError::Unexpected(b >> 4));
            }
        }
        if let Some((_, hl, rl)) = parse_header(buf)? {
            if rl > max {
                return Err(FrameError::Oversize(rl));
            }
            if buf.len() >= hl + rl {
                let frame = buf.split_to(hl + rl);
                if hl + rl > BUFFERED_FREE {
                    // The buffer shares the large packet's allocation and would take it back
                    // for good once the packet is dropped: a connection that sent one large
                    // publish would keep that much for its life. Start a small one instead.
                    *buf = BytesMut::from(&buf[..]);
                }
                return Ok(Some((frame, charge)));
            }
            if let (Some(b), None) = (budget, &charge) {
                if hl + rl > BUFFERED_FREE {
                    charge = Some(b.take(hl + rl).await);
                }
            }
            buf.reserve(hl + rl - buf.len());
        } else {
            buf.reserve(64);
        }
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(FrameError::Io),
            Ok(_) => {}
            Err(_) => return Err(FrameError::Io),
        }
    }
}

pub fn decode(v5: bool, frame: &mut BytesMut, max: usize) -> Option<Packet> {
    // rumqttd's decoder, on a frame we already checked is a CONNECT of at most `max` bytes.
    let r = if v5 {
        V5.read_mut(frame, max)
    } else {
        V4.read_mut(frame, max)
    };
    r.ok()
}

pub fn encode(v5: bool, packet: Packet) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    let r = if v5 {
        V5.write(packet, &mut out)
    } else {
        V4.write(packet, &mut out)
    };
    r.ok().map(|_| out)
}

/// Append `n` as an MQTT variable byte integer.
pub fn put_var_int(out: &mut impl bytes::BufMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

/// A packet with fixed header byte `byte1` and `body`.
pub fn frame_of(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    put_var_int(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// Length of the value of the MQTT 5 property `id` at the start of `rest` (after its id byte);
/// `None` for an unknown id or a truncated value.
fn property_len(id: u8, rest: &[u8]) -> Option<usize> {
    let string = |r: &[u8]| prop_string_len(r);
    Some(match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
        0x13 | 0x21 | 0x22 | 0x23 => 2,
        0x02 | 0x11 | 0x18 | 0x27 => 4,
        0x0b => var_int(rest).ok()??.0,
        0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => string(rest)?,
        0x26 => {
            let k = string(rest)?;
            k + string(rest.get(k..)?)?
        }
        _ => return None,
    })
    .filter(|&n| n <= rest.len())
}

/// rumqttd's MQTT 5 CONNACK `frame`, when it accepted the connection, as the client gets it:
/// Topic Alias Maximum `alias_max` (0: none; rumqttd says 4096) and, for an id the guard
/// assigned, an Assigned Client Identifier (rumqttd's own decoder cannot read a CONNACK: it
/// panics, failure mode 3, so the guard edits the bytes). `None` for a refusal or a CONNACK
/// that does not parse.
pub fn connack_edited(frame: &[u8], assigned: Option<&str>, alias_max: u16) -> Option<Vec<u8>> {
    let (_, hl, rl) = parse_header(frame).ok()??;
    let body = frame.get(hl..hl + rl)?;
    let (flags, code) = (*body.first()?, *body.get(1)?);
    if code != 0 {
        return None;
    }
    let (n, plen) = var_int(body.get(2..)?).ok()??;
    let mut rest = body.get(2 + n..2 + n + plen)?;
    let mut props = Vec::with_capacity(plen + 8);
    while let Some((&id, value)) = rest.split_first() {
        let len = property_len(id, value)?;
        if id != 0x22 {
            props.extend_from_slice(&rest[..1 + len]);
        }
        rest = &value[len..];
    }
    if alias_max > 0 {
        props.push(0x22);
        props.extend_from_slice(&alias_max.to_be_bytes());
    }
    if let Some(id) = assigned {
        props.push(0x12);
        props.extend_from_slice(&u16::try_from(id.len()).ok()?.to_be_bytes());
        props.extend_from_slice(id.as_bytes());
    }
    let mut out = vec![flags, code];
    put_var_int(&mut out, props.len());
    out.extend_from_slice(&props);
    Some(frame_of(PacketType::Connack.byte1(), &out))
}

/// Topic of a PUBLISH frame.
pub fn publish_topic(frame: &[u8], header_len: usize) -> Option<&[u8]> {
    let body = frame.get(header_len..)?;
    let len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    body.get(2..2 + len)
}

/// Filters of a SUBSCRIBE frame, each with its options byte.
pub fn subscribe_filters(frame: &[u8], header_len: usize, v5: bool) -> Option<Vec<(&[u8], u8)>> {
    filter_list(frame, header_len, v5, true)
}

/// Filters of an UNSUBSCRIBE frame.
pub fn unsubscribe_filters(frame: &[u8], header_len: usize, v5: bool) -> Option<Vec<&[u8]>> {
    let list = filter_list(frame, header_len, v5, false)?;
    Some(list.into_iter().map(|(f, _)| f).collect())
}

/// The topic filters after the packet id (and MQTT 5 properties) of a SUBSCRIBE (each followed
/// by an options byte: `options`) or UNSUBSCRIBE frame; options 0 when there are none.
fn filter_list(
    frame: &[u8],
    header_len: usize,
    v5: bool,
    options: bool,
) -> Option<Vec<(&[u8], u8)>> {
    let mut body = frame.get(header_len + 2..)?; // after the packet id
    if v5 {
        // properties: variable byte integer length, then the properties
        let (n, plen) = var_int(body).ok()??;
        body = body.get(n + plen..)?;
    }
    let mut out = Vec::new();
    while !body.is_empty() {
        let len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
        let o = if options { *body.get(2 + len)? } else { 0 };
        out.push((body.get(2..2 + len)?, o));
        body = body.get(2 + len + usize::from(options)..)?; // + options byte
    }
    Some(out)
}

/// The SUBSCRIBE or UNSUBSCRIBE `frame` (`options`: SUBSCRIBE, each filter followed by its
/// options byte) with each filter `map` returns `Some` for replaced by it; packet id and MQTT 5
/// properties unchanged. `None` when the frame does not parse or a filter would be too long.
pub fn map_filters(
    frame: &[u8],
    header_len: usize,
    v5: bool,
    options: bool,
    map: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let list = filter_list(frame, header_len, v5, options)?;
    // Packet id and properties: everything before the first filter.
    let mut head_len = 2;
    if v5 {
        let (n, plen) = var_int(frame.get(header_len + 2..)?).ok()??;
        head_len += n + plen;
    }
    let mut body = frame.get(header_len..header_len + head_len)?.to_vec();
    for (f, o) in list {
        let mapped = map(f);
        let f = mapped.as_deref().unwrap_or(f);
        body.extend_from_slice(&u16::try_from(f.len()).ok()?.to_be_bytes());
        body.extend_from_slice(f);
        if options {
            body.push(o);
        }
    }
    Some(frame_of(*frame.first()?, &body))
}

/// The parts of a PUBLISH frame the guard checks.
pub struct PublishMeta<'a> {
    pub topic: &'a [u8],
    pub qos: u8,
    /// Packet id (QoS 1 and 2).
    pub pkid: Option<u16>,
    pub retain: bool,
    pub alias: Option<u16>,
    /// MQTT 5 user property `traceparent` (the first).
    pub traceparent: Option<&'a [u8]>,
    pub payload_len: usize,
}

/// Length of the MQTT string (or binary data) at the start of `r`, with its 2-byte length.
pub fn prop_string_len(r: &[u8]) -> Option<usize> {
    Some(2 + u16::from_be_bytes([*r.first()?, *r.get(1)?]) as usize)
}

/// Parse a PUBLISH frame (`None`: malformed).
pub fn publish_meta(frame: &[u8], header_len: usize, v5: bool) -> Option<PublishMeta<'_>> {
    let qos = (frame.first()? >> 1) & 3;
    if qos == 3 {
        return None;
    }
    let topic = publish_topic(frame, header_len)?;
    let mut at = header_len + 2 + topic.len();
    let pkid = if qos > 0 {
        at += 2;
        Some(u16::from_be_bytes([
            *frame.get(at - 2)?,
            *frame.get(at - 1)?,
        ]))
    } else {
        None
    };
    let mut alias = None;
    let mut traceparent = None;
    if v5 {
        let (n, plen) = var_int(frame.get(at..)?).ok()??;
        let mut props = frame.get(at + n..at + n + plen)?;
        at += n + plen;
        while let Some((&id, rest)) = props.split_first() {
            let string = prop_string_len;
            let len = match id {
                0x01 => 1,
                0x02 => 4,
                0x23 => {
                    alias = Some(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
                    2
                }
                0x03 | 0x08 | 0x09 => string(rest)?,
                0x26 => {
                    let k = string(rest)?;
                    let v = string(rest.get(k..)?)?;
                    if traceparent.is_none() && rest.get(2..k)?.eq_ignore_ascii_case(b"traceparent")
                    {
                        traceparent = Some(rest.get(k + 2..k + v)?);
                    }
                    k + v
                }
                0x0b => var_int(rest).ok()??.0,
                _ => return None,
            };
            props = rest.get(len..)?;
        }
    }
    Some(PublishMeta {
        topic,
        qos,
        pkid,
        retain: frame[0] & 1 == 1,
        alias,
        traceparent,
        payload_len: frame.len().checked_sub(at)?,
    })
}

/// A SUBACK refusing every filter of the SUBSCRIBE `frame` with `code`.
pub fn suback_refusal(
    frame: &[u8],
    header_len: usize,
    v5: bool,
    code: u8,
    filters: usize,
) -> Vec<u8> {
    let pkid = frame.get(header_len..header_len + 2).unwrap_or(&[0, 0]);
    let mut body = pkid.to_vec();
    if v5 {
        body.push(0);
    }
    body.extend(std::iter::repeat_n(code, filters));
    frame_of(PacketType::Suback.byte1(), &body)
}

/// The Session Expiry Interval an MQTT 5 DISCONNECT `body` (after the fixed header) sets:
/// `Some(None)` when it sets none, `None` when malformed.
pub fn disconnect_expiry(body: &[u8]) -> Option<Option<u32>> {
    // Reason code and properties are both optional.
    let Some(props) = body.get(1..).filter(|p| !p.is_empty()) else {
        return Some(None);
    };
    let (n, plen) = var_int(props).ok()??;
    let mut props = props.get(n..n + plen)?;
    let mut expiry = None;
    while let Some((&id, rest)) = props.split_first() {
        let string = prop_string_len;
        let len = match id {
            0x11 => {
                let b = rest.get(..4)?;
                expiry = Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                4
            }
            0x1f | 0x1c => string(rest)?,
            0x26 => {
                let k = string(rest)?;
                k + string(rest.get(k..)?)?
            }
            _ => return None,
        };
        props = rest.get(len..)?;
    }
    Some(expiry)
}

/// Packet id of a PUBLISH frame of QoS 1 or 2.
pub fn publish_pkid(frame: &[u8], header_len: usize) -> Option<u16> {
    let topic = publish_topic(frame, header_len)?;
    let at = header_len + 2 + topic.len();
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// How [`rewrite_publish`] changes a PUBLISH.
#[derive(Clone, Copy, Debug, Default)]
pub struct Edit<'a> {
    /// The QoS it gets (the packet id is kept when both old and new QoS are above 0, dropped
    /// for QoS 0; DUP is kept only with a packet id).
    pub qos: u8,
    pub retain: bool,
    /// A topic name in place of the frame's own (`None`: the frame's, possibly empty with an
    /// MQTT 5 alias).
    pub topic: Option<&'a [u8]>,
    /// Bytes put in front of the payload (a [`crate::core::stamp`]).
    pub prefix: &'a [u8],
    /// Bytes taken off the front of the payload (a stamp being removed).
    pub skip: usize,
    /// MQTT 5: leave every property out (an empty property list).
    pub drop_properties: bool,
}

/// Append to `out` the PUBLISH `frame` (fixed header of `header_len` bytes) changed as `edit`
/// says, MQTT 5 properties (`v5`) unchanged unless it drops them. `None`, with nothing
/// appended, when the frame is
/// not a PUBLISH that parses, has no packet id to keep, or is shorter than `edit.skip`.
pub fn rewrite_publish(
    frame: &[u8],
    header_len: usize,
    v5: bool,
    edit: &Edit<'_>,
    out: &mut BytesMut,
) -> Option<()> {
    let byte1 = *frame.first()?;
    let qos = (byte1 >> 1) & 3;
    if qos == 3 || edit.qos > 2 || (edit.qos > 0 && qos == 0) {
        return None;
    }
    let topic_field =
        frame.get(header_len..header_len + 2 + publish_topic(frame, header_len)?.len())?;
    let mut at = header_len + topic_field.len();
    let pkid = if qos > 0 {
        at += 2;
        Some(frame.get(at - 2..at)?)
    } else {
        None
    };
    let props = if v5 {
        let (n, plen) = var_int(frame.get(at..)?).ok()??;
        let p = frame.get(at..at + n + plen)?;
        at += n + plen;
        if edit.drop_properties {
            &[0][..]
        } else {
            p
        }
    } else {
        &[]
    };
    let payload = frame.get(at..)?.get(edit.skip..)?;
    let topic_len = edit.topic.map_or(topic_field.len(), |t| 2 + t.len());
    if topic_len - 2 > u16::MAX as usize {
        return None;
    }
    let pkid = if edit.qos > 0 { pkid } else { None };
    let dup = if pkid.is_some() { byte1 & 0x08 } else { 0 };
    out.extend_from_slice(&[0x30 | dup | (edit.qos << 1) | u8::from(edit.retain)]);
    put_var_int(
        out,
        topic_len + pkid.map_or(0, <[u8]>::len) + props.len() + edit.prefix.len() + payload.len(),
    );
    match edit.topic {
        Some(t) => {
            out.extend_from_slice(&(t.len() as u16).to_be_bytes());
            out.extend_from_slice(t);
        }
        None => out.extend_from_slice(topic_field),
    }
    if let Some(id) = pkid {
        out.extend_from_slice(id);
    }
    out.extend_from_slice(props);
    out.extend_from_slice(edit.prefix);
    out.extend_from_slice(payload);
    Some(())
}

/// Does the MQTT 5 PUBLISH `frame` carry properties (a property length over 0)?
/// `topic_len`: the length of its topic name field.
pub fn has_properties(frame: &[u8], header_len: usize, topic_len: usize) -> bool {
    let qos = frame.first().map_or(0, |b| (b >> 1) & 3);
    let at = header_len + 2 + topic_len + if qos > 0 { 2 } else { 0 };
    matches!(frame.get(at..).map(var_int), Some(Ok(Some((_, n)))) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_seen_and_left_out() {
        // MQTT 5 QoS 1 PUBLISH "a/b", pkid 7, a user property k=v, payload "x".
        let props = [0x26, 0, 1, b'k', 0, 1, b'v'];
        let mut body = vec![0, 3, b'a', b'/', b'b', 0, 7, props.len() as u8];
        body.extend_from_slice(&props);
        body.push(b'x');
        let mut f = vec![0x32, body.len() as u8];
        f.extend_from_slice(&body);
        assert!(has_properties(&f, 2, 3));
        let mut none = vec![0x30, 7, 0, 3, b'a', b'/', b'b', 0, b'x'];
        assert!(!has_properties(&none, 2, 3));
        none.truncate(7);
        assert!(!has_properties(&none, 2, 3), "truncated: none seen");
        // Left out: QoS 0, an empty property list; a prefix before the payload.
        let mut out = BytesMut::new();
        let edit = Edit {
            retain: true,
            drop_properties: true,
            ..Edit::default()
        };
        rewrite_publish(&f, 2, true, &edit, &mut out).unwrap();
        assert_eq!(&out[..], &[0x31, 7, 0, 3, b'a', b'/', b'b', 0, b'x']);
        out.clear();
        let edit = Edit {
            prefix: b"s",
            ..Edit::default()
        };
        let plain = [0x30, 6, 0, 3, b'a', b'/', b'b', b'x'];
        out.clear();
        rewrite_publish(&plain, 2, false, &edit, &mut out).unwrap();
        assert_eq!(&out[..], &[0x30, 7, 0, 3, b'a', b'/', b'b', b's', b'x']);
    }

    #[test]
    fn headers() {
        assert!(matches!(parse_header(&[0x10]), Ok(None)));
        assert!(matches!(
            parse_header(&[0x10, 0x00]),
            Ok(Some((0x10, 2, 0)))
        ));
        assert!(matches!(
            parse_header(&[0x30, 0x80, 0x01]),
            Ok(Some((0x30, 3, 128)))
        ));
        assert!(matches!(parse_header(&[0x30, 0x80, 0x80]), Ok(None)));
        assert!(matches!(
            parse_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(FrameError::Malformed)
        ));
    }

    #[test]
    fn subscribe_parsing() {
        // v4: pkid 1, "a/b" qos1, "c" qos0
        let f = [0x82, 11, 0, 1, 0, 3, b'a', b'/', b'b', 1, 0, 1, b'c', 0];
        let v = subscribe_filters(&f[..13], 2, false);
        assert!(v.is_none(), "truncated is None");
        let f = [0x82, 12, 0, 1, 0, 3, b'a', b'/', b'b', 1, 0, 1, b'c', 0];
        assert_eq!(
            subscribe_filters(&f, 2, false).unwrap(),
            vec![(&b"a/b"[..], 1), (&b"c"[..], 0)]
        );
        // v5: pkid, properties length 0
        let f = [0x82, 8, 0, 1, 0, 0, 1, b'x', 0];
        assert_eq!(
            subscribe_filters(&f, 2, true).unwrap(),
            vec![(&b"x"[..], 0)]
        );
        // v5 with 3 bytes of properties (subscription identifier 0x0b, value 0x81 0x01)
        let f = [0x82, 11, 0, 1, 3, 0x0b, 0x81, 0x01, 0, 1, b'x', 0];
        assert_eq!(
            subscribe_filters(&f, 2, true).unwrap(),
            vec![(&b"x"[..], 0)]
        );
        // UNSUBSCRIBE v4: pkid 1, "a/b"
        let f = [0xa2, 7, 0, 1, 0, 3, b'a', b'/', b'b'];
        assert_eq!(
            unsubscribe_filters(&f, 2, false).unwrap(),
            vec![&b"a/b"[..]]
        );
    }

    #[test]
    fn disconnect_and_connack_properties() {
        // No reason code / reason only / no properties: no expiry set.
        assert_eq!(disconnect_expiry(&[]), Some(None));
        assert_eq!(disconnect_expiry(&[0x04]), Some(None));
        assert_eq!(disconnect_expiry(&[0x00, 0x00]), Some(None));
        // Reason string "x", then Session Expiry Interval 300.
        assert_eq!(
            disconnect_expiry(&[0x00, 9, 0x1f, 0, 1, b'x', 0x11, 0, 0, 1, 0x2c]),
            Some(Some(300))
        );
        // Truncated, or a property a DISCONNECT cannot carry: malformed.
        assert_eq!(disconnect_expiry(&[0x00, 5, 0x11, 0, 0]), None);
        assert_eq!(disconnect_expiry(&[0x00, 2, 0x23, 0]), None);

        // rumqttd's CONNACK with Topic Alias Maximum 4096: the guard's maximum in its place,
        // and the assigned id after it; other properties kept.
        let c = [0x20, 6, 0x00, 0x00, 3, 0x22, 0x10, 0x00];
        assert_eq!(
            connack_edited(&c, Some("ab"), 64).unwrap(),
            vec![0x20, 11, 0x00, 0x00, 8, 0x22, 0x00, 0x40, 0x12, 0, 2, b'a', b'b']
        );
        let c = [
            0x20, 10, 0x01, 0x00, 7, 0x24, 0x01, 0x22, 0x10, 0x00, 0x2a, 0x00,
        ];
        assert_eq!(
            connack_edited(&c, None, 0).unwrap(),
            vec![0x20, 7, 0x01, 0x00, 4, 0x24, 0x01, 0x2a, 0x00],
            "no aliases: the property left out (0 is its default)"
        );
        // A refusal is left alone; an unknown property is not guessed at.
        assert!(connack_edited(&[0x20, 3, 0x00, 0x85, 0], Some("ab"), 64).is_none());
        assert!(connack_edited(&[0x20, 5, 0x00, 0x00, 2, 0x7f, 0], None, 64).is_none());
    }

    #[test]
    fn publish_parsing() {
        // v4 QoS 1: topic "a/b", pkid, payload "hello" -> topic + payload = 8
        let f = [
            0x32, 12, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'e', b'l', b'l', b'o',
        ];
        let m = publish_meta(&f, 2, false).unwrap();
        assert_eq!(
            (m.topic, m.payload_len, m.retain, m.alias),
            (&b"a/b"[..], 5, false, None)
        );
        // v5 QoS 0 retained: topic "t", properties payload format 0x01 = 1 and topic alias
        // 0x23 = 7, payload "xy"
        let f = [0x31, 11, 0, 1, b't', 5, 0x01, 1, 0x23, 0, 7, b'x', b'y'];
        let m = publish_meta(&f, 2, true).unwrap();
        assert_eq!(
            (m.topic, m.payload_len, m.retain, m.alias),
            (&b"t"[..], 2, true, Some(7))
        );
        // unknown property: malformed
        let f = [0x30, 8, 0, 1, b't', 2, 0x7f, 1, b'x', b'y'];
        assert!(publish_meta(&f, 2, true).is_none());
        // QoS 3: malformed
        assert!(publish_meta(&[0x36, 3, 0, 1, b't'], 2, false).is_none());
    }

    /// xorshift64: a deterministic stream of pseudo-random numbers (no dependency needed).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }

        /// Fewer than `n` random bytes.
        fn bytes_below(&mut self, n: usize) -> Vec<u8> {
            let len = self.below(n);
            self.bytes(len)
        }

        /// A topic of `1..=n` printable bytes.
        fn topic(&mut self, n: usize) -> Vec<u8> {
            (0..1 + self.below(n))
                .map(|_| b"abc/xyz019"[self.below(10)])
                .collect()
        }
    }

    /// A reader that hands out at most `chunk` bytes per read (as a slow socket does).
    struct Trickle<'a>(&'a [u8], usize);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.1.min(self.0.len()).min(buf.remaining());
            buf.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Every parser, on arbitrary bytes (half of them behind a fixed header that fits them,
    /// so the parsers get past it), returns without panicking.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..50_000 {
            let mut b = rng.bytes_below(48);
            if i % 2 == 0 && !b.is_empty() {
                b = frame_of(b[0], &b[1..]);
            }
            let _ = var_int(&b);
            let _ = complete_frames(&b, 1 << 16, 1 << 16);
            let _ = disconnect_expiry(&b);
            let _ = connack_edited(&b, Some("id"), 64);
            let hl = match parse_header(&b) {
                Ok(Some((byte1, hl, _))) => {
                    let _ = PacketType::of(byte1).map(|t| (t.from_client(), t.byte1()));
                    hl
                }
                _ => rng.below(6),
            };
            for v5 in [false, true] {
                let _ = publish_meta(&b, hl, v5);
                let _ = publish_topic(&b, hl);
                let _ = publish_pkid(&b, hl);
                let _ = subscribe_filters(&b, hl, v5);
                let _ = unsubscribe_filters(&b, hl, v5);
                let _ = suback_refusal(&b, hl, v5, 0x80, rng.below(4));
                let mut out = BytesMut::new();
                let edit = Edit {
                    qos: rng.below(3) as u8,
                    skip: rng.below(12),
                    topic: Some(b"t/x"),
                    ..Edit::default()
                };
                let _ = rewrite_publish(&b, hl, v5, &edit, &mut out);
                let _ = map_filters(&b, hl, v5, rng.below(2) == 0, |f| Some(f.to_vec()));
            }
        }
    }

    /// A stream of arbitrary bytes, read in small pieces, gives whole packets of at most `max`
    /// bytes each, then an end or an error: never more than was sent, never a panic.
    #[tokio::test]
    async fn arbitrary_streams_give_whole_packets_or_an_error() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..2_000 {
            let bytes = rng.bytes_below(200);
            let max = 1 + rng.below(64);
            let mut r = Trickle(&bytes, 1 + rng.below(7));
            let mut buf = BytesMut::new();
            let mut got = 0;
            while let Ok(Some(f)) = read_frame(&mut r, &mut buf, max).await {
                let (_, hl, rl) = parse_header(&f).unwrap().unwrap();
                assert!(rl <= max && f.len() == hl + rl);
                got += f.len();
            }
            assert!(got <= bytes.len());
        }
    }

    #[test]
    fn remaining_lengths_round_trip() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let edges = [
            0,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ];
        for n in edges
            .into_iter()
            .chain((0..10_000).map(|_| rng.below(268_435_456)))
        {
            let mut out = Vec::new();
            put_var_int(&mut out, n);
            assert_eq!(var_int(&out).unwrap(), Some((out.len(), n)), "{n}");
            // Any shorter prefix asks for more bytes.
            assert!(matches!(var_int(&out[..out.len() - 1]), Ok(None)));
        }
        // Past four bytes, MQTT's remaining length is malformed.
        let mut out = Vec::new();
        put_var_int(&mut out, 268_435_456);
        assert!(matches!(var_int(&out), Err(FrameError::Malformed)));
    }

    /// Packets written with `frame_of` parse back to their header and body, one at a time and
    /// run together, from a buffer and from a stream read in pieces.
    #[tokio::test]
    async fn frames_round_trip() {
        let mut rng = Rng(0x0dd_b1a5_e5ba_d5e1);
        for _ in 0..500 {
            let packets: Vec<(u8, Vec<u8>)> = (0..1 + rng.below(5))
                .map(|_| {
                    let len = [0, 1, 127, 128, 300][rng.below(5)];
                    (rng.next() as u8, rng.bytes(len))
                })
                .collect();
            let mut all = Vec::new();
            for (byte1, body) in &packets {
                let f = frame_of(*byte1, body);
                let (b, hl, rl) = parse_header(&f).unwrap().unwrap();
                assert_eq!((b, rl, &f[hl..]), (*byte1, body.len(), &body[..]));
                all.extend_from_slice(&f);
            }
            assert_eq!(complete_frames(&all, 1 << 16, usize::MAX), all.len());
            assert!(complete_frames(&all[..all.len() - 1], 1 << 16, usize::MAX) < all.len());
            let mut r = Trickle(&all, 1 + rng.below(9));
            let mut buf = BytesMut::new();
            for (byte1, body) in &packets {
                let f = read_frame(&mut r, &mut buf, 1 << 16)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(f, frame_of(*byte1, body));
            }
            assert!(matches!(
                read_frame(&mut r, &mut buf, 1 << 16).await,
                Ok(None)
            ));
        }
    }

    /// PUBLISH, SUBSCRIBE and UNSUBSCRIBE built from parts parse back to those parts, and a
    /// PUBLISH rewritten as QoS 0 keeps its topic and payload.
    #[test]
    fn packets_round_trip() {
        let mut rng = Rng(0xfeed_f00d_cafe_beef);
        for _ in 0..5_000 {
            let v5 = rng.below(2) == 1;
            let (qos, retain) = (rng.below(3) as u8, rng.below(2) == 1);
            let topic = rng.topic(20);
            let pkid = 1 + rng.below(65_535) as u16;
            let payload = rng.bytes_below(40);
            let alias = (v5 && rng.below(2) == 1).then(|| 1 + rng.below(100) as u16);
            let mut body = (topic.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(&topic);
            if qos > 0 {
                body.extend_from_slice(&pkid.to_be_bytes());
            }
            if v5 {
                match alias {
                    Some(a) => body.extend_from_slice(&[3, 0x23, (a >> 8) as u8, a as u8]),
                    None => body.push(0),
                }
            }
            body.extend_from_slice(&payload);
            let byte1 = PacketType::Publish.byte1() | (qos << 1) | u8::from(retain);
            let f = frame_of(byte1, &body);
            let (_, hl, _) = parse_header(&f).unwrap().unwrap();
            let m = publish_meta(&f, hl, v5).unwrap();
            assert_eq!(
                (m.topic, m.qos, m.pkid, m.retain, m.alias, m.payload_len),
                (
                    &topic[..],
                    qos,
                    (qos > 0).then_some(pkid),
                    retain,
                    alias,
                    payload.len()
                )
            );
            if qos > 0 {
                assert_eq!(publish_pkid(&f, hl), Some(pkid));
            }
            let mut out = BytesMut::new();
            let edit = Edit {
                retain: !retain,
                ..Edit::default()
            };
            rewrite_publish(&f, hl, v5, &edit, &mut out).unwrap();
            let (_, hl0, _) = parse_header(&out).unwrap().unwrap();
            let m0 = publish_meta(&out, hl0, v5).unwrap();
            assert_eq!(
                (m0.topic, m0.qos, m0.pkid, m0.retain, m0.payload_len),
                (&topic[..], 0, None, !retain, payload.len())
            );
            assert!(out.ends_with(&payload));
            // Any edit (a QoS at most the frame's, another topic, a prefix added and taken off
            // again) parses back as asked, with the properties (the alias) unchanged.
            let new_qos = rng.below(usize::from(qos) + 1) as u8;
            let other = rng.topic(20);
            let new_topic = (rng.below(2) == 0).then_some(&other[..]);
            let prefix = rng.topic(12);
            let mut stamped = BytesMut::new();
            let edit = Edit {
                qos: new_qos,
                retain,
                topic: new_topic,
                prefix: &prefix,
                ..Edit::default()
            };
            rewrite_publish(&f, hl, v5, &edit, &mut stamped).unwrap();
            let (_, hls, _) = parse_header(&stamped).unwrap().unwrap();
            let unstamp = Edit {
                qos: new_qos,
                retain,
                skip: prefix.len(),
                ..Edit::default()
            };
            let mut back = BytesMut::new();
            rewrite_publish(&stamped, hls, v5, &unstamp, &mut back).unwrap();
            let (_, hlb, _) = parse_header(&back).unwrap().unwrap();
            let mb = publish_meta(&back, hlb, v5).unwrap();
            assert_eq!(
                (
                    mb.topic,
                    mb.qos,
                    mb.pkid,
                    mb.retain,
                    mb.alias,
                    mb.payload_len
                ),
                (
                    new_topic.unwrap_or(&topic[..]),
                    new_qos,
                    (new_qos > 0).then_some(pkid),
                    retain,
                    alias,
                    payload.len()
                )
            );
            assert!(back.ends_with(&payload));

            let filters: Vec<(Vec<u8>, u8)> = (0..1 + rng.below(4))
                .map(|_| (rng.topic(12), rng.below(3) as u8))
                .collect();
            let (mut sub, mut unsub) = (pkid.to_be_bytes().to_vec(), pkid.to_be_bytes().to_vec());
            if v5 {
                sub.push(0);
                unsub.push(0);
            }
            for (t, o) in &filters {
                for b in [&mut sub, &mut unsub] {
                    b.extend_from_slice(&(t.len() as u16).to_be_bytes());
                    b.extend_from_slice(t);
                }
                sub.push(*o);
            }
            let s = frame_of(PacketType::Subscribe.byte1() | 2, &sub);
            let u = frame_of(PacketType::Unsubscribe.byte1() | 2, &unsub);
            let (_, hs, _) = parse_header(&s).unwrap().unwrap();
            let (_, hu, _) = parse_header(&u).unwrap().unwrap();
            let want: Vec<(&[u8], u8)> = filters.iter().map(|(t, o)| (&t[..], *o)).collect();
            assert_eq!(subscribe_filters(&s, hs, v5).unwrap(), want);
            let want: Vec<&[u8]> = filters.iter().map(|(t, _)| &t[..]).collect();
            assert_eq!(unsubscribe_filters(&u, hu, v5).unwrap(), want);
            let refusal = suback_refusal(&s, hs, v5, 0x80, filters.len());
            let (b, hr, rl) = parse_header(&refusal).unwrap().unwrap();
            assert_eq!(PacketType::of(b), Some(PacketType::Suback));
            assert_eq!(&refusal[hr..hr + 2], &pkid.to_be_bytes());
            assert_eq!(rl, 2 + usize::from(v5) + filters.len());
            // Filters mapped (every other one prefixed) keep their order, options, packet id.
            let map = |f: &[u8]| f.len().is_multiple_of(2).then(|| [b"p/", f].concat());
            let mapped: Vec<Vec<u8>> = filters
                .iter()
                .map(|(t, _)| map(t).unwrap_or(t.clone()))
                .collect();
            let ms = map_filters(&s, hs, v5, true, map).unwrap();
            let (_, hms, _) = parse_header(&ms).unwrap().unwrap();
            let want: Vec<(&[u8], u8)> = mapped
                .iter()
                .zip(&filters)
                .map(|(t, (_, o))| (&t[..], *o))
                .collect();
            assert_eq!(subscribe_filters(&ms, hms, v5).unwrap(), want);
            assert_eq!(&ms[hms..hms + 2], &pkid.to_be_bytes());
            let mu = map_filters(&u, hu, v5, false, map).unwrap();
            let (_, hmu, _) = parse_header(&mu).unwrap().unwrap();
            let want: Vec<&[u8]> = mapped.iter().map(|t| &t[..]).collect();
            assert_eq!(unsubscribe_filters(&mu, hmu, v5).unwrap(), want);
        }
    }

    #[test]
    fn packet_types() {
        for n in 0..=255u8 {
            match PacketType::of(n) {
                None => assert_eq!(n >> 4, 0),
                Some(t) => assert_eq!(t.byte1(), n & 0xf0),
            }
        }
        let from_client: Vec<u8> = (0..16u8)
            .filter(|n| PacketType::of(n << 4).is_some_and(PacketType::from_client))
            .collect();
        assert_eq!(from_client, [3, 4, 5, 6, 7, 8, 10, 12, 14]);
    }
}
