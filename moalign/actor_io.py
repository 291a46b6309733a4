"""The data that crosses actor boundaries: a generator's samples, a learner's pair batch and the
figures a learner step reports.

TypedDicts, so they travel through Ray as the plain dicts they are (pickled as dicts, read with
`[]` on either side); both sides name their fields from here rather than from each other's code.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict


class Sample(TypedDict):
    """One completion, as `Generator.generate` returns it (n per prompt)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    """vLLM's: "stop" for EOS or a stop string, "length" when max_new_tokens cut the answer off."""
    version: int
    """The policy version the generator held when it sampled this (0: the starting model)."""
    prefix_of: NotRequired[int]
    """Only on a sentence-end prefix (`moalign.prefixes.with_sentence_prefixes`): the index, among
    its prompt's candidates, of the sample it was cut from, which went on past it."""
    break_of: NotRequired[int]
    """Only on a line-break variant (`moalign.prefixes.with_line_break_variants`): the index of the
    sample whose break after one sentence end it flips (a new line for the same line, or back)."""


class PairBatch(TypedDict):
    """One learner rank's share of a step's pairs: pair i is (prompt_ids[i], chosen_ids[i],
    rejected_ids[i]) with weight loss_weights[i]; the step's loss is sum_i w_i loss_i / total_weight
    over the pairs of every rank, so total_weight is the same on every rank."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    loss_weights: list[float]
    total_weight: float
    # The algorithms' own per-pair fields, checked by their objective's `validate`:
    margin_chosen: NotRequired[list[list[float]]]
    """MODPO: the other objectives' rewards of the chosen response (K-1 values, objective order)."""
    margin_rejected: NotRequired[list[list[float]]]
    """MODPO: the same of the rejected response."""
    labels: NotRequired[list[list[float]]]
    """MOPO: per objective, the probability that response 0 (`chosen_ids`) is preferred."""
    chosen_probability: NotRequired[list[float]]
    """MO-ODPO with `algorithm.preference_label_scale`: each pair's soft label, the probability
    that its chosen answer is preferred (the sigmoid loss's target); without it, 1."""
    supervised: NotRequired[bool]
    """MO-ODPO's warm start: train each pair's chosen answer alone (its mean token NLL); `rejected_ids` is ignored."""
    warm_start: NotRequired[bool]
    """MO-ODPO: a warm-start step whose pairs are DPO pairs (`algorithm.warm_start_pairs: stop_decisions`):
    the control-token rows train at the warm start's rate, the loss is DPO's."""
    kl_prompt_ids: NotRequired[list[list[int]]]
    """Online loops: prompts, each under the weight line its `kl_completion_ids` answer was sampled
    with, on which the learner estimates KL(policy || reference) before its update (no gradient)."""
    kl_completion_ids: NotRequired[list[list[int]]]
    """The policy's own samples for those prompts, drawn at random (not picked by reward)."""
    kl_coefs: NotRequired[list[float]]
    """The KL penalty's coefficient on each of those samples (`algorithm.corner_kl_coef`); without
    it, `algorithm.kl_coef` on every one."""


PAIR_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", "loss_weights")
"""The per-pair fields every batch carries, one entry per pair."""


class LearnerMetrics(TypedDict):
    """What `Learner.train_step` returns for its rank. Besides these: for each per-pair figure the
    objective declares (`Objective.pair_metrics`; the DPO family's chosen_reward, rejected_reward,
    margin, accuracy) its sum `<name>_sum` and mean `<name>`, and the algorithm's own figures
    (MOPO's `mopo/...`), the same on every rank."""

    step: int
    rank: int
    pairs: int
    capacity: int
    micro_batches: int
    """Forward/backward passes this step ran: the largest rank's shard in whole micro-batches."""
    weight_sum: float
    total_weight: float
    loss_sum: float
    kl_sum: float
    """Sum over the `kl_*` samples of log pi(y|x) - log pi_ref(y|x)."""
    kl_samples: int
    pair_logratio_sum: float
    """Sum over the pairs' chosen and rejected answers of log pi - log pi_ref."""
    objective: float
    """This rank's share of the step's loss: summed over ranks it is the loss."""
    loss: float
    kl: float
    """KL(policy || reference) in nats per answer, estimated on the `kl_*` samples; NaN without them."""
    pair_logratio: float
    """Mean log pi - log pi_ref over the pairs' answers. Not a KL: the answers were picked by reward,
    and relabelled or warm-start pairs train answers under a line they were not sampled with."""
    grad_norm: float
    lr: float
    skipped: int
    seconds: float


StepLearnerMetrics = TypedDict(
    "StepLearnerMetrics",
    {
        "loss": float,
        "kl": float,
        "pair_logratio": float,
        "grad_norm": float,
        "lr": float,
        "learner_step": int,
        "micro_batches": int,
        "time/learner_compute_s": float,
    },
)
"""A step's learner figures merged over the ranks (`actors.calls.merge_rank_metrics`), as the loops
log them; besides these, the objective's per-pair means and its own figures (see LearnerMetrics)."""
