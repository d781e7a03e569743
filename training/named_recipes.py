"""The shipped recipes, by name: ``--config tiny-lora`` is configs/tiny-lora.yaml from any folder.

The recipes live in the repository's ``configs/``; ``training/recipes`` links to it, so a wheel ships
them as the training package's data (pyproject.toml) and a source checkout finds them either way.
A recipe reads its models and data from paths relative to the folder it runs in; a comment line

    # needs: runs/demo/model <- make demo (or: sdlite demo --out runs/demo)

names what makes such a path, so that a run missing it says how to make it instead of failing on the
first read (``missing_paths``).

This module imports neither torch nor any model library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
FOLDERS = (PACKAGE / "recipes", PACKAGE.parent / "configs")  # a wheel's package data; a checkout's
PATH_KEYS = ("pretrained", "vae_path", "train_data_dir", "val_data_dir", "instance_data_dir", "eval_data_dir")
_NEEDS = re.compile(r"^#\s*needs:\s*(\S+)\s*<-\s*(.+?)\s*$")


def names() -> list[str]:
    """The recipes shipped, by name."""
    for folder in FOLDERS:
        if folder.is_dir():
            return sorted(path.stem for path in folder.glob("*.yaml"))
    return []


def find(config: str) -> Path | None:
    """The shipped recipe ``config`` names (``tiny-lora`` or ``tiny-lora.yaml``), unless a file of that
    name is here; None when it names none."""
    if Path(config).is_file() or "/" in config or "\\" in config:
        return None
    name = config if config.endswith(".yaml") else f"{config}.yaml"
    for folder in FOLDERS:
        if (folder / name).is_file():
            return folder / name
    return None


def needs(recipe: Path) -> dict[str, str]:
    """{path: what makes it} from the recipe's ``# needs: PATH <- COMMAND`` comment lines."""
    found = {}
    for line in recipe.read_text(encoding="utf-8", errors="replace").splitlines():
        if match := _NEEDS.match(line.strip()):
            found[match.group(1).rstrip("/")] = match.group(2)
    return found


def missing_paths(recipe: Path, values: dict[str, Any], given: set[str]) -> list[str]:
    """One line for each path of a recipe (or any config file: ``values`` are its settings) that a flag in
    ``given`` does not replace and that is not here, naming what makes it and the flag that replaces it."""
    made_by = needs(recipe)
    problems = []
    for key in PATH_KEYS:
        value = values.get(key)
        if key in given or not isinstance(value, str) or value.lower() in ("none", "null"):
            continue
        if Path(value).expanduser().exists():
            continue
        how = next((c for p, c in made_by.items() if value == p or value.startswith(p + "/")), None)
        make = f"make it with: {how}; " if how else ""
        problems.append(f"recipe {recipe.stem}: {key} {value!r} is not in {str(Path.cwd())!r} (paths are "
                        f"relative to the folder you run in): {make}or give --{key} PATH")  # fmt: skip
    return problems
