"""Stage 3: `SFTMixTrainer`, TRL's ``SFTTrainer`` with the Mixup regulariser of `sftmix.mixup.loss`.

One training step of SFTMix, with ``mixup_weight = mu > 0``:

1. `BalancedPairSampler` makes every micro-batch half confident, half unconfident, as random pairs, and
   `MixupRoleCollator` tells the loss which row is which (from the example ids, never from positions).
2. The model's forward, patched like TRL's ``add_fused_lm_head`` patches it, runs the backbone ONCE and feeds the
   last hidden states (after the final norm) of all response tokens, plus the mixed states ``lam h_c + (1 - lam)
   h_u`` of all aligned pairs of response tokens, through one call of the fused head of `sftmix.head`. The head
   runs inside ``forward`` so that DDP, FSDP and DeepSpeed ZeRO-3 see it as part of the model.
3. ``loss = NTP + mu * Mixup`` (label-smoothed if asked), each a sum over its tokens divided by their count in
   the accumulation window on all processes (``num_items_in_batch``; the mixed tokens of `get_batch_samples`),
   times the processes (DDP averages): 2 micro-batches of 2 give the gradient of one batch of 4.

Lambdas come from a generator seeded by ``(seed, global_step, micro-step)`` that draws the global micro-batch's
lambdas, each process taking its slice: a resumed run, or a run on more processes, draws the same ones. With
``mixup_weight = 0`` the loss is TRL's NTP loss on TRL's batches (by the fused head when it is the NLL). A
non-finite loss stops training with a `SFTMixError` naming the step and the batch's example ids. The load-train-save
driver of ``sftmix train`` is `sftmix.cli.pipeline.train`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from huggingface_hub import ModelCard
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from .data.dataset import IGNORE_INDEX, with_content_ids
from .data.models import base_model_id
from .distributed import check_process_group, check_replicas_agree
from .errors import SFTMixError
from .io_utils import atomic_write_json
from .mixup.loss import add_sftmix_head, count_mixed_tokens, sample_lambdas
from .mixup.pairing import BalancedPairSampler, MixupRoleCollator, pair_rows
from .preemption import StopOnSignal
from .sftmix_config import SFTMixConfig
from .stage1.online import DynamicsCallback
from .stage1.scorers import mixup_start_epoch, prepare_stage1
from .stage1.splits import align_split, read_dynamics_splits

logger = logging.getLogger(__name__)

NONFINITE_NOTE = "nonfinite_loss.json"


def _sequence_parallel(accelerator: Any) -> bool:
    """Whether Ulysses sequence parallelism is on (TRL then leaves the loss reduction to the model)."""
    config = getattr(accelerator, "parallelism_config", None)
    return bool(config is not None and getattr(config, "sp_enabled", False))


class StepStats(NamedTuple):
    """One training micro-batch's statistics, summed over the processes (gathered in one call)."""

    ntp_nll_sum: float
    ntp_tokens: float
    mixup_ce_sum: float
    mixed_tokens: float
    entropy_sum: float
    num_correct: float
    lambda_sum: float
    num_pairs: float
    nonfinite: float
    """Processes whose loss was not finite."""

    @classmethod
    def gather(cls, accelerator: Any, outputs: Any, lambdas: torch.Tensor, loss: torch.Tensor) -> StepStats:
        local = torch.stack(
            [
                outputs.ntp_nll_sum.float(),
                outputs.ntp_tokens.float(),
                outputs.mixup_ce_sum.float(),
                outputs.mixed_tokens.float(),
                outputs.entropy_sum.float(),
                outputs.num_correct.float(),
                lambdas.sum().float(),
                torch.tensor(float(lambdas.numel()), device=lambdas.device),
                (~torch.isfinite(loss.detach())).float(),
            ]
        )
        return cls(*accelerator.gather(local[None]).sum(0).tolist())

    @property
    def loss_ntp(self) -> float:
        return self.ntp_nll_sum / max(self.ntp_tokens, 1)

    @property
    def loss_mixup(self) -> float:
        return self.mixup_ce_sum / max(self.mixed_tokens, 1)


