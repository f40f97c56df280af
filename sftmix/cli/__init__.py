"""The ``sftmix`` commands (`commands`) and the programs they run: ``run`` and ``train`` (`pipeline`),
``dynamics`` (`dynamics`), ``--dry_run`` (`plan`) and ``demo`` (`demo`)."""

from .commands import main

__all__ = ["main"]
