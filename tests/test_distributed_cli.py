"""The CLI on 2 CPU processes (torchrun and accelerate launch, gloo) trains one model, as one process would.

Each 2-process run (per-device batch B) is compared with a plain single-process `sftmix` run with batch 2B:
the same global batches, so the logged losses and the final weights must agree up to float summation order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_addition_data
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
DDP_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate" / "ddp.yaml"
LOGGED = ("loss", "grad_norm", "loss_ntp", "loss_mixup", "mixup_lambda", "mixed_tokens", "num_tokens")
# fp32 on 2 processes sums the gradients in another order than 1 process: ~1e-8 apart after a few steps
WEIGHT_ATOL = 1e-6
LOSS_RTOL = 1e-5
NEEDS_DEEPSPEED = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def _launcher(kind: str | Path, port: int) -> list[str]:
    if isinstance(kind, Path):  # an accelerate config file (FSDP2, DeepSpeed)
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(kind), "--main_process_port",
            str(port), "-m", "sftmix.cli",
        ]  # fmt: skip
    if kind == "one":
        return [sys.executable, "-m", "sftmix.cli"]
    if kind == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "sftmix.cli",
        ]  # fmt: skip
    # the shipped config (without it, `accelerate launch --num_processes 2` on a CPU-only machine starts ONE process)
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(port), "-m", "sftmix.cli",
    ]  # fmt: skip


def _sftmix(
    kind: str | Path, port: int, command: str, model: str, data: Path, out: Path, *extra: str
) -> Path:
    argv = [
        *_launcher(kind, port), command, "--model_name_or_path", model, "--dataset_name", str(data),
        "--output_dir", str(out), "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none",
        "--bf16", "false", "--max_length", "128", "--seed", "3", *extra,
    ]  # fmt: skip
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _logs(out: Path) -> list[dict]:
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [
        e for e in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]


def _assert_same_training(two: Path, one: Path, skip: tuple[str, ...] = ()) -> None:
    got, want = _logs(two), _logs(one)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        for key in (k for k in LOGGED if k not in skip):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (key, a, b)
    wa, wb = load_file(two / "final" / "model.safetensors"), load_file(one / "final" / "model.safetensors")
    # transformers' save under DeepSpeed ZeRO-1/2 writes a tied head again: the same tensor as the embeddings
    assert set(wa) - set(wb) <= {"lm_head.weight"} and set(wb) <= set(wa)
    if "lm_head.weight" not in wb and "lm_head.weight" in wa:
        torch.testing.assert_close(wa["lm_head.weight"], wa["model.embed_tokens.weight"], rtol=0, atol=0)
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    assert not list(two.glob("final.tmp*"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir) -> dict:
    root = tmp_path_factory.mktemp("dist_cli")
    data = write_addition_data(root / "data.jsonl", 32)
    dyn = _sftmix(
        "one", 0, "dynamics", tiny_llama_dir, data, root / "dyn_one",
        "--per_device_train_batch_size", "4", "--num_checkpoints", "2",
    )  # fmt: skip
    return {"root": root, "data": data, "model": tiny_llama_dir, "dynamics": dyn / "dynamics.jsonl"}


def _train(setup: dict, kind: str, port: int, name: str, batch: int, *extra: str) -> Path:
    return _sftmix(
        kind, port, "train", setup["model"], setup["data"], setup["root"] / name,
        "--per_device_train_batch_size", str(batch), "--max_steps", "3", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(("kind", "accumulation", "port"), [("torchrun", 1, 29541), ("accelerate", 2, 29542)])
def test_sftmix_on_two_processes_equals_one_process_with_the_same_global_batch(
    setup, kind, accumulation, port
):
    extra = ("--dynamics_path", str(setup["dynamics"]), "--gradient_accumulation_steps", str(accumulation))
    two = _train(setup, kind, port, f"two_{kind}_{accumulation}", 2, *extra)
    one = _train(setup, "one", 0, f"one_{accumulation}", 4, *extra)
    _assert_same_training(two, one)
    assert all(e["loss_mixup"] > 0 and e["mixed_tokens"] > 0 for e in _logs(two))


@pytest.mark.parametrize(("kind", "accumulation", "port"), [("accelerate", 1, 29543), ("torchrun", 2, 29544)])
def test_ntp_on_two_processes_equals_one_process(setup, kind, accumulation, port):
    # The run itself fails if the ranks end with different weights (check_replicas_agree)
    extra = ("--mixup_weight", "0", "--gradient_accumulation_steps", str(accumulation))
    two = _train(setup, kind, port, f"ntp_two_{kind}", 2, *extra)
    one = _train(setup, "one", 0, f"ntp_one_{accumulation}", 4, *extra)
    _assert_same_training(two, one)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_split(got: Path, want: Path, rel: float = 1e-5) -> None:
    """Two dynamics files name the same examples, in the same halves, with the same perplexities."""
    a, b = _rows(got), _rows(want)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["split"] for r in a] == [r["split"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["perplexities"] == pytest.approx(y["perplexities"], rel=rel)


def test_dynamics_on_two_processes_writes_the_same_file(setup):
    out = _sftmix(
        "torchrun", 29545, "dynamics", setup["model"], setup["data"], setup["root"] / "dyn_two",
        "--per_device_train_batch_size", "2", "--num_checkpoints", "2",
    )  # fmt: skip
    _assert_same_split(out / "dynamics.jsonl", setup["dynamics"])


def test_run_on_two_processes_ends_with_one_final_model(setup):
    out = _sftmix(
        "accelerate", 29546, "run", setup["model"], setup["data"], setup["root"] / "run_two",
        "--per_device_train_batch_size", "2", "--num_checkpoints", "2", "--num_train_epochs", "1",
    )  # fmt: skip
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "dynamics" / "dynamics.jsonl").is_file()
    assert sorted(p.name for p in out.glob("final*")) == ["final"]
    info = json.loads((out / "final" / "sftmix_train.json").read_text())
    steps = len(_rows(out / "dynamics" / "dynamics.jsonl")) // 4  # global batch 2 x 2, one epoch
    assert info["global_step"] == steps


@pytest.mark.parametrize(("scorer", "port"), [("online", 29547), ("warmup", 29548)])
def test_in_training_scorers_on_two_processes_equal_one_process(setup, scorer, port):
    """``warmup`` and ``online`` make the split inside the target's training: on 2 processes with batch 2 the split,
    the recorded perplexities, the losses and the weights equal one process with batch 4."""
    extra = (
        "--confidence_scorer",
        scorer,
        "--num_train_epochs",
        "2",
        "--num_checkpoints",
        "2",
        "--save_strategy",
        "epoch",
    )
    runs = {}
    for kind, batch in (("torchrun", 2), ("one", 4)):
        runs[kind] = _sftmix(
            kind, port, "train", setup["model"], setup["data"], setup["root"] / f"{scorer}_{kind}",
            "--per_device_train_batch_size", str(batch), *extra,
        )  # fmt: skip
    _assert_same_split(*(runs[k] / "dynamics" / "dynamics.jsonl" for k in ("torchrun", "one")))
    _assert_same_training(runs["torchrun"], runs["one"])
    assert any("loss_mixup" in e for e in _logs(runs["torchrun"]))


@pytest.mark.parametrize(("scorer", "port"), [("random", 29557), ("base", 29558)])
def test_scorers_before_training_inside_train_on_two_processes(setup, scorer, port):
    """``sftmix train`` without a dynamics file runs the ``random``/``base`` scorer first, on every process: the
    main process writes the files while the other waits (a fast scorer once let the other process find the
    finished files, skip the barrier and hang both), and the split equals one process's."""
    runs = {}
    for kind, batch in (("torchrun", 2), ("one", 4)):
        runs[kind] = _sftmix(
            kind, port, "train", setup["model"], setup["data"], setup["root"] / f"before_{scorer}_{kind}",
            "--per_device_train_batch_size", str(batch), "--confidence_scorer", scorer, "--max_steps", "3",
        )  # fmt: skip
    _assert_same_split(*(runs[k] / "dynamics" / "dynamics.jsonl" for k in ("torchrun", "one")))
    _assert_same_training(runs["torchrun"], runs["one"])


