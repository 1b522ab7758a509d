"""Train a region scorer the way FaceScore was trained (arXiv 2406.17100, "Ranking Loss" and
"Fine-tuning IR"): an ImageReward-architecture model fine-tuned on (win, loss) region crops.

    rlfh train-reward CONFIG pairs=ROLLOUT_DIR init=SCORER_DIR [region=hand] [key=value ...]

Top to bottom, :func:`train_reward`:

1. Pairs (:func:`region_pairs`). With ``reward_training.winner: original`` (the default, FaceScore's
   labelling rule), each logged region pair (an image and its inpainted copy, linked by the log's
   ``region_pair`` column: ``rlfh make-region-pairs``, ``data.region_pairs``) is a pair whose original
   wins and whose inpainted copy loses, by hypothesis, no score read: training on scores would distil
   the scorer that gave them. With ``winner: reward`` the scores pick: a region pair is ordered by its
   two scores, and in each other group of the rollout log (its (round, prompt), the way every logged
   sample competed) the winner and the loser are the highest- and lowest-scoring records, by
   ``reward_training.score``: ``combined`` (the config's ``rewards:`` weights and
   ``rewards_normalization``, as offline-dpo pairs them) or one logged reward's name; records without
   a usable score and tied groups give no pair. Both images are cropped at ONE box: for a region pair
   the most confident of the original's boxes of ``reward_training.region`` that were inpainted
   (:func:`rlfh.data.region_pairs.inpainted_boxes`: one face of a per-face pair), else the most
   confident logged detection in the winner (in the loser when the winner has none): the pair then
   differs only where the images differ (FaceScore's pairs differ only inside the inpainted face).
   The crop is FaceScore's own (the box widened by 1 px, ``rewards.blip_preprocess.crop_bounds``)
   and each crop is preprocessed as FaceScore scores it (``preprocess_pil``), with the fixed prompt
   ("A face.", "A hand.").
2. Held-out split: a seeded share (``heldout_fraction``) of the pairs is never trained on; its
   ranking accuracy is measured before training and after every epoch.
3. Scorer: ``init`` loaded by the reward's own loader (``rewards.blip_reward_model``: a directory
   or hub id with ``FS_model.pt`` or ``ImageReward.pt`` + ``med_config.json``, strictly checked).
4. Freezing (:func:`freeze_leading_layers`), our reading of "we freeze the first 70% layers of
   the backbone": the backbone is BLIP's two encoders, and its "layers" are their transformer
   blocks, the 24 ViT-L blocks (``visual_encoder.encoder.layers``) and the 12 BERT layers
   (``text_encoder.encoder.layer``). The first floor(0.7 * 24) = 16 ViT blocks and floor(0.7 * 12)
   = 8 text layers are frozen, with everything before them (patch / position / CLS embeddings,
   word / position embeddings), exactly the split of ImageReward's own training code
   (THUDM/ImageReward ``train/src/ImageReward.py``, ``fix_rate``). The later blocks, the ViT's
   final LayerNorm and the MLP head train. BLIP's contrastive heads (``vision_proj``, ``text_proj``)
   do not enter the score and stay frozen, as ImageReward freezes every ``_proj``. (ImageReward's
   loop also freezes the first parameter tensor of block 16 / layer 8, a side effect of where it
   breaks out of its loop; we do not copy that.)
5. Training: AdamW (lr 1e-5, FaceScore's), mini-batches of ``batch_size`` pairs, the ranking loss
   of ``rlfh/losses/ranking.py``, the model in train mode (its dropouts on, as ImageReward trains).
   ``metrics.jsonl`` gets one row per epoch (epoch 0: before training): ``heldout/accuracy``,
   ``heldout/loss``, ``train/loss``, ``train/accuracy``.
6. Output: ``FS_model.pt`` (the published plain state dict, ``blip.*`` / ``mlp.layers.*`` keys)
   and the init's ``med_config.json`` in ``run_dir``, each written to a temporary name and renamed,
   so ``facescore`` with ``options: {model: RUN_DIR}`` and the reference FaceScore / ImageReward
   code load it unchanged.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlfh.config.schema import Config

WEIGHTS_NAMES = ("FS_model.pt", "ImageReward.pt")  # what an init directory may hold, preferred first
OUTPUT_WEIGHTS = "FS_model.pt"


@dataclass
class RegionPair:
    """One training pair: uint8 RGB crops (h, w, 3) of the winner and the loser at the same box."""

    win: np.ndarray
    lose: np.ndarray
    margin: float  # score(winner) - score(loser) > 0; nan under winner: original, which reads no score
    rollout_ids: tuple[str, str]


def _best_box(dets: list) -> tuple[float, float, float, float] | None:
    return max(dets, key=lambda d: d.confidence).box if dets else None  # max keeps the first of equals


# long: split pending: the region-pair reward training rework is rewriting this function
def region_pairs(cfg: Config) -> tuple[list[RegionPair], dict[str, float]]:
    """(winner, loser) region crops from the rollout log ``reward_training.pairs`` (module docstring, step 1).

    Raises:
        ValueError: no log given, a score the log does not hold, or no usable pair.
        rollouts.log.RolloutLogError: the log is missing, empty or damaged.
    """
    from rlfh.data.pairs import logged_regions

    rt = cfg.reward_training
    records = _read_log(rt)
    regions = logged_regions(records)
    if cfg.labels == "human":  # people's choices (rlfh label) instead of a rule's: FaceScore's recipe on them
        links, stats = _human_links(rt, records)
    else:
        links, stats = _original_wins(records) if rt.winner == "original" else _by_score(cfg, records)
    pairs: list[RegionPair] = []
    no_region = empty_crop = 0
    for win, lose, margin, source in links:
        crop = _crop(records, regions, win, lose, source, rt.region)
        no_region += crop == "no region"
        empty_crop += crop == "empty"
        if isinstance(crop, tuple):
            ids = (records[win]["rollout_id"], records[lose]["rollout_id"])
            pairs.append(RegionPair(crop[0], crop[1], margin, ids))
    stats.update(
        {
            "pairs/records": float(len(records)),
            "pairs/count": float(len(pairs)),
            "pairs/no_region": float(no_region),
            "pairs/empty_crop": float(empty_crop),
        }
    )
    if not pairs:
        raise ValueError(
            f"the rollout log {rt.pairs} yields no (winner, loser) pair for region {rt.region!r} with "
            f"reward_training.winner={rt.winner} (score {rt.score!r}): {len(records)} records in "
            f"{int(stats['pairs/groups'])} groups, {int(stats['samples/unscored'])} without a usable score, "
            f"{no_region} pairs without a logged {rt.region!r} box, {empty_crop} with an empty crop. "
            + _WHY[rt.winner].format(region=rt.region)
        )
    return pairs, stats


_WHY = {
    "original": "winner=original pairs the log's region pairs (rlfh make-region-pairs); a log of plain samples "
    "has none: pair those by score with reward_training.winner=reward",
    "reward": "A pair needs two scored records of one group with different scores and a {region!r} detection",
}


def _read_log(rt) -> list[dict]:
    from rollouts.log import RolloutLog, RolloutLogError

    if rt.pairs is None:
        raise ValueError("train-reward needs the rollout log of pairs: pass pairs=ROLLOUT_DIR (reward_training.pairs)")
    columns = ["rollout_id", "round", "prompt", "rewards", "regions", "image", "latent", "latent_shape"]
    try:
        return RolloutLog(rt.pairs).records([*columns, "region_pair"])
    except RolloutLogError as e:
        raise RolloutLogError(f"reward_training.pairs: {e}") from None


def _region_links(records: list[dict]) -> list[tuple[int, int]]:
    """(original row, inpainted row) of each logged region pair whose original the log holds."""
    by_id = {r["rollout_id"]: i for i, r in enumerate(records)}
    return [
        (by_id[r["region_pair"]["source_id"]], i)
        for i, r in enumerate(records)
        if (r.get("region_pair") or {}).get("role") == "inpainted" and r["region_pair"]["source_id"] in by_id
    ]


def _human_links(rt, records: list[dict]):
    """(winner, loser, margin, False) per pair people labeled in the log (``rlfh label``); stats."""
    from rlfh.data.human_pairs import human_pairs

    chosen = human_pairs(rt.pairs, [r["rollout_id"] for r in records])[0]
    stats = {"pairs/groups": float(len(chosen)), "samples/unscored": 0.0}
    return [(p.winner, p.loser, p.margin, False) for p in chosen], stats


def _original_wins(records: list[dict]):
    """FaceScore's rule: (original, inpainted, nan, True) per logged region pair; stats."""
    links = _region_links(records)
    stats = {"pairs/groups": float(len(links)), "samples/unscored": 0.0}
    return [(o, i, float("nan"), True) for o, i in links], stats


