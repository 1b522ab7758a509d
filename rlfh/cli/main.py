"""The ``rlfh`` command line.

rlfh train CONFIG [key=value ...]            online preference training (Ray)
rlfh offline-dpo CONFIG rollouts=DIR [...]   DPO from a logged rollout log
rlfh train-reward CONFIG pairs=DIR init=DIR  fine-tune a FaceScore-style region scorer on logged pairs
rlfh finetune CONFIG data=DIR [...]          FairHuman's supervised fine-tuning on real images
rlfh make-tiny-model DIR [--family F]        write a seeded tiny model of a family (sdxl, sd15, sd3, flux)
rlfh make-region-pairs CONFIG IMAGE_DIR [...] inpainted face / hand pairs of a folder, as a rollout log
rlfh rollouts inspect DIR                    verify and summarise a rollout log
rlfh config CONFIG [key=value ...]           print the effective config (validated)
rlfh score CONFIG IMAGE... [key=value ...]   score image files, one JSON object per image
rlfh serve-rewards CONFIG [--port 8000]      the reward server (Ray Serve, HTTP on 127.0.0.1)
rlfh eval CONFIG --model M [--lora DIR]      sample a seeded prompt set, score, report (HTML)
rlfh eval-rewards CONFIG LABELS_FILE         each reward's accuracy / Pearson r against human labels
rlfh compare RUN_A RUN_B / rlfh plot RUN     reward and loss curves from metrics.jsonl
rlfh status RUN_DIR [--json]                 a run's state, progress, rewards and timings
rlfh export RUN_DIR|CKPT --format F [--out]  the LoRA for diffusers / kohya (ComfyUI, A1111) / peft, + model card
rlfh label ROLLOUT_DIR [--mode M]            label a rollout log's images in the browser
rlfh eval-human PAIRS_DIR                    win/tie/lose rates of a human evaluation
"""

from __future__ import annotations

import argparse
import json
import sys


def _load(args):
    from rlfh.config.schema import load_config

    return load_config(args.config, args.overrides)


def resume_command(args, resumes: bool) -> str:
    """The command that resumes this run: the same one, with ``resume=true`` unless its config resumes already."""
    import shlex

    overrides = [o for o in args.overrides if o.split("=", 1)[0].strip() != "resume"]
    return shlex.join(
        [
            "rlfh",
            args.command,
            args.config,
            *(args.overrides if resumes else overrides),
            *([] if resumes else ["resume=true"]),
        ]
    )


def run_training(args, train):
    """``train(config)``; a learner lost for good is one line on stderr with the command that resumes, exit 1."""
    from rlfh.recipes.rounds import LearnerLost

    cfg = _load(args)
    try:
        return train(cfg)
    except LearnerLost as e:
        print(f"rlfh: error: {e}; resume with: {resume_command(args, cfg.resume)}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_train(args) -> int:
    from rlfh.recipes.online import train

    run_dir = run_training(args, train)
    print(f"[rlfh] run finished: {run_dir}")
    return 0


def cmd_offline(args) -> int:
    from rlfh.recipes.offline import train_offline

    run_dir = run_training(args, train_offline)
    print(f"[rlfh] offline DPO finished: {run_dir}")
    return 0


def cmd_make_region_pairs(args) -> int:
    from rlfh.recipes.region_pairs import make_region_pairs

    log_dir, counts = make_region_pairs(_load(args), args.image_dir)
    print(
        f"[rlfh] region pairs: {int(counts['with_region'])} of {int(counts['images'])} images had the region; "
        f"{int(counts['pairs'])} pairs, the inpainted image won {int(counts['inpainted_won'])}, "
        f"{int(counts['ties_or_unscored'])} ties or unscored; rollout log: {log_dir}"
    )
    return 0


# `rlfh train-reward` shorthands for the keys of the reward_training section
TRAIN_REWARD_SHORTHANDS = ("pairs", "init", "region")


def train_reward_overrides(overrides: list[str]) -> list[str]:
    """``pairs=DIR`` -> ``reward_training.pairs=DIR`` (likewise ``init=``, ``region=``); others unchanged."""
    return [f"reward_training.{o}" if o.split("=", 1)[0] in TRAIN_REWARD_SHORTHANDS else o for o in overrides]


def cmd_train_reward(args) -> int:
    from rlfh.config.schema import load_config
    from rlfh.recipes.train_reward import train_reward

    run_dir = train_reward(load_config(args.config, train_reward_overrides(args.overrides)))
    print(f"[rlfh] scorer written: {run_dir} (FS_model.pt + med_config.json; use it as options: {{model: {run_dir}}})")
    return 0


def finetune_overrides(overrides: list[str]) -> list[str]:
    """``data=DIR`` -> ``data.finetune.images=DIR`` (`rlfh finetune`'s one input); others unchanged."""
    return [f"data.finetune.images={o.split('=', 1)[1]}" if o.startswith("data=") else o for o in overrides]


def cmd_finetune(args) -> int:
    from rlfh.recipes.finetune import finetune

    # ``data=DIR`` -> ``data.finetune.images=DIR``: the command's one input
    args.overrides = [
        f"data.finetune.images={o.split('=', 1)[1]}" if o.startswith("data=") else o for o in args.overrides
    ]
    run_dir = run_training(args, finetune)
    print(f"[rlfh] fine-tuning finished: {run_dir}")
    return 0


def cmd_config(args) -> int:
    import yaml

    from rlfh.config.schema import to_dict

    print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
    return 0


def cmd_make_tiny(args) -> int:
    from families import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed, pretrain_steps=args.pretrain_steps, family=args.family)
    print(f"[rlfh] tiny {args.family} pipeline written to {path}")
    return 0


