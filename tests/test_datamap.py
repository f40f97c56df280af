"""The data map picture of stage 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from sftmix.errors import SFTMixError
from sftmix.io_utils import atomic_write_jsonl
from sftmix.stage1.datamap import draw_datamap
from sftmix.stage1.splits import confidence_scores, median_split, variability_scores


def _write_dynamics(path, n=200, c=3, seed=0, heavy_tail=False):
    rng = np.random.default_rng(seed)
    perps = 1 + rng.gamma(2.0, 3.0, size=(n, c))
    if heavy_tail:
        perps[:5] *= 500
    conf = confidence_scores(perps)
    split = median_split(conf)
    var = variability_scores(perps)
    rows = [
        {
            "id": f"ex{i}",
            "perplexities": perps[i].tolist(),
            "confidence": float(conf[i]),
            "variability": float(var[i]),
            "split": "confident" if split[i] else "unconfident",
        }
        for i in range(n)
    ]
    atomic_write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("heavy_tail", [False, True])
def test_draw_datamap_writes_a_png(tmp_path, heavy_tail):
    dynamics = _write_dynamics(tmp_path / "dynamics.jsonl", heavy_tail=heavy_tail)
    out = draw_datamap(dynamics, tmp_path / "sub" / "map.png", title="test map")
    assert out == tmp_path / "sub" / "map.png"
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    # Both split colours are present: more than one distinct colour in the plot.
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10
    assert not list(tmp_path.joinpath("sub").glob(".*tmp"))  # no temporary file left behind


def test_title_from_summary(tmp_path, monkeypatch):
    dynamics = _write_dynamics(tmp_path / "dynamics.jsonl", n=11)
    (tmp_path / "dynamics_summary.json").write_text(json.dumps({"reference_model": "/x/SmolLM2-135M"}))
    titles = []
    from matplotlib.figure import Figure

    real = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: titles.append(t) or real(self, t, **kw))
    draw_datamap(dynamics, tmp_path / "map.png")
    assert "SmolLM2-135M" in titles[0]
    assert "N = 11" in titles[0] and "C = 3" in titles[0] and "5 confident, 6 unconfident" in titles[0]


def test_bad_dynamics_files(tmp_path):
    with pytest.raises(SFTMixError, match="not found"):
        draw_datamap(tmp_path / "missing.jsonl", tmp_path / "map.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"confidence": -1.0, "split": "confident", "perplexities": [1.0]}\n{"split": "x"}\n')
    with pytest.raises(SFTMixError, match="line 2: missing field 'confidence'"):
        draw_datamap(bad, tmp_path / "map.png")
    bad.write_text('{"confidence": \n')
    with pytest.raises(SFTMixError, match="line 1: malformed JSON"):
        draw_datamap(bad, tmp_path / "map.png")
    bad.write_text('{"confidence": -1.0, "split": "confident", "perplexities": [1.0]}\n[-2.0]\n')
    with pytest.raises(SFTMixError, match="line 2: expected a JSON object, got list"):
        draw_datamap(bad, tmp_path / "map.png")
