"""Model deployment against a real Mosquitto: hot swap mid-replay, refusals, rollback, export.

Each test checks predictions that arrive over MQTT against River's own offline
predict-then-learn, seq by seq, on the model each reading was processed with.
"""

from __future__ import annotations

import contextlib
import csv
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import friedman_csv, friedman_rows, running
from replaying import predict_then_learn, start_replay
from river import linear_model, preprocessing, tree

from streampipe.edge import EdgeConfig, EdgeService
from streampipe.models.artifact import CONTENT_TYPE, make_artifact, read_header
from streampipe.models.deploy import DeployError, ModelPublisher, VersionLedger
from streampipe.models.keys import SigningKey, init_keys, load_signing_key
from streampipe.publish import ReadingPublisher
from streampipe.readings import Reading
from streampipe.topics import Topics
from streampipe.transport import Connection

STREAMPIPE = [sys.executable, "-m", "streampipe"]
NAME = "power"


@pytest.fixture
def keys(tmp_path: Path):
    return init_keys(tmp_path / "keys")


@contextlib.contextmanager
def running_edge(broker, topics: Topics, keys, **kwargs) -> Iterator[EdgeService]:
    """An edge stage on a worker thread, stopped cleanly (final checkpoint) on exit."""
    config = EdgeConfig(
        broker.url,
        kwargs.pop("stage_id", "edge"),
        topic_root=topics.root,
        model_name=NAME,
        deploy_key=str(keys.public),
        metrics_interval=60,
        **kwargs,
    )
    service = EdgeService(config).start()
    with running(service):
        yield service


def pretrained(seed: int = 99, n: int = 500):
    """A model trained elsewhere, on other data: its predictions differ from the edge's."""
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for x, y in friedman_rows(n, seed):
        model.learn_one(x, y)
    return model


def read_csv(path: Path) -> list[tuple[dict, float]]:
    with open(path, newline="") as f:
        return [
            ({k: float(v) for k, v in row.items() if k != "y"}, float(row["y"]))
            for row in csv.DictReader(f)
        ]


def predictions(cap, topics: Topics, device: str = "+") -> list[tuple[int, dict]]:
    """(version, prediction) for every prediction received, in arrival order."""
    return [
        (body["version"], p)
        for body in cap.json(topics.predictions(device))
        for p in body["predictions"]
    ]


def publish_rows(broker, topics: Topics, device: str, rows, start: int = 0, epoch: int = 1) -> None:
    conn = Connection(broker.url, f"pub-{topics.root}").connect()
    try:
        pub = ReadingPublisher(conn, topics, batch_size=50)
        for i, (x, y) in enumerate(rows):
            pub.add(Reading(device, start + i, 1.0 + i, x, y, epoch))
        assert pub.wait_acked(30)
    finally:
        conn.close()


def runs_version(cap, topics: Topics, version: int) -> bool:
    """Whether the stage announced on its metrics topic that it runs ``version``
    (it publishes its metrics right after every swap)."""
    return any(m["version"] == version for m in cap.json(topics.metrics()))


def tamper_payload(data: bytes) -> bytes:
    """Flip one bit in the middle of an artifact's model payload."""
    (hlen,) = struct.unpack(">I", data[8:12])
    (plen,) = struct.unpack(">I", data[12 + hlen : 16 + hlen])
    at = 16 + hlen + plen // 2
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def send_raw(broker, topic: str, payload: bytes) -> None:
    with Connection(broker.url, "raw-artifact").connect() as conn:
        info = conn.publish(topic, payload, qos=1, retain=True, content_type=CONTENT_TYPE)
        info.wait_for_publish(10)
        assert info.is_published()


