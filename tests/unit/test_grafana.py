"""The Grafana dashboard: valid JSON with a datasource and a run variable, every panel querying
ray_moalign_* gauges by name as actors/metrics.py exports them (the integration tests check the
names against real runs)."""

import json
import re
from pathlib import Path

from actors.metrics import metric_spec

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "moalign.json"


def dashboard_metrics() -> set[str]:
    """Every `ray_moalign_*` name the dashboard queries, without Ray's `ray_` prefix."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return {m.removeprefix("ray_") for e in exprs for m in re.findall(r"ray_moalign_[a-z0-9_]+", e)}


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and "ray_moalign_loss" in variables["run"]["definition"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].startswith("ray_moalign_") and 'run=~"$run"' in target["expr"], target["expr"]


def test_families_are_one_gauge_tagged_by_objective_or_phase():
    assert metric_spec("reward/Relevance")[:2] == ("moalign_reward", {"objective": "Relevance"})
    assert metric_spec("eval/steerability/Positivity")[:2] == ("moalign_eval_steerability", {"objective": "Positivity"})
    assert metric_spec("time/sync_s")[:2] == ("moalign_time_seconds", {"phase": "sync"})
    assert metric_spec("health/kl")[:2] == ("moalign_health_kl", {})
    assert "DPO margin" in metric_spec("margin")[2] and "per objective" in metric_spec("reward/X")[2]
    assert {"moalign_reward", "moalign_loss", "moalign_time_seconds", "moalign_actor_restarts"} <= dashboard_metrics()
