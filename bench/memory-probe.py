#!/usr/bin/env python3
"""Memory under hostile client behaviour (issue 12): one behaviour at a time against a running
gateway, then the gateway's VmHWM/VmRSS. Raw MQTT 3.1.1 over loopback, from many 127.x.y.z
source addresses (broker.max_connections_per_address). Against the release binary with the
defaults and no reachable upstream:

    cat > /tmp/mem.toml <<EOF
    [gateway]
    id = "mem"
    data_dir = "/tmp/mem-data"
    [broker]
    listen = "127.0.0.1:23883"
    allow_anonymous = true
    [metrics]
    listen = "127.0.0.1:23884"
    [upstream]
    url = "mqtt://127.0.0.1:1"
    EOF
    target/release/edgegate run --config /tmp/mem.toml & PID=$!
    ulimit -n 10000
    bench/memory-probe.py bigflood   $PID 262000 20 4    # 4 clients, 256 KB QoS 0 readings for 20 s
    bench/memory-probe.py partial    $PID 262000 950     # 950 connections holding a half-sent 256 KB publish
    bench/memory-probe.py deafsub    $PID 50 200000 600  # 50 subscribers that never read, 600 x 200 KB
    bench/memory-probe.py bigidle    $PID 900 250000     # 900 connections send one 250 KB publish, then idle
    bench/memory-probe.py bigidlesub $PID 900 250000     # the same with a subscriber to sensors/#
    bench/memory-probe.py fastsubs   $PID 40 250000 400  # 40 subscribers that read a burst of 400 x 250 KB
    PORT=23885 bench/memory-probe.py aliases $PID 200 4096 500  # 200 MQTT 5 clients, 4,096 topic aliases of 500 B each

(`aliases` needs `listen_v5 = "127.0.0.1:23885"` under [broker] and `max_topic_length = 1024`.)

Restart the gateway between behaviours (VmHWM is the process's peak).
"""
import socket, sys, time, threading, os, struct
PORT=int(os.environ.get("PORT","23883"))
def rl(n):
    out=b""
    while True:
        d=n%128; n//=128
        out+=bytes([d|(0x80 if n else 0)])
        if not n: return out
def connect(cid, addr="127.0.0.1"):
    s=socket.socket(); s.bind((addr,0)); s.connect(("127.0.0.1",PORT))
    vh=b"\x00\x04MQTT\x04\x02\x00\x3c"; p=struct.pack(">H",len(cid))+cid.encode()
    s.sendall(b"\x10"+rl(len(vh)+len(p))+vh+p); s.recv(4); return s
def publish(topic, payload, qos=0, pid=1):
    t=struct.pack(">H",len(topic))+topic.encode()
    body=t+(struct.pack(">H",pid) if qos else b"")+payload
    return bytes([0x30|(qos<<1)])+rl(len(body))+body
