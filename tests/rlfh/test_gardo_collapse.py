"""On a tiny task built to collapse (a reward that one image maximizes; tests/rlfh/gardo_collapse.py), GARDO keeps
the seeds of a prompt as far apart as the base model had them, measurably better than the same rounds without it,
while the reward still rises."""

from __future__ import annotations

import pytest

from tests.rlfh.gardo_collapse import spread_kept

# Margins from python -m tests.learning_sweep gardo_spread --seeds 0 1 2 (the table in gardo_collapse.py), each half
# the smallest value measured: drift kept 0.0289, 0.0289, 1.90 -> 0.0144; reward gain with GARDO +0.0099, +0.0316,
# +0.0065 -> 0.003. (Seed 2's run without GARDO diverged, which the drift counts as much as a collapse.)
DRIFT_MARGIN, GAIN_MARGIN = 0.0144, 0.003


@pytest.mark.slow
def test_gardo_keeps_the_seeds_apart_while_the_reward_rises(tiny_model_dir):
    kept, gain = spread_kept(tiny_model_dir)
    assert kept >= DRIFT_MARGIN and gain >= GAIN_MARGIN
