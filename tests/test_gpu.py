"""The device check's correctness tests: each runs on CPU in CI and on CUDA under ``pytest -m gpu``.

A test's ``device`` parameter is ``cpu`` always and ``cuda`` when CUDA is there: the ``cuda`` cases carry the
``gpu`` marker and skip without CUDA, so CI runs the same bodies on the CPU and ``benchmarks/gpu/device_check.py``
runs ``pytest -m gpu`` on a device machine. The Liger tests are CUDA only (Liger's kernels are Triton).
"""

from __future__ import annotations

import math

import pytest
import torch
from sftmix_train_script import make_dataset, write_dynamics
from test_head import make_inputs
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.head import fused_linear_cross_entropy

CUDA = torch.cuda.is_available()
ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
# Tolerances of sftmix against TRL over three steps, from what CPU runs show (fp32: 1e-7 relative; bf16: 2e-5
# for the losses, 4e-4 for the gradient norm) with room for CUDA's other summation orders. A near-tie top-1 token
# can flip between two heads that sum differently (one token of the ~30 of a step is 0.03), so the accuracy gets
# an absolute tolerance.
TOLERANCES = {
    "fp32": {"loss": {"rel": 1e-4}, "entropy": {"rel": 1e-4}, "grad_norm": {"rel": 1e-4}, "mean_token_accuracy": {"abs": 0.05}},
    "bf16": {"loss": {"rel": 2e-3}, "entropy": {"rel": 2e-3}, "grad_norm": {"rel": 1e-2}, "mean_token_accuracy": {"abs": 0.1}},
}  # fmt: skip


def device_cases(cuda: list[tuple], cpu: list[tuple]) -> list:
    """``(device, *case)``: every case of ``cuda`` on CUDA (marked ``gpu``), those of ``cpu`` on the CPU. CI runs
    the CPU cases, a few: the others repeat what the CPU tests of `test_sftmix_trainer` already check."""
    return [pytest.param("cuda", *c, marks=ON_CUDA) for c in cuda] + [pytest.param("cpu", *c) for c in cpu]


DTYPES = [("fp32",), ("bf16",)]


def args_for(device: str, dtype: str, **overrides) -> dict:
    """Trainer arguments for a few steps of a tiny model on ``device`` (the Trainer places the model)."""
    return dict(
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, use_cpu=device == "cpu",
        bf16=dtype == "bf16", disable_tqdm=True,
    ) | overrides  # fmt: skip


def losses(trainer, key: str = "loss") -> list[float]:
    return [e[key] for e in trainer.state.log_history if key in e and "train_runtime" not in e]


class GradientRecorder(TrainerCallback):
    """Names of the trainable parameters that got a finite, non-zero gradient at some optimizer step."""

    def __init__(self) -> None:
        self.with_gradient: set[str] = set()
        self.trainable: set[str] = set()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.trainable.add(name)
                if p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0:
                    self.with_gradient.add(name)


@pytest.fixture
def dataset():
    return make_dataset(num_examples=12)


@pytest.fixture
def dynamics(tmp_path, dataset) -> str:
    return str(write_dynamics(tmp_path / "dynamics.jsonl", dataset))


