"""What tests read off a live learner beyond its actor methods."""

from __future__ import annotations


def sequence_logprobs(learner, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
    """Summed completion log-probs under `learner`'s current policy (adapters on, dropout off)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for name, seqs in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
        for i, s in enumerate(seqs):
            if len(s) == 0:
                raise ValueError(f"{name}[{i}] is empty")
    out: list[float] = []
    chunk = 2 * learner.micro
    with learner._eval_mode():
        for s in range(0, len(prompt_ids), chunk):
            lp = learner._sequence_logps(learner.engine.module, prompt_ids[s : s + chunk], completion_ids[s : s + chunk])
            out.extend(lp.float().cpu().tolist())
    return out
