"""docs/config.md is exactly what `python -m rlfh.config.docs` generates from the schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_config_reference_is_up_to_date():
    generated = subprocess.run(
        [sys.executable, "-m", "rlfh.config.docs"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == generated, "docs/config.md is stale: run `python -m rlfh.config.docs > docs/config.md`"


def test_every_key_is_documented_once():
    import dataclasses
    import typing

    from rlfh.config.docs import undocumented, walk
    from rlfh.config.schema import Config

    assert undocumented() == [], (
        "add a `# comment` next to the field in rlfh/config/schema.py or an entry in DESCRIPTIONS"
    )
    keys = [r["key"] for _, rows in walk(Config) for r in rows]
    assert len(keys) == len(set(keys))
    # every leaf of the schema appears: top-level plain fields and the fields of each section
    assert "run_dir" in keys and "model.lora.rank" in keys and "rewards[].target" in keys
    from rlfh.config.schema import ModelConfig

    def leaf_count(cls) -> int:
        hints = typing.get_type_hints(cls)
        return sum(
            leaf_count(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else 1 for f in dataclasses.fields(cls)
        )

    assert sum(k.startswith("model.") for k in keys) == leaf_count(ModelConfig)


def test_comments_and_types_come_from_the_schema():
    from rlfh.config.docs import render

    text = render()
    # the comment next to RolloutConfig.eta in rlfh/config/schema.py, verbatim
    assert "| `rollout.eta` | float | `0.0` | DDIM eta; 1.0 makes the sampler stochastic (DDPO) |" in text
    assert "| `model.revision` | str \\| None | `null` |" in text
    assert "one of float32, bfloat16, float16" in text


def test_schema_lines_fit_120_characters():
    """Field comments stay one short line; a longer explanation goes to the field's ``doc`` (knob) or its
    class docstring, which docs/config.md renders whole."""
    from rlfh.losses.registry import LOSSES

    files = {REPO / "rlfh" / "config" / "schema.py"} | {
        Path(sys.modules[spec.config.__module__].__file__) for spec in LOSSES.values()
    }
    long = [
        f"{p.name}:{i}"
        for p in sorted(files)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if len(line) > 120
    ]
    assert not long, long


def test_loss_sections_come_from_their_loss_files():
    from rlfh.config.docs import render

    text = render()
    for section in (
        "learner.dpo",
        "learner.dpo.guidance",
        "learner.ddpo",
        "learner.nft",
        "learner.awm",
        "learner.rwr",
        "learner.filtered",
    ):
        assert f"## `{section}`" in text
    # a docstring attribute is rendered whole, not cut at its first sentence
    assert "1e-5 is Flow-DPPO's reference for lr 3e-4 (the KL grows as lr^2)" in text


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but ``-``/``_`` dropped,
    spaces as ``-`` (``## `data.hgdpo.stages[]` `` -> ``datahgdpostages``)."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_into_the_config_reference_name_its_sections():
    """The docs explain a knob by linking to its section of docs/config.md; a renamed or moved section
    must not leave such a link dangling."""
    config_md = (REPO / "docs" / "config.md").read_text()
    anchors = {heading_anchor(line) for line in config_md.splitlines() if line.startswith("#")}
    assert {"datahgdpostages", "dataregion_pairs", "top-level"} <= anchors  # the slug rule as GitHub has it
    links = [
        (path.relative_to(REPO), anchor)
        for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
        for anchor in re.findall(r"config\.md#([\w-]+)", path.read_text())
    ]
    assert links, "no doc links into docs/config.md: the check would pass on nothing"
    dangling = [f"{path}: config.md#{anchor}" for path, anchor in links if anchor not in anchors]
    assert not dangling, dangling
