import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from actors.reward import ClassifierScore, RewardScorer, answer_quality, echo_fraction, minilm_dir
from moalign.config import ObjectiveConfig
from moalign.pairs import RewardError
from moalign.prefixes import closing_sentence

BUILTINS = [
    ObjectiveConfig(name="Relevance", source="relevance"),
    ObjectiveConfig(name="Conciseness", source="conciseness", target_words=8),
    ObjectiveConfig(name="Positivity", source="positivity"),
    ObjectiveConfig(name="Detail", source="detail", target_words=16),
]


@pytest.fixture(scope="module")
def builtin_scorer():
    return RewardScorer(BUILTINS)


def test_builtin_signals_rank_sensibly(builtin_scorer):
    prompt = "How do I bake bread at home?"
    completions = [
        "Mix flour, water, yeast and salt, knead, let it rise, then bake it in a hot oven.",
        "The stock market closed lower on Tuesday amid fears about interest rates and weak earnings in the tech sector.",
        "Wonderful question! Baking bread is a joy.",
        "",
    ]
    r = builtin_scorer.score([prompt] * 4, completions)
    assert r.shape == (4, 4)
    assert r[0, 0] > r[1, 0] + 0.2, "on-topic answer must be more relevant"
    assert r[2, 1] > r[1, 1], "shorter answer must be more concise"
    assert r[2, 1] == 1.0 and r[3, 1] == 0.0
    assert r[2, 2] > 0.5 and r[2, 2] > r[1, 2]
    assert r[0, 3] > r[2, 3] and r[3, 3] == 0.0, "the longer honest answer says more"
    assert np.all((r >= 0) & (r <= 1)), "built-in objectives are on a [0, 1] scale"


DEGENERATE_PROMPT = "How do I keep basil alive on a windowsill in winter?"
GOOD_ANSWERS = [
    "Bright light, little water, no cold glass.",
    "Give it at least six hours of light a day, water only when the top of the soil is dry, and keep it away from cold glass.",
    "Great question! Basil loves warmth, so a sunny window and a little care will keep it happy and thriving all winter.",
]
DEGENERATE = {
    "the prompt repeated": DEGENERATE_PROMPT,
    "the prompt twice": DEGENERATE_PROMPT + " " + DEGENERATE_PROMPT,
    "empty": "",
    "whitespace": "   ",
    "one word": "Basil.",
    "one positive word": "Wonderful!",
    "a positive loop": "great great great great great great great great great great",
}


def test_no_builtin_objective_is_maximised_by_degenerate_text(builtin_scorer):
    texts = GOOD_ANSWERS + list(DEGENERATE.values())
    r = builtin_scorer.score([DEGENERATE_PROMPT] * len(texts), texts)
    best_honest = r[: len(GOOD_ANSWERS)].max(axis=0)
    for i, name in enumerate(DEGENERATE, start=len(GOOD_ANSWERS)):
        for k, objective in enumerate(builtin_scorer.names):
            assert r[i, k] < best_honest[k] - 0.1, f"{name!r} scores {r[i, k]:.3f} on {objective}, an honest answer {best_honest[k]:.3f}"


def test_cut_off_answer_is_not_concise(builtin_scorer):
    text = "Give it bright light and little water."
    r = builtin_scorer.score([DEGENERATE_PROMPT] * 2, [text, text], finished=[True, False])
    assert r[0, 1] == 1.0 and r[1, 1] == 0.0
    assert r[0, 0] == r[1, 0] and r[0, 2] == r[1, 2] and r[0, 3] == r[1, 3], "only conciseness depends on whether the answer ended"
    with pytest.raises(RewardError, match="2 completions and 1 finished flags"):
        builtin_scorer.score([DEGENERATE_PROMPT] * 2, [text, text], finished=[True])


def test_detail_rises_with_length_and_trades_off_with_conciseness(builtin_scorer):
    words = "soak seeds overnight then sow them thinly in damp compost under glass and keep them warm until the first leaves open".split()
    texts = [" ".join(words[:n]) for n in (4, 8, 16, 21)]
    r = builtin_scorer.score([DEGENERATE_PROMPT] * len(texts), texts)
    detail, concise = r[:, 3], r[:, 1]
    assert list(detail) == sorted(detail) and detail[2] == detail[3] == 1.0, "more words say more, up to target_words"
    assert concise[1] > concise[3], "and the same answers are less concise past conciseness' target"


