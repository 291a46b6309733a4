"""Weight sync through Ray: after a learner step and a sync, the vLLM generator computes the same
token log-probs as the learner's policy; before the sync it does not."""

import pytest

from actors.ray_actors import ActorGroup, GeneratorActor, LearnerActor
from moalign.config import load_config
from orchestrator import _sync_weights

pytestmark = pytest.mark.integration


def test_synced_generator_equals_learner(tiny_model, ray_cluster):
    cfg = load_config(
        None,
        [f"model.path={tiny_model}", "rollout.prompts_per_step=2", "learner.micro_batch_pairs=2", "learner.lr=0.05", "sync.bucket_mb=1"],
    )
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    learners = ActorGroup("learner", LearnerActor, 1, {"num_cpus": 1, "runtime_env": env}, lambda i: ((cfg, tiny_model), {}), 300)
    generators = ActorGroup(
        "generator", GeneratorActor, 1, {"num_cpus": 1, "runtime_env": env}, lambda i: ((tiny_model,), {"cpu_kvcache_gb": 0.25}), 300
    )
    try:
        probe = [[1, 200, 300, 400, 500, 600, 700], [2, 20, 30, 40]]
        before = generators.call("prompt_logprobs", probe)[0]
        assert before[0] == pytest.approx(learners.call("token_logprobs", probe)[0][0], abs=1e-4)

        batch = {
            "prompt_ids": [[1, 2, 3, 4], [5, 6, 7]],
            "chosen_ids": [[10, 11, 12], [13, 14]],
            "rejected_ids": [[20, 21], [22, 23, 24]],
            "loss_weights": [1.0, 1.0],
            "total_weight": 2.0,
        }
        for _ in range(3):
            learners.call("train_step", batch)
        trained = learners.call("token_logprobs", probe)[0]
        stale = generators.call("prompt_logprobs", probe)[0]
        assert max(abs(a - b) for a, b in zip(trained[0], stale[0])) > 1e-3, "the learner step must change the policy"

        timings = _sync_weights(cfg, learners, generators, version=1, step=3)
        assert timings["sync/buckets"] > 1, "weights must travel in several buckets at bucket_mb=1"
        synced = generators.call("prompt_logprobs", probe)[0]
        for got, want in zip(synced, trained):
            assert got == pytest.approx(want, abs=1e-4)
        assert generators.call("ping")[0]["version"] == 1
    finally:
        learners.kill()
        generators.kill()
