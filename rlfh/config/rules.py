"""Cross-field rules of a run config: batch sizes that must divide, counts that must be positive,
options that exclude each other. Each problem names its keys and says what to change;
``rlfh.config.schema.config_from_dict`` collects them all before refusing a config.
"""

from __future__ import annotations

import math

# Larger than any SDXL bucket (1024-2048) with room to spare; 100000 x 100000 would try to allocate
# a 6 GB latent per sample and fail minutes in, inside a rollout actor.
MAX_IMAGE_SIDE = 4096


def hgdpo_stage_problems(stages) -> list[str]:
    """Every problem of an HG-DPO curriculum (``HGDPOStage`` objects); the config check and
    :class:`rlfh.data.hgdpo.Curriculum` both use this one."""
    if not stages:
        return ["learner.hgdpo.stages: no stages; give at least one {until_round, real_winner_fraction}"]
    p: list[str] = []
    last = None
    for i, st in enumerate(stages):
        key = f"learner.hgdpo.stages[{i}]"
        if st.until_round < 1:
            p.append(f"{key}.until_round={st.until_round}: must be >= 1")
        elif last is not None and st.until_round <= last:
            p.append(f"{key}.until_round={st.until_round}: must be greater than the previous stage's {last}")
        last = st.until_round if last is None else max(last, st.until_round)
        if not 0.0 <= st.real_winner_fraction <= 1.0:
            p.append(f"{key}.real_winner_fraction={st.real_winner_fraction}: must be in [0, 1]")
        if not 0.0 <= st.sdrecon_winner_fraction <= 1.0:
            p.append(f"{key}.sdrecon_winner_fraction={st.sdrecon_winner_fraction}: must be in [0, 1]")
        elif 0.0 <= st.real_winner_fraction <= 1.0 and st.real_winner_fraction + st.sdrecon_winner_fraction > 1.0:
            p.append(f"{key}: real_winner_fraction + sdrecon_winner_fraction = {st.real_winner_fraction} + "
                     f"{st.sdrecon_winner_fraction} > 1; they are shares of the same round's pairs")
    return p


def region_pairs_problems(cfg) -> list[str]:
    """Problems of ``learner.region_pairs`` (FaceScore's inpainted-region pairs)."""
    rp, lr_ = cfg.learner.region_pairs, cfg.learner
    key = "learner.region_pairs"
    p: list[str] = []
    if rp.region is not None:
        if rp.region == "global" or rp.region not in lr_.regions:
            p.append(f"{key}.region={rp.region!r}: must be a local region of learner.regions={lr_.regions} (the pairs "
                     f"train with its mask), e.g. learner.regions=[global, {rp.region if rp.region != 'global' else 'face'}]")
        if not lr_.loss.startswith("dpo"):
            p.append(f"{key}.region needs a DPO loss; learner.loss={lr_.loss}")
    if not 0.0 < rp.fraction <= 1.0:
        p.append(f"{key}.fraction={rp.fraction}: must be in (0, 1]")
    if rp.dilate < 0:
        p.append(f"{key}.dilate={rp.dilate}: must be >= 0 (pixels; 0 or 1 = the boxes as they are)")
    steps = rp.num_inference_steps if rp.num_inference_steps is not None else cfg.rollout.num_inference_steps
    if rp.num_inference_steps is not None and rp.num_inference_steps < 1:
        p.append(f"{key}.num_inference_steps={rp.num_inference_steps}: must be >= 1")
    table = rp.strength_table
    if rp.strength is not None:
        strengths = [(f"{key}.strength", rp.strength)]
    else:
        strengths = []
        bounds = []
        for i, row in enumerate(table):
            if len(row) != 2:
                p.append(f"{key}.strength_table[{i}]={row}: give [max_area_ratio, strength]")
                continue
            bounds.append(row[0])
            strengths.append((f"{key}.strength_table[{i}][1]", row[1]))
        if not table:
            p.append(f"{key}.strength_table is empty: give rows [max_area_ratio, strength] or a fixed {key}.strength")
        elif any(b >= c for b, c in zip(bounds, bounds[1:])) or any(not 0 < b for b in bounds):
            p.append(f"{key}.strength_table: max_area_ratio bounds {bounds} must be > 0 and increasing")
        elif bounds and bounds[-1] < 1.0:
            p.append(f"{key}.strength_table: the last max_area_ratio is {bounds[-1]}; make it 1.0 so every region has a strength")
    for k, s in strengths:
        if not 0.0 < s <= 1.0:
            p.append(f"{k}={s}: a noise strength must be in (0, 1]")
        elif rp.region is not None and steps >= 1 and int(steps * s) < 1:  # off (no region): no schedule to check
            p.append(f"{k}={s} of {steps} denoising steps runs no step: raise {key}.num_inference_steps to >= "
                     f"{math.ceil(1 / s)}")
    return p


