"""Before/after images of a calibration run for the monitors: the model as shipped next to the
currently selected point, on a few fixed held-out prompts and seeds.

The run's objective is rebuilt from its run directory once, the first time images are asked for
(:func:`calibri.plugins.dit.report.load_run_objective`), in this process; the baseline's images
are made once and kept. Runs of other objectives get no images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def is_calibration_run(run_dir: str | Path) -> bool:
    from calibri.core.config import read_yaml

    objective = read_yaml(Path(run_dir) / "config.yaml").get("objective")
    return isinstance(objective, dict) and objective.get("name") == "calibri"


class BeforeAfter:
    """Makes baseline-vs-point image grids (matplotlib figures) for one run directory."""

    def __init__(self, run_dir: str | Path, count: int, device: str | None = None) -> None:
        self.run_dir, self.count, self.device = Path(run_dir), count, device
        self._objective: Any = None
        self._prompts: list[str] = []
        self._seed = 0
        self._before: Any = None

    def _load(self) -> None:
        from calibri.plugins.dit.report import grid_pick, held_out, load_run_objective

        self._objective, stream, _ = load_run_objective(self.run_dir, self.device)
        prompts, _, self._seed = held_out(stream)
        self._prompts = grid_pick(prompts, self.count)
        self._before = self._objective.images(None, self._prompts, self._seed)

    def figure(self, params: dict[str, Any], label: str = "selected") -> Any:
        """The grid for ``params`` (top: baseline, bottom: ``params``), or None without matplotlib."""
        from calibri.core.report import pyplot
        from calibri.plugins.dit.report import grid_figure

        plt = pyplot("image grid")
        if plt is None:
            return None
        if self._objective is None:
            self._load()
        after = self._objective.images(params, self._prompts, self._seed)
        return grid_figure(self._prompts, self._before, after, self._objective.step_counts[0], plt,
                           labels=("baseline", label))

    def close(self) -> None:
        if self._objective is not None:
            self._objective.close()
            self._objective = None
