"""The per-algorithm part of a learner step, without a model: what each objective makes of log-probs."""

import math

import pytest
import torch

from moalign.config import load_config
from moalign.objectives import DPOObjective, MODPOObjective, MOPOLearnerObjective, build_objective
from moalign.objectives.mopo import MOPOObjective

N = 6
GEN = torch.Generator().manual_seed(0)
PC, PR, RC, RR = (torch.randn(N, generator=GEN) * 3 for _ in range(4))
INDEX = torch.arange(N)


def margins(rows):
    return [[float(v) for v in row] for row in rows]


def test_build_objective_follows_the_algorithm():
    assert type(build_objective(load_config(None, []))) is DPOObjective
    modpo = load_config(None, ["algorithm.name=modpo", "algorithm.modpo.weights=[0.5, 0.5, 0]"])
    assert type(build_objective(modpo)) is MODPOObjective
    assert type(build_objective(load_config(None, ["algorithm.name=mopo"]))) is MOPOLearnerObjective


def test_modpo_margin_moves_the_loss_off_the_corner_only():
    batch = {
        "margin_chosen": margins(torch.randn(N, 2, generator=GEN)),
        "margin_rejected": margins(torch.randn(N, 2, generator=GEN)),
    }
    dpo = build_objective(load_config(None, [])).pair_losses(PC, PR, RC, RR, INDEX, batch)
    corner = build_objective(load_config(None, ["algorithm.name=modpo", "algorithm.modpo.weights=[1, 0, 0]"]))
    assert torch.equal(corner.pair_losses(PC, PR, RC, RR, INDEX, batch), dpo)
    mixed = build_objective(load_config(None, ["algorithm.name=modpo", "algorithm.modpo.weights=[0.5, 0.3, 0.2]"]))
    assert not torch.allclose(mixed.pair_losses(PC, PR, RC, RR, INDEX, batch), dpo)
    # Padding rows (index -1) come out finite.
    assert torch.isfinite(mixed.pair_losses(PC, PR, RC, RR, torch.tensor([0, 1, -1, -1, 4, 5]), batch)).all()
    with pytest.raises(ValueError, match=r"batch\['margin_chosen'\]\[0\] has 1 values, expected 2"):
        mixed.validate({**batch, "margin_chosen": [[0.0]] * N}, N)
    with pytest.raises(ValueError, match="not a finite number"):
        mixed.validate({**batch, "margin_rejected": [[float("nan"), 0.0]] * N}, N)


def test_dpo_reads_each_pairs_soft_label_and_checks_it():
    """With `chosen_probability` each pair's loss is the cross-entropy to its label; a label of 1
    is the hard label's loss, and padding rows come out finite."""
    dpo = build_objective(load_config(None, []))
    hard = dpo.pair_losses(PC, PR, RC, RR, INDEX, {})
    ones = {"chosen_probability": [1.0] * N}
    dpo.validate(ones, N)
    torch.testing.assert_close(dpo.pair_losses(PC, PR, RC, RR, INDEX, ones), hard)
    coin = {"chosen_probability": [0.5] * N}
    beta_h = dpo.beta * ((PC - RC) - (PR - RR))
    torch.testing.assert_close(dpo.pair_losses(PC, PR, RC, RR, INDEX, coin), torch.log(torch.cosh(beta_h / 2)) + math.log(2))
    assert torch.isfinite(dpo.pair_losses(PC, PR, RC, RR, torch.tensor([0, -1, 2, 3, -1, 5]), coin)).all()
    with pytest.raises(ValueError, match=r"batch\['chosen_probability'\]\[2\] = 1.5 is not a probability in \[0, 1\]"):
        dpo.validate({"chosen_probability": [0.5, 0.5, 1.5, 0.5, 0.5, 0.5]}, N)
    with pytest.raises(ValueError, match=r"batch\['chosen_probability'\] has 2 entries, batch\['prompt_ids'\] has 6"):
        dpo.validate({"chosen_probability": [0.5, 0.5]}, N)


