"""The package's layout: the stages as folders, no import circle, no import back up the layers.

`LAYERS` is the order of the package's top-level entries (folders and the few shared modules), the order in
which the method runs: shared utilities and the config, the data, stage 1 (scoring and the split), Mixup
(pairing and the loss), the trainer, evaluation, the commands. A module may import any module of a layer below
its own, and modules of its own layer as long as that makes no circle; the root's lazy exports are exempt.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "sftmix"
LAYERS = [
    "errors", "io_utils", "run_lock", "distributed", "preemption", "sftmix_config", "head",  # shared
    "data", "stage1", "mixup", "sftmix_trainer", "bema", "evaluation", "cli",
]  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


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


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_entry_is_a_layer():
    entries = {
        p.stem for p in PACKAGE.iterdir() if p.name != "__init__.py" and (p.suffix == ".py" or p.is_dir())
    }
    entries.discard("__pycache__")
    assert entries == set(LAYERS), (entries - set(LAYERS), set(LAYERS) - entries)


@pytest.mark.parametrize("name", [m for m in MODULES if m], ids=str)
def test_imports_only_go_down_the_layers(name):
    upward = sorted(m for m in _imports(MODULES[name]) if m and _layer(m) > _layer(name))
    assert not upward, f"sftmix.{name} imports {upward}, which are above it"


def test_no_import_circle():
    graph = {name: {m for m in _imports(path) if m} for name, path in MODULES.items() if name}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            assert state.get(nxt) != 1, f"import circle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_public_names_and_the_docs_imports_resolve():
    import sftmix

    for name in sftmix.__all__:
        assert getattr(sftmix, name) is not None
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    imports = [
        i for t in texts for i in re.findall(r"^from (sftmix[\w.]*) import ([\w, ]+)$", t.read_text(), re.M)
    ]
    assert imports
    for module, names in imports:
        for name in names.split(","):
            assert hasattr(importlib.import_module(module), name.strip()), f"{module}.{name.strip()}"
