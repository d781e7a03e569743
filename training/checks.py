"""What a config must be: its file a bounded UTF-8 YAML mapping without aliases (``load_yaml``), each
value of its key's type (``convert``: a misspelt or mistyped value fails naming the key), and its
fields in range, checked by kind for the sections' ``problems()``: each check returns one line per
field at fault, naming it, its value and the fix (the range it must lie in and its default), so that a
setting that would fail only when first used (a NaN guidance at the first validation, a seed no
generator takes) is refused at start-up, with every other problem, before anything is built or read.

This module imports neither torch nor any model library.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key that does not exist, a value of the wrong type, or a config file that cannot be read."""


# Config files are a few kilobytes; past this one is not a config (and PyYAML's reader would take seconds).
MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (``*name``): a few hundred bytes of nested aliases stand for
    billions of nodes, which any later walk (a copy, a str(), a comparison) expands. Without aliases a
    file's nodes are bounded by its size. A config has no need of them: each value is written out."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"line {event.start_mark.line + 1}: YAML alias *{event.anchor} refused (aliases can expand "
                "a small file into billions of values): write the value out in full"
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """The value of YAML text, read without Python tags (as safe_load) and without aliases; ConfigError
    says in one line where text is not YAML."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.MarkedYAMLError as e:  # its str() spans lines: say where, and what
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}not valid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({' '.join(str(e).split())})") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The key: value mapping of a config file: UTF-8 YAML of at most MAX_CONFIG_BYTES, no aliases."""
    path = Path(path)
    name = f"config file {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{name} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # a larger file is not read further than this
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{name} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{name} cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{name} is over the {MAX_CONFIG_BYTES:,} bytes a config may hold: give a YAML "
                          "file of key: value settings")  # fmt: skip
    try:
        data = safe_yaml(text) or {}
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must hold a mapping of key: value")
    return data


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


# ---- a value as its key's type ----------------------------------------------------------------------


def _allows_none(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(type, is_list) of a field annotation such as ``int``, ``str | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _list_items(value: Any) -> list:
    """A list value: a YAML list, a flag's "a,b,c", or a flag's YAML list '["a, b", "c"]' (for items
    that hold commas), or a single item."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            items = safe_yaml(text)
            if not isinstance(items, list):
                raise ValueError(f"{value!r} is not a list")
            return items
        return [v.strip() for v in text.split(",")] if text else []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# What a key of each type holds, for the error of a value of another shape.
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _shape(value: Any) -> str | None:
    """'a list' or 'a mapping' for a YAML collection; None for a scalar."""
    if isinstance(value, dict):
        return "a mapping"
    return "a list" if isinstance(value, (list, tuple)) else None


def convert(name: str, annotation: Any, value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if annotation is not None and annotation is not Any and not _allows_none(annotation):
            raise ConfigError(f"config key {name!r} cannot be none")
        return None
    kind, is_list = _base_type(annotation)
    try:
        if not is_list:
            return _scalar(kind, value)
        if isinstance(value, dict):
            raise ValueError("a mapping where a list belongs; write a list of values (- item)")
        items = _list_items(value)
        if any(_shape(v) for v in items):  # a list of lists: its items are not one value each
            raise ValueError(f"a list within the list; write each item as {_KINDS.get(kind, 'a value')}")
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: float() of a 400-digit integer
        raise ConfigError(f"config key {name!r}: {e}") from None
    return [convert(name, kind, v) for v in items]


def _scalar(kind: type, value: Any) -> Any:
    """``value`` (not None) as a ``kind``; ValueError or TypeError says why it is not one."""
    if kind in _KINDS and _shape(value):  # str() would make a folder named "{'a': 1}"
        raise ValueError(f"{_shape(value)} where {_KINDS[kind]} belongs; write a single value")
    if kind is bool:
        return _to_bool(value)
    if kind in (int, float, str):
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"{value} is a boolean, not a number")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not an integer")
        return kind(value)
    return value
