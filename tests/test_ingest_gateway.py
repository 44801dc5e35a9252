"""The ingest gateway through a real Mosquitto into a real edge: every foreign message
is learned once, predictions equal River's over what the gateway recorded, retained
replays and redeliveries are not learned twice, bad messages are dead letters.

The source here is a minimal JSON source (a double: the mapping itself is tested in
``test_ingest_mapping.py``); the gateway, the broker and the edge are real.
"""

from __future__ import annotations

import csv
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faults
import pytest
from paho.mqtt.client import topic_matches_sub
from replaying import predict_then_learn
from river import linear_model, preprocessing

from streampipe.edge import EdgeConfig, EdgeService
from streampipe.ingest import Incoming, Mapped, Unmappable
from streampipe.ingest.gateway import Gateway, GatewayConfig, Numbering
from streampipe.transport import BrokerURL, Connection


class PlainJson:
    """``dev/<device>`` with ``{"power": …, other numbers…}``; ``f_cnt`` is a counter."""

    name = "plain"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filters(self) -> list[str]:
        return [f"{self.prefix}/#"]

    def claims(self, topic: str) -> bool:
        return topic_matches_sub(f"{self.prefix}/+", topic)

    def map(self, m: Incoming) -> list[Mapped]:
        try:
            body = json.loads(m.payload)
        except ValueError:
            raise Unmappable("not_json", "payload is not JSON") from None
        device = m.topic.rsplit("/", 1)[1]
        counter = body.pop("f_cnt", None)
        y = body.pop("power", None)
        x = {k: v for k, v in body.items() if isinstance(v, int | float)}
        return [Mapped(device, x, y, ts=body.get("t"), counter=counter, counter_modulo=2**32)]

    def due(self, now: float) -> list[Mapped]:
        return []

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass


@contextmanager
def running(service: Any) -> Iterator[Any]:
    with faults.running(service.start()):
        yield service


def gateway(broker, topics, prefix: str, tmp_path: Path, **kw: Any) -> Gateway:
    return Gateway(
        GatewayConfig(
            broker.url,
            kw.pop("gateway_id", "gw"),
            [PlainJson(prefix)],
            topic_root=topics.root,
            batch=kw.pop("batch", 10),
            linger=0.05,
            record=str(tmp_path / "record.csv"),
            **kw,
        )
    )


def edge(broker, topics) -> EdgeService:
    return EdgeService(
        EdgeConfig(
            broker.url, "ingest-edge", topic_root=topics.root, metrics_port=None,
            metrics_interval=3600,
        )
    )  # fmt: skip


def rows(n: int, seed: int) -> list[dict[str, float]]:
    import random

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        v, a = 230 + rnd.gauss(0, 2), rnd.uniform(0.1, 5)
        out.append({"voltage": v, "current": a, "power": v * a * 0.95, "t": 1.7e9 + i})
    return out


def publish_all(broker, prefix: str, messages: list[tuple[str, dict | bytes]], **kw: Any) -> None:
    with Connection(broker.url, f"dev-{uuid.uuid4().hex[:8]}").connect() as conn:
        infos = [
            conn.publish(
                f"{prefix}/{device}",
                body if isinstance(body, bytes) else json.dumps(body).encode(),
                qos=1,
                **kw,
            )
            for device, body in messages
        ]
        for info in infos:
            info.wait_for_publish(10)


