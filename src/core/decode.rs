//! Payload decoding: what a sensor sent, as the rules and the envelope need it.
//!
//! - a JSON object becomes a reading with fields;
//! - a JSON number, or plain numeric text (`21.5`, ` +3 `, `1e3`), a reading with one field
//!   `value`;
//! - other valid JSON (array, string, true/false/null) is kept as JSON data without fields;
//! - anything else (binary, invalid UTF-8, malformed JSON) is opaque and forwarded as
//!   `data_base64`.
//!
//! Invariant: decoding never fails and never drops a payload; `Json`/`Object`/`Number` bytes are
//! valid JSON text.
//!
//! Layer: core, the bottom of it: imports nothing from the crate (the event's `Data` is made from
//! a `Payload` in `core::event`).

use bytes::Bytes;
use serde::de::IgnoredAny;

/// Nesting deeper than this is not parsed as JSON (serde_json itself stops at 128): such
/// payloads are forwarded opaque.
const MAX_JSON_DEPTH: usize = 64;

/// Validates JSON text without building it, like `IgnoredAny`, but also parses every number:
/// `IgnoredAny` skips numbers unparsed and so accepted `{"t": 1e999999}`, which consumers'
/// parsers (serde_json's among them) then reject as out of range (found by the hostile-payload
/// test in tests/security.rs).
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Checked, E> {
        if v.is_finite() {
            Ok(Checked)
        } else {
            Err(E::custom("number out of range"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Key>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// serde_json (with its `raw_value` feature, which we and many consumers enable) reads an object
/// whose key is this token as a RawValue and fails on it; such payloads go base64 (found by
/// `cargo fuzz run decode`: `{"$serde_json::private::RawValue":42.22}`).
const SERDE_JSON_RAW_TOKEN: &str = "$serde_json::private::RawValue";

/// An object key, checked without allocating.
struct Key;

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl serde::de::Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
        if v == SERDE_JSON_RAW_TOKEN {
            Err(E::custom("reserved serde_json key"))
        } else {
            Ok(Key)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A JSON object (its text, validated).
    Object(Bytes),
    /// A number, with its JSON text.
    Number { value: f64, json: Bytes },
    /// Valid JSON that is neither an object nor a number.
    OtherJson(Bytes),
    /// Not JSON, not numeric text.
    Opaque(Bytes),
}

impl Payload {
    pub fn decode(raw: Bytes) -> Payload {
        let Ok(text) = std::str::from_utf8(&raw) else {
            return Payload::Opaque(raw);
        };
        // JSON whitespace only: `str::trim` also strips \x0b, \x0c and Unicode spaces, which
        // JSON does not allow around a value (found by `cargo fuzz run decode`).
        let trimmed = text.trim_matches([' ', '\t', '\n', '\r']);
        if trimmed.is_empty() {
            return Payload::Opaque(raw);
        }
        let first = trimmed.as_bytes()[0];
        if first == b'{' || first == b'[' {
            if nesting_depth(trimmed) > MAX_JSON_DEPTH
                || serde_json::from_str::<Checked>(trimmed).is_err()
            {
                return Payload::Opaque(raw);
            }
            return if first == b'{' {
                Payload::Object(raw)
            } else {
                Payload::OtherJson(raw)
            };
        }
        if let Ok(value) = trimmed.parse::<f64>() {
            if value.is_finite() && !trimmed.eq_ignore_ascii_case("infinity") {
                let json = if serde_json::from_str::<f64>(trimmed).is_ok() {
                    raw.slice_ref(trimmed.as_bytes())
                } else {
                    Bytes::from(
                        serde_json::Number::from_f64(value)
                            .map(|n| n.to_string())
                            .unwrap_or_default(),
                    )
                };
                return Payload::Number { value, json };
            }
            return Payload::Opaque(raw);
        }
        if nesting_depth(trimmed) <= MAX_JSON_DEPTH
            && serde_json::from_str::<Checked>(trimmed).is_ok()
        {
            return Payload::OtherJson(raw);
        }
        Payload::Opaque(raw)
    }

    /// Is this a reading with fields (object or number)?
    pub fn is_reading(&self) -> bool {
        matches!(self, Payload::Object(_) | Payload::Number { .. })
    }

    /// The numeric value of a number payload.
    pub fn number(&self) -> Option<f64> {
        match self {
            Payload::Number { value, .. } => Some(*value),
            _ => None,
        }
    }

    /// Parsed fields of an object payload (`value` for a number).
    pub fn fields(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        match self {
            Payload::Object(b) => serde_json::from_slice(b).ok(),
            Payload::Number { value, .. } => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), serde_json::Number::from_f64(*value)?.into());
                Some(m)
            }
            _ => None,
        }
    }

    /// One top-level field of a reading without building a map: `value` for a number payload,
    /// the member `name` of an object payload. Strings without escapes are borrowed, so numeric
    /// and plain string fields are read without allocating.
    pub fn field(&self, name: &str) -> Option<Field<'_>> {
        match self {
            Payload::Number { value, .. } if name == "value" => Some(Field::Number(*value)),
            Payload::Object(b) => {
                let mut de = serde_json::Deserializer::from_slice(b);
                serde::de::DeserializeSeed::deserialize(FindField(name), &mut de)
                    .ok()
                    .flatten()
            }
            _ => None,
        }
    }

    /// A numeric field (see [`Payload::field`]); `None` if absent or not a number.
    pub fn field_f64(&self, name: &str) -> Option<f64> {
        match self.field(name)? {
            Field::Number(v) => Some(v),
            _ => None,
        }
    }
}

