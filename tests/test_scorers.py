"""sftmix.stage1.files / sftmix.stage1.scorers: the five confidence scorers from Python, and DynamicsCallback on plain TRL and on
SFTMixTrainer.

The kill -9 tests of every scorer's stage 1 through ``sftmix run`` are in test_resume.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from sftmix import DynamicsCallback, SFTMixConfig, SFTMixTrainer
from sftmix.cli import main
from sftmix.data.dataset import content_id
from sftmix.io_utils import read_jsonl
from sftmix.stage1.online import progress_corrected_confidence
from sftmix.stage1.reference import _reference_args
from sftmix.stage1.scorers import random_confidence
from sftmix.stage1.splits import median_split

COMMON = dict(
    learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0, bf16=False, use_cpu=True,
    per_device_train_batch_size=4, num_train_epochs=3, num_checkpoints=2, max_length=64, disable_tqdm=True,
)  # fmt: skip


def _pairs(n: int = 16) -> list[tuple[str, str]]:
    return [(f"question {i} " * (1 + i % 3), f"answer number {i}" + "!" * (i % 5)) for i in range(n)]


def _rows(form: str, tokenizer=None) -> list[dict]:
    pairs = _pairs()
    if form == "messages":
        return [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs
        ]
    if form == "prompt_completion":
        return [{"prompt": q, "completion": a} for q, a in pairs]
    if form == "conversational_prompt_completion":
        return [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs
        ]
    return [{"input_ids": tokenizer(q + " " + a)["input_ids"]} for q, a in pairs]  # already tokenized


def _mixup_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]


@pytest.mark.parametrize("scorer", ["reference", "warmup", "online", "base", "random"])
def test_every_scorer_from_python_on_a_plain_trl_dataset(scorer, tmp_path, tiny_llama_dir, tokenizer):
    """`SFTMixTrainer` with a model path, a ``messages`` dataset without ids and no dynamics_path: stage 1, then
    Mixup (from epoch 2 for warmup and online: 4 steps an epoch)."""
    args = SFTMixConfig(
        output_dir=str(tmp_path / "out"), mixup_weight=0.2, confidence_scorer=scorer, **COMMON
    )
    trainer = SFTMixTrainer(
        model=tiny_llama_dir,
        args=args,
        train_dataset=Dataset.from_list(_rows("messages")),
        processing_class=tokenizer,
    )
    trainer.train()
    dynamics = tmp_path / "out" / "dynamics"
    rows = read_jsonl(dynamics / "dynamics.jsonl")
    summary = json.loads((dynamics / "dynamics_summary.json").read_text())
    assert summary["scorer"] == scorer and summary["num_confident"] == summary["num_unconfident"] == 8
    assert sorted(r["id"] for r in rows) == sorted(content_id(r) for r in _rows("messages"))
    assert [r["split"] == "confident" for r in rows] == median_split([r["confidence"] for r in rows]).tolist()
    assert (dynamics / "datamap.png").read_bytes().startswith(b"\x89PNG")
    assert trainer.args.dynamics_path == str(dynamics / "dynamics.jsonl")
    logs = _mixup_logs(trainer)
    assert len(logs) == 12
    first_mixup = 4 if scorer in ("warmup", "online") else 0
    assert all("loss_mixup" not in e for e in logs[:first_mixup])
    assert all(e["loss_mixup"] > 0 and e["mixed_tokens"] > 0 for e in logs[first_mixup:])
    if scorer in ("reference", "warmup"):
        assert summary["checkpoint_steps"] == ([2, 4] if scorer == "warmup" else [2, 4])
        assert len(rows[0]["perplexities"]) == 2
    # a second trainer on the same output_dir reuses stage 1 instead of redoing it
    mtime = (dynamics / "dynamics.jsonl").stat().st_mtime_ns
    again = SFTMixTrainer(
        model=tiny_llama_dir, args=SFTMixConfig(output_dir=str(tmp_path / "out"), mixup_weight=0.2,
                                                confidence_scorer=scorer, **{**COMMON, "num_train_epochs": 2}),
        train_dataset=Dataset.from_list(_rows("messages")), processing_class=tokenizer,
    )  # fmt: skip
    again.train()
    assert (dynamics / "dynamics.jsonl").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("form", ["prompt_completion", "conversational_prompt_completion", "tokenized"])
def test_other_dataset_forms_train_with_mixup(form, tmp_path, tiny_llama_dir, tokenizer):
    args = SFTMixConfig(
        output_dir=str(tmp_path / "out"), confidence_scorer="random", **{**COMMON, "num_train_epochs": 1}
    )
    trainer = SFTMixTrainer(
        model=tiny_llama_dir,
        args=args,
        train_dataset=Dataset.from_list(_rows(form, tokenizer)),
        processing_class=tokenizer,
    )
    trainer.train()
    assert all(e["loss_mixup"] > 0 for e in _mixup_logs(trainer))
    assert len(read_jsonl(tmp_path / "out" / "dynamics" / "dynamics.jsonl")) == 16


def test_online_records_what_the_base_model_scores_when_nothing_moves(tmp_path, tiny_llama_dir, tokenizer):
    """With a learning rate of 0 the weights never change: the NLL the online scorer takes from the training
    forwards (sftmix's fused head) must equal the base scorer's no-grad pass, example by example."""
    found = {}
    for scorer in ("online", "base"):
        args = SFTMixConfig(output_dir=str(tmp_path / scorer), confidence_scorer=scorer, online_correction="none",
                            **{**COMMON, "learning_rate": 0.0, "num_train_epochs": 2})  # fmt: skip
        SFTMixTrainer(
            model=tiny_llama_dir,
            args=args,
            train_dataset=Dataset.from_list(_rows("messages")),
            processing_class=tokenizer,
        ).train()
        rows = read_jsonl(tmp_path / scorer / "dynamics" / "dynamics.jsonl")
        found[scorer] = {r["id"]: r for r in rows}
    assert found["online"].keys() == found["base"].keys()
    for i, row in found["online"].items():
        assert row["perplexities"] == pytest.approx(found["base"][i]["perplexities"], rel=1e-4)
        assert row["num_response_tokens"] == found["base"][i]["num_response_tokens"]
        assert row["split"] == found["base"][i]["split"]


def test_dynamics_callback_on_plain_trl_sft_trainer(tmp_path, tiny_llama_dir, tokenizer):
    """The data map of a plain trl.SFTTrainer run; with a learning rate of 0 its per-epoch perplexities equal the
    base scorer's (TRL's fused head against sftmix's no-grad scoring)."""
    data = Dataset.from_list(_rows("messages"))
    config = {k: v for k, v in COMMON.items() if k != "num_checkpoints"}
    trainer = SFTTrainer(
        model=tiny_llama_dir, args=SFTConfig(output_dir=str(tmp_path / "trl"), **{**config, "learning_rate": 0.0, "num_train_epochs": 2}),
        train_dataset=data, processing_class=tokenizer,
    )  # fmt: skip
    trainer.add_callback(DynamicsCallback())
    trainer.train()
    dynamics = tmp_path / "trl" / "dynamics"
    rows = read_jsonl(dynamics / "dynamics.jsonl")
    assert len(rows) == 16 and all(len(r["perplexities"]) == 2 for r in rows)
    assert all(r["perplexities"][0] == pytest.approx(r["perplexities"][1], rel=1e-5) for r in rows)  # lr 0
    assert sum(r["split"] == "confident" for r in rows) == 8
    assert (dynamics / "datamap.png").read_bytes().startswith(b"\x89PNG")
    args = SFTMixConfig(
        output_dir=str(tmp_path / "base"), confidence_scorer="base", **{**COMMON, "num_train_epochs": 1}
    )
    SFTMixTrainer(model=tiny_llama_dir, args=args, train_dataset=data, processing_class=tokenizer).train()
    base = sorted(r["perplexities"][0] for r in read_jsonl(tmp_path / "base" / "dynamics" / "dynamics.jsonl"))
    np.testing.assert_allclose(sorted(r["perplexities"][0] for r in rows), base, rtol=1e-4)
    # The same callback on an SFTMixTrainer run (sftmix's fused head returns the per-row NLL it records).
    args = SFTMixConfig(
        output_dir=str(tmp_path / "mix"),
        mixup_weight=0.0,
        **{**config, "learning_rate": 0.0, "num_train_epochs": 1},
    )
    trainer = SFTMixTrainer(model=tiny_llama_dir, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(DynamicsCallback())
    trainer.train()
    mixed = sorted(r["perplexities"][0] for r in read_jsonl(tmp_path / "mix" / "dynamics" / "dynamics.jsonl"))
    np.testing.assert_allclose(mixed, base, rtol=1e-4)


def test_sftmix_train_cli_runs_stage_1_itself(tmp_path, tiny_llama_dir):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in _pairs())
    )
    argv = [
        "train", "--model_name_or_path", tiny_llama_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"),
        "--confidence_scorer", "random", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
        "--report_to", "none", "--bf16", "false", "--max_length", "64",
    ]  # fmt: skip
    assert main(argv) == 0
    assert (
        json.loads((tmp_path / "o" / "final" / "sftmix_train.json").read_text())["confidence_scorer"]
        == "random"
    )
    assert (tmp_path / "o" / "dynamics" / "dynamics.jsonl").is_file()
    assert main([*argv[:-2], "--max_length", "64", "--confidence_scorer", "typo"]) == 2  # one-line error


