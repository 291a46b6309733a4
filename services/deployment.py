"""The policy service on Ray Serve: each replica holds one vLLM engine and the HTTP routes.

    make serve MODEL=runs/demo/final [PORT=8000]          (serve.py: a local Ray, then this)
    serve run deploy/serve.yaml                           (a cluster; import_path services.deployment:app_builder)

Replicas scale with Ray Serve's autoscaling (`min_replicas` < `max_replicas`), and a replica
whose engine loop died fails its health check and is replaced.
"""

from __future__ import annotations

import logging
import os
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

        from moalign.export import PolicyCard
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


def build_app(cfg: ServeConfig):
    """The Ray Serve application for `cfg`; the bearer token is read here, from `cfg.api_token_env`."""
    from moalign.export import PolicyCard

    model = Path(cfg.model).expanduser().resolve()
    PolicyCard.read(model)  # a folder without a card fails here, before any replica starts
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
