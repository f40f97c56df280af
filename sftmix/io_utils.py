"""Atomic file writes and JSON-lines helpers.

Every file sftmix produces is written to a temporary file in the same directory and moved into place
with ``os.replace``, so a crash never leaves a half-written file that a resumed run would read as complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` dirs of a Trainer run that were saved completely, oldest first.

    The HF Trainer writes a checkpoint in place and ``trainer_state.json`` last, so a run killed while saving
    leaves a directory without it; such a directory is not a resume point.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest completely saved checkpoint of ``output_dir`` (see `complete_checkpoints`), or None."""
    checkpoints = complete_checkpoints(output_dir)
    return str(checkpoints[-1]) if checkpoints else None
