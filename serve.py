"""Serve an exported policy with objective weights per request (Ray Serve + vLLM).

    python serve.py --model runs/demo/final [--config configs/serve/local.yaml] [key=value ...]
    make serve MODEL=runs/demo/final [PORT=8000]

Starts (or joins, with RAY_ADDRESS) a Ray cluster, deploys the policy and blocks until Ctrl-C.
Binds to 127.0.0.1 unless `host=` says otherwise; set MOALIGN_API_TOKEN to require a bearer token.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from moalign.config import ConfigError, ServeConfig, load_config
from services.deployment import start_serving

log = logging.getLogger("moalign.serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="exported policy folder: RUN_DIR/final or a `make export` folder, not its adapter/ (sets `model`)")
    parser.add_argument("--config", help="YAML preset of ServeConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. port=8001 max_replicas=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    try:
        cfg = load_config(args.config, overrides, ServeConfig)
        started = time.perf_counter()
        url = start_serving(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("serving %s at %s/v1 (ready in %.1fs); Ctrl-C stops it", cfg.model, url, time.perf_counter() - started)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
