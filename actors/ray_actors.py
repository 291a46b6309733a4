"""Ray wrappers: thin `@ray.remote` subclasses of the plain classes, and actor groups whose every
remote call has a timeout and whose failures say which actor, which step and why."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from actors.cluster import ROLES, RoleAsk
from actors.generator import Generator
from actors.learner import Learner
from actors.metrics import record_actor_call
from actors.reward import RewardScorer
from moalign.weight_transport import LazyBuckets, free_port

log = logging.getLogger(__name__)

FIRST_REPORT_S = 5.0
"""How long actors may wait for room before the run says so (with room, Ray places them in well
under a second; a process that is only slow to start is reported as waiting at worst)."""
REPORT_EVERY_S = 30.0
"""How often a role that still waits for room is reported again."""
WAITING_FOR_ROOM = "cannot be placed yet"
"""The phrase a waiting report carries: `deploy/moalign-job status` looks for it in a job's log."""
PLACED_AFTER = "placed after waiting"
"""The phrase of the line that ends a wait (`deploy/moalign-job status` reads it too)."""
HUNG_PROBE_TIMEOUT_S = 30.0
"""How long an actor that timed out gets to say what it is doing (from its second thread)."""


class ActorFailure(RuntimeError):
    """A remote call that failed, timed out, or whose actor died; the message names role, index,
    step, method and cause."""

    def __init__(self, role: str, index: int, step: int | None, method: str, cause: str):
        self.role, self.index, self.step, self.method, self.cause = role, index, step, method, cause
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"{role} actor #{index}{at}, in {method}(): {cause}")

    @property
    def actor_lost(self) -> bool:
        """The actor died or stopped answering, rather than its call raising an error."""
        return isinstance(self.__cause__, (RayActorError, GetTimeoutError))


def describe_failure(exc: BaseException) -> str:
    """The cause of a failed remote call, in one line."""
    if isinstance(exc, RayTaskError):
        inner = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"{type(inner).__name__}: {inner}".split("\n\n")[0]
    if isinstance(exc, RayActorError):
        # The last line carries the reason: the __init__ exception, or the worker's exit detail.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # Ray follows an unexpected exit with a paragraph of generic advice (OOM, ray stop, ...).
        reason = (lines[-1] if lines else type(exc).__name__).split(" Some common causes include")[0]
        if exc.actor_init_failed:
            return f"the actor failed to start: {reason}"
        return f"the actor died ({reason})"
    if isinstance(exc, GetTimeoutError):
        return "no answer within the timeout (ray_timeout_s); the actor may be hung"
    return f"{type(exc).__name__}: {exc}"


