"""Rollout logs of synthetic (win, loss) region pairs, written with the project's own log writer.

Each group (one round, one prompt) holds an image and its "inpainted" copy: the same 64 x 64
background, different content inside one box. The winner's box holds a checkerboard texture, the
loser's a flat fill with faint noise; each image's box gets its own random colour, so colour and
brightness, which a random scorer reacts to, say nothing about which image won: a scorer has to
learn the texture to rank the pairs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rollouts.log import RolloutLog, png_bytes

SIZE = 64
BOX = (12.0, 10.0, 50.0, 52.0)  # x1, y1, x2, y2


def _box_content(rng: np.random.Generator, win: bool) -> np.ndarray:
    y1, y2, x1, x2 = int(BOX[1]), int(BOX[3]), int(BOX[0]), int(BOX[2])
    h, w = y2 - y1, x2 - x1
    color = rng.uniform(40, 215, size=3)
    if win:
        yy, xx = np.mgrid[:h, :w]
        board = np.where(((yy // 3) + (xx // 3)) % 2 == 0, 1.0, -1.0)[..., None]
        patch = color + 35.0 * board
    else:
        patch = color + rng.normal(0, 3.0, size=(h, w, 3))
    return np.clip(patch, 0, 255).astype(np.uint8)


def record(rid: str, rnd: int, prompt: str, image: np.ndarray, rewards: dict, boxes: dict) -> dict:
    """One rollout-log row (``rollouts.log.SCHEMA``) with a tiny placeholder latent."""
    return {
        "rollout_id": rid,
        "round": rnd,
        "policy_version": 0,
        "staleness": None,
        "model_id": "synthetic",
        "prompt": prompt,
        "negative_prompt": "",
        "seed": 0,
        "sampler": {
            "num_inference_steps": 1,
            "guidance_scale": 1.0,
            "height": image.shape[0],
            "width": image.shape[1],
            "eta": 0.0,
        },
        "latent": np.zeros((4, 1, 1), np.float32).tobytes(),
        "latent_shape": [4, 1, 1],
        "image": png_bytes(image),
        "rewards": [
            {"name": n, "value": v, "reason": None if v is not None else "not computable"} for n, v in rewards.items()
        ],
        "regions": [
            {"region": r, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "confidence": c, "label": None}
            for r, dets in boxes.items()
            for b, c in dets
        ],
        "created_at": time.time(),
    }


def write_pair_log(directory: Path, n_groups: int, seed: int, region: str = "face", reward: str = "quality") -> Path:
    """``n_groups`` groups of (original, inpainted copy) with ``reward`` 1 for the textured box, 0 for the flat one."""
    rng = np.random.default_rng(seed)
    rows = []
    y1, y2, x1, x2 = int(BOX[1]), int(BOX[3]), int(BOX[0]), int(BOX[2])
    for g in range(n_groups):
        background = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        for k, win in enumerate(rng.permutation([True, False])):  # the winner's row comes first or second
            image = background.copy()
            image[y1:y2, x1:x2] = _box_content(rng, bool(win))
            rows.append(
                record(
                    f"g{g}-{k}",
                    g,
                    f"a person {g}",
                    image,
                    {reward: float(win) + rng.normal(0, 0.01)},
                    {region: [(BOX, 0.99)]},
                )
            )
    RolloutLog(directory).append(rows)
    return directory
