from pathlib import Path

import pytest
import yaml

from moalign.config import ConfigError, RunConfig, ServeConfig, load_config, parse_config, read_preset, save_resolved

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_presets_exist():
    assert PRESETS, "configs/ has no presets"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_parses(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    for path in (cfg.data.train_path, cfg.data.heldout_path):
        assert (REPO / path).is_file(), f"{preset.name}: data file {path} missing"


def test_a_preset_over_its_base(tmp_path):
    """`base:` reads the named preset first (relative to this one) and lays this one's keys over
    it section by section; a list replaces the base's whole; a loop or a missing base is a clear
    error naming the file."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(
        "steps: 7\nrollout: {prompts_per_step: 12, temperature: 0.5}\n"
        "objectives: [{name: Short, source: length, target_words: 12}, {name: Long, source: length, target_words: 48}]\n"
    )
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nrollout: {temperature: 0.9}\nobjectives: [{name: Only, source: detail}]\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nsteps: 9\n")
    cfg = load_config(tmp_path / "c.yaml", ["rollout.prompts_per_step=8"])
    assert cfg.steps == 9 and cfg.rollout.temperature == 0.9 and cfg.rollout.prompts_per_step == 8
    assert cfg.objective_names == ["Only"]
    assert load_config(tmp_path / "sub" / "b.yaml").rollout.prompts_per_step == 12
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml.*no such preset"):
        load_config(tmp_path / "gone.yaml")
    (tmp_path / "odd.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="odd.yaml.*`base` must be a preset's path"):
        load_config(tmp_path / "odd.yaml")


def test_a_key_set_twice_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a preset that sets a section twice would
    lose the first one's settings, so it is an error naming the file, the key and both lines.
    YAML merge keys (`<<`) still work, and may be overridden."""
    (tmp_path / "twice.yaml").write_text("steps: 7\nalgorithm: {beta: 0.5}\nrollout: {temperature: 0.5}\nalgorithm: {lr: 1.0e-4}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml.*'algorithm' on line 4 is already set on line 2"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "nested.yaml").write_text("rollout:\n  temperature: 0.5\n  temperature: 0.9\n")
    with pytest.raises(ConfigError, match=r"'temperature' on line 3 is already set on line 2"):
        load_config(tmp_path / "nested.yaml")
    (tmp_path / "merge.yaml").write_text("x: &r {temperature: 0.5, prompts_per_step: 6}\nrollout: {<<: *r, temperature: 0.9}\n")
    assert read_preset(tmp_path / "merge.yaml")["rollout"] == {"temperature": 0.9, "prompts_per_step": 6}
    (tmp_path / "listkey.yaml").write_text("? [1, 2]\n: x\n")
    with pytest.raises(ConfigError, match=r"(?s)listkey.yaml: not valid YAML.*found unhashable key"):
        load_config(tmp_path / "listkey.yaml")


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.objective_names == ["Relevance", "Conciseness", "Positivity"]
    assert cfg.pairs_per_step == cfg.rollout.prompts_per_step


def test_overrides_keep_types_and_nest():
    cfg = load_config(
        None, ["rollout.prompts_per_step=16", "algorithm.beta=0.5", "conditioning.alpha=[1, 2, 3]", "logging.tensorboard=false"]
    )
    assert cfg.rollout.prompts_per_step == 16
    assert cfg.algorithm.beta == 0.5
    assert cfg.conditioning.alpha == [1, 2, 3]
    assert cfg.logging.tensorboard is False


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"'rolout'.*allowed"):
        load_config(None, ["rolout.prompts_per_step=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  samples_per_promt: 4\n")
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_promt: unknown key"):
        load_config(bad)


def test_invalid_value_names_field_value_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm.loss=square"])
    msg = str(err.value)
    assert "algorithm.loss" in msg and "'square'" in msg and "sigmoid" in msg
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_prompt.*greater than or equal to 2.*got 1"):
        load_config(None, ["rollout.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match=r"rollout\.temperature"):
        load_config(None, ["rollout.temperature=0"])
    with pytest.raises(ConfigError, match=r"rollout\.max_staleness.*less than or equal to 8.*got 9"):
        load_config(None, ["rollout.max_staleness=9"])


def test_batch_arithmetic_checked():
    with pytest.raises(ConfigError, match=r"batch arithmetic: 6 pairs.*= 4"):
        load_config(None, ["rollout.prompts_per_step=6", "learner.micro_batch_pairs=2", "actors.num_learners=2"])
    cfg = load_config(None, ["rollout.prompts_per_step=2", "algorithm.pair_mode=per_objective", "learner.micro_batch_pairs=6"])
    assert cfg.pairs_per_step == 6
    cfg = load_config(None, ["rollout.prompts_per_step=2", "algorithm.relabel_weights=2", "learner.micro_batch_pairs=6"])
    assert cfg.pairs_per_step == 6
    with pytest.raises(ConfigError, match=r"batch arithmetic: 6 pairs .*x 3 weight sets.*= 4"):
        load_config(None, ["rollout.prompts_per_step=2", "algorithm.relabel_weights=2", "learner.micro_batch_pairs=4"])


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="alpha: 2 values given for 3"):
        load_config(None, ["conditioning.alpha=[1, 2]"])
    # `nccl` was the old name; the broadcast now picks NCCL or gloo from the device itself.
    with pytest.raises(ConfigError, match=r"sync\.backend.*allowed: 'object_store' or 'broadcast'"):
        load_config(None, ["sync.backend=nccl"])
    assert load_config(None, ["sync.backend=broadcast"]).sync.backend == "broadcast"
    with pytest.raises(ConfigError, match="callable path"):
        load_config(None, ["objectives=[{name: X, source: callable, path: nocolon}]", "learner.micro_batch_pairs=8"])
    with pytest.raises(ConfigError, match="algorithm.kl_coef: the penalty is taken on algorithm.kl_samples_per_prompt"):
        load_config(None, ["algorithm.kl_coef=0.02", "algorithm.kl_samples_per_prompt=0"])


def test_health_bounds_checked():
    assert load_config(None, ["health.max_kl=20", "health.window_steps=1"]).health.max_kl == 20
    with pytest.raises(ConfigError, match=r"health\.min_distinct_fraction.*less than or equal to 1"):
        load_config(None, ["health.min_distinct_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"health\.min_completion_tokens: 50 is above rollout\.max_new_tokens \(48\)"):
        load_config(None, ["health.min_completion_tokens=50"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["steps=3", "algorithm.mopo.tau=0.2"])
    save_resolved(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["learner"]["lora"]["rank"] == 16


def test_configuration_reference_is_current():
    from moalign.config_docs import render

    doc = REPO / "docs" / "configuration.md"
    assert doc.read_text() == render(), "docs/configuration.md is stale: run `python -m moalign.config_docs`"


def test_configuration_reference_reads_bounds_on_a_mappings_values():
    """A mapping whose values carry their own bounds (`algorithm.corner_kl_coef`) shows its plain
    type, and the bounds in the bounds column, not pydantic's repr of the annotation."""
    from moalign.config_docs import render

    row = next(line for line in render().splitlines() if line.startswith("| `algorithm.corner_kl_coef` |"))
    assert row.startswith("| `algorithm.corner_kl_coef` | dict[str, float] | `{}` | each value ≥ `0`, ≤ `100` |"), row


SERVE_PRESETS = sorted((REPO / "configs" / "serve").glob("*.yaml"))


@pytest.mark.parametrize("preset", SERVE_PRESETS, ids=lambda p: p.name)
def test_every_serve_preset_parses(preset):
    cfg = load_config(preset, ["model=runs/demo/final"], ServeConfig)
    assert cfg.host == "127.0.0.1", "a shipped local preset must bind to loopback"


def test_ray_serve_deploy_file_args_parse():
    deploy = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    (app,) = deploy["applications"]
    assert app["import_path"] == "services.deployment:app_builder"
    cfg = parse_config(app["args"], ServeConfig, "deploy/serve.yaml")
    assert cfg.min_replicas <= cfg.max_replicas


def test_serve_config_refuses_what_cannot_run():
    with pytest.raises(ConfigError, match="model"):
        load_config(None, [], ServeConfig)
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(None, ["model=x", "min_replicas=3", "max_replicas=2"], ServeConfig)
    with pytest.raises(ConfigError, match="max_tokens_limit"):
        load_config(None, ["model=x", "max_tokens_limit=4096", "max_model_len=2048"], ServeConfig)
    with pytest.raises(ConfigError, match="prot"):
        load_config(None, ["model=x", "prot=1"], ServeConfig)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.name=modpo"], "exactly one of `weights`"),
        (["algorithm.name=modpo", "algorithm.modpo.weights=[0.5, 0.5, 0]", "algorithm.modpo.sweep_divisions=2"], "exactly one of"),
        (["algorithm.name=modpo", "algorithm.modpo.weights=[0.5, 0.5]"], r"need 3 weights >= 0 summing to 1"),
        (["algorithm.name=modpo", "algorithm.modpo.weights=[0, 0.5, 0.5]"], "'Relevance' needs a weight > 0"),
        (["algorithm.name=modpo", "algorithm.modpo.objective=3", "algorithm.modpo.sweep_divisions=2"], "not an objective index"),
        (
            ["algorithm.name=modpo", "algorithm.modpo.sweep_divisions=2", "algorithm.modpo.margin_rewards=implicit"],
            r"need an adapter for \['Conciseness', 'Positivity'\]",
        ),
        (
            ["algorithm.name=modpo", "algorithm.modpo.sweep_divisions=2", "algorithm.modpo.margin_adapters={Honesty: x}"],
            r"\['Honesty'\] are not objectives",
        ),
        (["algorithm.name=mopo", "actors.num_learners=2", "offline.pairs_per_step=16"], "mopo runs on one learner"),
        (["algorithm.name=mopo", "learner.zero_stage=3"], "ZeRO-3"),
        (["offline.label_fields={Honesty: x}"], r"offline.label_fields: \['Honesty'\]"),
        (["algorithm.name=dpo"], "algorithm.name"),
        (["algorithm.name=mopo", "algorithm.loss=ipo"], "algorithm.loss: not used by mopo"),
        (["algorithm.name=mopo", "algorithm.kl_coef=0.1"], "algorithm.kl_coef: not used by mopo"),
        (["algorithm.name=mopo", "algorithm.sentence_prefixes=4"], "algorithm.sentence_prefixes: not used by mopo"),
        (["algorithm.name=mopo", "algorithm.pair_tokens_past_parting=4"], "algorithm.pair_tokens_past_parting: not used by mopo"),
        (["algorithm.name=mopo", "algorithm.warm_start_lines=drawn_and_corners"], "algorithm.warm_start_lines: not used by mopo"),
        (["algorithm.name=mopo", "algorithm.preference_label_scale=0.5"], "algorithm.preference_label_scale: not used by mopo"),
        (
            ["algorithm.name=modpo", "algorithm.modpo.sweep_divisions=2", "algorithm.relabel_weights=1"],
            "algorithm.relabel_weights: not used by modpo",
        ),
    ],
)
def test_offline_settings_that_cannot_run_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("other", ["algorithm.loss=ipo", "algorithm.label_smoothing=0.1"])
def test_soft_labels_need_the_plain_sigmoid_loss(other):
    assert load_config(None, ["algorithm.preference_label_scale=0.5"]).algorithm.preference_label_scale == 0.5
    with pytest.raises(ConfigError, match=r"algorithm.preference_label_scale: 0.5 labels each pair for the sigmoid loss"):
        load_config(None, ["algorithm.preference_label_scale=0.5", other])


def test_offline_batch_arithmetic_uses_pairs_per_step():
    cfg = load_config(None, ["algorithm.name=mopo", "offline.pairs_per_step=12", "learner.micro_batch_pairs=4"])
    assert cfg.is_offline and cfg.pairs_per_step == 12
    with pytest.raises(ConfigError, match=r"batch arithmetic: 10 pairs per step \(offline\.pairs_per_step=10\)"):
        load_config(None, ["algorithm.name=mopo", "offline.pairs_per_step=10", "learner.micro_batch_pairs=4"])


def test_batch_arithmetic_names_the_warm_starts_batch_when_it_is_larger():
    # 5 warm-start prompts x 3 objectives = 15 labels against 2 DPO pairs: the warm start's batch is named.
    overrides = ["algorithm.warm_start_steps=3", "rollout.warm_start_prompts_per_step=5", "rollout.prompts_per_step=2"]
    with pytest.raises(
        ConfigError, match=r"15 pairs per step \(the warm start's: rollout\.warm_start_prompts_per_step=5 x \(3 objectives\)\)"
    ):
        load_config(None, [*overrides, "learner.micro_batch_pairs=4"])


@pytest.mark.parametrize(
    "setting",
    [
        "algorithm.warm_start_beta=0.5",
        "algorithm.warm_start_lines=drawn_and_corners",
        "rollout.warm_start_prompts_per_step=2",
        "learner.warm_start_lr=0.0002",
    ],
)
def test_warm_start_settings_without_a_warm_start_are_refused(setting):
    name, value = setting.split("=")
    with pytest.raises(ConfigError, match=rf"{name}: {value} is set, but algorithm\.warm_start_steps is 0"):
        load_config(None, [setting])
    assert load_config(None, [setting, "algorithm.warm_start_steps=3"])


def test_the_stop_decision_warm_start_needs_prefixes_and_a_warm_start():
    stops = ["algorithm.warm_start_pairs=stop_decisions", "algorithm.sentence_prefixes=8"]
    assert load_config(None, [*stops, "algorithm.warm_start_steps=5"]).algorithm.warm_start_pairs == "stop_decisions"
    between = load_config(None, [*stops, "algorithm.warm_start_steps=5", "algorithm.warm_start_lines=drawn_and_corners"])
    assert between.pairs_in_step(True) == between.rollout.prompts_per_step * (len(between.objectives) + 1)
    own = load_config(None, [*stops, "algorithm.warm_start_steps=5", "algorithm.warm_start_lines=sampled"])
    assert own.pairs_in_step(True) == own.rollout.prompts_per_step
    for extra, message in (
        ([], r"warm_start_pairs: stop_decisions: algorithm\.warm_start_steps is 0"),
        (["algorithm.warm_start_steps=5", "algorithm.sentence_prefixes=0"], r"set algorithm\.sentence_prefixes above 0"),
        (["algorithm.warm_start_steps=5", "algorithm.warm_start_beta=1"], r"algorithm\.warm_start_beta is the labels' loss"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*stops, *extra])


def test_a_run_of_only_warm_start_steps_is_warned_about(caplog):
    from loops.run_setup import warn_if_only_warm_start

    with caplog.at_level("WARNING", logger="loops.run_setup"):
        warn_if_only_warm_start(load_config(None, ["steps=20", "algorithm.warm_start_steps=20"]))
        assert "every step is a supervised warm-start step" in caplog.text
        caplog.clear()
        warn_if_only_warm_start(load_config(None, ["steps=21", "algorithm.warm_start_steps=20"]))
        assert caplog.text == ""
        # Stop decisions are DPO pairs: a run of nothing else is a recipe, not a slip.
        stops = ["algorithm.warm_start_pairs=stop_decisions", "algorithm.sentence_prefixes=8", "conditioning.warm_start_weights=corners"]
        warn_if_only_warm_start(load_config(None, ["steps=20", "algorithm.warm_start_steps=20", *stops]))
        assert caplog.text == ""
