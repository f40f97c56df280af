"""Result tables: one model's ``eval.json`` as Markdown, and several side by side with their deltas.

The side-by-side table is laid out like the paper's (one row per task and metric, one column per model) and
adds, for every model after the first, its difference to the first (``NTP -> SFTMix`` when the baseline is
listed first).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import SFTMixError

Results = dict[str, dict[str, Any]]
"""``{task: {metric: value}}``, the content of ``eval.json``."""


def load_results(path: str | Path) -> Results:
    """Read an ``eval.json`` written by ``sftmix eval``, checking its ``{task: {metric: value}}`` shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SFTMixError(f"eval file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise SFTMixError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SFTMixError(f"{path}: not an eval.json ({{task: {{metric: value}}}})")
    return data


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _delta(value: Any, base: Any) -> str:
    numeric = (int, float)
    if not isinstance(value, numeric) or not isinstance(base, numeric) or isinstance(value, bool):
        return ""
    diff = value - base
    if isinstance(diff, float) and math.isnan(diff):
        return "nan"
    return f"{diff:+d}" if isinstance(diff, int) else f"{diff:+.4f}"


def _rows(results: list[Results]) -> list[tuple[str, str]]:
    """Union of (task, metric) pairs, in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for result in results:
        for task, metrics in result.items():
            for metric in metrics:
                seen.setdefault((task, metric), None)
    return list(seen)


def results_table(results: Results) -> str:
    """One model's results as a Markdown table.

    >>> print(results_table({"medmcqa": {"acc": 0.25, "n": 4}}))
    | task | metric | value |
    | --- | --- | --- |
    | medmcqa | acc | 0.2500 |
    | medmcqa | n | 4 |
    """
    lines = ["| task | metric | value |", "| --- | --- | --- |"]
    lines += [f"| {task} | {metric} | {_cell(results[task][metric])} |" for task, metric in _rows([results])]
    return "\n".join(lines)


def comparison_table(named_results: dict[str, Results]) -> str:
    """Several models side by side, with each later model's delta to the first, as a Markdown table.

    >>> print(comparison_table({"ntp": {"pubmedqa": {"acc": 0.5}}, "sftmix": {"pubmedqa": {"acc": 0.75}}}))
    | task | metric | ntp | sftmix | Δ sftmix |
    | --- | --- | --- | --- | --- |
    | pubmedqa | acc | 0.5000 | 0.7500 | +0.2500 |
    """
    if not named_results:
        raise SFTMixError("nothing to compare")
    names = list(named_results)
    results = list(named_results.values())
    header = ["task", "metric", *names, *(f"Δ {name}" for name in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for task, metric in _rows(results):
        values = [r.get(task, {}).get(metric) for r in results]
        cells = [task, metric, *(_cell(v) for v in values), *(_delta(v, values[0]) for v in values[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unique_names(paths: list[str]) -> list[str]:
    """Short column names for models or files: the last path component (the folder of an ``eval.json``),
    numbered when two are the same.

    >>> unique_names(["runs/ntp/eval.json", "runs/sftmix/eval.json"])
    ['ntp', 'sftmix']
    """
    names = []
    for path in paths:
        parts = [p for p in Path(path).parts if p not in ("/", ".")]
        if parts and parts[-1] == "eval.json":
            parts = parts[:-1]
        names.append(parts[-1] if parts else str(path))
    counts: dict[str, int] = {}
    unique = []
    for name in names:
        counts[name] = counts.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name}-{counts[name]}")
    return unique
