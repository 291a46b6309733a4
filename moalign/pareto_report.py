"""Pareto evaluation of a steerable policy, the pure half: does the policy follow the weights
written into its prompt? A front's statistics, its files (front.json, front.md), tables, plots
and learning curve, and the settings that make two fronts comparable.

Pure (numpy; matplotlib only inside the plots), so the statistics are testable without Ray or
vLLM. The maths on point sets is `moalign.pareto`; the runner that fills the reward array on the
actors is `loops.pareto_eval` (`evaluate.py` is its command line).

Shapes: W weight vectors (a simplex lattice plus corners and centre), P held-out prompts, S
samples per (weight, prompt), K objectives. Rewards are the raw (unnormalised) scores.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from moalign.conditioning import round_weights
from moalign.config import RunConfig
from moalign.data import PromptRecord
from moalign.pareto import hypervolume, non_dominated_mask, simplex_lattice, steerability

log = logging.getLogger(__name__)


def eval_weights(n_objectives: int, divisions: int, decimals: int = 2) -> np.ndarray:
    """The `{K, divisions}` simplex lattice plus every corner and the centre, rounded as the
    conditioning writes them, without duplicates; shape (W, K), lattice order first."""
    lattice = simplex_lattice(n_objectives, divisions)
    corners = np.eye(n_objectives)
    centre = np.full((1, n_objectives), 1.0 / n_objectives)
    candidates = round_weights(np.vstack([lattice, corners, centre]), decimals)
    kept: list[np.ndarray] = []
    seen: set[tuple[float, ...]] = set()
    for row in candidates:
        key = tuple(float(x) for x in row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return np.array(kept)


def standard_error(values: np.ndarray, axis: int) -> np.ndarray | None:
    """std(ddof=1)/sqrt(n) along `axis`; None when there are fewer than two values."""
    n = values.shape[axis]
    if n < 2:
        return None
    return values.std(axis=axis, ddof=1) / math.sqrt(n)


def _plain(value: float | None) -> float | None:
    """A JSON-safe float: None for NaN/inf (json.dumps would otherwise write invalid JSON)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def front_stats(weights: Any, rewards: Any, names: Sequence[str], reference_point: Sequence[float] | None = None) -> dict[str, Any]:
    """Statistics of an evaluated front; every value is JSON-serialisable.

    Args:
        weights: (W, K) weight vectors on the simplex.
        rewards: (W, P, S, K) raw rewards: weight vector, prompt, sample, objective.
        names: the K objective names.
        reference_point: (K,) hypervolume reference; None means 0 for every objective.

    Returns a dict with `objectives`, `weights`, `mean` and `se` (W x K, s.e. over prompts of
    the per-prompt sample means; None with a single prompt), `non_dominated` (indices of the
    weight vectors whose means no other mean dominates), `hypervolume` of the means against
    `reference_point` (weight vectors below it in some objective add no volume; their indices
    are in `below_reference`), and `per_objective[name]` with `spearman` (w_k vs mean reward_k
    over the weight vectors), `spread` (mean reward_k at w_k = 1 minus at w_k = 0, paired by
    prompt), `spread_se`, `spread_z` and `lattice_mean`.
    """
    w = np.asarray(weights, dtype=float)
    r = np.asarray(rewards, dtype=float)
    names = list(names)
    if w.ndim != 2 or r.ndim != 4 or r.shape[0] != w.shape[0] or r.shape[3] != w.shape[1] or len(names) != w.shape[1]:
        raise ValueError(f"front_stats: weights {w.shape}, rewards {r.shape} and {len(names)} names do not fit (W,K), (W,P,S,K), K")
    n_weights, n_prompts, n_samples, k = r.shape
    if n_prompts < 1 or n_samples < 1:
        raise ValueError(f"front_stats: rewards {r.shape} hold no prompt or no sample")
    if not np.all(np.isfinite(r)):
        raise ValueError("front_stats: rewards contain NaN or infinite values")
    reference = np.zeros(k) if reference_point is None else np.asarray(reference_point, dtype=float)
    if reference.shape != (k,):
        raise ValueError(f"front_stats: reference point {reference.tolist()} has {reference.size} values for {k} objectives")

    per_prompt = r.mean(axis=2)  # (W, P, K): samples of one prompt are not independent draws of the prompt effect
    mean = per_prompt.mean(axis=1)
    se = standard_error(per_prompt, axis=1)

    # Hypervolume rejects points below the reference; such a point's box is empty, so leaving
    # it out equals clipping it. The indices are reported so a bad reference point shows.
    above = np.all(mean >= reference, axis=1)
    volume = hypervolume(mean[above], reference)

    spearman = steerability(w, mean)["per_objective"] if n_weights >= 2 else [0.0] * k
    per_objective: dict[str, dict[str, float | None]] = {}
    for j, name in enumerate(names):
        top, bottom = np.isclose(w[:, j], 1.0), np.isclose(w[:, j], 0.0)
        spread = spread_se = spread_z = None
        if top.any() and bottom.any():
            # Paired by prompt: the same prompts (and sampling seeds) at both ends of the axis.
            difference = per_prompt[top][:, :, j].mean(axis=0) - per_prompt[bottom][:, :, j].mean(axis=0)
            spread = float(difference.mean())
            difference_se = standard_error(difference, axis=0)
            if difference_se is not None:
                spread_se = float(difference_se)
                spread_z = spread / spread_se if spread_se > 0 else None
        per_objective[name] = {
            "spearman": float(spearman[j]),
            "spread": _plain(spread),
            "spread_se": _plain(spread_se),
            "spread_z": _plain(spread_z),
            "lattice_mean": float(mean[:, j].mean()),
        }

    return {
        "objectives": names,
        "n_weights": n_weights,
        "n_prompts": n_prompts,
        "samples_per_prompt": n_samples,
        "weights": w.tolist(),
        "mean": mean.tolist(),
        "se": se.tolist() if se is not None else [[None] * k for _ in range(n_weights)],
        "non_dominated": np.flatnonzero(non_dominated_mask(mean)).tolist(),
        "hypervolume": float(volume),
        "reference_point": reference.tolist(),
        "below_reference": np.flatnonzero(~above).tolist(),
        "per_objective": per_objective,
        "conflicts": objective_conflicts(r, names) if k > 1 else [],
    }


