"""The ``dask`` executor: one calibration's candidates spread over a Dask distributed cluster.

Local (``executor: {name: dask, workers: 4}``) starts a loopback ``LocalCluster`` for the run and
stops it at the end; remote (``options: {scheduler: "tcp://host:8786"}``) uses a cluster that is
already running, on any number of machines, and leaves it running. The optimiser, the checkpoint
and the run directory stay in the run's process; workers build the objective once each, from the
same recipe as the ``process`` executor's workers, and keep it for the run.

This module only registers the executor: ``dask`` and ``distributed`` are imported when a run
uses it, so calibri starts without them (``pip install 'calibri[dask]'``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from calibri.core.errors import PluginError
from calibri.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from calibri.core.executor import Executor, ObjectiveRecipe


def dask_executor(recipe: "ObjectiveRecipe", *, workers: int = 1, devices: list[str] | None = None,
                  scheduler: str | None = None, chunk_size: int | None = None, retries: int = 2,
                  task_timeout: float | None = None, resources: dict[str, float] | None = None,
                  connect_timeout: float = 30.0, worker_wait: float = 60.0,
                  dashboard: str | None = "127.0.0.1:8787", run_dir: str | Path | None = None) -> "Executor":
    """A Dask distributed cluster: a local one per run, or an existing one by scheduler address.

    Options (all under ``executor.options``): ``scheduler`` the address of a running cluster
    (omitted: a loopback ``LocalCluster`` of ``executor.workers`` workers, or one per entry of
    ``executor.devices``); ``chunk_size`` candidates per task (default: about four tasks per
    worker and round); ``retries`` how often a chunk whose worker died is re-run (a local
    cluster's ``allowed-failures``; a remote scheduler's own setting applies there);
    ``task_timeout`` seconds a chunk may evaluate before it fails and its worker is restarted;
    ``resources`` what each chunk needs of a worker (default: ``{GPU: 1}`` when the cluster's
    workers advertise ``GPU``); ``connect_timeout`` seconds to reach the scheduler;
    ``worker_wait`` seconds a round waits while no worker can take its chunks; ``dashboard``
    the local cluster's dashboard address (``null``: none).
    """
    try:
        from .executor import DaskExecutor
    except ModuleNotFoundError as exc:
        raise PluginError(f"executor 'dask' needs the package {exc.name!r}, which is not installed "
                          f"(try: pip install 'calibri[dask]')") from None
    return DaskExecutor(recipe, workers=workers, devices=devices, scheduler=scheduler, chunk_size=chunk_size,
                        retries=retries, task_timeout=task_timeout, resources=resources,
                        connect_timeout=connect_timeout, worker_wait=worker_wait, dashboard=dashboard,
                        run_dir=run_dir)


@hookimpl
def calibri_register_executors(register):
    register("dask", dask_executor)
