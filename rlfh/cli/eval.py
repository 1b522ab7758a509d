"""Evaluation commands of the ``rlfh`` CLI (wired in by ``rlfh.cli.main.build_parser``).

    rlfh eval CONFIG --model PATH_OR_ID [--lora DIR] [--baseline-model PATH_OR_ID] [--baseline-lora DIR]
              [--baseline-negative-prompt TEXT] [--prompts human|general|FILE|DIR] [--seeds N] [--seed-start S]
              [--max-prompts K] [--batch-size B] [--device cpu|cuda] [--out DIR] [--train-prompts K]
              [--no-report] [--no-progress]
              [--human-pairs DIR] [key=value ...]
        sample the prompt set at seeds S..S+N-1 with CONFIG's rollout settings, score with its
        rewards, write OUT/eval.json and OUT/index.html (default OUT: RUN_DIR/eval, RUN_DIR from CONFIG);
        --train-prompts K also samples the first K of CONFIG's training prompts for the held-out reward gap
    rlfh eval-rewards CONFIG LABELS_FILE [--out FILE] [--batch-size B] [key=value ...]
        each of CONFIG's rewards against human rankings / pairs (docs/evaluation.md): pair and ranking
        accuracy, Pearson's r
    rlfh compare RUN_A RUN_B [--out DIR]     overlay two runs' curves; summary.md + index.html
    rlfh plot RUN_DIR [--out DIR]            one run's curves (default RUN_DIR/curves)

A baseline is evaluated when ``--baseline-model``, ``--baseline-lora`` or ``--baseline-negative-prompt``
is given; a baseline LoRA or negative prompt without ``--baseline-model`` goes on ``--model``'s pipeline
(``--baseline-negative-prompt`` alone: FaceScore's "SDXL-Neg" baseline, the model with a negative
prompt, which needs ``rollout.guidance_scale`` above 1). A prompt file with a style column (or a
folder of HPSv2 benchmark ``<style>.json`` files) adds per-style means and win rates. Key=value
overrides may come before or after the options.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class _IntermixedParser(argparse.ArgumentParser):
    """Accepts ``CONFIG --model X key=value`` (overrides after options).

    Plain argparse assigns every positional at its first chunk, so overrides that follow an option
    are rejected as unrecognized; ``parse_known_intermixed_args`` collects them wherever they are.
    """

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _fail(e: Exception) -> int:
    print(f"rlfh: error: {e}", file=sys.stderr)
    return 2


def _eval_inputs(args: argparse.Namespace, cfg) -> tuple[Any, list[int], list[str]]:
    """The prompt table, seeds and training prompts that ``rlfh eval``'s options ask for."""
    from rlfh.eval.evaluate import load_prompt_table

    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1 seed")
    table = load_prompt_table(args.prompts)
    if args.max_prompts is not None:
        if args.max_prompts < 1:
            raise ValueError(f"--max-prompts {args.max_prompts}: need at least 1 prompt")
        table = table.head(args.max_prompts)
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    train_prompts: list[str] = []
    if args.train_prompts:
        from rlfh.data.prompts import load_prompts

        if args.train_prompts < 0:
            raise ValueError(f"--train-prompts {args.train_prompts}: a number of prompts >= 0")
        train_prompts = load_prompts(cfg.rollout)[: args.train_prompts]
    return table, seeds, train_prompts


def _baseline(args: argparse.Namespace):
    """The baseline model of ``--baseline-*`` (None without one); ``--human-pairs`` needs one and a free folder,
    checked here so that nothing is sampled first."""
    from rlfh.eval.evaluate import ModelSpec

    baseline = None
    if args.baseline_model or args.baseline_lora or args.baseline_negative_prompt is not None:
        baseline = ModelSpec(args.baseline_model or args.model, args.baseline_lora, args.baseline_negative_prompt)
    if args.human_pairs:
        from rlfh.labeling.human_eval import check_pairs_dir

        if baseline is None:
            raise ValueError("--human-pairs compares two models: give --baseline-model and/or --baseline-lora")
        check_pairs_dir(args.human_pairs)
    return baseline


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rewards.base import RewardError
    from rlfh.config.schema import ConfigError, load_config
    from rlfh.eval.evaluate import ModelSpec, bucket_runs, evaluate, format_summary

    try:
        cfg = load_config(args.config, args.overrides)
        table, seeds, train_prompts = _eval_inputs(args, cfg)
        baseline = _baseline(args)
        runs = bucket_runs(cfg, Path(args.out) if args.out else Path(cfg.run_dir) / "eval")
        device = args.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        done = []
        for cfg_at, out in runs:  # rollout.resolutions: every bucket the run trained on, at its size
            summary = evaluate(
                cfg_at,
                ModelSpec(args.model, args.lora),
                table.prompts,
                seeds,
                out,
                baseline=baseline,
                prompt_set=args.prompts,
                batch_size=args.batch_size,
                device=device,
                progress=not args.no_progress,
                report=not args.no_report,
                train_prompts=train_prompts,
                styles=table.styles,
            )
            done.append((cfg_at.rollout, out, summary))
            if args.human_pairs:
                from rlfh.labeling.human_eval import write_human_pairs

                pairs = Path(args.human_pairs)
                if len(runs) > 1:  # one file per bucket, beside the one asked for
                    pairs = pairs.with_name(f"{pairs.stem}-{out.name}{pairs.suffix}")
                write_human_pairs(out, str(pairs))
                print(f"[rlfh] blind pairs for people: rlfh label {pairs} --mode win-tie-lose")
    except (ConfigError, RewardError, FileNotFoundError, ValueError) as e:
        return _fail(e)
    for rc, out, summary in done:
        if len(done) > 1:
            print(f"== bucket {rc.height}x{rc.width} ==")
        print(format_summary(summary))
        print(f"[rlfh] evaluation written to {out}/eval.json" + ("" if args.no_report else f" and {out}/index.html"))
    return 0


