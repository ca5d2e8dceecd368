//! Unit tests of the store (shared helpers such as [`ev`] are used by other modules' tests).

use super::write::runs;
use super::*;
use crate::config::SyncMode;
use crate::core::event::Event;
use crate::core::event::{Data, TYPE_READING};
use bytes::Bytes;
use rusqlite::OptionalExtension;
use std::path::Path;

#[test]
fn acknowledgements_group_into_runs() {
    assert_eq!(runs(&[5, 3, 4, 9, 1, 4]), vec![(1, 1), (3, 5), (9, 9)]);
    assert!(runs(&[]).is_empty());
}

pub(crate) fn ev(class: Class, subject: &str) -> Event {
    Event {
        id: crate::core::event::new_id(),
        class,
        kind: TYPE_READING,
        subject: subject.into(),
        upstream_topic: format!("edge/gw/{subject}"),
        time: SystemTime::now(),
        data: Data::Json(Bytes::from_static(b"1")),
        traceparent: None,
    }
}

fn open(dir: &Path, limits: Limits) -> Store {
    Store::open(&dir.join("q.db"), SyncMode::Normal, limits)
        .unwrap()
        .0
}

fn subjects(s: &Store) -> Vec<String> {
    s.lease(Cursor::default(), 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.subject)
        .collect()
}

#[test]
fn sequence_survives_reopen_even_when_empty() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path(), Limits::default());
        let mut t = s.begin().unwrap();
        for _ in 0..3 {
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        }
        assert_eq!(t.commit().unwrap().last_seq, 3);
        let mut t = s.begin().unwrap();
        t.ack(&[3], 0).unwrap();
        t.commit().unwrap();
        let mut t = s.begin().unwrap();
        t.ack(&[1, 2], 0).unwrap();
        t.commit().unwrap();
        assert_eq!(s.depth(), 0);
    }
    let mut s = open(dir.path(), Limits::default());
    assert_eq!(s.next_seq(), 4);
    let mut t = s.begin().unwrap();
    assert!(matches!(
        t.append(&ev(Class::Telemetry, "a"), "src").unwrap(),
        Appended::Queued { seq: 4, .. }
    ));
    t.commit().unwrap();
}

fn meta_next_seq(s: &Store) -> Option<i64> {
    s.conn
        .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
            r.get(0)
        })
        .optional()
        .unwrap()
}

/// The writer acknowledges before it appends (one group): removing the newest row there
/// needs no high-water mark, the appended rows carry the sequence on. Removing the newest
/// row after the last append still records it.
#[test]
fn high_water_mark_written_only_when_no_append_follows_the_newest_removal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path(), Limits::default());
        let mut t = s.begin().unwrap();
        for _ in 0..3 {
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        }
        t.commit().unwrap();
        // Acks of the whole queue, the newest included, then an append: no `meta` write.
        let mut t = s.begin().unwrap();
        t.ack(&[1, 2, 3], 0).unwrap();
        t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        assert_eq!(t.commit().unwrap().last_seq, 4);
        assert_eq!(meta_next_seq(&s), None);
        // An append, then its own removal in the same transaction: recorded.
        let mut t = s.begin().unwrap();
        t.ack(&[4], 0).unwrap();
        t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        t.ack(&[5], 0).unwrap();
        t.commit().unwrap();
        assert_eq!(s.depth(), 0);
        assert_eq!(meta_next_seq(&s), Some(6));
    }
    let mut s = open(dir.path(), Limits::default());
    assert_eq!(s.next_seq(), 6, "sequences are never reused");
    let mut t = s.begin().unwrap();
    assert!(matches!(
        t.append(&ev(Class::Telemetry, "a"), "src").unwrap(),
        Appended::Queued { seq: 6, .. }
    ));
    t.commit().unwrap();
}

