import numpy as np
import pytest

from moalign.pairs import (
    RewardError,
    RunningNormalizer,
    check_rewards,
    chosen_probability,
    cut_to_decision_token,
    select_pairs,
    select_relabelled_pairs,
    select_stop_decisions,
)

NAMES = ["Relevance", "Conciseness"]


def test_scalarised_selection_by_weighted_sum():
    w = np.array([[0.8, 0.2], [0.1, 0.9]])
    r = np.array(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],  # scores 0.8, 0.2, 0.5
            [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],  # scores 0.1, 0.9, 0.5
        ]
    )
    sel = select_pairs(w, r)
    assert [(p.prompt, p.chosen, p.rejected) for p in sel.pairs] == [(0, 0, 1), (1, 1, 0)]
    assert all(p.loss_weight == 1.0 and p.objective is None for p in sel.pairs)
    assert sel.dropped_ties == 0


def test_ties_are_deterministic_and_equal_scores_dropped():
    w = np.array([[0.5, 0.5], [0.5, 0.5]])
    r = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [[0.3, 0.3], [0.3, 0.3], [0.3, 0.3]]])
    sel = select_pairs(w, r)
    # First prompt: samples 0 and 1 tie for best (0.5), lowest index wins; sample 2 is worst.
    assert [(p.prompt, p.chosen, p.rejected) for p in sel.pairs] == [(0, 0, 2)]
    assert sel.dropped_ties == 1


def test_per_objective_reading():
    w = np.array([[0.25, 0.75]])
    r = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    sel = select_pairs(w, r, "per_objective")
    assert [(p.chosen, p.rejected, p.loss_weight, p.objective) for p in sel.pairs] == [(0, 1, 0.25, 0), (1, 0, 0.75, 1)]


def test_per_objective_drops_zero_weight_and_ties():
    w = np.array([[1.0, 0.0]])
    r = np.array([[[0.5, 0.0], [0.5, 1.0]]])
    sel = select_pairs(w, r, "per_objective")
    assert sel.pairs == [] and sel.dropped_zero_weight == 1 and sel.dropped_ties == 1


def test_selection_rejects_single_sample():
    with pytest.raises(RewardError, match="at least 2"):
        select_pairs(np.array([[1.0, 0.0]]), np.zeros((1, 1, 2)))


def test_check_rewards_names_objective_and_sample():
    r = np.zeros((2, 3, 2))
    r[1, 2, 1] = np.nan
    with pytest.raises(RewardError, match=r"'Conciseness'.*prompt 1, sample 2"):
        check_rewards(r, 2, 3, NAMES)


def test_check_rewards_shape():
    with pytest.raises(RewardError, match="shape"):
        check_rewards(np.zeros((2, 3)), 2, 3, NAMES)
    with pytest.raises(RewardError, match="not numeric"):
        check_rewards([["a", "b"]], 1, 1, NAMES)
    with pytest.raises(RewardError, match="inf"):
        check_rewards(np.full((1, 2, 2), np.inf), 1, 2, NAMES)


def test_normalizer_matches_numpy_and_round_trips():
    rng = np.random.default_rng(0)
    data = rng.normal([3.0, -10.0], [2.0, 0.1], size=(50, 4, 2))
    norm = RunningNormalizer(2)
    for chunk in np.split(data, 5):
        norm.update(chunk)
    flat = data.reshape(-1, 2)
    np.testing.assert_allclose(norm.mean, flat.mean(0))
    np.testing.assert_allclose(norm.std, flat.std(0, ddof=1) + 1e-6)
    z = norm.normalize(flat)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)

    restored = RunningNormalizer(2)
    restored.load_state_dict(norm.state_dict())
    extra = rng.normal(size=(3, 2, 2))
    norm.update(extra)
    restored.update(extra)
    np.testing.assert_array_equal(restored.mean, norm.mean)
    np.testing.assert_array_equal(restored.std, norm.std)


def test_normalizer_rejects_other_objective_count():
    with pytest.raises(ValueError, match="objectives"):
        RunningNormalizer(3).load_state_dict(RunningNormalizer(2).state_dict())


