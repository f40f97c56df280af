"""Data selection: keep the longest responses, the examples a file of ids names, or drop the least confident.

The paper shows SFTMix also helps on top of data selection (AlpaGasus-style filtered sets and the
"longest response" heuristic). ``selection`` takes three forms:

- ``longest:N`` keeps the N examples whose assistant responses are longest. Length is the total number of
  characters of all assistant turns, or of tokens when a tokenizer is given (the CLI passes the model's), so
  the choice is the one the model will see. Ties keep the earlier example.
- ``drop_unconfident:F`` (0 < F < 1) drops the fraction F of the examples that stage 1 finds least confident:
  data cleaning with the data map. It needs the confidences, so it is applied *after* stage 1 (by
  `sftmix.stage1.splits.drop_unconfident`, the dynamics file's reader); here it is only validated, and stage 1 scores
  every example.
- anything else is a path to a file of example ids (the ``id`` column of `sftmix.data.dataset.load_sft_dataset`):
  one id per line (blank lines and ``#`` comments skipped), or a JSON list of ids.

The kept examples stay in their dataset order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..errors import SFTMixError

logger = logging.getLogger(__name__)


def response_lengths(dataset: Dataset, tokenizer: Any | None = None) -> list[int]:
    """Length of each example's assistant text: characters, or tokens of ``tokenizer`` if one is given.

    >>> ds = Dataset.from_dict({"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "abc"}]]})
    >>> response_lengths(ds)
    [3]
    """
    lengths = []
    for messages in dataset["messages"]:
        texts = [m["content"] for m in messages if m["role"] == "assistant"]
        if tokenizer is None:
            lengths.append(sum(len(t) for t in texts))
        else:
            lengths.append(sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts))
    return lengths


def select_longest(dataset: Dataset, n: int, tokenizer: Any | None = None) -> Dataset:
    """The ``n`` examples with the longest responses (see `response_lengths`), in dataset order.

    >>> ds = Dataset.from_dict({"messages": [
    ...     [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}] for text in ["aa", "a", "aaa", "aa"]
    ... ]})
    >>> [m[1]["content"] for m in select_longest(ds, 2)["messages"]]  # ties keep the earlier example
    ['aa', 'aaa']
    """
    lengths = response_lengths(dataset, tokenizer)
    if n >= len(dataset):
        logger.warning("selection longest:%d keeps all %d examples", n, len(dataset))
        return dataset
    ranked = sorted(range(len(dataset)), key=lambda i: (-lengths[i], i))
    return dataset.select(sorted(ranked[:n]))


def read_id_file(path: Path) -> list[tuple[str, str]]:
    """``(location, id)`` pairs from a file of ids: a JSON list, or one id per line (``#`` comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SFTMixError(f"{path}: not UTF-8 text") from e
    if text.lstrip().startswith("["):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise SFTMixError(f"{path}: line {e.lineno}: malformed JSON list of ids ({e.msg})") from e
        for k, item in enumerate(ids):
            if not isinstance(item, str) or not item.strip():
                raise SFTMixError(f"{path}: item {k + 1} of the JSON list is not an id string: {item!r}")
        return [(f"{path}: item {k + 1}", item.strip()) for k, item in enumerate(ids)]
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            pairs.append((f"{path}: line {lineno}", line))
    return pairs


def select_ids(dataset: Dataset, path: Path) -> Dataset:
    """The examples whose ``id`` the file at ``path`` lists, in dataset order; an unknown id is an error."""
    pairs = read_id_file(path)
    if not pairs:
        raise SFTMixError(f"{path}: lists no example id")
    known = set(dataset["id"])
    for location, example_id in pairs:
        if example_id not in known:
            raise SFTMixError(f"{location}: unknown example id {example_id!r} (not in the dataset)")
    wanted = {example_id for _, example_id in pairs}
    return dataset.select([i for i, example_id in enumerate(dataset["id"]) if example_id in wanted])


DROP_UNCONFIDENT = "drop_unconfident:"


def unconfident_fraction(selection: str | None) -> float | None:
    """The fraction F of ``drop_unconfident:F``, validated; None for any other selection.

    >>> unconfident_fraction("drop_unconfident:0.25"), unconfident_fraction("longest:10")
    (0.25, None)
    """
    if not selection or not selection.startswith(DROP_UNCONFIDENT):
        return None
    text = selection.removeprefix(DROP_UNCONFIDENT).strip()
    try:
        fraction = float(text)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction < 1:
        raise SFTMixError(
            f"selection {selection!r}: expected drop_unconfident:F with F a fraction between 0 and 1 "
            "(the share of the least confident examples to drop, e.g. drop_unconfident:0.25)"
        )
    return fraction


def apply_selection(dataset: Dataset, selection: str | None, tokenizer: Any | None = None) -> Dataset:
    """Apply a ``selection`` spec to an ``id``/``messages`` dataset (see the module docstring).

    Args:
        dataset: The dataset from `sftmix.data.dataset.load_sft_dataset`.
        selection: None or empty (keep everything), ``longest:N``, or a path to a file of ids;
            ``drop_unconfident:F`` is only validated (it is applied after stage 1, see the module docstring).
        tokenizer: With ``longest:N``, measure responses in this tokenizer's tokens instead of characters.

    Raises:
        SFTMixError: a malformed ``longest:`` spec, a missing id file, or an id not in the dataset (naming
            the file and line).
    """
    if not selection or unconfident_fraction(selection) is not None:
        return dataset
    if selection.startswith("longest:"):
        count = selection.removeprefix("longest:").strip()
        if not count.isdigit() or int(count) < 1:
            raise SFTMixError(f"selection {selection!r}: expected longest:N with N a positive integer")
        kept = select_longest(dataset, int(count), tokenizer)
    else:
        path = Path(selection).expanduser()
        if not path.is_file():
            raise SFTMixError(
                f"selection {selection!r}: expected longest:N, drop_unconfident:F or an existing file of example ids"
            )
        kept = select_ids(dataset, path)
    logger.info("Selection %s kept %d of %d examples", selection, len(kept), len(dataset))
    return kept
