"""A broker set up by ``streampipe broker init-secure``, run by the real Mosquitto.

Who may do what is proved, not assumed: a refused publish is followed by an allowed one
from the same client, and the operator's subscriber must see the allowed one arrive
without the refused one before it (Mosquitto delivers one client's messages in order).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest import Capture
from faults import running

from streampipe.broker import PrivateMosquitto, free_port
from streampipe.cli import main
from streampipe.codec.frame import decode
from streampipe.codec.schema import SchemaRegistry
from streampipe.ingest import DEFAULT_ID as INGEST_ID
from streampipe.ingest.gateway import Gateway, GatewayConfig
from streampipe.ingest.mapping import load_mapping
from streampipe.secure import SecureSetup, init_secure
from streampipe.secure.mosquitto import check_password
from streampipe.topics import Topics
from streampipe.transport import (
    BrokerURL,
    ConnectError,
    Connection,
    InvalidCredentials,
    MQTTError,
    with_credentials,
)

ROOT = Topics("streampipe")
SENSOR = "boiler-1"
HA = "homeassistant"  # the discovery prefix the ACL grants edges
#: Foreign topics the gateway account reads by default (and the operator may write).
FOREIGN = ["zigbee2mqtt/#", "spBv1.0/#"]
Z2M = Path(__file__).resolve().parent.parent / "examples" / "ingest" / "z2m.toml"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureSetup, int]]:
    port = free_port()
    setup = init_secure(tmp_path_factory.mktemp("secure") / "broker", sensors=[SENSOR], port=port)
    with PrivateMosquitto(port, config=setup.path("mosquitto.conf"), tls=True):
        yield setup, port


def url(secure: tuple[SecureSetup, int], user: str | None, **overrides: str | None) -> BrokerURL:
    """A TLS URL for ``user``, with the set-up's CA, client certificate and password."""
    setup, port = secure
    files: dict[str, str | None] = {
        "ca_file": str(setup.path("ca.crt")),
        "cert_file": str(setup.path("client.crt")),
        "key_file": str(setup.path("client.key")),
        "password_file": str(setup.password_file(user)) if user else None,
    }
    files.update(overrides)
    return with_credentials(BrokerURL("localhost", port, tls=True, username=user), **files)  # type: ignore[arg-type]


def connect(u: BrokerURL) -> Connection:
    return Connection(u, f"test-{uuid.uuid4().hex[:8]}").connect(timeout=10)


@pytest.fixture
def operator(secure: tuple[SecureSetup, int]) -> Iterator[Capture]:
    cap = Capture(url(secure, "operator"), [f"{ROOT.root}/#", f"{HA}/#", *FOREIGN])
    yield cap
    cap.close()


def test_files_have_the_modes_a_secret_needs(secure):
    setup, _ = secure
    for name in ("passwd", "credentials", "server.key", "client.key", f"passwords/{SENSOR}"):
        assert setup.path(name).stat().st_mode & 0o777 == 0o600, name
    assert setup.dir.stat().st_mode & 0o077 == 0
    lines = setup.path("passwd").read_text().splitlines()
    assert {line.split(":")[0] for line in lines} == {
        "operator",
        "edge-1",
        "edge-2",
        "gateway",
        SENSOR,
    }
    assert all(check_password(line, setup.passwords[line.split(":")[0]]) for line in lines)
    assert setup.passwords["edge-1"] not in setup.path("passwd").read_text()


def test_the_operator_logs_in_over_tls(secure):
    conn = connect(url(secure, "operator"))
    assert conn.connected
    conn.close()


@pytest.mark.parametrize(
    ("case", "user", "overrides", "why"),
    [
        ("anonymous", None, {}, "Not authorized"),
        ("wrong password", "operator", {"password_file": "WRONG"}, "Not authorized"),
        ("unknown user", "nobody", {"password_file": "WRONG"}, "Not authorized"),
        ("no client certificate", "operator", {"cert_file": None, "key_file": None}, "client cert"),
        ("CA not trusted", "operator", {"ca_file": None}, "not trusted"),
    ],
)
def test_refused(secure, tmp_path, case, user, overrides, why):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    overrides = {k: str(wrong) if v == "WRONG" else v for k, v in overrides.items()}
    with pytest.raises(ConnectError, match=why):
        connect(url(secure, user, **overrides))