/// An append that evicts the newest row to make room and is then rejected anyway (larger
/// than the whole budget): the newest sequence left with the evicted row, so the
/// high-water mark is recorded and the sequence is not handed out again.
#[test]
fn high_water_mark_written_when_an_eviction_takes_the_newest_and_the_append_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = ev(Class::Telemetry, "big");
    big.data = Data::Json(Bytes::from(format!("\"{}\"", "x".repeat(4000))));
    let limits = Limits {
        max_bytes: 2000,
        when_full: QueueFull::DropOldest,
        ..Limits::default()
    };
    {
        let mut s = open(dir.path(), limits);
        let mut t = s.begin().unwrap();
        t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        t.commit().unwrap();
        let mut t = s.begin().unwrap();
        assert_eq!(t.append(&big, "src").unwrap(), Appended::Rejected);
        let c = t.commit().unwrap();
        assert_eq!((c.removed.evicted, c.removed.rejected), (1, 1));
        assert_eq!(s.depth(), 0);
    }
    let s = open(dir.path(), limits);
    assert_eq!(s.next_seq(), 2, "sequence 1 is not handed out again");
}

#[test]
fn uncommitted_work_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(&dir.path().join("q.db"), SyncMode::Full, Limits::default())
        .unwrap()
        .0;
    {
        let mut t = s.begin().unwrap();
        t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
    }
    assert_eq!(s.depth(), 0);
    assert_eq!(s.next_seq(), 1);
    assert!(s.lease(Cursor::default(), 10).unwrap().is_empty());
}

#[test]
fn lease_gives_alerts_first_then_telemetry_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), Limits::default());
    let mut t = s.begin().unwrap();
    for (c, n) in [
        (Class::Telemetry, "t1"),
        (Class::Alert, "a1"),
        (Class::Telemetry, "t2"),
        (Class::Alert, "a2"),
    ] {
        t.append(&ev(c, n), "src").unwrap();
    }
    t.commit().unwrap();
    assert_eq!(subjects(&s), ["a1", "a2", "t1", "t2"]);
    let mut c = Cursor::default();
    for e in s.lease(c, 3).unwrap() {
        c.advance(&e);
    }
    let rest: Vec<String> = s
        .lease(c, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.subject)
        .collect();
    assert_eq!(rest, ["t2"]);
    let st = s.stats().unwrap();
    assert_eq!((st.depth, st.alerts), (4, 2));
    assert!(st.bytes > 0);
}

#[test]
fn a_bounded_lease_stops_past_what_was_wanted_at_its_byte_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), Limits::default());
    let mut t = s.begin().unwrap();
    for n in ["a1", "t1", "t2", "t3", "t4"] {
        let class = if n.starts_with('a') {
            Class::Alert
        } else {
            Class::Telemetry
        };
        t.append(&ev(class, n), "src").unwrap();
    }
    t.commit().unwrap();
    let names = |rows: Vec<StoredEvent>| rows.into_iter().map(|e| e.subject).collect::<Vec<_>>();
    let one = s.lease(Cursor::default(), 1).unwrap()[0].body.len();
    // What was wanted comes whatever its size; beyond it, only within the bound.
    let (rows, cut) = s.lease_bounded(Cursor::default(), 2, 10, 1).unwrap();
    assert_eq!((names(rows), cut), (vec!["a1".into(), "t1".into()], true));
    let (rows, cut) = s.lease_bounded(Cursor::default(), 1, 10, 3 * one).unwrap();
    assert_eq!(
        (names(rows), cut),
        (vec!["a1".into(), "t1".into(), "t2".into()], true)
    );
    // The bound met exactly at the end of the queue: nothing was left, not cut.
    let (rows, cut) = s.lease_bounded(Cursor::default(), 1, 10, 5 * one).unwrap();
    assert_eq!((rows.len(), cut), (5, false));
    // An alert at the bound keeps the telemetry out (it comes with the next read).
    let (rows, cut) = s.lease_bounded(Cursor::default(), 1, 10, 1).unwrap();
    assert_eq!((names(rows), cut), (vec!["a1".to_string()], true));
}

