"""A reward source that hangs, on real Ray actors: the hung actor is killed and restarted and its
call sent again; one that keeps hanging stops the run with an error naming the objective."""

import pytest

from actors.ray_actors import ActorFailure, ActorGroup, RewardActor
from moalign.config import ObjectiveConfig
from tests.helpers.reward_fns import hang_marker

pytestmark = pytest.mark.integration


def reward_group(source: str) -> ActorGroup:
    objectives = [ObjectiveConfig(name="Slow", source="callable", path=f"tests.helpers.reward_fns:{source}")]
    options = {"num_cpus": 0.5, "max_concurrency": 2}
    return ActorGroup("reward", RewardActor, 1, options, lambda i: ((objectives,), {}), timeout_s=4, max_restarts=1)


def test_a_hanging_reward_is_restarted_and_one_that_keeps_hanging_is_named(ray_cluster):
    once = reward_group("hang_once")
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
        with pytest.raises(ActorFailure) as err:
            always.call_each("score", [(["p"], ["ab"])], step=7)
    finally:
        always.kill()
    failure = err.value
    assert failure.role == "reward" and failure.step == 7 and failure.actor_lost
    assert "no answer within 4s (objective 'Slow' has been scoring 1 completions for" in failure.cause
    assert "(2 tries, restarted in between); it may hang" in failure.cause
