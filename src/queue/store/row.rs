//! The stored form of an event: what the `body` column holds.
//!
//! A row keeps the parts its envelope is made of (`core::event::Parts`), not the envelope:
//! the envelope's fixed keys, the zero-padded sequence, the time as text and the subject are
//! either constant or already in the row's other columns (`seq`, `time_us`, `subject`). A
//! reading's envelope of ~366 bytes is stored in ~150, so two or three rows share a 512-byte
//! page instead of one row taking a page of its own: each commit group writes fewer pages
//! (issue 15: bytes written per event on an SD card).
//!
//! Invariants:
//! - [`envelope`] of what [`encode`] stored is byte for byte the envelope the event had when
//!   it was appended (`Event::envelope` with the same source and sequence): a resend is the
//!   first send again. Tested for every kind of data.
//! - The envelope's time is the row's `time_us` (the envelope shows whole microseconds, and
//!   events are stamped with the receive time, never before 1970).
//! - Rows written before this form existed hold the envelope itself: a body starting with `{`
//!   is an envelope and is read as it is.
//! - A stored form that cannot be read (only a damaged file makes one) is sent as its stored
//!   bytes, with an error logged, rather than stopping the queue behind it.

use std::time::{Duration, UNIX_EPOCH};

use crate::core::event::{DataRef, Event, Parts, TYPE_AGGREGATE, TYPE_ALERT, TYPE_READING};

/// First byte of the stored form (an envelope is a JSON object and starts with `{`).
const FORM_1: u8 = 0x01;

const BINARY: u8 = 1;
const TRACEPARENT: u8 = 2;
/// The id is a UUID, stored as its 16 bytes.
const UUID: u8 = 4;

/// The kinds of event the gateway makes, stored as their index + 1 (0: the name follows).
const KINDS: [&str; 3] = [TYPE_READING, TYPE_ALERT, TYPE_AGGREGATE];

/// The `body` to store for `event`, appended with `source` (its sequence is the row's `seq`).
pub fn encode(event: &Event, source: &str) -> Vec<u8> {
    let (data, mut flags) = match event.data.as_ref() {
        DataRef::Json(b) => (b, 0),
        DataRef::Binary(b) => (b, BINARY),
    };
    // Stored as 16 bytes only when they give the same text back (lower-case, hyphenated);
    // compared in a stack buffer: this runs for every event the queue takes.
    let uuid = uuid::Uuid::try_parse(&event.id).ok().filter(|u| {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        u.hyphenated().encode_lower(&mut text).as_bytes() == event.id.as_bytes()
    });
    if uuid.is_some() {
        flags |= UUID;
    }
    if event.traceparent.is_some() {
        flags |= TRACEPARENT;
    }
    let mut out = Vec::with_capacity(
        2 + 16
            + source.len()
            + 2
            + event.traceparent.as_ref().map_or(0, |t| t.len() + 1)
            + data.len()
            + 4,
    );
    out.push(FORM_1);
    out.push(flags);
    match uuid {
        Some(u) => out.extend_from_slice(u.as_bytes()),
        None => put_str(&mut out, &event.id),
    }
    put_str(&mut out, source);
    match KINDS.iter().position(|k| *k == event.kind) {
        Some(i) => out.push(i as u8 + 1),
        None => {
            out.push(0);
            put_str(&mut out, event.kind);
        }
    }
    if let Some(t) = &event.traceparent {
        put_str(&mut out, t);
    }
    out.extend_from_slice(data);
    out
}

/// Why a stored form could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    #[error("stored event cut short")]
    Short,
    #[error("stored event has a string that is not UTF-8")]
    NotUtf8,
    #[error("stored event has an unknown kind {0}")]
    Kind(u8),
}

/// The envelope of a row: `body` as stored, with the row's `seq`, `time_us` and `subject`.
/// An envelope stored as such is returned as it is.
pub fn envelope(body: Vec<u8>, seq: u64, time_us: i64, subject: &str) -> Vec<u8> {
    if body.first() != Some(&FORM_1) {
        return body;
    }
    match decode(&body, seq, time_us, subject) {
        Ok(env) => env,
        Err(e) => {
            tracing::error!(error = %e, seq, "queue: a stored event could not be read (damaged file?); sent as stored");
            body
        }
    }
}