def hgdpo_sdrecon_problems(hg, num_inference_steps: int) -> list[str]:
    """The SDRecon strength, when a stage asks for SDRecon winners: it must run at least one step."""
    if not any(st.sdrecon_winner_fraction > 0 for st in hg.stages):
        return []
    s = hg.sdrecon_strength
    if not 0.0 < s <= 1.0:
        return [f"learner.hgdpo.sdrecon_strength={s}: must be in (0, 1] (the share of the denoising steps re-run)"]
    if int(num_inference_steps * s) < 1:
        return [f"learner.hgdpo.sdrecon_strength={s} of rollout.num_inference_steps={num_inference_steps} runs no "
                f"denoising step (int(steps * strength) = 0): raise the strength to >= {1 / num_inference_steps:.3g}"]
    return []


def check_consistency(cfg) -> list[str]:
    """Cross-field rules: batch sizes that must divide, counts that must be positive."""
    p: list[str] = []
    r, lr_, res = cfg.rollout, cfg.learner, cfg.resources
    for key, v in [
        ("num_rounds", cfg.num_rounds),
        ("rollout.prompts_per_round", r.prompts_per_round),
        ("rollout.sample_batch_size_per_actor", r.sample_batch_size_per_actor),
        ("rollout.num_inference_steps", r.num_inference_steps),
        ("learner.train_batch_size", lr_.train_batch_size),
        ("learner.micro_batch_size_per_gpu", lr_.micro_batch_size_per_gpu),
        ("learner.epochs_per_round", lr_.epochs_per_round),
        ("learner.lora.rank", lr_.lora.rank),
        ("resources.num_rollout_actors", res.num_rollout_actors),
    ]:
        if v < 1:
            p.append(f"{key}={v}: must be >= 1")
    if res.num_learner_ranks is not None:
        if res.num_learner_ranks < 1:
            p.append(f"resources.num_learner_ranks={res.num_learner_ranks}: must be >= 1")
        elif res.num_learner_gpus and res.num_learner_ranks != res.num_learner_gpus:
            p.append(f"resources.num_learner_ranks={res.num_learner_ranks} with num_learner_gpus={res.num_learner_gpus}: "
                     f"the learner runs one rank per GPU; leave num_learner_ranks unset")
    if res.sync_bucket_mb <= 0:
        p.append(f"resources.sync_bucket_mb={res.sync_bucket_mb}: must be > 0")
    if res.colocate:
        if res.num_rollout_actors != 1 or cfg.learner_world_size != 1:
            p.append(f"resources.colocate=true runs rollout and learner in one process on one device: set "
                     f"resources.num_rollout_actors=1 and one learner rank (got {res.num_rollout_actors} and "
                     f"{cfg.learner_world_size})")
        if r.max_staleness:
            p.append("resources.colocate=true alternates sampling and training on one device: set rollout.max_staleness=0")
        if res.placement != "none":
            p.append("resources.colocate=true has no rollout fleet to place: set resources.placement=none")
        if r.compile:  # the colocated sampler is the learner's UNet, which the rollout side does not compile
            p.append("resources.colocate=true samples with the learner's own UNet, which rollout.compile does not "
                     "compile: set rollout.compile=false")
    if r.rollouts_per_prompt < 2:
        p.append(f"rollout.rollouts_per_prompt={r.rollouts_per_prompt}: DPO pairs need >= 2 samples per prompt; set it to 2 or more")
    for key, v in [("rollout.height", r.height), ("rollout.width", r.width)]:
        if v < 8 or v % 8:
            p.append(f"{key}={v}: must be a positive multiple of 8 (the VAE downsamples by 8)")
        elif v > MAX_IMAGE_SIDE:
            p.append(f"{key}={v}: must be at most {MAX_IMAGE_SIDE} pixels (SDXL is trained at 1024)")
    if r.samples_per_round % max(res.num_rollout_actors, 1):
        p.append(
            f"rollout.prompts_per_round * rollout.rollouts_per_prompt = {r.samples_per_round} samples per round "
            f"is not divisible by resources.num_rollout_actors={res.num_rollout_actors}; change one so each actor gets the same share"
        )
    else:
        share = r.samples_per_round // max(res.num_rollout_actors, 1)
        if share % max(r.sample_batch_size_per_actor, 1):
            p.append(
                f"rollout.sample_batch_size_per_actor={r.sample_batch_size_per_actor} does not divide each actor's "
                f"{share} samples per round; use a divisor of {share}"
            )
    per_step = lr_.micro_batch_size_per_gpu * cfg.learner_world_size
    if lr_.train_batch_size % max(per_step, 1):
        p.append(
            f"learner.train_batch_size={lr_.train_batch_size} must be a multiple of learner.micro_batch_size_per_gpu "
            f"({lr_.micro_batch_size_per_gpu}) x learner ranks ({cfg.learner_world_size}) = {per_step}"
        )
    pairwise = lr_.loss.startswith("dpo")  # dpo, dpo_hinge, dpo_ipo (not ddpo)
    if not pairwise and lr_.train_batch_size > r.samples_per_round:
        p.append(f"learner.train_batch_size={lr_.train_batch_size} exceeds the {r.samples_per_round} samples a round yields")
    if cfg.rollouts is None and pairwise and lr_.pair_strategy == "best_worst" and lr_.train_batch_size > r.prompts_per_round:
        p.append(
            f"learner.train_batch_size={lr_.train_batch_size} exceeds the {r.prompts_per_round} pairs a round yields "
            f"(rollout.prompts_per_round with pair_strategy=best_worst); lower it or raise rollout.prompts_per_round"
        )
    for key in ("rollout_actor_resources", "learner_resources", "reward_resources"):
        for name, amount in getattr(res, key).items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                p.append(f"resources.{key}.{name}: Ray sets this through num_cpus/num_gpus; use "
                         f"resources.num_cpus_per_actor / gpus_per_rollout_actor / num_learner_gpus instead")
            elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                p.append(f"resources.{key}.{name}={amount!r}: must be a number > 0 (the amount of the custom "
                         f"resource `{name}` one actor takes, e.g. 1)")
    if lr_.loss == "ddpo":
        if r.scheduler != "ddim" or r.eta <= 0:
            p.append(f"learner.loss=ddpo needs a stochastic DDIM sampler with log-probs: set rollout.scheduler=ddim and "
                     f"rollout.eta > 0 (1.0 in DDPO); got scheduler={r.scheduler}, eta={r.eta}")
        if cfg.rollouts is not None:
            p.append("learner.loss=ddpo is on-policy: it cannot train from a logged rollout log (rollouts=...)")
        if r.max_staleness:
            p.append("learner.loss=ddpo is on-policy: set rollout.max_staleness=0")
        if list(lr_.regions) != ["global"]:
            p.append(f"learner.loss=ddpo trains the whole-image policy: learner.regions must be [global], got {lr_.regions}")
        if not 0 < lr_.ddpo_timestep_fraction <= 1:
            p.append(f"learner.ddpo_timestep_fraction={lr_.ddpo_timestep_fraction}: must be in (0, 1]")
        win, first = lr_.ddpo_window, lr_.ddpo_window_max_start
        if win is not None and not 1 <= win <= r.num_inference_steps:
            p.append(f"learner.ddpo_window={win}: must be in 1..rollout.num_inference_steps ({r.num_inference_steps}) "
                     f"or null (every step stochastic)")
        elif first is not None and (win is None or not 0 <= first <= r.num_inference_steps - win):
            p.append(f"learner.ddpo_window_max_start={first}: needs learner.ddpo_window and must be in "
                     f"0..rollout.num_inference_steps - ddpo_window ({r.num_inference_steps - (win or 0)}) so the window fits")
    if lr_.ddpo_branch and (lr_.loss != "ddpo" or lr_.ddpo_window is None):
        p.append(f"learner.ddpo_branch=true branches a prompt group's trajectories at the SDE window: it needs "
                 f"learner.loss=ddpo and learner.ddpo_window (got loss={lr_.loss}, ddpo_window={lr_.ddpo_window})")
    if lr_.loss in ("nft", "awm"):
        # both compare with the policy that sampled the round: the learner's weights at the round's start
        if cfg.rollouts is not None:
            p.append(f"learner.loss={lr_.loss} compares with the sampling policy: it cannot train from a logged rollout log (rollouts=...)")
        if r.max_staleness:
            p.append(f"learner.loss={lr_.loss} compares with the sampling policy (the weights at the round's start): set rollout.max_staleness=0")
        if not (0 < lr_.nft_beta < math.inf):
            p.append(f"learner.nft_beta={lr_.nft_beta}: must be finite and > 0")
        if not (0 < lr_.nft_adv_clip < math.inf):
            p.append(f"learner.nft_adv_clip={lr_.nft_adv_clip}: must be finite and > 0")
        if not (0 < lr_.awm_clip_range < math.inf):
            p.append(f"learner.awm_clip_range={lr_.awm_clip_range}: must be finite and > 0")
    if not (0 <= lr_.kl_coef < math.inf):
        p.append(f"learner.kl_coef={lr_.kl_coef}: must be finite and >= 0")
    if lr_.cfg_distill is not None:
        if not (1 < lr_.cfg_distill < math.inf):
            p.append(f"learner.cfg_distill={lr_.cfg_distill}: the teacher's guidance scale must be finite and > 1")
        if cfg.rollout.guidance_scale != 1.0:
            p.append(f"learner.cfg_distill trains a model that needs no CFG: sample at rollout.guidance_scale=1 "
                     f"(now {cfg.rollout.guidance_scale})")
        if lr_.loss == "ddpo":
            p.append("learner.cfg_distill is not available with learner.loss=ddpo (its trajectories are scored per step)")
    if not (0 <= lr_.cfg_distill_coef < math.inf):
        p.append(f"learner.cfg_distill_coef={lr_.cfg_distill_coef}: must be finite and >= 0")
    if not (0 <= lr_.guidance_coef < math.inf):
        p.append(f"learner.guidance_coef={lr_.guidance_coef}: must be finite and >= 0 (0 turns the guidance term off)")
    elif lr_.guidance_coef > 0 and not pairwise:
        p.append(f"learner.guidance_coef > 0 trains on (winner, loser) pairs: it needs a DPO loss (dpo, dpo_hinge, "
                 f"dpo_ipo), not learner.loss={lr_.loss}")
    if not lr_.guidance_region.strip():
        p.append("learner.guidance_region is empty: name a detected region (face, hand) or global")
    if lr_.trust_region != "clip" and lr_.loss != "ddpo":
        p.append(f"learner.trust_region={lr_.trust_region} is for the per-step policy gradient: it needs learner.loss=ddpo")
    if not (0 < lr_.trust_region_kl < math.inf):
        p.append(f"learner.trust_region_kl={lr_.trust_region_kl}: must be finite and > 0")
    if lr_.reference == "ema" and lr_.ema_decay is None:
        p.append("learner.reference=ema needs learner.ema_decay (the EMA the reference is taken from)")
    if lr_.sampling_policy == "ema":
        if lr_.ema_decay is None:
            p.append("learner.sampling_policy=ema needs learner.ema_decay (the EMA the rollout actors sample with)")
        if not lr_.lora.enabled or lr_.zero_stage == 3:
            p.append("learner.sampling_policy=ema sends the EMA of the LoRA weights: needs learner.lora.enabled and "
                     "learner.zero_stage <= 2")
        if res.colocate:
            p.append("learner.sampling_policy=ema needs separate rollout actors (resources.colocate samples with "
                     "the trained UNet itself)")
    if lr_.reference_refresh_rounds < 1:
        p.append(f"learner.reference_refresh_rounds={lr_.reference_refresh_rounds}: must be >= 1")
    if lr_.zero_stage == 3 and (lr_.loss in ("nft", "awm") or lr_.reference == "ema" or lr_.trust_region != "clip"):
        p.append("learner.loss=nft/awm, learner.reference=ema and learner.trust_region=dppo/guard predict with kept copies "
                 "of the weights, which ZeRO-3 "
                 "partitions: use learner.zero_stage <= 2")
    p.extend(hcp_rules(cfg))
    hg = lr_.hgdpo
    if hg.real_images is not None:
        if not pairwise:
            p.append(f"learner.hgdpo.real_images needs a DPO loss; learner.loss={lr_.loss}")
        p.extend(hgdpo_stage_problems(hg.stages))
        p.extend(hgdpo_sdrecon_problems(hg, r.num_inference_steps))
    p.extend(region_pairs_problems(cfg))
    if lr_.offload_optimizer and lr_.zero_stage == 0:
        p.append("learner.offload_optimizer=true needs learner.zero_stage >= 1 (ZeRO-Offload)")
    if lr_.offload_params and lr_.zero_stage != 3:
        p.append("learner.offload_params=true needs learner.zero_stage=3")
    if lr_.ema_decay is not None and not 0 < lr_.ema_decay < 1:
        p.append(f"learner.ema_decay={lr_.ema_decay}: must be in (0, 1)")
    g = cfg.guards
    if g.every < 0 or g.seeds_per_prompt < 1:
        p.append(f"guards.every={g.every} must be >= 0 and guards.seeds_per_prompt={g.seeds_per_prompt} >= 1")
    if g.every and not g.heldout_prompts:
        p.append("guards.every > 0 needs guards.heldout_prompts (prompts the run never trains on)")
    if g.max_heldout_drop is not None and not g.every:
        p.append("guards.max_heldout_drop needs guards.every > 0 (held-out evaluations to compare)")
    if lr_.beta <= 0:
        p.append(f"learner.beta={lr_.beta}: must be > 0")
    p.extend(_optimizer_rules(lr_))
    p.extend(_range_rules(cfg))
    if not lr_.regions or len(set(lr_.regions)) != len(lr_.regions):
        p.append(f"learner.regions={lr_.regions}: give distinct region names, e.g. [global, face, hand]")
    if lr_.region_scale <= 0:
        p.append(f"learner.region_scale={lr_.region_scale}: must be > 0")
    if lr_.fairness.alpha <= 0:
        p.append(f"learner.fairness.alpha={lr_.fairness.alpha}: must be > 0")
    unknown = sorted(set(lr_.fairness.weights) - set(lr_.regions))
    if unknown:
        p.append(f"learner.fairness.weights: regions {unknown} are not in learner.regions={lr_.regions}")
    if len(lr_.regions) > 1 and lr_.fairness.rule in ("mpd", "mgda") and lr_.zero_stage == 3:
        p.append(
            f"learner.fairness.rule={lr_.fairness.rule} needs whole per-region gradients, which ZeRO-3 partitions; "
            f"use learner.zero_stage <= 2 or learner.fairness.rule=sum/equal"
        )
    if not 0 < lr_.filter_top_fraction <= 1:
        p.append(f"learner.filter_top_fraction={lr_.filter_top_fraction}: must be in (0, 1]")
    if not r.prompts and not r.prompt_file:
        p.append("rollout.prompts is empty and rollout.prompt_file is not set: give at least one prompt")
    if not cfg.rewards:
        p.append("rewards: give at least one reward (e.g. `- target: jpeg_compressibility`)")
    for i, e in enumerate([*cfg.rewards, *cfg.guards.heldout_rewards]):
        if e.name is None and ":" in e.target:
            p.append(f"rewards[{i}] target={e.target!r}: a module:callable reward needs `name:` (its key in metrics and logs)")
    p.extend(_reward_entry_rules(cfg))
    p.extend(_reward_training_rules(cfg.reward_training))
    names = [e.name or e.target for e in cfg.rewards]
    for n in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"rewards: name {n!r} is used twice; give each entry a distinct `name:`")
    return p


