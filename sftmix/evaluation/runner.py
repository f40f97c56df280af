"""``sftmix eval``: load the model(s), run one task, write ``eval.json``, ``eval.md`` and ``predictions.jsonl``.

Layout of ``output_dir`` (every file written atomically):

- one model: ``eval.json`` (``{task: {metric: value}}``), ``eval.md`` (the same as a table, also printed),
  ``predictions.jsonl`` (one line per item: prediction, scores, response...), plus the official answer files
  of ``mt_bench`` (``model_answer/<model>.jsonl``, ``model_judgment/<judge>_single.jsonl`` with
  ``--judge_model``) and ``alpaca_eval`` (``model_outputs.json``; with ``--judge_model`` also alpaca_eval's
  ``alpaca_eval/annotations.json`` and ``alpaca_eval/leaderboard.csv``);
- several comma-separated models: the above in ``<output_dir>/<model name>/`` for each, and
  ``comparison.md`` / ``comparison.json``, the side-by-side table with each model's delta to the first;
- ``--compare a/eval.json,b/eval.json``: no model is loaded; only ``comparison.md`` / ``comparison.json``.
"""

from __future__ import annotations

import difflib
import functools
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import bf16_native, launched_world_size
from ..errors import SFTMixError
from ..io_utils import atomic_write_json, atomic_write_jsonl, atomic_write_text
from ..sftmix_config import EvalArguments
from .compare import Results, comparison_table, load_results, results_table, unique_names
from .tasks import MC_TASKS

logger = logging.getLogger(__name__)

GENERATION_TASKS = ("ifeval", "mt_bench", "alpaca_eval")
TASKS = (*MC_TASKS, "perplexity", "calibration", *GENERATION_TASKS)


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> ``bfloat16`` where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    AMX), else ``float32``; other values are returned unchanged."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if bf16_native() else "float32"


