#!/usr/bin/env bash
# Installs what streampipe needs from the system on Debian/Ubuntu: Mosquitto (broker and
# command-line clients), Prometheus (and promtool: the tests run a real Prometheus and
# check brokers/prometheus.yml and brokers/alerts.yml) and Python's venv module. Does
# nothing for what is already there.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    need+=(mosquitto)
fi
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    need+=(prometheus)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ "${#need[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "Please install: ${need[*]} (no apt-get on this machine)" >&2
        exit 1
    fi
    echo "Installing ${need[*]} ..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi
# Debian starts a system-wide Mosquitto (port 1883) and Prometheus (9090) when it installs
# them; streampipe's demo and tests start their own on free ports and do not need them.
echo "System dependencies present: $(command -v mosquitto || echo /usr/sbin/mosquitto)," \
    "$(command -v prometheus)"
