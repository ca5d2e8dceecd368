#!/usr/bin/env python3
"""Publish one reading (QoS 1) from each of N sensor topics to an MQTT 3.1.1 broker, over one
connection, and wait for every PUBACK: the load for measuring the gateway's memory with many
sensors (README, "Status page"). No dependencies: raw MQTT packets.

    bench/many-sensors.py HOST PORT N [ROUNDS]
"""
import socket
import struct
import sys


def remaining(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out)


def packet(kind, body):
    return bytes([kind]) + remaining(len(body)) + body


def string(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def read_packet(sock, buf):
    while True:
        if len(buf) >= 2:
            mult, n, i = 1, 0, 1
            while i < len(buf):
                n += (buf[i] & 127) * mult
                mult *= 128
                if not buf[i] & 128:
                    break
                i += 1
            else:
                i = None
            if i is not None and len(buf) >= i + 1 + n:
                p = bytes(buf[: i + 1 + n])
                del buf[: i + 1 + n]
                return p
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed")
        buf.extend(chunk)


def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    s = socket.create_connection((host, port))
    s.sendall(packet(0x10, string("MQTT") + bytes([4, 2]) + struct.pack("!H", 60) + string("many-sensors")))
    buf = bytearray()
    if read_packet(s, buf)[0] != 0x20:
        raise SystemExit("no CONNACK")
    pid, acked = 0, 0
    for r in range(rounds):
        for i in range(n):
            pid = pid % 65535 + 1
            topic = f"plant/area{i % 20}/device{i:05d}/temperature"
            payload = f'{{"value": {20 + (i + r) % 15}.5, "unit": "C"}}'.encode()
            s.sendall(packet(0x32, string(topic) + struct.pack("!H", pid) + payload))
            # Keep at most 100 unacknowledged.
            while (r * n + i + 1) - acked > 100:
                if read_packet(s, buf)[0] == 0x40:
                    acked += 1
    while acked < rounds * n:
        if read_packet(s, buf)[0] == 0x40:
            acked += 1
    s.sendall(bytes([0xE0, 0]))
    print(f"{rounds * n} readings from {n} topics acknowledged")


main()