def check_args(args: EvalArguments) -> None:
    """Reject bad arguments before any model is loaded, with a one-line `SFTMixError`."""
    if args.task not in TASKS:
        close = difflib.get_close_matches(args.task, TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SFTMixError(f"unknown task {args.task!r}{hint}; choose one of {', '.join(TASKS)}")
    if args.formulation not in ("cloze", "letter"):
        raise SFTMixError(f"formulation must be 'cloze' or 'letter', got {args.formulation!r}")
    if args.limit is not None and args.limit < 1:
        raise SFTMixError(f"limit must be at least 1, got {args.limit}")
    if args.num_fewshot < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise SFTMixError("num_fewshot must be >= 0, batch_size and max_new_tokens >= 1")
    if not args.data_path:
        raise SFTMixError(f"task {args.task} needs --data_path (the benchmark's data file)")
    if args.task not in ("perplexity", "calibration") and not Path(args.data_path).exists():
        raise SFTMixError(f"data file not found: {args.data_path}")


def _find_beside(data_path: Path, name: str) -> Path | None:
    """A FastChat file next to ``question.jsonl`` or one level up (FastChat keeps judge prompts in ``data/``)."""
    for folder in (data_path.parent, data_path.parent.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def run_task(
    args: EvalArguments, model: Any, tokenizer: Any, model_id: str, output_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``args.task`` on a loaded model; return ``(metrics, per-item rows)`` and write answer files."""
    task, data_path = args.task, args.data_path
    assert data_path is not None
    if task in MC_TASKS:
        from .multiple_choice import evaluate_multiple_choice, loglikelihood
        from .tasks import load_task

        items, pool = load_task(task, data_path)
        score = functools.partial(loglikelihood, model, tokenizer, batch_size=args.batch_size)
        return evaluate_multiple_choice(
            task, items, score, args.formulation, args.num_fewshot, args.seed, pool, args.limit
        )
    if task in ("perplexity", "calibration"):  # one pass gives both
        from .calibration import CALIBRATION_KEYS
        from .perplexity import evaluate_perplexity

        metrics, rows = evaluate_perplexity(model, tokenizer, data_path, args.limit, args.batch_size)
        if task == "calibration":
            metrics = {k: metrics[k] for k in (*CALIBRATION_KEYS, "tokens", "n")}
        return metrics, rows
    from .generation import generate_chat

    if task == "ifeval":
        from .ifeval import ifeval_checkers, load_ifeval, score_ifeval

        records = load_ifeval(data_path)[: args.limit]
        ifeval_checkers()  # fail on a missing scorer before spending time on generation
        conversations = [[{"role": "user", "content": r["prompt"]}] for r in records]
        responses = generate_chat(
            model, tokenizer, conversations, args.max_new_tokens, args.batch_size, "IFEval"
        )
        return score_ifeval(records, responses)
    if task == "mt_bench":
        from .generation import generate_mt_bench, load_mt_bench_questions, write_mt_bench_answers

        questions = load_mt_bench_questions(data_path)[: args.limit]
        answers = generate_mt_bench(
            model, tokenizer, questions, model_id, args.max_new_tokens, args.batch_size
        )
        path = write_mt_bench_answers(answers, output_dir, model_id)
        print(f"MT-Bench answers (FastChat format): {path}")
        turns = [t for a in answers for t in a["choices"][0]["turns"]]
        metrics: dict[str, Any] = {"n": len(answers), "avg_answer_chars": sum(map(len, turns)) / len(turns)}
        if args.judge_model:
            metrics.update(_judge(args, Path(data_path), questions, answers, output_dir))
        return metrics, answers
    from .generation import generate_alpaca_eval, load_alpaca_eval_instructions, write_alpaca_eval_outputs

    records = load_alpaca_eval_instructions(data_path)[: args.limit]
    reference = _alpaca_eval_reference(args) if args.judge_model else None  # fail before generating
    outputs = generate_alpaca_eval(model, tokenizer, records, model_id, args.max_new_tokens, args.batch_size)
    path = write_alpaca_eval_outputs(outputs, output_dir)
    metrics = {"n": len(outputs), "avg_answer_chars": sum(len(o["output"]) for o in outputs) / len(outputs)}
    if reference is None:
        print(f"AlpacaEval outputs (set --judge_model, or run `alpaca_eval --model_outputs {path}`): {path}")
        return metrics, outputs
    from .alpaca_judge import run_alpaca_eval

    assert args.judge_model is not None
    metrics.update(
        run_alpaca_eval(
            outputs, reference, args.judge_model, output_dir, args.judge_timeout, args.judge_max_retries
        )
    )
    print(f"AlpacaEval annotations and leaderboard: {output_dir / 'alpaca_eval'}")
    return metrics, outputs


def _alpaca_eval_reference(args: EvalArguments) -> Path:
    """The baseline's outputs: ``--reference_outputs``, else AlpacaEval 2.0's beside the instructions."""
    from .alpaca_judge import REFERENCE_FILE

    assert args.data_path is not None
    path = (
        Path(args.reference_outputs)
        if args.reference_outputs
        else Path(args.data_path).parent / REFERENCE_FILE
    )
    if not path.is_file():
        raise SFTMixError(
            f"AlpacaEval reference outputs not found: {path} (set --reference_outputs to the baseline's "
            "model_outputs.json)"
        )
    return path


def _judge(
    args: EvalArguments, data_path: Path, questions: list, answers: list, output_dir: Path
) -> dict[str, Any]:
    from .judge import judge_mt_bench, judgment_file, load_judge_prompts, load_reference_answers

    prompts_path = _find_beside(data_path, "judge_prompts.jsonl")
    if prompts_path is None:
        raise SFTMixError(f"judge_prompts.jsonl (FastChat's judge prompts) not found beside {data_path}")
    ref_path = data_path.parent / "reference_answer" / "gpt-4.jsonl"
    assert args.judge_model is not None
    path = judgment_file(output_dir, args.judge_model)
    metrics, _ = judge_mt_bench(
        questions,
        answers,
        args.judge_model,
        load_judge_prompts(prompts_path),
        load_reference_answers(ref_path),
        judgments_path=path,
        timeout=args.judge_timeout,
        max_retries=args.judge_max_retries,
        max_tokens=args.judge_max_tokens,
    )
    print(f"MT-Bench judgments (FastChat format): {path}")
    return metrics


def _strict(value: Any) -> Any:
    """NaN -> None: eval.json is strict JSON (``NaN`` is not JSON; strict parsers reject it)."""
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate_model(args: EvalArguments, model_name: str, model_id: str, output_dir: Path) -> Results:
    """Load ``model_name``, run the task, write ``eval.json``/``eval.md``/``predictions.jsonl``; return results."""
    from ..data.models import load_model, load_tokenizer

    dtype = resolve_dtype(args.dtype)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    torch.manual_seed(args.seed)
    try:
        metrics, rows = run_task(args, model, tokenizer, model_id, output_dir)
    finally:
        del model
        gc.collect()
    results = {args.task: {k: _strict(v) for k, v in metrics.items()}}
    atomic_write_json(output_dir / "eval.json", results)
    atomic_write_jsonl(output_dir / "predictions.jsonl", rows)
    table = results_table(results)
    atomic_write_text(output_dir / "eval.md", f"# {model_name}\n\n{table}\n")
    elapsed = time.perf_counter() - started
    print(f"\n{model_name} ({dtype}, {elapsed:.0f}s)\n{table}\n")
    return results


def _write_comparison(named: dict[str, Results], output_dir: Path) -> None:
    table = comparison_table(named)
    atomic_write_text(output_dir / "comparison.md", table + "\n")
    atomic_write_json(output_dir / "comparison.json", named)
    print(table)


def run_eval(args: EvalArguments) -> dict[str, Any]:
    """Entry point of ``sftmix eval``.

    Returns:
        ``{task: {metric: value}}`` for one model; ``{model name: {task: {metric: value}}}`` for several
        models or with ``compare``.

    Example:
        >>> from sftmix.sftmix_config import EvalArguments
        >>> run_eval(EvalArguments(model_name_or_path="smollm2-135m-instruct", task="pubmedqa",
        ...                        data_path="pubmedqa/", limit=20, output_dir="out"))  # doctest: +SKIP
        {'pubmedqa': {'acc': ..., 'acc_norm': ..., 'n': 20, 'macro_f1': ...}}
    """
    if launched_world_size() > 1:  # N processes would each evaluate everything into one output_dir
        raise SFTMixError(
            f"sftmix eval runs in one process, but {launched_world_size()} were launched: run it without "
            "torchrun / accelerate launch"
        )
    output_dir = Path(args.output_dir)
    if args.compare:
        files = [f.strip() for f in args.compare.split(",") if f.strip()]
        named = {name: load_results(f) for name, f in zip(unique_names(files), files, strict=True)}
        _write_comparison(named, output_dir)
        return named
    check_args(args)
    models = [m.strip() for m in args.model_name_or_path.split(",") if m.strip()]
    if not models:
        raise SFTMixError("model_name_or_path is empty")
    names = unique_names(models)
    if len(models) == 1:
        return evaluate_model(args, models[0], names[0], output_dir)
    named = {
        name: evaluate_model(args, m, name, output_dir / name) for name, m in zip(names, models, strict=True)
    }
    _write_comparison(named, output_dir)
    return named
