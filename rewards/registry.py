"""Reward registry: config names -> reward factories.

Built-in rewards are listed as ``"module:factory"`` strings and imported only when a config asks
for them, so importing the registry stays cheap (no torch, no detector runtimes). A config may also
name any ``module:callable`` directly; the callable receives the reward's ``options`` as keyword
arguments and must return a :class:`rewards.base.Reward` (or any callable obeying its contract).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from rewards.base import Reward, RewardError

BUILTIN: dict[str, str] = {
    "jpeg_compressibility": "rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "rewards.jpeg:JpegIncompressibility",
    "facescore": "rewards.facescore:FaceScore",
    "imagereward": "rewards.imagereward:ImageReward",
    "pickscore": "rewards.pickscore:PickScore",
    "clipscore": "rewards.clipscore:CLIPScore",
    "hpsv2": "rewards.hpsv2:HPSv2",
    "local_ir": "rewards.local:LocalIR",
    "local_hps": "rewards.local:LocalHPS",
    "aesthetic": "rewards.aesthetic:AestheticScore",
    "hand_confidence": "rewards.hand:HandConfidence",
    "face_detection_confidence": "rewards.face_confidence:FaceDetectionConfidence",
}


def resolve(target: str) -> Callable[..., Any]:
    """Return the factory for a registry name or a ``module:callable`` path."""
    path = BUILTIN.get(target, target)
    if ":" not in path:
        known = ", ".join(sorted(BUILTIN))
        raise RewardError(f"unknown reward {target!r}: use a registered name ({known}) or a 'module:callable' path")
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {target!r}: cannot import module {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RewardError(f"reward {target!r}: module {module_name!r} has no attribute {attr!r}") from None


def add_module_dirs(targets: Iterable[str], dirs: Iterable[str | Path]) -> list[str]:
    """Make each ``module:callable`` target's module importable from the first of ``dirs`` that holds
    it (``name.py`` or a package folder) when it is not importable already: that folder goes first
    on ``sys.path`` and on ``PYTHONPATH``, which the processes started from here inherit (the
    private Ray cluster and its reward actor, DeepSpeed ranks). The config loader passes the
    config's folder and the working directory, so a reward module saved next to the config works
    without setting PYTHONPATH. Returns the folders added."""
    added: list[str] = []
    for target in targets:
        if not isinstance(target, str) or target in BUILTIN or ":" not in target:
            continue
        top = target.split(":", 1)[0].split(".", 1)[0]
        if not top or importlib.util.find_spec(top) is not None:
            continue
        for d in dirs:
            d = Path(d).resolve()
            if (d / f"{top}.py").is_file() or (d / top).is_dir():
                _prepend_path(str(d))
                added.append(str(d))
                break
    return added


def _prepend_path(d: str) -> None:
    if d not in sys.path:
        sys.path.insert(0, d)
        importlib.invalidate_caches()
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if d not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([d, *parts])


def check_target(target: str) -> str | None:
    """What is wrong with a reward ``target``, found without building the reward; None when it resolves.

    Config validation calls this so that a typo stops the run before Ray, models and actors start
    (building the reward happens later, on the reward actor). A registry name is checked against
    the registry and its module located, not imported: the built-in modules import torch and
    model code, seconds per name. A ``module:callable`` is imported and the attribute looked up,
    exactly as :func:`resolve` will do on the actor.
    """
    if not isinstance(target, str) or not target:
        return f"reward target {target!r}: give a registry name or a 'module:callable' path"
    if target in BUILTIN:
        module_name = BUILTIN[target].split(":", 1)[0]
        if importlib.util.find_spec(module_name) is None:
            return f"reward {target!r}: its module {module_name!r} is not installed"
        return None
    try:
        factory = resolve(target)
    except RewardError as e:
        return str(e)
    except Exception as e:  # the user's module raised while importing (SyntaxError, missing dependency, ...)
        return f"reward {target!r}: importing {target.split(':', 1)[0]!r} failed: {type(e).__name__}: {e}"
    if not callable(factory):
        return f"reward {target!r}: {type(factory).__name__} object is not callable; name a class or a factory function"
    return None


def build_reward(target: str, options: dict[str, Any] | None = None, name: str | None = None) -> Reward:
    """Build one reward from its config entry.

    Args:
        target: registry name or ``module:callable``.
        options: keyword arguments for the factory.
        name: metric/log name; defaults to ``target`` (a ``module:callable`` reward must give one).
    """
    factory = resolve(target)
    try:
        reward = factory(**(options or {}))
    except TypeError as e:
        raise RewardError(f"reward {target!r}: bad options {options!r}: {e}") from e
    if not callable(reward):
        raise RewardError(f"reward {target!r}: factory returned {type(reward).__name__}, which is not callable")
    # the key in metrics and the rollout log: the config's name, else the registry name
    if name is None and ":" in target:
        raise RewardError(f"reward {target!r}: a module:callable reward needs a `name:` (its key in metrics and logs)")
    reward.name = name if name is not None else target
    if not hasattr(reward, "region"):
        reward.region = "global"
    return reward
