"""FaceScore's dataset construction over a folder of images: a rollout log of region pairs.

    rlfh make-region-pairs configs/tiny.yaml IMAGE_DIR learner.regions.names=[global,face] data.region_pairs.region=face
    rlfh rollouts inspect RUN_DIR/rollouts
    rlfh offline-dpo CONFIG rollouts=RUN_DIR/rollouts ...

Setup, loop and cleanup, in this process (no Ray):
  1. the images of IMAGE_DIR (``metadata.jsonl`` + images, rlfh/data/real_images.py) are resized to
     ``rollout.height`` x ``rollout.width`` and encoded with the model's VAE (posterior mean);
  2. the regions are found on each ORIGINAL image, before its VAE round trip (a small model's VAE
     blurs a face away), by the config's rewards, as FaceScore runs RetinaFace on the photos;
  3. each detected ``data.region_pairs.region`` box gets inpainted, one at a time (``per_region:
     each``, FaceScore's one pair per face) or all of an image's at once (``union``): by the policy
     (the config's model, ``Sampler.refine``) or, with ``data.region_pairs.pipeline``, by a diffusers
     inpainting pipeline fed the same latents and mask; strength and mask by rlfh/data/region_pairs.py;
  4. with ``winner: reward`` the decoded originals and the inpainted images are scored (both went
     through the VAE, so the reward compares the region, not the VAE's reconstruction); with
     ``winner: original`` (FaceScore's rule: the original wins) nothing more is scored, and an
     original's logged rewards are those of the photo;
  5. originals (role ``original``, once per image) and inpainted images (role ``inpainted``, one per
     pair) go to RUN_DIR/rollouts, which ``rlfh offline-dpo`` and ``rlfh train-reward`` turn into pairs.
Images without the region are left out (counted). When no image has the region, nothing is written
to the log and :class:`NoRegionFound` says why (`rlfh make-region-pairs` exits 2 with it): the images
seen, the rewards of the region, and the smallest region their detector finds at this size where it
states one.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from rlfh.config.schema import Config, save_config


def make_region_pairs(cfg: Config, image_dir: str) -> tuple[Path, dict[str, float]]:
    """Write the region pairs of ``image_dir`` to ``cfg.run_dir``/rollouts; returns (the log dir, counts).

    Raises:
        NoRegionFound: no image had the region (nothing is written to the log).
    """
    import torch

    from rewards.composite import RewardSet
    from rlfh.data.real_images import RealImageSource
    from rlfh.run.skeleton import refuse_score_guidance
    from rollouts.log import RolloutLog
    from rollouts.types import SamplerSettings

    rp, rc = cfg.data.region_pairs, cfg.rollout
    if rp.region is None:
        raise ValueError("make-region-pairs needs data.region_pairs.region (face or hand): the region to inpaint")
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    refuse_score_guidance(cfg, "make-region-pairs")
    sampler, inpainter = _inpainters(cfg, device)
    settings = SamplerSettings(
        rp.num_inference_steps or rc.num_inference_steps,
        rc.guidance_scale,
        rc.negative_prompt,
        rc.height,
        rc.width,
        rc.eta,
        rc.scheduler,
    )
    source = RealImageSource(
        image_dir,
        rc.height,
        rc.width,
        encode_batch_size=rc.sample_batch_size_per_actor,
        latent_mode="mean",
        seed=cfg.seed,
    )
    log = RolloutLog(run_dir / "rollouts")
    with RewardSet.from_config(cfg.rewards) as rewards:  # closes the detectors however the loop ends
        counts = _pair_all(cfg, image_dir, source, sampler, inpainter, settings, rewards, log)
        if not counts["with_region"]:
            raise NoRegionFound(no_region_reason(cfg, image_dir, counts, rewards, log.dir))
    return log.dir, counts


def _inpainters(cfg: Config, device: str):
    """(the policy's Sampler, the diffusers inpainter or None) of ``data.region_pairs``."""
    from families import load_pipeline
    from rlfh.run.checkpoints import load_lora_into, resolve_lora
    from rollouts.sampler import Sampler

    rp = cfg.data.region_pairs
    if rp.lora and rp.pipeline:
        raise ValueError(
            "data.region_pairs.lora and data.region_pairs.pipeline: give one (the LoRA is the "
            "policy's, on model.path; the pipeline inpaints instead of the policy)"
        )
    lora = resolve_lora(rp.lora) if rp.lora else None  # before the (slow) model load
    pipe = load_pipeline(cfg.model, device)
    if lora is not None:
        load_lora_into(pipe, lora)
        pipe.fuse_lora()  # sampling only: one matmul per layer, as the rollout actors' merged LoRA
    model_id = f"{cfg.model.path}+{lora}" if lora else cfg.model.path
    sampler = Sampler(pipe, model_id=model_id, scheduler=cfg.rollout.scheduler)
    return sampler, DiffusersInpainter(rp.pipeline, device) if rp.pipeline else None


class NoRegionFound(ValueError):
    """No image of the folder had the region: there is nothing to pair, and the log is left as it was."""


def no_region_reason(cfg: Config, image_dir: str, counts: dict[str, float], rewards, log_dir: Path) -> str:
    """Why no pair was made: the images seen, the rewards of the region, and where a detector states
    it, the smallest region it finds at this size (``smallest_region_px``)."""
    from rollouts.log import RolloutLog

    region, (h, w) = cfg.data.region_pairs.region, (cfg.rollout.height, cfg.rollout.width)
    of_region = [r for r in rewards.rewards if r.region == region]
    why = (
        f"no image of {image_dir} had a {region}: 0 of {int(counts['images'])} images at {h}x{w} had one "
        f"detected by the config's rewards of region {region!r} "
    )
    if not of_region:
        why += f"(there are none: the rewards are {rewards.names})"
    else:
        sizes = []
        for r in of_region:
            smallest = getattr(getattr(r.reward, "detector", None), "smallest_region_px", None)
            px = smallest(h, w) if callable(smallest) else None
            sizes.append(r.name + (f", whose detector finds a {region} of about {px:.0f} px or more" if px else ""))
        why += f"({'; '.join(sizes)})"
    state = "holds the pairs of earlier calls" if RolloutLog(log_dir).manifest_path.exists() else "was not written"
    return f"{why}; nothing to pair, the rollout log {log_dir} {state}"


def _pair_all(cfg: Config, image_dir: str, source, sampler, inpainter, settings, rewards, log) -> dict[str, float]:
    """Every batch of ``source``: regions found on the originals, inpainted, logged with their originals."""
    from tqdm import tqdm

    from rlfh.data.region_pairs import plan_inpainting

    rp, rc = cfg.data.region_pairs, cfg.rollout
    rnd = 1 + max((s["rounds"][1] for s in log.manifest()["shards"]), default=-1)  # a later call appends
    counts = {"images": 0.0, "with_region": 0.0, "pairs": 0.0, "inpainted_won": 0.0, "ties_or_unscored": 0.0}
    bs = rc.sample_batch_size_per_actor
    bar = tqdm(range(0, len(source), bs), desc="rlfh make-region-pairs", unit="batch", disable=not cfg.logging.progress)
    for start in bar:
        idx = list(range(start, min(start + bs, len(source))))
        orig, found = _originals(cfg, image_dir, source, sampler, settings, rewards, idx)
        plan = plan_inpainting([found.regions(j) for j in range(len(idx))], rp, (rc.height, rc.width))
        counts["images"] += len(idx)
        counts["with_region"] += len(set(plan.indices))
        if not plan.indices:
            continue
        _log_pairs(cfg, orig, found, plan, sampler, inpainter, rewards, log, rnd, counts)
        rnd += 1
        bar.set_postfix(pairs=int(counts["pairs"]))
    bar.close()
    return counts


def _originals(cfg: Config, image_dir: str, source, sampler, settings, rewards, idx: list[int]):
    """(the originals as a RolloutBatch of their VAE latents and decoded images, the rewards' verdicts
    on the photos themselves, before the VAE: what finds the regions)."""
    import torch

    from rollouts.types import RolloutBatch

    x = torch.from_numpy(np.stack([source.image(i) for i in idx]))
    latents = source.encode_images(sampler.pipe.vae, x, idx).numpy()
    prompts = [source.items[i].text for i in idx]
    photos = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    found = rewards(photos, prompts)
    orig = RolloutBatch(
        sampler.decode(torch.from_numpy(latents).to(sampler.device)),
        latents,
        prompts,
        [cfg.seed * 1_000_003 + i for i in idx],
        settings,
        0,
        f"images:{image_dir}",
    )
    return orig, found


def _inpaint(plan, orig, sampler, inpainter):
    """The planned inpaintings (one call per strength): (RolloutBatch, the plan's entries in its order)."""
    from rlfh.data.region_pairs import strength_groups
    from rollouts.types import RolloutBatch

    parts, order = [], []
    for strength, ks in strength_groups(plan.strengths).items():
        js = [plan.indices[k] for k in ks]
        args = (
            orig.latents[js],
            [orig.prompts[j] for j in js],
            [orig.seeds[j] for j in js],
            orig.settings,
            strength,
            plan.masks[ks],
        )
        parts.append(inpainter.refine(*args, sampler=sampler) if inpainter else sampler.refine(*args))
        order.extend(ks)
    inp = RolloutBatch.concat(parts)
    inp.rollout_ids = [uuid.uuid4().hex for _ in order]
    return inp, order


def _rows(scored, js: list[int], regions_from=None):
    """The verdicts of images ``js`` of ``scored``; with ``regions_from``, each verdict's regions replaced
    by that batch's (the photo's detections, which the pair's mask is rebuilt from offline)."""
    import dataclasses

    from rewards.composite import ScoredBatch

    def row(n, j):
        res = scored.results[n][j]
        return res if regions_from is None else dataclasses.replace(res, regions=regions_from.results[n][j].regions)

    return ScoredBatch({n: [row(n, j) for j in js] for n in scored.results}, scored.weights, scored.regions_of)


def _log_pairs(cfg: Config, orig, found, plan, sampler, inpainter, rewards, log, rnd: int, counts) -> None:
    """Inpaint the planned regions, score where the reward picks the winner, log originals and copies."""
    from rlfh.data.region_pairs import log_marks, pair_order
    from rollouts.log import make_records
    from rollouts.types import RolloutBatch

    rp = cfg.data.region_pairs
    inp, order = _inpaint(plan, orig, sampler, inpainter)
    js = [plan.indices[k] for k in order]
    uniq = sorted(set(js))
    ids = {j: uuid.uuid4().hex for j in uniq}
    originals = RolloutBatch(
        orig.images[uniq],
        orig.latents[uniq],
        [orig.prompts[j] for j in uniq],
        [orig.seeds[j] for j in uniq],
        orig.settings,
        0,
        orig.model_id,
        [ids[j] for j in uniq],
    )
    if rp.winner == "reward":  # both sides through the VAE, the photo's regions kept for the mask
        scored_orig = _rows(rewards(originals.images, originals.prompts), list(range(len(uniq))), _rows(found, uniq))
        scored_inp = rewards(inp.images, inp.prompts)
    else:
        scored_orig, scored_inp = _rows(found, uniq), None
    strengths = [plan.strengths[k] for k in order]
    log.append(
        make_records(
            originals,
            scored_orig,
            rnd,
            None,
            log_marks("original", [None] * len(uniq), rp.region, [None] * len(uniq), rp.dilate),
        )
        + make_records(
            inp, scored_inp, rnd, None, log_marks("inpainted", [ids[j] for j in js], rp.region, strengths, rp.dilate)
        )
    )
    comb_orig = scored_orig.combined()
    comb_inp = scored_inp.combined() if scored_inp is not None else [None] * len(js)
    for j, b in zip(js, comb_inp):
        won = pair_order(rp.winner, comb_orig[uniq.index(j)], b)
        counts["pairs"] += 1
        counts["ties_or_unscored"] += won is None
        counts["inpainted_won"] += bool(won)


class DiffusersInpainter:
    """A diffusers inpainting pipeline (``AutoPipelineForInpainting``) in place of the policy: fed the
    UNet-space latents themselves as its image (no second VAE encode) and the pixel mask of the same
    region, it returns latents equal to the original outside the mask, decoded by the run's VAE."""

    def __init__(self, path: str, device: str):
        import torch
        from diffusers import AutoPipelineForInpainting

        from families import detect_family

        family = detect_family(path)
        if family.denoiser != "unet":
            # SD3's inpainting pipeline VAE-encodes any image that is not 16-channel latents and shifts and
            # scales its masked-image latents: the run's latents cannot be handed to it as they are
            raise ValueError(
                f"data.region_pairs.pipeline={path}: a {family.name} ({family.pipeline_class}) inpainting "
                f"pipeline is not supported here (this inpainter hands a UNet pipeline the run's latents as "
                f"they are); leave data.region_pairs.pipeline unset: the policy itself inpaints on the "
                f"{family.name} flow schedule (masked SDEdit, Sampler.refine)"
            )
        self.pipe = AutoPipelineForInpainting.from_pretrained(path, dtype=torch.float32).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        if self.pipe.unet.config.in_channels != 4:
            raise ValueError(
                f"data.region_pairs.pipeline={path}: a {self.pipe.unet.config.in_channels}-channel "
                f"inpainting UNet conditions on a VAE-encoded masked image; give a 4-channel "
                f"(text-to-image) pipeline, which keeps the latents outside the mask"
            )

    def refine(self, latents, prompts, seeds, settings, strength: float, masks, sampler):
        import torch
        import torch.nn.functional as F

        from rollouts.sampler import seeded_generators
        from rollouts.types import RolloutBatch

        dev = self.pipe.device
        x0 = torch.as_tensor(np.asarray(latents), dtype=self.pipe.unet.dtype, device=dev)
        # the latent mask at pixel size: the pipeline resizes it back (nearest) to the same latent mask
        pixel = F.interpolate(
            torch.as_tensor(np.asarray(masks)), size=(settings.height, settings.width), mode="nearest"
        )
        out = self.pipe(
            prompt=list(prompts),
            image=x0,
            mask_image=pixel.to(dev),
            # what a 9-channel UNet would read; the 4-channel one never does. Given, so that SD1.5's
            # pipeline does not mask the latents with the pixel-sized mask (SDXL's skips latents itself)
            masked_image_latents=x0,
            strength=float(strength),
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            negative_prompt=[settings.negative_prompt] * len(prompts) if settings.guidance_scale > 1 else None,
            height=settings.height,
            width=settings.width,
            generator=seeded_generators(seeds),
            output_type="latent",
        ).images
        x = out.float()
        return RolloutBatch(
            sampler.decode(x.to(sampler.device)),
            x.cpu().numpy(),
            list(prompts),
            [int(s) for s in seeds],
            settings,
            0,
            str(self.pipe.config._name_or_path),
        )
