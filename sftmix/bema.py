"""BEMA weights beside every checkpoint: TRL's `trl.BEMACallback`, saved where an evaluation can find them.

TRL's callback (Block and Zhang, "BEMA", arXiv 2508.00180) keeps ``theta'_t = alpha_t (theta_t - theta_0) +
EMA_t`` in a CPU copy of the model and saves it once, to ``output_dir/bema`` at the end of training. Comparing
it with plain training per epoch, as the efficacy studies do, needs it at every checkpoint too: `BEMASaver` adds
that (``checkpoint-N/bema/``, with the tokenizer, so ``sftmix eval`` loads it as it is). The BEMA buffers are not
part of the resume state: a resumed run restarts them from the resumed weights, as TRL's callback does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerControl, TrainerState, TrainingArguments
from trl import BEMACallback

BEMA_DIR = "bema"


class BEMASaver(BEMACallback):
    """`trl.BEMACallback` (its defaults unless given) that also saves the BEMA model into each checkpoint.

    >>> BEMASaver(update_freq=1).update_freq
    1
    """

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.running_model is None or not state.is_world_process_zero:
            return
        target = Path(args.output_dir) / f"checkpoint-{state.global_step}" / BEMA_DIR
        self.running_model.save_pretrained(target)
        if kwargs.get("processing_class") is not None:
            kwargs["processing_class"].save_pretrained(target)
