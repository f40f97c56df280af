"""``sftmix`` with a real signal sent to its own process at a chosen point, so preemption tests land where they aim.

``python tests/signal_at_step.py WHERE STEP SIGNAL RANK sftmix-args...`` (also under torchrun) runs
``sftmix.cli.main(sftmix-args)`` and, on process ``RANK`` only (-1: every process), sends ``SIGNAL`` (TERM, INT)
to itself once:

- ``WHERE=reference`` / ``train``: at the end of optimizer step ``STEP`` of stage 1's reference run / of stage 3;
- ``WHERE=scoring``: while stage 1 scores the reference run's checkpoint at step ``STEP``;
- ``WHERE=train_end``: when stage 3's training ends (after its last step's check; ``STEP`` is ignored).

The signal goes through the kernel to the handlers as an external one would; only its timing is chosen.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

import sftmix.stage1.scoring as scoring
from sftmix import SFTMixTrainer
from sftmix.cli.commands import main

WHERE, STEP, SIGNUM, RANK = (
    sys.argv[1],
    int(sys.argv[2]),
    signal.Signals[f"SIG{sys.argv[3]}"],
    int(sys.argv[4]),
)
MY_RANK = int(os.environ.get("RANK", "0"))
sent = False


def _send() -> None:
    global sent
    if not sent and RANK in (-1, MY_RANK):
        sent = True
        os.kill(os.getpid(), SIGNUM)


class _SignalAtStep(TrainerCallback):
    def __init__(self, stage: str) -> None:
        self.stage = stage

    def on_step_end(self, args, state, control, **kwargs):
        if self.stage == WHERE and state.global_step == STEP:
            _send()

    def on_train_end(self, args, state, control, **kwargs):
        if WHERE == "train_end" and self.stage == "train":
            _send()


_init = SFTMixTrainer.__init__


def _init_with_signal(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    stage = "reference" if Path(self.args.output_dir).name == "reference" else "train"
    self.callback_handler.callbacks.insert(1, _SignalAtStep(stage))  # before the stop's own check


SFTMixTrainer.__init__ = _init_with_signal
_score = scoring.ScoringSettings.score


def _score_with_signal(self, model, dataset, desc: str = "Scoring"):
    if WHERE == "scoring" and desc == f"Scoring step {STEP}":
        _send()
    return _score(self, model, dataset, desc=desc)


scoring.ScoringSettings.score = _score_with_signal

if __name__ == "__main__":
    sys.exit(main(sys.argv[5:]))
