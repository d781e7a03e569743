"""The README and the docs/ pages name tests as evidence: each name they give must be a test that
exists, and each page they link to must be there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Tests of diffusers' own suite that the docs name (the ones that cannot pass outside diffusers).
DIFFUSERS_TESTS = {"test_encode_prompt_works_in_isolation", "test_stable_diffusion_long_prompt"}


def named_tests(page: Path) -> set[str]:
    """Test names in backticks, such as `test_foo` or `test_foo_…` (a name shortened by its prefix)."""
    return set(re.findall(r"`(test_[a-z0-9_]+)(?:…)?`", page.read_text()))


def test_every_test_the_readme_and_docs_name_exists():
    defined = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    missing = {
        page.relative_to(ROOT).as_posix(): sorted(
            n
            for n in named_tests(page) - DIFFUSERS_TESTS
            if n not in files and not re.search(rf"def {re.escape(n)}\w*\(", defined)
        )
        for page in PAGES
    }
    missing = {page: names for page, names in missing.items() if names}
    assert not missing, f"pages name tests that do not exist: {missing}"


def test_the_reliability_table_names_its_tests():
    # The table is evidence only if each row names its tests; the pattern above must still see them.
    assert len(named_tests(ROOT / "docs" / "reliability.md")) > 20


def test_every_page_the_readme_and_docs_link_to_exists():
    broken = [
        f"{page.relative_to(ROOT).as_posix()} -> {target}"
        for page in PAGES
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken, f"links to files that do not exist: {broken}"
