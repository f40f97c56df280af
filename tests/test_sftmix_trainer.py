"""sftmix.sftmix_trainer: SFTMixTrainer against trl.SFTTrainer, Mixup runs, and the train() entry point."""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from sftmix_train_script import make_dataset, write_dynamics
from transformers import AutoModelForCausalLM
from transformers.trainer_pt_utils import LabelSmoother
from trl import SFTConfig, SFTTrainer

from sftmix import SFTMixConfig, SFTMixTrainer
from sftmix.errors import SFTMixError
from sftmix.mixup.loss import mix_hidden_states, mixup_loss

COMMON = dict(
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    seed=0,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=3,
    use_cpu=True,
    bf16=False,
)


@pytest.fixture
def dataset():
    return make_dataset(num_examples=12)


@pytest.fixture
def dynamics(tmp_path, dataset):
    return str(write_dynamics(tmp_path / "dynamics.jsonl", dataset))


def mixup_args(tmp_path, dynamics, **overrides) -> SFTMixConfig:
    return SFTMixConfig(output_dir=str(tmp_path / "out"), dynamics_path=dynamics, **{**COMMON, **overrides})


def losses(trainer, key="loss"):
    return [
        entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry
    ]


class RecordingTrainer(SFTMixTrainer):
    """Records every training micro-batch's ids and roles."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.model.training:
            self.seen = getattr(self, "seen", [])
            roles = inputs.get("mixup_role")
            self.seen.append((list(inputs["example_ids"]), None if roles is None else roles.tolist()))
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.parametrize(
    "loss_type", ["nll", "dft"]
)  # dft: TRL's own loss (Wu et al. 2025), a rival regulariser
def test_mixup_weight_zero_trains_exactly_like_trl(tmp_path, tiny_llama_dir, tokenizer, dataset, loss_type):
    trl_trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=SFTConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, **COMMON),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trl_trainer.train()
    ours = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=SFTMixConfig(output_dir=str(tmp_path / "ours"), mixup_weight=0.0, loss_type=loss_type, **COMMON),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    ours.train()
    assert ours._own_head == (loss_type == "nll")  # DFT runs in TRL's compute_loss
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm"):
        assert losses(ours, key) == pytest.approx(losses(trl_trainer, key), rel=1e-6), key
    assert len(losses(ours)) == 3
    for (name, a), b in zip(ours.model.named_parameters(), trl_trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_label_smoothing_runs_in_the_fused_head_like_trl(tmp_path, tiny_llama_dir, tokenizer, dataset):
    common = {**COMMON, "label_smoothing_factor": 0.1}
    trl_trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=SFTConfig(output_dir=str(tmp_path / "trl"), **common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trl_trainer.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=SFTMixConfig(output_dir=str(tmp_path / "ours"), mixup_weight=0.0, **common),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        assert ours._own_head  # TRL's path would build the full logits and run a second forward
        trl_warning = (
            "`label_smoothing_factor` is deprecated in `SFTTrainer`"  # "... needs the full logits ..."
        )
        assert not [w for w in caught if trl_warning in str(w.message)]
        trl_path = SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=SFTMixConfig(
                output_dir=str(tmp_path / "t"), mixup_weight=0.0, ntp_fused_head=False, **common
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        assert not trl_path._own_head
        assert [w for w in caught if trl_warning in str(w.message)]  # TRL's path: its warning stands
    ours.train()
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm"):
        assert losses(ours, key) == pytest.approx(losses(trl_trainer, key), rel=1e-5), key
    for (name, a), b in zip(ours.model.named_parameters(), trl_trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_mixup_run_updates_every_parameter_and_logs(tmp_path, tiny_qwen2_dir, tokenizer, dataset, dynamics):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)  # untied head with attention biases
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RecordingTrainer(
        model=model, args=mixup_args(tmp_path, dynamics), train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    log = [e for e in trainer.state.log_history if "loss_mixup" in e]
    assert len(log) == 3
    for entry in log:
        assert entry["loss_mixup"] > 0 and entry["loss_ntp"] > 0 and entry["mixed_tokens"] > 0
        assert 0 <= entry["mixup_lambda"] <= 1
        assert "entropy" in entry and "mean_token_accuracy" in entry and "num_tokens" in entry

    # every micro-batch is balanced, and the roles come from the split, not from positions
    split = {json.loads(line)["id"]: json.loads(line)["split"] for line in open(dynamics)}
    assert len(trainer.seen) == 6
    for ids, roles in trainer.seen:
        assert sorted(roles) == [0, 1]
        assert [split[i] == "confident" for i in ids] == [r == 1 for r in roles]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_loss_of_a_step_matches_the_reference(
    tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics, eps
):
    """The fused in-forward loss equals NTP + mu * mixup_loss(...) computed from the model's hidden states; with
    label smoothing, every target (the mixed ones too) is smoothed as transformers' LabelSmoother smooths."""
    trainer = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=mixup_args(
            tmp_path, dynamics, gradient_accumulation_steps=1, mixup_weight=0.7, label_smoothing_factor=eps
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    lambdas = trainer._draw_lambdas(1, 0)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=None)

    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    hidden = hidden[:, :-1]
    ntp = LabelSmoother(epsilon=eps)({"logits": model.lm_head(hidden)}, labels)
    c, u = batch["mixup_role"].tolist().index(1), batch["mixup_role"].tolist().index(0)
    mix = mixup_loss(hidden[[c]], labels[[c]], hidden[[u]], labels[[u]], lambdas, model.lm_head)
    mixed = mix_hidden_states(hidden[[c]], labels[[c]], hidden[[u]], labels[[u]], lambdas).hidden
    smooth = -torch.log_softmax(model.lm_head(mixed), dim=-1).mean()  # mean_v(-log p_v) of the mixed tokens
    want = ntp + 0.7 * ((1 - eps) * mix + eps * smooth)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def per_pair_lambda(example_id: str) -> float:
    return (zlib.crc32(example_id.encode()) % 1000) / 1000


