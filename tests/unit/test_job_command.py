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


def node(cpus: float, gpus: float = 0.0, **labels: str) -> dict:
    """A node as `cluster_nodes` gives it (the state API's resources_total and labels)."""
    return {"resources_total": {"CPU": cpus, "GPU": gpus, "memory": 8e9}, "labels": labels}


def test_the_resource_check_gives_the_arithmetic_and_the_flag_that_makes_the_default_fit(job, tmp_path):
    cfg = job.checked_config(str(REPO / "configs/default.yaml"), [f"run_dir={tmp_path}"])
    # A fresh `ray start --head` on the 2-core machine, and one with the README's flag.
    problem = job.room_problem(cfg, [node(2)], "configs/default.yaml")
    assert problem.startswith("configs/default.yaml does not fit the cluster: its actors ask 4.5 CPU ")
    assert "(generator 1 x 2 + reward 1 x 0.5 + learner 1 x 2) and 0 GPU in all, and the cluster has 2 CPU, 0 GPU on 1 node(s)" in problem
    assert "`ray start --head --num-cpus=5`" in problem and problem.endswith("Nothing was submitted (--no-resource-check submits anyway)")
    assert job.room_problem(cfg, [node(4)]) is not None
    assert job.room_problem(cfg, [node(5)]) is None
    assert job.room_problem(cfg, [node(2), node(3)]) is None  # PACK may spread a role over nodes


def test_the_resource_check_looks_at_gpus_labels_and_strict_placement(job, tmp_path):
    def cfg(*overrides):
        return job.checked_config(str(REPO / "configs/default.yaml"), [f"run_dir={tmp_path}", *overrides])

    gpu = job.room_problem(cfg("actors.learner_gpus=1"), [node(8)])
    assert "and 1 GPU in all, and the cluster has 8 CPU, 0 GPU" in gpu and "--num-cpus" not in gpu
    assert "no node can hold one of 1 learner actor of 2 CPU, 1 GPU" in gpu
    labelled = cfg("actors.learner_node_labels={moalign-role: learner}")
    assert "no node can hold one of 1 learner actor of 2 CPU, 0 GPU (a PACK placement group, nodes labelled" in job.room_problem(
        labelled, [node(8, role="learner")]
    )
    assert job.room_problem(labelled, [node(3), node(2, **{"moalign-role": "learner"})]) is None
    packed = cfg("actors.num_learners=2", "actors.placement=STRICT_PACK", "learner.micro_batch_pairs=2")
    assert "no node can hold all of 2 learner actors of 2 CPU, 0 GPU each" in job.room_problem(packed, [node(3), node(3), node(3)])
    assert job.room_problem(packed, [node(3), node(5)]) is None
    spread = cfg("actors.num_learners=2", "actors.placement=STRICT_SPREAD", "learner.micro_batch_pairs=2")
    assert "1 node(s) can hold one of 2 learner actors" in job.room_problem(spread, [node(8), node(1)])


def test_submit_refuses_an_oversized_config_before_sending_anything(job, tmp_path):
    jobs = FakeJobs("PENDING", {})
    with pytest.raises(job.JobError, match=r"asks? 4\.5 CPU .* the cluster has 2 CPU.*--num-cpus=5") as refused:
        job.submit(jobs, str(REPO / "configs/default.yaml"), [f"run_dir={tmp_path}", "steps=2"], wait=False, nodes=lambda: [node(2)])
    assert "with its overrides does not fit the cluster" in str(refused.value)
    assert jobs.submitted == []
    # The same config on a cluster it fits is sent, once.
    assert (
        job.submit(jobs, str(REPO / "configs/default.yaml"), [f"run_dir={tmp_path}", "steps=2"], wait=False, nodes=lambda: [node(5)]) == 0
    )
    (sent,) = jobs.submitted
    assert sent["entrypoint"] == f"python orchestrator.py --config {REPO / 'configs/default.yaml'} run_dir={tmp_path} steps=2"


def test_an_offline_config_is_submitted_and_resumed_as_offline_py(job, tmp_path):
    from moalign.config import load_config, save_resolved

    jobs = FakeJobs("PENDING", {})
    assert job.submit(jobs, str(REPO / "configs/mopo_cpu.yaml"), [f"run_dir={tmp_path}"], wait=False) == 0
    assert jobs.submitted[-1]["entrypoint"].startswith("python offline.py --config ")
    save_resolved(load_config(REPO / "configs/mopo_cpu.yaml", [f"run_dir={tmp_path}"]), tmp_path / "config.yaml")
    assert job.resume(jobs, str(tmp_path), [], wait=False) == 0
    assert jobs.submitted[-1]["entrypoint"] == f"python offline.py --config {tmp_path / 'config.yaml'} run_dir={tmp_path}"


def test_status_shows_a_run_waiting_for_room_and_the_error_it_failed_with(job):
    from actors import ray_actors

    # The command reads the phrases the run writes without importing the actors.
    assert (job.WAITING_FOR_ROOM, job.PLACED_AFTER) == (ray_actors.WAITING_FOR_ROOM, ray_actors.PLACED_AFTER)
    waiting = (
        "12:00:01 INFO actors.ray_actors: started 1 reward actor(s) with {...}\n"
        "12:00:06 WARNING actors.ray_actors: 1 learner actor of 2 CPU, 0 GPU (a PACK placement group, any node) "
        "cannot be placed yet: the cluster has 0 CPU, 0 GPU free of 2 CPU, 0 GPU on 1 node(s); waited 5s, the run stops at 300s\n"
    )
    said = job.describe_status("moalign-demo-1", "RUNNING", "", waiting)
    assert said.startswith("moalign-demo-1 RUNNING; waiting for room: 12:00:06 WARNING") and "free of 2 CPU" in said
    placed = waiting + "12:00:40 INFO actors.ray_actors: learner actors 0..0: placed after waiting 39s\n"
    assert job.describe_status("moalign-demo-1", "RUNNING", "", placed) == "moalign-demo-1 RUNNING"
    failed = (
        "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
        + waiting
        + "12:05:01 ERROR moalign: the run's actors could not start: learner actor #0, in placement(): 1 learner actor of 2 CPU ...\n"
    )
    said = job.describe_status("moalign-demo-1", "FAILED", failed, "")
    assert said.splitlines() == [
        "moalign-demo-1 FAILED: Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):",
        "  12:05:01 ERROR moalign: the run's actors could not start: learner actor #0, in placement(): 1 learner actor of 2 CPU ...",
    ]
    assert job.describe_status("j", "STOPPED", "stopped by the user", "") == "j STOPPED: stopped by the user"
