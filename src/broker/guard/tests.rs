//! Unit tests of the guard.

use super::connect::WillCharge;
use super::limits::valid_filter;
use super::*;

fn anonymous_guard() -> Arc<Guard> {
    Guard::new(
        Policy {
            allow_anonymous: true,
            passwords: None,
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            max_packet: 1 << 16,
            buffered: crate::core::budget::Budget::new(1 << 20),
            fanout: (1 << 16, 4, 1 << 24),
            max_client_id_length: 64,
            max_topic_length: 256,
            max_topic_aliases: 64,
            max_topics: 100,
            max_client_ids: 100,
            max_publish_rate: 0,
            acl: None,
            retained: RetainedLimits {
                messages: 10,
                bytes: 1 << 16,
                per_client: 10,
                bytes_per_client: 1 << 16,
            },
            max_connections_per_address: 10,
            max_subscriptions_per_client: 10,
            max_filters: 100,
            reserve_own_prefix: true,
        },
        Metrics::new(),
        Arc::new(Router::spawn(
            rumqttd::RouterConfig {
                max_connections: 100,
                max_outgoing_packet_count: 200,
                max_segment_size: 1 << 16,
                max_segment_count: 4,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            1 << 16,
            Metrics::new(),
        )),
    )
}

#[test]
fn topic_names_and_filters() {
    assert!(check_topic_name(b"sensors/a/t").is_ok());
    for (bad, reason) in [
        (&b"sensors/+"[..], "topic_wildcard"),
        (b"#", "topic_wildcard"),
        (b"a/b#", "topic_wildcard"),
        (b"", "topic_invalid"),
        (b"a\0b", "topic_invalid"),
        (b"a/\xc3", "topic_invalid"),
    ] {
        assert_eq!(
            check_topic_name(bad).unwrap_err().0.label(),
            reason,
            "{bad:?}"
        );
    }
    assert!(reserved_topic(b"edgegate/x") && reserved_topic(b"$SYS/x"));
    assert!(
        !reserved_topic(b"$app/x"),
        "other $ topics are open to clients"
    );
    assert!(!reserved_topic(b"edgegatex/y"));
    for good in [&b"a/+/b"[..], b"#", b"+", b"a/#", b"$share/g/a/+"] {
        assert!(valid_filter(good), "{good:?}");
    }
    for bad in [&b"a/#/b"[..], b"a+/b", b"a/b#", b"", b"a\0", b"\xff"] {
        assert!(!valid_filter(bad), "{bad:?}");
    }
}

#[test]
fn client_ids() {
    assert!(check_client_id("boiler-1", 128).is_ok());
    assert!(check_client_id("", 128).is_ok());
    for bad in ["a/b", "a+b", "a#", "$sys", "x\u{0}y"] {
        assert_eq!(
            check_client_id(bad, 128).unwrap_err().0.label(),
            "client_id",
            "{bad}"
        );
    }
    assert_eq!(
        check_client_id("edgegate-rules-0", 128)
            .unwrap_err()
            .0
            .label(),
        "reserved_client_id"
    );
    assert!(
        check_client_id("edgegate-plant-7", 128).is_ok(),
        "a downstream edgegate's upstream id"
    );
    assert!(check_client_id(&"x".repeat(129), 128).is_err());
}

#[test]
fn a_refused_sessions_retained_will_gives_its_charge_back() {
    let g = anonymous_guard();
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert!(g.keep_retained(7, 1, 100, peer, b"w/t"));
    assert_eq!(g.retained_held(), (1, 100));
    // Refused before rumqttd had the session: the charge goes back.
    drop(WillCharge {
        guard: g.clone(),
        charge: Some((7, 1, 100)),
    });
    assert_eq!(g.retained_held(), (0, 0));
    // Accepted (disarmed): the charge stays until the will fires or a clean DISCONNECT.
    assert!(g.keep_retained(7, 1, 100, peer, b"w/t"));
    drop(WillCharge {
        guard: g.clone(),
        charge: None,
    });
    assert_eq!(g.retained_held(), (1, 100));
}

#[test]
fn a_refused_subscribe_uses_none_of_the_filter_budget() {
    let g = anonymous_guard();
    let set = Mutex::new(HashSet::new());
    let keys = |v: &[&'static str]| v.iter().map(|k| k.as_bytes()).collect::<Vec<_>>();
    assert_eq!(g.note_all(&set, keys(&["x"]).into_iter(), 3), None);
    // Three new filters where two are left: refused whole, nothing noted.
    assert_eq!(
        g.note_all(&set, keys(&["a", "b", "c"]).into_iter(), 3),
        Some(&b"c"[..])
    );
    assert_eq!(set.lock().unwrap().len(), 1);
    // Known filters and repeats cost nothing; the two left are still there.
    assert_eq!(
        g.note_all(&set, keys(&["x", "y", "y", "z"]).into_iter(), 3),
        None
    );
    assert_eq!(set.lock().unwrap().len(), 3);
    assert_eq!(
        g.note_all(&set, keys(&["w"]).into_iter(), 3),
        Some(&b"w"[..])
    );
}
