"""Weight sync, driven from the loops: the learner's policy into every generator.

One interface, `WeightSync`: calling it with (version, step) syncs and returns the sync's
metrics. One implementation per backend (`sync.backend`):

- `ObjectStoreSync`: learner 0 puts buckets into Ray's object store; each generator fetches them
  one at a time while vLLM loads them.
- `BroadcastSync`: a torch.distributed broadcast from learner 0 to every generator over a group of
  its own (gloo on CPU, NCCL on GPUs), opened at the first sync and again after a failure.

What travels (`sync.payload`) is the learner's business (`actors.learner_weights`, the sending
end): with LoRA, the adapters, merged on each generator (`moalign.lora_sync`); otherwise every
weight. Each generator loads it in `actors.generator_weights` (the receiving end). The transport
below moves named tensors either way (`moalign.weight_transport`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.ray_actors import ActorFailure, ActorGroup, describe_failure
from moalign.config import RunConfig
from moalign.weight_transport import BroadcastError

log = logging.getLogger(__name__)


class WeightSync:
    """Pushes learner 0's weights to every generator; subclasses are the backends. Every learner
    rank takes part in the export (under ZeRO-3 the weights are gathered from all of them)."""

    backend = ""

    def __init__(self, learners: ActorGroup, generators: ActorGroup, bucket_mb: float, payload: str, timeout_s: float):
        self.learners, self.generators = learners, generators
        self.bucket_mb, self.payload, self.timeout_s = bucket_mb, payload, timeout_s
        self._full_bytes: int | None = None
        if generators is not None:
            generators.after_restart = self.restore

    def __call__(self, version: int, step: int | None) -> dict[str, float]:
        """Sync, and return seconds by phase, buckets, bytes sent and their share of the full weights."""
        started = time.perf_counter()
        metrics = self.sync(version, step)
        self.generators.policy_version = version
        if self._full_bytes is None:
            learner = self.learners.actors[0]
            self._full_bytes = self.learners.wait([learner.full_weight_bytes.remote()], "full_weight_bytes", step, [0])[0]
        metrics["sync/bytes_fraction"] = metrics["sync/bytes"] / self._full_bytes if self._full_bytes else 0.0
        metrics["time/sync_s"] = time.perf_counter() - started
        return metrics

    def sync(self, version: int, step: int | None) -> dict[str, float]:
        """The backend's transfer: metrics with at least sync/buckets and sync/bytes."""
        raise NotImplementedError

    _last: tuple[list[ray.ObjectRef], int] | None = None
    """The last sync's buckets in the object store and their version, for a restarted generator."""

    _loading: set[int] | None = None
    """While the generators load a sync: the ones restarted during it (the load sent again restores them)."""

    def restore(self, index: int, step: int | None) -> None:
        """Give restarted generator `index` the last synced weights (it restarts from the base)."""
        if self._loading is not None:
            # Restarted during this sync's load, which is sent to it again and gives it the new
            # weights whole: nothing older to restore (right after a learner restart there is none).
            self._loading.add(index)
            return
        if self._last is None:
            if self.generators.policy_version:
                raise ActorFailure(
                    "generator",
                    index,
                    step,
                    "restore",
                    f"it was restarted, and sync.backend={self.backend} with sync.payload={self.payload} keeps no copy of policy "
                    f"version {self.generators.policy_version} to give it; resume the run from its last checkpoint, or use "
                    "sync.backend=object_store (or LoRA adapters)",
                )
            return  # nothing synced yet: the restarted engine holds the base weights, as the others do
        refs, version = self._last
        generator = self.generators.actors[index]
        self.generators.wait(
            [generator.load_weight_refs.remote(refs, version, self.timeout_s, self.payload)], "load_weight_refs", step, [index]
        )

    def can_seed_new_generators(self) -> bool:
        """Whether a generator started now could be given the weights the others hold."""
        return self._last is not None or not self.generators.policy_version

    def members_changed(self) -> None:
        """Generators were added or removed (`ActorGroup.resize`)."""

    def _keep(self, step: int | None) -> list[ray.ObjectRef]:
        """Learner 0's payload put into the object store (owned by the learner: never copied
        through here). Every rank takes part: under ZeRO-3 each holds a shard of every weight."""
        return self.learners.call("export_weight_refs", self.bucket_mb, self.payload, step=step)[0]


class ObjectStoreSync(WeightSync):
    """Keeps the last sync's buckets in the object store (a few % of the model with LoRA), so a
    generator that Ray restarts gets exactly the weights the others hold."""

    backend = "object_store"

    def sync(self, version: int, step: int | None) -> dict[str, float]:
        t = time.perf_counter()
        refs = self._keep(step)
        exported = time.perf_counter() - t
        expected = self.generators.policy_version
        self._loading = restarted_during = set()
        try:
            loaded = self.generators.call("load_weight_refs", refs, version, self.timeout_s, self.payload, step=step)
        finally:
            self._loading = None
        self._last = (refs, version)
        for i, result in enumerate(loaded):
            if result["previous_version"] != expected and i not in restarted_during:
                # Restarted while idle: this load gave it the new weights all the same.
                self.generators.restarted(i, step, f"while idle (it held policy version {result['previous_version']}, not {expected})")
        return {"time/sync_export_s": exported, "sync/buckets": len(refs), "sync/bytes": loaded[0].get("bytes", 0)}


