"""Reading a weight line back: how tests check what `moalign.conditioning` writes into a prompt."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from moalign.conditioning import BEGIN, END, WeightsError, check_weights

_PREFIX_RE = re.compile(re.escape(BEGIN) + r"(.*?)" + re.escape(END), re.DOTALL)


def parse_weights(text: str, names: Sequence[str], decimals: int | None = None) -> np.ndarray:
    """Read the weights back from a prompt or system message; names must match in order."""
    match = _PREFIX_RE.search(text)
    if match is None:
        raise WeightsError(f"no weight instruction found (expected {BEGIN} … {END}) in {text[:80]!r}")
    items = [p.strip() for p in match.group(1).split(",") if p.strip()]
    found: list[tuple[str, float]] = []
    for item in items:
        name, sep, value = item.rpartition(":")
        try:
            found.append((name.strip(), float(value)))
        except ValueError:
            raise WeightsError(f"weight entry {item!r} is not `Name: number`") from None
        if not sep:
            raise WeightsError(f"weight entry {item!r} is not `Name: number`")
    got_names = [n for n, _ in found]
    if got_names != list(names):
        raise WeightsError(f"objectives in prompt {got_names} differ from configured {list(names)}")
    tol = 1e-6 if decimals is None else 0.5 * 10.0 ** (-decimals) * len(names)
    return check_weights([v for _, v in found], len(names), atol=tol)
