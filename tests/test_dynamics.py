"""sftmix.cli.dynamics (``sftmix dynamics``): the resumable stage-1 driver on a tiny model and a tiny data file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import TrainerCallback
from trl import ModelConfig

import sftmix.stage1.scoring as scoring_module
from sftmix import SFTMixTrainer
from sftmix.cli.dynamics import run_dynamics
from sftmix.data.dataset import dataset_fingerprint, load_sft_dataset, tokenize_sft_dataset
from sftmix.errors import SFTMixError
from sftmix.io_utils import read_jsonl
from sftmix.sftmix_config import DataArguments, SFTMixConfig
from sftmix.stage1.scoring import response_token_counts
from sftmix.stage1.splits import confidence_scores, median_split, variability_scores


def _write_data(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "sun", "sea", "tree", "sky"]
    records = []
    for i in range(n):
        response = " ".join(rng.choice(words, size=int(rng.integers(1, 6))))
        records.append({"instruction": f"Say {i} things", "input": "", "output": response})
    path.write_text(json.dumps(records))
    return path


def _args(model_dir: str, data: Path, out: Path, **dyn):
    model_args = ModelConfig(model_name_or_path=model_dir)
    data_args = DataArguments(dataset_name=str(data))
    training_args = SFTMixConfig(
        num_checkpoints=3,
        scoring_batch_size=4,
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=96,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **dyn,
    )
    return model_args, data_args, training_args


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return _write_data(tmp_path_factory.mktemp("data") / "tiny.json")


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir, data_file, tmp_path_factory) -> Path:
    """One uninterrupted run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("run")
    run_dynamics(*_args(tiny_llama_dir, data_file, out))
    return out


@pytest.fixture(scope="module")
def kept_run(tiny_llama_dir, data_file, tmp_path_factory) -> Path:
    """The same run, keeping its reference checkpoints (``keep_reference_checkpoints``)."""
    out = tmp_path_factory.mktemp("kept")
    run_dynamics(*_args(tiny_llama_dir, data_file, out, keep_reference_checkpoints=True))
    return out


