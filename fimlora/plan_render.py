"""How a rank plan looks to a person: the aligned text table and the PNG heatmap.

Rendering only: this module reads a ``RankPlan`` and never builds or validates one (that is
``plan``'s job), so imports flow plan -> plan_render. matplotlib is imported when a plot is drawn.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ._io import atomic_write_bytes

if TYPE_CHECKING:
    from .plan import LayerPlan, RankPlan

__all__ = ["budget_summary", "plan_heatmap", "plan_table", "split_block_and_type"]

_INDEX = re.compile(r"[0-9]+")


def plan_table(plan: RankPlan, max_rows: int | None = None) -> str:
    """An aligned text table, one row per layer, plus a one-line summary footer.

    Past ``max_rows`` layers, the first and last rows frame a ``... N more ...`` line."""
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    intervals = plan.confidence.layers if plan.confidence is not None else None
    # The intervals are those of the score-based ranks, also when the policy wrote uniform ranks.
    header = ("layer", "shape", "rank", "alpha", "score", "params") + (("rank interval",) if intervals else ())
    rows: list[tuple[str, ...] | None] = [
        (lp.name, f"{lp.d_out} x {lp.d_in}", str(lp.rank), f"{lp.alpha:g}", f"{lp.score:.2e}", f"{lp.params:,}")
        + ((f"{intervals[lp.name].rank_lo}-{intervals[lp.name].rank_hi}",) if intervals else ())
        for lp in plan.layers
    ]
    hidden = len(rows) - max_rows if max_rows is not None and len(rows) > max_rows else 0
    if hidden:
        head = (len(rows) - hidden + 1) // 2
        rows = rows[:head] + [None] + rows[head + hidden:]
    widths = [max(len(r[i]) for r in [header, *rows] if r is not None) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        # Name left-aligned, numbers right-aligned so the digits line up.
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) if r is not None else f"... {hidden} more ..." for r in rows]
    ranks = [lp.rank for lp in plan.layers]
    spread = f"{min(ranks)}/{sum(ranks) / len(ranks):.2f}/{max(ranks)}" if ranks else "-"
    lines += ["", f"{len(ranks)} layers ({ranks.count(0)} at rank 0) | ranks min/mean/max {spread} | "
                  f"{budget_summary(plan)}"]
    if plan.confidence is not None:
        c = plan.confidence
        lines.append(f"confidence ({c.level:.0%} intervals, {c.resamples} bootstrap draws of {c.samples} samples): "
                     f"{c.verdict()}")
    if plan.decision and plan.decision.get("action") == "uniform":
        lines.append(f"ranks are uniform: {plan.decision['reason']}")
    return "\n".join(lines)

def budget_summary(plan: RankPlan) -> str:
    """Budget used vs its total in the budget's unit, and the alpha policy (table footer, plot title)."""
    total, used = plan.budget_total, plan.budget_used
    pct = f"{100.0 * used / total:.1f}%" if total > 0 else "n/a"
    return f"{plan.budget.unit} {used:,} / {total:,} budget ({pct}) | alpha policy {plan.alpha_policy}"

