"""sftmix.bema: TRL's BEMA weights through ``sftmix train --bema``, saved in every checkpoint and in final/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ASSETS, ntp_train_argv
from safetensors.torch import load_file

from sftmix.cli import main


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _train(tmp_path: Path, model: str, name: str, *extra: str) -> Path:
    out = tmp_path / name
    schedule = ("--learning_rate", "1e-2", "--num_train_epochs", "2", "--save_strategy", "epoch")
    assert main(ntp_train_argv(model, out, *schedule, "--bema", "true", *extra)) == 0
    return out


def test_bema_weights_are_saved_beside_each_checkpoint_and_the_final_model(tmp_path, tiny_llama_dir):
    out = _train(tmp_path, tiny_llama_dir, "every_step", "--bema_update_freq", "1")
    start, final, bema = (
        _weights(Path(tiny_llama_dir)),
        _weights(out / "final"),
        _weights(out / "final" / "bema"),
    )
    assert sorted(p.name for p in out.glob("checkpoint-*/bema")) == ["bema", "bema"]  # epochs 1 and 2
    assert (out / "final" / "bema" / "tokenizer_config.json").exists()  # `sftmix eval` loads it as it is
    name = "model.layers.0.mlp.down_proj.weight"
    # BEMA = EMA + alpha (theta_t - theta_0): neither the trained nor the starting weights
    assert not torch.equal(bema[name], final[name]) and not torch.equal(bema[name], start[name])
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    torch.testing.assert_close(_weights(last / "bema")[name], bema[name])  # the last save is the final one


def test_bema_with_trls_defaults_never_updates_in_a_short_run(tmp_path, tiny_llama_dir):
    """TRL's update_freq=400: a run of 6 steps leaves the BEMA weights at the starting model (documented)."""
    out = _train(tmp_path, tiny_llama_dir, "defaults")
    start, bema = _weights(Path(tiny_llama_dir)), _weights(out / "final" / "bema")
    for name, value in bema.items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_bema_update_freq_is_one_line(tmp_path, capsys, value):
    argv = ["train", "--dataset_name", str(ASSETS / "data" / "alpaca.json"), "--bema", "true"]
    assert main([*argv, "--bema_update_freq", value, "--output_dir", str(tmp_path / "o")]) == 2
    assert "bema_update_freq must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