def test_a_client_of_another_ca_is_refused(secure, tmp_path):
    other = init_secure(tmp_path / "other", port=free_port())
    with pytest.raises(ConnectError, match="not trusted"):
        connect(url(secure, "operator", ca_file=str(other.path("ca.crt"))))
    # Trusting the broker is not enough: the broker must trust our certificate too.
    with pytest.raises(ConnectError, match="client certificates"):
        connect(
            url(
                secure,
                "operator",
                cert_file=str(other.path("client.crt")),
                key_file=str(other.path("client.key")),
            )
        )


def _publish(conn: Connection, topic: str, payload: bytes) -> None:
    assert conn.publish(topic, payload, qos=1).wait_for_publish(10) is None


@pytest.mark.parametrize(
    ("user", "refused", "allowed"),
    [
        (
            SENSOR,
            [ROOT.readings("boiler-2"), f"{ROOT.root}/models/default", ROOT.predictions(SENSOR)],
            ROOT.readings(SENSOR),
        ),
        (
            "gateway",
            [f"{ROOT.root}/models/default", ROOT.status("edge-1"), ROOT.control("edge-1")],
            ROOT.readings("x"),
        ),
        # `streampipe ingest` as the gateway account: its default id's status and dead
        # letters, and Sparkplug rebirth requests; not the devices' own topics.
        (
            "gateway",
            [
                ROOT.status("other"),
                ROOT.instance(INGEST_ID),
                "zigbee2mqtt/plug",
                "spBv1.0/g/NDATA/n",
            ],
            ROOT.status(INGEST_ID),
        ),
        (
            "gateway",
            [ROOT.deadletter("edge-1"), ROOT.events(INGEST_ID)],
            ROOT.deadletter(INGEST_ID),
        ),
        ("gateway", [], "spBv1.0/plant/NCMD/line1"),
        ("edge-1", [f"{ROOT.root}/models/default", ROOT.readings("x")], ROOT.predictions("x")),
        ("edge-1", [ROOT.control("edge-1")], ROOT.events("edge-1")),
        # --ha-discovery: sensor configs only, under the default prefix and its own node
        # id (another stage's entities are not its to overwrite); --last-value.
        (
            "edge-1",
            [
                f"{HA}/switch/edge-1/x/config",
                f"{HA}/sensor/edge-1/x/state",
                f"{HA}/sensor/edge-2/streampipe_edge-2_x_m/config",
                f"{HA}/sensor/streampipe_edge-1_x_m/config",
            ],
            f"{HA}/sensor/edge-1/streampipe_edge-1_x_m/config",
        ),
        ("edge-1", [], ROOT.last_value("x")),
        (SENSOR, [f"{HA}/sensor/x/config"], ROOT.readings(SENSOR)),
        # One stage's account cannot claim, stop or speak for another (issue 18 §7).
        (
            "edge-1",
            [
                ROOT.instance("edge-2"),
                ROOT.status("edge-2"),
                f"{ROOT.instance('edge-2')}/ping",
                ROOT.metrics("edge-2"),
                ROOT.deadletter("edge-2"),
                ROOT.events("edge-2"),
            ],
            ROOT.instance("edge-1"),
        ),
        ("operator", [], f"{ROOT.root}/models/default"),
    ],
)
def test_each_account_publishes_only_what_the_acl_grants(secure, operator, user, refused, allowed):
    conn = connect(url(secure, user))
    try:
        for topic in refused:
            _publish(conn, topic, b"refused " + topic.encode())
        marker = f"allowed {uuid.uuid4()}".encode()
        _publish(conn, allowed, marker)
        assert operator.wait(lambda: any(m.payload == marker for m in operator.on(allowed)), 10)
    finally:
        conn.close()
    got = [m.topic for m in operator.on("#") if m.payload.startswith(b"refused ")]
    assert got == []


def _round_trip(conn: Connection) -> None:
    """A SUBSCRIBE answered after anything the broker had already queued for us."""
    with contextlib.suppress(MQTTError):  # refused is an answer too
        conn.subscribe(f"{ROOT.root}/barrier/{uuid.uuid4().hex}")


