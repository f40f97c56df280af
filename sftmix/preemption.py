"""Preemption: SIGTERM or SIGINT stops a run cleanly, with a resume point, and a rerun continues it.

Clusters preempt with SIGTERM and kill with SIGKILL after a grace period (SLURM's ``KillWait``, Kubernetes'
``terminationGracePeriodSeconds``, torchrun's ``--shutdown_timeout``, 30 s by default). Two handlers share the work:

- During training, `StopOnSignal` (every `sftmix.SFTMixTrainer` has it, ``stop_on_signal=True``) turns the first
  signal into a request. At the end of the current optimizer step the ranks agree on it (one all-reduce of a
  flag per step, so all stop at the same step even if the signal reached them at different steps), the Trainer
  saves a complete ``checkpoint-N`` through its own path (the one every resume reads: weights, optimizer,
  scheduler, RNG, the online scorer's records), and training stops. `SFTMixTrainer.train` then raises
  `StoppedBySignal`, so no caller mistakes the partial model for a finished one.
- Outside training (loading, tokenizing, scoring a base model, writing ``final/``), `raise_on_signal` makes the
  signal raise `StoppedBySignal` at once: every file sftmix writes is written whole or not at all
  (`sftmix.io_utils`), and the stages resume from what exists.

A second signal during training exits at once (the default action), as a second Ctrl-C does elsewhere.

Why not transformers' ``enable_jit_checkpoint``: it waits 3 s, then each process saves on its own flag (processes
that saw the signal at different steps then wait forever in their next collective), it saves before the optimizer
step, and ``train()`` returns as if training had finished, so a driver would write ``final/``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(BaseException):
    """A run stopped by SIGTERM/SIGINT; ``resume_from`` is the checkpoint it saved (None outside training).

    A `BaseException`, as `KeyboardInterrupt` is, so that no ``except Exception`` on the way (a data loader's, a
    library's) turns a preemption into another error.
    """

    def __init__(self, signum: int, step: int | None = None, resume_from: str | Path | None = None) -> None:
        super().__init__(int(signum), step, None if resume_from is None else str(resume_from))  # picklable
        self.signum, self.step, self.resume_from = int(signum), step, resume_from

    def __str__(self) -> str:
        where = f" at step {self.step}, checkpoint saved in {self.resume_from}" if self.resume_from else ""
        return f"stopped by {signal.Signals(self.signum).name}{where}; run the same command again to resume"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's code for "killed by this signal"


def stopped_early(state: Any, control: Any) -> bool:
    """Whether training is stopping before its last step (a signal's stop): the callbacks that write what a
    whole epoch or run measured (the online scorer's records) must not write a partial one then."""
    return bool(control.should_training_stop) and state.global_step < state.max_steps


def _can_handle_signals() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def raise_on_signal() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `StoppedBySignal` (the handlers before it come back after)."""
    if not _can_handle_signals():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise StoppedBySignal(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopOnSignal(TrainerCallback):
    """Stop training at the end of the optimizer step during which SIGTERM/SIGINT came, with a checkpoint.

    Its handlers are in place from ``on_train_begin`` to ``on_train_end``; the previous ones come back after.
    Add it last, so the callbacks that work at a step's end (stage 1's scoring) finish that step first.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal that asked to stop, on this process
        self.stopped_at: int | None = None  # the step all processes stopped at
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        # Nothing is written here: a signal can interrupt a write to stderr (a progress bar), and writing to it
        # again from the handler raises "reentrant call"; `on_step_end` says what happens.
        if self.signum is not None:  # a second signal: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def on_train_begin(self, args, state, control, **kwargs):
        self.signum, self.stopped_at = None, None
        if (
            _can_handle_signals() and not self._previous
        ):  # a retry (auto_find_batch_size) keeps the first ones
            self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return control

    def on_step_end(self, args, state, control, **kwargs):
        asked = self._agreed_signal(args.device)
        if asked:
            self.signum = self.signum or asked
            self.stopped_at = state.global_step
            logger.warning(
                "%s: saving a checkpoint at step %d and stopping (a second signal stops at once)",
                signal.Signals(self.signum).name,
                state.global_step,
            )
            control.should_save = True  # whatever save_strategy says: this is the resume point
            control.should_evaluate = False  # the grace period is for the checkpoint
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # saved at the step's end already
            control.should_save = control.should_evaluate = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
        return control

    def restore(self) -> None:
        """Put back the signal handlers that were there before training (also after an exception)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _agreed_signal(self, device: torch.device) -> int:
        """The signal any process got (0: none): every process calls this at the same step, so all agree."""
        mine = self.signum or 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        flag = torch.tensor([mine], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def raise_if_stopped(self, trainer: Any) -> None:
        """After ``trainer.train()`` returned: raise `StoppedBySignal` naming the checkpoint if a signal came.

        Every process calls it. A signal that came after the last step's check (during the last save or the end
        of training) still stops the run, with a checkpoint of the finished training as the resume point, and so
        does a stop whose save something else cancelled (``save_strategy="best"``)."""
        if self.stopped_at is None and self._agreed_signal(trainer.args.device):
            self.stopped_at = trainer.state.global_step
        if self.stopped_at is None:
            return
        checkpoint = Path(trainer._get_output_dir(None)) / f"checkpoint-{self.stopped_at}"
        if not (checkpoint / "trainer_state.json").is_file():
            trainer._save_checkpoint(trainer.model, trial=None)
        raise StoppedBySignal(self.signum or signal.SIGTERM, self.stopped_at, checkpoint)
