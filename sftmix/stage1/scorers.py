"""Stage 1 inside a training run: what `sftmix.SFTMixTrainer` does when Mixup is on and no ``dynamics_path`` is given.

`prepare_stage1` runs first, from ``SFTMixTrainer.train()``. It reuses a finished stage 1 of the same scorer and
data in ``output_dir/dynamics/``; otherwise ``reference``, ``base`` and ``random`` make the split there and then
(`sftmix.stage1.reference.train_reference`, one no-grad pass, a seeded draw), and ``warmup`` and ``online`` arm the
callbacks that make it while the target trains (`sftmix.stage1.files.ScoreAtStepsCallback` over the first
``reference_epochs``, `sftmix.stage1.online.DynamicsCallback` over epoch 1). Either way the trainer's ``set_split`` gets
the path of the written ``dynamics.jsonl``; until then the target trains with plain NTP.
"""

from __future__ import annotations

import copy
import gc
import logging
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from ..data.dataset import dataset_fingerprint
from ..data.models import load_model, load_tokenizer
from ..errors import SFTMixError
from .files import (
    ScoreAtStepsCallback,
    existing_stage1,
    random_confidence,
    unwrap_for_scoring,
    with_training_labels,
    write_stage1,
)
from .online import DynamicsCallback
from .reference import checkpoint_steps, stage1_args, train_reference
from .scoring import response_token_counts, score_checkpoint

logger = logging.getLogger(__name__)

DYNAMICS_DIR = "dynamics"


def _reference_model(trainer: Any, copy_target: bool) -> tuple[Any, str]:
    """The model stage 1 trains or scores: ``reference_model_name_or_path`` (same tokenizer), else the target as it
    starts: a copy when it is to be trained (``copy_target``), so that the target's own weights are not touched."""
    args = trainer.args
    name = args.reference_model_name_or_path
    if name:
        theirs, ours = load_tokenizer(name), trainer.processing_class
        if getattr(ours, "get_vocab", None) and theirs.get_vocab() != ours.get_vocab():
            raise SFTMixError(
                f"reference_model_name_or_path {name} has another tokenizer than the target: run `sftmix run` or "
                "`sftmix dynamics` (they tokenize the data for the reference model) and pass its dynamics_path"
            )
        return load_model(name, dtype="float32"), name
    target = str(getattr(trainer.model.config, "_name_or_path", ""))
    return (copy.deepcopy(trainer.model) if copy_target else trainer.model), target


def prepare_stage1(trainer: Any) -> None:
    """Make, reuse or arm stage 1 for ``trainer`` (an `SFTMixTrainer` whose split is not known yet)."""
    args = trainer.args
    out = Path(args.output_dir) / DYNAMICS_DIR
    scorer = args.confidence_scorer
    view = with_training_labels(trainer.train_dataset, trainer.data_collator.collator)
    ids = [str(i) for i in trainer.train_dataset["id"]]
    view = view.add_column("id", ids)
    fingerprint = dataset_fingerprint(view)
    found = existing_stage1(out, scorer, fingerprint)
    if found is not None:
        logger.info("Stage 1 (%s) is done: using %s", scorer, found)
        trainer.set_split(found)
        return
    tokens = response_token_counts(view)
    common = dict(fingerprint=fingerprint, scorer=scorer)
    logger.info("Stage 1: the %s scorer writes %s", scorer, out)
    if scorer == "random":
        confidence = random_confidence(ids, args.seed)
        path = write_stage1(out, ids, np.zeros((len(ids), 0)), tokens, checkpoints=[], model_name=None,
                            confidence=confidence, **common)  # fmt: skip
        trainer.set_split(path)
    elif scorer == "base":
        model, name = _reference_model(trainer, copy_target=False)
        model = unwrap_for_scoring(model).to(trainer.accelerator.device)
        perplexities = score_checkpoint(
            model, view, args.scoring_batch_size, chunk_size=args.head_chunk_size, bf16=bool(args.bf16),
            desc="Scoring the base model",
        )  # fmt: skip
        del model
        gc.collect()
        trainer.set_split(
            write_stage1(
                out, ids, perplexities[:, None], tokens, checkpoints=[name], model_name=name, **common
            )
        )
    elif scorer == "reference":
        model, name = _reference_model(trainer, copy_target=True)
        reference_args = stage1_args(args)
        perplexities, steps = train_reference(
            model, trainer.train_dataset, view, trainer.processing_class, reference_args, out / "reference",
            type(trainer), fingerprint, name,
        )  # fmt: skip
        gc.collect()
        checkpoints = [f"reference/checkpoint-{s}" for s in steps]
        trainer.set_split(
            write_stage1(out, ids, perplexities, tokens, checkpoints=checkpoints, model_name=name, **common)
        )
    elif scorer == "warmup":
        epochs = int(args.reference_epochs)  # the trainer checked there are epochs left for Mixup
        name = str(getattr(trainer.model.config, "_name_or_path", ""))

        def done(perplexities: np.ndarray, steps: list[int]) -> None:
            checkpoints = [f"checkpoint-{s}" for s in steps]
            trainer.set_split(
                write_stage1(
                    out, ids, perplexities, tokens, checkpoints=checkpoints, model_name=name, **common
                )
            )

        trainer.add_callback(
            ScoreAtStepsCallback(
                lambda horizon: checkpoint_steps(horizon, args.num_checkpoints),
                lambda state: round(epochs * state.max_steps / state.num_train_epochs),
                view,
                ids,
                out / "scores",
                fingerprint,
                args.scoring_batch_size,
                args.head_chunk_size,
                bool(args.bf16),
                on_done=done,
            )  # fmt: skip
        )
    elif scorer == "online":
        recorder = DynamicsCallback(
            out, correction=args.online_correction, window=args.online_window, epochs=1,
            on_written=trainer.set_split, hook=False,
            model_name=str(getattr(trainer.model.config, "_name_or_path", "")), fingerprint=fingerprint, order=ids,
            scorer="online",
        )  # fmt: skip
        trainer.add_callback(recorder)
        trainer.nll_recorder = recorder
    else:
        raise SFTMixError(f"unknown confidence_scorer {scorer!r}")


class MixupSwitch(TrainerCallback):
    """Turns Mixup on at the start of the epoch from which stage 1's split applies (``warmup``, ``online``)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        t = self.trainer
        if (
            not t._mixup_on
            and t._confident is not None
            and int(state.epoch + 1e-6) >= t.args.mixup_start_epoch
        ):
            t._start_mixup()
