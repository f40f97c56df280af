"""``sftmix eval``: the paper's benchmarks that run offline, and answer files for the judged ones.

- Multiple choice by log-likelihood (``medqa``, ``medmcqa``, ``pubmedqa``, ``mmlu_medical``, generic ``mc``):
  `sftmix.evaluation.tasks` reads the files and builds lm-evaluation-harness prompts,
  `sftmix.evaluation.multiple_choice` scores them.
- ``ifeval``: `sftmix.evaluation.ifeval`, greedy answers scored by the official checkers (via lm-eval).
- ``perplexity``: `sftmix.evaluation.perplexity`, response perplexity on any SFT file.
- ``mt_bench`` / ``alpaca_eval``: `sftmix.evaluation.generation` writes the official answer files;
  `sftmix.evaluation.judge` grades MT-Bench through an OpenAI-compatible endpoint when asked.
- `sftmix.evaluation.compare`: tables, and models side by side with deltas.
"""

from __future__ import annotations

from .runner import TASKS, run_eval

__all__ = ["TASKS", "run_eval"]
