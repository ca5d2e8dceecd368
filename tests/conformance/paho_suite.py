#!/usr/bin/env python3
"""MQTT 3.1.1 and 5 conformance cases driven by paho-mqtt (Eclipse Paho, from PyPI).

Run with the conformance venv's Python (see run.py):
    paho_suite.py --host 127.0.0.1 --v4 1883 --v5 1884

Each case prints one JSON line on stdout:
    {"suite": "paho", "client": "paho-mqtt 2.2.0", "protocol": "5", "case": "...",
     "result": "pass"|"fail", "detail": "..."}
Clients keep paho's defaults (keep alive 60, empty client id: the server assigns one) unless the
case is about that setting. Every wait has a timeout and every case runs under a deadline, so a
broker that never answers fails the case instead of hanging the suite.
"""

import argparse
import json
import os
import queue
import socket
import struct
import sys
import threading
import time
import uuid

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

LIB = f"paho-mqtt {paho.mqtt.__version__}"
WAIT = 3.0  # seconds to wait for something that must happen
QUIET = 1.0  # seconds to wait to be sure something does not happen
CASE_DEADLINE = 20.0


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


class Client:
    """A paho client on a background network loop that records what the server sends."""

    def __init__(self, args, proto, client_id="", clean=True, keepalive=60, props=None,
                 will=None, manual_ack=False, reconnect_on_failure=True):
        self.args, self.proto = args, proto
        self.v5 = proto == "5"
        version = {"3.1": mqtt.MQTTv31, "3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}[proto]
        kw = {} if self.v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=version, manual_ack=manual_ack,
                             reconnect_on_failure=reconnect_on_failure, **kw)
        self.connacks = queue.Queue()
        self.msgs = queue.Queue()
        self.subacks = {}
        self.sub_events = {}
        self.disconnected = threading.Event()
        self.disconnect_rc = None
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_disconnect = self._on_disconnect
        if will:
            topic, payload, qos = will
            self.c.will_set(topic, payload, qos)
        port = args.v5 if self.v5 else args.v4
        self.connack = None
        try:
            if self.v5:
                p = Properties(PacketTypes.CONNECT)
                for k, v in (props or {}).items():
                    setattr(p, k, v)
                self.c.connect(args.host, port, keepalive=keepalive, clean_start=clean,
                               properties=p if props else None)
            else:
                self.c.connect(args.host, port, keepalive=keepalive)
        except OSError as e:
            raise Failed(f"TCP connect failed: {e}")
        self.c.loop_start()

    def _on_connect(self, c, u, flags, rc, props):
        self.connacks.put((rc.value, flags.session_present, props))
        self.connack_name = rc.getName()

    def _on_message(self, c, u, m):
        self.msgs.put(m)

    def _on_subscribe(self, c, u, mid, rcs, props):
        self.subacks[mid] = [r.value for r in rcs]
        self.sub_events.setdefault(mid, threading.Event()).set()

    def _on_unsubscribe(self, c, u, mid, rcs, props):
        self.sub_events.setdefault(mid, threading.Event()).set()

    def _on_disconnect(self, c, u, flags, rc, props):
        self.disconnect_rc = getattr(rc, "value", rc)
        self.disconnected.set()

    def wait_connack(self, expect_rc=0):
        """The first CONNACK (rc, session_present, properties); fails if none or rc differs."""
        try:
            self.connack = self.connacks.get(timeout=WAIT)
        except queue.Empty:
            why = "connection closed" if self.disconnected.is_set() else "timeout"
            raise Failed(f"no CONNACK ({why}, disconnect rc {self.disconnect_rc})")
        if expect_rc is not None:
            check(self.connack[0] == expect_rc,
                  f"CONNACK reason {self.connack[0]:#04x}, expected {expect_rc:#04x}")
        return self.connack

    def subscribe(self, topic, qos, no_local=False):
        """Subscribe and wait for SUBACK; returns the granted QoS (or failure code)."""
        if self.v5:
            rc, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=qos, noLocal=no_local))
        else:
            rc, mid = self.c.subscribe(topic, qos)
        check(rc == 0, f"subscribe not sent: {rc}")
        ev = self.sub_events.setdefault(mid, threading.Event())
        check(ev.wait(WAIT), f"no SUBACK for {topic}")
        return self.subacks[mid][0]

    def unsubscribe(self, topic):
        rc, mid = self.c.unsubscribe(topic)
        ev = self.sub_events.setdefault(mid, threading.Event())
        check(ev.wait(WAIT), f"no UNSUBACK for {topic}")

    def publish(self, topic, payload, qos=0, retain=False, props=None):
        p = None
        if props:
            p = Properties(PacketTypes.PUBLISH)
            for k, v in props.items():
                setattr(p, k, v)
        info = self.c.publish(topic, payload, qos, retain, properties=p)
        if qos > 0:
            info.wait_for_publish(WAIT)
            check(info.is_published(), f"publish QoS {qos} to {topic} not acknowledged")
        return info

    def recv(self, timeout=WAIT):
        try:
            return self.msgs.get(timeout=timeout)
        except queue.Empty:
            return None

    def recv_n(self, n, timeout=WAIT):
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            m = self.recv(max(0.0, deadline - time.monotonic()))
            if m is None:
                break
            out.append(m)
        return out

    def drain(self, window=QUIET):
        """Everything that arrives within `window` seconds (a fixed window: wildcard subscribers
        see the other suites' steady traffic)."""
        out, deadline = [], time.monotonic() + window
        while True:
            m = self.recv(max(0.0, deadline - time.monotonic()))
            if m is None:
                return out
            out.append(m)

    def stop_loop(self):
        """Stop paho's network thread. paho 2.x races here: `loop_stop` checks `_thread`, and
        the thread may clear it (the connection just closed after our DISCONNECT) before the
        `join`, which then fails with AttributeError on None. The thread is gone either way."""
        try:
            self.c.loop_stop()
        except AttributeError:
            pass

    def disconnect(self, props=None):
        """A normal DISCONNECT."""
        try:
            if self.v5 and props:
                p = Properties(PacketTypes.DISCONNECT)
                for k, v in props.items():
                    setattr(p, k, v)
                self.c.disconnect(properties=p)
            else:
                self.c.disconnect()
        finally:
            self.stop_loop()

    def drop(self):
        """An abnormal disconnect: the socket closes without DISCONNECT."""
        self.stop_loop()
        s = self.c.socket()
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def connect(args, proto, **kw):
    c = Client(args, proto, **kw)
    c.wait_connack()
    return c


