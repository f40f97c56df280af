"""IFEval (Zhou et al., 2023): greedy chat answers scored by the official rule-based instruction checkers.

The checkers are Google's ``instruction_following_eval`` code as lm-evaluation-harness ships and maintains it
(``lm_eval.tasks.ifeval``: ``instructions_registry`` and ``utils``' strict and loose tests), used as is, so the four
metrics are the ones lm-eval and the IFEval paper report: prompt-level and instruction-level accuracy, strict
and loose (loose also accepts the response without its first/last line or without ``*`` markup).

The checkers split sentences with NLTK's ``punkt_tab`` model, which lm-eval downloads at import time. Nothing is
downloaded here: the data is looked up in ``$NLTK_DATA`` / NLTK's usual folders and in the copy that the PyPI
package ``llama-index-core`` ships (``llama_index/core/_static/nltk_cache``), and a missing model is an error
that says what to install.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import SFTMixError
from .tasks import iter_json_records

_EVAL_EXTRA = "pip install lm-eval langdetect immutabledict nltk llama-index-core"


def _packaged_nltk_dirs() -> list[str]:
    """NLTK data folders that PyPI packages ship (only ``llama-index-core`` carries ``punkt_tab`` today)."""
    dirs = []
    try:
        folder = Path(str(metadata.distribution("llama-index-core").locate_file("llama_index/core/_static")))
    except metadata.PackageNotFoundError:
        return dirs
    if (folder / "nltk_cache" / "tokenizers" / "punkt_tab").is_dir():
        dirs.append(str(folder / "nltk_cache"))
    return dirs


def ensure_punkt() -> None:
    """Make NLTK find ``punkt_tab`` offline, or raise `SFTMixError` saying how to get it."""
    try:
        import nltk
    except ImportError as e:
        raise SFTMixError(f"IFEval scoring needs nltk: {_EVAL_EXTRA}") from e
    for folder in _packaged_nltk_dirs():
        if folder not in nltk.data.path:
            nltk.data.path.append(folder)
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError as e:
        raise SFTMixError(
            "IFEval needs NLTK's punkt_tab sentence model, found nowhere offline: install llama-index-core "
            "(it ships one) or put punkt_tab under $NLTK_DATA/tokenizers/"
        ) from e


@cache
def ifeval_checkers() -> ModuleType:
    """lm-eval's ``lm_eval.tasks.ifeval.utils`` (the official checkers), imported once without downloads."""
    ensure_punkt()
    try:
        from lm_eval.tasks.ifeval import utils
    except ImportError as e:
        raise SFTMixError(
            f"IFEval scoring needs lm-eval and its checkers' dependencies ({e}): {_EVAL_EXTRA}"
        ) from e
    return utils


def load_ifeval(path: str | Path) -> list[dict[str, Any]]:
    """IFEval's ``input_data.jsonl``: ``{key (or id), prompt, instruction_id_list, kwargs}`` per line."""
    records = []
    for location, record in iter_json_records(Path(path)):
        if not isinstance(record, dict):
            raise SFTMixError(f"{location}: expected a JSON object")
        prompt, ids, kwargs = record.get("prompt"), record.get("instruction_id_list"), record.get("kwargs")
        if not isinstance(prompt, str) or not prompt:
            raise SFTMixError(f"{location}: field 'prompt' must be a non-empty string")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise SFTMixError(f"{location}: field 'instruction_id_list' must be a list of instruction ids")
        if (
            not isinstance(kwargs, list)
            or len(kwargs) != len(ids)
            or not all(isinstance(k, dict) for k in kwargs)
        ):
            raise SFTMixError(f"{location}: field 'kwargs' must be a list of objects, one per instruction")
        key = record.get("key", record.get("id", location))
        records.append({"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})
    if not records:
        raise SFTMixError(f"{path}: no IFEval prompts found")
    return records


def score_ifeval(
    records: list[dict[str, Any]], responses: list[str]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score ``responses`` (one per record) with the official checkers.

    Returns:
        Metrics ``prompt_level_strict_acc``, ``inst_level_strict_acc``, ``prompt_level_loose_acc``,
        ``inst_level_loose_acc`` (lm-eval's names and aggregation: prompt-level is the mean over prompts,
        instruction-level the mean over all instructions of all prompts) and ``n``; and one dict per prompt.
    """
    utils = ifeval_checkers()
    from langdetect import DetectorFactory
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    # Some checkers draw their arguments from the global `random` when a prompt's do not fit them (IFEval's
    # letter-frequency prompts 1122 and 1129, letters "#" and "!", check a random letter). lm-eval's
    # process_results draws once for the strict pass and again for the loose one, so loose could check another
    # letter than strict. Both passes here draw from the same seed, taken from the prompt text: a response
    # scores the same in every run and for every model compared, and loose >= strict holds. langdetect (the
    # language checker) is random unless its factory is seeded.
    DetectorFactory.seed = 0
    state = random.getstate()
    rows = []
    try:
        for record, response in zip(records, responses, strict=True):
            unknown = [i for i in record["instruction_id_list"] if i not in INSTRUCTION_DICT]
            if unknown:
                raise SFTMixError(f"IFEval prompt {record['key']}: unknown instruction id(s) {unknown}")
            example = utils.InputExample(
                key=record["key"],
                instruction_id_list=record["instruction_id_list"],
                prompt=record["prompt"],
                kwargs=record["kwargs"],
            )
            seed = f"ifeval:{record['prompt']}"
            random.seed(seed)
            strict = utils.test_instruction_following_strict(example, response)
            random.seed(seed)
            loose = utils.test_instruction_following_loose(example, response)
            rows.append(
                {
                    "key": record["key"],
                    "prompt": record["prompt"],
                    "response": response,
                    # lm-eval's process_results fields
                    "prompt_level_strict_acc": strict.follow_all_instructions,
                    "inst_level_strict_acc": strict.follow_instruction_list,
                    "prompt_level_loose_acc": loose.follow_all_instructions,
                    "inst_level_loose_acc": loose.follow_instruction_list,
                }
            )
    finally:
        random.setstate(state)
    n = len(rows)

    def _inst(name: str) -> float:
        flat = [ok for row in rows for ok in row[name]]
        return sum(flat) / len(flat)

    metrics = {
        "prompt_level_strict_acc": sum(r["prompt_level_strict_acc"] for r in rows) / n,
        "inst_level_strict_acc": _inst("inst_level_strict_acc"),
        "prompt_level_loose_acc": sum(r["prompt_level_loose_acc"] for r in rows) / n,
        "inst_level_loose_acc": _inst("inst_level_loose_acc"),
        "n": n,
    }
    return metrics, rows