#[test]
fn drop_oldest_evicts_telemetry_before_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(
        dir.path(),
        Limits {
            max_events: 4,
            ..Limits::default()
        },
    );
    let mut t = s.begin().unwrap();
    for (c, n) in [
        (Class::Alert, "a1"),
        (Class::Telemetry, "t1"),
        (Class::Telemetry, "t2"),
        (Class::Alert, "a2"),
    ] {
        t.append(&ev(c, n), "src").unwrap();
    }
    t.append(&ev(Class::Telemetry, "t3"), "src").unwrap();
    t.append(&ev(Class::Alert, "a3"), "src").unwrap();
    let c = t.commit().unwrap();
    assert_eq!(c.removed.evicted, 2);
    assert_eq!(subjects(&s), ["a1", "a2", "a3", "t3"]);
    // Alerts go only once no telemetry is left; a telemetry newcomer never evicts an alert.
    let mut t = s.begin().unwrap();
    t.append(&ev(Class::Alert, "a4"), "src").unwrap();
    t.append(&ev(Class::Alert, "a5"), "src").unwrap();
    let c = t.commit().unwrap();
    assert_eq!(c.removed.evicted, 2);
    assert_eq!(subjects(&s), ["a2", "a3", "a4", "a5"]);
    let mut t = s.begin().unwrap();
    assert_eq!(
        t.append(&ev(Class::Telemetry, "t4"), "src").unwrap(),
        Appended::Rejected
    );
    assert_eq!(t.commit().unwrap().removed.rejected, 1);
    assert_eq!(s.depth(), 4);
}

#[test]
fn drop_newest_rejects_telemetry_but_alerts_push_telemetry_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(
        dir.path(),
        Limits {
            max_events: 3,
            when_full: QueueFull::DropNewest,
            ..Limits::default()
        },
    );
    let mut t = s.begin().unwrap();
    for n in ["t1", "t2", "t3"] {
        t.append(&ev(Class::Telemetry, n), "src").unwrap();
    }
    assert_eq!(
        t.append(&ev(Class::Telemetry, "t4"), "src").unwrap(),
        Appended::Rejected
    );
    assert!(matches!(
        t.append(&ev(Class::Alert, "a1"), "src").unwrap(),
        Appended::Queued { .. }
    ));
    let c = t.commit().unwrap();
    assert_eq!((c.removed.rejected, c.removed.evicted), (1, 1));
    assert_eq!(subjects(&s), ["a1", "t2", "t3"]);
}

#[test]
fn max_bytes_bounds_the_accounted_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(
        dir.path(),
        Limits {
            max_bytes: 20_000,
            ..Limits::default()
        },
    );
    for _ in 0..10 {
        let mut t = s.begin().unwrap();
        for i in 0..50 {
            t.append(&ev(Class::Telemetry, &format!("sensors/{i}")), "src")
                .unwrap();
        }
        t.commit().unwrap();
        assert!(s.bytes() <= 20_000, "{}", s.bytes());
    }
    let before = s.bytes();
    s.load_counters().unwrap();
    assert_eq!(s.bytes(), before, "incremental accounting matches the file");
}

#[test]
fn expiry_and_keep_acked_replay() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_age: Some(Duration::from_secs(60)),
        keep_acked: Duration::from_secs(3600),
        ..Limits::default()
    };
    let mut s = open(dir.path(), limits);
    let mut old = ev(Class::Telemetry, "old");
    old.time = SystemTime::now() - Duration::from_secs(120);
    let mut t = s.begin().unwrap();
    t.append(&old, "src").unwrap();
    t.append(&ev(Class::Telemetry, "new"), "src").unwrap();
    t.expire(now_us()).unwrap();
    let c = t.commit().unwrap();
    assert_eq!(c.removed.expired, 1);
    assert_eq!(subjects(&s), ["new"]);

    let leased = s.lease(Cursor::default(), 10).unwrap();
    let mut t = s.begin().unwrap();
    t.ack(&[leased[0].pos], now_us()).unwrap();
    t.commit().unwrap();
    assert_eq!(s.depth(), 0);
    assert_eq!(s.stats().unwrap().kept, 1);
    let kept = s.kept_since(0, Some("new")).unwrap();
    assert_eq!(kept.len(), 1);
    let mut t = s.begin().unwrap();
    t.requeue(&kept).unwrap();
    t.commit().unwrap();
    let again = s
        .lease(
            Cursor {
                alert: 0,
                telemetry: leased[0].pos,
            },
            10,
        )
        .unwrap();
    assert_eq!(
        again.len(),
        1,
        "replayed events are leased after the cursor"
    );
    assert_eq!(
        again[0].body, leased[0].body,
        "same envelope: same id and sequence"
    );
    assert!(again[0].pos > leased[0].pos);
}

