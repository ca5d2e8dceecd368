#!/usr/bin/env bash
# Attack soak (issue 12): every attack at once against the release gateway, beside 4 honest
# sensors at 1,000 QoS 1 readings/s, with a real upstream Mosquitto that goes away for a minute.
#
#   bench/soak.sh                         # 10 minutes; report on stdout, JSON in bench/results/soak.json
#   bench/soak.sh --duration 2m
#   bench/soak.sh --tmpfs 5               # data dir on a 5 MiB tmpfs (root): the queue fills the disk
#   bench/soak.sh --duration 2m -- --attacks flood,outage --flood-rate 400   # edgegate-bench soak options
#
# What it runs and measures: `edgegate-bench soak --help` and bench/src/soak.rs.
# Everything listens on 127.0.0.1; attackers connect from 127.0.0.11-18. Everything started here
# is stopped on exit, failure included.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DURATION=10m TMPFS_MIB="" JSON="$REPO/bench/results/soak.json"
while [ $# -gt 0 ]; do
    case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --tmpfs) TMPFS_MIB=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--duration 10m] [--tmpfs MIB] [--json FILE] [-- edgegate-bench soak options]"; exit 2 ;;
    esac
done
command -v mosquitto >/dev/null || { echo "needs mosquitto (apt-get install -y mosquitto)"; exit 1; }
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release --locked --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
fi
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
EG=${EG:-$TARGET/release/edgegate}
BENCH=${BENCH:-$TARGET/release/edgegate-bench}
mkdir -p "$(dirname "$JSON")"
WORK=$(mktemp -d /tmp/edgegate-soak.XXXXXX)
CLOUD=22883 EDGE=22884 EDGE_V5=22885 METRICS=22886
EG_PID="" BENCH_PID=""
cleanup() {
    if [ -n "$BENCH_PID" ]; then kill "$BENCH_PID" 2>/dev/null || true; wait "$BENCH_PID" 2>/dev/null || true; fi
    if [ -n "$EG_PID" ]; then kill -9 "$EG_PID" 2>/dev/null || true; wait "$EG_PID" 2>/dev/null || true; fi
    [ -f "$WORK/mq.pid" ] && kill -9 "$(cat "$WORK/mq.pid")" 2>/dev/null || true
    mountpoint -q "$WORK/data" 2>/dev/null && umount "$WORK/data" || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up"; return 1; }

# Thousands of sockets on both sides.
ulimit -n "$(ulimit -Hn)"

# The upstream: persistent (the cloud subscriber's session and its queued messages survive the
# outage's restart), no limit on messages queued for a subscriber.
mkdir -p "$WORK/mq"
cat >"$WORK/cloud.conf" <<CONF
listener $CLOUD 127.0.0.1
allow_anonymous true
max_queued_messages 0
persistence true
persistence_location $WORK/mq/
pid_file $WORK/mq.pid
log_dest file $WORK/mq.log
user root
CONF
mosquitto -c "$WORK/cloud.conf" -d 2>/dev/null
wait_port $CLOUD

# The gateway: built-in defaults, the shipped rules, listeners on loopback.
mkdir -p "$WORK/data"
if [ -n "$TMPFS_MIB" ]; then
    mount -t tmpfs -o size="${TMPFS_MIB}m" tmpfs "$WORK/data"
fi
cat >"$WORK/edgegate.toml" <<CONF
[gateway]
id = "soak"
data_dir = "$WORK/data"
log_level = "warn"
[broker]
listen = "127.0.0.1:$EDGE"
listen_v5 = "127.0.0.1:$EDGE_V5"
allow_anonymous = true
[upstream]
url = "mqtt://127.0.0.1:$CLOUD"
[metrics]
listen = "127.0.0.1:$METRICS"
CONF
sed -n '/^\[\[rules\]\]/,$p' config/edgegate.toml >>"$WORK/edgegate.toml"
"$EG" check-config --config "$WORK/edgegate.toml" >/dev/null
"$EG" run --config "$WORK/edgegate.toml" >"$WORK/eg.log" 2>&1 &
EG_PID=$!
wait_port $EDGE
wait_port $METRICS

echo "gateway pid $EG_PID (idle RSS $(awk '/VmRSS/ {print $2}' /proc/$EG_PID/status) kB), upstream mosquitto pid $(cat "$WORK/mq.pid")${TMPFS_MIB:+, data dir on a ${TMPFS_MIB} MiB tmpfs}"
status=0
"$BENCH" soak --edge 127.0.0.1:$EDGE --edge-v5 127.0.0.1:$EDGE_V5 --cloud 127.0.0.1:$CLOUD \
    --metrics 127.0.0.1:$METRICS --pid "$EG_PID" --duration "$DURATION" --json "$JSON" \
    --upstream-stop "kill \$(cat $WORK/mq.pid); while [ -f $WORK/mq.pid ]; do sleep 0.1; done" \
    --upstream-start "mosquitto -c $WORK/cloud.conf -d 2>/dev/null" "$@" &
BENCH_PID=$!
# In the background, so that a signal to this script stops everything at once.
wait "$BENCH_PID" || status=$?
BENCH_PID=""
if kill -0 "$EG_PID" 2>/dev/null; then
    echo "gateway still running at the end"
else
    wait "$EG_PID" && rc=0 || rc=$?
    echo "GATEWAY EXITED during the soak (status $rc)"
fi
[ -n "$TMPFS_MIB" ] && df -k "$WORK/data" | tail -1 | awk '{print "data dir at the end: " $3 " kB used of " $2}'
echo "gateway log: $(wc -l <"$WORK/eg.log") lines; last 15:"
tail -15 "$WORK/eg.log" | cut -c1-300
cp "$WORK/eg.log" "${JSON%.json}.gateway.log"
echo "JSON: $JSON"
exit $status