def cmd_eval_rewards(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rewards.base import RewardError
    from rlfh.config.schema import ConfigError, load_config
    from rlfh.eval.reward_agreement import evaluate_rewards, format_agreement
    from rollouts.log import RolloutLogError

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: at least 1")
        cfg = load_config(args.config, args.overrides)
        if Path(args.labels_file).is_dir():  # a rollout log labeled with `rlfh label`
            import tempfile

            from rlfh.eval.labeled_comparisons import comparisons_from_labels
            from rlfh.eval.reward_agreement import evaluate_comparisons

            with tempfile.TemporaryDirectory() as images:
                comparisons = comparisons_from_labels(args.labels_file, images)
                report = evaluate_comparisons(cfg, comparisons, args.labels_file, args.batch_size)
        else:
            report = evaluate_rewards(cfg, args.labels_file, args.batch_size)
    except (ConfigError, RewardError, FileNotFoundError, ValueError, RolloutLogError) as e:
        return _fail(e)
    print(format_agreement(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"[rlfh] agreement written to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlfh.eval.curves import compare_runs

    out = args.out or f"compare-{Path(args.run_a).resolve().name}-vs-{Path(args.run_b).resolve().name}"
    try:
        index = compare_runs(args.run_a, args.run_b, out)
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    print(f"[rlfh] comparison written to {index} (and summary.md)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rlfh.eval.curves import plot_run

    try:
        index = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    print(f"[rlfh] curves written to {index}")
    return 0


def _add_eval_arguments(s: argparse.ArgumentParser) -> None:
    """The arguments of ``rlfh eval``."""
    s.add_argument("config", help="YAML config: rollout settings, rewards and model dtype/vae come from it")
    s.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. rollout.num_inference_steps=30")
    s.add_argument("--model", required=True, help="pipeline folder, hub id, .safetensors file or rlfh:tiny-sdxl")
    s.add_argument("--lora", help="LoRA of the model: checkpoint folder, .safetensors file or run directory")
    s.add_argument("--baseline-model", help="baseline pipeline (default: --model when --baseline-lora is given)")
    s.add_argument("--baseline-lora", help="LoRA of the baseline")
    s.add_argument(
        "--baseline-negative-prompt",
        help="the baseline's own negative prompt (FaceScore's SDXL-Neg); alone, the baseline is --model with it",
    )
    s.add_argument(
        "--prompts",
        default="human",
        help="prompt set: human, general, a text file, a .csv/.tsv/.jsonl with prompt and style columns, "
        "or a folder of <style>.json lists (HPSv2's benchmark); default human",
    )
    s.add_argument("--seeds", type=int, default=4, help="seeds per prompt, shared by both models (default 4)")
    s.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    s.add_argument("--max-prompts", type=int, help="use only the first K prompts of the set (of each style)")
    s.add_argument("--batch-size", type=int, help="images per batch (default rollout.sample_batch_size_per_actor)")
    s.add_argument("--device", help="torch device for the pipelines (default cuda when available)")
    s.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    s.add_argument(
        "--train-prompts",
        type=int,
        default=0,
        help="sample the first K training prompts of CONFIG too, for the held-out reward gap (default 0: not measured)",
    )
    s.add_argument("--no-report", action="store_true", help="write eval.json only, no grids/plots/index.html")
    s.add_argument(
        "--human-pairs",
        metavar="DIR",
        help="also write the model-vs-baseline pairs to DIR as a blind log for rlfh label --mode win-tie-lose",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_eval_commands(subparsers) -> None:
    """Add ``eval``, ``eval-rewards``, ``compare`` and ``plot`` to the ``rlfh`` sub-command parsers."""
    s = subparsers.add_parser("eval", help="sample a fixed seeded prompt set, score it, report (vs a baseline)")
    s.__class__ = _IntermixedParser  # see its docstring: overrides may follow the options
    _add_eval_arguments(s)
    s.set_defaults(fn=cmd_eval)

    s = subparsers.add_parser(
        "eval-rewards", help="ranking accuracy and Pearson's r of each configured reward against human labels"
    )
    s.__class__ = _IntermixedParser
    s.add_argument("config", help="YAML config whose rewards are evaluated")
    s.add_argument(
        "labels_file",
        help="JSON Lines of human rankings / pairs (docs/evaluation.md), or a rollout log labeled with rlfh label",
    )
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.add_argument("--out", help="also write the report as JSON here")
    s.add_argument("--batch-size", type=int, default=8, help="images per scoring batch (default 8)")
    s.set_defaults(fn=cmd_eval_rewards)

    s = subparsers.add_parser("compare", help="compare two runs' reward and loss curves")
    s.add_argument("run_a")
    s.add_argument("run_b")
    s.add_argument("--out", help="output folder (default ./compare-A-vs-B)")
    s.set_defaults(fn=cmd_compare)

    s = subparsers.add_parser("plot", help="plot one run's reward and loss curves")
    s.add_argument("run_dir")
    s.add_argument("--out", help="output folder (default RUN_DIR/curves)")
    s.set_defaults(fn=cmd_plot)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation commands alone (``python -m rlfh.cli.eval eval ...``), as ``rlfh`` does."""
    from rlfh.env import apply_env_defaults

    apply_env_defaults()
    p = argparse.ArgumentParser(prog="rlfh")
    add_eval_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
