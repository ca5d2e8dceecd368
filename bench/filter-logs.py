#!/usr/bin/env python3
"""Memory held by rumqttd's per-filter logs (issue 12, open): N distinct filters subscribed by
N/100 clients, then 4 publishers send PER messages of SIZE bytes (QoS 1) to each filter's topic.
rumqttd keeps a log of up to broker.segment_size x (segment_count + 1) bytes per filter whether
or not the subscriber reads, so the gateway's RSS grows by about that much per filter: the
worst case under any client behaviour is broker.max_filters times it. Against a gateway on
127.0.0.1:23883 with anonymous access (see filter-stall.py):

    target/release/edgegate run --config bench/filter-stall.toml &
    tests/conformance/.venv/bin/python bench/filter-logs.py 100 12 100000   # then read VmRSS
"""
import sys, time, threading, os
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
PORT=23883
nf=int(sys.argv[1]); per=int(sys.argv[2]); size=int(sys.argv[3])
subs=[]
for c in range((nf+99)//100):
    cl=mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"lsub{c}")
    cl.connect("127.0.0.1",PORT,bind_address=f"127.0.0.{2 + c//50}"); cl.loop_start()
    for j in range(min(100, nf-c*100)):
        cl.subscribe(f"m/{c}/{j}",0)
    subs.append(cl)
time.sleep(1)
pubs=[]
for k in range(4):
    p=mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"lpub{k}")
    p.max_queued_messages_set(0)
    p.connect("127.0.0.1",PORT,bind_address=f"127.0.0.{60+k}"); p.loop_start(); pubs.append(p)
payload=b"x"*size
t=time.time()
for r in range(per):
    for c in range((nf+99)//100):
        for j in range(min(100, nf-c*100)):
            pubs[(c*100+j)%4].publish(f"m/{c}/{j}",payload,qos=1).wait_for_publish(30)
print(f"{nf} filters x {per} x {size} B published in {time.time()-t:.1f}s")
