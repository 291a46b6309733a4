"""Sentence-end prefixes of a step's samples, as more candidate answers for its pairs.

Each of a sample's sentences could have been its last: `sentence_ends` finds where (a token that
ends in `.`, `!` or `?` with whitespace after it, and with `lines` also the end of a line of words
that ends without one, such as a list item), and `with_sentence_prefixes` gives each prompt
`count` such prefixes of its own samples, closed with the end-of-sequence token, after its
samples. They are scored like samples and can be picked as chosen, rejected or a warm-start label.

Why: a policy's samples mostly run to the token cap, so an objective that wants the answer to
end early ties on most of them and its corner's best answer is only the sample that happened to
end. A prefix is the policy's own text up to a sentence end; only the decision to stop there is
not its own. Training on it moves little besides the stopping decision (the policy already wrote
every other token), so a line can learn to stop early without drifting from what it writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from moalign.actor_io import Sample

T = TypeVar("T")

_ENDS = (".", "!", "?")
_CLOSERS = "\"')]*"
_LINE_WORDS = 3
# The same sentence end in plain text: an end mark, any closers, then whitespace; or a line break.
_TEXT_BREAK = re.compile(rf"(?<=[{re.escape(''.join(_ENDS))}])[{re.escape(_CLOSERS)}]*\s+|\n+")


def sentence_ends(pieces: Sequence[str], lines: bool = False) -> list[int]:
    """Indices i of the token pieces (each token decoded alone) after which a sentence ends:
    piece i ends in `.`, `!` or `?` (closing quotes, brackets or `*` allowed after it) and piece
    i + 1 starts with whitespace. A number's point (`1.` opening a list item, `3.5`) is no end;
    the last piece is not either (the prefix would be the whole sample).

    With `lines`, also where piece i + 1 starts a new line after a line of at least three words
    that ends otherwise (a list item, a title), but not after a `:`, which announces what follows.
    Why: small models often write lists or headings with no sentence end for their first 64
    tokens, and such an answer then has no place its line could learn to stop."""
    ends = []
    line_start = 0
    for i in range(len(pieces) - 1):
        if "\n" in pieces[i]:
            line_start = i + 1
        piece = pieces[i].rstrip(_CLOSERS)
        if piece.endswith(_ENDS) and pieces[i + 1][:1].isspace():
            before = piece[:-1].strip()
            if not (before.isdigit() or (not before and i > 0 and pieces[i - 1].strip().isdigit())):
                ends.append(i)
                continue
        if lines and pieces[i + 1].startswith("\n") and pieces[i].strip() and not piece.rstrip().endswith(":"):
            line = "".join(pieces[line_start : i + 1])
            if sum(any(c.isalpha() for c in w) for w in line.split()) >= _LINE_WORDS:
                ends.append(i)
    return ends


def with_sentence_prefixes(
    samples: list[list[Sample]], tokenizer: Any, count: int, eos_id: int, seeds: Sequence[int], lines: bool = False
) -> list[list[Sample]]:
    """Each prompt's samples followed by `count` of their sentence-end prefixes (with `lines`, line
    ends too: `sentence_ends`), drawn at random (`seeds`, one per prompt, so a resumed step draws
    the same), each closed with `eos_id` and marked finished. A prompt with fewer prefixes than
    `count` is topped up with copies of its samples, which add no pair of their own (a copy ties
    with its original, which ranks first)."""
    if len(seeds) != len(samples):
        raise ValueError(f"{len(seeds)} seeds for {len(samples)} prompts")
    out = []
    for group, seed in zip(samples, seeds):
        found = []
        for k, s in enumerate(group):
            ids, pieces, _ = _body(s, tokenizer, eos_id)
            # sentence_ends leaves out the last piece, so every prefix's sample went on past it.
            found += [(k, s, ids[: i + 1]) for i in sentence_ends(pieces, lines)]

        def prefix(found_one: tuple[int, Sample, list[int]]) -> Sample:
            k, s, ids = found_one
            text = tokenizer.decode(ids, skip_special_tokens=True)
            return {"token_ids": [*ids, eos_id], "text": text, "finish_reason": "stop", "version": s["version"], "prefix_of": k}

        out.append([*group, *_drawn(found, count, np.random.default_rng(seed), prefix, group)])
    return out


def _body(sample: Sample, tokenizer: Any, eos_id: int) -> tuple[list[int], list[str], bool]:
    """A sample's token ids without a closing `eos_id`, each token decoded alone, and whether it had one."""
    ids = list(sample["token_ids"])
    ended = bool(ids) and ids[-1] == eos_id
    body = ids[:-1] if ended else ids
    return body, [tokenizer.decode([t]) for t in body], ended


