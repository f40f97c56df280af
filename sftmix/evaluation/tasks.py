"""Readers for the multiple-choice benchmarks, in the formats they are published in, and their prompts.

Every reader returns `MCItem`s and raises `SFTMixError` naming the file and line (or row) of a bad record.
One record parser understands all the multiple-choice schemas below, so each task reads any of them:

- generic ``mc`` JSON lines: ``{"question", "choices": [...], "answer": int, "context"?, "id"?, "subject"?}``
  (choices written as ``"A. text"``, like the reduced MedMCQA dev copy, have their letter prefix removed);
- MedQA-USMLE and MedAgentsBench: ``{"question", "options": {"A": ...}, "answer_idx": "A"}``;
- MedMCQA as released: ``{"question", "opa", "opb", "opc", "opd", "cop"}`` (``cop`` 1-4 in the original
  GitHub release, 0-3 in the Hugging Face copy: the base is detected per file);
- MedQA on the Hub (``GBaker/MedQA-USMLE-4-options-hf``): ``{"sent1", "ending0".., "label"}``;
- PubMedQA: ``ori_pqal.json`` (PMID -> ``{QUESTION, CONTEXTS, final_decision}``), ``test_ground_truth.json``
  (PMID -> label, read together with the ``ori_pqal.json`` beside it) or the folder holding both (the
  official 500-question test split);
- MMLU CSVs with a header (``question,choice0..3,answer`` with 0-3 answers) or without one (the original
  ``hendrycks/test`` files with A-D answers); a folder is searched for ``*_test.csv``, and ``*_dev.csv``
  files beside them become the few-shot pool, as in lm-evaluation-harness.

Prompts follow lm-evaluation-harness (``lm_eval/tasks/<task>``) where it has a formulation, with its target
delimiter ``" "`` and few-shot delimiter ``"\\n\\n"``.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SFTMixError
from ..io_utils import iter_jsonl, read_utf8

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_TASKS = ("medqa", "medmcqa", "pubmedqa", "mmlu_medical", "mc")
PUBMEDQA_LABELS = ("yes", "no", "maybe")
_LETTER_PREFIX = re.compile(r"^\s*([A-Z])[.)]\s+")


@dataclass
class MCItem:
    """One multiple-choice question.

    Args:
        id: Stable identifier (the dataset's own id when it has one, else ``file:line``).
        question: The question text.
        choices: Option texts, in order (option ``k`` is letter ``LETTERS[k]``).
        answer: Index of the right option in ``choices``.
        context: A passage the question is about (PubMedQA's abstract), or None.
        subject: MMLU subject (``"clinical_knowledge"``...), or None.
    """

    id: str
    question: str
    choices: list[str]
    answer: int
    context: str | None = None
    subject: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Reading files


def read_text(path: Path) -> str:
    try:
        return read_utf8(path)
    except FileNotFoundError as e:
        raise SFTMixError(f"data file not found: {path}") from e


def load_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise SFTMixError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from e


def iter_json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` from a JSON-lines file or a JSON list, with ``file:line`` locations."""
    if path.suffix == ".json":
        data = load_json(path)
        for index, record in enumerate(data if isinstance(data, list) else [data]):
            yield f"{path}[{index}]", record
        return
    for lineno, record in iter_jsonl(path, read_text(path)):
        yield f"{path}:{lineno}", record  # also the id of an item without one: keep this form


def _text(record: dict[str, Any], key: str, location: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SFTMixError(f"{location}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _strip_letter_prefixes(choices: list[str]) -> list[str]:
    """``["A. x", "B. y"]`` -> ``["x", "y"]``, only when every option carries its own letter in order."""
    matches = [_LETTER_PREFIX.match(c) for c in choices]
    if all(m is not None and m.group(1) == LETTERS[k] for k, m in enumerate(matches)):
        return [c[m.end() :] for c, m in zip(choices, matches, strict=True)]
    return choices


def _answer_index(value: Any, n: int, location: str, field: str, base: int = 0) -> int:
    """An answer given as an int (``base``-indexed), a digit string or a letter, checked against ``n`` options."""
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    elif isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.isdigit():
        index = int(value) - base
    else:
        raise SFTMixError(f"{location}: field {field!r} must be an option index or letter, got {value!r}")
    if not 0 <= index < n:
        raise SFTMixError(f"{location}: answer {value!r} is out of range for {n} options")
    return index


def _record_id(record: dict[str, Any], location: str) -> str:
    """The record's own id, else ``file:line`` without the directory (the same id wherever the file lies)."""
    for key in ("id", "realidx", "key", "question_id"):
        if record.get(key) is not None:
            return str(record[key])
    return Path(location).name


def parse_mc_record(record: Any, location: str, cop_base: int = 0) -> MCItem:
    """Turn one record of any supported multiple-choice schema (see the module docstring) into an `MCItem`.

    Args:
        record: The decoded JSON object.
        location: ``file:line`` for error messages and as fallback id.
        cop_base: 1 when MedMCQA ``cop`` values count from 1 (the original release), else 0.
    """
    if not isinstance(record, dict):
        raise SFTMixError(f"{location}: expected a JSON object, got {type(record).__name__}")
    item_id = _record_id(record, location)
    context = record.get("context") if isinstance(record.get("context"), str) else None
    subject = record.get("subject") if isinstance(record.get("subject"), str) else None
    if "choices" in record:  # generic mc
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise SFTMixError(f"{location}: field 'choices' must be a list of at least two strings")
        choices = _strip_letter_prefixes(choices)
        if "answer" not in record:
            raise SFTMixError(f"{location}: missing field 'answer' (index of the right choice)")
        answer = _answer_index(record["answer"], len(choices), location, "answer")
        return MCItem(item_id, _text(record, "question", location), choices, answer, context, subject)
    if "options" in record:  # MedQA-USMLE / MedAgentsBench
        options = record["options"]
        if isinstance(options, dict):
            keys = sorted(options)
            choices = [str(options[k]) for k in keys]
        elif isinstance(options, list):
            keys, choices = list(LETTERS[: len(options)]), [str(o) for o in options]
        else:
            raise SFTMixError(f"{location}: field 'options' must be a dict of letters or a list")
        if "answer_idx" in record:
            key = str(record["answer_idx"]).strip()
            if key not in keys:
                raise SFTMixError(f"{location}: answer_idx {key!r} is not one of the options {keys}")
            answer = keys.index(key)
        elif record.get("answer") in choices:
            answer = choices.index(record["answer"])
        else:
            raise SFTMixError(f"{location}: missing field 'answer_idx' (letter of the right option)")
        return MCItem(item_id, _text(record, "question", location), choices, answer, context, subject)
    if "opa" in record:  # MedMCQA
        choices = [_text(record, k, location) for k in ("opa", "opb", "opc", "opd")]
        answer = _answer_index(record.get("cop"), 4, location, "cop", base=cop_base)
        return MCItem(item_id, _text(record, "question", location), choices, answer, context, subject)
    if "ending0" in record:  # MedQA on the Hub
        choices = [record[k] for k in sorted(k for k in record if k.startswith("ending"))]
        answer = _answer_index(record.get("label"), len(choices), location, "label")
        return MCItem(item_id, _text(record, "sent1", location), choices, answer, context, subject)
    if "QUESTION" in record:  # PubMedQA record (ori_pqal.json value)
        return _pubmedqa_item(record, item_id, location, record.get("final_decision"))
    raise SFTMixError(
        f"{location}: unknown multiple-choice record with fields {sorted(record)}; expected "
        "{question, choices, answer} or {question, options, answer_idx} or MedMCQA's {question, opa..opd, cop}"
    )


def _pubmedqa_item(record: dict[str, Any], item_id: str, location: str, label: Any) -> MCItem:
    if label not in PUBMEDQA_LABELS:
        raise SFTMixError(f"{location}: PubMedQA label must be yes/no/maybe, got {label!r}")
    contexts = record.get("CONTEXTS")
    if not isinstance(contexts, list):
        raise SFTMixError(f"{location}: field 'CONTEXTS' must be a list of strings")
    return MCItem(
        id=item_id,
        question=_text(record, "QUESTION", location),
        choices=list(PUBMEDQA_LABELS),
        answer=PUBMEDQA_LABELS.index(label),
        context="\n".join(contexts),
    )


def _cop_base(records: list[tuple[str, Any]]) -> int:
    """MedMCQA answers count from 1 in the original release (cop 1-4) and from 0 on the Hub (cop 0-3)."""
    cops = {r.get("cop") for _, r in records if isinstance(r, dict) and "opa" in r}
    return 1 if cops and 0 not in cops and 4 in cops else 0


def read_mc_file(path: str | Path) -> list[MCItem]:
    """Read every item of a JSON-lines (or JSON list) multiple-choice file, any supported schema."""
    path = Path(path)
    records = list(iter_json_records(path))
    base = _cop_base(records)
    items = [parse_mc_record(record, location, cop_base=base) for location, record in records]
    if not items:
        raise SFTMixError(f"{path}: no questions found")
    return items


def load_pubmedqa(path: str | Path) -> tuple[list[MCItem], list[MCItem]]:
    """PubMedQA questions and a few-shot pool.

    ``path`` is ``ori_pqal.json`` (all 1,000 PQA-L questions; the pool is empty: few-shot examples come from
    the other questions), ``test_ground_truth.json`` or the folder holding both (the official 500-question test
    split; the pool is the other 500 PQA-L questions, the training/CV half), or a MedAgentsBench-style
    JSON-lines file (abstract and question merged, the question on its last line).

    The test questions keep the order of ``ori_pqal.json``: ``test_ground_truth.json`` is sorted by label (all
    "yes" first), so its own order would make ``--limit`` subsets all "yes".
    """
    path = Path(path)
    if path.is_dir():
        path = path / "test_ground_truth.json"
    if path.suffix == ".jsonl":
        items = read_mc_file(path)
        for item in items:
            if item.context is None and "\n" in item.question.strip():
                item.context, item.question = item.question.strip().rsplit("\n", 1)
        return items, []
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise SFTMixError(f"{path}: expected PubMedQA's JSON object keyed by PMID")
    if all(isinstance(label, str) for label in data.values()):  # test_ground_truth.json: PMID -> label
        pqal_path = path.parent / "ori_pqal.json"
        if not pqal_path.is_file():
            raise SFTMixError(f"{path} holds only labels: ori_pqal.json (the questions) must be beside it")
        pqal = load_json(pqal_path)
        missing = next((pmid for pmid in data if pmid not in pqal), None)
        if missing is not None:
            raise SFTMixError(f"{path}[{missing}]: PMID {missing} is not in {pqal_path}")
        test = [_pubmedqa_item(pqal[p], p, f"{pqal_path}[{p}]", data[p]) for p in pqal if p in data]
        pool = [
            _pubmedqa_item(record, p, f"{pqal_path}[{p}]", record.get("final_decision"))
            for p, record in pqal.items()
            if p not in data
        ]
        return test, pool
    items = []
    for pmid, record in data.items():
        location = f"{path}[{pmid}]"
        if not isinstance(record, dict):
            raise SFTMixError(f"{location}: expected a PubMedQA record (QUESTION, CONTEXTS, final_decision)")
        items.append(_pubmedqa_item(record, pmid, location, record.get("final_decision")))
    return items, []


def _read_mmlu_csv(path: Path) -> list[MCItem]:
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError as e:
        raise SFTMixError(f"data file not found: {path}") from e
    items = []
    for rowno, row in enumerate(rows, start=1):
        if rowno == 1 and row and row[0].strip().lower() == "question":
            continue  # the re-exported CSVs have a header; the original hendrycks/test ones do not
        location = f"{path}:{rowno}"
        if len(row) < 4:
            raise SFTMixError(f"{location}: expected question, options..., answer; got {len(row)} columns")
        choices = row[1:-1]
        answer = _answer_index(row[-1].strip(), len(choices), location, "answer")
        items.append(MCItem(f"{subject}:{rowno}", row[0], choices, answer, subject=subject))
    return items


def load_mmlu(path: str | Path) -> tuple[list[MCItem], list[MCItem]]:
    """MMLU test items and the few-shot pool (the ``*_dev.csv`` files beside the test CSVs, if any).

    ``path`` is one CSV, a folder (searched recursively for ``*_test.csv``, else every ``*.csv``) or a
    MedAgentsBench-style JSON-lines file.
    """
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return read_mc_file(path), []
    if path.is_dir():
        files = sorted(path.rglob("*_test.csv")) or sorted(path.rglob("*.csv"))
        if not files:
            raise SFTMixError(f"{path}: no MMLU CSV files (*_test.csv) in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise SFTMixError(f"data file not found: {path}")
    items, pool = [], []
    for file in files:
        items.extend(_read_mmlu_csv(file))
        stem = re.sub(r"_test$", "", file.stem)
        for dev in (file.parent / f"{stem}_dev.csv", file.parent.parent / "dev" / f"{stem}_dev.csv"):
            if file.name.endswith("_test.csv") and dev.is_file():
                pool.extend(_read_mmlu_csv(dev))
                break
    if not items:
        raise SFTMixError(f"{path}: no questions found")
    return items, pool


def load_task(task: str, path: str | Path) -> tuple[list[MCItem], list[MCItem]]:
    """Read a multiple-choice task: ``(items, fewshot_pool)``; an empty pool means "the items themselves"."""
    path = Path(path)
    if not path.exists():
        raise SFTMixError(f"data file not found: {path}")
    if task == "pubmedqa":
        return load_pubmedqa(path)
    if task == "mmlu_medical":
        return load_mmlu(path)
    if path.is_dir():
        raise SFTMixError(f"{path} is a folder: task {task} reads one JSON-lines file")
    return read_mc_file(path), []


# ---------------------------------------------------------------------------------------------------------
# Prompts


def _subject_words(item: MCItem) -> str:
    return (item.subject or "medicine").replace("_", " ")


def description(task: str, item: MCItem, formulation: str) -> str:
    """Text put once before the few-shot examples (lm-eval's ``description``; MMLU only)."""
    if task != "mmlu_medical":
        return ""
    kind = "multiple choice questions" if formulation == "letter" else "questions"
    return f"The following are {kind} (with answers) about {_subject_words(item)}.\n\n"


def format_question(task: str, item: MCItem, formulation: str) -> str:
    """The prompt of one item, ending in ``"Answer:"``; the scored continuation is ``" " + choice_text(...)``.

    Cloze (all tasks): ``"Question: {q}\\nAnswer:"``, lm-eval's ``mmlu_continuation``; PubMedQA prepends
    ``"Abstract: {context}\\n"`` (lm-eval ``pubmedqa``, ``preprocess_pubmedqa.doc_to_text``).
    Letter: options listed ``"A. text"``; MedMCQA puts ``"Choices:"`` before them (lm-eval
    ``utils_medmcqa.doc_to_text``); MMLU drops the ``"Question: "`` prefix (lm-eval ``mmlu`` default);
    MedQA and generic ``mc`` use lm-eval's ``preprocess_medqa.doc_to_text``.
    """
    question = item.question.strip() if task == "mmlu_medical" else item.question
    if item.context is not None:
        lead = "Abstract: " if task == "pubmedqa" else ""
        head = f"{lead}{item.context}\nQuestion: {question}\n"
    elif task == "mmlu_medical" and formulation == "letter":
        head = f"{question}\n"
    else:
        head = f"Question: {question}\n"
    if formulation == "letter":
        if task == "medmcqa":
            head += "Choices:\n"
        head += "".join(f"{LETTERS[k]}. {choice}\n" for k, choice in enumerate(item.choices))
    return head + "Answer:"


def choice_text(item: MCItem, k: int, formulation: str) -> str:
    """What is scored for option ``k``: its letter, or its text (cloze)."""
    return LETTERS[k] if formulation == "letter" else item.choices[k]


def build_context(
    task: str,
    item: MCItem,
    formulation: str,
    shots: list[MCItem],
) -> str:
    """Description, the few-shot examples with their answers, then the item's prompt (lm-eval's layout)."""
    parts = [
        f"{format_question(task, shot, formulation)} {choice_text(shot, shot.answer, formulation)}"
        for shot in shots
    ]
    parts.append(format_question(task, item, formulation))
    return description(task, item, formulation) + "\n\n".join(parts)


def first_items(items: list[MCItem], limit: int | None) -> list[MCItem]:
    """The first ``limit`` items, or the first ``limit`` of each subject when there are several (lm-eval
    applies ``--limit`` to each MMLU subject task, so a limited run still covers every subject)."""
    if limit is None:
        return items
    subjects = {item.subject for item in items}
    if len(subjects) <= 1:
        return items[:limit]
    seen: dict[str | None, int] = {}
    kept = []
    for item in items:
        seen[item.subject] = seen.get(item.subject, 0) + 1
        if seen[item.subject] <= limit:
            kept.append(item)
    return kept


def sample_fewshot(items: list[MCItem], index: int, pool: list[MCItem], k: int, seed: int) -> list[MCItem]:
    """``k`` examples for item ``index``: from ``pool`` if given (MMLU dev, same subject first), else from the
    other items of the same file. Seeded per item, so results do not depend on ``--limit`` or batching.
    """
    if k <= 0:
        return []
    item = items[index]
    if pool:
        same = [p for p in pool if p.subject == item.subject]
        candidates = same if len(same) >= k else pool
        rng = random.Random(f"{seed}:{index}")
        return rng.sample(candidates, min(k, len(candidates)))
    # The other items of the file: draw from the n - 1 indices that skip ``index``.
    rng = random.Random(f"{seed}:{index}")
    picks = rng.sample(range(len(items) - 1), min(k, len(items) - 1))
    return [items[j + (j >= index)] for j in picks]
