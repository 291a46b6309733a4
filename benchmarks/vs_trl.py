"""This project's MO-ODPO loop beside TRL's online DPO trainer, on the same machine in one invocation.

    make bench                                   # SmolLM2-135M, TRL's shape, 2 rounds x 3 steps each
    python benchmarks/vs_trl.py --rounds 1 --steps 2 --contenders moalign-s0-c2 trl

Same model (SmolLM2-135M-Instruct, fp32), LoRA (r16, alpha 32, the same modules), prompts (the
shipped training prompts, drawn in the same order), prompts per step, completions per prompt (2:
TRL's online DPO samples a pair per prompt), token budget and reward functions (this project's
three built-in objectives, equally weighted for TRL; the MO-ODPO loop weighs them per prompt).
TRL generates with Hugging Face `generate`: its vLLM modes need CUDA. Contenders run in
alternating rounds (each starts afresh, its first step a warm-up left out), so a machine that
slows down mid-run slows every contender alike. Prints the median seconds per step, pairs/s,
generated tokens/s, the ratio to TRL, and this project's split of a step.

TRL is an optional extra (`pip install -e .[bench]`), never a dependency of the service.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench")
OBJECTIVES = "[{name: Relevance, source: relevance}, {name: Conciseness, source: conciseness, target_words: 24}, {name: Positivity, source: positivity}]"
PHASES = ("generate", "score", "learn", "sync")


def shared_overrides(args) -> list[str]:
    return [
        "model.path=builtin:smollm2-135m-instruct",
        "model.dtype=float32",
        f"objectives={OBJECTIVES}",
        f"rollout.prompts_per_step={args.prompts}",
        "rollout.samples_per_prompt=2",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "learner.lora.rank=16",
        "learner.lora.alpha=32",
        f"learner.micro_batch_pairs={args.prompts}",
        "learner.lr=1e-5",
    ]


def layout(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"moalign-s(\d+)(?:-c(\d+))?", name)
    if match is None:
        raise ValueError(f"unknown contender {name!r}: trl or moalign-s<staleness>[-c<cores>]")
    return int(match[1]), int(match[2] or 1)


def run_moalign(args, name: str, workdir: Path) -> list[dict]:
    """Steps of the MO-ODPO loop (`orchestrator.py` in a process of its own: a fresh Ray cluster
    and actors), as per-step figures from its metrics.jsonl. The name gives the layout:
    `moalign-s<max_staleness>[-c<cores for the generator and the learner each>]`."""
    staleness, cores = layout(name)
    from actors.metrics import read_metrics

    run_dir = workdir / f"{name}-{time.monotonic_ns()}"
    overrides = [
        *shared_overrides(args),
        f"run_dir={run_dir}",
        f"steps={args.steps}",
        f"rollout.max_staleness={staleness}",
        f"actors.generator_cpus={cores}",
        f"actors.learner_cpus={cores}",
        "checkpoint.every_steps=1000",
        "eval.at_start_and_end=false",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.ray_metrics=false",
    ]
    # A process of its own, as `make demo` runs it: its log goes to the console and RUN_DIR/orchestrator.log.
    done = subprocess.run([sys.executable, str(REPO / "orchestrator.py"), *overrides], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{name}: orchestrator.py failed (exit {done.returncode}); see {run_dir / 'orchestrator.log'}")
    out = []
    for h in read_metrics(run_dir)[1:]:
        step_s = h["time/step_s"]
        phases = {p: h.get(f"time/{p}_s", 0.0) for p in PHASES}
        out.append(
            {"step_s": step_s, "pairs": h["pairs"], "tokens": h["tokens_generated"], **phases, "idle": step_s - sum(phases.values())}
        )
    return out


def run_trl(args, workdir: Path) -> list[dict]:
    """Steps of TRL's OnlineDPOTrainer on the same model, prompts and rewards."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from actors.reward import RewardScorer
    from moalign.config import load_config
    from moalign.data import load_prompts
    from moalign.models import resolve_model_path

    cfg = load_config(None, shared_overrides(args))
    path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    prompts = [p.prompt for p in load_prompts(REPO / cfg.data.train_path)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    scorer = RewardScorer(cfg.objectives)
    tokens = [0]

    def as_text(x) -> str:
        return x[-1]["content"] if isinstance(x, list) else x

    def reward_of(k: int):
        def reward(prompts, completions, completion_ids, **_) -> list[float]:
            if k == 0:
                tokens[0] += sum(len(ids) for ids in completion_ids)
            finished = [tokenizer.eos_token_id in ids for ids in completion_ids]
            return scorer.score([as_text(p) for p in prompts], [as_text(c) for c in completions], finished)[:, k].tolist()

        reward.__name__ = cfg.objectives[k].name
        return reward

    times: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0, self.tokens0 = time.perf_counter(), tokens[0]

        def on_step_end(self, *a, **kw):
            times.append({"step_s": time.perf_counter() - self.t0, "pairs": args.prompts, "tokens": tokens[0] - self.tokens0})

    trl_args = OnlineDPOConfig(
        output_dir=str(workdir / f"trl-{time.monotonic_ns()}"),
        per_device_train_batch_size=args.prompts,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        learning_rate=1e-5,
        beta=[0.1],
        use_cpu=True,
        bf16=False,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(cfg.learner.lora.target_modules), task_type="CAUSAL_LM")
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=[reward_of(k) for k in range(len(cfg.objectives))],
        args=trl_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[StepTimer()],
    )
    trainer.train()
    return times[1:]


