"""Mosquitto's side of a secured broker: password hashes, the ACL and the configuration.

Everything here is text that Mosquitto 2.0 reads; nothing needs Mosquitto's own tools,
so the same code serves ``streampipe broker init-secure`` on a laptop and inside the
streampipe container image, which has no ``mosquitto_passwd``.

>>> line = password_line("edge", "s3cret", salt=bytes(12))
>>> line.split("$")[:3]
['edge:', '7', '101']
>>> check_password(line, "s3cret"), check_password(line, "wrong")
(True, False)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_STAGES",
    "ROLES",
    "STAGE_ROLE",
    "BrokerFiles",
    "acl_text",
    "check_password",
    "config_text",
    "password_line",
]

#: ``mosquitto_passwd``'s default: these passwords are random with ~190 bits of entropy,
#: which protects them, not the iteration count; a higher count costs every connect.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12

#: The accounts every secured broker has, besides one per sensor and one per edge
#: stage, and what they may do.
ROLES = {
    "operator": "reads everything; the only account that may publish models",
    "gateway": "publishes readings of any device: the simulator, CSV replays, "
    "gateways that forward for many devices",
}
#: What the account of an edge stage (named by its ``--stage-id``) may do. One account
#: per stage: a stage's login cannot claim, stop or speak for another stage.
STAGE_ROLE = (
    "one edge stage, named by its --stage-id: reads readings, schemas, models and its "
    "control topic; writes predictions (and their Home Assistant discovery configs), and "
    "its own metrics, dead letters, events, status and claim"
)
#: The stages of docker-compose.yml, and the accounts ``init-secure`` makes by default.
DEFAULT_STAGES = ("edge-1", "edge-2")


def password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    """One line of a Mosquitto 2.0 password file: PBKDF2-SHA512, the ``$7$`` format."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"{user}:$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(line: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` password-file line (as Mosquitto checks it)."""
    _user, _, hashed = line.partition(":")
    _, kind, iterations, salt, digest = hashed.split("$")
    if kind != "7":
        raise ValueError("not a PBKDF2-SHA512 ($7$) password line")
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(got, base64.b64decode(digest))


def acl_text(root: str, stages: Sequence[str] = DEFAULT_STAGES) -> str:
    """The ACL file for topic root ``root`` and edge ``stages``: who may publish and read what.

    >>> [line for line in acl_text("streampipe").splitlines() if line.startswith("pattern")]
    ['pattern write streampipe/readings/+/%u', 'pattern write streampipe/schemas/+']
    """
    return f"""\
# Mosquitto ACL for streampipe, topic root "{root}" (made by `streampipe broker
# init-secure`). With an ACL file Mosquitto denies every topic that no line allows,
# so what is not granted below is refused; anonymous clients get nothing at all.
#
#   <device id>  a sensor: publishes only its own readings (and schemas)
#   gateway      publishes the readings of any device (simulator, replays, gateways)
#   <stage id>   an edge stage: reads readings, schemas, models and its control
#                topic; writes predictions (and their Home Assistant discovery
#                configs), and its own metrics, dead letters, events, status
#                and claim (so one stage cannot stop another)
#   operator     reads and writes everything: the only account that publishes models

# Patterns apply to every user. %u is the user name Mosquitto authenticated; the
# client id (%c) is not used because any client may claim any client id.
pattern write {root}/readings/+/%u
# Frames of fewer than 32 readings name their fields by schema id, so whoever sends
# readings must be able to publish the retained schema ROOT/schemas/<id>. The id is a
# hash of the content and the edge refuses a schema published under another id, so a
# sensor cannot redefine another device's fields; it can only clear a retained schema,
# which costs edges that start later `unknown_schema` rejections until it is resent.
pattern write {root}/schemas/+

user gateway
topic write {root}/readings/#

{"".join(_stage_block(root, stage) for stage in stages)}\
user operator
topic readwrite {root}/#
# The Home Assistant discovery configs edges publish (and may need clearing).
topic readwrite homeassistant/#
"""


def _stage_block(root: str, stage: str) -> str:
    """The ACL lines of one edge stage's account, whose user name is its stage id."""
    return f"""\
user {stage}
topic read {root}/readings/#
topic read {root}/schemas/#
topic read {root}/models/#
topic read {root}/control/{stage}
topic write {root}/predictions/#
topic write {root}/metrics/{stage}
topic write {root}/deadletter/{stage}
topic write {root}/events/{stage}
# `edge --ha-discovery` with Home Assistant's default prefix: a sensor config per
# device (another --ha-discovery-prefix needs its own line). ROOT/predictions/#
# above already covers the retained last values (`--last-value`).
topic write homeassistant/sensor/+/config
# Its status, the retained claim that keeps a second process from running the stage,
# and the liveness probes of that claim: this stage's only.
topic readwrite {root}/status/{stage}
topic readwrite {root}/status/{stage}/#

"""


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Where the broker finds its files; paths as the broker sees them."""

    password_file: str
    acl_file: str
    ca_file: str
    cert_file: str
    key_file: str
    data_dir: str


def config_text(
    files: BrokerFiles,
    *,
    port: int = 8883,
    bind: str = "127.0.0.1",
    user: str | None = None,
    log_dest: str = "stderr",
    header: str = "",
) -> str:
    """A Mosquitto configuration: authenticated, ACL-checked, TLS only.

    ``user`` is who Mosquitto becomes when started as root (it must be able to read
    the files); ``None`` keeps Mosquitto's default, the ``mosquitto`` user.
    """
    run_as = (
        "# Started as root, Mosquitto drops to this user before reading the files above,\n"
        f"# so it must be their owner.\nuser {user}\n"
        if user
        else ""
    )
    return f"""\
{header}# Every client logs in; what each account may do is in the ACL file.
per_listener_settings false
allow_anonymous false
password_file {files.password_file}
acl_file {files.acl_file}

# TLS only: there is no plain-text listener. Clients must trust the CA that signed
# the broker's certificate, and present a client certificate signed by it.
listener {port} {bind}
cafile {files.ca_file}
certfile {files.cert_file}
keyfile {files.key_file}
require_certificate true
{run_as}
# Small MQTT packets are sent at once instead of waiting for Nagle's algorithm.
set_tcp_nodelay true

# Keep sessions, retained messages (stage status, schemas) and queued QoS 1 messages
# across a restart; save every second, since a crash loses what arrived since the last
# save (edges count such losses as sequence gaps). See brokers/mosquitto.conf.
persistence true
persistence_location {files.data_dir}/
autosave_interval 1

max_queued_messages 100000
max_inflight_messages 1000
max_packet_size 16777216

log_dest {log_dest}
log_type error
log_type warning
log_type notice
"""
