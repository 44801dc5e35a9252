"""docker-compose.yml, the Dockerfile and brokers/ agree with each other and with streampipe.

Docker cannot run here, so these tests read the files: every file a service mounts
exists, every service, port, volume and path that one file names is the one another
provides, streampipe's own parser accepts every command, and every metric that the
dashboard and the alert rules use is one an edge exports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streampipe import codec
from streampipe.broker import PrivateMosquitto, free_port
from streampipe.cli import build_parser
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.secure import init_secure
from streampipe.secure.mosquitto import acl_text
from streampipe.transport import BrokerURL, Connection, with_credentials

ROOT = Path(__file__).resolve().parent.parent
BROKERS = ROOT / "brokers"
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
STREAMPIPE = {name for name, s in SERVICES.items() if s.get("image") == "streampipe:local"}
EDGES = sorted(n for n in STREAMPIPE if (SERVICES[n].get("command") or [""])[0] == "edge")
UID = 10001  # the streampipe user of the Dockerfile


def mounts(service: str) -> dict[str, str]:
    """Container path -> source (a ./path on the host or a named volume)."""
    out = {}
    for spec in SERVICES[service].get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def host_file(service: str, container_path: str) -> Path:
    """The file in this repository that ``service`` sees at ``container_path``."""
    for target, source in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if source.startswith("./") and (
            container_path == target or container_path.startswith(target + "/")
        ):
            return ROOT / source / os.path.relpath(container_path, target)
    raise AssertionError(f"{service} mounts nothing from the repository at {container_path}")


def config_lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def body(text: str) -> str:
    """A config without its leading comment block (which says where it is used)."""
    return text.split("\n\n", 1)[1]


def args_of(service: str) -> Any:
    return build_parser().parse_args(SERVICES[service]["command"])


@pytest.fixture(scope="module")
def secure_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the init service's `streampipe broker init-secure` writes into /secure."""
    script = (BROKERS / "compose-init.sh").read_text()
    (line,) = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("streampipe ")]
    argv = shlex.split(line.split(">")[0].replace('"$DIR"', "/secure"))
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.broker_command, args.dir) == ("broker", "init-secure", "/secure")
    target = tmp_path_factory.mktemp("compose") / "secure"
    init_secure(target, sensors=["sensor-000"], hosts=args.host, bind=args.bind, port=free_port())
    return target


def in_secure(secure_dir: Path, container_path: str) -> Path:
    assert container_path.startswith("/secure/"), container_path
    return secure_dir / container_path.removeprefix("/secure/")


def test_every_mounted_file_exists_and_every_volume_is_declared():
    declared = set(COMPOSE["volumes"])
    used = set()
    for name in SERVICES:
        for source in mounts(name).values():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
        for dep in SERVICES[name].get("depends_on", []):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
    assert used == declared


def test_ports_are_on_loopback_and_distinct():
    published = []
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            host, host_port, _ = spec.split(":")
            assert host == "127.0.0.1", f"{name} publishes {spec} beyond this machine"
            published.append(int(host_port))
    assert len(published) == len(set(published))


def test_streampipe_commands_parse_and_point_at_the_compose_broker(secure_dir):
    broker_conf = config_lines((BROKERS / "mosquitto-secure.conf").read_text())
    (listener,) = [line for line in broker_conf if line[0] == "listener"]
    assert f"127.0.0.1:{listener[1]}:{listener[1]}" in SERVICES["mosquitto"]["ports"]
    assert EDGES == ["edge-1", "edge-2"] and "sensors" in STREAMPIPE
    for name in STREAMPIPE - {"init"}:
        args = args_of(name)
        url = BrokerURL.parse(
            SERVICES[name]["command"][SERVICES[name]["command"].index("--broker") + 1]
        )
        assert (url.tls, url.host, url.port) == (True, "mosquitto", int(listener[1]))
        assert url.password is None, "a password in a command is visible to everyone"
        env = SERVICES[name]["environment"]
        files = {k: env[f"STREAMPIPE_{k.upper()}"] for k in ("ca_file", "cert_file", "key_file")}
        password_file = env["STREAMPIPE_PASSWORD_FILE"]
        assert password_file == f"/secure/passwords/{url.username}"
        assert mounts(name)["/secure"] == "secure"
        # The same files, as init-secure writes them, make valid credentials.
        local = {k: str(in_secure(secure_dir, v)) for k, v in files.items()}
        with_credentials(url, password_file=str(in_secure(secure_dir, password_file)), **local)
        assert args.command in ("edge", "sensors")