# ---------------------------------------------------------------------------------- raw socket
def raw_connect(host, port, body):
    """Send a CONNECT with the given variable header + payload; return the reply bytes (or b"")."""
    pkt = bytes([0x10]) + _varint(len(body)) + body
    with socket.create_connection((host, port), timeout=WAIT) as s:
        s.sendall(pkt)
        data = b""
        try:
            while len(data) < 4:
                chunk = s.recv(64)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        return data


def _varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


# ---------------------------------------------------------------------------------- cases
def case_keepalive_0(a, proto, r):
    c = connect(a, proto, keepalive=0)
    c.disconnect()
    return "CONNACK 0 with keep alive 0"


def case_empty_id_clean(a, proto, r):
    c = Client(a, proto, client_id="", clean=True, reconnect_on_failure=False)
    _, _, props = c.wait_connack()
    detail = "accepted"
    if proto == "5":
        assigned = getattr(props, "AssignedClientIdentifier", None)
        check(assigned, "CONNACK has no Assigned Client Identifier")
        detail += f", assigned id {assigned!r}"
    c.disconnect()
    return detail


def case_empty_id_persistent(a, proto, r):
    if proto == "3.1.1":
        # paho refuses this combination itself, so it is sent on a raw socket:
        # 3.1.1 §3.1.3.1 [MQTT-3.1.3-8]: CONNACK 0x02 (identifier rejected), then close.
        body = _str("MQTT") + bytes([4, 0x00]) + struct.pack("!H", 60) + _str("")
        reply = raw_connect(a.host, a.v4, body)
        check(len(reply) >= 4 and reply[0] == 0x20, f"no CONNACK: {reply.hex()}")
        check(reply[3] == 0x02, f"CONNACK return code {reply[3]:#04x}, expected 0x02")
        return "raw socket: CONNACK 0x02 identifier rejected"
    c = Client(a, proto, client_id="", clean=False, reconnect_on_failure=False,
               props={"SessionExpiryInterval": 60})
    _, _, props = c.wait_connack()
    assigned = getattr(props, "AssignedClientIdentifier", None)
    check(assigned, "CONNACK has no Assigned Client Identifier")
    c.disconnect(props={"SessionExpiryInterval": 0})
    return f"accepted, assigned id {assigned!r}"


