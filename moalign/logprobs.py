"""Per-token log-probabilities of chosen tokens, in float32, with a memory-lean backward.

The learner scores every completion through `token_logprobs`; the algorithms' losses on the
summed log-probs live with their objectives (`moalign.objectives`).
"""

from __future__ import annotations

import torch


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
