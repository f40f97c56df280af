"""Build the weak reference model of the weak-to-strong ablation: the target model with layers dropped.

The paper measures confidence with a smaller model of the same family (same tokenizer) and trains the larger
one with that split. No smaller model with SmolLM2's tokenizer is available offline, so this makes one: keep
``--keep`` of the decoder layers, evenly spaced, first and last included (layer pruning as in ShortGPT, without
healing). The stage-1 reference run then fine-tunes it for one epoch like any reference model. It is a
substitute for a separately pre-trained small model, and the README says so.

    python benchmarks/make_weak_reference.py --keep 10 --output /work/runs/weak-smollm2-10l
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def evenly_spaced(n: int, keep: int) -> list[int]:
    """``keep`` indices of ``range(n)``, evenly spaced, first and last included.

    >>> evenly_spaced(30, 10)
    [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    """
    if not 2 <= keep <= n:
        raise ValueError(f"keep must be in [2, {n}], got {keep}")
    return [round(i * (n - 1) / (keep - 1)) for i in range(keep)]


def main() -> None:
    from sftmix.models import load_model, load_tokenizer, resolve_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--keep", type=int, default=10, help="decoder layers to keep")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if (Path(args.output) / "config.json").exists():
        print(f"{args.output} exists")
        return
    path = resolve_model(args.model)
    model, tokenizer = load_model(path, dtype=torch.float32), load_tokenizer(path)
    layers = model.model.layers
    kept = evenly_spaced(len(layers), args.keep)
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    params = sum(p.numel() for p in model.parameters())
    partial = Path(args.output + ".partial")  # renamed into place: a killed run leaves no half-written model
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(args.output)
    print(f"kept layers {kept} of {len(layers)}: {params / 1e6:.1f}M parameters -> {args.output}")


if __name__ == "__main__":
    main()
