"""The packages stack without cycles: sdlite (the library) <- pipelines <- training.

Each package is imported by its folder's name, so an import's name leads to its file. The library in
sdlite/ imports neither pipelines nor training; its ``__init__`` is the public API and names the
pipelines as strings, imported on first use. And no two modules import each other, by any path: the
module import graph, read from the source, has no cycle.
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"sdlite": "sdlite", "pipelines": "pipelines", "training": "training"}
# What each layer (by folder) may import of the other layers.
ALLOWED = {"sdlite": set(), "pipelines": {"sdlite"}, "training": {"sdlite", "pipelines"}}


def _layer(module: str) -> str | None:
    for folder, name in LAYERS.items():
        if module == name or module.startswith(name + "."):
            return folder
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


# The one exception: the `sdlite` command's dispatcher is the library's (its name leads to sdlite/cli.py),
# and its commands run code of the layers above. It may import them inside function bodies only, that
# is when a command runs; importing sdlite.cli, as importing any of sdlite, loads no upper layer.
DISPATCHER = Path("sdlite/cli.py")


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ has no modules"
    for path in files:
        if path.relative_to(ROOT) == DISPATCHER:
            continue  # test_the_cli_dispatcher_reaches_the_upper_layers_only_when_a_command_runs
        bad = _imported_layers(path) - ALLOWED[folder] - {folder}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_cli_dispatcher_reaches_the_upper_layers_only_when_a_command_runs():
    tree = ast.parse((ROOT / DISPATCHER).read_text())
    at_import = {
        getattr(node, "module", None) or node.names[0].name for node in _imports_at_import_time(tree)
    }
    upper = sorted(m for m in at_import if _layer(m) not in (None, "sdlite"))
    assert not upper, (
        f"{DISPATCHER} imports {upper} at import time: import them in the function that needs them"
    )


@pytest.mark.parametrize("old", ["sdlite.pipelines", "sdlite.training"])
def test_no_module_imports_a_name_that_leads_to_no_file(old):
    """pipelines/ and training/ were once installed as sdlite.pipelines and sdlite.training: a name a
    reader, grep and import-mapping tools could not follow to its file."""
    for path in sorted(ROOT.glob("*/**/*.py")):
        if ".venv" in path.parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not any(n == old or n.startswith(old + ".") for n in names), (
                f"{path.relative_to(ROOT)} imports {old!r}: import {old.removeprefix('sdlite.')}"
            )


def test_every_name_the_public_api_exports_leads_to_its_module():
    import sdlite

    for name, module in sdlite._EXPORTS.items():
        assert _layer(module), f"sdlite.{name} comes from {module}, which is none of our packages"
        assert getattr(sdlite, name) is getattr(importlib.import_module(module), name)


# ---- the module import graph ------------------------------------------------------------------------
# Counted: every import that runs when the module is imported: at module level, in class bodies and
# inside if/try/with blocks, including ``if TYPE_CHECKING:`` (a cycle there is still two modules that
# depend on each other, and the first refactor that needs the name at run time makes it real).
# Not counted: imports inside a function body. They run on call, not on import, and are how a
# module defers a heavy import (the CLI's subcommands import torch only when they run).


def _module_files(roots: dict[Path, str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under each root folder (mapped to its package name)."""
    files = {}
    for folder, package in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _imports_at_import_time(tree: ast.AST):
    """The Import and ImportFrom nodes of a module outside function bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            yield from _imports_at_import_time(node)


def import_graph(roots: dict[Path, str]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at import time (see the comment above)."""
    files = _module_files(roots)

    def ours(name: str) -> str | None:  # the longest prefix that is one of our modules
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in _imports_at_import_time(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {ours(a.name) for a in node.names}
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from pkg.mod import name``, pkg.mod.
            targets |= {ours(f"{base}.{a.name}") for a in node.names}
        graph[module] = targets - {None, module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None (depth-first search, grey/black)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_through_other_modules():
    graph = import_graph({ROOT / folder: name for folder, name in LAYERS.items()})
    assert "sdlite.latents" in graph["sdlite.likelihood"]  # the graph sees our imports
    assert len(graph) > 25
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}; move what both need into a third module"


def test_the_graph_sees_cycles_through_type_checking_relative_and_from_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\n"
    )
    (pkg / "c.py").write_text("import pkg.a\nclass C:\n    pass\n")
    graph = import_graph({pkg: "pkg"})
    assert graph["pkg.sub"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    # Deferred into a function, the import runs on call: no cycle at import time.
    (pkg / "c.py").write_text("def late():\n    import pkg.a\n")
    assert find_cycle(import_graph({pkg: "pkg"})) is None
