"""Pictures of a genotype's cells (matplotlib, no Graphviz needed).

Each cell is drawn as a left-to-right DAG: the two cell inputs ``c_{k-2}``, ``c_{k-1}``
on the left, the intermediate nodes ``0..n-1`` in the middle, the output ``c_{k}`` (the
concatenation of ``*_concat``) on the right; every chosen op is an arrow labelled with its
name. Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no global
backend state).
"""

from __future__ import annotations

import io
import os

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .io import atomic_write_bytes
from .search_space import Genotype

__all__ = ["draw_cell", "draw_genotype"]

_COLORS = {"input": "#a6cee3", "node": "#fdbf6f", "output": "#b2df8a"}


def draw_cell(ax: Axes, nodes, concat, title: str) -> None:
    """Draw one cell (``nodes``: per node a tuple of ``(op, input index)``) on ``ax``."""
    n = len(nodes)
    pos = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for i in range(n):
        pos[2 + i] = (1.0 + i, 1.2 * ((i % 2) * 2 - 1) * (0.5 if n > 1 else 0))
    out = ("out", (float(n) + 1.0, 0.0))
    names = {0: "c_{k-2}", 1: "c_{k-1}", **{2 + i: str(i) for i in range(n)}}
    for i, node in enumerate(nodes):
        for op, j in node:
            (x0, y0), (x1, y1) = pos[j], pos[2 + i]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops={"arrowstyle": "->", "color": "0.3", "shrinkA": 14, "shrinkB": 14})
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, op, fontsize=7, ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9})
    for c in concat:
        (x0, y0) = pos[c]
        ax.annotate("", xy=out[1], xytext=(x0, y0),
                    arrowprops={"arrowstyle": "->", "color": "0.6", "linestyle": "--",
                                "shrinkA": 14, "shrinkB": 14})
    for k, (x, y) in pos.items():
        kind = "input" if k < 2 else "node"
        ax.text(x, y, f"${names[k]}$" if k < 2 else names[k], ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.4", "fc": _COLORS[kind], "ec": "0.3"})
    ax.text(*out[1], "$c_{k}$", ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.4", "fc": _COLORS["output"], "ec": "0.3"})
    ax.set_xlim(-0.6, n + 1.6)
    ax.set_ylim(-1.8, 1.8)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def draw_genotype(genotype: Genotype, path: str | os.PathLike | None = None, title: str = "") -> bytes:
    """Render the normal (and reduction) cell as a PNG; write it atomically to ``path`` if given.

    Returns:
        The PNG bytes.
    """
    cells = [("normal cell", genotype.normal, genotype.normal_concat)]
    if genotype.reduce:
        cells.append(("reduction cell", genotype.reduce, genotype.reduce_concat))
    width = max(3.0, 1.6 * (len(genotype.normal) + 2))
    fig = Figure(figsize=(width * len(cells), 3.2))
    axes = fig.subplots(1, len(cells), squeeze=False)
    for ax, (name, nodes, concat) in zip(axes[0], cells):
        draw_cell(ax, nodes, concat, name)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data
