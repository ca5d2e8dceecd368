//! The event model shared by all stages, and its CloudEvents 1.0 wire form.
//!
//! A sensor publish becomes a [`Reading`] (ingest + decode); the rules turn readings into
//! [`Event`]s bound upstream; the queue gives each event its `sequence` and freezes it into the
//! envelope bytes with [`Event::envelope`]. Those bytes are what is stored, sent and re-sent: an
//! event's `id` and `sequence` never change after commit.
//!
//! Layer: core (imports only `core::decode`). Invariant: the event model has no behaviour of a
//! stage; what a stage does with an event lives in the stage.

use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::core::decode::Payload;

/// A publish received from a sensor, decoded.
#[derive(Debug, Clone)]
pub struct Reading {
    pub topic: String,
    pub received: SystemTime,
    pub payload: Payload,
    /// W3C trace context from an MQTT 5 `traceparent` user property.
    pub traceparent: Option<String>,
}

/// Delivery class: alerts leave before telemetry and are evicted after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Alert = 0,
    Telemetry = 1,
}

impl Class {
    pub fn as_i64(self) -> i64 {
        self as i64
    }

    pub fn from_i64(v: i64) -> Class {
        if v == 0 {
            Class::Alert
        } else {
            Class::Telemetry
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Alert => "alert",
            Class::Telemetry => "telemetry",
        }
    }
}

pub const TYPE_READING: &str = "io.edgegate.reading";
/// An anomaly detector's alert; `data.state` is `"start"` when the anomaly begins and `"clear"`
/// when it ends.
pub const TYPE_ALERT: &str = "io.edgegate.alert";
/// One window of an `aggregate` action.
pub const TYPE_AGGREGATE: &str = "io.edgegate.aggregate";

/// An event bound upstream, before the queue assigns its sequence.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub class: Class,
    pub kind: &'static str,
    /// The topic the event is about (the sensor's topic for readings).
    pub subject: String,
    /// Where it is published upstream (`{topic_prefix}/{subject}` for readings).
    pub upstream_topic: String,
    pub time: SystemTime,
    pub data: Data,
    pub traceparent: Option<String>,
}

/// Event data: JSON (embedded as is) or opaque bytes (sent as `data_base64`).
#[derive(Debug, Clone)]
pub enum Data {
    /// Valid JSON text, embedded verbatim.
    Json(Bytes),
    Binary(Bytes),
}

impl Data {
    pub fn as_ref(&self) -> DataRef<'_> {
        match self {
            Data::Json(b) => DataRef::Json(b),
            Data::Binary(b) => DataRef::Binary(b),
        }
    }
}

impl From<&Payload> for Data {
    /// The event data for a payload: its JSON text as is, or its bytes.
    fn from(p: &Payload) -> Data {
        match p {
            Payload::Object(b) | Payload::OtherJson(b) => Data::Json(b.clone()),
            Payload::Number { json, .. } => Data::Json(json.clone()),
            Payload::Opaque(b) => Data::Binary(b.clone()),
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    subject: &'a str,
    time: Rfc3339,
    sequence: Sequence,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

/// The envelope's time, written as RFC 3339 with microseconds straight into the envelope (no
/// string of its own: this runs for every event the queue takes and every row it reads).
struct Rfc3339(SystemTime);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

/// The envelope's zero-padded sequence ([`SEQUENCE_WIDTH`] digits), written in place.
struct Sequence(u64);

impl Serialize for Sequence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:0width$}", self.0, width = SEQUENCE_WIDTH))
    }
}

/// Width of the zero-padded `sequence` string: lexicographic order equals numeric order, as the
/// CloudEvents sequence extension asks.
pub const SEQUENCE_WIDTH: usize = 20;

/// What an envelope holds besides its strings and data: keys, quotes, the time, the sequence,
/// the content type (214 bytes at most: `application/octet-stream` and a traceparent key).
const ENVELOPE_FIXED: usize = 224;

impl Event {
    /// The CloudEvents 1.0 structured-mode JSON of this event with its committed sequence.
    pub fn envelope(&self, source: &str, sequence: u64) -> Vec<u8> {
        self.parts(source, sequence).envelope()
    }

    /// This event's envelope parts, borrowed.
    pub fn parts<'a>(&'a self, source: &'a str, sequence: u64) -> Parts<'a> {
        Parts {
            id: &self.id,
            source,
            kind: self.kind,
            subject: &self.subject,
            time: self.time,
            sequence,
            data: self.data.as_ref(),
            traceparent: self.traceparent.as_deref(),
        }
    }
}

/// Event data, borrowed (see [`Data`]).
#[derive(Debug, Clone, Copy)]
pub enum DataRef<'a> {
    Json(&'a [u8]),
    Binary(&'a [u8]),
}

/// Everything an envelope is made of. The envelope is a pure function of these: the queue
/// stores them (`queue::store::row`) and builds the same bytes again when it reads the row.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    pub id: &'a str,
    pub source: &'a str,
    pub kind: &'a str,
    pub subject: &'a str,
    pub time: SystemTime,
    pub sequence: u64,
    pub data: DataRef<'a>,
    pub traceparent: Option<&'a str>,
}

