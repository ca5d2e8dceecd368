//! Why the broker guard refuses a client, a connection or a packet: one [`Refusal`] per
//! reason, with the label it is counted under (`edgegate_broker_rejected_total{reason}`) and
//! the codes MQTT 3.1.1 and 5 tell the client with.
//!
//! Invariants:
//! - Labels are stable (dashboards and tests count by them) and distinct: one per variant.
//! - A code is only sent in a packet the refusal can come with: a CONNACK before the session
//!   exists ([`Refusal::connack_code`]), an MQTT 5 DISCONNECT after it
//!   ([`Refusal::disconnect_code`]), a SUBACK for a refused SUBSCRIBE
//!   ([`Refusal::suback_code`]). MQTT 3.1.1 has no DISCONNECT from the server: the connection
//!   just closes.

/// The enum, its list and its labels from one table (`Variant => "label"`), so a reason cannot
/// be added without its label.
macro_rules! refusals {
    ($($(#[$doc:meta])* $name:ident => $label:literal,)*) => {
        /// Why the guard refused (see the module doc).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Refusal {
            $($(#[$doc])* $name,)*
        }

        impl Refusal {
            /// Every refusal (for tests and documentation).
            pub const ALL: &'static [Refusal] = &[$(Refusal::$name,)*];

            /// The `reason` label it is counted and logged under.
            pub fn label(self) -> &'static str {
                match self {
                    $(Refusal::$name => $label,)*
                }
            }
        }
    };
}

refusals! {
    /// No complete CONNECT within `broker.connection_timeout`.
    ConnectTimeout => "connect_timeout",
    /// The first packet is not a CONNECT.
    NotConnect => "not_connect",
    /// A packet that cannot be parsed (bad remaining length, truncated fields).
    Malformed => "malformed",
    /// A packet over `broker.max_payload_size`.
    Oversize => "oversize",
    /// A protocol name or level the listener does not speak.
    ProtocolVersion => "protocol_version",
    /// Something MQTT forbids (reserved flags, a packet a client may not send, ...).
    Protocol => "protocol",
    /// A client id that is too long or has `+ # / $` or control characters.
    ClientId => "client_id",
    /// A client id with a prefix the gateway's own links use.
    ReservedClientId => "reserved_client_id",
    /// A topic name that is empty, not UTF-8, or has NUL.
    TopicInvalid => "topic_invalid",
    /// A topic name with a wildcard.
    TopicWildcard => "topic_wildcard",
    /// A topic over `broker.max_topic_length`.
    TopicTooLong => "topic_too_long",
    /// A new topic beyond `broker.max_topics`.
    TopicLimit => "topic_limit",
    /// A topic reserved for the gateway (`edgegate/`) or the broker (`$`).
    ReservedTopic => "reserved_topic",
    /// A client without credentials while `broker.allow_anonymous` is false.
    Anonymous => "anonymous",
    /// Bad user name or password.
    Auth => "auth",
    /// A new client id beyond `broker.max_client_ids`.
    ClientIdLimit => "client_id_limit",
    /// A publish (or will) `broker.acl` does not allow.
    AclPublish => "acl_publish",
    /// A subscription `broker.acl` does not allow.
    AclSubscribe => "acl_subscribe",
    /// The previous session with the client id did not end in time.
    TakeoverTimeout => "takeover_timeout",
    /// A stored MQTT 5 session could not be ended for clean start.
    SessionReset => "session_reset",
    /// rumqttd's internal listener is not reachable.
    BrokerUnavailable => "broker_unavailable",
    /// rumqttd did not accept the connection.
    BrokerRefused => "broker_refused",
    /// `broker.max_connections` reached.
    ConnectionLimit => "connection_limit",
    /// `broker.max_connections_per_address` reached.
    AddressLimit => "address_limit",
    /// The TLS handshake failed.
    TlsHandshake => "tls_handshake",
    /// No TLS handshake within `broker.connection_timeout`.
    TlsHandshakeTimeout => "tls_handshake_timeout",
    /// Nothing from the client within 1.5 times its keep alive.
    KeepAliveTimeout => "keep_alive_timeout",
    /// An MQTT 5 topic alias out of range.
    TopicAlias => "topic_alias",
    /// A SUBSCRIBE with an invalid filter.
    FilterInvalid => "filter_invalid",
    /// More filters than `broker.max_subscriptions_per_client`.
    SubscriptionLimit => "subscription_limit",
    /// A new filter beyond `broker.max_filters`.
    FilterLimit => "filter_limit",
    /// A retained message beyond the retained limits (passed on without retain).
    RetainedLimit => "retained_limit",
    /// A publish not passed to local subscribers: rumqttd's filter logs would pass
    /// `broker.max_fanout_bytes` (the reading still goes upstream).
    FanoutLimit => "fanout_limit",
    /// A client that does not take what is sent to it, past its share of
    /// `broker.max_buffered_bytes`: disconnected.
    SlowSubscriber => "slow_subscriber",
}

impl Refusal {
    /// The CONNACK code refusing a connection for this reason: an MQTT 5 reason code, or an
    /// MQTT 3.1.1 return code (which has fewer: a will topic refused is "not authorized").
    pub fn connack_code(self, v5: bool) -> u8 {
        use Refusal::*;
        enum Class {
            ClientId,
            BadLogin,
            NotAuthorized,
            Unavailable,
            TopicName,
            Version,
            Protocol,
        }
        let class = match self {
            ClientId | ReservedClientId => Class::ClientId,
            Auth => Class::BadLogin,
            Anonymous | AclPublish | AclSubscribe => Class::NotAuthorized,
            TopicInvalid | TopicWildcard | TopicTooLong | TopicLimit | ReservedTopic => {
                Class::TopicName
            }
            ProtocolVersion => Class::Version,
            Protocol | Malformed | NotConnect | Oversize | TopicAlias => Class::Protocol,
            ConnectTimeout | ClientIdLimit | TakeoverTimeout | SessionReset | BrokerUnavailable
            | BrokerRefused | ConnectionLimit | AddressLimit | TlsHandshake
            | TlsHandshakeTimeout | KeepAliveTimeout | FilterInvalid | SubscriptionLimit
            | FilterLimit | RetainedLimit | FanoutLimit | SlowSubscriber => Class::Unavailable,
        };
        match (class, v5) {
            (Class::ClientId, true) => 0x85,
            (Class::BadLogin, true) => 0x86,
            (Class::NotAuthorized, true) => 0x87,
            (Class::Unavailable, true) => 0x89,
            (Class::TopicName, true) => 0x90,
            (Class::Version, true) => 0x84,
            (Class::Protocol, true) => 0x82,
            (Class::ClientId, false) => 0x02,
            (Class::Unavailable, false) => 0x03,
            (Class::BadLogin, false) => 0x04,
            (Class::NotAuthorized | Class::TopicName, false) => 0x05,
            (Class::Version, false) => 0x01,
            // 3.1.1 has no such CONNACK; the guard never sends it one.
            (Class::Protocol, false) => 0x03,
        }
    }

    /// The MQTT 5 DISCONNECT reason code when a session is ended for this reason.
    pub fn disconnect_code(self) -> u8 {
        use Refusal::*;
        match self {
            TopicWildcard | TopicInvalid | ReservedTopic | TopicTooLong => 0x90,
            AclPublish => 0x87,
            TopicLimit | SlowSubscriber => 0x97,
            Oversize => 0x95,
            Malformed => 0x81,
            TopicAlias => 0x94,
            KeepAliveTimeout => 0x8d,
            _ => 0x82,
        }
    }

    /// The SUBACK code for each filter of a SUBSCRIBE refused for this reason: MQTT 5's
    /// specific code, or 3.1.1's only failure code 0x80.
    pub fn suback_code(self, v5: bool) -> u8 {
        use Refusal::*;
        if !v5 {
            return 0x80;
        }
        match self {
            FilterInvalid => 0x8f,
            AclSubscribe => 0x87,
            SubscriptionLimit | FilterLimit | TopicLimit => 0x97,
            _ => 0x80,
        }
    }

    /// The CONNACK refusing a connection for this reason.
    pub fn connack(self, v5: bool) -> Vec<u8> {
        crate::broker::frame::connack_refusal(v5, self.connack_code(v5))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A refusal with what the log says about it (the guard's checks return this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}: {1}")]
pub struct Refused(pub Refusal, pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }

    #[test]
    fn codes_as_the_guard_sent_them() {
        use Refusal::*;
        // CONNACK: (refusal, MQTT 5, MQTT 3.1.1), as sent before the enum existed.
        for (r, v5, v4) in [
            (ClientId, 0x85, 0x02),
            (ReservedClientId, 0x85, 0x02),
            (Auth, 0x86, 0x04),
            (Anonymous, 0x87, 0x05),
            (AclPublish, 0x87, 0x05),
            (TopicWildcard, 0x90, 0x05),
            (TopicLimit, 0x90, 0x05),
            (ReservedTopic, 0x90, 0x05),
            (ProtocolVersion, 0x84, 0x01),
            (Protocol, 0x82, 0x03),
            (ClientIdLimit, 0x89, 0x03),
            (BrokerRefused, 0x89, 0x03),
            (ConnectionLimit, 0x89, 0x03),
        ] {
            assert_eq!(
                (r.connack_code(true), r.connack_code(false)),
                (v5, v4),
                "{r}"
            );
        }
        assert_eq!(TopicLimit.disconnect_code(), 0x97);
        assert_eq!(KeepAliveTimeout.disconnect_code(), 0x8d);
        assert_eq!(AddressLimit.disconnect_code(), 0x82);
        assert_eq!(FilterInvalid.suback_code(true), 0x8f);
        assert_eq!(FilterLimit.suback_code(false), 0x80);
        assert_eq!(ClientId.connack(false), vec![0x20, 0x02, 0x00, 0x02]);
        assert_eq!(Auth.connack(true), vec![0x20, 0x03, 0x00, 0x86, 0x00]);
    }
}
