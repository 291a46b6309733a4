"""The Ray side of a run, shared by the MO-ODPO loop (`orchestrator.py`), the offline loop
(`offline.py`) and the evaluations (`evaluate.py`): opening a run directory, starting Ray and the
actor groups, and the calls every loop makes through them (generate, score, merge the learner
ranks' metrics, checkpoint, export). Weight sync has its own module, `actors.weight_sync`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moalign.checkpoint import CheckpointError, latest_checkpoint, latest_sound_checkpoint, own_run_dir, publish, staging_dir
from moalign.conditioning import condition_messages, render_prompt_ids
from moalign.config import ConfigError, RunConfig, load_config, save_resolved
from moalign.pairs import check_rewards

log = logging.getLogger("moalign")


def open_run(cfg: RunConfig, ray_address: str | None) -> tuple[Path, Path | None, str, Any]:
    """The run directory (with the resolved config saved, after checking that a resumed run trains
    the same problem), its latest checkpoint or None, Ray, the model's local path and tokenizer."""
    from transformers import AutoTokenizer

    from moalign.models import starting_model

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    own_run_dir(run_dir)
    resume_from = latest_sound_checkpoint(run_dir)
    if resume_from is not None:
        check_resume_config(cfg, run_dir / "config.yaml")
    save_resolved(cfg, run_dir / "config.yaml")
    start_ray(cfg, ray_address)
    model_path = str(starting_model(cfg, run_dir))
    return run_dir, resume_from, model_path, AutoTokenizer.from_pretrained(model_path)


# Changing these between the stop and the resume does not change what is trained (the
# checkpoint interval does: every checkpoint forces a weight sync). Health bounds only decide
# when to warn. Evaluations run only after regular syncs and sample with their own seeds. A run
# directory may be moved or copied and resumed where it lies.
_RESUMABLE_CHANGES = (
    "run_dir", "steps", "logging.", "ray_timeout_s", "actors.placement_timeout_s", "checkpoint.keep_last", "health.", "eval.",
)  # fmt: skip


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def check_resume_config(cfg: RunConfig, saved_path: Path) -> None:
    """A resumed run must train the same problem; otherwise 'continue as if never stopped' is false."""
    saved = _flatten(load_config(saved_path).model_dump(mode="json"))
    now = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(
        k.rstrip(".") for k in now.keys() | saved.keys() if not k.startswith(_RESUMABLE_CHANGES) and now.get(k) != saved.get(k)
    )
    if changed:
        raise ConfigError(
            f"run_dir {cfg.run_dir} holds a checkpoint made with a different configuration (changed: {', '.join(changed)}); "
            f"resume with the saved {saved_path} or choose a new run_dir"
        )


def start_ray(cfg: RunConfig, address: str | None) -> None:
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
    a = cfg.actors
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

    a, ask = cfg.actors, role_ask(cfg, "reward")
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
        if group is None:
            meet.update(master_addr=ray.util.get_node_ip_address(), master_port=free_port())
            return
        on_rank0 = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        probe = ray.remote(num_cpus=0)(node_address_and_free_port).options(scheduling_strategy=on_rank0).remote()
        try:
            meet.update(zip(("master_addr", "master_port"), ray.get(probe, timeout=cfg.ray_timeout_s)))
        except (RayError, GetTimeoutError) as exc:
            raise ActorFailure("learner", 0, None, "rendezvous", describe_failure(exc)) from exc

    ask = role_ask(cfg, "learner")
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


def _strategy(cfg: RunConfig) -> str | None:
    return None if cfg.actors.placement == "none" else cfg.actors.placement


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


def role_ask(cfg: RunConfig, role: str) -> RoleAsk:
    a, strategy = cfg.actors, _strategy(cfg)
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
    return [role_ask(cfg, r) for r in roles]


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

    a, ask = cfg.actors, role_ask(cfg, "generator")
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


def load_fitted_prompts(cfg: RunConfig, path: str, tokenizer, report_path: Path | None = None) -> list:
    """The prompt file's records that fit model.max_prompt_tokens with any weight line written in
    (the others skipped or cut, `data.too_long`), counted in the log and at `report_path`."""
    from moalign.checkpoint import write_json
    from moalign.conditioning import fit_prompts
    from moalign.data import DataError, load_prompts

    c = cfg.conditioning
    try:
        prompts, report = fit_prompts(
            load_prompts(path), tokenizer, cfg.objective_names, c.style, c.decimals, cfg.model.max_prompt_tokens, cfg.data.too_long
        )
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from exc
    if report["too_long"]:
        done = "left out" if cfg.data.too_long == "skip" else "cut at the start to fit"
        log.warning(
            "%s: %d of %d prompts are over model.max_prompt_tokens=%d with the weight line written in (longest %d tokens): %s "
            "(data.too_long=%s), e.g. %s",
            path, report["too_long"], report["prompts"], cfg.model.max_prompt_tokens, report["longest_tokens"], done,
            cfg.data.too_long, ", ".join(report["too_long_ids"][:3]),
        )  # fmt: skip
    if not prompts:
        raise DataError(
            f"{path}: every prompt is over model.max_prompt_tokens={cfg.model.max_prompt_tokens}; raise it or use data.too_long=truncate"
        )
    if report_path is not None:
        write_json(report_path, {"path": str(path), **report})
    return prompts


