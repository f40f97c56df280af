"""``sftmix dynamics``: stages 1 and 2 as a program of their own, from a data file to ``dynamics.jsonl``.

`run_dynamics` loads and tokenizes the data with the reference model's tokenizer, then hands it to the scorer
(`sftmix.stage1.scorers`): ``reference`` (a plain-NTP run scored in-process at C steps), ``base`` (one no-grad
pass of the model) or ``random``, or the scoring of existing checkpoints (``score_checkpoints``); every
checkpoint's scores go to a file of their own as soon as they exist, and `sftmix.stage1.files.write_stage1` writes
``dynamics.jsonl``, ``dynamics_summary.json`` and the data map. (``warmup`` and ``online`` make the split while the
target trains: `sftmix.SFTMixTrainer` runs them.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..data.dataset import dataset_fingerprint, load_sft_dataset, tokenize_sft_dataset
from ..data.models import load_tokenizer, resolve_model
from ..data.selection import apply_selection
from ..distributed import check_process_group
from ..errors import SFTMixError
from ..sftmix_trainer import SFTMixTrainer
from ..stage1.scorers import StandaloneJob, run_standalone, scorer_for


def run_dynamics(
    model_args: Any, data_args: Any, training_args: Any, trainer_cls: type = SFTMixTrainer
) -> Path:
    """Stages 1 and 2 (``sftmix dynamics``): confidence of every training example and the median split.

    Args:
        model_args: `trl.ModelConfig`; ``model_name_or_path`` is the target (and, by default, the reference).
        data_args: `sftmix.sftmix_config.DataArguments` (dataset, format, ``max_examples``, ``selection``).
        training_args: `sftmix.SFTMixConfig`: ``output_dir``, ``max_length``, the reference run's settings and
            stage 1's (``confidence_scorer``: ``reference``, ``base`` or ``random`` here; ``num_checkpoints``,
            ``reference_model_name_or_path``, ``score_checkpoints``...).
        trainer_cls: The reference run's trainer class (default `SFTMixTrainer`, NTP only).

    Writes to ``output_dir``: ``scores/ckpt-*.json`` (one per checkpoint, written as each is scored),
    ``dynamics.jsonl``, ``dynamics_summary.json`` and ``datamap.png`` (`sftmix.stage1.files.write_stage1`), and the
    reference run's marker and logs in ``reference/``. Rerunning the same command after a crash reuses the
    checkpoints already scored and ends with the same bytes. Returns the ``dynamics.jsonl`` path.
    """
    _ = training_args.device  # sets up accelerate's state as the Trainer will (CPU / backend / process group)
    state = PartialState()
    check_process_group(state, training_args.world_size)  # before anything is written
    scorer_for(training_args, checkpoints=False).check_runs_before_training()
    reference = training_args.reference_model_name_or_path or model_args.model_name_or_path
    given = [Path(p.strip()) for p in (training_args.score_checkpoints or "").split(",") if p.strip()]
    if not given and not reference:
        raise SFTMixError("set model_name_or_path (or reference_model_name_or_path, or score_checkpoints)")
    for path in given:
        if not path.is_dir():
            raise SFTMixError(f"score_checkpoints: {path} is not a checkpoint directory")
    if given:  # the tokenizer must be the checkpoints' own: use theirs when they carry one
        has_tokenizer = (given[0] / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(given[0]) if has_tokenizer or not reference else reference)
    else:
        reference = resolve_model(reference)
        tokenizer = load_tokenizer(reference)

    loaded = load_sft_dataset(data_args)
    row_of = {row_id: i for i, row_id in enumerate(loaded["id"])}
    selected = apply_selection(loaded, data_args.selection, tokenizer=tokenizer)
    dataset = tokenize_sft_dataset(
        selected, tokenizer, training_args.max_length, getattr(training_args, "truncation_mode", "keep_start")
    )
    job = StandaloneJob(
        dataset=dataset,
        fingerprint=dataset_fingerprint(
            dataset
        ),  # hashed once: the reference run and the scores files use it
        reference=None if given else reference,
        tokenizer=tokenizer,
        model_args=model_args,
        training_args=training_args,
        make_trainer=trainer_cls,
        checkpoints=given,
    )
    return run_standalone(job, row_of)
