"""``calibri bench``: optimisers × problems × budgets × seeds, run as ordinary calibri runs (in
parallel, resumable) and reported with the field's views (runtime ECDFs over BBOB targets,
fixed-budget convergence, ERT and success rates per target, ECDFs per BBOB function group,
rankings with paired sign tests + Holm, win rates, overhead). Calibration problems (a Calibri run
YAML) are reported on their own axes: training images to reach the reference set-up's held-out
validation reward, with paired sign tests over seeds.

Modules: :mod:`.config` (the YAML), :mod:`.cells` (the matrix), :mod:`.runner` (the process
pool), :mod:`.analysis` (the numbers), :mod:`.export` (CSV, IOHprofiler, COCO), :mod:`.report`
(markdown + PNGs), :mod:`.bench` (all of it), :mod:`.commands` (the CLI). See docs/bench.md.
"""
from __future__ import annotations

from calibri.core.hookspecs import hookimpl


@hookimpl
def calibri_register_commands(register):
    from .commands import bench_command

    register(bench_command)