def _accelerate_config(root: Path, name: str) -> Path:
    """The shipped accelerate config ``examples/accelerate/<name>.yaml``, for 2 CPU processes (gloo) in fp32.

    ZeRO-3 gets the shipped settings as a DeepSpeed config file, plus ``stage3_param_persistence_threshold: 0``:
    DeepSpeed leaves parameters under 1e5 elements whole, which would be every parameter of the tiny models, so
    without it nothing (the head included) would be partitioned and the gathers would go untested.
    """
    import yaml

    config = yaml.safe_load((DDP_CONFIG.parent / f"{name}.yaml").read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    if name == "fsdp2":
        config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    if name == "deepspeed_zero3":
        shipped = config["deepspeed_config"]
        zero = {
            "stage": shipped["zero_stage"],
            "offload_optimizer": {"device": shipped["offload_optimizer_device"]},
            "offload_param": {"device": shipped["offload_param_device"]},
            "stage3_gather_16bit_weights_on_model_save": shipped["zero3_save_16bit_model"],
            "stage3_param_persistence_threshold": 0,
        }
        auto = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
        ds_file = root / f"{name}.json"
        ds_file.write_text(
            json.dumps(
                {"zero_optimization": zero, **dict.fromkeys(auto, "auto"), "gradient_clipping": "auto"}
            )
        )
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(ds_file),
            "zero3_init_flag": shipped["zero3_init_flag"],
        }
        del config["mixed_precision"]  # in the DeepSpeed file ("auto": the Trainer's bf16 flag)
    path = root / f"{name}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("name", "port"),
    [
        ("fsdp2", 29549),
        pytest.param("deepspeed_zero2", 29551, marks=NEEDS_DEEPSPEED),
        pytest.param("deepspeed_zero3", 29552, marks=NEEDS_DEEPSPEED),
    ],
)
def test_sharded_training_equals_one_process_and_resumes(setup, name, port):
    """FSDP2 (full shard, decoder layers wrapped, sharded checkpoints) and DeepSpeed ZeRO-2/3 on 2 CPU processes:
    the same losses and final weights as one process with the same global batch; a run resumed from the sharded
    checkpoint ends the same; the final model loads in plain transformers."""
    from transformers import AutoModelForCausalLM

    config = _accelerate_config(setup["root"], name)
    extra = ("--dynamics_path", str(setup["dynamics"]), "--save_strategy", "steps", "--save_steps", "2")

    def run(kind: str | Path, out: str, batch: int) -> Path:
        return _sftmix(
            kind, port, "train", setup["model"], setup["data"], setup["root"] / out,
            "--per_device_train_batch_size", str(batch), "--max_steps", "4", *extra,
        )  # fmt: skip

    two = run(config, name, 2)
    one = run("one", f"{name}_one", 4)
    _assert_same_training(two, one)
    resumed = setup["root"] / f"{name}_resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoint-4")
    run(config, resumed.name, 2)  # resumes from the sharded checkpoint-2
    _assert_same_training(resumed, one, skip=("num_tokens",))  # TRL counts tokens from 0 again after a resume
    model = AutoModelForCausalLM.from_pretrained(two / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize(
    ("name", "port"),
    [
        ("fsdp2", 29550),
        pytest.param("deepspeed_zero3", 29553, marks=NEEDS_DEEPSPEED),
    ],
)
def test_sharded_stage_1_gives_the_same_split(setup, tiny_qwen2_dir, name, port):
    """Every scorer that trains, sharded: the reference run (`sftmix dynamics`, scored in-process through the
    sharded model's own forward) and ``warmup`` / ``online`` (inside the target's training) give the split and
    perplexities of one process; the untied head of a Qwen2 model is sharded apart from the embeddings."""
    config = _accelerate_config(setup["root"], name)
    for command, scorer in (("dynamics", "reference"), ("train", "warmup"), ("train", "online")):
        extra = ("--confidence_scorer", scorer, "--num_checkpoints", "2", "--num_train_epochs", "2")
        if command == "train":
            extra += ("--save_strategy", "epoch")
        runs = {}
        for kind, batch in ((config, 2), ("one", 4)):
            runs[batch] = _sftmix(
                kind, port, command, tiny_qwen2_dir, setup["data"], setup["root"] / f"{name}_{scorer}_{batch}",
                "--per_device_train_batch_size", str(batch), *extra,
            )  # fmt: skip
        two, one = runs[2], runs[4]
        if command == "train":
            _assert_same_training(two, one)
            two, one = two / "dynamics", one / "dynamics"
        _assert_same_split(two / "dynamics.jsonl", one / "dynamics.jsonl", rel=1e-4)