def _optimizer_rules(lr_) -> list[str]:
    p: list[str] = []
    if lr_.lr <= 0:
        p.append(f"learner.lr={lr_.lr}: must be > 0 (e.g. 1e-5)")
    if lr_.weight_decay < 0:
        p.append(f"learner.weight_decay={lr_.weight_decay}: must be >= 0")
    betas = lr_.adam_betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        p.append(f"learner.adam_betas={betas}: give two values in [0, 1), e.g. [0.9, 0.999]")
    if lr_.max_grad_norm < 0:
        p.append(f"learner.max_grad_norm={lr_.max_grad_norm}: must be >= 0 (0 turns clipping off)")
    if lr_.lora.alpha <= 0:
        p.append(f"learner.lora.alpha={lr_.lora.alpha}: must be > 0")
    if lr_.ddpo_clip_range <= 0:
        p.append(f"learner.ddpo_clip_range={lr_.ddpo_clip_range}: must be > 0")
    return p


def _range_rules(cfg) -> list[str]:
    """Counts and amounts whose wrong sign only shows up rounds into a run (or never, as a silent no-op)."""
    p: list[str] = []
    lg, res, r = cfg.logging, cfg.resources, cfg.rollout
    if lg.checkpoint_every < 1:
        # `round % 0` fails after the first round, before any checkpoint exists
        p.append(f"logging.checkpoint_every={lg.checkpoint_every}: must be >= 1 (rounds between checkpoints; "
                 f"the last round always checkpoints, so a large value saves only at the end)")
    if lg.sample_grid_every < 0:
        p.append(f"logging.sample_grid_every={lg.sample_grid_every}: must be >= 0 (0 = never)")
    for key, v in [("resources.gpus_per_rollout_actor", res.gpus_per_rollout_actor),
                   ("resources.gpus_per_reward_actor", res.gpus_per_reward_actor),
                   ("resources.num_cpus_per_actor", res.num_cpus_per_actor),
                   ("resources.num_learner_gpus", res.num_learner_gpus),
                   ("resources.max_actor_restarts", res.max_actor_restarts),
                   ("resources.max_learner_restarts", res.max_learner_restarts),
                   ("rollout.eta", r.eta)]:
        if v < 0:
            p.append(f"{key}={v}: must be >= 0")
    return p


