"""The packages stack without cycles: sdlite (the library) <- sdlite.pipelines <- sdlite.training.

pipelines/ and training/ sit at the repository's top level and install as sdlite.pipelines and
sdlite.training; the library in sdlite/ imports neither.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"sdlite": "sdlite", "pipelines": "sdlite.pipelines", "training": "sdlite.training"}
# What each layer (by folder) may import of the other layers.
ALLOWED = {"sdlite": set(), "pipelines": {"sdlite"}, "training": {"sdlite", "pipelines"}}


def _layer(module: str) -> str | None:
    for folder in ("pipelines", "training"):
        name = LAYERS[folder]
        if module == name or module.startswith(name + "."):
            return folder
    if module == "sdlite" or module.startswith("sdlite."):
        return "sdlite"
    return None


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules |= {f"{node.module}.{a.name}" for a in node.names}
    return {layer for m in modules if (layer := _layer(m))}


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ has no modules"
    for path in files:
        bad = _imported_layers(path) - ALLOWED[folder] - {folder}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("old", ["pipelines", "training"])
def test_no_module_imports_the_old_top_level_names(old):
    for path in sorted(ROOT.glob("*/**/*.py")):
        if ".venv" in path.parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not any(n == old or n.startswith(old + ".") for n in names), (
                f"{path.relative_to(ROOT)} imports {old!r}: import sdlite.{old} (installed under sdlite)"
            )
