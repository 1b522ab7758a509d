"""Typed, validated run configuration: YAML file + ``key=value`` overrides.

    cfg = load_config("configs/tiny.yaml", ["run_dir=/tmp/r", "learner.lr=1e-4"])

Sections by role: ``model`` (weights, LoRA, the HcP layer), ``rollout``, ``rewards``, ``learner``
(optimizer, regions, reference, EMA, engine, and one section per loss family, defined in its loss file
and listed by rlfh/losses/registry.py), ``data`` (per-round data sources), ``resources``, ...
Every section is a frozen dataclass whose ``problems(key)`` checks its own fields; the rules that read
several sections are rlfh/config/rules.py's table. Unknown keys, wrong types, moved keys
(:data:`MOVED_KEYS`) and inconsistent batch sizes are collected into ONE :class:`ConfigError` that
names each key, its value, the rule and the fix. Derived values (gradient accumulation, samples per
round) are properties, never written back, so the saved ``config.yaml`` is exactly what ran.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rewards.wire import ServerConfig
from rlfh.config.fields import at_least, fraction, knob, non_negative, positive
from rlfh.losses.gardo import GardoConfig
from rlfh.losses.registry import LOSS_NAMES, loss_sections

# Larger than any SDXL bucket (1024-2048) with room to spare; 100000 x 100000 would try to allocate
# a 6 GB latent per sample and fail minutes in, inside a rollout actor.
MAX_IMAGE_SIDE = 4096


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` lists them, the message shows them all."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True  # train a LoRA adapter (false: full UNet fine-tuning)
    rank: int = 8  # LoRA rank
    alpha: float = 8.0  # LoRA alpha (scale = alpha / rank)
    # SD1.5, SDXL: to_q, to_k, to_v, to_out.0; SD3: also the text stream's add_q/k/v_proj and to_add_out
    target_modules: Optional[list[str]] = None  # adapted modules; null: the family's (diffusers' LoRA scripts')

    def problems(self, key: str) -> list[str]:
        alpha = [] if self.alpha > 0 else [f"{key}.alpha={self.alpha}: must be > 0"]
        return at_least(f"{key}.rank", self.rank, 1) + alpha


HCP_WORDS = [
    "person",
    "people",
    "man",
    "men",
    "woman",
    "women",
    "boy",
    "girl",
    "child",
    "children",
    "kid",
    "baby",
    "lady",
    "guy",
    "player",
    "dancer",
    "athlete",
    "face",
    "hand",
    "hands",
    "arm",
    "arms",
    "leg",
    "legs",
    "body",
]


def hcp_factor(key) -> int | None:
    """A ``model.hcp.scale_weights`` key as a downsampling factor (a power of two >= 1), or None."""
    try:
        f = int(str(key))
    except ValueError:
        return None
    return f if f >= 1 and f & (f - 1) == 0 else None


@dataclass(frozen=True)
class HcPConfig:
    """``model.hcp``: the HcP layer (arXiv 2403.05239), a human-centric key on the UNet's cross-attention.

    Attributes:
        enabled: add the layer and its alignment loss; the pose priors it aligns to are ``data.hcp_priors``.
            Needs ``model.lora`` (the layer is saved beside the LoRA); docs/walkthrough.md.
        scale_weights: scale-aware: cross-attention layers by downsampling factor from the latent (SDXL at
            1024 px: 2 = 64x64 maps, 4 = 32x32) -> weight; only weighted factors get a layer.
        mode: ``residual`` (the paper's reading): the human-centric attention's output is added to the
            cross-attention's through a zero-initialised projection, so a fresh layer changes nothing and
            training changes generation (sampling needs the layer: ``rlfh eval`` loads ``hcp.safetensors``;
            online runs need ``resources.colocate``). ``observe``: the layer only watches (the UNet's output
            unchanged; the alignment loss trains the LoRA through the queries), for online runs whose rollout
            actors load only the LoRA.
    """

    enabled: bool = False
    mode: Literal["residual", "observe"] = "residual"
    coef: float = 1.0  # weight of the human-centric alignment term, coef * L_hca (rlfh/losses/hcp.py)
    hidden: int = 64  # width of phi, the MLP from the text embeddings to the human-centric key K_h
    scale_weights: dict[str, float] = field(default_factory=lambda: {"2": 0.5, "4": 1.0})
    timesteps: list[int] = field(default_factory=lambda: [500, 999])  # [lo, hi]: the loss counts for training t in it
    words: list[str] = knob(
        factory=lambda: list(HCP_WORDS),
        doc="human-centric tokens: the prompt's words in this list; a prompt with none uses all its words",
    )

    def problems(self, key: str) -> list[str]:
        if not self.enabled:
            return []
        p = non_negative(f"{key}.coef", self.coef) + at_least(f"{key}.hidden", self.hidden, 1)
        for k, v in self.scale_weights.items():
            if hcp_factor(k) is None:
                p.append(
                    f"{key}.scale_weights: key {k!r} must be a downsampling factor from the latent, a power of "
                    f"two such as 2 or 4"
                )
            if not (isinstance(v, (int, float)) and 0 <= v < math.inf):
                p.append(f"{key}.scale_weights.{k}={v!r}: must be a finite number >= 0")
        if not any(isinstance(v, (int, float)) and v > 0 for v in self.scale_weights.values()):
            p.append(f"{key}.scale_weights: give at least one factor a weight > 0, e.g. {{4: 1.0}}")
        if len(self.timesteps) != 2 or not (0 <= self.timesteps[0] <= self.timesteps[1]):
            p.append(f"{key}.timesteps={self.timesteps}: must be [lo, hi] with 0 <= lo <= hi (training timesteps)")
        return p


@dataclass(frozen=True)
class ModelConfig:
    """``model``: the pipeline's weights and the trained parts added to it."""

    path: str = "rlfh:tiny-sdxl"  # local diffusers folder, hub id, single .safetensors file, or rlfh:tiny-<family>
    family: Optional[str] = None  # sdxl, sd15, sd3 or flux; null: read from model.path (model_index.json's _class_name)
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" for the published SDXL fp16 files
    vae_path: Optional[str] = None  # e.g. madebyollin/sdxl-vae-fp16-fix
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)
    hcp: HcPConfig = field(default_factory=HcPConfig)

    def problems(self, key: str) -> list[str]:
        if self.hcp.enabled and not self.lora.enabled:
            return [
                f"{key}.hcp.enabled needs {key}.lora.enabled: the layer is saved beside the LoRA, and full "
                f"fine-tuning would write it into the UNet's own weights"
            ]
        return []


@dataclass(frozen=True)
class ScoreGuidanceConfig:
    """``rollout.score_guidance``: FaceScore's sampling guidance (arXiv 2406.17100, appendix, eqs. 5-6;
    rollouts/guidance.py), eps' = eps - clamp(mu * grad_{z_t} s(D(z_0)), -clamp, clamp) at every step.
    Applied by ``rlfh eval`` to the model and the baseline alike; training runs refuse it (a guided sample is
    not the policy's).

    Attributes:
        reward: the name of the ``rewards:`` entry (a ``facescore`` target) whose score guides.
        mu: the guidance strength; 0 = off. The paper gives no value: measure on a few prompts.
        clamp: the bound of |mu * grad| per latent element (the paper clamps without giving a bound); null = none.
    """

    reward: str = "facescore"
    mu: float = 0.0
    clamp: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.mu > 0

    def problems(self, key: str) -> list[str]:
        p = non_negative(f"{key}.mu", self.mu)
        if self.clamp is not None and not 0 < self.clamp < math.inf:
            p.append(f"{key}.clamp={self.clamp}: must be finite and > 0, or null for no clamp")
        return p