def _reward_entry_rules(cfg) -> list[str]:
    """Each reward's target resolves (without building the model) and its weight's sign is intended."""
    from rewards.registry import check_target

    p: list[str] = []
    for section, entries in (("rewards", cfg.rewards), ("guards.heldout_rewards", cfg.guards.heldout_rewards)):
        for i, e in enumerate(entries):
            key = f"{section}[{i}]"
            problem = check_target(e.target)
            if problem is not None:
                p.append(f"{key}.target={e.target!r}: {problem.removeprefix(f'reward {e.target!r}: ')}")
            if e.weight < 0 and not e.allow_negative_weight:
                p.append(f"{key}.weight={e.weight}: a negative weight trains the model to lower this reward; "
                         f"if that is intended set {key}.allow_negative_weight=true (on the command line: "
                         f"{section}.{i}.allow_negative_weight=true)")
    return p


def hcp_factor(key) -> int | None:
    """A ``learner.hcp.scale_weights`` key as a downsampling factor (a power of two >= 1), or None."""
    try:
        f = int(str(key))
    except ValueError:
        return None
    return f if f >= 1 and f & (f - 1) == 0 else None


def hcp_rules(cfg) -> list[str]:
    h, lr_ = cfg.learner.hcp, cfg.learner
    if not h.enabled:
        return []
    p: list[str] = []
    if not (0 <= h.coef < math.inf):
        p.append(f"learner.hcp.coef={h.coef}: must be finite and >= 0")
    if h.hidden < 1:
        p.append(f"learner.hcp.hidden={h.hidden}: must be >= 1")
    for k, v in h.scale_weights.items():
        if hcp_factor(k) is None:
            p.append(f"learner.hcp.scale_weights: key {k!r} must be a downsampling factor from the latent, a power of "
                     f"two such as 2 or 4")
        if not (isinstance(v, (int, float)) and 0 <= v < math.inf):
            p.append(f"learner.hcp.scale_weights.{k}={v!r}: must be a finite number >= 0")
    if not any(isinstance(v, (int, float)) and v > 0 for v in h.scale_weights.values()):
        p.append("learner.hcp.scale_weights: give at least one factor a weight > 0, e.g. {4: 1.0}")
    if len(h.timesteps) != 2 or not (0 <= h.timesteps[0] <= h.timesteps[1]):
        p.append(f"learner.hcp.timesteps={h.timesteps}: must be [lo, hi] with 0 <= lo <= hi (training timesteps)")
    if not (0 < h.sigma < math.inf):
        p.append(f"learner.hcp.sigma={h.sigma}: must be finite and > 0 (a fraction of the image's shorter side)")
    if not (0 <= h.min_visibility <= 1):
        p.append(f"learner.hcp.min_visibility={h.min_visibility}: must be in [0, 1]")
    if not lr_.lora.enabled:
        p.append("learner.hcp.enabled needs learner.lora.enabled: the layer is saved beside the LoRA, and full "
                 "fine-tuning would write it into the UNet's own weights")
    if lr_.loss == "ddpo":
        p.append("learner.hcp is not available with learner.loss=ddpo (it trains on noised latents of the samples)")
    if h.prior == "real" and not lr_.hgdpo.real_images:
        p.append("learner.hcp.prior=real takes the pose priors from HG-DPO's real images: set learner.hgdpo.real_images, "
                 "or use prior=samples")
    if lr_.region_pairs.region is not None:
        p.append("learner.hcp.enabled with learner.region_pairs.region: inpainted region pairs carry no pose priors "
                 "yet; turn one of them off")
    return p


