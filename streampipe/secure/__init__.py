"""``streampipe broker init-secure DIR``: a secured Mosquitto set up in one step.

:func:`init_secure` writes into ``DIR``:

================  =====  ===========================================================
``mosquitto.conf`` 0644  the broker's configuration: TLS only, logins, ACL (``mosquitto -c``)
``acl``            0644  who may publish and read what (:func:`~.mosquitto.acl_text`)
``passwd``         0600  PBKDF2-SHA512 password hashes, Mosquitto 2.0's format
``credentials``    0600  every account, its role and its password, for you to read
``passwords/USER`` 0600  one account's password, for ``--password-file``
``ca.crt``         0644  the development CA that clients trust (``--ca-file``)
``server.crt/key`` 0644/0600  the broker's certificate, for the given host names
``client.crt/key`` 0644/0600  a client certificate (``--cert-file``/``--key-file``)
``data/``          0700  Mosquitto's persistence
================  =====  ===========================================================

Passwords are random and are never printed: they are in the 0600 files only.

The accounts: ``operator``, ``gateway``, one per sensor (named by its device id) and
one per edge stage (named by its stage id, ``edge-1`` and ``edge-2`` unless
``stages`` says otherwise). A stage's account may write only its own status and claim,
so one stage's login cannot stop another (issue 18 §7). ``gateway`` also runs
``streampipe ingest`` (its default id): it reads the foreign ``ingest_topics``
(:data:`~.mosquitto.DEFAULT_INGEST_TOPICS` unless given).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     setup = init_secure(tmp + "/secure", sensors=["boiler-1"], stages=["edge-1"])
...     sorted(setup.roles.items())
[('boiler-1', 'sensor'), ('edge-1', 'edge'), ('gateway', 'gateway'), ('operator', 'operator')]
"""

from __future__ import annotations

import getpass
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streampipe.secure.certs import DevPKI, MissingCryptography
from streampipe.secure.mosquitto import (
    DEFAULT_INGEST_TOPICS,
    DEFAULT_STAGES,
    INGEST_ID,
    ROLES,
    BrokerFiles,
    acl_text,
    check_ingest_topic,
    config_text,
    password_line,
)
from streampipe.topics import DEFAULT_ROOT, Topics, check_name

__all__ = ["MissingCryptography", "SecureSetup", "SetupExists", "init_secure", "sensor_names"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class SetupExists(FileExistsError):
    """``DIR`` already holds a secured broker set-up."""


@dataclass(frozen=True, slots=True)
class SecureSetup:
    """What :func:`init_secure` made; ``passwords`` maps user -> password."""

    dir: Path
    port: int
    hosts: tuple[str, ...]
    roles: dict[str, str]
    passwords: dict[str, str] = field(repr=False)

    def path(self, name: str) -> Path:
        return self.dir / name

    def password_file(self, user: str) -> Path:
        return self.dir / "passwords" / user


def sensor_names(count: int, prefix: str = "sensor") -> list[str]:
    """Account names for ``count`` sensors, the ids ``streampipe sensors`` gives them.

    >>> sensor_names(2)
    ['sensor-000', 'sensor-001']
    """
    width = max(3, len(str(count - 1)))  # as SensorFleet numbers its devices
    return [f"{prefix}-{i:0{width}d}" for i in range(count)]


def _write(path: Path, data: bytes | str, mode: int) -> None:
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask must not widen or narrow it
        f.write(data)


def init_secure(
    directory: str | Path,
    *,
    sensors: Sequence[str] = (),
    stages: Sequence[str] = DEFAULT_STAGES,
    ingest_topics: Sequence[str] = DEFAULT_INGEST_TOPICS,
    hosts: Sequence[str] = (),
    port: int = 8883,
    bind: str = "127.0.0.1",
    topic_root: str = DEFAULT_ROOT,
    days: int = 825,
    force: bool = False,
) -> SecureSetup:
    """Create a secured Mosquitto set-up in ``directory`` (see the module docs)."""
    Topics(topic_root)  # a bad root is refused before anything is written
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, not {port}")
    for name in sensors:
        check_name(name, "sensor name")
        if name in ROLES:
            raise ValueError(f"sensor name {name!r} is taken by the {name} account")
    if len(set(sensors)) != len(sensors):
        raise ValueError("sensor names must differ from each other")
    for name in stages:
        check_name(name, "stage id")
        if name in ROLES:
            raise ValueError(f"stage id {name!r} is taken by the {name} account")
        if name in sensors:
            raise ValueError(f"stage id {name!r} is also a sensor account: name them apart")
        if name == INGEST_ID:  # the gateway account writes that id's status
            raise ValueError(f"stage id {name!r} is the ingest gateway's id: name them apart")
    if len(set(stages)) != len(stages):
        raise ValueError("stage ids must differ from each other")
    for topic_filter in ingest_topics:
        check_ingest_topic(topic_filter, topic_root)
    directory = Path(directory).resolve()
    if (directory / "passwd").exists() and not force:
        raise SetupExists(
            f"{directory} already holds a secured broker set-up; "
            "pass --force to replace it (every client then needs the new files)"
        )
    all_hosts = tuple(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    pki = DevPKI.create(all_hosts, days=days)

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "passwords").mkdir(mode=0o700, exist_ok=True)
    (directory / "data").mkdir(mode=0o700, exist_ok=True)
    roles = {
        **{user: user for user in ROLES},
        **{name: "edge" for name in stages},
        **{name: "sensor" for name in sensors},
    }
    passwords = {user: secrets.token_urlsafe(24) for user in roles}

    _write(directory / "ca.crt", pki.ca_cert_pem, 0o644)
    _write(directory / "server.crt", pki.server_cert_pem, 0o644)
    _write(directory / "server.key", pki.server_key_pem, 0o600)
    _write(directory / "client.crt", pki.client_cert_pem, 0o644)
    _write(directory / "client.key", pki.client_key_pem, 0o600)
    _write(
        directory / "passwd",
        "".join(password_line(u, p) + "\n" for u, p in passwords.items()),
        0o600,
    )
    _write(directory / "acl", acl_text(topic_root, stages, ingest_topics), 0o644)
    width = max(len(u) for u in roles)
    _write(
        directory / "credentials",
        "# streampipe broker accounts (streampipe broker init-secure): keep this file secret.\n"
        f"# {'user':<{width}}  {'role':<8}  password\n"
        + "".join(f"  {u:<{width}}  {roles[u]:<8}  {passwords[u]}\n" for u in roles),
        0o600,
    )
    for user, password in passwords.items():
        _write(directory / "passwords" / user, password + "\n", 0o600)
    files = BrokerFiles(
        password_file=str(directory / "passwd"),
        acl_file=str(directory / "acl"),
        ca_file=str(directory / "ca.crt"),
        cert_file=str(directory / "server.crt"),
        key_file=str(directory / "server.key"),
        data_dir=str(directory / "data"),
    )
    _write(
        directory / "mosquitto.conf",
        config_text(
            files,
            port=port,
            bind=bind,
            user=getpass.getuser(),
            header=f"# Mosquitto secured for streampipe: mosquitto -c {directory}/mosquitto.conf\n"
            "# Made by `streampipe broker init-secure`; certificates are for development.\n\n",
        ),
        0o644,
    )
    return SecureSetup(directory, port, all_hosts, roles, passwords)
