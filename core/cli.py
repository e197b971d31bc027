"""The ``calibri`` command. Sub-commands come from the ``calibri_register_commands`` hook, the
built-in ones included. User mistakes print one line and exit 2; tracebacks are for bugs."""
from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _format_warning
    try:
        cli = build_cli()
    except CalibriError as exc:
        click.echo(f"calibri: error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    cli.main(args=argv, prog_name="calibri")


if __name__ == "__main__":  # pragma: no cover
    main()
