"""Prompt files and the resumable cursor that draws B prompts per step."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """A prompt file that cannot be used; names the file and line."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    category: str | None = None


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """JSON Lines with a non-empty `prompt` string (optional `id`, `category`); ids must be unique."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"prompt file {path}: cannot read: {exc}") from exc
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}:{lineno}: field 'prompt' must be a non-empty string, got {prompt!r}")
        rid = str(row.get("id", f"{path.stem}-{lineno}"))
        if rid in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = lineno
        records.append(PromptRecord(rid, prompt.strip(), row.get("category")))
    if not records:
        raise DataError(f"prompt file {path}: no prompts")
    return records


class PromptCursor:
    """Draws prompts in a seeded order, epoch after epoch; its state is two integers and a seed.

    The permutation of an epoch is a function of (seed, epoch), so the cursor resumes exactly
    without storing the order.
    """

    def __init__(self, n_prompts: int, seed: int, shuffle: bool = True):
        if n_prompts < 1:
            raise DataError("prompt cursor over an empty prompt set")
        self.n = n_prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self, batch: int) -> list[int]:
        out: list[int] = []
        while len(out) < batch:
            order = self._order(self.epoch)
            take = min(batch - len(out), self.n - self.position)
            out += order[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.n:
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise DataError(f"saved cursor was over {state['n']} prompts, the prompt file now has {self.n}")
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.epoch, self.position = state["epoch"], state["position"]
