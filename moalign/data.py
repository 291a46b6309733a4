"""Prompt files, the prompts of one fitted to the model's prompt budget, and the resumable cursor
that draws B prompts per step."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moalign.config import RunConfig

log = logging.getLogger(__name__)


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


def load_fitted_prompts(cfg: RunConfig, path: str, tokenizer, report_path: Path | None = None) -> list:
    """The prompt file's records that fit model.max_prompt_tokens with any weight line written in
    (the others skipped or cut, `data.too_long`), counted in the log and at `report_path`."""
    from moalign.checkpoint import write_json
    from moalign.conditioning import fit_prompts

    c = cfg.conditioning
    try:
        prompts, report = fit_prompts(
            load_prompts(path), tokenizer, cfg.objective_names, c.style, c.decimals, cfg.model.max_prompt_tokens, cfg.data.too_long
        )
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from exc
    if report["too_long"]:
        done = "left out" if cfg.data.too_long == "skip" else "cut at the start to fit"
        log.warning(
            "%s: %d of %d prompts are over model.max_prompt_tokens=%d with the weight line written in (longest %d tokens): %s "
            "(data.too_long=%s), e.g. %s",
            path, report["too_long"], report["prompts"], cfg.model.max_prompt_tokens, report["longest_tokens"], done,
            cfg.data.too_long, ", ".join(report["too_long_ids"][:3]),
        )  # fmt: skip
    if not prompts:
        raise DataError(
            f"{path}: every prompt is over model.max_prompt_tokens={cfg.model.max_prompt_tokens}; raise it or use data.too_long=truncate"
        )
    if report_path is not None:
        write_json(report_path, {"path": str(path), **report})
    return prompts
