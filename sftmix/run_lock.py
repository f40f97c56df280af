"""One writer per ``output_dir``: the lock that ``sftmix train|run|dynamics|demo`` hold while they run.

A job submitted twice, or a rerun while the first is still alive, would otherwise train into the same
directory and corrupt each other's checkpoints. `output_dir_lock` creates ``<output_dir>/.sftmix.lock``
exclusively (``O_CREAT | O_EXCL``, atomic on local and NFS v3+ file systems), holding the host, pid, the
process's start time and the time it was taken, and removes it at exit. A second run stops at once with one line
naming the holder. A lock whose process is gone on this host (a run killed with SIGKILL, a preempted node that
came back) is taken over with a warning; a lock of another host is never taken over, since its pid cannot be
checked from here. Only the main process of a multi-process run (global rank 0) holds it, so on a shared file
system several machines share one lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SFTMixError

logger = logging.getLogger(__name__)

LOCK_NAME = ".sftmix.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds an ``output_dir``: what the lock file says."""

    host: str
    pid: int
    started: str  # the process's start time in /proc (clock ticks since boot): tells a reused pid apart
    since: str  # when the lock was taken, UTC

    @classmethod
    def this_process(cls) -> LockHolder:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        return cls(socket.gethostname(), os.getpid(), _start_time(os.getpid()), since)

    def is_alive(self) -> bool:
        """Whether the holder still runs; a process of another host is assumed to (it cannot be checked)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not self.started or _start_time(self.pid) in ("", self.started)


def _start_time(pid: int) -> str:
    try:  # field 22 of /proc/<pid>/stat, after the command name (which may hold spaces)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _read_holder(path: Path) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # half-written by a process killed while writing it: nobody holds it
        return LockHolder(host=socket.gethostname(), pid=-1, started="", since="?")


def _create(path: Path, holder: LockHolder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(holder), f)
    except BaseException:  # a signal while writing it (`sftmix.preemption`): leave no half-written lock
        path.unlink(missing_ok=True)
        raise
    return True


UNREADABLE_GRACE_S = 5.0
"""An unreadable lock younger than this is being written by its holder right now; older, a killed run left it."""


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``output_dir``'s lock for the duration of the block (main process only; others pass through).

    Raises:
        SFTMixError: another live run holds it (the message names its host, pid and since when).
    """
    if not _is_main_process():
        yield
        return
    directory = Path(output_dir)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path, me = directory / LOCK_NAME, LockHolder.this_process()
    try:
        while not _create(path, me):
            holder = _read_holder(path)
            if holder is None:  # released in between
                continue
            if holder.pid < 0:  # unreadable: wait for its writer, unless it is too old to have one
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < UNREADABLE_GRACE_S:
                    time.sleep(0.1)
                    continue
            elif holder.is_alive():
                raise SFTMixError(
                    f"{directory} is in use by another run (host {holder.host}, pid {holder.pid}, since "
                    f"{holder.since}); wait for it to end, or use another output_dir"
                )
            logger.warning(
                "Taking over %s: its holder (host %s, pid %s, since %s) is gone",
                path,
                holder.host,
                holder.pid,
                holder.since,
            )
            path.unlink(missing_ok=True)
        yield
    finally:
        if _read_holder(path) == me:
            path.unlink(missing_ok=True)
        if created and directory.exists() and not any(directory.iterdir()):
            directory.rmdir()  # nothing was written: leave nothing behind
