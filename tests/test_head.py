"""sftmix.head: the fused chunked linear cross-entropy against a naive full-logits implementation."""

from __future__ import annotations

import pytest
import torch

from sftmix.head import fused_linear_cross_entropy, lm_head_parameters, lm_head_transform


def naive_loss(hidden, weight, bias, y1, w1, y2, w2, logit_scale=1.0, softcap=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits.double(), dim=-1)
    ce1 = -logp.gather(1, y1[:, None]).squeeze(1)
    ce2 = -logp.gather(1, y2[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (w1 * ce1 + w2 * ce2).sum(), ce1, ce2, entropy, logits.argmax(-1) == y1


def make_inputs(n=37, h=16, v=50, with_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.5 * torch.randn(v, h, generator=g)).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_() if with_bias else None
    y1 = torch.randint(0, v, (n,), generator=g)
    y2 = torch.randint(0, v, (n,), generator=g)
    w1 = torch.rand(n, generator=g)
    w2 = torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.3)  # some rows NTP-only (w2 = 0)
    return hidden, weight, bias, y1, w1, y2, w2


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("logit_scale", "softcap"), [(1.0, None), (0.7, None), (1.0, 3.0), (1.6, 2.5)])
@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_value_and_gradient_match_full_logits(with_bias, logit_scale, softcap, chunk_size):
    hidden, weight, bias, y1, w1, y2, w2 = make_inputs(with_bias=with_bias)
    params = (hidden, weight, bias)
    out = fused_linear_cross_entropy(
        hidden, weight, y1, w1, bias, y2, w2,
        chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap, with_stats=True,
    )  # fmt: skip
    ref, ce1, ce2, entropy, top1 = naive_loss(hidden, weight, bias, y1, w1, y2, w2, logit_scale, softcap)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce.double(), ce1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce2.double(), ce2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, top1)
    for got, want in zip(grads(out.loss, params), grads(ref.float(), params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("logit_scale", "softcap", "chunk_size"), [(1.0, None, 8), (1.6, 2.5, 5), (1.0, None, 1000)]
)
@pytest.mark.parametrize("eps", [0.1, 0.4])
def test_label_smoothing_matches_full_logits(eps, logit_scale, softcap, chunk_size):
    hidden, weight, bias, y1, w1, y2, w2 = make_inputs(with_bias=True)
    params = (hidden, weight, bias)
    out = fused_linear_cross_entropy(
        hidden, weight, y1, w1, bias, y2, w2,
        chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap, label_smoothing=eps,
    )  # fmt: skip
    _, ce1, ce2, *_ = naive_loss(hidden, weight, bias, y1, w1, y2, w2, logit_scale, softcap)
    logits = hidden @ weight.T + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    # eps * mean_v(-log p_v), the same for both targets
    smooth = -torch.log_softmax(logits.double(), dim=-1).mean(-1)
    ref = ((w1 * ((1 - eps) * ce1 + eps * smooth)) + w2 * ((1 - eps) * ce2 + eps * smooth)).sum()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.loss, params), grads(ref.float(), params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # evaluation: the same value, and the statistics stay unsmoothed
        stats = fused_linear_cross_entropy(
            hidden, weight, y1, w1, bias, y2, w2, chunk_size=chunk_size, logit_scale=logit_scale,
            softcap=softcap, label_smoothing=eps, with_stats=True, stats_rows=20,
        )  # fmt: skip
    torch.testing.assert_close(stats.loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.ce.double(), ce1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.ce2.double(), ce2, rtol=1e-5, atol=1e-5)
    assert stats.entropy[:20].all() and not stats.entropy[20:].any()


def test_label_smoothing_is_transformers_label_smoother():
    from transformers.trainer_pt_utils import LabelSmoother

    hidden, weight, _, y1, *_ = make_inputs()
    n = hidden.shape[0]
    labels = torch.cat([torch.tensor([-100]), y1])  # one ignored position
    logits = torch.cat([torch.zeros(1, weight.shape[0]), hidden @ weight.T])
    want = LabelSmoother(epsilon=0.1)({"logits": logits}, labels, num_items_in_batch=n)
    out = fused_linear_cross_entropy(
        hidden, weight, y1, torch.full((n,), 1 / n), chunk_size=6, label_smoothing=0.1
    )
    torch.testing.assert_close(out.loss, want)
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy(hidden, weight, y1, torch.ones(n), label_smoothing=1.0)


def test_incoming_gradient_scales_the_stored_gradients():
    hidden, weight, bias, y1, w1, y2, w2 = make_inputs(with_bias=True)
    out = fused_linear_cross_entropy(hidden, weight, y1, w1, bias, y2, w2, chunk_size=5)
    ref = naive_loss(hidden, weight, bias, y1, w1, y2, w2)[0].float()
    for got, want in zip(
        grads(-3.5 * out.loss, (hidden, weight, bias)), grads(-3.5 * ref, (hidden, weight, bias)), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_single_target_is_plain_cross_entropy_and_mean_reduction():
    hidden, weight, _, y1, *_ = make_inputs()
    n = hidden.shape[0]
    out = fused_linear_cross_entropy(hidden, weight, y1, torch.full((n,), 1 / n), chunk_size=4)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, y1)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.ce, out.ce2)


