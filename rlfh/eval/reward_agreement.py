"""How well each configured reward agrees with human judgements: ``rlfh eval-rewards CONFIG LABELS_FILE``.

FaceScore (Liao et al. 2024, arXiv 2406.17100, Tables 2 and 6) measures its metric and the
baselines (ImageReward, HPS, LocalIR, LocalHPS, ...) against human rankings of image triplets by
ranking accuracy and correlation. This module does the same for any reward of a config, on a
labels file in JSON Lines, one comparison a line, image paths relative to the labels file::

    {"prompt": "a woman reading", "images": ["a.png", "b.png", "c.png"], "ranking": [2, 1, 3]}
    {"prompt": "a man waving", "chosen": "d.png", "rejected": "e.png"}
    {"prompt": "a man waving", "chosen": "f.png", "rejected": "g.png", "tie": true}

``ranking[i]`` is the rank of ``images[i]``: 1 is the best, equal ranks are a tie. A pairwise line
names the preferred image ``chosen``; ``"tie": true`` says neither is better. ``prompt`` is the
text the images were generated from (the text rewards read it; region scorers ignore it). Other
keys (``id``, ``labeler``, ...) are allowed and ignored. docs/evaluation.md describes the format.

Metrics per reward, over the comparisons (s = the reward's value, higher is better):

* ``pair_accuracy``: over every pair (i, j) of a comparison that a person ordered (i above j),
  1 if s_i > s_j, 0.5 if s_i = s_j, 0 if s_i < s_j, averaged; human ties are not counted, pairs
  where the reward has no value for an image are excluded and counted;
* ``ranking_accuracy``: the share of comparisons (with no human tie and every value present) whose
  whole order the reward reproduces strictly (a triplet counts only when all three pairs are right);
* ``pearson``: Pearson's r between s and the human score, pooled over every image with a value; the
  human score of an image among k is (k - rank) / (k - 1), with tied images sharing the mean of the
  places they fill (rank = 1 + #images above + #others tied with it / 2): 1 = best, 0 = worst; a
  pairwise line gives 1 and 0, a tie 0.5 each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """One human judgement: images of one prompt and their ranks (1 = best, equal = tie)."""

    prompt: str
    images: tuple[Path, ...]
    ranks: tuple[int, ...]
    line: int

    def ordered_pairs(self) -> list[tuple[int, int]]:
        """(i, j) index pairs where a person put image i strictly above image j."""
        n = len(self.images)
        return [(i, j) for i in range(n) for j in range(n) if self.ranks[i] < self.ranks[j]]

    def has_tie(self) -> bool:
        return len(set(self.ranks)) < len(self.ranks)

    def human_scores(self) -> list[float]:
        """(k - rank) / (k - 1) per image, ties sharing the mean of their places (module docstring)."""
        k = len(self.images)
        ranks = [1 + sum(r < ri for r in self.ranks) + (sum(r == ri for r in self.ranks) - 1) / 2 for ri in self.ranks]
        return [(k - r) / (k - 1) for r in ranks]


def _parse(obj: Any, where: str) -> tuple[str, list[str], list[int]]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a comparison is a JSON object")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' (a string, the images' prompt) is required")
    if "images" in obj:
        images, ranking = obj["images"], obj.get("ranking")
        if not isinstance(images, list) or len(images) < 2 or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{where}: 'images' must list at least two image paths")
        if not isinstance(ranking, list) or len(ranking) != len(images):
            raise ValueError(f"{where}: 'ranking' must give one rank per image ({len(images)})")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranking):
            raise ValueError(f"{where}: 'ranking' holds integers >= 1 (1 = best, equal = tie), got {ranking}")
        return prompt, images, ranking
    if "chosen" in obj and "rejected" in obj:
        chosen, rejected = obj["chosen"], obj["rejected"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{where}: 'chosen' and 'rejected' are image paths")
        tie = obj.get("tie", False)
        if not isinstance(tie, bool):
            raise ValueError(f"{where}: 'tie' is true or false")
        return prompt, [chosen, rejected], [1, 1] if tie else [1, 2]
    raise ValueError(f"{where}: give 'images' + 'ranking', or 'chosen' + 'rejected' (see docs/evaluation.md)")


def load_comparisons(labels_file: str | Path) -> list[Comparison]:
    """Read a labels file; every image must exist.

    Raises:
        FileNotFoundError: the file or an image it names is missing.
        ValueError: a malformed line (named by number) or no comparison at all.
    """
    path = Path(labels_file)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path}: no such file")
    root = path.resolve().parent
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON: {e}") from e
        prompt, images, ranks = _parse(obj, where)
        paths = tuple((root / p) if not Path(p).is_absolute() else Path(p) for p in images)
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{where}: image {p} not found (paths are relative to the labels file)")
        out.append(Comparison(prompt, paths, tuple(ranks), n))
    if not out:
        raise ValueError(f"{path} holds no comparisons (one JSON object a line)")
    return out


def score_comparisons(reward_set, comparisons: Sequence[Comparison], batch_size: int = 8) -> dict[str, dict]:
    """Every reward's value for every distinct (image, prompt): {reward: {(path, prompt): value}}.

    Images of one size are scored together, ``batch_size`` at a time (a batch is one array).
    """
    from PIL import Image

    keys = sorted({(str(p), c.prompt) for c in comparisons for p in c.images})
    arrays = {k: np.asarray(Image.open(k[0]).convert("RGB")) for k in keys}
    by_shape: dict[tuple, list] = {}
    for k in keys:
        by_shape.setdefault(arrays[k].shape, []).append(k)
    values: dict[str, dict] = {n: {} for n in reward_set.names}
    for group in by_shape.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            scored = reward_set(np.stack([arrays[k] for k in chunk]), [k[1] for k in chunk])
            for name, res in scored.results.items():
                values[name].update({k: r.value for k, r in zip(chunk, res)})
    return values


def agreement(comparisons: Sequence[Comparison], value_of: dict) -> dict[str, Any]:
    """Pair accuracy, ranking accuracy and Pearson's r of one reward (formulas: module docstring)."""
    outcomes, excluded, human_ties = [], 0, 0
    exact, ranked = 0, 0
    xs, ys = [], []
    for c in comparisons:
        s = [value_of[(str(p), c.prompt)] for p in c.images]
        for i, j in c.ordered_pairs():
            if s[i] is None or s[j] is None:
                excluded += 1
            else:
                outcomes.append(1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
        human_ties += sum(1 for i in range(len(s)) for j in range(i + 1, len(s)) if c.ranks[i] == c.ranks[j])
        if not c.has_tie() and all(v is not None for v in s):
            ranked += 1
            exact += all(s[i] > s[j] for i, j in c.ordered_pairs())
        for v, h in zip(s, c.human_scores()):
            if v is not None:
                xs.append(v)
                ys.append(h)
    return {
        "pair_accuracy": float(np.mean(outcomes)) if outcomes else None,
        "n_pairs": len(outcomes),
        "pairs_excluded": excluded,
        "human_ties": human_ties,
        "ranking_accuracy": exact / ranked if ranked else None,
        "n_rankings": ranked,
        **pearson(xs, ys),
    }


def pearson(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson's r with its count, or None with the reason (fewer than 2 points, a constant side)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2:
        return {"pearson": None, "n_images": int(a.size), "pearson_reason": "fewer than 2 scored images"}
    if a.std() == 0 or b.std() == 0:
        which = "the reward's values" if a.std() == 0 else "the human scores"
        return {"pearson": None, "n_images": int(a.size), "pearson_reason": f"{which} do not vary"}
    r = float(np.corrcoef(a, b)[0, 1])
    return {"pearson": r, "n_images": int(a.size), "pearson_reason": None}


def evaluate_rewards(cfg, labels_file: str | Path, batch_size: int = 8) -> dict[str, Any]:
    """Score the images of a labels file with ``cfg.rewards`` and report each reward's agreement."""
    return evaluate_comparisons(cfg, load_comparisons(labels_file), str(labels_file), batch_size)


def evaluate_comparisons(cfg, comparisons: Sequence[Comparison], source: str, batch_size: int = 8) -> dict[str, Any]:
    """Score ``comparisons``' images with ``cfg.rewards`` and report each reward's agreement with them."""
    from rewards.composite import RewardSet

    with RewardSet.from_config(cfg.rewards) as reward_set:
        values = score_comparisons(reward_set, comparisons, batch_size)
    return {
        "labels_file": source,
        "n_comparisons": len(comparisons),
        "n_images": len({(str(p), c.prompt) for c in comparisons for p in c.images}),
        "rewards": {name: agreement(comparisons, v) for name, v in values.items()},
    }


def format_agreement(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_rewards`' report."""

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"{report['n_comparisons']} comparisons, {report['n_images']} images ({report['labels_file']})"]
    for name, m in report["rewards"].items():
        lines.append(
            f"  {name}: pair accuracy {f(m['pair_accuracy'])} over {m['n_pairs']} pairs "
            f"({m['pairs_excluded']} excluded, {m['human_ties']} human ties); ranking accuracy "
            f"{f(m['ranking_accuracy'])} over {m['n_rankings']}; Pearson r {f(m['pearson'])}"
            + (f" ({m['pearson_reason']})" if m["pearson_reason"] else "")
        )
    return "\n".join(lines)
