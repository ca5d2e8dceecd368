#!/usr/bin/env bash
# Side-by-side benchmarks: edgegate vs a Mosquitto bridge, same machine, same load, same run.
#
#   bench/run.sh            # all scenarios (~20 min); results in bench/results/*.json and a table
#   SCENARIOS="throughput latency" bench/run.sh
#   SCENARIOS=disk bench/run.sh   # edgegate alone: disk bytes, CPU and latency per event at
#                                 # 100/s and 1,000/s, link healthy (RATES, SECONDS, EG_ENV to vary)
#   PORT_BASE=31883 ...           # other ports (default 21883..21887), for parallel runs
#
# The peer: Mosquitto (Debian package) as the edge broker, bridged to a second Mosquitto playing the
# cloud (`topic sensors/# out 1 "" edge/gw1/`, cleansession false, max_queued_messages 0).
# edgegate uses the same cloud Mosquitto as its upstream (durable, queue.sync = "normal").
# The load tool is target/release/edgegate-bench (the workspace crate bench/, bench/src/main.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SCENARIOS=${SCENARIOS:-"queue throughput latency outage crash backlog cpu"}
OUT=${OUT:-$REPO/bench/results}
mkdir -p "$OUT"
command -v mosquitto >/dev/null || { echo "needs mosquitto (apt-get install -y mosquitto)"; exit 1; }
cargo build --release --locked --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
EG=${EG_BIN:-$TARGET/release/edgegate}  # EG_BIN: another build, e.g. to compare before/after
BENCH=$TARGET/release/edgegate-bench
WORK=$(mktemp -d /tmp/edgegate-bench.XXXXXX)
P=${PORT_BASE:-21883}
CLOUD=$P EDGE_MQ=$((P + 1)) EDGE_EG=$((P + 2)) RELAY=$((P + 3)) METRICS=$((P + 4))
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up"; return 1; }

start_cloud() {
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\npersistence false\n' $CLOUD >"$WORK/cloud.conf"
    mosquitto -c "$WORK/cloud.conf" >/dev/null 2>&1 & CLOUD_PID=$!; PIDS+=($CLOUD_PID); wait_port $CLOUD
}

# start_mosquitto_edge UPSTREAM_PORT PERSIST(true|false)
start_mosquitto_edge() {
    mkdir -p "$WORK/mq"
    cat >"$WORK/edge.conf" <<CONF
listener $EDGE_MQ 127.0.0.1
allow_anonymous true
max_queued_messages 0
persistence $2
persistence_location $WORK/mq/
user root
connection cloud
address 127.0.0.1:$1
topic sensors/# out 1 "" edge/gw1/
cleansession false
bridge_protocol_version mqttv311
CONF
    mosquitto -c "$WORK/edge.conf" >"$WORK/edge-mq.log" 2>&1 & EDGE_PID=$!; PIDS+=($EDGE_PID); wait_port $EDGE_MQ; sleep 0.5
}

# start_edgegate UPSTREAM_PORT [keep data]; EG_ENV: extra settings (e.g. batching)
start_edgegate() {
    [ "${2:-}" = keep ] || rm -rf "$WORK/eg"
    env ${EG_ENV:-} EDGEGATE__GATEWAY__ID=gw1 EDGEGATE__GATEWAY__DATA_DIR="$WORK/eg" EDGEGATE__BROKER__LISTEN=127.0.0.1:$EDGE_EG \
    EDGEGATE__METRICS__LISTEN=127.0.0.1:$METRICS EDGEGATE__UPSTREAM__URL=mqtt://127.0.0.1:$1 \
    EDGEGATE__UPSTREAM__RECONNECT_MAX=1s RUST_LOG=warn,rumqttd=off \
        "$EG" run >"$WORK/eg.log" 2>&1 & EDGE_PID=$!; PIDS+=($EDGE_PID); wait_port $EDGE_EG; sleep 0.5
}

stop_edge() { kill -TERM "$EDGE_PID" 2>/dev/null || true; wait "$EDGE_PID" 2>/dev/null || true; }
rss() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }

# load LABEL EDGE_PORT ARGS...
load() {
    local label=$1 port=$2; shift 2
    "$BENCH" load --edge 127.0.0.1:$port --cloud 127.0.0.1:$CLOUD --filter 'edge/gw1/#' --label "$label" \
        --json "$OUT/$label.json" "$@"
}

both() {  # both SCENARIO ARGS... : the same load against the bridge and against edgegate
    local sc=$1; shift
    start_mosquitto_edge $CLOUD false
    echo "idle RSS mosquitto-bridge: $(rss $EDGE_PID) kB" | tee "$OUT/$sc-mosquitto.idle"
    load "$sc-mosquitto" $EDGE_MQ --pid $EDGE_PID "$@"; stop_edge
    start_edgegate $CLOUD
    echo "idle RSS edgegate: $(rss $EDGE_PID) kB" | tee "$OUT/$sc-edgegate.idle"
    load "$sc-edgegate" $EDGE_EG --pid $EDGE_PID "$@"; stop_edge
    # edgegate again with upstream batches (CloudEvents JSON batches of up to 100 events).
    EG_ENV="$BATCHED" start_edgegate $CLOUD
    load "$sc-edgegate-batched" $EDGE_EG --pid $EDGE_PID "$@"; stop_edge
}
BATCHED="EDGEGATE__UPSTREAM__BATCH_EVENTS=100 EDGEGATE__UPSTREAM__INFLIGHT=1000"