def _by_score(cfg: Config, records: list[dict]):
    """(winner, loser, margin, is a region pair) by ``reward_training.score``: each region pair by its
    two scores, the other records best against worst of their (round, prompt) group; stats."""
    from rlfh.data.pairs import build_pairs, logged_scores
    from rlfh.data.region_pairs import pair_order

    rt = cfg.reward_training
    scores, _, _, groups, stats = logged_scores(records, cfg.rewards, cfg.rewards_normalization, rt.pairs, rt.score)
    links = []
    for o, i in _region_links(records):
        inp_wins = pair_order("reward", scores[o], scores[i])
        if inp_wins is not None:
            links.append((i, o, scores[i] - scores[o], True) if inp_wins else (o, i, scores[o] - scores[i], True))
    in_pairs = {r for o, i in _region_links(records) for r in (o, i)}
    plain = [g if k not in in_pairs else ("region_pair", k) for k, g in enumerate(groups)]  # singletons: no pair
    links += [(p.winner, p.loser, p.margin, False) for p in build_pairs(plain, scores, "best_worst")]
    stats = {
        **stats,
        "pairs/groups": float(len(set(plain)) - len(in_pairs) + len(_region_links(records))),
        "samples/unscored": float(sum(s is None for s in scores)),
    }
    return links, stats


