import logging

import pytest

from moalign.health import HealthMonitor, step_health
from moalign.pairs import Pair, PairSelection


def sample(ids, text=None, finish="stop"):
    return {"token_ids": list(ids), "text": "word " * len(ids) if text is None else text, "finish_reason": finish}


def selection(pairs=1, ties=0, zero=0):
    return PairSelection([Pair(i, 0, 1, 1.0, None) for i in range(pairs)], ties, zero)


def healthy_samples(prompts=2, n=4, length=10):
    return [[sample(range(p * 100 + i, p * 100 + i + length)) for i in range(n)] for p in range(prompts)]


def test_identical_completions_give_distinct_fraction_of_one_over_n():
    same = [[sample([1, 2, 3]) for _ in range(4)]]
    assert step_health(same, selection(), {})["distinct_fraction"] == pytest.approx(0.25)
    mixed = same + [[sample([i]) for i in range(4)]]
    assert step_health(mixed, selection(), {})["distinct_fraction"] == pytest.approx((0.25 + 1.0) / 2)


def test_lengths_caps_and_empty_answers():
    group = [sample([1] * 8, finish="length"), sample([2] * 4), sample([3] * 2, text="  \n"), sample([], text="")]
    health = step_health([group], selection(), {"kl": 0.7})
    assert health["completion_tokens_mean"] == pytest.approx(3.5)
    assert health["length_capped_share"] == pytest.approx(0.25)
    assert health["empty_share"] == pytest.approx(0.5)
    assert health["kl"] == pytest.approx(0.7)


def test_ties_counted_over_ranked_candidates():
    # Zero-weight candidates were never ranked, so they are outside the share.
    assert step_health(healthy_samples(), selection(pairs=3, ties=1, zero=4), {})["tied_share"] == pytest.approx(0.25)
    assert step_health(healthy_samples(), selection(pairs=0, ties=8), {})["tied_share"] == 1.0


def test_unmeasured_figures_are_left_out():
    health = step_health(healthy_samples(), selection(pairs=0, ties=0, zero=3), {})
    assert "kl" not in health and "tied_share" not in health
    assert "kl" not in step_health(healthy_samples(), selection(), {"kl": float("nan")})


def kl_steps(monitor, start_step, values):
    return [monitor.update(start_step + i, healthy_samples(), selection(), {"kl": v}) for i, v in enumerate(values)]


def test_kl_runaway_warns_once_then_again_after_recovery(caplog):
    monitor = HealthMonitor(max_kl=5.0, window_steps=3)
    with caplog.at_level(logging.WARNING, logger="moalign.health"):
        metrics = kl_steps(monitor, 1, [1, 2, 4, 6, 8, 12, 20, 27])
        assert metrics[-1]["health/kl"] == 27 and "health/distinct_fraction" in metrics[-1]
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        # The median of steps 3-5 (4, 6, 8) is the first above the bound; steps 6 to 8 stay quiet.
        assert len(warned) == 1
        message = warned[0].getMessage()
        assert "step 5" in message and "kl 6" in message and "health.max_kl=5" in message and "KL runaway" in message
        assert monitor.crossed == ["kl"]

        kl_steps(monitor, 9, [1, 1, 1])
        assert monitor.crossed == [] and len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

        kl_steps(monitor, 12, [9, 9, 9, 9])
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 2 and "step 13" in warned[1].getMessage()
    assert [w["step"] for w in monitor.warnings] == [5, 13]
    assert [w["metric"] for w in monitor.warnings] == ["kl", "kl"]


def test_one_outlier_step_does_not_warn(caplog):
    monitor = HealthMonitor(max_kl=5.0, window_steps=5)
    with caplog.at_level(logging.WARNING, logger="moalign.health"):
        kl_steps(monitor, 1, [1, 1, 1, 1, 1, 30, 1, 1, 1, 1])
        collapsed = [[sample([7, 7]) for _ in range(4)] for _ in range(2)]
        for step in range(11, 21):
            monitor.update(step, collapsed if step == 15 else healthy_samples(), selection(), {"kl": 1.0})
    assert monitor.warnings == [] and not caplog.records


def test_nothing_is_judged_before_the_window_is_full(caplog):
    monitor = HealthMonitor(window_steps=3)
    collapsed = [[sample([7]) for _ in range(4)]]
    with caplog.at_level(logging.WARNING, logger="moalign.health"):
        monitor.update(1, collapsed, selection(0, 1), {})
        monitor.update(2, collapsed, selection(0, 1), {})
        assert monitor.warnings == []
        monitor.update(3, collapsed, selection(0, 1), {})
    assert sorted(w["metric"] for w in monitor.warnings) == ["completion_tokens_mean", "distinct_fraction", "tied_share"]
    assert "collapsing to one answer" in caplog.text


def test_length_cap_bound():
    monitor = HealthMonitor(window_steps=1)
    capped = [[sample([i] * 10, finish="length") for i in range(4)]]
    monitor.update(1, capped, selection(), {})
    assert [w["metric"] for w in monitor.warnings] == ["length_capped_share"]
    assert "rollout.max_new_tokens" in monitor.warnings[0]["message"]


def test_state_round_trips_and_resumed_monitor_continues_the_same():
    values = [1, 2, 6, 7, 8, 9, 1, 1]
    straight = HealthMonitor(window_steps=3)
    kl_steps(straight, 1, values)

    first = HealthMonitor(window_steps=3)
    kl_steps(first, 1, values[:5])
    resumed = HealthMonitor(window_steps=3)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()
    kl_steps(resumed, 6, values[5:])

    assert resumed.state_dict() == straight.state_dict()
    assert resumed.warnings == straight.warnings and len(straight.warnings) == 1


def test_an_evaluation_above_the_kl_bound_at_some_weights_warns_once_naming_them(caplog):
    """`judge_front`: the held-out KL per weight vector, the corners too, against health.max_kl."""
    monitor = HealthMonitor(max_kl=5.0, window_steps=3)
    weights = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]

    def front(*means):
        return {"weights": weights, "kl": {"mean": list(means)}}

    with caplog.at_level(logging.WARNING, logger="moalign.health"):
        monitor.judge_front(20, front(1.0, 2.0, 4.9))
        monitor.judge_front(40, {"weights": weights})  # KL not measured: nothing judged
        monitor.judge_front(40, None)  # no evaluation yet: nothing judged
        assert monitor.crossed == [] and not caplog.records
        monitor.judge_front(60, front(5.6, 2.0, 7.25))
        monitor.judge_front(80, front(6.0, 2.0, 8.0))
        assert monitor.crossed == ["kl_by_weight"]
        [warned] = [r.getMessage() for r in caplog.records]
        assert "step 60" in warned and "1/0 (5.60 nats per answer), 0/1 (7.25 nats per answer)" in warned and "health.max_kl=5" in warned
        monitor.judge_front(100, front(1.0, 1.0, 1.0))
        monitor.judge_front(120, front(1.0, 9.0, 1.0))
    assert [(w["step"], w["metric"], w["value"]) for w in monitor.warnings] == [(60, "kl_by_weight", 7.25), (120, "kl_by_weight", 9.0)]
    resumed = HealthMonitor(max_kl=5.0, window_steps=3)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.crossed == ["kl_by_weight"] and resumed.warnings == monitor.warnings


def test_bad_window_rejected():
    with pytest.raises(ValueError, match="window_steps"):
        HealthMonitor(window_steps=0)