def test_mopo_pair_losses_average_to_the_batch_bc_loss():
    """Micro-batched per-pair losses, averaged over the step's pairs, equal MOPOObjective.loss on
    the whole batch: computing w* once per step and splitting the gradient changes nothing."""
    cfg = load_config(None, ["algorithm.name=mopo", "algorithm.mopo.dual_lr=0.5"])
    labels = torch.randint(0, 2, (N, 3), generator=GEN).double().tolist()
    batch = {"prompt_ids": [[1]] * N, "chosen_ids": [[2]] * N, "rejected_ids": [[3]] * N, "labels": labels}
    policy = torch.cat([PC, PR]).double()
    reference = torch.cat([RC, RR]).double()
    learner_side = build_objective(cfg)
    learner_side.validate(batch, N)
    learner_side.prepare(batch, lambda p, c: policy, lambda p, c: reference, lambda p, c: reference)
    per_pair = torch.cat(
        [learner_side.pair_losses(PC[s].double(), PR[s].double(), None, None, INDEX[s], batch) for s in (slice(0, 4), slice(4, N))]
    )

    m = cfg.algorithm.mopo
    reference_side = MOPOObjective(m.tau, m.lb_radius, m.relaxation, m.lag_steps, m.dual_lr, 3, m.primary, max_lambda=m.max_lambda)
    loss, _ = reference_side.loss(torch.stack([PC, PR], 1).double(), torch.stack([RC, RR], 1).double(), torch.tensor(labels))
    assert float(per_pair.mean()) == pytest.approx(float(loss), rel=1e-12)

    after = learner_side.step_end()
    reference_side.step_end()
    assert after["metrics"]["mopo/lambda/Conciseness"] == pytest.approx(float(reference_side.lambdas[0]))
    restored = build_objective(cfg)
    restored.load_state_dict(learner_side.state_dict())
    assert torch.equal(restored.mopo.lambdas, learner_side.mopo.lambdas)
    with pytest.raises(ValueError, match="labels are probabilities"):
        learner_side.validate({**batch, "labels": [[1.5, 0, 0]] * N}, N)
    with pytest.raises(RuntimeError, match="before prepare"):
        learner_side.pair_losses(PC, PR, RC, RR, INDEX, batch)


def test_dpo_family_reports_its_implicit_rewards_exactly_as_the_learner_did():
    beta = 0.3
    real = torch.tensor([True, False, True, True, False, True])
    for cfg in (load_config(None, [f"algorithm.beta={beta}"]), load_config(None, ["algorithm.name=mopo", f"algorithm.beta={beta}"])):
        objective = build_objective(cfg)
        assert objective.pair_metrics == ("chosen_reward", "rejected_reward", "margin", "accuracy")
        sums = objective.pair_metric_sums(PC[real], PR[real], RC[real], RR[real])
        # The learner's own formulas before the objective owned them, bit for bit.
        cr, rj = beta * (PC - RC)[real], beta * (PR - RR)[real]
        assert sums == {
            "chosen_reward": float(cr.sum()),
            "rejected_reward": float(rj.sum()),
            "margin": float((cr - rj).sum()),
            "accuracy": float((cr > rj).float().sum()),
        }


def test_the_supervised_term_adds_each_chosen_answers_mean_token_nll():
    import torch

    from moalign.config import load_config
    from moalign.objectives.dpo import DPOObjective, dpo_loss

    plain = DPOObjective(load_config(None, []).algorithm, ["A"])
    with_sft = DPOObjective(load_config(None, ["algorithm.sft_weight=0.5"]).algorithm, ["A"])
    pc, pr, rc, rr = (
        torch.tensor([-6.0, -2.0, 0.0]),
        torch.tensor([-5.0, -3.0, 0.0]),
        torch.tensor([-5.5, -2.5, 0.0]),
        torch.tensor([-5.0, -2.0, 0.0]),
    )
    batch = {"chosen_ids": [[1, 2, 3], [4, 5]]}
    index = torch.tensor([0, 1, -1])
    base = plain.pair_losses(pc, pr, rc, rr, index, batch)
    torch.testing.assert_close(base, dpo_loss(pc, pr, rc, rr, 0.1))
    torch.testing.assert_close(with_sft.pair_losses(pc, pr, rc, rr, index, batch), base + 0.5 * torch.tensor([2.0, 1.0, 0.0]))


def test_a_supervised_batch_trains_the_chosen_answer_alone():
    import torch

    from moalign.config import load_config
    from moalign.objectives.dpo import DPOObjective

    objective = DPOObjective(load_config(None, ["algorithm.warm_start_steps=5"]).algorithm, ["A"])
    pc = torch.tensor([-6.0, -2.0])
    batch = {"chosen_ids": [[1, 2, 3], [4, 5]], "supervised": True}
    losses = objective.pair_losses(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), batch)
    torch.testing.assert_close(losses, torch.tensor([2.0, 1.0]))
    assert load_config(None, ["algorithm.warm_start_steps=5", "rollout.prompts_per_step=4"]).pairs_per_step == 12
    # Each prompt's drawn line gets a label too: one more per prompt.
    drawn = ["algorithm.warm_start_steps=5", "algorithm.warm_start_lines=drawn_and_corners"]
    assert load_config(None, [*drawn, "rollout.prompts_per_step=4"]).pairs_per_step == 16


