"""Tests for the MOPO reconstruction (moalign.objectives.mopo); its bandit check is tests/unit/test_mopo_bandit.py."""

import io
import math

import pytest
import torch

from moalign.objectives.mopo import (
    MOPOObjective,
    closed_form_ratio,
    dual_update,
    importance_weighted_bc_loss,
    pessimistic_lower_bound,
    symmetrize_pairs,
)

F64 = torch.float64


def binary_entropy(s):
    return -s * math.log(s) - (1 - s) * math.log(1 - s)


def bernoulli_half_adversary(radius):
    """q < 1/2 with KL((q, 1-q) || (1/2, 1/2)) = radius, by bisection."""
    lo, hi = 1e-12, 0.5
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if math.log(2) - binary_entropy(mid) > radius:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------
# pessimistic lower bound
# --------------------------------------------------------------------------


def test_lower_bound_radius_zero_is_weighted_mean():
    v = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    assert pessimistic_lower_bound(v, None, 0.0).item() == pytest.approx(2.0)
    w = torch.tensor([1.0, 1.0, 2.0], dtype=F64)
    assert pessimistic_lower_bound(v, w, 0.0).item() == pytest.approx(2.25)


def test_lower_bound_two_point_uniform_hand_case():
    # adversary moves (1/2, 1/2) to (3/4, 1/4): KL = ln 2 - H(1/4)
    radius = math.log(2) - binary_entropy(0.25)
    x = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    lb = pessimistic_lower_bound(x, None, radius)
    assert lb.item() == pytest.approx(0.25, abs=1e-10)
    lb.backward()  # envelope theorem: gradient = adversarial weights
    assert x.grad.tolist() == pytest.approx([0.75, 0.25], abs=1e-9)


def test_lower_bound_two_point_weighted_hand_case():
    # p = (3/4, 1/4) on (0, 1); radius = KL((0.9, 0.1) || p) -> bound 0.1
    radius = 0.9 * math.log(0.9 / 0.75) + 0.1 * math.log(0.1 / 0.25)
    lb, q = pessimistic_lower_bound(torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([3.0, 1.0], dtype=F64), radius, return_weights=True)
    assert lb.item() == pytest.approx(0.1, abs=1e-10)
    assert q.tolist() == pytest.approx([0.9, 0.1], abs=1e-9)


def test_lower_bound_degenerate_cases():
    # ball wider than -log p(argmin): all mass on the minimum
    v = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    assert pessimistic_lower_bound(v, None, math.log(3)).item() == pytest.approx(0.2)
    assert pessimistic_lower_bound(v, None, 10.0).item() == pytest.approx(0.2)
    const = torch.full((4,), 0.5, dtype=F64)
    assert pessimistic_lower_bound(const, None, 0.15).item() == pytest.approx(0.5)
    # zero-weight entries are outside the support, even if smaller
    v2 = torch.tensor([-5.0, 1.0, 1.0], dtype=F64)
    w2 = torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    assert pessimistic_lower_bound(v2, w2, 0.15).item() == pytest.approx(1.0)


def test_lower_bound_is_primal_optimum_and_batched():
    torch.manual_seed(0)
    vals = torch.rand(6, 5, dtype=F64)
    w = torch.rand(6, 5, dtype=F64) + 0.1
    radius = 0.15
    lb, q = pessimistic_lower_bound(vals, w, radius, return_weights=True)
    p = w / w.sum(-1, keepdim=True)
    kl = (q * (q / p).log()).sum(-1)
    assert torch.allclose(kl, torch.full_like(kl, radius), atol=1e-9)  # on the ball's boundary
    assert torch.allclose((q * vals).sum(-1), lb, atol=1e-9)  # dual = primal
    assert bool((lb < (p * vals).sum(-1)).all())
    for i in range(6):
        assert pessimistic_lower_bound(vals[i], w[i], radius).item() == pytest.approx(lb[i].item())
    # random feasible perturbations never go below the bound
    for _ in range(200):
        cand = torch.softmax(p.log() + 0.3 * torch.randn_like(p), -1)
        ok = (cand * (cand / p).log()).sum(-1) <= radius
        assert bool(((cand * vals).sum(-1)[ok] >= lb[ok] - 1e-12).all())
    # monotone in the radius
    radii = [0.0, 0.01, 0.05, 0.15, 0.5]
    bounds = [pessimistic_lower_bound(vals[0], w[0], r).item() for r in radii]
    assert bounds == sorted(bounds, reverse=True)


# --------------------------------------------------------------------------
# closed form, dual step, BC loss
# --------------------------------------------------------------------------