def _crop(records, regions, win: int, lose: int, region_pair: bool, region: str):
    """(winner crop, loser crop) at one box (module docstring, step 1), or "no region" / "empty"."""
    from rewards.blip_preprocess import crop_bounds
    from rlfh.data.region_pairs import inpainted_boxes
    from rollouts.log import decode_latent, decode_png

    box = _best_box(regions[win].get(region, [])) or _best_box(regions[lose].get(region, []))
    if region_pair:
        src, inp = (win, lose) if (records[lose].get("region_pair") or {}).get("role") == "inpainted" else (lose, win)
        dets, im = regions[src].get(region, []), decode_png(records[src]["image"])
        lat = decode_latent(records[src]), decode_latent(records[inp])
        dilate = records[inp]["region_pair"]["dilate"]
        hit = inpainted_boxes([d.box for d in dets], *lat, im.shape[:2], dilate) if dets else []
        box = _best_box([d for d in dets if d.box in hit]) or box
    if box is None:
        return "no region"
    win_im, lose_im = decode_png(records[win]["image"]), decode_png(records[lose]["image"])
    bounds = [crop_bounds(box, *im.shape[:2]) for im in (win_im, lose_im)]
    if None in bounds:
        return "empty"
    (wy0, wy1, wx0, wx1), (ly0, ly1, lx0, lx1) = bounds
    return win_im[wy0:wy1, wx0:wx1], lose_im[ly0:ly1, lx0:lx1]


