"""Every mapping in docs/ingest.md and examples/ingest/ loads: the documentation's
examples are mappings that work, not prose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streampipe.cli.demo import INGEST_FORMATS
from streampipe.ingest.mapping import (
    load_mapping,
    load_mapping_text,
    shipped_mapping,
    shipped_mapping_names,
)
from streampipe.secure.mosquitto import DEFAULT_INGEST_TOPICS, acl_text
from streampipe.sources.formats import FORMATS

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "ingest.md").read_text(), re.S)


def test_the_page_has_a_mapping_for_every_format():
    assert len(BLOCKS) >= 8
    formats = {s.__class__.__name__ for text in BLOCKS for s in load_mapping_text(text)}
    assert formats == {"JsonSource", "ValueSource", "SparkplugSource"}


@pytest.mark.parametrize("text", BLOCKS, ids=[re.search(r'name = "(\w+)"', b)[1] for b in BLOCKS])
def test_each_documented_mapping_loads(text):
    (source,) = load_mapping_text(text, "docs/ingest.md")
    assert source.filters()


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "ingest").glob("*.toml")), ids=str)
def test_each_example_mapping_loads(path):
    sources = load_mapping(path)
    assert len(sources) == 1 and sources[0].name == path.stem


def _covers(acl: str, sub: str) -> bool:
    """Whether every topic ``sub`` matches is matched by ``acl`` (as Mosquitto checks a
    SUBSCRIBE against the ACL)."""
    a, s = acl.split("/"), sub.split("/")
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(s) or s[i] == "#" or (level != "+" and level != s[i]):
            return False
    return len(a) == len(s)


def test_the_secured_broker_lets_the_gateway_read_every_shipped_mapping():
    """`broker init-secure`'s default --ingest-topic filters cover what every mapping
    of examples/ingest/ and docs/ingest.md subscribes to, and the ACL grants them."""
    sources = [s for text in BLOCKS for s in load_mapping_text(text)]
    sources += [s for p in (ROOT / "examples" / "ingest").glob("*.toml") for s in load_mapping(p)]
    for source in sources:
        for sub in source.filters():
            assert any(_covers(f, sub) for f in DEFAULT_INGEST_TOPICS), (source.name, sub)
    gateway = acl_text("streampipe").split("user gateway\n", 1)[1].split("\nuser ", 1)[0]
    assert {f"topic read {f}" for f in DEFAULT_INGEST_TOPICS} <= set(gateway.splitlines())
    assert not _covers("zigbee2mqtt/#", "zigbee2mqtt2/x") and _covers("+/+", "a/+")


def test_examples_ingest_are_the_mappings_installed_with_the_package():
    """examples/ingest/ links to streampipe/ingest/examples/ (package data, which
    `streampipe demo --format` loads, installed or not): one copy, one per format."""
    examples = sorted((ROOT / "examples" / "ingest").glob("*.toml"))
    assert [p.stem for p in examples] == shipped_mapping_names() == sorted(FORMATS)
    assert sorted(INGEST_FORMATS) == sorted(FORMATS)
    shipped = ROOT / "streampipe" / "ingest" / "examples"
    for path in examples:
        assert path.read_text() == (shipped / path.name).read_text(), path
        assert [s.name for s in shipped_mapping(path.stem)] == [path.stem]
