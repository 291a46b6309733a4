"""Weight sync through Ray: after a learner step and a sync, the vLLM generator computes the same
token log-probs as the learner's policy; before the sync it does not. With LoRA the adapters
travel and the generators merge them, to the same bits a full-weight sync gives."""

import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch

from actors.ray_actors import ActorFailure, ActorGroup, GeneratorActor, LearnerActor
from actors.weight_sync import BroadcastSync, ObjectStoreSync, make_weight_sync
from moalign.config import load_config

pytestmark = pytest.mark.integration


PROBE = [[1, 200, 300, 400, 500, 600, 700], [2, 20, 30, 40]]
BATCH = {
    "prompt_ids": [[1, 2, 3, 4], [5, 6, 7]],
    "chosen_ids": [[10, 11, 12], [13, 14]],
    "rejected_ids": [[20, 21], [22, 23, 24]],
    "loss_weights": [1.0, 1.0],
    "total_weight": 2.0,
}


def start_actors(tiny_model, n_generators, max_restarts=0, tensor_parallel_size=1):
    """One learner with a large learning rate (so a step visibly moves the policy) and n generators."""
    cfg = load_config(
        None,
        [f"model.path={tiny_model}", "rollout.prompts_per_step=2", "learner.micro_batch_pairs=2", "learner.lr=0.05", "sync.bucket_mb=1"],
    )
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    learners = ActorGroup("learner", LearnerActor, 1, {"num_cpus": 1, "runtime_env": env}, lambda i: ((cfg, tiny_model), {}), 300)
    generators = ActorGroup(
        "generator",
        GeneratorActor,
        n_generators,
        {"num_cpus": 1, "runtime_env": env},
        lambda i: ((tiny_model,), {"cpu_kvcache_gb": 0.25, "tensor_parallel_size": tensor_parallel_size}),
        300,
        max_restarts=max_restarts,
        # In a placement group, as in a run: vLLM must not take it for a cluster of its own.
        placement="PACK" if tensor_parallel_size > 1 else None,
    )
    return cfg, learners, generators


def test_synced_generator_equals_learner(tiny_model, ray_cluster):
    cfg, learners, generators = start_actors(tiny_model, 1)
    probe, batch = PROBE, BATCH
    try:
        before = generators.call("prompt_logprobs", probe)[0]
        assert before[0] == pytest.approx(learners.call("token_logprobs", probe)[0][0], abs=1e-4)

        for _ in range(3):
            learners.call("train_step", batch)
        trained = learners.call("token_logprobs", probe)[0]
        stale = generators.call("prompt_logprobs", probe)[0]
        assert max(abs(a - b) for a, b in zip(trained[0], stale[0])) > 1e-3, "the learner step must change the policy"

        adapters = make_weight_sync(cfg, learners, generators)
        assert isinstance(adapters, ObjectStoreSync) and adapters.payload == "adapter"
        sent = adapters(version=1, step=3)
        synced = generators.call("prompt_logprobs", probe)[0]
        for got, want in zip(synced, trained):
            assert got == pytest.approx(want, abs=1e-4)
        assert generators.call("ping")[0]["version"] == 1

        full = ObjectStoreSync(learners, generators, cfg.sync.bucket_mb, "full", cfg.ray_timeout_s)(version=2, step=3)
        assert full["sync/buckets"] > 1, "weights must travel in several buckets at bucket_mb=1"
        assert full["sync/bytes_fraction"] == pytest.approx(1.0)
        assert sent["sync/bytes"] < full["sync/bytes"] / 10 and sent["sync/bytes_fraction"] < 0.1
        # The generator's merge and the learner's are the same arithmetic: identical log-probs.
        assert generators.call("prompt_logprobs", probe)[0] == synced
    finally:
        learners.kill()
        generators.kill()


