"""Weight sync side by side: each backend (`object_store`, `broadcast`) with each payload (the
LoRA adapters, merged on the generators; the full merged weights), one learner and two
generators, interleaved in one run so machine noise hits all alike. Prints per contender the
median seconds, the bytes sent and their share of the full weights, and ratios to the
full-weight object-store sync.

    python benchmarks/sync_backends.py --model builtin:smollm2-135m-instruct --bucket-mb 64
    python -m benchmarks.sync_backends            # a tiny random model, seconds (from the repository root)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

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

    from actors.ray_actors import ActorGroup, GeneratorActor, LearnerActor
    from actors.weight_sync import BroadcastSync, ObjectStoreSync
    from moalign.config import load_config

    if args.model:
        model = args.model
    else:
        # The tests' tiny model: `tests` is importable from the repository root (python -m benchmarks.sync_backends).
        from tests.helpers.tiny_model import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
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
        contenders = {
            f"{backend}/{payload}": cls(learners, generators, args.bucket_mb, payload, 300.0)
            for backend, cls in (("object_store", ObjectStoreSync), ("broadcast", BroadcastSync))
            for payload in ("full", "adapter")
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        last: dict[str, dict] = {}
        version = 0
        for rep in range(args.reps + 1):  # rep 0 warms up (and opens the broadcast group)
            for name, sync in contenders.items():
                version += 1
                started = time.perf_counter()
                last[name] = sync(version, step=version)
                seconds = time.perf_counter() - started
                log.info("%s rep %d: %.3f s", name, rep, seconds)
                if rep:
                    times[name].append(seconds)
        reference = statistics.median(times["object_store/full"])
        print(f"model {model}, {args.generators} generator(s), buckets of {args.bucket_mb} MiB, median of {args.reps}")
        print(f"{'contender':<22} {'seconds':>8} {'MB sent':>9} {'of full':>8} {'vs object_store/full':>21}")
        for name, seconds in times.items():
            median, out = statistics.median(seconds), last[name]
            print(
                f"{name:<22} {median:>8.3f} {out['sync/bytes'] / 1e6:>9.1f} {out['sync/bytes_fraction']:>8.1%} {reference / median:>20.2f}x"
            )
    finally:
        learners.kill()
        generators.kill()
        ray.shutdown()


if __name__ == "__main__":
    main()
