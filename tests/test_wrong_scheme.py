"""mqtts:// to a plain MQTT port, and mqtt:// to a TLS one: the error says which to use.

Both against real Mosquitto listeners: the session's plain one, and a TLS one made by
``streampipe broker init-secure``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from streampipe.broker import PrivateMosquitto, free_port
from streampipe.secure import SecureSetup, init_secure
from streampipe.transport import BrokerURL, ConnectError, Connection


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureSetup, int]]:
    port = free_port()
    setup = init_secure(tmp_path_factory.mktemp("tls") / "broker", port=port)
    with PrivateMosquitto(port, config=setup.path("mosquitto.conf"), tls=True):
        yield setup, port


def sensors(broker: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streampipe", "sensors", "--broker", broker, "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mqtts_to_a_plain_port_says_it_did_not_answer_tls(broker):
    result = sensors(f"mqtts://127.0.0.1:{broker.port}")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"streampipe sensors: error: the broker at 127.0.0.1:{broker.port} did not answer TLS ("
    )
    assert line.endswith("): is it a plain MQTT port? use mqtt://")


def test_mqtt_to_a_tls_port_hints_at_mqtts(tls_broker):
    _, port = tls_broker
    result = sensors(f"mqtt://127.0.0.1:{port}")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"streampipe sensors: error: broker mqtt://127.0.0.1:{port} ")
    assert "closed the connection before answering" in line
    assert line.endswith(f"; is 127.0.0.1:{port} a TLS port? use mqtts://")


def test_a_tls_broker_that_is_not_trusted_is_not_taken_for_a_plain_one(tls_broker):
    """The hint is for a listener that speaks no TLS, not for a failed TLS one."""
    _, port = tls_broker
    with pytest.raises(ConnectError) as refused:
        Connection(BrokerURL("localhost", port, tls=True), "untrusted").connect(timeout=10)
    assert "is not trusted" in str(refused.value)
    assert "mqtt://" not in str(refused.value).replace(f"mqtts://localhost:{port}", "")
