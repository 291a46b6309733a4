"""Build the offline multi-objective preference pairs that MODPO and MOPO train on out of the box.

For every training prompt: two completions from the base policy (unconditioned chat prompt,
sampled with per-prompt seeds, so the build is reproducible), scored on the configured
objectives the way the MO-ODPO loop scores them, and one label per objective.

    python data/preferences/build.py --out data/preferences/selfpairs.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIE_TOL = 1e-6
MAX_RESAMPLES = 8

log = logging.getLogger("build_preferences")


def prompt_seed(seed: int, prompt_id: str) -> int:
    """Keyed by the prompt's id, not its line: editing the prompt file leaves other rows unchanged.
    32 bits, so `seed + attempt` for a resample stays a valid engine seed."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{prompt_id}".encode(), digest_size=4).digest(), "little")


def label(r0: float, r1: float) -> float | int:
    """Index of the preferred response; 0.5 for a tie."""
    return 0.5 if abs(r0 - r1) <= TIE_TOL else int(r1 > r0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output JSON Lines file")
    p.add_argument("--prompts", type=Path, default=ROOT / "data/prompts/train.jsonl")
    p.add_argument("--config", type=Path, default=ROOT / "configs/modpo_cpu.yaml", help="model, objectives and top_p come from here")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-prompts", type=int, default=32, help="prompts per generate call")
    return p.parse_args(argv)


def sample_pairs(generator, ids: list[list[int]], seeds: list[int], top_p: float, max_new_tokens: int, counts: Counter) -> list[list[dict]]:
    samples = generator.generate(ids, n=2, temperature=1.0, top_p=top_p, max_new_tokens=max_new_tokens, seeds=seeds)
    for i, pair in enumerate(samples):
        for j in range(2):
            attempt = 0
            while not pair[j]["text"].strip():
                attempt += 1
                if attempt > MAX_RESAMPLES:
                    raise RuntimeError(f"sample {j} of prompt seed {seeds[i]} is still empty after {MAX_RESAMPLES} resamples")
                counts["resampled"] += 1
                # Same sample slot j under the next prompt seed: a new stream, still reproducible.
                pair[j] = generator.generate(
                    [ids[i]], n=2, temperature=1.0, top_p=top_p, max_new_tokens=max_new_tokens, seeds=[seeds[i] + attempt]
                )[0][j]
    return samples


def summarize(rows: list[dict], names: list[str]) -> None:
    log.info("rows: %d", len(rows))
    for name in names:
        labels = Counter(str(r["labels"][name]) for r in rows)
        mean = [sum(r["rewards"][name][j] for r in rows) / len(rows) for j in range(2)]
        log.info("%s: labels 0=%d 1=%d tie=%d; mean reward %.4f / %.4f", name, labels["0"], labels["1"], labels["0.5"], *mean)
    for a, b in combinations(names, 2):
        same = sum(r["labels"][a] == r["labels"][b] for r in rows)
        decided = [r for r in rows if r["labels"][a] != 0.5 and r["labels"][b] != 0.5]
        same_decided = sum(r["labels"][a] == r["labels"][b] for r in decided)
        log.info(
            "agreement %s/%s: %d/%d rows (%.3f); on %d rows without a tie: %.3f",
            a,
            b,
            same,
            len(rows),
            same / len(rows),
            len(decided),
            same_decided / len(decided) if decided else float("nan"),
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # vLLM reads these at import; an in-process engine keeps its log quiet and its threads ours.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from actors.generator import Generator
    from actors.reward import RewardScorer
    from moalign.conditioning import render_prompt_ids
    from moalign.config import load_config
    from moalign.data import load_prompts
    from moalign.models import resolve_model_path

    if args.max_new_tokens < 1 or args.batch_prompts < 1:
        raise SystemExit("--max-new-tokens and --batch-prompts must be >= 1")
    cfg = load_config(args.config)
    names = cfg.objective_names
    records = load_prompts(args.prompts)
    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Unconditioned: the plain user turn, as the reward models and the base policy see it.
    prompt_ids = [render_prompt_ids(tokenizer, [{"role": "user", "content": r.prompt}]) for r in records]
    too_long = [r.id for r, ids in zip(records, prompt_ids) if len(ids) > cfg.model.max_prompt_tokens]
    if too_long:
        raise SystemExit(f"{len(too_long)} prompts exceed model.max_prompt_tokens={cfg.model.max_prompt_tokens}: {too_long[:5]}")
    seeds = [prompt_seed(args.seed, r.id) for r in records]
    log.info("%d prompts from %s; model %s; objectives %s; top_p %s", len(records), args.prompts, model_path, names, cfg.rollout.top_p)

    scorer = RewardScorer(cfg.objectives)
    generator = Generator(
        str(model_path),
        seed=args.seed,
        dtype=cfg.model.dtype,
        max_model_len=cfg.model.max_prompt_tokens + args.max_new_tokens,
        cpu_kvcache_gb=cfg.actors.cpu_kvcache_gb,
    )

    counts: Counter = Counter()
    rows: list[dict] = []
    started = time.perf_counter()
    for start in tqdm(range(0, len(records), args.batch_prompts), desc="prompts", unit="batch", file=sys.stderr):
        batch = slice(start, start + args.batch_prompts)
        samples = sample_pairs(generator, prompt_ids[batch], seeds[batch], cfg.rollout.top_p, args.max_new_tokens, counts)
        flat = [s for pair in samples for s in pair]
        counts.update(s["finish_reason"] for s in flat)
        prompts = [r.prompt for r in records[batch] for _ in range(2)]
        rewards = scorer.score(prompts, [s["text"] for s in flat], [s["finish_reason"] == "stop" for s in flat]).reshape(-1, 2, len(names))
        for record, pair, r in zip(records[batch], samples, rewards):
            rows.append(
                {
                    "id": record.id,
                    "prompt": record.prompt,
                    "responses": [s["text"] for s in pair],
                    "finished": [s["finish_reason"] == "stop" for s in pair],
                    "labels": {name: label(r[0, k], r[1, k]) for k, name in enumerate(names)},
                    "rewards": {name: [round(float(r[j, k]), 6) for j in range(2)] for k, name in enumerate(names)},
                }
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)  # a crash never leaves a half-written dataset behind
    log.info("wrote %s in %.0fs", args.out, time.perf_counter() - started)
    log.info(
        "completions: %d; finished %d, cut at %d tokens %d; empty ones resampled %d",
        2 * len(rows),
        counts["stop"],
        args.max_new_tokens,
        counts["length"],
        counts["resampled"],
    )
    summarize(rows, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
