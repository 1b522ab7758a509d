"""Prompts for each round: a deterministic walk over the configured prompt list."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_prompts(rollout_cfg) -> list[str]:
    """``rollout.prompt_file`` (one prompt per line, blank lines and #-comments skipped) or ``rollout.prompts``."""
    if rollout_cfg.prompt_file:
        path = Path(rollout_cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"rollout.prompt_file={path}: no such file")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not prompts:
            raise ValueError(f"rollout.prompt_file={path}: holds no prompts")
        return prompts
    return list(rollout_cfg.prompts)


class PromptSchedule:
    """Which prompts and seeds round k samples; a pure function of (seed, k), so resumes repeat it."""

    def __init__(self, prompts: list[str], prompts_per_round: int, rollouts_per_prompt: int, seed: int):
        self.prompts = prompts
        self.per_round = prompts_per_round
        self.k = rollouts_per_prompt
        self.seed = seed

    def round(self, r: int) -> tuple[list[str], list[int]]:
        """Prompts (each repeated ``rollouts_per_prompt`` times, grouped) and one seed per sample."""
        n = len(self.prompts)
        chosen = []
        # a fresh permutation per pass over the prompt list
        for pos in range(r * self.per_round, (r + 1) * self.per_round):
            perm = np.random.default_rng([self.seed, pos // n]).permutation(n)
            chosen.append(self.prompts[perm[pos % n]])
        prompts = [p for p in chosen for _ in range(self.k)]
        seeds = np.random.default_rng([self.seed, r, 7]).integers(0, 2**31 - 1, len(prompts)).tolist()
        return prompts, seeds
