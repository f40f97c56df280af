"""The Mixup regulariser of SFTMix on last-layer hidden states.

For a pair (c, u) of a confident and an unconfident example, the k-th loss-carrying position of c is aligned
with the k-th loss-carrying position of u, for k < m = min(n_c, n_u) (response tokens, counted in order, gaps
between assistant turns included). Each aligned pair of positions gives one mixed token::

    z~ = lam * h_c + (1 - lam) * h_u,      loss = lam * CE(head(z~), y_c) + (1 - lam) * CE(head(z~), y_u)

`align_mixup_tokens` finds the aligned positions for a whole batch of pairs at once (cumulative sums of the label
masks, no Python loop over tokens), `mix_hidden_states` builds the mixed rows and their two targets, and
`mixup_loss` is the reference loss of SPEC.md with any head. The trainer feeds the rows of `mix_hidden_states`
to the fused head of `sftmix.head` instead of calling `mixup_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100


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
    """SFTMix's Mixup loss of P confident/unconfident pairs (SPEC.md, interface contract).

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
