"""Layer-retention curves: visual tokens kept entering each decoder layer, several recipes overlaid."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .recipe.io import write_atomic  # noqa: E402
from .recipe.schema import Recipe  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Render to memory, then write atomically: an interrupted run never leaves half a PNG."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return Path(path)


def recipe_label(recipe: Recipe) -> str:
    b = recipe.budget
    return (f"{recipe.method.name} {b.asked} ({recipe.selection.rule}; "
            f"{b.achieved['full']:.1%} full / {b.achieved['visual']:.1%} visual FLOPs)")


def plot_retention(recipes: Sequence[Recipe], path: str | Path, labels: Sequence[str] | None = None,
                   title: str | None = None) -> Path:
    """Draw each recipe's schedule as a step curve (left axis tokens, right axis fraction) to a PNG."""
    if not recipes:
        raise ValueError("nothing to plot: give at least one recipe")
    labels = list(labels) if labels else [recipe_label(r) for r in recipes]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    n_max = max(r.schedule.visual_tokens for r in recipes)
    depth = max(len(r.schedule.counts) for r in recipes)
    ax.plot([0, depth], [n_max, n_max], color="grey", linestyle="--", linewidth=1, label="unpruned")
    for recipe, label in zip(recipes, labels):
        counts = recipe.schedule.counts
        layers = list(range(len(counts) + 1))
        ax.step(layers, counts + counts[-1:], where="post", linewidth=2, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens kept entering the layer")
    ax.set_ylim(0, n_max * 1.05)
    ax.set_xlim(0, depth)
    ax.grid(alpha=0.3)
    frac = ax.secondary_yaxis("right", functions=(lambda y: y / n_max, lambda f: f * n_max))
    frac.set_ylabel("fraction kept")
    model = recipes[0].model
    ax.set_title(title or f"layer retention: {Path(model.name_or_path).name or model.family} "
                          f"({model.num_layers} layers, {n_max} visual tokens)")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_history(trials: Sequence[dict], path: str | Path, title: str) -> Path:
    """Objective of every trial in order, infeasible ones marked, with the running best."""
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    feasible = [t for t in trials if t["feasible"]]
    ax.scatter([t["trial"] for t in feasible], [t["objective"] for t in feasible], s=18, label="trial")
    bad = [t["trial"] for t in trials if not t["feasible"]]
    if bad:
        ax.scatter(bad, [min((t["objective"] for t in feasible), default=0.0)] * len(bad), marker="x",
                   color="grey", label="no floor meets the budget")
    best, running = float("-inf"), []
    for t in sorted(feasible, key=lambda t: t["trial"]):
        best = max(best, t["objective"])
        running.append((t["trial"], best))
    if running:
        ax.step(*zip(*running), where="post", color="black", linewidth=1.5, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (metric - 1e-3 KL)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
