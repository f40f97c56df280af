"""sftmix.stage1.reference: the C steps the reference run is scored at."""

from __future__ import annotations

import pytest

from sftmix.errors import SFTMixError
from sftmix.stage1.reference import checkpoint_steps


@pytest.mark.parametrize("total,c", [(10, 3), (7, 7), (100, 4), (33, 5), (1, 1)])
def test_checkpoint_steps_evenly_spaced(total, c):
    steps = checkpoint_steps(total, c)
    assert len(steps) == c and len(set(steps)) == c and steps == sorted(steps)
    assert steps[-1] == total and steps[0] > 0
    for k, step in enumerate(steps, start=1):
        assert abs(step - k * total / c) <= 0.5


def test_checkpoint_steps_too_few():
    with pytest.raises(SFTMixError, match="fewer than num_checkpoints"):
        checkpoint_steps(2, 3)