def summarize(name: str, steps: list[dict]) -> dict:
    median = statistics.median(s["step_s"] for s in steps)
    pairs = sum(s["pairs"] for s in steps) / sum(s["step_s"] for s in steps)
    tokens = sum(s["tokens"] for s in steps) / sum(s["step_s"] for s in steps)
    split = {p: statistics.median(s[p] for s in steps) for p in (*PHASES, "idle") if p in steps[0]}
    return {"name": name, "steps": len(steps), "step_s": median, "pairs_per_s": pairs, "tokens_per_s": tokens, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=["trl", "moalign-s0-c2", "moalign-s1", "moalign-s1-c2"],
        help="trl, moalign-s<max_staleness>[-c<cores each for generator and learner; default 1>]",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per round; the first is a warm-up, left out")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of each round is a warm-up)")

    for name in args.contenders:
        if name != "trl":
            try:
                layout(name)
            except ValueError as exc:
                parser.error(str(exc))
    workdir = Path(tempfile.mkdtemp(prefix="moalign-bench-"))
    steps: dict[str, list[dict]] = {c: [] for c in args.contenders}
    for r in range(args.rounds):
        for name in args.contenders:
            log.info("round %d/%d: %s", r + 1, args.rounds, name)
            steps[name] += run_trl(args, workdir) if name == "trl" else run_moalign(args, name, workdir)

    rows = [summarize(name, s) for name, s in steps.items()]
    trl = next((row for row in rows if row["name"] == "trl"), None)
    print(
        f"\n{args.prompts} prompts x 2 completions x {args.max_new_tokens} tokens a step; {args.rounds} rounds of {args.steps - 1} timed steps each"
    )
    print(f"{'':12} {'s/step':>7} {'pairs/s':>8} {'tokens/s':>9} {'vs TRL':>7}   split of a step (medians, s)")
    for row in rows:
        ratio = f"{row['pairs_per_s'] / trl['pairs_per_s']:6.1f}x" if trl and row is not trl else ""
        split = "  ".join(f"{k} {v:.2f}" for k, v in row["split"].items())
        print(f"{row['name']:12} {row['step_s']:7.2f} {row['pairs_per_s']:8.3f} {row['tokens_per_s']:9.1f} {ratio:>7}   {split}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
