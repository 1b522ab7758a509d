"""docs/config.md is exactly what `python -m rlfh.config.docs` generates from the schema."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_config_reference_is_up_to_date():
    generated = subprocess.run([sys.executable, "-m", "rlfh.config.docs"], capture_output=True, text=True,
                               cwd=REPO, check=True).stdout
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == generated, "docs/config.md is stale: run `python -m rlfh.config.docs > docs/config.md`"


def test_every_key_is_documented_once():
    import dataclasses

    from rlfh.config.schema import Config
    from rlfh.config.docs import undocumented, walk

    assert undocumented() == [], "add a `# comment` next to the field in rlfh/config/schema.py or an entry in DESCRIPTIONS"
    keys = [r["key"] for _, rows in walk(Config) for r in rows]
    assert len(keys) == len(set(keys))
    # every leaf of the schema appears: top-level plain fields and the fields of each section
    assert "run_dir" in keys and "learner.lora.rank" in keys and "rewards[].target" in keys
    from rlfh.config.schema import ModelConfig

    leaf_count = len(dataclasses.fields(ModelConfig))
    assert sum(k.startswith("model.") for k in keys) == leaf_count


def test_comments_and_types_come_from_the_schema():
    from rlfh.config.docs import render

    text = render()
    # the comment next to RolloutConfig.eta in rlfh/config/schema.py, verbatim
    assert "| `rollout.eta` | float | `0.0` | DDIM eta; 1.0 makes the sampler stochastic (DDPO) |" in text
    assert "| `model.revision` | str \\| None | `null` |" in text
    assert "one of float32, bfloat16, float16" in text