@pytest.fixture
def restore_modeling():
    """Liger patches the classes and functions of transformers' Llama module for every later model in the
    process: put them back after the test."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


def trl_and_sftmix(tmp_path, model_dir, tokenizer, dataset, args: dict) -> tuple[SFTTrainer, SFTMixTrainer]:
    """The same steps by ``trl.SFTTrainer`` and by ``SFTMixTrainer(mixup_weight=0)``."""
    trl_trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=SFTConfig(output_dir=str(tmp_path / "trl"), **args),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trl_trainer.train()
    ours = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=SFTMixConfig(output_dir=str(tmp_path / "ours"), mixup_weight=0.0, **args),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    ours.train()
    return trl_trainer, ours


@pytest.mark.parametrize(("device", "dtype"), device_cases(DTYPES, [("bf16",)]))
def test_ntp_equals_trl(tmp_path, tiny_llama_dir, tokenizer, dataset, device, dtype):
    trl_trainer, ours = trl_and_sftmix(tmp_path, tiny_llama_dir, tokenizer, dataset, args_for(device, dtype))
    assert ours._own_head and next(ours.model.parameters()).device.type == device
    assert len(losses(ours)) == 3
    for key, tolerance in TOLERANCES[dtype].items():
        assert losses(ours, key) == pytest.approx(losses(trl_trainer, key), **tolerance), key
    assert losses(ours, "num_tokens") == losses(trl_trainer, "num_tokens")


@pytest.mark.parametrize(("device", "dtype"), device_cases(DTYPES, DTYPES))
def test_fused_head_equals_full_logits(device, dtype, monkeypatch):
    """Values and gradients of the fused head (two targets per row, label smoothing, several chunks) against
    full-logits cross-entropy in fp64. In bf16 the head's products round their inputs (so does any bf16 head):
    the values are compared with full logits computed under the same autocast, the gradients by relative norm."""
    if device == "cuda":  # fp32 means fp32 here, whatever an earlier test or library chose
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu = make_inputs(n=300, h=64, v=3000, with_bias=True)
    hidden, weight, bias = (t.detach().to(device).requires_grad_() for t in cpu[:3])
    y1, w1, y2, w2 = (t.to(device) for t in cpu[3:])
    params, eps = (hidden, weight, bias), 0.1
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = fused_linear_cross_entropy(
            hidden, weight, y1, w1, bias, y2, w2, chunk_size=128, label_smoothing=eps, with_stats=True
        )
        logits = torch.nn.functional.linear(hidden, weight, bias).float()  # autocast: bf16 products
    got = torch.autograd.grad(out.loss, params)

    def smoothed(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.double(), dim=-1)
        ce1, ce2 = -logp.gather(1, y1[:, None]).squeeze(1), -logp.gather(1, y2[:, None]).squeeze(1)
        smooth = -logp.mean(-1)
        return (w1 * ((1 - eps) * ce1 + eps * smooth) + w2 * ((1 - eps) * ce2 + eps * smooth)).sum()

    same_rounding = smoothed(logits)
    exact = smoothed(torch.nn.functional.linear(hidden.double(), weight.double(), bias.double()))
    want = torch.autograd.grad(exact, params)
    assert out.loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got)
    if dtype == "fp32":
        torch.testing.assert_close(out.loss.double(), exact, rtol=1e-5, atol=1e-5)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(out.loss.double(), same_rounding.detach(), rtol=2e-3, atol=2e-3)
        for g, w in zip(got, want, strict=True):
            assert ((g.double() - w).norm() / w.norm()).item() < 3e-2
    assert out.entropy.isfinite().all() and out.is_top1.device.type == device


@pytest.mark.parametrize(
    ("device", "variant", "dtype"),
    device_cases(
        [(v, d) for v in ("plain", "gradient_checkpointing", "lora") for (d,) in DTYPES],
        [("gradient_checkpointing", "bf16"), ("lora", "bf16")],
    ),
)
def test_sftmix_trains(tmp_path, tiny_qwen2_dir, tokenizer, dataset, dynamics, device, dtype, variant):
    """Mixup on an untied head with attention biases: finite losses, and every trainable parameter gets a
    gradient (LoRA's A matrices from the second step, once B is no longer zero)."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    recorder = GradientRecorder()
    trainer = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir),
        args=SFTMixConfig(
            output_dir=str(tmp_path / "out"),
            dynamics_path=dynamics,
            **args_for(device, dtype, gradient_checkpointing=variant == "gradient_checkpointing"),
        ),  # fmt: skip
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora if variant == "lora" else None,
        callbacks=[recorder],
    )
    trainer.train()
    for key in ("loss", "loss_ntp", "loss_mixup"):
        values = losses(trainer, key)
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), (key, values)
    assert recorder.trainable and recorder.with_gradient == recorder.trainable
    assert (variant == "lora") == all("lora_" in n for n in recorder.trainable)


# ---- Liger: CUDA only ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_liger_ntp_equals_trl_with_liger(
    tmp_path, tiny_llama_dir, tokenizer, dataset, dtype, restore_modeling
):
    """TRL applies Liger's layer kernels (RMSNorm, RoPE, SwiGLU) and keeps its own head; sftmix's head then runs
    on the same Liger backbone: the NTP losses agree as without Liger."""
    pytest.importorskip("liger_kernel")
    args = args_for("cuda", dtype, use_liger_kernel=True)
    trl_trainer, ours = trl_and_sftmix(tmp_path, tiny_llama_dir, tokenizer, dataset, args)
    for trainer in (trl_trainer, ours):  # the kernels were applied (Liger rebinds the instances' methods)
        assert trainer.model.model.norm._get_name() == "LigerRMSNorm"
    for key, tolerance in TOLERANCES[dtype].items():
        assert losses(ours, key) == pytest.approx(losses(trl_trainer, key), **tolerance), key


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_liger_with_mixup_trains_and_keeps_the_loss(tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics, restore_modeling):  # fmt: skip
    """Mixup with Liger's layer kernels works (it is not refused): the Mixup head runs on the backbone's hidden
    states, which Liger computes with its own kernels. The first step's loss equals the one without Liger (the
    same weights, batch and lambdas), and every parameter gets a gradient."""
    pytest.importorskip("liger_kernel")
    first: dict[bool, float] = {}
    for liger in (False, True):
        recorder = GradientRecorder()
        trainer = SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=SFTMixConfig(
                output_dir=str(tmp_path / str(liger)),
                dynamics_path=dynamics,
                **args_for("cuda", "fp32", use_liger_kernel=liger),
            ),  # fmt: skip
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[recorder],
        )
        trainer.train()
        assert (trainer.model.model.norm._get_name() == "LigerRMSNorm") == liger
        assert all(math.isfinite(v) and v > 0 for v in losses(trainer, "loss_mixup"))
        assert recorder.with_gradient == recorder.trainable
        first[liger] = losses(trainer)[0]
    assert first[True] == pytest.approx(first[False], rel=1e-4)
