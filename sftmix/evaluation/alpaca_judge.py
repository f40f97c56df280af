"""AlpacaEval 2.0 win rates from the ``alpaca_eval`` package itself, judged by any OpenAI-compatible endpoint.

`run_alpaca_eval` hands the model's outputs and the baseline's (``gpt4_1106_preview``, AlpacaEval 2.0's) to
``alpaca_eval.evaluate`` and reads back its ``win_rate`` and ``length_controlled_winrate``: the annotation,
the win rate and the length-controlled GLM are alpaca_eval's own code.

The annotator config is written by sftmix (``<output_dir>/alpaca_eval/annotator/sftmix_<judge>/``) because
the official AlpacaEval 2.0 one (``weighted_alpaca_eval_gpt4_turbo``) weighs the judge's answer by its
``logprobs``, which vLLM serves but ``transformers serve`` and many hosted APIs do not. Ours keeps that
config's prompt (``alpaca_eval_clf.txt``: "answer m or M") and reads the judge's answer as text, with
alpaca_eval's ``regex_parser``, as its ``alpaca_eval_clf_gpt4_turbo`` config does after binarising. An
answer that is neither ``m`` nor ``M`` is unreadable: alpaca_eval leaves it out, and ``n_unreadable`` counts
it. Annotations are cached beside the config, so a rerun judges only what is new.

What does not run offline: the length-controlled win rate needs ``df_gamed.csv`` (instruction difficulties
and annotations of two length-gamed baselines that regularise the GLM), which alpaca_eval downloads from the
Hub dataset ``tatsu-lab/alpaca_eval`` and which is not on PyPI. With it in the Hugging Face cache (run
``hf download tatsu-lab/alpaca_eval df_gamed.csv --repo-type dataset`` once where the Hub is reachable) it
works offline; without it ``length_controlled_winrate`` is ``None`` and a warning says why.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import SFTMixError
from ..io_utils import atomic_write_text
from .judge import endpoint, explain_api_error
from .tasks import iter_json_records

logger = logging.getLogger(__name__)

BASELINE = "gpt4_1106_preview"  # the AlpacaEval 2.0 baseline
REFERENCE_FILE = f"reference_outputs/{BASELINE}.model_outputs.json"
METRICS = (
    "win_rate",
    "standard_error",
    "length_controlled_winrate",
    "lc_standard_error",
    "n_wins",
    "n_wins_base",
    "n_draws",
    "n_total",
)


def _import_alpaca_eval() -> Any:
    """``alpaca_eval.main``, importable without ``pkg_resources`` and without changing the root log level.

    alpaca_eval 0.6.6 imports ``pkg_resources`` (gone from setuptools >= 81) for two helpers; a stand-in
    module gives it those two while it is imported, and is taken out of ``sys.modules`` afterwards so no
    other library mistakes it for the real one.
    """
    shim = None
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            from packaging.version import parse

            shim = types.ModuleType("pkg_resources")
            shim.parse_version = parse  # type: ignore[attr-defined]
            shim.get_distribution = lambda name: types.SimpleNamespace(  # type: ignore[attr-defined]
                version=importlib.metadata.version(name)
            )
            sys.modules["pkg_resources"] = shim
    level = logging.getLogger().level
    try:
        from alpaca_eval import main
    except ImportError as e:
        raise SFTMixError(
            f"AlpacaEval judging needs the alpaca-eval package ({e}): pip install 'sftmix[eval]'"
        ) from e
    finally:
        logging.getLogger().setLevel(level)  # alpaca_eval sets the root logger to INFO on import
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    return main


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "judge"


def write_annotator_config(folder: Path, judge_model: str, max_tokens: int = 10) -> Path:
    """Write a non-logprob AlpacaEval 2.0 annotator config for ``judge_model``; return its ``configs.yaml``."""
    import yaml

    main = _import_alpaca_eval()
    configs = Path(main.constants.EVALUATORS_CONFIG_DIR)
    name = f"sftmix_{_safe_name(judge_model)}"  # the judge in the name: its cached annotations are its own
    template = configs / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"
    atomic_write_text(folder / name / "alpaca_eval_clf.txt", template.read_text(encoding="utf-8"))
    config = {
        name: {
            "prompt_template": f"{name}/alpaca_eval_clf.txt",  # relative to the config's parent folder
            "fn_completions": "openai_completions",
            "completions_kwargs": {
                "model_name": judge_model,
                "max_tokens": max_tokens,
                "temperature": 0,
                # alpaca_eval picks the legacy /completions route for names with "instruct": force chat
                "requires_chatml": True,
            },
            "fn_completion_parser": "regex_parser",
            # the identifier first, alone as a word: "M", " m.", "M is better"; not "Mm" or "Model"
            "completion_parser_kwargs": {"outputs_to_match": {1: r"\A\W*m\b", 2: r"\A\W*M\b"}},
            "batch_size": 1,
        }
    }
    path = folder / name / "configs.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def load_reference_outputs(path: Path, instructions: list[str]) -> list[dict[str, Any]]:
    """The baseline's outputs for ``instructions`` (matched by text, in that order)."""
    by_instruction = {}
    for location, record in iter_json_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("output"), str):
            raise SFTMixError(f"{location}: a reference output needs 'instruction' and 'output' strings")
        by_instruction.setdefault(record.get("instruction"), record)
    missing = [i for i in instructions if i not in by_instruction]
    if missing:
        raise SFTMixError(
            f"{len(missing)} instruction(s) have no reference output in {path}, e.g. {missing[0][:60]!r}"
        )
    return [by_instruction[i] for i in instructions]


