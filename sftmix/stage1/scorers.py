"""Stage 1's scorers: the one place that knows, for each way of making the split, what it does.

`SFTMixConfig.confidence_scorer` names one when no ``dynamics_path`` is given (`SCORERS`; `scorer_for` adds
``checkpoints`` when ``score_checkpoints`` names saved checkpoints to score):

- ``reference`` (the paper): a separate plain-NTP reference run, scored in-process at C steps
  (`sftmix.stage1.reference.train_reference`).
- ``warmup``: the target's own first ``reference_epochs`` of plain NTP are the reference run (the same
  `ScoreAtStepsCallback`, on the target's trainer); Mixup from then on.
- ``online``: no extra pass: `sftmix.stage1.online.DynamicsCallback` records each example's response NLL from the
  training forwards of epoch 1, corrected for training progress; Mixup from epoch 2.
- ``base``: the response perplexity of the starting model, one no-grad pass.
- ``random``: a seeded random half (`random_confidence`), the ablation.

Each `Scorer` says when Mixup starts (`Scorer.mixup_start_epoch`), what it costs (`Scorer.cost`, for
``--dry_run``), how it runs inside a training run (`Scorer.in_training`, from `prepare_stage1`, which
``SFTMixTrainer.train()`` calls) and as ``sftmix dynamics`` (`Scorer.standalone`). All write the same
``dynamics/`` directory (`sftmix.stage1.files.write_stage1`).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from accelerate import PartialState
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, TrainerCallback
from trl import get_peft_config

from ..data.dataset import dataset_fingerprint
from ..data.models import load_model, load_tokenizer
from ..errors import SFTMixError
from .files import SCORES_DIR, existing_stage1, read_scores, write_scores, write_stage1
from .online import DynamicsCallback
from .reference import ScoreAtStepsCallback, StepScoring, stage1_args, train_reference
from .scoring import ScoringSettings, response_token_counts, unwrap_for_scoring, with_training_labels

logger = logging.getLogger(__name__)

DYNAMICS_DIR = "dynamics"
SCORING_PASS_EPOCHS = 0.2
"""One no-grad scoring pass over the data, in NTP epochs (bf16, response-only head; `benchmarks/bench_scorers.py`)."""


class Stage1Host(Protocol):
    """What stage 1 needs from the trainer it runs in: `sftmix.SFTMixTrainer`'s public side."""

    args: Any
    model: Any
    train_dataset: Dataset
    processing_class: Any
    data_collator: Any
    accelerator: Any

    def set_split(self, dynamics_path: str | Path) -> None: ...

    def add_callback(self, callback: TrainerCallback) -> None: ...

    def record_online(self, recorder: DynamicsCallback) -> None: ...

    def reference_trainer(self, **kwargs: Any) -> Any: ...


@dataclass
class Stage1Data:
    """The examples stage 1 scores inside a training run, and where its files go."""

    out: Path
    ids: list[str]
    view: Dataset
    """``input_ids``, unshifted ``labels`` (as the trainer's collator makes them) and ``id`` of every example."""
    fingerprint: str

    @property
    def tokens(self) -> np.ndarray:
        return response_token_counts(self.view)


@dataclass
class StandaloneJob:
    """What ``sftmix dynamics`` hands a scorer: the tokenized data, the reference model and the run's settings."""

    dataset: Dataset
    """Tokenized with the reference model's tokenizer, with an ``id`` column."""
    fingerprint: str
    reference: str | None
    """The reference model's name or path (None when only ``score_checkpoints`` are scored)."""
    tokenizer: Any
    model_args: Any
    training_args: Any
    make_trainer: Callable[..., Any]
    """Makes the reference run's trainer (`sftmix.SFTMixTrainer`)."""
    checkpoints: list[Path]
    """``score_checkpoints``."""

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)


@dataclass
class Made:
    """A scorer's measurements, before `write_stage1` turns them into the split."""

    perplexities: np.ndarray
    """``[N, C]``: one column per checkpoint scored (none for ``random``)."""
    checkpoints: list[str]
    model_name: str | None
    confidence: np.ndarray | None = None
    """Replaces ``-mean(perplexities)`` where the scorer has its own."""


def random_confidence(ids: Sequence[str], seed: int) -> np.ndarray:
    """A seeded random confidence per example, drawn from the ids so it does not depend on the dataset's order.

    >>> a = random_confidence(["x", "y", "z"], seed=1)
    >>> bool((random_confidence(["z", "x"], seed=1) == a[[2, 0]]).all())
    True
    """
    digests = [hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8] for i in ids]
    return np.array([int.from_bytes(d, "little") / 2**64 for d in digests], dtype=np.float64)


