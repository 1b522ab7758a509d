"""FairHuman's own setting (arXiv 2507.02714): supervised fine-tuning on a pre-annotated real dataset
with the global diffusion loss plus face and hand region losses, balanced by MPD.

    rlfh finetune configs/fairhuman_sdxl.yaml data=DIR [key=value ...]

Top to bottom, :func:`finetune`:

1. Images: ``DIR/metadata.jsonl`` lines ``{"file_name", "text"}`` (HG-DPO's real-image layout,
   rlfh/data/real_images.py) resized and center-cropped to ``rollout.height`` x ``rollout.width``, encoded
   once by the model's VAE (``data.finetune.latent_mode``), the latents cached in the run directory.
2. Regions (:func:`image_regions`): an image's ``"regions"`` boxes from its metadata line where given,
   else what the config's rewards' detectors find on the prepared image, detected once per image and
   cached in ``RUN_DIR/finetune-regions.json`` (keyed by the image's file stamp, size and rewards).
   Masks: FairHuman's dilated boxes at latent size (rewards/regions.py), one per region of
   ``learner.regions.names``.
3. Loss: ``learner.loss`` rwr or filtered, with every image's weight 1, is FairHuman's loss: per region r
   the plain eps-MSE, L_global = mean_b ||eps_theta(x_t, t, c) - eps||^2 and L_r = mean over the images
   with r of mean_{C,H,W} (s 1[M_r > 0] (eps_theta - eps))^2 (rlfh/losses/region_mse.py), combined by
   ``learner.regions.fairness`` (MPD by default: rlfh/losses/fairness.py), the per-region losses in
   ``metrics.jsonl`` as ``loss/<loss>/<region>``.
4. Rounds: ``num_rounds`` rounds of ``learner.epochs_per_round`` passes over all images, counted as
   ``rlfh offline-dpo`` counts them (rlfh/recipes/rounds.py: checkpoints, resume, LoRA output).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlfh.config.schema import Config

REGIONS_CACHE = "finetune-regions.json"


def finetune(cfg: Config) -> Path:
    """Fine-tune on the images of ``data.finetune.images`` for ``num_rounds`` rounds; returns the run directory."""
    from rlfh.data.sources import build_sources, close_sources
    from rlfh.recipes.offline import LogFeed
    from rlfh.recipes.rounds import train_rounds
    from rlfh.run.skeleton import RunSkeleton

    if cfg.data.finetune.images is None:
        raise ValueError("finetune needs the real images: pass data=DIR (data.finetune.images)")
    skel = RunSkeleton(cfg)
    try:
        feed = LogFeed(cfg, skel.path)  # a fixed batch every round, as offline
        sources = build_sources(cfg, feed.ctx)
        skel.on_close(lambda: close_sources(sources))
        feed.fixed = finetune_batch(cfg, skel.path)
        feed.start(skel)
        train_rounds(cfg, skel, feed, sources, "rlfh finetune")
    finally:
        skel.close()
    return skel.path


def finetune_batch(cfg: Config, run_dir: Path):
    """(SampleBatch of every image with weight 1 and its region masks, stats) (module docstring, 1-3)."""
    import torch

    from rlfh.data.batches import SampleBatch
    from rlfh.data.pairs import mask_regions, region_mask_arrays
    from rlfh.data.real_images import RealImageSource, load_vae

    ft, rc = cfg.data.finetune, cfg.rollout
    source = RealImageSource(
        ft.images,
        rc.height,
        rc.width,
        cache_dir=run_dir,
        encode_batch_size=ft.encode_batch_size,
        latent_mode=ft.latent_mode,
        seed=cfg.seed,
    )
    vae = load_vae(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
    latents = source.encode(vae)
    del vae
    regions = image_regions(cfg, source, Path(run_dir))
    masks = region_mask_arrays(regions, mask_regions(cfg.learner), (rc.height, rc.width))
    batch = SampleBatch(latents, [it.text for it in source.items], np.ones(len(source), np.float32), masks)
    stats = {"finetune/images": float(len(source))}
    stats.update({f"finetune/with_{r}": float((m.reshape(len(m), -1).max(1) > 0).sum()) for r, m in masks.items()})
    if len(batch) < cfg.learner.train_batch_size:
        raise ValueError(
            f"data.finetune.images={ft.images} holds {len(batch)} images, fewer than "
            f"learner.train_batch_size={cfg.learner.train_batch_size}"
        )
    return batch, stats


def image_regions(cfg: Config, source, run_dir: Path) -> list[dict[str, list]]:
    """Per image, {region: [box, ...]} in the prepared image's pixels: the metadata's boxes where given,
    else the config's rewards' detections on the prepared image, each computed once and cached."""
    from rewards.composite import RewardSet

    rc, names = cfg.rollout, sorted(e.name or e.target for e in cfg.rewards)
    path = run_dir / REGIONS_CACHE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    keys = [json.dumps([it.name, list(it.stamp), rc.height, rc.width, names]) for it in source.items]
    given = source.region_boxes(range(len(source)))
    todo = [i for i, it in enumerate(source.items) if not it.regions and keys[i] not in cache]
    if todo:
        with RewardSet.from_config(cfg.rewards) as rewards:
            for start in range(0, len(todo), cfg.data.finetune.encode_batch_size):
                idx = todo[start : start + cfg.data.finetune.encode_batch_size]
                x = np.stack([source.image(i) for i in idx]).transpose(0, 2, 3, 1)
                scored = rewards(
                    ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8), [source.items[i].text for i in idx]
                )
                for j, i in enumerate(idx):
                    cache[keys[i]] = {r: [list(d.box) for d in dets] for r, dets in scored.regions(j).items()}
        path.write_text(json.dumps(cache))
    return [given[i] if it.regions else cache[keys[i]] for i, it in enumerate(source.items)]
