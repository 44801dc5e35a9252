"""Model artifacts and the edge's receiver, without a broker: bytes in, verdicts out."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import struct
from pathlib import Path

import pytest
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st
from river import linear_model, preprocessing, tree

from streampipe import codec
from streampipe.learn.spec import ModelSpec
from streampipe.models import artifact as art_mod
from streampipe.models.artifact import (
    REASONS,
    ArtifactError,
    ArtifactHeader,
    ArtifactLimits,
    make_artifact,
    read_header,
    verify,
)
from streampipe.models.keys import (
    KeyFileError,
    SigningKey,
    init_keys,
    load_signing_key,
    load_verify_key,
)
from streampipe.models.receive import ModelReceiver
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
from streampipe.state import CheckpointStore

KEY = SigningKey.generate()
OTHER = SigningKey.generate()


class WritesAFile:
    """A pickle that, when loaded, creates the file at ``path``: what must never run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def trained(seed: int = 1, n: int = 50):
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for i in range(n):
        x = {"a": float((i * seed) % 7), "b": float(i % 3)}
        model.learn_one(x, 2 * x["a"] - x["b"] + 1)
    return model


def artifact(model=None, *, version: int = 2, key: SigningKey = KEY, **kw) -> bytes:
    kw.setdefault("name", "power")
    kw.setdefault("kind", "regressor")
    data = pickle.dumps(trained() if model is None else model)
    return make_artifact(data, version=version, key=key, **kw)


def signed_raw(header: dict, payload: bytes, key: SigningKey = KEY) -> bytes:
    """An artifact assembled by hand, signed: to reach the checks after the signature."""
    head = json.dumps(header).encode()
    body = b"SPMODEL\x01" + struct.pack(">I", len(head)) + head
    body += struct.pack(">I", len(payload)) + payload
    sig = key.sign(body)
    return body + struct.pack(">H", len(sig)) + sig


def reason(data: bytes, key=KEY.public, limits: ArtifactLimits | None = None) -> str:
    with pytest.raises(ArtifactError) as err:
        verify(data, key, limits or art_mod.DEFAULT_LIMITS)
    assert err.value.reason in REASONS
    return err.value.reason


def payload_offset(data: bytes) -> int:
    (hlen,) = struct.unpack(">I", data[8:12])
    return 12 + hlen + 4


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def restarted(stage: EdgeStage, state_dir) -> EdgeStage:
    """The stage as a restart resumes it: checkpointed whole into ``state_dir``, then
    restored into a new stage of the same id."""
    store = CheckpointStore(state_dir, "edge-1")
    store.save(*stage.learner.snapshot(everything=True))
    store.close()
    again = EdgeStage("edge-1", clock=lambda: 1000.0)
    store = CheckpointStore(state_dir, "edge-1")
    again.learner.restore(*store.load())
    store.close()
    return again


def test_round_trip_keeps_the_learned_model_exactly():
    model = trained()
    art = verify(
        artifact(model, spec="preprocessing.StandardScaler | linear_model.LinearRegression"),
        KEY.public,
    )
    h = art.header
    assert (h.name, h.version, h.kind, h.key_id, h.devices) == (
        "power",
        2,
        "regressor",
        KEY.key_id,
        "*",
    )
    assert h.spec.startswith("preprocessing.StandardScaler") and h.river and h.python
    assert h.sha256 == hashlib.sha256(art.payload).hexdigest()
    loaded = art.load()
    x = {"a": 3.0, "b": 1.0}
    assert loaded.predict_one(x) == model.predict_one(x) != 0.0


def test_every_way_of_breaking_an_artifact_has_its_reason():
    good = artifact()
    sig_at = len(good) - 66  # u16 length + 64 bytes
    (hlen,) = struct.unpack(">I", good[8:12])
    payload_at = payload_offset(good)
    assert reason(good[:sig_at]) == "unsigned"
    assert reason(good[:sig_at] + b"\x00\x00") == "unsigned"
    assert reason(flip(good, payload_at + 3)) == "bad_signature"  # the model
    assert reason(flip(good, len(good) - 1)) == "bad_signature"  # the signature
    assert reason(good, OTHER.public) == "wrong_key"
    assert reason(artifact(key=OTHER)) == "wrong_key"
    assert reason(good + b"x") == "artifact_malformed"
    assert reason(good[:20]) == "artifact_malformed"
    assert reason(b"") == "artifact_malformed"
    assert reason(b"\x80\x04garbage, maybe a bare pickle") == "artifact_malformed"
    assert reason(b"SPMODEL\x02" + good[8:]) == "artifact_unsupported_version"
    assert reason(good, limits=ArtifactLimits(max_artifact_bytes=len(good) - 1)) == (
        "artifact_too_large"
    )
    assert reason(good, limits=ArtifactLimits(max_header_bytes=hlen - 1)) == "artifact_too_large"