def split_heldout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) indices; ceil(fraction * n) held out, at least one training pair.

    Raises:
        ValueError: too few pairs to hold any out.
    """
    order = np.random.default_rng([seed, 17]).permutation(n)
    n_held = math.ceil(fraction * n) if fraction > 0 else 0
    if n_held >= n:
        raise ValueError(
            f"{n} pair(s) cannot be split into training and held-out pairs with "
            f"reward_training.heldout_fraction={fraction}; log more pairs or set it to 0"
        )
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def resolve_init(rt) -> tuple[str, Path, Path]:
    """(weights name, weights path, med_config.json path) of ``reward_training.init``.

    Raises:
        ValueError: naming ``reward_training.init`` when no scorer is found there.
    """
    from rewards.base import RewardError
    from rewards.blip_reward_model import resolve_model_files

    if rt.init is None:
        raise ValueError(
            "train-reward needs a scorer to start from: pass init=SCORER_DIR (reward_training.init), a "
            "directory or hub id with FS_model.pt or ImageReward.pt and med_config.json"
        )
    local = Path(rt.init).expanduser()
    if not local.is_dir() and (local.exists() or rt.init.count("/") != 1):
        raise ValueError(f"reward_training.init={rt.init!r}: no such directory (nor a hub id 'owner/name')")
    names = [rt.init_weights_name] if rt.init_weights_name else list(WEIGHTS_NAMES)
    if local.is_dir() and not rt.init_weights_name:
        names = [n for n in names if (local / n).is_file()] or names[:1]
    problems = []
    for name in names:
        try:
            return (name, *resolve_model_files(rt.init, name))
        except RewardError as e:
            problems.append(str(e))
    raise ValueError(f"reward_training.init={rt.init!r}: no scorer found: " + "; ".join(problems))


def freeze_leading_layers(model, fraction: float) -> dict[str, float]:
    """Freeze the first floor(fraction * depth) blocks of each BLIP encoder and what precedes them.

    Leaves trainable the later blocks, the ViT's final LayerNorm and the MLP head; freezes the
    unused contrastive heads (module docstring, step 4). Returns counts for the metrics.
    """
    model.requires_grad_(True)
    vision, text = model.visual_encoder, model.text_encoder
    counts = {}
    for name, embeddings, blocks in (
        ("vision", vision.embeddings, vision.encoder.layers),
        ("text", text.embeddings, text.encoder.layer),
    ):
        n = math.floor(fraction * len(blocks) + 1e-9)  # 0.7 * 30 is 20.999... in floats
        embeddings.requires_grad_(False)
        for block in blocks[:n]:
            block.requires_grad_(False)
        counts[f"freeze/{name}_layers_frozen"] = float(n)
        counts[f"freeze/{name}_layers"] = float(len(blocks))
    model.vision_proj.requires_grad_(False)
    model.text_proj.requires_grad_(False)
    counts["params/trainable"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    counts["params/total"] = float(sum(p.numel() for p in model.parameters()))
    return counts


def pair_scores(model, pairs: list[RegionPair], input_ids, attention_mask, device):
    """Scores (s_w, s_l), each (B,), of a batch of pairs: both crops in one forward pass."""
    import torch

    from rewards.blip_preprocess import preprocess_pil

    pixels = torch.stack([preprocess_pil(c) for c in [p.win for p in pairs] + [p.lose for p in pairs]])
    s = model(pixels.to(device), input_ids.to(device), attention_mask.to(device))  # (2B,)
    return s[: len(pairs)], s[len(pairs) :]


def evaluate(model, pairs: list[RegionPair], input_ids, attention_mask, device, batch_size: int) -> dict[str, float]:
    """Held-out ranking loss and accuracy (``rlfh/losses/ranking.py``), model in eval mode."""
    import torch

    from rlfh.losses.ranking import ranking_accuracy, ranking_loss

    if not pairs:
        return {}
    model.eval()
    sw, sl = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            w, l = pair_scores(model, pairs[i : i + batch_size], input_ids, attention_mask, device)
            sw.append(w)
            sl.append(l)
    sw, sl = torch.cat(sw), torch.cat(sl)
    return {
        "heldout/loss": float(ranking_loss(sw, sl)),
        "heldout/accuracy": float(ranking_accuracy(sw, sl)),
        "heldout/margin_mean": float((sw - sl).mean()),
    }


def _atomic_save(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename: a reader sees the old file or the new one, never half."""
    from rollouts.fileio import fsync_dir

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_scorer(model, med_config: Path, run_dir: Path) -> Path:
    """``FS_model.pt`` (published layout) + ``med_config.json`` into ``run_dir``; returns the weights path."""
    import torch

    from rewards.blip_reward_model import export_published_state_dict

    state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.cpu()
        for k, v in export_published_state_dict(model).items()
    }
    # med_config first: whoever sees the new weights finds their config beside them
    _atomic_save(run_dir / "med_config.json", lambda p: p.write_bytes(med_config.read_bytes()))
    _atomic_save(run_dir / OUTPUT_WEIGHTS, lambda p: torch.save(state, p))
    return run_dir / OUTPUT_WEIGHTS


