"""``python -m sftmix.cli`` (what ``torchrun`` and ``accelerate launch -m`` run)."""

import sys

from .commands import main

sys.exit(main())
