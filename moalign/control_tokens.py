"""Control tokens: one added token per objective and weight bin, whose embedding is trained.

With `conditioning.style: control_tokens` the weights reach the policy as K added tokens (one per
objective, e.g. `<|w:Conciseness=0.7|>`) instead of a numeric text line. A run starts from its
base model with those tokens added (`add_control_tokens`, written to RUN_DIR/base_model): the
tokenizer knows them as special tokens, the embedding matrix has one row more per token, and
`control_tokens.json` beside the weights lists them. Every part reads that file:

- the learner trains the new input rows with the adapter (`ControlEmbedding`) and scores
  completions over the original vocabulary only (`sampled_vocab`); with interpolated bins only
  each objective's two end rows train, and the bins between embed on the line joining them;
- generators and the serving engine never sample a control token (a -100 logit bias);
- a sync carries the trained rows, an export writes them into the merged folder and, in PEFT's
  trainable-tokens form, into the adapter.

The tokens are input only. A model with tied embeddings is untied when they are added: the head
keeps the original rows and the tokens' output rows are the mean of the others, so training
their input rows never changes what the policy writes (the generation config suppresses them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moalign.conditioning import control_token_vocabulary

MANIFEST = "control_tokens.json"
# A logit bias this low never lets a token be sampled: vLLM clips biases to [-100, 100].
NEVER = -100.0


@dataclass(frozen=True)
class ControlTokens:
    """What `control_tokens.json` says about a model folder's added tokens."""

    objectives: list[str]
    decimals: int
    tokens: list[str]
    """In id order: objective by objective, weight bins ascending."""
    first_id: int
    """Id of the first control token; the ids are first_id .. first_id + len(tokens) - 1."""
    sampled_vocab: int
    """Tokens a policy may write: every id below first_id."""
    source_model: str
    """The folder the tokens were added to."""
    interpolated: bool = False
    """Each objective's bins embed as points on the line between its weight-0 and weight-1 rows
    (`conditioning.token_bins: interpolated`): only those two rows train."""
    start_offset: float = 1.0
    """The share of the (w - 1/2) x (" more" - " less") / 2 offset the rows started with
    (`conditioning.token_start_offset`)."""

    @property
    def line_bins(self) -> int | None:
        """Bins per objective's line above weight 0 when the rows are interpolated, else None."""
        return 10**self.decimals if self.interpolated else None

    @property
    def end_rows(self) -> list[int]:
        """Rows (counted from first_id) of each objective's weight-0 and weight-1 bins: the tokens
        of the corners of the weight simplex."""
        bins = len(self.tokens) // len(self.objectives)
        return [k * bins + end for k in range(len(self.objectives)) for end in (0, bins - 1)]

    @property
    def ids(self) -> list[int]:
        return list(range(self.first_id, self.first_id + len(self.tokens)))

    def logit_bias(self) -> dict[int, float]:
        """Sampling settings' bias that keeps every control token out of a completion."""
        return dict.fromkeys(self.ids, NEVER)


