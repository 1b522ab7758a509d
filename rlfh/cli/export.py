"""``rlfh export RUN_DIR|CHECKPOINT --format diffusers|kohya|peft [--out FILE]`` (wired in by
``rlfh.cli.main.build_parser``): a checkpoint's policy in the format other tools load, with a model
card beside it (:mod:`rlfh.run.export`)."""

from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> int:
    from rlfh.eval.evaluate import format_summary
    from rlfh.run.export import export

    done = export(args.path, args.format, args.out, eval_text=format_summary)
    for note in done.notes:
        print(f"rlfh: note: {note}", file=sys.stderr)
    print(f"[rlfh] exported {done.checkpoint} as {args.format}: {done.path} (model card: {done.card})")
    return 0


def add_export_commands(sub) -> None:
    from rlfh.run.export import FORMATS

    s = sub.add_parser(
        "export",
        help="a checkpoint's LoRA for diffusers, kohya's tools (ComfyUI, A1111/Forge) or peft, "
        "or a full fine-tune's UNet as one file; a model card beside it",
    )
    s.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint folder")
    s.add_argument("--format", required=True, choices=FORMATS, help="the layout to write")
    s.add_argument(
        "--out",
        default=None,
        help="the file to write (a folder for peft); default RUN_DIR/export/<checkpoint>-<format>/",
    )
    s.set_defaults(fn=cmd_export)
