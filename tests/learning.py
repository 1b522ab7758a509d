"""Learning tests that hold on any CPU: a gain judged by its spread over seeds, not by one run's number.

A learning test's trajectory moves with the machine's float rounding (another CPU's kernels, thread
count or instruction set give other last bits, which 8 rounds of training amplify into another run),
so a margin taken from one run on one machine fails on the next one (0.219 against a margin of 0.23 set
at half of one 0.46 gain). These tests train the same loop from several seeds (the adapter's init, the
rollouts' noise) and require the mean gain to be above zero by ``k`` standard errors of that mean:
the seeds stand in for the machines, and the spread they show is the one a machine's rounding adds.
"""

from __future__ import annotations

import numpy as np


def assert_mean_gain_above_zero(gains, k: float, what: str) -> None:
    """mean(gains) > k * std(gains, ddof=1) / sqrt(n): the gain is positive, at about the confidence k gives."""
    g = np.asarray(gains, dtype=np.float64)
    assert g.size >= 2, "needs two seeds or more for a spread"
    se = g.std(ddof=1) / np.sqrt(g.size)
    msg = (f"{what}: gains {np.round(g, 4).tolist()} over {g.size} seeds, mean {g.mean():.4f}, "
           f"standard error {se:.4f}: mean / se = {g.mean() / max(se, 1e-12):.2f}, needs > {k}")
    print(msg)
    assert g.mean() > k * se, msg
