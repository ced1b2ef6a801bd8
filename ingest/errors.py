"""The one place where library errors become the CLIs' one-line `Error: ...` and exit 1."""

import click

from shards.errors import ELRError


def call(fn, *args, **kwargs):
    """Call a library function; domain errors and bad values become one `Error:` line, exit 1."""
    try:
        return fn(*args, **kwargs)
    except (ELRError, ValueError) as e:
        raise click.ClickException(str(e)) from None