def test_a_model_deployed_mid_replay_is_swapped_in_between_two_messages_exactly(
    broker, topics, capture, keys, tmp_path
):
    n = 3000
    expected_v1 = friedman_csv(tmp_path / "f.csv", n)
    rows = read_csv(tmp_path / "f.csv")
    deployed = pretrained()
    cap = capture([topics.predictions(), topics.metrics()])
    url = f"mqtt://127.0.0.1:{broker.port}"
    with running_edge(broker, topics, keys, state_dir=str(tmp_path / "state")) as edge:
        replay = start_replay(
            url,
            topics,
            tmp_path / "f.csv",
            *("--device-id", "fried", "--rate", "1000", "--batch", "10", "--linger", "10"),
        )
        try:
            assert cap.wait(lambda: len(predictions(cap, topics)) >= 300), "replay never started"
            with ModelPublisher(broker.url, topics) as pub:
                done = pub.deploy(
                    pickle.dumps(deployed),
                    "regressor",
                    name=NAME,
                    key=load_signing_key(keys.private),
                )
            assert done.header.version == 2
            _, err = replay.communicate(timeout=60)
            assert replay.returncode == 0, err
        finally:
            if replay.poll() is None:
                replay.kill()
        assert cap.wait(lambda: len(predictions(cap, topics)) >= n)
    got = predictions(cap, topics)
    assert sorted(p["seq"] for _, p in got) == list(range(n)), "a seq lost or predicted twice"
    by_seq = {p["seq"]: (v, p["y_pred"]) for v, p in got}
    swap = min(s for s, (v, _) in by_seq.items() if v == 2)
    assert 0 < swap < n - 1, f"the deployment did not land mid-replay (seq {swap})"
    assert {v for s, (v, _) in by_seq.items() if s < swap} == {1}
    assert {v for s, (v, _) in by_seq.items() if s >= swap} == {2}
    # Before the swap: the edge's own model. From it: the deployed one, learning on.
    assert [by_seq[s][1] for s in range(swap)] == expected_v1[:swap]
    assert [by_seq[s][1] for s in range(swap, n)] == predict_then_learn(rows[swap:], deployed)
    assert runs_version(cap, topics, 2)
    assert edge.stats.swaps == 1


def test_unsigned_tampered_foreign_and_older_artifacts_are_refused_and_never_run(
    broker, topics, capture, keys, tmp_path
):
    class WritesAFile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    marker = tmp_path / "pwned"
    key = load_signing_key(keys.private)
    evil = pickle.dumps(WritesAFile())
    signed_evil = make_artifact(evil, name=NAME, version=5, kind="regressor", key=key)
    cap = capture([topics.deadletter(), topics.metrics(), topics.predictions()])
    topic = topics.models(NAME)
    with running_edge(broker, topics, keys) as edge:
        with ModelPublisher(broker.url, topics) as pub:
            pub.deploy(pickle.dumps(pretrained()), "regressor", name=NAME, key=key, version=3)
        assert cap.wait(lambda: runs_version(cap, topics, 3))
        attempts = {
            "unsigned": signed_evil[:-66],
            "bad_signature": tamper_payload(signed_evil),
            "wrong_key": make_artifact(
                evil, name=NAME, version=5, kind="regressor", key=SigningKey.generate()
            ),
            "downgrade": make_artifact(
                pickle.dumps(pretrained(seed=1)), name=NAME, version=2, kind="regressor", key=key
            ),
            "wrong_model_kind": make_artifact(
                pickle.dumps(linear_model.LogisticRegression()),
                name=NAME,
                version=6,
                kind="classifier",
                key=key,
            ),
            "artifact_malformed": b"\x80\x04 a bare pickle, no artifact",
        }
        for payload in attempts.values():
            send_raw(broker, topic, payload)
        assert cap.wait(lambda: len(cap.json(topics.deadletter())) == len(attempts))
        letters = cap.json(topics.deadletter())
        assert [d["reason"] for d in letters] == list(attempts)
        assert all(d["topic"] == topic and d["detail"] for d in letters)
        assert {r: edge.stats.rejected[r] for r in attempts} == dict.fromkeys(attempts, 1)
        assert not marker.exists(), "a refused pickle ran"
        # The stage goes on, with the version it ran before.
        publish_rows(broker, topics, "d1", friedman_rows(5, 3))
        assert cap.wait(lambda: len(predictions(cap, topics)) == 5)
        assert {v for v, _ in predictions(cap, topics)} == {3}
        assert edge.stats.model_version == 3 and edge.stats.swaps == 1
    assert not marker.exists()


