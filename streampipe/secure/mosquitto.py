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

from streampipe.ingest import DEFAULT_ID as INGEST_ID

__all__ = [
    "DEFAULT_INGEST_TOPICS",
    "DEFAULT_STAGES",
    "INGEST_ID",
    "ROLES",
    "STAGE_ROLE",
    "BrokerFiles",
    "acl_text",
    "check_ingest_topic",
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
    "`streampipe ingest` (which also reads the devices' own topics)",
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
#: The foreign topics ``streampipe ingest`` may read as the ``gateway`` account unless
#: ``init-secure --ingest-topic`` says otherwise: those of the mappings in
#: examples/ingest/ and docs/ingest.md.
DEFAULT_INGEST_TOPICS = (
    "zigbee2mqtt/#",
    "tele/+/SENSOR",  # Tasmota
    "+/events/rpc",  # Shelly Gen2
    "+/+/+/state",  # ESPHome: <node>/<domain>/<name>/state
    "spBv1.0/#",  # Sparkplug B
    "owntracks/#",
    "v3/+/devices/+/up",  # The Things Stack
    "homeassistant/+/+/+",  # Home Assistant's MQTT Statestream
)
#: Sparkplug B's topic namespace: a gateway that reads it may ask nodes for a rebirth.
SPARKPLUG = "spBv1.0"


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


def check_ingest_topic(topic_filter: str, root: str) -> str:
    """A foreign topic filter the gateway may read; never one that reaches into ``root``.

    >>> check_ingest_topic("zigbee2mqtt/#", "streampipe")
    'zigbee2mqtt/#'
    >>> check_ingest_topic("streampipe/#", "streampipe")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --ingest-topic 'streampipe/#' would let the gateway read under the topic ...
    """
    levels = topic_filter.split("/")
    bad = (
        not topic_filter
        or any(c in topic_filter for c in "\0\n\r")
        or any(("+" in lvl or "#" in lvl) and len(lvl) > 1 for lvl in levels)
        or "#" in levels[:-1]
    )
    if bad:
        raise ValueError(f"--ingest-topic {topic_filter!r} is not an MQTT topic filter")
    if levels[0] in ("#", root.split("/")[0]):
        raise ValueError(
            f"--ingest-topic {topic_filter!r} would let the gateway read under the topic root "
            f"{root}"
        )
    return topic_filter


def _sparkplug_commands(ingest_topics: Sequence[str]) -> list[str]:
    """The NCMD topics of the Sparkplug groups the gateway reads (rebirth requests).

    >>> _sparkplug_commands(["spBv1.0/plant/#", "spBv1.0/#", "tele/+/SENSOR"])
    ['spBv1.0/plant/NCMD/+', 'spBv1.0/+/NCMD/+']
    """
    groups = []
    for f in ingest_topics:
        levels = f.split("/")
        if levels[0] == SPARKPLUG:
            groups.append("+" if len(levels) < 2 or levels[1] == "#" else levels[1])
    return [f"{SPARKPLUG}/{g}/NCMD/+" for g in dict.fromkeys(groups)]


def acl_text(
    root: str,
    stages: Sequence[str] = DEFAULT_STAGES,
    ingest_topics: Sequence[str] = DEFAULT_INGEST_TOPICS,
) -> str:
    """The ACL file for topic root ``root``, edge ``stages`` and the foreign topics the
    ingest gateway reads: who may publish and read what.

    >>> [line for line in acl_text("streampipe").splitlines() if line.startswith("pattern")]
    ['pattern write streampipe/readings/+/%u', 'pattern write streampipe/schemas/+']
    """
    reads = "".join(f"topic read {check_ingest_topic(f, root)}\n" for f in ingest_topics)
    commands = "".join(f"topic write {t}\n" for t in _sparkplug_commands(ingest_topics))
    operator_foreign = "".join(f"topic readwrite {f}\n" for f in ingest_topics)
    if commands:
        commands = (
            "# Sparkplug B rebirth requests (a source's `rebirth = true`). The broker cannot\n"
            "# tell a rebirth from another node command: drop these lines if no source asks.\n"
            + commands
        )
    return f"""\
# Mosquitto ACL for streampipe, topic root "{root}" (made by `streampipe broker
# init-secure`). With an ACL file Mosquitto denies every topic that no line allows,
# so what is not granted below is refused; anonymous clients get nothing at all.
#
#   <device id>  a sensor: publishes only its own readings (and schemas)
#   gateway      publishes the readings of any device (simulator, replays,
#                `streampipe ingest`); reads the devices' own topics listed
#                below; writes the status and dead letters of gateway id "{INGEST_ID}"
#   <stage id>   an edge stage: reads readings, schemas, models and its control
#                topic; writes predictions (and their Home Assistant discovery
#                configs), and its own metrics, dead letters, events, status
#                and claim (so one stage cannot stop another)
#   operator     reads and writes everything (under the root, Home Assistant's and
#                the devices' topics): the only account that publishes models

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
# `streampipe ingest` (its default --id, "{INGEST_ID}"): its status (retained, and its
# will) and dead letters. A gateway of another --id needs these two lines for it.
topic write {root}/status/{INGEST_ID}
topic write {root}/deadletter/{INGEST_ID}
# The topics devices publish on that `streampipe ingest` maps to readings
# (`broker init-secure --ingest-topic`). A filter starting with + also matches the
# topics of its shape under {root}/ (+/events/rpc: the events of a stage named rpc);
# it lets the gateway read them, never write.
{reads}{commands}
{"".join(_stage_block(root, stage) for stage in stages)}\
user operator
topic readwrite {root}/#
# The Home Assistant discovery configs edges publish (and may need clearing).
topic readwrite homeassistant/#
# The devices' topics the gateway reads: to watch them, or to play devices there
# (`streampipe sensors --format z2m`). Real devices need accounts of their own.
{operator_foreign}"""


def _stage_block(root: str, stage: str) -> str:
    """The ACL lines of one edge stage's account, whose user name is its stage id."""
    from streampipe.homeassistant import node_id  # here: it imports the edge, and River

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
# device, under this stage's node id only (another --ha-discovery-prefix needs its
# own line). ROOT/predictions/# above already covers the retained last values.
topic write homeassistant/sensor/{node_id(stage)}/+/config
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
