"""The KL split: a policy that only moved its end-of-sequence token has its KL in the stop part;
one that reweighted the other tokens has it in the text part."""

import math

import pytest
import torch

from benchmarks.kl_parts import kl_parts

EOS = 0


def logps(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_a_policy_that_only_stops_less_has_its_kl_in_the_stop_part():
    # Vocabulary: EOS, a, b. The reference stops half the time at position 0; the policy moved
    # that mass onto a and b in the reference's proportions (1 : 1), so only stopping changed.
    reference = logps([[0.5, 0.25, 0.25], [0.1, 0.45, 0.45]])
    policy = logps([[0.1, 0.45, 0.45], [0.1, 0.45, 0.45]])
    total, stop, text = kl_parts(policy, reference, torch.tensor([1, EOS]), EOS)
    assert stop == pytest.approx(math.log(0.9 / 0.5))
    assert text == pytest.approx(0.0, abs=1e-12)
    assert total == pytest.approx(math.log(0.45 / 0.25) + math.log(0.1 / 0.1))


def test_a_policy_that_rewrites_the_text_has_its_kl_in_the_text_part():
    # The same chance of stopping at both positions; the tokens after it reweighted.
    reference = logps([[0.2, 0.4, 0.4], [0.2, 0.4, 0.4]])
    policy = logps([[0.2, 0.7, 0.1], [0.2, 0.1, 0.7]])
    total, stop, text = kl_parts(policy, reference, torch.tensor([1, 2]), EOS)
    assert stop == pytest.approx(0.0, abs=1e-12)
    assert text == pytest.approx(total) == pytest.approx(2 * math.log(0.7 / 0.4))


def test_the_parts_sum_to_the_log_ratio_and_a_closing_eos_is_stop():
    reference = logps([[0.3, 0.3, 0.4], [0.6, 0.2, 0.2]])
    policy = logps([[0.1, 0.6, 0.3], [0.9, 0.05, 0.05]])
    total, stop, text = kl_parts(policy, reference, torch.tensor([1, EOS]), EOS)
    assert stop + text == pytest.approx(total)
    # Position 0: not stopping, log(0.9 / 0.7); position 1: the closing EOS itself.
    assert stop == pytest.approx(math.log(0.9 / 0.7) + math.log(0.9 / 0.6))


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit 3 tokens"):
        kl_parts(logps([[0.5, 0.5]]), logps([[0.5, 0.5]]), torch.tensor([1, 1, 1]), EOS)
