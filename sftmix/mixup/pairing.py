"""Stage 3's batches: balanced confident/unconfident pairs, and each row's role.

SFTMix mixes every confident example with an unconfident one, so every micro-batch must hold B/2 confident and
B/2 unconfident examples, paired one-to-one at random. The split itself comes from `sftmix.stage1.splits.load_split`
(True for the confident examples, in dataset order). The pieces:
- `BalancedPairSampler` yields dataset indices as interleaved pairs ``c0, u0, c1, u1, ...``: every run of B
  consecutive indices starting at a multiple of B (a micro-batch) is balanced, and its k-th confident row is
  paired with its k-th unconfident row.
- `MixupRoleCollator` wraps TRL's collator and adds the ``mixup_role`` of each row (from the example ``id``, never
  from its position) and the ``example_ids`` (for error messages).

When the halves differ in size (the median split gives ``|D^u| = |D^c|`` or ``|D^c| + 1``; filtering or
truncation can widen the gap), an epoch has ``max(|D^c|, |D^u|)`` pairs, rounded up to whole micro-batches on
every process; each half is a random permutation of its examples, extended with the start of a further random
permutation where it is too short. So every example appears at least once per epoch and the examples of the
smaller half that appear twice are drawn at random.

Distributed training: HF Trainer hands the sampler to a ``DataLoader`` with ``batch_size =
per_device_train_batch_size`` and accelerate (1.15) wraps its batch sampler in ``BatchSamplerShard``, which gives
process ``r`` the whole batches ``r, r + n, r + 2n, ...`` (``split_batches=False``, the default) and, with
``even_batches``, completes a last round by cycling through whole batches of the beginning of the epoch. Each
batch being balanced, every process's micro-batches are balanced. Every process builds the same order from
``(seed, epoch)``, and the sampler has no ``generator`` attribute, so accelerate does not re-seed it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import SFTMixError

ROLE_CONFIDENT, ROLE_UNCONFIDENT, ROLE_UNKNOWN = 1, 0, -1


def _cover(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` items of ``pool``: random permutations of it, concatenated and cut at ``n``."""
    parts = [rng.permutation(pool) for _ in range(math.ceil(n / len(pool)))]
    return np.concatenate(parts)[:n]


