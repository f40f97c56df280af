"""The one exception type the CLI turns into a one-line error (no traceback, exit code 2)."""

from __future__ import annotations


class SFTMixError(Exception):
    """A problem with the user's input (data, config, paths), explained in one line.

    The message names what is wrong and where (file, line or row, field), so that the user can fix it
    without reading a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
