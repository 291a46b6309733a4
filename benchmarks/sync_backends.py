"""Weight sync side by side: `object_store` vs `broadcast`, one learner and two generators,
interleaved in one run so machine noise hits both alike. Prints medians and their ratio.

    python benchmarks/sync_backends.py --model builtin:smollm2-135m-instruct --bucket-mb 64
    python benchmarks/sync_backends.py            # a tiny random model, seconds
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench")
BATCH = {
    "prompt_ids": [[1, 2, 3, 4], [5, 6, 7]],
    "chosen_ids": [[10, 11, 12], [13, 14]],
    "rejected_ids": [[20, 21], [22, 23, 24]],
    "loss_weights": [1.0, 1.0],
    "total_weight": 2.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint dir or builtin:…; default: a tiny random Llama")
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import ray

    from actors.cluster import sync_weights
    from actors.ray_actors import ActorGroup, GeneratorActor, LearnerActor, broadcast_sync
    from moalign.config import load_config
    from moalign.models import build_tiny_model

    model = args.model or str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    cfg = load_config(
        None, [f"model.path={model}", "rollout.prompts_per_step=2", "learner.micro_batch_pairs=2", f"sync.bucket_mb={args.bucket_mb}"]
    )
    ray.init(num_cpus=2 + 2 * args.generators, include_dashboard=False, log_to_driver=False)
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}}
    learners = ActorGroup("learner", LearnerActor, 1, {"num_cpus": 1, "runtime_env": env}, lambda i: ((cfg, model), {}), 600)
    generators = ActorGroup(
        "generator",
        GeneratorActor,
        args.generators,
        {"num_cpus": 1, "runtime_env": env},
        lambda i: ((model,), {"cpu_kvcache_gb": 0.25}),
        600,
    )
    try:
        learners.call("train_step", BATCH)
        times: dict[str, list[float]] = {"object_store": [], "broadcast": []}
        version = 0
        for rep in range(args.reps + 1):  # rep 0 warms up (and opens the broadcast group)
            for backend in times:
                version += 1
                started = time.perf_counter()
                if backend == "object_store":
                    out = sync_weights(cfg, learners, generators, version, step=version)
                else:
                    out = broadcast_sync(learners, generators, args.bucket_mb, version, step=version, timeout_s=300)
                seconds = time.perf_counter() - started
                log.info("%s rep %d: %.3f s", backend, rep, seconds)
                if rep:
                    times[backend].append(seconds)
        obj, bc = statistics.median(times["object_store"]), statistics.median(times["broadcast"])
        print(f"model {model}: {out['sync/bytes'] / 1e6:.0f} MB in {out['sync/buckets']} bucket(s) to {args.generators} generator(s)")
        print(f"object_store median {obj:.3f} s, broadcast median {bc:.3f} s, object_store/broadcast = {obj / bc:.2f}x")
    finally:
        learners.kill()
        generators.kill()
        ray.shutdown()


if __name__ == "__main__":
    main()