class BalancedPairSampler(Sampler[int]):
    """Dataset indices as random confident/unconfident pairs, interleaved ``c, u, c, u, ...``.

    Args:
        confident: ``[N]`` bools, True for confident examples (from `load_split`).
        batch_size: Per-device micro-batch size B (even): each B consecutive indices hold B/2 pairs.
        seed: Seed of the order; the order of an epoch depends on ``(seed, epoch)`` only.
        num_replicas: Processes that share the order (whole batches go round-robin to them); the epoch is
            rounded up to whole batches on every process.
        num_examples: With ``confident=None`` (the ``warmup`` and ``online`` scorers, before their split exists):
            yield shuffled epochs of the length a median split of ``num_examples`` will have, until `set_split`.

    Example:
        >>> sampler = BalancedPairSampler(np.array([True, True, False, False, False]), batch_size=2, seed=0)
        >>> len(sampler)  # 3 pairs: both confident examples once, one of them twice
        6
        >>> order = list(sampler)
        >>> all(c in (0, 1) and u in (2, 3, 4) for c, u in zip(order[::2], order[1::2]))
        True
    """

    def __init__(
        self,
        confident: Sequence[bool] | np.ndarray | None,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        num_examples: int | None = None,
    ):
        if batch_size < 2 or batch_size % 2:
            raise SFTMixError(
                f"per_device_train_batch_size must be even with Mixup (each micro-batch holds as many confident "
                f"as unconfident examples), got {batch_size}"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.unit = batch_size // 2 * num_replicas
        if (
            confident is None
        ):  # no split yet (warmup / online): plain shuffled epochs of a median split's length
            if not num_examples or num_examples < 2:
                raise SFTMixError("Mixup needs at least 2 training examples")
            self.num_examples = num_examples
            self.confident_indices = self.unconfident_indices = None
            self.num_pairs = math.ceil(math.ceil(num_examples / 2) / self.unit) * self.unit
        else:
            self.set_split(confident)

    def set_split(self, confident: Sequence[bool] | np.ndarray) -> None:
        """Pair by this split from the next epoch on (the epoch length never changes for a median split)."""
        confident = np.asarray(confident, dtype=bool)
        confident_indices, unconfident_indices = np.flatnonzero(confident), np.flatnonzero(~confident)
        if not len(confident_indices) or not len(unconfident_indices):
            raise SFTMixError("Mixup needs confident and unconfident examples, but one half is empty")
        largest = max(len(confident_indices), len(unconfident_indices))
        num_pairs = math.ceil(largest / self.unit) * self.unit
        if getattr(self, "num_pairs", num_pairs) != num_pairs:
            raise SFTMixError("the split changes the epoch's length: stage 1 must give a median split")
        self.num_examples = len(confident)
        self.confident_indices, self.unconfident_indices, self.num_pairs = (
            confident_indices,
            unconfident_indices,
            num_pairs,
        )

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate / the Trainer at the start of every epoch."""
        self.epoch = epoch

    def pairs(self, epoch: int | None = None) -> np.ndarray:
        """``[num_pairs, 2]`` dataset indices (confident, unconfident) of the pairs of ``epoch``."""
        if self.confident_indices is None:
            raise SFTMixError("no split yet: the sampler yields shuffled examples until stage 1 has made one")
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        c = _cover(self.confident_indices, self.num_pairs, rng)
        u = _cover(self.unconfident_indices, self.num_pairs, rng)
        return np.stack([c, u], axis=1)

    def __iter__(self):
        if self.confident_indices is None:  # every example at least once, in a seeded random order
            rng = np.random.default_rng([self.seed, self.epoch])
            yield from _cover(np.arange(self.num_examples), 2 * self.num_pairs, rng).tolist()
            return
        yield from self.pairs().reshape(-1).tolist()

    def __len__(self) -> int:
        return 2 * self.num_pairs


def pair_rows(roles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the confident and unconfident members of each pair of a micro-batch (k-th with k-th).

    Args:
        roles: ``[B]`` ``mixup_role`` of each row (1 confident, 0 unconfident).

    Example:
        >>> pair_rows(torch.tensor([1, 0, 0, 1]))
        (tensor([0, 3]), tensor([1, 2]))
    """
    rows_c = (roles == ROLE_CONFIDENT).nonzero().squeeze(1)
    rows_u = (roles == ROLE_UNCONFIDENT).nonzero().squeeze(1)
    if rows_c.numel() != rows_u.numel() or rows_c.numel() + rows_u.numel() != roles.numel():
        raise SFTMixError(
            f"micro-batch is not balanced ({rows_c.numel()} confident, {rows_u.numel()} unconfident, "
            f"{roles.numel() - rows_c.numel() - rows_u.numel()} unknown rows): use the trainer's sampler"
        )
    return rows_c, rows_u


@dataclass
class MixupRoleCollator:
    """Wraps a collator (TRL's ``DataCollatorForLanguageModeling``) to carry each row's identity.

    The ``id`` of every example is removed before the wrapped collator runs and comes back as
    ``batch["example_ids"]`` (a list of str). With ``confident_by_id``, ``batch["mixup_role"]`` is a ``[B]``
    long tensor: 1 confident, 0 unconfident, -1 unknown (e.g. evaluation examples).

    Args:
        collator: The collator to wrap.
        confident_by_id: ``{id: is_confident}``, or None to add no roles (plain NTP training).
    """

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    confident_by_id: Mapping[str, bool] | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [example.get("id") for example in examples]
        batch = self.collator([{k: v for k, v in example.items() if k != "id"} for example in examples])
        if all(i is not None for i in ids):
            batch["example_ids"] = [str(i) for i in ids]
        if self.confident_by_id is not None:
            roles = [self.confident_by_id.get(str(i)) for i in ids]
            batch["mixup_role"] = torch.tensor(
                [ROLE_UNKNOWN if r is None else ROLE_CONFIDENT if r else ROLE_UNCONFIDENT for r in roles]
            )
        return batch
