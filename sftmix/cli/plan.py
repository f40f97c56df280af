"""``--dry_run``: what ``sftmix run|train|dynamics`` would do, checked without loading weights or data.

`plan` validates the parsed config the way the commands do before they load anything (the config dataclasses'
own checks, Mixup's batch and loss requirements, local files that must exist), and returns the resolved settings
(every field that differs from its default), the stages the command would run, and each stage's cost in epochs of
NTP training of the same model, from the ratios measured in ``benchmarks/results/``.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

from ..data.selection import unconfident_fraction
from ..errors import SFTMixError
from ..sftmix_config import DataArguments, SFTMixConfig
from ..stage1.scorers import CHECKPOINTS, mixup_start_epoch, scorer_for, stage1_cost

MIXUP_STEP_OVER_NTP = 1.04
"""A Mixup step's time over an NTP step's on SmolLM2-135M (`benchmarks/results/cost_smollm2.json`)."""
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".yaml", ".gguf", ".safetensors")


def _changed(obj: Any) -> dict[str, Any]:
    """The fields of a config dataclass that differ from their defaults."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        value = getattr(obj, f.name)
        if value != default:
            out[f.name] = value.value if hasattr(value, "value") else value
    return out


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(LOCAL_SUFFIXES) or Path(name).exists()


def _check_local(name: str | None, what: str) -> None:
    """A local path (or glob of files, as ``dataset_name`` allows) must exist; Hub names are not looked up."""
    if name and _looks_local(name) and not Path(name).expanduser().exists() and not glob.glob(name):
        raise SFTMixError(f"{what} not found: {name}")


def plan(command: str, model_args: Any, data_args: DataArguments, args: SFTMixConfig) -> dict[str, Any]:
    """Check a parsed ``run``/``train``/``dynamics`` config without loading anything; return what it would do."""
    from ..sftmix_trainer import SFTMixTrainer  # the checks the trainer makes before loading

    if not data_args.dataset_name:
        raise SFTMixError("dataset_name is not set")
    _check_local(data_args.dataset_name, "dataset")
    _check_local(model_args.model_name_or_path, "model")
    _check_local(args.reference_model_name_or_path, "reference model")
    _check_local(args.dynamics_path, "dynamics file")
    for path in (args.score_checkpoints or "").split(","):
        _check_local(path.strip() or None, "checkpoint")
    mixup = args.mixup_weight > 0 and command != "dynamics"
    if mixup:
        SFTMixTrainer.check_mixup_args(args)
    drop = unconfident_fraction(data_args.selection) is not None and command != "dynamics"
    scorer = scorer_for(args)
    stages = []
    if command == "dynamics" or ((mixup or drop) and not args.dynamics_path):
        if command == "dynamics" or drop:
            scorer.check_runs_before_training(
                "set dynamics_path for selection drop_unconfident" if drop else "use train or run"
            )
        cost = stage1_cost(
            dataclasses.replace(args, mixup_weight=max(args.mixup_weight, 0.2), dynamics_path=None)
        )
        name = "score_checkpoints" if scorer is CHECKPOINTS else scorer.name
        inside = " (inside stage 3's first epochs)" if scorer.inside_training else ""
        stages.append(
            {
                "stage": f"1-2: {name} scorer{inside}",
                "writes": str(Path(args.output_dir) / ("dynamics" if command != "dynamics" else "")),
                "cost_ntp_epochs": round(cost, 2),
            }
        )
    if command != "dynamics":
        epochs = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
        factor = MIXUP_STEP_OVER_NTP if mixup else 1.0
        start = mixup_start_epoch(args) if mixup and not args.dynamics_path else 0
        if start:
            cost = start + (args.num_train_epochs - start) * factor
        else:
            cost = args.num_train_epochs * factor
        stages.append(
            {
                "stage": "3: "
                + (f"SFTMix (mixup_weight {args.mixup_weight:g})" if mixup else "NTP")
                + f", {epochs}",
                "writes": str(Path(args.output_dir) / "final"),
                "cost_ntp_epochs": round(cost, 2) if args.max_steps <= 0 else None,
            }
        )
    return {
        "command": command,
        "model": _changed(model_args),
        "data": _changed(data_args),
        "training": _changed(args),
        "stages": stages,
        "total_cost_ntp_epochs": round(sum(s["cost_ntp_epochs"] or 0 for s in stages), 2),
    }
