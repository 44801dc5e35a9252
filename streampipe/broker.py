"""A private Mosquitto: started on a free loopback port with its own config, then stopped.

Used by ``streampipe demo``, the tests and the benchmarks, so none of them depends on a
broker that happens to be running.

>>> with PrivateMosquitto() as broker:  # doctest: +SKIP
...     print(broker.url)
mqtt://127.0.0.1:41883
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from streampipe.transport.url import BrokerURL

__all__ = ["MosquittoNotFound", "PrivateMosquitto", "free_port"]

INSTALL_HINT = (
    "Mosquitto is not installed. On Debian/Ubuntu: sudo apt-get install -y mosquitto "
    "(macOS: brew install mosquitto), or pass --broker mqtt://HOST:PORT of a running broker."
)


class MosquittoNotFound(RuntimeError):
    """No ``mosquitto`` binary on PATH."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PrivateMosquitto:
    """A Mosquitto process on ``127.0.0.1:<port>``, anonymous, with a config of its own.

    ``persistence=True`` keeps its database in its own directory, so a restart on the
    same port (:meth:`restart`) brings back retained messages and sessions.

    ``config=PATH`` runs that configuration file instead, unchanged (e.g. one made by
    ``streampipe broker init-secure --port PORT``); it must listen on ``127.0.0.1:port``,
    and ``tls=True`` says the listener speaks TLS, for :attr:`url`.

    ``user=NAME`` starts it as that user, with that user's group only (needs root): a
    test of how a config behaves for someone who is not root.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        persistence: bool = False,
        extra_config: str = "",
        workdir: Path | None = None,
        config: str | Path | None = None,
        tls: bool = False,
        user: str | None = None,
    ) -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
            None,
        )
        if binary is None:
            raise MosquittoNotFound(INSTALL_HINT)
        self.binary = binary
        if config is not None and port is None:
            raise ValueError("a given config needs the port it listens on")
        self.port = port or free_port()
        self.tls = tls
        self.user = user
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="streampipe-mqtt-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.log = self.dir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        if config is not None:
            self.config = Path(config)
            return
        self.config = self.dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            "max_inflight_messages 1000",
            "max_queued_messages 100000",
            "max_packet_size 16777216",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # keep access to our own temporary directory
        self.config.write_text("\n".join(lines) + "\n" + extra_config)

    @property
    def url(self) -> BrokerURL:
        return BrokerURL("127.0.0.1", self.port, tls=self.tls)

    def start(self, timeout: float = 10.0) -> PrivateMosquitto:
        as_user: dict[str, Any] = {}
        if self.user is not None:
            import pwd  # POSIX only, like running as another user

            pw = pwd.getpwnam(self.user)
            as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Not in the terminal's process group: Ctrl-C would stop the broker at once,
            # before the clients of the process that owns it (which stops it last).
            process_group=0,
            **as_user,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.process.returncode}: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM saves persistence; SIGKILL loses what was not saved)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> PrivateMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
