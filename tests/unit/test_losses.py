import math

import pytest
import torch

from moalign.logprobs import token_logprobs
from moalign.objectives.dpo import dpo_loss, dpo_margin, implicit_reward, preference_loss
from moalign.objectives.modpo import modpo_loss

PC = torch.tensor([-10.0, -20.0, -5.0])
PR = torch.tensor([-12.0, -18.0, -5.0])
RC = torch.tensor([-11.0, -19.0, -6.0])
RR = torch.tensor([-11.5, -19.5, -4.0])
# Margins by hand: (-10+11) - (-12+11.5) = 1.5; (-20+19) - (-18+19.5) = -2.5; (-5+6) - (-5+4) = 2.0
H = [1.5, -2.5, 2.0]


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_margin_by_hand():
    torch.testing.assert_close(dpo_margin(PC, PR, RC, RR), torch.tensor(H))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_loss_closed_form(beta):
    got = dpo_loss(PC, PR, RC, RR, beta)
    torch.testing.assert_close(got, torch.tensor([-_log_sigmoid(beta * h) for h in H]))


def test_label_smoothing_closed_form():
    beta, eps = 0.5, 0.1
    got = dpo_loss(PC, PR, RC, RR, beta, "sigmoid", eps)
    want = [-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h) for h in H]
    torch.testing.assert_close(got, torch.tensor(want))


def test_soft_labels_closed_form_and_their_optimum():
    """Per-pair soft labels p: the cross-entropy -p log s(beta h) - (1-p) log s(-beta h), whose
    gradient vanishes where beta h = logit(p), so a pair stops moving there (a hard label's never does)."""
    beta = 0.5
    p = torch.tensor([1.0, 0.7, 0.5])
    got = dpo_loss(PC, PR, RC, RR, beta, "sigmoid", 0.0, p)
    want = [-q * _log_sigmoid(beta * h) - (1 - q) * _log_sigmoid(-beta * h) for q, h in zip(p.tolist(), H)]
    torch.testing.assert_close(got, torch.tensor(want))
    at = torch.logit(torch.tensor([0.7, 0.9]), eps=None) / beta
    h = (at + torch.tensor([0.5, -0.5])).requires_grad_()
    preference_loss(h, beta, chosen_probability=torch.tensor([0.7, 0.9])).sum().backward()
    assert h.grad[0] > 0 and h.grad[1] < 0  # past the optimum it pulls back, short of it it pushes on
    h = at.clone().requires_grad_()
    preference_loss(h, beta, chosen_probability=torch.tensor([0.7, 0.9])).sum().backward()
    torch.testing.assert_close(h.grad, torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="soft labels replace label smoothing in the sigmoid loss"):
        preference_loss(h, beta, "ipo", chosen_probability=torch.tensor([0.7, 0.9]))


def test_ipo_closed_form():
    beta = 0.25
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta, "ipo"), torch.tensor([(h - 2.0) ** 2 for h in H]))


def test_hinge_closed_form():
    beta = 0.5
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta, "hinge"), torch.tensor([max(0.0, 1 - beta * h) for h in H]))


def test_loss_gradient_pushes_chosen_up():
    pc = PC.clone().requires_grad_(True)
    dpo_loss(pc, PR, RC, RR, 0.1).sum().backward()
    assert (pc.grad < 0).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        dpo_margin(torch.tensor([float("nan")]), PR[:1], RC[:1], RR[:1])
    with pytest.raises(ValueError, match="shape"):
        dpo_margin(PC, PR[:2], RC, RR)
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss(torch.zeros(1), 0.1, "nope")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        preference_loss(torch.zeros(1), 0.1, "ipo", 0.1)


def test_modpo_with_unit_weight_is_dpo():
    margins_c = torch.tensor([[0.3, 5.0], [1.0, -2.0], [0.0, 0.0]])
    margins_r = torch.tensor([[9.0, -1.0], [0.5, 0.5], [1.0, 1.0]])
    got = modpo_loss(PC, PR, RC, RR, margins_c, margins_r, torch.tensor([1.0, 0.0, 0.0]), 0, 0.1)
    torch.testing.assert_close(got, dpo_loss(PC, PR, RC, RR, 0.1))


def test_modpo_closed_form():
    beta, w = 0.1, torch.tensor([0.6, 0.4])
    mc, mr = torch.tensor([[2.0], [0.0], [1.0]]), torch.tensor([[1.0], [3.0], [1.0]])
    got = modpo_loss(PC, PR, RC, RR, mc, mr, w, 0, beta)
    want = [-_log_sigmoid((beta * h - 0.4 * (c - r)) / 0.6) for h, c, r in zip(H, [2.0, 0.0, 1.0], [1.0, 3.0, 1.0])]
    torch.testing.assert_close(got, torch.tensor(want))


def test_modpo_rejects_zero_weight_on_trained_objective():
    m = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="must be > 0"):
        modpo_loss(PC, PR, RC, RR, m, m, torch.tensor([0.0, 1.0]), 0, 0.1)
    with pytest.raises(ValueError, match="out of range"):
        modpo_loss(PC, PR, RC, RR, m, m, torch.tensor([0.5, 0.5]), 2, 0.1)
    with pytest.raises(ValueError, match="sum to 1"):
        modpo_loss(PC, PR, RC, RR, m, m, torch.tensor([0.5, 0.6]), 0, 0.1)
    with pytest.raises(ValueError, match="shape"):
        modpo_loss(PC, PR, RC, RR, torch.zeros(3, 2), m, torch.tensor([0.5, 0.5]), 0, 0.1)


def test_implicit_reward():
    torch.testing.assert_close(implicit_reward(PC, RC, 0.5), 0.5 * (PC - RC))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_value_and_gradient_match_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).to(dtype)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)

    mine = logits.clone().requires_grad_()
    got = token_logprobs(mine, tokens)
    (got * weights).sum().backward()
    theirs = logits.clone().requires_grad_()
    want = torch.gather(theirs.float().log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)
    (want * weights).sum().backward()

    assert got.dtype == torch.float32 and mine.grad.dtype == dtype
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mine.grad, theirs.grad)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(logits, tokens), want.detach())
