"""MT-Bench single-answer grading through any OpenAI-compatible chat endpoint, with FastChat's judge prompts.

This is FastChat's ``gen_judgment.py --mode single`` protocol: every turn of every answer gets a 1-10 rating
from the judge; math, reasoning and coding questions are graded against the reference answers with the
``single-math-v1`` prompts, the others with ``single-v1``; the second turn uses the ``*-multi-turn`` prompts
that show the whole conversation. The rating is read from ``[[n]]`` (or ``[n]``); an unreadable one is -1 and
left out of the mean, as in FastChat's ``show_result.py``. The MT-Bench score is the mean over all turns.

Configuration: ``--judge_model NAME`` plus the environment variables ``OPENAI_BASE_URL`` (e.g.
``https://api.openai.com/v1`` or a local vLLM server) and ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import SFTMixError
from .tasks import iter_json_records

NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")  # FastChat's NEED_REF_CATS
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def chat_completion(
    messages: list[dict[str, str]],
    model: str,
    base_url: str,
    api_key: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 2048,
    timeout: float = 120.0,
    retries: int = 3,
) -> str:
    """POST ``{base_url}/chat/completions`` and return the first choice's message text.

    Retries transient failures (connection errors, HTTP 429 and 5xx) ``retries`` times with a short back-off.
    """
    body = json.dumps(
        {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = base_url.rstrip("/") + "/chat/completions"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
            return payload["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500 or attempt == retries:
                raise SFTMixError(f"judge endpoint {url} answered HTTP {e.code}: {e.reason}") from e
        except (urllib.error.URLError, TimeoutError) as e:
            if attempt == retries:
                raise SFTMixError(f"judge endpoint {url} unreachable: {e}") from e
        except (KeyError, IndexError, json.JSONDecodeError) as e:
            raise SFTMixError(f"judge endpoint {url} returned no chat completion ({e!r})") from e
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


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


def judge_mt_bench(
    questions: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    judge_model: str,
    judge_prompts: dict[str, dict[str, Any]],
    references: dict[Any, list[str]],
    base_url: str | None = None,
    api_key: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Grade each turn of each answer; return the MT-Bench scores and FastChat-style judgment records.

    Args:
        questions: MT-Bench questions (``question_id``, ``category``, ``turns``).
        answers: The model's answer records (``question_id``, ``model_id``, ``choices[0].turns``), same order.
        judge_model: Model name on the endpoint (FastChat's judge is ``gpt-4``).
        judge_prompts: `load_judge_prompts` of FastChat's ``judge_prompts.jsonl``.
        references: `load_reference_answers` of ``reference_answer/gpt-4.jsonl``.
        base_url: Endpoint; default ``$OPENAI_BASE_URL``.
        api_key: Key; default ``$OPENAI_API_KEY``.

    Returns:
        ``{"score", "score_turn1", "score_turn2", "n_judgments"}`` and one record per judged turn.
    """
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not base_url:
        raise SFTMixError(
            "judge_model is set but OPENAI_BASE_URL is not: set it to an OpenAI-compatible endpoint"
        )
    records = []
    for question, answer in zip(questions, answers, strict=True):
        turns = answer["choices"][0]["turns"]
        needs_ref = question.get("category") in NEED_REF_CATEGORIES
        ref = question.get("reference") or references.get(question["question_id"])
        if needs_ref and not ref:
            raise SFTMixError(
                f"MT-Bench question {question['question_id']} needs a reference answer for judging"
            )
        for turn in range(len(turns)):
            name = ("single-math-v1" if needs_ref else "single-v1") + ("-multi-turn" if turn else "")
            if name not in judge_prompts:
                raise SFTMixError(f"judge prompt {name!r} missing from judge_prompts.jsonl")
            prompt = judge_prompts[name]
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
                fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1] if len(ref) > 1 else "")
            user_prompt = prompt["prompt_template"].format(**fields)
            messages = [
                {"role": "system", "content": prompt["system_prompt"]},
                {"role": "user", "content": user_prompt},
            ]
            judgment = chat_completion(messages, judge_model, base_url, api_key)
            records.append(
                {
                    "question_id": question["question_id"],
                    "model": answer["model_id"],
                    "judge": [judge_model, name],
                    "user_prompt": user_prompt,
                    "judgment": judgment,
                    "score": parse_rating(judgment),
                    "turn": turn + 1,
                    "tstamp": time.time(),
                }
            )

    def _mean(turn: int | None) -> float:
        scores = [r["score"] for r in records if r["score"] != -1 and (turn is None or r["turn"] == turn)]
        return sum(scores) / len(scores) if scores else float("nan")

    metrics = {
        "score": _mean(None),
        "score_turn1": _mean(1),
        "score_turn2": _mean(2),
        "n_judgments": len(records),
    }
    return metrics, records
