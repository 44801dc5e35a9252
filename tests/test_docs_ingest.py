"""Every mapping in docs/ingest.md and examples/ingest/ loads: the documentation's
examples are mappings that work, not prose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streampipe.ingest.mapping import load_mapping, load_mapping_text

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
