"""MT-Bench single-answer grading through any OpenAI-compatible chat endpoint, with FastChat's judge prompts.

This is FastChat's ``gen_judgment.py --mode single`` protocol: every turn of every answer gets a 1-10 rating
from the judge; math, reasoning and coding questions are graded against the reference answers with the
``single-math-v1`` prompts, the others with ``single-v1``; the second turn uses the ``*-multi-turn`` prompts
that show the whole conversation. The rating is read from ``[[n]]`` (or ``[n]``); an unreadable one is -1,
counted (``n_unreadable``) and left out of the mean, as in FastChat's ``show_result.py``. The MT-Bench score
is the mean over all turns; with no readable rating it is ``None`` (``null`` in eval.json), never NaN.

Configuration: ``--judge_model NAME`` plus the environment variables ``OPENAI_BASE_URL`` (e.g.
``https://api.openai.com/v1``, a vLLM server or ``transformers serve``) and ``OPENAI_API_KEY`` (optional for
local servers). The `openai` client does the retries (``judge_max_retries``, with back-off) and timeouts
(``judge_timeout``); a server that is down, a refused key or a timeout stops the run with one line.

Each judgment is appended to ``model_judgment/<judge>_single.jsonl`` (FastChat's file) as soon as it comes
back, so an interrupted run loses nothing: a rerun reuses every judgment whose prompt (question, answer and
reference) is unchanged and asks only for the others.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import SFTMixError
from ..io_utils import atomic_write_jsonl
from .tasks import iter_json_records

NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")  # FastChat's NEED_REF_CATS
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
LOCAL_API_KEY = "EMPTY"  # what vLLM and `transformers serve` accept; the openai client refuses no key at all


def endpoint() -> tuple[str, str]:
    """``(base_url, api_key)`` from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``; one line if the URL is unset."""
    base_url = os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise SFTMixError(
            "judge_model is set but OPENAI_BASE_URL is not: set it to an OpenAI-compatible endpoint "
            "(e.g. http://127.0.0.1:8000/v1)"
        )
    return base_url.rstrip("/"), os.environ.get("OPENAI_API_KEY") or LOCAL_API_KEY


def make_client(base_url: str, api_key: str, timeout: float = 600.0, max_retries: int = 3) -> Any:
    """An ``openai.OpenAI`` client; one line if the ``openai`` package is missing."""
    try:
        import openai
    except ImportError as e:
        raise SFTMixError("judging needs the openai package: pip install 'sftmix[eval]'") from e
    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)


def explain_api_error(error: Exception, base_url: str, timeout: float, retries: int) -> SFTMixError:
    """One line for an ``openai`` exception: what went wrong at which endpoint, and what to do."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return SFTMixError(
            f"judge endpoint {base_url} did not answer within {timeout}s ({retries} retries): "
            "raise --judge_timeout or check the server"
        )
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return SFTMixError(
            f"judge endpoint {base_url} unreachable ({type(cause).__name__}: {cause}): start the server or "
            "fix OPENAI_BASE_URL"
        )
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return SFTMixError(
            f"judge endpoint {base_url} refused the key (HTTP {error.status_code}): check OPENAI_API_KEY"
        )
    if isinstance(error, openai.APIStatusError):
        return SFTMixError(f"judge endpoint {base_url} answered HTTP {error.status_code}: {_detail(error)}")
    return SFTMixError(f"judge endpoint {base_url}: {type(error).__name__}: {error}")


def _detail(error: Any) -> str:
    """The server's own message (FastAPI's ``detail``, OpenAI's ``error.message``), else the exception's."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            body = inner.get("message") or inner.get("detail") or body
        return str(body.get("detail", body) if isinstance(body, dict) else body)[:300]
    return str(error)[:300]


def chat_completion(
    client: Any,
    messages: list[dict[str, str]],
    model: str,
    temperature: float = 0.0,
    max_tokens: int = 2048,
) -> str:
    """The first choice's message text ("" when the server sends none); `openai` errors become one line."""
    import openai

    try:
        response = client.chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=max_tokens
        )
    except openai.OpenAIError as e:
        timeout = getattr(client.timeout, "read", client.timeout)  # a float, or an httpx Timeout
        raise explain_api_error(e, str(client.base_url).rstrip("/"), timeout, client.max_retries) from e
    choices = getattr(response, "choices", None) or []
    return (choices[0].message.content or "") if choices else ""


def parse_rating(judgment: str) -> float:
    """The rating in a judgment: ``"Rating: [[7]]"`` -> 7.0; -1 when there is none (FastChat's convention)."""
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    return float(match.group(1)) if match else -1.0


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    """FastChat's ``judge_prompts.jsonl``, by prompt name."""
    return {record["name"]: record for _, record in iter_json_records(Path(path))}


def load_reference_answers(path: str | Path) -> dict[Any, list[str]]:
    """Reference answers (FastChat ``model_answer`` format) by question id: the turns of the first choice."""
    path = Path(path)
    if not path.is_file():
        return {}
    return {r["question_id"]: r["choices"][0]["turns"] for _, r in iter_json_records(path)}


def judgment_file(output_dir: str | Path, judge_model: str) -> Path:
    """FastChat's ``model_judgment/<judge>_single.jsonl`` (the judge's name made safe for a file name)."""
    name = re.sub(r"[^\w.-]+", "_", judge_model).strip("_") or "judge"
    return Path(output_dir) / "model_judgment" / f"{name}_single.jsonl"