def read_manifest(model_dir: str | os.PathLike) -> ControlTokens | None:
    """The folder's control tokens, or None for a model without them."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return ControlTokens(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a control-token manifest: {exc}") from None


def write_manifest(model_dir: str | os.PathLike, tokens: ControlTokens) -> None:
    (Path(model_dir) / MANIFEST).write_text(json.dumps(asdict(tokens), indent=1) + "\n")


def check_manifest(
    tokens: ControlTokens, names: Sequence[str], decimals: int, where: str, interpolated: bool = False, start_offset: float = 1.0
) -> None:
    """The folder's tokens must be the ones these objectives and decimals write, with rows kept as
    this run trains them."""
    if list(tokens.objectives) != list(names) or tokens.decimals != decimals:
        raise ValueError(
            f"{where} holds control tokens for objectives {tokens.objectives} with {tokens.decimals} decimal(s); "
            f"this run writes {list(names)} with {decimals}: start from a model without control tokens, or a new run_dir"
        )
    if tokens.interpolated != interpolated:
        have, want = (("interpolated" if i else "separate") for i in (tokens.interpolated, interpolated))
        raise ValueError(f"{where} holds control tokens with {have} bins; this run sets conditioning.token_bins: {want}: use a new run_dir")
    if tokens.start_offset != start_offset:
        raise ValueError(
            f"{where} holds control tokens that started at {tokens.start_offset:g} of the offset; "
            f"this run sets conditioning.token_start_offset: {start_offset:g}: use a new run_dir"
        )


def interpolate_bins(rows: torch.Tensor, bins: int) -> torch.Tensor:
    """Each objective's bins 0..bins of `rows` (objective by objective) replaced by the points
    i / bins of the way from its bin-0 row to its bin-`bins` row. The one formula for the starting
    rows and the trained ones, so that a policy that has not trained embeds as its reference."""
    ends = rows.reshape(-1, bins + 1, rows.shape[-1])
    t = (torch.arange(bins + 1, device=rows.device, dtype=rows.dtype) / bins)[None, :, None]
    low, high = ends[:, :1], ends[:, -1:]
    return (low + t * (high - low)).reshape(rows.shape)


def add_control_tokens(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    names: Sequence[str],
    decimals: int,
    interpolated: bool = False,
    start_offset: float = 1.0,
) -> ControlTokens:
    """A copy of the model at `source` in `dest` with one control token per objective and weight
    bin added. A token's embedding row starts as the mean embedding of the text line's words for
    it (`Conciseness: 0.7`), so the policy starts out reading about what the text line says, plus
    (w - 1/2) x (" more" - " less") / 2, so the bins of one objective start apart and in order
    (the words alone start the corners 0.27 apart on SmolLM2, rows of norm 1.3; the offset makes it
    1.3 without moving the start far from the text line's), times `start_offset`. With
    `interpolated`, the bins between each objective's two ends start on the line between them
    (`interpolate_bins`). A model with tied embeddings comes out untied, so the tokens' trained
    rows stay input rows; their output rows are the mean of the others, and the generation
    config suppresses them. Written beside `dest` and renamed into place: a crash leaves no
    half-written model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.tokenization_utils_base import AddedToken

    source, dest = Path(source), Path(dest)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    vocab = model.get_input_embeddings().num_embeddings
    tokens = control_token_vocabulary(names, decimals)
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"{source}: the tokenizer already has {clash[:3]}: it holds control tokens already")
    if len(tokenizer) != vocab:
        # Some checkpoints pad their embedding past the tokenizer; the new ids must follow both.
        raise ValueError(f"{source}: the tokenizer has {len(tokenizer)} tokens, the embedding {vocab} rows: control tokens need them equal")
    first_id = vocab
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(first_id, first_id + len(tokens))):
        raise ValueError(f"{source}: the added control tokens did not get the ids after the vocabulary")
    embed = model.get_input_embeddings().weight
    with torch.no_grad():

        def text(words: str) -> torch.Tensor:
            return embed[tokenizer(words, add_special_tokens=False)["input_ids"]].mean(0)

        more = (text(" more") - text(" less")) / 2
        steps = 10**decimals
        starts = [
            text(f" {name}: {i / steps:.{decimals}f}") + (i / steps - 0.5) * start_offset * more for name in names for i in range(steps + 1)
        ]
        model.resize_token_embeddings(vocab + len(tokens), mean_resizing=False)
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        if head is not None and head.weight is embed:
            # Untied: the rows trained for the tokens are input rows only. Tied, they would also
            # be output rows that the learner (which scores the writable tokens alone) never sees
            # move, while vLLM, or anyone loading the export, would score them against every token.
            model.config.tie_word_embeddings = False
            head.weight = torch.nn.Parameter(embed.detach().clone())
        starts = torch.stack(starts)
        embed[first_id:] = interpolate_bins(starts, steps) if interpolated else starts
        if head is not None:
            head.weight[first_id:] = head.weight[:first_id].mean(0)
    manifest = ControlTokens(list(names), decimals, tokens, first_id, first_id, str(source), interpolated, start_offset)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            generation = GenerationConfig.from_pretrained(source)
        except OSError:
            generation = GenerationConfig.from_model_config(model.config)
        # Hugging Face's generate never writes one either (vLLM gets a logit bias).
        generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | set(range(first_id, first_id + len(tokens))))
        generation.save_pretrained(tmp)
        write_manifest(tmp, manifest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


class ControlEmbedding(torch.nn.Module):
    """The model's input embedding with the control tokens' rows trainable and the rest frozen.

    The rows live in a parameter of their own (`rows`), so an optimizer holds state for them
    alone and a LoRA checkpoint saves them beside the adapters. `base` is the original embedding
    (its weight still shared with a tied output layer, which keeps the starting rows). Inside
    `starting_rows()` the module embeds as the base model did: the reference policy of DPO.

    `rates` (one per row, in (0, 1]; None: all 1) slows some rows down: a row embeds as its start
    plus `rate` x (the parameter's row - its start). Adam steps each coordinate by about its
    learning rate whatever the gradient's size, so scaling a gradient would not slow a row; this
    parametrisation does, row by row inside one parameter and one optimizer group. Hazard: the rate
    scales a row's whole displacement, so a run resumed under another rate moves its rows at once.

    With `line_bins` (interpolated bins) each objective's bins embed on the line between its two
    end rows (`interpolate_bins`): the rows between the ends get no gradient and are never read.
    Whatever reads the trained rows reads `trained_rows`.
    """

    def __init__(self, base: torch.nn.Embedding, first_id: int, rates: Sequence[float] | None = None, line_bins: int | None = None):
        super().__init__()
        if not 0 < first_id < base.num_embeddings:
            raise ValueError(f"control tokens start at id {first_id}, outside an embedding of {base.num_embeddings} rows")
        if line_bins is not None and (line_bins < 1 or (base.num_embeddings - first_id) % (line_bins + 1)):
            raise ValueError(f"{base.num_embeddings - first_id} control tokens are not whole lines of {line_bins} + 1 bins")
        self.base = base
        self.first_id = first_id
        self.line_bins = line_bins
        self.rows = torch.nn.Parameter(base.weight.detach()[first_id:].clone())
        self._starting = False
        # Counted now: under ZeRO-3 the parameter's own shape is empty outside a forward pass.
        self.n_rows = base.num_embeddings - first_id
        self._held: torch.Tensor | None = None
        # Buffers, not parameters: ZeRO-3 leaves them whole on every rank. Not saved: the config sets them.
        self.register_buffer("_start", None, persistent=False)
        self.register_buffer("_rates", None, persistent=False)
        if rates is not None:
            if len(rates) != self.n_rows or not all(0 < r <= 1 for r in rates):
                raise ValueError(f"control-token row rates must be {self.n_rows} numbers in (0, 1], got {list(rates)}")
            if any(r < 1 for r in rates):
                self._start = base.weight.detach()[first_id:].clone()
                self._rates = torch.tensor(rates, dtype=self.rows.dtype).unsqueeze(-1)

    def hold(self, rows: Sequence[int] | None) -> None:
        """From now on the gradient stops at these rows (None: at none): they embed as they are and
        do not train, while the others do."""
        if rows is None:
            self._held = None
            return
        held = torch.zeros(self.n_rows, dtype=torch.bool, device=self.rows.device)
        held[list(rows)] = True
        self._held = held

    @property
    def trained_rows(self) -> torch.Tensor:
        """The control tokens' rows as the policy embeds them now: the parameter itself, each row's
        displacement scaled by its rate where some rate is below 1, the bins between each
        objective's ends on the line between them where `line_bins` is set."""
        rows = self.rows if self._rates is None else self._start + self._rates * (self.rows - self._start)
        return rows if self.line_bins is None else interpolate_bins(rows, self.line_bins)

    @property
    def weight(self) -> torch.Tensor:
        """The embedding as the policy has it now (trained rows in place)."""
        return torch.cat([self.base.weight[: self.first_id], self.trained_rows.to(self.base.weight.dtype)], dim=0)

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if self._starting:
            return out
        control = ids >= self.first_id
        if not bool(control.any()):
            return out
        rows = self.trained_rows
        if self._held is not None:
            rows = torch.where(self._held.unsqueeze(-1), rows.detach(), rows)
        trained = rows[(ids - self.first_id).clamp(min=0)].to(out.dtype)
        return torch.where(control.unsqueeze(-1), trained, out)

    @contextmanager
    def starting_rows(self) -> Iterator[None]:
        was, self._starting = self._starting, True
        try:
            yield
        finally:
            self._starting = was
