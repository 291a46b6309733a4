"""Render docs/configuration.md from the config models' field docstrings.

`python -m moalign.config_docs` rewrites the file; a unit test fails when it is stale.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from moalign.config import RunConfig, ServeConfig

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _type_name(annotation: object) -> str:
    return _plain_type(annotation).replace("|", "\\|")


def _plain_type(annotation: object) -> str:
    """The type as written, with an `Annotated` value type (`dict[str, Annotated[float, Field(...)]]`)
    read as its base type; its bounds go to the bounds column (`_item_bounds`)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _plain_type(args[0])
    if origin in (dict, list) and any(typing.get_origin(a) is typing.Annotated for a in args):
        return f"{origin.__name__}[{', '.join(_plain_type(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _item_bounds(annotation: object) -> list[str]:
    """The bounds of a container's `Annotated` item type, e.g. `each value ≥ 0, ≤ 100`."""
    items = typing.get_args(annotation)[-1:] if typing.get_origin(annotation) in (dict, list) else ()
    return [
        f"each {'value' if typing.get_origin(annotation) is dict else 'item'} " + ", ".join(_bound(m) for m in info.metadata)
        for item in items
        if typing.get_origin(item) is typing.Annotated
        for info in typing.get_args(item)[1:]
    ]


_BOUND_SYMBOLS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "pattern": "matches"}


def _bound(meta: object) -> str:
    parts = [f"{sym} `{getattr(meta, attr)}`" for attr, sym in _BOUND_SYMBOLS.items() if getattr(meta, attr, None) is not None]
    return ", ".join(parts) or str(meta)


def _section_type(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _rows(model: type[BaseModel], prefix: str, out: list[str], sections: list[tuple[str, type[BaseModel]]]) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is None:
            sections.append((key, sub))
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if field.is_required():
            default = "required"
        elif isinstance(default, BaseModel) or (isinstance(default, list) and default and isinstance(default[0], BaseModel)):
            default = "see below" if sub is None else f"{len(default)} entries (see `{sub.__name__}`)"
        else:
            default = f"`{default!r}`"
        bounds = ", ".join([*(_bound(m) for m in field.metadata), *_item_bounds(field.annotation)])
        out.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {bounds} | {field.description or ''} |")
        if sub is not None:
            sections.append((f"{key}[]", sub))


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the docstrings of `moalign/config.py` by `python -m moalign.config_docs`; do not edit by hand.",
        "Set values in a YAML preset (`configs/`) or on the command line as `key=value` (e.g. `rollout.prompts_per_step=16`). A preset may start from another with `base: other.yaml` (relative to it) and name only what it changes: its sections merge key by key over the base's, a list replaces the base's whole.",
        "",
    ]
    queue: list[tuple[str, type[BaseModel]]] = [("", RunConfig)]
    seen: set[str] = set()
    while queue:
        prefix, model = queue.pop(0)
        if prefix in seen:
            continue
        seen.add(prefix)
        title = prefix or "top level"
        lines += [f"## {title}", "", "| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
        rows: list[str] = []
        children: list[tuple[str, type[BaseModel]]] = []
        _rows(model, f"{prefix}." if prefix else "", rows, children)
        lines += rows + [""]
        queue += children
    lines += [
        "# Serving (`make serve`, `configs/serve/local.yaml`, `deploy/serve.yaml`)",
        "",
        "| key | type | default | bounds | meaning |",
        "|---|---|---|---|---|",
    ]
    rows = []
    _rows(ServeConfig, "", rows, [])
    return "\n".join(lines + rows + [""])


def main() -> None:
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(render())
    sys.stderr.write(f"wrote {DOC_PATH}\n")


if __name__ == "__main__":
    main()
