"""Stage 1-2: the confidence / split arithmetic, checkpoint scoring, and the resumable `run_dynamics` driver."""

from __future__ import annotations

import doctest
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import ModelConfig

import sftmix.stage1.files as scorers
import sftmix.stage1.online as online
from sftmix import SFTMixTrainer
from sftmix.cli.dynamics import run_dynamics
from sftmix.data.dataset import dataset_fingerprint, load_sft_dataset, tokenize_sft_dataset
from sftmix.errors import SFTMixError
from sftmix.io_utils import read_jsonl
from sftmix.sftmix_config import DataArguments, SFTMixConfig
from sftmix.stage1.reference import checkpoint_steps
from sftmix.stage1.scoring import length_grouped_batches, response_token_counts, score_checkpoint
from sftmix.stage1.splits import confidence_scores, median_split, split_agreement, variability_scores

# ---------------------------------------------------------------------------------------------------------
# The arithmetic


def test_docstring_examples():
    assert doctest.testmod(scorers).failed == 0
    assert doctest.testmod(online).failed == 0


def _split_by_definition(confidences: list[float]) -> list[bool]:
    """The split spelled out: rank by (confidence desc, index asc), top floor(N/2) are confident."""
    ranked = sorted(range(len(confidences)), key=lambda i: (-confidences[i], i))
    confident = set(ranked[: len(confidences) // 2])
    return [i in confident for i in range(len(confidences))]


@pytest.mark.parametrize("n", [1, 2, 7, 10, 31])
def test_confidence_and_split_match_definition(n):
    rng = np.random.default_rng(n)
    # Perplexities on a coarse grid so that ties (and ties across the median) really occur.
    perps = rng.integers(1, 6, size=(n, 3)).astype(float)
    conf = confidence_scores(perps)
    expected_conf = [-sum(row) / 3 for row in perps.tolist()]
    np.testing.assert_allclose(conf, expected_conf)
    split = median_split(conf)
    assert split.dtype == bool and split.sum() == n // 2
    assert split.tolist() == _split_by_definition(conf.tolist())
    if split.any() and (~split).any():
        assert conf[split].min() >= conf[~split].max()


def test_split_ties_and_odd_n():
    # All equal: the earlier examples are confident; odd N: the extra one is unconfident.
    assert median_split([0.0] * 5).tolist() == [True, True, False, False, False]
    # A tie straddling the median: of the two -2.0 examples the earlier (index 1) wins.
    assert median_split([-5.0, -2.0, -1.0, -2.0]).tolist() == [False, True, True, False]
    assert median_split([]).tolist() == []


def test_split_agreement_uses_the_files_own_split_on_ties_and_odd_n():
    # Five examples, a tie across the median in a: median_split in a's order puts e1 (not e3) in the top half.
    a = {"e0": 5.0, "e1": 2.0, "e2": 1.0, "e3": 2.0, "e4": 0.0}
    b = {"e4": 0.0, "e3": 4.0, "e2": 1.0, "e1": 3.0, "e0": 5.0}  # another order, e3 above e1
    agree = split_agreement(a, b)
    assert agree["n"] == 5
    assert agree["same_half"] == pytest.approx(3 / 5)  # e1 and e3 swap halves, the rest agree
    assert split_agreement(a, a) == {"same_half": 1.0, "spearman": 1.0, "n": 5}
    # reversed: -1 but for the tie (e1, e3), which keeps its order in both
    assert split_agreement(a, {k: -v for k, v in a.items()})["spearman"] == pytest.approx(-0.9)
    assert split_agreement(a, {"e0": 1.0, "e1": 2.0, "x": 3.0})["n"] == 2  # only the common ids
    with pytest.raises(ValueError, match="at least 2 common ids"):
        split_agreement(a, {"x": 1.0})


def test_math_rejects_bad_input():
    with pytest.raises(ValueError):
        confidence_scores([1.0, 2.0])  # not [N, C]
    with pytest.raises(ValueError):
        confidence_scores([[1.0, float("nan")]])
    with pytest.raises(ValueError):
        median_split([[1.0]])
    with pytest.raises(ValueError):
        median_split([1.0, float("nan")])


def test_variability_is_population_std():
    perps = np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]])
    np.testing.assert_allclose(variability_scores(perps), [np.sqrt(8 / 3), 0.0])


@pytest.mark.parametrize("total,c", [(10, 3), (7, 7), (100, 4), (33, 5), (1, 1)])
def test_checkpoint_steps_evenly_spaced(total, c):
    steps = checkpoint_steps(total, c)
    assert len(steps) == c and len(set(steps)) == c and steps == sorted(steps)
    assert steps[-1] == total and steps[0] > 0
    for k, step in enumerate(steps, start=1):
        assert abs(step - k * total / c) <= 0.5


def test_checkpoint_steps_too_few():
    with pytest.raises(SFTMixError, match="fewer than num_checkpoints"):
        checkpoint_steps(2, 3)


def test_length_grouped_batches_cover_everything_once():
    lengths = [5, 1, 9, 9, 3, 7, 2]
    batches = length_grouped_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


# ---------------------------------------------------------------------------------------------------------
# Scoring