@pytest.mark.parametrize(
    ("user", "topic_filter", "topic"),
    [
        (SENSOR, ROOT.predictions(), ROOT.predictions(SENSOR)),
        (SENSOR, ROOT.readings_filter()[0], ROOT.readings("boiler-2")),
        ("gateway", ROOT.predictions(), ROOT.predictions(SENSOR)),
        ("gateway", f"{ROOT.root}/#", ROOT.models("default")),
        ("edge-1", ROOT.predictions(), ROOT.predictions(SENSOR)),
        ("edge-1", ROOT.metrics(), ROOT.metrics("edge-2")),
        ("edge-1", f"{ROOT.root}/status/#", ROOT.instance("edge-2")),
        ("edge-1", ROOT.control(), ROOT.control("edge-2")),
    ],
)
def test_accounts_cannot_read_what_is_not_theirs(secure, user, topic_filter, topic):
    # A retained message is sent right after the SUBACK of a subscription it matches,
    # before the answer to any later request: the operator (the control) gets it.
    marker = f"secret {uuid.uuid4()}".encode()
    op = connect(url(secure, "operator"))
    try:
        op.publish(topic, marker, qos=1, retain=True).wait_for_publish(10)
        for who, may_read in ((user, False), ("operator", True)):
            cap = Capture(url(secure, who), [])
            try:
                try:
                    cap.conn.subscribe(topic_filter)
                except MQTTError as exc:  # Mosquitto may refuse the SUBSCRIBE itself
                    assert not may_read and "Not authorized" in str(exc)
                _round_trip(cap.conn)
                assert any(m.payload == marker for m in cap.on(topic)) is may_read, who
            finally:
                cap.close()
    finally:
        op.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        op.close()


def test_the_gateway_account_runs_streampipe_ingest(secure, operator):
    """`streampipe ingest` with the default id, as the gateway account: a Zigbee2MQTT
    device's state in, a native reading out, its status online and nothing refused."""
    gateway = Gateway(
        GatewayConfig(url(secure, "gateway"), INGEST_ID, load_mapping(Z2M), batch=1, linger=0.05)
    )
    device = f"plug-{uuid.uuid4().hex[:6]}"
    state = {"power": 118.2, "temperature": 21.5, "current": 0.52, "state": "ON"}
    with running(gateway.start()):
        assert operator.wait(lambda: _last(operator, ROOT.status(INGEST_ID)) == b"online", 10)
        op = connect(url(secure, "operator"))
        try:
            _publish(op, f"zigbee2mqtt/{device}", orjson.dumps(state))
        finally:
            op.close()
        topic = ROOT.readings(f"z2m.{device}")
        assert operator.wait(lambda: operator.on(topic), 10), gateway.stats
    assert operator.wait(lambda: _last(operator, ROOT.status(INGEST_ID)) == b"offline", 10)
    assert gateway.out.refused == {} and gateway.stats.rejected == {}
    schemas = SchemaRegistry()
    for m in operator.on(ROOT.schemas()):
        schemas.add_frame(m.payload, m.topic.rsplit("/", 1)[1])
    (reading,) = decode(operator.on(topic)[0].payload, schemas).readings()
    assert reading.y == 118.2
    assert reading.x == {"temperature": 21.5, "current": 0.52}


def test_the_gateway_maps_a_burst_over_tls(secure):
    """The gateway drives its connections itself (no paho network thread): over TLS the
    socket it waits on is an SSL object, read a record at a time. A burst of 2,000 is
    mapped and acknowledged whole, and the broker refuses none of its frames."""
    gateway = Gateway(
        GatewayConfig(url(secure, "gateway"), INGEST_ID, load_mapping(Z2M), linger=0.05)
    )
    n = 2_000
    with running(gateway.start()):
        op = Connection(url(secure, "operator"), f"burst-{uuid.uuid4().hex[:6]}", max_inflight=500)
        op.connect(timeout=10)
        try:
            infos = [
                op.publish(
                    f"zigbee2mqtt/plug-{i % 20}",
                    orjson.dumps({"power": float(i), "current": i / 100, "state": "ON"}),
                    qos=1,
                )
                for i in range(n)
            ]
            assert all(op.wait_published(info, 10) for info in infos)
        finally:
            op.close()
        assert gateway.wait_handled(n, 30), gateway.stats
    assert gateway.stats.readings == n and gateway.stats.acknowledged == n
    assert gateway.out.refused == {} and gateway.stats.rejected == {}