def recorded(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_message_is_learned_once_and_equals_river_offline(broker, topics, capture, tmp_path):
    prefix = f"{topics.root}-dev"
    data = {d: rows(60, seed=i) for i, d in enumerate(["kitchen", "garage"])}
    messages = [(d, data[d][i]) for i in range(60) for d in data]  # interleaved
    cap = capture([topics.predictions()])
    with running(edge(broker, topics)), running(gateway(broker, topics, prefix, tmp_path)) as gw:
        publish_all(broker, prefix, messages)
        assert cap.wait(lambda: sum(len(b["predictions"]) for b in cap.json("#")) >= 120)
    assert gw.stats.readings == 120 and gw.stats.acknowledged == 120
    got: dict[str, dict[int, Any]] = {d: {} for d in data}
    for body in cap.json("#"):
        for p in body["predictions"]:
            assert p["seq"] not in got[body["device"]], "a reading was predicted twice"
            got[body["device"]][p["seq"]] = p
    # What the gateway recorded, learned by River offline, gives the same predictions.
    rec = recorded(tmp_path / "record.csv")
    assert len(rec) == 120 and set(rec[0]) == {
        "device",
        "time",
        "current",
        "t",
        "voltage",
        "target",
    }
    for device in data:
        mine = [r for r in rec if r["device"] == device]
        offline = [
            ({k: float(r[k]) for k in ("voltage", "current", "t")}, float(r["target"]))
            for r in mine
        ]
        expected = predict_then_learn(
            offline, preprocessing.StandardScaler() | linear_model.LinearRegression()
        )
        assert [got[device][s]["y_pred"] for s in range(60)] == expected
        assert [float(r["time"]) for r in mine] == [row["t"] for row in data[device]]


def test_retained_state_is_not_learned_again_on_resubscribe(broker, topics, tmp_path):
    """Zigbee2MQTT publishes state retained: every resubscription replays the last one."""
    prefix = f"{topics.root}-z2m"
    state = str(tmp_path / "state")
    publish_all(broker, prefix, [("lamp", {"power": 5.0, "brightness": 200})], retain=True)
    with running(gateway(broker, topics, prefix, tmp_path, state_dir=state)) as gw:
        assert gw.wait_handled(1, 10)
        publish_all(broker, prefix, [("lamp", {"power": 6.0, "brightness": 210})], retain=True)
        assert gw.wait_handled(2, 10)
    assert (gw.stats.readings, gw.stats.retained_replays) == (2, 0)
    with running(gateway(broker, topics, prefix, tmp_path, state_dir=state)) as gw:
        assert gw.wait_handled(1, 10)  # the retained {"power": 6.0} again
        publish_all(broker, prefix, [("lamp", {"power": 7.0, "brightness": 220})], retain=True)
        assert gw.wait_handled(2, 10)
    assert (gw.stats.readings, gw.stats.retained_replays) == (1, 1)


def test_bad_messages_are_dead_letters_and_the_gateway_goes_on(broker, topics, capture, tmp_path):
    prefix = f"{topics.root}-bad"
    cap = capture([topics.deadletter("gw"), topics.predictions()])
    messages: list[tuple[str, dict | bytes]] = [
        ("ok", {"power": 1.0, "v": 2.0}),
        ("ok", b"not json{"),
        ("ok", {"power": "ON"}),  # nothing numeric: no features, target not a number
        ("ok", {"power": 2.0, "v": 3.0}),
    ]
    with running(edge(broker, topics)), running(gateway(broker, topics, prefix, tmp_path)) as gw:
        publish_all(broker, prefix, messages)
        publish_all(broker, f"{prefix}/too/deep", [("x", {"power": 1.0})])
        assert cap.wait(lambda: len(cap.on(topics.deadletter("gw"))) >= 3)
        assert cap.wait(
            lambda: sum(len(b["predictions"]) for b in cap.json(topics.predictions())) >= 2
        )
    reasons = sorted(b["reason"] for b in cap.json(topics.deadletter("gw")))
    assert reasons == ["no_rule", "not_json", "not_numeric"]
    assert gw.stats.readings == 2


def test_numbering_follows_the_source_counter():
    n = Numbering(epoch=5000)
    seqs = [
        n.number(Mapped("t", {"a": 1.0}, counter=c, counter_modulo=256)) for c in (254, 255, 0, 3)
    ]
    assert seqs == [(5000, 0), (5000, 1), (5000, 2), (5000, 5)]  # wraps; 1 and 2 missing
    assert n.number(Mapped("t", {"a": 1.0}, counter=3, counter_modulo=256)) is None
    assert n.number(Mapped("t", {"a": 1.0}, counter=100, counter_modulo=256)) == (5000, 102)
    assert n.number(Mapped("t", {"a": 1.0}, counter=1, counter_modulo=256)) == (5001, 0)  # reset


@pytest.mark.parametrize("batch", [1, 10])
def test_a_killed_gateway_loses_nothing_and_learns_nothing_twice(
    broker, topics, capture, tmp_path, batch
):
    """Published but neither checkpointed nor acknowledged (a crash), then restarted with
    its state: the broker redelivers, the gateway numbers the same readings alike, and the
    edge predicts each of them once."""
    prefix = f"{topics.root}-crash"
    cap = capture([topics.predictions(), topics.deadletter("ingest-edge")])
    state = str(tmp_path / "state")
    with running(edge(broker, topics)):
        gw = gateway(broker, topics, prefix, tmp_path, state_dir=state, batch=batch)
        gw.settle = lambda block=False: gw._tickets.clear()  # type: ignore[method-assign]
        with running(gw):
            publish_all(broker, prefix, [("m", r) for r in rows(20, seed=3)])
            assert gw.wait_handled(20, 10)
        assert gw.stats.acknowledged == 0
        with running(
            gateway(broker, topics, prefix, tmp_path, state_dir=state, batch=batch)
        ) as gw2:
            publish_all(broker, prefix, [("m", r) for r in rows(5, seed=4)])
            assert gw2.wait_handled(25, 10)
        assert gw2.stats.readings == 25  # the 20 again (none was acknowledged), and 5 new
        seqs = lambda: [p["seq"] for b in cap.json(topics.predictions()) for p in b["predictions"]]  # noqa: E731
        refused = lambda: sum(  # noqa: E731
            b.get("rejected_readings", 1) for b in cap.json(topics.deadletter("ingest-edge"))
        )
        assert cap.wait(lambda: len(seqs()) >= 25)
        # The edge's dead letters may come after its predictions: wait for them too.
        cap.wait(lambda: refused() >= 20, timeout=10)
    assert sorted(seqs()) == list(range(25))
    # the 20 the edge had: refused as already learned, not learned twice
    assert refused() == 20


def test_an_idle_gateway_waits_instead_of_spinning(broker, topics, tmp_path):
    """With nothing to do, the gateway waits on its sockets (up to 0.5 s a time): a wrong
    deadline once made it poll with no wait at all, burning a core while idle."""
    gw = gateway(broker, topics, f"{topics.root}-idle", tmp_path)
    calls = []
    run_once = gw.driver.run_once
    gw.driver.run_once = lambda timeout: calls.append(timeout) or run_once(timeout)  # type: ignore[method-assign]
    with running(gw):
        publish_all(broker, f"{topics.root}-idle", [("d", {"power": 1.0, "v": 2.0})])
        assert gw.wait_handled(1, 10)
        n = len(calls)
        time.sleep(1.0)  # not a wait for an event: the second of idleness observed
        assert len(calls) - n <= 6, f"{len(calls) - n} polls in a second"


def test_a_gateway_cut_from_the_broker_reconnects_and_loses_nothing(
    broker, topics, capture, tmp_path
):
    """Its two connections run on the gateway's own thread (no paho network thread), so
    the reconnects are its own: cut both mid-stream; what the devices publish meanwhile
    waits in the gateway's session, and every reading is predicted once."""
    prefix = f"{topics.root}-cut"
    proxy = faults.TcpProxy(broker.port)
    cap = capture([topics.predictions()])
    seqs = lambda: sorted(  # noqa: E731
        p["seq"] for b in cap.json(topics.predictions()) for p in b["predictions"]
    )
    gw = Gateway(
        GatewayConfig(
            BrokerURL("127.0.0.1", proxy.port), "gw-cut", [PlainJson(prefix)],
            topic_root=topics.root, batch=5, linger=0.05,
        )
    )  # fmt: skip
    try:
        with running(edge(broker, topics)), running(gw):
            publish_all(broker, prefix, [("m", r) for r in rows(30, seed=5)])
            assert cap.wait(lambda: len(seqs()) == 30)
            proxy.cut()
            publish_all(broker, prefix, [("m", r) for r in rows(30, seed=6)])
            proxy.restore()
            assert cap.wait(lambda: len(seqs()) >= 60)
            assert gw.input.connected and gw.out.connected
    finally:
        proxy.close()
    assert seqs() == list(range(60))
    assert gw.input.connects == 2 and gw.input.sessions_lost == 0 and gw.out.connects == 2
    assert gw.stats.readings == 60
