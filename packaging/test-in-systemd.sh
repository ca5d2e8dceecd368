#!/bin/bash
# Proof that edgegate works as a Debian service under a real systemd (issue 5).
#
# Runs as root on Debian 12 (amd64) and installs what it needs with apt-get:
#  1. build the amd64 .deb (cargo-deb);
#  2. debootstrap a bookworm minbase root filesystem, cached in $EDGEGATE_CACHE
#     (default /var/cache/edgegate-test), boot it with systemd-nspawn (volatile overlay, so the
#     cache stays clean; private network, so the host's ports do not matter) and reach its PID 1
#     with nsenter;
#  3. install the .deb; the unit verifies cleanly; its exposure score; it becomes active;
#  4. sensors publish (mosquitto_pub, QoS 1) and the readings land in the queue;
#  5. a rule change applied with `systemctl reload` takes effect (a drop rule);
#  6. kill -9 of the main process: systemd restarts it, the queue depth is unchanged;
#  7. journalctl -u edgegate shows structured entries (PRIORITY, TARGET, fields);
#  8. a graceful stop; 9. the arm64 binary, cross-built, under qemu-aarch64: publish -> queued;
# 10. apt-get purge removes binary, unit, configuration, state and user.
#
# Environment: EDGEGATE_CACHE (rootfs cache), CARGO_TARGET_DIR (respected), EDGEGATE_DEB (test
# this amd64 package instead of building one),
# EDGEGATE_SKIP_ARM64=1 (skip step 9 deliberately; otherwise a skipped step 9 fails the run).
# Prints PASS/FAIL/SKIPPED per check; the last line is a one-line summary; exit 0 only if every
# check passed.
set -uo pipefail

T0=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EDGEGATE_CACHE:-/var/cache/edgegate-test}
ROOTFS=$CACHE/rootfs-bookworm
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
WORK=$(mktemp -d /tmp/edgegate-systemd-test.XXXXXX)
MACHINE=edgegate-test-$$
CONF=/etc/edgegate/edgegate.toml
NS=""
PID1=""
ARM_PID=""
PASSED=0
FAILED=()
SKIPPED=()
FACTS=()

say() { echo "== $*"; }
pass() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
# fail NAME DETAIL...
fail() {
    local name=$1
    shift
    echo "FAIL: $name: $*"
    FAILED+=("$name")
}
skip() {
    local name=$1
    shift
    echo "SKIPPED: $name: $*"
    SKIPPED+=("$name")
}
fact() { FACTS+=("$*"); }

