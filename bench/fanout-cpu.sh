#!/bin/bash
# CPU of local fan-out (issue 13: every message the guard forwards is parsed, its stamp removed
# and its QoS lowered): the gateway (no reachable upstream, defaults) with 8 mosquitto_sub
# subscribers (QoS 1, sensors/#) and one paho publisher at 1,000 QoS 1 readings/s: 8,000
# deliveries/s. Prints the gateway's CPU (% of one core) over 20 s and what one subscriber got.
#
#   bench/fanout-cpu.sh target/release/edgegate new     # needs tests/setup.sh's venv (paho)
#
# Alternate two builds a few times: on a shared VM single runs vary by +-20 %.
set -u
BIN=$1; LABEL=${2:-edgegate}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p /tmp/fan
rm -rf /tmp/fan/data; mkdir -p /tmp/fan/data
cat > /tmp/fan/gw.toml <<EOT
[gateway]
id = "fan"
data_dir = "/tmp/fan/data"
[broker]
listen = "127.0.0.1:24883"
allow_anonymous = true
[metrics]
listen = "127.0.0.1:24884"
[upstream]
url = "mqtt://127.0.0.1:1"
EOT
$BIN run --config /tmp/fan/gw.toml >/tmp/fan/gw.log 2>&1 & GW=$!
sleep 1.5
for i in $(seq 1 8); do mosquitto_sub -p 24883 -q 1 -t 'sensors/#' -i sub$i > /tmp/fan/sub$i.out & done
sleep 1
"$HERE/tests/conformance/.venv/bin/python" - <<'PY' &
import time, paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fanpub")
c.max_inflight_messages_set(100)
c.connect("127.0.0.1", 24883); c.loop_start()
t0 = time.time(); n = 0
while time.time() - t0 < 22:
    c.publish(f"sensors/s{n%10}/t", '{"value": %d}' % n, qos=1); n += 1
    d = t0 + n / 1000 - time.time()
    if d > 0: time.sleep(d)
time.sleep(1); c.disconnect()
PY
PUB=$!
sleep 2
a=$(awk '{print $14+$15}' /proc/$GW/stat); sleep 20; b=$(awk '{print $14+$15}' /proc/$GW/stat)
wait $PUB
sleep 1
kill $GW; sleep 0.5; pkill -f "mosquitto_sub -p 24883"
echo "$LABEL cpu% $(( (b-a) * 100 / 2000 ))  ticks $((b-a))  lines/sub $(wc -l < /tmp/fan/sub1.out)"
