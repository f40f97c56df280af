"""The data map of stage 1, in the style of Dataset Cartography (Swayamdipta et al., 2020).

Each training example is a point: x = its variability across the C reference checkpoints (the std of its
perplexity), y = its SFTMix confidence (minus its mean perplexity), coloured by the confident / unconfident
split, with the marginal histograms of both axes. Confidence is heavy-tailed (a few examples have huge
perplexities), so an axis switches to a symmetric-log scale when its values span more than two decades.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..io_utils import atomic_write_bytes
from .splits import CONFIDENT, UNCONFIDENT, read_dynamics

MAX_POINTS = 100_000
"""At most this many points are drawn (a fixed random subset); the histograms always use every example."""
COLORS = {CONFIDENT: "#1f77b4", UNCONFIDENT: "#d62728"}


def _wide_range(values: np.ndarray) -> bool:
    magnitudes = np.abs(values[values != 0])
    return len(magnitudes) > 0 and magnitudes.max() / max(magnitudes.min(), 1e-12) > 100


def draw_datamap(dynamics_path: str | Path, output_path: str | Path, title: str | None = None) -> Path:
    """Draw the data map of a ``dynamics.jsonl`` to a PNG file; return its path.

    Args:
        dynamics_path: A ``dynamics.jsonl`` written by `sftmix.cli.dynamics.run_dynamics` (read with `sftmix.stage1.splits.read_dynamics`) (fields ``confidence``,
            ``split``, ``perplexities`` and, if present, ``variability``).
        output_path: The PNG to write (atomically; parent directories are created).
        title: First line of the title; the second always states N, C and the split sizes. When omitted, the
            reference model named in a ``dynamics_summary.json`` next to the dynamics file is used.
    """
    # The Agg canvas draws without a display and without touching pyplot's global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dynamics_path, output_path = Path(dynamics_path), Path(output_path)
    rows = read_dynamics(dynamics_path, require=("confidence", "split", "perplexities"))
    confidence = np.array([row["confidence"] for row in rows], dtype=np.float64)
    variability = np.array(
        [
            row["variability"] if "variability" in row else np.std(row["perplexities"] or [0.0])
            for row in rows
        ],
        dtype=np.float64,
    )
    split = np.array([row["split"] for row in rows])
    num_checkpoints = len(rows[0]["perplexities"])

    if title is None:
        summary_path = dynamics_path.with_name("dynamics_summary.json")
        model = None
        if summary_path.is_file():
            model = json.loads(summary_path.read_text(encoding="utf-8")).get("reference_model")
        title = f"SFTMix data map{f' of {Path(model).name}' if model else ''}"
    counts = {name: int((split == name).sum()) for name in COLORS}
    subtitle = (
        f"N = {len(rows):,} examples, C = {num_checkpoints} checkpoints; "
        f"{counts[CONFIDENT]:,} confident, {counts[UNCONFIDENT]:,} unconfident"
    )
    shown = np.arange(len(rows))
    if len(rows) > MAX_POINTS:
        shown = np.sort(np.random.default_rng(0).choice(len(rows), MAX_POINTS, replace=False))
        subtitle += f" ({MAX_POINTS:,} points drawn)"

    fig = Figure(figsize=(8, 7), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    size = float(np.clip(2000 / np.sqrt(len(shown)), 2, 30))
    for name, color in COLORS.items():
        idx = shown[split[shown] == name]
        ax.scatter(
            variability[idx],
            confidence[idx],
            s=size,
            c=color,
            alpha=0.5,
            linewidths=0,
            rasterized=True,
            label=f"{name} ({counts[name]:,})",
        )
    if counts[CONFIDENT] and counts[UNCONFIDENT]:  # the median split's boundary
        boundary = (confidence[split == CONFIDENT].min() + confidence[split == UNCONFIDENT].max()) / 2
        ax.axhline(boundary, color="0.3", linestyle="--", linewidth=1, label="median split")
    if _wide_range(confidence):
        ax.set_yscale("symlog", linthresh=1.0)
    if _wide_range(variability):  # log scale; symlog only if some example has exactly zero variability
        positive = variability[variability > 0]
        if len(positive) == len(variability):
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=float(np.quantile(positive, 0.05)) if len(positive) else 1.0)
    ax.set_xlabel(f"variability: std of perplexity across the {num_checkpoints} checkpoints")
    ax.set_ylabel("confidence: − mean perplexity (higher = more confident)")
    ax.legend(loc="best", fontsize=8, markerscale=max(1.0, 20 / size))
    ax.grid(alpha=0.3)

    # Marginal histograms, stacked by split, on the main axes' scales.
    for data, hist_ax, orientation in ((variability, top, "vertical"), (confidence, right, "horizontal")):
        lo, hi = data.min(), data.max()
        scale = ax.get_xscale() if orientation == "vertical" else ax.get_yscale()
        if scale == "log":
            edges = np.geomspace(lo, hi, 41)
        elif scale == "symlog":
            edges = np.sinh(np.linspace(np.arcsinh(lo), np.arcsinh(hi), 41))
        else:
            edges = np.linspace(lo, hi if hi > lo else lo + 1, 41)
        hist_ax.hist(
            [data[split == name] for name in COLORS],
            bins=edges,
            stacked=True,
            color=list(COLORS.values()),
            alpha=0.7,
            orientation=orientation,
        )
        hist_ax.tick_params(labelbottom=False, labelleft=False)
        hist_ax.set_xlabel("examples" if orientation == "horizontal" else "")
        hist_ax.set_ylabel("examples" if orientation == "vertical" else "")
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(output_path, buffer.getvalue())
    return output_path
