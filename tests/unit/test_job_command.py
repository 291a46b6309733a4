"""deploy/moalign-job without a cluster: what it refuses before anything is sent, and how it
finds a token cluster's credentials."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("moalign_job", REPO / "deploy" / "moalign_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_relative_run_dir_is_refused_with_what_to_give_instead(job, tmp_path):
    with pytest.raises(job.JobError, match=r"run_dir=runs/demo is relative.*e\.g\. run_dir=/shared/runs/demo"):
        job.checked_config(str(REPO / "configs/default.yaml"), [])
    assert str(job.checked_config(str(REPO / "configs/default.yaml"), [f"run_dir={tmp_path}"]).run_dir) == str(tmp_path)
    with pytest.raises(job.JobError, match="absolute path"):
        job.resume(None, "runs/demo", [], wait=False)


def test_the_client_uses_the_token_ray_keeps_for_this_user(job, tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not job.token_available()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")
    assert job.token_available()
    # Nothing listens on this port: the error says what to check, after token mode was switched on.
    with pytest.raises(job.JobError, match=r"cannot reach the Ray Jobs API at http://127\.0\.0\.1:9"):
        job.client("http://127.0.0.1:9")
    import os

    assert os.environ["RAY_AUTH_MODE"] == "token"
