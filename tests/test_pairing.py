"""sftmix.mixup.pairing: reading the split, balanced pairs under accelerate's sharding, and the role collator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftmix.errors import SFTMixError
from sftmix.mixup.pairing import BalancedPairSampler, MixupRoleCollator, pair_rows
from sftmix.stage1.splits import load_split


def write_dynamics(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(i, split, confidence=-1.0):
    return {"id": f"ex{i}", "split": split, "confidence": confidence, "perplexities": [1.0, 2.0]}


def test_load_split_follows_dataset_order(tmp_path):
    path = write_dynamics(
        tmp_path / "d.jsonl", [row(0, "confident"), row(1, "unconfident"), row(2, "confident")]
    )
    split = load_split(path, ["ex2", "ex1", "ex0"])
    assert split.dtype == bool and split.tolist() == [True, False, True]
    # extra ids in the file (e.g. examples later dropped by truncation) are fine
    assert load_split(path, ["ex1", "ex0"]).tolist() == [False, True]


@pytest.mark.parametrize(
    ("lines", "ids", "message"),
    [
        ([row(0, "confident"), "{not json"], ["ex0"], "line 2: malformed JSON"),
        ([row(0, "confident"), {"id": "ex1"}], ["ex0"], "line 2: missing field 'split'"),
        ([row(0, "confident"), row(1, "middle")], ["ex0"], "line 2: field 'split'"),
        (
            [row(0, "confident"), '{"id": "ex1", "split": "unconfident", "confidence": NaN}'],
            ["ex0"],
            "line 2.*finite",
        ),
        (
            [row(0, "confident"), {**row(1, "unconfident"), "perplexities": [1.0, float("inf")]}],
            ["ex0"],
            "finite",
        ),
        ([row(0, "confident"), row(0, "unconfident")], ["ex0"], "line 2: duplicate id"),
        (
            [row(0, "confident"), row(1, "unconfident")],
            ["ex0", "ex1", "ex7"],
            "no entry for 1 of the 3.*'ex7'",
        ),
        ([row(0, "confident"), row(1, "unconfident")], ["other0", "other1"], "another dataset"),
        ([row(0, "confident"), row(1, "confident")], ["ex0", "ex1"], "all 2 training examples are confident"),
    ],
)
def test_load_split_errors_name_file_and_line(tmp_path, lines, ids, message):
    path = write_dynamics(tmp_path / "dyn.jsonl", lines)
    with pytest.raises(SFTMixError, match=message) as info:
        load_split(path, ids)
    assert "dyn.jsonl" in str(info.value)


def test_missing_dynamics_file(tmp_path):
    with pytest.raises(SFTMixError, match="dynamics file not found"):
        load_split(tmp_path / "nope.jsonl", ["a"])


def check_balanced(batch, confident):
    roles = confident[np.asarray(batch)]
    assert roles.sum() * 2 == len(batch), batch
    # interleaved: the k-th confident row is paired with the k-th unconfident row
    assert roles[0::2].all() and not roles[1::2].any()


@pytest.mark.parametrize(("n_c", "n_u", "batch_size"), [(5, 5, 2), (5, 6, 4), (3, 10, 4), (8, 8, 8)])
def test_epoch_is_balanced_covers_everything_and_is_deterministic(n_c, n_u, batch_size):
    confident = np.array([True] * n_c + [False] * n_u)
    np.random.default_rng(0).shuffle(confident)
    sampler = BalancedPairSampler(confident, batch_size=batch_size, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % batch_size == 0
    assert set(order) == set(range(n_c + n_u))  # every example at least once
    assert len(sampler) == 2 * int(np.ceil(max(n_c, n_u) / (batch_size // 2)) * (batch_size // 2))
    for start in range(0, len(order), batch_size):
        check_balanced(order[start : start + batch_size], confident)
    assert list(BalancedPairSampler(confident, batch_size=batch_size, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new epoch reshuffles the pairs
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_larger_half_appears_exactly_once():
    confident = np.array([True] * 4 + [False] * 9)
    pairs = BalancedPairSampler(confident, batch_size=2, seed=0).pairs(0)
    assert sorted(pairs[:, 1].tolist()) == list(range(4, 13))
    counts = np.bincount(pairs[:, 0], minlength=4)
    assert counts.min() >= 2 and counts.max() <= 3  # resampled evenly: 9 pairs over 4 confident examples


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_odd_batch_size_is_a_clear_error(batch_size):
    with pytest.raises(SFTMixError, match="per_device_train_batch_size must be even"):
        BalancedPairSampler(np.array([True, False]), batch_size=batch_size)


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("even_batches", [True, False])
def test_accelerate_batch_sampler_shard_keeps_every_rank_balanced(num_replicas, even_batches):
    """accelerate 1.15 hands whole batches round-robin to the processes: each rank's batches stay balanced."""
    confident = np.array([True] * 7 + [False] * 8)
    sampler = BalancedPairSampler(confident, batch_size=4, seed=1, num_replicas=num_replicas)
    seen = []
    lengths = []
    for rank in range(2):
        shard = BatchSamplerShard(
            BatchSampler(sampler, batch_size=4, drop_last=False),
            num_processes=2,
            process_index=rank,
            even_batches=even_batches,
        )
        batches = list(shard)
        lengths.append(len(batches))
        for batch in batches:
            assert len(batch) == 4
            check_balanced(batch, confident)
            seen.extend(batch)
    assert set(seen) == set(range(15))
    # with num_replicas=2 the epoch is whole rounds: both ranks take the same number of steps, no wrap-around
    if num_replicas == 2:
        assert lengths[0] == lengths[1] and sum(lengths) * 4 == len(sampler)


def test_collator_adds_roles_from_ids_and_keeps_trl_output():
    inner = DataCollatorForLanguageModeling(pad_token_id=0)
    examples = [
        {"id": "a", "input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"id": "b", "input_ids": [8, 9], "labels": [-100, 9]},
        {"id": "z", "input_ids": [4], "labels": [4]},
    ]
    plain = inner([{k: v for k, v in e.items() if k != "id"} for e in examples])
    batch = MixupRoleCollator(inner, {"a": False, "b": True})(examples)
    for key, value in plain.items():
        assert torch.equal(batch[key], value)
    assert batch["example_ids"] == ["a", "b", "z"]
    assert batch["mixup_role"].tolist() == [0, 1, -1]
    assert "mixup_role" not in MixupRoleCollator(inner)(examples)


def test_pair_rows():
    rows_c, rows_u = pair_rows(torch.tensor([0, 1, 1, 0]))
    assert rows_c.tolist() == [1, 2] and rows_u.tolist() == [0, 3]
    with pytest.raises(SFTMixError, match="not balanced"):
        pair_rows(torch.tensor([1, 1, 0, 0, 0, 1, 1, 1]))
    with pytest.raises(SFTMixError, match="1 unknown"):
        pair_rows(torch.tensor([1, 0, -1]))
