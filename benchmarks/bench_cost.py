"""Cost of SFTMix against plain NTP and TRL: step time and peak memory on the same model, data and batch shape.

Three trainers, same model, same synthetic batches (every sequence the same length, so no sampler can change
the work):

- ``trl``: ``trl.SFTTrainer``;
- ``ntp``: ``SFTMixTrainer`` with ``mixup_weight=0`` (the fair baseline);
- ``sftmix``: ``SFTMixTrainer`` with ``mixup_weight=0.2``;
- ``ntp_compiled``, ``sftmix_compiled`` (with ``--kinds``): the same with ``torch_compile=True`` (inductor);
- ``trl_smoothed``, ``ntp_smoothed`` (with ``--kinds``): ``trl`` and ``ntp`` with ``label_smoothing_factor=0.1``
  (TRL builds the full logits and runs a second, no-grad forward; sftmix smooths in its fused head).

Each measurement is a fresh process (so its peak RSS is its own), the three run interleaved for ``--rounds``
rounds, and each reports the median of ``--steps`` timed steps after ``--warmup`` steps. Beside the ratios the
script prints the analytic bound of the Mixup overhead: the LM-head FLOPs of the mixed tokens (forward and
backward) over the model's training FLOPs per step.

    python benchmarks/bench_cost.py --model smollm2-135m-instruct --batch 8 --seq 128
    python benchmarks/bench_cost.py --model tiny
    python benchmarks/bench_cost.py --kinds ntp sftmix ntp_compiled sftmix_compiled --warmup 3  # torch_compile
    python benchmarks/bench_cost.py --kinds ntp ntp_smoothed trl_smoothed  # label smoothing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("trl", "ntp", "sftmix", "ntp_compiled", "sftmix_compiled", "trl_smoothed", "ntp_smoothed")
SMOOTHING = 0.1  # label_smoothing_factor of the *_smoothed kinds


def _tiny_model_dir(root: Path) -> str:
    """A 4-layer random Llama with SmolLM2's vocabulary and tokenizer (so the head costs what it costs there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftmix.data.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    path = root / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _make_data(root: Path, vocab: int, batch: int, seq: int, prompt: int, steps: int):
    """Synthetic tokenized examples (fixed prompt and response lengths) and a dynamics file splitting them 50/50."""
    import random

    from datasets import Dataset

    rng = random.Random(0)
    n = batch * steps
    ids = [f"ex{i:06d}" for i in range(n)]
    input_ids = [[rng.randrange(4, vocab) for _ in range(seq)] for _ in range(n)]
    labels = [[-100] * prompt + row[prompt:] for row in input_ids]
    data = Dataset.from_dict({"id": ids, "input_ids": input_ids, "labels": labels})
    dynamics = root / "dynamics.jsonl"
    with open(dynamics, "w") as f:
        for i, example_id in enumerate(ids):
            split = "confident" if i % 2 == 0 else "unconfident"
            f.write(
                json.dumps({"id": example_id, "perplexities": [1.0], "confidence": -1.0, "split": split})
                + "\n"
            )
    return data, str(dynamics)