def _persistent(a, proto, cid, clean, expiry=300):
    props = {"SessionExpiryInterval": expiry} if proto == "5" else None
    return connect(a, proto, client_id=cid, clean=clean, props=props)


def _fresh_persistent(a, proto, cid):
    """A new persistent session: any old one is wiped first (3.1.1: a clean connect, since a
    session made with clean session 1 ends with the connection)."""
    if proto != "5":
        _persistent(a, proto, cid, True).disconnect()
        c = _persistent(a, proto, cid, False)
    else:
        c = _persistent(a, proto, cid, True)
    check(c.connack[1] == 0, "session present on a fresh session")
    return c


def _end_session(a, proto, cid):
    c = _persistent(a, proto, cid, True, 0)
    c.disconnect()


def case_session_present(a, proto, r):
    cid = f"{r['id']}-sp"
    c = _fresh_persistent(a, proto, cid)
    c.subscribe(f"{r['t']}/sp", 1)
    c.disconnect()
    c = _persistent(a, proto, cid, False)
    sp = c.connack[1]
    c.disconnect()
    c = _persistent(a, proto, cid, True, 0)
    sp_clean = c.connack[1]
    c.disconnect()
    check(sp == 1, "session present 0 on reconnect of a persistent session")
    check(sp_clean == 0, "session present 1 on a clean reconnect")
    return "session present 1 on resume, 0 after clean"


def _qos_cases(a, proto, r, report):
    pub = connect(a, proto)
    for s in range(3):
        t = f"{r['t']}/qos/sub{s}"
        sub = connect(a, proto)
        granted = sub.subscribe(t, s)
        for p in range(3):
            name = f"qos_pub{p}_sub{s}"
            try:
                check(granted in (0, 1, 2), f"subscription refused: SUBACK {granted:#04x}")
                pub.publish(t, f"p{p}", p)
                m = sub.recv()
                check(m is not None, "message not delivered")
                want = min(p, granted)
                check(m.qos == want, f"delivered at QoS {m.qos}, expected min({p}, granted "
                      f"{granted}) = {want}")
                extra = sub.drain(0.2)
                check(not extra, f"{len(extra)} duplicate(s)")
                report(name, True, f"granted {granted}, delivered QoS {m.qos}")
            except Failed as e:
                report(name, False, str(e))
                sub.drain(0.2)
        sub.disconnect()
    pub.disconnect()


def case_retained_receive(a, proto, r):
    t = f"{r['t']}/ret"
    pub = connect(a, proto)
    pub.publish(t, "kept", 1, retain=True)
    sub = connect(a, proto)
    sub.subscribe(t, 1)
    m = sub.recv()
    pub.disconnect()
    sub.disconnect()
    check(m is not None, "retained message not delivered on subscribe")
    check(m.retain, "retained message delivered without the retain flag")
    check(m.payload == b"kept", f"payload {m.payload!r}")
    return "delivered on subscribe with retain=1"


def case_retained_clear(a, proto, r):
    t = f"{r['t']}/retclr"
    pub = connect(a, proto)
    pub.publish(t, "kept", 1, retain=True)
    time.sleep(0.1)
    pub.publish(t, b"", 1, retain=True)
    time.sleep(0.1)
    sub = connect(a, proto)
    sub.subscribe(t, 1)
    got = sub.drain()
    pub.disconnect()
    sub.disconnect()
    check(not got, f"still delivered after clearing: {[m.payload for m in got]}")
    return "nothing delivered after an empty retained publish"


def case_will_abnormal(a, proto, r):
    t = f"{r['t']}/will"
    sub = connect(a, proto)
    sub.subscribe(t, 1)
    c = connect(a, proto, will=(t, "gone", 1))
    c.drop()
    m = sub.recv(WAIT)
    sub.disconnect()
    check(m is not None and m.payload == b"gone", "will not delivered after the socket closed")
    return "will delivered"


def case_will_normal(a, proto, r):
    t = f"{r['t']}/willn"
    sub = connect(a, proto)
    sub.subscribe(t, 1)
    c = connect(a, proto, will=(t, "gone", 1))
    c.disconnect()
    got = sub.drain()
    sub.disconnect()
    check(not got, "will delivered after a normal DISCONNECT")
    return "no will after DISCONNECT"


