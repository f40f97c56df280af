"""sftmix.stage1.scoring: no-grad response perplexity against full logits, in any batch order and process count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sftmix.sftmix_config import SFTMixConfig
from sftmix.stage1.scorers import scoring_dtype as _scoring_dtype
from sftmix.stage1.scoring import length_grouped_batches, response_token_counts, score_checkpoint


def test_length_grouped_batches_cover_everything_once():
    lengths = [5, 1, 9, 9, 3, 7, 2]
    batches = length_grouped_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


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
from sftmix.sftmix_config import SFTMixConfig
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


def test_bf16_scoring_is_close_to_fp32_and_auto_picks_it(tiny_llama_dir):

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
