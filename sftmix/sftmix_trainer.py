"""Stage 3: `SFTMixTrainer`, TRL's ``SFTTrainer`` with the Mixup regulariser, and the `train` entry point.

One training step of SFTMix, with ``mixup_weight = mu > 0``:

1. `BalancedPairSampler` makes every micro-batch half confident, half unconfident, as random pairs, and
   `MixupRoleCollator` tells the loss which row is which (from the example ids, never from positions).
2. The model's forward, patched like TRL's ``add_fused_lm_head`` patches it, runs the backbone ONCE and feeds the
   last hidden states (after the final norm) of all response tokens, plus the mixed states ``lam h_c + (1 - lam)
   h_u`` of all aligned pairs of response tokens, through one call of the fused head of `sftmix.head`. The head
   runs inside ``forward`` so that DDP, FSDP and DeepSpeed ZeRO-3 see it as part of the model.
3. ``loss = NTP + mu * Mixup``, each normalised as TRL normalises its loss: summed, divided by the count of its
   tokens over the whole gradient-accumulation window on all processes (``num_items_in_batch`` for NTP, the
   mixed-token count of `get_batch_samples` for Mixup), times the number of processes (DDP averages
   gradients). So 2 micro-batches of 2 give the gradient of one batch of 4.

Lambdas come from a generator seeded by ``(seed, global_step, micro-step)`` that draws the global micro-batch's
lambdas, each process taking its slice: a resumed run, or a run on more processes, draws the same ones. With ``mixup_weight = 0`` the loss is TRL's own ``compute_loss`` on TRL's batches: the NTP baseline.
A non-finite loss stops training with a `SFTMixError` naming the step and the batch's example ids.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .distributed import check_process_group, check_replicas_agree
from .errors import SFTMixError
from .head import fused_linear_cross_entropy, lm_head_parameters, lm_head_transform
from .io_utils import atomic_write_json, last_complete_checkpoint
from .mixup import count_mixed_tokens, mix_hidden_states, sample_lambdas
from .pairing import BalancedPairSampler, MixupRoleCollator, align_split, pair_rows, read_dynamics_splits
from .sftmix_config import DataArguments, SFTMixConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
NONFINITE_NOTE = "nonfinite_loss.json"


@dataclass
class SFTMixOutput(ModelOutput):
    """What the patched forward returns with ``sftmix=...``. Only ``loss`` carries a gradient.

    Args:
        loss: ``ntp_weight * sum NLL + mixup_weight * sum (lam CE(y_c) + (1 - lam) CE(y_u))``.
        ntp_nll_sum: Summed NLL of the response tokens.
        ntp_tokens: Number of response tokens.
        mixup_ce_sum: Summed Mixup cross-entropy of the mixed tokens.
        mixed_tokens: Number of mixed tokens.
        entropy_sum: Summed entropy of the next-token distributions of the response tokens.
        num_correct: Response tokens predicted top-1.
    """

    loss: torch.Tensor | None = None
    ntp_nll_sum: torch.Tensor | None = None
    ntp_tokens: torch.Tensor | None = None
    mixup_ce_sum: torch.Tensor | None = None
    mixed_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None


def sftmix_head_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ntp_weight: torch.Tensor | float,
    mixup_weight: torch.Tensor | float = 0.0,
    mixup_role: torch.Tensor | None = None,
    lambdas: torch.Tensor | None = None,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> SFTMixOutput:
    """NTP + Mixup loss of a micro-batch from its shifted hidden states, through one fused head call.

    Args:
        hidden: ``[B, T, H]`` last hidden states, shifted: ``hidden[:, t]`` predicts ``labels[:, t]``.
        labels: ``[B, T]`` shifted labels, ``-100`` where no loss is carried.
        weight: ``[V, H]`` LM head weight.
        bias: Optional ``[V]`` LM head bias.
        ntp_weight: Weight of each response token's NLL (``1 / num_items_in_batch``, times processes).
        mixup_weight: Weight of each mixed token's cross-entropy (``mu / mixed tokens``, times processes).
        mixup_role: ``[B]`` 1 confident / 0 unconfident per row; None for NTP only.
        lambdas: ``[B / 2]`` lambda of each pair (the k-th confident row with the k-th unconfident row).
        chunk_size: Rows per chunk of the fused head.
        logit_scale: The model's logit multiplier.
        softcap: The model's final logit soft-cap.
    """
    mask = labels != -100
    rows, targets = [hidden[mask]], [labels[mask]]
    num_ntp = rows[0].shape[0]
    ntp_w = torch.as_tensor(ntp_weight, dtype=torch.float32, device=hidden.device).expand(num_ntp)
    weights, targets2, weights2 = [ntp_w], [targets[0]], [torch.zeros_like(ntp_w)]
    lam = None
    if mixup_role is not None:
        rows_c, rows_u = pair_rows(mixup_role)
        mixed = mix_hidden_states(hidden[rows_c], labels[rows_c], hidden[rows_u], labels[rows_u], lambdas)
        lam = mixed.lam
        mix_w = torch.as_tensor(mixup_weight, dtype=torch.float32, device=hidden.device)
        rows.append(mixed.hidden.to(hidden.dtype))
        targets.append(mixed.targets_c)
        weights.append(mix_w * lam)
        targets2.append(mixed.targets_u)
        weights2.append(mix_w * (1 - lam))
    out = fused_linear_cross_entropy(
        torch.cat(rows),
        weight,
        torch.cat(targets),
        torch.cat(weights),
        bias,
        torch.cat(targets2),
        torch.cat(weights2),
        chunk_size=chunk_size,
        logit_scale=logit_scale,
        softcap=softcap,
        with_stats=True,
        stats_rows=num_ntp,
    )
    mixup_ce = (lam * out.ce[num_ntp:] + (1 - lam) * out.ce2[num_ntp:]).sum() if lam is not None else None
    return SFTMixOutput(
        loss=out.loss,
        ntp_nll_sum=out.ce[:num_ntp].sum(),
        ntp_tokens=mask.sum(),
        mixup_ce_sum=mixup_ce if mixup_ce is not None else out.ce.new_zeros(()),
        mixed_tokens=torch.as_tensor(out.ce.shape[0] - num_ntp, device=hidden.device),
        entropy_sum=out.entropy[:num_ntp].sum(),
        num_correct=out.is_top1[:num_ntp].sum(),
    )


def add_sftmix_head(model: PreTrainedModel) -> None:
    """Patch ``model.forward``: ``model(input_ids, attention_mask, labels=labels, sftmix={...})`` returns an
    `SFTMixOutput` computed inside the forward from the backbone's last hidden states.

    The keys of ``sftmix`` are the keyword arguments of `sftmix_head_loss` after ``bias`` (``ntp_weight``,
    ``mixup_weight``, ``mixup_role``, ``lambdas``, ``chunk_size``). Without ``sftmix`` the previous forward runs
    (TRL's fused forward, or the model's own), so generation and TRL's evaluation are unchanged. Patch the base
    model under PEFT, after TRL's ``add_fused_lm_head``.
    """
    previous_forward = model.forward
    logit_scale, softcap = lm_head_transform(model)

    @functools.wraps(type(model).forward)
    def _sftmix_forward(self, *args, sftmix: dict[str, Any] | None = None, **kwargs):
        if sftmix is None:
            return previous_forward(*args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs["use_cache"] = False
        # Looked up on each call: FSDP and PEFT replace modules after patching
        backbone_outputs = self.base_model(*args, **kwargs)
        weight, bias = lm_head_parameters(self)
        hidden = backbone_outputs.last_hidden_state[:, :-1].to(weight.device)
        with maybe_gather_lm_head_ctx(weight, bias):
            return sftmix_head_loss(
                hidden,
                labels[:, 1:].to(weight.device),
                weight,
                bias,
                logit_scale=logit_scale,
                softcap=softcap,
                **sftmix,
            )

    model.forward = types.MethodType(_sftmix_forward, model)


def _sequence_parallel(accelerator: Any) -> bool:
    """Whether Ulysses sequence parallelism is on (TRL then leaves the loss reduction to the model)."""
    config = getattr(accelerator, "parallelism_config", None)
    return bool(config is not None and getattr(config, "sp_enabled", False))


class SFTMixTrainer(SFTTrainer):
    """`trl.SFTTrainer` with SFTMix's Mixup regulariser; it takes the same arguments.

    With ``args.mixup_weight > 0`` (an `SFTMixConfig`), ``args.dynamics_path`` gives each training example's
    split, and the loss is ``L_NTP + mixup_weight * L_mixup`` (see the module docstring). The training dataset
    needs an ``id`` column matching the dynamics file (``sftmix.data`` makes one); it may be tokenized already
    (``id``, ``input_ids``, ``labels``: TRL then skips its own tokenization). With ``mixup_weight = 0`` training
    is exactly ``trl.SFTTrainer``'s. ``confident_by_id`` (keyword only) is `sftmix.pairing.read_dynamics_splits` of
    ``args.dynamics_path`` when the caller has read it already (`train` does); by default the file is read here.

    Example (``model``, ``tokenizer`` and a tokenized ``dataset`` with an ``id`` column):
        >>> args = SFTMixConfig(output_dir="out", dynamics_path="dyn/dynamics.jsonl")  # doctest: +SKIP
        >>> SFTMixTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()  # doctest: +SKIP
    """

    _tag_names = ["trl", "sft", "sftmix"]

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
        if self._mixup:
            self._check_mixup_args(args)
            # Read (and validate) the dynamics file before the model and the dataset are prepared
            if confident_by_id is None:
                confident_by_id = read_dynamics_splits(args.dynamics_path)
            self._confident_by_id = confident_by_id
        super().__init__(model, args, *pos_args, **kwargs)

        if self._mixup:
            if not isinstance(self.train_dataset, Dataset):
                raise SFTMixError(
                    "Mixup needs a map-style datasets.Dataset (not an IterableDataset) to pair examples"
                )
            ids = self.train_dataset["id"] if "id" in self.train_dataset.column_names else None
            if ids is None:
                raise SFTMixError(
                    "Mixup needs an 'id' column in the training dataset to find each example's split"
                )
            # every training id must be in the split, and both halves non-empty
            align_split(self._confident_by_id, ids, args.dynamics_path)
        self.data_collator = MixupRoleCollator(
            self.data_collator, self._confident_by_id if self._mixup else None
        )
        # The fused head of `sftmix.head` computes its gradients in the forward pass: on CPU it is 2-3x faster than
        # TRL's chunked head, so it also serves the NTP loss, whenever the loss is TRL's plain NLL.
        if self._mixup and self.aux_loss_enabled:
            raise SFTMixError(
                "Mixup does not add the MoE router's auxiliary loss: set router_aux_loss_coef=0, or mixup_weight=0"
            )
        self._own_head = self._mixup or (
            args.ntp_fused_head
            and args.loss_type == "nll"
            and self.label_smoother is None
            and self.compute_loss_func is None
            and not self.aux_loss_enabled
            and not _sequence_parallel(self.accelerator)
        )
        if self._own_head:
            add_sftmix_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._micro_step = 0
        self._num_mixed_in_window: torch.Tensor | None = None

    @staticmethod
    def _check_mixup_args(args: SFTMixConfig) -> None:
        if not args.dynamics_path:
            raise SFTMixError(
                "mixup_weight > 0 needs dynamics_path (the dynamics.jsonl of `sftmix dynamics`); set mixup_weight=0 "
                "for plain SFT"
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
        if args.loss_type != "nll" or args.label_smoothing_factor > 0:
            raise SFTMixError(
                "Mixup adds to the plain NLL loss: set loss_type='nll' and label_smoothing_factor=0 (or mixup_weight=0)"
            )
        if args.train_sampling_strategy != "random":
            logger.warning(
                "train_sampling_strategy=%r is ignored with Mixup: batches are balanced pairs",
                args.train_sampling_strategy,
            )

    def train(self, *args, **kwargs):
        """``SFTTrainer.train``, refusing to start unless the launched processes form one process group, and
        checking at the end that every process holds the same weights (`sftmix.distributed`)."""
        check_process_group(self.accelerator, self.args.world_size)
        result = super().train(*args, **kwargs)
        check_replicas_agree(self.model, self.accelerator)
        return result

    # ---- data --------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "id" not in self._signature_columns:  # keep `id` through the pruning of unused columns
            self._signature_columns = [*self._signature_columns, "id"]

    def _get_train_sampler(self, train_dataset=None):
        if not self._mixup:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        confident = align_split(self._confident_by_id, dataset["id"], self.args.dynamics_path)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return BalancedPairSampler(
            confident, self._train_batch_size, seed=seed, num_replicas=self.args.world_size
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._micro_step = 0  # a new accumulation window: lambdas are seeded by (step, micro-step)
        if self._mixup and batch_samples:
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
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                loss = result[0] if return_outputs else result
                flag = self.accelerator.gather((~torch.isfinite(loss.detach())).float().reshape(1)).sum()
                if flag > 0:
                    self._stop_on_nonfinite(example_ids, f"loss {loss.item()}")
            return result

        micro_step, self._micro_step = self._micro_step, self._micro_step + 1
        labels = inputs["labels"][:, 1:]
        if self._mixup:
            lambdas = self._draw_lambdas(roles.numel() // 2, micro_step).to(roles.device)
        else:
            roles, lambdas = None, labels.new_zeros(0, dtype=torch.float32)
        # TRL's normalisation: a sum over tokens divided by the window's token count on all processes; DDP then
        # averages the gradients over processes, which the factor `processes` undoes.
        if num_items_in_batch is None:
            ntp_count = (labels != -100).sum()
            mix_count = count_mixed_tokens(*(labels[rows] for rows in pair_rows(roles))) if self._mixup else 1
            processes = 1
        else:
            ntp_count, mix_count = num_items_in_batch, self._num_mixed_in_window if self._mixup else 1
            processes = self.accelerator.num_processes // self.get_tp_size()
            processes = processes if self.args.average_tokens_across_devices else 1
        ntp_count = torch.as_tensor(ntp_count, device=labels.device).float().clamp(min=1)
        mix_count = torch.as_tensor(mix_count, device=labels.device).float().clamp(min=1)
        spec = {
            "ntp_weight": processes / ntp_count,
            "mixup_weight": self.args.mixup_weight * processes / mix_count,
            "mixup_role": roles,
            "lambdas": lambdas,
            "chunk_size": self.args.head_chunk_size,
        }
        inputs["use_cache"] = False
        outputs = model(**inputs, sftmix=spec)
        loss = outputs.loss

        stats = torch.stack(
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
        stats = self.accelerator.gather(stats[None]).sum(0).tolist()
        nll, tokens, mix_ce, mixed, entropy, correct, lam_sum, pairs, nonfinite = stats
        if nonfinite > 0:
            self._stop_on_nonfinite(
                example_ids, f"loss_ntp {nll / max(tokens, 1)}, loss_mixup {mix_ce / max(mixed, 1)}"
            )
        metrics = self._metrics["train"]
        if self._mixup:
            metrics["loss_ntp"].append(nll / max(tokens, 1))
            metrics["loss_mixup"].append(mix_ce / max(mixed, 1))
            metrics["mixup_lambda"].append(lam_sum / max(pairs, 1))
            metrics["mixed_tokens"].append(mixed)
        metrics["entropy"].append(entropy / tokens if tokens > 0 else 0.0)
        metrics["mean_token_accuracy"].append(correct / tokens if tokens > 0 else 0.0)
        num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

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


def train(model_args: ModelConfig, data_args: DataArguments, training_args: SFTMixConfig) -> str:
    """Stage 3 end to end: load, tokenize, train (resuming from the last checkpoint), save; return the model dir.

    Re-running with the same ``output_dir`` resumes from its latest ``checkpoint-*``; once ``output_dir/final``
    exists (it is renamed into place only when complete), the run is done and returns at once.

    Args:
        model_args: TRL's model config (``model_name_or_path``, ``dtype``, ``use_peft``, ``lora_r``...).
        data_args: Where the training data is (`DataArguments`).
        training_args: The `SFTMixConfig` (``output_dir``, ``mixup_weight``, ``dynamics_path``, ``max_length``...).

    Returns:
        The final model directory (``output_dir/final``): the model (or the PEFT adapter) and its tokenizer.
    """
    from .data import prepare_sft_dataset
    from .models import load_model, load_tokenizer

    output_dir = Path(training_args.output_dir)
    final_dir = output_dir / FINAL_DIR
    if final_dir.is_dir():
        logger.info("%s exists: training already finished", final_dir)
        return str(final_dir)
    if not model_args.model_name_or_path:
        raise SFTMixError("model_name_or_path is not set")
    # Inputs are checked before anything is written: data first (cheap), then the model
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    dataset = prepare_sft_dataset(
        data_args, tokenizer, training_args.max_length, training_args.truncation_mode
    )
    confident_by_id = None
    if training_args.mixup_weight > 0:  # the dynamics file and the batch shape, before anything is written
        SFTMixTrainer._check_mixup_args(training_args)
        # Read once: the trainer gets the parsed file
        confident_by_id = read_dynamics_splits(training_args.dynamics_path)
        align_split(confident_by_id, dataset["id"], training_args.dynamics_path)
    model_kwargs = {"trust_remote_code": getattr(model_args, "trust_remote_code", False)}
    if model_args.attn_implementation is not None:
        model_kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_model(model_args.model_name_or_path, dtype=model_args.dtype or "float32", **model_kwargs)
    trainer = SFTMixTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        confident_by_id=confident_by_id,
    )
    last = last_complete_checkpoint(output_dir)
    if last is not None:
        logger.info("Resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)

    tmp_dir = output_dir / f"{FINAL_DIR}.tmp"
    if trainer.accelerator.is_main_process and tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp_dir))  # every process calls it (FSDP/ZeRO-3 gather); the main one writes
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(tmp_dir)
        atomic_write_json(
            tmp_dir / "sftmix_train.json",
            {
                "model_name_or_path": model_args.model_name_or_path,
                "mixup_weight": training_args.mixup_weight,
                "mixup_alpha": training_args.mixup_alpha,
                "dynamics_path": training_args.dynamics_path,
                "global_step": trainer.state.global_step,
            },
        )
        os.replace(tmp_dir, final_dir)  # the rename marks the run as finished
    trainer.accelerator.wait_for_everyone()
    return str(final_dir)