def test_edges_serve_metrics_and_health_on_the_ports_compose_and_prometheus_use():
    prometheus = yaml.safe_load((BROKERS / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    targets = {t: sc["labels"]["stage"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {}
    for name in EDGES:
        args = args_of(name)
        assert args.metrics_host == "0.0.0.0"
        expected[f"{name}:{args.metrics_port}"] = args.stage_id
        assert any(p.endswith(f":{args.metrics_port}") for p in SERVICES[name]["ports"])
        health = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{args.metrics_port}/healthz" in health
        assert SERVICES[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert targets == expected
    # The edges split the fleet: every partition served, by exactly one of them.
    served = [p for n in EDGES for p in args_of(n).partitions]
    assert sorted(served) == list(range(64))


def test_prometheus_and_grafana_files_are_where_their_configs_look():
    prometheus = yaml.safe_load((BROKERS / "prometheus.yml").read_text())
    config = "/etc/prometheus/prometheus.yml"
    assert host_file("prometheus", config) == BROKERS / "prometheus.yml"
    for rules in prometheus["rule_files"]:
        assert host_file("prometheus", str(Path(config).parent / rules)) == BROKERS / rules

    (source,) = yaml.safe_load(
        host_file("grafana", "/etc/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in SERVICES["prometheus"]["ports"]
    (provider,) = yaml.safe_load(
        host_file("grafana", "/etc/grafana/provisioning/dashboards/streampipe.yml").read_text()
    )["providers"]
    dashboards = host_file("grafana", provider["options"]["path"])
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_file("grafana", home).parent == dashboards
    for path in dashboards.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == source["uid"]
            assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])


def exported_families() -> list[Any]:
    """What an edge serves on /metrics, with a rejection and a scored prediction so that
    every family has samples."""
    service = EdgeService(EdgeConfig(BrokerURL("127.0.0.1", 1), "names"))
    service.stats.reject("malformed")
    scored = Batch.from_readings([Reading("d1", 0, time.time(), {"a": 1.0}, 2.0)])
    service.stage.handle(service.topics.readings("d1"), codec.encode(scored))
    service.stats.count_drift(service.stats.model_name)
    return list(text_string_to_metric_families(generate_latest(service.registry).decode()))


def test_metric_label_sets_are_the_documented_bounded_ones():
    labels = {
        f.name: {k for s in f.samples for k in s.labels if k != "le"}
        for f in exported_families()
        if f.name.startswith("streampipe_")
    }
    assert labels.pop("streampipe_rejected") == {"reason"}
    assert labels.pop("streampipe_model_info") == {"model", "version"}
    assert labels.pop("streampipe_build_info") == {"version"}
    assert labels.pop("streampipe_drifts") == {"model"}
    assert labels.pop("streampipe_limit") == labels.pop("streampipe_limit_used") == {"limit"}
    for name in ("mae", "rmse", "r2"):
        assert labels.pop(f"streampipe_model_{name}") == {"model", "window"}
    assert all(keys == set() for keys in labels.values()), labels


def exported_metric_names() -> set[str]:
    names = set()
    for family in exported_families():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def test_dashboard_and_alerts_use_only_metrics_the_edge_exports():
    exprs = [
        target["expr"]
        for panel in json.loads((BROKERS / "grafana/dashboards/streampipe.json").read_text())[
            "panels"
        ]
        for target in panel["targets"]
    ]
    rules = yaml.safe_load((BROKERS / "alerts.yml").read_text())["groups"][0]["rules"]
    exprs += [rule["expr"] for rule in rules]
    used = {m for e in exprs for m in re.findall(r"\bstreampipe_[a-z0-9_]+", e)}
    assert used - exported_metric_names() == set()
    for wanted in ("readings_received", "predictions", "rejected", "model_mae", "model_rmse"):
        assert any(wanted in m for m in used), wanted
    assert {r["alert"] for r in rules} >= {
        "StreampipeStageDown",
        "StreampipeRollingMAEHigh",
        "StreampipeRejectingInput",
        "StreampipeSequenceGaps",
    }


def test_shipped_broker_config_and_acl_are_what_init_secure_writes(secure_dir):
    assert (BROKERS / "mosquitto-secure.acl").read_text() == acl_text("streampipe")
    shipped = (BROKERS / "mosquitto-secure.conf").read_text()
    generated = (secure_dir / "mosquitto.conf").read_text()
    # The same settings; only paths, address, log destination and `user` differ.
    norm = re.compile(rf"{re.escape(str(secure_dir))}|/secure|/mosquitto/config|/mosquitto")
    drop = {"user", "listener", "log_dest"}
    assert [
        line for line in config_lines(norm.sub("D", body(generated))) if line[0] not in drop
    ] == [line for line in config_lines(norm.sub("D", body(shipped))) if line[0] not in drop]
    conf = {line[0]: line[1:] for line in config_lines(shipped)}
    assert conf["allow_anonymous"] == ["false"] and conf["require_certificate"] == ["true"]
    assert host_file("mosquitto", conf["acl_file"][0]) == BROKERS / "mosquitto-secure.acl"
    assert host_file("mosquitto", "/mosquitto/config/mosquitto.conf") == (
        BROKERS / "mosquitto-secure.conf"
    )
    for key in ("password_file", "cafile", "certfile", "keyfile"):
        assert mounts("mosquitto")["/secure"] == "secure"
        assert in_secure(secure_dir, conf[key][0]).is_file(), key


def test_shipped_broker_config_runs_in_mosquitto(secure_dir, tmp_path):
    """brokers/mosquitto-secure.conf with this machine's paths: the real broker takes it."""
    port = free_port()
    text = (BROKERS / "mosquitto-secure.conf").read_text()
    text = text.replace("/secure/", f"{secure_dir}/")
    text = text.replace("/mosquitto/config/acl", str(BROKERS / "mosquitto-secure.acl"))
    text = text.replace("/mosquitto/data/", f"{tmp_path}/")
    text = text.replace("listener 8883 0.0.0.0", f"listener {port} 127.0.0.1")
    if os.geteuid() == 0:
        text += "user root\n"
    (tmp_path / "mosquitto.conf").write_text(text)
    url = with_credentials(
        BrokerURL("mosquitto", port, tls=True, username="edge-1"),
        password_file=str(secure_dir / "passwords/edge-1"),
        ca_file=str(secure_dir / "ca.crt"),
        cert_file=str(secure_dir / "client.crt"),
        key_file=str(secure_dir / "client.key"),
    )
    with PrivateMosquitto(port, config=tmp_path / "mosquitto.conf", tls=True, workdir=tmp_path):
        # The certificate names the compose host `mosquitto`: check it, connecting locally.
        ctx = url.tls_files.context()  # type: ignore[union-attr]
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            ctx.wrap_socket(raw, server_hostname="mosquitto") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        local = BrokerURL("localhost", port, True, "edge-1", url.password, url.tls_files)
        conn = Connection(local, "compose-config-check").connect()
        assert conn.connected
        conn.close()


def test_dockerfile_is_slim_non_root_and_installs_init_secure():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert re.search(r"^USER streampipe$", text, re.M)
    assert f"--uid {UID} " in text
    assert '".[secure]"' in text
    for source in re.findall(r"^COPY (.+) \./?\S*$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    script = (BROKERS / "compose-init.sh").read_text()
    assert f"chown -R {UID}:{UID}" in script
    assert SERVICES["init"]["user"] == "0:0"
    assert host_file("init", SERVICES["init"]["entrypoint"][1]) == BROKERS / "compose-init.sh"


if shutil.which("promtool") is None and os.environ.get("CI"):
    raise RuntimeError("CI must check the Prometheus files: scripts/install-deps.sh installs it")
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; "
    "scripts/install-deps.sh does it)",
)


@needs_promtool
@pytest.mark.parametrize(("what", "file"), [("config", "prometheus.yml"), ("rules", "alerts.yml")])
def test_promtool_accepts_the_shipped_files(what, file):
    result = subprocess.run(
        ["promtool", "check", what, str(BROKERS / file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