def test_closed_form_ratio_hand_values():
    tau = 1.0 / math.log(2.0)  # exp(adv / tau) = 2 ** adv
    adv = torch.tensor([1.0, 0.0], dtype=F64)
    assert closed_form_ratio(adv, tau).tolist() == pytest.approx([4 / 3, 2 / 3])
    w = closed_form_ratio(adv, tau, sample_weights=torch.tensor([1.0, 3.0], dtype=F64))
    assert w.tolist() == pytest.approx([8 / 5, 4 / 5])  # 1/4*2 + 3/4*1 = 5/4
    w = closed_form_ratio(adv, tau, log_base_ratio=torch.tensor([math.log(2), 0.0], dtype=F64))
    assert w.tolist() == pytest.approx([8 / 5, 2 / 5])  # (4, 1) / mean 5/2


def test_closed_form_maximises_regularised_preference():
    torch.manual_seed(1)
    g = torch.rand(5, dtype=F64)
    ref = torch.softmax(torch.randn(5, dtype=F64), 0)
    tau = 0.3

    def value(pi):
        return (pi * g).sum(-1) - tau * (pi * (pi / ref).log()).sum(-1)

    best = ref * closed_form_ratio(g, tau, sample_weights=ref)
    assert best.sum().item() == pytest.approx(1.0)
    assert best.tolist() == pytest.approx(torch.softmax(ref.log() + g / tau, 0).tolist())
    others = torch.softmax(best.log() + 0.5 * torch.randn(500, 5, dtype=F64), -1)
    assert bool((value(others) <= value(best) + 1e-12).all())


def test_closed_form_is_stable_for_tiny_tau():
    w = closed_form_ratio(torch.tensor([1.0, 0.0, 0.5], dtype=F64), 1e-4)
    assert torch.isfinite(w).all()
    assert w.tolist() == pytest.approx([3.0, 0.0, 0.0])


def test_dual_update_hand_values_and_projection():
    lam = torch.tensor([0.5, 0.01], dtype=F64)
    est = torch.tensor([0.3, 0.9], dtype=F64)
    b = torch.tensor([0.4, 0.4], dtype=F64)
    assert dual_update(lam, est, b, 0.1).tolist() == pytest.approx([0.51, 0.0])
    assert dual_update(lam, est, b, 100.0, max_lambda=2.0).tolist() == pytest.approx([2.0, 0.0])


def test_importance_weighted_bc_loss_hand_values():
    lp = torch.tensor([math.log(0.5), math.log(0.25)], dtype=F64)
    w = torch.tensor([1.0, 3.0], dtype=F64)
    expected = -(math.log(0.5) + 3 * math.log(0.25)) / 4
    assert importance_weighted_bc_loss(lp, w).item() == pytest.approx(expected)
    assert importance_weighted_bc_loss(lp, w, self_normalise=False).item() == pytest.approx(-(math.log(0.5) + 3 * math.log(0.25)) / 2)


def test_symmetrize_pairs_swaps_and_flips():
    first, second = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    labels = torch.tensor([[1.0, 0.0], [0.25, 1.0]])
    vals, labs = symmetrize_pairs(first, second, labels)
    assert vals.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert labs.tolist() == [[1.0, 0.0], [0.25, 1.0], [0.0, 1.0], [0.75, 0.0]]


# --------------------------------------------------------------------------
# MOPOObjective
# --------------------------------------------------------------------------


def random_batch(gen, batch=6, k=2, requires_grad=False):
    pol = torch.log_softmax(torch.randn(batch, 3, generator=gen, dtype=F64), -1)[:, :2]
    pol = pol.clone().requires_grad_(requires_grad)
    ref = torch.log_softmax(torch.randn(batch, 3, generator=gen, dtype=F64), -1)[:, :2]
    beh = torch.log_softmax(torch.randn(batch, 3, generator=gen, dtype=F64), -1)[:, :2]
    labels = (torch.rand(batch, k, generator=gen, dtype=F64) > 0.5).to(F64)
    return pol, ref, labels, beh


