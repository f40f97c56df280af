"""sftmix.cli.commands: subcommands, --config + overrides onto the dataclasses, one-line errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import ASSETS, SHARED_DATA

from sftmix.cli.commands import COMMANDS, main, parse_config
from sftmix.errors import SFTMixError
from sftmix.sftmix_config import DEFAULT_MODEL

BAD = ASSETS / "bad"
DATA = ASSETS / "data"


def test_help_lists_all_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "sftmix.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("dynamics", "train", "run", "eval", "datamap", "demo"):
        assert f"    {command}" in out.stdout
    assert set(COMMANDS) == {"dynamics", "train", "run", "eval", "datamap", "demo"}


def test_subcommand_help_lists_trl_and_sftmix_fields(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--mixup_weight",
        "--mixup_alpha",
        "--dynamics_path",
        "--num_train_epochs",
        "--use_peft",
        "--dataset_name",
    ):
        assert flag in text


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "dataset_name: data.jsonl\nlearning_rate: 1.0e-5\nmixup_weight: 0.5\noutput_dir: out\n"
        "use_peft: true\nlora_r: 4\nnum_checkpoints: 5\nper_device_train_batch_size: 4\n"
    )
    data, model, train = parse_config(
        "run",
        ["--config", str(cfg), "--mixup_weight", "0.3", "--max_steps", "7", "--confidence_scorer", "online"],
    )
    assert data.dataset_name == "data.jsonl"
    assert train.learning_rate == 1e-5 and train.mixup_weight == 0.3 and train.max_steps == 7
    assert train.per_device_train_batch_size == 4 and train.output_dir == "out"
    assert model.use_peft is True and model.lora_r == 4
    assert train.num_checkpoints == 5 and train.confidence_scorer == "online"
    assert model.model_name_or_path == DEFAULT_MODEL  # the built-in default unless given


def test_eval_arguments():
    (args,) = parse_config(
        "eval", ["--task", "medmcqa", "--data_path", "x.json", "--limit", "5", "--output_dir", "o"]
    )
    assert (args.task, args.data_path, args.limit, args.output_dir) == ("medmcqa", "x.json", 5, "o")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_train_epoch", "3"], "unknown option 'num_train_epoch'; did you mean 'num_train_epochs'?"),
        (
            ["--config", str(BAD / "config_typo.yaml")],
            "config_typo.yaml: unknown option 'learning_rat'; did you mean 'learning_rate'?",
        ),
        (["--config", str(BAD / "config_not_mapping.yaml")], "must be a YAML mapping"),
        (["--config", str(BAD / "config_invalid.yaml")], "config_invalid.yaml: line 2: invalid YAML"),
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["--mixup_weight", "-1"], "mixup_weight must be >= 0"),
        (["--label_smoothing_factor", "1"], "label_smoothing_factor must be in [0, 1), got 1.0"),
        (["--dataset_format", "yaml"], "invalid choice: 'yaml'"),
        (["--learning_rate", "fast"], "invalid float value: 'fast'"),
    ],
)
def test_config_errors_are_one_line(argv, message):
    with pytest.raises(SFTMixError) as info:
        parse_config("train", argv)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["malformed.jsonl", "wrong_type.jsonl", "empty.jsonl", "not_utf8.jsonl"])
@pytest.mark.parametrize("command", ["dynamics", "train", "run"])
def test_bad_data_exits_2_and_writes_nothing(tmp_path, capsys, command, bad, tiny_llama_dir):
    out = tmp_path / "out"
    argv = [
        command,
        "--dataset_name",
        str(BAD / bad),
        "--model_name_or_path",
        tiny_llama_dir,
        "--output_dir",
        str(out),
    ]
    if command == "train":
        argv += ["--mixup_weight", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sftmix: error: ") and bad in err[0]
    assert not out.exists()


def test_missing_model_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "train",
        "--dataset_name",
        str(DATA / "alpaca.json"),
        "--model_name_or_path",
        str(tmp_path / "nope"),
    ]
    assert main(argv + ["--output_dir", str(out), "--mixup_weight", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model not found" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--dynamics_path", str(BAD / "dynamics_other_dataset.jsonl")], "dynamics_other_dataset.jsonl"),
        (["--dynamics_path", str(BAD / "dynamics_nan.jsonl")], "dynamics_nan.jsonl: line 3"),
        (["--dynamics_path", str(BAD / "dynamics_missing_ids.jsonl")], "dynamics_missing_ids.jsonl"),
        (["--dynamics_path", str(BAD / "dynamics_bad_split.jsonl")], "dynamics_bad_split.jsonl: line 2"),
        (["--dynamics_path", str(BAD / "nope.jsonl")], "nope.jsonl"),
        (
            ["--dynamics_path", str(DATA / "alpaca_dynamics.jsonl"), "--per_device_train_batch_size", "3"],
            "must be even",
        ),
        (["--confidence_scorer", "warmup", "--max_steps", "3"], "confidence_scorer='warmup' needs"),
        (["--confidence_scorer", "online", "--num_train_epochs", "1"], "confidence_scorer='online' needs"),
    ],
)
def test_bad_mixup_inputs_exit_2_and_write_nothing(tmp_path, capsys, tiny_llama_dir, overrides, message):
    out = tmp_path / "out"
    argv = ["train", "--dataset_name", str(DATA / "alpaca.json"), "--model_name_or_path", tiny_llama_dir]
    argv += ["--output_dir", str(out), "--use_cpu", "true", "--bf16", "false", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sftmix: error: ")]  # beside progress bars
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()


def test_datamap_command(tmp_path, capsys):
    out = tmp_path / "map.png"
    assert main(["datamap", str(DATA / "alpaca_dynamics.jsonl"), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["datamap", str(tmp_path / "none.jsonl"), "--output", str(out)]) == 2
    assert "dynamics file not found" in capsys.readouterr().err


CONFIGS = sorted(
    p for p in (Path(__file__).parents[1] / "examples").rglob("*.yaml") if p.parent.name != "accelerate"
)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name != "demo.yaml"], ids=lambda p: p.name)
def test_every_shipped_config_passes_dry_run(config, capsys, monkeypatch):
    """``--dry_run`` resolves and validates a config without loading weights or data (both would fail here)."""
    import datasets
    import transformers

    if "../shared" in config.read_text() and not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data beside the checkout")
    monkeypatch.chdir(Path(__file__).parents[1])
    for owner, name in ((transformers.AutoModelForCausalLM, "from_pretrained"), (transformers.AutoTokenizer,
                        "from_pretrained"), (datasets, "load_dataset")):  # fmt: skip
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail("loaded weights or data"))
    assert main(["run", "--config", str(config), "--dry_run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["stage"][:2] for s in plan["stages"]] == ["1-", "3:"]
    assert plan["total_cost_ntp_epochs"] > plan["stages"][1]["cost_ntp_epochs"] >= 3


def test_dry_run_reports_each_scorer_and_catches_bad_input(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    base = ["run", "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"), "--dry_run"]
    costs = {}
    for scorer in ("reference", "warmup", "online", "base", "random"):
        assert main([*base, "--confidence_scorer", scorer]) == 0
        plan = json.loads(capsys.readouterr().out)
        costs[scorer] = plan["stages"][0]["cost_ntp_epochs"]
        assert plan["training"]["confidence_scorer" if scorer != "reference" else "output_dir"]
    assert costs["reference"] > costs["warmup"] > costs["base"] > costs["online"] == costs["random"] == 0
    assert not (tmp_path / "o").exists()  # nothing written
    assert main(["run", "--dataset_name", str(tmp_path / "nope.jsonl"), "--dry_run"]) == 2
    assert "dataset not found" in capsys.readouterr().err
    assert main([*base, "--per_device_train_batch_size", "3"]) == 2
    assert "must be even" in capsys.readouterr().err
    assert main(["dynamics", "--dataset_name", str(data), "--confidence_scorer", "online", "--dry_run"]) == 2


def _train_json(out: Path) -> dict:
    return json.loads((out / "final" / "sftmix_train.json").read_text())


def test_drop_unconfident_trains_on_the_kept_examples(tmp_path, tiny_llama_dir):
    """`selection: drop_unconfident:F` through the CLI: with a dynamics file (NTP on the kept 4 of 6), and with
    stage 1 run first in the same command (the base scorer), then Mixup on the halves of what is kept."""
    common = ["--dataset_name", str(DATA / "alpaca.json"), "--model_name_or_path", tiny_llama_dir]
    common += [
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--per_device_train_batch_size",
        "2",
        "--num_train_epochs",
        "1",
    ]
    out = tmp_path / "given"
    argv = ["train", *common, "--mixup_weight", "0", "--dynamics_path", str(DATA / "alpaca_dynamics.jsonl")]
    assert main([*argv, "--selection", "drop_unconfident:0.34", "--output_dir", str(out)]) == 0
    assert _train_json(out)["global_step"] == 2  # 4 kept examples, 2 a step (6 would take 3)
    assert _train_json(out)["selection"] == "drop_unconfident:0.34"
    # Stage 1 here: dropping the unconfident half leaves the file's confident half alone, so Mixup works only
    # because the kept examples are split again at their own median.
    out = tmp_path / "staged"
    argv = ["train", *common, "--mixup_weight", "0.2", "--confidence_scorer", "base"]
    assert main([*argv, "--selection", "drop_unconfident:0.5", "--output_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "dynamics" / "dynamics.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # stage 1 scored every example
    assert _train_json(out)["global_step"] == 2 and _train_json(out)["dynamics_path"].endswith(
        "dynamics.jsonl"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--selection", "drop_unconfident:1.5"],
            "expected drop_unconfident:F with F a fraction between 0 and 1",
        ),
        (["--selection", "drop_unconfident:lots"], "expected drop_unconfident:F"),
        (
            [
                "--selection",
                "drop_unconfident:0.25",
                "--dynamics_path",
                str(BAD / "dynamics_other_dataset.jsonl"),
            ],
            "dynamics_other_dataset.jsonl is for another dataset",
        ),
        (
            [
                "--selection",
                "drop_unconfident:0.25",
                "--confidence_scorer",
                "online",
                "--num_train_epochs",
                "2",
            ],
            "drop_unconfident needs the confidences before training",
        ),
    ],
)
def test_bad_drop_unconfident_is_one_line_and_writes_nothing(
    tmp_path, capsys, tiny_llama_dir, overrides, message
):
    out = tmp_path / "out"
    argv = ["train", "--dataset_name", str(DATA / "alpaca.json"), "--model_name_or_path", tiny_llama_dir]
    argv += [
        "--output_dir",
        str(out),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--mixup_weight",
        "0",
        *overrides,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sftmix: error: ")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert not out.exists()


def test_dry_run_of_drop_unconfident_plans_stage1_even_without_mixup(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    argv = ["train", "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"), "--mixup_weight", "0"]
    assert main([*argv, "--selection", "drop_unconfident:0.25", "--dry_run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in plan["stages"]][0].startswith("1-2: reference") and plan["stages"][1][
        "stage"
    ].startswith("3: NTP")
    assert main([*argv, "--dry_run"]) == 0
    assert len(json.loads(capsys.readouterr().out)["stages"]) == 1
    assert main([*argv, "--selection", "drop_unconfident:2", "--dry_run"]) == 2
    assert "drop_unconfident:F" in capsys.readouterr().err


def test_a_launcher_precision_that_contradicts_the_run_is_one_line(
    tmp_path, capsys, monkeypatch, tiny_llama_dir
):
    """`accelerate launch` with mixed_precision: bf16 exports ACCELERATE_MIXED_PRECISION=bf16, which transformers
    lets win over --bf16 false in silence; sftmix stops instead, and follows the launcher when the run says nothing."""
    from sftmix.sftmix_config import SFTMixConfig

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "out"
    argv = ["train", "--dataset_name", str(DATA / "alpaca.json"), "--model_name_or_path", tiny_llama_dir]
    assert main([*argv, "--bf16", "false", "--mixup_weight", "0", "--output_dir", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sftmix: error: ")]
    assert (
        len(errors) == 1
        and "the launcher says mixed_precision=bf16" in errors[0]
        and "bf16=False" in errors[0]
    )
    assert not out.exists()
    assert SFTMixConfig(output_dir=str(out)).bf16 is True  # unset: the launcher decides
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert SFTMixConfig(output_dir=str(out), bf16=False).mixed_precision == "no"


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch):
    import sftmix.sftmix_config as config

    monkeypatch.setattr(config, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(config, "_warned_emulated_bf16", False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.warns(UserWarning, match="emulates it, measured about 20x slower than fp32"):
        config.SFTMixConfig(output_dir="unused", bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        config.SFTMixConfig(output_dir="unused", bf16=True)  # once per process
        assert config.SFTMixConfig(output_dir="unused").bf16 is False  # unset: sftmix picks fp32 there
