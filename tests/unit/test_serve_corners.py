"""The served benchmark's standard error: each prompt's answers count as one unit."""

import math

import numpy as np
import pytest

from benchmarks.serve_corners import length_figures, mean_and_prompt_se


def test_prompt_se_reads_prompt_means_not_single_answers():
    # Two prompts, three rounds each (answer j to prompt j mod 2): prompt 0 always 10 words,
    # prompt 1 always 30. The six answers as if independent would give 11.0 / sqrt(6) ~ 4.5;
    # with the prompts as units it is the spread of 10 and 30 over sqrt(2), 10.
    mean, se = mean_and_prompt_se([10, 30, 10, 30, 10, 30], n_prompts=2)
    assert mean == 20
    assert se == pytest.approx(np.std([10, 30], ddof=1) / math.sqrt(2)) == pytest.approx(10)


def test_prompt_se_with_one_answer_a_prompt_is_the_usual_one():
    values = [3.0, 5.0, 9.0, 11.0]
    mean, se = mean_and_prompt_se(values, n_prompts=4)
    assert mean == pytest.approx(7.0)
    assert se == pytest.approx(np.std(values, ddof=1) / 2)


def test_prompt_se_rejects_an_unfinished_round():
    with pytest.raises(ValueError, match="5 answers are not a whole number of rounds over 2 prompts"):
        mean_and_prompt_se([1, 2, 3, 4, 5], n_prompts=2)


def test_prompt_se_of_one_prompt_is_undefined():
    mean, se = mean_and_prompt_se([4, 6], n_prompts=1)
    assert mean == 5 and math.isnan(se)


def test_length_figures_show_the_short_fragments_a_mean_hides():
    # Two prompts, two rounds: three full answers and one fragment of two words.
    texts = ["one two three four five six seven eight nine ten", "Which one.", "a b c d e f g h i j k l", "a b c d e f g h"]
    figures = length_figures(texts, n_prompts=2)
    assert figures["words"] == pytest.approx(8.0)
    assert figures["median_words"] == pytest.approx(9.0)
    assert figures["under_8_words"] == pytest.approx(0.25)
    assert figures["words_se"] == pytest.approx(mean_and_prompt_se([10, 2, 12, 8], 2)[1])
