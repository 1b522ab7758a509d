"""Helpers for config sections wherever they are defined (rlfh/config/schema.py, a loss file's own
section): a field with its explanation, and the range checks a section's ``problems`` runs.

A section is a frozen dataclass; ``problems(key)`` returns what is wrong with its own fields, each
problem naming the full dotted key (``key`` is the section's path, e.g. ``learner.dpo``). Rules that
read several sections live in rlfh/config/rules.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

_MISSING: Any = dataclasses.MISSING


def knob(default: Any = _MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A field whose explanation is longer than a line: ``doc`` is rendered into docs/config.md
    (rlfh/config/docs.py) as the field's description, in place of a ``# comment``."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def positive(key: str, value: float) -> list[str]:
    return [] if 0 < value < math.inf else [f"{key}={value}: must be finite and > 0"]


def non_negative(key: str, value: float, why: str = "") -> list[str]:
    return [] if 0 <= value < math.inf else [f"{key}={value}: must be finite and >= 0{why}"]


def at_least(key: str, value: int, low: int, why: str = "") -> list[str]:
    return [] if value >= low else [f"{key}={value}: must be >= {low}{why}"]


def fraction(key: str, value: float, open_low: bool = True) -> list[str]:
    """``value`` in (0, 1] (or [0, 1] with ``open_low=False``)."""
    ok = (0 < value <= 1) if open_low else (0 <= value <= 1)
    return [] if ok else [f"{key}={value}: must be in {'(' if open_low else '['}0, 1]"]


def section_problems(obj: Any, key: str) -> list[str]:
    """Every section's own problems under ``obj``: its ``problems(key)`` if it has one, then its
    nested sections and lists of sections, depth first in field order."""
    if not dataclasses.is_dataclass(obj):
        return []
    p: list[str] = list(obj.problems(key)) if hasattr(obj, "problems") else []
    prefix = f"{key}." if key else ""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            p.extend(section_problems(value, prefix + f.name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    p.extend(section_problems(item, f"{prefix}{f.name}[{i}]"))
    return p