def test_run_dynamics_outputs(reference_run, data_file, tokenizer):
    rows = read_jsonl(reference_run / "dynamics.jsonl")
    loaded = load_sft_dataset(DataArguments(dataset_name=str(data_file)))
    assert [r["id"] for r in rows] == loaded["id"]  # every example, in dataset order
    assert [r["index"] for r in rows] == list(range(len(loaded)))
    # Scored in-process: no checkpoint is saved. 12 examples, batch 2 -> 6 steps; C = 3 -> steps 2, 4, 6.
    assert not list((reference_run / "reference").glob("checkpoint-*"))
    assert sorted(p.name for p in (reference_run / "scores").iterdir()) == [
        "ckpt-2.json",
        "ckpt-4.json",
        "ckpt-6.json",
    ]
    perps = np.array([r["perplexities"] for r in rows])
    assert perps.shape == (12, 3) and (perps >= 1).all()
    np.testing.assert_allclose([r["confidence"] for r in rows], confidence_scores(perps), rtol=1e-7)
    split = median_split([r["confidence"] for r in rows])
    assert [r["split"] for r in rows] == ["confident" if s else "unconfident" for s in split]
    np.testing.assert_allclose([r["variability"] for r in rows], variability_scores(perps), rtol=1e-6)
    tokenized = tokenize_sft_dataset(loaded, tokenizer, 96)
    assert [r["num_response_tokens"] for r in rows] == response_token_counts(tokenized).tolist()
    # Training lowers the perplexity of the training data: later checkpoints score it lower on average.
    assert perps[:, 2].mean() < perps[:, 0].mean()
    summary = json.loads((reference_run / "dynamics_summary.json").read_text())
    assert summary["num_examples"] == 12 and summary["checkpoint_steps"] == [2, 4, 6]
    assert summary["scorer"] == "reference" and summary["fingerprint"] == dataset_fingerprint(tokenized)
    assert summary["num_confident"] == 6 and summary["num_unconfident"] == 6
    png = (reference_run / "datamap.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # The scores files carry the ids and the data fingerprint.
    scores = json.loads((reference_run / "scores" / "ckpt-4.json").read_text())
    assert scores["ids"] == loaded["id"]
    assert scores["fingerprint"] == dataset_fingerprint(tokenized)
    np.testing.assert_allclose(scores["perplexities"], perps[:, 1], rtol=1e-7)


def test_kept_checkpoints_give_the_same_file(reference_run, kept_run):
    assert (kept_run / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()
    for checkpoint in (kept_run / "reference").glob("checkpoint-*"):  # weights kept, optimizer states dropped
        assert (checkpoint / "model.safetensors").is_file() and not list(checkpoint.glob("optimizer*"))
    assert sorted(p.name for p in (kept_run / "reference").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_run_dynamics_is_deterministic(reference_run, tiny_llama_dir, data_file, tmp_path):
    model_args, data_args, training_args = _args(
        tiny_llama_dir, data_file, tmp_path, keep_reference_checkpoints=True, keep_reference_optimizer=True
    )
    run_dynamics(model_args, data_args, training_args)
    assert (tmp_path / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()
    assert (tmp_path / "reference" / "checkpoint-6" / "optimizer.pt").is_file()


def test_rerun_reuses_scores_and_rescoring_gives_same_bytes(
    reference_run, tiny_llama_dir, data_file, tmp_path
):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    (out / "dynamics.jsonl").unlink()
    (out / "scores" / "ckpt-4.json").unlink()
    kept = (out / "scores" / "ckpt-2.json").stat().st_mtime_ns
    run_dynamics(*_args(tiny_llama_dir, data_file, out))
    assert (out / "scores" / "ckpt-2.json").stat().st_mtime_ns == kept  # reused, not rescored
    assert (out / "scores" / "ckpt-4.json").is_file()
    assert (out / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()


class _Crash(RuntimeError):
    pass


class _CrashAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Crash(f"simulated crash at step {self.step}")


def test_resume_after_crash_in_training(reference_run, tiny_llama_dir, data_file, tmp_path):
    class CrashingTrainer(SFTMixTrainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), _CrashAtStep(3)], **kwargs)

    args = _args(tiny_llama_dir, data_file, tmp_path)
    with pytest.raises(_Crash):
        run_dynamics(*args, trainer_cls=CrashingTrainer)
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["ckpt-2.json"]
    assert not (tmp_path / "dynamics.jsonl").exists()
    kept = (tmp_path / "scores" / "ckpt-2.json").stat().st_mtime_ns
    run_dynamics(*args)  # trains again, keeps the scored checkpoint
    assert (tmp_path / "scores" / "ckpt-2.json").stat().st_mtime_ns == kept
    assert (tmp_path / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()


def test_resume_from_a_kept_checkpoint(reference_run, tiny_llama_dir, data_file, tmp_path):
    class CrashingTrainer(SFTMixTrainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), _CrashAtStep(3)], **kwargs)

    args = _args(tiny_llama_dir, data_file, tmp_path, keep_reference_checkpoints=True)
    with pytest.raises(_Crash):
        run_dynamics(*args, trainer_cls=CrashingTrainer)
    assert [p.name for p in (tmp_path / "reference").glob("checkpoint-*")] == ["checkpoint-2"]

    def saved_files() -> dict[str, int]:  # the optimizer states are dropped once the run is scored
        folder = tmp_path / "reference" / "checkpoint-2"
        return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.name.startswith("optimizer")}

    first = saved_files()
    run_dynamics(*args)  # resumes from checkpoint-2 (a restart from scratch would save it again)
    assert saved_files() == first
    assert (tmp_path / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()


def test_resume_after_crash_in_scoring(reference_run, tiny_llama_dir, data_file, tmp_path, monkeypatch):
    real, calls = scoring_module.score_checkpoint, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Crash("simulated crash while scoring")
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring_module, "score_checkpoint", crash_on_second)
    with pytest.raises(_Crash):
        run_dynamics(*_args(tiny_llama_dir, data_file, tmp_path))
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["ckpt-2.json"]  # the finished one was kept
    monkeypatch.setattr(scoring_module, "score_checkpoint", real)
    run_dynamics(*_args(tiny_llama_dir, data_file, tmp_path))
    assert (tmp_path / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()


def test_a_finished_run_is_not_trained_again(reference_run, tiny_llama_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    (out / "dynamics.jsonl").unlink()
    monkeypatch.setattr(SFTMixTrainer, "train", lambda *a, **k: pytest.fail("trained again"))
    run_dynamics(*_args(tiny_llama_dir, data_file, out))
    assert (out / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()


def test_score_existing_checkpoints(reference_run, kept_run, tiny_llama_dir, data_file, tmp_path):
    checkpoints = ",".join(str(kept_run / "reference" / f"checkpoint-{s}") for s in (2, 4, 6))
    run_dynamics(*_args(tiny_llama_dir, data_file, tmp_path, score_checkpoints=checkpoints))
    assert not (tmp_path / "reference").exists()  # nothing trained
    assert (tmp_path / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()


def test_stale_reference_and_scores_are_detected(
    reference_run, kept_run, tiny_llama_dir, data_file, tmp_path
):
    out = tmp_path / "copy"
    shutil.copytree(kept_run / "reference", out / "reference")
    model_args, data_args, training_args = _args(
        tiny_llama_dir, data_file, out, keep_reference_checkpoints=True
    )
    training_args.max_length = 40  # other tokens: the reference run no longer matches the data
    with pytest.raises(SFTMixError, match="other data"):
        run_dynamics(model_args, data_args, training_args)

    training_args.max_length = 96
    training_args.learning_rate = 1e-3  # other settings: not a resume either
    with pytest.raises(SFTMixError, match=r"other settings \(learning_rate\)"):
        run_dynamics(model_args, data_args, training_args)
    training_args.max_length, training_args.learning_rate = 40, 1e-2

    # Scores of the same checkpoints, in the same dir, on other data are recomputed instead of reused.
    training_args.score_checkpoints = ",".join(str(out / "reference" / f"checkpoint-{s}") for s in (2, 4, 6))
    run_dynamics(model_args, data_args, training_args)
    short = json.loads((out / "scores" / "ckpt-2.json").read_text())
    training_args.max_length = 96
    run_dynamics(model_args, data_args, training_args)
    full = json.loads((out / "scores" / "ckpt-2.json").read_text())
    assert full["checkpoint"] == short["checkpoint"] and full["fingerprint"] != short["fingerprint"]
    assert full["perplexities"] != short["perplexities"]
    assert (out / "dynamics.jsonl").read_bytes() == (reference_run / "dynamics.jsonl").read_bytes()
