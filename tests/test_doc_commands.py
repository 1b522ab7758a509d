"""Every shell block in README.md and docs/*.md says what it is, and its commands work as written.

Each ```bash block is preceded by ``<!-- commands: KIND -->``:

* ``tiny``: runs on the tiny model on a CPU; :func:`test_tiny_commands_run_as_written` runs them
  (train and offline-dpo at 2 rounds, eval at 2 denoising steps on 2 prompts x 1 seed, to fit the test
  budget);
* ``gpu``: needs GPUs and real weights; their ``rlfh`` commands are parsed and their configs with
  the overrides as written validated here, which is everything short of running them;
* ``setup``: installing, downloading and starting clusters (the install line is what CI runs,
  the Ray block ``tests/reliability/test_listening_sockets.py``); their ``rlfh`` commands validated;
* ``usage``: a synopsis with placeholders, not meant to run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KINDS = ("tiny", "gpu", "setup", "usage")
MARKER = re.compile(r"<!-- commands: (\w+)")


def blocks() -> list[tuple[str, int, str | None, str]]:
    """(file, line, kind or None, text) of every ```bash block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        for i, ln in enumerate(lines):
            if ln.strip() != "```bash":
                continue
            kind, j = None, i - 1
            while j >= 0 and (not lines[j].strip() or lines[j].lstrip().startswith("<!--")):
                m = MARKER.search(lines[j])
                kind = kind or (m.group(1) if m else None)
                j -= 1
            end = lines.index("```", i + 1)
            out.append((doc.relative_to(REPO).as_posix(), i + 1, kind, "\n".join(lines[i + 1 : end])))
    return out


def rlfh_commands(text: str) -> list[list[str]]:
    """The ``rlfh`` commands of a block as argv lists: continuation lines joined, comments dropped,
    leading VAR=value assignments and a ``ray job submit ... --`` prefix removed."""
    out, pending = [], ""
    for line in text.replace("\\\n", " ").splitlines():
        pending += line + "\n"
        try:  # a quoted argument may span lines
            shlex.split(pending, comments=True)
        except ValueError:
            continue
        command, pending = pending, ""
        lex = shlex.shlex(command, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens, parts = list(lex), [[]]
        for tok in tokens:  # split at the shell's operators: && || | ; ( )
            if tok and set(tok) <= set("&|;()"):
                parts.append([])
            else:
                parts[-1].append(tok)
        for argv in parts:
            while argv and re.match(r"^[A-Z_]+=", argv[0]):
                argv = argv[1:]
            if argv[:3] == ["ray", "job", "submit"] and "--" in argv:
                argv = argv[argv.index("--") + 1 :]
            if argv and argv[0] in ("rlfh", ".venv/bin/rlfh"):
                out.append(["rlfh", *argv[1:]])
    return out


def test_every_shell_block_is_marked():
    unmarked = [f"{f}:{line}" for f, line, kind, _ in blocks() if kind not in KINDS]
    assert not unmarked, f"```bash blocks without <!-- commands: {'|'.join(KINDS)} -->: {unmarked}"


def validate(argv: list[str]) -> None:
    """Parse as the CLI does; load and validate the config with the command's overrides."""
    from rlfh.cli.main import build_parser, finetune_overrides, train_reward_overrides
    from rlfh.config.schema import load_config

    args = build_parser().parse_args(argv[1:])
    if getattr(args, "config", None) and hasattr(args, "overrides"):
        overrides = args.overrides
        if args.command == "train-reward":
            overrides = train_reward_overrides(overrides)
        if args.command == "finetune":
            overrides = finetune_overrides(overrides)
        load_config(REPO / args.config if not args.config.startswith("/") else args.config, overrides)


@pytest.mark.parametrize(
    "where, argv",
    [
        (f"{f}:{line}", argv)
        for f, line, kind, text in blocks()
        if kind in ("tiny", "gpu", "setup")
        for argv in rlfh_commands(text)
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_documented_commands_parse_and_validate(where, argv, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = [a.replace("/abs/path/", f"{REPO}/").replace("$PWD", str(REPO)) for a in argv]  # placeholders
    validate(argv)


def shortened(argv: list[str]) -> list[str]:
    """Fit the test budget: fewer rounds and denoising steps; everything else as written."""
    if argv[1] in ("train", "offline-dpo"):
        return [*argv, "num_rounds=2", "rollout.num_inference_steps=2", "logging.checkpoint_every=1"]
    if argv[1] == "eval":  # argparse keeps the last --max-prompts / --seeds
        return [*argv, "rollout.num_inference_steps=2", "--max-prompts", "2", "--seeds", "1", "--no-progress"]
    return argv


STAGE = {"train": 0, "offline-dpo": 1}  # commands that write runs first, then those that read them


@pytest.mark.slow
def test_tiny_commands_run_as_written(tiny_model_dir, tmp_path):
    from tests.test_end_to_end import clean_env

    seen, commands = set(), []
    for where, _, kind, text in blocks():
        for argv in rlfh_commands(text) if kind == "tiny" else []:
            if tuple(argv) not in seen:
                seen.add(tuple(argv))
                commands.append((where, argv))
    commands.sort(key=lambda c: STAGE.get(c[1][1], 2))
    assert {a[1] for _, a in commands} >= {"train", "offline-dpo", "eval", "status", "compare", "plot"}
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for where, argv in commands:
        r = subprocess.run(
            [sys.executable, "-m", "rlfh.cli.main", *shortened(argv)[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            env=clean_env(),
        )
        assert r.returncode == 0, f"{where}: {' '.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
