"""Small rollout logs to label: groups of distinct flat-colour images with a face box each."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rollouts.log import RolloutLog
from tests.rlfh.region_pair_logs import record


def write_label_log(directory: Path, n_groups: int = 3, per_group: int = 3, seed: int = 0) -> Path:
    """``n_groups`` prompts of ``per_group`` 32 x 32 images each (round 0), reward ``quality`` logged."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        for k in range(per_group):
            image = np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (32, 32, 3)).copy()
            rows.append(
                record(
                    f"g{g}-{k}",
                    0,
                    f"prompt {g}",
                    image,
                    {"quality": float(rng.random())},
                    {"face": [((4.0, 4.0, 20.0, 24.0), 0.9)]},
                )
            )
    RolloutLog(directory).append(rows)
    return directory


TINY_PROMPTS = ["a portrait of a woman", "a man waving his hand", "two people talking", "a photo of a person"]


def write_tiny_model_log(directory: Path, model_dir: str, per_prompt: int = 3, steps: int = 2) -> Path:
    """One round of the tiny model's own samples (64 x 64, ``per_prompt`` seeds a prompt), scored by
    JPEG compressibility and the test reward that reports face and hand boxes, as the engine logs them."""
    from families import load_pipeline
    from rewards.composite import RewardSet
    from rlfh.config.schema import load_config
    from rollouts.log import make_records
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={model_dir}",
            "rewards=[{target: jpeg_compressibility}, "
            "{target: 'tests.rlfh.eval_helpers:BrightestBox', name: brightest_box, weight: 0.5}]",
        ],
    )
    prompts = [p for p in TINY_PROMPTS for _ in range(per_prompt)]
    sampler = Sampler(load_pipeline(cfg.model), model_id="tiny")
    batch = sampler.sample(prompts, list(range(len(prompts))), SamplerSettings(steps, 1.0, "", 64, 64))
    batch.rollout_ids = [f"tiny-{i:03d}" for i in range(len(prompts))]
    with RewardSet.from_config(cfg.rewards) as rewards:
        scored = rewards(batch.images, prompts)
    RolloutLog(directory).append(make_records(batch, scored, round_index=0))
    return directory