def test_a_tampered_header_is_caught_by_the_signature():
    good = artifact(version=2)
    bad = good.replace(b'"version":2', b'"version":9')
    assert bad != good and read_header(bad).version == 9
    assert reason(bad) == "bad_signature"
    assert reason(good.replace(b'"devices":"*"', b'"devices":"x"')) == "bad_signature"


def test_the_digest_is_checked_even_when_the_signature_holds():
    payload = zstd.ZstdCompressor().compress(pickle.dumps(trained()))
    header = {
        "name": "power", "version": 2, "created": 0.0, "kind": "regressor",
        "sha256": "0" * 64, "size": 10, "key_id": KEY.key_id,
    }  # fmt: skip
    assert reason(signed_raw(header, payload)) == "digest_mismatch"


def test_a_model_over_the_size_limit_is_refused_before_decompressing():
    data = artifact()
    size = read_header(data).size
    assert reason(data, limits=ArtifactLimits(max_model_bytes=size - 1)) == "artifact_too_large"


def test_a_payload_that_inflates_past_its_declared_size_stops_there():
    bomb = zstd.ZstdCompressor(level=3).compress(bytes(64 << 20))  # 64 MiB of zeros
    assert len(bomb) < 64 << 10
    header = {
        "name": "power", "version": 2, "created": 0.0, "kind": "regressor",
        "sha256": hashlib.sha256(bomb).hexdigest(), "size": 1000, "key_id": KEY.key_id,
    }  # fmt: skip
    art = verify(signed_raw(header, bomb), KEY.public)  # signed: only the size protects
    with pytest.raises(ArtifactError) as err:
        art.model_bytes()
    assert err.value.reason == "model_load_failed" and "not the 1,000" in str(err.value)


@pytest.mark.parametrize("how", ["unsigned", "tampered", "wrong_key", "bad_header"])
def test_a_malicious_pickle_never_runs_unless_signed(tmp_path, how):
    marker = tmp_path / "pwned"
    good = artifact(WritesAFile(marker))
    forged = {
        "unsigned": good[:-66],
        "tampered": flip(good, payload_offset(good) + 2),
        "wrong_key": artifact(WritesAFile(marker), key=OTHER),
        "bad_header": good.replace(b'"kind":"regressor"', b'"kind":"nonsense"'),
    }[how]
    stage = EdgeStage("edge-1")
    out = ModelReceiver(stage, KEY.public, "power").handle("streampipe/models/power", forged)
    (letter,) = [json.loads(m.payload) for m in out]
    assert letter["reason"] == {
        "tampered": "bad_signature",
        "bad_header": "artifact_malformed",
    }.get(how, how)
    assert not marker.exists()
    assert stage.learner.version == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_artifact_error(data):
    with pytest.raises(ArtifactError):
        verify(data, KEY.public)
    with pytest.raises(ArtifactError):
        verify(b"SPMODEL\x01" + data, KEY.public)


GOOD = artifact(tree.HoeffdingTreeRegressor())


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255), st.integers(0, len(GOOD)))
def test_every_mutation_of_a_signed_artifact_is_refused(at, xor, cut):
    for data in (GOOD[:at] + bytes([GOOD[at] ^ xor]) + GOOD[at + 1 :], GOOD[:cut]):
        if data != GOOD:
            with pytest.raises(ArtifactError):
                verify(data, KEY.public)


def test_header_fields_are_validated():
    base = {
        "name": "power", "version": 2, "created": 0.0, "kind": "regressor",
        "sha256": "0" * 64, "size": 1, "key_id": "0" * 16,
    }  # fmt: skip
    assert ArtifactHeader.from_json(json.dumps(base).encode()).version == 2
    for field, bad in [
        ("name", "a/b"), ("version", 0), ("version", True), ("version", 2.5),
        ("kind", "forecaster"), ("sha256", "xyz"), ("size", -1), ("key_id", "KEY"),
        ("created", "yesterday"), ("devices", ""),
    ]:  # fmt: skip
        with pytest.raises(ArtifactError) as err:
            ArtifactHeader.from_json(json.dumps({**base, field: bad}).encode())
        assert err.value.reason == "artifact_malformed", field
    for bad in (b"[]", b"{", json.dumps({"name": "power"}).encode()):
        with pytest.raises(ArtifactError):
            ArtifactHeader.from_json(bad)