def test_objective_loss_gradient_hand_values():
    obj = MOPOObjective(tau=1.0 / math.log(2.0), n_objectives=1, primary=0)
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64, requires_grad=True)
    loss, metrics = obj.loss(lp, lp.detach(), torch.tensor([[1.0]], dtype=F64))
    loss.backward()
    # samples (first, l=1) and (second, l=0): w* = (4/3, 2/3), loss = -mean(w* logp)
    assert lp.grad[0].tolist() == pytest.approx([-2 / 3, -1 / 3])
    assert metrics["loss"] == pytest.approx(-(4 / 3 * math.log(0.5) + 2 / 3 * math.log(0.25)) / 2)
    # a lagged reference reweights by pi_ref / mu: base ratio (2, 1) -> w* = (8/5, 2/5)
    lp.grad = None
    obj.loss(
        lp,
        torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64),
        torch.tensor([[1.0]], dtype=F64),
        behaviour_logps=torch.tensor([[math.log(0.25), math.log(0.25)]], dtype=F64),
    )[0].backward()
    assert lp.grad[0].tolist() == pytest.approx([-4 / 5, -1 / 5])


def test_objective_dual_direction():
    gen = torch.Generator().manual_seed(0)
    pol, ref, labels, _ = random_batch(gen)
    hard = MOPOObjective(thresholds=[0.95], dual_lr=0.5, lag_steps=0)
    easy = MOPOObjective(thresholds=[0.0], dual_lr=0.5, lag_steps=0, initial_lambdas=[0.3])
    for obj in (hard, easy):
        obj.loss(pol, ref, labels)
        obj.step_end()
    assert hard.lambdas.item() > 0.0  # violated constraint raises lambda
    assert easy.lambdas.item() < 0.3  # satisfied constraint lowers it
    before = hard.lambdas.clone()
    hard.step_end()  # no micro-batch since: no dual step
    assert torch.equal(before, hard.lambdas)


def test_objective_evaluation_calls_leave_state_alone():
    gen = torch.Generator().manual_seed(5)
    pol, ref, labels, _ = random_batch(gen)
    obj = MOPOObjective(thresholds=[0.95], lag_steps=0)
    before = obj.state_dict()
    _, metrics = obj.loss(pol, ref, labels, update_state=False)
    obj.step_end()
    assert obj.lambdas.item() == 0.0 and metrics["lambda/1"] == 0.0
    assert before["acc_count"] == obj.state_dict()["acc_count"] == 0


def test_objective_lag_and_schedule():
    gen = torch.Generator().manual_seed(1)
    obj = MOPOObjective(lag_steps=2, relaxation=0.9, thresholds=[0.05])
    lbs = []
    for step in range(2):
        pol, ref, labels, _ = random_batch(gen)
        lbs.append(obj.loss(pol, ref, labels)[1]["lb_policy/1"])
        info = obj.step_end()
        assert info["refresh_reference"] == (step == 1)
    assert obj.thresholds.item() == pytest.approx(0.9 * sum(lbs) / 2)
    pol, ref, labels, beh = random_batch(gen)
    with pytest.raises(ValueError, match="behaviour_logps"):
        obj.loss(pol, ref, labels)
    obj.loss(pol, ref, labels, behaviour_logps=beh)


def test_objective_single_objective_has_no_multipliers():
    gen = torch.Generator().manual_seed(2)
    pol, ref, labels, _ = random_batch(gen, k=1, requires_grad=True)
    obj = MOPOObjective(n_objectives=1)
    loss, metrics = obj.loss(pol, ref, labels.long())  # integer labels accepted
    loss.backward()
    assert torch.isfinite(pol.grad).all()
    assert not any(k.startswith("lambda") for k in metrics)
    assert obj.step_end()["lambdas"] == []


def test_objective_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    kwargs = dict(tau=0.2, lb_radius=0.1, relaxation=0.99, lag_steps=3, dual_lr=0.2, n_objectives=3, primary=1, thresholds=[0.1, 0.2])
    obj = MOPOObjective(**kwargs)
    for _ in range(4):
        pol, ref, labels, beh = random_batch(gen, k=3)
        obj.loss(pol, ref, labels, behaviour_logps=beh)
        obj.step_end()
    pol, ref, labels, beh = random_batch(gen, k=3)
    obj.loss(pol, ref, labels, behaviour_logps=beh)  # pending micro-batch in the accumulators
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    restored = MOPOObjective(tau=5.0, n_objectives=3, primary=1)  # other hyper-params on purpose
    restored.load_state_dict(torch.load(buf))
    assert restored.tau == 0.2 and restored.lag_steps == 3
    pol, ref, labels, beh = random_batch(gen, k=3)
    for _ in range(3):
        out_a = obj.loss(pol, ref, labels, behaviour_logps=beh)
        out_b = restored.loss(pol, ref, labels, behaviour_logps=beh)
        assert out_a[1] == out_b[1]
        assert obj.step_end() == restored.step_end()
    sa, sb = obj.state_dict(), restored.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if torch.is_tensor(sa[key]):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_objective_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(6)
    pol, ref, labels, beh = random_batch(gen, requires_grad=True)
    cpu, gpu = MOPOObjective(thresholds=[0.3]), MOPOObjective(thresholds=[0.3])
    loss_c, m_c = cpu.loss(pol, ref, labels, behaviour_logps=beh)
    pol_g = pol.detach().cuda().requires_grad_(True)
    loss_g, m_g = gpu.loss(pol_g, ref.cuda(), labels.cuda(), behaviour_logps=beh.cuda())
    loss_c.backward()
    loss_g.backward()
    assert torch.allclose(pol.grad, pol_g.grad.cpu(), atol=1e-10)
    assert m_c == pytest.approx(m_g, abs=1e-10)
    end_c, end_g = cpu.step_end(), gpu.step_end()
    assert end_c["lambdas"] == pytest.approx(end_g["lambdas"], abs=1e-10)


