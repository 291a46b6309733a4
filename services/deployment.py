"""The policy service on Ray Serve: each replica holds one vLLM engine and the HTTP routes.

    make serve MODEL=runs/demo/final [PORT=8000]          (serve.py: `start_serving`, a local Ray, then this)
    serve run deploy/serve.yaml                           (a cluster; import_path services.deployment:app_builder)

Replicas scale with Ray Serve's autoscaling (`min_replicas` < `max_replicas`), and a replica
whose engine loop died fails its health check and is replaced.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ray import serve

from moalign.config import ServeConfig, parse_config

log = logging.getLogger(__name__)


@serve.deployment(name="moalign-policy")
@serve.ingress()
class PolicyDeployment:
    def __init__(self, config: dict[str, Any], api_token: str | None):
        from transformers import AutoTokenizer

        from moalign.export_folder import PolicyCard
        from services.api import build_api
        from services.engine import EngineLoop
        from services.policy import PolicyService

        cfg = ServeConfig.model_validate(config)
        card = PolicyCard.read(cfg.model)
        self.engine = EngineLoop(
            cfg.model,
            dtype=card.dtype if cfg.dtype == "auto" else cfg.dtype,
            max_model_len=cfg.max_model_len,
            seed=cfg.seed,
            cpu_kvcache_gb=cfg.cpu_kvcache_gb,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        service = PolicyService(
            card,
            AutoTokenizer.from_pretrained(cfg.model),
            self.engine,
            served_name(cfg),
            max_tokens_limit=cfg.max_tokens_limit,
            default_max_tokens=cfg.default_max_tokens,
        )
        self._app = build_api(service, api_token=api_token, max_body_bytes=cfg.max_body_bytes, engine_status=self.engine.status)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        if not self.engine.healthy():
            raise RuntimeError("the vLLM engine loop of this replica stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def served_name(cfg: ServeConfig) -> str:
    return cfg.served_model_name or Path(cfg.model).resolve().name


class NotServable(ValueError):
    """A folder `make serve` cannot serve; the message says what it is and what to serve instead."""


_CHECKPOINT = re.compile(r"^step_(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _is_export(folder: Path) -> bool:
    """What the learner's export writes: the card, the model config and the merged weights."""
    return (folder / "moalign.json").is_file() and (folder / "config.json").is_file() and any((folder / w).is_file() for w in _WEIGHTS)


def _export_hint(run_dir: Path, step: int | None = None) -> str:
    """What to serve from a run directory: its exported last policy, or a checkpoint exported first."""
    final = run_dir / "final"
    if step is not None:
        also = f", or serve the run's last policy: make serve MODEL={final}" if _is_export(final) else ""
        return f"export it first, make export RUN={run_dir} STEP={step}, then make serve MODEL={run_dir / 'export' / f'step_{step}'}{also}"
    if _is_export(final):
        return f"serve the policy the run exported: make serve MODEL={final}"
    return f"export a checkpoint of the run first, make export RUN={run_dir}, then serve the folder it names"