# -- keys ----------------------------------------------------------------------------


def test_keys_init_writes_a_private_key_only_its_owner_reads(tmp_path):
    pair = init_keys(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(pair.private).st_mode) == 0o600
    assert load_signing_key(pair.private).key_id == load_verify_key(pair.public).key_id
    with pytest.raises(FileExistsError):
        init_keys(tmp_path / "keys")
    again = init_keys(tmp_path / "keys", force=True)
    assert again.key_id != pair.key_id
    assert "PRIVATE" not in repr(load_signing_key(again.private))


def test_an_edge_refuses_a_private_key_or_garbage_as_its_deploy_key(tmp_path):
    pair = init_keys(tmp_path)
    with pytest.raises(KeyFileError, match="is a private key"):
        load_verify_key(pair.private)
    with pytest.raises(KeyFileError, match=r"not an Ed25519 private key|not a PEM private"):
        load_signing_key(pair.public)
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_verify_key(tmp_path / "junk")
    with pytest.raises(KeyFileError, match="does not exist"):
        load_verify_key(tmp_path / "missing.pub")


# -- the receiver: hot swap in the stage -----------------------------------------------


def frame(device: str, start: int, n: int) -> bytes:
    rs = [
        Reading(device, s, float(s), {"a": float(s % 7), "b": float(s % 3)}, float(s % 5))
        for s in range(start, start + n)
    ]
    return codec.encode(Batch.from_readings(rs))


def predictions(out) -> list[dict]:
    return [json.loads(m.payload) for m in out if "/predictions/" in m.topic]


def deadletters(out) -> list[str]:
    return [json.loads(m.payload)["reason"] for m in out if "/deadletter/" in m.topic]


@pytest.fixture
def stage() -> EdgeStage:
    return EdgeStage("edge-1", clock=lambda: 1000.0)


def test_swap_replaces_matching_devices_models_and_keeps_their_watermarks(stage):
    rx = ModelReceiver(stage, KEY.public, "power")
    for d in ("boiler-1", "boiler-2", "pump-1"):
        stage.handle(stage.topics.readings(d), frame(d, 0, 10))
    deployed = trained(seed=3)
    out = rx.handle(rx.topic, artifact(deployed, version=2, devices="boiler-*"))
    assert [m.topic for m in out] == [stage.topics.metrics("edge-1")]
    assert json.loads(out[0].payload)["version"] == 2
    assert stage.stats.swaps == 1 and stage.stats.model_version == 2

    # boiler-1 continues from the deployed model at seq 10: predict, then learn.
    (body,) = predictions(stage.handle(stage.topics.readings("boiler-1"), frame("boiler-1", 10, 5)))
    assert body["version"] == 2 and [p["seq"] for p in body["predictions"]] == list(range(10, 15))
    expected = []
    for s in range(10, 15):
        x = {"a": float(s % 7), "b": float(s % 3)}
        expected.append(deployed.predict_one(x))
        deployed.learn_one(x, float(s % 5))
    assert [p["y_pred"] for p in body["predictions"]] == expected
    # Already-learned readings are still duplicates: the watermark did not move.
    assert deadletters(
        stage.handle(stage.topics.readings("boiler-1"), frame("boiler-1", 5, 3))
    ) == ["duplicate"]
    # pump-1 does not match: its own model, version 1. A new boiler starts from version 2.
    (pump,) = predictions(stage.handle(stage.topics.readings("pump-1"), frame("pump-1", 10, 1)))
    assert pump["version"] == 1
    (new,) = predictions(stage.handle(stage.topics.readings("boiler-9"), frame("boiler-9", 0, 1)))
    x0 = {"a": 0.0, "b": 0.0}
    assert new["version"] == 2 and new["predictions"][0]["y_pred"] == trained(seed=3).predict_one(
        x0
    )


def test_each_device_gets_its_own_copy_of_the_deployed_model(stage):
    rx = ModelReceiver(stage, KEY.public, "power")
    rx.handle(rx.topic, artifact(version=2))
    stage.handle(stage.topics.readings("a"), frame("a", 0, 20))
    stage.handle(stage.topics.readings("b"), frame("b", 0, 1))
    (b,) = predictions(stage.handle(stage.topics.readings("c"), frame("c", 0, 1)))
    assert b["predictions"][0]["y_pred"] == trained().predict_one({"a": 0.0, "b": 0.0})
    assert stage.learner.state("a").model is not stage.learner.state("b").model


