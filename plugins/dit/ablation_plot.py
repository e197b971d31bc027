"""The ablation heat-map: sites × values, colour = paired difference to identity."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calibri.core.report import pyplot
from calibri.core.store import atomic_write_bytes

from .ablation_stats import CellResult


def plot_heatmap(results: Sequence[CellResult], sites: Sequence[str], values: Sequence[float], path: Path,
                 maximize: bool, title: str, alpha: float) -> Path | None:
    """Write the heat-map PNG (atomically); None without matplotlib. Blue is better than the
    identity in the reward's direction, red worse; ``*`` marks cells significant after Holm at
    ``alpha``; a grey cell failed. The colour scale is linear within twice the cells' typical
    standard error and logarithmic beyond, so a branch switched off (often a large loss) does not wash out
    the small effects of re-weighting; the numbers in the cells are the differences themselves."""
    plt = pyplot(path.name)
    if plt is None:
        return None
    from matplotlib.colors import SymLogNorm
    from matplotlib.ticker import FuncFormatter

    grid = np.full((len(sites), len(values)), np.nan)
    marks: dict[tuple[int, int], CellResult] = {}
    row_of, col_of = {s: i for i, s in enumerate(sites)}, {v: j for j, v in enumerate(values)}
    for result in results:
        if result.site is None or result.site not in row_of or result.value not in col_of:
            continue
        i, j = row_of[result.site], col_of[result.value]
        marks[(i, j)] = result
        if result.ok:
            grid[i, j] = result.diff
    finite = grid[np.isfinite(grid)]
    reach = float(np.max(np.abs(finite))) if finite.size and np.max(np.abs(finite)) > 0 else 1.0
    noise = [r.diff_sem for r in marks.values() if r.ok and r.diff_sem]
    linear = min(2.0 * float(np.median(noise)), reach) if noise else reach
    cmap = plt.get_cmap("RdBu" if maximize else "RdBu_r").with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=(1.1 * len(values) + 3.2, 0.42 * len(sites) + 1.9), dpi=110)
    norm = SymLogNorm(linear, vmin=-reach, vmax=reach)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for (i, j), result in marks.items():
        if not result.ok:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="grey", lw=0))
            ax.text(j, i, "failed", ha="center", va="center", fontsize=7)
            continue
        dark = abs(float(norm(result.diff)) - 0.5) > 0.3  # white text on the deep colours
        ax.text(j, i, f"{result.diff:+.3f}{'*' if result.significant else ''}", ha="center", va="center",
                fontsize=7, color="white" if dark else "black", fontweight="bold" if result.significant else "normal")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels([f"{v:g}" for v in values])
    ax.set_yticks(range(len(sites)))
    ax.set_yticklabels(sites, fontsize=8)
    ax.set_xlabel("value the site is set to (all other sites at identity)")
    ax.set_title(f"{title}\n* significant: Holm-adjusted p < {alpha:g}", fontsize=9)
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: "0" if x == 0 else f"{x:+.2g}"))
    bar.set_label(f"mean paired difference to identity (blue: better, red: worse)\n"
                  f"linear within ±{linear:.2g} (twice the median s.e.), logarithmic beyond", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