def render_conditioned(tokenizer, prompt: str, names: list[str], weights: np.ndarray, cfg: RunConfig) -> list[int]:
    ids = render_prompt_ids(tokenizer, condition_messages(prompt, names, weights, cfg.conditioning.style, cfg.conditioning.decimals))
    if len(ids) > cfg.model.max_prompt_tokens:
        # load_fitted_prompts measured every prompt under the longest weight line: only a
        # prompt that did not pass through it lands here.
        raise ConfigError(
            f"prompt {prompt[:60]!r} is {len(ids)} tokens after conditioning, over model.max_prompt_tokens={cfg.model.max_prompt_tokens}"
        )
    return ids


def chunks(n: int, parts: int) -> list[slice]:
    """`parts` contiguous slices covering range(n), sizes differing by at most one."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class Generation:
    """Completions being sampled on the generators: submitted now, collected by `samples()`.

    A generator runs its calls in the order they were sent, so a generation sent before a weight
    sync samples from the weights before it, however long either takes.
    """

    def __init__(self, cfg: RunConfig, generators, prompt_ids: list[list[int]], seeds: list[int], n: int, step: int | None):
        r = cfg.rollout
        parts = [s for s in chunks(len(prompt_ids), len(generators)) if s.stop > s.start]
        self._args = [(prompt_ids[s], n, r.temperature, r.top_p, r.max_new_tokens, seeds[s]) for s in parts]
        self._refs = generators.submit_each("generate", self._args)
        self._generators, self._step = generators, step
        self._version = generators.policy_version
        self._samples: list[list[dict]] | None = None

    def _stale(self, chunk: list[list[dict]]) -> str | None:
        versions = {s["version"] for group in chunk for s in group}
        if versions != {self._version}:
            return f"it sampled from policy version {sorted(versions)}, not {self._version}: its process was restarted"
        return None

    def samples(self) -> list[list[dict]]:
        """n samples per prompt, waiting for them (with the generators' timeout) the first time.
        A generator that died, or was restarted since this was sent, gets its weights back and
        samples its part again: the same seeds and weights give the same samples."""
        if self._samples is None:
            chunks_ = self._generators.collect(self._refs, "generate", self._args, self._step, stale=self._stale)
            self._samples = [group for chunk in chunks_ for group in chunk]
        return self._samples


def generate(cfg: RunConfig, generators, prompt_ids: list[list[int]], seeds: list[int], n: int, step: int | None) -> list[list[dict]]:
    return Generation(cfg, generators, prompt_ids, seeds, n, step).samples()


def score(cfg: RunConfig, scorers, prompts: list[str], samples: list[list[dict]], n: int, step: int | None) -> np.ndarray:
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    flat_texts = [s["text"] for group in samples for s in group]
    # vLLM says "stop" for EOS or a stop string, "length" when the token cap cut the answer off.
    flat_finished = [s["finish_reason"] == "stop" for group in samples for s in group]
    parts = [s for s in chunks(len(flat_texts), len(scorers)) if s.stop > s.start]
    scores = scorers.call_each("score", [(flat_prompts[s], flat_texts[s], flat_finished[s]) for s in parts], step=step)
    stacked = np.concatenate(scores, axis=0)
    return check_rewards(stacked.reshape(len(prompts), n, -1), len(prompts), n, cfg.objective_names)


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Step metrics from the data-parallel ranks' sums: the loss is sum_i w_i l_i / sum_i w_i over
    all ranks' pairs; per-pair means divide the ranks' sums by the total pair count."""
    pairs = sum(m["pairs"] for m in per_rank)
    per_pair = max(pairs, 1)
    first = per_rank[0]
    return {
        "loss": sum(m["objective"] for m in per_rank),
        "chosen_reward": sum(m["chosen_reward_sum"] for m in per_rank) / per_pair,
        "rejected_reward": sum(m["rejected_reward_sum"] for m in per_rank) / per_pair,
        "margin": sum(m["margin_sum"] for m in per_rank) / per_pair,
        "accuracy": sum(m["accuracy_sum"] for m in per_rank) / per_pair,
        "kl": sum(m["kl_sum"] for m in per_rank) / (2 * per_pair),
        "grad_norm": first["grad_norm"],
        "lr": first["lr"],
        "learner_step": first["step"],
        "time/learner_compute_s": max(m["seconds"] for m in per_rank),
        # The algorithm's own figures (MOPO's multipliers) are the same on every rank.
        **{k: v for k, v in first.items() if k.startswith("mopo/")},
    }


def save_checkpoint(cfg: RunConfig, run_dir: Path, learners, state: Any) -> None:
    """Write and publish step `state.step`'s checkpoint, or raise CheckpointError having removed
    what was written: a full disk or a failed write leaves the previous checkpoint the latest."""
    from actors.ray_actors import ActorFailure

    staging = staging_dir(run_dir, state.step)
    try:
        learners.call("save_checkpoint", str(staging / "learner"), step=state.step)
        final = publish(staging, state.step, state.state_dict(), cfg.checkpoint.keep_last)
    except (OSError, ActorFailure) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, ActorFailure) and exc.actor_lost:
            raise  # the learner is gone: restarting it is the loop's business, not a write failure
        latest = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"the checkpoint of step {state.step} could not be written ({exc}); "
            f"{f'the latest is still {latest}' if latest else 'there is no earlier checkpoint'}, and what was written of this one "
            f"is removed. Free space under {run_dir} (or fix the cause) and run the same command again: it resumes from there"
        ) from exc
    log.info("checkpoint %s", final)


def export_policy(cfg: RunConfig, learners, dest: Path, step: int) -> str:
    from moalign.export_folder import PolicyCard

    card = PolicyCard.from_run(cfg, step).model_dump()
    learners.call("export_policy", str(dest), card, step=step)
    return str(dest)


def progress_bar(cfg: RunConfig, start: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not cfg.logging.progress_bar, file=sys.stderr)