start_cloud
for sc in $SCENARIOS; do
    echo "=== $sc"
    case $sc in
    queue)
        "$BENCH" queue --events 200000 --sync normal | tee "$OUT/queue-normal.txt"
        "$BENCH" queue --events 20000 --sync full | tee "$OUT/queue-full.txt" ;;
    throughput) both throughput --publishers 4 --rate 0 --seconds 10 --settle 20 ;;
    latency) both latency --publishers 4 --rate 1000 --seconds 20 --settle 10 ;;
    outage)
        start_mosquitto_edge $RELAY false
        load outage-mosquitto $EDGE_MQ --pid $EDGE_PID --rate 1000 --seconds 80 --settle 120 --relay $RELAY:$CLOUD --outage-start 10 --outage-secs 60; stop_edge
        start_edgegate $RELAY
        load outage-edgegate $EDGE_EG --pid $EDGE_PID --rate 1000 --seconds 80 --settle 120 --relay $RELAY:$CLOUD --outage-start 10 --outage-secs 60; stop_edge ;;
    crash)
        # kill -9 of the edge 8 s into a 20 s load at 1,000/s; restarted 1 s later.
        for sys in mosquitto mosquitto-persistent edgegate; do
            case $sys in
            mosquitto) start_mosquitto_edge $CLOUD false; port=$EDGE_MQ ;;
            mosquitto-persistent) start_mosquitto_edge $CLOUD true; port=$EDGE_MQ ;;
            edgegate) start_edgegate $CLOUD; port=$EDGE_EG ;;
            esac
            load crash-$sys $port --rate 1000 --seconds 20 --settle 20 & L=$!
            sleep 8; kill -9 $EDGE_PID; sleep 1
            case $sys in
            mosquitto) start_mosquitto_edge $CLOUD false ;;
            mosquitto-persistent) start_mosquitto_edge $CLOUD true ;;
            edgegate) start_edgegate $CLOUD keep ;;
            esac
            wait $L || true; stop_edge
        done
        # kill -9 during an outage (link down 5-25 s, kill at 15 s).
        for sys in mosquitto-persistent edgegate; do
            case $sys in
            mosquitto-persistent) start_mosquitto_edge $RELAY true; port=$EDGE_MQ ;;
            edgegate) start_edgegate $RELAY; port=$EDGE_EG ;;
            esac
            load crash-outage-$sys $port --rate 1000 --seconds 30 --settle 30 --relay $RELAY:$CLOUD --outage-start 5 --outage-secs 20 & L=$!
            sleep 15; kill -9 $EDGE_PID; sleep 1
            case $sys in
            mosquitto-persistent) start_mosquitto_edge $RELAY true ;;
            edgegate) start_edgegate $RELAY keep ;;
            esac
            wait $L || true; stop_edge
        done ;;
    disk)
        # Bytes written to disk per event (/proc/PID/io write_bytes: WAL, checkpoints, all),
        # CPU and latency, with defaults (plus EG_ENV), the link healthy.
        for rate in ${RATES:-100 1000}; do
            start_edgegate $CLOUD
            load disk-$rate-edgegate${DISK_LABEL:+-$DISK_LABEL} $EDGE_EG --pid $EDGE_PID --rate $rate --seconds ${SECONDS_PER_RATE:-20} --settle 5 |
                grep -E 'latency|CPU|sent' || true
            printf '  written to disk       %10.0f bytes/event\n' \
                "$(awk -F': ' '/"disk_bytes_per_event"/ {print $2+0}' "$OUT/disk-$rate-edgegate${DISK_LABEL:+-$DISK_LABEL}.json")"
            stop_edge
        done ;;
    cpu)
        # CPU at 1,000 events/s, three rounds of 20 s each, beside two references: the bridge, and
        # rumqttd alone (`edgegate-bench floor`: the gateway's router settings, no guard, one
        # link that takes every publish and drops it), the floor under anything edgegate adds.
        for round in 1 2 3; do
            start_mosquitto_edge $CLOUD false
            load cpu-mosquitto-$round $EDGE_MQ --pid $EDGE_PID --rate 1000 --seconds 20 --settle 5 >/dev/null; stop_edge
            "$BENCH" floor --listen 127.0.0.1:$EDGE_EG >"$WORK/floor.log" 2>&1 & EDGE_PID=$!; PIDS+=($EDGE_PID); wait_port $EDGE_EG
            load cpu-rumqttd-floor-$round $EDGE_EG --pid $EDGE_PID --rate 1000 --seconds 20 --settle 0 >/dev/null; stop_edge
            start_edgegate $CLOUD
            load cpu-edgegate-$round $EDGE_EG --pid $EDGE_PID --rate 1000 --seconds 20 --settle 5 >/dev/null; stop_edge
        done
        for sys in mosquitto rumqttd-floor edgegate; do
            printf '%-15s CPU %% of one core at 1,000 events/s, rounds 1-3: %s\n' "$sys" \
                "$(for r in 1 2 3; do awk -F': ' '/"cpu_pct"/ {printf "%.1f\n", $2}' "$OUT/cpu-$sys-$r.json"; done | paste -sd' ')"
        done | tee "$OUT/cpu.txt" ;;
    backlog)
        "$BENCH" drain --upstream mqtt://127.0.0.1:$CLOUD --events 1000000 --live 1000 --json "$OUT/backlog-edgegate.json" | tee "$OUT/backlog.txt"
        "$BENCH" drain --upstream mqtt://127.0.0.1:$CLOUD --events 1000000 --live 1000 --batch 100 --inflight 1000 --json "$OUT/backlog-edgegate-batched.json" | tee "$OUT/backlog-batched.txt" ;;
    esac
done
echo "results in $OUT"
