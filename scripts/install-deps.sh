#!/usr/bin/env bash
# Installs from the system (Debian/Ubuntu) what streampipe needs and is missing, and
# nothing else:
#   --for demo   Mosquitto (the demo starts its own broker) and Python's venv module
#   --for test   also Mosquitto's command-line clients and Prometheus with promtool (the
#                tests run a real Prometheus and check brokers/prometheus.yml and
#                brokers/alerts.yml); the default
# Says nothing when everything is there.
set -euo pipefail

usage="usage: $0 [--for demo|test]"
purpose=test
while [ "$#" -gt 0 ]; do
    case "$1" in
        --for) purpose=${2:-}; shift 2 || { echo "$usage" >&2; exit 2; } ;;
        --for=*) purpose=${1#--for=}; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
case "$purpose" in
    demo|test) ;;
    *) echo "$usage" >&2; exit 2 ;;
esac

need=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    need+=(mosquitto)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ "$purpose" = test ]; then
    command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
    if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
        need+=(prometheus)
    fi
fi

[ "${#need[@]}" -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "Please install: ${need[*]} (no apt-get on this machine)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "Installing ${need[*]} ..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
# Debian starts a system-wide Mosquitto (port 1883) and Prometheus (9090) when it installs
# them; streampipe's demo and tests start their own on free ports and do not need them.
echo "Installed ${need[*]}"
