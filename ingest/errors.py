"""The one place where library errors become the CLIs' one-line `Error: ...` and exit 1."""

import click

from shards.errors import ELRError


def call(fn, *args, **kwargs):
    """Call a library function; domain errors, bad values and file system errors (a full disk, a
    path that is not a folder: their message names the file) become one `Error:` line, exit 1."""
    try:
        return fn(*args, **kwargs)
    except (ELRError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
