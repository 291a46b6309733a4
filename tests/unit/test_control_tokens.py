"""Control tokens: the tokens a weight vector is written as, the model folder they are added to,
and the embedding whose rows for them train."""

from pathlib import Path

import pytest
import torch

from moalign.conditioning import condition_messages, control_token_vocabulary, format_control_tokens, render_prompt_ids
from moalign.control_tokens import NEVER, ControlEmbedding, add_control_tokens, check_manifest, interpolate_bins, read_manifest

NAMES = ["Conciseness", "Detail"]


def test_each_weight_vector_is_one_token_per_objective():
    assert format_control_tokens(NAMES, [0.7, 0.3], 1) == "<|w:Conciseness=0.7|><|w:Detail=0.3|>"
    # Rounded as the text line rounds (largest remainder), so the written weights sum to 1.
    assert format_control_tokens(["A", "B", "C"], [1 / 3, 1 / 3, 1 / 3], 1) == "<|w:A=0.4|><|w:B=0.3|><|w:C=0.3|>"
    vocabulary = control_token_vocabulary(NAMES, 1)
    assert len(vocabulary) == 2 * 11 and vocabulary[0] == "<|w:Conciseness=0.0|>" and vocabulary[-1] == "<|w:Detail=1.0|>"
    chat = condition_messages("Why?", NAMES, [0.7, 0.3], "control_tokens", 1)
    assert chat == [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<|w:Conciseness=0.7|><|w:Detail=0.3|>"}]
    # The same tokens as the system message instead: the answer is a turn of its own.
    chat = condition_messages("Why?", NAMES, [0.7, 0.3], "control_tokens_system", 1)
    assert chat == [{"role": "system", "content": "<|w:Conciseness=0.7|><|w:Detail=0.3|>"}, {"role": "user", "content": "Why?"}]


@pytest.fixture(scope="module")
def with_tokens(tiny_model, tmp_path_factory):
    dest = tmp_path_factory.mktemp("control") / "model"
    return dest, add_control_tokens(tiny_model, dest, NAMES, 1)


def test_the_tokens_are_added_after_the_vocabulary(tiny_model, with_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest, control = with_tokens
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert read_manifest(dest) == control and control.first_id == len(base_tokenizer) == control.sampled_vocab
    assert control.ids == list(range(len(base_tokenizer), len(tokenizer))) and control.tokens == control_token_vocabulary(NAMES, 1)
    assert control.logit_bias() == dict.fromkeys(control.ids, NEVER)
    # Each token is one id, whatever text is around it, and the rest of a prompt tokenises as before.
    ids = render_prompt_ids(tokenizer, condition_messages("Why is the sky blue?", NAMES, [0.7, 0.3], "control_tokens", 1))
    # They open the answer: the prompt is the plain one, with the generation prompt, then them.
    plain = render_prompt_ids(base_tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])
    assert ids == plain + [control.first_id + 7, control.first_id + 11 + 3]
    # As the system message they come before the question, each one id, and the prompt ends as
    # the plain one does (the generation prompt opens a fresh answer).
    system = render_prompt_ids(tokenizer, condition_messages("Why is the sky blue?", NAMES, [0.7, 0.3], "control_tokens_system", 1))
    assert [i for i in system if i >= control.first_id] == [control.first_id + 7, control.first_id + 11 + 3]
    question = tokenizer("Why is the sky blue?", add_special_tokens=False)["input_ids"][1:]
    after = system[system.index(control.first_id + 11 + 3) + 1 :]
    assert any(after[i : i + len(question)] == question for i in range(len(after))), "the question follows the tokens"
    assert system[-3:] == plain[-3:]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(dest)
    old, new = base.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + len(control.tokens) and torch.equal(new[: old.shape[0]], old)

    # A token starts as its text line's words, plus (w - 1/2) x (" more" - " less") / 2 to order the bins.
    def text(words):
        return old[base_tokenizer(words, add_special_tokens=False)["input_ids"]].mean(0)

    more = (text(" more") - text(" less")) / 2
    torch.testing.assert_close(new[control.first_id + 7], text(" Conciseness: 0.7") + 0.2 * more)
    torch.testing.assert_close(new[control.first_id + 21] - new[control.first_id + 11], text(" Detail: 1.0") - text(" Detail: 0.0") + more)


def test_a_folder_that_has_them_is_refused_as_a_source_and_checked_as_a_start(with_tokens, tmp_path):
    dest, control = with_tokens
    with pytest.raises(ValueError, match="holds control tokens already"):
        add_control_tokens(dest, tmp_path / "again", NAMES, 1)
    check_manifest(control, NAMES, 1, "here")
    with pytest.raises(ValueError, match=r"objectives \['Conciseness', 'Detail'\] with 1 decimal"):
        check_manifest(control, ["Conciseness", "Positivity"], 1, "here")
    with pytest.raises(ValueError, match="separate bins; this run sets conditioning.token_bins: interpolated"):
        check_manifest(control, NAMES, 1, "here", interpolated=True)
    (tmp_path / "control_tokens.json").write_text("{}")
    with pytest.raises(ValueError, match="not a control-token manifest"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path / "nothing") is None


def test_only_the_control_rows_train_and_the_start_is_kept():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 4)
    base.weight.requires_grad_(False)
    embed = ControlEmbedding(base, first_id=7)
    ids = torch.tensor([[1, 7, 9, 2]])
    torch.testing.assert_close(embed(ids), base(ids))
    optimizer = torch.optim.SGD(embed.parameters(), lr=1.0)
    embed(ids).sum().backward()
    optimizer.step()
    assert [n for n, p in embed.named_parameters() if p.requires_grad] == ["rows"]
    out = embed(ids)
    torch.testing.assert_close(out[0, [0, 3]], base(ids)[0, [0, 3]])
    assert not torch.allclose(out[0, 1], base(ids)[0, 1]) and torch.equal(embed.weight[7:], embed.rows.detach())
    with embed.starting_rows():
        torch.testing.assert_close(embed(ids), base(ids))
    with pytest.raises(ValueError, match="outside an embedding of 10 rows"):
        ControlEmbedding(base, first_id=10)