def case_unsubscribe(a, proto, r):
    t = f"{r['t']}/unsub"
    sub = connect(a, proto)
    sub.subscribe(t, 1)
    pub = connect(a, proto)
    pub.publish(t, "one", 1)
    check(sub.recv() is not None, "not delivered while subscribed")
    sub.unsubscribe(t)
    pub.publish(t, "two", 1)
    got = sub.drain()
    pub.disconnect()
    sub.disconnect()
    check(not got, "delivered after UNSUBACK")
    return "nothing after unsubscribe"


def case_overlapping(a, proto, r):
    t = f"{r['t']}/ov/a"
    sub = connect(a, proto)
    sub.subscribe(f"{r['t']}/ov/#", 1)
    sub.subscribe(t, 0)
    pub = connect(a, proto)
    pub.publish(t, "x", 2)
    got = sub.recv_n(2, 1.5)
    pub.disconnect()
    sub.disconnect()
    qos = sorted(m.qos for m in got)
    check(got, "not delivered")
    check(max(qos) == 1, f"copies at QoS {qos}: one must respect the maximum matching QoS 1")
    return f"{len(got)} cop{'y' if len(got) == 1 else 'ies'} at QoS {qos}"


def case_dollar_topics(a, proto, r):
    dollar = f"$ct-{r['id']}/x"
    exact = connect(a, proto)
    exact.subscribe(dollar, 0)
    wild = connect(a, proto)
    wild.subscribe("#", 0)
    wild.subscribe("+/x", 0)
    pub = connect(a, proto)
    pub.publish(dollar, "d", 1)
    m = exact.recv()
    leaked = [w for w in wild.drain() if w.topic == dollar]
    for c in (exact, wild, pub):
        c.disconnect()
    check(not leaked, f"'#' or '+/x' matched {dollar} ({len(leaked)} message(s))")
    check(m is not None, f"{dollar} not delivered even to an exact subscription")
    return "delivered to the exact filter only"


def case_offline_queue(a, proto, r):
    cid, t = f"{r['id']}-offq", f"{r['t']}/offq"
    c = _fresh_persistent(a, proto, cid)
    c.subscribe(t, 1)
    c.disconnect()
    pub = connect(a, proto)
    for i in range(3):
        pub.publish(t, f"m{i}", 1)
    pub.disconnect()
    c = _persistent(a, proto, cid, False)
    sp = c.connack[1]
    got = c.recv_n(3)
    c.disconnect()
    _end_session(a, proto, cid)
    check(sp == 1, "no session present on reconnect")
    check(len(got) == 3, f"{len(got)} of 3 QoS 1 messages published while away arrived")
    return "3 of 3 arrived on reconnect"


def case_wildcard_chatter(a, proto, r):
    c = connect(a, proto)
    c.subscribe("#", 0)
    c.subscribe("+/+", 0)
    got = [m for m in c.drain(3.0) if not m.topic.startswith(("ct/", "$ct-"))]
    c.disconnect()
    topics = {}
    for m in got:
        topics[m.topic] = topics.get(m.topic, 0) + 1
    check(not got, f"{len(got)} message(s) not from any client: {topics}")
    return "no messages in 3 s on '#' and '+/+' besides the suites' own"


def case_mqtt31(a, proto, r):
    c = Client(a, "3.1", reconnect_on_failure=False)
    rc, _, _ = c.wait_connack(expect_rc=None)
    c.disconnect()
    # paho 2 hands an MQTT 3.x return code to on_connect as an MQTT 5 ReasonCode whose number
    # differs (return code 1 becomes 0x84), and says to compare by name
    # (paho.mqtt._packet.convert_connack_rc_to_reason_code): 0 is "Success", 1 "Unsupported
    # protocol version".
    name = c.connack_name
    check(name in ("Success", "Unsupported protocol version"),
          f"CONNACK {name!r} ({rc:#04x}), expected 0 (3.1 supported) or 1 (unacceptable protocol "
          "version)")
    return f"CONNACK {name!r}"


# MQTT 5 only
def case_session_expiry_zero(a, proto, r):
    # Made with clean start 0: only the expiry of 0 says that it ends at the disconnect.
    cid = f"{r['id']}-sx0"
    c = _persistent(a, proto, cid, False, 0)
    c.subscribe(f"{r['t']}/sx0", 1)
    c.disconnect()
    c = _persistent(a, proto, cid, False, 0)
    sp = c.connack[1]
    c.disconnect()
    check(sp == 0, "session present after a session with expiry 0 ended")
    return "expiry 0: session ends at disconnect"


