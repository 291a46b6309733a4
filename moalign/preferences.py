"""Offline preference data for MODPO and MOPO: reading, checking, tokenising, and the per-step batches.

A row holds a prompt (`prompt`: text, or `messages`: a chat ending in a user turn), two responses
(`responses: [a, b]`, or two fields named by `offline.response_fields`) and one label per
objective: the index of the preferred response (0 or 1), 0.5 for a tie, null or absent when
that objective was not judged (`labels: {name: ...}`, or a field per objective named by
`offline.label_fields`, as PKU-SafeRLHF's `better_response_id` / `safer_response_id`). Optional:
`rewards: {name: [r_a, r_b]}`, cached reward values (explicit MODPO margins), and
`finished: [bool, bool]` (default true), false for a response cut off at a token cap, which then
is not taught to end there.

Sources: a JSON Lines file, or a Hugging Face `datasets` folder written by `save_to_disk`. A
malformed row stops everything before training, named by file and line (or row index) and field.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moalign.conditioning import render_prompt_ids
from moalign.data import DataError

log = logging.getLogger(__name__)

TIE = 0.5


@dataclass(frozen=True)
class PreferenceRow:
    """One checked row; `labels[k]` is the preferred response's index (0, 1), 0.5 or None."""

    id: str
    messages: tuple[dict[str, str], ...]
    responses: tuple[str, str]
    labels: tuple[float | None, ...]
    rewards: tuple[tuple[float, float] | None, ...]
    where: str
    finished: tuple[bool, bool] = (True, True)

    @property
    def prompt_text(self) -> str:
        """What reward sources read as the prompt: the last user turn."""
        return self.messages[-1]["content"]


@dataclass
class EncodedRow:
    row: PreferenceRow
    prompt_ids: list[int]
    response_ids: tuple[list[int], list[int]]


@dataclass
class DataReport:
    """Counts a run logs and keeps in its summary: nothing is dropped without being counted."""

    rows: int = 0
    missing_labels: dict[str, int] = field(default_factory=dict)
    ties: dict[str, int] = field(default_factory=dict)
    skipped_too_long: int = 0
    truncated: int = 0

    def lines(self) -> list[str]:
        return [
            f"{self.rows} rows",
            "missing labels: " + ", ".join(f"{k} {v}" for k, v in self.missing_labels.items()),
            "ties: " + ", ".join(f"{k} {v}" for k, v in self.ties.items()),
            f"too long: {self.skipped_too_long} skipped, {self.truncated} truncated",
        ]


def _raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as exc:  # pragma: no cover - datasets is in the pinned set
            raise DataError(f"{path}: reading a datasets folder needs the `datasets` package: {exc}") from exc
        try:
            data = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a datasets folder written by save_to_disk: {exc}") from exc
        if hasattr(data, "keys") and not hasattr(data, "features"):
            raise DataError(f"{path}: a DatasetDict with splits {list(data.keys())}; point offline.path at one split's folder")
        for i, row in enumerate(data):
            yield f"{path}[row {i}]", row
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"preference file {path}: cannot read: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None


def _messages(where: str, row: dict) -> tuple[dict[str, str], ...]:
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field 'messages'[{i}] must be an object with string 'role' and 'content'")
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: field 'messages' must end with a user turn, ends with {messages[-1]['role']!r}")
        return tuple({"role": m["role"], "content": m["content"]} for m in messages)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string (or give 'messages'), got {prompt!r}")
    return ({"role": "user", "content": prompt.strip()},)


def _responses(where: str, row: dict, fields: Sequence[str]) -> tuple[str, str]:
    if len(fields) == 1:
        values = row.get(fields[0])
        if not isinstance(values, list) or len(values) != 2:
            raise DataError(f"{where}: field {fields[0]!r} must be a list of two responses, got {values!r:.80}")
    else:
        values = [row.get(f) for f in fields]
    for f, v in zip(fields if len(fields) == 2 else [f"{fields[0]}[0]", f"{fields[0]}[1]"], values):
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{where}: field {f!r} must be a non-empty string, got {v!r:.80}")
    return values[0], values[1]


def _finished(where: str, row: dict) -> tuple[bool, bool]:
    value = row.get("finished")
    if value is None:
        return (True, True)
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, bool) for v in value):
        raise DataError(f"{where}: field 'finished' must be two booleans (did each response end by itself), got {value!r}")
    return (value[0], value[1])