fn decode(body: &[u8], seq: u64, time_us: i64, subject: &str) -> Result<Vec<u8>, RowError> {
    let mut r = Reader(body.get(1..).ok_or(RowError::Short)?);
    let flags = r.byte()?;
    let uuid_text;
    let id = if flags & UUID != 0 {
        let raw: [u8; 16] = r.take(16)?.try_into().map_err(|_| RowError::Short)?;
        uuid_text = uuid::Uuid::from_bytes(raw).hyphenated().to_string();
        uuid_text.as_str()
    } else {
        r.str()?
    };
    let source = r.str()?;
    let kind = match r.byte()? {
        0 => r.str()?,
        k => *KINDS.get(k as usize - 1).ok_or(RowError::Kind(k))?,
    };
    let traceparent = if flags & TRACEPARENT != 0 {
        Some(r.str()?)
    } else {
        None
    };
    let data = if flags & BINARY != 0 {
        DataRef::Binary(r.0)
    } else {
        DataRef::Json(r.0)
    };
    let parts = Parts {
        id,
        source,
        kind,
        subject,
        time: UNIX_EPOCH + Duration::from_micros(time_us.max(0) as u64),
        sequence: seq,
        data,
        traceparent,
    };
    Ok(parts.envelope())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, RowError> {
        let (&b, rest) = self.0.split_first().ok_or(RowError::Short)?;
        self.0 = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RowError> {
        if self.0.len() < n {
            return Err(RowError::Short);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn str(&mut self) -> Result<&'a str, RowError> {
        let mut n = 0usize;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                let raw = self.take(n)?;
                return std::str::from_utf8(raw).map_err(|_| RowError::NotUtf8);
            }
        }
        Err(RowError::Short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{Class, Data};
    use bytes::Bytes;

    fn event(id: &str, kind: &'static str, data: Data, traceparent: Option<&str>) -> Event {
        Event {
            id: id.into(),
            class: Class::Telemetry,
            kind,
            subject: "sensors/a/t".into(),
            upstream_topic: "edge/gw/sensors/a/t".into(),
            time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            data,
            traceparent: traceparent.map(str::to_string),
        }
    }

    fn round_trip(e: &Event, source: &str, seq: u64) -> (Vec<u8>, Vec<u8>) {
        let stored = encode(e, source);
        let time_us = e
            .time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        (stored.clone(), envelope(stored, seq, time_us, &e.subject))
    }

    #[test]
    fn the_envelope_read_back_is_the_one_appended_byte_for_byte() {
        let long_source = "s".repeat(300);
        let cases = [
            event(
                &crate::core::event::new_id(),
                TYPE_READING,
                Data::Json(Bytes::from_static(b"{\"t\": 21.5, \"u\":\"\\u00e9\"}")),
                None,
            ),
            event(
                "not-a-uuid",
                TYPE_ALERT,
                Data::Binary(Bytes::from_static(&[0, 1, 0xff, b'{'])),
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
            // Upper-case UUID text: stored as text, so it comes back as it was.
            event(
                "0190C3C6-8F2B-7A4E-9D3C-0123456789AB",
                TYPE_AGGREGATE,
                Data::Json(Bytes::from_static(b"5")),
                None,
            ),
            // Json that is not valid JSON falls back to base64 in the envelope: the same again.
            event(
                "x",
                "io.example.other",
                Data::Json(Bytes::from_static(b"{broken")),
                None,
            ),
            event("", TYPE_READING, Data::Binary(Bytes::new()), None),
        ];
        for (i, e) in cases.iter().enumerate() {
            for source in ["edgegate://gw1", "", long_source.as_str()] {
                let seq = 7 + i as u64 * 1_000_000_007;
                let (stored, back) = round_trip(e, source, seq);
                assert_eq!(stored[0], FORM_1, "case {i}");
                assert_eq!(
                    String::from_utf8_lossy(&back),
                    String::from_utf8_lossy(&e.envelope(source, seq)),
                    "case {i}"
                );
            }
        }
    }

    #[test]
    fn a_reading_is_stored_in_less_than_half_its_envelope() {
        let e = event(
            &crate::core::event::new_id(),
            TYPE_READING,
            Data::Json(Bytes::from_static(
                b"{\"sensor\":\"s1\",\"seq\":1234,\"value\":21.53,\"sent_us\":1733100000000000}",
            )),
            None,
        );
        let stored = encode(&e, "edgegate://gw1");
        let env = e.envelope("edgegate://gw1", 42);
        assert!(
            stored.len() * 2 < env.len(),
            "{} stored for a {} byte envelope",
            stored.len(),
            env.len()
        );
    }

    #[test]
    fn an_envelope_stored_before_this_form_is_read_as_it_is() {
        let old = br#"{"specversion":"1.0","id":"a"}"#.to_vec();
        assert_eq!(envelope(old.clone(), 3, 5, "s"), old);
    }

    #[test]
    fn a_damaged_form_is_sent_as_stored_not_a_panic() {
        let e = event(
            &crate::core::event::new_id(),
            TYPE_READING,
            Data::Json(Bytes::from_static(b"{}")),
            Some("tp"),
        );
        let stored = encode(&e, "edgegate://gw1");
        for cut in 0..stored.len() {
            let body = stored[..cut].to_vec();
            // Whatever is left, reading it never panics; a form cut inside its header is sent
            // as stored.
            let _ = envelope(body, 1, 0, "s");
        }
        assert_eq!(decode(&[FORM_1], 1, 0, "s"), Err(RowError::Short));
        assert_eq!(
            decode(&[FORM_1, 0, 0, 0, 9], 1, 0, "s"),
            Err(RowError::Kind(9))
        );
        assert_eq!(
            decode(&[FORM_1, 0, 1, 0xff], 1, 0, "s"),
            Err(RowError::NotUtf8)
        );
    }
}