def case_session_expiry_elapsed(a, proto, r):
    cid = f"{r['id']}-sx1"
    c = _persistent(a, proto, cid, False, 1)
    c.subscribe(f"{r['t']}/sx1", 1)
    c.disconnect()
    time.sleep(2.5)
    c = _persistent(a, proto, cid, False, 0)
    sp = c.connack[1]
    c.disconnect()
    check(sp == 0, "session present 2.5 s after a 1 s session expiry")
    return "expiry 1 s: no session after 2.5 s"


def case_topic_alias(a, proto, r):
    t = f"{r['t']}/alias"
    sub = connect(a, proto)
    sub.subscribe(t, 1)
    pub = connect(a, proto)
    tam = getattr(pub.connack[2], "TopicAliasMaximum", 0)
    check(tam >= 1, "server Topic Alias Maximum is 0: topic aliases not accepted")
    pub.publish(t, "first", 1, props={"TopicAlias": 1})
    pub.publish("", "second", 1, props={"TopicAlias": 1})
    got = sub.recv_n(2)
    pub.disconnect()
    sub.disconnect()
    check(len(got) == 2, f"{len(got)} of 2 delivered")
    check(all(m.topic == t for m in got), f"topics {[m.topic for m in got]}")
    return f"alias maximum {tam}; alias set and used"


def case_topic_alias_zero(a, proto, r):
    # paho refuses to send Topic Alias 0, so this PUBLISH goes on a raw socket. MQTT 5
    # §3.3.2.3.4: alias 0 is a protocol error; the server closes (DISCONNECT 0x94).
    t = f"{r['t']}/alias0"
    sub = connect(a, proto)
    sub.subscribe(t, 0)
    body = _str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + b"\x00" + \
        _str(f"{r['id']}-a0")
    with socket.create_connection((a.host, a.v5), timeout=WAIT) as s:
        s.sendall(bytes([0x10]) + _varint(len(body)) + body)
        reply = s.recv(64)
        check(reply[:1] == b"\x20" and len(reply) >= 4 and reply[3] == 0,
              f"no CONNACK 0: {reply.hex()}")
        props = bytes([0x23]) + struct.pack("!H", 0)
        pub = _str(t) + _varint(len(props)) + props + b"zero"
        s.sendall(bytes([0x30]) + _varint(len(pub)) + pub)
        try:
            data = s.recv(64)
        except socket.timeout:
            data = None
    leaked = sub.drain(0.3)
    sub.disconnect()
    check(data is not None, "connection still open after a PUBLISH with Topic Alias 0")
    check(not leaked, "the PUBLISH with Topic Alias 0 was delivered")
    if data and data[0] == 0xE0 and len(data) >= 3:
        return f"raw socket: DISCONNECT reason {data[2]:#04x}"
    return f"raw socket: connection closed ({data.hex() or 'EOF'})"


def case_maximum_packet_size(a, proto, r):
    t = f"{r['t']}/maxpkt"
    sub = connect(a, proto, props={"MaximumPacketSize": 256})
    sub.subscribe(t, 0)
    pub = connect(a, proto)
    pub.publish(t, "small", 1)
    pub.publish(t, "L" * 1000, 1)
    pub.publish(t, "after", 1)
    got = sub.drain()
    alive = not sub.disconnected.is_set()
    pub.disconnect()
    sub.disconnect()
    sizes = [len(m.payload) for m in got]
    check(all(s < 256 for s in sizes), f"server sent a packet over the client's 256-byte "
          f"maximum (payload sizes {sizes})")
    check(sizes == [5, 5], f"payload sizes {sizes}, expected the two small ones")
    check(alive, "subscriber was disconnected")
    return "oversized message withheld, small ones delivered"


def case_no_local(a, proto, r):
    t = f"{r['t']}/nolocal"
    c = connect(a, proto)
    c.subscribe(t, 1, no_local=True)
    other = connect(a, proto)
    c.publish(t, "own", 1)
    other.publish(t, "other", 1)
    got = [m.payload for m in c.drain()]
    c.disconnect()
    other.disconnect()
    check(b"own" not in got, "own message delivered despite No Local")
    check(got == [b"other"], f"got {got}")
    return "own publish not echoed"