class _MixupSwitch(TrainerCallback):
    """Tells the trainer each epoch's start: Mixup starts at the epoch from which stage 1's split applies."""

    def __init__(self, trainer: SFTMixTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.epoch_begins(int(state.epoch + 1e-6))


class SFTMixTrainer(SFTTrainer):
    """`trl.SFTTrainer` with SFTMix's Mixup regulariser; it takes the same arguments.

    With ``args.mixup_weight > 0`` (an `SFTMixConfig`) the loss is ``L_NTP + mixup_weight * L_mixup`` (see the
    module docstring), on the split of ``args.dynamics_path``, or, without one, of the stage 1 that ``train()`` runs
    first (``args.confidence_scorer``, `sftmix.stage1.scorers`). The dataset is any dataset ``trl.SFTTrainer`` takes; its
    examples are found in the split by their ``id`` column or, without one, by the id `sftmix.data.dataset.content_id`
    derives from their content (the one ``sftmix dynamics`` writes). With ``mixup_weight = 0`` training is exactly
    ``trl.SFTTrainer``'s. ``confident_by_id`` (keyword only): the parsed dynamics file, if the caller has it.

    Example (a model name or instance, and a TRL ``dataset``, e.g. a ``messages`` column):
        >>> args = SFTMixConfig(output_dir="out", confidence_scorer="online")  # doctest: +SKIP
        >>> SFTMixTrainer(model=model, args=args, train_dataset=dataset).train()  # doctest: +SKIP
    """

    _tag_names = ["trl", "sft", "sftmix"]
    _name = "SFTMix"
    _paper = {
        "title": "SFTMix: Elevating Language Model Instruction Tuning with Mixup Recipe",
        "id": "2410.05248",
        "citation": textwrap.dedent("""\
            @inproceedings{xiao2026sftmix,
                title        = {{SFTMix: Elevating Language Model Instruction Tuning with Mixup Recipe}},
                author       = {Yuxin Xiao and Shujian Zhang and Wenxuan Zhou and Marzyeh Ghassemi and Sanqiang Zhao},
                year         = 2026,
                booktitle    = {Proceedings of ACL},
                note         = {arXiv:2410.05248},
            }"""),
    }

    def __init__(
        self,
        model,
        args: SFTMixConfig | SFTConfig | None = None,
        *pos_args,
        confident_by_id: Mapping[str, bool] | None = None,
        **kwargs,
    ):
        if args is None:  # as trl.SFTTrainer; without a dynamics file that is plain NTP
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SFTMixConfig(f"{str(name).split('/')[-1]}-SFTMix", mixup_weight=0.0)
        elif not isinstance(args, SFTMixConfig):
            raise SFTMixError(
                f"SFTMixTrainer needs an SFTMixConfig, got {type(args).__name__}; use SFTMixConfig(..., "
                "mixup_weight=0) for plain SFT"
            )
        self._mixup = args.mixup_weight > 0
        if not self._mixup:  # plain SFT: the card says so, as trl.SFTTrainer's would
            self._name, self._paper = SFTTrainer._name, SFTTrainer._paper
        self._confident_by_id: Mapping[str, bool] | None = None
        self._confident: np.ndarray | None = None
        self._sampler: BalancedPairSampler | None = None
        self._mixup_on = False
        self._online: DynamicsCallback | None = None  # the online scorer's recorder, fed by compute_loss
        if self._mixup:
            self.check_mixup_args(args)
            # Read (and validate) the dynamics file before the model and the dataset are prepared
            if confident_by_id is None and args.dynamics_path:
                confident_by_id = read_dynamics_splits(args.dynamics_path)
            self._confident_by_id = confident_by_id  # None: stage 1 makes the split when training starts
            # Pairing finds each example's split by id: a dataset without ids gets them from its content
            if isinstance(kwargs.get("train_dataset"), Dataset):
                kwargs["train_dataset"] = with_content_ids(kwargs["train_dataset"])
            elif len(pos_args) > 1 and isinstance(pos_args[1], Dataset):
                pos_args = (pos_args[0], with_content_ids(pos_args[1]), *pos_args[2:])
        with warnings.catch_warnings(record=True) as caught:
            super().__init__(model, args, *pos_args, **kwargs)
        if self._mixup:
            if not isinstance(self.train_dataset, Dataset):
                raise SFTMixError(
                    "Mixup needs a map-style datasets.Dataset (not an IterableDataset) to pair examples"
                )
            if self._confident_by_id is not None:
                # every training id must be in the split, and both halves non-empty; kept for the sampler
                self._confident = align_split(
                    self._confident_by_id, self.train_dataset["id"], args.dynamics_path
                )
                self._mixup_on = True
            self.add_callback(_MixupSwitch(self))
        self.data_collator = MixupRoleCollator(
            self.data_collator, self._confident_by_id if self._mixup_on else None
        )
        # The fused head of `sftmix.head` computes its gradients in the forward pass: on CPU it is 2-3x faster than
        # TRL's chunked head, so it also serves the NTP loss whenever it is the NLL (label-smoothed or not).
        if self._mixup and self.aux_loss_enabled:
            raise SFTMixError(
                "Mixup does not add the MoE router's auxiliary loss: set router_aux_loss_coef=0, or mixup_weight=0"
            )
        self._own_head = self._mixup or (
            args.ntp_fused_head
            and args.loss_type == "nll"
            and self.compute_loss_func is None
            and not self.aux_loss_enabled
            and not _sequence_parallel(self.accelerator)
        )
        for w in caught:  # TRL's "label smoothing needs the full logits" is untrue when our head smooths
            if not (self._own_head and "`label_smoothing_factor` is deprecated" in str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if self._own_head:
            add_sftmix_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._micro_step = 0
        self._num_mixed_in_window: torch.Tensor | None = None
        self._stop_on_signal: StopOnSignal | None = None
        if getattr(args, "stop_on_signal", False):  # last, so a step's other callbacks finish before the stop
            self._replace_jit_checkpoint()
            self._stop_on_signal = StopOnSignal()
            self.add_callback(self._stop_on_signal)

    @staticmethod
    def check_mixup_args(args: SFTMixConfig) -> None:
        """Refuse, before anything is loaded, a config that Mixup cannot train with (``--dry_run`` and the
        commands call it too)."""
        start = mixup_start_epoch(args)
        if not args.dynamics_path and start and (args.max_steps > 0 or args.num_train_epochs <= start):
            raise SFTMixError(
                f"confidence_scorer='{args.confidence_scorer}' needs num_train_epochs > {start} and no max_steps: "
                f"its split comes from the first {start} epoch(s) of plain NTP, and Mixup starts after them"
            )
        if args.packing or args.padding_free:
            raise SFTMixError(
                "Mixup pairs whole examples, so packing and padding_free are not supported: set packing=False and "
                "padding_free=False (or mixup_weight=0)"
            )
        if args.per_device_train_batch_size % 2:
            raise SFTMixError(
                f"per_device_train_batch_size must be even with Mixup (half confident, half unconfident examples "
                f"per micro-batch), got {args.per_device_train_batch_size}"
            )
        if args.loss_type != "nll":
            raise SFTMixError(
                "Mixup adds to the NLL loss: set loss_type='nll' (or mixup_weight=0); label smoothing is fine"
            )
        if args.train_sampling_strategy != "random":
            logger.warning(
                "train_sampling_strategy=%r is ignored with Mixup: batches are balanced pairs",
                args.train_sampling_strategy,
            )

    def train(self, *args, **kwargs):
        """``SFTTrainer.train`` after stage 1 (`sftmix.stage1.scorers`, when Mixup has no split yet), refusing to start unless
        the launched processes form one group, and checking at the end that they hold the same weights."""
        check_process_group(self.accelerator, self.args.world_size)
        if self._mixup and self._confident is None:
            prepare_stage1(self)
        try:
            result = super().train(*args, **kwargs)
        finally:
            if self._stop_on_signal is not None:
                self._stop_on_signal.restore()
        check_replicas_agree(self.model, self.accelerator)
        if self._stop_on_signal is not None:  # a preempted run is not a finished one
            self._stop_on_signal.raise_if_stopped(self)
        return result

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        stop = getattr(self, "_stop_on_signal", None)
        if (
            stop is not None and callback is not stop
        ):  # the stop stays last (stage 1 adds its callbacks later)
            self.callback_handler.remove_callback(stop)
            self.callback_handler.callbacks.append(stop)

    def _replace_jit_checkpoint(self) -> None:
        """transformers' ``enable_jit_checkpoint`` saves per process before the optimizer step and returns as if
        finished (`sftmix.preemption` says why): its callback goes, and the SIGTERM handler before it comes back."""
        jit = next(
            (c for c in self.callback_handler.callbacks if type(c).__name__ == "JITCheckpointCallback"), None
        )
        if jit is None:
            return
        self.callback_handler.remove_callback(jit)
        manager = getattr(jit, "jit_manager", None)
        if manager is not None and manager._original_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
        logger.warning(
            "stop_on_signal replaces enable_jit_checkpoint: SIGTERM saves at the end of the step instead"
        )

    def set_split(self, dynamics_path: str | Path) -> None:
        """Pair by the split of stage 1's ``dynamics_path``: at once, or from the epoch where the scorer starts Mixup
        (``warmup``: after ``reference_epochs``, ``online``: epoch 2; plain NTP before)."""
        self._confident_by_id = read_dynamics_splits(dynamics_path)
        self._confident = align_split(self._confident_by_id, self.train_dataset["id"], dynamics_path)
        self.args.dynamics_path = str(dynamics_path)
        if self._sampler is None and mixup_start_epoch(self.args) == 0:
            self._start_mixup()

    def epoch_begins(self, epoch: int) -> None:
        """Turn Mixup on if the split is known and ``epoch`` (0-based) is the one from which it applies."""
        if not self._mixup_on and self._confident is not None and epoch >= mixup_start_epoch(self.args):
            self._start_mixup()

    def record_online(self, recorder: DynamicsCallback) -> None:
        """Feed ``recorder`` (the ``online`` scorer's) each training example's response NLL from the fused head, and
        save its records in every checkpoint."""
        self._online = recorder

    def reference_trainer(self, **kwargs: Any) -> SFTMixTrainer:
        """A trainer of this class for stage 1's reference run (its ``args`` turn Mixup off: plain NTP)."""
        return type(self)(**kwargs)

    def _start_mixup(self) -> None:
        if self._sampler is not None:
            self._sampler.set_split(self._confident)
        self.data_collator.confident_by_id = self._confident_by_id
        self._mixup_on = True

    def _save_checkpoint(self, model, trial):
        # The online scorer's records go in first: a checkpoint counts as a resume point once trainer_state.json,
        # which the Trainer writes last, is there.
        if self._online is not None:
            self._online.save_records(
                Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            )
        return super()._save_checkpoint(model, trial)

    # ---- data --------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "id" not in self._signature_columns:  # keep `id` through the pruning of unused columns
            self._signature_columns = [*self._signature_columns, "id"]

    def _get_train_sampler(self, train_dataset=None):
        if not self._mixup:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        confident = self._confident if self._mixup_on else None
        if confident is not None and dataset is not self.train_dataset:
            confident = align_split(self._confident_by_id, dataset["id"], self.args.dynamics_path)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._sampler = BalancedPairSampler(
            confident,
            self._train_batch_size,
            seed=seed,
            num_replicas=self.args.world_size,
            num_examples=len(dataset),
        )
        return self._sampler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._micro_step = 0  # a new accumulation window: lambdas are seeded by (step, micro-step)
        if self._mixup_on and batch_samples:
            # Count the mixed tokens of the whole window, on all processes, as the Trainer counts the NTP tokens
            count = sum(
                count_mixed_tokens(*(b["labels"][:, 1:][rows] for rows in pair_rows(b["mixup_role"])))
                for b in batch_samples
            ).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            self._num_mixed_in_window = count
        return batch_samples, num_items_in_batch

    def _draw_lambdas(self, num_pairs: int, micro_step: int) -> torch.Tensor:
        """Lambdas of this process's pairs in one micro-batch.

        The generator is seeded by (seed, optimizer step, micro-step), and draws the lambdas of the global
        micro-batch (every process's pairs, in rank order); each process takes its own slice. So a resumed run
        draws the same lambdas, and N processes with micro-batches of B train exactly as one process with B x N.
        """
        rng = np.random.default_rng(
            np.random.SeedSequence([self.args.seed, self.state.global_step, micro_step])
        )
        world, rank = self.args.world_size, self.args.process_index
        lambdas = sample_lambdas(num_pairs * world, self.args.mixup_alpha, rng, self.args.lambda_per)
        return lambdas[rank * num_pairs : (rank + 1) * num_pairs]

    # ---- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        example_ids = inputs.pop("example_ids", None)
        roles = inputs.pop("mixup_role", None)
        if not (self._own_head and self.model.training):
            return self._trl_loss(model, inputs, return_outputs, num_items_in_batch, example_ids)

        micro_step, self._micro_step = self._micro_step, self._micro_step + 1
        labels = inputs["labels"][:, 1:]
        if self._mixup_on:
            lambdas = self._draw_lambdas(roles.numel() // 2, micro_step).to(roles.device)
        else:
            roles, lambdas = None, labels.new_zeros(0, dtype=torch.float32)
        inputs["use_cache"] = False
        outputs = model(**inputs, sftmix=self._head_spec(labels, roles, lambdas, num_items_in_batch))
        loss = outputs.loss
        if self._online is not None and example_ids is not None:  # the online scorer's measurements
            self._online.record(example_ids, outputs.example_nll_sum, outputs.example_tokens)
        stats = StepStats.gather(self.accelerator, outputs, lambdas, loss)
        if stats.nonfinite > 0:
            self._stop_on_nonfinite(example_ids, f"loss_ntp {stats.loss_ntp}, loss_mixup {stats.loss_mixup}")
        self._log_step(stats, inputs["attention_mask"])
        return (loss, outputs) if return_outputs else loss

    def _trl_loss(self, model, inputs, return_outputs, num_items_in_batch, example_ids):
        """TRL's own loss (evaluation, or a loss our head does not compute), stopping on a non-finite one."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            loss = result[0] if return_outputs else result
            flag = self.accelerator.gather((~torch.isfinite(loss.detach())).float().reshape(1)).sum()
            if flag > 0:
                self._stop_on_nonfinite(example_ids, f"loss {loss.item()}")
        return result

    def _head_spec(
        self,
        labels: torch.Tensor,
        roles: torch.Tensor | None,
        lambdas: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> dict[str, Any]:
        """What the fused head of `sftmix.mixup.loss` computes: the two losses' weights (TRL's normalisation,
        module docstring 3.; the factor ``processes`` undoes DDP's average), the pairs and their lambdas."""
        if num_items_in_batch is None:
            ntp_count = (labels != IGNORE_INDEX).sum()
            mix_count = (
                count_mixed_tokens(*(labels[rows] for rows in pair_rows(roles))) if self._mixup_on else 1
            )
            processes = 1
        else:
            ntp_count, mix_count = num_items_in_batch, self._num_mixed_in_window if self._mixup_on else 1
            processes = self.accelerator.num_processes // self.get_tp_size()
            processes = processes if self.args.average_tokens_across_devices else 1
        ntp_count = torch.as_tensor(ntp_count, device=labels.device).float().clamp(min=1)
        mix_count = torch.as_tensor(mix_count, device=labels.device).float().clamp(min=1)
        return {
            "ntp_weight": processes / ntp_count,
            "mixup_weight": self.args.mixup_weight * processes / mix_count,
            "mixup_role": roles,
            "lambdas": lambdas,
            "chunk_size": self.args.head_chunk_size,
            "label_smoothing": self.label_smoother.epsilon if self.label_smoother is not None else 0.0,
        }

    def _log_step(self, stats: StepStats, attention_mask: torch.Tensor) -> None:
        """The step's metrics, as TRL logs them (entropy, token accuracy, tokens seen) plus Mixup's own."""
        metrics = self._metrics["train"]
        if self._mixup_on:
            metrics["loss_ntp"].append(stats.loss_ntp)
            metrics["loss_mixup"].append(stats.loss_mixup)
            metrics["mixup_lambda"].append(stats.lambda_sum / max(stats.num_pairs, 1))
            metrics["mixed_tokens"].append(stats.mixed_tokens)
        tokens = stats.ntp_tokens
        metrics["entropy"].append(stats.entropy_sum / tokens if tokens > 0 else 0.0)
        metrics["mean_token_accuracy"].append(stats.num_correct / tokens if tokens > 0 else 0.0)
        num_tokens = self.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
        self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    # ---- the model card ------------------------------------------------------------------------------------
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card in ``output_dir/README.md``, naming the base model (for the built-in default, the model its
        GGUF file was made from) and, with Mixup, SFTMix's settings, the split and the data map."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            out = Path(self.args.output_dir)
            datamap = self._datamap()
            link = os.path.relpath(datamap, out) if datamap is not None else None
            self._completed_card(link).save(out / "README.md")

    def save_model_card(self, directory: str | Path) -> None:
        """Write the model card into ``directory`` (the saved model's, e.g. ``final/``), the data map beside it."""
        self.create_model_card(model_name=Path(self.args.output_dir).name)
        if self.is_world_process_zero():
            directory, datamap = Path(directory), self._datamap()
            if datamap is not None:
                shutil.copyfile(datamap, directory / datamap.name)
            self._completed_card(datamap.name if datamap is not None else None).save(directory / "README.md")

    def _datamap(self) -> Path | None:
        path = (
            Path(self.args.dynamics_path).with_name("datamap.png")
            if self._mixup and self.args.dynamics_path
            else None
        )
        return path if path is not None and path.is_file() else None

    def _completed_card(self, datamap_link: str | None) -> ModelCard:
        card = ModelCard.load(Path(self.args.output_dir) / "README.md")
        config = self.model.config
        base = base_model_id(str(getattr(config, "_name_or_path", "") or ""))
        if base and base != card.data.base_model:  # TRL names a local path, or None ("[None]" in the text)
            given = card.data.base_model
            card.data.base_model = base
            card.text = card.text.replace(
                f"[{given}](https://huggingface.co/{given})", f"[{base}](https://huggingface.co/{base})"
            )
        if not self._mixup:
            return card
        args = self.args
        summary = Path(args.dynamics_path).with_name("dynamics_summary.json") if args.dynamics_path else None
        scorer = json.loads(summary.read_text()).get("scorer") if summary and summary.is_file() else None
        split = (
            f"`{args.dynamics_path}`" + (f", made by stage 1's `{scorer}` scorer" if scorer else "")
            if args.dynamics_path
            else f"not made yet (stage 1's `{args.confidence_scorer}` scorer makes it during training)"
        )
        lines = [
            "## SFTMix",
            "",
            f"Trained with SFTMix ([arXiv 2410.05248](https://arxiv.org/abs/2410.05248)): the NTP loss plus "
            f"`mixup_weight` (mu) {args.mixup_weight:g} times a Mixup loss of confident/unconfident pairs, "
            f"`mixup_alpha` {args.mixup_alpha:g} (lambda ~ Beta(alpha, alpha), one per {args.lambda_per}).",
            "",
            f"- split: {split}",
        ]
        if self._confident is not None:
            confident = int(np.sum(self._confident))
            lines.append(
                f"- {confident} confident and {len(self._confident) - confident} unconfident examples"
            )
        if datamap_link is not None:
            lines += ["", f"![SFTMix data map]({datamap_link})"]
        head, citations = (
            card.text.split("\n## Citations", 1) if "\n## Citations" in card.text else (card.text, "")
        )
        section = "\n".join(lines)
        card.text = f"{head.rstrip()}\n\n{section}\n" + (f"\n## Citations{citations}" if citations else "")
        return card

    def _stop_on_nonfinite(self, example_ids: list[str] | None, detail: str) -> None:
        """Save a note and (best effort) the weights before this step, then stop with a clear error."""
        step = self.state.global_step + 1
        all_ids = [i for ids in gather_object([example_ids or []]) for i in ids]
        where = Path(self.args.output_dir)
        saved = where / f"nonfinite-step-{step}"
        if self.args.should_save:
            atomic_write_json(
                where / NONFINITE_NOTE, {"step": step, "detail": detail, "example_ids": all_ids}
            )
        try:
            self.save_model(str(saved))  # the update of this step has not happened: these weights are finite
        except Exception as e:  # best effort: the error below matters more
            logger.warning("could not save the model after the non-finite loss: %s", e)
        shown = ", ".join(all_ids[:8]) + (f" and {len(all_ids) - 8} more" if len(all_ids) > 8 else "")
        raise SFTMixError(
            f"non-finite loss at step {step} ({detail}); example ids of the batch: {shown or 'unknown'}; "
            f"weights before this step saved to {saved}, note in {where / NONFINITE_NOTE}"
        )
