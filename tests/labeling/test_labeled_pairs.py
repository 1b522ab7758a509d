"""``data.human_labels``: a labeled log's pairs mixed into every round's pairs (online or offline)."""

import numpy as np
import pytest

from rlfh.labeling.table import LabelsTable
from rollouts.log import RolloutLog, decode_latent
from tests.labeling.test_human_pairs import label


@pytest.fixture()
def labeled_log(tmp_path):
    from tests.rlfh.test_hgdpo_offline import write_log

    log = write_log(tmp_path / "labeled")
    records = RolloutLog(log).records(["rollout_id", "prompt", "latent", "latent_shape"])
    table = LabelsTable(log)
    want = []
    for k in range(4):
        a, b = records[2 * k], records[2 * k + 1]
        label(table, b["rollout_id"], a["rollout_id"], tie=k == 3)
        if k < 3:
            want.append((decode_latent(b), decode_latent(a), b["prompt"]))
    return log, want


def make_cfg(tiny_model_dir, tmp_path, *overrides):
    from rlfh.config.schema import load_config
    from tests.conftest import REPO

    return load_config(
        REPO / "configs" / "tiny.yaml",
        [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "learner.regions.names=[global, face]",
         *overrides],
    )  # fmt: skip


def round_pairs(n: int, side: int = 8):
    from rlfh.data.batches import PairBatch

    rng = np.random.default_rng(1)
    lat = lambda: rng.standard_normal((n, 4, side, side)).astype(np.float32)  # noqa: E731
    mask = {"face": np.zeros((n, 1, side, side), np.float32)}
    return PairBatch(lat(), lat(), [f"round prompt {i}" for i in range(n)], mask, dict(mask), {"p": None})


def test_labeled_pairs_join_each_round(labeled_log, tiny_model_dir, tmp_path):
    from rlfh.data.sources import SourceContext, build_sources
    from rlfh.data.sources.base import RoundData
    from rlfh.learner.run_config import needs_text_encoders

    log, want = labeled_log
    cfg = make_cfg(tiny_model_dir, tmp_path, f"data.human_labels.log={log}")
    (src,) = build_sources(cfg, SourceContext(tmp_path))
    assert src.name == "labeled_pairs" and needs_text_encoders(cfg)
    base = round_pairs(2)
    out, stats = src.extend(base, RoundData(0, 0))
    assert len(out) == 5 and out.prompts[:2] == base.prompts and out.conditioning == {"p": None}
    for j, (w, l, prompt) in enumerate(want):
        assert np.array_equal(out.latents_w[2 + j], w) and np.array_equal(out.latents_l[2 + j], l)
        assert out.prompts[2 + j] == prompt
    assert set(out.masks_w) == {"face"} and out.masks_w["face"].shape == (5, 1, 8, 8)
    assert stats == {"human_labels/count": 4.0, "human_labels/ties": 1.0, "human_labels/not_in_batch": 0.0,
                     "human_labels/labelers": 1.0, "human_labels/pairs": 3.0}  # fmt: skip


def test_a_seeded_draw_per_round(labeled_log, tiny_model_dir, tmp_path):
    from rlfh.data.sources import SourceContext, build_sources

    log, _ = labeled_log
    cfg = make_cfg(tiny_model_dir, tmp_path, f"data.human_labels.log={log}", "data.human_labels.pairs_per_round=2")
    (src,) = build_sources(cfg, SourceContext(tmp_path))
    draws = [tuple(src.take(r).prompts) for r in range(8)]
    assert all(len(d) == 2 for d in draws) and len(set(draws)) > 1
    assert draws == [tuple(src.take(r).prompts) for r in range(8)]  # a resumed run draws the same


def test_mismatches_name_the_key(labeled_log, tiny_model_dir, tmp_path):
    from rlfh.config.schema import ConfigError
    from rlfh.data.sources import SourceContext, build_sources
    from rlfh.data.sources.base import RoundData

    log, _ = labeled_log
    (src,) = build_sources(make_cfg(tiny_model_dir, tmp_path, f"data.human_labels.log={log}"), SourceContext(tmp_path))
    with pytest.raises(ValueError, match="data.human_labels.log=.*its latents are"):
        src.extend(round_pairs(2, side=4), RoundData(0, 0))
    with pytest.raises(ValueError, match="learner.loss=rwr trains no pairs"):
        build_sources(make_cfg(tiny_model_dir, tmp_path, f"data.human_labels.log={log}", "learner.loss=rwr"),
                      SourceContext(tmp_path))  # fmt: skip
    with pytest.raises(ConfigError, match="data.human_labels.pairs_per_round=-1"):
        make_cfg(tiny_model_dir, tmp_path, "data.human_labels.pairs_per_round=-1")