def test_load_state_dict_rejects_mismatch():
    state = MOPOObjective(n_objectives=3).state_dict()
    with pytest.raises(ValueError, match="n_objectives"):
        MOPOObjective(n_objectives=2).load_state_dict(state)
    with pytest.raises(ValueError, match="primary"):
        MOPOObjective(n_objectives=3, primary=2).load_state_dict(state)
    broken = dict(state)
    del broken["lambdas"]
    with pytest.raises(ValueError, match="lambdas"):
        MOPOObjective(n_objectives=3).load_state_dict(broken)


# --------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(primary=2), "primary"),
        (dict(primary=-1), "primary"),
        (dict(n_objectives=0), "n_objectives"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(lb_radius=-0.1), "lb_radius"),
        (dict(relaxation=1.5), "relaxation"),
        (dict(lag_steps=-1), "lag_steps"),
        (dict(dual_lr=-1.0), "dual_lr"),
        (dict(thresholds=[0.1, 0.2]), "thresholds"),
        (dict(thresholds=[float("nan")]), "thresholds"),
    ],
)
def test_objective_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MOPOObjective(**kwargs)


def _bad_loss_inputs():
    gen = torch.Generator().manual_seed(4)
    pol, ref, labels, beh = random_batch(gen)
    nan_pol = pol.clone()
    nan_pol[0, 1] = float("nan")
    inf_ref = ref.clone()
    inf_ref[2, 0] = float("inf")
    big = labels.clone()
    big[1, 0] = 1.5
    neg = labels.clone()
    neg[0, 1] = -0.1
    nan_lab = labels.clone()
    nan_lab[3, 0] = float("nan")
    nan_beh = beh.clone()
    nan_beh[0, 0] = float("nan")
    return [
        ((nan_pol, ref, labels, None), "policy_logps.*NaN"),
        ((pol, inf_ref, labels, None), "ref_logps.*inf"),
        ((pol, ref, nan_lab, None), "labels.*NaN"),
        ((pol, ref, labels, nan_beh), "behaviour_logps.*NaN"),
        ((pol[:, 0], ref, labels, None), "policy_logps must have shape"),
        ((torch.cat([pol, pol[:, :1]], 1), ref, labels, None), "policy_logps must have shape"),
        ((pol, ref[:4], labels, None), "ref_logps must have shape"),
        ((pol, ref, labels[:, :1], None), "labels must have shape"),
        ((pol, ref, labels[:5], None), "labels must have shape"),
        ((pol, ref, big, None), r"labels must lie in \[0, 1\]"),
        ((pol, ref, neg, None), r"labels must lie in \[0, 1\]"),
        ((pol, ref, labels, beh[:, :1]), "behaviour_logps must have shape"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_objective_loss_rejects_bad_inputs(case):
    args, match = _bad_loss_inputs()[case]
    with pytest.raises(ValueError, match=match):
        MOPOObjective().loss(*args)


def test_pure_functions_reject_bad_inputs():
    v = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="radius"):
        pessimistic_lower_bound(v, None, -0.1)
    with pytest.raises(ValueError, match="values.*NaN"):
        pessimistic_lower_bound(torch.tensor([0.0, float("nan")]), None, 0.1)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        pessimistic_lower_bound(v, torch.tensor([1.0, -1.0], dtype=F64), 0.1)
    with pytest.raises(ValueError, match="positive sum"):
        pessimistic_lower_bound(v, torch.zeros(2, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="tau"):
        closed_form_ratio(v, 0.0)
    with pytest.raises(ValueError, match="shape"):
        importance_weighted_bc_loss(v, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="share a shape"):
        dual_update(torch.zeros(2), torch.zeros(1), torch.zeros(2), 0.1)
