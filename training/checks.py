"""Checks of a config's fields by kind, for the configs' ``problems()``: each returns one line per field
at fault, naming it, its value and the fix (the range it must lie in and its default), so that a
setting that would fail only when first used (a NaN guidance at the first validation, a seed no
generator takes) is refused at start-up, with every other problem, before anything is built or read.

This module imports neither torch nor any model library.
"""

from __future__ import annotations

import math
from typing import Any

# The seeds every generator of a run accepts: numpy's SeedSequence (image crops, caption draws) refuses
# negative seeds and torch's manual_seed those of 2**64 and more, which DreamBooth's class-image seeds
# (seed * 1_000_003 + index) would reach from about 1.8e13. 2**32 is the range most tools' seeds share.
SEEDS = range(2**32)


def _default(cfg: Any, name: str) -> str:
    default = cfg.__dataclass_fields__[name].default
    return "none" if default is None else f"{default:g}" if isinstance(default, float) else str(default)


def counts_below(cfg: Any, least: int, *names: str) -> list[str]:
    """The whole-number fields of ``names`` below ``least`` (None passes: it means the default)."""
    return [
        f"{name}={getattr(cfg, name)}: use a whole number >= {least} (default {_default(cfg, name)})"
        for name in names
        if getattr(cfg, name) is not None and getattr(cfg, name) < least
    ]


def numbers_outside(
    cfg: Any, *names: str, low: float = 0, above: bool = False, high: float = math.inf
) -> list[str]:
    """The number fields of ``names`` that are NaN, infinite, below ``low`` (at it too when ``above``) or
    at ``high`` and past it (None passes)."""
    problems = []
    for name in names:
        value = getattr(cfg, name)
        if value is None or (
            math.isfinite(value) and (value > low if above else value >= low) and value < high
        ):
            continue
        bound = f"{'>' if above else '>='} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
        problems.append(f"{name}={value}: use a finite number {bound} (default {_default(cfg, name)})")
    return problems


def text_problems(cfg: Any, *names: str) -> list[str]:
    """The text fields (or lists of text) of ``names`` holding a character that is not text: a byte of a
    command line that was not UTF-8, read as a lone surrogate, which the tokenizer would fail on."""
    problems = []
    for name in names:
        value = getattr(cfg, name)
        for i, text in enumerate([value] if isinstance(value, str) else value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                where = f"{name} item {i + 1}" if not isinstance(value, str) else name
                bad = f"character {e.start}, {text[e.start]!r}, is a byte that is not UTF-8"
                problems.append(f"{where}: {bad}: write the text in UTF-8")
    return problems