class FixedLambdaTrainer(SFTMixTrainer):
    """Lambdas tied to the pair (its confident example), whatever the batching."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self._batch = (list(inputs["example_ids"]), inputs["mixup_role"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _draw_lambdas(self, num_pairs, micro_step):
        ids, roles = self._batch
        return torch.tensor([per_pair_lambda(i) for i, r in zip(ids, roles, strict=True) if r == 1])


def test_gradient_accumulation_2x2_equals_one_batch_of_4(tmp_path, tiny_llama_dir, tokenizer, dynamics):
    dataset = make_dataset(num_examples=8)  # 4 + 4: the same pairs for batch sizes 2 and 4
    write_dynamics(tmp_path / "dynamics.jsonl", dataset)
    updates = []
    for bs, ga in ((4, 1), (2, 2)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        before = [p.detach().clone() for p in model.parameters()]
        args = mixup_args(
            tmp_path / f"{bs}x{ga}", dynamics, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
            max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0,
            lr_scheduler_type="constant", mixup_weight=0.5,
        )  # fmt: skip
        trainer = FixedLambdaTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        updates.append([p.detach() - b for p, b in zip(trainer.model.parameters(), before, strict=True)])
        assert losses(trainer, "loss_mixup")[0] > 0
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_run(tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics):
    from peft import LoraConfig

    trainer = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=mixup_args(tmp_path, dynamics, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if name in lora_b:
            assert not torch.equal(lora_b[name], p.detach()), name
    assert all(v > 0 for v in losses(trainer, "loss_mixup"))


def test_bf16_with_gradient_checkpointing(tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTMixTrainer(
        model=model,
        args=mixup_args(tmp_path, dynamics, max_steps=2, bf16=True, gradient_checkpointing=True),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert all(
        torch.isfinite(torch.tensor(losses(trainer, k))).all() for k in ("loss", "loss_ntp", "loss_mixup")
    )
    assert all(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_device_train_batch_size": 3}, "per_device_train_batch_size must be even"),
        ({"packing": True, "max_length": 64}, "packing"),
        ({"dynamics_path": "/nonexistent/dynamics.jsonl"}, "dynamics file not found"),
        ({"loss_type": "dft"}, "loss_type='nll'"),
    ],
)
def test_configuration_errors(tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics, overrides, message):
    with pytest.raises(SFTMixError, match=message):
        SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=mixup_args(tmp_path, overrides.pop("dynamics_path", dynamics), **overrides),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_dataset_from_another_run_is_rejected(tmp_path, tiny_llama_dir, tokenizer, dynamics):
    other = make_dataset(num_examples=12).map(lambda e: {"id": "x" + e["id"]})
    with pytest.raises(SFTMixError, match="another dataset"):
        SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=mixup_args(tmp_path, dynamics),
            train_dataset=other,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("mixup_weight", [0.0, 0.2])
def test_nonfinite_loss_stops_with_step_and_ids(
    tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics, mixup_weight
):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    args = mixup_args(tmp_path, dynamics, mixup_weight=mixup_weight)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(SFTMixError, match="non-finite loss at step 1") as info:
        trainer.train()
    first_ids = trainer.seen[0][0]
    assert all(i in str(info.value) for i in first_ids)
    note = json.loads((tmp_path / "out" / "nonfinite_loss.json").read_text())
    assert note["step"] == 1 and note["example_ids"] == first_ids
    assert (tmp_path / "out" / "nonfinite-step-1" / "config.json").is_file()


def test_lambdas_are_reproducible_per_step_and_micro_step(
    tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics
):
    trainer = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=mixup_args(tmp_path, dynamics, per_device_train_batch_size=8),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    a = trainer._draw_lambdas(4, 1)
    assert torch.equal(a, trainer._draw_lambdas(4, 1))
    assert not torch.equal(a, trainer._draw_lambdas(4, 0))
    trainer.state.global_step = 5
    assert not torch.equal(a, trainer._draw_lambdas(4, 1))


def test_train_entry_point_resumes_to_the_same_result(tmp_path, tiny_llama_dir, monkeypatch):
    """train() from files: an interrupted run resumed by re-running ends where an uninterrupted run ends."""
    from safetensors.torch import load_file
    from trl import ModelConfig

    import sftmix.stage1.splits
    from sftmix.cli.pipeline import train
    from sftmix.sftmix_config import DataArguments

    rows = [
        {"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 3)},
                      {"role": "assistant", "content": f"answer number {i}" + "!" * (i % 4)}]}
        for i in range(8)
    ]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from sftmix.data.dataset import load_sft_dataset

    dynamics = write_dynamics(
        tmp_path / "dynamics.jsonl", load_sft_dataset(DataArguments(dataset_name=str(data)))
    )

    def run(out, max_steps):
        args = SFTMixConfig(
            output_dir=str(out), dynamics_path=str(dynamics), max_length=64, save_steps=2,
            **{**COMMON, "max_steps": max_steps, "gradient_accumulation_steps": 1, "lr_scheduler_type": "constant"},
        )  # fmt: skip
        return train(
            ModelConfig(model_name_or_path=tiny_llama_dir), DataArguments(dataset_name=str(data)), args
        )

    reads = []
    real_iter_jsonl = sftmix.stage1.splits.iter_jsonl
    monkeypatch.setattr(
        sftmix.stage1.splits, "iter_jsonl", lambda path, *a: reads.append(path) or real_iter_jsonl(path, *a)
    )
    straight = run(tmp_path / "straight", 4)
    assert reads == [dynamics]  # parsed once: train() hands it to the trainer and its sampler
    # interrupted after step 2 (its checkpoint-2 stays), then the same command again
    crashed = tmp_path / "crashed"
    import shutil

    shutil.rmtree(run(crashed, 2))  # as if the process had died before finishing
    resumed = run(crashed, 4)
    assert resumed == str(crashed / "final")
    a, b = load_file(f"{straight}/model.safetensors"), load_file(f"{resumed}/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert run(crashed, 4) == resumed  # finished: returns at once
    card = (Path(resumed) / "README.md").read_text()  # final/ carries the model card
    assert "SFTMix" in card and "2410.05248" in card and "`mixup_weight` (mu) 0.2" in card


def test_the_model_card_names_sftmix_the_paper_the_base_model_and_the_split(
    tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics
):
    (Path(dynamics).parent / "datamap.png").write_bytes(b"png")
    (Path(dynamics).parent / "dynamics_summary.json").write_text(json.dumps({"scorer": "reference"}))
    trainer = SFTMixTrainer(
        model=tiny_llama_dir,
        args=mixup_args(tmp_path, dynamics),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    # the built-in default as loaded: its converted copy in the cache, named after the GGUF file
    trainer.model.config._name_or_path = "/cache/models/SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    final = tmp_path / "final"
    final.mkdir()
    trainer.save_model_card(final)
    card = (final / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "[None]" not in card
    assert "trained with SFTMix, a method introduced in [SFTMix: Elevating" in card
    assert "@inproceedings{xiao2026sftmix" in card
    assert "`mixup_weight` (mu) 0.2" in card and "`mixup_alpha` 0.5" in card
    assert "made by stage 1's `reference` scorer" in card and "6 confident and 6 unconfident examples" in card
    assert "![SFTMix data map](datamap.png)" in card and (final / "datamap.png").read_bytes() == b"png"
    assert card.index("## SFTMix") < card.index("## Citations")
    outside = (tmp_path / "out" / "README.md").read_text()  # output_dir's card links the data map where it is
    assert "![SFTMix data map](../datamap.png)" in outside


def test_same_seed_same_loss_curve(tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics):
    curves = []
    for run in ("a", "b"):
        trainer = SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=mixup_args(tmp_path / run, dynamics),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        curves.append(
            [
                (e["loss"], e["loss_mixup"], e["mixup_lambda"])
                for e in trainer.state.log_history
                if "loss_mixup" in e
            ]
        )
    assert len(curves[0]) == 3 and curves[0] == curves[1]


def test_trl_compute_loss_on_request_and_no_args(tmp_path, tiny_llama_dir, tokenizer, dataset, monkeypatch):
    trl_trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=SFTConfig(output_dir=str(tmp_path / "trl"), **COMMON),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trl_trainer.train()
    ours = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=SFTMixConfig(
            output_dir=str(tmp_path / "ours"), mixup_weight=0.0, ntp_fused_head=False, **COMMON
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    ours.train()
    assert losses(ours) == losses(trl_trainer)  # TRL's own compute_loss: identical to the bit
    monkeypatch.chdir(
        tmp_path
    )  # without args the output dir is "<model name>-SFTMix" in the working directory
    bare = SFTMixTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir), train_dataset=dataset)
    assert bare.args.mixup_weight == 0.0  # like trl.SFTTrainer without args: plain NTP


@pytest.mark.parametrize("form", ["messages", "prompt_completion", "conversational_prompt_completion"])
def test_drop_in_on_a_plain_trl_dataset_without_ids(tmp_path, tiny_llama_dir, tokenizer, form):
    """A TRL dataset as users have it (no id column): ids come from the content, as the CLI computes them."""
    from datasets import Dataset

    from sftmix.data.dataset import load_sft_dataset
    from sftmix.sftmix_config import DataArguments

    pairs = [(f"question {i} " * (1 + i % 3), f"answer number {i}" + "!" * (i % 4)) for i in range(8)]
    if form == "messages":
        rows = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs
        ]
    elif form == "prompt_completion":
        rows = [{"prompt": q, "completion": a} for q, a in pairs]
    else:
        rows = [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs
        ]
    # the CLI's ids for the same data in a file: its dynamics file must fit the Python dataset
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli_ids = load_sft_dataset(DataArguments(dataset_name=str(data_file)))["id"]
    dynamics = write_dynamics(tmp_path / "dynamics.jsonl", Dataset.from_dict({"id": cli_ids}))
    trainer = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=SFTMixConfig(
            output_dir=str(tmp_path / "out"),
            dynamics_path=str(dynamics),
            max_length=64,
            **{**COMMON, "max_steps": 2},
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    assert sorted(trainer.train_dataset["id"]) == sorted(cli_ids)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss_mixup" in e]
    assert len(logs) == 2 and all(e["loss_mixup"] > 0 and e["mixed_tokens"] > 0 for e in logs)


def test_neftune_with_mixup(tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics):
    """TRL's NEFTune (noise on the input embeddings) combines with Mixup: the noise changes the losses."""
    runs = {}
    for alpha in (None, 5.0):
        trainer = SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=mixup_args(tmp_path / str(alpha), dynamics, neftune_noise_alpha=alpha),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        runs[alpha] = losses(trainer, "loss_mixup")
    assert len(runs[5.0]) == 3 and all(x > 0 for x in runs[5.0])
    assert runs[5.0] != runs[None]


