"""The ``calibri bench`` command."""
from __future__ import annotations

import re
from pathlib import Path

import click


class ThreadsParam(click.ParamType):
    """``auto``, ``inherit`` or a positive number of threads."""

    name = "auto|inherit|N"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        text = str(value).strip()
        if text in ("auto", "inherit"):
            return text
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"expected auto, inherit or a number of threads (1 or more), got {value!r}", param, ctx)


@click.command("bench")
@click.argument("config_path", metavar="BENCH.yaml", type=click.Path())
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("-o", "--output", "bench_dir", type=click.Path(), help="Bench directory (default: bench-results/<name>).")
@click.option("-j", "--workers", type=click.IntRange(min=1), help="Cells run in parallel (default: the YAML's "
                                                                  "workers, else the available cores).")
@click.option("--threads", type=ThreadsParam(), help="BLAS/OpenMP/torch threads of each parallel cell: auto (the "
                                                    "cores split between cells; the default), a number, or inherit.")
@click.option("--report-only", is_flag=True, help="Rebuild the exports and report from the finished cells.")
@click.option("--no-report", is_flag=True, help="Run the cells only.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bench_command(config_path: str, overrides: tuple[str, ...], bench_dir: str | None, workers: int | None,
                  threads: int | str | None, report_only: bool, no_report: bool, quiet: bool) -> None:
    """Benchmark optimisers: every problem × optimiser × seed of BENCH.yaml as calibri runs (in
    parallel, resumable: finished cells are not rerun), then a report with runtime ECDFs,
    convergence curves, rankings per budget and overhead per evaluation."""
    from .bench import run_bench
    from .config import load_bench

    config = load_bench(config_path, overrides)
    if bench_dir is None:
        stem = config.name or Path(config_path).stem
        bench_dir = str(Path("bench-results") / re.sub(r"[^A-Za-z0-9._-]+", "-", stem))
    result = run_bench(config, bench_dir, workers=workers, progress=not quiet, run=not report_only,
                       report=not no_report, export=not no_report, threads=threads)
    click.echo(f"{result['cells']} cells: {result['ran']} run, {result['skipped']} already finished, "
               f"{len(result['failed'])} failed")
    if result.get("report"):
        click.echo(f"report: {result['report']}")
    click.echo(f"bench directory: {result['bench_dir']}")
    if result.get("error") is not None:
        raise result["error"]