def test_a_tensor_parallel_generator_takes_each_sync_live(tiny_model, ray_cluster):
    """A generator whose engine runs two tensor-parallel workers, each a process of its own with
    half of every sharded weight: each sync is staged in shared memory and every worker reloads
    its shard from it (merging the adapters itself), and the engine then computes the learner's
    log-probs; a refused payload leaves it as it was; the staged files go once loaded."""
    cfg, learners, generators = start_actors(tiny_model, 1, tensor_parallel_size=2)
    staged_before = set(Path("/dev/shm").glob("moalign-weights-*"))
    try:
        engine = generators.call("ping")[0]
        assert len(set(engine["worker_pids"]) - {engine["pid"]}) == 2
        before = generators.call("prompt_logprobs", PROBE)[0]
        assert before[0] == pytest.approx(learners.call("token_logprobs", PROBE)[0][0], abs=1e-4)
        for _ in range(3):
            learners.call("train_step", BATCH)
        trained = learners.call("token_logprobs", PROBE)[0]
        assert max(abs(a - b) for a, b in zip(trained[0], before[0])) > 1e-3, "the learner step must change the policy"

        adapters = make_weight_sync(cfg, learners, generators)
        assert adapters.payload == "adapter"
        adapters(version=1, step=3)
        synced = generators.call("prompt_logprobs", PROBE)[0]
        for got, want in zip(synced, trained):
            assert got == pytest.approx(want, abs=1e-4)

        learners.call("train_step", BATCH)
        trained = learners.call("token_logprobs", PROBE)[0]
        ObjectStoreSync(learners, generators, cfg.sync.bucket_mb, "full", cfg.ray_timeout_s)(version=2, step=4)
        for got, want in zip(generators.call("prompt_logprobs", PROBE)[0], trained):
            assert got == pytest.approx(want, abs=1e-4)

        bad = [[("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))]]
        with pytest.raises(ActorFailure, match=r"has shape \(3, 3\), the model expects"):
            generators.call("load_weights", bad, 3, step=5)
        assert generators.call("ping")[0]["version"] == 2
        for got, want in zip(generators.call("prompt_logprobs", PROBE)[0], trained):
            assert got == pytest.approx(want, abs=1e-4)
        assert set(Path("/dev/shm").glob("moalign-weights-*")) <= staged_before
    finally:
        learners.kill()
        generators.kill()


def test_broadcast_sync_two_generators(tiny_model, ray_cluster):
    cfg, learners, generators = start_actors(tiny_model, 2, max_restarts=1)
    probe, batch = PROBE, BATCH

    def assert_synced(version):
        trained = learners.call("token_logprobs", probe)[0]
        for synced in generators.call("prompt_logprobs", probe):
            for got, want in zip(synced, trained):
                assert got == pytest.approx(want, abs=1e-4)
        assert [p["version"] for p in generators.call("ping")] == [version, version]

    try:
        for _ in range(3):
            learners.call("train_step", batch)
        stale = generators.call("prompt_logprobs", probe)[0]
        trained = learners.call("token_logprobs", probe)[0]
        assert max(abs(a - b) for a, b in zip(trained[0], stale[0])) > 1e-3, "the learner step must change the policy"

        # The collective's timeout is what the dead-generator case below waits out (the survivor
        # hears nothing): short, as every member here is idle and answers within a second.
        broadcast = BroadcastSync(learners, generators, 0.05, "adapter", 10.0)
        first = broadcast(version=1, step=3)
        assert first["sync/buckets"] > 1, "the adapters must travel in several buckets at bucket_mb=0.05"
        assert first["sync/bytes"] > 0 and "time/sync_open_s" in first
        assert_synced(1)

        learners.call("train_step", batch)
        second = broadcast(version=2, step=4)
        assert "time/sync_open_s" not in second, "the second sync must reuse the group"
        assert second["sync/buckets"] == first["sync/buckets"]
        assert_synced(2)

        # A generator that refuses the weights still drains the broadcast: nobody waits for a
        # timeout, the engines keep version 2, and the next sync works (on a new group).
        started = time.monotonic()
        with pytest.raises(ActorFailure, match=r"generator actor #0 at step 5.*version must be >= 0"):
            broadcast(version=-1, step=5)
        # Well under the actor groups' 300 s: the broadcast's own timeout ended it, not Ray's.
        assert time.monotonic() - started < 150
        assert [p["version"] for p in generators.call("ping")] == [2, 2]
        learners.call("train_step", batch)
        assert "time/sync_open_s" in broadcast(version=3, step=6)
        assert_synced(3)

        # A generator killed (SIGKILL) and restarted by Ray gets version 3 back from the adapter
        # copy the broadcast kept before its call is sent again; the next sync opens a new group.
        os.kill(generators.call("ping")[0]["pid"], signal.SIGKILL)
        restored = generators.call_each("prompt_logprobs", [(probe,), (probe,)], step=6)
        assert generators.restarts == 1 and restored[0] == restored[1]
        assert_synced(3)
        learners.call("train_step", batch)
        assert "time/sync_open_s" in broadcast(version=4, step=7)
        assert_synced(4)

        # A generator that died: the sync fails within the collective's timeout and blames it
        # (the learner sees the closed connection at once; the surviving generator waits out
        # its timeout, as nothing tells it the learner gave up).
        ray.kill(generators.actors[1], no_restart=True)
        started = time.monotonic()
        with pytest.raises(ActorFailure, match=r"generator actor #1 at step 8.*the actor died") as failure:
            broadcast(version=5, step=8)
        assert time.monotonic() - started < 150
        assert failure.value.role == "generator" and failure.value.step == 8
    finally:
        learners.kill()
        generators.kill()


@pytest.mark.parametrize("interpolated", [False, True], ids=["separate", "interpolated"])
def test_control_token_rows_reach_the_generator(tiny_model, ray_cluster, tmp_path, interpolated):
    """A tied-embedding model with control tokens: after a sync the generator reads the trained
    rows of the tokens (the learner trains them beside the adapters), as the learner does. With
    interpolated bins the tokens below are bins between the ends: the generator gets the rows the
    learner embeds them as, not the untrained parameter rows."""
    from moalign.control_tokens import add_control_tokens

    control = add_control_tokens(tiny_model, tmp_path / "with-tokens", ["A", "B"], 1, interpolated)
    model = str(tmp_path / "with-tokens")
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            "objectives=[{name: A, source: conciseness}, {name: B, source: detail}]",
            "conditioning.style=control_tokens",
            "conditioning.decimals=1",
            "rollout.prompts_per_step=2",
            "learner.micro_batch_pairs=2",
            "learner.lr=0.05",
        ],
    )
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    learners = ActorGroup("learner", LearnerActor, 1, {"num_cpus": 1, "runtime_env": env}, lambda i: ((cfg, model), {}), 300)
    generators = ActorGroup(
        "generator", GeneratorActor, 1, {"num_cpus": 1, "runtime_env": env}, lambda i: ((model,), {"cpu_kvcache_gb": 0.25}), 300
    )
    first = control.first_id
    batch = {**BATCH, "prompt_ids": [[1, 2, first + 3, first + 18], [5, 6, first + 10, first + 11]]}
    # Log-probs of every token after the first (the control tokens' too): entries 3.. follow them.
    probe = [[1, 2, first + 3, first + 18, 10, 11, 12], [5, 6, first + 10, first + 11, 13, 14]]
    try:
        for _ in range(3):
            learners.call("train_step", batch)
        trained = learners.call("token_logprobs", probe)[0]
        stale = generators.call("prompt_logprobs", probe)[0]
        make_weight_sync(cfg, learners, generators)(version=1, step=3)
        synced = generators.call("prompt_logprobs", probe)[0]
        for got, want, old in zip(synced, trained, stale):
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3
            assert max(abs(a - b) for a, b in zip(old[3:], want[3:])) > 1e-2, "the step must have moved what follows the tokens"
    finally:
        learners.kill()
        generators.kill()
