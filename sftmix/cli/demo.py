"""``sftmix demo``: the whole pipeline, offline, on the built-in default model and generated demo data.

The demo data is made here, deterministically, so that the package ships no third-party data: short
instruction/response pairs of several kinds (arithmetic, word games, unit conversions, facts), some easy for a
small instruct model and some hard, which gives the confidence split something to find. It is written to
``<output_dir>/demo_data.jsonl`` in the Alpaca format and then read back like any user file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..io_utils import atomic_write_text
from ..sftmix_config import DEFAULT_MODEL

DEMO_OUTPUT_DIR = "sftmix_demo"
DEMO_SIZE = 96

_CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
    ("Spain", "Madrid"),
    ("Greece", "Athens"),
    ("India", "New Delhi"),
    ("Brazil", "Brasilia"),
    ("Australia", "Canberra"),
]
_WORDS = ["planet", "river", "garden", "window", "silver", "pencil", "orange", "rocket", "bridge", "candle"]


def _example(rng: random.Random, k: int) -> dict[str, str]:
    kind = k % 6
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
    if kind == 1:
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        return {
            "instruction": "Multiply the two numbers and show the result.",
            "input": f"{a} and {b}",
            "output": f"{a} x {b} = {a * b}.",
        }
    if kind == 2:
        country, capital = rng.choice(_CAPITALS)
        return {
            "instruction": f"What is the capital of {country}?",
            "input": "",
            "output": f"The capital of {country} is {capital}.",
        }
    if kind == 3:
        word = rng.choice(_WORDS)
        return {"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]}
    if kind == 4:
        km = rng.randint(1, 50)
        return {
            "instruction": f"Convert {km} kilometres to metres.",
            "input": "",
            "output": f"{km} kilometres is {km * 1000} metres, because one kilometre is 1000 metres.",
        }
    numbers = rng.sample(range(1, 100), 5)
    return {
        "instruction": "Sort these numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def demo_records(n: int = DEMO_SIZE, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic Alpaca-format demo examples.

    >>> demo_records(2)[0]["instruction"]
    'What is 51 + 99?'
    """
    rng = random.Random(seed)
    return [_example(rng, k) for k in range(n)]


def write_demo_data(path: str | Path, n: int = DEMO_SIZE) -> Path:
    """Write the demo data as JSON lines to ``path`` (atomically) and return the path."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in demo_records(n)))
    return path


def demo_defaults(output_dir: str = DEMO_OUTPUT_DIR) -> dict[str, Any]:
    """The demo's settings: small and quick on 2 CPU cores, otherwise the paper's recipe (scaled)."""
    return {
        "model_name_or_path": DEFAULT_MODEL,
        "output_dir": output_dir,
        "max_length": 256,
        "num_checkpoints": 3,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-5,
        "weight_decay": 0.1,
        "lr_scheduler_type": "cosine",
        "gradient_checkpointing": False,
        "warmup_steps": 0.1,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 4,
        "save_total_limit": 1,  # the last checkpoint is all a resume needs (each one is ~1.6 GB)
        "report_to": ["tensorboard"],
        "seed": 42,
    }