def plan_heatmap(plan: RankPlan, path: str | Path, title: str | None = None) -> Path:
    """Atomically save a PNG heatmap of ranks (rows: block, columns: module type); return the path.

    ``title`` replaces the default title (model name and budget summary)."""
    import matplotlib
    import numpy as np  # matplotlib's own dependency
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    row_labels, col_labels, grid = _heatmap_grid(plan.layers)
    panels = 2 if plan.confidence is not None else 1
    # A bare Figure on an Agg canvas: no pyplot global state, no GUI backend needed.
    fig = Figure(figsize=(min(3.0 + 0.8 * len(col_labels), 40.0) * panels, min(2.0 + 0.32 * len(row_labels), 40.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    # Grey (masked NaN) marks block/module combinations that do not exist in the model.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    norm = Normalize(vmin=0, vmax=max([1, *(lp.rank for lp in plan.layers)]))
    image = ax.imshow(np.ma.masked_invalid(np.array(grid)), cmap=cmap, norm=norm, aspect="auto",
                      interpolation="nearest")
    for (i, j), value in np.ndenumerate(np.array(grid)):
        if not math.isnan(value):
            r, g, b, _ = cmap(norm(value))  # dark text on light cells, light text on dark
            colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, label="rank")
    if title is None:
        model = plan.calibration.get("model")
        kind, value = plan.budget.kind, plan.budget.value
        title = f"LoRA ranks{f': {model}' if model else ''}\nbudget {kind}={value} | {budget_summary(plan)}"
    ax.set_title(title, fontsize=9)
    if plan.confidence is not None:
        _draw_interval_panel(plan, fig.add_subplot(1, 2, 2), matplotlib, np, Normalize)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())  # a viewer never sees half a PNG


def _interval_layers(plan: RankPlan) -> list[LayerPlan]:
    """The layers with their rank-interval width (hi - lo) standing in for the rank."""
    widths = {n: iv.rank_hi - iv.rank_lo for n, iv in plan.confidence.layers.items()}
    return [dataclasses.replace(lp, rank=widths[lp.name]) for lp in plan.layers]


def _draw_interval_panel(plan: RankPlan, ax, matplotlib, np, normalize) -> None:
    """Second heatmap panel: how wide each layer's rank interval is (0: the rank is certain)."""
    row_labels, col_labels, grid = _heatmap_grid(_interval_layers(plan))
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="lightgrey")
    values = np.array(grid)
    norm = normalize(vmin=0, vmax=max(1.0, float(np.nanmax(values))))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for (i, j), value in np.ndenumerate(values):
        if not math.isnan(value):
            ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=7,
                    color="white" if norm(value) > 0.6 else "black")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_xlabel("module type")
    ax.figure.colorbar(image, ax=ax, label="rank interval width")
    c = plan.confidence
    ax.set_title(f"{c.level:.0%} rank intervals ({c.resamples} bootstrap draws of {c.samples} samples)\n"
                 f"{c.verdict().split(':')[0]}: {c.unstable_share:.0%} of layers wider than one step", fontsize=9)


def split_block_and_type(name: str) -> tuple[int | None, str]:
    """Split a module name into (block index, module type).

    The block index is the first all-digit dotted component that is followed by
    at least one more component; the type is everything after it::

        "model.layers.3.self_attn.q_proj"            -> (3, "self_attn.q_proj")
        "bert.encoder.layer.5.attention.self.query"  -> (5, "attention.self.query")
        "model.layers.2.mlp.experts.7.w1"            -> (2, "mlp.experts.7.w1")
        "lm_head" / "classifier.0"                   -> (None, name)

    The *first* index is used because later ones sit inside a block (MoE experts,
    T5's ``block.3.layer.0``); a trailing index (``nn.Sequential`` position) is no block.
    """
    _, block, kind = _split(name)
    return block, kind


def _split(name: str) -> tuple[str, int | None, str]:
    """(prefix, block, type); the prefix is what precedes the block index."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _INDEX.fullmatch(part):
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:])
    return "", None, name


def _heatmap_grid(layers: list[LayerPlan]) -> tuple[list[str], list[str], list[list[float]]]:
    """Row labels, column labels and a rank grid (NaN where no layer exists)."""
    parsed = [_split(lp.name) for lp in layers]
    keys = [(block, kind) for _, block, kind in parsed]
    if len(set(keys)) < len(keys):
        # Encoder and decoder both have block 3 / fc1, say: tell the columns apart by the
        # part of the prefix that differs ("encoder/fc1", "decoder/fc1").
        short = _distinguishing(sorted({p for p, b, _ in parsed if b is not None}))
        keys = [(b, k if b is None or not short[p] else f"{short[p]}/{k}") for p, b, k in parsed]
    blocks = sorted({b for b, _ in keys if b is not None})
    rows: list[int | None] = [*blocks, *([None] if any(b is None for b, _ in keys) else [])]
    cols = list(dict.fromkeys(k for _, k in keys))  # first-seen order keeps q,k,v,o,... natural
    row_at, col_at = {b: i for i, b in enumerate(rows)}, {k: j for j, k in enumerate(cols)}
    grid = [[math.nan] * len(cols) for _ in rows]
    for (block, kind), lp in zip(keys, layers, strict=True):
        grid[row_at[block]][col_at[kind]] = float(lp.rank)
    return ["-" if b is None else str(b) for b in rows], cols, grid


def _distinguishing(prefixes: list[str]) -> dict[str, str]:
    """Map each prefix to itself minus the dotted components all prefixes share at both ends."""
    split = [p.split(".") for p in prefixes]
    rest = [s[len(os.path.commonprefix(split)):] for s in split]  # commonprefix works on any lists
    trail = len(os.path.commonprefix([s[::-1] for s in rest]))
    return {p: ".".join(s[: len(s) - trail]) for p, s in zip(prefixes, rest, strict=True)}
