"""Serving figures for an exported policy, loopback only: the time from starting the service (as
`make serve` does) to its first answer, then requests/s and latency percentiles under
concurrent clients, each request with its own objective weights.

    python benchmarks/serve_load.py --model runs/demo/final [--clients 16] [--requests 64] [--max-tokens 32]

The numbers depend on the machine and on what else runs on it; compare figures from one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from moalign.weight_transport import free_port

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "How do I keep basil alive on a windowsill in winter?",
    "What should I pack for a two-day hike?",
    "Why does bread go stale?",
    "How can I fall asleep faster?",
]
log = logging.getLogger("serve_load")


def chat(url: str, question: str, weights: dict[str, float], max_tokens: int, timeout_s: float) -> tuple[float, int]:
    body = {
        "messages": [{"role": "user", "content": question}],
        "objective_weights": weights,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": 0,
    }
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - started, answer["usage"]["completion_tokens"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported policy folder")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests in total, spread over the clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--startup-timeout-s", type=float, default=900)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    card = json.loads((Path(args.model) / "moalign.json").read_text())
    names = card["objectives"]
    corners = [{n: float(i == k) for i, n in enumerate(names)} for k in range(len(names))]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        str(REPO / "serve.py"),
        "--config",
        str(REPO / "configs/serve/local.yaml"),
        "--model",
        args.model,
        f"port={port}",
    ]
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the service exited with {server.returncode} before answering; run {' '.join(command)} to see why")
            try:
                chat(url, QUESTIONS[0], corners[0], 1, timeout_s=60)
                break
            except (OSError, urllib.error.HTTPError):
                if time.perf_counter() - started > args.startup_timeout_s:
                    raise SystemExit(f"no answer within {args.startup_timeout_s}s") from None
                time.sleep(1)
        first_answer_s = time.perf_counter() - started
        log.info("first answer %.1fs after start", first_answer_s)

        jobs = [(QUESTIONS[i % len(QUESTIONS)], corners[i % len(corners)]) for i in range(args.requests)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(lambda job: chat(url, job[0], job[1], args.max_tokens, timeout_s=600), jobs))
        wall = time.perf_counter() - t0
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    latencies = [r[0] for r in results]
    figures = {
        "model": args.model,
        "model_bytes": sum(f.stat().st_size for f in Path(args.model).rglob("*") if f.is_file()),
        "start_to_first_answer_s": round(first_answer_s, 2),
        "clients": args.clients,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "requests_per_s": round(len(results) / wall, 3),
        "completion_tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(figures, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