def case_receive_maximum(a, proto, r):
    t = f"{r['t']}/rxmax"
    sub = connect(a, proto, manual_ack=True, props={"ReceiveMaximum": 2})
    sub.subscribe(t, 1)
    pub = connect(a, proto)
    for i in range(5):
        pub.publish(t, f"m{i}", 1)
    first = sub.drain()
    n_unacked = len(first)
    for m in first:
        sub.c.ack(m.mid, m.qos)
    total = list(first)
    deadline = time.monotonic() + WAIT
    while len(total) < 5 and time.monotonic() < deadline:
        m = sub.recv(max(0.0, deadline - time.monotonic()))
        if m is None:
            break
        sub.c.ack(m.mid, m.qos)
        total.append(m)
    pub.disconnect()
    sub.disconnect()
    check(n_unacked <= 2, f"{n_unacked} QoS 1 messages in flight to a client with Receive "
          "Maximum 2")
    check(len(total) == 5, f"{len(total)} of 5 delivered after acknowledging")
    return f"{n_unacked} in flight before acks, 5 of 5 after"


COMMON = [
    ("connect_keepalive_0", case_keepalive_0),
    ("connect_empty_id_clean", case_empty_id_clean),
    ("connect_empty_id_persistent", case_empty_id_persistent),
    ("session_present", case_session_present),
    ("retained_receive", case_retained_receive),
    ("retained_clear", case_retained_clear),
    ("will_abnormal_disconnect", case_will_abnormal),
    ("will_not_on_disconnect", case_will_normal),
    ("unsubscribe", case_unsubscribe),
    ("overlapping_subscriptions", case_overlapping),
    ("dollar_topics_not_matched", case_dollar_topics),
    ("offline_queue", case_offline_queue),
]
V4_ONLY = [("mqtt31_connack", case_mqtt31)]
V5_ONLY = [
    ("session_expiry_zero", case_session_expiry_zero),
    ("session_expiry_elapsed", case_session_expiry_elapsed),
    ("topic_alias", case_topic_alias),
    ("topic_alias_zero_rejected", case_topic_alias_zero),
    ("maximum_packet_size", case_maximum_packet_size),
    ("no_local", case_no_local),
    ("receive_maximum", case_receive_maximum),
]


def emit(proto, case, ok, detail):
    print(json.dumps({"suite": "paho", "client": LIB, "protocol": proto, "case": case,
                      "result": "pass" if ok else "fail", "detail": detail}), flush=True)


def run_case(fn, a, proto, r, name):
    """Run one case in a thread under a deadline: a hung library call fails the case."""
    out = {}

    def body():
        try:
            out["ok"] = (True, fn(a, proto, r))
        except Failed as e:
            out["ok"] = (False, str(e))
        except Exception as e:  # a library error is a failed case, with its message
            out["ok"] = (False, f"{type(e).__name__}: {e}")

    th = threading.Thread(target=body, daemon=True)
    th.start()
    th.join(CASE_DEADLINE)
    ok, detail = out.get("ok", (False, f"case did not finish in {CASE_DEADLINE:.0f} s"))
    emit(proto, name, ok, detail)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--v4", type=int, default=0)
    ap.add_argument("--v5", type=int, default=0)
    ap.add_argument("--only", help="run only cases whose name contains this")
    ap.add_argument("--skip-chatter", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the cases, run nothing")
    ap.add_argument("--protocol", choices=("3.1.1", "5"), help="only this protocol version")
    a = ap.parse_args()
    run = uuid.uuid4().hex[:8]
    for proto in [a.protocol] if a.protocol else ["3.1.1", "5"]:
        tag = "v4" if proto == "3.1.1" else "v5"
        r = {"id": f"paho-{run}-{tag}", "t": f"ct/paho-{run}/{tag}"}
        cases = COMMON + (V5_ONLY if proto == "5" else V4_ONLY)
        if not a.skip_chatter:
            cases = [("wildcard_no_gateway_chatter", case_wildcard_chatter)] + cases
        if a.list:
            names = [f"qos_pub{p}_sub{s}" for s in range(3) for p in range(3)]
            for name in names + [n for n, _ in cases]:
                print(json.dumps({"suite": "paho", "protocol": proto, "case": name}))
            continue
        if not a.only or "qos" in a.only:
            out = {}

            def qos_body():
                try:
                    _qos_cases(a, proto, r, lambda n, ok, d: emit(proto, n, ok, d))
                except Failed as e:
                    out["err"] = str(e)
            th = threading.Thread(target=qos_body, daemon=True)
            th.start()
            th.join(60)
            if "err" in out or th.is_alive():
                emit(proto, "qos_setup", False, out.get("err", "QoS cases did not finish"))
        for name, fn in cases:
            if a.only and a.only not in name:
                continue
            run_case(fn, a, proto, r, name)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # do not wait for a hung daemon thread
