"""Sentence-end prefixes as extra candidate answers (`moalign.prefixes`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moalign.config import ConfigError, load_config
from moalign.prefixes import line_break_share, newline_token, sentence_ends, with_line_break_variants, with_sentence_prefixes

EOS = 0


class PieceTokenizer:
    """Token id i is the piece VOCAB[i]; decoding joins pieces (id 0 is the end-of-sequence token)."""

    VOCAB = ["<eos>", "Hi", " there", ".", " It", " rains", "!", " More", " words", " 1", "3", "5", '."', " Yes", "\n", "It", "More"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.VOCAB[i] for i in ids if not (skip_special_tokens and i == EOS))

    def encode(self, text, add_special_tokens=True):
        """Greedy longest match over the pieces (no special tokens either way)."""
        ids = []
        while text:
            i = max((i for i, v in enumerate(self.VOCAB) if i and text.startswith(v)), key=lambda i: len(self.VOCAB[i]))
            ids.append(i)
            text = text[len(self.VOCAB[i]) :]
        return ids


def sample(ids, finish="stop", version=3):
    return {"token_ids": ids, "text": PieceTokenizer().decode(ids, skip_special_tokens=True), "finish_reason": finish, "version": version}


def test_sentence_ends_are_punctuation_followed_by_whitespace():
    pieces = ["Hi", " there", ".", " It", " rains", "!", " More"]
    assert sentence_ends(pieces) == [2, 5]
    # The last piece is the whole answer, not a prefix of it.
    assert sentence_ends(["Hi", "."]) == []
    # A number's point: no end. A closing quote after the point: an end.
    assert sentence_ends([" Step", " 1", ".", " Then"]) == []
    assert sentence_ends([" 3", ".", "5", " m"]) == []
    assert sentence_ends([" 1.", " First"]) == []
    assert sentence_ends([" said", ' "no', '."', " Then"]) == [2]
    assert sentence_ends(["Why", "?", "\n\n", "Because"]) == [1]


def test_line_ends_count_only_when_asked_and_only_after_a_line_of_words():
    pieces = ["Tips", ":", "\n", "\n", "1", ".", " Pack", " light", " early", "\n", "2", ".", " Roll", "\n", "Done", ".", "\n", "Next"]
    assert sentence_ends(pieces) == [15]
    # "1. Pack light early" ends a line of three words; "Tips:" announces what follows; "2. Roll"
    # is too short to be an answer; "Done." is a sentence end either way.
    assert sentence_ends(pieces, lines=True) == [8, 15]
    # A line that ends the sample is the sample itself.
    assert sentence_ends([" Pack", " light", " early"], lines=True) == []
    assert sentence_ends([" Pack", " light", " early", "\n\n", "More"], lines=True) == [2]
    # A line closed by a bold marker alone still ends there.
    assert sentence_ends(["**", "Pack", " light", " early", "**", "\n", "More"], lines=True) == [4]


def test_prefixes_follow_the_samples_and_end_with_eos():
    tok = PieceTokenizer()
    groups = [
        [sample([1, 2, 3, 4, 5, 6, 7, 8], "length"), sample([4, 5, 3, 13, 6, EOS])],
        [sample([1, 2, 3, 4, 5, 6, EOS]), sample([7, 8], "length")],
    ]
    out = with_sentence_prefixes(groups, tok, 2, EOS, seeds=[1, 2])
    assert [len(g) for g in out] == [4, 4]
    # The samples are first and untouched: indices below n still name samples.
    assert [g[:2] for g in out] == groups
    first = out[0][2:]
    # Group 0 has three sentence ends ("Hi there." and "... It rains!" in the first, "It rains." in
    # the second; its "Yes!" is the sample's own end): two of them, without repeats.
    possible = [[1, 2, 3, EOS], [1, 2, 3, 4, 5, 6, EOS], [4, 5, 3, EOS]]
    assert all(s["token_ids"] in possible for s in first) and first[0]["token_ids"] != first[1]["token_ids"]
    for s in first:
        ids = s["token_ids"]
        assert ids[-1] == EOS and s["finish_reason"] == "stop" and s["version"] == 3
        assert s["text"] == tok.decode(ids, skip_special_tokens=True) and s["text"].endswith((".", "!"))
        # Each names the sample it was cut from, which went on past it.
        parent = groups[0][s["prefix_of"]]["token_ids"]
        assert parent[: len(ids) - 1] == ids[:-1] and parent[len(ids) - 1] != EOS


def test_too_few_prefixes_are_topped_up_with_copies_of_samples():
    tok = PieceTokenizer()
    groups = [[sample([1, 2, 3, 4, 5, EOS]), sample([7, 8], "length")]]
    out = with_sentence_prefixes(groups, tok, 3, EOS, seeds=[0])
    assert out[0][2]["token_ids"] == [1, 2, 3, EOS] and out[0][2]["prefix_of"] == 0
    # Copies rank after their originals (argmax and argmin take the first of equal scores), and
    # are no prefix of anything.
    assert out[0][3:] == [groups[0][0], groups[0][1]]
    assert all("prefix_of" not in s for s in out[0][3:])


def test_the_draw_is_seeded():
    tok = PieceTokenizer()
    long = sample([1, 3, 4, 3, 7, 3, 13, 3, 8, 6, 2, 3, 5, 3, 4], "length")
    groups = [[long, long]]
    a = with_sentence_prefixes(groups, tok, 3, EOS, seeds=[7])
    assert a == with_sentence_prefixes(groups, tok, 3, EOS, seeds=[7])
    draws = {tuple(tuple(s["token_ids"]) for s in with_sentence_prefixes(groups, tok, 3, EOS, seeds=[seed])[0][2:]) for seed in range(20)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        with_sentence_prefixes([[long], [long]], tok, 1, EOS, seeds=[0])


def test_line_ends_need_prefixes():
    with pytest.raises(
        ConfigError, match=r"prefix_ends: sentences_and_lines says where prefixes are cut; it needs algorithm\.sentence_prefixes"
    ):
        load_config(None, ["algorithm.prefix_ends=sentences_and_lines"])
    cfg = load_config(None, ["algorithm.sentence_prefixes=4", "algorithm.prefix_ends=sentences_and_lines"])
    assert cfg.algorithm.prefix_ends == "sentences_and_lines"


def test_line_break_share_counts_the_breaks_that_start_a_new_line():
    assert line_break_share("Hi there. It rains! More words.") == 0.0
    assert line_break_share("Hi there.\nIt rains!\n\nMore words.") == 1.0
    assert line_break_share("Hi there. It rains!\nMore words.\n") == 0.5
    # A list item's number is no break; a list is one item a line.
    assert line_break_share("Pack:\n1. Pack light today\n2. Roll the shirts") == 1.0
    assert line_break_share("One sentence only.") == 0.0 and line_break_share("") == 0.0


def test_line_break_variants_flip_one_break_of_a_sample():
    tok = PieceTokenizer()
    assert newline_token(tok) == 14
    # "Hi there. It rains! More words" (cut off) and "Hi there.\nIt rains!" (ended).
    groups = [[sample([1, 2, 3, 4, 5, 6, 7, 8], "length"), sample([1, 2, 3, 14, 15, 5, 6, EOS])]]
    prefixed = with_sentence_prefixes(groups, tok, 1, EOS, seeds=[0])
    out = with_line_break_variants(prefixed, 2, tok, 5, EOS, 14, seeds=[0])
    # The candidates so far are kept first; the variants follow, then copies of the samples.
    assert out[0][:3] == prefixed[0]
    variants = out[0][3:6]
    assert [v["token_ids"] for v in variants] == [[1, 2, 3, 14, 15, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 14, 16, 8], [1, 2, 3, 4, 5, 6, EOS]]
    assert [v["break_of"] for v in variants] == [0, 0, 1]
    assert variants[0]["text"] == "Hi there.\nIt rains! More words" and variants[2]["text"] == "Hi there. It rains!"
    # Each keeps its sample's ending and version; only the one break differs.
    assert [v["finish_reason"] for v in variants] == ["length", "length", "stop"] and {v["version"] for v in variants} == {3}
    assert out[0][6:] == groups[0] and all("break_of" not in s for s in out[0][6:])
    # Seeded, and a draw of fewer than there are.
    one = with_line_break_variants(prefixed, 2, tok, 1, EOS, 14, seeds=[4])
    assert one == with_line_break_variants(prefixed, 2, tok, 1, EOS, 14, seeds=[4]) and one[0][3] in variants
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        with_line_break_variants(prefixed * 2, 2, tok, 1, EOS, 14, seeds=[0])


def test_line_break_variants_need_stop_decisions():
    with pytest.raises(
        ConfigError, match=r"line_break_variants: 4 pairs line-break decisions in the warm start; it needs algorithm\.warm_start_pairs"
    ):
        load_config(None, ["algorithm.line_break_variants=4"])
    preset = Path(__file__).resolve().parents[2] / "configs" / "steer_layout_cpu.yaml"
    cfg = load_config(preset, [])
    assert cfg.algorithm.line_break_variants == 8
    # Two decisions a prompt and corner: the learner's batch is sized for both.
    assert cfg.pairs_in_step(True) == 6 * 3 * 2 == load_config(preset, ["algorithm.line_break_variants=0"]).pairs_in_step(True) * 2
