#!/usr/bin/env python3
"""Router stall with many subscription filters (issue 12): N filters requested by N/100 clients
(100 each, from 127.0.0.2.. so the per-address limit does not interfere), then one sensor
publishes QoS 1 to NP new topics, one at a time; prints the PUBACK latency and a new client's
connect time. Before broker.max_filters, 10,000 filters stalled rumqttd's router for 40 s to
3 minutes. Uses the conformance suite's paho-mqtt (tests/setup.sh), against a gateway on
127.0.0.1:23883 with anonymous access:

    target/release/edgegate run --config bench/filter-stall.toml &
    tests/conformance/.venv/bin/python bench/filter-stall.py 10000 10000
"""
import sys, time, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
PORT=23883
nsub=int(sys.argv[1])
subs=[]
t0=time.time()
for c in range(nsub//100 if nsub else 0):
    cl=mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub{c}")
    cl.connect("127.0.0.1",PORT,bind_address=f"127.0.0.{2 + c//50}"); cl.loop_start()
    done=threading.Event(); cnt=[0]
    def on_sub(client,userdata,mid,rc,props,done=done,cnt=cnt):
        cnt[0]+=1
        if cnt[0]==100: done.set()
    cl.on_subscribe=on_sub
    for j in range(100):
        cl.subscribe(f"f/{c}/{j}/+/x",1)
    done.wait(60)
    subs.append(cl)
sub_s=time.time()-t0
# a sensor publishes QoS1 to 1000 new topics, one at a time; PUBACK latency
p=mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub")
t=time.time(); p.connect("127.0.0.1",PORT); p.loop_start()
lat=[]
NP=int(sys.argv[2]) if len(sys.argv)>2 else 1000
for i in range(NP):
    s=time.time(); info=p.publish(f"sensors/new{i}/v","1",qos=1); info.wait_for_publish(30); lat.append(time.time()-s)
lat.sort()
# a new client's connect time
ev=threading.Event(); c=mqtt.Client(CallbackAPIVersion.VERSION2, client_id="late"); c.on_connect=lambda *a: ev.set()
s=time.time(); c.connect("127.0.0.1",PORT); c.loop_start(); ev.wait(30); conn=time.time()-s
print(f"filters {nsub}: subscribe {sub_s:.2f}s; {NP} publishes to new topics: p50 {lat[len(lat)//2]*1000:.2f} ms p99 {lat[int(len(lat)*0.99)]*1000:.2f} ms max {lat[-1]*1000:.1f} ms total {sum(lat):.2f}s; new connect {conn*1000:.1f} ms")
