"""Greedy chat generation, and answer files for the judged benchmarks (MT-Bench, AlpacaEval).

The answer files use the official formats, so that the official judges run on them unchanged:

- MT-Bench: FastChat's ``model_answer/<model_id>.jsonl``, one line per question,
  ``{question_id, answer_id, model_id, choices: [{index: 0, turns: [answer_1, answer_2]}], tstamp}``; the
  second turn is generated after the model's own first answer, as FastChat's ``gen_model_answer.py`` does.
  Copy it to ``fastchat/llm_judge/data/mt_bench/model_answer/`` and run ``gen_judgment.py``, or set
  ``--judge_model`` (see `sftmix.evaluation.judge`).
- AlpacaEval: ``model_outputs.json``, a JSON list of ``{instruction, output, generator, dataset}``, the input of
  ``alpaca_eval --model_outputs model_outputs.json``.

Decoding is greedy for every question. FastChat samples some MT-Bench categories (temperature 0.7 for
writing/roleplay, 0.1 for stem/humanities); greedy keeps runs reproducible, and is our choice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from ..errors import SFTMixError
from ..io_utils import atomic_write_jsonl, atomic_write_text
from .tasks import iter_json_records


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of the generation config and tokenizer, plus ChatML's ``<|im_end|>`` when the vocabulary has it
    (the fallback chat template ends turns with it even in models whose EOS is another token)."""
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.extend(value if isinstance(value, list) else [value] if value is not None else [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.append(im_end)
    return sorted(set(ids))


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the chat template, ending with the assistant header.

    The template's own BOS (Llama 3 writes it) is not doubled by the tokenizer's.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]


@torch.inference_mode()
def generate_chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 512,
    batch_size: int = 8,
    desc: str = "Generating",
) -> list[str]:
    """Greedy answers to chat ``conversations`` (each a list of ``{"role", "content"}`` ending with a user turn).

    Prompts are sorted by length and left-padded in batches of ``batch_size``; generation stops at the
    end-of-turn token or after ``max_new_tokens``. Returns the decoded answers (special tokens removed,
    whitespace stripped) in the order of ``conversations``.
    """
    prompts = [render_chat(tokenizer, conversation) for conversation in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=_stop_token_ids(model, tokenizer) or None,
    )
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        batch = order[start : start + batch_size]
        input_ids = pad([torch.tensor(prompts[i], dtype=torch.long) for i in batch], pad_id, "left")
        attention_mask = pad([torch.ones(len(prompts[i]), dtype=torch.long) for i in batch], 0, "left")
        width = input_ids.shape[1]
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        for r, i in enumerate(batch):
            answers[i] = tokenizer.decode(output[r, width:], skip_special_tokens=True).strip()
    return answers


# ---------------------------------------------------------------------------------------------------------
# MT-Bench


def load_mt_bench_questions(path: str | Path) -> list[dict[str, Any]]:
    """FastChat's ``question.jsonl``: ``{question_id, category, turns: [...]}`` per line."""
    questions = []
    for location, record in iter_json_records(Path(path)):
        turns = record.get("turns") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise SFTMixError(f"{location}: an MT-Bench question needs 'turns', a list of strings")
        if "question_id" not in record:
            raise SFTMixError(f"{location}: missing field 'question_id'")
        questions.append(record)
    return questions


def generate_mt_bench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[dict[str, Any]],
    model_id: str,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Answer every turn of every question; turn ``t`` sees the question's earlier turns and the model's own
    earlier answers. Returns FastChat ``model_answer`` records."""
    conversations: list[list[dict[str, str]]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        outputs = generate_chat(
            model,
            tokenizer,
            [conversations[i] for i in active],
            max_new_tokens,
            batch_size,
            desc=f"MT-Bench turn {turn + 1}",
        )
        for i, output in zip(active, outputs, strict=True):
            conversations[i].append({"role": "assistant", "content": output})
            answers[i].append(output)
    return [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex[:22],
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        for q, turns in zip(questions, answers, strict=True)
    ]


def write_mt_bench_answers(records: list[dict[str, Any]], output_dir: str | Path, model_id: str) -> Path:
    """Write ``<output_dir>/model_answer/<model_id>.jsonl`` (FastChat's layout) and return its path."""
    path = Path(output_dir) / "model_answer" / f"{model_id}.jsonl"
    atomic_write_jsonl(path, records)
    return path


# ---------------------------------------------------------------------------------------------------------
# AlpacaEval


def load_alpaca_eval_instructions(path: str | Path) -> list[dict[str, Any]]:
    """AlpacaEval's eval set: a JSON list (or JSON lines) of records with an ``instruction``."""
    records = []
    for location, record in iter_json_records(Path(path)):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise SFTMixError(f"{location}: an AlpacaEval record needs an 'instruction' string")
        records.append(record)
    return records


def generate_alpaca_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    generator: str,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Answer every instruction; returns AlpacaEval ``model_outputs`` records."""
    outputs = generate_chat(
        model,
        tokenizer,
        [[{"role": "user", "content": r["instruction"]}] for r in records],
        max_new_tokens,
        batch_size,
        desc="AlpacaEval",
    )
    return [
        {
            "instruction": r["instruction"],
            "output": output,
            "generator": generator,
            "dataset": r.get("dataset"),
        }
        for r, output in zip(records, outputs, strict=True)
    ]


def write_alpaca_eval_outputs(records: list[dict[str, Any]], output_dir: str | Path) -> Path:
    """Write ``<output_dir>/model_outputs.json`` (the file ``alpaca_eval --model_outputs`` reads)."""
    path = Path(output_dir) / "model_outputs.json"
    atomic_write_text(path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return path
