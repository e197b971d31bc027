"""The ``calibri`` command. Sub-commands come from the ``calibri_register_commands`` hook, the
built-in ones included. User mistakes print one line and exit 2; tracebacks are for bugs."""
from __future__ import annotations

import os
import sys
import warnings

import click

from .errors import CalibriError


class _CalibriGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CalibriError as exc:
            click.echo(f"calibri: error: {one_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:  # an option of the wrong type: the same one line as any mistake
            where = f"calibri {exc.ctx.info_name}: " if exc.ctx is not None and exc.ctx is not ctx else ""
            click.echo(f"calibri: error: {where}{one_line(exc.format_message())} (see --help)", err=True)
            ctx.exit(exc.exit_code)


def one_line(text: str) -> str:
    """Messages are printed on one line; a multi-line one (an objective's traceback text) is joined."""
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"{message}\n" if str(message).startswith("calibri:") else \
        f"{filename}:{lineno}: {category.__name__}: {message}\n"


def build_cli() -> click.Group:
    from . import __version__
    from .plugins import get_registry

    @click.group(cls=_CalibriGroup, help="Black-box optimisation with pluggable spaces, objectives and optimisers.")
    @click.version_option(__version__, prog_name="calibri")
    def cli() -> None:
        pass

    for registration in get_registry().items("commands"):
        cli.add_command(registration.factory)
    return cli


def importable_working_directory() -> None:
    """Let modules in the working directory import, as ``python -m`` does: a user's
    ``function: mymodule:loss`` or ``plugins: [mymodule]`` usually lives there. Appended, so a
    stray file cannot shadow an installed package; process workers inherit ``sys.path``."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _format_warning
    importable_working_directory()
    try:
        cli = build_cli()
    except CalibriError as exc:
        click.echo(f"calibri: error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    cli.main(args=argv, prog_name="calibri")


if __name__ == "__main__":  # pragma: no cover
    main()