def scoring_dtype(training_args: Any, dtype: str | None) -> str | None:
    """``scoring_dtype``; ``auto``: bf16 weights when training in bf16 (a no-grad forward in bf16 weights is 15-30%
    faster on CPU than under autocast, and ranking examples needs no more precision), else the model's dtype."""
    choice = getattr(training_args, "scoring_dtype", "auto")
    if choice != "auto":
        return choice
    return "bfloat16" if getattr(training_args, "bf16", False) else dtype


def _target_name(host: Stage1Host) -> str:
    return str(getattr(host.model.config, "_name_or_path", ""))


def _reference_model(host: Stage1Host, copy_target: bool) -> tuple[Any, str]:
    """The model stage 1 trains or scores: ``reference_model_name_or_path`` (same tokenizer), else the target as it
    starts: a copy when it is to be trained (``copy_target``), so that the target's own weights are not touched."""
    name = host.args.reference_model_name_or_path
    if name:
        theirs, ours = load_tokenizer(name), host.processing_class
        if getattr(ours, "get_vocab", None) and theirs.get_vocab() != ours.get_vocab():
            raise SFTMixError(
                f"reference_model_name_or_path {name} has another tokenizer than the target: run `sftmix run` or "
                "`sftmix dynamics` (they tokenize the data for the reference model) and pass its dynamics_path"
            )
        return load_model(name, dtype="float32"), name
    return (copy.deepcopy(host.model) if copy_target else host.model), _target_name(host)


class Scorer:
    """One way of making stage 1's split. Subclasses set `name` and override what differs."""

    name: str = ""
    inside_training: bool = False
    """Makes the split while the target trains (so not as ``sftmix dynamics``, nor before data cleaning)."""

    def check(self, args: Any) -> None:
        """Refuse, before anything loads, settings this scorer cannot make a split with."""

    def mixup_start_epoch(self, args: Any) -> int:
        """The 0-based epoch from which the split applies: plain NTP before it."""
        return 0

    def cost(self, args: Any) -> float:
        """Stage 1's cost in NTP epochs of the target (a smaller reference model costs proportionally less)."""
        raise NotImplementedError

    def in_training(self, host: Stage1Host, data: Stage1Data) -> None:
        """Make the split now (``host.set_split``), or arm the callbacks that make it while ``host`` trains."""
        made = self.measure(host, data)  # before training: the split applies at once
        host.set_split(self.write(data.out, data.ids, data.tokens, data.fingerprint, made))

    def measure(self, host: Stage1Host, data: Stage1Data) -> Made:
        """Measure every example before ``host`` trains (the scorers that do not need the target's training)."""
        raise NotImplementedError

    def standalone(self, job: StandaloneJob) -> Made:
        """Measure every example of ``job`` before any training (``sftmix dynamics``)."""
        self.check_runs_before_training()
        raise NotImplementedError

    def check_runs_before_training(self, message: str = "use `sftmix train` or `sftmix run`") -> None:
        """Refuse a scorer that makes the split while the target trains, where the split is needed before."""
        if self.inside_training:
            raise SFTMixError(
                f"confidence_scorer={self.name} makes the split while the target trains: {message}"
            )

    def write(
        self,
        out: Path,
        ids: Sequence[str],
        tokens: Sequence[int],
        fingerprint: str,
        made: Made,
        indices: Sequence[int] | None = None,
    ) -> Path:
        return write_stage1(
            out,
            ids,
            made.perplexities,
            tokens,
            scorer=self.name,
            checkpoints=made.checkpoints,
            fingerprint=fingerprint,
            model_name=made.model_name,
            indices=indices,
            confidence=made.confidence,
        )


class ReferenceScorer(Scorer):
    name = "reference"

    def cost(self, args: Any) -> float:
        return args.reference_epochs + args.num_checkpoints * SCORING_PASS_EPOCHS

    def measure(self, host: Stage1Host, data: Stage1Data) -> Made:
        model, name = _reference_model(host, copy_target=True)
        perplexities, steps = train_reference(
            model,
            host.train_dataset,
            data.view,
            host.processing_class,
            stage1_args(host.args),
            data.out / "reference",
            host.reference_trainer,
            data.fingerprint,
            name,
        )
        gc.collect()
        return Made(perplexities, [f"reference/checkpoint-{s}" for s in steps], name)

    def standalone(self, job: StandaloneJob) -> Made:
        model_args = job.model_args
        perplexities, steps = train_reference(
            job.reference,
            job.dataset,
            job.dataset,
            job.tokenizer,
            job.training_args,
            job.output_dir / "reference",
            job.make_trainer,
            job.fingerprint,
            job.reference,
            peft_config=get_peft_config(model_args),
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
        )
        return Made(perplexities, [f"reference/checkpoint-{s}" for s in steps], job.reference)


