"""The decision probe's arithmetic: log-odds read at the probed rows only, clamped where a
decision is certain, and corners' separation paired by sentence end."""

import math

import numpy as np
import pytest
import torch

from benchmarks.decision_probe import decision_logodds, separation


def test_logodds_are_read_at_the_sites_and_stay_finite_where_certain():
    # Vocabulary: EOS, newline, word. Rows 0 and 2 are sentence ends; row 1 is not probed.
    logps = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05], [0.0, 1.0, 0.0]]).log()
    newline = decision_logodds(logps, [0, 2], 1)
    assert newline[0] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(newline[1]) and newline[1] > 15  # certain: clamped, not inf
    stop = decision_logodds(logps, [0, 2], 0)
    assert stop[0] == pytest.approx(math.log(0.2 / 0.8), abs=1e-6)
    assert math.isfinite(stop[1]) and stop[1] < -15


def test_separation_is_paired_by_site():
    # Sites differ a lot from each other but one corner sits 0.5 above the other at each: the
    # paired error is small where an unpaired one would swamp the difference.
    a = np.array([-3.0, 0.5, 4.0, 1.0])
    assert separation(a + 0.5, a) == pytest.approx((0.5, 0.0))
    mean, se = separation(a + np.array([0.4, 0.6, 0.5, 0.5]), a)
    assert mean == pytest.approx(0.5) and 0 < se < 0.1
    with pytest.raises(ValueError, match="1 sites"):
        separation(np.array([1.0]), np.array([0.0]))
