"""Shared fixtures: a real Mosquitto on a free loopback port, and MQTT message capture."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from paho.mqtt.client import topic_matches_sub

from streampipe.broker import PrivateMosquitto
from streampipe.topics import Topics
from streampipe.transport import BrokerURL, Connection, Message


@pytest.fixture(scope="session")
def broker() -> Iterator[PrivateMosquitto]:
    """One private Mosquitto for the session; every test works under its own topic root."""
    with PrivateMosquitto() as b:
        yield b


@pytest.fixture
def topics(request: pytest.FixtureRequest) -> Topics:
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]
    return Topics(f"test-{name}-{uuid.uuid4().hex[:6]}")


class Capture:
    """Collects the messages of some subscriptions; waits for conditions on them."""

    def __init__(self, url: BrokerURL, filters: list[str]) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self.conn = Connection(url, f"capture-{uuid.uuid4().hex[:8]}", on_message=self._on)
        self.conn.connect()
        self.conn.subscribe(filters, qos=1)

    def _on(self, msg: Message) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def on(self, topic_filter: str) -> list[Message]:
        """Messages received on topics that match an MQTT filter (``+`` and ``#`` work)."""
        with self._cond:
            return [m for m in self.messages if topic_matches_sub(topic_filter, m.topic)]

    def json(self, topic_filter: str) -> list[Any]:
        return [json.loads(m.payload) for m in self.on(topic_filter)]

    def wait(self, condition: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def capture(broker: PrivateMosquitto) -> Iterator[Callable[[list[str]], Capture]]:
    made: list[Capture] = []

    def make(filters: list[str]) -> Capture:
        c = Capture(broker.url, filters)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def fleet_bench() -> Any:
    """``benchmarks/fleet.py`` as a module: the fleet tests run its experiments."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fleet.py"
    spec = importlib.util.spec_from_file_location("fleet_benchmark", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # its dataclasses look it up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
