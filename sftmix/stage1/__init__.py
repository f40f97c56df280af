"""Stages 1 and 2: how confident the model is on each training example, and the median split.

`scoring` measures response perplexity; `scorers` is the one registry of the five ways to make the split (and the
``sftmix dynamics`` scoring of given checkpoints), using the reference run (`reference`) or the online measurement
(`online`); `files` writes stage 1's directory, `splits` reads and writes ``dynamics.jsonl`` and the median split,
`datamap` draws the data map.
"""