class WarmupScorer(Scorer):
    name = "warmup"
    inside_training = True

    def check(self, args: Any) -> None:
        if args.reference_epochs != int(args.reference_epochs) or args.reference_epochs < 1:
            raise SFTMixError(
                f"confidence_scorer='warmup' needs a whole number of reference_epochs >= 1, got {args.reference_epochs}"
            )

    def mixup_start_epoch(self, args: Any) -> int:
        return int(args.reference_epochs)

    def cost(self, args: Any) -> float:
        return args.num_checkpoints * SCORING_PASS_EPOCHS

    def in_training(self, host: Stage1Host, data: Stage1Data) -> None:
        args = host.args
        epochs = int(args.reference_epochs)  # the trainer checked there are epochs left for Mixup
        name, tokens = _target_name(host), data.tokens

        def done(perplexities: np.ndarray, steps: list[int]) -> None:
            made = Made(perplexities, [f"checkpoint-{s}" for s in steps], name)
            host.set_split(self.write(data.out, data.ids, tokens, data.fingerprint, made))

        scoring = StepScoring(
            data.view, data.ids, data.fingerprint, data.out / SCORES_DIR, ScoringSettings.of(args)
        )
        host.add_callback(
            ScoreAtStepsCallback(
                scoring,
                args.num_checkpoints,
                lambda state: round(epochs * state.max_steps / state.num_train_epochs),
                on_done=done,
            )
        )


class OnlineScorer(Scorer):
    name = "online"
    inside_training = True

    def mixup_start_epoch(self, args: Any) -> int:
        return 1

    def cost(self, args: Any) -> float:
        return 0.0

    def in_training(self, host: Stage1Host, data: Stage1Data) -> None:
        args = host.args
        recorder = DynamicsCallback(
            data.out,
            correction=args.online_correction,
            window=args.online_window,
            epochs=1,
            on_written=host.set_split,
            hook=False,
            model_name=_target_name(host),
            fingerprint=data.fingerprint,
            order=data.ids,
            scorer=self.name,
        )
        host.add_callback(recorder)
        host.record_online(recorder)


class BaseScorer(Scorer):
    name = "base"

    def cost(self, args: Any) -> float:
        return SCORING_PASS_EPOCHS

    def measure(self, host: Stage1Host, data: Stage1Data) -> Made:
        model, name = _reference_model(host, copy_target=False)
        model = unwrap_for_scoring(model).to(host.accelerator.device)
        perplexities = ScoringSettings.of(host.args).score(model, data.view, desc="Scoring the base model")
        del model
        gc.collect()
        return Made(perplexities[:, None], [name], name)

    def standalone(self, job: StandaloneJob) -> Made:
        args = job.training_args
        dtype = scoring_dtype(args, job.model_args.dtype)
        model = load_model(job.reference, dtype=dtype).to(PartialState().device)
        perplexities = ScoringSettings.of(args).score(model, job.dataset, desc="Scoring the base model")
        return Made(perplexities[:, None], [job.reference], job.reference)


class RandomScorer(Scorer):
    name = "random"

    def cost(self, args: Any) -> float:
        return 0.0

    def measure(self, host: Stage1Host, data: Stage1Data) -> Made:
        ids = data.ids
        return Made(np.zeros((len(ids), 0)), [], None, random_confidence(ids, host.args.seed))

    def standalone(self, job: StandaloneJob) -> Made:
        ids = list(job.dataset["id"])
        return Made(
            np.zeros((len(ids), 0)), [], job.reference, random_confidence(ids, job.training_args.seed)
        )


def checkpoint_names(checkpoints: Sequence[Path]) -> list[str]:
    """``ckpt-<step>`` for ``checkpoint-<step>`` dirs; ``ckpt-<k>`` (1-based position) when steps are not unique."""
    steps = [re.fullmatch(r"checkpoint-(\d+)", Path(c).name) for c in checkpoints]
    if all(steps) and len({m.group(1) for m in steps}) == len(steps):
        return [f"ckpt-{int(m.group(1))}" for m in steps]
    return [f"ckpt-{k}" for k in range(1, len(checkpoints) + 1)]


def _checkpoint_key(path: Path, output_dir: Path) -> str:
    """How a scores file names its checkpoint: relative to ``output_dir`` if inside it, else absolute."""
    try:
        return path.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _load_for_scoring(path: Path, dtype: str | None) -> PreTrainedModel:
    """A checkpoint as a plain model; a LoRA checkpoint is merged into its base model (scoring only)."""
    if (path / "adapter_config.json").is_file():
        base = load_model(PeftConfig.from_pretrained(str(path)).base_model_name_or_path, dtype=dtype)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return load_model(str(path), dtype=dtype)


