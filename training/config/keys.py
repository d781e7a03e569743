"""A config's keys, read flat from a YAML file and ``--key value`` flags, and written back flat.

Users write the keys flat: every key belongs to exactly one section, so ``max_steps: 200`` needs no
section name. The sections hold the only copy of the defaults; the YAML file and then the command line
override them, in that order. A key's type comes from its annotation, so a misspelt key or a value of
the wrong type fails at start-up naming it; its ``--help`` text is the field's ``metadata["help"]``, and
its section's ``title`` and ``about`` head its group in ``--help``. diffusers' and kohya's flags are read
as ours first (training/foreign_flags.py); a config's ``FOREIGN_FLAGS`` turn another tool's key in a
YAML file into an error that names ours. A plain dataclass of keys (no sections) loads the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from training.checks import ConfigError, convert, load_yaml
from training.config.sections import Section
from training.errors import DEBUG_ENV, DEBUG_FLAG

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    section: str | None  # the config's field that holds it; None in a plain dataclass of keys
    annotation: Any
    field: dataclasses.Field
    help: str
    group: type | None  # the section class, whose title and about head the key's --help group


def _help(cls: type, name: str) -> str:
    """A key's help text: its own field's, else the nearest base class's (a redeclared default)."""
    for klass in cls.__mro__:
        found = klass.__dict__.get("__dataclass_fields__", {}).get(name)
        if found is not None and found.metadata.get("help"):
            return found.metadata["help"]
    return ""


@functools.cache
def keys(cls: type) -> dict[str, Key]:
    """Every key of a config (section by section, in order) or of a plain dataclass, by name."""
    found: dict[str, Key] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Section):
            inner = typing.get_type_hints(kind)
            for g in dataclasses.fields(kind):
                if g.name in found:
                    raise TypeError(f"{cls.__name__}: key {g.name!r} is in two sections")
                found[g.name] = Key(g.name, f.name, inner[g.name], g, _help(kind, g.name), kind)
        else:
            found[f.name] = Key(f.name, None, kind, f, _help(cls, f.name), None)
    return found


def foreign_flag(cls: type, name: str) -> str | None:
    """The error for a flag or key ``name`` of another tool (cls.FOREIGN_FLAGS); None if it is not one."""
    hint = getattr(cls, "FOREIGN_FLAGS", {}).get(name)
    if hint is None or name in keys(cls):
        return None
    tool, ours = "diffusers'", hint
    if hint.startswith("sd-scripts: "):  # one of kohya's sd-scripts' flags
        tool, ours = "sd-scripts'", hint.removeprefix("sd-scripts: ")
    if ours.startswith("--"):
        return f"--{name} is {tool} name; sdlite's is {ours}"
    return f"--{name} is a flag of diffusers' training scripts that sdlite has no equivalent of: {hint}"


def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from flat key: value pairs, each converted to its key's type; unknown keys fail."""
    known = keys(cls)
    for key in values:  # YAML reads `1:`, `on:` or `null:` as a number, a boolean or None
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} ({type(key).__name__}) is not a setting name: write "
                              "the setting's name, quoted if it reads as a number or true/false")  # fmt: skip
    unknown = sorted(set(values) - set(known))
    if unknown:
        foreign = [message for message in map(lambda k: foreign_flag(cls, k), unknown) if message]
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}"
            + "".join(f"; {message}" for message in foreign)
            + f"; known keys: {sorted(known)}"
        )
    flat, by_section = {}, {}
    for name, value in values.items():
        key = known[name]
        converted = convert(name, key.annotation, value)
        if key.section is None:
            flat[name] = converted
        else:
            by_section.setdefault(key.section, {})[name] = converted
    hints = typing.get_type_hints(cls)
    sections = {name: hints[name](**given) for name, given in by_section.items()}
    return cls(**flat, **sections)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config's keys, flat, in section order: what a YAML file or the flags would say."""
    values = dataclasses.asdict(cfg)
    return {
        name: values[key.section][name] if key.section else values[name]
        for name, key in keys(type(cfg)).items()
    }


def get(cfg: Any, name: str) -> Any:
    """The value of key ``name``, wherever its section is."""
    section = keys(type(cfg))[name].section
    return getattr(getattr(cfg, section) if section else cfg, name)


# ---- files and flags --------------------------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """A ``--key`` flag per key, described by its help text and grouped by its section."""
    # allow_abbrev=False: a misspelt or shortened flag fails instead of setting some other key.
    parser = argparse.ArgumentParser(description=description or cls.__doc__, allow_abbrev=False,
                                     usage="%(prog)s [--config FILE] [--key value ...]")  # fmt: skip
    parser.add_argument("--config", help="YAML file of key: value pairs; flags override it")
    debug = f"show an error's traceback, not only its one-line message (or set {DEBUG_ENV}=1)"
    parser.add_argument(DEBUG_FLAG, action="store_true", help=debug)  # training/errors.py reads it
    groups = {}
    for key in keys(cls).values():
        if key.group not in groups:
            title, about = (key.group.title, key.group.about) if key.group else ("", "")
            groups[key.group] = parser.add_argument_group(title or None, about or None)
        help_text = f"{key.help} (default: {_default(key.field)})".strip().replace("%", "%%")  # %-formats
        # Values stay strings here and are converted once, with the YAML's, in from_dict.
        groups[key.group].add_argument(f"--{key.name}", default=argparse.SUPPRESS, help=help_text)
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


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """{key: (its section's title, its help text)}: what ``--help`` says of each key."""
    return {name: (key.group.title if key.group else "", key.help) for name, key in keys(cls).items()}