def kl_stats(logratios: Any, bound: float | None = None) -> dict[str, Any]:
    """The KL to the reference of an evaluated policy, per weight vector: `logratios` (W, P, S) are
    log pi(y|x) - log pi_ref(y|x) of each sampled answer under its weight line, so a weight
    vector's mean is the sampled estimate of KL(pi || pi_ref) there (nats per answer). The training
    health figure reads the weights a step draws; this reads each weight vector apart, corners too.
    `bound`: the run's `health.max_kl`, recorded for the report."""
    x = np.asarray(logratios, dtype=float)
    if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"kl_stats: logratios {x.shape} must be (weight vectors, prompts, samples)")
    if not np.all(np.isfinite(x)):
        raise ValueError("kl_stats: log-ratios contain NaN or infinite values")
    per_prompt = x.mean(axis=2)
    se = standard_error(per_prompt, axis=1)
    mean = per_prompt.mean(axis=1)
    return {
        "mean": mean.tolist(),
        "se": se.tolist() if se is not None else [None] * len(mean),
        "median": np.median(x.reshape(len(x), -1), axis=1).tolist(),
        "overall_mean": float(x.mean()),
        "largest": int(np.argmax(mean)),
        "bound": bound,
    }


def kl_summary(stats: dict[str, Any]) -> str | None:
    """One sentence on a front's KL (None when it was not measured)."""
    kl = stats.get("kl")
    if not kl:
        return None
    worst = kl["largest"]
    bound = kl.get("bound")
    over = [weights_label(w) for w, m in zip(stats["weights"], kl["mean"]) if bound is not None and m > bound]
    verdict = ""
    if bound is not None:
        verdict = (
            f"; above health.max_kl={bound:g} at {', '.join(over)}" if over else f"; within health.max_kl={bound:g} at every weight vector"
        )
    return (
        f"KL to the reference: {kl['overall_mean']:.2f} nats per answer over the lattice, "
        f"largest {kl['mean'][worst]:.2f} at {weights_label(stats['weights'][worst])}{verdict}."
    )