def test_relabelled_pairs_rank_the_same_samples_under_each_weight_line():
    # Sample 0 is best on objective 0 and worst on objective 1; sample 1 the reverse.
    rewards = np.array([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    drawn = np.array([[0.9, 0.1]])
    extra = np.array([[0.2, 0.8]])
    selection = select_relabelled_pairs([drawn, extra], rewards)
    assert [(p.prompt, p.chosen, p.rejected) for p in selection.pairs] == [(0, 0, 1), (1, 1, 0)]
    # With one weight set it is select_pairs itself.
    single = select_relabelled_pairs([drawn], rewards)
    assert single.pairs == select_pairs(drawn, rewards).pairs


def test_relabelled_pairs_index_prompts_by_weight_set_and_count_ties():
    rewards = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.3, 0.3], [0.3, 0.3]]])
    sets = [np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.0, 1.0], [0.5, 0.5]])]
    selection = select_relabelled_pairs(sets, rewards, "per_objective")
    # Prompt 1's samples tie on every objective under both sets; zero weights are skipped.
    assert [(p.prompt, p.objective) for p in selection.pairs] == [(0, 0), (2, 1)]
    assert selection.dropped_ties == 4 and selection.dropped_zero_weight == 2


def test_reward_normalization_modes():
    from moalign.pairs import RunningNormalizer, normalized_rewards

    rng = np.random.default_rng(0)
    # Objective 0 on a scale 100x objective 1's, and objective 2 constant.
    raw = np.stack([rng.normal(50, 10, (4, 3)), rng.normal(0.5, 0.1, (4, 3)), np.full((4, 3), 0.7)], axis=-1)
    batch = normalized_rewards(raw, "batch", RunningNormalizer(3))
    flat = batch.reshape(-1, 3)
    np.testing.assert_allclose(flat[:, :2].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(flat[:, :2].std(0, ddof=1), 1, atol=1e-12)
    assert np.all(flat[:, 2] == 0), "a constant objective ranks nothing"
    running = RunningNormalizer(3)
    first = normalized_rewards(raw, "running", running)
    assert running.count == 12 and np.allclose(first[..., :2], batch[..., :2], atol=1e-5)
    untouched = RunningNormalizer(3)
    np.testing.assert_array_equal(normalized_rewards(raw, "none", untouched), raw)
    assert untouched.count == 12, "the running statistics are kept in every mode"
    with pytest.raises(ValueError, match="allowed: running, batch, none"):
        normalized_rewards(raw, "minmax", RunningNormalizer(3))


def test_only_prompts_whose_lines_disagree_are_kept_when_asked():
    # Prompt 0: objective 0 cannot rank its samples (all 0), so both lines pick by objective 1.
    # Prompt 1: the lines choose different answers.
    rewards = np.array([[[0.0, 0.2], [0.0, 0.9], [0.0, 0.5]], [[1.0, 0.1], [0.0, 0.9], [0.5, 0.5]]])
    drawn = np.array([[0.9, 0.1], [0.9, 0.1]])
    corner = np.array([[0.0, 1.0], [0.0, 1.0]])
    everything = select_relabelled_pairs([drawn, corner], rewards)
    assert [(p.prompt, p.chosen, p.rejected) for p in everything.pairs] == [(0, 1, 0), (1, 0, 1), (2, 1, 0), (3, 1, 0)]
    kept = select_relabelled_pairs([drawn, corner], rewards, keep="contrasting")
    assert [(p.prompt, p.chosen, p.rejected) for p in kept.pairs] == [(1, 0, 1), (3, 1, 0)]
    assert kept.dropped_agreeing == 2
    with pytest.raises(ValueError, match="scalarised pairs only"):
        select_relabelled_pairs([drawn, corner], rewards, "per_objective", keep="contrasting")


def test_corner_answers_are_each_objectives_best_under_its_own_line():
    from moalign.conditioning import corner_weights
    from moalign.pairs import select_line_answers

    rewards = np.array([[[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]], [[0.0, 0.3], [0.0, 0.7], [0.0, 0.1]]])
    selection = select_line_answers(rewards, corner_weights(2, 2))
    # Corner 0's line for prompts 0, 1 is prompt index 0, 1; corner 1's is 2, 3.
    assert [(p.prompt, p.chosen, p.rejected, p.objective) for p in selection.pairs] == [(0, 1, 1, 0), (2, 0, 0, 1), (3, 1, 1, 1)]
    assert selection.dropped_ties == 1, "objective 0 scores prompt 1's answers alike"
    # The warm start renders prompt k * B + b under corner_weights' set k, row b: corner k.
    lines = np.concatenate(corner_weights(2, 2))
    assert all(lines[p.prompt, p.objective] == 1 and lines[p.prompt].sum() == 1 for p in selection.pairs)


def test_a_drawn_line_is_labelled_with_its_weighted_best():
    from moalign.conditioning import corner_weights
    from moalign.pairs import select_line_answers

    # Prompt 0: short (C 1, D 0.2), middling (0.7, 0.6), long (0, 1). Prompt 1: every answer alike.
    rewards = np.array([[[1.0, 0.2], [0.7, 0.6], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])
    drawn = np.array([[0.5, 0.5], [0.3, 0.7]])
    selection = select_line_answers(rewards, [drawn, *corner_weights(2, 2)])
    # The drawn line takes the middling answer, which neither corner does; the corners follow at
    # prompt indices B + k * B + b.
    assert [(p.prompt, p.chosen, p.objective) for p in selection.pairs] == [(0, 1, None), (2, 0, 0), (4, 2, 1)]
    assert selection.dropped_ties == 3
    with pytest.raises(ValueError, match=r"weight set 0 has shape \(1, 2\)"):
        select_line_answers(rewards, [drawn[:1]])


def test_answers_are_cut_a_few_tokens_past_where_they_part():
    from moalign.pairs import cut_past_parting

    eos = 0
    # A sentence-end prefix closed with EOS against its own longer sample: they part at the stop.
    assert cut_past_parting([5, 6, 7, eos], [5, 6, 7, 8, 9, 10, 11], 2) == ([5, 6, 7, eos], [5, 6, 7, 8, 9])
    # Two samples that differ from the first token keep their first tokens only.
    assert cut_past_parting([1, 2, 3], [4, 5, 6], 1) == ([1], [4])
    # One answer wholly inside the other parts where the shorter one ends.
    assert cut_past_parting([5, 6], [5, 6, 7, 8], 1) == ([5, 6], [5, 6, 7])
    with pytest.raises(ValueError, match="keep must be >= 1"):
        cut_past_parting([1], [2], 0)


def test_margin_weighting_scales_each_pair_by_its_score_gap():
    # Prompt 0: a clear preference (gap 0.9); prompt 1: a slight one (gap 0.1) under the same line.
    rewards = np.array([[[1.0, 0.0], [0.1, 0.0]], [[0.55, 0.0], [0.45, 0.0]]])
    w = np.array([[1.0, 0.0], [1.0, 0.0]])
    uniform = select_pairs(w, rewards)
    margin = select_pairs(w, rewards, weighting="margin")
    assert [p.loss_weight for p in uniform.pairs] == [1.0, 1.0]
    assert [(p.chosen, p.rejected) for p in margin.pairs] == [(p.chosen, p.rejected) for p in uniform.pairs]
    assert np.allclose([p.loss_weight for p in margin.pairs], [0.9, 0.1])
    # Per objective: the objective's weight times its own gap.
    per = select_pairs(np.array([[0.5, 0.5]]), np.array([[[1.0, 0.2], [0.0, 0.6]]]), "per_objective", "margin")
    assert np.allclose([p.loss_weight for p in per.pairs], [0.5 * 1.0, 0.5 * 0.4])
    # The relabelled selection passes it on to every weight line.
    relabelled = select_relabelled_pairs([w, np.array([[0.0, 1.0], [0.0, 1.0]])], rewards, weighting="margin")
    assert np.allclose([p.loss_weight for p in relabelled.pairs], [0.9, 0.1])
    with pytest.raises(ValueError, match="pair weighting"):
        select_pairs(w, rewards, weighting="gap")


def test_every_pair_carries_its_reward_gap_for_soft_labels():
    # The gap is kept whatever the weighting, and is the same figure the margin weighting uses.
    rewards = np.array([[[1.0, 0.0], [0.1, 0.0]], [[0.55, 0.0], [0.45, 0.0]]])
    w = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert np.allclose([p.gap for p in select_pairs(w, rewards).pairs], [0.9, 0.05])
    per = select_pairs(np.array([[0.5, 0.5]]), np.array([[[1.0, 0.2], [0.0, 0.6]]]), "per_objective")
    assert np.allclose([p.gap for p in per.pairs], [1.0, 0.4])
    # A line that barely separates its pair labels it near a coin toss; a clear gap near certainty.
    assert chosen_probability(0.0, 2.0) == 0.5
    assert chosen_probability(0.05, 2.0) == pytest.approx(1 / (1 + np.exp(-0.1)))
    assert chosen_probability(0.9, 10.0) > 0.999
    with pytest.raises(ValueError, match="reward gap must be finite and >= 0"):
        chosen_probability(-0.1, 1.0)


def _sample(ids, prefix_of=None):
    sample = {"token_ids": ids, "text": "", "finish_reason": "stop", "version": 0}
    return sample if prefix_of is None else {**sample, "prefix_of": prefix_of}


def test_stop_decisions_pair_each_prefix_with_its_own_sample():
    eos = 0
    # Two samples (the second ended by itself), then prefixes: of sample 0 at 2 tokens, of
    # sample 1 at 1 token, and a top-up copy of sample 0, which has no parent.
    group = [_sample([5, 6, 7, 8]), _sample([9, 10, 0]), _sample([5, 6, 0], 0), _sample([9, 0], 1), _sample([5, 6, 7, 8])]
    # Objective 0 likes short answers, objective 1 long ones; candidate 2 parts from its sample most.
    rewards = np.array([[[0.0, 1.0], [0.5, 0.6], [1.0, 0.1], [0.7, 0.4], [0.0, 1.0]]])
    corners = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
    selection = select_stop_decisions(rewards, corners, [group])
    assert [(p.prompt, p.chosen, p.rejected, p.objective) for p in selection.pairs] == [(0, 2, 0, 0), (1, 0, 2, 1)]
    assert np.allclose([p.gap for p in selection.pairs], [1.0, 0.9])
    # Cut to the stop token, the pair differs by the end-of-sequence token alone, either way round.
    assert cut_to_decision_token(group[2]["token_ids"], group[0]["token_ids"], eos) == ([5, 6, 0], [5, 6])
    assert cut_to_decision_token(group[0]["token_ids"], group[2]["token_ids"], eos) == ([5, 6], [5, 6, 0])
    with pytest.raises(ValueError, match="not a decision on token 0"):
        cut_to_decision_token([5, 6, 7], [5, 6, 8], eos)
    # Two a line: the next prefix by its gap joins, each against its own sample (under the Detail
    # corner candidate 3 parts from sample 1 by 0.2); a line with fewer differing prefixes gives what it has.
    two = select_stop_decisions(rewards, corners, [group], per_line=2)
    assert [(p.prompt, p.chosen, p.rejected) for p in two.pairs] == [(0, 2, 0), (0, 3, 1), (1, 0, 2), (1, 1, 3)]
    assert np.allclose([p.gap for p in two.pairs], [1.0, 0.2, 0.9, 0.2])
    assert len(select_stop_decisions(rewards, corners, [group], per_line=5).pairs) == 4
    # Prefixes that score as their samples do, or none at all: ties, no pair.
    flat = select_stop_decisions(np.ones((1, 5, 2)), corners, [group])
    assert flat.pairs == [] and flat.dropped_ties == 2
    assert select_stop_decisions(rewards[:, :2], corners, [group[:2]]).dropped_ties == 2


def test_line_break_decisions_pair_each_variant_with_its_own_sample():
    nl = 9
    # Sample 0, a prefix of it, and a variant of it with a new line after its first sentence.
    group = [_sample([5, 6, 7, 8]), _sample([5, 6, 0], 0), {**_sample([5, 6, nl, 7, 8]), "break_of": 0}]
    # Objective 0 (a paragraph) prefers the sample to its variant, objective 1 (a line a sentence) the variant.
    rewards = np.array([[[0.5, 0.2], [0.9, 0.3], [0.1, 0.8]]])
    corners = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
    selection = select_stop_decisions(rewards, corners, [group])
    # Each corner: its stop decision, then its line-break decision.
    assert [(p.prompt, p.chosen, p.rejected, p.objective) for p in selection.pairs] == [
        (0, 1, 0, 0),
        (0, 0, 2, 0),
        (1, 1, 0, 1),
        (1, 2, 0, 1),
    ]
    assert np.allclose([p.gap for p in selection.pairs], [0.4, 0.4, 0.1, 0.6])
    # Cut to the line-break token: the side that starts a new line keeps it, the other the shared prefix.
    assert cut_to_decision_token(group[2]["token_ids"], group[0]["token_ids"], nl) == ([5, 6, nl], [5, 6])
    assert cut_to_decision_token(group[0]["token_ids"], group[2]["token_ids"], nl) == ([5, 6], [5, 6, nl])
    with pytest.raises(ValueError, match="not a decision on token 9"):
        cut_to_decision_token([5, 6, nl], [5, 6, nl, 4], nl)
