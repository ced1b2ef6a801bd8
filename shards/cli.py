"""The command lines' error boundary: a user's mistake is one `Error: ...` line and a nonzero exit."""

import sys

import click

from .errors import ELRError


def call(fn, *args, **kwargs):
    """Call a library function; domain errors, bad values and file system errors (a full disk, a
    path that is not a folder: their message names the file) become one `Error:` line, exit 1."""
    try:
        return fn(*args, **kwargs)
    except (ELRError, ValueError, OSError) as e:
        raise click.ClickException(error_text(e)) from None


def error_text(e: BaseException) -> str:
    """An exception as one line; OSErrors name their file."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def run_command_line(group: click.Group, argv=None) -> None:
    """Run a click group as a console script: usage mistakes too are one `Error:` line (exit 2),
    not click's usage block."""
    try:
        code = group.main(args=argv, standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
