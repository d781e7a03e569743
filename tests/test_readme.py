"""The README names tests as evidence: each name it gives must be a test that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tests of diffusers' own suite that the README names (the ones that cannot pass outside diffusers).
DIFFUSERS_TESTS = {"test_encode_prompt_works_in_isolation", "test_stable_diffusion_long_prompt"}


def test_every_test_the_readme_names_exists():
    named = set(re.findall(r"`(test_[a-z0-9_]+)(?:…)?`", (ROOT / "README.md").read_text()))
    assert len(named) > 20  # the reliability table names its tests
    defined = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    missing = sorted(
        n
        for n in named - DIFFUSERS_TESTS
        if n not in files and not re.search(rf"def {re.escape(n)}\w*\(", defined)
    )
    assert not missing, f"the README names tests that do not exist: {missing}"
