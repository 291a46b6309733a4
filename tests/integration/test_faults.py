"""Reward actors that hang, die or cannot start, on real Ray actors: a hung actor is killed and
restarted and its call sent again, one that keeps hanging is named with the objective it was in;
one that dies again after its restarts, or never starts, is named with its role, step and cause."""

import pytest

from actors.ray_actors import ActorFailure, ActorGroup, RewardActor, ping_all
from moalign.config import ObjectiveConfig
from tests.helpers.reward_fns import hang_marker

pytestmark = pytest.mark.integration


def reward_group(source: str, **objective) -> ActorGroup:
    # 10 s, not less: on a slow 2-core host beside the other test worker, a restarted actor's
    # first call (importing the reward function) took over 3 s and read as a second hang.
    objectives = [ObjectiveConfig(name="Slow", source="callable", path=f"tests.helpers.reward_fns:{source}", **objective)]
    options = {"num_cpus": 0.5, "max_concurrency": 2}
    return ActorGroup("reward", RewardActor, 1, options, lambda i: ((objectives,), {}), timeout_s=10, max_restarts=1, start_timeout_s=120)


def test_a_hanging_reward_is_restarted_and_one_that_keeps_hanging_is_named(ray_cluster):
    # Started first, as the loops do: a slow start on a loaded host is not a hang.
    once = reward_group("hang_once")
    ping_all([once])
    hang_marker().touch()
    try:
        scores = once.call_each("score", [(["p", "q"], ["ab", "abc"])], step=7)
        assert scores[0].tolist() == [[2.0], [3.0]] and once.restarts == 1
        assert not hang_marker().exists()
    finally:
        hang_marker().unlink(missing_ok=True)
        once.kill()

    always = reward_group("hang")
    try:
        ping_all([always])
        with pytest.raises(ActorFailure) as err:
            always.call_each("score", [(["p"], ["ab"])], step=7)
    finally:
        always.kill()
    failure = err.value
    assert failure.role == "reward" and failure.step == 7 and failure.actor_lost
    assert "no answer within 10s (objective 'Slow' has been scoring 1 completions for" in failure.cause
    assert "(2 tries, restarted in between); it may hang" in failure.cause


def test_a_reward_actor_that_dies_again_after_its_restarts_or_never_starts_is_named(ray_cluster, tmp_path):
    dies = reward_group("exit_process")
    try:
        with pytest.raises(ActorFailure) as err:
            dies.call_each("score", [(["p"], ["ab"])], step=1)
    finally:
        dies.kill()
    assert err.value.role == "reward" and err.value.step == 1 and err.value.method.startswith("score")
    assert "died" in err.value.cause

    objectives = [ObjectiveConfig(name="Judge", source="hf_classifier", path=str(tmp_path / "no-such-model"))]
    never = ActorGroup("reward", RewardActor, 1, {"num_cpus": 0.5}, lambda i: ((objectives,), {}), timeout_s=60)
    try:
        with pytest.raises(ActorFailure) as err:
            ping_all([never])
    finally:
        never.kill()
    assert err.value.role == "reward" and err.value.method == "ping"
    assert "failed to start" in err.value.cause and "no-such-model" in err.value.cause