/// A top-level field of a payload, as [`Payload::field`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    Number(f64),
    Str(std::borrow::Cow<'a, str>),
    Bool(bool),
    Null,
    /// An array or object.
    Nested,
}

impl Field<'_> {
    pub fn type_name(&self) -> &'static str {
        match self {
            Field::Number(_) => "number",
            Field::Str(_) => "string",
            Field::Bool(_) => "bool",
            Field::Null => "null",
            Field::Nested => "array/object",
        }
    }
}

/// Deserializer seed that scans an object for one key and skips everything else.
struct FindField<'n>(&'n str);

impl<'de> serde::de::DeserializeSeed<'de> for FindField<'_> {
    type Value = Option<Field<'de>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FindField<'_> {
    type Value = Option<Field<'de>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if found.is_none() && key == self.0 {
                found = Some(map.next_value::<AnyField<'de>>()?.0);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

struct AnyField<'de>(Field<'de>);

impl<'de> serde::Deserialize<'de> for AnyField<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AnyField<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(AnyField(Field::Number(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(AnyField(Field::Number(v as f64)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(AnyField(Field::Number(v as f64)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(AnyField(Field::Bool(v)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(AnyField(Field::Null))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(AnyField(Field::Str(std::borrow::Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(AnyField(Field::Str(std::borrow::Cow::Owned(v.to_string()))))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(AnyField(Field::Nested))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnyField(Field::Nested))
            }
        }
        d.deserialize_any(V)
    }
}

/// Maximum bracket depth outside strings; cheap guard before parsing.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &[u8]) -> Payload {
        Payload::decode(Bytes::copy_from_slice(s))
    }

    #[test]
    fn objects_numbers_text() {
        assert!(matches!(d(br#"{"t":21.5,"h":40}"#), Payload::Object(_)));
        assert_eq!(d(b"21.5").number(), Some(21.5));
        assert_eq!(d(b" 42\n").number(), Some(42.0));
        match d(b"+3") {
            Payload::Number { value, json } => {
                assert_eq!(value, 3.0);
                assert_eq!(&json[..], b"3.0");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(d(b"[1,2]"), Payload::OtherJson(_)));
        assert!(matches!(d(b"\"on\""), Payload::OtherJson(_)));
        assert!(matches!(d(b"true"), Payload::OtherJson(_)));
    }

    #[test]
    fn out_of_range_numbers_never_pass_as_json() {
        // Syntactically JSON, but no consumer's f64 parser takes them: opaque (base64).
        for p in [
            &br#"{"t": 1e999999}"#[..],
            br#"[1, -1e400]"#,
            br#"{"a": {"b": [1e309]}}"#,
        ] {
            assert!(
                matches!(d(p), Payload::Opaque(_)),
                "{}",
                String::from_utf8_lossy(p)
            );
        }
        assert!(matches!(d(b"1e400"), Payload::Opaque(_)));
        // serde_json's RawValue token as a key (fuzz crash decode/crash-37a23630).
        assert!(matches!(
            d(br#"{"$serde_json::private::RawValue":42.22}"#),
            Payload::Opaque(_)
        ));
        assert!(matches!(
            d(br#"[{"a":{"$serde_json::private::RawValue":1}}]"#),
            Payload::Opaque(_)
        ));
        // Not JSON whitespace around a value (fuzz crash decode/crash-8571e01a).
        assert!(matches!(d(b"\x0b{\"t\":21.5}"), Payload::Opaque(_)));
        assert!(matches!(d("\u{a0}[1]".as_bytes()), Payload::Opaque(_)));
        assert!(matches!(d(br#"{"t": 1e308}"#), Payload::Object(_)));
    }

    #[test]
    fn opaque() {
        for p in [
            &b"ON"[..],
            b"",
            b"{bad json",
            b"\xff\xfe",
            b"NaN",
            b"inf",
            b"1e999",
            b"{\"a\":1}}",
        ] {
            assert!(
                matches!(d(p), Payload::Opaque(_)),
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(matches!(d(deep.as_bytes()), Payload::Opaque(_)));
    }

    #[test]
    fn fields() {
        let f = d(br#"{"t":21.5}"#).fields().unwrap();
        assert_eq!(f["t"], 21.5);
        let f = d(b"7").fields().unwrap();
        assert_eq!(f["value"], 7.0);
        assert!(d(b"x").fields().is_none());
    }

    #[test]
    fn single_field_access() {
        let p = d(br#"{"a":[1,{"t":2}],"t":21.5,"s":"on","e":"x\\ny","b":true,"n":null,"i":-3}"#);
        assert_eq!(p.field_f64("t"), Some(21.5));
        assert_eq!(p.field_f64("i"), Some(-3.0));
        assert_eq!(p.field("s"), Some(Field::Str("on".into())));
        assert_eq!(p.field("e"), Some(Field::Str("x\\ny".into())));
        assert_eq!(p.field("b"), Some(Field::Bool(true)));
        assert_eq!(p.field("n"), Some(Field::Null));
        assert_eq!(p.field("a"), Some(Field::Nested));
        assert_eq!(p.field("missing"), None);
        assert_eq!(p.field_f64("s"), None);
        assert_eq!(d(b"7").field_f64("value"), Some(7.0));
        assert_eq!(d(b"7").field_f64("t"), None);
        assert_eq!(d(b"x").field("value"), None);
    }
}

/// The cargo-fuzz properties (fuzz/fuzz_targets/decode.rs) on stable, for every `cargo test`.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn check(bytes: &[u8]) {
        let p = Payload::decode(Bytes::copy_from_slice(bytes));
        match &p {
            Payload::Object(b) | Payload::OtherJson(b) => {
                assert!(
                    serde_json::from_slice::<serde_json::Value>(b).is_ok(),
                    "{bytes:?}"
                );
            }
            Payload::Number { value, json } => {
                assert!(value.is_finite());
                assert!(
                    serde_json::from_slice::<serde_json::Value>(json).is_ok(),
                    "{bytes:?}"
                );
            }
            Payload::Opaque(_) => {}
        }
        if matches!(p, Payload::Object(_)) {
            assert!(p.fields().is_some());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            check(&bytes);
        }

        #[test]
        fn json_like_text(text in r#"[ \t\r\n\x0b\x0c{}\[\]":,0-9eE+\-.a-z\\]{0,40}"#) {
            check(text.as_bytes());
        }
    }
}
