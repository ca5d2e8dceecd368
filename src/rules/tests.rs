use super::*;
use crate::core::decode::Payload;
use bytes::Bytes;

fn reading(topic: &str) -> Reading {
    at(topic, b"1", 0.0)
}

fn at(topic: &str, payload: &[u8], t: f64) -> Reading {
    Reading {
        topic: topic.into(),
        received: UNIX_EPOCH + Duration::from_secs_f64(1_700_000_000.0 + t),
        payload: Payload::decode(Bytes::copy_from_slice(payload)),
        traceparent: None,
    }
}

fn rules(toml: &str) -> Vec<RuleConfig> {
    match crate::config::rules::from_toml(toml) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

fn forwards(out: &[Action]) -> Vec<&Event> {
    out.iter()
        .filter_map(|a| match a {
            Action::Forward(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn alerts(out: &[Action]) -> Vec<serde_json::Value> {
    forwards(out)
        .into_iter()
        .filter(|e| e.kind == TYPE_ALERT)
        .map(|e| match &e.data {
            Data::Json(b) => serde_json::from_slice(b).unwrap(),
            _ => panic!("alert data is JSON"),
        })
        .collect()
}

#[test]
fn routing_table() {
    use crate::config::RuleAction;
    let mut e = Engine::new(
        &[
            RuleConfig::simple("no-debug", "sensors/+/debug", RuleAction::Drop),
            RuleConfig::simple("sensors", "sensors/#", RuleAction::Forward),
            RuleConfig::simple("all", "#", RuleAction::Forward),
        ],
        "edge/gw1",
    );
    let mut out = Vec::new();
    assert_eq!(
        e.process(&reading("sensors/a/debug"), &mut out),
        Disposition::DroppedByRule(0)
    );
    assert!(out.is_empty());
    assert_eq!(
        e.process(&reading("sensors/a/temp"), &mut out),
        Disposition::Forwarded
    );
    assert_eq!(out.len(), 1, "two matching forward rules forward once");
    let Action::Forward(ev) = &out[0] else {
        panic!()
    };
    assert_eq!(ev.upstream_topic, "edge/gw1/sensors/a/temp");
    assert_eq!(ev.subject, "sensors/a/temp");
    assert_eq!(ev.class, Class::Telemetry);

    let mut e = Engine::new(
        &[RuleConfig::simple("s", "sensors/#", RuleAction::Forward)],
        "",
    );
    out.clear();
    assert_eq!(
        e.process(&reading("other/x"), &mut out),
        Disposition::Unrouted
    );
    assert_eq!(
        e.process(&reading("sensors/x"), &mut out),
        Disposition::Forwarded
    );
    let Action::Forward(ev) = &out[0] else {
        panic!()
    };
    assert_eq!(ev.upstream_topic, "sensors/x");
}

#[test]
fn old_and_new_syntax() {
    let r = rules(
        r#"
        [[rules]]
        name = "legacy"
        match = "a/#"
        action = "drop"
        [[rules]]
        name = "new"
        match = "sensors/{device}/{metric}"
        when = "value > 10 && device != \"lab\""
        actions = [
          { type = "forward", topic = "site/{device}/{metric}", class = "alert" },
          { type = "publish", topic = "edgegate/derived/{device}" },
        ]
        "#,
    );
    let mut e = Engine::new(&r, "edge");
    let mut out = Vec::new();
    assert_eq!(
        e.process(&at("a/b", b"1", 0.0), &mut out),
        Disposition::DroppedByRule(0)
    );
    assert_eq!(
        e.process(&at("sensors/d1/t", b"5", 0.0), &mut out),
        Disposition::Unrouted
    );
    assert_eq!(
        e.process(&at("sensors/lab/t", b"50", 0.0), &mut out),
        Disposition::Unrouted
    );
    assert_eq!(
        e.process(&at("sensors/d1/t", b"50", 0.0), &mut out),
        Disposition::Forwarded
    );
    assert_eq!(out.len(), 2);
    let f = forwards(&out);
    assert_eq!(f[0].upstream_topic, "edge/site/d1/t");
    assert_eq!(f[0].class, Class::Alert);
    match &out[1] {
        Action::Publish { topic, payload } => {
            assert_eq!(topic, "edgegate/derived/d1");
            assert_eq!(&payload[..], b"50");
        }
        other => panic!("{other:?}"),
    }
    // Missing field / wrong type in `when`: a counted skip, never a panic.
    out.clear();
    assert_eq!(
        e.process(&at("sensors/d1/t", br#"{"x":1}"#, 0.0), &mut out),
        Disposition::EvalError(1)
    );
    assert_eq!(
        e.process(&at("sensors/d1/t", br#"{"value":"hot"}"#, 0.0), &mut out),
        Disposition::EvalError(1)
    );
    assert_eq!(e.stats()[1].1.eval_errors, 2);
    assert!(out.is_empty());
}

#[test]
fn config_errors_are_all_listed() {
    let err = crate::config::rules::from_toml(
        r#"
        [[rules]]
        name = "a"
        match = "x/{a}/#/b"
        when = "value >"
        actions = [
          { type = "teleport" },
          { type = "detect", detector = "threshold" },
          { type = "forward", topic = "up/{nope}" },
          { type = "sample" },
          { type = "detect", detector = "outlier", threshold = 0.5, colour = "red" },
        ]
        [[rules]]
        name = "b"
        match = "y/#"
        action = "forward"
        actions = [{ type = "drop" }]
        "#,
    )
    .unwrap_err();
    let keys: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
    for k in [
        "rules[0].match",
        "rules[0].when",
        "rules[0].actions[0].type",
        "rules[0].actions[1].above",
        "rules[0].actions[2].topic",
        "rules[0].actions[3].every",
        "rules[0].actions[4].threshold",
        "rules[0].actions[4].colour",
        "rules[1].action",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
}

#[test]
fn sample_and_deadband() {
    let r = rules(
        r#"
        [[rules]]
        name = "s"
        match = "s/#"
        actions = [{ type = "sample", every = 3 }, { type = "forward" }]
        [[rules]]
        name = "i"
        match = "i/#"
        actions = [{ type = "sample", interval = "10s" }, { type = "forward" }]
        [[rules]]
        name = "d"
        match = "d/#"
        actions = [{ type = "deadband", abs = 1.0, max_silence = "1m" }, { type = "forward" }]
        "#,
    );
    let mut e = Engine::new(&r, "");
    let mut out = Vec::new();
    let got: Vec<_> = (0..7)
        .map(|i| e.process(&at("s/a", b"1", i as f64), &mut out))
        .collect();
    assert_eq!(
        got.iter().filter(|d| **d == Disposition::Forwarded).count(),
        3
    );
    assert_eq!(got[1], Disposition::Filtered(0));
    out.clear();
    for t in [0.0, 5.0, 9.9, 10.0, 15.0, 21.0] {
        e.process(&at("i/a", b"1", t), &mut out);
    }
    assert_eq!(out.len(), 3, "0, 10, 21");
    out.clear();
    let d: Vec<_> = [
        (0.0, "20"),
        (1.0, "20.5"),
        (2.0, "21.2"),
        (3.0, "20.5"),
        (70.0, "20.5"),
        (71.0, "x"),
    ]
    .iter()
    .map(|(t, v)| e.process(&at("d/a", v.as_bytes(), *t), &mut out))
    .collect();
    assert_eq!(
        d,
        vec![
            Disposition::Forwarded,
            Disposition::Filtered(2),
            Disposition::Forwarded,
            Disposition::Filtered(2),
            Disposition::Forwarded,
            Disposition::Filtered(2),
        ]
    );
}

#[test]
fn threshold_with_hysteresis_and_duration() {
    let r = rules(
        r#"
        [[rules]]
        name = "hot"
        match = "t/#"
        actions = [{ type = "detect", detector = "threshold", above = 80, hysteresis = 5, for = "10s", severity = "critical" }]
        "#,
    );
    let mut e = Engine::new(&r, "gw");
    let mut out = Vec::new();
    let series = [
        (0.0, 70.0),
        (1.0, 85.0),  // above, pending
        (5.0, 79.0),  // back below: pending reset
        (6.0, 90.0),  // pending again
        (12.0, 91.0), // 6 s: not yet
        (16.0, 92.0), // 10 s: start
        (17.0, 95.0),
        (18.0, 78.0), // inside hysteresis: still active
        (19.0, 74.0), // clear
        (20.0, 74.0),
    ];
    for (t, v) in series {
        e.process(&at("t/a", v.to_string().as_bytes(), t), &mut out);
    }
    let a = alerts(&out);
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[0]["state"], "start");
    assert_eq!(a[0]["value"], 92.0);
    assert_eq!(a[0]["severity"], "critical");
    assert_eq!(a[0]["rule"], "hot");
    assert_eq!(a[0]["sensor"], "t/a");
    assert_eq!(a[1]["state"], "clear");
    // Alerts go both upstream (alert class) and to the local broker.
    let f = forwards(&out);
    assert!(f
        .iter()
        .all(|e| e.class == Class::Alert && e.upstream_topic == "gw/alerts/hot/t/a"));
    let locals: Vec<_> = out
        .iter()
        .filter_map(|a| match a {
            Action::Publish { topic, .. } => Some(topic.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(locals, vec!["edgegate/alerts/hot/t/a"; 2]);
}

#[test]
fn rate_flatline_and_missing() {
    let r = rules(
        r#"
        [[rules]]
        name = "roc"
        match = "r/#"
        actions = [{ type = "detect", detector = "rate_of_change", max_rate = 2.0 }]
        [[rules]]
        name = "flat"
        match = "f/#"
        actions = [{ type = "detect", detector = "flatline", for = "1m", min_count = 5, epsilon = 0.01 }]
        [[rules]]
        name = "gone"
        match = "m/#"
        actions = [{ type = "detect", detector = "missing", after = "30s" }]
        "#,
    );
    let mut e = Engine::new(&r, "");
    let mut out = Vec::new();
    for (t, v) in [(0.0, 10.0), (1.0, 11.0), (2.0, 20.0), (3.0, 21.0)] {
        e.process(&at("r/a", v.to_string().as_bytes(), t), &mut out);
    }
    let a = alerts(&out);
    assert_eq!(
        (a.len(), &a[0]["state"], &a[1]["state"]),
        (2, &"start".into(), &"clear".into())
    );
    out.clear();
    // A sensor that moved (6 changes), then stays within epsilon, then moves again.
    for i in 0..20 {
        let v = if i < 6 {
            i as f64
        } else if i < 15 {
            5.0 + (i % 2) as f64 * 0.005
        } else {
            6.0 + i as f64
        };
        e.process(
            &at("f/a", v.to_string().as_bytes(), i as f64 * 10.0),
            &mut out,
        );
    }
    let a = alerts(&out);
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[0]["detector"], "flatline");
    assert!(
        (a[0]["value"].as_f64().unwrap() - 5.0).abs() <= 0.01,
        "{a:?}"
    );
    out.clear();
    // Missing: a timer, fires with no input.
    e.process(&at("m/a", b"1", 0.0), &mut out);
    e.tick(UNIX_EPOCH + Duration::from_secs(1_700_000_029), &mut out);
    assert!(out.is_empty());
    e.tick(UNIX_EPOCH + Duration::from_secs(1_700_000_031), &mut out);
    e.tick(UNIX_EPOCH + Duration::from_secs(1_700_000_040), &mut out);
    let a = alerts(&out);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["detector"], "missing");
    assert_eq!(a[0]["state"], "start");
    out.clear();
    e.process(&at("m/a", b"1", 50.0), &mut out);
    assert_eq!(alerts(&out)[0]["state"], "clear");
}

#[test]
fn aggregate_windows() {
    let r = rules(
        r#"
        [[rules]]
        name = "agg"
        match = "a/#"
        actions = [{ type = "aggregate", window = "10s", stats = ["count", "mean", "max"], publish = "edgegate/agg/{topic}" }]
        "#,
    );
    let mut e = Engine::new(&r, "gw");
    let mut out = Vec::new();
    for i in 0..25 {
        e.process(&at("a/x", i.to_string().as_bytes(), i as f64), &mut out);
    }
    let f = forwards(&out);
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].kind, TYPE_AGGREGATE);
    assert_eq!(f[0].upstream_topic, "gw/a/x/aggregate");
    let Data::Json(b) = &f[0].data else { panic!() };
    let v: serde_json::Value = serde_json::from_slice(b).unwrap();
    assert_eq!(v["count"], 10.0);
    assert_eq!(v["mean"], 4.5);
    assert_eq!(v["max"], 9.0);
    assert!(v.get("min").is_none());
    assert_eq!(
        out.iter()
            .filter(|a| matches!(a, Action::Publish { .. }))
            .count(),
        2
    );
    out.clear();
    // The last window closes on the timer.
    e.tick(UNIX_EPOCH + Duration::from_secs(1_700_000_031), &mut out);
    assert_eq!(forwards(&out).len(), 1);
}

#[test]
fn reload_keeps_state_of_unchanged_rules() {
    let text = |extra: &str| {
        format!(
            r#"
            [[rules]]
            name = "hot"
            match = "t/#"
            actions = [{{ type = "detect", detector = "threshold", above = 80 }}]
            {extra}
            "#
        )
    };
    let mut e = Engine::new(&rules(&text("")), "");
    let mut out = Vec::new();
    e.process(&at("t/a", b"90", 0.0), &mut out);
    assert_eq!(alerts(&out).len(), 1);
    let kept = e.reload(&rules(&text(
        r#"[[rules]]
        name = "other"
        match = "o/#"
        action = "forward""#,
    )));
    assert_eq!(kept, vec!["hot".to_string()]);
    out.clear();
    // Still active: no second start; going back below clears.
    e.process(&at("t/a", b"95", 1.0), &mut out);
    assert!(alerts(&out).is_empty());
    e.process(&at("t/a", b"50", 2.0), &mut out);
    assert_eq!(alerts(&out)[0]["state"], "clear");
    assert_eq!(
        e.process(&at("o/x", b"1", 2.0), &mut out),
        Disposition::Forwarded
    );
    // A changed rule starts afresh.
    e.process(&at("t/a", b"90", 3.0), &mut out);
    let kept = e.reload(&rules(&text("").replace("80", "85")));
    assert!(kept.is_empty());
    out.clear();
    e.process(&at("t/a", b"90", 4.0), &mut out);
    assert_eq!(alerts(&out)[0]["state"], "start");
}

#[test]
fn sensor_state_is_bounded() {
    let r = rules(
        r#"
        [rules_engine]
        max_sensors = 100
        [[rules]]
        name = "o"
        match = "s/#"
        actions = [{ type = "detect", detector = "outlier" }]
        "#,
    );
    let mut e = Engine::new(&r, "");
    let mut out = Vec::new();
    for i in 0..1000 {
        e.process(&at(&format!("s/{i}"), b"1", i as f64), &mut out);
    }
    assert!(e.sensors() <= 100);
    assert!(e.evicted() >= 900);
}

#[test]
fn default_rules_are_valid() {
    let r = backtest::default_rules();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].actions.len(), 3);
}

#[test]
fn backtest_scores() {
    let mut csv = String::from("timestamp,value\n");
    for i in 0..200 {
        let v = if i == 150 {
            100.0
        } else {
            10.0 + (i % 7) as f64 * 0.1
        };
        csv.push_str(&format!("2024-01-01 00:{:02}:{:02},{v}\n", i / 60, i % 60));
    }
    let mut out = Vec::new();
    let s = backtest::run(
        &backtest::default_rules(),
        "",
        csv.as_bytes(),
        "sensors/x",
        true,
        &mut out,
    )
    .unwrap();
    assert_eq!(s.readings, 200);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "timestamp,value,score,alert");
    assert_eq!(lines.len(), 201);
    let alerted: Vec<usize> = lines[1..]
        .iter()
        .enumerate()
        .filter(|(_, l)| l.ends_with(",1"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(alerted, vec![150], "{text}");
    assert!(backtest::parse_time("1700000000").is_some());
    assert!(backtest::parse_time("2024-01-01T00:00:00Z").is_some());
    assert_eq!(
        backtest::parse_time("2024-01-01T02:00:00+02:00"),
        backtest::parse_time("2024-01-01 00:00:00")
    );
}

#[test]
fn alerts_carry_the_trace_context_of_the_reading_that_raised_them() {
    let r = rules(
        r#"
        [[rules]]
        name = "hot"
        match = "t/#"
        actions = [{ type = "forward" }, { type = "detect", detector = "threshold", above = 80 }]
        "#,
    );
    let mut e = Engine::new(&r, "gw");
    let mut out = Vec::new();
    let mut hot = at("t/a", b"90", 1.0);
    hot.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    e.process(&hot, &mut out);
    let f = forwards(&out);
    assert_eq!(f.len(), 2, "the reading and its alert");
    for ev in f {
        assert_eq!(ev.traceparent, hot.traceparent, "{}", ev.kind);
    }
}

#[test]
fn rules_from_a_directory_with_keyed_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("10-pumps.toml"),
        "[[rules]]\nname = \"pumps\"\nmatch = \"pumps/#\"\naction = \"forward\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a rules file").unwrap();
    let base = format!(
        "[broker]\nallow_anonymous = true\n[rules_engine]\ndir = \"{}\"\n[[rules]]\nname = \"sensors\"\nmatch = \"sensors/#\"\naction = \"forward\"\n",
        dir.path().display()
    );
    let c = crate::config::Config::from_toml(&base, None).unwrap();
    let names: Vec<&str> = c.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["sensors", "pumps"]);

    let bad = dir.path().join("20-bad.toml");
    std::fs::write(
        &bad,
        "[[rules]]\nname = \"bad\"\nmatch = \"a/#/b\"\ncolour = 1\n",
    )
    .unwrap();
    let err = crate::config::Config::from_toml(&base, None).unwrap_err();
    let keys: Vec<String> = err.0.iter().map(|e| e.key.clone()).collect();
    for k in ["rules[0].match", "rules[0].colour"] {
        let want = format!("{}: {k}", bad.display());
        assert!(keys.contains(&want), "missing {want} in {keys:?}");
    }
    std::fs::remove_file(&bad).unwrap();
    let missing = base.replace(&dir.path().display().to_string(), "/nonexistent/rules.d");
    let err = crate::config::Config::from_toml(&missing, None).unwrap_err();
    assert_eq!(err.0[0].key, "rules_engine.dir");
}

#[test]
fn changing_the_engine_tick_keeps_every_rules_state() {
    let text = |tick: &str| {
        format!(
            r#"
            [rules_engine]
            tick = "{tick}"
            [[rules]]
            name = "hot"
            match = "t/#"
            actions = [{{ type = "detect", detector = "threshold", above = 80 }}]
            "#
        )
    };
    let mut e = Engine::new(&rules(&text("1s")), "");
    let mut out = Vec::new();
    e.process(&at("t/a", b"90", 0.0), &mut out);
    assert_eq!(alerts(&out).len(), 1);
    let kept = e.reload(&rules(&text("250ms")));
    assert_eq!(kept, vec!["hot".to_string()]);
    assert_eq!(e.settings().tick, Duration::from_millis(250));
    out.clear();
    // Still in alarm: no second start.
    e.process(&at("t/a", b"95", 1.0), &mut out);
    assert!(alerts(&out).is_empty());
}