def _last(cap: Capture, topic: str) -> bytes | None:
    got = cap.on(topic)
    return got[-1].payload if got else None


def test_a_password_without_a_user_or_given_twice_is_refused(secure):
    setup, port = secure
    with pytest.raises(InvalidCredentials, match="needs a user name"):
        with_credentials(BrokerURL("localhost", port, tls=True), password="x")
    with pytest.raises(InvalidCredentials, match="has a password and --password-file"):
        with_credentials(
            BrokerURL("localhost", port, tls=True, username="u", password="x"),
            password_file=str(setup.password_file("edge-1")),
        )
    with pytest.raises(InvalidCredentials, match="cannot load CA file"):
        with_credentials(BrokerURL("localhost", port, tls=True), ca_file=str(setup.path("acl")))


def _csv(path: Path, rows: int) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y"])
        for i in range(rows):
            x = math.sin(i / 7)
            w.writerow([x, 3 * x + 1])
    return path


def test_edge_works_end_to_end_over_tls_and_no_password_is_shown(secure, operator, tmp_path):
    setup, port = secure
    tls = [
        "--ca-file",
        str(setup.path("ca.crt")),
        "--cert-file",
        str(setup.path("client.crt")),
        "--key-file",
        str(setup.path("client.key")),
    ]
    stage = "edge-2"  # its account is named by its stage id
    env = {**os.environ, "STREAMPIPE_PASSWORD_FILE": str(setup.password_file(stage))}
    edge = subprocess.Popen(
        [
            *(sys.executable, "-m", "streampipe", "--log-level", "DEBUG", "edge"),
            *("--broker", f"mqtts://{stage}@localhost:{port}", *tls),
            *("--stage-id", stage, "--metrics-port", "-1"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        if not operator.wait(
            lambda: any(m.payload == b"online" for m in operator.on(ROOT.status(stage))), 30
        ):
            edge.kill()
            pytest.fail(f"the edge did not come online: {edge.communicate(timeout=10)[1]}")
        with open(f"/proc/{edge.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        # A sensor account publishes its own readings, in frames small enough to use schemas.
        rows = 60
        code = main(
            [
                "replay",
                str(_csv(tmp_path / "boiler.csv", rows)),
                "--target",
                "y",
                "--device-id",
                SENSOR,
                "--batch",
                "5",
                "--broker",
                f"mqtts://{SENSOR}@localhost:{port}",
                "--password-file",
                str(setup.password_file(SENSOR)),
                *tls,
            ]
        )
        assert code == 0

        def seqs() -> set[int]:
            return {
                p["seq"]
                for body in operator.json(ROOT.predictions(SENSOR))
                for p in body["predictions"]
            }

        assert operator.wait(lambda: len(seqs()) == rows, 30), "predictions missing"
    finally:
        edge.send_signal(signal.SIGINT)
        _, err = edge.communicate(timeout=30)
    assert edge.returncode == 0, err
    assert seqs() == set(range(rows))
    assert operator.wait(lambda: operator.on(ROOT.status(stage))[-1].payload == b"offline", 10)
    for user in (stage, "operator", SENSOR):
        assert setup.passwords[user].encode() not in cmdline
        assert setup.passwords[user] not in err
    assert f"mqtts://{stage}:***@localhost:{port}" in err


def test_publishes_the_broker_refuses_are_an_error_not_a_success(secure):
    """A sensor account simulating devices it is not: the broker answers every publish
    with PUBACK 0x87 (not authorized). It printed "published 31 readings", exit 0."""
    setup, port = secure
    tls = ["--ca-file", str(setup.path("ca.crt")), "--cert-file", str(setup.path("client.crt"))]
    tls += ["--key-file", str(setup.path("client.key"))]
    result = subprocess.run(
        [
            *(sys.executable, "-m", "streampipe", "sensors", "--devices", "2"),
            *("--broker", f"mqtts://{SENSOR}@localhost:{port}", *tls),
            *("--password-file", str(setup.password_file(SENSOR)), "--prefix", "not-mine"),
            *("--duration", "1", "--rate", "20", "--no-faults"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("streampipe sensors: error: the broker refused ")
    assert "Not authorized" in last and "allowed to publish" in last
    assert "published" not in result.stdout