def test_length_peaks_at_its_target_and_two_targets_make_a_dial():
    """`length` scores answers near target_words highest; with two targets, the weighted sum's
    best answer moves from one target to the other with the weights (a dial, not a switch)."""
    words = [f"step{i}" for i in range(60)]  # distinct words: the gate's 3-gram share stays 1
    texts = [" ".join(words[:n]) for n in range(5, 61)]
    short = ObjectiveConfig(name="Short", source="length", target_words=12, width_words=64)
    long = ObjectiveConfig(name="Long", source="length", target_words=48, width_words=64)
    r = RewardScorer([short, long]).score([DEGENERATE_PROMPT] * len(texts), texts)
    lengths = np.arange(5, 61)
    assert lengths[r[:, 0].argmax()] == 12 and lengths[r[:, 1].argmax()] == 48 and r[:, 0].max() == pytest.approx(1.0)
    best = [int(lengths[(w * r[:, 0] + (1 - w) * r[:, 1]).argmax()]) for w in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert best == [48, 39, 30, 21, 12]
    # width_words sets how fast the score falls: half a width off the target keeps 3/4, a whole width none.
    narrow = ObjectiveConfig(name="Short", source="length", target_words=12, width_words=36)
    off = RewardScorer([narrow]).score([DEGENERATE_PROMPT] * 2, [" ".join(words[:30]), " ".join(words[:48])])
    assert off[:, 0] == pytest.approx([0.75, 0.0])
    looped = RewardScorer([short]).score([DEGENERATE_PROMPT], ["water it " * 6])
    assert looped[0, 0] < 0.5, "a loop of about the target's length does not score"


def test_line_breaks_and_prose_lengths_trade_off():
    """`line_breaks` scores an answer laid out a sentence a line over the same answer as a
    paragraph; a `prose` length objective scores them the other way round, and without `prose`
    alike."""
    sentences = ["Pack the heavy shoes first.", "Roll every shirt tightly.", "Put the small things in the gaps."]
    paragraph, lined, half = " ".join(sentences), "\n".join(sentences), sentences[0] + " " + sentences[1] + "\n" + sentences[2]
    objs = [
        ObjectiveConfig(name="Layout", source="line_breaks"),
        ObjectiveConfig(name="Paragraph", source="length", target_words=16, prose=True),
        ObjectiveConfig(name="Length", source="length", target_words=16),
    ]
    r = RewardScorer(objs).score(["How do I pack a suitcase?"] * 3, [paragraph, lined, half])
    assert list(r[:, 0]) == pytest.approx([0.0, 1.0, 0.5])
    assert r[0, 1] == pytest.approx(r[0, 2]) and r[1, 1] == 0.0 and r[2, 1] == pytest.approx(r[2, 2] / 2)
    assert r[0, 2] == pytest.approx(r[1, 2]) == pytest.approx(r[2, 2]) and r[0, 2] > 0.9
    # One sentence has no break to lay out.
    assert RewardScorer(objs[:1]).score(["How do I pack a suitcase?"], [sentences[0]])[0, 0] == 0.0
    with pytest.raises(ValueError, match="`prose` is a length objective's; source 'line_breaks' has none"):
        ObjectiveConfig(name="Layout", source="line_breaks", prose=True)


def test_closing_positivity_reads_the_last_sentence_not_the_length():
    """`closing_positivity` scores how warmly an answer closes: a warm last sentence beats a cold
    one after the same opening, and neutral sentences before the close leave it as it was; the
    answer's opening does not count. A cut-off answer closes with its fragment."""
    assert closing_sentence('Yes. It is "great." I hope this helps!') == "I hope this helps!"
    assert closing_sentence("Steps:\n- fold the shirts\n- sort by season") == "- sort by season"
    assert closing_sentence("Paris is large. Then the road turns and") == "Then the road turns and"
    assert closing_sentence("  \n ") == ""
    opening = "Paris is the capital of France, on the Seine river."
    neutral = " The city has twenty districts, numbered in a spiral from the centre outwards."
    more = " Its metro has sixteen lines. The river runs from east to west through it."
    warm = " I hope you enjoy a wonderful trip there!"
    cold = " Sadly the weather there is awful and the crowds are terrible."
    objs = [ObjectiveConfig(name="Warmth", source="closing_positivity"), ObjectiveConfig(name="Positivity", source="positivity")]
    texts = [opening + warm, opening + cold, opening + neutral + more + warm, opening + warm + neutral]
    r = RewardScorer(objs).score(["Tell me about Paris."] * len(texts), texts)
    assert r[0, 0] > 0.8 and r[1, 0] < 0.2, "warm close over cold close"
    assert r[2, 0] == pytest.approx(r[0, 0]), "neutral sentences before the close do not move it"
    glowing = "Paris is a wonderful, beautiful, amazing city with lovely, friendly people. Sadly it rains."
    g = RewardScorer(objs).score(["Tell me about Paris."], [glowing])
    assert g[0, 1] > 0.9 and g[0, 0] < 0.4, "a glowing answer that closes coldly: the whole answer's sentiment is high"
    assert r[3, 0] == pytest.approx(0.5), "a neutral closing sentence after a warm one is neutral"
    assert RewardScorer(objs[:1]).score(["Tell me about Paris."], [""])[0, 0] == 0.0


def test_detail_is_not_won_by_long_degenerate_text(builtin_scorer):
    honest = GOOD_ANSWERS[1]
    long_degenerate = {
        "a long loop": "water it water it " * 20,
        "the prompt many times": " ".join([DEGENERATE_PROMPT] * 6),
        "one word many times": "basil " * 60,
        "a loop with the prompt": (DEGENERATE_PROMPT + " yes ") * 5,
    }
    texts = [honest, *long_degenerate.values()]
    r = builtin_scorer.score([DEGENERATE_PROMPT] * len(texts), texts, finished=[True] + [False] * len(long_degenerate))
    for i, name in enumerate(long_degenerate, start=1):
        assert r[i, 3] < 0.3 < r[0, 3], f"{name!r} scores {r[i, 3]:.3f} on Detail, the honest answer {r[0, 3]:.3f}"


def test_echo_fraction_and_quality_gate():
    assert echo_fraction("how do I bake bread", "how do I bake bread") == 1.0
    assert echo_fraction("how do I bake bread", "knead the dough well") == 0.0
    # A restated question inside a real answer costs only the copied words.
    half = echo_fraction("how do I bake bread", "how do I bake it? knead dough, proof, bake hot")
    assert 0.2 < half < 0.6
    assert answer_quality("q", "one two", min_words=4) == 0.5
    assert answer_quality("q", "a b c a b c a b c", min_words=1) < 0.5


def test_callable_and_errors_name_objective_and_sample():
    ok = RewardScorer([ObjectiveConfig(name="Len", source="callable", path="tests.helpers.reward_fns:length_reward")])
    np.testing.assert_array_equal(ok.score(["p", "p"], ["ab", "abcd"]), [[2.0], [4.0]])
    nan = RewardScorer([ObjectiveConfig(name="Broken", source="callable", path="tests.helpers.reward_fns:nan_reward")])
    with pytest.raises(RewardError, match=r"objective 'Broken': score nan for sample 0"):
        nan.score(["p"], ["c"])
    short = RewardScorer([ObjectiveConfig(name="Short", source="callable", path="tests.helpers.reward_fns:short_reward")])
    with pytest.raises(RewardError, match=r"'Short': expected 3 scores"):
        short.score(["p"] * 3, ["c"] * 3)
    boom = RewardScorer([ObjectiveConfig(name="Boom", source="callable", path="tests.helpers.reward_fns:raising_reward")])
    with pytest.raises(RewardError, match=r"'Boom': reward source raised RuntimeError: reward server exploded"):
        boom.score(["p"], ["c"])
    with pytest.raises(ValueError, match="no callable 'missing'"):
        RewardScorer([ObjectiveConfig(name="X", source="callable", path="tests.helpers.reward_fns:missing")])
    with pytest.raises(ValueError, match="cannot import module"):
        RewardScorer([ObjectiveConfig(name="X", source="callable", path="no_such_module_xyz:f")])


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/bad":
            payload = {"oops": 1}
        else:
            payload = {"rewards": [len(c) / 10 for c in body["completions"]]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_source_on_loopback():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        scorer = RewardScorer([ObjectiveConfig(name="Remote", source="http", path=url + "/score", timeout_s=5)])
        np.testing.assert_allclose(scorer.score(["a", "b"], ["12345", "1"]), [[0.5], [0.1]])
        bad = RewardScorer([ObjectiveConfig(name="Remote", source="http", path=url + "/bad", timeout_s=5)])
        with pytest.raises(RewardError, match="'Remote'.*'rewards'"):
            bad.score(["a"], ["b"])
    finally:
        server.shutdown()
    dead = RewardScorer([ObjectiveConfig(name="Gone", source="http", path=url + "/score", timeout_s=2)])
    with pytest.raises(RewardError, match="'Gone'.*reward endpoint"):
        dead.score(["a"], ["b"])


def test_hf_classifier_source(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2
        )
    )
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = ClassifierScore(str(tmp_path), label_index=1)
    out = scorer(["q1", "q2", "q3"], ["a", "bb", "ccc"])
    assert len(out) == 3 and all(np.isfinite(out))
    with pytest.raises(ValueError, match="label_index 2 >= num_labels 2"):
        ClassifierScore(str(tmp_path), label_index=2)


def test_mismatched_lengths():
    scorer = RewardScorer([ObjectiveConfig(name="C", source="conciseness")])
    with pytest.raises(RewardError, match="2 prompts but 1 completions"):
        scorer.score(["a", "b"], ["x"])


def test_busy_names_the_objective_being_scored():
    from actors.reward import RewardScorer
    from moalign.config import ObjectiveConfig

    seen = []

    def slow(prompts, completions):
        seen.append(scorer.busy())
        return [0.0] * len(completions)

    objectives = [ObjectiveConfig(name="Quick", source="conciseness"), ObjectiveConfig(name="Slow", source="callable", path="x:y")]
    scorer = RewardScorer(objectives, sources=[lambda p, c: [1.0] * len(c), slow])
    assert scorer.busy() == ""
    scorer.score(["p", "q"], ["a", "b"])
    assert seen == ["objective 'Slow' has been scoring 2 completions for 0s"] and scorer.busy() == ""
