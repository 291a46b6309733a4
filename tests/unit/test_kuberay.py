"""deploy/kuberay/ holds valid KubeRay objects that launch what configs/cluster_cpu.yaml asks for.

Without a cluster: every RayCluster and RayJob there validates against the v1 CRD schemas of KubeRay
v1.7.0 (tests/data/kuberay/README.md), strictly (an unknown field is an error, as with
`kubectl apply --validate=strict`), and a wrong type or misspelt field is shown to be rejected. Then the
sizing: each role's worker group carries the preset's node labels and holds its actors (replicas, num-cpus,
container CPUs), the head hosts no actor, the RayJob runs the preset on that RayCluster, and every pod
mounts the shared volume that holds the run directory and the model cache, as a non-root user with the token.
"""

import copy
import json
from pathlib import Path, PurePosixPath

import jsonschema
import yaml

from moalign.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "data" / "kuberay"
PRESET = "configs/cluster_cpu.yaml"
COUNTS = {"generator": "num_generators", "reward": "num_reward_workers", "learner": "num_learners"}


def _documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((REPO / "deploy" / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _one(kind: str) -> dict:
    found = [d for _, d in _documents() if d.get("kind") == kind]
    assert len(found) == 1, f"deploy/kuberay holds {len(found)} {kind} objects, expected 1"
    return found[0]


def _strict(schema):
    """The schema with unknown fields refused wherever it lists the fields (the API server prunes them silently)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _errors(doc: dict) -> list[str]:
    schema = json.loads((SCHEMAS / f"{doc['kind'].lower()}.v1.schema.json").read_text())
    validator = jsonschema.Draft7Validator(_strict(schema))
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc))


def _pods(cluster: dict) -> list[dict]:
    return [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_manifests_match_the_kuberay_schemas():
    checked, errors = [], []
    for name, doc in _documents():
        if doc.get("kind") in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", name
            checked.append(doc["kind"])
            errors += [f"{name} ({doc['kind']}) {e}" for e in _errors(doc)]
    assert sorted(checked) == ["RayCluster", "RayJob"]
    assert not errors, "schema errors:\n" + "\n".join(errors)


def test_schema_check_rejects_a_wrong_type_and_an_unknown_field():
    cluster = copy.deepcopy(_one("RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    cluster["spec"]["workerGroupSpecs"][1]["lables"] = cluster["spec"]["workerGroupSpecs"][1].pop("labels")
    errors = _errors(cluster)
    assert any(e.startswith("spec/workerGroupSpecs/0/replicas: 'two' is not of type 'integer'") for e in errors), errors
    assert any(e.startswith("spec/workerGroupSpecs/1: Additional properties") and "'lables'" in e for e in errors), errors


def test_worker_groups_hold_the_presets_actors():
    actors = load_config(REPO / PRESET, []).actors
    spec = _one("RayCluster")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head must host no actor"
    groups = spec["workerGroupSpecs"]
    for role, count_field in COUNTS.items():
        labels = getattr(actors, f"{role}_node_labels")
        assert labels == {"moalign-role": role}, f"{PRESET}: actors.{role}_node_labels"
        matching = [g for g in groups if g.get("labels") == labels]
        assert len(matching) == 1, f"{len(matching)} worker groups carry the Ray labels {labels}"
        group = matching[0]
        # KubeRay >= 1.5 refuses rayStartParams.labels; the group's `labels` become `ray start --labels`.
        assert "labels" not in group["rayStartParams"], group["groupName"]
        pod_cpus = _cpus(group["rayStartParams"]["num-cpus"])
        actor_cpus, count = getattr(actors, f"{role}_cpus"), getattr(actors, count_field)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["replicas"] * pod_cpus >= count * actor_cpus, f"{group['groupName']}: too few CPUs for {count} x {actor_cpus}"
        # An actor cannot span pods: count whole actors per pod.
        assert group["replicas"] * (pod_cpus // actor_cpus) >= count, f"{group['groupName']}: whole actors do not fit"
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert _cpus(resources["requests"]["cpu"]) == pod_cpus == _cpus(resources["limits"]["cpu"]), group["groupName"]
    assert len(groups) == len(COUNTS), "a worker group no role uses"


def test_rayjob_runs_the_preset_on_that_cluster():
    job, cluster = _one("RayJob")["spec"], _one("RayCluster")
    assert PRESET in job["entrypoint"].split()
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job, "the RayCluster is the one home for the sizing"


def test_every_pod_mounts_the_shared_volume_runs_as_non_root_and_has_the_token():
    cfg = load_config(REPO / PRESET, [])
    cluster = _one("RayCluster")
    claim = _one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on different nodes share it"
    secret = cluster["spec"]["authOptions"]["secretName"]
    for group in _pods(cluster):
        pod = group["template"]["spec"]
        name = group.get("groupName", "head")
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000, name
        shared = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        for container in pod["containers"]:
            mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in shared]
            for path in (cfg.run_dir, cfg.model.cache_dir):
                assert any(PurePosixPath(path).is_relative_to(m) for m in mounts), f"{name}: {path} is not on the shared volume"
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}, name
