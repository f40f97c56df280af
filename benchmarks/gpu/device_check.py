"""The device check: SFTMix's correctness on CUDA, and its cost against TRL and Liger, in one short call.

On a CUDA machine (about 5 minutes on an H100, an estimate: it has not run on a GPU yet; the whole device call
is in ``benchmarks/gpu/README.md``):

1. the tests marked ``gpu`` (``tests/test_gpu.py``) in a pytest subprocess: on CUDA in bf16 and fp32,
   ``mixup_weight=0`` against ``trl.SFTTrainer``, the fused head against full-logits cross-entropy, SFTMix
   training with and without gradient checkpointing and with LoRA, and Liger's kernels;
2. the cost benchmark, on models built from configs with random weights (nothing is downloaded): SmolLM2-135M
   and Qwen2.5-1.5B shapes, bf16 autocast, batch 8 x 1024 tokens (256 prompt, 768 response), five kinds:

   - ``trl_nll``: ``trl.SFTTrainer``, ``loss_type="nll"``;
   - ``trl_chunked_nll``: ``trl.SFTTrainer``, ``loss_type="chunked_nll"`` (TRL 1.16 makes it a deprecated alias
     of ``nll``: both run TRL's chunked fused head; the JSON says whether the installed TRL still does);
   - ``trl_liger``: ``trl.SFTTrainer``, ``use_liger_kernel=True`` (TRL keeps its own head and applies Liger's
     layer kernels: RMSNorm, RoPE, SwiGLU);
   - ``ntp``: ``SFTMixTrainer``, ``mixup_weight=0``;
   - ``sftmix``: ``SFTMixTrainer``, ``mixup_weight=0.2`` on a given 50/50 split;
   - with ``--kinds``, also ``ntp_liger`` and ``sftmix_liger`` (sftmix with Liger's layer kernels).

   Each measurement is a fresh process (its peak memory is its own); the kinds run interleaved, shape by
   shape, for ``--rounds`` rounds: the first whole, a further one only if the last one fits in what is left of
   ``--budget_s`` (the whole check's; on an H100 about one round fits in 6 minutes). Per kind: the median step time after ``--warmup`` steps (CUDA synchronised at each step's
   ends), tokens/s, peak CUDA memory (``max_memory_allocated``), and the model FLOPs utilisation
   ``6 N tokens / step time / peak``, N the parameters that take part in matrix products (the input embedding
   counts only when it is tied to the head) and the peak the device's dense bf16 FLOP/s from `PEAK_TFLOPS`
   (or ``--peak_tflops``); per shape, SFTMix / NTP against the analytic bound of ``benchmarks/bench_cost.py``.

It writes one JSON (device, versions, the tests' outcomes, every figure; rewritten after each stage, so a run
cut short keeps what it measured) and prints a summary table.

``--cpu`` is a small mode that CI runs (``tests/test_device_check.py``) so that the script cannot rot: a tiny
untied Qwen2 (``--shapes tiny-llama tiny-qwen2`` for both tiny shapes), a few steps, fp32, one thread, no Liger;
its figures mean nothing.

    python benchmarks/gpu/device_check.py --out benchmarks/results/
    python benchmarks/gpu/device_check.py --cpu --out /tmp/check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_cost: a script directory, not a package

TINY = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# (config class, arguments): the published configs' shapes; the weights are random.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": (
        "LlamaConfig",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-1.5b": (
        "Qwen2Config",
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    # CPU mode: a tied Llama and an untied Qwen2 (attention biases), tiny
    "tiny-llama": ("LlamaConfig", {**TINY, "tie_word_embeddings": True}),
    "tiny-qwen2": ("Qwen2Config", {**TINY, "tie_word_embeddings": False}),
}
CUDA_KINDS = ("trl_nll", "trl_chunked_nll", "trl_liger", "ntp", "sftmix")
LIGER_KINDS = ("trl_liger", "ntp_liger", "sftmix_liger")
KINDS = (*CUDA_KINDS, "ntp_liger", "sftmix_liger")
CPU_KINDS = ("trl_nll", "trl_chunked_nll", "ntp", "sftmix")
MIXUP_WEIGHT = 0.2

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets; the first match of the
# device name wins, so the specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by its name (`PEAK_TFLOPS`), None if unknown.

    >>> peak_tflops("NVIDIA H100 80GB HBM3"), peak_tflops("NVIDIA H100 PCIe"), peak_tflops("cpu")
    (989.4, 756.0, None)
    """
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def slug(name: str) -> str:
    """A file-name-safe form of a device name.

    >>> slug("NVIDIA H100 80GB HBM3")
    'nvidia_h100_80gb_hbm3'
    """
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---- one measurement, in a child process ---------------------------------------------------------------
def build_config(shape: str):
    import transformers

    cls, kwargs = SHAPES[shape]
    return getattr(transformers, cls)(pad_token_id=0, eos_token_id=1, bos_token_id=None, **kwargs)