# long: split pending: the region-pair reward training rework is rewriting this function
def train_reward(cfg: Config) -> Path:
    """Fine-tune ``reward_training.init`` on the region pairs of ``reward_training.pairs``; returns ``run_dir``.

    Raises:
        ValueError: missing or unusable inputs (see :func:`region_pairs`, :func:`resolve_init`), or a
            ``run_dir`` that already holds a trained scorer.
    """
    import torch
    from tqdm import tqdm

    from rlfh.run.skeleton import RunSkeleton

    rt = cfg.reward_training
    skel = RunSkeleton(cfg, save=False)  # the inputs are checked before anything is written
    if (skel.path / OUTPUT_WEIGHTS).exists():
        raise ValueError(
            f"run_dir={skel.path} already holds a trained scorer ({OUTPUT_WEIGHTS}); choose another "
            f"run_dir or remove it"
        )
    weights_name, _, med_config = resolve_init(rt)  # before the log is read: a typo in init fails fast

    # 1-2. pairs, held-out split
    pairs, stats = region_pairs(cfg)
    train_idx, held_idx = split_heldout(len(pairs), rt.heldout_fraction, cfg.seed)
    train_pairs, held_pairs = [pairs[i] for i in train_idx], [pairs[i] for i in held_idx]
    stats.update({"pairs/train": float(len(train_pairs)), "pairs/heldout": float(len(held_pairs))})

    # 3-4. scorer, frozen leading layers, optimizer
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if rt.device == "auto" else rt.device)
    model, text, optimizer = _scorer(cfg, weights_name, device, stats)

    skel.save_config()
    logger = skel.open_metrics()
    try:
        logger.log({"epoch": 0, **stats, **evaluate(model, held_pairs, *text, device, rt.batch_size)}, step=0)
        bar = tqdm(
            total=rt.epochs * math.ceil(len(train_pairs) / rt.batch_size),
            desc="rlfh train-reward",
            unit="step",
            disable=not cfg.logging.progress,
        )
        skel.on_close(bar.close)
        # 5. the loop: one pass over the shuffled training pairs per epoch
        for epoch in range(1, rt.epochs + 1):
            t0 = time.perf_counter()
            row = train_epoch(model, optimizer, train_pairs, text, device, cfg, epoch, bar)
            row.update(
                {**evaluate(model, held_pairs, *text, device, rt.batch_size), "time/epoch_s": time.perf_counter() - t0}
            )
            logger.log(row, step=epoch)
        # 6. the scorer, in the published layout
        write_scorer(model, med_config, skel.path)
    finally:
        skel.close()
    return skel.path


def _scorer(cfg: Config, weights_name: str, device, stats: dict):
    """(``reward_training.init`` loaded with its leading layers frozen, the tokenized fixed prompt, AdamW);
    the freezing counts go to ``stats``."""
    import torch

    from rewards.base import REGION_PROMPTS
    from rewards.blip_preprocess import tokenize
    from rewards.blip_reward_model import load_model_and_tokenizer

    rt = cfg.reward_training
    torch.manual_seed(cfg.seed)  # dropout masks
    model, tokenizer = load_model_and_tokenizer(
        rt.init, weights_name, vision_heads=rt.vision_heads, tokenizer_dir=rt.tokenizer_dir, device=str(device)
    )
    stats.update(freeze_leading_layers(model, rt.freeze_fraction))
    prompt = rt.prompt if rt.prompt is not None else REGION_PROMPTS[rt.region]
    text = tokenize(tokenizer, [prompt])  # (input_ids, attention_mask), (1, 35) each, broadcast over the batch
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=rt.lr,
        betas=tuple(rt.adam_betas),
        weight_decay=rt.weight_decay,
    )
    return model, text, optimizer


def train_epoch(model, optimizer, train_pairs: list[RegionPair], text, device, cfg: Config, epoch: int, bar) -> dict:
    """One pass over the shuffled training pairs (seeded by epoch), model in train mode; the epoch's metrics."""
    from rlfh.losses.ranking import ranking_accuracy, ranking_loss

    rt = cfg.reward_training
    model.train()
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_pairs))
    losses, accs, sizes = [], [], []
    for i in range(0, len(order), rt.batch_size):
        batch = [train_pairs[j] for j in order[i : i + rt.batch_size]]
        score_w, score_l = pair_scores(model, batch, *text, device)
        loss = ranking_loss(score_w, score_l)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        accs.append(float(ranking_accuracy(score_w, score_l)))
        sizes.append(len(batch))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return {
        "epoch": epoch,
        "train/loss": float(np.average(losses, weights=sizes)),
        "train/accuracy": float(np.average(accs, weights=sizes)),
    }