def _label(where: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in (0.0, 1.0, TIE):
        raise DataError(f"{where}: label of {name!r} must be 0 or 1 (the preferred response), 0.5 (a tie) or null, got {value!r}")
    return float(value)


def _rewards(where: str, row: dict, names: Sequence[str]) -> tuple[tuple[float, float] | None, ...]:
    cached = row.get("rewards")
    if cached is None:
        return (None,) * len(names)
    if not isinstance(cached, dict):
        raise DataError(f"{where}: field 'rewards' must map objective names to [reward_a, reward_b]")
    out: list[tuple[float, float] | None] = []
    for name in names:
        pair = cached.get(name)
        if pair is None:
            out.append(None)
            continue
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair)
        if not ok:
            raise DataError(f"{where}: field 'rewards'[{name!r}] must be two finite numbers, got {pair!r}")
        out.append((float(pair[0]), float(pair[1])))
    return tuple(out)


def load_preferences(
    path: str | Path, names: Sequence[str], response_fields: Sequence[str] = ("responses",), label_fields: dict[str, str] | None = None
) -> tuple[list[PreferenceRow], DataReport]:
    """Every row of `path`, checked; labels and rewards in the order of `names`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"preference data {path}: no such file or folder")
    label_fields = label_fields or {}
    rows: list[PreferenceRow] = []
    report = DataReport(missing_labels=dict.fromkeys(names, 0), ties=dict.fromkeys(names, 0))
    seen: dict[str, str] = {}
    for where, raw in _raw_rows(path):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
        labels_field = raw.get("labels") or {}
        if not isinstance(labels_field, dict):
            raise DataError(f"{where}: field 'labels' must map objective names to labels")
        unknown = sorted(set(labels_field) - set(names))
        if unknown:
            raise DataError(f"{where}: field 'labels' names {unknown}, which are not objectives of this run ({list(names)})")
        labels = tuple(_label(where, n, raw.get(label_fields[n]) if n in label_fields else labels_field.get(n)) for n in names)
        if all(v is None for v in labels):
            raise DataError(f"{where}: no objective is labelled; a row needs at least one label of {list(names)}")
        rid = str(raw.get("id", where))
        if rid in seen:
            raise DataError(f"{where}: duplicate id {rid!r} (first at {seen[rid]})")
        seen[rid] = where
        row = PreferenceRow(
            rid,
            _messages(where, raw),
            _responses(where, raw, response_fields),
            labels,
            _rewards(where, raw, names),
            where,
            _finished(where, raw),
        )
        for n, v in zip(names, labels):
            report.missing_labels[n] += v is None
            report.ties[n] += v == TIE
        rows.append(row)
    if not rows:
        raise DataError(f"preference data {path}: no rows")
    report.rows = len(rows)
    return rows, report


def encode_rows(
    rows: Sequence[PreferenceRow], tokenizer: Any, max_prompt_tokens: int, max_response_tokens: int, too_long: str, report: DataReport
) -> list[EncodedRow]:
    """Token ids as the learner sees them: the chat template with the generation prompt, then each
    response, ending in the end-of-turn token when it finished by itself (a cut-off answer taught
    to stop would teach answers that stop mid-sentence). Rows over the limits are skipped or
    truncated (the prompt keeps its end, a response its start, which then has no end-of-turn)."""
    eos = tokenizer.eos_token_id
    out: list[EncodedRow] = []
    for row in rows:
        prompt = render_prompt_ids(tokenizer, row.messages)
        responses = [
            list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([eos] if done else [])
            for text, done in zip(row.responses, row.finished)
        ]
        over = len(prompt) > max_prompt_tokens or any(len(r) > max_response_tokens for r in responses)
        if over and too_long == "skip":
            report.skipped_too_long += 1
            continue
        if over:
            report.truncated += 1
            prompt = prompt[-max_prompt_tokens:]
            responses = [r[:max_response_tokens] for r in responses]
        out.append(EncodedRow(row, prompt, (responses[0], responses[1])))
    if not out:
        raise DataError(f"every one of {len(rows)} rows is over the length limits and offline.too_long=skip: no data left")
    return out


def normalized_rewards(values: np.ndarray) -> np.ndarray:
    """Rewards [rows, 2, K] as z-scores per objective over every response of the data set, so a
    margin of w_j r_j has the same scale whatever the source's units."""
    flat = values.reshape(-1, values.shape[-1])
    std = flat.std(axis=0)
    return (values - flat.mean(axis=0)) / np.where(std > 0, std, 1.0)


def modpo_pairs(rows: Sequence[EncodedRow], objective: int) -> tuple[list[tuple[int, int]], int]:
    """(row index, preferred response) of every row that objective `objective` judged one way;
    the count of rows left out for a tie or a missing label comes second."""
    pairs, left_out = [], 0
    for i, r in enumerate(rows):
        label = r.row.labels[objective]
        if label in (0.0, 1.0):
            pairs.append((i, int(label)))
        else:
            left_out += 1
    return pairs, left_out


def mopo_labels(row: PreferenceRow) -> list[float]:
    """Per objective, the probability that response 0 is preferred; an objective not judged on
    this row counts as a tie (0.5: no evidence either way, and symmetric under MOPO's swap)."""
    return [TIE if v is None else 1.0 - v for v in row.labels]