def make_tokenizer():
    """A three-token tokenizer: the data are token ids already, the trainers only need its pad and eos ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def matmul_parameters(model) -> int:
    """Parameters that take part in matrix products: all of them, less the input embedding unless the head
    shares it (an embedding lookup does no FLOPs)."""
    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if embedding is head else total - embedding.numel()


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "liger-kernel", "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    import torch

    found["cuda"] = torch.version.cuda
    try:
        found["sftmix_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # the device gets a copy of the tree without .git
        found["sftmix_commit"] = None
    return found


def measure(
    kind: str, shape: str, batch: int, seq: int, prompt: int, steps: int, warmup: int, device: str, bf16: bool
) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of one kind in this process; its step times and peak memory."""
    import torch

    cuda = device == "cuda"
    # CPU mode only proves that the paths run: one thread never waits on a descheduled other (CI shares cores)
    if not cuda:
        torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix=f"device_check_{kind}_"))
    try:
        return _train(kind, shape, batch, seq, prompt, steps, warmup, bf16, cuda, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _train(
    kind: str, shape: str, batch: int, seq: int, prompt: int, steps: int, warmup: int, bf16: bool, cuda: bool,
    root: Path,
) -> dict[str, Any]:  # fmt: skip
    import resource

    import torch
    from bench_cost import _make_data, _StepTimer, analytic_bound
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.utils import compute_flops_per_token

    from sftmix import SFTMixConfig, SFTMixTrainer

    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = build_config(shape)
    total = warmup + steps
    data, dynamics = _make_data(root, config.vocab_size, batch, seq, prompt, total)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 1.5B model in seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    common = dict(
        output_dir=str(root / "out"), per_device_train_batch_size=batch, max_steps=total, learning_rate=1e-5,
        logging_steps=10_000, save_strategy="no", report_to=[], bf16=bf16, use_cpu=not cuda,
        gradient_checkpointing=False, dataloader_drop_last=True, seed=0, max_length=None, disable_tqdm=True,
        use_liger_kernel=kind in LIGER_KINDS,
    )  # fmt: skip
    if kind.startswith("trl"):
        loss_type = "chunked_nll" if kind == "trl_chunked_nll" else "nll"
        args = SFTConfig(**common, loss_type=loss_type)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=make_tokenizer())
    else:
        weight = MIXUP_WEIGHT if kind.startswith("sftmix") else 0.0
        args = SFTMixConfig(**common, mixup_weight=weight, dynamics_path=dynamics if weight else None)
        trainer = SFTMixTrainer(model=model, args=args, train_dataset=data, processing_class=make_tokenizer())

    timer = _StepTimer()

    class Timer(TrainerCallback):  # synchronised: a step's time is its GPU work, not its launches
        def on_step_begin(self, *a, **k):
            sync()
            timer.on_step_begin()

        def on_step_end(self, *a, **k):
            sync()
            timer.on_step_end()

    trainer.add_callback(Timer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_loss = trainer.train().training_loss
    timed = timer.times[warmup:]
    if cuda:  # what the tensors held at most (the allocator's cache on top of it: peak_reserved_mb)
        peak = torch.cuda.max_memory_allocated() / 2**20
        reserved = torch.cuda.max_memory_reserved() / 2**20
    else:
        peak = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "kind": kind,
        "shape": shape,
        "loss_type": getattr(args, "loss_type", None),  # what the installed TRL made of the kind's loss_type
        "median_step_s": statistics.median(timed),
        "step_times": timed,
        "peak_memory_mb": peak,
        "peak_reserved_mb": reserved,
        "train_loss": train_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_params": matmul_parameters(model),
        "flops_per_token": compute_flops_per_token(config, seq),
        "analytic_bound": analytic_bound(config, batch, seq, prompt),
    }


