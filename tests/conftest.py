import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The slowest files first: with two workers taking a file at a time (`--dist loadfile`), a long
# file started last would run alone at the end while the other worker idles.
SLOWEST_FIRST = (
    "tests/integration/test_loop.py",
    "tests/integration/test_pathway.py",
    "tests/integration/test_jobs.py",
    "tests/integration/test_sync.py",
    "tests/integration/test_offline.py",
    "tests/integration/test_serving.py",
    "tests/integration/test_learner.py",
    "tests/integration/test_generator.py",
    "tests/integration/test_faults.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--break-path",
        default=None,
        choices=("learner_unconditioned", "wrong_relabel_line", "sync_drops_adapter"),
        help="tests/integration/test_pathway.py: run the pathway check with this fault injected, to see it fail",
    )


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer; no download."""
    from tests.helpers.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0))


@pytest.fixture(scope="session")
def metrics_port():
    """The Prometheus port of the session's Ray cluster."""
    from moalign.weight_transport import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(metrics_port):
    """One local Ray cluster for the session (for each test worker); logical CPUs above the core
    count so actors fit."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # "local": a new cluster, never one found on this machine (the job test's head, or the other worker's).
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    yield ray
    ray.shutdown()
