import numpy as np
import pytest

from moalign.conditioning import (
    DirichletSampler,
    WeightsError,
    condition_messages,
    format_weights,
    round_weights,
)
from tests.helpers.weight_lines import parse_weights

NAMES = {2: ["Helpfulness", "Harmlessness"], 3: ["Relevance", "Conciseness", "Positivity"], 5: ["A", "B", "C", "D", "E"]}


def test_dirichlet_state_round_trip_continues_identically():
    s = DirichletSampler(3, alpha=[0.5, 1.0, 2.0], seed=7)
    s.sample(5)
    state = s.state_dict()
    expected = s.sample(4)
    restored = DirichletSampler(3, alpha=[0.5, 1.0, 2.0], seed=999)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.sample(4), expected)


def test_dirichlet_samples_on_simplex_and_seeded():
    a = DirichletSampler(4, 1.0, seed=3).sample(100)
    b = DirichletSampler(4, 1.0, seed=3).sample(100)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (100, 4) and np.all(a >= 0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)


def test_dirichlet_alpha_shapes_concentration():
    flat = DirichletSampler(2, 0.1, seed=0).sample(4000)
    peaked = DirichletSampler(2, 50.0, seed=0).sample(4000)
    # Small alpha pushes mass to the corners, large alpha to the centre.
    assert np.mean(np.abs(flat[:, 0] - 0.5) > 0.4) > 0.5
    assert np.mean(np.abs(peaked[:, 0] - 0.5) < 0.1) > 0.8


@pytest.mark.parametrize("bad", [0.0, -1.0, [1.0, 0.0, 1.0], [1.0, 1.0]])
def test_dirichlet_rejects_bad_alpha(bad):
    with pytest.raises(WeightsError):
        DirichletSampler(3, bad)


def test_dirichlet_load_rejects_other_alpha():
    state = DirichletSampler(2, 1.0).state_dict()
    with pytest.raises(WeightsError, match="alpha"):
        DirichletSampler(2, 2.0).load_state_dict(state)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("decimals", [1, 2, 4])
def test_prefix_round_trip(k, decimals):
    rng = np.random.default_rng(k * 10 + decimals)
    for w in rng.dirichlet(np.ones(k), size=20):
        text = format_weights(NAMES[k], w, decimals)
        back = parse_weights(text, NAMES[k], decimals)
        np.testing.assert_allclose(back, round_weights(w, decimals), atol=1e-12)
        assert abs(back.sum() - 1) < 1e-9
        assert np.max(np.abs(back - w)) <= 10.0 ** (-decimals) * k


def test_format_is_the_papers_prefix():
    text = format_weights(NAMES[2], [0.7, 0.3], 1)
    assert text == "[Begin System Instruction] Helpfulness: 0.7, Harmlessness: 0.3 [End System Instruction]"


def test_rounding_keeps_sum_one():
    w = round_weights(np.array([1 / 3, 1 / 3, 1 / 3]), 1)
    np.testing.assert_allclose(w, [0.4, 0.3, 0.3])
    assert abs(w.sum() - 1) < 1e-12


@pytest.mark.parametrize(
    "weights, match",
    [([0.5, 0.6], "sum to 1"), ([-0.1, 1.1], ">= 0"), ([0.5, 0.2, 0.3], "expected 2"), ([float("nan"), 1.0], "finite")],
)
def test_bad_weights_are_rejected(weights, match):
    with pytest.raises(WeightsError, match=match):
        format_weights(NAMES[2], weights)


def test_parse_rejects_bad_text():
    with pytest.raises(WeightsError, match="no weight instruction"):
        parse_weights("hello", NAMES[2])
    with pytest.raises(WeightsError, match="differ"):
        parse_weights("[Begin System Instruction] Harmlessness: 0.5, Helpfulness: 0.5 [End System Instruction]", NAMES[2])
    with pytest.raises(WeightsError, match="sum to 1"):
        parse_weights("[Begin System Instruction] Helpfulness: 0.5, Harmlessness: 0.6 [End System Instruction]", NAMES[2], 1)
    with pytest.raises(WeightsError, match="Name: number"):
        parse_weights("[Begin System Instruction] Helpfulness: lots, Harmlessness: 0.6 [End System Instruction]", NAMES[2])