def cmd_rollouts_inspect(args) -> int:
    from rollouts.log import RolloutLog

    summary = RolloutLog(args.dir).summary()
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlfh", description="RL from reward for text-to-image diffusion models")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, fn, help_: str):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config (e.g. configs/tiny.yaml)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=/tmp/r learner.lr=1e-4")
        s.set_defaults(fn=fn)

    with_config("train", cmd_train, "online preference training on Ray")
    with_config("offline-dpo", cmd_offline, "Diffusion-DPO from a logged rollout log (rollouts=DIR)")
    with_config(
        "train-reward",
        cmd_train_reward,
        "fine-tune a FaceScore-style region scorer on (win, loss) pairs of a rollout log "
        "(pairs=DIR init=SCORER_DIR [region=face|hand])",
    )
    with_config(
        "finetune", cmd_finetune, "FairHuman's supervised fine-tuning on real images with region losses (data=DIR)"
    )
    with_config("config", cmd_config, "print the effective, validated config")
    s = sub.add_parser(
        "make-region-pairs", help="FaceScore's inpainted region pairs of an image folder, as a rollout log"
    )
    s.add_argument("config", help="YAML config; data.region_pairs.region names the region")
    s.add_argument("image_dir", help="metadata.jsonl + images (the HG-DPO real-image layout)")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.set_defaults(fn=cmd_make_region_pairs)
    from rlfh.cli.eval import add_eval_commands
    from rlfh.cli.export import add_export_commands
    from rlfh.cli.label import add_label_commands
    from rlfh.cli.rewards import add_reward_commands
    from rlfh.cli.status import add_status_commands

    add_reward_commands(sub)
    add_status_commands(sub)
    add_eval_commands(sub)
    add_label_commands(sub)
    add_export_commands(sub)
    s = sub.add_parser("make-tiny-model", help="write a seeded tiny pipeline of a model family")
    s.add_argument("dir")
    s.add_argument("--family", default="sdxl", help="the model family: sdxl (default), sd15, sd3 or flux")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="denoiser steps on synthetic latents (default: what rlfh:tiny-<family> is, 300; sd3 and flux: 100; "
        "0: random weights)",
    )
    s.set_defaults(fn=cmd_make_tiny)
    r = sub.add_parser("rollouts", help="rollout log tools")
    rsub = r.add_subparsers(dest="rollouts_command", required=True)
    s = rsub.add_parser("inspect", help="verify checksums and summarise a rollout log")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_rollouts_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    from rewards.base import RewardError
    from rlfh.config.schema import ConfigError
    from rlfh.env import apply_env_defaults
    from rlfh.labeling.table import LabelsError
    from rollouts.log import RolloutLogError

    apply_env_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (
        ConfigError,
        RolloutLogError,
        LabelsError,
        RewardError,
        FileNotFoundError,
        ValueError,
        NotImplementedError,
    ) as e:
        print(f"rlfh: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
