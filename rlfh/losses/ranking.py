"""FaceScore's ranking loss for training a scorer on (win, loss) pairs (Liao et al., "FaceScore:
Benchmarking and Enhancing Face Quality in Human Generation", arXiv 2406.17100, eq. 3; the same
loss as ImageReward's reward-model training, THUDM/ImageReward ``train/src/train.py: loss_func``,
written there as a 2-way cross-entropy with the winner as the target)::

    L_rank(phi) = -1/|B| * sum_{(x_w, x_l) in B} log sigmoid(s_phi(x_w) - s_phi(x_l))
    accuracy    = 1/|B| * sum 1[s_phi(x_w) > s_phi(x_l)]     (strict, as ImageReward counts it:
                                                              a tie is not a correct ranking)

Code name -> paper symbol: ``score_w`` = s_phi(x_w), the scorer's raw output on the winner's
region crop; ``score_l`` = s_phi(x_l) on the loser's; the mean runs over the mini-batch B of pairs.
-log sigmoid(d) is evaluated as softplus(-d), which stays finite for any margin d.

Shapes: ``score_w`` and ``score_l`` are (B,), B = number of pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(score_w: Tensor, score_l: Tensor) -> None:
    if score_w.ndim != 1 or score_w.shape != score_l.shape or score_w.shape[0] == 0:
        raise ValueError(
            f"score_w and score_l must be 1-D of the same length B > 0 (one score per pair), "
            f"got {tuple(score_w.shape)} and {tuple(score_l.shape)}"
        )


def ranking_loss(score_w: Tensor, score_l: Tensor) -> Tensor:
    """``mean(-log sigmoid(score_w - score_l))``, a scalar; gradients reach both scores.

    Raises:
        ValueError: if the inputs are not two 1-D tensors of the same non-zero length.
    """
    _check(score_w, score_l)
    return -F.logsigmoid(score_w - score_l).mean()


def ranking_accuracy(score_w: Tensor, score_l: Tensor) -> Tensor:
    """Fraction of pairs the scorer ranks right, ``mean 1[score_w > score_l]``; detached scalar."""
    _check(score_w, score_l)
    return (score_w.detach() > score_l.detach()).to(torch.float32).mean()