def test_rollback_publishes_the_previous_model_as_a_newer_version(
    broker, topics, capture, keys, tmp_path
):
    key = load_signing_key(keys.private)
    first, second = pretrained(seed=11), tree.HoeffdingTreeRegressor()
    (tmp_path / "first.pkl").write_bytes(pickle.dumps(first))
    cap = capture([topics.predictions(), topics.metrics()])
    url = f"mqtt://127.0.0.1:{broker.port}"
    with running_edge(broker, topics, keys) as edge:
        deploy = run_cli(
            "deploy",
            str(tmp_path / "first.pkl"),
            "--broker",
            url,
            "--topic-root",
            topics.root,
            "--model",
            NAME,
            "--signing-key",
            str(keys.private),
        )
        assert deploy.returncode == 0, deploy.stderr
        assert f"model {NAME} version 2" in deploy.stdout
        with ModelPublisher(broker.url, topics) as pub:
            assert (
                pub.deploy(pickle.dumps(second), "regressor", name=NAME, key=key).header.version
                == 3
            )
        assert cap.wait(lambda: runs_version(cap, topics, 3))
        rollback = run_cli(
            "deploy",
            "--rollback",
            NAME,
            "--broker",
            url,
            "--topic-root",
            topics.root,
            "--signing-key",
            str(keys.private),
        )
        assert rollback.returncode == 0, rollback.stderr
        assert "version 4" in rollback.stdout and "restoring version 2's model" in rollback.stdout
        assert cap.wait(lambda: runs_version(cap, topics, 4))
        rows = friedman_rows(20, 5)
        publish_rows(broker, topics, "new-device", rows)
        assert cap.wait(lambda: len(predictions(cap, topics)) == 20)
        got = predictions(cap, topics)
        assert {v for v, _ in got} == {4}
        assert [p["y_pred"] for _, p in got] == predict_then_learn(rows, pretrained(seed=11))
        with ModelPublisher(broker.url, topics) as pub:
            current, previous = pub.retained(NAME)
            assert read_header(current).restores == 2 and read_header(previous).version == 3
            again = pub.rollback(NAME, key)  # a second rollback undoes the first
        assert (again.header.version, again.header.restores) == (5, 3)
        assert cap.wait(lambda: runs_version(cap, topics, 5))
    assert edge.stats.swaps == 4


def test_rollback_and_deploy_say_what_is_wrong(broker, topics, keys):
    key = load_signing_key(keys.private)
    with ModelPublisher(broker.url, topics) as pub:
        with pytest.raises(DeployError, match="no model 'power' is deployed"):
            pub.rollback(NAME, key)
        pub.deploy(pickle.dumps(pretrained()), "regressor", name=NAME, key=key)
        with pytest.raises(DeployError, match="no previous version"):
            pub.rollback(NAME, key)
        with pytest.raises(DeployError, match="downgrade"):
            pub.deploy(pickle.dumps(pretrained()), "regressor", name=NAME, key=key, version=2)
        # Re-signing needs the previous artifact to be ours: another key's is refused.
        pub.deploy(pickle.dumps(pretrained()), "regressor", name=NAME, key=SigningKey.generate())
        with pytest.raises(DeployError, match="cannot be re-published: signed by key"):
            pub.rollback(NAME, SigningKey.generate())


def test_an_exported_model_deployed_to_another_stage_carries_on_from_its_learned_state(
    broker, topics, capture, keys, tmp_path
):
    learned_rows, new_rows = friedman_rows(400, 21), friedman_rows(100, 22)
    state = tmp_path / "state"
    with running_edge(broker, topics, keys, stage_id="learner", state_dir=str(state)):
        cap_a = capture([topics.predictions()])
        publish_rows(broker, topics, "boiler", learned_rows)
        assert cap_a.wait(lambda: len(predictions(cap_a, topics)) == len(learned_rows))
    # Stopped cleanly: its last checkpoint covers every reading.
    out = tmp_path / "boiler.pkl"
    export = run_cli(
        "export-model",
        "--stage-id",
        "learner",
        "--state-dir",
        str(state),
        "--device",
        "boiler",
        str(out),
    )
    assert export.returncode == 0, export.stderr
    assert "400 readings learned, up to seq 399" in export.stdout

    other = Topics(topics.root + "-b")
    cap = capture([other.predictions(), other.metrics()])
    with running_edge(broker, other, keys, stage_id="fresh"):
        with ModelPublisher(broker.url, other) as pub:
            pub.deploy(out.read_bytes(), "regressor", name=NAME, key=load_signing_key(keys.private))
        assert cap.wait(lambda: runs_version(cap, other, 2))
        publish_rows(broker, other, "boiler", new_rows)
        assert cap.wait(lambda: len(predictions(cap, other)) == len(new_rows))
    # What the first stage learned, then predict-then-learn on the new readings.
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    predict_then_learn(learned_rows, model)
    got = predictions(cap, other)
    assert {v for v, _ in got} == {2}
    assert [p["y_pred"] for _, p in got] == predict_then_learn(new_rows, model)