def _reward_training_rules(rt) -> list[str]:
    """``reward_training`` (``rlfh train-reward``): ranges, and a prompt for every region."""
    from rewards.base import REGION_PROMPTS

    p: list[str] = []
    key = "reward_training"
    if not 0.0 <= rt.freeze_fraction <= 1.0:
        p.append(f"{key}.freeze_fraction={rt.freeze_fraction}: must be in [0, 1] (the leading share of the "
                 f"encoder layers kept frozen; FaceScore: 0.7)")
    if rt.lr <= 0:
        p.append(f"{key}.lr={rt.lr}: must be > 0 (FaceScore: 1e-5)")
    if rt.weight_decay < 0:
        p.append(f"{key}.weight_decay={rt.weight_decay}: must be >= 0")
    if len(rt.adam_betas) != 2 or not all(0 <= b < 1 for b in rt.adam_betas):
        p.append(f"{key}.adam_betas={rt.adam_betas}: give two values in [0, 1), e.g. [0.9, 0.999]")
    for name in ("epochs", "batch_size"):
        if getattr(rt, name) < 1:
            p.append(f"{key}.{name}={getattr(rt, name)}: must be >= 1")
    if not 0.0 <= rt.heldout_fraction < 1.0:
        p.append(f"{key}.heldout_fraction={rt.heldout_fraction}: must be in [0, 1) (0: no held-out accuracy)")
    if not rt.region or rt.region == "global":
        p.append(f"{key}.region={rt.region!r}: name a logged region whose box is cropped, e.g. face or hand")
    elif rt.prompt is None and rt.region not in REGION_PROMPTS:
        p.append(f"{key}.region={rt.region!r} has no default prompt (known: {REGION_PROMPTS}); "
                 f"set {key}.prompt, e.g. \"A {rt.region}.\"")
    if rt.prompt is not None and not rt.prompt.strip():
        p.append(f"{key}.prompt is empty: give the scorer's fixed text, e.g. \"A hand.\", or null for the region's default")
    if not rt.score:
        p.append(f"{key}.score is empty: use combined or the name of a logged reward")
    if rt.vision_heads is not None and rt.vision_heads < 1:
        p.append(f"{key}.vision_heads={rt.vision_heads}: must be >= 1 (or null: width / 64)")
    return p
