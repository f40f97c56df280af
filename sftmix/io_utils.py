"""Atomic file writes and the one JSON-lines reader.

Every file sftmix produces is written to a temporary file in the same directory and moved into place
with ``os.replace``, so a crash never leaves a half-written file that a resumed run would read as complete.
Every JSON-lines file sftmix reads (data, dynamics, benchmarks) goes through `iter_jsonl`, so a broken line is
reported the same way everywhere.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SFTMixError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    Temporary files of an earlier write of ``path`` that a kill -9 interrupted are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
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


def read_utf8(path: str | os.PathLike) -> str:
    """The text of ``path`` (a UTF-8 byte-order mark is dropped); non-UTF-8 bytes are an `SFTMixError` naming
    the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + len(data) - len(e.object)  # "utf-8-sig" counts from after the byte-order mark
        line = data[:start].count(b"\n") + 1
        raise SFTMixError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {start})") from e


def iter_jsonl(path: str | os.PathLike, text: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line of a JSON-lines file (lines count from 1).

    Args:
        path: The file; also the name used in error messages.
        text: Its content, when the caller has read it already (default: `read_utf8` of ``path``).

    Raises:
        SFTMixError: naming the file and line, for a line that is not JSON or not a JSON object.
    """
    if text is None:
        text = read_utf8(path)
    # Universal newlines, as a file opened in text mode: `str.splitlines` would also cut a record inside a
    # JSON string at U+2028 or U+0085, which `json.dumps(..., ensure_ascii=False)` writes unescaped.
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SFTMixError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise SFTMixError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file, in order (see `iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]


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
        if step.isdigit() and path.is_dir() and _is_json(path / "trainer_state.json"):
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def _is_json(path: Path) -> bool:
    """A file that parses: a ``trainer_state.json`` cut short by a full disk is not a resume point."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


NEARLY_FULL_MB = 16.0
"""Free space below which an errno-less write error counts as a full disk (a failed write fills it to ~0)."""


def _is_disk_full(error: BaseException | None, root: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain; or an error without errno (torch's zip writer raises a RuntimeError
    whose text changes between versions) while ``root``'s file system is nearly full."""
    errors = []
    while error is not None:
        errors.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in errors):
        return True
    if any("No space left on device" in str(e) for e in errors):
        return True
    return (
        any(type(e) is RuntimeError for e in errors) and shutil.disk_usage(root).free / 2**20 < NEARLY_FULL_MB
    )


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@contextmanager
def stop_cleanly_on_full_disk(output_dir: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while ``output_dir`` is written into one line, after removing what was half-written.

    A checkpoint the Trainer was saving (no parseable ``trainer_state.json``) and a ``final.tmp`` are removed,
    so the last complete checkpoint stays the resume point; the message names what was being written, the free
    space, and the size of that complete checkpoint (what the next save needs at least)."""
    try:
        yield
    except Exception as e:
        root = Path(output_dir)
        if not root.is_dir() or not _is_disk_full(e, root):
            raise
        complete = complete_checkpoints(root)
        half = [p for p in root.glob("checkpoint-*") if p.is_dir() and p not in complete]
        half += [p for p in (root / "final.tmp",) if p.exists()]
        for path in half:
            shutil.rmtree(path, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**20
        where = half[0] if half else getattr(e, "filename", None) or root
        last = complete[-1] if complete else None
        need = f"; a checkpoint of this run takes {_size_mb(last):.1f} MB ({last.name})" if last else ""
        resume = f"resumes from {last.name}" if last else "starts again"
        raise SFTMixError(
            f"disk full while writing {where} ({free:.1f} MB free on that file system{need}); the half-written "
            f"files are removed: free space (or set save_total_limit) and run the same command again ({resume})"
        ) from e


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest completely saved checkpoint of ``output_dir`` (see `complete_checkpoints`), or None."""
    checkpoints = complete_checkpoints(output_dir)
    return str(checkpoints[-1]) if checkpoints else None
