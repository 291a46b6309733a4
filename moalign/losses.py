"""DPO-family losses on summed sequence log-probabilities, and MODPO.

All functions take per-pair tensors of summed token log-probs and return per-pair losses, so
the caller decides the reduction (pair weights, data-parallel normalisation).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["sigmoid", "ipo", "hinge"]


def _check(name: str, t: torch.Tensor, shape: torch.Size | None = None) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")


def dpo_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)], per pair."""
    _check("policy_chosen", policy_chosen)
    for name, t in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        _check(name, t, policy_chosen.shape)
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def preference_loss(margin: torch.Tensor, beta: float, kind: LossKind = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss of the log-ratio margin h.

    sigmoid: (1-eps)(-log sigma(beta h)) + eps(-log sigma(-beta h)); ipo: (h - 1/(2 beta))^2;
    hinge: relu(1 - beta h).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
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
) -> torch.Tensor:
    """Per-pair DPO-family loss."""
    margin = dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return preference_loss(margin, beta, kind, label_smoothing)


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
    _check("weights", w)
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
    _check("margin_rewards_chosen", margin_rewards_chosen, expected)
    _check("margin_rewards_rejected", margin_rewards_rejected, expected)
    others = torch.cat([w[:, :objective], w[:, objective + 1 :]], dim=1)
    margin = ((margin_rewards_chosen - margin_rewards_rejected) * others).sum(dim=1)
    return -F.logsigmoid((beta * h - margin) / w_k)


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * log(pi/ref): the DPO implicit reward, usable as a MODPO margin model."""
    return beta * (policy_logps - ref_logps)


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits)[token] with a backward that reuses the saved log-softmax in place.

    Autograd's own chain (log_softmax, gather) writes two more vocabulary-wide tensors in backward
    (a zero-filled scatter target and the log-softmax gradient); here the saved log-probabilities
    become the gradient, softmax minus one-hot, in place. Backward runs once (no retain_graph).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        ctx.save_for_backward(logp, tokens)
        ctx.logits_dtype = logits.dtype
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logp, tokens = ctx.saved_tensors
        grad_logits = logp.exp_().mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits.to(ctx.logits_dtype), None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[..., t]) under softmax(logits[..., t, :]), in float32; logits [..., V], tokens [...]."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogProbs.apply(logits, tokens)
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
