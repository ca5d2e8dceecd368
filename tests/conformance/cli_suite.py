#!/usr/bin/env python3
"""MQTT 3.1.1 and 5 conformance cases driven by the Mosquitto command-line clients
(mosquitto_pub, mosquitto_sub; Debian package mosquitto-clients). Standard library only.

    cli_suite.py --host 127.0.0.1 --v4 1883 --v5 1884

Each case prints one JSON line on stdout (suite, client, protocol, case, result, detail). The
clients run with their defaults (keep alive 60, client id mosq-<random>) unless the case is about
that setting (they refuse keep alive 0 themselves: "must be between 5 and 65535", so that case is
left to the other suites). Every process runs under a timeout and is killed when its case ends.
"""

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

WAIT = 3.0
QUIET = 1.0


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


def version():
    try:
        out = subprocess.run(["mosquitto_pub", "--help"], capture_output=True, text=True,
                             timeout=5).stdout
        return "mosquitto-clients " + out.split("version ")[1].split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "mosquitto-clients (unknown version)"


LIVE = []  # every mosquitto_sub started; killed when its case ends


class Sub:
    """A running mosquitto_sub whose debug output (-d) tells when SUBACK arrived."""

    def __init__(self, a, proto, topics, qos=0, extra=(), wait_suback=True):
        port = a.v5 if proto == "5" else a.v4
        # stdbuf: line-buffered output, so SUBACK and messages are seen as they happen.
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-d", "-h", a.host, "-p", str(port), "-V",
               "5" if proto == "5" else "311", "-q", str(qos), "-F", "MSG %q %r %t %p"]
        for t in topics:
            cmd += ["-t", t]
        cmd += list(extra)
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        LIVE.append(self)
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self._read, daemon=True).start()
        if wait_suback:
            self.wait_line("received SUBACK")

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, needle, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.log.append(line)
            if needle in line:
                return line
        self.kill()
        raise Failed(f"mosquitto_sub: no '{needle}' ({' | '.join(self.log[-3:])})")

    def messages(self, n=None, timeout=QUIET):
        """Messages (qos, retain, topic, payload) seen until n arrived or timeout passed."""
        out, deadline = [], time.monotonic() + timeout
        while (n is None or len(out) < n) and time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.log.append(line)
            if line.startswith("MSG "):
                q, r, t, *p = line[4:].split(" ", 3)
                out.append((int(q), int(r), t, p[0] if p else ""))
        return out

    def stop(self):
        """SIGINT: mosquitto_sub sends DISCONNECT and exits."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGINT)
            try:
                self.p.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self):
        """SIGKILL: the socket closes without DISCONNECT."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def pub(a, proto, topic, payload, qos=0, extra=()):
    port = a.v5 if proto == "5" else a.v4
    v = {"5": "5", "3.1.1": "311", "3.1": "31"}[proto]
    cmd = ["mosquitto_pub", "-h", a.host, "-p", str(port), "-V", v, "-q", str(qos), "-t",
           topic] + (["-n"] if payload is None else ["-m", payload]) + list(extra)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT)
    except subprocess.TimeoutExpired:
        raise Failed(f"mosquitto_pub to {topic} did not finish in {WAIT} s")
    check(p.returncode == 0, f"mosquitto_pub failed ({p.returncode}): "
          f"{(p.stderr or p.stdout).strip()}")


def case_chatter(a, proto, r):
    s = Sub(a, proto, ["#", "+/+"])
    got = [m for m in s.messages(timeout=3.0) if not m[2].startswith(("ct/", "$ct-"))]
    s.stop()
    topics = {}
    for m in got:
        topics[m[2]] = topics.get(m[2], 0) + 1
    check(not got, f"{len(got)} message(s) not from any client: {topics}")
    return "no messages in 3 s on '#' and '+/+' besides the suites' own"


def qos_cases(a, proto, r, report):
    for s in range(3):
        t = f"{r['t']}/qos/sub{s}"
        sub = Sub(a, proto, [t], qos=s)
        for p in range(3):
            name = f"qos_pub{p}_sub{s}"
            try:
                pub(a, proto, t, f"p{p}", p)
                got = sub.messages(1, WAIT)
                check(got, "message not delivered")
                want = min(p, s)
                check(got[0][0] == want, f"delivered at QoS {got[0][0]}, expected min({p}, {s}) "
                      f"= {want}")
                report(name, True, f"delivered QoS {got[0][0]}")
            except Failed as e:
                report(name, False, str(e))
        sub.stop()


def case_retained_receive(a, proto, r):
    t = f"{r['t']}/ret"
    pub(a, proto, t, "kept", 1, extra=["-r"])
    s = Sub(a, proto, [t], qos=1)
    got = s.messages(1, WAIT)
    s.stop()
    check(got, "retained message not delivered on subscribe")
    check(got[0][1] == 1, "retained message delivered without the retain flag")
    return "delivered on subscribe with retain=1"


def case_retained_clear(a, proto, r):
    t = f"{r['t']}/retclr"
    pub(a, proto, t, "kept", 1, extra=["-r"])
    pub(a, proto, t, None, 1, extra=["-r"])
    s = Sub(a, proto, [t], qos=1)
    got = s.messages()
    s.stop()
    check(not got, f"still delivered after clearing: {got}")
    return "nothing delivered after an empty retained publish"


def case_will_abnormal(a, proto, r):
    t = f"{r['t']}/will"
    s = Sub(a, proto, [t], qos=1)
    w = Sub(a, proto, [f"{r['t']}/nothing"], extra=["--will-topic", t, "--will-payload",
                                                     "gone", "--will-qos", "1"])
    w.kill()
    got = s.messages(1, WAIT)
    s.stop()
    check(got and got[0][3] == "gone", "will not delivered after the client was killed")
    return "will delivered after SIGKILL of the client"


