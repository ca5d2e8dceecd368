#!/usr/bin/env bash
# Installs what the gateway and its tests need on a Debian machine (the README's first command and
# .ci/run both call it): a C compiler for the bundled SQLite; Mosquitto and its CLI clients (the
# stand-in cloud broker, and third-party clients in the tests); Chromium (the status page's tests
# open it headless); paho-mqtt in a venv and MQTT.js (the conformance suite's third-party clients).
# Debian packages need root: run as root, or as a user who may sudo. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq $(grep -v '^#' tests/debian-packages.txt) >/dev/null
# python3 may be Debian's (needs python3-venv for ensurepip) or one with venv built in; node/npm
# come with the machine, else from Debian.
python3 -c 'import venv, ensurepip' 2>/dev/null || $SUDO apt-get install -y -qq python3-venv >/dev/null
command -v npm >/dev/null || $SUDO apt-get install -y -qq nodejs npm >/dev/null
[ -x tests/conformance/.venv/bin/python ] || python3 -m venv tests/conformance/.venv
tests/conformance/.venv/bin/pip install -q --disable-pip-version-check -r tests/conformance/requirements.txt
(cd tests/conformance && npm ci --no-audit --no-fund --loglevel=error)
echo "setup done: cargo test runs every test"