def test_no_grad_skips_gradient_work_and_gives_same_values():
    hidden, weight, bias, y1, w1, y2, w2 = make_inputs(with_bias=True)
    with torch.no_grad():
        out = fused_linear_cross_entropy(hidden, weight, y1, w1, bias, y2, w2, chunk_size=7, with_stats=True)
    assert not out.loss.requires_grad
    ref = naive_loss(hidden, weight, bias, y1, w1, y2, w2)[0]
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_only_requested_gradients_and_empty_input():
    hidden, weight, _, y1, w1, *_ = make_inputs()
    frozen = weight.detach()  # LoRA-like: the head is frozen, only the hidden states need a gradient
    out = fused_linear_cross_entropy(hidden, frozen, y1, w1, chunk_size=9)
    (g,) = torch.autograd.grad(out.loss, [hidden])
    (want,) = torch.autograd.grad(naive_loss(hidden, frozen, None, y1, w1, y1, 0 * w1)[0].float(), [hidden])
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)

    empty = hidden[:0]
    out = fused_linear_cross_entropy(empty, weight, y1[:0], w1[:0])
    assert out.loss.item() == 0.0
    out.loss.backward()  # still connected to the graph, with zero gradients
    assert weight.grad is not None and not weight.grad.any()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_bf16_autocast_is_close_to_fp32(eps):
    hidden, weight, bias, y1, w1, y2, w2 = make_inputs(n=64, h=32, v=300, with_bias=True)
    args = (hidden, weight, y1, w1, bias, y2, w2)
    ref = fused_linear_cross_entropy(*args, chunk_size=16, label_smoothing=eps)
    ref_grads = grads(ref.loss, (hidden, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_cross_entropy(*args, chunk_size=16, label_smoothing=eps)
    assert out.loss.dtype == torch.float32 and out.ce.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads(out.loss, (hidden, weight, bias)), ref_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        rel = (got - want).norm() / want.norm()
        assert rel < 3e-2, rel


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected hidden"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="go together"):
        fused_linear_cross_entropy(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3), torch.ones(3), None, torch.zeros(3)
        )


def test_transform_and_parameters_follow_the_config(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    assert lm_head_transform(model) == (1.0, None)
    model.config.final_logit_softcapping = 30.0
    model.config.logits_scaling = 4.0
    assert lm_head_transform(model) == (0.25, 30.0)
    weight, bias = lm_head_parameters(model)
    assert weight is model.lm_head.weight and bias is None


def test_stats_rows_limits_the_statistics_to_leading_rows():
    torch.manual_seed(0)
    h, w = torch.randn(7, 6), torch.randn(11, 6)
    y = torch.randint(0, 11, (7,))
    full = fused_linear_cross_entropy(h, w, y, torch.ones(7), chunk_size=3, with_stats=True)
    some = fused_linear_cross_entropy(h, w, y, torch.ones(7), chunk_size=3, with_stats=True, stats_rows=4)
    torch.testing.assert_close(some.loss, full.loss)
    torch.testing.assert_close(some.entropy[:4], full.entropy[:4])
    assert torch.equal(some.is_top1[:4], full.is_top1[:4])
    assert not some.entropy[4:].any() and not some.is_top1[4:].any() and full.entropy[4:].gt(0).all()
