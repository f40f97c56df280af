"""Offline fixtures: a character-level tokenizer and tiny random Llama / Qwen2 models saved to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

ASSETS = Path(__file__).parent / "assets"


def ntp_train_argv(model: str, out: Path, *extra: str) -> list[str]:
    """``sftmix train`` arguments for plain NTP of ``model`` on the asset Alpaca file into ``out`` (CPU, fp32, batch
    2, no logging backends); ``extra`` come last, so they override."""
    return [
        "train", "--dataset_name", str(ASSETS / "data" / "alpaca.json"), "--model_name_or_path", model,
        "--use_cpu", "true", "--bf16", "false", "--mixup_weight", "0", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--output_dir", str(out), *extra,
    ]  # fmt: skip


def write_addition_data(path: Path, n: int = 48) -> Path:
    """``n`` Alpaca rows "Add a and b." -> "a + b = c ok ok" (responses of 1 to 5 extra tokens, so the split has
    two sides), as a JSONL file at ``path``."""
    rows = [
        {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}" + " ok" * (a % 5)}
        for a, b in zip(range(3, 3 + n), range(50, 50 - n, -1), strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOKENIZER_DIR = ASSETS / "tiny_tokenizer"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=1,
        eos_token_id=3,
        bos_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer random Llama (tied embeddings) with the tiny tokenizer, saved as a local model dir."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer random Qwen2 (untied head, attention biases) with the tiny tokenizer."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=3,
    )
    return _save(Qwen2ForCausalLM(config), tokenizer, tmp_path_factory.mktemp("tiny_qwen2"))
