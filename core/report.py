"""Pictures of a run: the convergence curve (values and best-so-far against evaluations)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .store import RunStore


def pyplot(what: str) -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None (with a warning naming ``what``
    would have been drawn) when matplotlib is not installed: plots are optional extras."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"calibri: matplotlib is not installed, so no {what} "
                      "(pip install 'calibri[plots]')", RuntimeWarning, stacklevel=3)
        return None
    return plt


def plot_convergence(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """Write ``convergence.png`` in the run directory (or ``path``); None without matplotlib."""
    plt = pyplot("convergence.png")
    if plt is None:
        return None
    store = RunStore(run_dir)
    trials = store.read_trials()
    best = store.read_best() or {}
    maximize = best.get("direction") == "maximize"
    xs, values, running, best_so_far = [], [], [], None
    for trial in trials:
        if trial.get("status") != "ok":
            continue
        value = trial["value"]
        best_so_far = value if best_so_far is None else (max if maximize else min)(best_so_far, value)
        xs.append(trial["candidate"] + 1)
        values.append(value)
        running.append(best_so_far)
    out = Path(path) if path is not None else store.path / "convergence.png"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.scatter(xs, values, s=6, alpha=0.35, color="tab:gray", label="evaluations")
    ax.plot(xs, running, color="tab:blue", linewidth=2, label="best so far")
    if values and not maximize and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("value (higher is better)" if maximize else "value (lower is better)")
    ax.set_title(f"{store.path.name}: {len(trials)} evaluations")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


class ConvergencePlot:
    """Writes ``convergence.png`` into the run directory when the run ends."""

    def __init__(self) -> None:
        self._run_dir: str | None = None

    def on_run_start(self, info: Any) -> None:
        self._run_dir = info.run_dir

    def on_run_end(self, summary: Any) -> None:
        if self._run_dir is not None:
            plot_convergence(self._run_dir)

    on_run_interrupted = on_run_end  # Ctrl-C: the curve up to the newest checkpoint