class BroadcastSync(WeightSync):
    """The group's members are learner 0 (rank 0) and generator i (rank i + 1). A failed sync
    drops the group: the next sync opens a new one (open_broadcast closes a member's old one
    first) rather than reusing a group in an unknown state."""

    backend = "broadcast"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._open = False

    def _open_group(self, step: int | None) -> float:
        t = time.perf_counter()
        learner = self.learners.actors[0]
        addr, port = self.learners.wait([learner.node_ip.remote(), learner.free_port.remote()], "free_port", step, [0, 0])
        world = 1 + len(self.generators)
        joins = [g.open_broadcast.remote(addr, port, i + 1, world, self.timeout_s) for i, g in enumerate(self.generators.actors)]
        wait_collective(
            [
                (self.learners, [learner.open_broadcast.remote(addr, port, world, self.timeout_s)], [0]),
                (self.generators, joins, list(range(len(self.generators)))),
            ],
            "open_broadcast",
            step,
        )
        log.info("broadcast group up: learner 0 at %s:%d and %d generator(s)", addr, port, len(self.generators))
        return time.perf_counter() - t

    def sync(self, version: int, step: int | None) -> dict[str, float]:
        learner = self.learners.actors[0]
        metrics: dict[str, float] = {}
        try:
            if not self._open:
                metrics["time/sync_open_s"] = self._open_group(step)
                self._open = True
            t = time.perf_counter()
            manifest = self.learners.call("weight_manifest", self.bucket_mb, self.payload, step=step)[0]
            metrics["time/sync_export_s"] = time.perf_counter() - t
            t = time.perf_counter()
            receives = [g.receive_weights.remote(manifest, version, self.payload) for g in self.generators.actors]
            sent, received = wait_collective(
                [
                    (self.learners, [learner.broadcast_weights.remote(self.bucket_mb, self.payload)], [0]),
                    (self.generators, receives, list(range(len(self.generators)))),
                ],
                "broadcast_weights/receive_weights",
                step,
            )
            metrics["time/sync_broadcast_s"] = time.perf_counter() - t
        except ActorFailure:
            self._open = False
            raise
        if self.payload == "adapter":
            # The broadcast leaves no copy behind; the adapters are small enough to keep one for
            # a generator Ray restarts (a full payload is not: such a restart stops the run).
            self._last = (self._keep(step), version)
        sync_bytes = received[0]["bytes"] if received else sent[0]["bytes"]
        return {**metrics, "sync/buckets": len(manifest), "sync/bytes": sync_bytes}

    def restore(self, index: int, step: int | None) -> None:
        super().restore(index, step)
        # The new process is in no group, and the old group has a dead member: open a new one.
        self._open = False

    def members_changed(self) -> None:
        # The group's size is fixed when it opens: the next sync opens one of the new size.
        self._open = False


def make_weight_sync(cfg: RunConfig, learners: ActorGroup, generators: ActorGroup) -> WeightSync:
    """The configured backend and payload; the collective's own timeout sits below the Ray one,
    so a dead peer is reported as the cause rather than as a Ray timeout."""
    payload = "adapter" if cfg.sync.payload == "auto" and cfg.learner.lora.enabled else "full"
    backend = {"object_store": ObjectStoreSync, "broadcast": BroadcastSync}[cfg.sync.backend]
    timeout_s = 0.8 * cfg.ray_timeout_s if cfg.sync.backend == "broadcast" else cfg.ray_timeout_s
    return backend(learners, generators, cfg.sync.bucket_mb, payload, timeout_s)


def _failure_rank(failure: ActorFailure) -> int:
    """Which failure to report when a collective fails on several actors: the root cause first.

    A dead actor makes its peers' broadcasts fail (BroadcastError) or time out, and a generator
    that refused the weights fails alone; the peers' errors are consequences.
    """
    exc = failure.__cause__
    if isinstance(exc, RayActorError):
        return 0
    if isinstance(exc, RayTaskError):
        return 2 if isinstance(getattr(exc, "cause", None), BroadcastError) else 1
    return 3  # no answer in time


def wait_collective(parts: Sequence[tuple[ActorGroup, list[ray.ObjectRef], list[int]]], method: str, step: int | None) -> list[list[Any]]:
    """Wait for one collective's calls on several groups together, within the groups' timeouts.

    Waiting on one actor after another would report whichever is first in line (often a
    consequence, or a timeout) rather than what went wrong; here every call gets to finish or
    fail before the most telling failure is raised, naming the others.
    """
    from ray.exceptions import GetTimeoutError

    refs = [r for _, rs, _ in parts for r in rs]
    ray.wait(refs, num_returns=len(refs), timeout=max(group.timeout_s for group, _, _ in parts))
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
    results: list[list[Any]] = []
    failures: list[ActorFailure] = []
    for group, group_refs, indices in parts:
        out = []
        for i, ref in zip(indices, group_refs):
            if ref not in ready:
                timeout = ActorFailure(group.role, i, step, method, describe_failure(GetTimeoutError()))
                timeout.__cause__ = GetTimeoutError()
                failures.append(timeout)
                continue
            try:
                out.append(group.wait([ref], method, step, [i])[0])
            except ActorFailure as failure:
                failures.append(failure)
        results.append(out)
    if failures:
        first = min(failures, key=_failure_rank)
        others = [f"{f.role} #{f.index}" for f in failures if f is not first]
        cause = first.cause + (f" (also failed, as a consequence: {', '.join(others)})" if others else "")
        raise ActorFailure(first.role, first.index, step, method, cause) from first.__cause__
    return results
