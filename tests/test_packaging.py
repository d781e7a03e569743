"""What `pip install` ships: every package folder of the repository, each under its folder's name."""

from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_each_package_installs_under_its_folders_name_so_imports_lead_to_files():
    assert "package-dir" not in _setuptools()


def test_every_package_folder_is_listed_so_a_wheel_does_not_drop_it():
    folders = {
        "sdlite": ROOT / "sdlite",
        "pipelines": ROOT / "pipelines",
        "training": ROOT / "training",
    }
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((name, *parts)))
    assert found == set(_setuptools()["packages"])
