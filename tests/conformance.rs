//! MQTT conformance, measured with client code nobody here wrote (issue 13): the suites in
//! tests/conformance/ (paho-mqtt, MQTT.js, the Mosquitto CLI clients) run against the gateway's
//! embedded broker, in-process, on its 3.1.1 and 5 listeners.
//!
//! The test guards both ways: a case that is not in [`EXPECTED_FAILURES`] must pass, and a case
//! that is listed there but passes now is printed, so the list gets shortened. Missing clients
//! fail the test with the install lines; it never skips. The same suite measures Mosquitto for
//! the README's table (`tests/conformance/run.py --mosquitto`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::{start_gateway, test_config};

/// Cases known to fail on edgegate today, as (suite, protocol, case), where suite `*` stands for
/// every suite that runs the case. Each with the reason; remove an entry when its case passes.
const EXPECTED_FAILURES: &[(&str, &str, &str)] = &[];

fn expected_failure(suite: &str, proto: &str, case: &str) -> bool {
    EXPECTED_FAILURES
        .iter()
        .any(|&(s, p, c)| (s == "*" || s == suite) && p == proto && c == case)
}

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// Runs the runner against the gateway and judges its results against [`EXPECTED_FAILURES`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_clients_against_the_embedded_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(dir.path(), None);
    cfg.broker.allow_anonymous = true;
    cfg.broker.listen_v5 = Some("127.0.0.1:0".parse().expect("addr"));
    let gw = start_gateway(cfg).await;
    let v4 = gw.broker_addr;
    let v5 = gw.broker_addr_v5.expect("the v5 listener is configured");

    // Written where CONFORMANCE_OUT says (the README's table command), else in the temp dir.
    let out = std::env::var_os("CONFORMANCE_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("results.json"));
    let runner = conformance_dir().join("run.py");
    let out2 = out.clone();
    let status = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&runner)
            .args(["--v4", &v4.to_string(), "--v5", &v5.to_string()])
            .args(["--label", "edgegate"])
            .arg("--out")
            .arg(&out2)
            .status()
    })
    .await
    .expect("runner thread");
    let status = status.expect("python3 runs tests/conformance/run.py");
    assert_ne!(
        status.code(),
        Some(2),
        "the third-party MQTT clients are not installed: run the conformance install lines of \
         .ci/run (python3 -m venv tests/conformance/.venv; tests/conformance/.venv/bin/pip install \
         -r tests/conformance/requirements.txt; (cd tests/conformance && npm ci); apt-get install \
         mosquitto-clients); the runner printed what is missing above"
    );
    assert!(status.success(), "the conformance runner failed: {status}");
    gw.shutdown().await;

    let text = std::fs::read_to_string(&out).expect("results JSON written");
    let results: Value = serde_json::from_str(&text).expect("results JSON parses");
    let results = results["results"].as_array().expect("results array");
    assert!(!results.is_empty(), "the suites reported no case at all");

    let mut unexpected = Vec::new();
    let mut now_passing = Vec::new();
    let mut seen = BTreeSet::new();
    for r in results {
        let (suite, proto, case) = (
            r["suite"].as_str().unwrap_or("?"),
            r["protocol"].as_str().unwrap_or("?"),
            r["case"].as_str().unwrap_or("?"),
        );
        seen.insert((suite.to_string(), proto.to_string(), case.to_string()));
        let passed = r["result"] == "pass";
        match (passed, expected_failure(suite, proto, case)) {
            (false, false) => unexpected.push(format!(
                "{suite} MQTT {proto} {case}: {}",
                r["detail"].as_str().unwrap_or("")
            )),
            (true, true) => now_passing.push(format!("{suite} MQTT {proto} {case}")),
            _ => {}
        }
    }
    // An entry naming one suite must name a case that suite runs (no stale entries).
    for &(s, p, c) in EXPECTED_FAILURES {
        let known = seen
            .iter()
            .any(|(ss, pp, cc)| (s == "*" || s == ss) && p == pp && c == cc);
        assert!(
            known,
            "EXPECTED_FAILURES names a case no suite ran: {s} {p} {c}"
        );
    }
    if !now_passing.is_empty() {
        println!(
            "conformance: {} case(s) in EXPECTED_FAILURES pass now; remove them from the list in \
             tests/conformance.rs:\n  {}",
            now_passing.len(),
            now_passing.join("\n  ")
        );
    }
    assert!(
        unexpected.is_empty(),
        "{} conformance case(s) expected to pass failed:\n  {}",
        unexpected.len(),
        unexpected.join("\n  ")
    );
}
