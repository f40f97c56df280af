"""benchmarks/gpu/device_check.py: its CPU mode end to end (as CI can run it), and its bookkeeping."""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
import device_check  # noqa: E402  (a script directory, not a package)


def test_cpu_mode_runs_the_tests_and_every_kind_and_writes_the_report(tmp_path):
    """What a user runs, in a subprocess: the gpu tests (all skipped without CUDA), then each kind of the
    benchmark in its own process; one JSON with every field the device run fills."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu/device_check.py", "--cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["mode"] == "cpu"
    assert {"python", "torch", "transformers", "trl", "datasets", "peft", "liger-kernel"} <= report[
        "versions"
    ].keys()
    assert report["versions"]["trl"]

    tests = report["tests"]
    assert tests["returncode"] == 0 and "-m gpu" in tests["command"]
    assert tests["counts"]["failed"] == 0 and tests["counts"]["passed"] == 0  # no CUDA: every gpu test skips
    assert tests["counts"]["skipped"] == len(tests["cases"]) > 0
    assert all("[cuda" in c["name"] or "liger" in c["name"] for c in tests["cases"])

    bench = report["benchmark"]
    assert bench["dtype"] == "fp32" and bench["rounds_done"] == 1 and bench["peak_tflops"] is None
    assert len(bench["runs"]) == len(device_check.CPU_KINDS) and not any("error" in r for r in bench["runs"])
    (shape,) = bench["shapes"].values()
    assert set(shape["kinds"]) == set(device_check.CPU_KINDS) and not shape["errors"]
    assert (
        shape["analytic_bound"] > 1 and 0 < shape["matmul_params"] < shape["params"]
    )  # untied: less the input
    for kind in shape["kinds"].values():
        assert kind["median_step_s"] > 0 and len(kind["step_times"]) == bench["steps"]
        assert kind["tokens_per_s"] == pytest.approx(bench["batch"] * bench["seq"] / kind["median_step_s"])
        assert kind["peak_memory_mb"] > 0 and all(math.isfinite(x) for x in kind["train_loss"])
        assert kind["mfu"] is None  # no known peak for a CPU
    assert shape["kinds"]["trl_chunked_nll"]["loss_type"] in (
        "nll",
        "chunked_nll",
    )  # TRL 1.16: an alias of nll
    assert shape["ratios"]["sftmix_over_ntp"] > 0 and shape["ratios"]["sftmix_over_trl_liger"] is None
    assert isinstance(shape["sftmix_over_ntp_within_bound"], bool)
    assert "| tiny-qwen2 | sftmix |" in done.stdout and "analytic bound" in done.stdout


def test_docstring_examples():
    result = doctest.testmod(device_check, optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


@pytest.mark.parametrize(
    ("shape", "params", "matmul_params"),
    [("smollm2-135m", 134_515_008, 134_515_008), ("qwen2.5-1.5b", 1_543_714_304, 1_543_714_304)],
)
def test_device_shapes_are_the_published_models(shape, params, matmul_params):
    """The configs the device builds have the published parameter counts (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(device_check.build_config(shape))
    assert sum(p.numel() for p in model.parameters()) == params
    assert device_check.matmul_parameters(model) == matmul_params  # tied: the embedding is the head


def test_summary_ratios_mfu_and_failed_kinds():
    def run(kind: str, step: float, memory: float) -> dict:
        return {
            "kind": kind, "shape": "s", "step_times": [step, step], "peak_memory_mb": memory, "train_loss": 1.0,
            "loss_type": "nll", "params": 100, "matmul_params": 80, "flops_per_token": 600, "analytic_bound": 1.1,
        }  # fmt: skip

    runs = [run("ntp", 2.0, 10.0), run("sftmix", 2.1, 12.0), run("trl_nll", 3.0, 11.0), run("ntp", 2.0, 9.0)]
    runs.append({"kind": "trl_liger", "shape": "s", "error": "CUDA out of memory"})
    (entry,) = device_check.summarise(runs, batch=2, seq=5, peak=1e-9).values()  # 1000 FLOP/s
    assert entry["ratios"]["sftmix_over_ntp"] == pytest.approx(1.05)
    assert entry["ratios"]["ntp_over_trl_nll"] == pytest.approx(2 / 3)
    assert entry["ratios"]["sftmix_over_trl_liger"] is None and entry["errors"] == {
        "trl_liger": ["CUDA out of memory"]
    }
    assert entry["ratios"]["memory_sftmix_over_ntp"] == pytest.approx(1.2)  # the peak over both rounds of ntp
    assert len(entry["kinds"]["ntp"]["step_times"]) == 4 and entry["sftmix_over_ntp_within_bound"]
    assert entry["kinds"]["ntp"]["mfu"] == pytest.approx(6 * 80 * 10 / 2.0 / 1000)
    assert entry["kinds"]["ntp"]["mfu_with_attention"] == pytest.approx(600 * 10 / 2.0 / 1000)


def test_output_path(tmp_path):
    assert (
        device_check.output_path(str(tmp_path), "NVIDIA H100 80GB HBM3")
        == tmp_path / "gpu_nvidia_h100_80gb_hbm3.json"
    )
    assert device_check.output_path(f"{tmp_path}/new/", "cpu") == tmp_path / "new" / "gpu_cpu.json"
    assert device_check.output_path(str(tmp_path / "x.json"), "cpu") == tmp_path / "x.json"
    assert device_check.output_path(None, "cpu").parent == REPO / "benchmarks" / "results"


def test_liger_kinds_are_refused_in_cpu_mode(capsys):
    with pytest.raises(SystemExit):
        device_check.main(["--cpu", "--kinds", "ntp", "trl_liger"])
    assert "Liger" in capsys.readouterr().err
