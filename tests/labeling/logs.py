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