summary() {
    local secs=$(($(date +%s) - T0)) verdict=PASS
    local skipped_fail=0
    if [ ${#SKIPPED[@]} -gt 0 ] && [ "${EDGEGATE_SKIP_ARM64:-0}" != 1 ]; then skipped_fail=1; fi
    if [ ${#FAILED[@]} -gt 0 ] || [ $skipped_fail = 1 ]; then verdict=FAIL; fi
    local detail="${PASSED} passed, ${#FAILED[@]} failed${FAILED:+ (${FAILED[*]})}, ${#SKIPPED[@]} skipped${SKIPPED:+ (${SKIPPED[*]})}"
    local IFS=', '
    echo "test-in-systemd: $verdict: $detail; ${FACTS[*]}; ${secs}s"
    [ $verdict = PASS ]
}

# Stop here: a step everything after depends on failed.
abort() {
    fail "$@"
    summary
    exit 1
}

cleanup() {
    if [ -n "$ARM_PID" ] && kill -0 "$ARM_PID" 2>/dev/null; then kill -KILL "$ARM_PID" 2>/dev/null; fi
    if [ -n "$NS" ] && kill -0 "$NS" 2>/dev/null; then
        kill -TERM "$NS" 2>/dev/null
        for _ in $(seq 1 150); do kill -0 "$NS" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NS" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

ct() { nsenter -t "$PID1" -a "$@"; }    # inside the container (all namespaces)
net() { nsenter -t "$PID1" -n "$@"; }   # host binaries in the container's network namespace

# wait_for SECONDS COMMAND...: retry every 0.2 s.
wait_for() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt $deadline ] || return 1
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------------
say "0. prerequisites"
[ "$(id -u)" = 0 ] || abort prerequisites "must run as root (debootstrap, systemd-nspawn, nsenter)"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v curl >/dev/null || need+=(curl)
command -v jq >/dev/null || need+=(jq)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
        abort prerequisites "apt-get install ${need[*]} failed"
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb"
    cargo install --locked cargo-deb >/dev/null 2>&1 || abort prerequisites "cargo install cargo-deb failed"
fi
pass "prerequisites"

# ---------------------------------------------------------------------------------------------
say "1. build the amd64 package"
t=$(date +%s)
if [ -n "${EDGEGATE_DEB:-}" ]; then
    DEB=$EDGEGATE_DEB    # a package built earlier (e.g. by a previous CI step)
    [ -f "$DEB" ] || abort build-deb "EDGEGATE_DEB=$DEB does not exist"
    mkdir -p "$WORK/deb" && dpkg-deb -x "$DEB" "$WORK/deb"
    AMD64_SIZE=$(stat -c %s "$WORK/deb/usr/bin/edgegate")
    pass "using $DEB (stripped binary $AMD64_SIZE bytes)"
else
    DEB=$(cd "$REPO" && cargo deb 2>"$WORK/cargo-deb.log" | tail -n 1)
    if [ ! -f "$DEB" ]; then
        tail -n 30 "$WORK/cargo-deb.log"
        abort build-deb "cargo deb failed"
    fi
    AMD64_SIZE=$(stat -c %s "$TARGET_DIR/release/edgegate")
    pass "built $(basename "$DEB") in $(($(date +%s) - t))s (stripped binary $AMD64_SIZE bytes)"
fi
fact "amd64 binary ${AMD64_SIZE} B"

# ---------------------------------------------------------------------------------------------
say "2. root filesystem and boot"
if [ ! -e "$ROOTFS/.edgegate-rootfs-ok" ]; then
    echo "debootstrap bookworm into $ROOTFS (cached for the next runs)"
    mkdir -p "$CACHE"
    rm -rf "$ROOTFS.tmp"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$ROOTFS.tmp" \
        >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 20 "$WORK/debootstrap.log"
        abort rootfs "debootstrap failed"
    }
    touch "$ROOTFS.tmp/.edgegate-rootfs-ok"
    rm -rf "$ROOTFS"
    mv "$ROOTFS.tmp" "$ROOTFS"
fi
setsid systemd-nspawn -q -D "$ROOTFS" -M "$MACHINE" -b --register=no --keep-unit \
    --volatile=overlay --private-network --console=pipe \
    --bind-ro="$DEB:/root/edgegate.deb" >"$WORK/nspawn.log" 2>&1 </dev/null &
NS=$!
container_init() {
    PID1=$(awk '{print $1}' /proc/$NS/task/*/children 2>/dev/null | head -n 1)
    [ -n "$PID1" ] && [ "$(cat /proc/"$PID1"/comm 2>/dev/null)" = systemd ]
}
wait_for 30 container_init || { cat "$WORK/nspawn.log"; abort boot "container PID 1 not found"; }
wait_for 30 nsenter -t "$PID1" -a test -S /run/systemd/private || abort boot "container systemd not reachable"
state=$(timeout 60 nsenter -t "$PID1" -a systemctl is-system-running --wait 2>/dev/null)
case $state in
    running | degraded) pass "container booted ($state), PID 1 = host PID $PID1" ;;
    *) abort boot "container state '$state'" ;;
esac

# ---------------------------------------------------------------------------------------------
say "3. install"
if ct env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/edgegate.deb >"$WORK/install.log" 2>&1; then
    pass "apt-get install edgegate.deb"
else
    tail -n 20 "$WORK/install.log"
    abort install "apt-get install failed"
fi
UNIT=$(ct systemctl show -p FragmentPath --value edgegate.service)
verify=$(ct systemd-analyze verify "$UNIT" 2>&1)
if [ $? = 0 ] && [ -z "$verify" ]; then
    pass "systemd-analyze verify $UNIT: clean"
else
    fail verify "$verify"
fi
exposure=$(ct systemd-analyze security --no-pager edgegate.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for edgegate.service: \([0-9.]*\).*/\1/p')
if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }'; then
    pass "systemd-analyze security: exposure $exposure"
else
    fail security "exposure '${exposure:-unknown}' (want <= 2.0)"
fi
fact "exposure ${exposure:-?}"
if wait_for 30 sh -c "[ \"\$(nsenter -t $PID1 -a systemctl is-active edgegate)\" = active ]"; then
    pass "systemctl is-active edgegate: active; status: $(ct systemctl show -p StatusText --value edgegate)"
else
    ct journalctl -u edgegate --no-pager -n 30
    abort active "edgegate is $(ct systemctl is-active edgegate)"
fi
ct getent passwd edgegate >/dev/null && [ "$(ct stat -c %U /var/lib/edgegate)" = edgegate ] &&
    pass "runs as system user edgegate, state in /var/lib/edgegate" ||
    fail user "user edgegate or /var/lib/edgegate missing"
wd=$(ct systemctl show -p WatchdogUSec --value edgegate)
[ "$wd" = 30s ] && pass "watchdog armed (WatchdogUSec=$wd)" || fail watchdog "WatchdogUSec=$wd"

# ---------------------------------------------------------------------------------------------
say "4. sensors publish, readings are queued"
# publish PORT TOPIC COUNT: COUNT JSON readings at QoS 1 over one connection.
publish() {
    seq 1 "$3" | sed "s/.*/{\"seq\":&,\"temperature_c\":21.5}/" |
        net mosquitto_pub -h 127.0.0.1 -p "$1" -q 1 -i "test-sensor-$$" -t "$2" -l
}
depth() {
    ct setpriv --reuid=edgegate --regid=edgegate --clear-groups \
        env EDGEGATE__GATEWAY__DATA_DIR=/var/lib/edgegate \
        edgegate queue stats --config "$CONF" --json 2>/dev/null | jq -r .depth
}
depth_is() { [ "$(depth)" = "$1" ]; }
# metric NAME{LABELS}: its value on the container's metrics endpoint (0 when absent).
metric() {
    net curl -sf http://127.0.0.1:9883/metrics | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'
}
d0=$(depth)
if ! [[ $d0 =~ ^[0-9]+$ ]]; then
    fail queue "edgegate queue stats failed"
    d0=0
fi
publish 1883 sensors/greenhouse/t1 20 || fail publish "mosquitto_pub failed"
if wait_for 15 depth_is $((d0 + 20)); then
    pass "20 readings published on sensors/greenhouse/t1 -> queue depth $d0 -> $((d0 + 20))"
else
    fail queued "queue depth $(depth), expected $((d0 + 20))"
fi
in_total=$(metric edgegate_readings_received_total)
[ "${in_total%.*}" -ge 20 ] && pass "metrics endpoint: edgegate_readings_received_total $in_total" ||
    fail metrics "edgegate_readings_received_total = $in_total"

# ---------------------------------------------------------------------------------------------
say "5. rule change with systemctl reload"
d1=$(depth)
publish 1883 sensors/noise/n1 5
wait_for 10 depth_is $((d1 + 5)) || fail reload-before "sensors/noise/n1 not queued before the rule change"
d2=$(depth)
# The packaged configuration up to its first rule, then: drop sensors/noise/#, forward sensors/#.
{
    ct cat "$CONF" | sed '/^\[\[rules\]\]/,$d'
    cat <<'EOF'
[[rules]]
name = "drop-noise"
match = "sensors/noise/#"
action = "drop"

[[rules]]
name = "forward-sensors"
match = "sensors/#"
action = "forward"
EOF
} >"$WORK/reload.toml"
ct sh -c "cat > $CONF" <"$WORK/reload.toml"
if ! ct edgegate check-config --config "$CONF" >/dev/null 2>&1; then
    fail reload "the test configuration does not pass check-config: $(ct edgegate check-config --config "$CONF" 2>&1 | head -n 3)"
fi
pid_before=$(ct systemctl show -p MainPID --value edgegate)
drops_before=$(metric 'edgegate_events_dropped_total{reason="rule_drop"}')
reload_ok=1
if ! ct systemctl reload edgegate; then
    fail reload "systemctl reload failed (ExecReload)"
    reload_ok=0
fi
sleep 1
pid_after=$(ct systemctl show -p MainPID --value edgegate)
if [ "$(ct systemctl is-active edgegate)" != active ] || [ "$pid_after" != "$pid_before" ]; then
    fail reload "after SIGHUP the service is $(ct systemctl is-active edgegate), MainPID $pid_before -> $pid_after (SIGHUP not handled by the daemon?)"
    ct journalctl -u edgegate --no-pager -n 5
    reload_ok=0
    ct systemctl restart edgegate    # continue the other checks with the new configuration
    wait_for 30 sh -c "[ \"\$(nsenter -t $PID1 -a systemctl is-active edgegate)\" = active ]"
    drops_before=0
fi
publish 1883 sensors/noise/n1 5
publish 1883 sensors/greenhouse/t1 3
if wait_for 10 depth_is $((d2 + 3)); then
    sleep 0.5
    drops_after=$(metric 'edgegate_events_dropped_total{reason="rule_drop"}')
    if [ "$(depth)" = $((d2 + 3)) ] && [ $((${drops_after%.*} - ${drops_before%.*})) -ge 5 ]; then
        [ $reload_ok = 1 ] && pass "systemctl reload (same MainPID $pid_after): drop rule applied, 5 readings dropped (rule_drop $drops_before -> $drops_after), 3 others queued"
    else
        fail reload "drop rule not applied: depth $(depth) (want $((d2 + 3))), rule_drop $drops_before -> $drops_after"
    fi
else
    fail reload "after reload, depth $(depth), want $((d2 + 3)) (noise dropped, 3 queued)"
fi

# ---------------------------------------------------------------------------------------------
say "6. kill -9 of the main process"
d3=$(depth)
pid=$(ct systemctl show -p MainPID --value edgegate)
restarts0=$(ct systemctl show -p NRestarts --value edgegate)
ct sh -c "kill -9 $pid"
restarted() {
    local p
    p=$(nsenter -t "$PID1" -a systemctl show -p MainPID --value edgegate)
    [ "$p" != 0 ] && [ "$p" != "$pid" ] && [ "$(nsenter -t "$PID1" -a systemctl is-active edgegate)" = active ]
}
if wait_for 30 restarted; then
    restarts1=$(ct systemctl show -p NRestarts --value edgegate)
    d4=$(depth)
    if [ "$d4" = "$d3" ]; then
        pass "kill -9 $pid: restarted as $(ct systemctl show -p MainPID --value edgegate) (NRestarts $restarts0 -> $restarts1), queue depth $d3 unchanged"
    else
        fail kill9 "queue depth $d3 before kill -9, $d4 after"
    fi
    publish 1883 sensors/greenhouse/t1 2
    wait_for 10 depth_is $((d3 + 2)) && pass "accepting readings after the restart" ||
        fail kill9 "no readings queued after the restart (depth $(depth))"
else
    fail kill9 "not restarted: $(ct systemctl is-active edgegate), MainPID $(ct systemctl show -p MainPID --value edgegate)"
fi

# ---------------------------------------------------------------------------------------------
say "7. journal"
ct journalctl -u edgegate --no-pager -o json >"$WORK/journal.json" 2>/dev/null
structured=$(jq -c 'select(.SYSLOG_IDENTIFIER == "edgegate" and .TARGET != null and .PRIORITY != null)' "$WORK/journal.json" | wc -l)
with_fields=$(jq -c 'select(.TARGET != null) | del(.MESSAGE, .PRIORITY, .TARGET, .SYSLOG_IDENTIFIER, .SYSLOG_PID,
        .CODE_FILE, .CODE_LINE, .CODE_MODULE) | with_entries(select(.key | test("^[A-Z][A-Z0-9_]*$"))) |
        with_entries(select(.key | test("^(_|__|SYSLOG_|INVOCATION_ID|UNIT|USER_UNIT|MESSAGE_ID)") | not))
        | select(length > 0)' "$WORK/journal.json" | wc -l)
ct journalctl -u edgegate --no-pager -n 12
if [ "$structured" -gt 0 ] && [ "$with_fields" -gt 0 ]; then
    example=$(jq -r 'select(.TARGET != null and .PATH != null) | "PRIORITY=\(.PRIORITY) TARGET=\(.TARGET) PATH=\(.PATH) MESSAGE=\(.MESSAGE)"' "$WORK/journal.json" | head -n 1)
    pass "journal: $structured structured entries, $with_fields with context fields${example:+ (e.g. $example)}"
else
    fail journal "$structured entries with TARGET+PRIORITY, $with_fields with context fields"
fi
wdt=$(grep -c -i "watchdog timeout" <(ct journalctl --no-pager -u edgegate))
[ "$wdt" = 0 ] && pass "no watchdog timeouts" || fail watchdog "$wdt watchdog timeouts in the journal"

# ---------------------------------------------------------------------------------------------
say "8. graceful stop"
t=$(date +%s%N)
ct systemctl stop edgegate
ms=$((($(date +%s%N) - t) / 1000000))
result=$(ct systemctl show -p Result --value edgegate)
status=$(ct systemctl show -p ExecMainStatus --value edgegate)
if [ "$result" = success ] && [ "$status" = 0 ] && [ $ms -lt 20000 ]; then
    pass "systemctl stop: ${ms} ms, Result=$result, exit status $status"
else
    fail stop "Result=$result, exit status $status, ${ms} ms"
fi
depth_is $((d3 + 2)) && pass "queue intact after stop (depth $((d3 + 2)))" || fail stop "depth $(depth) after stop"

# ---------------------------------------------------------------------------------------------
say "9. arm64 binary under qemu-aarch64"
ARM_BIN=$TARGET_DIR/aarch64-unknown-linux-gnu/release/edgegate
if [ "${EDGEGATE_SKIP_ARM64:-0}" = 1 ]; then
    skip arm64 "EDGEGATE_SKIP_ARM64=1"
elif ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu &&
    ! rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1; then
    skip arm64 "rustup target add aarch64-unknown-linux-gnu failed (no rust-std for aarch64 reachable)"
else
    t=$(date +%s)
    line=$("$REPO/packaging/build-debs.sh" arm64 2>"$WORK/arm64-build.log" | tail -n 1)
    if [ -n "$line" ] && [ -x "$ARM_BIN" ]; then
        ARM_SIZE=$(stat -c %s "$ARM_BIN")
        fact "arm64 binary ${ARM_SIZE} B"
        pass "arm64 package built in $(($(date +%s) - t))s: $(echo "$line" | awk '{print $2}')"
        [ "$ARM_SIZE" -le 7000000 ] && pass "arm64 stripped binary $ARM_SIZE bytes (budget 7 MB, issue 16)" ||
            fail arm64-size "stripped binary $ARM_SIZE bytes, over the 7 MB budget"
        mkdir -p "$WORK/arm64-data"
        cat >"$WORK/arm64.toml" <<EOF
[gateway]
id = "arm64-smoke"
data_dir = "$WORK/arm64-data"
[broker]
listen = "127.0.0.1:1884"
allow_anonymous = true
[metrics]
listen = "127.0.0.1:9884"
[[rules]]
name = "forward-sensors"
match = "sensors/#"
action = "forward"
EOF
        QEMU=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
        # In the container's network namespace (free ports), with the host's files.
        # exec: $! must be the process that becomes qemu (nsenter -n does not fork), not a
        # subshell running the `net` function, or SIGTERM would end only the subshell.
        (exec nsenter -t "$PID1" -n env -u JOURNAL_STREAM -u NOTIFY_SOCKET -u WATCHDOG_USEC -u WATCHDOG_PID \
            "${QEMU[@]}" "$ARM_BIN" run --config "$WORK/arm64.toml") >"$WORK/arm64.log" 2>&1 &
        ARM_PID=$!
        arm_depth() { "${QEMU[@]}" "$ARM_BIN" queue stats --config "$WORK/arm64.toml" --json 2>/dev/null | jq -r .depth; }
        arm_depth_is() { [ "$(arm_depth)" = "$1" ]; }
        if wait_for 60 net curl -sf http://127.0.0.1:9884/healthz; then
            publish 1884 sensors/arm64/t1 10
            if wait_for 30 arm_depth_is 10; then
                pass "arm64 under qemu-aarch64: 10 readings published -> queue depth 10"
            else
                fail arm64 "queue depth $(arm_depth), want 10"
            fi
        else
            tail -n 20 "$WORK/arm64.log"
            fail arm64 "gateway under qemu-aarch64 not healthy within 60 s"
        fi
        kill -TERM "$ARM_PID" 2>/dev/null
        wait "$ARM_PID"
        rc=$?
        ARM_PID=""
        [ $rc = 0 ] && pass "arm64 gateway stopped on SIGTERM (exit 0)" || fail arm64 "exit status $rc after SIGTERM"
    else
        tail -n 20 "$WORK/arm64-build.log"
        fail arm64 "cross build failed"
    fi
fi

# ---------------------------------------------------------------------------------------------
say "10. purge"
if ct env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q edgegate >"$WORK/purge.log" 2>&1; then
    left=()
    for p in /usr/bin/edgegate /etc/edgegate /var/lib/edgegate /var/lib/private/edgegate \
        "$UNIT" /etc/systemd/system/multi-user.target.wants/edgegate.service; do
        ct test -e "$p" && left+=("$p")
    done
    ct getent passwd edgegate >/dev/null && left+=("user edgegate")
    ct getent group edgegate >/dev/null && left+=("group edgegate")
    st=$(ct dpkg-query -W -f '${db:Status-Status}' edgegate 2>/dev/null)
    case $st in "" | not-installed) ;; *) left+=("dpkg status $st") ;; esac
    [ -n "$(ct systemctl list-unit-files --no-legend edgegate.service 2>/dev/null)" ] && left+=("unit file registered")
    if [ ${#left[@]} = 0 ]; then
        pass "apt-get purge: binary, unit, configuration, state, user and group removed"
    else
        fail purge "left behind: ${left[*]}"
    fi
else
    tail -n 20 "$WORK/purge.log"
    fail purge "apt-get purge failed"
fi

summary