def test_a_swap_survives_a_restart_and_its_retained_artifact_is_not_refused(
    broker, topics, capture, keys, tmp_path
):
    state = str(tmp_path / "state")
    cap = capture([topics.predictions(), topics.deadletter(), topics.metrics()])
    rows = friedman_rows(60, 4)
    deployed = pretrained(seed=8)
    with running_edge(broker, topics, keys, state_dir=state) as edge:
        with ModelPublisher(broker.url, topics) as pub:
            pub.deploy(
                pickle.dumps(deployed), "regressor", name=NAME, key=load_signing_key(keys.private)
            )
        assert cap.wait(lambda: runs_version(cap, topics, 2))
        publish_rows(broker, topics, "d", rows[:30])
        assert cap.wait(lambda: len(predictions(cap, topics)) == 30)
    with running_edge(broker, topics, keys, state_dir=state) as edge:
        assert edge.stats.model_version == 2  # from the checkpoint, before any message
        publish_rows(broker, topics, "d", rows[30:], start=30)
        assert cap.wait(lambda: len(predictions(cap, topics)) == 60)
        assert edge.stats.swaps == 0  # the retained artifact came again: nothing to do
    got = predictions(cap, topics)
    assert {v for v, _ in got} == {2}
    assert [p["y_pred"] for _, p in got] == predict_then_learn(rows, deployed)
    assert cap.json(topics.deadletter()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STREAMPIPE, *args], capture_output=True, text=True, timeout=60)


