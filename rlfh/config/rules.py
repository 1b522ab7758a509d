"""Rules of a run config that read more than one section: batch sizes that must divide, options that
need another section's setting. Each section checks its own fields (its ``problems(key)``, run by
:func:`rlfh.config.fields.section_problems`); what is left is :data:`CROSS_SECTION_RULES`. Every
problem names its keys and says what to change; ``rlfh.config.schema.config_from_dict`` collects them
all before refusing a config.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlfh.config.fields import section_problems
from rlfh.losses.registry import (
    DIFFERENTIABLE_REWARDS,
    OLD_POLICY,
    PAIRS,
    SAMPLER_LOGPROB,
    SAMPLES,
    TRAJECTORIES,
    loss_spec,
    names_where,
)


def check_consistency(cfg) -> list[str]:
    """Every section's own problems, then the cross-section rules."""
    return section_problems(cfg, "") + [p for rule in CROSS_SECTION_RULES for p in rule(cfg)]


def pair_losses() -> str:
    """The DPO losses: pairs of any two samples (not the losses of aligned region pairs alone)."""
    return ", ".join(names_where(lambda s: s.batch == PAIRS and not s.aligned_only))


def batch_rules(cfg) -> list[str]:
    """rollout x resources x learner: every actor and rank gets the same share; a step fits a round."""
    p: list[str] = []
    r, lc, actors = cfg.rollout, cfg.learner, max(cfg.resources.num_rollout_actors, 1)
    if r.samples_per_round % actors:
        p.append(
            f"rollout.prompts_per_round * rollout.rollouts_per_prompt = {r.samples_per_round} samples per round "
            f"is not divisible by resources.num_rollout_actors={actors}; change one so each actor gets the "
            f"same share"
        )
    elif (r.samples_per_round // actors) % max(r.sample_batch_size_per_actor, 1):
        share = r.samples_per_round // actors
        p.append(
            f"rollout.sample_batch_size_per_actor={r.sample_batch_size_per_actor} does not divide each actor's "
            f"{share} samples per round; use a divisor of {share}"
        )
    per_step = lc.micro_batch_size_per_gpu * cfg.learner_world_size
    if lc.train_batch_size % max(per_step, 1):
        p.append(
            f"learner.train_batch_size={lc.train_batch_size} must be a multiple of "
            f"learner.micro_batch_size_per_gpu ({lc.micro_batch_size_per_gpu}) x learner ranks "
            f"({cfg.learner_world_size}) = {per_step}"
        )
    pairwise = loss_spec(lc.loss).batch == PAIRS
    if not pairwise and lc.train_batch_size > r.samples_per_round:
        p.append(
            f"learner.train_batch_size={lc.train_batch_size} exceeds the {r.samples_per_round} samples a round yields"
        )
    if (
        cfg.rollouts is None
        and pairwise
        and lc.dpo.pair_strategy == "best_worst"
        and lc.train_batch_size > r.prompts_per_round
    ):
        p.append(
            f"learner.train_batch_size={lc.train_batch_size} exceeds the {r.prompts_per_round} pairs a round "
            f"yields (rollout.prompts_per_round with learner.dpo.pair_strategy=best_worst); lower it or raise "
            f"rollout.prompts_per_round"
        )
    return p


def colocation_rules(cfg) -> list[str]:
    """resources.colocate x rollout: one device alternates sampling and training with one UNet."""
    if not cfg.resources.colocate:
        return []
    p: list[str] = []
    if cfg.rollout.max_staleness:
        p.append("resources.colocate=true alternates sampling and training on one device: set rollout.max_staleness=0")
    if cfg.rollout.compile:  # the colocated sampler is the learner's UNet, which the rollout side does not compile
        p.append(
            "resources.colocate=true samples with the learner's own UNet, which rollout.compile does not "
            "compile: set rollout.compile=false"
        )
    return p


def loss_rules(cfg) -> list[str]:
    """learner.loss x rollout / rollouts / learner.regions: what the family needs (rlfh/losses/registry.py)."""
    spec, r, name = loss_spec(cfg.learner.loss), cfg.rollout, cfg.learner.loss
    p: list[str] = []
    if SAMPLER_LOGPROB in spec.needs:
        family, _ = model_family(cfg.model)  # its own problems are family_rules'
        if family is not None:
            p += family.logprob_sampler_problems(r.scheduler, r.eta, name)
        elif r.eta <= 0:  # a hub id: the family is known once loaded, where the sampler checks its scheduler
            p.append(f"learner.loss={name} needs a stochastic sampler: set rollout.eta > 0 (1.0 in DDPO)")
    if spec.on_policy:  # it compares with the policy that sampled the round: the weights at the round's start
        if cfg.rollouts is not None:
            p.append(f"learner.loss={name} is on-policy: it cannot train from a logged rollout log (rollouts=...)")
        if r.max_staleness:
            p.append(
                f"learner.loss={name} is on-policy (it compares with the weights at the round's start): set "
                f"rollout.max_staleness=0"
            )
    if not spec.regions and list(cfg.learner.regions.names) != ["global"]:
        p.append(
            f"learner.loss={name} trains the whole-image policy: learner.regions.names must be [global], got "
            f"{cfg.learner.regions.names}"
        )
    return p


def differentiable_reward_rules(cfg) -> list[str]:
    """learner.loss x rewards: a loss that back-propagates through the rewards takes differentiable ones only
    (``differentiable_score`` on the reward's class, rewards/base.py), each refused by its key and name; its KL
    term is its own (at the sampling steps with gradient), not learner.reference.kl_coef's."""
    if DIFFERENTIABLE_REWARDS not in loss_spec(cfg.learner.loss).needs:
        return []
    from rewards.registry import resolve

    p: list[str] = []
    if cfg.learner.reference.kl_coef > 0:
        p.append(
            f"learner.reference.kl_coef={cfg.learner.reference.kl_coef} is the KL on forward-noised samples; "
            f"learner.loss={cfg.learner.loss} takes its KL at its own sampling steps: set learner.draft.kl_coef"
        )
    p += draft_family_problems(cfg)
    for i, entry in enumerate(cfg.rewards):
        try:
            factory = resolve(entry.target)
        except Exception:  # an unresolvable target is the entry's own problem (RewardEntry.problems)
            continue
        if not getattr(factory, "differentiable_score", False):
            p.append(
                f"rewards[{i}].target={entry.target!r}: learner.loss={cfg.learner.loss} back-propagates through "
                f"the rewards, and {entry.name or entry.target} is not differentiable (differentiable: "
                f"{differentiable_builtins()})"
            )
    return p


def differentiable_builtins() -> list[str]:
    """The registry's rewards with ``differentiable_score``, for messages (importing their modules)."""
    from rewards.registry import BUILTIN, resolve

    names = []
    for name in BUILTIN:
        try:
            if getattr(resolve(name), "differentiable_score", False):
                names.append(name)
        except Exception:  # a reward whose optional dependency is missing is not offered
            continue
    return names


def loss_option_rules(cfg) -> list[str]:
    """Options of one loss section or of a shared term that need a family or a sampler setting."""
    lc, r = cfg.learner, cfg.rollout
    spec, dd = loss_spec(lc.loss), lc.ddpo
    trajectories = spec.batch == TRAJECTORIES
    p: list[str] = []
    if trajectories and dd.window is not None and dd.window > r.num_inference_steps:
        p.append(
            f"learner.ddpo.window={dd.window}: must be in 1..rollout.num_inference_steps "
            f"({r.num_inference_steps}) or null (every step stochastic)"
        )
    elif (
        trajectories
        and dd.window is not None
        and dd.window_max_start is not None
        and dd.window_max_start > r.num_inference_steps - dd.window
    ):
        p.append(
            f"learner.ddpo.window_max_start={dd.window_max_start}: must be in 0..rollout.num_inference_steps - "
            f"learner.ddpo.window ({r.num_inference_steps - dd.window}) so the window fits"
        )
    need = "/".join(names_where(lambda s: s.batch == TRAJECTORIES))
    if dd.branch and not trajectories:
        p.append(
            f"learner.ddpo.branch=true branches a prompt group's trajectories: it needs learner.loss={need} "
            f"(got {lc.loss})"
        )
    if dd.trust_region != "clip" and not trajectories:
        p.append(
            f"learner.ddpo.trust_region={dd.trust_region} is for the per-step policy gradient: it needs "
            f"learner.loss={need}"
        )
    if lc.dpo.guidance.coef > 0 and (spec.batch != PAIRS or spec.aligned_only):
        p.append(
            f"learner.dpo.guidance.coef > 0 trains on (winner, loser) pairs: it needs a DPO loss "
            f"({pair_losses()}), not learner.loss={lc.loss}"
        )
    if lc.guidance_free.scale is not None:
        if r.guidance_scale != 1.0:
            p.append(
                f"learner.guidance_free trains a model that needs no guidance: sample at "
                f"rollout.guidance_scale=1 (now {r.guidance_scale})"
            )
        if trajectories:
            p.append(
                f"learner.guidance_free is not available with learner.loss={lc.loss} (its trajectories are "
                f"scored per step)"
            )
    return p


def reference_rules(cfg) -> list[str]:
    """learner.reference / learner.ema x model.lora / resources: which weights are kept, and where."""
    lc = cfg.learner
    p: list[str] = []
    if lc.reference.model == "ema" and not lc.ema.enabled:
        p.append(
            "learner.reference.model=ema needs learner.ema.decay or learner.ema.schedule=round_ramp (the EMA "
            "the reference is taken from)"
        )
    if lc.ema.sampling_policy == "ema":
        if not cfg.model.lora.enabled or lc.engine.zero_stage == 3:
            p.append(
                "learner.ema.sampling_policy=ema sends the EMA of the LoRA weights: needs model.lora.enabled "
                "and learner.engine.zero_stage <= 2"
            )
        if cfg.resources.colocate:
            p.append(
                "learner.ema.sampling_policy=ema needs separate rollout actors (resources.colocate samples "
                "with the trained UNet itself)"
            )
    return p


def zero3_rules(cfg) -> list[str]:
    """learner.engine.zero_stage=3 partitions the weights: nothing may need them whole."""
    lc = cfg.learner
    if lc.engine.zero_stage != 3:
        return []
    p: list[str] = []
    if OLD_POLICY in loss_spec(lc.loss).needs or lc.reference.model == "ema" or lc.ddpo.trust_region != "clip":
        p.append(
            f"learner.loss={'/'.join(names_where(lambda s: OLD_POLICY in s.needs))}, learner.reference.model=ema "
            f"and learner.ddpo.trust_region=dppo/guard predict with kept copies of the weights, which ZeRO-3 "
            f"partitions: use learner.engine.zero_stage <= 2"
        )
    if len(lc.regions.names) > 1 and lc.regions.fairness.rule in ("mpd", "mgda"):
        p.append(
            f"learner.regions.fairness.rule={lc.regions.fairness.rule} needs whole per-region gradients, which "
            f"ZeRO-3 partitions; use learner.engine.zero_stage <= 2 or learner.regions.fairness.rule=sum/equal"
        )
    return p


def hcp_rules(cfg) -> list[str]:
    """model.hcp x learner.loss x data: the layer trains on noised samples and their pose priors."""
    if not cfg.model.hcp.enabled:
        return []
    p: list[str] = []
    if loss_spec(cfg.learner.loss).batch == TRAJECTORIES:
        p.append(
            f"model.hcp is not available with learner.loss={cfg.learner.loss} (it trains on noised latents "
            f"of the samples)"
        )
    if cfg.data.hcp_priors.prior == "real" and not cfg.data.hgdpo.real_images:
        p.append(
            "data.hcp_priors.prior=real takes the pose priors from HG-DPO's real images: set "
            "data.hgdpo.real_images, or use prior=samples"
        )
    if cfg.data.region_pairs.region is not None:
        p.append(
            "model.hcp.enabled with data.region_pairs.region: inpainted region pairs carry no pose priors "
            "yet; turn one of them off"
        )
    return p


def data_source_rules(cfg) -> list[str]:
    """data.* x learner.loss / learner.regions / rollout: the sources make DPO pairs within the schedule."""
    p: list[str] = []
    pairwise = loss_spec(cfg.learner.loss).batch == PAIRS
    hg, rp, names = cfg.data.hgdpo, cfg.data.region_pairs, cfg.learner.regions.names
    if hg.real_images is not None:
        if not pairwise:
            p.append(f"data.hgdpo.real_images needs a DPO loss ({pair_losses()}); learner.loss={cfg.learner.loss}")
        p.extend(hgdpo_sdrecon_problems(hg, cfg.rollout.num_inference_steps))
        p.extend(hgdpo_schedule_problems(hg.stages, cfg.num_rounds))
    if rp.region is None:
        return p
    if rp.region != "global" and rp.region not in names:
        p.append(
            f"data.region_pairs.region={rp.region!r}: must be a local region of learner.regions.names={names} "
            f"(the pairs train with its mask), e.g. learner.regions.names=[global, {rp.region}]"
        )
    if not pairwise:
        p.append(f"data.region_pairs.region needs a DPO loss ({pair_losses()}); learner.loss={cfg.learner.loss}")
    steps = rp.num_inference_steps if rp.num_inference_steps is not None else cfg.rollout.num_inference_steps
    for k, s in rp.strengths("data.region_pairs")[0]:
        if 0.0 < s <= 1.0 and steps >= 1 and int(steps * s) < 1:
            p.append(
                f"{k}={s} of {steps} denoising steps runs no step: raise data.region_pairs.num_inference_steps "
                f"to >= {math.ceil(1 / s)}"
            )
    return p


def hgdpo_schedule_problems(stages, num_rounds: int) -> list[str]:
    """The curriculum fits the run: stage i covers rounds [until_round[i-1], until_round[i]) and the
    run trains rounds 0 .. num_rounds - 1, so a last stage ending after num_rounds is cut short (an
    interpolated ramp never reaches its value) and any stage starting at num_rounds or later never
    runs; rounds after the last stage keep its shares, so ending it earlier is fine."""
    if not stages or stages[-1].until_round <= num_rounds:
        return []
    i = len(stages) - 1
    unrun = [j for j in range(1, len(stages)) if stages[j - 1].until_round >= num_rounds]
    never = f"; stages {unrun} would never run" if unrun else ""
    return [
        f"data.hgdpo.stages[{i}].until_round={stages[i].until_round} > num_rounds={num_rounds}: the last "
        f"stage must end at or before the run's last round{never} (raise num_rounds or move the stages)"
    ]


def hgdpo_sdrecon_problems(hg, num_inference_steps: int) -> list[str]:
    """The SDRecon strength, when a stage asks for SDRecon winners: it must run at least one step."""
    if not any(st.sdrecon_winner_fraction > 0 for st in hg.stages):
        return []
    s = hg.sdrecon_strength
    if not 0.0 < s <= 1.0:
        return [f"data.hgdpo.sdrecon_strength={s}: must be in (0, 1] (the share of the denoising steps re-run)"]
    if int(num_inference_steps * s) < 1:
        return [
            f"data.hgdpo.sdrecon_strength={s} of rollout.num_inference_steps={num_inference_steps} runs no "
            f"denoising step (int(steps * strength) = 0): raise the strength to >= {1 / num_inference_steps:.3g}"
        ]
    return []


def region_pair_rules(cfg) -> list[str]:
    """learner.dpo.guidance / learner.loss x data.region_pairs / rollouts: the guidance loss trains on aligned
    region pairs (an image and its inpainted copy) only, so a run that turns it on must have them: online
    from data.region_pairs, offline from a logged log of region pairs (checked when the log is read,
    rlfh/recipes/offline.py)."""
    lc, rp = cfg.learner, cfg.data.region_pairs
    spec = loss_spec(lc.loss)
    on = (
        f"learner.loss={lc.loss}"
        if spec.aligned_only
        else "learner.dpo.guidance.coef > 0"
        if lc.dpo.guidance.coef > 0
        else None
    )
    if on is None:
        return []
    if rp.region is None and cfg.rollouts is None:
        return [
            f"{on} needs region pairs (an image and its inpainted copy, the only pairs it trains on): set "
            f"data.region_pairs.region online, or train offline (rlfh offline-dpo) on a log of region pairs "
            f"(rlfh make-region-pairs)"
        ]
    if spec.aligned_only and (lc.reference.kl_coef > 0 or lc.guidance_free.scale is not None):
        return [
            f"learner.loss={lc.loss} trains the policy alone (no reference model): turn off "
            f"learner.reference.kl_coef and learner.guidance_free"
        ]
    g = lc.dpo.guidance.region
    if not spec.aligned_only and rp.region is not None and g not in ("global", rp.region):
        return [
            f"learner.dpo.guidance.region={g}: the region pairs inpaint data.region_pairs.region={rp.region}; "
            f"use that region or global"
        ]
    return []


def finetune_rules(cfg) -> list[str]:
    """data.finetune x learner.loss: `rlfh finetune` trains the plain diffusion loss, a weighted-sample loss
    with every weight 1 (the losses that compare with a sampling policy or a reference do not apply)."""
    spec = loss_spec(cfg.learner.loss)
    if cfg.data.finetune.images is None or (spec.batch == SAMPLES and not spec.needs):
        return []
    unit = "/".join(names_where(lambda s: s.batch == SAMPLES and not s.needs))
    return [
        f"data.finetune.images (rlfh finetune) trains the diffusion loss on real images with unit weights: "
        f"use learner.loss={unit}, not {cfg.learner.loss}"
    ]


def reward_name_rules(cfg) -> list[str]:
    """rewards: each entry's name is its key in metrics and the rollout log, so names are distinct."""
    names = [e.name or e.target for e in cfg.rewards]
    return [
        f"rewards: name {n!r} is used twice; give each entry a distinct `name:`"
        for n in sorted({n for n in names if names.count(n) > 1})
    ]


def score_guidance_rules(cfg) -> list[str]:
    """rollout.score_guidance x rewards: the guiding score is a configured FaceScore reward."""
    sg = cfg.rollout.score_guidance
    if not sg.enabled:
        return []
    targets = {e.name or e.target: e.target for e in cfg.rewards}
    if targets.get(sg.reward) != "facescore":
        return [
            f"rollout.score_guidance.reward={sg.reward!r}: needs a `rewards:` entry of that name with target "
            f"facescore (the differentiable score that guides); rewards here: {targets}"
        ]
    return []


# The rules that read more than one section; each says which in its docstring.
def model_family(model) -> tuple[object | None, list[str]]:
    """The family ``model`` names (``model.family``) or its path shows without loading anything
    (``rlfh:tiny-<family>``, a local folder or single file); None where only loading tells (a hub id,
    a path not there yet). The problems: a family rlfh does not implement (with the reason), or one
    that disagrees with the model at ``model.path``."""
    from families import detect_family, get_family
    from families.tiny import TINY_PREFIX

    try:
        named = get_family(model.family) if model.family else None
    except (ValueError, NotImplementedError) as e:
        return None, [f"model.family={model.family}: {e}"]
    path = Path(model.path).expanduser()
    if not (model.path.startswith(TINY_PREFIX) or path.is_dir() or path.is_file()):
        return named, []
    try:
        found = detect_family(model.path if model.path.startswith(TINY_PREFIX) else str(path), model.revision)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        return None, [str(e) if "model.path" in str(e) else f"model.path={model.path}: {e}"]
    if named is not None and named is not found:
        return None, [
            f"model.family={model.family} but model.path={model.path} is a {found.pipeline_class} (family "
            f"{found.name!r}); drop model.family or make it {found.name}"
        ]
    return found, []


def draft_family_problems(cfg) -> list[str]:
    """learner.draft x model: a variant whose only step with gradient is the sampler's last, on a family where
    that step carries no gradient (``ModelFamily.last_step_untrainable``: the flow models)."""
    from rlfh.losses.draft import refl_steps

    family, _ = model_family(cfg.model)
    reason = getattr(family, "last_step_untrainable", None)
    d, n = cfg.learner.draft, cfg.rollout.num_inference_steps
    if reason is None or n < 1 or len(d.k_range) != 2 or len(d.refl_range) != 2:
        return []  # a malformed range is the section's own problem (DraftConfig.problems)
    last_only = {
        "draft_k": d.k == 1,
        "alignprop": d.k_range[1] == 1,
        "draft_lv": True,
        "refl": refl_steps(d.refl_range, n)[0] == n - 1,
    }[d.variant]
    if not last_only:
        return []
    return [
        f"learner.draft.variant={d.variant} trains the last sampling step alone on the {family.name} family: {reason}"
    ]


# The methods a family's ``refused`` may name besides the losses (``learner.loss``), each with the setting
# that asks for it: what :func:`methods_in_use` reports and README's families table lists.
OPTION_METHODS = {
    "hcp": "model.hcp.enabled=true",
    "guidance_free": "learner.guidance_free.scale",
    "cfg": "rollout.guidance_scale > 1",
    "score_guidance": "rollout.score_guidance.mu > 0",
}


def methods_in_use(cfg) -> dict[str, str]:
    """The rlfh methods a config runs, by the name a family's ``refused`` uses (a loss name or a key of
    :data:`OPTION_METHODS`), each with the setting that asks for it."""
    used = {cfg.learner.loss: f"learner.loss={cfg.learner.loss}"}
    if cfg.model.hcp.enabled:
        used["hcp"] = "model.hcp.enabled=true"
    if cfg.learner.guidance_free.scale is not None:
        used["guidance_free"] = f"learner.guidance_free.scale={cfg.learner.guidance_free.scale}"
    if cfg.learner.dpo.guidance.coef > 0:
        used["guidance"] = f"learner.dpo.guidance.coef={cfg.learner.dpo.guidance.coef}"
    if cfg.rollout.score_guidance.enabled:
        used["score_guidance"] = "rollout.score_guidance.enabled=true"
    if cfg.rollout.guidance_scale > 1:
        used["cfg"] = f"rollout.guidance_scale={cfg.rollout.guidance_scale}"
    return used


def family_rules(cfg) -> list[str]:
    """model x everything: the model family exists, and applies every method the config asks for."""
    family, p = model_family(cfg.model)
    if family is None:
        return p
    for method, setting in methods_in_use(cfg).items():
        if method in family.refused:
            p.append(f"{setting} does not apply to the {family.name} model family: {family.refused[method]}")
    return p


def gardo_rules(cfg) -> list[str]:
    """gardo x learner.loss / learner.reference / rewards: what GARDO's parts act on must be there."""
    g, lc = cfg.gardo, cfg.learner
    p: list[str] = []
    if g.enabled and loss_spec(lc.loss).batch == PAIRS:
        p.append(
            f"gardo acts on per-sample advantages, weights and KL terms: learner.loss={lc.loss} trains on "
            f"pairs; use one of {names_where(lambda s: s.batch != PAIRS)}"
        )
    if (g.kl_gate_fraction is not None or g.refreshes) and lc.reference.kl_coef <= 0:
        p.append(
            "gardo.kl_gate_fraction / refresh_kl / refresh_rounds act on the KL to the reference: "
            "set learner.reference.kl_coef > 0"
        )
    if g.refreshes and lc.reference.model == "ema":
        p.append(
            "gardo.refresh_kl / refresh_rounds replace the reference by the policy; "
            "learner.reference.model=ema takes it from the EMA: use one of them"
        )
    if g.refreshes and lc.engine.zero_stage == 3:
        p.append(
            "gardo.refresh_kl / refresh_rounds copy the policy's weights whole: needs learner.engine.zero_stage <= 2"
        )
    names = {e.name or e.target for e in cfg.rewards}
    unknown = [n for n in g.uncertainty_rewards if n not in names]
    if unknown:
        p.append(
            f"gardo.uncertainty_rewards {unknown} are not in rewards: {sorted(names)} (add them with "
            f"weight 0 to score them without training on them)"
        )
    return p


CROSS_SECTION_RULES = (
    family_rules,
    batch_rules,
    colocation_rules,
    loss_rules,
    differentiable_reward_rules,
    loss_option_rules,
    reference_rules,
    zero3_rules,
    hcp_rules,
    data_source_rules,
    region_pair_rules,
    finetune_rules,
    reward_name_rules,
    score_guidance_rules,
    gardo_rules,
)
