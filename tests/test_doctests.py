"""The runnable examples in the package's docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import sftmix

ROOT = Path(sftmix.__file__).parent


def _has_examples(name: str) -> bool:
    """Whether the module's source shows a runnable example (``>>>``), read without importing it."""
    parts = name.split(".")[1:]
    path = ROOT.joinpath(*parts).with_suffix(".py")
    return (path if path.exists() else ROOT.joinpath(*parts, "__init__.py")).read_text().count(">>> ") > 0


MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(sftmix.__path__, prefix="sftmix.")
    if not m.name.endswith("__main__") and _has_examples(m.name)
)


def test_only_modules_with_examples_are_collected():
    assert "sftmix.errors" not in MODULES and "sftmix.stage1.splits" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0