def _token_dataset(vocab: int, n: int = 7, seed: int = 0) -> Dataset:
    """Rows of varied length with a prompt (no loss) then a response (loss), like tokenize_sft_dataset's."""
    rng = np.random.default_rng(seed)
    ids, input_ids, labels = [], [], []
    for i in range(n):
        prompt, response = int(rng.integers(2, 9)), int(rng.integers(1, 12))
        tokens = rng.integers(4, vocab, size=prompt + response).tolist()
        ids.append(f"ex{i}")
        input_ids.append(tokens)
        labels.append([-100] * prompt + tokens[prompt:])
    return Dataset.from_dict({"id": ids, "input_ids": input_ids, "labels": labels})


def _naive_perplexities(model, dataset: Dataset) -> np.ndarray:
    """One example at a time, full logits from the model's own forward, shifted cross-entropy."""
    out = []
    with torch.no_grad():
        for row in dataset:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits, torch.tensor(row["labels"][1:]), ignore_index=-100
            )
            out.append(torch.exp(nll).item())
    return np.array(out)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("batch_size,chunk_size", [(1, 1024), (3, 5), (16, 1024)])
def test_score_checkpoint_matches_full_logits(request, fixture, batch_size, chunk_size):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    dataset = _token_dataset(model.config.vocab_size)
    model.train()  # scoring switches to eval mode (no dropout) and back
    ours = score_checkpoint(model, dataset, batch_size, chunk_size=chunk_size, show_progress=False)
    assert model.training
    np.testing.assert_allclose(ours, _naive_perplexities(model.eval(), dataset), rtol=1e-5)


def test_score_checkpoint_applies_softcapping_and_logit_scale(tokenizer):
    """Gemma-2 soft-caps its logits; Cohere scales them: the head-only path must do the same."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    small.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=1)
    for model in (
        Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5)),
        CohereForCausalLM(CohereConfig(**small, logit_scale=3.0)),
    ):
        model.eval()
        dataset = _token_dataset(64, n=4)
        ours = score_checkpoint(model, dataset, 2, show_progress=False)
        np.testing.assert_allclose(ours, _naive_perplexities(model, dataset), rtol=1e-5)


def test_scores_follow_ids_under_reordering(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    dataset = _token_dataset(model.config.vocab_size, n=9)
    forward = dict(zip(dataset["id"], score_checkpoint(model, dataset, 4, show_progress=False), strict=True))
    shuffled = dataset.shuffle(seed=3)
    backward = dict(
        zip(shuffled["id"], score_checkpoint(model, shuffled, 4, show_progress=False), strict=True)
    )
    assert forward.keys() == backward.keys()
    for key, value in forward.items():
        assert backward[key] == pytest.approx(value, rel=1e-6)


_DISTRIBUTED_SCRIPT = """
import sys
import numpy as np
from accelerate import PartialState
from datasets import load_from_disk
from transformers import AutoModelForCausalLM
from sftmix.stage1.scoring import score_checkpoint

state = PartialState(cpu=True)
assert state.num_processes == 2, state
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
scores = score_checkpoint(model, load_from_disk(sys.argv[2]), 2, show_progress=False)
np.save(f"{sys.argv[3]}/rank{state.process_index}.npy", scores)
"""


@pytest.mark.distributed
def test_distributed_scoring_equals_single_process(tiny_llama_dir, tmp_path):
    """Two CPU processes (torchrun, gloo) each score half of the batches; gathered, both hold every score."""
    import os
    import subprocess
    import sys

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    dataset = _token_dataset(model.config.vocab_size, n=9)
    dataset.save_to_disk(tmp_path / "data")
    (tmp_path / "score.py").write_text(_DISTRIBUTED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(tmp_path / "score.py"), tiny_llama_dir, str(tmp_path / "data"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the workers, for bit-identical sums
    try:
        single = score_checkpoint(model, dataset, 2, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        assert np.load(tmp_path / f"rank{rank}.npy").tolist() == single.tolist()


def test_response_token_counts_skip_position_zero():
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6]], "labels": [[5, 6, -100], [-100, 6]]})
    assert response_token_counts(ds).tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------------
# The stage-1 driver on a tiny model and a tiny data file


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
    real, calls = scorers.score_checkpoint, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Crash("simulated crash while scoring")
        return real(*args, **kwargs)

    monkeypatch.setattr(scorers, "score_checkpoint", crash_on_second)
    with pytest.raises(_Crash):
        run_dynamics(*_args(tiny_llama_dir, data_file, tmp_path))
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["ckpt-2.json"]  # the finished one was kept
    monkeypatch.setattr(scorers, "score_checkpoint", real)
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


def test_bf16_scoring_is_close_to_fp32_and_auto_picks_it(tiny_llama_dir):
    from sftmix.cli.dynamics import _scoring_dtype

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    dataset = _token_dataset(fp32.config.vocab_size)
    exact = score_checkpoint(fp32, dataset, 4, show_progress=False)
    approx = score_checkpoint(bf16, dataset, 4, bf16=True, show_progress=False)
    np.testing.assert_allclose(approx, exact, rtol=0.05)
    assert not np.array_equal(approx, exact)  # really computed in bf16
    training = SFTMixConfig(output_dir="x", bf16=True, use_cpu=True)
    assert _scoring_dtype(training, None) == "bfloat16"
    training.scoring_dtype = "float32"
    assert _scoring_dtype(training, None) == "float32"
    assert _scoring_dtype(SFTMixConfig(output_dir="x", bf16=False), "float32") == "float32"
