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
        # Set first so that teardown removes what client() sets: a token mode left in this
        # process would lock the next test's local Ray cluster out.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
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


class FakeJobs:
    """The Jobs API calls `scale` makes, answered from memory."""

    def __init__(self, status: str, metadata: dict):
        from types import SimpleNamespace

        self.info = SimpleNamespace(status=SimpleNamespace(value=status), metadata=metadata, message="")
        self.submitted: list[dict] = []

    def get_job_info(self, job_id):
        return self.info

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        self.info.status.value = "SUCCEEDED"
        return kwargs["submission_id"]

    def get_job_status(self, job_id):
        return self.info.status

    def get_job_logs(self, job_id):
        return "queued\n"

    def get_address(self):
        return "http://127.0.0.1:8265"


def test_scale_sends_a_one_line_job_that_queues_the_request_in_the_run_directory(job):
    running = FakeJobs("RUNNING", {"run_dir": "/shared/runs/demo"})
    assert job.scale(running, "moalign-demo-1", ["generators=2", "from_step=5"]) == 0
    (sent,) = running.submitted
    assert sent["entrypoint"] == "python -m moalign.scaling --wait-for-run-s 600 /shared/runs/demo generators=2 from_step=5"
    assert sent["metadata"] == {"run_dir": "/shared/runs/demo", "scales": "moalign-demo-1"}
    assert sent["submission_id"].startswith("moalign-scale-demo-")


def test_scale_refuses_bad_counts_and_finished_or_foreign_jobs_before_sending_anything(job):
    from moalign.scaling import ScaleRequestError

    running = FakeJobs("RUNNING", {"run_dir": "/shared/runs/demo"})
    with pytest.raises(ScaleRequestError, match="learners"):
        job.scale(running, "j", ["learners=2"])
    with pytest.raises(ScaleRequestError, match="expected key=integer"):
        job.scale(running, "j", ["generators"])
    with pytest.raises(job.JobError, match="is SUCCEEDED: there is no run to scale"):
        job.scale(FakeJobs("SUCCEEDED", {"run_dir": "/r"}), "j", ["generators=2"])
    with pytest.raises(job.JobError, match="no run_dir in its metadata"):
        job.scale(FakeJobs("RUNNING", {}), "j", ["generators=2"])
    assert running.submitted == []
