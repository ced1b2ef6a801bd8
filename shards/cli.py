"""The error boundary of every entry point (elr-ingest, elr-eval, elr-train and its worker processes):
a user's mistake is one `Error: ...` line and a nonzero exit; a traceback is for bugs only."""

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


class Reported(click.ClickException):
    """An error another process of the same run has already printed: exit 1, print nothing."""

    def __init__(self):
        super().__init__("")


def exit_on_error(fn):
    """fn() as the body of an entry point: its result, or one `Error:` line (none for Reported) and
    the exit status (1, 2 for a usage mistake, 130 when interrupted)."""
    try:
        return fn()
    except Reported:
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("Error: interrupted", err=True)
        sys.exit(130)


def run_command_line(command: click.Command, argv=None, prog_name: str | None = None) -> None:
    """Run a click command or group as a console script: usage mistakes too are one `Error:` line
    (exit 2), not click's usage block."""
    code = exit_on_error(lambda: command.main(args=argv, prog_name=prog_name, standalone_mode=False))
    sys.exit(code if isinstance(code, int) else 0)