UNION = "(preprocessing.StandardScaler + preprocessing.MinMaxScaler) | linear_model.Perceptron"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edge", "--stage-id", "e", "--deploy-key", "{dir}/no.pub"], "does not exist"),
        (["edge", "--stage-id", "e", "--deploy-key", "{private}"], "is a private key"),
        (["edge", "--stage-id", "e", "--deploy-key", "{public}", "--model", UNION], "--model-name"),
        (["deploy", "{model}", "--model", NAME], "--signing-key FILE is needed"),
        (["deploy", "{model}", "--model", NAME, "--signing-key", "{private}"], "not a River model"),
        (["deploy", "--rollback", NAME, "--signing-key", "{public}"], "not a PEM private"),
        (["deploy", "--signing-key", "{private}"], "give MODEL_FILE"),
        (
            ["export-model", "--stage-id", "e", "--state-dir", "{dir}/x", "--device", "d", "o"],
            "does not exist",
        ),
        (["keys", "init", "{dir}/keys"], "--force"),
    ],
)
def test_command_line_mistakes_are_one_clear_line(keys, tmp_path, args, message):
    (tmp_path / "m.pkl").write_bytes(pickle.dumps({"not": "a model"}))
    paths = {"dir": tmp_path, "private": keys.private, "public": keys.public}
    result = run_cli(*(a.format(model=tmp_path / "m.pkl", **paths) for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "PRIVATE KEY" not in result.stderr + result.stdout


def test_an_edge_without_cryptography_says_what_to_install(keys):
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from streampipe.cli import main\n"
        f"sys.exit(main(['edge', '--stage-id', 'e', '--deploy-key', {str(keys.public)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "pip install cryptography" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_export_says_what_is_missing_and_creates_nothing(broker, topics, capture, keys, tmp_path):
    from streampipe.models.export import ExportError, export_model

    state = tmp_path / "state"
    cap = capture([topics.predictions()])
    with running_edge(broker, topics, keys, stage_id="s", state_dir=str(state)):
        publish_rows(broker, topics, "d1", friedman_rows(3, 1))
        assert cap.wait(lambda: len(predictions(cap, topics)) == 3)
    with pytest.raises(ExportError, match="no model for device 'd9'; it has: d1"):
        export_model(state, "s", "d9", tmp_path / "o.pkl")
    with pytest.raises(ExportError, match="no checkpoint of stage 'other'"):
        export_model(state, "other", "d1", tmp_path / "o.pkl")
    assert not list(state.glob("other*")), "a mistyped stage id left files behind"
    assert not (tmp_path / "o.pkl").exists()
    assert export_model(state, "s", "d1", tmp_path / "o.pkl").learned == 3


def test_a_re_published_old_artifact_does_not_make_two_models_share_a_version(
    broker, topics, keys, tmp_path
):
    """Issue 18 §6: whoever may publish on ROOT/models/<name> can re-publish an old,
    validly signed artifact. The next deployment must not number itself from it (that
    made a second, different "version 3"): the deployer's ledger remembers version 3."""
    url = f"mqtt://127.0.0.1:{broker.port}"

    def deploy(seed: int, *extra: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"model-{seed}.pkl"
        path.write_bytes(pickle.dumps(pretrained(seed=seed, n=50)))
        args = ["--broker", url, "--topic-root", topics.root, "--model", NAME]
        return run_cli("deploy", str(path), *args, "--signing-key", str(keys.private), *extra)

    first = deploy(1)
    assert first.returncode == 0 and f"model {NAME} version 2" in first.stdout, first.stderr
    with ModelPublisher(broker.url, topics) as pub:
        old_v2, _ = pub.retained(NAME)
    assert old_v2 is not None
    assert f"model {NAME} version 3" in deploy(2).stdout
    replayer = Connection(broker.url, "replayer").connect()
    try:
        replayer.publish(topics.models(NAME), old_v2, qos=1, retain=True).wait_for_publish(10)
    finally:
        replayer.close()

    nxt = deploy(3)
    assert nxt.returncode == 0, nxt.stderr
    assert f"model {NAME} version 4" in nxt.stdout
    assert "re-published an old artifact" in nxt.stderr
    again = deploy(4, "--version", "4")  # a version already published: refused
    assert again.returncode != 0 and "not newer than version 4" in again.stderr
    ledger = VersionLedger.beside(keys.private).highest(topics.root, NAME)
    with ModelPublisher(broker.url, topics) as pub:
        current, _ = pub.retained(NAME)
    assert ledger == (4, read_header(current).sha256)


def test_an_edge_restarted_with_its_checkpoint_refuses_an_older_artifact_retained_meanwhile(
    broker, topics, capture, keys, tmp_path
):
    """Issue 18 §6: an old artifact re-published while an edge was down is retained when
    it comes back; its checkpoint knows the newer version it ran, so it refuses it."""
    state = str(tmp_path / "state")
    key = load_signing_key(keys.private)
    cap = capture([topics.deadletter(), topics.metrics()])
    with running_edge(broker, topics, keys, state_dir=state):
        with ModelPublisher(broker.url, topics) as pub:
            pub.deploy(pickle.dumps(pretrained(seed=1, n=50)), "regressor", name=NAME, key=key)
            old_v2, _ = pub.retained(NAME)
            pub.deploy(pickle.dumps(pretrained(seed=2, n=50)), "regressor", name=NAME, key=key)
        assert cap.wait(lambda: runs_version(cap, topics, 3))
    replayer = Connection(broker.url, "replayer-2").connect()
    try:
        replayer.publish(topics.models(NAME), old_v2, qos=1, retain=True).wait_for_publish(10)
    finally:
        replayer.close()
    with running_edge(broker, topics, keys, state_dir=state) as edge:
        assert cap.wait(
            lambda: any(d["reason"] == "downgrade" for d in cap.json(topics.deadletter()))
        )
        assert edge.stats.model_version == 3 and edge.stage.learner.version == 3


def test_deployers_sharing_a_ledger_take_turns_so_no_two_pick_one_version(
    broker, topics, keys, tmp_path
):
    """Two `deploy`s at once on the operator's machine each read "the highest version"
    before either has published: without taking turns both numbered themselves 2."""
    key = load_signing_key(keys.private)
    ledger = VersionLedger.beside(keys.private)
    start = threading.Barrier(4)
    versions: list[int] = []

    def deploy(seed: int) -> None:
        with ModelPublisher(broker.url, topics) as pub:
            model = pickle.dumps(pretrained(seed=seed, n=20))
            start.wait(10)
            done = pub.deploy(model, "regressor", name=NAME, key=key, ledger=ledger)
            versions.append(done.header.version)

    threads = [threading.Thread(target=deploy, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(versions) == [2, 3, 4, 5]
    assert ledger.highest(topics.root, NAME)[0] == 5  # type: ignore[index]