def test_progress_correction_removes_the_training_trend():
    """Examples seen late look easier only because the model has learnt: ranking against neighbouring steps
    recovers each example's own difficulty, raw perplexity does not."""
    rng = np.random.default_rng(0)
    steps = np.repeat(np.arange(40), 8)
    difficulty = rng.normal(size=steps.size)
    log_ppl = 3.0 - 0.05 * steps + 0.3 * difficulty  # a strong downward trend over training
    truth = median_split(-difficulty)
    agree = {
        m: (median_split(progress_corrected_confidence(steps, log_ppl, m, window=2)) == truth).mean()
        for m in ("none", "rank", "detrend")
    }
    assert agree["rank"] > 0.85 and agree["detrend"] > 0.85 and agree["none"] < 0.75, agree


def test_random_confidence_is_seeded_and_order_free():
    ids = [f"id{i}" for i in range(100)]
    a, b = random_confidence(ids, 1), random_confidence(ids, 2)
    assert (a == random_confidence(ids, 1)).all() and not np.allclose(a, b)
    assert 40 <= median_split(a).sum() <= 60 and abs(float(np.corrcoef(a, b)[0, 1])) < 0.3


def test_scoring_uses_the_trainers_labels(tmp_path, tiny_llama_dir, tokenizer):
    """Stage 1 scores the tokens training trains on: the completion only, unless completion_only_loss=False."""
    from sftmix.stage1.scoring import with_training_labels

    data = Dataset.from_list(_rows("prompt_completion"))
    counts = {}
    for only in (False, True):
        trainer = SFTMixTrainer(
            model=tiny_llama_dir,
            args=SFTMixConfig(output_dir=str(tmp_path / str(only)), confidence_scorer="random", completion_only_loss=only, **COMMON),
            train_dataset=data, processing_class=tokenizer,
        )  # fmt: skip
        view = with_training_labels(trainer.train_dataset, trainer.data_collator.collator)
        counts[only] = sum(sum(x != -100 for x in labels) for labels in view["labels"])
        assert view["input_ids"] == [list(r) for r in trainer.train_dataset["input_ids"]]
    assert 0 < counts[True] < counts[False]