def wait_for_room(
    placed: Callable[[float], bool],
    report: Callable[[float], str],
    bound_s: float,
    what: str = "the actors",
    first_report_s: float = FIRST_REPORT_S,
    every_s: float = REPORT_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait until `placed(timeout_s)` (which waits at most that long) says the actors have room;
    log `report(seconds waited)` as a warning after `first_report_s` and every `every_s` after
    that (and `what` once placed, after a report). False once `bound_s` has passed without room."""
    started = clock()
    deadline = started + bound_s
    report_at = started + min(first_report_s, bound_s)
    reported = False
    while True:
        if placed(max(0.0, min(report_at, deadline) - clock())):
            if reported:
                log.info("%s: %s %.0fs", what, PLACED_AFTER, clock() - started)
            return True
        now = clock()
        if now >= report_at:
            log.warning("%s", report(now - started))
            reported = True
            report_at = now + every_s
        if now >= deadline:
            return False


def _cpu_gpu(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0.0):g} CPU, {resources.get('GPU', 0.0):g} GPU"


def cluster_room(labels: dict[str, str] | None = None) -> str:
    """What the cluster has free and in all (ray.available_resources / cluster_resources), and how
    many of its nodes carry `labels`."""
    free, total = ray.available_resources(), ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    text = f"the cluster has {_cpu_gpu(free)} free of {_cpu_gpu(total)} on {len(nodes)} node(s)"
    if len(nodes) > 1:
        largest = max(nodes, key=lambda n: n.get("Resources", {}).get("CPU", 0.0))
        text += f" (the largest: {_cpu_gpu(largest.get('Resources', {}))})"
    if labels:
        carrying = [n for n in nodes if all((n.get("Labels") or {}).get(k) == v for k, v in labels.items())]
        text += f", {len(carrying)} of them labelled {labels}"
    return text


def _has_process(actor: Any) -> bool:
    """Whether Ray has given the actor a worker process: one without is still waiting for room.
    Read from the GCS actor table, which a local run without a dashboard has too (the state API
    needs the dashboard); if that cannot be read, the actor counts as placed (ping_all's timeout
    still bounds the wait)."""
    from ray._private import state

    try:
        info = state.actors(actor_id=actor._actor_id.hex())
    except Exception as exc:
        log.debug("could not read the actor table: %s", exc)
        return True
    return bool(info) and (info.get("Pid", 0) != 0 or info.get("State") in ("ALIVE", "DEAD"))


def _measured(method: Callable) -> Callable:
    """The actor method, its duration exported per actor (actors.metrics.record_actor_call)."""

    @functools.wraps(method)
    def timed(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            record_actor_call(method.__name__, time.perf_counter() - started)

    return timed


class GeneratorActor(Generator):
    generate = _measured(Generator.generate)
    load_weights = _measured(Generator.load_weights)

    def load_weight_refs(self, bucket_refs: list[ray.ObjectRef], version: int, timeout_s: float, payload: str = "full") -> dict:
        # Buckets are fetched one at a time so a generator never holds two copies of the model.
        return self.load_weights(LazyBuckets(bucket_refs, functools.partial(ray.get, timeout=timeout_s)), version, payload)


class LearnerActor(Learner):
    train_step = _measured(Learner.train_step)

    @_measured
    def export_weight_refs(self, bucket_mb: float, payload: str = "full") -> list[ray.ObjectRef]:
        # Refs are owned by this actor: the driver never copies the weights through itself.
        return [ray.put(bucket) for bucket in self.export_weights(bucket_mb, payload)]

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port()


class RewardActor(RewardScorer):
    score = _measured(RewardScorer.score)


_LIVE_GROUPS: weakref.WeakSet[ActorGroup] = weakref.WeakSet()
"""The groups this process has started and not killed: what a role waiting for room is told this
run already holds."""


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
        max_restarts: int = 0,
        start_timeout_s: float | None = None,
        placement: str | None = None,
        before_start: Callable[[Any], None] | None = None,
        placement_timeout_s: float | None = None,
    ):
        self.role = role
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s or timeout_s
        """Longest an actor may take to (re)start and answer: a reward source allowed seconds per
        call may still need minutes to load on a busy node."""
        self.placement_timeout_s = placement_timeout_s or self.start_timeout_s
        """Longest the group's actors (or its placement group) wait for the cluster to have room."""
        self.ask = RoleAsk(
            role, count, float(options.get("num_cpus", 1)), float(options.get("num_gpus", 0) or 0),
            dict(options.get("label_selector") or {}), placement,
        )  # fmt: skip
        """What one batch of this group's actors asks of the cluster (count: the first batch)."""
        self.max_restarts = max_restarts
        self.restarts = 0
        """Restarts this group has recovered from, over the run."""
        self.after_restart: Callable[[int, int | None], None] | None = None
        """Called with (actor index, step) once a restarted or added actor answers, before it is
        sent work: a generator gets the current weights here (set by actors.weight_sync)."""
        self.policy_version = 0
        """Generators: the policy version each holds once the calls sent so far have run (set by
        actors.weight_sync); a restarted generator answers from version 0 until it is restored."""
        self._remote_cls = ray.remote(cls)
        self._options = {**options, "max_restarts": max_restarts} if max_restarts else dict(options)
        self._make_args, self._first_actor_options = make_args, first_actor_options
        self._placement, self._before_start = placement, before_start
        self._placement_groups: list[Any] = []
        """The placement group each actor is reserved in (None without `placement`)."""
        self.actors: list[Any] = []
        self._start_actors(count, None)
        _LIVE_GROUPS.add(self)
        log.info("started %d %s actor(s) with %s%s", count, role, self._options, f", placement {placement}" if placement else "")

    def _start_actors(self, count: int, step: int | None) -> None:
        """Start actors len(self.actors)..count-1, reserved together in a placement group of their
        own when the group has a placement strategy; `before_start` sees that group first."""
        first = len(self.actors)
        group = self._reserve(first, count, step) if self._placement else None
        if self._before_start is not None:
            self._before_start(group)
        options = dict(self._options)
        if group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options.pop("label_selector", None)  # the bundles carry it
        for i in range(first, count):
            args, kwargs = self._make_args(i)
            extra = self._first_actor_options if i == 0 and self._first_actor_options else {}
            if group is not None:
                extra = {**extra, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i - first)}
            # Named so the Ray dashboard shows role and index; the suffix keeps runs apart.
            name = f"moalign-{self.role}-{i}-{uuid.uuid4().hex[:6]}"
            self.actors.append(self._remote_cls.options(name=name, **options, **extra).remote(*args, **kwargs))
            self._placement_groups.append(group)
        if group is None:
            # Plain actors wait for room one by one, unseen: wait for their processes here, so a
            # role that does not fit is reported like a placement group that does not.
            added = self.actors[first:count]
            if not self._wait_for_room(first, count, lambda timeout_s: _poll(lambda: all(map(_has_process, added)), timeout_s)):
                for actor in added:
                    self._kill(actor)
                del self.actors[first:], self._placement_groups[first:]
                raise self._no_room(first, count, step)

    def _reserve(self, first: int, count: int, step: int | None):
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {"CPU": self.ask.cpus}
        if self.ask.gpus:
            bundle["GPU"] = self.ask.gpus
        selector = self.ask.labels
        n = count - first
        group = placement_group(
            [bundle] * n,
            strategy=self._placement,
            name=f"moalign-{self.role}-{first}-{count - 1}-{uuid.uuid4().hex[:6]}",
            bundle_label_selector=[dict(selector)] * n if selector else None,
        )
        ready = group.ready()
        if not self._wait_for_room(first, count, lambda timeout_s: bool(ray.wait([ready], timeout=timeout_s)[0])):
            remove_placement_group(group)
            raise self._no_room(first, count, step)
        return group

    def _wait_for_room(self, first: int, count: int, placed: Callable[[float], bool]) -> bool:
        ask = dataclasses.replace(self.ask, count=count - first)
        bound = self.placement_timeout_s

        def report(waited: float) -> str:
            return (
                f"{ask.describe()} {WAITING_FOR_ROOM}: {cluster_room(ask.labels)}{self._held_beside()}; "
                f"waited {waited:.0f}s, the run stops at {bound:g}s (actors.placement_timeout_s)"
            )

        return wait_for_room(placed, report, bound, what=f"{self.role} actors {first}..{count - 1}")

    def _no_room(self, first: int, count: int, step: int | None) -> ActorFailure:
        ask = dataclasses.replace(self.ask, count=count - first)
        labels = f", start nodes labelled {ask.labels}" if ask.labels else ""
        return ActorFailure(
            self.role, first, step, "placement",
            f"{ask.describe()} could not be placed within {self.placement_timeout_s:g}s (actors.placement_timeout_s): "
            f"{cluster_room(ask.labels)}{self._held_beside()}. Give the cluster room for them (more logical CPUs: "
            f"`ray start --num-cpus=N`; more nodes{labels}; or stop what holds them), or ask less (actors.{self.role}_cpus, "
            f"_gpus, the number of actors)",
        )  # fmt: skip

    def _held_beside(self) -> str:
        """What the other actor groups of this process hold, when any (the roles started before
        this one may hold the room it waits for)."""
        others = sorted(
            (g for g in list(_LIVE_GROUPS) if g is not self and g.actors),
            key=lambda g: ROLES.index(g.role) if g.role in ROLES else len(ROLES),
        )
        if not others:
            return ""
        held = ", ".join(
            f"{g.role} {len(g.actors)} x {g.ask.cpus:g} CPU" + (f" + {g.ask.gpus:g} GPU" if g.ask.gpus else "") for g in others
        )
        return f"; this run's other actors hold {held}"

    def resize(self, count: int, step: int | None) -> str:
        """Grow or shrink the group to `count` actors while a run goes on; returns what was done.
        Added actors are waited for and handed to `after_restart` (a generator gets the current
        weights) before they get work. Removed ones are the last: the caller makes sure no call it
        still needs is outstanding on them."""
        before = len(self.actors)
        if count > before:
            self._check_room(count - before, step)
            started = time.perf_counter()
            try:
                self._start_actors(count, step)
                ping_all([self], indices=range(before, count))
                for i in range(before, count):
                    if self.after_restart is not None:
                        self.after_restart(i, step)
            except ActorFailure:
                self.shrink_to(before)
                raise
            return f"{self.role} actors {before} -> {count} (added in {time.perf_counter() - started:.1f}s, at policy version {self.policy_version})"
        if count < before:
            self.shrink_to(count)
            return f"{self.role} actors {before} -> {count}"
        return f"{self.role} actors already {count}"

    def _check_room(self, added: int, step: int | None) -> None:
        """Refuse at once what the cluster has no free room for, rather than wait out the start
        timeout while the run stalls (checked against the cluster's free total, not node by node)."""
        need = {"CPU": added * self._options.get("num_cpus", 1), "GPU": added * self._options.get("num_gpus", 0)}
        free = ray.available_resources()
        short = {r: n for r, n in need.items() if n > free.get(r, 0.0) + 1e-9}
        if short:
            wanted = ", ".join(f"{n:g} {r}" for r, n in short.items())
            has = ", ".join(f"{free.get(r, 0.0):g} {r}" for r in short)
            raise ActorFailure(
                self.role, len(self.actors), step, "resize",
                f"{added} more {self.role} actor(s) need {wanted}; the cluster has {has} free. Add nodes (or lower "
                f"actors.{self.role}_cpus / _gpus in the next run), then ask again",
            )  # fmt: skip

    def shrink_to(self, count: int) -> None:
        for actor in self.actors[count:]:
            self._kill(actor)
        del self.actors[count:]
        left = self._placement_groups[count:]
        del self._placement_groups[count:]
        self._release(g for g in left if g not in self._placement_groups)

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
                raise ActorFailure(self.role, i, step, method, describe_failure(exc)) from exc
        return results

    def call(self, method: str, *args: Any, step: int | None = None) -> list[Any]:
        """The same call on every actor (see `call_each` for restarts)."""
        return self.call_each(method, [args] * len(self.actors), step)

    def call_each(self, method: str, per_actor_args: Sequence[tuple], step: int | None = None) -> list[Any]:
        """Actor i gets per_actor_args[i]; actors without an entry are skipped. A call whose actor
        died is sent again once Ray has restarted it (up to the group's max_restarts)."""
        return self.collect(self.submit_each(method, per_actor_args), method, per_actor_args, step)

    def collect(
        self,
        refs: Sequence[ray.ObjectRef],
        method: str,
        per_actor_args: Sequence[tuple],
        step: int | None,
        stale: Callable[[Any], str | None] | None = None,
    ) -> list[Any]:
        """The results of `submit_each(method, per_actor_args)`, surviving restarts: when actor i
        died during its call, or answered from a restarted process (`stale(result)` says why, or
        None), this waits until Ray has restarted it, runs `after_restart` and sends the call again."""
        results = []
        for i, ref in enumerate(refs):
            restarted, hung_pid = 0, None
            while True:
                try:
                    result = ray.get(ref, timeout=self.timeout_s)
                    cause = stale(result) if stale is not None else None
                    if cause is None:
                        break
                except RayActorError as exc:
                    if exc.actor_init_failed or restarted >= self.max_restarts:
                        raise ActorFailure(self.role, i, step, method, describe_failure(exc)) from exc
                    cause = describe_failure(exc)
                except GetTimeoutError as exc:
                    doing, hung_pid = self._hung_state(i)
                    cause = f"no answer within {self.timeout_s:g}s{doing}"
                    if restarted >= self.max_restarts:
                        tries = f" ({restarted + 1} tries, restarted in between)" if restarted else ""
                        raise ActorFailure(self.role, i, step, method, f"{cause}{tries}; it may hang") from exc
                    # A hung process finishes nothing: kill it so that Ray starts it again.
                    ray.kill(self.actors[i], no_restart=False)
                    cause += "; killed as hung"
                except RayTaskError as exc:
                    raise ActorFailure(self.role, i, step, method, describe_failure(exc)) from exc
                if restarted >= self.max_restarts:
                    raise ActorFailure(self.role, i, step, method, f"{cause}, and no restarts are left")
                restarted += 1
                self._recover(i, step, method, cause, hung_pid)
                hung_pid = None
                ref = getattr(self.actors[i], method).remote(*per_actor_args[i])
            results.append(result)
        return results

    def _hung_state(self, index: int) -> tuple[str, int | None]:
        """What a slow actor says it is doing, and its process id: asked of actors that answer
        `busy` from a second thread while their call runs (others give nothing)."""
        actor = self.actors[index]
        if not hasattr(actor, "busy"):
            return "", None
        # 30 s, not 10: in CI on a loaded 2-core host a live actor's free thread took over 10 s
        # to answer, and the hang was reported without the source it was in.
        try:
            doing, pong = ray.get([actor.busy.remote(), actor.ping.remote()], timeout=HUNG_PROBE_TIMEOUT_S)
        except (RayTaskError, RayActorError):
            return "", None
        except GetTimeoutError:
            return f" (it did not say what it was doing within {HUNG_PROBE_TIMEOUT_S:g}s either)", None
        return (f" ({doing})" if doing else ""), pong.get("pid")

    def _recover(self, index: int, step: int | None, method: str, cause: str, old_pid: int | None = None) -> None:
        started = time.perf_counter()
        log.warning("%s actor #%d at step %s, in %s(): %s; waiting for Ray to restart it", self.role, index, step, method, cause)
        # A call while Ray restarts the actor fails at once as unavailable: ask again until the new
        # process answers (a killed one may still answer for a moment: `old_pid`); an actor whose
        # restarts ran out is dead, and that is the failure.
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                pong = ray.get(self.actors[index].ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                if old_pid is None or pong.get("pid") != old_pid:
                    break
            except ActorUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise ActorFailure(self.role, index, step, f"{method} (restart)", describe_failure(exc)) from exc
            except (RayTaskError, RayActorError, GetTimeoutError) as exc:
                raise ActorFailure(self.role, index, step, f"{method} (restart)", describe_failure(exc)) from exc
            if time.monotonic() > deadline:
                raise ActorFailure(self.role, index, step, f"{method} (restart)", f"process {old_pid} still answers after it was killed")
            time.sleep(1.0)
        self.restarted(index, step, f"in {time.perf_counter() - started:.1f}s; {method}() sent again")

    def restarted(self, index: int, step: int | None, how: str) -> None:
        """Count a restart of actor `index` found at `step`, and hand it to `after_restart`."""
        if self.after_restart is not None:
            self.after_restart(index, step)
        self.restarts += 1
        log.warning(
            "%s actor #%d restarted at step %s %s (%s restart %d of this run)", self.role, index, step, how, self.role, self.restarts
        )

    def submit_each(self, method: str, per_actor_args: Sequence[tuple]) -> list[ray.ObjectRef]:
        """`call_each` without the wait: the refs, for `wait` later."""
        return [getattr(self.actors[i], method).remote(*a) for i, a in enumerate(per_actor_args)]

    def kill(self) -> None:
        _LIVE_GROUPS.discard(self)
        for actor in self.actors:
            self._kill(actor)
        self._release(self._placement_groups)

    def _release(self, groups: Iterable[Any]) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in {id(g): g for g in groups if g is not None}.values():
            try:
                remove_placement_group(group)
            except Exception as exc:
                log.warning("could not remove a %s placement group: %s", self.role, exc)

    def _kill(self, actor) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:
            log.warning("could not kill %s actor: %s", self.role, exc)


def _poll(done: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> bool:
    """Whether `done()` turns true within `timeout_s`, asked every `every_s`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(every_s, max(0.0, deadline - time.monotonic())))
    return True


def ping_all(groups: Sequence[ActorGroup], indices: Iterable[int] | None = None) -> None:
    """Wait until every actor of every group (or those at `indices`) has started, and raise the
    first failure as soon as it happens: a reward model that cannot load is reported in seconds,
    not after the vLLM engines beside it have finished starting."""
    wanted = set(indices) if indices is not None else None
    pending = {a.ping.remote(): (group, i) for group in groups for i, a in enumerate(group.actors) if wanted is None or i in wanted}
    deadline = time.monotonic() + max((g.start_timeout_s for g in groups), default=0)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            group, i = next(iter(pending.values()))
            raise ActorFailure(group.role, i, None, "ping", describe_failure(GetTimeoutError()))
        group, i = pending.pop(ready[0])
        group.wait(ready, "ping", None, [i])