class CheckpointsScorer(Scorer):
    """``score_checkpoints``: saved checkpoints (of any run) scored as the reference run's would be.

    Each checkpoint's scores are read from, or written to, ``output_dir/scores``; a scores file is reused only if
    it was made from the same data (the fingerprint) and the same checkpoint: named relative to the output dir
    when it lies inside it (so a moved or copied run dir stays valid).
    """

    name = "checkpoints"

    def cost(self, args: Any) -> float:
        return SCORING_PASS_EPOCHS * len(args.score_checkpoints.split(","))

    def standalone(self, job: StandaloneJob) -> Made:
        args, scores_dir = job.training_args, job.output_dir / SCORES_DIR
        settings = ScoringSettings.of(args)
        columns = []
        for path, name in zip(job.checkpoints, checkpoint_names(job.checkpoints), strict=True):
            key = _checkpoint_key(path, scores_dir.parent)
            values = read_scores(scores_dir / f"{name}.json", job.fingerprint, key)
            if values is None:
                model = _load_for_scoring(path, scoring_dtype(args, job.model_args.dtype))
                values = settings.score(model.to(PartialState().device), job.dataset, desc=f"Scoring {name}")
                del model
                gc.collect()
                write_scores(scores_dir / f"{name}.json", job.fingerprint, key, job.dataset["id"], values)
            columns.append(values)
        return Made(np.stack(columns, axis=1), [str(p) for p in job.checkpoints], None)


SCORERS: dict[str, Scorer] = {
    s.name: s for s in (ReferenceScorer(), WarmupScorer(), OnlineScorer(), BaseScorer(), RandomScorer())
}
"""The values of ``confidence_scorer``, in the order the docs list them."""
CHECKPOINTS = CheckpointsScorer()


def scorer_for(args: Any, *, checkpoints: bool = True) -> Scorer:
    """The scorer ``args`` asks for: ``checkpoints`` when ``score_checkpoints`` is set (and ``checkpoints``: a
    training run ignores it), else ``confidence_scorer``."""
    if checkpoints and getattr(args, "score_checkpoints", None):
        return CHECKPOINTS
    try:
        return SCORERS[args.confidence_scorer]
    except KeyError:
        raise SFTMixError(f"unknown confidence_scorer {args.confidence_scorer!r}") from None


def mixup_start_epoch(args: Any) -> int:
    """The 0-based epoch from which a split that stage 1 makes in a training run applies (plain NTP before it);
    refuses settings the scorer cannot work with."""
    scorer = scorer_for(args, checkpoints=False)
    scorer.check(args)
    return scorer.mixup_start_epoch(args)


def stage1_cost(args: Any) -> float:
    """Stage 1's cost in NTP epochs of the target; none with a given ``dynamics_path`` or without Mixup."""
    if args.dynamics_path or args.mixup_weight == 0:
        return 0.0
    return scorer_for(args).cost(args)


def prepare_stage1(host: Stage1Host) -> None:
    """Make, reuse or arm stage 1 for ``host`` (an `SFTMixTrainer` whose split is not known yet).

    A finished stage 1 of the same scorer and data in ``output_dir/dynamics/`` is reused; otherwise the scorer
    makes the split there and then, or arms the callbacks that make it while the target trains. Either way the
    trainer's ``set_split`` gets the path of the written ``dynamics.jsonl``; until then the target trains with
    plain NTP.
    """
    args = host.args
    scorer = scorer_for(args, checkpoints=False)
    view = with_training_labels(host.train_dataset, host.data_collator.collator)
    ids = [str(i) for i in host.train_dataset["id"]]
    view = view.add_column("id", ids)
    data = Stage1Data(Path(args.output_dir) / DYNAMICS_DIR, ids, view, dataset_fingerprint(view))
    # Every process looks before any writes: a fast scorer's main process could otherwise finish the files
    # before another process looks, which would then skip the barrier the writer waits at.
    PartialState().wait_for_everyone()
    found = existing_stage1(data.out, scorer.name, data.fingerprint)
    if found is not None:
        logger.info("Stage 1 (%s) is done: using %s", scorer.name, found)
        host.set_split(found)
        return
    logger.info("Stage 1: the %s scorer writes %s", scorer.name, data.out)
    scorer.in_training(host, data)


def run_standalone(job: StandaloneJob, row_of: dict[str, int] | None = None) -> Path:
    """Stage 1 before training (``sftmix dynamics``): measure with the scorer ``job`` asks for, write the files."""
    scorer = CHECKPOINTS if job.checkpoints else scorer_for(job.training_args, checkpoints=False)
    made = scorer.standalone(job)
    ids = list(job.dataset["id"])
    indices = [row_of[i] for i in ids] if row_of is not None else None
    return scorer.write(
        job.output_dir, ids, response_token_counts(job.dataset), job.fingerprint, made, indices=indices
    )
