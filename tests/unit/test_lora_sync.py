"""The LoRA sync payload: names, the generator-side merge, and its agreement with peft."""

import pytest
import torch

from moalign.lora_sync import AdapterMerger, adapter_shape_error, adapter_tensors, add_lora, parse_adapter_name

ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"


def base_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        f"{ATTN}.q_proj.weight": (8, 8),
        f"{ATTN}.k_proj.weight": (4, 8),
        f"{ATTN}.v_proj.weight": (4, 8),
        f"{ATTN}.o_proj.weight": (8, 8),
        f"{MLP}.gate_proj.weight": (16, 8),
        f"{MLP}.up_proj.weight": (16, 8),
        f"{MLP}.down_proj.weight": (8, 16),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.embed_tokens.weight": (32, 8),
    }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def factors(module: str, base: dict, rank: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = base[f"{module}.weight"].shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g)


def merger(base: dict, reads: list | None = None) -> AdapterMerger:
    def read(name):
        if reads is not None:
            reads.append(name)
        return base[name].clone()

    return AdapterMerger(read, base, torch.float32)


def test_names_round_trip():
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    entries = adapter_tensors(f"{ATTN}.q_proj", 0, a, b, 2.0)
    assert [parse_adapter_name(n) for n, _ in entries] == [(f"{ATTN}.q_proj", 0, p) for p in ("A", "B", "scale")]
    assert entries[2][1].dim() == 0 and entries[2][1].item() == 2.0
    assert parse_adapter_name(f"{ATTN}.q_proj.weight") is None
    assert parse_adapter_name("model.lora.x.A") is None


def test_merge_is_bitwise_the_learner_formula_and_completes_fused_blocks():
    base = base_weights()
    a_q, b_q = factors(f"{ATTN}.q_proj", base, seed=1)
    a_v, b_v = factors(f"{ATTN}.v_proj", base, seed=2)
    a_g, b_g = factors(f"{MLP}.gate_proj", base, seed=3)
    payload = (
        adapter_tensors(f"{ATTN}.q_proj", 0, a_q, b_q, 2.0)
        + adapter_tensors(f"{ATTN}.v_proj", 0, a_v, b_v, 2.0)
        + adapter_tensors(f"{MLP}.gate_proj", 0, a_g, b_g, 2.0)
    )
    reads: list[str] = []
    out = list(merger(base, reads)(iter(payload)))
    names = [n for n, _ in out]
    got = dict(out)

    # The learner merges with add_lora on a float32 copy of the base: the same bits here.
    assert torch.equal(got[f"{ATTN}.q_proj.weight"], add_lora(base[f"{ATTN}.q_proj.weight"].clone(), a_q, b_q, 2.0))
    assert torch.equal(got[f"{MLP}.gate_proj.weight"], add_lora(base[f"{MLP}.gate_proj.weight"].clone(), a_g, b_g, 2.0))
    # Siblings of an adapted layer travel from the base, and a block is complete before the next one starts.
    assert torch.equal(got[f"{ATTN}.k_proj.weight"], base[f"{ATTN}.k_proj.weight"])
    assert set(names) == {n for n in base if n.startswith((ATTN, MLP))}
    assert max(names.index(n) for n in names if n.startswith(ATTN)) < min(names.index(n) for n in names if n.startswith(MLP))
    # Frozen layers outside the adapted blocks are neither read nor sent.
    assert "model.embed_tokens.weight" not in reads and "model.layers.0.input_layernorm.weight" not in names


def test_two_adapters_and_plain_tensors_in_one_stream():
    base = base_weights()
    a0, b0 = factors(f"{ATTN}.o_proj", base, seed=4)
    a1, b1 = factors(f"{ATTN}.o_proj", base, seed=5)
    norm = torch.ones(8)
    payload = (
        adapter_tensors(f"{ATTN}.o_proj", 0, a0, b0, 0.5)
        + adapter_tensors(f"{ATTN}.o_proj", 1, a1, b1, 3.0)
        + [("model.layers.0.input_layernorm.weight", norm)]
    )
    got = dict(merger(base)(iter(payload)))
    want = add_lora(add_lora(base[f"{ATTN}.o_proj.weight"].clone(), a0, b0, 0.5), a1, b1, 3.0)
    assert torch.equal(got[f"{ATTN}.o_proj.weight"], want)
    assert got["model.layers.0.input_layernorm.weight"] is norm


def test_delta_agrees_with_peft():
    from peft import LoraConfig, get_peft_model

    layer = torch.nn.Sequential()
    layer.add_module("proj", torch.nn.Linear(8, 6, bias=False))
    model = get_peft_model(layer, LoraConfig(r=2, lora_alpha=8, target_modules=["proj"]))
    lora = model.base_model.model.proj
    torch.nn.init.normal_(lora.lora_B["default"].weight)
    want = lora.get_delta_weight("default")
    got = add_lora(torch.zeros(6, 8), lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"])
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    "payload, match",
    [
        (lambda a, b: adapter_tensors(f"{ATTN}.q_proj", 0, a, b, 1.0)[:2], "scale never arrived"),
        (lambda a, b: adapter_tensors(f"{ATTN}.q_proj", 0, a, b, 1.0) + [(f"{ATTN}.q_proj.lora.0.A", a)], "sent twice"),
        (lambda a, b: [(f"{ATTN}.q_proj.weight", torch.zeros(8, 8))] + adapter_tensors(f"{ATTN}.q_proj", 0, a, b, 1.0), "sent twice"),
    ],
)
def test_bad_streams_are_refused(payload, match):
    base = base_weights()
    a, b = factors(f"{ATTN}.q_proj", base)
    with pytest.raises(ValueError, match=match):
        list(merger(base)(iter(payload(a, b))))


def test_shape_errors_name_the_tensor_and_the_fix():
    name = f"{ATTN}.q_proj.lora.0.A"
    assert adapter_shape_error(name, (2, 8), (8, 8)) is None
    assert "needs (r, 8)" in adapter_shape_error(name, (2, 7), (8, 8))
    assert "needs (8, r)" in adapter_shape_error(f"{ATTN}.q_proj.lora.0.B", (7, 2), (8, 8))
    assert "does not have" in adapter_shape_error(name, (2, 8), None)
    assert "scalar" in adapter_shape_error(f"{ATTN}.q_proj.lora.0.scale", (1,), (8, 8))


def test_the_payload_follows_the_learner():
    from actors.weight_sync import BroadcastSync, ObjectStoreSync, make_weight_sync
    from moalign.config import load_config

    lora = make_weight_sync(load_config(None, []), None, None)
    assert isinstance(lora, ObjectStoreSync) and lora.payload == "adapter"
    assert make_weight_sync(load_config(None, ["sync.payload=full"]), None, None).payload == "full"
    full = make_weight_sync(load_config(None, ["learner.lora.enabled=false", "sync.backend=broadcast"]), None, None)
    assert isinstance(full, BroadcastSync) and full.payload == "full"


def test_trained_rows_merge_into_their_base_tensor():
    from moalign.lora_sync import parse_rows_name, rows_name, rows_shape_error

    base = base_weights()
    name = rows_name("model.embed_tokens.weight", 30)
    assert name == "model.embed_tokens.weight.rows.30" and parse_rows_name(name) == ("model.embed_tokens.weight", 30)
    assert parse_rows_name("model.embed_tokens.weight") is None
    rows = torch.full((2, 8), 7.0)
    out = dict(merger(base)(iter([(name, rows)])))
    expected = base["model.embed_tokens.weight"].clone()
    expected[30:] = 7.0
    assert torch.equal(out["model.embed_tokens.weight"], expected)
    assert rows_shape_error(name, (2, 8), (32, 8)) is None
    assert "takes rows 30.." in rows_shape_error(name, (3, 8), (32, 8))
    assert "takes rows 30.." in rows_shape_error(name, (2, 7), (32, 8))
    assert "does not have" in rows_shape_error(name, (2, 8), None)