def test_held_rows_embed_as_they_are_and_get_no_gradient():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 4)
    base.weight.requires_grad_(False)
    embed = ControlEmbedding(base, first_id=6)
    ids = torch.tensor([[1, 6, 7, 8, 9]])
    before = embed(ids).detach()
    embed.hold([1, 2])
    torch.testing.assert_close(embed(ids), before)
    embed(ids).sum().backward()
    assert embed.rows.grad[[1, 2]].abs().sum() == 0 and bool((embed.rows.grad[[0, 3]] != 0).all())
    embed.rows.grad = None
    embed.hold(None)
    embed(ids).sum().backward()
    assert bool((embed.rows.grad != 0).all())


def test_a_row_rate_scales_how_far_adam_moves_a_row():
    """Adam ignores a gradient's scale, so the rate must act through the parametrisation: after
    the same steps, a row at rate 0.1 has moved a tenth as far as it would at rate 1."""
    ids = torch.tensor([[1, 6, 7, 8, 9]])
    moved = {}
    for rates in (None, [1.0, 0.1, 1.0, 0.1]):
        torch.manual_seed(0)
        base = torch.nn.Embedding(10, 4)
        base.weight.requires_grad_(False)
        embed = ControlEmbedding(base, first_id=6, rates=rates)
        torch.testing.assert_close(embed(ids), base(ids))
        target = torch.randn(1, 5, 4)
        optimizer = torch.optim.Adam([embed.rows], lr=0.01)
        for _ in range(5):
            optimizer.zero_grad()
            ((embed(ids) - target) ** 2).sum().backward()
            optimizer.step()
        moved[rates is None] = (embed.trained_rows - base.weight[6:]).detach().norm(dim=-1)
        torch.testing.assert_close(embed.weight[6:], embed.trained_rows)
        torch.testing.assert_close(embed(ids)[0, 1:], embed.trained_rows[[0, 1, 2, 3]])
        with embed.starting_rows():
            torch.testing.assert_close(embed(ids), base(ids))
    full, slowed = moved[True], moved[False]
    torch.testing.assert_close(slowed[[0, 2]], full[[0, 2]])
    assert bool((slowed[[1, 3]] < 0.2 * full[[1, 3]]).all()) and bool((slowed[[1, 3]] > 0.05 * full[[1, 3]]).all())
    assert "_rates" not in embed.state_dict() and "rows" in embed.state_dict()
    with pytest.raises(ValueError, match=r"4 numbers in \(0, 1\]"):
        ControlEmbedding(base, first_id=6, rates=[1.0, 0.0, 1.0, 1.0])


