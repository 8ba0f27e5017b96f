"""Figures for retrieval results, drawn with matplotlib's Agg renderer (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy.typing as npt


def save_pr_curve(
    curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
    path: Path,
    *,
    title: str = "Precision-recall (Hamming radius sweep)",
) -> Path:
    """Plot one precision-recall curve per method (``name -> (precision, recall)``) to a PNG.

    Uses a bare :class:`~matplotlib.figure.Figure` (Agg canvas), so no global pyplot backend or
    state is touched; the parent folder is created. Returns ``path``.
    """
    # imported here so that `import stac_rscbir.eval` does not pay for matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("no curves to plot")
    fig = Figure(figsize=(5.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (precision, recall) in curves.items():
        ax.plot(recall, precision, marker=".", label=name)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0.0, 1.02), ylim=(0.0, 1.02), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def save_metric_bars(
    groups: Mapping[str, Mapping[str, float]],
    columns: Sequence[tuple[str, str, str]],
    path: Path,
    title: str,
    figsize: tuple[float, float] = (10, 4),
) -> None:
    """Grouped bars of [0, 1] metrics, one group per run, with black ticks at each metric's
    random-ranking value. ``columns`` are (label, metric key, random-baseline key)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(groups)
    x = np.arange(len(columns))
    for j, (name, m) in enumerate(groups.items()):
        offset = x + (j - (len(groups) - 1) / 2) * width
        ax.bar(offset, [m[k] for _, k, _ in columns], width, label=name)
        ax.scatter(
            offset, [m[b] for _, _, b in columns], marker="_", s=120, color="black", zorder=3
        )
    ax.set_xticks(x, [c for c, _, _ in columns])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (black: random ranking)")
    ax.set_title(title)
    ax.legend(ncols=len(groups), fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
