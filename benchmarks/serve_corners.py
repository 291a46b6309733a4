"""What a user of the served policy gets at each corner of the weights: held-out prompts sent
through `make serve` (started here as a subprocess, loopback only) once per corner, with the same
seed per prompt at every corner, and each answer scored on the run's own objectives.

    python -m benchmarks.serve_corners --run runs/steer_length [--model DIR] [--prompts 20]
        [--samples 1] [--temperature T] [--out FILE]

Prints, per corner, the mean answer length in words (with its standard error over the prompts) and tokens, the
share of answers that ended by themselves, and the mean reward of every objective; the answers and figures go to
RUN/eval/serve_corners.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from actors.reward import RewardScorer
from moalign.config import load_config
from moalign.data import load_prompts
from moalign.pareto_report import standard_error
from moalign.weight_transport import free_port

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("serve_corners")


def chat(url: str, prompt: str, weights: dict[str, float], max_tokens: int, temperature: float, seed: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "objective_weights": weights,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def mean_and_prompt_se(values: list[float], n_prompts: int) -> tuple[float, float]:
    """The mean of per-answer `values`, answer j to prompt j mod `n_prompts`, and its standard
    error with each prompt as one unit: the mean of its answers. Answers to one prompt are alike,
    so the spread of all answers as if independent understates the error (20 prompts x 3
    answers: 2.0 words where the prompts' own spread gives 2.7)."""
    if not values or len(values) % n_prompts:
        raise ValueError(f"{len(values)} answers are not a whole number of rounds over {n_prompts} prompts")
    per_prompt = np.asarray(values, dtype=float).reshape(-1, n_prompts).mean(axis=0)
    se = standard_error(per_prompt, axis=0)
    return float(np.mean(values)), float("nan") if se is None else float(se)


def length_figures(texts: list[str], n_prompts: int) -> dict[str, float]:
    """Answer length in words: the mean and its standard error over the prompts
    (`mean_and_prompt_se`), the median, and the share under 8 words. A mean can be pulled short
    by answers that say nothing: a 135M model at the Conciseness corner writes some fragments
    ("Which.") that count as short answers, and the median and that share show them."""
    counts = [len(t.split()) for t in texts]
    words, words_se = mean_and_prompt_se(counts, n_prompts)
    return {
        "words": words,
        "words_se": words_se,
        "median_words": float(np.median(counts)),
        "under_8_words": float(np.mean([n < 8 for n in counts])),
    }


def start_service(model: str, port: int, timeout_s: float, log_path: Path) -> subprocess.Popen:
    """`serve.py` as `make serve` runs it, its output in `log_path`; returns once it answers."""
    command = [sys.executable, str(REPO / "serve.py"), "--config", str(REPO / "configs/serve/local.yaml"), "--model", model, f"port={port}"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        server = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    log.info("starting the service (its log: %s)", log_path)
    started = time.perf_counter()
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the service exited with {server.returncode} before answering; its log: {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                if r.status == 200:
                    return server
        except (OSError, urllib.error.HTTPError):
            pass
        if time.perf_counter() - started > timeout_s:
            stop_service(server)
            raise SystemExit(f"the service did not answer within {timeout_s:.0f}s; its log: {log_path}")
        time.sleep(2)


def stop_service(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory: its config.yaml names the objectives and held-out prompts")
    parser.add_argument("--model", help="exported policy folder (default: RUN/final)")
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts per corner")
    parser.add_argument("--samples", type=int, default=1, help="answers per prompt and corner, each with its own seed")
    parser.add_argument(
        "--temperature", type=float, help="sampling temperature (default: the run's rollout.temperature, what it trained at)"
    )
    parser.add_argument("--startup-timeout-s", type=float, default=900)
    parser.add_argument("--out", help="JSON file for the answers and figures (default: RUN/eval/serve_corners.json)")
    args = parser.parse_args()
    if args.prompts < 1 or args.samples < 1:
        parser.error(f"--prompts {args.prompts} --samples {args.samples}: each must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_dir = Path(args.run)
    cfg = load_config(run_dir / "config.yaml")
    model = args.model or str(run_dir / "final")
    names = cfg.objective_names
    heldout = [r.prompt for r in load_prompts(cfg.data.heldout_path)[: args.prompts]]
    # Request j asks prompt j mod n with seed eval.seed + j: every corner gets the same seeds.
    prompts = [heldout[j % len(heldout)] for j in range(len(heldout) * args.samples)]
    temperature = cfg.rollout.temperature if args.temperature is None else args.temperature
    corners = [{n: float(i == k) for i, n in enumerate(names)} for k in range(len(names))]

    port = free_port()
    out_path = Path(args.out) if args.out else run_dir / "eval" / "serve_corners.json"
    server = start_service(model, port, args.startup_timeout_s, out_path.with_suffix(".service.log"))
    url = f"http://127.0.0.1:{port}"
    answers: dict[str, list[dict]] = {}
    try:
        for corner, weights in zip(names, corners):
            log.info("corner %s: %d prompts x %d answers", corner, len(heldout), args.samples)
            answers[corner] = [
                chat(url, p, weights, cfg.rollout.max_new_tokens, temperature, seed=cfg.eval.seed + i) for i, p in enumerate(prompts)
            ]
    finally:
        stop_service(server)

    scorer = RewardScorer(cfg.objectives)
    figures: dict[str, dict] = {}
    rows = []
    for corner in names:
        texts = [a["choices"][0]["message"]["content"] for a in answers[corner]]
        finished = [a["choices"][0]["finish_reason"] == "stop" for a in answers[corner]]
        rewards = scorer.score(prompts, texts, finished)
        figures[corner] = {
            **length_figures(texts, len(heldout)),
            "tokens": float(np.mean([a["usage"]["completion_tokens"] for a in answers[corner]])),
            "ended": float(np.mean(finished)),
            "rewards": dict(zip(names, map(float, rewards.mean(axis=0)))),
        }
        rows += [{"corner": corner, "prompt": p, "text": t, "ended": f} for p, t, f in zip(prompts, texts, finished)]
    header = "| corner | words | median words | under 8 words | tokens | ended | " + " | ".join(names) + " |"
    lines = [header, "|---" * (6 + len(names)) + "|"]
    for corner, f in figures.items():
        cells = [corner, f"{f['words']:.1f} ± {f['words_se']:.1f}", f"{f['median_words']:.1f}", f"{f['under_8_words']:.0%}"]
        cells += [f"{f['tokens']:.1f}", f"{f['ended']:.0%}"] + [f"{f['rewards'][n]:.3f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    words = [f["words"] for f in figures.values()]
    log.info(
        "%s through make serve, %d held-out prompts x %d answers per corner at temperature %g:\n%s\nlongest / shortest mean answer: %.2fx",
        model,
        len(heldout),
        args.samples,
        temperature,
        "\n".join(lines),
        max(words) / max(min(words), 1e-9),
    )
    out_path.write_text(json.dumps({"model": model, "temperature": temperature, "figures": figures, "answers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
