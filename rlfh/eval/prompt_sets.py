"""Prompt sets of ``rlfh eval``: the packaged ones, plain text files, and tables with a style column.

Accepted sources (``--prompts``):

* ``human`` / ``general``: the packaged sets (``rlfh/assets/prompts``), no styles;
* a text file: one prompt per line, ``#`` starts a comment line, no styles;
* a ``.csv`` / ``.tsv`` file with a header row holding a ``prompt`` column and optionally a ``style``
  column;
* a ``.jsonl`` file: one object per line with ``"prompt"`` and optionally ``"style"``;
* a folder of ``<style>.json`` files, each a JSON list of prompts: the layout of HPSv2's benchmark
  (``anime.json``, ``concept-art.json``, ``paintings.json``, ``photo.json``; Wu et al. 2023), the
  style being the file's name.

With styles, ``rlfh eval`` reports every reward's mean per style beside the overall one.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PROMPT_SETS = ("human", "general")


@dataclass(frozen=True)
class PromptSet:
    """Prompts and, when the source names them, one style per prompt."""

    prompts: list[str]
    styles: list[str] | None = None

    def head(self, k: int) -> "PromptSet":
        """The first ``k`` prompts, or with styles the first ``k`` of each style (every style stays)."""
        if self.styles is None:
            return PromptSet(self.prompts[:k])
        seen: dict[str, int] = {}
        keep = []
        for i, s in enumerate(self.styles):
            seen[s] = seen.get(s, 0) + 1
            if seen[s] <= k:
                keep.append(i)
        return PromptSet([self.prompts[i] for i in keep], [self.styles[i] for i in keep])


def _text_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _table(path: Path) -> PromptSet:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{path}: needs a header row with a 'prompt' column (and optionally 'style')")
    prompts, styles = [], []
    for n, row in enumerate(rows, start=2):
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            raise ValueError(f"{path}: line {n} has an empty 'prompt'")
        prompts.append(prompt)
        styles.append((row.get("style") or "").strip())
    return PromptSet(prompts, _styles_or_none(styles, path))


def _jsonl(path: Path) -> PromptSet:
    prompts, styles = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON: {e}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(f"{path}: line {n} needs a non-empty string 'prompt'")
        prompts.append(obj["prompt"].strip())
        styles.append(str(obj.get("style") or "").strip())
    return PromptSet(prompts, _styles_or_none(styles, path))


def _styles_or_none(styles: list[str], path: Path) -> list[str] | None:
    if not any(styles):
        return None
    if not all(styles):
        missing = next(i for i, s in enumerate(styles) if not s)
        raise ValueError(f"{path}: prompt {missing + 1} has no 'style' while others do; give every prompt one")
    return styles


def _style_folder(path: Path) -> PromptSet:
    files = sorted(path.glob("*.json"))
    if not files:
        raise ValueError(f"{path}: a prompt folder holds <style>.json files (HPSv2's benchmark layout); none found")
    prompts, styles = [], []
    for f in files:
        data = json.loads(f.read_text())
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{f}: must be a JSON list of prompt strings")
        prompts += [p.strip() for p in data if p.strip()]
        styles += [f.stem] * sum(1 for p in data if p.strip())
    return PromptSet(prompts, styles)


def load_prompt_table(name_or_file: str) -> PromptSet:
    """Prompts (and styles) of a packaged set, a file or a style folder (see the module docstring).

    Raises:
        ValueError: unknown set name, a malformed file, or a source holding no prompts.
        FileNotFoundError: a path that does not exist.
    """
    path = Path(name_or_file)
    if name_or_file in PROMPT_SETS:
        text = resources.files("rlfh").joinpath("assets", "prompts", f"{name_or_file}.txt").read_text()
        table, source = PromptSet(_text_lines(text)), f"prompt set {name_or_file!r}"
    elif path.is_dir():
        table, source = _style_folder(path), str(path)
    elif path.is_file():
        reader = {".csv": _table, ".tsv": _table, ".jsonl": _jsonl}.get(path.suffix.lower())
        table = reader(path) if reader else PromptSet(_text_lines(path.read_text()))
        source = str(path)
    elif path.suffix or "/" in name_or_file:
        raise FileNotFoundError(f"--prompts {name_or_file}: no such file")
    else:
        raise ValueError(
            f"--prompts {name_or_file!r}: unknown prompt set; use one of {list(PROMPT_SETS)} or a file path"
        )
    if not table.prompts:
        raise ValueError(f"{source} holds no prompts (one per line; # starts a comment)")
    return table


def load_prompt_set(name_or_file: str) -> list[str]:
    """The prompts of :func:`load_prompt_table` (styles dropped)."""
    return load_prompt_table(name_or_file).prompts
