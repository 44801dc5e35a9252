#!/usr/bin/env bash
# Installs what streampipe needs from the system on Debian/Ubuntu: Mosquitto (broker and
# command-line clients) and Python's venv module. Does nothing for what is already there.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    need+=(mosquitto)
fi
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ "${#need[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "Please install: ${need[*]} (no apt-get on this machine)" >&2
        exit 1
    fi
    echo "Installing ${need[*]} ..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian starts a system-wide Mosquitto on port 1883 when it installs it; streampipe's
# demo and tests start their own private brokers on free ports and do not need it.
echo "System dependencies present: $(command -v mosquitto || echo /usr/sbin/mosquitto)"
