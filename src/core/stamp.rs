//! The stamp every message published into the embedded broker carries in front of its payload:
//! the QoS it was published with and the connection that published it.
//!
//! rumqttd 0.20 forwards a message at the QoS of the subscription, not at the minimum of that
//! and the publish QoS (MQTT 3.1.1 and 5, §3.8.4), and does not say who published it (so MQTT
//! 5's No Local cannot be honoured). The guard is the only way in and out of rumqttd for
//! clients, and the gateway's own links are the only other publishers, so each of them stamps
//! what it publishes and the guard reads the stamp (and removes it) on the way to a client.
//!
//! Layer: core. Invariants: every publish with a payload that reaches rumqttd from the guard
//! (readings, other publishes, wills) or from the gateway's links carries exactly one stamp; a
//! client never sees one (the guard strips it before anything is written to a client); a
//! payload of any bytes, including one that starts like a stamp, round-trips unchanged. The one
//! exception is an empty retained publish, which stays empty, without a stamp: it is how MQTT
//! clears a retained message, and rumqttd clears only on an empty payload (on any empty
//! payload: a stamped empty non-retained publish no longer clears one, as MQTT says). Such a
//! message reaches live subscribers at the subscription's QoS and is not held back by No Local.

/// Length of a stamp in bytes.
pub const LEN: usize = 10;

/// First byte of every stamp.
const MAGIC: u8 = 0xe6;

/// Origin of the gateway's own publishes (rules, status): no client connection.
pub const GATEWAY: u64 = 0;

/// QoS the gateway's own publishes are stamped with: a subscriber gets them at the QoS it
/// asked for (min(2, granted) = granted), as before stamps existed.
pub const GATEWAY_QOS: u8 = 2;

/// The stamp of the gateway's own publishes (rules' alerts and `publish` actions, status).
pub const OWN: Stamp = Stamp {
    qos: GATEWAY_QOS,
    origin: GATEWAY,
};

/// What a stamp says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The QoS the message was published with (0-2).
    pub qos: u8,
    /// The guard's number of the publishing connection ([`GATEWAY`] for the gateway's own).
    pub origin: u64,
}

impl Stamp {
    /// The stamp's bytes.
    pub fn bytes(self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = MAGIC;
        b[1] = self.qos.min(2);
        b[2..].copy_from_slice(&self.origin.to_le_bytes());
        b
    }

    /// What goes in front of a payload of `payload_len` bytes: the stamp, or nothing for an
    /// empty `retain`ed one (module docs).
    pub fn prefix(self, payload_len: usize, retain: bool) -> Prefix {
        Prefix {
            bytes: self.bytes(),
            len: if payload_len == 0 && retain { 0 } else { LEN },
        }
    }

    /// `payload` with this stamp in front (an empty retained one stays empty).
    pub fn prepend(self, payload: &[u8], retain: bool) -> Vec<u8> {
        let prefix = self.prefix(payload.len(), retain);
        let mut v = Vec::with_capacity(prefix.len() + payload.len());
        v.extend_from_slice(&prefix);
        v.extend_from_slice(payload);
        v
    }
}

/// The bytes [`Stamp::prefix`] puts in front of a payload.
pub struct Prefix {
    bytes: [u8; LEN],
    len: usize,
}

impl std::ops::Deref for Prefix {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Split a stamped payload into its stamp and the payload as published; `None` when it carries
/// no stamp (something published into rumqttd without one: a bug, delivered as it is).
pub fn split(stamped: &[u8]) -> Option<(Stamp, &[u8])> {
    let (head, payload) = stamped.split_at_checked(LEN)?;
    if head[0] != MAGIC || head[1] > 2 {
        return None;
    }
    let mut origin = [0u8; 8];
    origin.copy_from_slice(&head[2..]);
    Some((
        Stamp {
            qos: head[1],
            origin: u64::from_le_bytes(origin),
        },
        payload,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_payload_round_trips_behind_its_stamp() {
        let stamp = Stamp {
            qos: 1,
            origin: 0x0102_0304_0506_0708,
        };
        // Including a payload that itself begins like a stamp, and the empty payload.
        let lookalike = Stamp { qos: 2, origin: 9 }.bytes();
        assert!(
            stamp.prepend(b"", true).is_empty(),
            "an empty retained payload stays empty"
        );
        for payload in [&b""[..], b"21.5", &lookalike[..], &[0xe6, 3][..]] {
            let stamped = stamp.prepend(payload, false);
            assert_eq!(stamped.len(), LEN + payload.len());
            assert_eq!(split(&stamped), Some((stamp, payload)));
        }
    }

    #[test]
    fn what_is_not_a_stamp_is_not_taken_for_one() {
        assert_eq!(split(b"short"), None);
        assert_eq!(split(b"{\"value\": 21.5}"), None);
        let mut bad_qos = Stamp { qos: 1, origin: 1 }.bytes();
        bad_qos[1] = 3;
        assert_eq!(split(&bad_qos), None);
    }
}
