"""A training run as a Ray job, as a user runs one: a head node started on loopback with `ray
start --head` (token authentication on, as Ray sets up new clusters), a 2-step run with its
held-out evaluation (base before step 1, policy after the last) submitted and followed to
SUCCEEDED with `deploy/moalign-job`, the loop's metrics read from the head's Prometheus endpoint
while it runs, and the head stopped; then `evaluate.py` on the run directory. Real vLLM, reward
and learner actors around a tiny model: one run serves both, each run's actors being the
largest cost here."""

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from actors.metrics import metric_spec, read_metrics
from evaluate import main as evaluate_main
from moalign.checkpoint import list_checkpoints, read_state
from moalign.ledger import audit
from moalign.weight_transport import free_port
from tests.unit.test_grafana import dashboard_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
JOB = [str(REPO / "deploy" / "moalign-job")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OBJECTIVES = (
    "objectives=[{name: Length, source: callable, path: 'tests.helpers.reward_fns:length_reward'}, "
    "{name: Conciseness, source: conciseness}, {name: Positivity, source: positivity}]"
)
NAMES = ["Length", "Conciseness", "Positivity"]
WEIGHTS = 4  # K = 3, divisions 1: three corners plus the centre


@pytest.fixture
def head_node(tmp_path):
    """A Ray head on 127.0.0.1 with its own ports, temp dir and authentication token."""
    gcs, dashboard, metrics, agent = free_port(), free_port(), free_port(), free_port()
    # Short: Ray's socket paths live under it and Unix socket paths are capped near 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", RAY_AUTH_TOKEN_PATH=str(token))
    # The head runs with token authentication, as Ray starts clusters where a token exists; the
    # clients below get the token's path but not the mode: a plain Jobs API client is refused.
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}", "--num-cpus=6",
         f"--temp-dir={temp_dir}", "--include-dashboard=true",
         # Not the default 52365: the session's own cluster's agent already listens there.
         f"--dashboard-agent-listen-port={agent}"],
        env={**env, "RAY_AUTH_MODE": "token"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:
                break  # it answers (refusing a request without the token): up
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the head did not come up: {(tmp_path / 'head.log').read_text()[-3000:]}") from None
                time.sleep(1)
        yield {"address": address, "metrics_port": metrics, "env": env}
    finally:
        # `ray start --block` stops what it started when told to; past a few seconds, its group goes at once.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()


def scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def samples_by_key(path: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, {(tuple(r["weights"]), r["prompt_id"], r["sample"]): r["text"] for r in rows}


def test_a_job_trains_evaluates_and_exports_its_metrics_and_the_command_evaluates_its_run(head_node, tiny_model, ray_cluster, tmp_path):
    env, address = head_node["env"], head_node["address"]
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "steps=2",
        "checkpoint.every_steps=2",
        f"model.path={tiny_model}",
        "model.max_prompt_tokens=160",
        f"data.train_path={REPO / 'data/prompts/train.jsonl'}",
        f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}",
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=8",
        "learner.micro_batch_pairs=2",
        "learner.lora.rank=4",
        "actors.cpu_kvcache_gb=0.25",
        "logging.progress_bar=false",
        OBJECTIVES,
        # Small lattices (divisions 1: the 3 corners and the centre) keep the evaluations cheap.
        "eval.at_start_and_end=true",
        "eval.during_training_divisions=1",
        "eval.during_training_prompts=2",
        "eval.samples_per_weight=2",
        "eval.lattice_divisions=1",
        "eval.heldout_prompts=3",
    ]
    # A relative run directory would vanish with the job's working directory: refused up front.
    refused = subprocess.run([*JOB, "--address", address, "submit", "configs/default.yaml", "run_dir=runs/x"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "run_dir=runs/x is relative" in refused.stderr

    # Submitted and followed to its end by one command, while its gauges are read: they are
    # exported while the job's driver lives.
    # Each actor's own gauge too (exported from its process while it lives), tagged with its role and index.
    calls = (("generator", "generate"), ("reward", "score"), ("learner", "train_step"))
    wanted = ["ray_moalign_loss{", 'objective="Length"', 'objective="Positivity"', *(f'call="{call}"' for _, call in calls)]
    started = time.monotonic()
    follow = subprocess.Popen([*JOB, "--address", address, "submit", "configs/default.yaml", *overrides], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    body = ""
    while follow.poll() is None and time.monotonic() - started < 600:
        body = scrape(head_node["metrics_port"]) if not all(w in body for w in wanted) else body
        time.sleep(1)
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0, f"{err[-3000:]}\n{out[-3000:]}"
    job_id = next(line.split()[1].rstrip(":") for line in err.splitlines() if line.startswith("submitted "))
    assert f"run directory (on the cluster): {run_dir}" in err and f"{address}/#/jobs/{job_id}" in err
    assert f"job {job_id} SUCCEEDED" in err and "mean reward per objective" in out
    missing = [w for w in wanted if w not in body]
    assert not missing, f"not on the Prometheus endpoint: {missing}"
    per_actor = [line for line in body.splitlines() if line.startswith("ray_moalign_actor_call_seconds{")]
    for role, call in calls:
        tags = (f'role="{role}"', 'actor="0"', f'call="{call}"', 'run="run"')
        assert any(all(t in line for t in tags) for line in per_actor), (tags, per_actor)
    assert (run_dir / "final" / "model.safetensors").is_file()
    listed = subprocess.run([*JOB, "--address", address, "list"], env=env, capture_output=True, text=True, timeout=60).stdout
    assert f"{job_id} SUCCEEDED run_dir={run_dir}" in listed

    # Evaluation during training: the base before step 1, the policy after step 2, metrics on
    # step 2's record only.
    history = read_metrics(run_dir)
    assert [h["step"] for h in history] == [1, 2]
    assert not any(k.startswith("eval/") for k in history[0])
    assert math.isfinite(history[1]["eval/hypervolume"]) and history[1]["time/eval_s"] > 0
    # The learners measured the KL at each weight vector of the evaluation during training too.
    assert math.isfinite(history[1]["eval/kl_max"]) and "kl" in json.loads((run_dir / "eval" / "step_2" / "front.json").read_text())
    for name in NAMES:
        assert -1 <= history[1][f"eval/steerability/{name}"] <= 1
    assert "| objective | base Spearman |" in out and "step 2 Spearman" in out
    assert {m for m in dashboard_metrics() if m.startswith("moalign_eval_")} <= {metric_spec(k)[0] for k in history[1]}
    training_base = json.loads((run_dir / "eval" / "base" / "front.json").read_text())
    assert (training_base["n_weights"], training_base["n_prompts"], training_base["samples_per_prompt"]) == (WEIGHTS, 2, 2)
    _, training_base_texts = samples_by_key(run_dir / "eval" / "base" / "samples.jsonl")
    assert (run_dir / "eval" / "step_2" / "front.png").read_bytes()[:8] == PNG_MAGIC

    # The command, on this machine's cluster, with its own (larger) settings: the base is
    # evaluated again, then step 2's checkpoint.
    assert evaluate_main(["--run", str(run_dir)]) == 0
    for folder, label in (("base", "base"), ("step_2", "step 2")):
        front_dir = run_dir / "eval" / folder
        front = json.loads((front_dir / "front.json").read_text())
        assert front["label"] == label and front["objectives"] == NAMES
        assert (front["n_weights"], front["n_prompts"], front["samples_per_prompt"]) == (WEIGHTS, 3, 2)
        assert front["meta"]["prompts"]["count"] == 3 and front["meta"]["lattice"]["divisions"] == 1
        assert (front_dir / "front.md").read_text().startswith(f"# Pareto front: {label}")
        rows, _ = samples_by_key(front_dir / "samples.jsonl")
        assert len(rows) == WEIGHTS * 3 * 2
        assert all(set(r["rewards"]) == set(NAMES) and r["finish_reason"] in ("stop", "length") for r in rows)
    step_front = json.loads((run_dir / "eval" / "step_2" / "front.json").read_text())
    assert step_front["meta"]["step"] == 2
    # The checkpoint's answers are scored by the learner too: KL to the reference per weight
    # vector, one log-ratio per answer in samples.jsonl. The base model has none to measure.
    kl = step_front["kl"]
    assert len(kl["mean"]) == WEIGHTS and all(math.isfinite(m) for m in kl["mean"]) and kl["bound"] > 0
    step_rows, _ = samples_by_key(run_dir / "eval" / "step_2" / "samples.jsonl")
    assert all(math.isfinite(r["kl"]) for r in step_rows)
    assert "kl" not in json.loads((run_dir / "eval" / "base" / "front.json").read_text())
    assert "KL to the reference" in (run_dir / "eval" / "step_2" / "front.md").read_text()
    assert (run_dir / "eval" / "step_2" / "front.png").read_bytes()[:8] == PNG_MAGIC

    # Seeds depend on (eval seed, prompt, sample) only: the base model gives the same completions
    # to the prompts both evaluations share, whatever else was in the calls (and on whichever cluster).
    _, command_base_texts = samples_by_key(run_dir / "eval" / "base" / "samples.jsonl")
    shared = training_base_texts.keys() & command_base_texts.keys()
    assert len(shared) == WEIGHTS * 2 * 2
    assert all(training_base_texts[k] == command_base_texts[k] for k in shared)

    # A second invocation reuses the base front (same settings) and starts no actors for it.
    base_front = run_dir / "eval" / "base" / "front.json"
    before = base_front.stat().st_mtime_ns
    assert evaluate_main(["--run", str(run_dir), "--base"]) == 0
    assert base_front.stat().st_mtime_ns == before
    assert "base front: reusing" in (run_dir / "eval" / "evaluate.log").read_text()

    # The orchestrator dies mid-run (its job is stopped), and the run is submitted again on its
    # run directory: it resumes from its last checkpoint by itself, the steps after it are trained
    # again, and the ledger finds every prompt trained once.
    def job(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*JOB, "--address", address, *args], env=env, capture_output=True, text=True, timeout=timeout)

    # More steps than the stop can take to land (on a fast machine steps come quicker than the
    # stop's round trip); the second resume then asks for two steps past where it stopped.
    resumed = job("resume", str(run_dir), "steps=60", "eval.at_start_and_end=false", "--no-wait")
    assert resumed.returncode == 0, resumed.stderr
    stopped_id = next(line.split()[1].rstrip(":") for line in resumed.stderr.splitlines() if line.startswith("submitted "))
    deadline = time.monotonic() + 300
    while max((h["step"] for h in read_metrics(run_dir)), default=0) < 3:
        assert time.monotonic() < deadline, job("logs", stopped_id).stdout[-3000:]
        time.sleep(0.5)
    assert "stop requested" in job("stop", stopped_id).stdout
    while f"{stopped_id} STOPPED" not in job("status", stopped_id).stdout:
        assert time.monotonic() < deadline, job("status", stopped_id).stdout
        time.sleep(1)
    stopped_at = max(h["step"] for h in read_metrics(run_dir))
    assert stopped_at < 60, "the job must be stopped before it ends"
    end = stopped_at + 2
    again = job("resume", str(run_dir), f"steps={end}", timeout=600)
    assert again.returncode == 0 and "SUCCEEDED" in again.stderr, again.stderr[-3000:]
    assert [h["step"] for h in read_metrics(run_dir)] == list(range(1, end + 1))
    ledger = audit(run_dir, read_state(list_checkpoints(run_dir)[-1][1])["cursor"])
    assert ledger["problems"] == [] and ledger["steps"] == end and ledger["prompts_trained"] == end * 4
    assert ledger["resumes"] == 2 and set(ledger["redone_steps"]) <= set(range(3, stopped_at + 1))