@pytest.mark.parametrize("scorer", ["reference", "base"])
def test_scorers_with_a_lora_target(scorer, tmp_path, tiny_llama_dir, tokenizer):
    """With PEFT the reference run trains a copy of the adapter model; the target's own weights start untouched."""
    from peft import LoraConfig

    args = SFTMixConfig(
        output_dir=str(tmp_path / "o"), confidence_scorer=scorer, **{**COMMON, "num_train_epochs": 1}
    )
    trainer = SFTMixTrainer(
        model=tiny_llama_dir, args=args, train_dataset=Dataset.from_list(_rows("messages")), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    from sftmix.stage1.scorers import prepare_stage1

    prepare_stage1(trainer)
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    trainer.train()
    assert all(e["loss_mixup"] > 0 for e in _mixup_logs(trainer))


def test_reference_run_is_plain_ntp(tmp_path):
    """The reference model is trained without the target's regularisers: no Mixup, no label smoothing."""
    target = SFTMixConfig(
        output_dir=str(tmp_path / "out"), mixup_weight=0.2, label_smoothing_factor=0.1, learning_rate=3e-5
    )
    ref = _reference_args(target, tmp_path / "ref", 2.0)
    assert (ref.mixup_weight, ref.label_smoothing_factor, ref.num_train_epochs) == (0.0, 0.0, 2.0)
    assert ref.learning_rate == 3e-5 and ref.output_dir == str(tmp_path / "ref")


def test_the_registry_holds_every_scorer_with_its_start_cost_and_checks():
    from sftmix.errors import SFTMixError
    from sftmix.sftmix_config import CONFIDENCE_SCORERS, SFTMixConfig
    from sftmix.stage1.scorers import CHECKPOINTS, SCORERS, mixup_start_epoch, scorer_for, stage1_cost

    assert tuple(SCORERS) == CONFIDENCE_SCORERS
    args = {
        name: SFTMixConfig(output_dir="x", confidence_scorer=name, reference_epochs=2) for name in SCORERS
    }
    assert {n: mixup_start_epoch(a) for n, a in args.items()} == {
        "reference": 0,
        "warmup": 2,
        "online": 1,
        "base": 0,
        "random": 0,
    }
    assert {n: round(stage1_cost(a), 2) for n, a in args.items()} == {
        "reference": 2.6,
        "warmup": 0.6,
        "online": 0.0,
        "base": 0.2,
        "random": 0.0,
    }
    assert [n for n, s in SCORERS.items() if s.inside_training] == ["warmup", "online"]
    assert scorer_for(SFTMixConfig(output_dir="x", score_checkpoints="a,b")) is CHECKPOINTS
    with pytest.raises(SFTMixError, match="whole number of reference_epochs"):
        mixup_start_epoch(SFTMixConfig(output_dir="x", confidence_scorer="warmup", reference_epochs=1.5))
    with pytest.raises(SFTMixError, match="makes the split while the target trains"):
        SCORERS["online"].check_runs_before_training()
