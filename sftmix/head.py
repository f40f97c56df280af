"""A fused, chunked LM head + cross-entropy that never builds the ``[batch, seq, vocab]`` logits.

SFTMix runs the model's output head twice per step: on the hidden states of every response token (the NTP loss)
and on the mixed hidden states of every aligned confident/unconfident token pair (the Mixup loss, whose soft
target ``lam * onehot(y_c) + (1 - lam) * onehot(y_u)`` is two hard targets with two weights). Both losses are a
weighted sum of cross-entropies of rows ``h_n`` of one ``[N, H]`` matrix::

    loss = sum_n  w1[n] * CE(head(h_n), y1[n])  +  w2[n] * CE(head(h_n), y2[n])

(NTP rows: ``w1 = 1 / num_tokens, w2 = 0``; mixed rows: ``w1 = mu * lam / M, w2 = mu * (1 - lam) / M``), so one
call of `fused_linear_cross_entropy` computes the whole loss of a step. Label smoothing ``eps`` (transformers'
``LabelSmoother``: ``(1 - eps) CE + eps * mean_v(-log p_v)``) smooths both targets of every row.

Why it is fast and small:

- Rows are processed in chunks of ``chunk_size``; only a ``[chunk_size, V]`` logits buffer ever exists.
- The gradients are computed in the forward pass, while each chunk's softmax is at hand: ``dL/dz = (w1 + w2)
  (p - eps / V) - (1 - eps) (w1 onehot(y1) + w2 onehot(y2))``, then ``dL/dh = dL/dz @ W`` and ``dL/dW += dL/dz^T @ h`` (fp32
  accumulators). The backward only multiplies the stored gradients by the incoming scalar gradient, so the
  ``[N, V]`` projection is never recomputed (TRL's chunked log-prob recomputes it in the backward).
- Under autocast (bf16 on CPU and GPU) the three matmuls run in the autocast dtype, while the softmax, the loss
  and every accumulator stay in fp32.
- Without grad (evaluation) only the values are computed.

The model's own logit transform is honoured: ``z = cap * tanh(scale * (h W^T + b) / cap)`` with ``scale`` the
config's logit scale (Cohere, Granite...) and ``cap`` its ``final_logit_softcapping`` (Gemma-2), read by
`lm_head_transform` exactly as TRL's ``add_fused_lm_head`` reads them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from trl.trainer.utils import maybe_gather_lm_head_ctx

# `torch.mm(..., out_dtype=torch.float32)` keeps a bf16 x bf16 product in fp32; it exists for CUDA only
_MM_OUT_DTYPE_DEVICES = ("cuda",)


class FusedCEOutput(NamedTuple):
    """What `fused_linear_cross_entropy` returns.

    Args:
        loss: Scalar ``sum_n w1 CE(y1) + w2 CE(y2)`` (label-smoothed if asked), differentiable with respect to
            hidden, weight and bias.
        ce: ``[N]`` detached fp32 cross-entropy of each row with respect to ``targets``.
        ce2: ``[N]`` detached fp32 cross-entropy with respect to ``targets2`` (equal to ``ce`` without them).
        entropy: ``[N]`` detached fp32 entropy of each row's next-token distribution (``None`` without stats).
        is_top1: ``[N]`` bool, whether ``targets`` is the first argmax of the row (``None`` without stats).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    ce2: torch.Tensor
    entropy: torch.Tensor | None
    is_top1: torch.Tensor | None


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc``; on CUDA without rounding a bf16 product to bf16 first."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type in _MM_OUT_DTYPE_DEVICES:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        # CPU: the product is rounded to the compute dtype once per token chunk, then summed in fp32
        acc.add_(a @ b)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [N]
        targets2: torch.Tensor,  # [N]
        weights: torch.Tensor,  # [N] fp32
        weights2: torch.Tensor,  # [N] fp32
        chunk_size: int,
        logit_scale: float,
        softcap: float | None,
        stats_rows: int,
        smoothing: float,
    ):
        device = hidden.device
        needs_grad = ctx.needs_input_grad[:3]
        compute_grad = any(needs_grad)
        compute_dtype = (
            torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        )
        N, V = hidden.shape[0], weight.shape[0]
        ce = torch.zeros(N, device=device, dtype=torch.float32)
        ce2 = torch.zeros(N, device=device, dtype=torch.float32)
        with_stats = stats_rows > 0
        entropy = torch.zeros(N, device=device, dtype=torch.float32) if with_stats else None
        is_top1 = torch.zeros(N, device=device, dtype=torch.bool) if with_stats else None
        grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if needs_grad[0] else None
        grad_weight = torch.zeros(weight.shape, device=device, dtype=torch.float32) if needs_grad[1] else None
        grad_bias = (
            torch.zeros(bias.shape, device=device, dtype=torch.float32)
            if bias is not None and needs_grad[2]
            else None
        )
        # The casts happen once per call, not once per chunk. Autocast is switched off inside: every dtype here is
        # chosen on purpose.
        with torch.autocast(device.type, enabled=False):
            w_c = weight.to(compute_dtype)
            b_c = bias.to(compute_dtype) if bias is not None else None
            transform = logit_scale != 1.0 or softcap is not None
            both = weights + weights2
            # Row weights of the two one-hot terms relative to `both`, so that the fp32 probabilities take the
            # one-hot subtraction before any rounding: grad = both * (p - eps / V - r1 onehot(y1) - r2 onehot(y2))
            safe = torch.where(both > 0, both, torch.ones_like(both))
            r1, r2 = (1 - smoothing) * weights / safe, (1 - smoothing) * weights2 / safe
            # eps * mean_v(-log p_v) = eps * (log Z - mean_v z_v) per row, weighted by w1 + w2
            smooth = torch.zeros(N, device=device, dtype=torch.float32) if smoothing > 0 else None
            row_scale = both * logit_scale  # d(scale * raw)/d(raw), folded into the cast to compute_dtype
            n_max = min(chunk_size, N)
            tmp_rows = min(n_max, stats_rows)
            tmp_buf = torch.empty((tmp_rows, V), device=device, dtype=torch.float32) if with_stats else None
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                h_c = hidden[start:end].to(compute_dtype)
                y1, y2 = targets[start:end, None], targets2[start:end, None]
                # [n, V] logits before the model's transform (F.linear: oneDNN's fast path for a [V, H] weight)
                raw = torch.nn.functional.linear(h_c, w_c, b_c)
                z = raw
                if transform:
                    z = raw.float() if raw.dtype != torch.float32 else raw
                    if logit_scale != 1.0:
                        z.mul_(logit_scale)
                    if softcap is not None:
                        z.div_(softcap).tanh_().mul_(softcap)
                # One fused pass gives fp32 probabilities; log Z follows from the top-1 entry, whose probability
                # is at least 1/V and so never underflows: log Z = z_top - log p_top
                p = torch.softmax(z, dim=-1, dtype=torch.float32)
                top = p.argmax(dim=-1, keepdim=True)  # the first maximum, as TRL's `is_top1`
                lse = z.gather(1, top).float().squeeze(1) - torch.log(p.gather(1, top).squeeze(1))
                ce[start:end] = lse - z.gather(1, y1).float().squeeze(1)
                ce2[start:end] = lse - z.gather(1, y2).float().squeeze(1)
                if smooth is not None:
                    smooth[start:end] = lse - z.mean(-1, dtype=torch.float32)
                k = min(end, stats_rows) - start  # rows of this chunk that want statistics
                if k > 0:
                    is_top1[start : start + k] = top[:k].squeeze(1) == y1[:k].squeeze(1)
                    # H = log Z - sum_v p_v z_v
                    entropy[start : start + k] = lse[:k] - torch.mul(p[:k], z[:k], out=tmp_buf[:k]).sum(-1)
                if not compute_grad:
                    continue
                if smooth is not None:
                    p.sub_(smoothing / V)
                p.scatter_add_(1, y1, -r1[start:end, None])
                p.scatter_add_(1, y2, -r2[start:end, None])
                if softcap is not None:
                    # d(cap tanh(s / cap))/ds = 1 - tanh^2 = 1 - (z / cap)^2; z's buffer is free now
                    p.mul_(z.div_(softcap).square_().neg_().add_(1.0))
                if compute_dtype == torch.float32:
                    g = p.mul_(row_scale[start:end, None])
                else:  # scale and round in one pass, into the logits buffer (no longer needed)
                    g = torch.mul(p, row_scale[start:end, None], out=raw)
                if grad_hidden is not None:
                    grad_hidden[start:end] = g @ w_c
                if grad_weight is not None:
                    _accumulate_mm(grad_weight, g.t(), h_c)
                if grad_bias is not None:
                    grad_bias.add_(g.sum(0, dtype=torch.float32))
            loss = (1 - smoothing) * ((weights * ce).sum() + (weights2 * ce2).sum())
            if smooth is not None:
                loss = loss + smoothing * (both * smooth).sum()

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        stats = [x for x in (ce, ce2, entropy, is_top1) if x is not None]
        ctx.mark_non_differentiable(*stats)
        return loss, ce, ce2, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grads = [None, None, None]
        for i, (g, dtype) in enumerate(zip((grad_hidden, grad_weight, grad_bias), ctx.dtypes, strict=True)):
            if g is not None and ctx.needs_input_grad[i]:
                # The usual upstream gradient is 1: then no second [V, H] buffer is allocated
                grads[i] = (
                    g
                    if dtype == torch.float32 and bool(grad_loss == 1)
                    else (g * grad_loss.float()).to(dtype)
                )
        return (*grads, None, None, None, None, None, None, None, None, None)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    targets2: torch.Tensor | None = None,
    weights2: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    with_stats: bool = False,
    stats_rows: int | None = None,
    label_smoothing: float = 0.0,
) -> FusedCEOutput:
    """Weighted cross-entropy of ``hidden @ weight.T (+ bias)`` against one or two targets per row, fused.

    Args:
        hidden: ``[N, H]`` rows to project (the input of the LM head).
        weight: ``[V, H]`` head weight (``lm_head.weight``; the embedding matrix for tied models).
        targets: ``[N]`` token ids in ``[0, V)`` (filter out ``-100`` rows first).
        weights: ``[N]`` weight of ``CE(targets)`` in the loss.
        bias: Optional ``[V]`` head bias.
        targets2: Optional ``[N]`` second target of each row (the unconfident token of a mixed pair).
        weights2: ``[N]`` weight of ``CE(targets2)``; required with ``targets2``.
        chunk_size: Rows per chunk: bounds the ``[chunk_size, V]`` fp32 buffers (about 3 of them).
        logit_scale: Multiplier of the logits before soft-capping (1.0: none).
        softcap: ``cap`` of ``cap * tanh(z / cap)`` applied to the logits (None: none).
        with_stats: Also return each row's entropy and whether ``targets`` is the top-1 prediction.
        stats_rows: With ``with_stats``, compute them for the first ``stats_rows`` rows only (the others stay
            0): the trainer wants them for its NTP rows, not for the mixed rows after them.
        label_smoothing: ``eps`` in [0, 1): each cross-entropy becomes ``(1 - eps) CE + eps * mean_v(-log p_v)``,
            as in transformers' ``LabelSmoother`` (``ce`` and ``ce2`` stay the plain cross-entropies).

    Returns:
        A `FusedCEOutput` whose ``loss`` is the scalar ``sum_n weights[n] * CE(row n, targets[n]) +
        weights2[n] * CE(row n, targets2[n])`` (each CE smoothed with ``label_smoothing``).

    Example:
        >>> import torch
        >>> h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        >>> y = torch.tensor([1, 4, 0, 10, 3])
        >>> out = fused_linear_cross_entropy(h, w, y, torch.full((5,), 0.2), chunk_size=2)
        >>> ref = torch.nn.functional.cross_entropy(h @ w.T, y)
        >>> torch.allclose(out.loss, ref, atol=1e-6)
        True
        >>> out.loss.backward()
        >>> h.grad.shape
        torch.Size([5, 8])
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if (targets2 is None) != (weights2 is None):
        raise ValueError("targets2 and weights2 go together")
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    if targets2 is None:
        targets2, weights2 = targets, torch.zeros_like(weights)
    weights2 = weights2.to(device=hidden.device, dtype=torch.float32)
    loss, ce, ce2, entropy, is_top1 = _FusedLinearCrossEntropy.apply(
        hidden,
        weight,
        bias,
        targets.long(),
        targets2.long(),
        weights,
        weights2,
        chunk_size,
        float(logit_scale),
        softcap,
        (hidden.shape[0] if stats_rows is None else stats_rows) if with_stats else 0,
        float(label_smoothing),
    )
    return FusedCEOutput(loss, ce, ce2, entropy, is_top1)


def lm_head_transform(model: PreTrainedModel) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` the model applies to its logits, read from its config like TRL does.

    ``logit_scale`` comes from ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier``
    (Falcon-H1) or ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X multiplies); ``softcap`` from
    ``final_logit_softcapping`` (Gemma-2/3).
    """
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), (float(softcap) if softcap else None)


def lm_head_parameters(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias as plain tensors (FSDP2 DTensors are gathered with ``full_tensor``).

    Under DeepSpeed ZeRO-3 call the head inside ``trl.trainer.utils.maybe_gather_lm_head_ctx(weight, bias)``.
    """
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


__all__ = [
    "FusedCEOutput",
    "fused_linear_cross_entropy",
    "lm_head_parameters",
    "lm_head_transform",
    "maybe_gather_lm_head_ctx",
]
