"""Process-wide defaults applied before heavy imports (CLI start, every Ray actor).

Defaults only: a variable the user set is never overridden. ``HF_HUB_OFFLINE=0`` lets
``from_pretrained`` download from the hub; ``WANDB_MODE=online`` syncs wandb runs.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


def apply_env_defaults() -> None:
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    quiet_library_warnings()


def quiet_library_warnings() -> None:
    """Silence per-call deprecation chatter from libraries; warnings from rlfh itself stay visible."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers|peft)\b")


def env_for_workers() -> dict[str, str]:
    """The variables Ray workers must see (passed through runtime_env)."""
    return {k: os.environ.get(k, v) for k, v in DEFAULTS.items()}


def worker_runtime_env() -> dict:
    """The runtime_env of every Ray worker rlfh starts (rollout, reward and learner actors, Serve
    replicas): the variables above, and the warnings filter applied in each worker process. The
    actors themselves import nothing of rlfh, so this is how they get the same environment."""
    return {"env_vars": env_for_workers(), "worker_process_setup_hook": "rlfh.env.quiet_library_warnings"}