def test_the_control_rows_take_their_own_learning_rate():
    from actors.learner import optimizer_groups

    model = torch.nn.Sequential(ControlEmbedding(torch.nn.Embedding(10, 4), first_id=7), torch.nn.Linear(4, 4))
    model[0].base.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain, rows = optimizer_groups(model, trainable, rows_lr=0.5)
    assert rows == {"params": [model[0].rows], "lr": 0.5}
    assert plain["params"] == [model[1].weight, model[1].bias] and "lr" not in plain
    assert optimizer_groups(torch.nn.Linear(4, 4), trainable[1:], rows_lr=0.5) == [{"params": trainable[1:]}]


def test_only_mo_odpo_takes_control_tokens():
    from moalign.config import ConfigError, load_config

    for style in ("control_tokens", "control_tokens_system"):
        with pytest.raises(ConfigError, match=f"{style} carry weights into MO-ODPO prompts"):
            load_config("configs/mopo_cpu.yaml", [f"conditioning.style={style}"])
    with pytest.raises(ConfigError, match="1001 control tokens per objective"):
        load_config(None, ["conditioning.style=control_tokens", "conditioning.decimals=3"])
    # Holding rows in the DPO steps needs rows: control tokens, trained beside LoRA.
    with pytest.raises(ConfigError, match="control_token_dpo_rows: ends holds control-token rows"):
        load_config(None, ["conditioning.style=chat_system", "learner.control_token_dpo_rows=ends"])
    with pytest.raises(ConfigError, match="control_token_dpo_rows: none holds"):
        load_config(None, ["conditioning.style=control_tokens", "learner.lora.enabled=false", "learner.control_token_dpo_rows=none"])
    load_config(None, ["conditioning.style=control_tokens", "learner.control_token_dpo_rows=ends"])
    with pytest.raises(ConfigError, match="control_token_between_rate: 0.1 slows control-token rows"):
        load_config(None, ["conditioning.style=chat_system", "learner.control_token_between_rate=0.1"])
    load_config(None, ["conditioning.style=control_tokens_system", "learner.control_token_between_rate=0.1"])
    with pytest.raises(ConfigError, match="control_token_dpo_lr_scale: 1.0 sets the rate of control-token rows"):
        load_config(None, ["conditioning.style=chat_system", "learner.control_token_dpo_lr_scale=1"])
    with pytest.raises(ConfigError, match="token_bins: interpolated shapes control tokens; conditioning.style chat_system writes none"):
        load_config(None, ["conditioning.style=chat_system", "conditioning.token_bins=interpolated"])
    with pytest.raises(ConfigError, match="token_start_offset: 0.5 places control tokens; conditioning.style chat_system writes none"):
        load_config(None, ["conditioning.style=chat_system", "conditioning.token_start_offset=0.5"])
    with pytest.raises(ConfigError, match="which conditioning.token_bins: interpolated computes from the ends"):
        load_config(
            None, ["conditioning.style=control_tokens", "conditioning.token_bins=interpolated", "learner.control_token_between_rate=0.5"]
        )


