"""Passwords and TLS files on the command line: one set of rules for every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streampipe.cli import build_parser, main
from streampipe.cli.options import broker_with_credentials


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streampipe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "mqtt://127.0.0.1:1", "--ca-file", "ca.crt"], "need a TLS broker URL"),
        (["--broker", "mqtts://u@127.0.0.1:1", "--password-file", "/nonexistent"], "cannot read"),
        (["--broker", "mqtts://127.0.0.1:1", "--ca-file", "/nonexistent"], "cannot load CA file"),
        (["--broker", "mqtts://127.0.0.1:1", "--key-file", "k.pem"], "--key-file needs --cert"),
        (["--broker", "mqtt://127.0.0.1:1", "--password-file", "PW"], "needs a user name"),
    ],
)
@pytest.mark.parametrize("command", ["edge", "sensors", "replay"])
def test_bad_credentials_are_one_line_errors_for_every_command(
    command, args, message, tmp_path, capsys
):
    (tmp_path / "pw").write_text("hunter2\n")
    args = [str(tmp_path / "pw") if a == "PW" else a for a in args]
    extra = {
        "edge": ["--stage-id", "e", "--metrics-port", "-1"],
        "sensors": [],
        "replay": ["x.csv", "--target", "y"],
    }
    assert main([command, *extra[command], *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "hunter2" not in err
    assert len(err.strip().splitlines()) == 1


def test_demo_refuses_credentials_without_a_broker(capsys):
    assert main(["demo", "--ca-file", "ca.crt"]) == 2
    assert "--ca-file needs --broker" in capsys.readouterr().err


def test_password_and_files_come_from_the_environment(monkeypatch, tmp_path):
    (tmp_path / "ca.crt").write_text("")
    monkeypatch.setenv("STREAMPIPE_PASSWORD", "from-env")
    args = build_parser().parse_args(["sensors", "--broker", "mqtt://gw@broker.lan"])
    url = broker_with_credentials(args)
    assert url is not None and url.password == "from-env" and "from-env" not in repr(url)
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setenv("STREAMPIPE_PASSWORD_FILE", str(tmp_path / "pw"))
    args = build_parser().parse_args(["sensors", "--broker", "mqtt://gw@broker.lan"])
    assert broker_with_credentials(args).password == "from-file"  # type: ignore[union-attr]
    monkeypatch.setenv("STREAMPIPE_CA_FILE", "/etc/ssl/certs/ca-certificates.crt")
    args = build_parser().parse_args(["edge", "--stage-id", "e", "--broker", "mqtts://gw@h"])
    assert args.ca_file == "/etc/ssl/certs/ca-certificates.crt"


def test_tls_files_from_the_environment_with_a_plain_url_name_the_variables(monkeypatch):
    """Exported for the secured broker, then a plain mqtt:// URL: the error names what
    was set, not flags the user never gave."""
    monkeypatch.setenv("STREAMPIPE_CA_FILE", "secure/ca.crt")
    monkeypatch.setenv("STREAMPIPE_CERT_FILE", "secure/client.crt")
    args = build_parser().parse_args(["sensors", "--broker", "mqtt://gw@localhost:8883"])
    with pytest.raises(ValueError) as caught:
        broker_with_credentials(args)
    message = str(caught.value)
    assert "$STREAMPIPE_CA_FILE, $STREAMPIPE_CERT_FILE are set" in message
    assert "use mqtts://" in message and "--ca-file" not in message
    # given as flags, the flags are what the message names
    args = build_parser().parse_args(
        ["sensors", "--broker", "mqtt://gw@localhost", "--ca-file", "other.crt"]
    )
    with pytest.raises(ValueError, match="--ca-file"):
        broker_with_credentials(args)


def test_a_password_in_the_url_warns_that_ps_shows_it():
    result = run(
        "edge",
        "--stage-id",
        "e",
        "--broker",
        "mqtt://u:hunter2@127.0.0.1:1",
        "--metrics-port",
        "-1",
    )
    assert result.returncode == 2 and "cannot reach broker" in result.stderr
    assert "visible to other users" in result.stderr and "hunter2" not in result.stderr


def test_init_secure_prints_next_steps_and_no_password(tmp_path):
    target = tmp_path / "secure"
    result = run("broker", "init-secure", str(target), "--sensor", "boiler-1", "--sensors", "2")
    assert result.returncode == 0, result.stderr
    assert f"mosquitto -c {target}/mosquitto.conf" in result.stdout
    assert f"--password-file {target}/passwords/edge-1 --stage-id edge-1" in result.stdout
    passwords = {p.name: p.read_text().strip() for p in (target / "passwords").iterdir()}
    assert set(passwords) == {
        *("operator", "gateway", "edge-1", "edge-2"),
        *("boiler-1", "sensor-000", "sensor-001"),
    }
    assert not any(p in result.stdout + result.stderr for p in passwords.values())

    again = run("broker", "init-secure", str(target))
    assert again.returncode == 2 and "--force" in again.stderr
    assert (target / "passwords" / "edge-1").read_text().strip() == passwords["edge-1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sensor", "a/b"], "sensor name 'a/b' contains '/'"),
        (["--sensor", "gateway"], "taken by the gateway account"),
        (["--sensor", "edge-1"], "stage id 'edge-1' is also a sensor account"),
        (["--stage", "operator"], "stage id 'operator' is taken by the operator account"),
        (["--stage", "ingest"], "stage id 'ingest' is the ingest gateway's id"),
        (["--ingest-topic", "streampipe/#"], "would let the gateway read under the topic root"),
        (["--ingest-topic", "#"], "would let the gateway read under the topic root"),
        (["--ingest-topic", "a/#/b"], "'a/#/b' is not an MQTT topic filter"),
        (["--topic-root", "a/+"], "topic root level"),
        (["--port", "0"], "port must be"),
    ],
)
def test_init_secure_refuses_bad_input_before_writing(tmp_path, capsys, args, message):
    assert main(["broker", "init-secure", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
