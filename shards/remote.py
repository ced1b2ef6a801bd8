"""Remote shard sets through fsspec: http(s)://, s3:// (s3fs), gs:// (gcsfs), any URL fsspec knows.

Every request is retried with exponential backoff on transient failures (a refused connection, a
reset, a timeout, a 5xx answer); what fails for good (404, 403), or still fails after the last retry,
is one RemoteError naming the URL. Reads are byte ranges, so a stream that starts mid-shard reads
only its samples (the manifest records each sample's offset); a server that ignores ranges
(`python -m http.server`) is detected, and its whole file is read instead.
"""

import os
import time

from .errors import RemoteError

# Retries per request, and the first wait (doubled each time, at most 8 s): 5 and 0.5 s wait up to
# 15.5 s in all, which rides out a server restart. Set through the environment for every process of
# a run (loader workers and ranks inherit it).
RETRIES = int(os.environ.get("ELR_REMOTE_RETRIES", 5))
BACKOFF = float(os.environ.get("ELR_REMOTE_BACKOFF", 0.5))
_NO_RANGES = set()  # URLs whose server answered a range request with the whole file


def ignores_ranges(url: str) -> bool:
    """Whether this URL's server answered a range request with the whole file (then read it whole)."""
    return url in _NO_RANGES


def is_url(path: str) -> bool:
    """A remote location (local paths and file:// URLs are read directly)."""
    return "://" in path and not path.startswith("file://")


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # s3:// without s3fs, gs:// without gcsfs, http:// without aiohttp
        raise RemoteError(f"{url}: cannot read this kind of URL here ({e})") from None
    except ValueError as e:
        raise RemoteError(f"{url}: not a URL fsspec can read ({e})") from None


def _is_permanent(e: BaseException) -> bool:
    """Errors a retry cannot mend: a missing object, no permission, a 4xx answer."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    status = getattr(e, "status", None) or getattr(e, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _describe(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):  # fsspec's message is the URL itself
        return "not found (404 / no such key)"
    return f"{type(e).__name__}: {' '.join(str(e).split()) or 'no details'}"


def with_retries(url: str, fn):
    """fn() with bounded retries; a failure is RemoteError naming `url`."""
    delay, started = BACKOFF, time.monotonic()
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except RemoteError:
            raise
        except Exception as e:  # fsspec backends raise OSError, aiohttp, botocore, asyncio errors
            if _is_permanent(e):
                raise RemoteError(f"{url}: {_describe(e)}") from None
            if attempt == RETRIES:
                raise RemoteError(f"{url}: {_describe(e)} (gave up after {RETRIES + 1} attempts in "
                                  f"{time.monotonic() - started:.1f} s)") from None
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end) of a remote file (the whole file without a range), with retries."""
    fs, path = _filesystem(url)
    if start is None or url in _NO_RANGES:
        data = with_retries(url, lambda: fs.cat_file(path))
        return data if start is None else _slice(url, data, start, end)
    data = with_retries(url, lambda: fs.cat_file(path, start=start, end=end))
    if len(data) != end - start:  # the server ignored the range and sent the whole file
        _NO_RANGES.add(url)
        data = _slice(url, data, start, end)
    return data


def download(url: str, local: str) -> None:
    """The whole remote file into `local`, one request streamed to disk (a file's size never sits in
    memory); a failure mid-way retries from the start."""
    fs, path = _filesystem(url)
    with_retries(url, lambda: fs.get_file(path, local))


def _slice(url: str, data: bytes, start: int, end: int) -> bytes:
    if len(data) < end:
        raise RemoteError(f"{url}: {len(data)} bytes, expected at least {end} (truncated, or changed since the manifest)")
    return data[start:end]
