"""Figures for retrieval results, drawn with matplotlib's Agg renderer (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
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