def test_downgrades_wrong_names_and_kinds_are_refused_and_counted(stage):
    rx = ModelReceiver(stage, KEY.public, "power")
    v3 = artifact(version=3)
    assert deadletters(rx.handle(rx.topic, v3)) == []
    assert rx.handle(rx.topic, v3) == []  # the same artifact again: a redelivery, not an error
    assert rx.handle(rx.topic, artifact(version=3)) == []  # re-signed, same model: the same
    # Another model under the version that runs: a collision, not a mere downgrade.
    assert deadletters(rx.handle(rx.topic, artifact(trained(seed=2), version=3))) == [
        "version_collision"
    ]
    assert deadletters(rx.handle(rx.topic, artifact(version=2))) == ["downgrade"]
    assert deadletters(rx.handle(rx.topic, artifact(version=4, name="other"))) == [
        "wrong_model_name"
    ]
    classifier = linear_model.LogisticRegression()
    assert deadletters(rx.handle(rx.topic, artifact(classifier, version=5, kind="classifier"))) == [
        "wrong_model_kind"
    ]
    # A signed header that lies about the kind: found out after unpickling, still refused.
    assert deadletters(rx.handle(rx.topic, artifact(classifier, version=6))) == ["wrong_model_kind"]
    assert deadletters(rx.handle(rx.topic, artifact({"not": "a model"}, version=7))) == [
        "wrong_model_kind"
    ]
    assert stage.learner.version == 3
    assert stage.stats.rejected == {
        "downgrade": 1,
        "version_collision": 1,
        "wrong_model_name": 1,
        "wrong_model_kind": 3,
    }
    assert rx.handle(rx.topic, b"") == []  # a cleared retained artifact


def test_a_minibatch_stage_refuses_a_model_that_cannot_learn_in_batches():
    pytest.importorskip("pandas")
    stage = EdgeStage("edge-1", ModelSpec.parse("linear_model.LinearRegression"), mode="minibatch")
    rx = ModelReceiver(stage, KEY.public, "power")
    out = rx.handle(rx.topic, artifact(tree.HoeffdingTreeRegressor(), version=2))
    assert deadletters(out) == ["model_incompatible"]
    assert deadletters(rx.handle(rx.topic, artifact(linear_model.LinearRegression()))) == []


def test_a_checkpoint_keeps_the_deployed_version_and_models(stage, tmp_path):
    rx = ModelReceiver(stage, KEY.public, "power")
    stage.handle(stage.topics.readings("a"), frame("a", 0, 10))
    v2 = artifact(trained(seed=5), version=2)
    rx.handle(rx.topic, v2)
    again = restarted(stage, tmp_path)
    assert again.learner.version == 2
    rx2 = ModelReceiver(again, KEY.public, "power")
    assert rx2.handle(rx2.topic, v2) == []  # the retained copy, redelivered on restart
    for s in (stage, again):
        (body,) = predictions(s.handle(s.topics.readings("a"), frame("a", 10, 3)))
        assert body["version"] == 2
    (new,) = predictions(again.handle(again.topics.readings("z"), frame("z", 0, 1)))
    assert new["version"] == 2
    assert new["predictions"][0]["y_pred"] == trained(seed=5).predict_one({"a": 0.0, "b": 0.0})


def test_a_stage_restored_from_its_checkpoint_refuses_an_older_retained_artifact(stage, tmp_path):
    """Issue 18 §6: an edge restarted with its checkpoint knows the version it ran, so a
    re-published older artifact, retained when it resubscribes, is refused."""
    rx = ModelReceiver(stage, KEY.public, "power")
    v2, v3 = artifact(trained(seed=2), version=2), artifact(trained(seed=3), version=3)
    assert deadletters(rx.handle(rx.topic, v2) + rx.handle(rx.topic, v3)) == []
    again = restarted(stage, tmp_path)
    rx2 = ModelReceiver(again, KEY.public, "power")
    assert deadletters(rx2.handle(rx2.topic, v2)) == ["downgrade"]
    other_v3 = artifact(trained(seed=4), version=3)
    assert deadletters(rx2.handle(rx2.topic, other_v3)) == ["version_collision"]
    assert (
        again.learner.version == 3 and again.learner.deployed[-1].sha256 == read_header(v3).sha256
    )
