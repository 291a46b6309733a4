"""MODPO (Zhou et al., seed 000): DPO for objective k at fixed weights, with the margin of the
other objectives' rewards; the loss and its learner-side objective."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moalign.actor_io import PairBatch
from moalign.config import AlgorithmConfig
from moalign.objectives.base import check_tensor, float_rows
from moalign.objectives.dpo import DPOObjective, dpo_margin


def modpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    margin_rewards_chosen: torch.Tensor,
    margin_rewards_rejected: torch.Tensor,
    weights: torch.Tensor,
    objective: int,
    beta: float,
) -> torch.Tensor:
    """MODPO per-pair loss for objective k (Zhou et al., seed 000).

    r_hat(x, y) = (1/w_k) [beta log(pi(y|x)/ref(y|x)) - w_{-k}^T r_{-k}(x, y)],
    loss = -log sigma(r_hat(x, y_w) - r_hat(x, y_l)).

    `weights` is (K,) or (B, K); `margin_rewards_*` are (B, K-1): the other objectives' rewards
    (explicit reward models or implicit DPO rewards) in objective order with k left out.
    With w = e_k the margin vanishes and this is exactly the sigmoid DPO loss.
    """
    h = dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    w = weights if weights.dim() == 2 else weights.expand(h.shape[0], -1)
    check_tensor("weights", w)
    if w.dim() != 2 or w.shape[0] != h.shape[0]:
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected (K,) or ({h.shape[0]}, K)")
    n_obj = w.shape[1]
    if not 0 <= objective < n_obj:
        raise ValueError(f"objective index {objective} is out of range for {n_obj} objectives")
    if (w < 0).any() or not torch.allclose(w.sum(dim=1), torch.ones_like(w[:, 0]), atol=1e-5):
        raise ValueError("MODPO weights must be >= 0 and sum to 1")
    w_k = w[:, objective]
    if (w_k <= 0).any():
        raise ValueError(f"MODPO weight of the trained objective (index {objective}) must be > 0: r_hat divides by it")
    expected = torch.Size((h.shape[0], n_obj - 1))
    check_tensor("margin_rewards_chosen", margin_rewards_chosen, expected)
    check_tensor("margin_rewards_rejected", margin_rewards_rejected, expected)
    others = torch.cat([w[:, :objective], w[:, objective + 1 :]], dim=1)
    margin = ((margin_rewards_chosen - margin_rewards_rejected) * others).sum(dim=1)
    return -F.logsigmoid((beta * h - margin) / w_k)


class MODPOObjective(DPOObjective):
    """MODPO for objective k at the run's fixed weights: each pair carries the other objectives'
    rewards of its chosen and rejected response (`margin_chosen`, `margin_rejected`, K-1 values
    each, objective order with k left out), which `modpo_loss` subtracts."""

    def __init__(self, algorithm: AlgorithmConfig, names: Sequence[str]):
        super().__init__(algorithm, names)
        m = algorithm.modpo
        if m.weights is None:
            raise ValueError("algorithm.modpo.weights: a MODPO learner trains one weight vector; a sweep runs one learner per vector")
        self.weights = torch.tensor(m.weights, dtype=torch.float32)
        self.objective = m.objective
        self.width = len(m.weights) - 1

    def validate(self, batch: PairBatch, n: int) -> None:
        float_rows(batch, "margin_chosen", n, self.width)
        float_rows(batch, "margin_rejected", n, self.width)

    def pair_losses(self, pc, pr, rc, rr, index: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        rows = index.tolist()
        # Padding rows get zero margins: finite, and their weight is 0.
        zeros = [0.0] * self.width
        chosen = torch.tensor([batch["margin_chosen"][i] if i >= 0 else zeros for i in rows], dtype=pc.dtype, device=pc.device)
        rejected = torch.tensor([batch["margin_rejected"][i] if i >= 0 else zeros for i in rows], dtype=pc.dtype, device=pc.device)
        return modpo_loss(pc, pr, rc, rr, chosen, rejected, self.weights.to(pc.device), self.objective, self.beta)