class _NoTracebacks(logging.Filter):
    """alpaca_eval logs the traceback of an API error (``logging.exception``) before re-raising it; sftmix
    reports that error in one line, so the log keeps alpaca_eval's message and drops the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "alpaca_eval" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        # its warning that no client config file exists: by design, the client comes from our arguments
        return "We are using environment variables to construct the client" not in str(record.msg)


@contextlib.contextmanager
def _quiet_tracebacks() -> Iterator[None]:
    root = logging.getLogger()
    no_tracebacks = _NoTracebacks()
    root.addFilter(no_tracebacks)
    try:
        yield
    finally:
        root.removeFilter(no_tracebacks)


def _clean(value: Any) -> Any:
    """numpy scalars to Python ones, NaN to None (eval.json is strict JSON)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def run_alpaca_eval(
    outputs: list[dict[str, Any]],
    reference_path: str | Path,
    judge_model: str,
    output_dir: str | Path,
    timeout: float = 600.0,
    max_retries: int = 3,
) -> dict[str, Any]:
    """Judge ``outputs`` against the baseline with alpaca_eval; return its metrics.

    Args:
        outputs: The model's ``model_outputs`` records (``instruction``, ``output``, ``generator``).
        reference_path: The baseline's ``model_outputs.json`` (AlpacaEval 2.0: ``gpt4_1106_preview``).
        judge_model: Model name on the endpoint of ``OPENAI_BASE_URL``.
        output_dir: alpaca_eval writes ``alpaca_eval/annotations.json`` and ``alpaca_eval/leaderboard.csv``
            here, and its annotation cache under ``alpaca_eval/annotator/``.
        timeout: Seconds to wait for one judgment.
        max_retries: Retries of a failed request, with back-off (the `openai` client's).

    Returns:
        ``win_rate``, ``length_controlled_winrate`` (None when it cannot be computed, see the module
        docstring), their standard errors, ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total`` (judgments
        read) and ``n_unreadable``.
    """
    import openai

    base_url, api_key = endpoint()
    main = _import_alpaca_eval()
    folder = Path(output_dir) / "alpaca_eval"
    config = write_annotator_config(folder / "annotator", judge_model)
    references = load_reference_outputs(Path(reference_path), [o["instruction"] for o in outputs])
    lc_unavailable: list[str] = []
    counts = {"n_total": 0, "n_unreadable": len(outputs)}

    def metric(annotations: Any, **kwargs: Any) -> dict[str, Any]:
        # Unreadable judgments come back with preference None, which alpaca_eval's metrics cannot take: they
        # are left out (and counted), keeping their index, which the GLM maps to instruction difficulties.
        frame = main.utils.convert_to_dataframe(annotations)
        readable = frame[frame["preference"].notna()] if len(frame) else frame
        counts.update(n_total=len(readable), n_unreadable=len(outputs) - len(readable))
        if len(readable) == 0:
            return {"win_rate": math.nan, "standard_error": math.nan, "length_controlled_winrate": math.nan}
        try:
            return main.metrics.get_length_controlled_winrate(readable, save_weights_dir=folder / "glm")
        except (OSError, ValueError) as e:  # offline: df_gamed.csv is not in the Hub cache, see above
            lc_unavailable.append(f"{type(e).__name__}: {e}")
            return main.metrics.get_winrate(readable)

    class Annotator(main.annotators.PairwiseAnnotator):
        """alpaca_eval's annotator, reading its cache with float preferences: pandas >= 3 reads the cached
        1/2 as int64 and then refuses the 1.5 alpaca_eval writes for a tie (identical outputs)."""

        def load_(self, path: Any = None) -> None:
            super().load_(path)
            frame = self.df_annotations
            if frame is not None and self.annotation_key in frame:
                frame[self.annotation_key] = frame[self.annotation_key].astype(float)

    # The key and URL go to alpaca_eval's OpenAI clients as arguments: nothing is written to disk, and
    # alpaca_eval leaves arguments named *api_key* out of its logs.
    client = {
        "openai_api_keys": [api_key],
        "openai_api_base": base_url,
        "client_config_path": folder / "no_client_config.yaml",  # absent: use the two arguments above
        "client_kwargs": {"timeout": timeout, "max_retries": max_retries},
    }
    try:
        with _quiet_tracebacks():
            leaderboard, _ = main.evaluate(
                model_outputs=outputs,
                reference_outputs=references,
                annotators_config=str(config),
                name=outputs[0]["generator"],
                output_path=folder,
                precomputed_leaderboard=None,  # the published leaderboard is not this judge's
                is_overwrite_leaderboard=True,
                is_return_instead_of_print=True,
                fn_metric=metric,
                sort_by="win_rate",  # the length-controlled one may be missing
                is_cache_leaderboard=False,
                annotation_kwargs={"chunksize": 16, **client},  # the cache is saved after each chunk
                Annotator=Annotator,
            )
    except openai.OpenAIError as e:
        raise explain_api_error(e, base_url, timeout, max_retries) from e
    if lc_unavailable:
        logger.warning(
            "length_controlled_winrate is null: alpaca_eval's length-controlled GLM could not run (%s); offline, "
            "it lacks df_gamed.csv from the Hub dataset tatsu-lab/alpaca_eval (see docs/evaluation_judged.md)",
            lc_unavailable[0][:300],
        )
    row = leaderboard.loc[outputs[0]["generator"]]
    metrics = {key: _clean(row[key]) if key in row else None for key in METRICS}
    metrics.update(counts)
    return metrics
