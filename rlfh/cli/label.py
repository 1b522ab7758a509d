"""People-in-the-loop commands of the ``rlfh`` CLI (wired in by ``rlfh.cli.main.build_parser``).

rlfh label ROLLOUT_DIR [--mode best-worst|pairwise|win-tie-lose] [--port N] [--labeler NAME]
           [--host H] [--token T]
    the labeling page on http://127.0.0.1:N (labels: ROLLOUT_DIR/labels.jsonl)
rlfh eval-human PAIRS_DIR [--json]
    win / tie / lose rates of a human evaluation (``rlfh eval --human-pairs PAIRS_DIR``), with
    bootstrap intervals and Fleiss' kappa between labelers
"""

from __future__ import annotations

import argparse
import json


def cmd_label(args: argparse.Namespace) -> int:
    from rlfh.labeling.app import serve

    serve(args.rollout_dir, args.mode, args.port, args.labeler, args.host, args.token)
    return 0


def cmd_eval_human(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlfh.labeling import human_eval as he

    if (Path(args.pairs_dir) / he.SIDES_NAME).is_file():
        report, text = he.human_eval_report(args.pairs_dir), he.format_report
    else:  # a labeled rollout log: the labelers' and the rewards' agreement
        report, text = he.labels_report(args.pairs_dir), he.format_labels_report
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


def add_label_commands(subparsers) -> None:
    """Add ``label`` and ``eval-human`` to the ``rlfh`` sub-command parsers."""
    from rlfh.labeling.table import MODES

    s = subparsers.add_parser("label", help="label a rollout log's images in the browser (human preferences)")
    s.add_argument("rollout_dir", help="the rollout log (RUN_DIR/rollouts, or rlfh eval --human-pairs DIR)")
    s.add_argument("--mode", choices=MODES, default="best-worst", help="what is asked per task (default best-worst)")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    s.add_argument("--labeler", default="anonymous", help="who labels (kept with every label; ?labeler= overrides)")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1, this machine only); any other needs an access token in the URL",
    )
    s.add_argument("--token", help="access token required in every URL (generated when binding beyond loopback)")
    s.set_defaults(fn=cmd_label)

    s = subparsers.add_parser("eval-human", help="win/tie/lose rates and labeler agreement of a human evaluation")
    s.add_argument("pairs_dir", help="the folder rlfh eval --human-pairs wrote, or any labeled rollout log")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(fn=cmd_eval_human)
