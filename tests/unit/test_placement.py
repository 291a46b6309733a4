"""Start-up that never waits in silence: what each role asks of the cluster, and the wait for room
that reports it and gives up at its bound (on a fake clock; tests/integration/test_placement.py
runs it on a real cluster)."""

import logging

import pytest

from actors.cluster import RoleAsk, role_ask, run_asks
from actors.ray_actors import PLACED_AFTER, WAITING_FOR_ROOM, wait_for_room
from moalign.config import load_config


class FakeClock:
    """Time that passes only when the code under test waits."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def placed_at(clock: FakeClock, at: float | None):
    """`placed(timeout)` of a cluster that has room from time `at` on (None: never); it waits by
    moving the clock, at most `timeout`, as ray.wait would."""
    asked = []

    def placed(timeout_s: float) -> bool:
        asked.append(timeout_s)
        if at is not None and clock.now + timeout_s >= at:
            clock.now = max(clock.now, at)
            return True
        clock.now += timeout_s
        return False

    return placed, asked


def test_the_default_config_asks_what_the_readme_adds_up():
    cfg = load_config("configs/default.yaml")
    asks = run_asks(cfg)
    assert [(a.role, a.count, a.cpus, a.gpus, a.strategy) for a in asks] == [
        ("generator", 1, 2.0, 0.0, "PACK"),
        ("reward", 1, 0.5, 0.0, "PACK"),
        ("learner", 1, 2.0, 0.0, "PACK"),
    ]
    assert sum(a.total_cpus for a in asks) == 4.5
    assert asks[2].describe() == "1 learner actor of 2 CPU, 0 GPU (a PACK placement group, any node)"
    assert asks[2].options() == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_asks_carry_labels_gpus_and_tensor_parallel_workers():
    cfg = load_config(
        None,
        [
            "actors.num_generators=2",
            "actors.generator_gpus=1",
            "actors.tensor_parallel_size=4",
            "actors.placement=none",
            "actors.learner_node_labels={moalign-role: learner}",
        ],
    )
    generator, learner = role_ask(cfg.actors, "generator"), role_ask(cfg.actors, "learner")
    assert (generator.gpus, generator.total_gpus, generator.strategy) == (4.0, 8.0, None)
    assert generator.describe() == "2 generator actors of 1 CPU, 4 GPU each (no placement group, any node)"
    assert learner.options() == {"num_cpus": 1.0, "num_gpus": 0.0, "label_selector": {"moalign-role": "learner"}}
    assert "nodes labelled {'moalign-role': 'learner'}" in learner.describe()
    offline = load_config("configs/modpo_cpu.yaml")
    assert [a.role for a in run_asks(offline)] == ["learner", "reward"]
    with pytest.raises(ValueError, match="unknown role 'critic'"):
        role_ask(cfg.actors, "critic")


def test_a_role_without_room_is_reported_within_seconds_then_at_intervals_and_given_up_at_the_bound(caplog):
    clock = FakeClock()
    placed, _ = placed_at(clock, None)
    reports = []

    def report(waited: float) -> str:
        reports.append(waited)
        return f"1 learner actor of 7 CPU {WAITING_FOR_ROOM}: the cluster has 4.5 CPU free of 6 CPU; waited {waited:.0f}s"

    with caplog.at_level(logging.WARNING, logger="actors.ray_actors"):
        assert wait_for_room(placed, report, bound_s=100, first_report_s=5, every_s=30, clock=clock) is False
    assert reports == [5, 35, 65, 95]
    assert clock.now == 100
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4 and all(WAITING_FOR_ROOM in w and "7 CPU" in w for w in warnings)


def test_room_that_comes_ends_the_wait_at_once_and_says_so(caplog):
    clock = FakeClock()
    placed, asked = placed_at(clock, 12.5)
    with caplog.at_level(logging.INFO, logger="actors.ray_actors"):
        assert wait_for_room(placed, lambda w: f"x {WAITING_FOR_ROOM}", bound_s=300, what="learner actors 0..0", clock=clock)
    assert clock.now == 12.5 and asked[0] == 5  # it asks in slices that end at each report
    assert [r.getMessage() for r in caplog.records] == [f"x {WAITING_FOR_ROOM}", f"learner actors 0..0: {PLACED_AFTER} 12s"]

    # Room at once: not a word.
    caplog.clear()
    clock = FakeClock()
    placed, _ = placed_at(clock, 0.2)
    assert wait_for_room(placed, lambda w: "never", bound_s=300, clock=clock)
    assert caplog.records == []


def test_a_bound_shorter_than_the_first_report_still_reports_before_it_gives_up(caplog):
    clock = FakeClock()
    placed, _ = placed_at(clock, None)
    with caplog.at_level(logging.WARNING, logger="actors.ray_actors"):
        assert not wait_for_room(placed, lambda w: f"waited {w:g}", bound_s=2, first_report_s=5, clock=clock)
    assert [r.getMessage() for r in caplog.records] == ["waited 2"]


def test_role_ask_describes_several_actors_each():
    ask = RoleAsk("reward", 3, 0.5, 0.0, {"zone": "a"}, "SPREAD")
    assert ask.describe() == "3 reward actors of 0.5 CPU, 0 GPU each (a SPREAD placement group, nodes labelled {'zone': 'a'})"
    assert ask.total_cpus == 1.5