class _StepTimer:
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *args, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _measure(
    kind: str, model: str, batch: int, seq: int, prompt: int, steps: int, warmup: int, bf16: bool
) -> dict:
    """One trainer, in this process: step times and peak RSS."""
    import torch
    from transformers import TrainerCallback

    from sftmix import SFTMixConfig, SFTMixTrainer
    from sftmix.data.models import load_model, load_tokenizer, resolve_model

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench_cost_"))
    model_dir = _tiny_model_dir(root) if model == "tiny" else resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    total = steps + warmup
    data, dynamics = _make_data(root, len(tokenizer), batch, seq, prompt, total)
    common = dict(
        output_dir=str(root / "out"),
        per_device_train_batch_size=batch,
        max_steps=total,
        learning_rate=1e-5,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        bf16=bf16,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_drop_last=True,
        seed=0,
        max_length=None,
    )
    timer = _StepTimer()
    callback = type(
        "Timer", (TrainerCallback,), {"on_step_begin": timer.on_step_begin, "on_step_end": timer.on_step_end}
    )()
    if kind.endswith("_smoothed"):
        common["label_smoothing_factor"] = SMOOTHING
    net = load_model(model_dir, dtype="float32")
    if kind.startswith("trl"):
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=net, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer
        )
    else:
        weight = 0.2 if kind.startswith("sftmix") else 0.0
        args = SFTMixConfig(
            **common,
            mixup_weight=weight,
            dynamics_path=dynamics if weight else None,
            torch_compile=kind.endswith("_compiled"),
        )
        trainer = SFTMixTrainer(model=net, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(callback)
    trainer.train()
    timed = timer.times[warmup:]
    return {
        "kind": kind,
        "median_step_s": statistics.median(timed),
        "step_times": timed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _analytic_bound(model: str, batch: int, seq: int, prompt: int) -> float:
    """1 + (head FLOPs of the mixed tokens, fwd + bwd) / (model training FLOPs of the step)."""
    from transformers import AutoConfig

    from sftmix.data.models import resolve_model

    if model == "tiny":
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:
        config = AutoConfig.from_pretrained(resolve_model(model))
    return analytic_bound(config, batch, seq, prompt)


def analytic_bound(config, batch: int, seq: int, prompt: int) -> float:
    """The bound of `_analytic_bound` for a model config (``benchmarks/gpu/device_check.py`` builds its models
    from configs): every sequence ``seq`` tokens, the first ``prompt`` of them without loss."""
    from trl.trainer.utils import compute_flops_per_token

    step_flops = compute_flops_per_token(config, seq) * batch * seq
    mixed_tokens = (batch // 2) * (seq - prompt)  # equal response lengths: every response token is mixed
    head_flops = 3 * 2 * config.vocab_size * config.hidden_size * mixed_tokens
    return 1 + head_flops / step_flops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="'tiny' or anything sftmix loads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (no loss) of each sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three trainers")
    parser.add_argument(
        "--precision",
        choices=["native", "bf16", "fp32"],
        default="native",
        help="native: bf16 autocast where the hardware computes bf16 (a GPU, a CPU with AVX512-BF16/AMX), else fp32",
    )
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS[:3]), help="trainers to compare"
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision == "native":  # never bf16 where torch emulates it (about 20x slower than fp32 there)
        from sftmix.distributed import accelerator_available, cpu_has_bf16

        args.precision = "bf16" if accelerator_available() or cpu_has_bf16() else "fp32"
    if args._child:
        result = _measure(
            args._child, args.model, args.batch, args.seq, args.prompt, args.steps, args.warmup,
            args.precision == "bf16",
        )  # fmt: skip
        print("RESULT " + json.dumps(result))
        return

    results: dict[str, list[dict]] = {k: [] for k in args.kinds}
    for r in range(args.rounds):
        for kind in args.kinds:
            child_args = [
                f"--{k}={v}"
                for k, v in vars(args).items()
                if k not in ("output", "_child", "rounds", "kinds")
            ]
            cmd = [sys.executable, __file__, "--_child", kind, *child_args]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
            results[kind].append(json.loads(line[7:]))
            print(
                f"round {r + 1} {kind:12s} median step {results[kind][-1]['median_step_s']:.3f} s, "
                f"peak RSS {results[kind][-1]['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    step = {k: statistics.median(t for res in v for t in res["step_times"]) for k, v in results.items()}
    rss = {k: max(res["peak_rss_mb"] for res in v) for k, v in results.items()}
    bound = _analytic_bound(args.model, args.batch, args.seq, args.prompt)

    def ratio(a: str, b: str) -> float | None:
        return step[a] / step[b] if a in step and b in step else None

    summary = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "prompt": args.prompt,
        "dtype": "bf16-autocast" if args.precision == "bf16" else "fp32",
        "median_step_s": step,
        "peak_rss_mb": rss,
        "sftmix_over_ntp": ratio("sftmix", "ntp"),
        "ntp_over_trl": ratio("ntp", "trl"),
        "memory_sftmix_over_ntp": rss["sftmix"] / rss["ntp"] if {"sftmix", "ntp"} <= rss.keys() else None,
        "ntp_compiled_over_ntp": ratio("ntp_compiled", "ntp"),
        "sftmix_compiled_over_sftmix": ratio("sftmix_compiled", "sftmix"),
        "sftmix_compiled_over_ntp_compiled": ratio("sftmix_compiled", "ntp_compiled"),
        "ntp_smoothed_over_ntp": ratio("ntp_smoothed", "ntp"),
        "trl_smoothed_over_ntp": ratio("trl_smoothed", "ntp"),
        "ntp_smoothed_over_trl_smoothed": ratio("ntp_smoothed", "trl_smoothed"),
        "analytic_bound": bound,
        "date": time.strftime("%Y-%m-%d"),
        "cpu_threads": os.cpu_count(),
    }
    print(
        f"\n{args.model}, batch {args.batch} x {args.seq} tokens ({summary['dtype']}), median of "
        f"{args.rounds * args.steps} steps per trainer:"
    )
    print("| trainer | step (s) | peak RSS (MB) |\n| --- | --- | --- |")
    for k in args.kinds:
        print(f"| {k} | {step[k]:.3f} | {rss[k]:.0f} |")
    print(f"analytic bound of the Mixup overhead: {bound:.3f}")
    for key, value in summary.items():
        if ("_over_" in key) and value is not None:
            print(f"{key}: {value:.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
