"""sftmix.mixup.loss: the Mixup loss against a per-token Python loop of the formula (docs/method.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftmix.mixup.loss import (
    align_mixup_tokens,
    count_mixed_tokens,
    mix_hidden_states,
    mixup_loss,
    sample_lambdas,
)

H, V = 6, 13


def naive_mixup(hidden_c, labels_c, hidden_u, labels_u, lam, head, reduction="mean"):
    """The formula literally: list each example's loss-carrying positions, pair the k-th with the k-th."""
    terms = []
    for p in range(hidden_c.shape[0]):
        pos_c = [t for t in range(labels_c.shape[1]) if labels_c[p, t] != -100]
        pos_u = [t for t in range(labels_u.shape[1]) if labels_u[p, t] != -100]
        for k in range(min(len(pos_c), len(pos_u))):
            z = lam[p] * hidden_c[p, pos_c[k]] + (1 - lam[p]) * hidden_u[p, pos_u[k]]
            log_p = torch.log_softmax(head(z), dim=-1)
            y_c, y_u = labels_c[p, pos_c[k]], labels_u[p, pos_u[k]]
            terms.append(-(lam[p] * log_p[y_c] + (1 - lam[p]) * log_p[y_u]))
    if not terms:
        return (hidden_c.sum() + hidden_u.sum()) * 0.0
    total = torch.stack(terms).sum()
    return total if reduction == "sum" else total / len(terms)


def labels_from_spans(length, spans, generator):
    """Labels with loss only inside ``spans`` (several assistant turns with prompt gaps in between)."""
    labels = torch.full((length,), -100)
    for start, end in spans:
        labels[start:end] = torch.randint(0, V, (end - start,), generator=generator)
    return labels


def batch(generator):
    # pair 0: multi-turn c (two spans) vs single-turn u; pair 1: u longer; pair 2: u has no response at all;
    # pair 3: equal lengths, padded tail
    spans_c = [[(2, 4), (7, 10)], [(1, 3)], [(0, 5)], [(3, 6)]]
    spans_u = [[(5, 9)], [(0, 2), (4, 8), (9, 11)], [], [(1, 4)]]
    labels_c = torch.stack([labels_from_spans(11, s, generator) for s in spans_c])
    labels_u = torch.stack([labels_from_spans(12, s, generator) for s in spans_u])
    hidden_c = torch.randn(4, 11, H, generator=generator, requires_grad=True)
    hidden_u = torch.randn(4, 12, H, generator=generator, requires_grad=True)
    lam = torch.rand(4, generator=generator)
    return hidden_c, labels_c, hidden_u, labels_u, lam


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_naive_loop_in_value_and_gradient(reduction):
    g = torch.Generator().manual_seed(0)
    hidden_c, labels_c, hidden_u, labels_u, lam = batch(g)
    head = torch.nn.Linear(H, V)
    params = [hidden_c, hidden_u, head.weight, head.bias]
    got = mixup_loss(hidden_c, labels_c, hidden_u, labels_u, lam, head, reduction=reduction)
    want = naive_mixup(hidden_c, labels_c, hidden_u, labels_u, lam, head, reduction=reduction)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b)


def test_alignment_of_multi_turn_masks():
    labels_c = torch.tensor(
        [[-100, 1, 2, -100, -100, 3, 4, -100], [5, -100, -100, -100, -100, -100, -100, -100]]
    )
    labels_u = torch.tensor(
        [[-100, -100, 6, -100, 7, 8, -100, -100], [-100, -100, -100, -100, 9, 9, -100, -100]]
    )
    align = align_mixup_tokens(labels_c, labels_u)
    # pair 0: c positions 1, 2, 5 (m = 3) with u positions 2, 4, 5; pair 1: c position 0 with u position 4
    assert align.index_c.tolist() == [1, 2, 5, 8]
    assert align.index_u.tolist() == [2, 4, 5, 12]
    assert align.pair.tolist() == [0, 0, 0, 1]
    assert count_mixed_tokens(labels_c, labels_u).item() == 4


def test_pairs_without_aligned_tokens_add_nothing():
    g = torch.Generator().manual_seed(1)
    hidden_c, labels_c, hidden_u, labels_u, lam = batch(g)
    head = torch.nn.Linear(H, V)
    full = mixup_loss(hidden_c, labels_c, hidden_u, labels_u, lam, head, reduction="sum")
    keep = [0, 1, 3]  # drop pair 2, whose unconfident member has no response token
    part = mixup_loss(hidden_c[keep], labels_c[keep], hidden_u[keep], labels_u[keep], lam[keep], head, "sum")
    torch.testing.assert_close(full, part)
    # and the mean divides by mixed tokens, not pairs
    n = count_mixed_tokens(labels_c, labels_u).item()
    torch.testing.assert_close(mixup_loss(hidden_c, labels_c, hidden_u, labels_u, lam, head), full / n)


