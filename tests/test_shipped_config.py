"""The shipped broker config works with the real Mosquitto binary."""

from __future__ import annotations

import re
from pathlib import Path

from streampipe.broker import PrivateMosquitto
from streampipe.transport import Connection

ROOT = Path(__file__).resolve().parent.parent


def test_dev_config_is_loopback_only_and_sets_what_streampipe_relies_on():
    conf = (ROOT / "brokers" / "mosquitto.conf").read_text()
    settings = dict(
        line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#")
    )
    assert settings["listener"].split() == ["1883", "127.0.0.1"]
    assert settings["set_tcp_nodelay"] == "true"
    assert settings["persistence"] == "true"


def test_dev_config_starts_mosquitto(tmp_path):
    conf = (ROOT / "brokers" / "mosquitto.conf").read_text()
    # Same settings, but on a free port and with persistence in this test's directory.
    conf = re.sub(r"^(listener|persistence\w*|log_\w+) .*$", "", conf, flags=re.M)
    with PrivateMosquitto(extra_config=conf, workdir=tmp_path) as broker:
        conn = Connection(broker.url, "config-check").connect()
        try:
            assert conn.connected
        finally:
            conn.close()
