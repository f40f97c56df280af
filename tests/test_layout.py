"""The package's layout: no import circle, no import back up the layers, the public names resolve.

Every import between modules of ``sftmix`` (top-level and inside functions) must go to a module earlier in
`LAYERS`, the order in which the README's stage table reads: data, stage-1 scoring, the split file,
pairing, the loss, the trainer, stage 1's driver, evaluation, the drivers and the CLI.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "sftmix"
README = Path(__file__).parents[1] / "README.md"
LAYERS = [
    "errors", "io_utils", "run_lock", "distributed", "sftmix_config", "selection", "records", "data", "models", "head", "scoring",
    "splits", "datamap", "pairing", "loss", "scorers", "online", "reference", "stage1", "sftmix_trainer", "dynamics", "bema",
    "evaluation.compare", "evaluation.tasks", "evaluation.multiple_choice", "evaluation.calibration",
    "evaluation.perplexity", "evaluation.ifeval", "evaluation.generation", "evaluation.judge",
    "evaluation.alpaca_judge", "evaluation.runner", "evaluation", "pipeline", "plan", "demo", "cli", "",
]  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The ``sftmix`` modules ``path`` imports, anywhere in the file."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "sftmix":
                target = node.module.removeprefix("sftmix").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` / `from .evaluation import runner` import modules
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if (PACKAGE / f"{sub.replace('.', '/')}.py").exists() else target)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("sftmix").lstrip(".") for a in node.names if a.name.startswith("sftmix")
            }
    found.discard(name)
    return found


def test_every_module_is_placed_in_a_layer():
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(LAYERS), (modules - set(LAYERS), set(LAYERS) - modules)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: _module_name(p) or "__init__")
def test_imports_only_go_down_the_layers(path):
    name = _module_name(path)
    if name == "":  # the root's lazy exports re-export names of every layer
        return
    upward = sorted(m for m in _imports(path) if LAYERS.index(m) >= LAYERS.index(name))
    assert not upward, f"sftmix.{name} imports {upward}, which are not below it"


def test_no_module_is_over_the_size_limits():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes["sftmix_trainer"] <= 350
    assert max(sizes.values()) <= 460, max(sizes, key=sizes.get)


def test_public_names_and_the_readme_imports_resolve():
    import sftmix

    for name in sftmix.__all__:
        assert getattr(sftmix, name) is not None
    imports = re.findall(r"^from (sftmix[\w.]*) import ([\w, ]+)$", README.read_text(), flags=re.M)
    assert imports
    for module, names in imports:
        for name in names.split(","):
            assert hasattr(importlib.import_module(module), name.strip()), f"{module}.{name.strip()}"