def case_will_normal(a, proto, r):
    t = f"{r['t']}/willn"
    s = Sub(a, proto, [t], qos=1)
    # -C 1: after one message mosquitto_sub disconnects normally (on SIGINT, MQTT 5
    # mosquitto_sub sends DISCONNECT 0x04 "with will message" on purpose).
    w = Sub(a, proto, [f"{r['t']}/bye"], extra=["--will-topic", t, "--will-payload",
                                                 "gone", "--will-qos", "1", "-C", "1"])
    pub(a, proto, f"{r['t']}/bye", "bye")
    try:
        w.p.wait(WAIT)
    except subprocess.TimeoutExpired:
        raise Failed("mosquitto_sub -C 1 did not exit after its message")
    got = s.messages()
    s.stop()
    check(not got, "will delivered after a normal DISCONNECT")
    return "no will after DISCONNECT"


def case_dollar(a, proto, r):
    dollar = f"$ct-{r['id']}/x"
    exact = Sub(a, proto, [dollar])
    wild = Sub(a, proto, ["#", "+/x"])
    pub(a, proto, dollar, "d", 1)
    m = exact.messages(1, WAIT)
    leaked = [x for x in wild.messages() if x[2] == dollar]
    exact.stop()
    wild.stop()
    check(not leaked, f"'#' or '+/x' matched {dollar}")
    check(m, f"{dollar} not delivered even to an exact subscription")
    return "delivered to the exact filter only"


def case_offline_queue(a, proto, r):
    cid, t = f"{r['id']}-offq", f"{r['t']}/offq"
    persist = ["-c", "-i", cid] + (["-x", "300"] if proto == "5" else [])
    # A clean connect first wipes any old session, then -E: subscribe and leave.
    Sub(a, proto, [t], qos=1, extra=["-i", cid, "-E"]).p.wait(WAIT)
    s = Sub(a, proto, [t], qos=1, extra=persist + ["-E"])
    s.p.wait(WAIT)
    for i in range(3):
        pub(a, proto, t, f"m{i}", 1)
    s = Sub(a, proto, [t], qos=1, extra=persist, wait_suback=False)
    got = s.messages(3, WAIT)
    s.stop()
    Sub(a, proto, [t], extra=["-i", cid, "-E"]).p.wait(WAIT)
    check(len(got) == 3, f"{len(got)} of 3 QoS 1 messages published while away arrived")
    return "3 of 3 arrived on reconnect"


def case_mqtt31(a, proto, r):
    port = a.v4
    p = subprocess.run(["mosquitto_pub", "-d", "-h", a.host, "-p", str(port), "-V", "mqttv31",
                        "-t", f"{r['t']}/v31", "-m", "x"], capture_output=True, text=True,
                       timeout=WAIT + 2)
    out = p.stdout + p.stderr
    if "received CONNACK (0)" in out:
        return "CONNACK 0x00"
    check("unacceptable protocol version" in out.lower() or "received CONNACK (1)" in out,
          f"neither CONNACK 0 nor 1: {out.strip().splitlines()[-1:] or 'no output'}")
    return "CONNACK 0x01"


COMMON = [
    ("wildcard_no_gateway_chatter", case_chatter),
    ("retained_receive", case_retained_receive),
    ("retained_clear", case_retained_clear),
    ("will_abnormal_disconnect", case_will_abnormal),
    ("will_not_on_disconnect", case_will_normal),
    ("dollar_topics_not_matched", case_dollar),
    ("offline_queue", case_offline_queue),
]
V4_ONLY = [("mqtt31_connack", case_mqtt31)]

LIB = version()


def emit(proto, case, ok, detail):
    print(json.dumps({"suite": "cli", "client": LIB, "protocol": proto, "case": case,
                      "result": "pass" if ok else "fail", "detail": detail}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--v4", type=int, default=0)
    ap.add_argument("--v5", type=int, default=0)
    ap.add_argument("--only")
    ap.add_argument("--skip-chatter", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the cases, run nothing")
    ap.add_argument("--protocol", choices=("3.1.1", "5"), help="only this protocol version")
    a = ap.parse_args()
    run = uuid.uuid4().hex[:8]
    for proto in [a.protocol] if a.protocol else ["3.1.1", "5"]:
        tag = "v4" if proto == "3.1.1" else "v5"
        r = {"id": f"cli-{run}-{tag}", "t": f"ct/cli-{run}/{tag}"}
        if a.list:
            names = [f"qos_pub{p}_sub{s}" for s in range(3) for p in range(3)]
            names += [n for n, _ in COMMON + (V4_ONLY if proto == "3.1.1" else [])]
            for name in names:
                print(json.dumps({"suite": "cli", "protocol": proto, "case": name}))
            continue
        if not a.only or "qos" in a.only:
            try:
                qos_cases(a, proto, r, lambda n, ok, d: emit(proto, n, ok, d))
            except Failed as e:
                emit(proto, "qos_setup", False, str(e))
        for name, fn in COMMON + (V4_ONLY if proto == "3.1.1" else []):
            if (a.only and a.only not in name) or (a.skip_chatter and "chatter" in name):
                continue
            try:
                emit(proto, name, True, fn(a, proto, r))
            except Failed as e:
                emit(proto, name, False, str(e))
            except (OSError, subprocess.SubprocessError) as e:
                emit(proto, name, False, f"{type(e).__name__}: {e}")
            finally:
                while LIVE:
                    LIVE.pop().kill()


if __name__ == "__main__":
    main()
    sys.exit(0)