def test_no_aligned_token_at_all_is_a_connected_zero():
    hidden = torch.randn(2, 3, H, requires_grad=True)
    empty = torch.full((2, 3), -100)
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    head = torch.nn.Linear(H, V)
    loss = mixup_loss(hidden, labels, hidden, empty, torch.tensor([0.5, 0.5]), head)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and not hidden.grad.any()


def test_lambda_one_is_ce_of_confident_first_m_tokens():
    g = torch.Generator().manual_seed(2)
    hidden_c, labels_c, hidden_u, labels_u, _ = batch(g)
    head = torch.nn.Linear(H, V)
    loss = mixup_loss(hidden_c, labels_c, hidden_u, labels_u, torch.ones(4), head, reduction="sum")
    mixed = mix_hidden_states(hidden_c, labels_c, hidden_u, labels_u, torch.ones(4))
    # the confident example's CE on its first m response tokens, m = min(n_c, n_u)
    want = torch.nn.functional.cross_entropy(head(mixed.hidden), mixed.targets_c, reduction="sum")
    torch.testing.assert_close(loss, want)
    per_pair = []
    for p in range(4):
        m = min(int((labels_c[p] != -100).sum()), int((labels_u[p] != -100).sum()))
        pos = (labels_c[p] != -100).nonzero().squeeze(1)[:m]
        per_pair.append(
            torch.nn.functional.cross_entropy(head(hidden_c[p, pos]), labels_c[p, pos], reduction="sum")
        )
    torch.testing.assert_close(loss, torch.stack(per_pair).sum())


def test_fused_head_rows_give_the_same_loss():
    """The trainer's path (mixed rows through sftmix.head) equals the reference mixup_loss."""
    from sftmix.head import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    hidden_c, labels_c, hidden_u, labels_u, lam = batch(g)
    head = torch.nn.Linear(H, V)
    want = mixup_loss(hidden_c, labels_c, hidden_u, labels_u, lam, head)
    mixed = mix_hidden_states(hidden_c, labels_c, hidden_u, labels_u, lam)
    m = mixed.hidden.shape[0]
    got = fused_linear_cross_entropy(
        mixed.hidden, head.weight, mixed.targets_c, mixed.lam / m, head.bias, mixed.targets_u, (1 - mixed.lam) / m,
        chunk_size=3,
    ).loss  # fmt: skip
    torch.testing.assert_close(got, want)
    params = [hidden_c, hidden_u, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b)


def test_sample_lambdas_is_seeded_beta():
    a = sample_lambdas(1000, 0.5, np.random.default_rng(7))
    b = sample_lambdas(1000, 0.5, np.random.default_rng(7))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert ((a >= 0) & (a <= 1)).all()
    # Beta(0.5, 0.5) is U-shaped: mean 1/2, variance 1/8
    assert abs(a.mean().item() - 0.5) < 0.05 and abs(a.var().item() - 0.125) < 0.02
    batch_lam = sample_lambdas(5, 0.5, np.random.default_rng(7), per="batch")
    assert torch.all(batch_lam == batch_lam[0])
    with pytest.raises(ValueError):
        sample_lambdas(3, 0.0, np.random.default_rng(0))


def test_rejects_mismatched_pairs_and_bad_reduction():
    with pytest.raises(ValueError, match="same P"):
        align_mixup_tokens(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    h = torch.randn(1, 2, H)
    y = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="reduction"):
        mixup_loss(h, y, h, y, torch.ones(1), torch.nn.Linear(H, V), reduction="none")


def test_mixup_loss_with_a_bf16_head_outside_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False).to(torch.bfloat16)
    h_c, h_u = torch.randn(2, 4, 8, dtype=torch.bfloat16), torch.randn(2, 4, 8, dtype=torch.bfloat16)
    y = torch.tensor([[-100, 1, 2, 3], [4, 5, 6, -100]])
    loss = mixup_loss(h_c, y, h_u, y.flip(0), torch.tensor([0.25, 0.75]), head)
    ref = mixup_loss(h_c.float(), y, h_u.float(), y.flip(0), torch.tensor([0.25, 0.75]), head.float())
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05