impl Parts<'_> {
    /// What to reserve for the envelope, with `data_len` bytes of data (as embedded): sized
    /// once, the fixed keys and values at most [`ENVELOPE_FIXED`], the strings a little more
    /// for their escapes. (Grown as it filled, `realloc` took ~10 % of the queue writer's
    /// profile samples at full load; the time and the sequence have no strings of their own
    /// either.)
    fn capacity(&self, data_len: usize) -> usize {
        let strings = self.id.len()
            + self.source.len()
            + self.kind.len()
            + self.subject.len()
            + self.traceparent.map_or(0, str::len);
        ENVELOPE_FIXED + strings + strings / 8 + data_len
    }

    /// The CloudEvents 1.0 structured-mode JSON.
    pub fn envelope(&self) -> Vec<u8> {
        let (datacontenttype, data, data_base64) = match self.data {
            DataRef::Json(bytes) => {
                // Json data is valid JSON by construction (see decode); if not, fall back to
                // base64 rather than emit a broken envelope.
                match std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|s| serde_json::from_str::<&RawValue>(s).ok())
                {
                    Some(raw) => ("application/json", Some(raw), None),
                    None => (
                        "application/octet-stream",
                        None,
                        Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    ),
                }
            }
            DataRef::Binary(bytes) => (
                "application/octet-stream",
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        };
        let data_len =
            data.map_or(0, |d| d.get().len()) + data_base64.as_ref().map_or(0, String::len);
        let mut out = Vec::with_capacity(self.capacity(data_len));
        let env = Envelope {
            specversion: "1.0",
            id: self.id,
            source: self.source,
            kind: self.kind,
            subject: self.subject,
            time: Rfc3339(self.time),
            sequence: Sequence(self.sequence),
            datacontenttype,
            traceparent: self.traceparent,
            data,
            data_base64,
        };
        // Serializing plain strings and validated raw JSON into a Vec cannot fail.
        match serde_json::to_writer(&mut out, &env) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }
}

/// A new event id: UUIDv7, time-ordered and unique without coordination.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: Data) -> Event {
        Event {
            id: "id-1".into(),
            class: Class::Telemetry,
            kind: TYPE_READING,
            subject: "sensors/a/t".into(),
            upstream_topic: "edge/gw/sensors/a/t".into(),
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456),
            data,
            traceparent: None,
        }
    }

    #[test]
    fn json_envelope() {
        let bytes =
            ev(Data::Json(Bytes::from_static(b"{\"t\": 21.5}"))).envelope("edgegate://gw", 7);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "id-1");
        assert_eq!(v["source"], "edgegate://gw");
        assert_eq!(v["type"], "io.edgegate.reading");
        assert_eq!(v["subject"], "sensors/a/t");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["sequence"], "00000000000000000007");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["t"], 21.5);
        assert!(v.get("data_base64").is_none());
    }

    #[test]
    fn binary_envelope() {
        let bytes = ev(Data::Binary(Bytes::from_static(&[0, 159, 146, 150]))).envelope("s", 1);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["datacontenttype"], "application/octet-stream");
        assert_eq!(v["data_base64"], "AJ+Slg==");
        assert!(v.get("data").is_none());
    }

    #[test]
    fn the_envelope_is_the_same_bytes_and_fits_the_room_reserved_for_it() {
        // Byte for byte what the envelope was when its time and sequence were strings of their
        // own (a resend after an upgrade is the first send again).
        let reading = ev(Data::Json(Bytes::from_static(b"{\"t\": 21.5}")));
        assert_eq!(
            String::from_utf8(reading.envelope("edgegate://gw", 7)).unwrap(),
            concat!(
                r#"{"specversion":"1.0","id":"id-1","source":"edgegate://gw","#,
                r#""type":"io.edgegate.reading","subject":"sensors/a/t","#,
                r#""time":"2023-11-14T22:13:20.123456Z","sequence":"00000000000000000007","#,
                r#""datacontenttype":"application/json","data":{"t": 21.5}}"#
            )
        );
        // Built in the room reserved at once, never grown: a reading, binary data, an alert
        // with a traceparent and the largest sequence, a subject full of escapes.
        let mut alert = ev(Data::Json(Bytes::from_static(b"{\"state\":\"start\"}")));
        alert.kind = TYPE_ALERT;
        alert.id = new_id();
        alert.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let mut escaped = ev(Data::Json(Bytes::from_static(b"1")));
        escaped.subject = "sensors/\"hall\"/t\\x\ty".into();
        let binary = ev(Data::Binary(Bytes::from_static(&[0, 159, 146, 150, 7])));
        for e in [&reading, &alert, &escaped, &binary] {
            let parts = e.parts("edgegate://a-gateway-with-a-long-name", u64::MAX);
            let env = parts.envelope();
            let data_len = match e.data.as_ref() {
                DataRef::Json(b) => b.len(),
                DataRef::Binary(b) => b.len().div_ceil(3) * 4,
            };
            assert!(
                env.len() <= parts.capacity(data_len),
                "{} bytes in {} reserved: {}",
                env.len(),
                parts.capacity(data_len),
                String::from_utf8_lossy(&env)
            );
            serde_json::from_slice::<serde_json::Value>(&env).unwrap();
        }
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(new_id(), new_id());
    }

    #[test]
    fn data_is_valid_json_or_binary() {
        for p in [&b"{\"a\":[1,2]}"[..], b" 5 ", b"+5", b"[true]", b"\x00\x01"] {
            match Data::from(&Payload::decode(Bytes::copy_from_slice(p))) {
                Data::Json(b) => {
                    serde_json::from_slice::<serde_json::Value>(&b).unwrap();
                }
                Data::Binary(b) => assert_eq!(&b[..], p),
            }
        }
    }
}
