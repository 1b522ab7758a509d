"""Typed, validated run configuration: YAML file + ``key=value`` overrides.

    cfg = load_config("configs/tiny.yaml", ["run_dir=/tmp/r", "learner.lr=1e-4"])

Every section is a frozen dataclass; every part of the system reads only its own section. Unknown
keys, wrong types and inconsistent batch sizes are collected into ONE :class:`ConfigError` that
names each key, its value, the rule and the fix. Derived values (gradient accumulation, samples per
round) are properties, never written back, so the saved ``config.yaml`` is exactly what ran.
"""

from __future__ import annotations

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


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` lists them, the message shows them all."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    path: str = "rlfh:tiny-sdxl"  # local diffusers folder, hub id, single .safetensors file, or rlfh:tiny-sdxl
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" for the published SDXL fp16 files
    vae_path: Optional[str] = None  # e.g. madebyollin/sdxl-vae-fp16-fix
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass(frozen=True)
class RolloutConfig:
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
    eta: float = 0.0  # DDIM eta; 1.0 makes the sampler stochastic (DDPO)
    scheduler: Literal["default", "ddim"] = "default"  # ddim: DDIMScheduler with the model's schedule (DDPO)
    max_staleness: Literal[0, 1] = 0  # 1: sample round k+1 while the learner trains on round k (async)
    compile: bool = False  # torch.compile the rollout UNet and VAE decoder (CUDA: reduce-overhead, i.e. CUDA graphs); first batches pay the compile
    merge_lora: bool = True  # sample with the policy's LoRA merged into the UNet weights (rebuilt from a base copy each sync); false: unmerged peft adapter

    @property
    def samples_per_round(self) -> int:
        return self.prompts_per_round * self.rollouts_per_prompt


@dataclass(frozen=True)
class RewardEntry:
    target: str  # registry name or module:callable
    name: Optional[str] = None
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    allow_negative_weight: bool = False  # a negative weight trains AWAY from this reward; refused unless set, so a sign typo cannot invert the objective


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True
    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass(frozen=True)
class FairnessConfig:
    rule: Literal["mpd", "sum", "equal", "mgda"] = "mpd"  # how per-region gradients combine (FairHuman: mpd)
    alpha: float = 2.0  # MPD fairness exponent; 2 = minimum potential delay
    weights: dict[str, float] = field(default_factory=dict)  # rule=sum: region -> weight (default 1)


HCP_WORDS = ["person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "baby",
             "lady", "guy", "player", "dancer", "athlete", "face", "hand", "hands", "arm", "arms", "leg", "legs", "body"]


@dataclass(frozen=True)
class HcPConfig:
    enabled: bool = False  # HcP layer (arXiv 2403.05239): a human-centric key on the UNet's cross-attention, aligned to pose priors; needs learner.lora; docs/walkthrough.md
    coef: float = 1.0  # weight of the human-centric alignment term, coef * L_hca (rlfh/losses/hcp.py)
    hidden: int = 64  # width of phi, the MLP from the text embeddings to the human-centric key K_h
    scale_weights: dict[str, float] = field(default_factory=lambda: {"2": 0.5, "4": 1.0})  # scale-aware: cross-attention layers by downsampling factor from the latent (SDXL at 1024 px: 2 = 64x64 maps, 4 = 32x32) -> weight; only weighted factors get a layer
    timesteps: list[int] = field(default_factory=lambda: [500, 999])  # step-wise: [lo, hi], the loss counts for items whose training t is in this range
    prior: Literal["samples", "real"] = "samples"  # pose priors by MediaPipe Pose on the round's samples (and HG-DPO's real winners), or on HG-DPO's real images only
    sigma: float = 0.03  # heatmap Gaussian width, as a fraction of the image's shorter side
    min_visibility: float = 0.5  # landmarks with a lower MediaPipe visibility are not drawn
    words: list[str] = field(default_factory=lambda: list(HCP_WORDS))  # human-centric tokens: the prompt's words in this list; a prompt with none uses all its words


@dataclass(frozen=True)
class HGDPOStage:
    until_round: int  # the stage covers rounds before this one
    real_winner_fraction: float  # share of the round's pairs whose winner is a real image (HG-DPO's hard stage)
    sdrecon_winner_fraction: float = 0.0  # share whose winner is SDRecon, the real image re-noised and denoised by the current policy (the normal stage); real + sdrecon <= 1, the rest generated best vs worst (easy)


@dataclass(frozen=True)
class HGDPOConfig:
    real_images: Optional[str] = None  # ImageFolder dir (metadata.jsonl + images); None disables HG-DPO
    stages: list[HGDPOStage] = field(default_factory=lambda: [HGDPOStage(1, 1.0)])  # the curriculum
    interpolate: bool = False  # HG-DPO switches stages abruptly; true ramps linearly between them
    encode_batch_size: int = 8  # images per VAE encode batch
    latent_mode: Literal["sample", "mean"] = "sample"  # latent of a real image: a seeded draw or the mean
    fresh_losers: bool = True  # sample losers for the real captions (HG-DPO); false keeps generated losers
    sdrecon_strength: float = 0.5  # SDRecon winners: img2img strength s, the real latent noised to the start of the last int(s * rollout.num_inference_steps) steps and denoised from there (0 < s <= 1; larger is further from the real image)


# FaceScore (arXiv 2406.17100) maps the face's area ratio to the noise factor in its Table 4, whose
# values we do not have: this default follows its rule (smaller regions, smaller strength) within
# its fixed settings 0.1 and 0.4. Rows [max_area_ratio, strength]: the first row whose bound is
# >= the region's share of the image gives the strength.
DEFAULT_STRENGTH_TABLE = [[0.02, 0.1], [0.05, 0.2], [0.1, 0.3], [1.0, 0.4]]


@dataclass(frozen=True)
class RegionPairsConfig:
    region: Optional[str] = None  # face / hand (in learner.regions): inpaint it to make (original, inpainted) DPO pairs trained with its mask; null = off
    fraction: float = 1.0  # online: share of a round's samples with the region that get inpainted (seeded draw)
    strength: Optional[float] = None  # inpainting noise strength; null = adaptive from the region's area ratio (strength_table); FaceScore's fixed settings: 0.1, 0.4
    strength_table: list[list[float]] = field(default_factory=lambda: [list(r) for r in DEFAULT_STRENGTH_TABLE])  # adaptive: rows [max_area_ratio, strength], bounds increasing, the last 1.0
    dilate: int = 16  # side in pixels of the square kernel the region's boxes are dilated with (FairHuman's 16)
    num_inference_steps: Optional[int] = None  # steps of the full inpainting schedule (strength s runs int(steps * s)); null = rollout.num_inference_steps
    pipeline: Optional[str] = None  # make-region-pairs: a diffusers inpainting pipeline (path or hub id) instead of the policy (model.path)
    lora: Optional[str] = None  # make-region-pairs: inpaint with this trained LoRA on model.path (a .safetensors file, checkpoint folder or run dir)


@dataclass(frozen=True)
class LearnerConfig:
    loss: Literal["dpo", "dpo_hinge", "dpo_ipo", "rwr", "filtered", "ddpo", "nft", "awm"] = "dpo"
    beta: float = 5000.0  # Diffusion-DPO beta (arXiv 2311.12908); 5000 for SDXL, 2000 for SD1.5
    regions: list[str] = field(default_factory=lambda: ["global"])  # one objective per region
    region_scale: float = 5.0  # FairHuman's s for local (masked) regions
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    rwr_beta: float = 1.0  # RWR: weights softmax(rwr_beta * r) over the round
    filter_threshold: Optional[float] = None  # filtered: keep r >= threshold; None keeps the top fraction
    filter_top_fraction: float = 0.5
    ddpo_clip_range: float = 1e-4  # DDPO: ratio clip epsilon (trust_region=clip; guard: of its normalized ratio, which moves on the scale of the step mean)
    ddpo_timestep_fraction: float = 1.0  # DDPO: share of each trajectory's recorded steps (all, or the window's) trained per epoch
    ddpo_window: Optional[int] = None  # DDPO: W consecutive steps sampled with eta > 0 and trained; eta = 0 elsewhere; null = all
    ddpo_window_max_start: Optional[int] = None  # DDPO: window start drawn per round in 0..this; null = steps - W
    ddpo_branch: bool = False  # DDPO with ddpo_window: a prompt group shares x_T and the deterministic steps before the window, sampled once; its samples branch at the window
    trust_region: Literal["clip", "dppo", "guard"] = "clip"  # DDPO: clip (PPO ratio clip), dppo (Flow-DPPO's KL mask), guard (GRPO-Guard's normalized ratio); docs/online_rl.md
    trust_region_kl: float = 1e-5  # trust_region=dppo: mask steps moving with their advantage whose KL to the sampling policy (mean over latent elements, x space) reaches this; 1e-5 is Flow-DPPO's reference for lr 3e-4 (KL grows as lr^2)
    nft_beta: float = 0.1  # DiffusionNFT (arXiv 2509.16117): strength beta of the implicit positive / negative policies (the reference: 1, and 0.1 for OCR)
    nft_weighting: Literal["adaptive", "eps_mse"] = "eps_mse"  # DiffusionNFT per-sample error: SDXL's plain eps-MSE, or the reference's adaptive x0-space weighting (learns less on the tiny default; docs/online_rl.md)
    nft_adv_clip: float = 5.0  # DiffusionNFT: r = 0.5 + 0.5 clip(A, -c, c) / c from the per-prompt advantage A
    awm_clip_range: float = 0.2  # AWM (arXiv 2509.25050): PPO clip of the ratio exp(old error - error)
    kl_coef: float = 0.0  # KL to learner.reference as a loss term, kl_coef * mean (eps_theta - eps_ref)^2 (docs/online_rl.md); ddpo: the exact KL of each trained DDIM step, w_t times that mean of the guided eps on its input
    reference: Literal["base", "ema"] = "base"  # DPO's reference and the KL target: the base model, or the EMA of the policy (needs learner.ema_decay)
    reference_refresh_rounds: int = 1  # reference=ema: the reference is the EMA as it was at the start of every this many rounds
    sampling_policy: Literal["trained", "ema"] = "trained"  # what the rollout actors sample with: the trained weights, or their EMA (learner.ema_decay; DiffusionNFT's off-policy sampler; LoRA only)
    cfg_distill: Optional[float] = None  # CFG-free training: the guidance scale w of the reference's guided eps, the teacher of a term added to the loss (needs rollout.guidance_scale=1); null = off
    cfg_distill_coef: float = 1.0  # weight of the CFG-distillation term, coef * mean (eps_theta(x_t, c) - eps_teacher)^2
    guidance_coef: float = 0.0  # DPO losses: weight of the guidance term pushing the loser's denoising toward the winner inside learner.guidance_region (FaceScore, our reading: rlfh/losses/guidance.py); 0 = off
    guidance_region: str = "face"  # the region mask m of the guidance term, taken from the loser's detections (face, hand, ...), or global (the whole latent)
    hgdpo: HGDPOConfig = field(default_factory=HGDPOConfig)  # real images as winners, on a curriculum
    region_pairs: RegionPairsConfig = field(default_factory=RegionPairsConfig)  # FaceScore's inpainted-region pairs (rlfh/data/region_pairs.py)
    hcp: HcPConfig = field(default_factory=HcPConfig)  # the HcP layer's human-centric alignment loss
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    train_batch_size: int = 2  # pairs per optimizer step, over all learner ranks
    micro_batch_size_per_gpu: int = 1
    epochs_per_round: int = 1  # passes over a round's pairs
    pair_strategy: Literal["best_worst", "all"] = "best_worst"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on CPU (DeepSpeedCPUAdam; zero_stage >= 1)
    offload_params: bool = False  # ZeRO-3 parameter offload to CPU
    ema_decay: Optional[float] = None  # keep an EMA of the trainable weights (e.g. 0.999); saved in checkpoints
    gradient_checkpointing: bool = False
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"  # AdamW kernel; auto: fused where torch has it for the device, else foreach
    compile: bool = False  # torch.compile the learner's UNet (policy and reference); first steps pay the compile
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class ResourcesConfig:
    ray_address: Optional[str] = None  # None/"auto": join a running cluster if any, else start one locally
    num_rollout_actors: int = 1
    gpus_per_rollout_actor: float = 0.0
    num_learner_gpus: int = 0  # learner GPUs, one data-parallel DeepSpeed rank each; 0 = learner on CPU
    num_learner_ranks: Optional[int] = None  # data-parallel learner ranks; None = num_learner_gpus (or 1 on CPU)
    colocate: bool = False  # one device for rollout and learner: the learner samples with its own UNet
    sync_bucket_mb: float = 128.0  # full-weight sync goes to rollout actors in buckets of at most this size (bench/sync_bench.py)
    gpus_per_reward_actor: float = 0.0  # GPU share of the reward actor (FaceScore, ImageReward on GPU)
    num_cpus_per_actor: float = 1.0
    max_actor_restarts: int = 3  # a dead rollout/reward actor is restarted and its work re-issued this often
    max_learner_restarts: int = 2  # a dead learner rank: the group restarts from the last checkpoint, replaying the rounds since, this often per run
    placement: Literal["none", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "none"  # rollout actors in a placement group
    # Custom Ray resources each role asks for, to pin it to nodes started with e.g.
    # `ray start --resources='{"rollout": 8}'`; {} lets Ray place it on any node.
    rollout_actor_resources: dict[str, float] = field(default_factory=dict)  # per rollout actor
    learner_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of each learner rank
    reward_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of the reward actor


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rlfh"
    checkpoint_every: int = 5  # rounds; the last round always checkpoints
    sample_grid_every: int = 0  # rounds between sample grids in RUN_DIR/samples/ (and wandb); 0 = never
    progress: bool = True


@dataclass(frozen=True)
class GuardsConfig:
    every: int = 0  # rounds between held-out evaluations; 0 = off
    heldout_prompts: list[str] = field(default_factory=list)  # prompts never trained on
    heldout_rewards: list[RewardEntry] = field(default_factory=list)  # scored on held-out samples ([] = the training rewards)
    seeds_per_prompt: int = 2  # fixed seeds per held-out prompt, the same every evaluation
    max_heldout_drop: Optional[float] = None  # stop when the held-out combined reward falls this far below its first value
    max_reference_mse: Optional[float] = None  # stop when mean (eps_theta - eps_ref)^2 on training pairs exceeds this
    max_face_identity_sim: Optional[float] = None  # stop when the held-out faces' mean pairwise embedding cosine (collapse/face_identity_sim) exceeds this


@dataclass(frozen=True)
class RewardTrainingConfig:
    """``rlfh train-reward``: fine-tune an ImageReward-architecture scorer on region pairs (FaceScore)."""

    pairs: Optional[str] = None  # rollout log whose groups hold the (win, loss) images (`rlfh train-reward CONFIG pairs=DIR`)
    init: Optional[str] = None  # scorer to start from: a directory (or hub id) with FS_model.pt or ImageReward.pt + med_config.json (`init=DIR`)
    init_weights_name: Optional[str] = None  # weights file in `init`; null: FS_model.pt if present, else ImageReward.pt
    region: str = "face"  # the logged region whose box is cropped (`region=hand`)
    prompt: Optional[str] = None  # the scorer's fixed text; null: "A face." / "A hand." for region face / hand
    score: str = "combined"  # what picks each group's winner: combined (the `rewards:` weights, like offline-dpo) or a logged reward's name
    freeze_fraction: float = 0.7  # leading share of the ViT blocks and of the text encoder layers kept frozen (FaceScore: 70%)
    lr: float = 1e-5  # AdamW learning rate (FaceScore: 1e-5)
    weight_decay: float = 0.0  # AdamW weight decay (0: Adam, as ImageReward trains)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas [beta1, beta2]
    epochs: int = 1  # passes over the training pairs
    batch_size: int = 8  # pairs per optimizer step
    heldout_fraction: float = 0.2  # share of the pairs held out to measure ranking accuracy before training and after each epoch
    vision_heads: Optional[int] = None  # ViT attention heads of `init` (not stored in the weights); null: width / 64, 16 for ViT-L
    tokenizer_dir: Optional[str] = None  # local bert-base-uncased tokenizer; null: the vocab shipped with rlfh
    device: str = "auto"  # torch device; auto: cuda when available, else cpu


@dataclass(frozen=True)
class Config:
    """A run. ``reward_server`` is :class:`rewards.wire.ServerConfig` (``rlfh serve-rewards``)."""

    run_dir: str = "runs/tiny"
    seed: int = 0
    num_rounds: int = 10
    rollouts: Optional[str] = None  # a rollout log to train from (rlfh offline-dpo)
    resume: bool = True  # continue from run_dir's last checkpoint if there is one
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardEntry] = field(default_factory=lambda: [RewardEntry("jpeg_compressibility")])
    rewards_normalization: Literal["weighted_sum", "gdpo"] = "weighted_sum"  # how rewards combine into the score trained on: weighted_sum of raw values, or gdpo (each reward z-scored per prompt group, weighted, summed, normalized over the round)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reward_server: ServerConfig = field(default_factory=ServerConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)  # reward-hacking guards: held-out reward, reference distance
    reward_training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)  # rlfh train-reward: a region scorer from (win, loss) pairs

    @property
    def learner_world_size(self) -> int:
        res = self.resources
        return res.num_learner_ranks if res.num_learner_ranks is not None else max(res.num_learner_gpus, 1)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.learner.train_batch_size // (self.learner.micro_batch_size_per_gpu * self.learner_world_size)


# --------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with every problem collected
# --------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice; ``key``, ``first_line`` and ``line`` (1-based) say where."""

    def __init__(self, key: Any, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line
        super().__init__(f"key {key!r} is given twice (lines {first_line} and {line}); YAML would silently keep "
                         f"only the last one: remove one of them")


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


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                             lambda loader, node: loader.construct_mapping(node))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, problems)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        if isinstance(value, str) and all(isinstance(a, int) for a in args) and value.lstrip("-").isdigit() and int(value) in args:
            return int(value)
        problems.append(f"{key}={value!r}: must be one of {list(args)}")
        return args[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}={value!r}: must be a mapping with keys {[f.name for f in dataclasses.fields(tp)]}")
            return tp() if _all_defaults(tp) else None
        return _build(tp, value, key + ".", problems)
    if origin is list:
        if isinstance(value, dict) and value and all(_is_index(k) for k in value):
            # `rewards.0.weight=2` with no list underneath to index (the defaults, or the file sets none)
            problems.append(f"{key}: the config has no list here whose entries `{key}.N.key=value` could override; "
                            f"set the whole list, e.g. {key}=[...]")
            return None
        if not isinstance(value, list):
            problems.append(f"{key}={value!r}: must be a list")
            return []
        items = [_convert(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
        # an entry that failed to convert was reported; a list holding None would reach the rules
        return None if any(v is None for v in items) and not _optional(args[0]) else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}={value!r}: must be a mapping")
            return {}
        if args and args[1] is float:
            for k, v in value.items():
                if isinstance(v, float) and not math.isfinite(v):
                    problems.append(f"{key}.{k}={v!r}: must be a finite number")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # NaN passes every `<= 0` rule (all comparisons are false) and then trains to NaN weights,
            # so every float key refuses it here, once, whatever its own range rule says
            if not math.isfinite(number):
                problems.append(f"{key}={value!r}: must be a finite number")
                return None
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{key}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    return None


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
        problems.extend(ln.strip()[2:] for ln in msg.splitlines()[1:] if ln.strip().startswith("- ")) if "\n" in msg \
            else problems.append(f"{prefix.rstrip('.') or 'config'}: {msg}")
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
                raise ConfigError([f"override {item!r}: {part} is set both as a value and as a section"], "command line")
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
            raise ConfigError([f"{key}.{i}: the list has {len(out)} entries (indices 0..{len(out) - 1}); to add an "
                               f"entry, set the whole list, e.g. {key}=[...]"], "command line")
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
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    data = _expand_shorthand(data)
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
            raise ConfigError([f"config file {path} is empty (or only comments): give at least one key, "
                               f"e.g. copy configs/tiny.yaml"], source)
        if not isinstance(data, dict):
            raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
        data = _expand_shorthand(data)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    return config_from_dict(data, source)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config; loading it back gives an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