def check_servable(folder: str | os.PathLike) -> Path:
    """The folder, resolved, when it is an exported policy (merged weights, config and
    moalign.json, as RUN_DIR/final or `make export` write it); otherwise NotServable in one line
    saying what it is and what to serve instead. Runs before Ray Serve starts: a replica given any
    other folder fails deep inside vLLM, and Ray Serve retries it several times first."""
    path = Path(folder).expanduser().resolve()
    if not path.exists():
        raise NotServable(f"{folder}: no such folder; serve an exported policy (RUN_DIR/final, or a folder `make export` wrote)")
    if not path.is_dir():
        raise NotServable(
            f"{folder} is a file, not a folder; serve the exported policy folder (RUN_DIR/final, or a folder `make export` wrote)"
        )
    names = {child.name for child in path.iterdir()}
    if not names:
        raise NotServable(
            f"{folder} is an empty folder, not an exported policy; serve RUN_DIR/final of a finished run, "
            "or export a checkpoint with make export RUN=<run dir> and serve the folder it names"
        )
    if "adapter_config.json" in names:
        # The export's adapter/ carries moalign.json too, so it passes for a policy; vLLM cannot
        # load LoRA factors without their base model.
        if _is_export(path.parent):
            raise NotServable(
                f"{folder} is the PEFT adapter of an export (LoRA factors without their base model, which vLLM does not load "
                f"alone); serve the merged policy beside it: make serve MODEL={path.parent}"
            )
        raise NotServable(
            f"{folder} is a PEFT adapter (LoRA factors without their base model), not a merged policy; serve the folder "
            "its export wrote beside it (RUN_DIR/final, or a folder `make export` wrote)"
        )
    step = _CHECKPOINT.match(path.name)
    if "state.json" in names and step:
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        raise NotServable(
            f"{folder} is a training checkpoint (the learner's state at step {int(step.group(1))}), not an exported policy; "
            f"{_export_hint(run_dir, int(step.group(1)))}"
        )
    if path.name == "checkpoints" and any(_CHECKPOINT.match(n) for n in names):
        raise NotServable(f"{folder} holds a run's training checkpoints, not an exported policy; {_export_hint(path.parent)}")
    if "config.yaml" in names and ("checkpoints" in names or "final" in names):
        raise NotServable(f"{folder} is a run directory, not an exported policy; {_export_hint(path)}")
    exports = sorted(child for child in path.iterdir() if child.is_dir() and _is_export(child))
    if exports and "moalign.json" not in names:
        raise NotServable(
            f"{folder} holds exported policies but is not one; serve one of them: {', '.join(e.name for e in exports)} "
            f"(e.g. make serve MODEL={exports[-1]})"
        )
    if "moalign.json" not in names:
        what = "has model files but no moalign.json" if "config.json" in names else "has no moalign.json and no model weights"
        raise NotServable(
            f"{folder} {what}: not a policy exported by moalign (moalign.json says how training wrote the objective weights); "
            "serve RUN_DIR/final of a run, or a folder `make export` wrote"
        )
    if not _is_export(path):
        raise NotServable(
            f"{folder} has moalign.json but not the merged model (config.json and {' or '.join(_WEIGHTS)}): an incomplete "
            "export; export the run again (make export RUN=<run dir>) and serve the folder it names"
        )
    return path


def build_app(cfg: ServeConfig):
    """The Ray Serve application for `cfg`; the bearer token is read here, from `cfg.api_token_env`."""
    from moalign.export_folder import PolicyCard

    model = check_servable(cfg.model)
    PolicyCard.read(model)  # an unreadable card fails here too, before any replica starts
    cfg = cfg.model_copy(update={"model": str(model)})
    token = os.environ.get(cfg.api_token_env) or None
    if token is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s without a bearer token: anyone who can reach the port can use the model (set %s)", cfg.host, cfg.api_token_env
        )
    threads = str(cfg.omp_threads or os.cpu_count() or 1)
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": cfg.replica_cpus,
            "num_gpus": cfg.replica_gpus,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}},
        },
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.min_replicas == cfg.max_replicas:
        options["num_replicas"] = cfg.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    return PolicyDeployment.options(**options).bind(cfg.model_dump(), token)


def app_builder(args: dict[str, Any]):
    """Entry for Ray Serve config files: `args` are ServeConfig fields (host and port belong to
    the file's `http_options`)."""
    return build_app(parse_config(dict(args or {}), ServeConfig, "serve config args"))


def start_serving(cfg: ServeConfig, ray_address: str | None = None) -> str:
    """Deploy `cfg` on Ray Serve: on the cluster at `ray_address` or $RAY_ADDRESS, else on a new
    local Ray; returns the base URL once the first replica answers its health check."""
    import ray

    app = build_app(cfg)  # checks the folder before anything starts (check_servable)
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        # Without an address, "local": a bare ray.init() joins whatever /tmp/ray names as the
        # current cluster, and a stale entry (a head gone with a restarted machine) made it wait
        # for that head forever without a word.
        ray.init(address=address or "local", include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name="moalign", route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"
