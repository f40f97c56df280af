"""The training loss of SFTMix: ``L = L_NTP + mu * L_mixup``, Mixup on last-layer hidden states.

For a pair (c, u) of a confident and an unconfident example, the k-th loss-carrying position of c is aligned
with the k-th loss-carrying position of u, for k < m = min(n_c, n_u) (response tokens, counted in order, gaps
between assistant turns included). Each aligned pair of positions gives one mixed token::

    z~ = lam * h_c + (1 - lam) * h_u,      loss = lam * CE(head(z~), y_c) + (1 - lam) * CE(head(z~), y_u)

Top to bottom: `align_mixup_tokens` finds the aligned positions for a whole batch of pairs at once (cumulative
sums of the label masks, no Python loop over tokens), `mix_hidden_states` builds the mixed rows and their two
targets, `sample_lambdas` draws ``lam ~ Beta(alpha, alpha)``. `sftmix_head_loss` is the loss that trains: the
NTP rows and the mixed rows of a micro-batch through ONE call of the fused head of `sftmix.head`, and
`add_sftmix_head` puts it inside the model's forward (so DDP, FSDP and ZeRO-3 see it). `mixup_loss` is the
plain reference formula (docs/method.md), with any head: the tests check the fused loss against it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..data.dataset import IGNORE_INDEX
from ..head import fused_linear_cross_entropy, lm_head_parameters, lm_head_transform
from .pairing import pair_rows


class MixupAlignment(NamedTuple):
    """Aligned positions of P confident/unconfident pairs, ordered by pair then response-token index.

    Args:
        index_c: ``[M]`` flat indices into ``labels_c.view(-1)`` (``pair * T + position``).
        index_u: ``[M]`` flat indices into ``labels_u.view(-1)``.
        pair: ``[M]`` pair of each mixed token.
    """

    index_c: torch.Tensor
    index_u: torch.Tensor
    pair: torch.Tensor


class MixedTokens(NamedTuple):
    """Mixed hidden states and their two targets.

    Args:
        hidden: ``[M, H]`` ``lam * h_c + (1 - lam) * h_u`` (differentiable in both hidden states).
        targets_c: ``[M]`` tokens of the confident example.
        targets_u: ``[M]`` tokens of the unconfident example.
        lam: ``[M]`` fp32 lambda of each mixed token (its pair's).
        pair: ``[M]`` pair of each mixed token.
    """

    hidden: torch.Tensor
    targets_c: torch.Tensor
    targets_u: torch.Tensor
    lam: torch.Tensor
    pair: torch.Tensor


def align_mixup_tokens(labels_c: torch.Tensor, labels_u: torch.Tensor) -> MixupAlignment:
    """Align the k-th loss-carrying position of each confident row with the k-th of its unconfident row.

    Args:
        labels_c: ``[P, T]`` shifted labels of the confident examples, ``-100`` where no loss is carried.
        labels_u: ``[P, T']`` shifted labels of the unconfident examples (``T'`` may differ from ``T``).

    Returns:
        A `MixupAlignment` with ``M = sum_p min(n_c[p], n_u[p])`` entries.

    Example:
        >>> c = torch.tensor([[-100, 5, 6, -100, 7]])
        >>> u = torch.tensor([[8, 9, -100, -100, -100]])
        >>> align_mixup_tokens(c, u)
        MixupAlignment(index_c=tensor([1, 2]), index_u=tensor([0, 1]), pair=tensor([0, 0]))
    """
    if labels_c.dim() != 2 or labels_u.dim() != 2 or labels_c.shape[0] != labels_u.shape[0]:
        raise ValueError(
            f"expected labels [P, T] with the same P, got {tuple(labels_c.shape)}, {tuple(labels_u.shape)}"
        )
    mask_c, mask_u = labels_c != IGNORE_INDEX, labels_u != IGNORE_INDEX
    m = torch.minimum(mask_c.sum(1), mask_u.sum(1))  # [P] aligned tokens per pair
    # Rank of each loss-carrying position among its row's loss-carrying positions (0-based)
    keep_c = mask_c & (mask_c.cumsum(1) <= m[:, None])
    keep_u = mask_u & (mask_u.cumsum(1) <= m[:, None])
    # `nonzero` walks row-major, so both lists are sorted by (pair, rank) and line up one-to-one
    index_c = keep_c.view(-1).nonzero().squeeze(1)
    index_u = keep_u.view(-1).nonzero().squeeze(1)
    pair = torch.div(index_c, labels_c.shape[1], rounding_mode="floor")
    return MixupAlignment(index_c, index_u, pair)


def count_mixed_tokens(labels_c: torch.Tensor, labels_u: torch.Tensor) -> torch.Tensor:
    """``sum_p min(n_c[p], n_u[p])``: the number of mixed tokens of a batch of pairs (a 0-dim long tensor)."""
    return torch.minimum((labels_c != IGNORE_INDEX).sum(1), (labels_u != IGNORE_INDEX).sum(1)).sum()


def mix_hidden_states(
    hidden_c: torch.Tensor,
    labels_c: torch.Tensor,
    hidden_u: torch.Tensor,
    labels_u: torch.Tensor,
    lam: torch.Tensor,
) -> MixedTokens:
    """The mixed hidden states ``lam * h_c + (1 - lam) * h_u`` of every aligned position, with both targets.

    Args:
        hidden_c: ``[P, T, H]`` hidden states of the confident examples, shifted so that ``hidden_c[:, t]``
            predicts ``labels_c[:, t]``.
        labels_c: ``[P, T]`` labels of the confident examples, ``-100`` where no loss is carried.
        hidden_u: ``[P, T', H]`` hidden states of the unconfident examples.
        labels_u: ``[P, T']`` labels of the unconfident examples.
        lam: ``[P]`` lambda of each pair.

    Returns:
        `MixedTokens`; the mixing is done in fp32 at least, in the hidden states' dtype if wider.
    """
    align = align_mixup_tokens(labels_c, labels_u)
    h = hidden_c.shape[-1]
    lam_tok = lam.to(device=hidden_c.device, dtype=torch.float32)[align.pair]
    dtype = torch.promote_types(hidden_c.dtype, torch.float32)
    z_c = hidden_c.reshape(-1, h)[align.index_c].to(dtype)
    z_u = hidden_u.reshape(-1, h)[align.index_u].to(dtype)
    mixed = z_u + lam_tok[:, None].to(dtype) * (z_c - z_u)
    return MixedTokens(
        hidden=mixed,
        targets_c=labels_c.reshape(-1)[align.index_c],
        targets_u=labels_u.reshape(-1)[align.index_u],
        lam=lam_tok,
        pair=align.pair,
    )


def mixup_loss(
    hidden_c: torch.Tensor,
    labels_c: torch.Tensor,
    hidden_u: torch.Tensor,
    labels_u: torch.Tensor,
    lam: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    reduction: str = "mean",
) -> torch.Tensor:
    """SFTMix's Mixup loss of P confident/unconfident pairs (docs/method.md; the package exports it).

    Args:
        hidden_c: ``[P, T, H]`` last-layer hidden states (after the final norm) of the confident member of each
            pair, shifted so that ``hidden_c[:, t]`` predicts ``labels_c[:, t]``.
        labels_c: ``[P, T]`` labels, ``-100`` where a position carries no loss.
        hidden_u: ``[P, T', H]`` hidden states of the unconfident members.
        labels_u: ``[P, T']`` their labels.
        lam: ``[P]`` mixing coefficient of each pair.
        head: Maps ``[..., H]`` to ``[..., V]`` logits (the model's LM head, with its logit scaling/soft-capping).
            It runs once per mixed token; both targets share that projection.
        reduction: ``"mean"`` over all mixed tokens of all pairs, or ``"sum"``.

    Returns:
        The scalar loss; 0 (still connected to the graph) when no pair has an aligned token.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> head = torch.nn.Linear(4, 10, bias=False)
        >>> h_c, h_u = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
        >>> y_c = torch.tensor([[-100, 1, 2, 3, -100], [4, 5, -100, -100, -100]])
        >>> y_u = torch.tensor([[6, 7, -100, -100, -100], [-100, -100, -100, -100, -100]])
        >>> loss = mixup_loss(h_c, y_c, h_u, y_u, torch.tensor([0.3, 0.9]), head)  # 2 mixed tokens, pair 0
        >>> loss.shape
        torch.Size([])
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mixed = mix_hidden_states(hidden_c, labels_c, hidden_u, labels_u, lam)
    # Mixed in fp32; projected in the hidden states' own dtype, so a bf16 head works outside autocast too
    log_p = torch.log_softmax(head(mixed.hidden.to(hidden_c.dtype)).float(), dim=-1)
    ce_c = -log_p.gather(1, mixed.targets_c[:, None]).squeeze(1)
    ce_u = -log_p.gather(1, mixed.targets_u[:, None]).squeeze(1)
    total = (mixed.lam * ce_c + (1 - mixed.lam) * ce_u).sum()
    return total if reduction == "sum" else total / max(mixed.hidden.shape[0], 1)


def sample_lambdas(
    num_pairs: int, alpha: float, generator: np.random.Generator, per: str = "pair"
) -> torch.Tensor:
    """Draw lambda ~ Beta(alpha, alpha): one per pair (``per="pair"``) or one shared by all (``"batch"``).

    Args:
        num_pairs: P, the number of pairs.
        alpha: The Beta distribution's parameter (the paper: 0.5; U-shaped, so most lambdas are near 0 or 1).
        generator: The NumPy generator to draw from (the trainer seeds it per micro-step for exact resumes).
        per: ``"pair"`` or ``"batch"``.

    Returns:
        ``[num_pairs]`` fp32 tensor in [0, 1].

    Example:
        >>> lam = sample_lambdas(4, 0.5, np.random.default_rng(0))
        >>> lam.shape, bool(((lam >= 0) & (lam <= 1)).all())
        (torch.Size([4]), True)
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if per == "pair":
        draws = generator.beta(alpha, alpha, size=num_pairs)
    elif per == "batch":
        draws = np.full(num_pairs, generator.beta(alpha, alpha))
    else:
        raise ValueError(f"per must be 'pair' or 'batch', got {per!r}")
    return torch.from_numpy(np.asarray(draws, dtype=np.float32))


@dataclass
class SFTMixOutput(ModelOutput):
    """What the patched forward returns with ``sftmix=...``. Only ``loss`` carries a gradient.

    Args:
        loss: ``ntp_weight * sum NLL + mixup_weight * sum (lam CE(y_c) + (1 - lam) CE(y_u))`` (smoothed with
            ``label_smoothing``).
        ntp_nll_sum: Summed NLL of the response tokens.
        ntp_tokens: Number of response tokens.
        mixup_ce_sum: Summed Mixup cross-entropy of the mixed tokens.
        mixed_tokens: Number of mixed tokens.
        entropy_sum: Summed entropy of the next-token distributions of the response tokens.
        num_correct: Response tokens predicted top-1.
        example_nll_sum: ``[B]`` summed NLL of each row's response tokens (what the ``online`` scorer records).
        example_tokens: ``[B]`` response tokens of each row.
    """

    loss: torch.Tensor | None = None
    ntp_nll_sum: torch.Tensor | None = None
    ntp_tokens: torch.Tensor | None = None
    mixup_ce_sum: torch.Tensor | None = None
    mixed_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None
    example_nll_sum: torch.Tensor | None = None
    example_tokens: torch.Tensor | None = None


def sftmix_head_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ntp_weight: torch.Tensor | float,
    mixup_weight: torch.Tensor | float = 0.0,
    mixup_role: torch.Tensor | None = None,
    lambdas: torch.Tensor | None = None,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
) -> SFTMixOutput:
    """NTP + Mixup loss of a micro-batch from its shifted hidden states, through one fused head call.

    Args:
        hidden: ``[B, T, H]`` last hidden states, shifted: ``hidden[:, t]`` predicts ``labels[:, t]``.
        labels: ``[B, T]`` shifted labels, ``-100`` where no loss is carried.
        weight: ``[V, H]`` LM head weight.
        bias: Optional ``[V]`` LM head bias.
        ntp_weight: Weight of each response token's NLL (``1 / num_items_in_batch``, times processes).
        mixup_weight: Weight of each mixed token's cross-entropy (``mu / mixed tokens``, times processes).
        mixup_role: ``[B]`` 1 confident / 0 unconfident per row; None for NTP only.
        lambdas: ``[B / 2]`` lambda of each pair (the k-th confident row with the k-th unconfident row).
        chunk_size: Rows per chunk of the fused head.
        logit_scale: The model's logit multiplier.
        softcap: The model's final logit soft-cap.
        label_smoothing: transformers' ``label_smoothing_factor``, applied to every cross-entropy of the loss (the
            NLL sums of the output stay unsmoothed).
    """
    mask = labels != IGNORE_INDEX
    rows, targets = [hidden[mask]], [labels[mask]]
    num_ntp = rows[0].shape[0]
    ntp_w = torch.as_tensor(ntp_weight, dtype=torch.float32, device=hidden.device).expand(num_ntp)
    weights, targets2, weights2 = [ntp_w], [targets[0]], [torch.zeros_like(ntp_w)]
    lam = None
    if mixup_role is not None:
        rows_c, rows_u = pair_rows(mixup_role)
        mixed = mix_hidden_states(hidden[rows_c], labels[rows_c], hidden[rows_u], labels[rows_u], lambdas)
        lam = mixed.lam
        mix_w = torch.as_tensor(mixup_weight, dtype=torch.float32, device=hidden.device)
        rows.append(mixed.hidden.to(hidden.dtype))
        targets.append(mixed.targets_c)
        weights.append(mix_w * lam)
        targets2.append(mixed.targets_u)
        weights2.append(mix_w * (1 - lam))
    out = fused_linear_cross_entropy(
        torch.cat(rows),
        weight,
        torch.cat(targets),
        torch.cat(weights),
        bias,
        torch.cat(targets2),
        torch.cat(weights2),
        chunk_size=chunk_size,
        logit_scale=logit_scale,
        softcap=softcap,
        with_stats=True,
        stats_rows=num_ntp,
        label_smoothing=label_smoothing,
    )
    mixup_ce = (lam * out.ce[num_ntp:] + (1 - lam) * out.ce2[num_ntp:]).sum() if lam is not None else None
    return SFTMixOutput(
        loss=out.loss,
        ntp_nll_sum=out.ce[:num_ntp].sum(),
        ntp_tokens=mask.sum(),
        mixup_ce_sum=mixup_ce if mixup_ce is not None else out.ce.new_zeros(()),
        mixed_tokens=torch.as_tensor(out.ce.shape[0] - num_ntp, device=hidden.device),
        entropy_sum=out.entropy[:num_ntp].sum(),
        num_correct=out.is_top1[:num_ntp].sum(),
        # the NTP tokens come in the row-major order of hidden[mask]: put each back in its row (traceable by dynamo)
        example_nll_sum=torch.zeros(mask.shape, dtype=torch.float64, device=hidden.device)
        .masked_scatter(mask, out.ce[:num_ntp].detach().double())
        .sum(1),
        example_tokens=mask.sum(1),
    )


def add_sftmix_head(model: PreTrainedModel) -> None:
    """Patch ``model.forward``: ``model(input_ids, attention_mask, labels=labels, sftmix={...})`` returns an
    `SFTMixOutput` computed inside the forward from the backbone's last hidden states.

    The keys of ``sftmix`` are the keyword arguments of `sftmix_head_loss` after ``bias`` (``ntp_weight``,
    ``mixup_weight``, ``mixup_role``, ``lambdas``, ``chunk_size``, ``label_smoothing``). Without ``sftmix`` the previous forward runs
    (TRL's fused forward, or the model's own), so generation and TRL's evaluation are unchanged. Patch the base
    model under PEFT, after TRL's ``add_fused_lm_head``.
    """
    previous_forward = model.forward
    logit_scale, softcap = lm_head_transform(model)

    @functools.wraps(type(model).forward)
    def _sftmix_forward(self, *args, sftmix: dict[str, Any] | None = None, **kwargs):
        if sftmix is None:
            return previous_forward(*args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs["use_cache"] = False
        # Looked up on each call: FSDP and PEFT replace modules after patching
        backbone_outputs = self.base_model(*args, **kwargs)
        weight, bias = lm_head_parameters(self)
        hidden = backbone_outputs.last_hidden_state[:, :-1].to(weight.device)
        with maybe_gather_lm_head_ctx(weight, bias):
            return sftmix_head_loss(
                hidden,
                labels[:, 1:].to(weight.device),
                weight,
                bias,
                logit_scale=logit_scale,
                softcap=softcap,
                **sftmix,
            )

    model.forward = types.MethodType(_sftmix_forward, model)
    model._sftmix_head = (
        True  # `sftmix.stage1.scoring` scores through this forward (FSDP2 unshards inside it)
    )
