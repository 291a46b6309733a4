"""Start-up that never waits in silence, on a real cluster (the session's, 6 logical CPUs): a run
whose learner asks more CPUs than the cluster has says so within seconds, naming the role, what
it asks and what is free, and fails with that message at actors.placement_timeout_s; plain
actors (no placement group) are reported the same way."""

import logging
import time
from pathlib import Path

import pytest

from actors.ray_actors import FIRST_REPORT_S, WAITING_FOR_ROOM, ActorFailure, ActorGroup, RewardActor
from moalign.config import load_config
from orchestrator import run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 10


def test_a_role_that_does_not_fit_is_reported_within_seconds_and_fails_at_the_bound(tiny_model, ray_cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    # Plain actors: Ray queues them unseen; the group reports them like a placement group.
    started = time.monotonic()
    with pytest.raises(ActorFailure) as failed:
        ActorGroup("reward", RewardActor, 1, {"num_cpus": 64}, lambda i: (([],), {}), timeout_s=60, placement_timeout_s=4)
    assert time.monotonic() - started < 4 + 5
    assert "1 reward actor of 64 CPU, 0 GPU (no placement group, any node) could not be placed within 4s" in str(failed.value)
    assert "free of 6 CPU, 0 GPU on 1 node(s)" in str(failed.value)

    # A whole run: the generator and reward actors are placed, the learner never can be.
    caplog.clear()
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"model.path={tiny_model}",
            "model.max_prompt_tokens=160",
            f"data.train_path={REPO / 'data/prompts/train.jsonl'}",
            f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}",
            "objectives=[{name: Conciseness, source: conciseness}, {name: Positivity, source: positivity}]",
            "rollout.prompts_per_step=4",
            "learner.micro_batch_pairs=2",
            "actors.cpu_kvcache_gb=0.25",
            "actors.learner_cpus=64",
            f"actors.placement_timeout_s={BOUND_S}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    started = time.monotonic()
    with pytest.raises(ActorFailure) as failed:
        run(cfg)
    took = time.monotonic() - started
    failed_at = time.time()
    message = str(failed.value)
    assert message.startswith("learner actor #0, in placement(): 1 learner actor of 64 CPU, 0 GPU (a PACK placement group, any node)")
    assert f"could not be placed within {BOUND_S}s (actors.placement_timeout_s): the cluster has " in message
    assert "free of 6 CPU, 0 GPU on 1 node(s); this run's other actors hold generator 1 x 1 CPU, reward 1 x 0.5 CPU" in message
    assert "`ray start --num-cpus=N`" in message and "actors.learner_cpus" in message

    waiting = [r for r in caplog.records if WAITING_FOR_ROOM in r.getMessage()]
    assert waiting and all(r.levelno == logging.WARNING for r in waiting)
    first = waiting[0]
    assert first.getMessage().startswith(f"1 learner actor of 64 CPU, 0 GPU (a PACK placement group, any node) {WAITING_FOR_ROOM}: ")
    assert f"the run stops at {BOUND_S}s (actors.placement_timeout_s)" in first.getMessage()
    # Said FIRST_REPORT_S into the wait, and the run gave up at the bound.
    assert BOUND_S - FIRST_REPORT_S - 1 <= failed_at - first.created <= BOUND_S - FIRST_REPORT_S + 3
    assert took < BOUND_S + 90
    # The run says why it stopped: its entry point adds nothing to an ActorFailure.
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"the run's actors could not start: {message}"]
