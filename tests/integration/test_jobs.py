"""A training run as a Ray job, as a user runs one: a head node started on loopback with `ray
start --head` (token authentication on, as Ray sets up new clusters), a 2-step run submitted and
followed to SUCCEEDED with `deploy/moalign-job`, the loop's metrics read from the head's
Prometheus endpoint while it runs, and the head stopped."""

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

from moalign.weight_sync import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
JOB = [str(REPO / "deploy" / "moalign-job")]


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


def test_a_run_submitted_as_a_job_succeeds_and_exports_its_metrics(head_node, tiny_model, tmp_path):
    env, address = head_node["env"], head_node["address"]
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "steps=2",
        f"model.path={tiny_model}",
        "model.max_prompt_tokens=160",
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=8",
        "learner.micro_batch_pairs=2",
        "learner.lora.rank=4",
        "actors.cpu_kvcache_gb=0.25",
        "logging.progress_bar=false",
        "eval.at_start_and_end=false",
        "objectives=[{name: Conciseness, source: conciseness}, {name: Positivity, source: positivity}]",
    ]
    # A relative run directory would vanish with the job's working directory: refused up front.
    refused = subprocess.run([*JOB, "--address", address, "submit", "configs/default.yaml", "run_dir=runs/x"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "run_dir=runs/x is relative" in refused.stderr

    # Submitted and followed to its end by one command, while its gauges are read: they are
    # exported while the job's driver lives.
    wanted = ["ray_moalign_loss{", 'objective="Conciseness"', 'objective="Positivity"']
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
    assert len([line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]) == 2
    assert (run_dir / "final" / "model.safetensors").is_file()
    listed = subprocess.run([*JOB, "--address", address, "list"], env=env, capture_output=True, text=True, timeout=60).stdout
    assert f"{job_id} SUCCEEDED run_dir={run_dir}" in listed