def test_the_anchored_warm_start_loss_fades_once_a_label_is_likelier_than_under_the_reference():
    objective = DPOObjective(load_config(None, ["algorithm.warm_start_steps=5", "algorithm.warm_start_beta=1"]).algorithm, ["A"])
    # Label log-ratios 0, 1 and 6 nats above the reference (the policy at -6, -2 and 0).
    pc = torch.tensor([-6.0, -2.0, 0.0], requires_grad=True)
    rc = torch.tensor([-6.0, -3.0, -6.0])
    batch = {"chosen_ids": [[1, 2, 3], [4, 5], [6]], "supervised": True}
    losses = objective.pair_losses(pc, torch.zeros(3), rc, torch.zeros(3), torch.arange(3), batch)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(pc - rc).detach())
    losses.sum().backward()
    # d/dpc = -sigmoid(-(pc - rc)): a half at the reference, under 0.003 six nats past it.
    torch.testing.assert_close(pc.grad, -torch.sigmoid(-torch.tensor([0.0, 1.0, 6.0])))
    assert pc.grad[2].abs() < 0.003 < pc.grad[0].abs() / 100
    # Outside the warm start the DPO loss is unchanged by the setting.
    dpo = objective.pair_losses(PC, PR, RC, RR, INDEX, {"chosen_ids": [[1]] * N})
    torch.testing.assert_close(dpo, DPOObjective(load_config(None, []).algorithm, ["A"]).pair_losses(PC, PR, RC, RR, INDEX, {}))


def test_the_anchored_warm_start_loss_needs_a_warm_start():
    from moalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"algorithm\.warm_start_beta: 0\.5 is set, but algorithm\.warm_start_steps is 0"):
        load_config(None, ["algorithm.warm_start_beta=0.5"])
    with pytest.raises(ConfigError, match=r"algorithm\.warm_start_beta: not used by mopo"):
        load_config(None, ["algorithm.name=mopo", "algorithm.warm_start_beta=0.5"])


def test_a_stop_decision_holds_its_shared_prefix_at_the_reference():
    cfg = ["algorithm.warm_start_steps=5", "algorithm.sentence_prefixes=8", "algorithm.warm_start_pairs=stop_decisions"]
    plain = DPOObjective(load_config(None, cfg).algorithm, ["A"])
    held = DPOObjective(load_config(None, [*cfg, "algorithm.warm_start_prefix_kl=0.5"]).algorithm, ["A"])
    # Pair 0 stops (chosen = prefix + EOS, rejected = the prefix alone), pair 1 goes on.
    batch = {"chosen_ids": [[5, 6, 0], [5]], "rejected_ids": [[5, 6], [5, 0]], "warm_start": True}
    pc, pr = torch.tensor([-4.0, -1.0]), torch.tensor([-5.0, -3.0])
    rc, rr = torch.tensor([-6.0, -3.0]), torch.tensor([-3.0, -2.0])
    base = plain.pair_losses(pc, pr, rc, rr, torch.arange(2), batch)
    # The prefix's log-ratio: pair 0's rejected side (-5 - -3 = -2), pair 1's chosen side (-1 - -3 = 2).
    torch.testing.assert_close(held.pair_losses(pc, pr, rc, rr, torch.arange(2), batch), base + 0.25 * torch.tensor([4.0, 4.0]))
    # Not a warm-start batch: DPO alone.
    torch.testing.assert_close(held.pair_losses(pc, pr, rc, rr, torch.arange(2), {**batch, "warm_start": False}), base)
    from moalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"warm_start_prefix_kl: 0\.5 holds the prefixes of stop decisions"):
        load_config(None, ["algorithm.warm_start_prefix_kl=0.5"])
    with pytest.raises(ConfigError, match=r"stop_decisions_per_line: 3 counts stop decisions; it needs algorithm\.warm_start_pairs"):
        load_config(None, ["algorithm.stop_decisions_per_line=3"])
    # Each prompt gives each corner up to that many pairs: the learner's batch is sized for them.
    one, three = (load_config(None, [*cfg, f"algorithm.stop_decisions_per_line={n}"]) for n in (1, 3))
    assert three.pairs_in_step(True) == 3 * one.pairs_in_step(True)
