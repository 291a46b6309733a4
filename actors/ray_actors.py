"""Ray wrappers: thin `@ray.remote` subclasses of the plain classes, and actor groups whose every
remote call has a timeout and whose failures say which actor, which step and why."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.generator import Generator
from actors.learner import Learner
from actors.reward import RewardScorer
from moalign.weight_sync import BroadcastError, LazyBuckets, free_port

log = logging.getLogger(__name__)


class ActorFailure(RuntimeError):
    """A remote call that failed, timed out, or whose actor died; the message names role, index,
    step, method and cause."""

    def __init__(self, role: str, index: int, step: int | None, method: str, cause: str):
        self.role, self.index, self.step, self.method, self.cause = role, index, step, method, cause
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"{role} actor #{index}{at}, in {method}(): {cause}")


def _cause(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        inner = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"{type(inner).__name__}: {inner}".split("\n\n")[0]
    if isinstance(exc, RayActorError):
        # The last line carries the reason: the __init__ exception, or the worker's exit detail.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        if exc.actor_init_failed:
            return f"the actor failed to start: {reason}"
        return f"the actor died ({reason})"
    if isinstance(exc, GetTimeoutError):
        return "no answer within the timeout (ray_timeout_s); the actor may be hung"
    return f"{type(exc).__name__}: {exc}"


class GeneratorActor(Generator):
    def load_weight_refs(self, bucket_refs: list[ray.ObjectRef], version: int, timeout_s: float) -> dict:
        # Buckets are fetched one at a time so a generator never holds two copies of the model.
        return self.load_weights(LazyBuckets(bucket_refs, functools.partial(ray.get, timeout=timeout_s)), version)


class LearnerActor(Learner):
    def export_weight_refs(self, bucket_mb: float) -> list[ray.ObjectRef]:
        # Refs are owned by this actor: the driver never copies the weights through itself.
        return [ray.put(bucket) for bucket in self.export_weights(bucket_mb)]

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port()


class RewardActor(RewardScorer):
    pass


class ActorGroup:
    """N actors of one role; `call` runs a method on each and waits with a timeout."""

    def __init__(
        self,
        role: str,
        cls: type,
        count: int,
        options: dict[str, Any],
        make_args: Callable[[int], tuple[tuple, dict]],
        timeout_s: float,
        first_actor_options: dict[str, Any] | None = None,
    ):
        self.role = role
        self.timeout_s = timeout_s
        remote_cls = ray.remote(cls)
        self.actors = []
        for i in range(count):
            args, kwargs = make_args(i)
            # Named so the Ray dashboard shows role and index; the suffix keeps runs apart.
            name = f"moalign-{role}-{i}-{uuid.uuid4().hex[:6]}"
            extra = first_actor_options if i == 0 and first_actor_options else {}
            self.actors.append(remote_cls.options(name=name, **options, **extra).remote(*args, **kwargs))
        log.info("started %d %s actor(s) with %s", count, role, options)

    def __len__(self) -> int:
        return len(self.actors)

    def wait(self, refs: Sequence[ray.ObjectRef], method: str, step: int | None, indices: Sequence[int] | None = None) -> list[Any]:
        """ray.get each ref with the group's timeout; the first failure becomes an ActorFailure."""
        indices = list(indices) if indices is not None else list(range(len(refs)))
        results = []
        for i, ref in zip(indices, refs):
            try:
                results.append(ray.get(ref, timeout=self.timeout_s))
            except (RayTaskError, RayActorError, GetTimeoutError) as exc:
                raise ActorFailure(self.role, i, step, method, _cause(exc)) from exc
        return results

    def call(self, method: str, *args: Any, step: int | None = None, **kwargs: Any) -> list[Any]:
        """The same call on every actor."""
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return self.wait(refs, method, step)

    def call_each(self, method: str, per_actor_args: Sequence[tuple], step: int | None = None) -> list[Any]:
        """Actor i gets per_actor_args[i]; actors without an entry are skipped."""
        return self.wait(self.submit_each(method, per_actor_args), method, step)

    def submit_each(self, method: str, per_actor_args: Sequence[tuple]) -> list[ray.ObjectRef]:
        """`call_each` without the wait: the refs, for `wait` later."""
        return [getattr(self.actors[i], method).remote(*a) for i, a in enumerate(per_actor_args)]

    def kill(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:
                log.warning("could not kill %s actor: %s", self.role, exc)


def ping_all(groups: Sequence[ActorGroup]) -> None:
    """Wait until every actor of every group has started, and raise the first failure as soon as
    it happens: a reward model that cannot load is reported in seconds, not after the vLLM
    engines beside it have finished starting."""
    pending = {a.ping.remote(): (group, i) for group in groups for i, a in enumerate(group.actors)}
    deadline = time.monotonic() + max((g.timeout_s for g in groups), default=0)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            group, i = next(iter(pending.values()))
            raise ActorFailure(group.role, i, None, "ping", _cause(GetTimeoutError()))
        group, i = pending.pop(ready[0])
        group.wait(ready, "ping", None, [i])


# ---------------------------------------------------------------------------- broadcast weight sync

# Broadcast groups that are up, by the ids of their actors (learner 0, then the generators).
# A replaced actor has a new id, so a changed membership opens a new group.
_open_broadcasts: set[tuple[str, ...]] = set()


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


def _wait_collective(parts: Sequence[tuple[ActorGroup, list[ray.ObjectRef], list[int]]], method: str, step: int | None) -> list[list[Any]]:
    """Wait for one collective's calls on several groups together, within the groups' timeouts.

    Waiting on one actor after another would report whichever is first in line (often a
    consequence, or a timeout) rather than what went wrong; here every call gets to finish or
    fail before the most telling failure is raised, naming the others.
    """
    refs = [r for _, rs, _ in parts for r in rs]
    ray.wait(refs, num_returns=len(refs), timeout=max(group.timeout_s for group, _, _ in parts))
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
    results: list[list[Any]] = []
    failures: list[ActorFailure] = []
    for group, group_refs, indices in parts:
        out = []
        for i, ref in zip(indices, group_refs):
            if ref not in ready:
                failures.append(ActorFailure(group.role, i, step, method, _cause(GetTimeoutError())))
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


def broadcast_sync(
    learners: ActorGroup, generators: ActorGroup, bucket_mb: float, version: int, step: int | None, timeout_s: float
) -> dict[str, float]:
    """Weight sync by a collective broadcast from learner rank 0 to every generator.

    The first call (and the first after a failure) builds the group: a port on learner 0's node,
    learner 0 as rank 0, generator i as rank i+1, all joining concurrently. `timeout_s` bounds
    every collective inside the actors, so a peer that died makes the others raise instead of
    hanging; keep it below the groups' ray timeouts so that error, not a Ray timeout, is reported.
    """
    learner = learners.actors[0]
    key = (learner._actor_id.hex(), *(g._actor_id.hex() for g in generators.actors))
    timings: dict[str, float] = {}
    try:
        if key not in _open_broadcasts:
            t = time.perf_counter()
            addr, port = learners.wait([learner.node_ip.remote(), learner.free_port.remote()], "free_port", step, [0, 0])
            world = 1 + len(generators)
            joins = [g.open_broadcast.remote(addr, port, i + 1, world, timeout_s) for i, g in enumerate(generators.actors)]
            _wait_collective(
                [
                    (learners, [learner.open_broadcast.remote(addr, port, world, timeout_s)], [0]),
                    (generators, joins, list(range(len(generators)))),
                ],
                "open_broadcast",
                step,
            )
            _open_broadcasts.add(key)
            timings["time/sync_open_s"] = time.perf_counter() - t
            log.info("broadcast group up: learner 0 at %s:%d and %d generator(s)", addr, port, len(generators))

        t = time.perf_counter()
        manifest = learners.wait([learner.weight_manifest.remote(bucket_mb)], "weight_manifest", step, [0])[0]
        timings["time/sync_export_s"] = time.perf_counter() - t

        t = time.perf_counter()
        sent, received = _wait_collective(
            [
                (learners, [learner.broadcast_weights.remote(bucket_mb)], [0]),
                (generators, [g.receive_weights.remote(manifest, version) for g in generators.actors], list(range(len(generators)))),
            ],
            "broadcast_weights/receive_weights",
            step,
        )
        timings["time/sync_broadcast_s"] = time.perf_counter() - t
    except ActorFailure:
        # Some members may still hold the group: the next sync opens a new one (open_broadcast
        # closes the old one first) rather than reusing a group in an unknown state.
        _open_broadcasts.discard(key)
        raise
    sync_bytes = received[0]["bytes"] if received else sent[0]["bytes"]
    return {**timings, "sync/buckets": len(manifest), "sync/bytes": sync_bytes}
