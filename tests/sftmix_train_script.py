"""Tiny SFTMix training data for the tests, and a script for the 2-process run.

``torchrun --nproc_per_node 2 tests/sftmix_train_script.py MODEL_DIR OUT_DIR [BATCH]`` trains a few
Mixup steps with DDP (gloo) and writes, per process, the roles and example ids of every micro-batch it saw
(``OUT_DIR/rank{r}.json``), and the final weights (``OUT_DIR/weights.safetensors``). Without torchrun it
trains in one process (with ``BATCH`` = 4 that is the same global batch as 2 processes of 2). ``OUT_DIR/dynamics.jsonl`` must exist: ``write_dynamics(path, make_dataset(16))``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from datasets import Dataset


def make_dataset(
    num_examples: int = 12, vocab_size: int = 40, seed: int = 0, multi_turn: bool = True
) -> Dataset:
    """A tokenized SFT dataset (``id``, ``input_ids``, ``labels``) with varied lengths and multi-turn masks."""
    rng = random.Random(seed)
    rows = {"id": [], "input_ids": [], "labels": []}
    for i in range(num_examples):
        ids, labels = [], []
        for _turn in range(rng.randint(1, 2) if multi_turn else 1):
            prompt = [rng.randrange(4, vocab_size) for _ in range(rng.randint(2, 6))]
            response = [rng.randrange(4, vocab_size) for _ in range(rng.randint(2, 9))]
            ids += prompt + response
            labels += [-100] * len(prompt) + response
        rows["id"].append(f"ex{i:03d}")
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
    return Dataset.from_dict(rows)


def write_dynamics(path: Path, dataset: Dataset) -> Path:
    """A dynamics.jsonl whose median split makes every other example confident."""
    with open(path, "w") as f:
        for k, example_id in enumerate(dataset["id"]):
            split = "confident" if k % 2 == 0 else "unconfident"
            f.write(
                json.dumps({"id": example_id, "split": split, "confidence": -float(k), "perplexities": [1.0]})
            )
            f.write("\n")
    return path


def main(model_dir: str, out_dir: str, batch_size: int = 2) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftmix import SFTMixConfig, SFTMixTrainer

    out = Path(out_dir)
    dataset = make_dataset(num_examples=16)
    dynamics = out / "dynamics.jsonl"  # written by the caller: write_dynamics(dynamics, make_dataset(16))
    seen: list[dict] = []

    class RecordingTrainer(SFTMixTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append({"ids": list(inputs["example_ids"]), "roles": inputs["mixup_role"].tolist()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = SFTMixConfig(
        output_dir=str(out / "run"),
        dynamics_path=str(dynamics),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        ddp_backend="gloo",
        use_cpu=True,
        bf16=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    changed = all(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if "loss_mixup" in entry]
    result = {"rank": trainer.args.process_index, "world": trainer.args.world_size, "seen": seen}
    result.update({"all_changed": changed, "logs": logs})
    (out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(result))
    if trainer.args.process_index == 0:
        from safetensors.torch import save_file

        save_file(
            {n: p.detach().contiguous() for n, p in trainer.model.named_parameters()},
            out / "weights.safetensors",
        )
    if torch.distributed.is_initialized():  # a clean teardown: a rank leaving gloo early can abort the other
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