def test_a_tied_model_comes_out_untied_with_the_tokens_suppressed(tiny_model, with_tokens):
    import json

    from transformers import AutoModelForCausalLM, GenerationConfig

    dest, control = with_tokens
    assert json.loads((Path(tiny_model) / "config.json").read_text())["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert not model.config.tie_word_embeddings
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(head[: control.first_id], embed[: control.first_id]), "the model is the same for every other token"
    torch.testing.assert_close(head[control.first_id], head[: control.first_id].mean(0))
    assert set(GenerationConfig.from_pretrained(dest).suppress_tokens) >= set(control.ids)


def test_interpolated_bins_start_on_the_line_between_the_ends(tiny_model, with_tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    _, separate = with_tokens
    control = add_control_tokens(tiny_model, tmp_path / "line", NAMES, 1, interpolated=True)
    assert control.interpolated and control.line_bins == 10 and separate.line_bins is None
    assert read_manifest(tmp_path / "line") == control
    rows = AutoModelForCausalLM.from_pretrained(tmp_path / "line").get_input_embeddings().weight.detach()[control.first_id :]
    ends = AutoModelForCausalLM.from_pretrained(with_tokens[0]).get_input_embeddings().weight.detach()[separate.first_id :]
    # The ends are the separate tokens' starts; bin 3 of Detail is 3/10 of the way between its ends.
    torch.testing.assert_close(rows[[0, 10, 11, 21]], ends[[0, 10, 11, 21]])
    torch.testing.assert_close(rows[14], ends[11] + 0.3 * (ends[21] - ends[11]))
    torch.testing.assert_close(interpolate_bins(rows, 10), rows)

    # A share of the offset: at 0 the ends are the words' embeddings, at 1/4 a quarter of the way
    # from there to where they start at 1; the midpoint stays put. A folder started otherwise is refused.
    def start(offset):
        folder = tmp_path / f"offset-{offset}"
        made = add_control_tokens(tiny_model, folder, NAMES, 1, interpolated=True, start_offset=offset)
        assert made.start_offset == offset and read_manifest(folder) == made
        return made, AutoModelForCausalLM.from_pretrained(folder).get_input_embeddings().weight.detach()[made.first_id :]

    (_, words), (near, quarter) = start(0.0), start(0.25)
    torch.testing.assert_close(quarter[[0, 10]], 0.75 * words[[0, 10]] + 0.25 * rows[[0, 10]])
    torch.testing.assert_close(quarter[0] + quarter[10], rows[0] + rows[10])
    with pytest.raises(ValueError, match="started at 0.25 of the offset; this run sets conditioning.token_start_offset: 1"):
        check_manifest(near, NAMES, 1, "here", interpolated=True)


def test_a_run_starts_its_tokens_at_its_offset_and_a_resume_at_another_is_refused(tiny_model, tmp_path):
    from moalign.config import load_config
    from moalign.models import starting_model

    def cfg(offset):
        overrides = [f"model.path={tiny_model}", "conditioning.style=control_tokens_system", f"conditioning.token_start_offset={offset}"]
        return load_config(None, overrides)

    made = starting_model(cfg(0.25), tmp_path)
    assert read_manifest(made).start_offset == 0.25 and starting_model(cfg(0.25), tmp_path) == made
    with pytest.raises(
        ValueError, match="started at 0.25 of the offset; this run sets conditioning.token_start_offset: 1: use a new run_dir"
    ):
        starting_model(cfg(1), tmp_path)


def test_interpolated_bins_train_only_their_ends_and_follow_them():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 3)
    base.weight.requires_grad_(False)
    with torch.no_grad():
        base.weight[4:] = interpolate_bins(base.weight[4:], 2)  # two objectives, bins 0, 0.5, 1
    embed = ControlEmbedding(base, first_id=4, line_bins=2)
    ids = torch.tensor([[1, 5, 8]])  # a word, then the middle bin of each objective
    torch.testing.assert_close(embed(ids), base(ids))
    embed(ids).sum().backward()
    # The middle bins' gradient lands half on each end; the middle parameter rows get none.
    torch.testing.assert_close(embed.rows.grad, torch.tensor([[0.5] * 3, [0.0] * 3, [0.5] * 3] * 2))
    with torch.no_grad():
        embed.rows[0] += 1.0
    # The whole line of the first objective moved (bin 0 fully, bin 0.5 halfway), the other not.
    moved = embed.weight[4:] - base.weight[4:]
    torch.testing.assert_close(moved[:3, 0], torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(moved[3:], torch.zeros(3, 3))
    with embed.starting_rows():
        torch.testing.assert_close(embed(ids), base(ids))
    with pytest.raises(ValueError, match="6 control tokens are not whole lines of 3 \\+ 1 bins"):
        ControlEmbedding(base, first_id=4, line_bins=3)
