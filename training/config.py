"""One typed config per entry point: a dataclass, loaded from YAML, overridable from the command line.

    cfg = parse_config(TrainConfig, ["--config", "configs/tiny-shapes.yaml", "--max_steps", "200"])

The dataclass holds the only copy of the defaults; the YAML file and then the command line override
them, in that order. Every field becomes a ``--name`` flag whose type comes from its annotation, so
a misspelt key or a value of the wrong type fails at start-up with a message naming it. A config file
is UTF-8 YAML of at most 1 MiB, read without Python tags (as ``yaml.safe_load``) and without aliases,
so that a few hundred bytes cannot stand for billions of values. The flag's ``--help`` text is the
field's trailing comment in the dataclass source, and a comment line above a run of fields titles
their section (``field_docs``): the description is written once, where the field is. diffusers' and
kohya's flags are read as ours first (training/foreign_flags.py); a class's ``FOREIGN_FLAGS`` ({other
tool's name: ours or why there is none}) turn another tool's key in a YAML file into an error that
names ours.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from training.errors import DEBUG_ENV, DEBUG_FLAG

C = TypeVar("C")


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


def _convert(name: str, annotation: Any, value: Any) -> Any:
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
    return [_convert(name, kind, v) for v in items]


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


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def foreign_flag(cls: type, name: str) -> str | None:
    """The error for a flag or key ``name`` of another tool (cls.FOREIGN_FLAGS); None if it is not one."""
    hint = getattr(cls, "FOREIGN_FLAGS", {}).get(name)
    if hint is None or name in {f.name for f in dataclasses.fields(cls)}:
        return None
    tool, ours = "diffusers'", hint
    if hint.startswith("sd-scripts: "):  # one of kohya's sd-scripts' flags
        tool, ours = "sd-scripts'", hint.removeprefix("sd-scripts: ")
    if ours.startswith("--"):
        return f"--{name} is {tool} name; sdlite's is {ours}"
    return f"--{name} is a flag of diffusers' training scripts that sdlite has no equivalent of: {hint}"


def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from a dict, converting each value to its field's type; unknown keys fail."""
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:  # YAML reads `1:`, `on:` or `null:` as a number, a boolean or None
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} ({type(key).__name__}) is not a setting name: write "
                              "the setting's name, quoted if it reads as a number or true/false")  # fmt: skip
    unknown = sorted(set(values) - known)
    if unknown:
        foreign = [message for message in map(lambda k: foreign_flag(cls, k), unknown) if message]
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}"
            + "".join(f"; {message}" for message in foreign)
            + f"; known keys: {sorted(known)}"
        )
    return cls(**{k: _convert(k, hints[k], v) for k, v in values.items()})


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


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """{line: (comment text, whether the comment is the whole line)} of Python source."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = (token.string.lstrip("#").strip(), token.line.lstrip().startswith("#"))
    return found


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (section, description)} read from the comments of the dataclass's source and its bases'.

    A field's description is its trailing comment (over all its lines); its section is the comment
    line(s) last seen above it. A subclass that redeclares a field (to change its default) keeps the
    base's section and, unless it writes its own comment, the base's description. Without the source
    (a frozen or .pyc-only install) the fields have no description.
    """
    docs: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments = _comments(source)
        section, previous_end = "", 0
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above = [comments[n] for n in range(previous_end + 1, node.lineno) if n in comments]
                if any(whole for _, whole in above):
                    section = " ".join(text for text, whole in above if whole)
                own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
                text = " ".join(text for text, whole in own if not whole)
                base_section, base_text = docs.get(node.target.id, (section, ""))
                docs[node.target.id] = (base_section, text or base_text)
            previous_end = node.end_lineno
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: doc for name, doc in docs.items() if name in names}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """A ``--name`` flag per field, described by its comment and grouped by its section."""
    # allow_abbrev=False: a misspelt or shortened flag fails instead of setting some other key.
    parser = argparse.ArgumentParser(description=description or cls.__doc__, allow_abbrev=False,
                                     usage="%(prog)s [--config FILE] [--key value ...]")  # fmt: skip
    parser.add_argument("--config", help="YAML file of key: value pairs; flags override it")
    debug = f"show an error's traceback, not only its one-line message (or set {DEBUG_ENV}=1)"
    parser.add_argument(DEBUG_FLAG, action="store_true", help=debug)  # training/errors.py reads it
    docs, groups = field_docs(cls), {}
    for f in dataclasses.fields(cls):
        section, text = docs.get(f.name, ("", ""))
        title, _, about = section.partition(":")  # "Data: what it may be" -> title "Data"
        if title not in groups:
            groups[title] = parser.add_argument_group(title or None, about.strip() or None)
        help_text = f"{text} (default: {_default(f)})".strip().replace("%", "%%")  # argparse %-formats
        # Values stay strings here and are converted once, with the YAML's, in from_dict.
        groups[title].add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Defaults of ``cls``, then the ``--config`` YAML file, then the ``--key value`` flags."""
    from training.foreign_flags import read_as_ours  # diffusers' and kohya's flags, every problem at once

    parser = build_parser(cls)
    try:
        argv = read_as_ours(cls, sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        parser.error(str(e))
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    path = args.pop("config", None)
    values = load_yaml(path) if path else {}
    values.update(args)
    return from_dict(cls, values, source=path or "command line")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
