"""The parts of a config: a ``Section`` of keys that checks itself, and a ``Config`` made of sections.

A config is a dataclass whose fields are its sections, each a dataclass of keys (``Section``) that
checks itself (``problems``); ``Config.check`` reports every section's problems, and those of settings
of several sections together, at once, before anything is built or read. A key is declared with
``option``: its default and its ``--help`` text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

from training.checks import ConfigError


def option(default: Any, help: str) -> Any:
    """A key of a section: its default and its ``--help`` text (a list default is copied per instance)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=functools.partial(list, default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Section:
    """A part of a config: some keys and what is wrong with them. A subclass may give a key of its base
    another default by redeclaring it without help text; the base's help is then shown."""

    title: ClassVar[str] = ""  # its group's title in --help
    about: ClassVar[str] = ""  # a line under the title

    def problems(self) -> list[str]:
        """What is wrong with this section's settings, in words; empty when they are fine."""
        return []


@dataclasses.dataclass
class Config:
    """A trainer's config: its fields are its sections. ``problems`` gathers every section's and the
    checks that read several sections (``cross_problems``); ``check`` raises them all at once."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = {}

    def sections(self) -> list[Section]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def cross_problems(self) -> list[str]:
        """What is wrong with settings of several sections together."""
        return []

    def problems(self) -> list[str]:
        problems = [problem for part in self.sections() for problem in part.problems()]
        return problems + self.cross_problems()

    def check(self) -> None:
        """ConfigError listing every problem, one a line, before anything is built or read."""
        problems = self.problems()
        if problems:
            raise ConfigError("\n".join(f"bad training config: {problem}" for problem in problems))


def section(kind: type[Section]):
    """A config's field holding a section, built with the section's defaults."""
    return dataclasses.field(default_factory=kind)
