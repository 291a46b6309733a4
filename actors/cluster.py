"""A run's actors coming up: Ray (joined or started), each role's actor group with its placement
(what a role asks of the cluster: `RoleAsk`), the learners' rendezvous, and the actors' runtime
environment. The loops call the actors through `actors.calls`; weight sync is `actors.weight_sync`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moalign.config import ActorsConfig, RunConfig

log = logging.getLogger("moalign")


def start_ray(actors: ActorsConfig, address: str | None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one sized for `actors`."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return
    # A local cluster: logical CPUs are scheduling tokens; the loop's phases run one after
    # another, so reserving more tokens than cores oversubscribes nothing at a time. A new one
    # ("local"), never a head found on this machine: ray.init would join that one and refuse
    # num_cpus (a cluster is joined with --address or RAY_ADDRESS).
    a = actors
    wanted = a.num_generators * a.generator_cpus + a.num_reward_workers * a.reward_cpus + a.num_learners * a.learner_cpus
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(np.ceil(wanted))), include_dashboard=False)


class RunActors:
    """A run's actor groups (None for a role not started), each killed when the run ends. The
    learners can be replaced: data-parallel ranks rendezvous once, so a lost learner is never
    restarted alone, its whole group is started again."""

    def __init__(self, cfg: RunConfig, model_path: str):
        self.cfg, self.model_path = cfg, model_path
        self.generators = self.scorers = self.learners = None
        self._started: list = []

    def start(self, roles: tuple[str, ...]) -> RunActors:
        """Start the groups of `roles` and wait until every actor answers: construction errors
        (bad model path, OOM) surface here, named by role, not at step 1."""
        from actors.ray_actors import ActorFailure, ping_all

        cfg = self.cfg
        try:
            if "generator" in roles:
                self.generators = self._start(_generator_group(cfg, self.model_path, actor_env(cfg, cfg.actors.generator_cpus)))
            if "reward" in roles:
                self.scorers = self._start(_reward_group(cfg))
            if "learner" in roles:
                self.learners = self._start(_learner_group(cfg, self.model_path))
            ping_all(self._started)
        except ActorFailure as exc:
            # The loops' entry points exit without a word on an ActorFailure (they expect one
            # logged with its step): a run that never started would end silently.
            log.error("the run's actors could not start: %s", exc)
            raise
        return self

    def _start(self, group):
        self._started.append(group)
        return group

    def __iter__(self):
        return iter((self.generators, self.scorers, self.learners))

    def replace_learners(self):
        """Kill the learner group and start a fresh one from the base model (load a checkpoint into it)."""
        from actors.ray_actors import ping_all

        self.learners.kill()
        self._started.remove(self.learners)
        self.learners = self._start(_learner_group(self.cfg, self.model_path))
        ping_all([self.learners])
        return self.learners

    def kill(self) -> None:
        for group in self._started:
            group.kill()


@contextlib.contextmanager
def actor_groups(cfg: RunConfig, model_path: str, roles: tuple[str, ...] = ("generator", "reward", "learner")):
    """The actor groups named in `roles` (a RunActors, which unpacks as generators, scorers,
    learners), killed when the block ends."""
    actors = RunActors(cfg, model_path)
    try:
        yield actors.start(roles)
    finally:
        actors.kill()


def _reward_group(cfg: RunConfig):
    from actors.ray_actors import ActorGroup, RewardActor

    a, ask = cfg.actors, role_ask(cfg.actors, "reward")
    return ActorGroup(
        "reward",
        RewardActor,
        ask.count,
        # A second thread answers `busy` while a score call runs, to name a source that hangs.
        ask.options() | {"runtime_env": actor_env(cfg, ask.cpus), "max_concurrency": 2},
        lambda i: ((cfg.objectives,), {}),
        a.reward_timeout_s,
        max_restarts=a.max_restarts,
        start_timeout_s=cfg.ray_timeout_s,
        placement=ask.strategy,
        placement_timeout_s=a.placement_timeout_s,
    )


def _learner_group(cfg: RunConfig, model_path: str):
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    from actors.ray_actors import ActorFailure, ActorGroup, LearnerActor, describe_failure
    from moalign.weight_transport import free_port

    a = cfg.actors
    # Data-parallel ranks meet at learner 0. In a placement group, a task in learner 0's bundle
    # picks the address and port on that node; without one, learner 0 is pinned to this (the
    # driver's) node and they are picked here.
    meet: dict[str, Any] = {}

    def rendezvous(group) -> None:
        if a.num_learners == 1:
            # Nothing to meet at: the one learner picks its own port as it binds it. A port picked
            # here stays unbound while the actor starts (seconds), and another process took it
            # once in a test run (EADDRINUSE in test_pathway).
            return
        if group is None:
            meet.update(master_addr=ray.util.get_node_ip_address(), master_port=free_port())
            return
        on_rank0 = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        probe = ray.remote(num_cpus=0)(node_address_and_free_port).options(scheduling_strategy=on_rank0).remote()
        try:
            meet.update(zip(("master_addr", "master_port"), ray.get(probe, timeout=cfg.ray_timeout_s)))
        except (RayError, GetTimeoutError) as exc:
            raise ActorFailure("learner", 0, None, "rendezvous", describe_failure(exc)) from exc

    ask = role_ask(cfg.actors, "learner")
    pinned = a.num_learners > 1 and ask.strategy is None
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ActorGroup(
        "learner",
        LearnerActor,
        ask.count,
        ask.options() | {"runtime_env": actor_env(cfg, ask.cpus)},
        lambda i: ((cfg, model_path), {"rank": i, "world_size": a.num_learners, **meet}),
        cfg.ray_timeout_s,
        first_actor_options={"scheduling_strategy": here} if pinned else None,
        placement=ask.strategy,
        before_start=rendezvous,
        placement_timeout_s=a.placement_timeout_s,
    )


def node_address_and_free_port() -> tuple[str, int]:
    """This node's address and a port free on it (run as a task where learner 0 will run)."""
    import ray

    from moalign.weight_transport import free_port

    return ray.util.get_node_ip_address(), free_port()


