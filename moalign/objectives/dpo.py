"""DPO, the loss of MO-ODPO (and of offline DPO): the sigmoid / IPO / hinge losses of the
log-ratio margin, on per-pair tensors of summed token log-probs (the caller reduces), and the
learner-side objective that reports DPO's implicit rewards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from moalign.actor_io import PairBatch
from moalign.config import AlgorithmConfig
from moalign.objectives.base import Objective, check_tensor

LossKind = Literal["sigmoid", "ipo", "hinge"]


def dpo_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)], per pair."""
    check_tensor("policy_chosen", policy_chosen)
    for name, t in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        check_tensor(name, t, policy_chosen.shape)
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def preference_loss(
    margin: torch.Tensor,
    beta: float,
    kind: LossKind = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_probability: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss of the log-ratio margin h.

    sigmoid: (1-eps)(-log sigma(beta h)) + eps(-log sigma(-beta h)), or with per-pair soft labels
    p = `chosen_probability`, -p log sigma(beta h) - (1-p) log sigma(-beta h), whose minimum is at
    beta h = logit(p); ipo: (h - 1/(2 beta))^2; hinge: relu(1 - beta h).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    # Label smoothing is the one label 1 - eps for every pair; soft labels give each pair its own.
    label = 1 - label_smoothing
    if chosen_probability is not None:
        if kind != "sigmoid" or label_smoothing:
            raise ValueError(
                f"soft labels replace label smoothing in the sigmoid loss; got loss {kind!r}, label_smoothing {label_smoothing}"
            )
        check_tensor("chosen_probability", chosen_probability, margin.shape)
        label = chosen_probability.to(margin.dtype)
    if kind == "sigmoid":
        return -label * F.logsigmoid(beta * margin) - (1 - label) * F.logsigmoid(-beta * margin)
    if label_smoothing:
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {kind!r}")
    if kind == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * margin)
    raise ValueError(f"unknown loss {kind!r}; allowed: sigmoid, ipo, hinge")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: LossKind = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_probability: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO-family loss."""
    margin = dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return preference_loss(margin, beta, kind, label_smoothing, chosen_probability)


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * log(pi/ref): the DPO implicit reward, usable as a MODPO margin model."""
    return beta * (policy_logps - ref_logps)


class DPOObjective(Objective):
    """Sigmoid / IPO / hinge DPO on (chosen, rejected): MO-ODPO's loss, plus `sft_weight` times the
    chosen answer's mean token NLL (a supervised term on what each line preferred). In a
    supervised (warm-start) batch, the chosen answer's mean token NLL alone, or with
    `warm_start_beta` the anchored -log sigmoid(beta_s * (log pi - log pi_ref)). A step
    reports DPO's implicit rewards beta * log(pi/ref) of chosen and rejected, their margin, and
    the share of pairs whose chosen one is the larger (accuracy)."""

    pair_metrics = ("chosen_reward", "rejected_reward", "margin", "accuracy")

    def __init__(self, algorithm: AlgorithmConfig, names: Sequence[str]):
        a = algorithm
        self.beta, self.kind, self.label_smoothing = a.beta, a.loss, a.label_smoothing
        self.sft_weight = a.sft_weight  # 0 for offline algorithms (the config refuses it there)
        self.warm_start_beta = a.warm_start_beta
        self.warm_start_prefix_kl = a.warm_start_prefix_kl

    def validate(self, batch: PairBatch, n: int) -> None:
        labels = batch.get("chosen_probability")
        if labels is None:
            return
        if len(labels) != n:
            raise ValueError(f"batch['chosen_probability'] has {len(labels)} entries, batch['prompt_ids'] has {n}")
        for i, v in enumerate(labels):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"batch['chosen_probability'][{i}] = {v!r} is not a probability in [0, 1]")

    def pair_losses(self, pc, pr, rc, rr, index: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        supervised = batch.get("supervised", False)
        if supervised and self.warm_start_beta is not None:
            # The anchored label loss: its gradient fades once the label is a few / beta nats
            # likelier than under the reference, where the NLL's never does.
            return -torch.nn.functional.logsigmoid(self.warm_start_beta * (pc - rc))
        if supervised or self.sft_weight:
            # Padding rows (index -1) carry weight 0; their one-token stand-in keeps the division finite.
            lengths = torch.tensor([len(batch["chosen_ids"][i]) if i >= 0 else 1 for i in index.tolist()], dtype=pc.dtype, device=pc.device)
            nll = -pc / lengths
        if supervised:
            return nll
        labels = batch.get("chosen_probability")
        if labels is not None:
            # Padding rows (index -1) carry weight 0; any label keeps them finite.
            labels = torch.tensor([labels[i] if i >= 0 else 1.0 for i in index.tolist()], dtype=pc.dtype, device=pc.device)
        loss = dpo_loss(pc, pr, rc, rr, self.beta, self.kind, self.label_smoothing, labels)
        if batch.get("warm_start") and self.warm_start_prefix_kl:
            # A stop (or line-break) decision: the side without the decision's token is the shared
            # prefix alone, and its log-ratio is how far the corner's own text has moved from the reference.
            shorter = torch.tensor(
                [i >= 0 and len(batch["chosen_ids"][i]) < len(batch["rejected_ids"][i]) for i in index.tolist()], device=pc.device
            )
            prefix = torch.where(shorter, pc - rc, pr - rr)
            loss = loss + self.warm_start_prefix_kl * 0.5 * prefix.pow(2)
        return loss + self.sft_weight * nll if self.sft_weight else loss

    def pair_metric_sums(self, pc, pr, rc, rr) -> dict[str, float]:
        chosen = implicit_reward(pc, rc, self.beta)
        rejected = implicit_reward(pr, rr, self.beta)
        return {
            "chosen_reward": float(chosen.sum()),
            "rejected_reward": float(rejected.sum()),
            "margin": float((chosen - rejected).sum()),
            "accuracy": float((chosen > rejected).float().sum()),
        }