def _drawn(
    found: Sequence[T], count: int, rng: np.random.Generator, make: Callable[[T], Sample], samples: Sequence[Sample]
) -> list[Sample]:
    """`count` of `found` drawn without repeats, in their order, each made a candidate by `make`;
    fewer than `count` are topped up with copies of `samples`, which add no pair of their own (a
    copy ties with its original, which ranks first)."""
    picked = rng.choice(len(found), size=min(count, len(found)), replace=False) if found else []
    drawn = [make(found[j]) for j in sorted(int(j) for j in picked)]
    return drawn + [dict(samples[j % len(samples)]) for j in range(count - len(drawn))]


def closing_sentence(text: str) -> str:
    """The text's last sentence: what follows its last sentence end (as `sentence_ends` finds
    them, in plain text) or line break. A text cut off mid-sentence closes with the fragment it
    has; a text with no words closes with nothing."""
    pieces = [p for p in _TEXT_BREAK.split(text.strip()) if any(c.isalpha() for c in p)]
    return pieces[-1] if pieces else ""


_NUMBER_POINT = re.compile(r"(?:^|\s)\d+[.)]$")


def line_break_share(text: str) -> float:
    """The share of the text's breaks between sentences (as `closing_sentence` splits it: a
    sentence end, or a line break) that start a new line; 0 for a text with no break. A list
    item's number (`1. Pack`) is no break."""
    text = text.strip()
    breaks = [m.group() for m in _TEXT_BREAK.finditer(text) if not _NUMBER_POINT.search(text[: m.start()])]
    return sum("\n" in b for b in breaks) / len(breaks) if breaks else 0.0


def newline_token(tokenizer: Any) -> int:
    """The tokenizer's one token for a line break; a ValueError where it takes several."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"a line break encodes as {len(ids)} tokens ({ids}), not one; line-break decisions need one")
    return int(ids[0])


def with_line_break_variants(
    candidates: list[list[Sample]], samples_per_prompt: int, tokenizer: Any, count: int, eos_id: int, newline_id: int, seeds: Sequence[int]
) -> list[list[Sample]]:
    """Each prompt's candidates followed by `count` variants of its samples (the first
    `samples_per_prompt`), each the sample with one sentence end's break flipped: a new line
    (`newline_id`, `newline_token`) where it went on in the same line, the same line where it
    started a new one. Drawn at random (`seeds`), marked with the sample they flip (`break_of`),
    and topped up with copies of the samples as `with_sentence_prefixes` is.

    The variant is the policy's own text with one break changed, so against its sample it trains
    one decision, the line-break token after that sentence end, as a prefix trains the decision
    to stop (`moalign.pairs.cut_to_decision_token`)."""
    if len(seeds) != len(candidates):
        raise ValueError(f"{len(seeds)} seeds for {len(candidates)} prompts")
    out = []
    for group, seed in zip(candidates, seeds):
        samples = group[:samples_per_prompt]
        found: list[Sample] = []
        for k, s in enumerate(samples):
            body, pieces, ended = _body(s, tokenizer, eos_id)
            for i in sentence_ends(pieces):
                rest = tokenizer.decode(body[i + 1 :], skip_special_tokens=True)
                flipped = (" " if body[i + 1] == newline_id else "\n") + rest.lstrip()
                variant = [*body[: i + 1], *tokenizer.encode(flipped, add_special_tokens=False), *([eos_id] if ended else [])]
                # Where the tokenizer merges the break into the next word differently, the two
                # would not part at a line-break token; such a place is left out.
                if len(variant) > i + 1 and (variant[i + 1] == newline_id) != (body[i + 1] == newline_id):
                    text = tokenizer.decode(variant, skip_special_tokens=True)
                    found.append(
                        {"token_ids": variant, "text": text, "finish_reason": s["finish_reason"], "version": s["version"], "break_of": k}
                    )
        out.append([*group, *_drawn(found, count, np.random.default_rng([seed, 1]), lambda v: v, samples)])
    return out