def _strategy(actors: ActorsConfig) -> str | None:
    return None if actors.placement == "none" else actors.placement


def _placed(node_labels: dict[str, str]) -> dict:
    """Actor options that keep a role on the nodes carrying its labels (a KubeRay worker group)."""
    return {"label_selector": dict(node_labels)} if node_labels else {}


ROLES = ("generator", "reward", "learner")


@dataclass(frozen=True)
class RoleAsk:
    """What one role's actors ask of the cluster: the one place the run's resource arithmetic is
    read from the config (the actor groups, their placement reports, `deploy/moalign-job submit`)."""

    role: str
    count: int
    cpus: float
    gpus: float
    labels: dict[str, str] = field(default_factory=dict)
    strategy: str | None = None
    """Placement-group strategy (None: plain actor placement)."""

    @property
    def total_cpus(self) -> float:
        return self.count * self.cpus

    @property
    def total_gpus(self) -> float:
        return self.count * self.gpus

    def options(self) -> dict[str, Any]:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus} | _placed(self.labels)

    def describe(self) -> str:
        """E.g. `1 learner actor of 2 CPU, 0 GPU (a PACK placement group, any node)`."""
        where = f"a {self.strategy} placement group" if self.strategy else "no placement group"
        nodes = f"nodes labelled {self.labels}" if self.labels else "any node"
        actors = "actor" if self.count == 1 else "actors"
        return f"{self.count} {self.role} {actors} of {self.cpus:g} CPU, {self.gpus:g} GPU{' each' if self.count > 1 else ''} ({where}, {nodes})"


def role_ask(actors: ActorsConfig, role: str) -> RoleAsk:
    a, strategy = actors, _strategy(actors)
    if role == "generator":
        # Each engine's tensor-parallel workers run inside the generator's reservation.
        return RoleAsk(
            role, a.num_generators, a.generator_cpus, a.generator_gpus * a.tensor_parallel_size, dict(a.generator_node_labels), strategy
        )
    if role == "reward":
        return RoleAsk(role, a.num_reward_workers, a.reward_cpus, a.reward_gpus, dict(a.reward_node_labels), strategy)
    if role == "learner":
        return RoleAsk(role, a.num_learners, a.learner_cpus, a.learner_gpus, dict(a.learner_node_labels), strategy)
    raise ValueError(f"unknown role {role!r}; roles are {ROLES}")


def run_asks(cfg: RunConfig) -> list[RoleAsk]:
    """The roles a run holds at once: MO-ODPO all three; MODPO and MOPO the learners, with reward
    actors beside them when margins are scored."""
    roles = ("learner", "reward") if cfg.is_offline else ROLES
    return [role_ask(cfg.actors, r) for r in roles]


def actor_env(cfg: RunConfig, cpus: float) -> dict:
    """An actor's runtime environment: one thread pool sized from its CPU allotment, whose idle
    threads sleep rather than spin.

    Spinning pools that share cores (with each other or with a busy neighbour) stall: one busy
    process on a 2-core machine made steps 5x slower. Give a role more cores with `actors.<role>_cpus`.
    """
    threads = cfg.actors.omp_threads or max(1, math.ceil(cpus))
    return {
        "env_vars": {
            "OMP_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "TOKENIZERS_PARALLELISM": "false",
            # For the per-actor call gauges (actors.metrics.record_actor_call).
            "MOALIGN_RUN": Path(cfg.run_dir).name,
            "MOALIGN_RAY_METRICS": "1" if cfg.logging.ray_metrics else "0",
        }
    }


def _generator_group(cfg: RunConfig, model_path: str, env: dict):
    from actors.ray_actors import ActorGroup, GeneratorActor

    a, ask = cfg.actors, role_ask(cfg.actors, "generator")
    return ActorGroup(
        "generator",
        GeneratorActor,
        ask.count,
        ask.options() | {"runtime_env": env},
        lambda i: (
            (model_path,),
            {
                "seed": cfg.seed + i,
                "dtype": cfg.model.dtype,
                "max_model_len": cfg.model.max_prompt_tokens + cfg.rollout.max_new_tokens,
                "tensor_parallel_size": a.tensor_parallel_size,
                "gpu_memory_utilization": a.gpu_memory_utilization,
                "cpu_kvcache_gb": a.cpu_kvcache_gb,
            },
        ),
        cfg.ray_timeout_s,
        max_restarts=a.max_restarts,
        placement=ask.strategy,
        placement_timeout_s=a.placement_timeout_s,
    )