def test_torch_compile_with_mixup(tmp_path, tiny_llama_dir, tokenizer, dataset, dynamics):
    """``torch_compile``: dynamo traces the model with the fused Mixup head inside its forward, and the losses are
    those of the eager run. AOTAutograd's ``aot_eager`` backend traces forward and backward as inductor does, without
    the C++ code generation that makes inductor slow to start (docs/results.md: inductor's step time on SmolLM2)."""
    import torch._dynamo

    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        options = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        trainer = SFTMixTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            args=mixup_args(tmp_path / str(compiled), dynamics, **options),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        runs[compiled] = losses(trainer), losses(trainer, "loss_mixup")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled
    assert runs[True][1] and all(x > 0 for x in runs[True][1])
    for got, want in zip(runs[True], runs[False], strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_liger_kernels_are_refused_without_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="use_liger_kernel needs a GPU"):
        SFTMixConfig(output_dir=str(tmp_path), use_liger_kernel=True)


def test_lora_with_a_trained_lm_head(tmp_path, tiny_qwen2_dir, tokenizer, dataset, dynamics):
    """LoRA plus a fully trained output head (``modules_to_save``): the Mixup gradient reaches the head's copy."""
    from peft import LoraConfig

    trainer = SFTMixTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir),
        args=mixup_args(tmp_path, dynamics),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
        ),
    )
    heads = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if "lm_head" in n and p.requires_grad
    }
    assert heads
    trainer.train()
    trained = dict(trainer.model.named_parameters())
    assert all(not torch.equal(heads[n], trained[n].detach()) for n in heads)
    assert all(e > 0 for e in losses(trainer, "loss_mixup"))


def test_moe_router_aux_loss_is_refused_with_mixup(tmp_path, tokenizer, dataset, dynamics):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, output_router_logits=True, pad_token_id=1,
    )  # fmt: skip
    with pytest.raises(SFTMixError, match="auxiliary loss"):
        SFTMixTrainer(
            model=MixtralForCausalLM(config), args=mixup_args(tmp_path, dynamics), train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip
