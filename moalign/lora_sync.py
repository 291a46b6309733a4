"""Weight sync with LoRA: the adapters travel, each generator merges them into its base weights.

The learner sends, per adapted linear layer, its factors A and B and the scaling (a few % of the
model's bytes); a generator turns that stream back into the merged Hugging Face tensors it would
have received as full weights, with the same arithmetic as the learner's own merge
(`add_lora`), so both paths give bit-identical weights when both merge on the CPU (a learner on
a GPU merges there: the same up to float rounding). Layers the adapter form does not cover
travel merged, in the same stream.

Tensor names: `<module>.lora.<i>.A`, `<module>.lora.<i>.B` and `<module>.lora.<i>.scale` (a 0-d
float64) for the i-th active adapter of `<module>`, whose base weight is `<module>.weight`;
`<weight>.rows.<first>` for trained rows first, first + 1, ... of a checkpoint tensor (control
tokens' embeddings), the other rows staying the base's; every other name is an ordinary
checkpoint tensor. Pure torch: no Ray, no vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]

_ADAPTER_NAME = re.compile(r"^(?P<module>.+)\.lora\.(?P<index>\d+)\.(?P<part>A|B|scale)$")
_ROWS_NAME = re.compile(r"^(?P<weight>.+)\.rows\.(?P<first>\d+)$")


def add_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight += scale * B @ A, in place on a float32 `weight`, in one fused product (a third of
    the time of a separate product, scaling and sum on SmolLM2's layers): the one formula both
    ends use, so their merges agree bit for bit."""
    return weight.addmm_(b.float(), a.float(), alpha=scale)


def adapter_tensors(module: str, index: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> list[tuple[str, torch.Tensor]]:
    """The payload entries for one adapter of one linear layer."""
    return [
        (f"{module}.lora.{index}.A", a),
        (f"{module}.lora.{index}.B", b),
        (f"{module}.lora.{index}.scale", torch.tensor(float(scale), dtype=torch.float64)),
    ]


def parse_adapter_name(name: str) -> tuple[str, int, str] | None:
    """(module, adapter index, part) for an adapter tensor's name; None for a checkpoint name."""
    m = _ADAPTER_NAME.match(name)
    return (m["module"], int(m["index"]), m["part"]) if m else None


def adapter_shape_error(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...] | None) -> str | None:
    """Why an adapter tensor cannot apply to its base weight (`base_shape`, None: no such weight)."""
    module, _, part = parse_adapter_name(name)
    if base_shape is None:
        return f"adapter tensor {name!r} targets {module}.weight, which the model does not have"
    if len(base_shape) != 2:
        return f"adapter tensor {name!r}: {module}.weight has shape {base_shape}; adapters apply to 2-D linear weights only"
    out_features, in_features = base_shape
    if part == "scale":
        return None if shape == () else f"adapter tensor {name!r} must be a scalar, got shape {shape}"
    if len(shape) != 2 or (part == "A" and shape[1] != in_features) or (part == "B" and shape[0] != out_features):
        want = f"(r, {in_features})" if part == "A" else f"({out_features}, r)"
        return f"adapter tensor {name!r} has shape {shape}; {module}.weight {base_shape} needs {want}"
    return None


def rows_name(weight: str, first: int) -> str:
    """The payload name of rows first, first + 1, ... of the checkpoint tensor `weight`."""
    return f"{weight}.rows.{first}"


def parse_rows_name(name: str) -> tuple[str, int] | None:
    """(checkpoint tensor, first row) for a rows entry's name; None otherwise."""
    m = _ROWS_NAME.match(name)
    return (m["weight"], int(m["first"])) if m else None


def rows_shape_error(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...] | None) -> str | None:
    """Why a rows entry cannot apply to its checkpoint tensor (`base_shape`, None: no such tensor)."""
    weight, first = parse_rows_name(name)
    if base_shape is None:
        return f"rows {name!r} target {weight}, which the model does not have"
    if len(shape) != len(base_shape) or tuple(shape[1:]) != tuple(base_shape[1:]) or first + shape[0] > base_shape[0]:
        return f"rows {name!r} have shape {shape}; {weight} {base_shape} takes rows {first}.. of shape (n, {', '.join(map(str, base_shape[1:]))})"
    return None


def _parent(name: str) -> str:
    # "model.layers.0.self_attn.q_proj.weight" -> "model.layers.0.self_attn"
    return name.rsplit(".", 2)[0]


class AdapterMerger:
    """Turns a payload stream into the merged checkpoint tensors a full sync would carry.

    `read_base(name)` returns a base checkpoint tensor; `base_names` are all of them. A merged
    layer comes out as soon as the next layer's tensors start. Whenever the stream moves on from
    a parent module (an attention or MLP block), the parent's tensors that did not travel come out
    from the base, so that every layer a reload touches is complete: vLLM fuses q/k/v and
    gate/up, and rebuilds a fused layer that receives only some parts from uninitialised memory.
    Layers that receive nothing keep their weights (the frozen embeddings and norms, with LoRA).
    """

    def __init__(self, read_base: Callable[[str], torch.Tensor], base_names: Iterable[str], dtype: torch.dtype):
        self.read_base = read_base
        self.dtype = dtype
        self._by_parent: dict[str, list[str]] = {}
        for name in base_names:
            self._by_parent.setdefault(_parent(name), []).append(name)
        self.merged_layers = 0

    def __call__(self, named: NamedTensors) -> Iterator[tuple[str, torch.Tensor]]:
        sent: set[str] = set()
        parent: str | None = None
        module: str | None = None
        factors: dict[int, dict[str, torch.Tensor]] = {}

        def merged() -> tuple[str, torch.Tensor]:
            weight_name = f"{module}.weight"
            out = self.read_base(weight_name).to(self.dtype).to(torch.float32, copy=True)
            for index in sorted(factors):
                missing = {"A", "B", "scale"} - set(factors[index])
                if missing:
                    raise ValueError(f"adapter {index} of {module}: {', '.join(sorted(missing))} never arrived")
                parts = factors[index]
                add_lora(out, parts["A"], parts["B"], parts["scale"].item())
            sent.add(weight_name)
            self.merged_layers += 1
            return weight_name, out.to(self.dtype).contiguous()

        def rest_of(done_parent: str) -> Iterator[tuple[str, torch.Tensor]]:
            for name in self._by_parent.get(done_parent, ()):
                if name not in sent:
                    sent.add(name)
                    yield name, self.read_base(name).to(self.dtype)

        for name, tensor in named:
            rows = parse_rows_name(name)
            if rows is not None:
                # Trained rows (control tokens) into the base tensor: a whole checkpoint tensor.
                weight, first = rows
                full = self.read_base(weight).to(self.dtype).clone()
                full[first : first + tensor.shape[0]] = tensor.to(self.dtype)
                name, tensor = weight, full
            parsed = parse_adapter_name(name)
            if module is not None and (parsed is None or parsed[0] != module):
                yield merged()
                module, factors = None, {}
            target = f"{parsed[0]}.weight" if parsed else name
            if parent is not None and _parent(target) != parent:
                yield from rest_of(parent)
            parent = _parent(target)
            if module is None and target in sent:
                raise ValueError(f"weight {target!r} sent twice")
            if parsed is None:
                sent.add(name)
                yield name, tensor
                continue
            module, index, part = parsed
            if part in factors.setdefault(index, {}):
                raise ValueError(f"adapter tensor {name!r} sent twice")
            factors[index][part] = tensor
        if module is not None:
            yield merged()
        if parent is not None:
            yield from rest_of(parent)