def test_messages_styles_carry_parseable_weights():
    sys_msgs = condition_messages("Why is the sky blue?", NAMES[3], [0.2, 0.3, 0.5], "chat_system")
    assert [m["role"] for m in sys_msgs] == ["system", "user"]
    assert sys_msgs[1]["content"] == "Why is the sky blue?"
    np.testing.assert_allclose(parse_weights(sys_msgs[0]["content"], NAMES[3]), [0.2, 0.3, 0.5])
    pre = condition_messages("Why is the sky blue?", NAMES[3], [0.2, 0.3, 0.5], "system_prefix")
    assert len(pre) == 1 and pre[0]["content"].endswith("\nWhy is the sky blue?")
    np.testing.assert_allclose(parse_weights(pre[0]["content"], NAMES[3]), [0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    "k, weights, decimals",
    [
        (3, [0.34, 0.34, 0.34], 2),  # sum 1.02: naive largest-remainder wrote 0.35, 0.34, 0.34
        (3, [0.33, 0.33, 0.33], 2),  # sum 0.99
        (2, [0.505, 0.505], 2),  # sum 1.01
        (2, [0.7, 0.29], 2),  # sum 0.99
        (2, [0.55, 0.55], 1),  # sum 1.1, within 2 x 0.1
        (5, [0.208, 0.208, 0.208, 0.208, 0.208], 2),  # sum 1.04, within 5 x 0.01
        (5, [0.19, 0.2, 0.2, 0.2, 0.2], 2),  # sum 0.99
        (5, [0.1999, 0.2001, 0.2, 0.2, 0.2002], 4),  # sum 1.0002
    ],
)
def test_weights_within_tolerance_are_renormalised_before_rounding(k, weights, decimals):
    text = format_weights(NAMES[k], weights, decimals)
    body = text.removeprefix("[Begin System Instruction] ").removesuffix(" [End System Instruction]")
    written = [int(item.rpartition(":")[2].replace(".", "")) for item in body.split(", ")]
    assert sum(written) == 10**decimals, text  # exactly 1, in the written digits
    back = parse_weights(text, NAMES[k], decimals)
    assert abs(back.sum() - 1) < 1e-9
    w = np.asarray(weights) / np.sum(weights)
    assert np.max(np.abs(back - w)) <= 10.0 ** (-decimals), text
    assert np.array_equal(parse_weights(text, NAMES[k]), back)  # the default, strict tolerance too


def test_round_weights_renormalises_each_row():
    w = round_weights(np.array([[0.34, 0.34, 0.34], [0.2, 0.3, 0.5]]), 2)
    np.testing.assert_allclose(w, [[0.34, 0.33, 0.33], [0.2, 0.3, 0.5]], atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    with pytest.raises(WeightsError, match="positive sum"):
        round_weights(np.array([0.0, 0.0]), 0)


@pytest.mark.parametrize(
    "k, weights, decimals",
    [
        (3, [0.35, 0.35, 0.35], 2),  # sum 1.05 > 1 + 3 x 0.01
        (3, [0.32, 0.32, 0.32], 2),  # sum 0.96
        (2, [0.52, 0.52], 2),  # sum 1.04 > 1 + 2 x 0.01
        (5, [0.19, 0.19, 0.19, 0.19, 0.19], 2),  # sum 0.95
        (2, [0.5, 0.5003], 4),  # sum 1.0003 > 1 + 2 x 0.0001
    ],
)
def test_weights_outside_tolerance_are_still_refused(k, weights, decimals):
    with pytest.raises(WeightsError, match="sum to 1"):
        format_weights(NAMES[k], weights, decimals)


def test_fixed_weights_sampler_and_its_config():
    from moalign.conditioning import FixedWeights
    from moalign.config import ConfigError, load_config

    sampler = FixedWeights([1.0, 0.0, 0.0])
    np.testing.assert_array_equal(sampler.sample(2), [[1, 0, 0], [1, 0, 0]])
    sampler.load_state_dict(sampler.state_dict())
    with pytest.raises(WeightsError, match="differs from the configured fixed weights"):
        FixedWeights([0.0, 1.0, 0.0]).load_state_dict(sampler.state_dict())
    assert load_config(None, ["conditioning.fixed_weights=[0, 1, 0]"]).conditioning.fixed_weights == [0, 1, 0]
    with pytest.raises(ConfigError, match="fixed_weights: need 3 weights"):
        load_config(None, ["conditioning.fixed_weights=[0.5, 0.6, 0]"])
    with pytest.raises(ConfigError, match="relabel_weights"):
        load_config(None, ["conditioning.fixed_weights=[1, 0, 0]", "algorithm.relabel_weights=1"])


def test_neglected_corners_pick_the_least_weighted_objectives():
    from moalign.conditioning import neglected_corners

    w = np.array([[0.7, 0.1, 0.2], [0.2, 0.4, 0.4], [0.0, 0.0, 1.0]])
    first, second = neglected_corners(w, 2)
    np.testing.assert_array_equal(first, [[0, 1, 0], [1, 0, 0], [1, 0, 0]])
    # Ties go to the lower objective index.
    np.testing.assert_array_equal(second, [[0, 0, 1], [0, 1, 0], [0, 1, 0]])
    with pytest.raises(WeightsError, match="need 1..3 corners"):
        neglected_corners(w, 4)


class WordTokenizer:
    """One token per whitespace-separated word; the chat template joins the messages' contents."""

    def __init__(self):
        self.words: list[str] = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        ids = []
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
            ids.append(self.words.index(word))
        return {"input_ids": ids}

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


@pytest.mark.parametrize("too_long", ["skip", "truncate"])
def test_prompts_too_long_once_conditioned_are_skipped_or_cut_at_the_start(too_long):
    from dataclasses import dataclass

    from moalign.conditioning import fit_prompts

    @dataclass(frozen=True)
    class Record:
        id: str
        prompt: str

    records = [Record("short", "why is the sky blue"), Record("long", "a long story " * 4 + "so what happened next")]
    # The weight line for two objectives is 10 words: `[Begin System Instruction] A: 0.70, B: 0.30 [End System Instruction]`.
    kept, report = fit_prompts(records, WordTokenizer(), ["A", "B"], "chat_system", 2, 10 + 6, too_long)
    assert report["too_long"] == 1 and report["too_long_ids"] == ["long"] and report["longest_tokens"] == 10 + 16
    if too_long == "skip":
        assert kept == records[:1] and report["kept"] == 1
    else:
        assert kept[0] == records[0] and kept[1].id == "long" and kept[1].prompt == "long story so what happened next"


def test_no_room_for_any_prompt_is_an_error():
    from moalign.conditioning import fit_prompts

    class Record:
        id, prompt = "r", "a question"

    with pytest.raises(ValueError, match="weight line alone take"):
        fit_prompts([Record()], WordTokenizer(), ["A", "B"], "chat_system", 2, 10, "truncate")


def test_a_run_counts_the_prompts_it_left_out_in_its_data_report(tmp_path):
    import json

    from moalign.config import load_config
    from moalign.data import load_fitted_prompts

    lines = ['{"id": "short", "prompt": "why is the sky blue"}', '{"id": "long", "prompt": "' + "tell me more " * 10 + '"}']
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    names = "objectives=[{name: A, source: conciseness}, {name: B, source: positivity}]"
    cfg = load_config(None, [names, "model.max_prompt_tokens=16"])
    kept = load_fitted_prompts(cfg, str(tmp_path / "prompts.jsonl"), WordTokenizer(), tmp_path / "data_report.json")
    assert [r.id for r in kept] == ["short"]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert (report["prompts"], report["too_long"], report["too_long_ids"], report["action"]) == (2, 1, ["long"], "skip")
    cut = load_fitted_prompts(
        load_config(None, [names, "model.max_prompt_tokens=16", "data.too_long=truncate"]), str(tmp_path / "prompts.jsonl"), WordTokenizer()
    )
    assert [r.id for r in cut] == ["short", "long"] and cut[1].prompt == "tell me more tell me more"


def test_warm_start_sampling_weights_by_setting():
    from moalign.conditioning import warm_start_sampling_weights

    drawn = np.array([[0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.5, 0.5]])
    assert warm_start_sampling_weights("drawn", drawn) is drawn
    corners = np.eye(2)[[0, 1, 0, 1, 0]]
    np.testing.assert_array_equal(warm_start_sampling_weights("corners", drawn), corners)
    # Prompts 0, 1 and 4 under the corners (b mod 4 < 2), 2 and 3 under their draws.
    mixed = warm_start_sampling_weights("corners_and_drawn", drawn)
    np.testing.assert_array_equal(mixed, [[1, 0], [0, 1], [0.4, 0.6], [0.9, 0.1], [1, 0]])
    with pytest.raises(ValueError, match="conditioning.warm_start_weights: unknown setting 'edges'"):
        warm_start_sampling_weights("edges", drawn)
