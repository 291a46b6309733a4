"""Export folders: sharded safetensors with an index, publishing by rename, the policy card."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moalign.config import load_config
from moalign.export_folder import CARD_FILE, PolicyCard, publish_folder, write_card, write_safetensors


def test_large_exports_are_sharded_with_an_index_loaders_read(tmp_path):
    named = [(f"layer.{i}.weight", torch.full((64, 64), float(i))) for i in range(5)]  # 16 KiB each
    files = write_safetensors(tmp_path, named, shard_bytes=40 * 1024)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    for name, tensor in named:
        assert torch.equal(load_file(str(tmp_path / index["weight_map"][name]))[name], tensor)
    (tmp_path / "small").mkdir()
    assert write_safetensors(tmp_path / "small", named[:1]) == ["model.safetensors"]


def test_a_failed_export_leaves_the_previous_one(tmp_path):
    dest = tmp_path / "final"
    publish_folder(dest, lambda folder: (folder / "weights").write_text("step 1"))

    def crash(folder):
        (folder / "weights").write_text("half of step 2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_folder(dest, crash)
    assert (dest / "weights").read_text() == "step 1"
    assert [p.name for p in tmp_path.iterdir()] == ["final"], "no partial folder may be left behind"
    publish_folder(dest, lambda folder: (folder / "weights").write_text("step 2"))
    assert (dest / "weights").read_text() == "step 2"


def test_card_round_trip_and_refusals(tmp_path):
    cfg = load_config(None, ["conditioning.decimals=1", "conditioning.style=system_prefix"])
    card = PolicyCard.from_run(cfg, step=7)
    write_card(tmp_path, card)
    assert PolicyCard.read(tmp_path) == card
    assert card.example_line == "[Begin System Instruction] Relevance: 0.4, Conciseness: 0.3, Positivity: 0.3 [End System Instruction]"
    with pytest.raises(FileNotFoundError, match="make export"):
        PolicyCard.read(tmp_path / "missing")
    (tmp_path / CARD_FILE).write_text(json.dumps({**card.model_dump(), "surprise": 1}))
    with pytest.raises(ValueError, match="not a valid policy card"):
        PolicyCard.read(tmp_path)


def test_offline_policy_card_takes_no_weights():
    """A MODPO / MOPO policy never saw a weight line: the card says so, requests get its
    training weights, and a request that names weights is refused rather than ignored."""
    from moalign.conditioning import WeightsError

    modpo = PolicyCard.from_run(load_config(None, ["algorithm.name=modpo", "algorithm.modpo.weights=[0.5, 0.5, 0]"]), step=3)
    assert (modpo.style, modpo.default_weights, modpo.example_line) == ("none", [0.5, 0.5, 0.0], "")
    assert modpo.weights(None).tolist() == [0.5, 0.5, 0.0]
    messages = [{"role": "user", "content": "hi"}]
    assert modpo.condition(messages, modpo.weights(None)) == messages
    with pytest.raises(WeightsError, match="trained by modpo at fixed weights"):
        modpo.weights({"Relevance": 1.0})
    mopo = PolicyCard.from_run(load_config(None, ["algorithm.name=mopo", "algorithm.mopo.primary=2"]), step=3)
    assert mopo.default_weights == [0.0, 0.0, 1.0] and mopo.algorithm == "mopo"


def test_control_token_card_records_the_mechanism():
    cfg = load_config(None, ["conditioning.style=control_tokens", "conditioning.decimals=1"])
    card = PolicyCard.from_run(cfg, step=5)
    assert card.style == "control_tokens" and len(card.control_tokens) == 3 * 11
    assert card.example_line == "<|w:Relevance=0.4|><|w:Conciseness=0.3|><|w:Positivity=0.3|>"
    chat = card.condition([{"role": "user", "content": "hi"}], card.weights({"Conciseness": 1.0}))
    assert chat[-1] == {"role": "assistant", "content": "<|w:Relevance=0.0|><|w:Conciseness=1.0|><|w:Positivity=0.0|>"}