#[test]
fn corrupt_file_is_quarantined_and_numbering_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let mut s = open(dir.path(), Limits::default());
        let mut t = s.begin().unwrap();
        for _ in 0..500 {
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        }
        t.commit().unwrap();
        s.checkpoint().unwrap();
    }
    // Scribble over the middle of the file (the b-tree pages), keeping the header.
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 8192] {
        *b = 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let (mut s, report) = Store::open(&path, SyncMode::Normal, Limits::default()).unwrap();
    let aside = report.quarantined.expect("quarantined");
    assert!(aside.exists(), "the damaged file is kept");
    assert_eq!(s.depth(), 0);
    let mut t = s.begin().unwrap();
    let Appended::Queued { seq, .. } = t.append(&ev(Class::Telemetry, "a"), "src").unwrap() else {
        panic!()
    };
    t.commit().unwrap();
    assert!(
        seq == 1 || seq == 501,
        "numbering restarts only if nothing could be salvaged: {seq}"
    );
}

#[test]
fn the_cli_reads_a_queue_written_before_parking_existed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let mut s = open(dir.path(), Limits::default());
        let mut t = s.begin().unwrap();
        t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        t.commit().unwrap();
        s.conn.execute_batch("DROP TABLE parked").unwrap();
    }
    let s = Store::open_cli(&path, false).unwrap();
    assert_eq!(s.stats().unwrap().parked, 0);
    assert!(s.parked_page(0, 10).unwrap().is_empty());
    assert_eq!(s.peek(10, None).unwrap().len(), 1);
    drop(s);
    // The CLI's writes (retry, purge --parked) on such a file: the table is added first.
    let mut s = Store::open_cli(&path, true).unwrap();
    assert_eq!(s.purge_parked(None).unwrap(), 0);
    let mut t = s.begin().unwrap();
    assert_eq!(t.unpark(None).unwrap(), 0);
    t.commit().unwrap();
    assert_eq!(s.peek(10, None).unwrap().len(), 1);
}

/// A queue file from before rows held the envelope's parts: its envelopes are read as they
/// are, beside new rows, whose envelope comes back byte for byte; a row is less than half its
/// envelope on disk.
#[test]
fn rows_stored_as_envelopes_before_and_as_parts_now_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Limits::default());
    let old = ev(Class::Telemetry, "sensors/old");
    let old_envelope = old.envelope("src", 1);
    s.conn
        .execute(
            "INSERT INTO events (pos, seq, class, time_us, subject, topic, body) VALUES (1, 1, 1, ?1, ?2, ?3, ?4)",
            params![micros(old.time), old.subject, old.upstream_topic, old_envelope],
        )
        .unwrap();
    drop(s);
    let mut s = open(dir.path(), Limits::default());
    let mut new = ev(Class::Telemetry, "sensors/new");
    new.data = Data::Json(Bytes::from_static(
        b"{\"sensor\":\"s1\",\"seq\":1234,\"value\":21.53,\"sent_us\":1733100000000000}",
    ));
    new.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let mut t = s.begin().unwrap();
    let Appended::Queued { seq, .. } = t.append(&new, "src").unwrap() else {
        panic!("not queued");
    };
    t.commit().unwrap();
    assert_eq!(seq, 2, "numbering goes on after the old row");
    let leased = s.lease(Cursor::default(), 10).unwrap();
    assert_eq!(leased.len(), 2);
    assert_eq!(leased[0].body, old_envelope);
    assert_eq!(
        String::from_utf8_lossy(&leased[1].body),
        String::from_utf8_lossy(&new.envelope("src", 2))
    );
    let stored: i64 = s
        .conn
        .query_row("SELECT LENGTH(body) FROM events WHERE pos = 2", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(
        (stored as usize) * 2 < leased[1].body.len(),
        "{stored} bytes stored for a {}-byte envelope",
        leased[1].body.len()
    );
    // The CLI reads both the same way.
    drop(s);
    let s = Store::open_cli(&dir.path().join("q.db"), false).unwrap();
    let peeked = s.peek(10, None).unwrap();
    assert_eq!(peeked[0].body, old_envelope);
    assert_eq!(peeked[1].body, leased[1].body);
}

