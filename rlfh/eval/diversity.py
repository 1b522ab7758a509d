"""Collapse and reward-hacking metrics, shared by ``rlfh eval`` and the online guards.

A policy that learns to please a face reward can collapse onto one face (every prompt and seed
gives the same person) or onto one picture per prompt (the seed stops mattering), and a policy that
hacks its training rewards scores better on the prompts it trains on than on prompts it never saw.
Each metric is a dict ``{"value": float | None, "reason": str | None, ...counts}``: a value, or
None with the reason it cannot be computed, never a made-up number.

* :func:`face_identity_similarity`: mean pairwise cosine similarity of the embeddings of faces in
  different images (across seeds and prompts): 1 = every face embeds the same, lower = more varied.
  The embeddings come from a configured reward model (``rewards.embeddings``: FaceScore's BLIP
  image encoder first).
* :func:`image_diversity`: per prompt, the mean over pairs of its images (different seeds) of the
  root-mean-square pixel difference of the two images box-downsampled to 64 x 64, pixels in [0, 1];
  averaged over prompts with >= 2 images. 0 = the seed no longer changes the image; 1 = black vs
  white. Pixels rather than a reward model's embedding, so that it needs no model, is the same for
  every config and cannot itself be the thing a policy learned to fool; 64 x 64 keeps the layout and
  colours and drops the fine texture that sampling noise alone changes.
* :func:`reward_gap`: mean training-prompt reward minus mean held-out reward, with the same rewards;
  a gap that grows during training says the reward is won on the training prompts only.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np

DIVERSITY_SIDE = 64


def _na(reason: str, **counts: Any) -> dict[str, Any]:
    return {"value": None, "reason": reason, **counts}


def face_identity_similarity(
    embeddings: np.ndarray | None, owners: Sequence[int], source: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """Mean pairwise cosine similarity of face embeddings, over pairs of faces in different images.

    Formula, for faces i, j with embeddings e_i, e_j and owner images o_i != o_j:

        sim = mean_{i < j, o_i != o_j} e_i . e_j / (|e_i| |e_j|)

    Pairs within one image are left out: two people in one picture are not a collapse across samples.

    Args:
        embeddings: (N, D), one row per face; None when no embedding could be made (``reason`` says why).
        owners: the image index of each face.
        source: which model embedded them (recorded).
        reason: why ``embeddings`` is None.

    Example: e = [1, 0], [1, 0], [0, 1] in images 0, 1, 2 -> pairs (0,1)=1, (0,2)=0, (1,2)=0 -> 1/3.
    """
    if embeddings is None:
        return _na(reason or "no face embeddings", n_faces=0, n_pairs=0, source=source)
    e = np.asarray(embeddings, dtype=np.float64)
    n = len(owners)
    if n and e.shape[0] != n:
        raise ValueError(f"{e.shape[0]} embeddings for {n} faces")
    counts = {"n_faces": n, "n_images_with_faces": len(set(owners)), "source": source}
    if len(set(owners)) < 2:
        return _na(
            f"faces found in {len(set(owners))} image(s); the similarity needs faces in >= 2 images",
            n_pairs=0,
            **counts,
        )
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(e)):
        return _na("an embedding is zero or not finite", n_pairs=0, **counts)
    u = e / norms
    sim = u @ u.T
    o = np.asarray(owners)
    mask = np.triu(o[:, None] != o[None, :], k=1)
    return {"value": float(np.clip(sim[mask].mean(), -1.0, 1.0)), "reason": None, "n_pairs": int(mask.sum()), **counts}


def _small(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return np.asarray(im.resize((side, side), Image.BOX), dtype=np.float64) / 255.0


def image_diversity(
    images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[Hashable], side: int = DIVERSITY_SIDE
) -> dict[str, Any]:
    """Mean pairwise RMS pixel distance between images of the same prompt, averaged over prompts.

    Formula, with x_a the image a box-downsampled to ``side`` x ``side`` RGB in [0, 1] (P values):

        d(a, b)  = sqrt(mean_p (x_a,p - x_b,p)^2)
        div(c)   = mean_{a < b, both of prompt c} d(a, b)
        value    = mean over prompts c with >= 2 images of div(c)

    Example: a prompt with a black and a white image -> 1; one with two identical images -> 0;
    value = 0.5.

    Args:
        images: uint8 (N, H, W, 3) (or N such arrays).
        prompts: the prompt of each image; images of one prompt differ by their seed.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    groups: dict[Hashable, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    per_prompt, n_pairs = [], 0
    for idx in groups.values():
        if len(idx) < 2:
            continue
        x = np.stack([_small(images[i], side).ravel() for i in idx])
        d = [np.sqrt(np.mean((x[a] - x[b]) ** 2)) for a in range(len(idx)) for b in range(a + 1, len(idx))]
        per_prompt.append(float(np.mean(d)))
        n_pairs += len(d)
    if not per_prompt:
        return _na(
            "every prompt has a single image; the diversity within a prompt needs >= 2 seeds per prompt",
            n_prompts=0,
            n_pairs=0,
        )
    return {
        "value": float(np.mean(per_prompt)),
        "reason": None,
        "n_prompts": len(per_prompt),
        "n_pairs": n_pairs,
        "method": f"RMS pixel distance at {side}x{side}, [0, 1] scale",
    }


def reward_gap(train: Sequence[float | None], heldout: Sequence[float | None]) -> dict[str, Any]:
    """Mean of the usable training-prompt rewards minus mean of the usable held-out rewards.

    Example: train [3, 5], held-out [1, None, 2] -> 4 - 1.5 = 2.5.
    """
    t = [float(v) for v in train if v is not None and np.isfinite(v)]
    h = [float(v) for v in heldout if v is not None and np.isfinite(v)]
    counts = {"n_train": len(t), "n_heldout": len(h)}
    if not t or not h:
        side = "training-prompt" if not t else "held-out"
        return _na(
            f"no usable {side} reward",
            train_mean=float(np.mean(t)) if t else None,
            heldout_mean=float(np.mean(h)) if h else None,
            **counts,
        )
    tm, hm = float(np.mean(t)), float(np.mean(h))
    return {"value": tm - hm, "reason": None, "train_mean": tm, "heldout_mean": hm, **counts}


def face_lists(regions: Sequence[dict]) -> list[list] | None:
    """Per image, its face detections from a scored batch's regions (``ScoredBatch.regions(i)``); None
    when no reward looked for faces (then the face reward's own detector has to run)."""
    if not any("face" in r for r in regions):
        return None
    return [list(r.get("face", [])) for r in regions]


def face_similarity_from(embedded: dict[str, Any]) -> dict[str, Any]:
    """:func:`face_identity_similarity` of what ``RewardSet.face_embeddings`` returned."""
    emb = embedded.get("embeddings")
    return face_identity_similarity(emb, embedded.get("owners", []), embedded.get("source"), embedded.get("reason"))