# Shares of answer pairs two objectives rank in opposite orders. Unrelated objectives disagree
# on about half; a policy can then raise both at once, so it scores as well ignoring their
# weights. Only a pair clearly above half trades off: there the weights must choose.
AGREE_BELOW = 0.4
TRADE_OFF_FROM = 0.6


def objective_conflicts(rewards: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    """How strongly each pair of objectives trades off on a policy's own samples: of the pairs of
    answers to the same prompt that both objectives rank (no tie in either), the share they rank
    in opposite orders (`disagreement`: 0 = they always prefer the same answer, about 0.5 =
    unrelated, 1 = a pure trade-off), and the correlation of the two rewards across a prompt's
    answers (prompt means removed). `rewards`: (W, P, S, K); a prompt's answers under every
    weight vector are pooled."""
    r = np.asarray(rewards, dtype=float)
    per_prompt = np.moveaxis(r, 1, 0).reshape(r.shape[1], -1, r.shape[3])  # (P, W*S, K)
    centred = per_prompt - per_prompt.mean(axis=1, keepdims=True)
    upper = np.triu_indices(per_prompt.shape[1], k=1)
    out = []
    for a, b in combinations(range(len(names)), 2):
        da = (per_prompt[:, :, a, None] - per_prompt[:, None, :, a])[:, upper[0], upper[1]]
        db = (per_prompt[:, :, b, None] - per_prompt[:, None, :, b])[:, upper[0], upper[1]]
        ranked = (np.abs(da) > 1e-12) & (np.abs(db) > 1e-12)
        opposite = ranked & (np.sign(da) != np.sign(db))
        x, y = centred[:, :, a].ravel(), centred[:, :, b].ravel()
        spread = x.std() * y.std()
        out.append(
            {
                "objectives": [names[a], names[b]],
                "disagreement": _plain(opposite.sum() / ranked.sum()) if ranked.any() else None,
                "ranked_pairs": int(ranked.sum()),
                "correlation": _plain(float((x * y).mean() / spread)) if spread > 0 else None,
            }
        )
    return out


def conflict_summary(conflicts: Sequence[dict[str, Any]]) -> list[str]:
    """One plain sentence per pair of objectives, and a verdict line first when no pair trades off."""
    lines = []
    for c in conflicts:
        a, b = c["objectives"]
        d = c["disagreement"]
        if d is None:
            lines.append(f"- {a} and {b}: no pair of answers is ranked by both; nothing to compare.")
        elif d < AGREE_BELOW:
            lines.append(f"- {a} and {b} **mostly agree** ({1 - d:.0%} of answer pairs ranked the same way): little to steer between them.")
        elif d < TRADE_OFF_FROM:
            lines.append(
                f"- {a} and {b} are **unrelated** ({d:.0%} of answer pairs ranked in opposite orders): a policy can raise both at "
                "once, so it need not follow their weights to score well."
            )
        else:
            lines.append(f"- {a} and {b} **trade off** ({d:.0%} of answer pairs ranked in opposite orders): the weights must choose.")
    if conflicts and not any(c["disagreement"] is not None and c["disagreement"] >= TRADE_OFF_FROM for c in conflicts):
        lines.insert(
            0,
            "**Nothing to steer:** no pair of objectives trades off on these answers, so a policy that ignores the weights "
            "can score as well as one that follows them; a spread near 0 here says nothing about the training.",
        )
    return lines


def front_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """Scalars for the metrics sink: `eval/hypervolume`, `eval/steerability/<objective>` and
    `eval/spread_z/<objective>` (left out where undefined: one prompt, or zero spread s.e.), and
    where the KL was measured `eval/kl_max`, the largest weight vector's mean."""
    metrics = {"eval/hypervolume": float(stats["hypervolume"])}
    if stats.get("kl"):
        metrics["eval/kl_max"] = float(max(stats["kl"]["mean"]))
    for name, o in stats["per_objective"].items():
        metrics[f"eval/steerability/{name}"] = float(o["spearman"])
        if o["spread_z"] is not None:
            metrics[f"eval/spread_z/{name}"] = float(o["spread_z"])
    return metrics


def weights_label(weights: Sequence[float]) -> str:
    """`0.7/0.3/0`, `0.33/0.33/0.33`: short enough to annotate a point."""
    return "/".join(f"{round(float(x), 2):g}" for x in weights)


def _number(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _mean_se(mean: float | None, se: float | None, spec: str = ".4g") -> str:
    return f"{_number(mean, spec)} ± {_number(se, '.2g')}"


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _compact(value: Any, max_items: int = 6) -> Any:
    """Long lists (prompt ids, lattice weights) shortened to a count for the markdown header; front.json keeps them."""
    if isinstance(value, dict):
        return {k: _compact(v, max_items) for k, v in value.items()}
    if isinstance(value, list):
        return f"{len(value)} items" if len(value) > max_items else [_compact(v, max_items) for v in value]
    return value


def front_markdown(stats: dict[str, Any], label: str, meta: dict[str, Any] | None = None) -> str:
    names = stats["objectives"]
    lines = [f"# Pareto front: {label}", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: `{json.dumps(_compact(value)) if isinstance(value, dict | list) else value}`")
    if meta:
        lines.append("")
    lines += [
        f"Mean reward ± standard error over {stats['n_prompts']} prompt(s), {stats['samples_per_prompt']} sample(s) each; "
        "✓ = no other weight vector's mean dominates it.",
        "",
        f"| weights ({'/'.join(names)}) | " + " | ".join(names) + " | non-dominated |",
        "|---" * (len(names) + 2) + "|",
    ]
    kl = stats.get("kl")
    if kl:
        lines[-2] += " KL to the reference (mean ± s.e., median; nats per answer) |"
        lines[-1] += "---|"
    front = set(stats["non_dominated"])
    for i, (w, mean, se) in enumerate(zip(stats["weights"], stats["mean"], stats["se"])):
        cells = [_mean_se(m, s) for m, s in zip(mean, se)]
        extra = f" {_mean_se(kl['mean'][i], kl['se'][i], '.3g')}, {kl['median'][i]:.3g} |" if kl else ""
        lines.append(f"| {weights_label(w)} | " + " | ".join(cells) + f" | {'✓' if i in front else ''} |" + extra)
    lines += [
        "",
        "## Steerability",
        "",
        "Spearman of w_k against mean reward_k over the weight vectors; spread = mean reward_k at w_k = 1 minus at "
        "w_k = 0 (paired by prompt), z = spread / s.e.",
        "",
        "| objective | Spearman | spread ± s.e. | z |",
        "|---|---|---|---|",
    ]
    for name in names:
        o = stats["per_objective"][name]
        spread = _mean_se(o["spread"], o["spread_se"], "+.4g")
        lines.append(f"| {name} | {o['spearman']:+.3f} | {spread} | {_number(o['spread_z'], '+.2f')} |")
    conflicts = stats.get("conflicts") or []
    if conflicts:
        lines += [
            "",
            "## Do the objectives trade off?",
            "",
            "On this policy's own answers (every weight vector's answers to a prompt pooled): of the answer pairs both "
            "objectives rank, the share ranked in opposite orders (0: they always agree; about 0.5: unrelated; 1: a pure "
            f"trade-off), and the within-prompt correlation of the rewards. From {TRADE_OFF_FROM:.0%} the pair trades off.",
            "",
            "| objectives | opposite rankings | answer pairs | correlation |",
            "|---|---|---|---|",
        ]
        for c in conflicts:
            lines.append(
                f"| {' / '.join(c['objectives'])} | {_number(c['disagreement'], '.0%')} | {c['ranked_pairs']} | {_number(c['correlation'], '+.2f')} |"
            )
        lines += ["", *conflict_summary(conflicts)]
    below = stats.get("below_reference") or []
    note = f"; {len(below)} weight vector(s) below it add no volume" if below else ""
    lines += ["", f"Hypervolume: {stats['hypervolume']:.6g} (reference point {weights_label(stats['reference_point'])}{note})", ""]
    summary = kl_summary(stats)
    if summary:
        lines += [summary, ""]
    return "\n".join(lines)


def write_front(out_dir: str | Path, stats: dict[str, Any], label: str, meta: dict[str, Any]) -> None:
    """`front.json` (stats, label and meta) and `front.md` (human-readable tables) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"label": label, **stats, "meta": meta}
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers; fail here instead.
    write_atomic(out / "front.json", json.dumps(payload, indent=1, allow_nan=False) + "\n")
    write_atomic(out / "front.md", front_markdown(stats, label, meta))


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot_fronts(out_png: str | Path, fronts: Sequence[tuple[str, dict[str, Any]]], names: Sequence[str]) -> None:
    """Pairwise scatter plots of the objective means (one panel per objective pair), every front
    on the same axes in its own colour and marker, each point annotated with its weights."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(names)
    pairs = list(combinations(range(len(names)), 2))
    if not pairs:
        raise ValueError(f"plot_fronts: needs at least two objectives, got {names}")
    if not fronts:
        raise ValueError("plot_fronts: no fronts to plot")
    columns = min(3, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    # A Figure with its own Agg canvas: no pyplot, so no global backend switch in the caller's process.
    figure = Figure(figsize=(5.0 * columns, 4.5 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(fronts))]
    for panel, (a, b) in zip(axes, pairs):
        for n, (label, stats) in enumerate(fronts):
            index = {name: i for i, name in enumerate(stats["objectives"])}
            if names[a] not in index or names[b] not in index:
                continue
            ia, ib = index[names[a]], index[names[b]]
            mean = np.asarray(stats["mean"], dtype=float)
            se = np.array([[np.nan if s is None else s for s in row] for row in stats["se"]], dtype=float)
            panel.errorbar(
                mean[:, ia],
                mean[:, ib],
                xerr=np.nan_to_num(se[:, ia]),
                yerr=np.nan_to_num(se[:, ib]),
                fmt=_MARKERS[n % len(_MARKERS)],
                color=colours[n],
                ecolor=colours[n],
                elinewidth=0.6,
                alpha=0.85,
                label=label,
            )
            for w, x, y in zip(stats["weights"], mean[:, ia], mean[:, ib]):
                panel.annotate(weights_label(w), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, color=colours[n])
        panel.set_xlabel(names[a])
        panel.set_ylabel(names[b])
        panel.grid(alpha=0.3)
    for unused in axes[len(pairs) :]:
        unused.set_visible(False)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Mean reward per weight vector ({'/'.join(names)})", fontsize=10)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    figure.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, out)


def steerability_table(fronts: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table comparing fronts side by side: per objective the Spearman and spread ± s.e.
    of every front; the last row holds the hypervolumes."""
    if not fronts:
        return ""
    names: list[str] = []
    for _, stats in fronts:
        names += [n for n in stats["objectives"] if n not in names]
    header = ["objective"] + [f"{label} {column}" for label, _ in fronts for column in ("Spearman", "spread ± s.e.")]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in names:
        cells = [name]
        for _, stats in fronts:
            o = stats["per_objective"].get(name)
            if o is None:
                cells += ["n/a", "n/a"]
            else:
                cells += [f"{o['spearman']:+.3f}", _mean_se(o["spread"], o["spread_se"], "+.4g")]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["hypervolume"]
    for _, stats in fronts:
        cells += [f"{stats['hypervolume']:.4g}", ""]
    lines.append("| " + " | ".join(cells) + " |")
    if any(stats.get("kl") for _, stats in fronts):
        cells = ["KL to the reference (lattice mean)"]
        for _, stats in fronts:
            cells += [f"{stats['kl']['overall_mean']:.3g}" if stats.get("kl") else "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *steering_verdict(*fronts[-1])])


# What "follows its weight" means in every verdict and target: a spread well outside its standard
# error, and the mean reward rising with the weight across the evaluated weight vectors.
FOLLOWS_Z, FOLLOWS_SPEARMAN = 3.0, 0.8


def spread_is_clear(o: dict[str, Any]) -> bool:
    """An objective's spread (one entry of a front's `per_objective`) is at least FOLLOWS_Z s.e.
    above zero. Also when every prompt moved by the same positive amount: the s.e. is 0 and z is
    left undefined, but nothing is clearer (a toy policy that serves each corner perfectly)."""
    z, spread, se = o["spread_z"], o["spread"], o["spread_se"]
    return (z is not None and z >= FOLLOWS_Z) or (se == 0 and spread is not None and spread > 0)


def steering_verdict(label: str, stats: dict[str, Any]) -> list[str]:
    """Plain sentences on one front: which objectives follow their weights, and, where none does,
    whether there was anything to steer on these answers."""
    follows, lines = [], []
    for name in stats["objectives"]:
        o = stats["per_objective"][name]
        z = o["spread_z"]
        if spread_is_clear(o) and o["spearman"] >= FOLLOWS_SPEARMAN:
            follows.append(name)
            shown = f"z {z:+.1f}" if z is not None else f"{o['spread']:+.3f} on every prompt"
            lines.append(f"- {name} **follows its weight** ({label}: spread {shown}, Spearman {o['spearman']:+.2f}).")
        else:
            lines.append(
                f"- {name} does not follow its weight yet ({label}: spread z {_number(z, '+.1f')}, Spearman {o['spearman']:+.2f}; "
                f"following needs z >= {FOLLOWS_Z:g} and Spearman >= {FOLLOWS_SPEARMAN:g})."
            )
    summary = kl_summary(stats)
    if summary:
        lines.append(f"- {summary}")
    if not follows:
        conflicts = stats.get("conflicts") or []
        if conflicts and not any(c["disagreement"] is not None and c["disagreement"] >= TRADE_OFF_FROM for c in conflicts):
            lines.append("- No pair of these objectives trades off on these answers: there was little to steer.")
    return lines


def learning_curve_markdown(points: Sequence[tuple[int, dict[str, Any]]], title: str) -> str:
    """Steerability against optimizer steps: per objective the Spearman and the spread's z at each
    evaluated step (0: the base model), and the hypervolume; `points` are (step, front stats)."""
    names = points[0][1]["objectives"]
    header = ["optimizer steps"] + [f"{n} {col}" for n in names for col in ("Spearman", "z")] + ["hypervolume"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for step, stats in sorted(points, key=lambda p: p[0]):
        cells = [str(step)]
        for name in names:
            o = stats["per_objective"][name]
            cells += [f"{o['spearman']:+.2f}", _number(o["spread_z"], "+.1f")]
        lines.append("| " + " | ".join(cells + [f"{stats['hypervolume']:.4g}"]) + " |")
    lines += ["", "z = spread / s.e.; an objective follows its weight once its z stays at 3 or more.", ""]
    return "\n".join(lines)


def plot_learning_curve(out_png: str | Path, points: Sequence[tuple[int, dict[str, Any]]], title: str) -> None:
    """Two panels against optimizer steps: each objective's Spearman, and its spread z (z = 3 marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = sorted(points, key=lambda p: p[0])
    names = points[0][1]["objectives"]
    steps = [s for s, _ in points]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    rho, z = figure.subplots(1, 2)
    for i, name in enumerate(names):
        per = [stats["per_objective"][name] for _, stats in points]
        rho.plot(steps, [o["spearman"] for o in per], marker=_MARKERS[i % len(_MARKERS)], label=name)
        z.plot(steps, [np.nan if o["spread_z"] is None else o["spread_z"] for o in per], marker=_MARKERS[i % len(_MARKERS)], label=name)
    z.axhline(3.0, color="grey", linestyle="--", linewidth=0.8)
    rho.set_ylim(-1.05, 1.05)
    for panel, label in ((rho, "Spearman of w_k vs reward_k"), (z, "spread z (reward at w_k=1 minus w_k=0, / s.e.)")):
        panel.set_xlabel("optimizer steps")
        panel.set_ylabel(label)
        panel.grid(alpha=0.3)
    rho.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    figure.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out)


def reference_point(cfg: RunConfig) -> list[float]:
    return list(cfg.eval.reference_point) if cfg.eval.reference_point is not None else [0.0] * len(cfg.objectives)


def eval_settings(cfg: RunConfig, prompts: Sequence[PromptRecord], lattice_divisions: int, samples: int) -> dict[str, Any]:
    """Everything that decides an evaluation's outcome besides the policy's weights; two fronts
    with equal settings differ only by the model."""
    return {
        "model": cfg.model.path,
        "objectives": [o.model_dump(mode="json") for o in cfg.objectives],
        "prompts": {"path": cfg.data.heldout_path, "count": len(prompts), "ids": [p.id for p in prompts]},
        "lattice": {
            "divisions": lattice_divisions,
            "weights": eval_weights(len(cfg.objectives), lattice_divisions, cfg.conditioning.decimals).tolist(),
        },
        "seeds": {"eval_seed": cfg.eval.seed, "samples_per_weight": samples, "depend_on": "eval seed, prompt index, sample"},
        "reference_point": reference_point(cfg),
        "generation": {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p, "max_new_tokens": cfg.rollout.max_new_tokens},
        "conditioning": {"style": cfg.conditioning.style, "decimals": cfg.conditioning.decimals},
    }


def load_front(out_dir: str | Path, settings: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The front saved in `out_dir`; with `settings`, only if it was made with exactly those."""
    path = Path(out_dir) / "front.json"
    if not path.is_file():
        return None
    try:
        front = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if settings is not None:
        # Through JSON so tuples/lists and int/float spellings compare as they were saved.
        wanted = json.loads(json.dumps(settings))
        saved = front.get("meta", {})
        if any(saved.get(key) != value for key, value in wanted.items()):
            return None
    return front


def latest_front(run_dir: str | Path) -> dict[str, Any] | None:
    """The front of a run's latest evaluated step (RUN_DIR/eval/step_N with the largest N)."""
    steps = []
    for child in (Path(run_dir) / "eval").glob("step_*"):
        suffix = child.name.removeprefix("step_")
        if suffix.isdigit() and (child / "front.json").is_file():
            steps.append((int(suffix), child))
    return load_front(max(steps)[1]) if steps else None


def write_learning_curve(run_dir: Path, settings: dict[str, Any], name: str, title: str) -> Path | None:
    """RUN_DIR/eval/<name>.md and .png: steerability against optimizer steps, from every front in
    RUN_DIR/eval made with `settings` (the base model as step 0); None with fewer than two."""
    points = []
    for child in (run_dir / "eval").iterdir() if (run_dir / "eval").is_dir() else ():
        suffix = child.name.removeprefix("step_")
        if child.name == "base" or (child.name.startswith("step_") and suffix.isdigit()):
            front = load_front(child, settings)
            if front is not None:
                points.append((0 if child.name == "base" else int(suffix), front))
    if len(points) < 2:
        return None
    out = run_dir / "eval" / f"{name}.md"
    write_atomic(out, learning_curve_markdown(points, title))
    plot_learning_curve(out.with_suffix(".png"), points, title)
    return out


def points_table(fronts: list[tuple[str, dict[str, Any]]]) -> str:
    """Every point of every front: mean reward per objective, and each front's hypervolume."""
    names = fronts[0][1]["objectives"]
    lines = ["| front | weights | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for label, stats in fronts:
        for w, mean in zip(stats["weights"], stats["mean"]):
            lines.append(f"| {label} | {weights_label(w)} | " + " | ".join(f"{v:.4f}" for v in mean) + " |")
    lines.append("")
    lines += [f"hypervolume {label}: {stats['hypervolume']:.4g}" for label, stats in fronts]
    return "\n".join(lines)
