"""``brokers/mosquitto.conf``, set up as the README says, keeps sessions across a restart.

Started as root, Mosquitto switches to the user ``mosquitto`` (its ``user`` option);
started by anyone else it stays that user. Either way it must be able to write its
database directory, or every save fails with "Permission denied" and a restart forgets
every session and what was queued for it. Each test prepares a private copy of that
directory with the README's own commands, runs the shipped config changed only in its
port and directory, and restarts the broker under a persistent subscriber.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streampipe.broker import PrivateMosquitto, free_port
from streampipe.transport import BrokerURL, Connection, Message

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "brokers" / "mosquitto.conf"
README = ROOT / "README.md"
DB_DIR = "/tmp/streampipe-mosquitto"
START = "mosquitto -c brokers/mosquitto.conf"
QUEUED = 20


def readme_preparation() -> str:
    """The shell lines of "With your own broker" between installing and starting Mosquitto."""
    section = README.read_text().split("### With your own broker", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no ```sh block in the README's 'With your own broker'"
    lines = block.group(1).split("\n")
    first = next(i for i, line in enumerate(lines) if "apt-get install" in line) + 1
    text = "\n".join(lines[first:])
    assert START in text, f"the README's set-up no longer runs `{START}`"
    prepare = text.split(START, 1)[0].strip().removesuffix("&&").strip()
    assert DB_DIR in prepare, f"the README's set-up no longer prepares {DB_DIR}"
    return prepare


def derived_config(port: int, db_dir: Path) -> str:
    """The shipped config with only its listener port and persistence_location changed."""
    lines = SHIPPED.read_text().split("\n")
    for old, new in [
        ("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"),
        (f"persistence_location {DB_DIR}/", f"persistence_location {db_dir}/"),
    ]:
        assert lines.count(old) == 1, f"brokers/mosquitto.conf no longer has `{old}`"
        lines[lines.index(old)] = new
    return "\n".join(lines)


def as_user(name: str | None) -> dict[str, Any]:
    """subprocess arguments that run a command as ``name`` with its own group only."""
    if name is None:
        return {}
    import pwd

    pw = pwd.getpwnam(name)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


class Subscriber:
    """A persistent MQTT v5 session under a fixed client id; collects what it receives."""

    def __init__(self, url: BrokerURL, client_id: str) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self.conn = Connection(
            url, client_id, clean_start=False, session_expiry=600, on_message=self._on
        ).connect()

    def _on(self, msg: Message) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return [m.payload for m in self.messages]


@pytest.fixture(
    params=[None, "nobody"], ids=["as the user running the tests", "as an ordinary user"]
)
def run_as(request: pytest.FixtureRequest) -> str | None:
    if request.param is not None and os.geteuid() != 0:
        pytest.skip("only root can start Mosquitto as another user")
    return request.param


@pytest.fixture
def workdir(run_as: str | None) -> Iterator[Path]:
    """A directory that, like /tmp, lets the broker's user reach what is made inside it."""
    path = Path(tempfile.mkdtemp(prefix="streampipe-broker-config-"))
    path.chmod(0o755)
    if run_as is not None:
        ids = as_user(run_as)
        os.chown(path, ids["user"], ids["group"])
    yield path
    shutil.rmtree(path)


def test_shipped_config_set_up_as_the_readme_says_keeps_sessions_across_a_restart(
    run_as: str | None, workdir: Path
):
    db_dir = workdir / "streampipe-mosquitto"
    prepare = readme_preparation().replace(DB_DIR, str(db_dir))
    made = subprocess.run(
        ["sh", "-c", prepare], cwd=workdir, capture_output=True, text=True, **as_user(run_as)
    )
    assert made.returncode == 0, f"the README's preparation failed: {made.stderr}"
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(derived_config(port, db_dir))
    broker = PrivateMosquitto(port, config=config, workdir=workdir, user=run_as).start()
    try:
        topic = f"test-broker-config/{uuid.uuid4().hex[:8]}"
        client_id = f"broker-config-{uuid.uuid4().hex[:8]}"
        sub = Subscriber(broker.url, client_id)
        sub.conn.subscribe(topic, qos=1)
        sub.conn.close()

        sent = [f"queued {i}".encode() for i in range(QUEUED)]
        with Connection(broker.url, f"pub-{client_id}").connect() as pub:
            infos = [pub.publish(topic, body, qos=1) for body in sent]
            for info in infos:
                info.wait_for_publish(10)
                assert info.is_published(), "the broker did not acknowledge a QoS 1 message"

        broker.restart()  # SIGTERM, which saves the database, then the same config again

        back = Subscriber(broker.url, client_id)
        try:
            assert back.conn.session_present, "the broker forgot the session over a restart"
            assert back.wait_for(QUEUED) == sent
        finally:
            back.conn.close()
    finally:
        broker.stop()
    log = broker.log.read_text(errors="replace")
    assert "Permission denied" not in log, log
    assert (db_dir / "mosquitto.db").is_file()
