"""Time the fused LM head + cross-entropy (forward + backward) against full logits and TRL's chunked head.

Default sizes are SmolLM2-135M's head (V=49152, H=576) on 1024 tokens. Run on CPU with::

    python benchmarks/bench_head.py --threads 2 --repeats 3

Each line prints the median seconds of one forward + backward. The fused head's extra memory is bounded by
the chunk (``[chunk, V]`` buffers) instead of ``[N, V]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from trl.kernels import ChunkedLogProbFunction

from sftmix.head import fused_linear_cross_entropy


def full_logits(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def trl_chunked(hidden, weight, targets):
    log_probs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]
    return -log_probs.mean()


def fused(chunk_size):
    def run(hidden, weight, targets):
        n = hidden.shape[0]
        weights = torch.full((n,), 1.0 / n)
        return fused_linear_cross_entropy(hidden, weight, targets, weights, chunk_size=chunk_size).loss

    return run


def bench(methods, hidden, weight, targets, autocast: bool, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward per method; the methods take turns so that load from other
    processes affects them alike."""
    times = {name: [] for name in methods}
    for i in range(repeats + 1):
        for name, fn in methods.items():
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fn(hidden, weight, targets)
            loss.backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk_sizes", type=str, default="256,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden).requires_grad_()
    weight = (0.02 * torch.randn(args.vocab, args.hidden)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,))
    methods = {"full logits (F.cross_entropy)": full_logits, "TRL ChunkedLogProbFunction": trl_chunked}
    for c in args.chunk_sizes.split(","):
        methods[f"sftmix fused, chunk {c}"] = fused(int(c))
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} threads={args.threads}, forward+backward seconds")
    for autocast in (False, True):
        medians = bench(methods, hidden, weight, targets, autocast, args.repeats)
        for name, seconds in medians.items():
            print(f"{'bf16 autocast' if autocast else 'fp32':>13} | {name:<32} | {seconds:.3f}")


if __name__ == "__main__":
    main()