# ---- the parent: tests, children, summary ----------------------------------------------------------------
def child_env() -> dict[str, str]:
    """This checkout first on the path (not an installed sftmix), offline, no progress bars."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    quiet = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, **quiet, "PYTHONPATH": path, "TQDM_DISABLE": "1", "WANDB_DISABLED": "true"}


def run_child(args: argparse.Namespace, kind: str, shape: str, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--_child", kind, "--_shape", shape, "--batch", str(args.batch),
        "--seq", str(args.seq), "--prompt", str(args.prompt), "--steps", str(args.steps),
        "--warmup", str(args.warmup), *(["--cpu"] if args.cpu else []), *(["--fp32"] if args.fp32 else []),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "shape": shape, "error": f"timed out after {timeout:.0f} s"}
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:  # recorded, and the run goes on: one failing kind must not cost the others' figures
        return {"kind": kind, "shape": shape, "error": (out.stderr or out.stdout)[-4000:]}
    return {**json.loads(line[len("RESULT ") :]), "process_s": time.perf_counter() - start}


def parse_junit(path: Path) -> dict[str, Any]:
    """Outcome counts and one entry per test case of a pytest ``--junitxml`` file.

    >>> import tempfile
    >>> xml = ('<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_a[cuda]" time="1.5"/>'
    ...        '<testcase classname="tests.test_gpu" name="test_b[cuda]" time="0.1"><skipped message="no CUDA"/>'
    ...        '</testcase></testsuite></testsuites>')
    >>> f = Path(tempfile.mkdtemp()) / "junit.xml"
    >>> _ = f.write_text(xml)
    >>> parse_junit(f)["counts"]
    {'passed': 1, 'failed': 0, 'skipped': 1}
    """
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or child.text or "")[:2000]
        counts[outcome] += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        cases.append(
            {"name": name, "outcome": outcome, "time_s": float(case.get("time", 0)), "message": message}
        )
    return {"counts": counts, "cases": cases}


def run_tests(marker: str, timeout: float) -> dict[str, Any]:
    """``pytest -m MARKER tests/test_gpu.py`` in a subprocess, its outcome read from its JUnit XML."""
    junit = Path(tempfile.mkdtemp(prefix="device_check_tests_")) / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", "-rfEs",
        f"--junitxml={junit}", "tests/test_gpu.py",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout, cwd=REPO)
        code, tail = out.returncode, (out.stdout + out.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        code, tail = None, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-4000:]!r}"
    print(tail, flush=True)
    result: dict[str, Any] = {
        "command": "python " + " ".join(cmd[1:]),
        "returncode": code,
        "wall_s": time.perf_counter() - start,
    }
    if junit.is_file():
        result.update(parse_junit(junit))
    shutil.rmtree(junit.parent, ignore_errors=True)
    result["output_tail"] = tail
    return result


def summarise(runs: list[dict[str, Any]], batch: int, seq: int, peak: float | None) -> dict[str, Any]:
    """Per shape and kind: medians over every timed step of every round, and the ratios the README states."""
    shapes: dict[str, Any] = {}
    for run in runs:
        entry = shapes.setdefault(run["shape"], {"kinds": {}, "errors": {}})
        if "error" in run:
            entry["errors"].setdefault(run["kind"], []).append(run["error"])
            continue
        entry.update({k: run[k] for k in ("params", "matmul_params", "flops_per_token", "analytic_bound")})
        kind = entry["kinds"].setdefault(
            run["kind"], {"step_times": [], "peak_memory_mb": 0.0, "train_loss": []}
        )
        kind["step_times"] += run["step_times"]
        kind["peak_memory_mb"] = max(kind["peak_memory_mb"], run["peak_memory_mb"])
        kind["train_loss"].append(run["train_loss"])
        kind["loss_type"] = run["loss_type"]
    tokens = batch * seq
    for entry in shapes.values():
        for kind in entry["kinds"].values():
            step = kind["median_step_s"] = statistics.median(kind["step_times"])
            kind["tokens_per_s"] = tokens / step
            kind["mfu"] = 6 * entry["matmul_params"] * tokens / step / (peak * 1e12) if peak else None
            kind["mfu_with_attention"] = (
                entry["flops_per_token"] * tokens / step / (peak * 1e12) if peak else None
            )
        kinds = entry["kinds"]

        def ratio(a: str, b: str, key: str = "median_step_s") -> float | None:
            return kinds[a][key] / kinds[b][key] if a in kinds and b in kinds else None  # noqa: B023

        entry["ratios"] = {
            "sftmix_over_ntp": ratio("sftmix", "ntp"),
            **{f"sftmix_over_{t}": ratio("sftmix", t) for t in ("trl_nll", "trl_chunked_nll", "trl_liger")},
            "ntp_over_trl_nll": ratio("ntp", "trl_nll"),
            "ntp_liger_over_trl_liger": ratio("ntp_liger", "trl_liger"),
            "sftmix_liger_over_ntp_liger": ratio("sftmix_liger", "ntp_liger"),
            "sftmix_liger_over_trl_liger": ratio("sftmix_liger", "trl_liger"),
            "memory_sftmix_over_ntp": ratio("sftmix", "ntp", "peak_memory_mb"),
        }
        over = entry["ratios"]["sftmix_over_ntp"]
        entry["sftmix_over_ntp_within_bound"] = (
            over <= entry["analytic_bound"] if over is not None and "analytic_bound" in entry else None
        )
    return shapes


def print_table(report: dict[str, Any]) -> None:
    bench = report["benchmark"]
    peak = bench["peak_tflops"]
    print(
        f"\n{report['device']} ({bench['dtype']}), batch {bench['batch']} x {bench['seq']} tokens "
        f"({bench['prompt']} prompt), median of the timed steps; MFU = 6 N tokens / step / "
        f"{f'{peak} TFLOP/s' if peak else 'unknown peak'}"
    )
    print("| shape | kind | step (s) | tokens/s | peak memory (MiB) | MFU | / NTP |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape, entry in bench["shapes"].items():
        ntp = entry["kinds"].get("ntp", {}).get("median_step_s")
        for name, kind in entry["kinds"].items():
            mfu = f"{kind['mfu']:.3f}" if kind["mfu"] is not None else "-"
            rel = f"{kind['median_step_s'] / ntp:.3f}" if ntp else "-"
            print(
                f"| {shape} | {name} | {kind['median_step_s']:.4f} | {kind['tokens_per_s']:,.0f} | "
                f"{kind['peak_memory_mb']:,.0f} | {mfu} | {rel} |"
            )
        for name, errors in entry["errors"].items():
            print(f"| {shape} | {name} | failed: {errors[-1].strip().splitlines()[-1][:100]} | | | | |")
        bound = entry.get("analytic_bound")
        shown = {k: round(v, 3) for k, v in entry["ratios"].items() if v is not None}
        print(f"{shape}: analytic bound {bound:.3f}; {shown}" if bound else f"{shape}: {shown}")
    tests = report.get("tests")
    if tests:
        print(f"tests ({tests['command']}): {tests.get('counts')}, exit {tests['returncode']}")


def output_path(out: str | None, device_name: str) -> Path:
    """``--out``: a file, or a directory (existing, or written with a trailing /) that gets gpu_<device>.json."""
    name = f"gpu_{slug(device_name)}.json"
    if out is None:
        return REPO / "benchmarks" / "results" / name
    path = Path(out)
    return path / name if out.endswith("/") or path.is_dir() else path


def probe() -> dict[str, Any]:
    """The device's name and properties, and the versions of what runs on it."""
    import torch

    device: dict[str, Any] = {"name": "cpu", "cpu_threads": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        device = {
            "name": p.name, "memory_gib": p.total_memory / 2**30, "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
        }  # fmt: skip
    return {"device": device, "versions": versions()}


def probe_in_child() -> dict[str, Any]:
    """`probe` in a child process: this one stays free of torch, and CUDA stays free for the children."""
    cmd = [sys.executable, __file__, "--_probe"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="the small CPU mode: tiny shapes, few steps, fp32")
    parser.add_argument("--out", default=None, help="JSON file, or a directory for gpu_<device>.json")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (no loss) of each sequence")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the kinds")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="the whole check's time: no round after the first past it",
    )
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 autocast (always on --cpu)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--no_tests", action="store_true", help="skip the pytest run of the gpu tests")
    parser.add_argument("--tests_timeout_s", type=float, default=240.0)
    parser.add_argument("--child_timeout_s", type=float, default=300.0, help="one kind's process at most")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The two modes' defaults: CUDA measures, CPU only proves that every path runs
    defaults = dict(batch=8, seq=1024, prompt=256, steps=10, warmup=3, rounds=2, budget_s=360.0)
    if args.cpu:
        defaults = dict(batch=4, seq=64, prompt=16, steps=2, warmup=1, rounds=1, budget_s=600.0)
        args.fp32 = True
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args._probe:
        print(json.dumps(probe()))
        return 0
    if args._child:
        device = "cpu" if args.cpu else "cuda"
        result = measure(
            args._child, args._shape, args.batch, args.seq, args.prompt, args.steps, args.warmup, device,
            not args.fp32,
        )  # fmt: skip
        print("RESULT " + json.dumps(result))
        return 0

    shapes = args.shapes or (["tiny-qwen2"] if args.cpu else ["smollm2-135m", "qwen2.5-1.5b"])
    kinds = args.kinds or list(CPU_KINDS if args.cpu else CUDA_KINDS)
    if args.cpu and set(kinds) & set(LIGER_KINDS):
        parser.error("Liger's kernels are Triton kernels for GPUs: no Liger kind in --cpu mode")
    start = time.perf_counter()
    probed = probe_in_child()
    device = probed["device"]
    if not args.cpu and device["name"] == "cpu":
        parser.error("no CUDA device: run with --cpu for the small CPU mode")
    peak = args.peak_tflops or peak_tflops(device["name"])
    path = output_path(args.out, device["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": device["name"],
        "device_properties": device,
        "mode": "cpu" if args.cpu else "cuda",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": probed["versions"],
        "tests": None,
        "benchmark": {
            "batch": args.batch, "seq": args.seq, "prompt": args.prompt, "steps": args.steps,
            "warmup": args.warmup, "dtype": "fp32" if args.fp32 else "bf16-autocast", "kinds": kinds,
            "peak_tflops": peak, "mixup_weight": MIXUP_WEIGHT, "rounds_done": 0, "shapes": {}, "runs": [],
        },
    }  # fmt: skip

    def save() -> None:
        report["wall_s"] = time.perf_counter() - start
        path.write_text(json.dumps(report, indent=2))

    if not args.no_tests:  # first: correctness matters more than the figures if the call is cut short
        print(f"running the gpu tests (at most {args.tests_timeout_s:.0f} s)", flush=True)
        report["tests"] = run_tests("gpu", args.tests_timeout_s)
        save()

    # Round 1 runs whole (the JSON is saved after each process, so a call cut short keeps what it measured);
    # a further round only if the last one fits in what is left of the budget
    bench, last_round = report["benchmark"], 0.0
    for r in range(args.rounds):
        round_start, left = time.perf_counter(), args.budget_s - (time.perf_counter() - start)
        if r and last_round > left:
            print(f"round {r + 1} not run: the last took {last_round:.0f} s, {left:.0f} s left", flush=True)
            break
        for shape in shapes:
            for kind in kinds:
                run = run_child(args, kind, shape, timeout=args.child_timeout_s)
                bench["runs"].append(run)
                shown = "failed" if "error" in run else f"median step {run['median_step_s']:.4f} s"
                print(f"round {r + 1} {shape:14s} {kind:16s} {shown}", flush=True)
                if "error" in run:
                    print(run["error"][-1500:], flush=True)
                bench["shapes"] = summarise(bench["runs"], args.batch, args.seq, peak)
                save()
        bench["rounds_done"], last_round = r + 1, time.perf_counter() - round_start
    save()
    print_table(report)
    print(f"\nwrote {path} ({time.perf_counter() - start:.0f} s)")
    failed = any(run.get("error") for run in bench["runs"])
    tests_failed = report["tests"] is not None and report["tests"]["returncode"] not in (0,)
    return 1 if failed or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