def _judgment_key(record: dict[str, Any]) -> tuple:
    return (
        record["question_id"],
        record["model"],
        tuple(record["judge"]),
        record["turn"],
        record["user_prompt"],
    )


def load_judgments(path: Path) -> list[dict[str, Any]]:
    """The records of a judgment file; a line cut short by a crash is dropped (it is judged again)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            _judgment_key(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        records.append(record)
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    """Append one line and flush it to disk, so that a crash or Ctrl-C keeps every finished judgment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _prompts(question: dict[str, Any], turns: list[str], ref: list[str] | None, judge_prompts: dict) -> list:
    """``(prompt name, system prompt, user prompt)`` for each turn of one answer."""
    needs_ref = question.get("category") in NEED_REF_CATEGORIES
    if needs_ref and not ref:
        raise SFTMixError(f"MT-Bench question {question['question_id']} needs a reference answer for judging")
    out = []
    for turn in range(len(turns)):
        name = ("single-math-v1" if needs_ref else "single-v1") + ("-multi-turn" if turn else "")
        if name not in judge_prompts:
            raise SFTMixError(f"judge prompt {name!r} missing from judge_prompts.jsonl")
        fields: dict[str, str] = {}
        if turn == 0:
            fields.update(question=question["turns"][0], answer=turns[0])
        else:
            fields.update(
                question_1=question["turns"][0],
                question_2=question["turns"][1],
                answer_1=turns[0],
                answer_2=turns[1],
            )
        if needs_ref:
            assert ref is not None
            fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1] if len(ref) > 1 else "")
        prompt = judge_prompts[name]
        out.append((name, prompt["system_prompt"], prompt["prompt_template"].format(**fields)))
    return out


def mt_bench_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean rating over all turns and per turn (``None`` without a readable one) and the counts."""

    def mean(turn: int | None) -> float | None:
        scores = [r["score"] for r in records if r["score"] != -1 and (turn is None or r["turn"] == turn)]
        return sum(scores) / len(scores) if scores else None

    return {
        "score": mean(None),
        "score_turn1": mean(1),
        "score_turn2": mean(2),
        "n_judgments": len(records),
        "n_unreadable": sum(r["score"] == -1 for r in records),
    }


def judge_mt_bench(
    questions: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    judge_model: str,
    judge_prompts: dict[str, dict[str, Any]],
    references: dict[Any, list[str]],
    judgments_path: str | Path | None = None,
    timeout: float = 600.0,
    max_retries: int = 3,
    max_tokens: int = 2048,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Grade each turn of each answer; return the MT-Bench scores and FastChat-style judgment records.

    Args:
        questions: MT-Bench questions (``question_id``, ``category``, ``turns``).
        answers: The model's answer records (``question_id``, ``model_id``, ``choices[0].turns``), same order.
        judge_model: Model name on the endpoint (FastChat's judge is ``gpt-4``).
        judge_prompts: `load_judge_prompts` of FastChat's ``judge_prompts.jsonl``.
        references: `load_reference_answers` of ``reference_answer/gpt-4.jsonl``.
        judgments_path: FastChat's ``model_judgment/<judge>_single.jsonl``: judgments already there (same
            prompt) are reused, new ones appended as they come; at the end it holds this run's judgments and
            the earlier ones of other questions and models. None: nothing is read or written.
        timeout: Seconds to wait for one judgment.
        max_retries: Retries of a failed request (connection errors, 408/429/5xx), with back-off.
        max_tokens: Longest judgment (FastChat: 2048).

    Returns:
        ``{"score", "score_turn1", "score_turn2", "n_judgments", "n_unreadable"}`` and one record per turn.
    """
    base_url, api_key = endpoint()
    path = Path(judgments_path) if judgments_path is not None else None
    previous = load_judgments(path) if path is not None else []
    if (
        path is not None and path.is_file()
    ):  # rewritten without a line a crash cut short, so appends stay whole
        atomic_write_jsonl(path, previous)
    done = {_judgment_key(r): r for r in previous}
    client = make_client(base_url, api_key, timeout, max_retries)
    records: list[dict[str, Any]] = []
    try:
        for question, answer in zip(questions, answers, strict=True):
            turns = answer["choices"][0]["turns"]
            ref = question.get("reference") or references.get(question["question_id"])
            for turn, (name, system, user_prompt) in enumerate(_prompts(question, turns, ref, judge_prompts)):
                record = {
                    "question_id": question["question_id"],
                    "model": answer["model_id"],
                    "judge": [judge_model, name],
                    "user_prompt": user_prompt,
                    "turn": turn + 1,
                }
                if (old := done.get(_judgment_key(record))) is not None:
                    records.append(old)
                    continue
                messages = [{"role": "system", "content": system}, {"role": "user", "content": user_prompt}]
                judgment = chat_completion(client, messages, judge_model, max_tokens=max_tokens)
                record.update(judgment=judgment, score=parse_rating(judgment), tstamp=time.time())
                records.append(record)
                if path is not None:
                    _append(path, record)
    finally:
        client.close()  # its connection pool, now rather than at interpreter exit
    if path is not None:  # drop the judgments this run replaced (their answer changed); keep all others
        kept = {id(r) for r in records}
        replaced = {_judgment_key(r)[:4] for r in records}
        others = [r for r in previous if id(r) not in kept and _judgment_key(r)[:4] not in replaced]
        atomic_write_jsonl(path, others + records)
    return mt_bench_metrics(records), records
