"""Statistics shared by evaluation and the labeling reports (pure numpy)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

CI_LEVEL = 0.95
N_BOOTSTRAP = 10_000


def bootstrap_ci(
    values: Sequence[float], level: float = CI_LEVEL, n_resamples: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile-bootstrap confidence interval of the mean; None with fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    # resample in blocks so memory stays ~8 MB however many images an eval has
    block = max(1, 1_000_000 // x.size)
    means = np.concatenate(
        [
            x[rng.integers(0, x.size, size=(min(block, n_resamples - i), x.size))].mean(axis=1)
            for i in range(0, n_resamples, block)
        ]
    )
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))
