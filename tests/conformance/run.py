#!/usr/bin/env python3
"""Runs the MQTT conformance suites (paho-mqtt, MQTT.js, Mosquitto CLI clients) against one broker
and writes a results JSON; or makes the README's table from two results files.

    run.py --v4 127.0.0.1:1883 --v5 127.0.0.1:1884 --out results.json [--label edgegate]
    run.py --mosquitto --out results-mosquitto.json     # starts /usr/sbin/mosquitto itself
    run.py --table edgegate.json mosquitto.json          # markdown table on stdout

The three suites run in parallel, one process per suite and protocol version (their topics and client ids are apart; each suite's wildcard
cases ignore the suites' own `ct/` and `$ct-` topics). Every case listed by a suite's --list that
produced no result line counts as failed ("no result"). Exit status: 0 when all suites ran (case
failures are in the JSON, the caller judges them), 2 when a third-party client is missing.
Standard library only; install the clients with the lines in .ci/run.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE_TIMEOUT = 150  # seconds for one whole suite; a case has its own, shorter deadlines
INSTALL = f"""install the third-party MQTT clients (the lines of .ci/run):
  apt-get install -y mosquitto mosquitto-clients python3-venv nodejs npm
  python3 -m venv {HERE}/.venv && {HERE}/.venv/bin/pip install -r {HERE}/requirements.txt
  (cd {HERE} && npm ci)"""


def python():
    return os.environ.get("CONFORMANCE_PYTHON", os.path.join(HERE, ".venv", "bin", "python"))


def missing_clients():
    """What is missing to run the suites, as readable lines (empty when all is there)."""
    out = []
    py = python()
    if not os.path.exists(py):
        out.append(f"no Python venv at {py}")
    elif subprocess.run([py, "-c", "import paho.mqtt"], capture_output=True).returncode != 0:
        out.append(f"paho-mqtt is not installed in {py}")
    if not shutil.which("node"):
        out.append("node is not installed")
    elif not os.path.exists(os.path.join(HERE, "node_modules", "mqtt", "package.json")):
        out.append(f"MQTT.js is not installed in {HERE}/node_modules (npm ci)")
    for tool in ("mosquitto_pub", "mosquitto_sub", "stdbuf"):
        if not shutil.which(tool):
            out.append(f"{tool} is not installed")
    return out


def suites():
    return [
        ("paho", [python(), os.path.join(HERE, "paho_suite.py")]),
        ("mqttjs", ["node", os.path.join(HERE, "mqttjs_suite.js")]),
        ("cli", [sys.executable, os.path.join(HERE, "cli_suite.py")]),
    ]


def parse_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def run_suite(name, cmd, host, v4, v5, sink):
    try:
        listed = parse_lines(subprocess.run(cmd + ["--list"], capture_output=True, text=True,
                                            timeout=30).stdout)
    except subprocess.TimeoutExpired:
        listed = []
    started = time.monotonic()
    try:
        p = subprocess.run(cmd + ["--host", host, "--v4", str(v4), "--v5", str(v5)],
                           capture_output=True, text=True, timeout=SUITE_TIMEOUT)
        stdout, stderr, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, rc = f"suite timed out after {SUITE_TIMEOUT} s", None
    results = parse_lines(stdout)
    seen = {(r["protocol"], r["case"]) for r in results}
    client = results[0]["client"] if results else name
    for item in listed:
        suite = item["suite"]
        if (item["protocol"], item["case"]) not in seen:
            results.append({"suite": suite, "client": client, "protocol": item["protocol"],
                            "case": item["case"], "result": "fail",
                            "detail": f"no result (suite exit {rc}: {stderr.strip()[-300:]})"})
    sink[name] = {"results": results, "exit": rc, "seconds": round(time.monotonic() - started, 1),
                  "stderr": stderr[-2000:]}


def run_all(host, v4, v5):
    sink, threads = {}, []
    for name, cmd in suites():
        for proto in ("3.1.1", "5"):
            th = threading.Thread(target=run_suite, args=(
                f"{name} {proto}", cmd + ["--protocol", proto], host, v4, v5, sink))
            th.start()
            threads.append(th)
    for th in threads:
        th.join()
    return sink


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(tmp):
    """Mosquitto 2.0 from Debian on two loopback ports (the same listener serves 3.1.1 and 5)."""
    v4, v5 = free_port(), free_port()
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {v4} 127.0.0.1\nlistener {v5} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\n")
    binary = next((b for b in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if
                   os.path.exists(b)), "mosquitto")
    proc = subprocess.Popen([binary, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", v5), timeout=1).close()
            socket.create_connection(("127.0.0.1", v4), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                sys.exit(f"mosquitto did not start on {v4}/{v5}")
            time.sleep(0.05)
    version = subprocess.run([binary, "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    return proc, v4, v5, version.strip()


def split_addr(s):
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


# ---------------------------------------------------------------------------------- table
FEATURES = [
    ("Connect: keep alive 0", ["connect_keepalive_0"]),
    ("Connect: empty client id, clean", ["connect_empty_id_clean"]),
    ("Connect: empty client id, persistent (3.1.1: CONNACK 0x02; 5: assigned id)",
     ["connect_empty_id_persistent"]),
    ("Persistent session: session present", ["session_present"]),
    ("Publish/subscribe, QoS = min(publish, granted), 9 combinations", ["qos_"]),
    ("Retained: set, delivered with retain flag", ["retained_receive"]),
    ("Retained: cleared by an empty payload", ["retained_clear"]),
    ("Will on abnormal disconnect", ["will_abnormal_disconnect"]),
    ("No will after DISCONNECT", ["will_not_on_disconnect"]),
    ("Unsubscribe", ["unsubscribe"]),
    ("Overlapping subscriptions: maximum QoS respected", ["overlapping_subscriptions"]),
    ("`$` topics not matched by `#`, `+`", ["dollar_topics_not_matched"]),
    ("Offline queueing (QoS 1, persistent session)", ["offline_queue"]),
    ("No gateway chatter on `#` / `+/+`", ["wildcard_no_gateway_chatter"]),
    ("3.1 (MQIsdp) client gets CONNACK 0 or 0x01", ["mqtt31_connack"]),
    ("Session Expiry Interval 0 ends the session", ["session_expiry_zero"]),
    ("Session Expiry Interval elapses", ["session_expiry_elapsed"]),
    ("Topic aliases", ["topic_alias"]),
    ("Topic Alias 0 rejected", ["topic_alias_zero_rejected"]),
    ("Client's Maximum Packet Size respected", ["maximum_packet_size"]),
    ("No Local", ["no_local"]),
    ("Flow control: Receive Maximum", ["receive_maximum"]),
]


def matches(case, keys):
    return any(case == k or (k.endswith("_") and case.startswith(k)) for k in keys)


def runs(results, proto, keys):
    return [r for r in results if r["protocol"] == proto and matches(r["case"], keys)]


def cell(rs):
    """yes / partly / no, with passed/total case runs (one run per client library)."""
    if not rs:
        return "n/a"
    passed = sum(r["result"] == "pass" for r in rs)
    word = "yes" if passed == len(rs) else "partly" if passed else "no"
    return f"{word} {passed}/{len(rs)}"


def first_failure(rs):
    fails = [r for r in rs if r["result"] != "pass"]
    if not fails:
        return ""
    d = f"{fails[0]['suite']}: {fails[0]['detail']}".replace("|", "/").replace("\n", " ")
    return d if len(d) <= 90 else d[:87] + "..."


def table(a_file, b_file):
    """Markdown: per feature and protocol, A's and B's results and A's first failing run."""
    a, b = (json.load(open(f)) for f in (a_file, b_file))
    ra, rb = a["results"], b["results"]
    lines = []
    for proto in ("3.1.1", "5"):
        pa = [r for r in ra if r["protocol"] == proto]
        pb = [r for r in rb if r["protocol"] == proto]
        lines.append(f"**MQTT {proto}**: {a['label']} passes "
                     f"{sum(r['result'] == 'pass' for r in pa)}/{len(pa)} case runs, "
                     f"{b['label']} {sum(r['result'] == 'pass' for r in pb)}/{len(pb)}.\n")
        lines.append(f"| feature (MQTT {proto}) | {a['label']} | {b['label']} | "
                     f"{a['label']}: first failing run |")
        lines.append("| --- | --- | --- | --- |")
        for title, keys in FEATURES:
            xa, xb = runs(ra, proto, keys), runs(rb, proto, keys)
            if not xa and not xb:
                continue
            lines.append(f"| {title} | {cell(xa)} | {cell(xb)} | {first_failure(xa)} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v4", help="host:port of the MQTT 3.1.1 listener")
    ap.add_argument("--v5", help="host:port of the MQTT 5 listener")
    ap.add_argument("--mosquitto", action="store_true", help="start and measure Mosquitto")
    ap.add_argument("--out", help="results JSON to write")
    ap.add_argument("--label", help="broker name in the results")
    ap.add_argument("--table", nargs=2, metavar=("A.json", "B.json"))
    a = ap.parse_args()
    if a.table:
        print(table(*a.table))
        return 0
    missing = missing_clients()
    if missing:
        print("conformance: third-party MQTT clients missing:\n  " + "\n  ".join(missing) +
              "\n" + INSTALL, file=sys.stderr)
        return 2
    proc, label = None, a.label
    tmp = tempfile.mkdtemp(prefix="conformance-")
    try:
        if a.mosquitto:
            proc, v4, v5, version = start_mosquitto(tmp)
            host = "127.0.0.1"
            label = label or version.replace("mosquitto version", "Mosquitto")
        else:
            if not (a.v4 and a.v5):
                ap.error("give --v4 and --v5, or --mosquitto")
            host, v4 = split_addr(a.v4)
            _, v5 = split_addr(a.v5)
            label = label or "broker"
        started = time.monotonic()
        sink = run_all(host, v4, v5)
    finally:
        if proc:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    results = [r for key in sorted(sink) for r in sink[key]["results"]]
    out = {"label": label, "seconds": round(time.monotonic() - started, 1),
           "suites": {k: {x: v[x] for x in ("exit", "seconds", "stderr")} for k, v in
                      sink.items()},
           "results": results}
    for proto in ("3.1.1", "5"):
        rs = [r for r in results if r["protocol"] == proto]
        print(f"conformance {label} MQTT {proto}: "
              f"{sum(r['result'] == 'pass' for r in rs)}/{len(rs)} passed")
    print(f"conformance {label}: {out['seconds']} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