def hwm(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith(("VmHWM","VmRSS")): print(l.strip(), flush=True)
def subscribe(s, flt):
    t=flt.encode(); body=struct.pack(">H",1)+struct.pack(">H",len(t))+t+b"\x00"
    s.sendall(b"\x82"+rl(len(body))+body)
mode=sys.argv[1]; gpid=int(sys.argv[2])
if mode=="bigflood":
    size=int(sys.argv[3]); secs=float(sys.argv[4]); n=int(sys.argv[5])
    pay=b"x"*size; stop=time.time()+secs; cnt=[0]
    def run(i):
        s=connect(f"big{i}", f"127.0.0.{10+i}")
        while time.time()<stop:
            try: s.sendall(publish(f"sensors/big/{i}",pay)); cnt[0]+=1
            except Exception as e: print("err",e); return
    ts=[threading.Thread(target=run,args=(i,)) for i in range(n)]
    [t.start() for t in ts]
    while time.time()<stop: time.sleep(2); hwm(gpid)
    [t.join() for t in ts]; print("sent",cnt[0]); time.sleep(3); hwm(gpid)
elif mode=="partial":
    size=int(sys.argv[3]); n=int(sys.argv[4]); socks=[]
    for i in range(n):
        try:
            s=connect(f"p{i}", f"127.0.1.{1+i//90}")
            msg=publish(f"sensors/p/{i}", b"y"*size)
            s.sendall(msg[:-10]); socks.append(s)
        except Exception as e: print("conn",i,e); break
    print("holding",len(socks)); time.sleep(3); hwm(gpid)
if mode=="deafsub":
    n=int(sys.argv[3]); size=int(sys.argv[4]); count=int(sys.argv[5])
    subs=[]
    for i in range(n):
        s=connect(f"deaf{i}", f"127.0.2.{1+i//90}")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        subscribe(s, "big/#"); subs.append(s)
    time.sleep(1)
    p=connect("deafpub","127.0.3.1"); pay=b"q"*size
    for k in range(count):
        p.sendall(publish(f"big/{k%10}", pay))
        if k%20==0: time.sleep(0.05)
    time.sleep(5); hwm(gpid)
if mode in ("bigidle", "bigidlesub"):
    # One subscriber (reading everything) on other/# (nothing matches) or on sensors/#.
    n=int(sys.argv[3]); size=int(sys.argv[4])
    sub=connect("idle-sub","127.0.4.1"); subscribe(sub, "sensors/#" if mode=="bigidlesub" else "other/#")
    time.sleep(0.5)
    def drain():
        while True:
            try:
                if not sub.recv(1<<20): return
            except Exception: return
    threading.Thread(target=drain,daemon=True).start()
    socks=[]; pay=b"i"*size
    for i in range(n):
        try:
            s=connect(f"idle{i}", f"127.0.5.{1+i//90}"); s.sendall(publish(f"sensors/idle/{i}", pay)); socks.append(s)
        except Exception as e: print("conn",i,e); break
    print("holding",len(socks)); time.sleep(8); hwm(gpid)
if mode=="fastsubs":
    import selectors
    n=int(sys.argv[3]); size=int(sys.argv[4]); count=int(sys.argv[5])
    sel=selectors.DefaultSelector(); subs=[]
    for i in range(n):
        s=connect(f"fast{i}", f"127.0.6.{1+i//90}")
        subscribe(s, "big/#"); s.setblocking(False); sel.register(s, selectors.EVENT_READ); subs.append(s)
    got=[0]; stop=[False]
    def drain():
        while not stop[0]:
            for key,_ in sel.select(0.2):
                try:
                    d=key.fileobj.recv(1<<20); got[0]+=len(d)
                except Exception: pass
    th=threading.Thread(target=drain,daemon=True); th.start()
    time.sleep(1)
    p=connect("fastpub","127.0.3.2"); pay=b"q"*size
    for k in range(count): p.sendall(publish(f"big/{k%10}", pay))
    time.sleep(10); print("received MB", got[0]>>20); hwm(gpid)
if mode=="aliases":
    # MQTT 5 clients that each set `k` topic aliases (QoS 0 publishes, empty payload) on
    # topics of `length` bytes (the same topics for every client), then stay connected.
    n=int(sys.argv[3]); k=int(sys.argv[4]); length=int(sys.argv[5])
    def connect5(cid, addr):
        s=socket.socket(); s.bind((addr,0)); s.connect(("127.0.0.1",PORT))
        vh=b"\x00\x04MQTT\x05\x02\x00\x3c\x00"; p=struct.pack(">H",len(cid))+cid.encode()
        s.sendall(b"\x10"+rl(len(vh)+len(p))+vh+p); s.recv(64); return s
    topics=[(f"sensors/alias/{j}/".encode()+b"a"*length)[:length] for j in range(k)]
    socks=[]
    for i in range(n):
        try:
            s=connect5(f"alias{i}", f"127.0.7.{1+i//90}")
            batch=b""
            for j,t in enumerate(topics):
                body=struct.pack(">H",len(t))+t+b"\x03\x23"+struct.pack(">H",j+1)+b"v"
                batch+=b"\x30"+rl(len(body))+body
                if len(batch)>1<<16: s.sendall(batch); batch=b""
            s.sendall(batch); socks.append(s)
        except Exception as e: print("conn",i,e); break
    print("holding",len(socks)); time.sleep(8); hwm(gpid)