#[test]
fn parked_events_are_bounded_by_bytes_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), Limits::default());
    let big = Bytes::from(vec![b'7'; 1 << 20]);
    let n = PARKED_MAX_BYTES / (1 << 20) + 8;
    let mut t = s.begin().unwrap();
    for i in 0..n {
        let mut e = ev(Class::Telemetry, &format!("s{i}"));
        e.data = Data::Json(big.clone());
        t.append(&e, "src").unwrap();
    }
    t.commit().unwrap();
    let mut t = s.begin().unwrap();
    let all: Vec<u64> = (1..=n).collect();
    assert_eq!(t.park(&all, "too big", 0).unwrap(), n);
    let removed = t.commit().unwrap().removed;
    let parked = s.parked_page(0, 1000).unwrap();
    let bytes: usize = parked.iter().map(|(e, _)| e.body.len()).sum();
    assert!(bytes as u64 <= PARKED_MAX_BYTES, "{bytes} bytes parked");
    assert_eq!(removed.evicted + parked.len() as u64, n, "the rest counted");
    // The newest are kept.
    assert_eq!(parked.last().unwrap().0.subject, format!("s{}", n - 1));
}

#[test]
fn parked_events_leave_the_queue_and_come_back_on_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), Limits::default());
    let mut t = s.begin().unwrap();
    for n in ["a", "b", "c"] {
        t.append(&ev(Class::Telemetry, n), "src").unwrap();
    }
    t.commit().unwrap();
    let mut t = s.begin().unwrap();
    assert_eq!(t.park(&[2, 9], "bad", 0).unwrap(), 1);
    t.commit().unwrap();
    assert_eq!(subjects(&s), ["a", "c"]);
    let st = s.stats().unwrap();
    assert_eq!((st.depth, st.parked), (2, 1));
    let parked = s.parked_page(0, 10).unwrap();
    assert_eq!(
        (parked[0].0.subject.as_str(), parked[0].1.as_str()),
        ("b", "bad")
    );
    // Bounded: beyond PARKED_MAX the oldest parked go, counted.
    let mut t = s.begin().unwrap();
    for _ in 0..PARKED_MAX {
        t.append(&ev(Class::Telemetry, "x"), "src").unwrap();
    }
    t.commit().unwrap();
    let mut t = s.begin().unwrap();
    let first_x = 4;
    let positions: Vec<u64> = (first_x..first_x + PARKED_MAX).collect();
    assert_eq!(t.park(&positions, "flood", 0).unwrap(), PARKED_MAX);
    assert_eq!(t.commit().unwrap().removed.evicted, 1);
    assert_eq!(s.stats().unwrap().parked, PARKED_MAX);
    assert_eq!(
        s.parked_page(0, 1).unwrap()[0].0.subject,
        "x",
        "b went first"
    );
    let mut t = s.begin().unwrap();
    t.unpark(Some("x")).unwrap();
    t.commit().unwrap();
    let mut t = s.begin().unwrap();
    t.ack(
        &(first_x + PARKED_MAX..first_x + 3 * PARKED_MAX).collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    t.commit().unwrap();
    assert_eq!(subjects(&s), ["a", "c"]);
    let mut t = s.begin().unwrap();
    t.park(&[1], "bad", 0).unwrap();
    t.commit().unwrap();
    let parked = s.parked_page(0, 10).unwrap();
    let (n, _) = s.apply(&Request::Retry { filter: None }).unwrap();
    assert_eq!(n, 1);
    assert_eq!(subjects(&s), ["c", "a"]);
    let again = s.lease(Cursor::default(), 10).unwrap();
    assert_eq!(again[1].body, parked[0].0.body, "same envelope");
    assert!(again[1].pos > first_x + PARKED_MAX, "a new position");
    assert_eq!(s.stats().unwrap().parked, 0);
}

#[test]
fn garbage_file_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    std::fs::write(
        &path,
        b"this is not a database at all, just some text that is long enough ........",
    )
    .unwrap();
    let (s, report) = Store::open(&path, SyncMode::Normal, Limits::default()).unwrap();
    assert!(report.quarantined.is_some());
    assert_eq!(s.depth(), 0);
}