@dataclass(frozen=True)
class RolloutConfig:
    """``rollout``: what the rollout actors sample each round.

    Attributes:
        compile: torch.compile the rollout UNet and VAE decoder (CUDA: reduce-overhead, i.e. CUDA graphs); the
            first batches pay the compile.
        merge_lora: sample with the policy's LoRA merged into the UNet weights (rebuilt from a base copy each
            sync); false: the unmerged peft adapter.
    """

    prompts: list[str] = field(default_factory=lambda: ["a photo of a person"])
    prompt_file: Optional[str] = None  # one prompt per line; replaces `prompts` when set
    prompts_per_round: int = 2
    rollouts_per_prompt: int = 4
    sample_batch_size_per_actor: int = 4
    num_inference_steps: int = 10
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    height: int = 64
    width: int = 64
    # SDXL's multi-aspect buckets, e.g. [[1024, 1024], [1152, 896], [896, 1152]] (rlfh/data/buckets.py)
    resolutions: list[list[int]] = field(default_factory=list)  # [[h, w], ...] buckets; []: height x width
    eta: float = 0.0  # DDIM eta; 1.0 makes the sampler stochastic (DDPO)
    scheduler: Literal["default", "ddim"] = "default"  # ddim: DDIMScheduler with the model's schedule (DDPO)
    max_staleness: Literal[0, 1] = 0  # 1: sample round k+1 while the learner trains on round k (async)
    compile: bool = False
    merge_lora: bool = True
    score_guidance: ScoreGuidanceConfig = field(default_factory=ScoreGuidanceConfig)  # FaceScore's, for rlfh eval

    @property
    def samples_per_round(self) -> int:
        return self.prompts_per_round * self.rollouts_per_prompt

    def problems(self, key: str) -> list[str]:
        p: list[str] = []
        for name in ("prompts_per_round", "sample_batch_size_per_actor", "num_inference_steps"):
            p += at_least(f"{key}.{name}", getattr(self, name), 1)
        if self.rollouts_per_prompt < 2:
            p.append(
                f"{key}.rollouts_per_prompt={self.rollouts_per_prompt}: DPO pairs need >= 2 samples per prompt; "
                f"set it to 2 or more"
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 8 or v % 8:
                p.append(f"{key}.{name}={v}: must be a positive multiple of 8 (the VAE downsamples by 8)")
            elif v > MAX_IMAGE_SIDE:
                p.append(f"{key}.{name}={v}: must be at most {MAX_IMAGE_SIDE} pixels (SDXL is trained at 1024)")
        if self.eta < 0:
            p.append(f"{key}.eta={self.eta}: must be >= 0")
        p += resolution_problems(f"{key}.resolutions", self.resolutions)
        if not self.prompts and not self.prompt_file:
            p.append(f"{key}.prompts is empty and {key}.prompt_file is not set: give at least one prompt")
        return p


# A bucket side in pixels: the VAE's 8 pixels per latent times the UNet's downsampling of the latent
# (x4 for SDXL's UNet, x8 for SD1.5's), so that every UNet level's feature map has a whole size.
BUCKET_MULTIPLE = 64


def resolution_problems(key: str, resolutions: list[list[int]]) -> list[str]:
    """``rollout.resolutions``: [h, w] pairs, each side a positive multiple of :data:`BUCKET_MULTIPLE` up to
    ``MAX_IMAGE_SIDE``, no bucket twice."""
    p: list[str] = []
    for i, hw in enumerate(resolutions):
        if len(hw) != 2:
            p.append(f"{key}[{i}]={hw}: a bucket is [height, width]")
            continue
        for side, v in zip(("height", "width"), hw):
            if v < BUCKET_MULTIPLE or v % BUCKET_MULTIPLE or v > MAX_IMAGE_SIDE:
                p.append(
                    f"{key}[{i}]={hw}: the {side} {v} must be a multiple of {BUCKET_MULTIPLE} (8 pixels per latent "
                    f"x the UNet's downsampling) from {BUCKET_MULTIPLE} to {MAX_IMAGE_SIDE}"
                )
    seen = [tuple(hw) for hw in resolutions]
    p += [f"{key}: the bucket {list(hw)} is given twice" for hw in sorted(set(seen)) if seen.count(hw) > 1]
    return p


@dataclass(frozen=True)
class RewardEntry:
    """One reward of ``rewards`` (or ``guards.heldout_rewards``).

    Attributes:
        allow_negative_weight: a negative weight trains AWAY from this reward; refused unless set, so that a
            sign typo cannot invert the objective.
    """

    target: str  # registry name or module:callable
    name: Optional[str] = None
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    allow_negative_weight: bool = False

    def problems(self, key: str) -> list[str]:
        """The target resolves (without building the model) and the weight's sign is intended."""
        from rewards.registry import check_target

        p: list[str] = []
        if self.name is None and ":" in self.target:
            p.append(
                f"{key} target={self.target!r}: a module:callable reward needs `name:` (its key in metrics and logs)"
            )
        problem = check_target(self.target)
        if problem is not None:
            p.append(f"{key}.target={self.target!r}: {problem.removeprefix(f'reward {self.target!r}: ')}")
        if self.weight < 0 and not self.allow_negative_weight:
            dotted = key.replace("[", ".").replace("]", "")
            p.append(
                f"{key}.weight={self.weight}: a negative weight trains the model to lower this reward; "
                f"if that is intended set {key}.allow_negative_weight=true (on the command line: "
                f"{dotted}.allow_negative_weight=true)"
            )
        return p


# --------------------------------------------------------------------------------------------
# learner: the optimizer and what every loss shares; each loss family's section is its own
# (rlfh/losses/registry.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FairnessConfig:
    rule: Literal["mpd", "sum", "equal", "mgda"] = "mpd"  # how per-region gradients combine (FairHuman: mpd)
    alpha: float = 2.0  # MPD fairness exponent; 2 = minimum potential delay
    weights: dict[str, float] = field(default_factory=dict)  # rule=sum: region -> weight (default 1)

    def problems(self, key: str) -> list[str]:
        return [] if self.alpha > 0 else [f"{key}.alpha={self.alpha}: must be > 0"]


@dataclass(frozen=True)
class RegionsConfig:
    names: list[str] = field(default_factory=lambda: ["global"])  # one objective per region: global, face, hand, ...
    scale: float = 5.0  # FairHuman's s for local (masked) regions
    fairness: FairnessConfig = field(default_factory=FairnessConfig)

    def problems(self, key: str) -> list[str]:
        p: list[str] = []
        if not self.names or len(set(self.names)) != len(self.names):
            p.append(f"{key}.names={self.names}: give distinct region names, e.g. [global, face, hand]")
        if self.scale <= 0:
            p.append(f"{key}.scale={self.scale}: must be > 0")
        unknown = sorted(set(self.fairness.weights) - set(self.names))
        if unknown:
            p.append(f"{key}.fairness.weights: regions {unknown} are not in {key}.names={self.names}")
        return p


@dataclass(frozen=True)
class ReferenceConfig:
    """``learner.reference``: the model DPO's implicit reward and the KL term compare with.

    Attributes:
        kl_coef: weight of the KL to the reference as a loss term, kl_coef * mean (eps_theta - eps_ref)^2
            (docs/online_rl.md); ddpo: the exact KL of each trained DDIM step, w_t times that mean of the
            guided eps on its input.
    """

    model: Literal["base", "ema"] = "base"  # the base model, or the EMA of the policy (needs learner.ema.decay)
    refresh_rounds: int = 1  # model=ema: the reference is the EMA as it was at the start of every this many rounds
    kl_coef: float = 0.0

    def problems(self, key: str) -> list[str]:
        return at_least(f"{key}.refresh_rounds", self.refresh_rounds, 1) + non_negative(f"{key}.kl_coef", self.kl_coef)


@dataclass(frozen=True)
class EMAConfig:
    """``learner.ema``: an exponential moving average of the trainable weights.

    Attributes:
        sampling_policy: what the rollout actors sample with: the trained weights, or their EMA
            (DiffusionNFT's off-policy sampler; LoRA only).
        schedule: when the EMA moves. ``step`` (default): after every optimizer step with the fixed
            ``decay``. ``round_ramp``: once per round, after its training, with the decay
            min(max(0, (s - ramp_start) * ramp_rate), ramp_max) at optimizer step s: DiffusionNFT's
            sampling policy (arXiv 2509.16117; reference NVlabs/DiffusionNFT, ``return_decay`` in
            scripts/train_nft_sd3.py, applied once per epoch; its defaults are the reference's
            ``decay_type=1``, its OCR config's ``decay_type=2`` is ramp_start 75, ramp_rate 0.0075,
            ramp_max 0.999).
    """

    decay: Optional[float] = None  # schedule=step: keep an EMA with this decay per optimizer step (e.g. 0.999)
    sampling_policy: Literal["trained", "ema"] = "trained"
    schedule: Literal["step", "round_ramp"] = "step"
    ramp_start: int = 0  # round_ramp: optimizer steps before the decay starts to rise (decay 0: the EMA is a copy)
    ramp_rate: float = 0.001  # round_ramp: decay gained per optimizer step after ramp_start
    ramp_max: float = 0.5  # round_ramp: the decay's ceiling

    @property
    def enabled(self) -> bool:
        """Whether the learner keeps an EMA (saved in checkpoints)."""
        return self.decay is not None or self.schedule == "round_ramp"

    def round_decay(self, step: int) -> float:
        """``round_ramp``'s decay after ``step`` optimizer steps."""
        return min(max(0.0, (step - self.ramp_start) * self.ramp_rate), self.ramp_max)

    def problems(self, key: str) -> list[str]:
        p = [] if self.decay is None or 0 < self.decay < 1 else [f"{key}.decay={self.decay}: must be in (0, 1)"]
        if self.sampling_policy == "ema" and not self.enabled:
            p.append(
                f"{key}.sampling_policy=ema needs {key}.decay or {key}.schedule=round_ramp (the EMA the rollout "
                f"actors sample with)"
            )
        if self.schedule == "round_ramp":
            if self.decay is not None:
                p.append(
                    f"{key}.decay={self.decay} with {key}.schedule=round_ramp: the ramp gives the decay "
                    f"({key}.ramp_start, ramp_rate, ramp_max); leave {key}.decay unset"
                )
            p += non_negative(f"{key}.ramp_start", self.ramp_start) + non_negative(f"{key}.ramp_rate", self.ramp_rate)
            if not 0 <= self.ramp_max < 1:
                p.append(f"{key}.ramp_max={self.ramp_max}: must be in [0, 1)")
        return p


@dataclass(frozen=True)
class GuidanceFreeConfig:
    """``learner.guidance_free``: guidance-free training, the guided prediction distilled into the conditional one
    (rlfh/losses/guidance_free.py; docs/online_rl.md, section 6).

    Attributes:
        scale: the guidance scale w of the reference's guided eps, the teacher of a term added to the loss
            (needs rollout.guidance_scale=1); null = off.
    """

    scale: Optional[float] = None
    coef: float = 1.0  # weight of the term, coef * mean (eps_theta(x_t, c) - eps_teacher)^2

    def problems(self, key: str) -> list[str]:
        p = non_negative(f"{key}.coef", self.coef)
        if self.scale is not None and not (1 < self.scale < math.inf):
            p.append(f"{key}.scale={self.scale}: the teacher's guidance scale must be finite and > 1")
        return p


@dataclass(frozen=True)
class EngineConfig:
    """``learner.engine``: how DeepSpeed and torch run the learner's step (no effect on what it computes).

    Attributes:
        optimizer_impl: the AdamW kernel; auto: fused where torch has it for the device, else foreach.
    """

    zero_stage: Literal[0, 1, 2, 3] = 0  # DeepSpeed ZeRO stage
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on CPU (DeepSpeedCPUAdam; zero_stage>=1)
    offload_params: bool = False  # ZeRO-3 parameter offload to CPU
    gradient_checkpointing: bool = False  # recompute UNet activations in backward to save memory
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    compile: bool = False  # torch.compile the learner's UNet (policy and reference); first steps pay the compile

    def problems(self, key: str) -> list[str]:
        p: list[str] = []
        if self.offload_optimizer and self.zero_stage == 0:
            p.append(f"{key}.offload_optimizer=true needs {key}.zero_stage >= 1 (ZeRO-Offload)")
        if self.offload_params and self.zero_stage != 3:
            p.append(f"{key}.offload_params=true needs {key}.zero_stage=3")
        return p


@dataclass(frozen=True)
class LearnerCore:
    """``learner``: the optimizer, the regions, the reference, the EMA and the engine; the knobs of each
    loss family are in the section named after it (``learner.dpo``, ``learner.ddpo``, ...), one per
    family of rlfh/losses/registry.py."""

    loss: Literal[LOSS_NAMES] = "dpo"  # training objective (rlfh/losses/registry.py)
    lr: float = 1e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas [beta1, beta2]
    max_grad_norm: float = 1.0  # gradient clipping norm
    train_batch_size: int = 2  # items (pairs or samples) per optimizer step, over all learner ranks
    micro_batch_size_per_gpu: int = 1  # items per forward/backward on one learner rank
    epochs_per_round: int = 1  # passes over a round's items
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    guidance_free: GuidanceFreeConfig = field(default_factory=GuidanceFreeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def problems(self, key: str) -> list[str]:
        p: list[str] = []
        for name in ("train_batch_size", "micro_batch_size_per_gpu", "epochs_per_round"):
            p += at_least(f"{key}.{name}", getattr(self, name), 1)
        if self.lr <= 0:
            p.append(f"{key}.lr={self.lr}: must be > 0 (e.g. 1e-5)")
        if self.weight_decay < 0:
            p.append(f"{key}.weight_decay={self.weight_decay}: must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            p.append(f"{key}.adam_betas={self.adam_betas}: give two values in [0, 1), e.g. [0.9, 0.999]")
        if self.max_grad_norm < 0:
            p.append(f"{key}.max_grad_norm={self.max_grad_norm}: must be >= 0 (0 turns clipping off)")
        return p


# learner.<section> of each loss family, from the registry: a new family brings its section with it
LearnerConfig = dataclasses.make_dataclass(
    "LearnerConfig",
    [(name, cls, field(default_factory=cls)) for name, cls in loss_sections().items()],
    bases=(LearnerCore,),
    frozen=True,
)
LearnerConfig.__module__ = __name__  # pickled by reference (Ray sends configs to the actors)


# --------------------------------------------------------------------------------------------
# data: per-round data sources besides the rollouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HGDPOStage:
    """One stage of the HG-DPO curriculum.

    Attributes:
        sdrecon_winner_fraction: share of the round's pairs whose winner is SDRecon, the real image re-noised
            and denoised by the current policy (the normal stage); real + sdrecon <= 1, the rest generated
            best vs worst (easy).
    """

    until_round: int  # the stage covers rounds before this one
    real_winner_fraction: float  # share of the round's pairs whose winner is a real image (HG-DPO's hard stage)
    sdrecon_winner_fraction: float = 0.0


def hgdpo_stage_problems(stages, key: str = "data.hgdpo.stages") -> list[str]:
    """Every problem of an HG-DPO curriculum (``HGDPOStage`` objects); the config check and
    :class:`rlfh.data.hgdpo.Curriculum` both use this one."""
    if not stages:
        return [f"{key}: no stages; give at least one {{until_round, real_winner_fraction}}"]
    p: list[str] = []
    last = None
    for i, st in enumerate(stages):
        k = f"{key}[{i}]"
        if st.until_round < 1:
            p.append(f"{k}.until_round={st.until_round}: must be >= 1")
        elif last is not None and st.until_round <= last:
            p.append(f"{k}.until_round={st.until_round}: must be greater than the previous stage's {last}")
        last = st.until_round if last is None else max(last, st.until_round)
        real, sdrecon = st.real_winner_fraction, st.sdrecon_winner_fraction
        p += fraction(f"{k}.real_winner_fraction", real, open_low=False)
        if not 0.0 <= sdrecon <= 1.0:
            p.append(f"{k}.sdrecon_winner_fraction={sdrecon}: must be in [0, 1]")
        elif 0.0 <= real <= 1.0 and real + sdrecon > 1.0:
            p.append(
                f"{k}: real_winner_fraction + sdrecon_winner_fraction = {real} + {sdrecon} > 1; they are "
                f"shares of the same round's pairs"
            )
    return p


@dataclass(frozen=True)
class HGDPOConfig:
    """``data.hgdpo``: HG-DPO's real images as winners, on a curriculum (rlfh/data/hgdpo.py).

    Attributes:
        sdrecon_strength: SDRecon winners: img2img strength s, the real latent noised to the start of the last
            int(s * rollout.num_inference_steps) steps and denoised from there (0 < s <= 1; larger is further
            from the real image).
    """

    real_images: Optional[str] = None  # ImageFolder dir (metadata.jsonl + images); None disables HG-DPO
    stages: list[HGDPOStage] = field(default_factory=lambda: [HGDPOStage(1, 1.0)])  # the curriculum
    interpolate: bool = False  # HG-DPO switches stages abruptly; true ramps linearly between them
    encode_batch_size: int = 8  # images per VAE encode batch
    latent_mode: Literal["sample", "mean"] = "sample"  # latent of a real image: a seeded draw or the mean
    fresh_losers: bool = True  # sample losers for the real captions (HG-DPO); false keeps generated losers
    sdrecon_strength: float = 0.5

    def problems(self, key: str) -> list[str]:
        return [] if self.real_images is None else hgdpo_stage_problems(self.stages, f"{key}.stages")


# FaceScore (arXiv 2406.17100) maps the face's area ratio to the noise factor in its Table 4, whose
# values we do not have: this default follows its rule (smaller regions, smaller strength) within
# its fixed settings 0.1 and 0.4. Rows [max_area_ratio, strength]: the first row whose bound is
# >= the region's share of the image gives the strength.
DEFAULT_STRENGTH_TABLE = [[0.02, 0.1], [0.05, 0.2], [0.1, 0.3], [1.0, 0.4]]


@dataclass(frozen=True)
class RegionPairsConfig:
    """``data.region_pairs``: FaceScore's inpainted-region pairs (rlfh/data/region_pairs.py).

    Attributes:
        region: face / hand (in learner.regions.names): inpaint it to make (original, inpainted) DPO pairs
            trained with its mask; null = off.
        strength: inpainting noise strength; null = adaptive from the region's area ratio (strength_table);
            FaceScore's fixed settings: 0.1, 0.4.
        num_inference_steps: steps of the full inpainting schedule (strength s runs int(steps * s));
            null = rollout.num_inference_steps.
        lora: make-region-pairs: inpaint with this trained LoRA on model.path (a .safetensors file,
            checkpoint folder or run dir).
        winner: which image of a pair wins: original (FaceScore's rule: the original wins, its inpainted copy
            loses, no scorer) or reward (the config's rewards pick, scoring both); online, and offline-dpo on a
            log of region pairs.
        per_region: each: one pair per detected box (one face inpainted at a time, FaceScore's); union: one pair
            per image with all its boxes inpainted at once.
    """

    region: Optional[str] = None
    winner: Literal["reward", "original"] = "reward"
    per_region: Literal["each", "union"] = "each"
    fraction: float = 1.0  # online: share of a round's samples with the region that get inpainted (seeded draw)
    strength: Optional[float] = None
    strength_table: list[list[float]] = knob(
        factory=lambda: [list(r) for r in DEFAULT_STRENGTH_TABLE],
        doc="adaptive strength: rows [max_area_ratio, strength], bounds increasing, the last 1.0",
    )
    dilate: int = 16  # side in pixels of the square kernel the region's boxes are dilated with (FairHuman's 16)
    num_inference_steps: Optional[int] = None
    pipeline: Optional[str] = None  # make-region-pairs: a diffusers inpainting pipeline instead of the policy
    lora: Optional[str] = None

    def strengths(self, key: str) -> tuple[list[tuple[str, float]], list[str]]:
        """((key, strength) of the fixed strength or of each table row, problems of the table)."""
        if self.strength is not None:
            return [(f"{key}.strength", self.strength)], []
        p: list[str] = []
        strengths, bounds = [], []
        for i, row in enumerate(self.strength_table):
            if len(row) != 2:
                p.append(f"{key}.strength_table[{i}]={row}: give [max_area_ratio, strength]")
                continue
            bounds.append(row[0])
            strengths.append((f"{key}.strength_table[{i}][1]", row[1]))
        if not self.strength_table:
            p.append(f"{key}.strength_table is empty: give rows [max_area_ratio, strength] or a fixed {key}.strength")
        elif any(b >= c for b, c in zip(bounds, bounds[1:])) or any(not 0 < b for b in bounds):
            p.append(f"{key}.strength_table: max_area_ratio bounds {bounds} must be > 0 and increasing")
        elif bounds and bounds[-1] < 1.0:
            p.append(
                f"{key}.strength_table: the last max_area_ratio is {bounds[-1]}; make it 1.0 so every region "
                f"has a strength"
            )
        return strengths, p

    def problems(self, key: str) -> list[str]:
        p = fraction(f"{key}.fraction", self.fraction)
        if self.region == "global":
            p.append(f"{key}.region='global': name a local region (face, hand), whose mask the pairs train with")
        if self.dilate < 0:
            p.append(f"{key}.dilate={self.dilate}: must be >= 0 (pixels; 0 or 1 = the boxes as they are)")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            p.append(f"{key}.num_inference_steps={self.num_inference_steps}: must be >= 1")
        strengths, table = self.strengths(key)
        return p + table + [f"{k}={s}: a noise strength must be in (0, 1]" for k, s in strengths if not 0.0 < s <= 1.0]


@dataclass(frozen=True)
class HcPPriorsConfig:
    """``data.hcp_priors``: the pose priors the HcP layer (``model.hcp``) aligns to (rlfh/data/pose_prior.py).

    Attributes:
        prior: MediaPipe Pose on the round's samples (and HG-DPO's real winners), or on HG-DPO's real images only
            (recommended where ``data.hgdpo.real_images`` are given: the paper's priors are of real people).
    """

    prior: Literal["samples", "real"] = "samples"
    sigma: float = 0.03  # heatmap Gaussian width, as a fraction of the image's shorter side
    min_visibility: float = 0.5  # landmarks with a lower MediaPipe visibility are not drawn

    def problems(self, key: str) -> list[str]:
        p = positive(f"{key}.sigma", self.sigma)
        if not 0 <= self.min_visibility <= 1:
            p.append(f"{key}.min_visibility={self.min_visibility}: must be in [0, 1]")
        return p


@dataclass(frozen=True)
class HumanLabelsConfig:
    """``data.human_labels``: people's pairs of a labeled rollout log (``rlfh label``) mixed into every round.

    Attributes:
        log: the labeled rollout log (its labels.jsonl); null = off. Its latents must have the run's shape.
    """

    log: Optional[str] = None
    pairs_per_round: int = 0  # a seeded draw of this many labeled pairs each round; 0: all of them

    def problems(self, key: str) -> list[str]:
        return at_least(f"{key}.pairs_per_round", self.pairs_per_round, 0, " (0: every labeled pair)")


@dataclass(frozen=True)
class FinetuneDataConfig:
    """``data.finetune``: FairHuman's supervised fine-tuning on real images (``rlfh finetune CONFIG data=DIR``,
    rlfh/recipes/finetune.py).

    Attributes:
        images: a folder of ``metadata.jsonl`` ({"file_name", "text"}, optional "regions" boxes) and its images.
    """

    images: Optional[str] = None
    latent_mode: Literal["sample", "mean"] = "sample"  # VAE posterior sample (diffusers' training) or its mean
    encode_batch_size: int = 8  # images per VAE and detector call

    def problems(self, key: str) -> list[str]:
        return at_least(f"{key}.encode_batch_size", self.encode_batch_size, 1)


@dataclass(frozen=True)
class DataConfig:
    """``data``: per-round data sources besides the rollouts' samples."""

    hgdpo: HGDPOConfig = field(default_factory=HGDPOConfig)  # real images as winners, on a curriculum
    region_pairs: RegionPairsConfig = field(default_factory=RegionPairsConfig)  # FaceScore's inpainted-region pairs
    hcp_priors: HcPPriorsConfig = field(default_factory=HcPPriorsConfig)  # pose priors for model.hcp
    human_labels: HumanLabelsConfig = field(default_factory=HumanLabelsConfig)  # people's pairs (rlfh label)
    finetune: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)  # real images of `rlfh finetune`


@dataclass(frozen=True)
class ResourcesConfig:
    """``resources``: the Ray cluster, the actors and the learner ranks.

    Attributes:
        rollout_actor_resources: custom Ray resources each rollout actor asks for, to pin it to nodes started
            with e.g. `ray start --resources='{"rollout": 8}'`; {} lets Ray place it on any node.
    """

    ray_address: Optional[str] = None  # null: $RAY_ADDRESS (ray job submit sets it), else a private local cluster
    num_rollout_actors: int = 1  # Ray rollout actors (one per GPU on a GPU cluster)
    gpus_per_rollout_actor: float = 0.0  # GPUs per rollout actor (0 on CPU)
    num_learner_gpus: int = 0  # learner GPUs, one data-parallel DeepSpeed rank each; 0 = learner on CPU
    num_learner_ranks: Optional[int] = None  # data-parallel learner ranks; None = num_learner_gpus (or 1 on CPU)
    colocate: bool = False  # one device for rollout and learner: the learner samples with its own UNet
    sync_bucket_mb: float = 128.0  # full-weight sync to the rollout actors in buckets of at most this size
    gpus_per_reward_actor: float = 0.0  # GPU share Ray reserves for the reward actor; 0 with cuda shares the GPU
    num_cpus_per_actor: float = 1.0  # Ray CPUs reserved per actor
    max_actor_restarts: int = 3  # a dead rollout/reward actor is restarted and its work re-issued this often
    max_learner_restarts: int = 2  # a dead learner rank: restart the group from the last checkpoint this often a run
    placement: Literal["none", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "none"  # actors' placement group
    rollout_actor_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of each learner rank
    reward_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of the reward actor

    @property
    def learner_world_size(self) -> int:
        return self.num_learner_ranks if self.num_learner_ranks is not None else max(self.num_learner_gpus, 1)

    def problems(self, key: str) -> list[str]:
        p = at_least(f"{key}.num_rollout_actors", self.num_rollout_actors, 1)
        if self.num_learner_ranks is not None:
            if self.num_learner_ranks < 1:
                p.append(f"{key}.num_learner_ranks={self.num_learner_ranks}: must be >= 1")
            elif self.num_learner_gpus and self.num_learner_ranks != self.num_learner_gpus:
                p.append(
                    f"{key}.num_learner_ranks={self.num_learner_ranks} with num_learner_gpus="
                    f"{self.num_learner_gpus}: the learner runs one rank per GPU; leave num_learner_ranks unset"
                )
        if self.sync_bucket_mb <= 0:
            p.append(f"{key}.sync_bucket_mb={self.sync_bucket_mb}: must be > 0")
        if self.colocate:
            if self.num_rollout_actors != 1 or self.learner_world_size != 1:
                p.append(
                    f"{key}.colocate=true runs rollout and learner in one process on one device: set "
                    f"{key}.num_rollout_actors=1 and one learner rank (got {self.num_rollout_actors} and "
                    f"{self.learner_world_size})"
                )
            if self.placement != "none":
                p.append(f"{key}.colocate=true has no rollout fleet to place: set {key}.placement=none")
        for name in (
            "gpus_per_rollout_actor",
            "gpus_per_reward_actor",
            "num_cpus_per_actor",
            "num_learner_gpus",
            "max_actor_restarts",
            "max_learner_restarts",
        ):
            if getattr(self, name) < 0:
                p.append(f"{key}.{name}={getattr(self, name)}: must be >= 0")
        for name in ("rollout_actor_resources", "learner_resources", "reward_resources"):
            for res, amount in getattr(self, name).items():
                if res in ("CPU", "GPU", "memory", "object_store_memory"):
                    p.append(
                        f"{key}.{name}.{res}: Ray sets this through num_cpus/num_gpus; use "
                        f"{key}.num_cpus_per_actor / gpus_per_rollout_actor / num_learner_gpus instead"
                    )
                elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                    p.append(
                        f"{key}.{name}.{res}={amount!r}: must be a number > 0 (the amount of the custom "
                        f"resource `{res}` one actor takes, e.g. 1)"
                    )
        return p


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = True  # log to Weights & Biases (RUN_DIR/wandb)
    wandb_mode: Optional[Literal["offline", "online", "disabled"]] = None  # null: follow $WANDB_MODE (default offline)
    wandb_project: str = "rlfh"  # wandb project name
    checkpoint_every: int = 5  # rounds; the last round always checkpoints
    sample_grid_every: int = 0  # rounds between sample grids in RUN_DIR/samples/ (and wandb); 0 = never
    log_images: Literal["png", "jpeg", "none"] = "png"  # each rollout record's image; latents are always kept
    keep_image_rounds: Optional[int] = None  # keep images of the last N rounds only (older keep latents); null: all
    progress: bool = True  # show progress bars

    def problems(self, key: str) -> list[str]:
        p: list[str] = []
        if self.checkpoint_every < 1:
            # `round % 0` fails after the first round, before any checkpoint exists
            p.append(
                f"{key}.checkpoint_every={self.checkpoint_every}: must be >= 1 (rounds between checkpoints; "
                f"the last round always checkpoints, so a large value saves only at the end)"
            )
        if self.sample_grid_every < 0:
            p.append(f"{key}.sample_grid_every={self.sample_grid_every}: must be >= 0 (0 = never)")
        if self.keep_image_rounds is not None and self.keep_image_rounds < 1:
            p.append(
                f"{key}.keep_image_rounds={self.keep_image_rounds}: must be >= 1 (rounds whose images stay), "
                f"or {key}.log_images=none to keep no images"
            )
        return p


@dataclass(frozen=True)
class GuardsConfig:
    """``guards``: reward-hacking guards.

    Attributes:
        max_face_identity_sim: stop when the held-out faces' mean pairwise embedding cosine
            (collapse/face_identity_sim) exceeds this.
        max_region_reward_gap: {region: gap}: stop when a region's training reward exceeds its held-out reward
            by more than the gap (``heldout/reward_gap/<region>``: the combined reward of that region's rewards,
            face / hand / global, on this round's samples minus on the held-out ones).
    """

    every: int = 0  # rounds between held-out evaluations; 0 = off
    heldout_prompts: list[str] = field(default_factory=list)  # prompts never trained on
    heldout_rewards: list[RewardEntry] = field(default_factory=list)  # scored on held-out samples ([] = training's)
    seeds_per_prompt: int = 2  # fixed seeds per held-out prompt, the same every evaluation
    max_heldout_drop: Optional[float] = None  # stop when the held-out combined reward falls this far below its first
    max_reference_mse: Optional[float] = None  # stop when mean (eps_theta - eps_ref)^2 on training pairs exceeds this
    max_face_identity_sim: Optional[float] = None
    max_region_reward_gap: dict[str, float] = field(default_factory=dict)

    def problems(self, key: str) -> list[str]:
        p: list[str] = []
        for region, gap in self.max_region_reward_gap.items():
            p += positive(f"{key}.max_region_reward_gap.{region}", gap)
        if self.max_region_reward_gap and not self.every:
            p.append(f"{key}.max_region_reward_gap needs {key}.every > 0 (held-out evaluations to compare with)")
        if self.every < 0 or self.seeds_per_prompt < 1:
            p.append(f"{key}.every={self.every} must be >= 0 and {key}.seeds_per_prompt={self.seeds_per_prompt} >= 1")
        if self.every and not self.heldout_prompts:
            p.append(f"{key}.every > 0 needs {key}.heldout_prompts (prompts the run never trains on)")
        if self.max_heldout_drop is not None and not self.every:
            p.append(f"{key}.max_heldout_drop needs {key}.every > 0 (held-out evaluations to compare)")
        return p


@dataclass(frozen=True)
class RewardTrainingConfig:
    """``rlfh train-reward``: fine-tune an ImageReward-architecture scorer on region pairs (FaceScore).

    Attributes:
        pairs: rollout log whose groups hold the (win, loss) images (`rlfh train-reward CONFIG pairs=DIR`).
        init: scorer to start from: a directory (or hub id) with FS_model.pt or ImageReward.pt + med_config.json
            (`init=DIR`).
        winner: original (FaceScore's rule: in each logged region pair the original wins and its inpainted copy
            loses, no score read) or reward (the winner of each group by `score`).
        score: with winner=reward, what picks each group's winner: combined (the `rewards:` weights, like
            offline-dpo) or a logged reward's name.
        freeze_fraction: leading share of the ViT blocks and of the text encoder layers kept frozen (FaceScore: 70%).
        heldout_fraction: share of the pairs held out to measure ranking accuracy before training and after each
            epoch.
        vision_heads: ViT attention heads of `init` (not stored in the weights); null: width / 64, 16 for ViT-L.
    """

    pairs: Optional[str] = None
    init: Optional[str] = None
    init_weights_name: Optional[str] = None  # weights file in `init`; null: FS_model.pt if present, else ImageReward.pt
    region: str = "face"  # the logged region whose box is cropped (`region=hand`)
    prompt: Optional[str] = None  # the scorer's fixed text; null: "A face." / "A hand." for region face / hand
    winner: Literal["original", "reward"] = "original"
    score: str = "combined"
    freeze_fraction: float = 0.7
    lr: float = 1e-5  # AdamW learning rate (FaceScore: 1e-5)
    weight_decay: float = 0.0  # AdamW weight decay (0: Adam, as ImageReward trains)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas [beta1, beta2]
    epochs: int = 1  # passes over the training pairs
    batch_size: int = 8  # pairs per optimizer step
    heldout_fraction: float = 0.2
    vision_heads: Optional[int] = None
    tokenizer_dir: Optional[str] = None  # local bert-base-uncased tokenizer; null: the vocab shipped with rlfh
    device: str = "auto"  # torch device; auto: cuda when available, else cpu

    def problems(self, key: str) -> list[str]:
        from rewards.base import REGION_PROMPTS

        p = fraction(f"{key}.freeze_fraction", self.freeze_fraction, open_low=False)
        p = [q + " (the leading share of the encoder layers kept frozen; FaceScore: 0.7)" for q in p]
        if self.lr <= 0:
            p.append(f"{key}.lr={self.lr}: must be > 0 (FaceScore: 1e-5)")
        if self.weight_decay < 0:
            p.append(f"{key}.weight_decay={self.weight_decay}: must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            p.append(f"{key}.adam_betas={self.adam_betas}: give two values in [0, 1), e.g. [0.9, 0.999]")
        p += at_least(f"{key}.epochs", self.epochs, 1) + at_least(f"{key}.batch_size", self.batch_size, 1)
        if not 0.0 <= self.heldout_fraction < 1.0:
            p.append(f"{key}.heldout_fraction={self.heldout_fraction}: must be in [0, 1) (0: no held-out accuracy)")
        if not self.region or self.region == "global":
            p.append(f"{key}.region={self.region!r}: name a logged region whose box is cropped, e.g. face or hand")
        elif self.prompt is None and self.region not in REGION_PROMPTS:
            p.append(
                f"{key}.region={self.region!r} has no default prompt (known: {REGION_PROMPTS}); "
                f"set {key}.prompt, e.g. \"A {self.region}.\""
            )
        if self.prompt is not None and not self.prompt.strip():
            p.append(
                f"{key}.prompt is empty: give the scorer's fixed text, e.g. \"A hand.\", or null for the "
                f"region's default"
            )
        if not self.score:
            p.append(f"{key}.score is empty: use combined or the name of a logged reward")
        if self.vision_heads is not None and self.vision_heads < 1:
            p.append(f"{key}.vision_heads={self.vision_heads}: must be >= 1 (or null: width / 64)")
        return p


@dataclass(frozen=True)
class Config:
    """A run. ``reward_server`` is :class:`rewards.wire.ServerConfig` (``rlfh serve-rewards``).

    Attributes:
        rewards_normalization: how rewards combine into the score trained on: weighted_sum of raw values, or
            gdpo (each reward z-scored per prompt group, weighted, summed, normalized over the round).
    """

    run_dir: str = "runs/tiny"
    seed: int = 0
    num_rounds: int = 10
    rollouts: Optional[str] = None  # a rollout log to train from (rlfh offline-dpo)
    labels: Literal["rewards", "human"] = "rewards"  # pairs from the rewards, or from people's labels (rlfh label)
    resume: bool = True  # continue from run_dir's last checkpoint if there is one
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardEntry] = field(default_factory=lambda: [RewardEntry("jpeg_compressibility")])
    rewards_normalization: Literal["weighted_sum", "gdpo"] = "weighted_sum"
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: DataConfig = field(default_factory=DataConfig)  # per-round data sources besides the rollouts
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reward_server: ServerConfig = field(default_factory=ServerConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)  # reward-hacking guards: held-out reward, reference MSE
    gardo: GardoConfig = field(default_factory=GardoConfig)  # hacking prevented in the objective (rlfh/losses/gardo.py)
    reward_training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)  # rlfh train-reward

    @property
    def learner_world_size(self) -> int:
        return self.resources.learner_world_size

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.learner.train_batch_size // (self.learner.micro_batch_size_per_gpu * self.learner_world_size)

    def problems(self, key: str) -> list[str]:
        p = at_least("num_rounds", self.num_rounds, 1)
        if not self.rewards:
            p.append("rewards: give at least one reward (e.g. `- target: jpeg_compressibility`)")
        return p


# --------------------------------------------------------------------------------------------
# Keys that moved when the config was grouped by role (old dotted key -> new one). A config that
# still uses one is refused with the new key named; nothing is migrated silently.
# --------------------------------------------------------------------------------------------

MOVED_KEYS: dict[str, str] = {
    # per-loss knobs -> the family's own section (rlfh/losses/registry.py)
    "learner.beta": "learner.dpo.beta",
    "learner.pair_strategy": "learner.dpo.pair_strategy",
    "learner.guidance_coef": "learner.dpo.guidance.coef",
    "learner.guidance_region": "learner.dpo.guidance.region",
    "learner.ddpo_clip_range": "learner.ddpo.clip_range",
    "learner.ddpo_timestep_fraction": "learner.ddpo.timestep_fraction",
    "learner.ddpo_window": "learner.ddpo.window",
    "learner.ddpo_window_max_start": "learner.ddpo.window_max_start",
    "learner.ddpo_branch": "learner.ddpo.branch",
    "learner.trust_region": "learner.ddpo.trust_region",
    "learner.trust_region_kl": "learner.ddpo.trust_region_kl",
    "learner.nft_beta": "learner.nft.beta",
    "learner.nft_weighting": "learner.nft.weighting",
    "learner.nft_adv_clip": "learner.nft.adv_clip",
    "learner.awm_clip_range": "learner.awm.clip_range",
    "learner.rwr_beta": "learner.rwr.beta",
    "learner.filter_threshold": "learner.filtered.threshold",
    "learner.filter_top_fraction": "learner.filtered.top_fraction",
    # what every loss shares, grouped
    "learner.regions": "learner.regions.names",  # a list: the old key; a mapping: the new section
    "learner.region_scale": "learner.regions.scale",
    "learner.fairness": "learner.regions.fairness",
    "learner.reference": "learner.reference.model",  # a string: the old key; a mapping: the new section
    "learner.reference_refresh_rounds": "learner.reference.refresh_rounds",
    "learner.kl_coef": "learner.reference.kl_coef",
    "learner.ema_decay": "learner.ema.decay",
    "learner.sampling_policy": "learner.ema.sampling_policy",
    "learner.cfg_distill": "learner.guidance_free.scale",
    "learner.cfg_distill_coef": "learner.guidance_free.coef",
    "learner.zero_stage": "learner.engine.zero_stage",
    "learner.offload_optimizer": "learner.engine.offload_optimizer",
    "learner.offload_params": "learner.engine.offload_params",
    "learner.gradient_checkpointing": "learner.engine.gradient_checkpointing",
    "learner.optimizer_impl": "learner.engine.optimizer_impl",
    "learner.compile": "learner.engine.compile",
    # model parts -> model; per-round data sources -> data
    "learner.lora": "model.lora",
    "learner.hcp.prior": "data.hcp_priors.prior",
    "learner.hcp.sigma": "data.hcp_priors.sigma",
    "learner.hcp.min_visibility": "data.hcp_priors.min_visibility",
    "learner.hcp": "model.hcp",
    "learner.hgdpo": "data.hgdpo",
    "learner.region_pairs": "data.region_pairs",
}

# old keys whose name is now a section: the old key only when given a plain value
_NOW_SECTIONS = ("learner.regions", "learner.reference")


def moved_key_problems(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` without the keys of :data:`MOVED_KEYS` it still uses, and one problem per such key
    naming its new place (deeper keys first: ``learner.hcp.prior`` before the rest of ``learner.hcp``)."""
    data = copy.deepcopy(data)
    problems: list[str] = []
    for old in sorted(MOVED_KEYS, key=lambda k: -k.count(".")):
        *parents, name = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        if old in _NOW_SECTIONS and isinstance(node[name], dict):
            continue
        value = node.pop(name)
        if isinstance(value, dict) and not value and old == "learner.hcp":
            continue  # emptied by its moved sub-keys, each reported
        problems.append(f"{old}: moved to {MOVED_KEYS[old]}")
    return data, problems


# --------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with every problem collected
# --------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice; ``key``, ``first_line`` and ``line`` (1-based) say where."""

    def __init__(self, key: Any, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line
        super().__init__(
            f"key {key!r} is given twice (lines {first_line} and {line}); YAML would silently keep "
            f"only the last one: remove one of them"
        )


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice.

    Plain YAML loaders keep the last value, so an edited config that still holds the old line
    trains with whichever comes second, without a word.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding a key is intended
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key] + 1, key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key; the base constructor reports it
                    continue
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, lambda loader, node: loader.construct_mapping(node)
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """``value`` as the type ``tp`` of ``key``; what does not convert is appended to ``problems``
    (naming the key) and a placeholder returned, so that one pass reports every bad key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, problems)
    if origin is Literal:
        return _convert_literal(value, args, key, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}={value!r}: must be a mapping with keys {[f.name for f in dataclasses.fields(tp)]}")
            return tp() if _all_defaults(tp) else None
        return _build(tp, value, key + ".", problems)
    if origin is list:
        return _convert_list(value, args[0], key, problems)
    if origin is dict:
        return _convert_dict(value, args, key, problems)
    if tp is Any:
        return value
    return _convert_scalar(value, tp, key, problems)


def _convert_literal(value: Any, choices: tuple[Any, ...], key: str, problems: list[str]) -> Any:
    if value in choices and type(value) is type(choices[0]):
        return value
    if (
        isinstance(value, str)
        and all(isinstance(a, int) for a in choices)
        and value.lstrip("-").isdigit()
        and int(value) in choices
    ):
        return int(value)
    problems.append(f"{key}={value!r}: must be one of {list(choices)}")
    return choices[0]


def _convert_list(value: Any, item_tp: Any, key: str, problems: list[str]) -> Any:
    if isinstance(value, dict) and value and all(_is_index(k) for k in value):
        # `rewards.0.weight=2` with no list underneath to index (the defaults, or the file sets none)
        problems.append(
            f"{key}: the config has no list here whose entries `{key}.N.key=value` could override; "
            f"set the whole list, e.g. {key}=[...]"
        )
        return None
    if not isinstance(value, list):
        problems.append(f"{key}={value!r}: must be a list")
        return []
    items = [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    # an entry that failed to convert was reported; a list holding None would reach the rules
    return None if any(v is None for v in items) and not _optional(item_tp) else items


def _convert_dict(value: Any, args: tuple[Any, ...], key: str, problems: list[str]) -> dict:
    if not isinstance(value, dict):
        problems.append(f"{key}={value!r}: must be a mapping")
        return {}
    if args and args[1] is float:
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{key}.{k}={v!r}: must be a finite number")
    return dict(value)


_NOT_CONVERTED = object()


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return _NOT_CONVERTED


def _to_int(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return _NOT_CONVERTED


def _to_float(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return _NOT_CONVERTED


def _to_str(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _NOT_CONVERTED


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _convert_scalar(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    to = _SCALARS.get(tp)
    result = to(value) if to else _NOT_CONVERTED
    if result is _NOT_CONVERTED:
        problems.append(f"{key}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
        return None
    # NaN passes every `<= 0` rule (all comparisons are false) and then trains to NaN weights,
    # so every float key refuses it here, once, whatever its own range rule says
    if tp is float and not math.isfinite(result):
        problems.append(f"{key}={value!r}: must be a finite number")
        return None
    return result


def _all_defaults(cls: Any) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _build(cls: Any, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys here: {sorted(fields)}"
            problems.append(f"{prefix}{k}: unknown key{hint}")
            continue
        kwargs[k] = _convert(v, hints[k], prefix + k, problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required key is missing")
    if any(v is None and not _optional(hints[k]) for k, v in kwargs.items()):
        return None  # a type problem was recorded; don't build a half-valid object
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a section's own __post_init__ validation
        msg = str(e)
        problems.extend(
            ln.strip()[2:] for ln in msg.splitlines()[1:] if ln.strip().startswith("- ")
        ) if "\n" in msg else problems.append(f"{prefix.rstrip('.') or 'config'}: {msg}")
        return None


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "run_dir=/tmp/r"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected key=value (e.g. run_dir=/tmp/r)"], "command line")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError([f"override {item!r}: empty key"], "command line")
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except DuplicateKeyError as e:
            raise ConfigError([f"override {item!r}: {e}"], "command line") from None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    [f"override {item!r}: {part} is set both as a value and as a section"], "command line"
                )
        node[parts[-1]] = value
    return out


def _is_index(key: Any) -> bool:
    return (isinstance(key, int) and not isinstance(key, bool)) or (isinstance(key, str) and key.isdigit())


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``update`` over ``base``; ``{"rewards": {"0": {...}}}`` (from ``rewards.0.key=value``) edits that list entry."""
    merged = dict(base)
    for k, v in update.items():
        current = merged.get(k)
        if isinstance(v, dict) and isinstance(current, dict):
            merged[k] = _merge(current, v, f"{prefix}{k}.")
        elif isinstance(v, dict) and isinstance(current, list) and v and all(_is_index(i) for i in v):
            merged[k] = _merge_list(current, v, f"{prefix}{k}")
        else:
            merged[k] = v
    return merged


def _merge_list(items: list[Any], update: dict[str, Any], key: str) -> list[Any]:
    out = list(items)
    for i, v in update.items():
        n = int(i)
        if n >= len(out):
            raise ConfigError(
                [
                    f"{key}.{i}: the list has {len(out)} entries (indices 0..{len(out) - 1}); to add an "
                    f"entry, set the whole list, e.g. {key}=[...]"
                ],
                "command line",
            )
        out[n] = _merge(out[n], v, f"{key}.{i}.") if isinstance(v, dict) and isinstance(out[n], dict) else v
    return out


def _expand_shorthand(data: dict[str, Any]) -> dict[str, Any]:
    """``- jpeg_compressibility`` is shorthand for ``- target: jpeg_compressibility`` (rewards, held-out rewards)."""

    def expand(entries):
        return [{"target": e} if isinstance(e, str) else e for e in entries] if isinstance(entries, list) else entries

    data = dict(data, rewards=expand(data["rewards"])) if "rewards" in data else data
    guards = data.get("guards")
    if isinstance(guards, dict) and "heldout_rewards" in guards:
        data = dict(data, guards=dict(guards, heldout_rewards=expand(guards["heldout_rewards"])))
    return data


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    data, problems = moved_key_problems(_expand_shorthand(data))
    cfg = _build(Config, data, "", problems)
    if cfg is not None:
        from rlfh.config.rules import check_consistency

        problems.extend(check_consistency(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], source)
        try:
            data = _yaml_load(path.read_text())
        except DuplicateKeyError as e:
            raise ConfigError([f"{path}:{e.line}: {e}"], source) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if data is None:  # an empty file (or only comments) is a mistake, not a request for the defaults
            raise ConfigError(
                [f"config file {path} is empty (or only comments): give at least one key, e.g. copy configs/tiny.yaml"],
                source,
            )
        if not isinstance(data, dict):
            raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
        data = _expand_shorthand(data)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    if path is not None:  # a reward module saved next to the config imports without PYTHONPATH
        from rewards.registry import add_module_dirs

        add_module_dirs(_targets(data), [path.parent, Path.cwd()])
    return config_from_dict(data, source)


def _targets(data: Any) -> list[str]:
    """Every ``target:`` value in a raw config (rewards, held-out rewards, ...)."""
    if isinstance(data, dict):
        own = [data["target"]] if isinstance(data.get("target"), str) else []
        return own + [t for v in data.values() for t in _targets(v)]
    if isinstance(data, list):
        return [t for v in data for t in _targets(v)]
    return []


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config; loading it back gives an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
