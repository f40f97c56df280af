"""Build the weak reference of the weak-to-strong ablation: a smaller SmolLM2, pruned and then healed.

The paper measures confidence with a smaller model of the same family (Gemma-2B for Llama-3.1-8B) and trains
the larger model on that split. No smaller model with SmolLM2's tokenizer is available offline (135M is the
family's smallest), so this script makes one:

1. **Prune**: drop a contiguous block of decoder layers (``--drop 14:28`` keeps layers 0-13, 28 and 29:
   16 of 30 layers, 85M of 135M parameters), as in ShortGPT / "The Unreasonable Ineffectiveness of the Deeper
   Layers". Pruned alone, SmolLM2 is no language model: held-out perplexity goes from ~7 to millions.
2. **Heal**: train the pruned model with plain NTP (``sftmix train --mixup_weight 0``) on ``--n_heal`` Alpaca
   examples that are in neither the study's training nor its held-out set, so the weak model never sees the
   study's data before its own stage-1 run.

The study then runs stage 1 with it as the reference (``efficacy_study.py --arms weak --weak_reference
OUTPUT/heal/final``). It stands in for a separately pre-trained small model, and the README says so.

    python benchmarks/make_weak_reference.py --output /work/runs/weak-smollm2-16l
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from efficacy_study import sample_study_rows

from sftmix.io_utils import atomic_write_jsonl


def parse_block(text: str) -> tuple[int, int]:
    """``"14:28"`` -> ``(14, 28)``: the half-open range of decoder layers to drop (an argparse type).

    >>> parse_block("14:28")
    (14, 28)
    """
    start, _, stop = text.partition(":")
    if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
        raise argparse.ArgumentTypeError(f"expected START:STOP with START < STOP, got {text!r}")
    return int(start), int(stop)


def prune(model_name: str, block: tuple[int, int], output: Path) -> None:
    """Save ``model_name`` without decoder layers ``block`` (and its tokenizer) to ``output``, atomically."""
    from sftmix.data.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(model_name)
    model, tokenizer = load_model(path, dtype=torch.float32), load_tokenizer(path)
    layers = model.model.layers
    if block[1] > len(layers) or block[1] - block[0] >= len(layers):
        sys.exit(f"--drop {block[0]}:{block[1]} must leave layers of the {len(layers)} there are")
    kept = [i for i in range(len(layers)) if not block[0] <= i < block[1]]
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    partial = output.with_name(output.name + ".partial")  # renamed into place: nothing half-written
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(output)
    params = sum(p.numel() for p in model.parameters())
    print(f"kept layers {kept} of {len(layers)}: {params / 1e6:.1f}M parameters -> {output}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--drop", type=parse_block, default=(14, 28), help="decoder layers START:STOP to drop"
    )
    parser.add_argument("--study", default="alpaca", help="the study whose source the healing data come from")
    parser.add_argument(
        "--skip", type=int, default=512, help="examples the study uses (n_train + n_heldout): not healed on"
    )
    parser.add_argument("--n_heal", type=int, default=2000, help="healing examples")
    parser.add_argument("--lr", type=float, default=3e-4, help="healing learning rate")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--output", required=True, help="directory: pruned/, heal.jsonl, heal/final")
    args = parser.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pruned, heal_data, healed = out / "pruned", out / "heal.jsonl", out / "heal"
    if not (pruned / "config.json").exists():
        prune(args.model, args.drop, pruned)
    if not heal_data.exists():
        atomic_write_jsonl(heal_data, sample_study_rows(args.study, args.skip, args.skip + args.n_heal))
    if not (healed / "final" / "config.json").exists():  # `sftmix train` resumes from its last checkpoint
        cmd = ["sftmix", "train", "--model_name_or_path", str(pruned), "--dataset_name", str(heal_data)]
        cmd += ["--mixup_weight", "0", "--num_train_epochs", "1", "--learning_rate", str(args.lr)]
        cmd += ["--per_device_train_batch_size", str(args.batch), "--max_length", str(args.max_length)]
        cmd += ["--lr_scheduler_type", "cosine", "--warmup_steps", "0.05", "--weight_decay", "0.0"]
        cmd += ["--save_strategy", "steps", "--save_steps", "50", "--save_total_limit", "1"]
        cmd += ["--logging_steps", "10", "--seed", "0", "--output_dir", str(healed)]
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"healing failed: {' '.join(cmd)}")
        for checkpoint in healed.glob("checkpoint-*"):  # the final model is all the study needs
            shutil.rmtree(checkpoint)
    print(f"weak reference: {healed / 'final'}")


if __name__ == "__main__":
    main()
