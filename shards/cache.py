"""A machine-local cache of remote tar shards, within a size limit: `--cache-dir DIR --cache-limit SIZE`
(or ELR_CACHE_DIR / ELR_CACHE_LIMIT, which a cluster sets once for every rank and loader worker).

A remote shard is downloaded once per machine and then read like a local shard (mapped, no range
requests). Entries are named by the sha256 the manifest records, so the same shard of two sets, or of
two runs, is one file, and a changed shard is another. For each entry, in DIR:
    <sha256>.tar                      the shard, trusted only beside its stamp
    <sha256>.ok                       {size, mtime_ns, inode} of the .tar when its hash was checked; its
                                      mtime is the entry's last use (least recently used goes first)
    <sha256>.lock                     flock: taken alone to download or evict, shared to read
    <sha256>.tar.partial-<pid>-<hex>  a download in progress (one GET streamed to disk, renamed only once
                                      its sha256 matches), and beside it its reservation: a sparse file of
                                      the shard's full size, made when it starts
    .room.lock                        flock: held while a download makes and reserves its room
Why it cannot fail the ways the peers' caches did:
  - one download per shard per machine: every process takes the entry's lock alone before fetching,
    and finds the shard there once it gets it;
  - a killed download leaves only a temporary name, which no reader trusts and the next downloader of
    that entry removes (it holds the lock, so no live writer owns it);
  - a cached file changed on disk (another size, inode or mtime than its stamp) is hashed again, and
    fetched again if it no longer matches;
  - eviction deletes only entries of this cache (named by a sha256), never a local set's file, and
    never one a reader holds (a reader holds the entry's lock shared while it reads the file);
  - a limit too small for the shards one step reads at once is refused before the run starts.
"""

import errno
import json
import os
import re
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from . import remote
from .atomic import disk_full, is_temp, remove_dead_temps, remove_quietly, temp_path, write_json_atomic
from .errors import ELRError, RemoteError
from .manifest import file_sha256

ENV_DIR, ENV_LIMIT = "ELR_CACHE_DIR", "ELR_CACHE_LIMIT"
ROOM_LOCK = ".room.lock"  # held while a download makes and reserves its room
_ENTRY = re.compile(r"^[0-9a-f]{64}\.tar$")
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


class CacheError(ELRError):
    """A cache that cannot work as asked (a limit too small, a folder that cannot be written)."""


def parse_size(text: str, flag: str = "--cache-limit") -> int:
    """'50GB', '500MiB', '1.5T', '1000000' -> bytes (decimal units as disks are sold; KiB, MiB, ... binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?)?[bB]?\s*", str(text))
    if not m:
        raise CacheError(f"{flag}: {text!r} is not a size (examples: 50GB, 500MiB, 2T, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


@dataclass(frozen=True)
class ShardCache:
    """The cache folder and its limit: small and picklable, so ranks and loader workers carry it."""
    root: str
    limit: int

    @classmethod
    def from_options(cls, cache_dir: str | None, cache_limit: str | None) -> "ShardCache | None":
        """The cache of the command line's options, else of the environment, else None (no cache)."""
        cache_dir = cache_dir or os.environ.get(ENV_DIR)
        if not cache_dir:
            if cache_limit:
                raise CacheError("--cache-limit needs --cache-dir (or ELR_CACHE_DIR)")
            return None
        limit_text = cache_limit or os.environ.get(ENV_LIMIT)
        if not limit_text:
            raise CacheError(f"--cache-dir {cache_dir}: give --cache-limit (or {ENV_LIMIT}), e.g. --cache-limit 200GB")
        limit = parse_size(limit_text)
        if limit <= 0:
            raise CacheError(f"--cache-limit: {limit_text!r} must be more than 0")
        root = os.path.abspath(cache_dir)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise CacheError(f"--cache-dir {cache_dir}: cannot create it ({e.strerror or e})") from None
        if not os.access(root, os.W_OK):
            raise CacheError(f"--cache-dir {cache_dir}: not writable")
        return cls(root, limit)

    def check_room(self, shard_bytes: list, at_once: int, why: str = "") -> None:
        """Refuse a limit below what `at_once` shards read together can take (the largest of them);
        `why`: what reads them together, when not a step's streams."""
        need = sum(sorted(shard_bytes, reverse=True)[:at_once])
        if need > self.limit:
            why = why or f"a step can read {at_once} shards at once ({human(need)} for the largest)"
            raise CacheError(f"--cache-limit {human(self.limit)} is too small: {why}; give at least --cache-limit {need}")

    def _path(self, sha: str, ext: str) -> str:
        return os.path.join(self.root, f"{sha}.{ext}")

    # -- reading -----------------------------------------------------------------------------------

    @contextmanager
    def open(self, url: str, sha256: str, size: int):
        """`with cache.open(url, sha, size) as path:` a trusted local copy of the shard at `url`,
        downloaded first if need be; it is not evicted until the block ends."""
        while True:
            self.fetch(url, sha256, size)
            with _flock(self._path(sha256, "lock"), shared=True):
                path = self._path(sha256, "tar")
                if self._trusted(path, sha256):  # not evicted between the fetch and the lock
                    yield path
                    return

    def fetch(self, url: str, sha256: str, size: int) -> str:
        """Download the shard into the cache unless a trusted copy is there; returns its path."""
        path = self._path(sha256, "tar")
        if self._trusted(path, sha256):
            self._touch(sha256)
            return path
        os.makedirs(self.root, exist_ok=True)  # removed since the run started, or never made (a library caller)
        with _flock(self._path(sha256, "lock")):
            if os.path.exists(path) and not self._trusted(path, sha256):
                if file_sha256(path) == sha256:  # changed stat, same bytes (copied back, touched)
                    self._stamp(path, sha256)
                else:
                    self._remove(sha256)
            if not self._trusted(path, sha256):
                remove_dead_temps(self.root, prefix=f"{sha256}.tar")  # killed downloads: we hold the lock
                # room is made and reserved under one lock of the whole cache: a reservation file of the
                # shard's full size, so a download beside this one counts these bytes as taken
                with _flock(os.path.join(self.root, ROOM_LOCK)):
                    self.make_room(size, keep=sha256)
                    reserved = temp_path(path)
                    with open(reserved, "wb") as f:
                        f.truncate(size)  # sparse: counted at its full size, no blocks written
                self._download(url, path, reserved, sha256, size)
                self._stamp(path, sha256)
            self._touch(sha256)
        return path

    def _download(self, url: str, path: str, reserved: str, sha256: str, size: int) -> None:
        """Stream the shard into a second temporary file beside the reservation (which keeps its room
        counted until the end), check its size and sha256, then rename it into place."""
        tmp = temp_path(path)
        try:
            remote.download(url, tmp)
            got, digest = os.path.getsize(tmp), file_sha256(tmp)
            if got != size or digest != sha256:
                raise RemoteError(f"{url}: {got} bytes with sha256 {digest[:12]}…, the manifest says {size} "
                                  f"bytes, {sha256[:12]}… (changed since the manifest was written, or damaged)")
            os.replace(tmp, path)
        except RemoteError:
            if disk_full(path):  # the local write failed, not the server: name the cache file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
            raise
        except OSError as e:  # a full disk names the cache file
            raise OSError(e.errno, e.strerror or str(e), path) from None
        finally:
            remove_quietly(tmp)
            remove_quietly(reserved)

    # -- the stamp: what "trusted" means -----------------------------------------------------------

    def _trusted(self, path: str, sha256: str) -> bool:
        try:
            with open(self._path(sha256, "ok")) as f:
                return json.load(f) == _file_stamp(path)
        except (OSError, ValueError):
            return False

    def _stamp(self, path: str, sha256: str) -> None:
        write_json_atomic(self._path(sha256, "ok"), _file_stamp(path))

    def _touch(self, sha256: str) -> None:
        with suppress(OSError):
            os.utime(self._path(sha256, "ok"))

    def _remove(self, sha256: str) -> None:
        remove_quietly(self._path(sha256, "ok"))  # untrusted first, then gone
        remove_quietly(self._path(sha256, "tar"))

    # -- the limit ---------------------------------------------------------------------------------

    def entries(self) -> list:
        """[(last use, bytes, sha256)] of the cached shards, least recently used first."""
        found = []
        with os.scandir(self.root) as it:
            for e in it:
                if _ENTRY.match(e.name):
                    sha = e.name[:-4]
                    with suppress(OSError):
                        used = os.stat(self._path(sha, "ok")).st_mtime_ns if os.path.exists(self._path(sha, "ok")) else 0
                        found.append((used, e.stat().st_size, sha))
        return sorted(found)

    def downloading(self, keep: str | None = None) -> int:
        """Bytes reserved by downloads in progress (a reservation of the shard's full size and the growing
        download beside it, counted once). A temporary file whose entry nobody holds was left by a killed
        process: it is removed instead (not `keep`'s: its downloader, the caller, holds that entry and has
        removed its dead ones)."""
        reserved = {}  # sha -> bytes
        with os.scandir(self.root) as it:
            for e in it:
                sha = e.name[:64]
                if not (is_temp(e.name) and e.name[64:].startswith(".tar.partial-")) or sha == keep:
                    continue
                with _flock(self._path(sha, "lock"), wait=False) as free:
                    if free:
                        remove_quietly(e.path)
                    else:
                        with suppress(OSError):
                            reserved[sha] = max(reserved.get(sha, 0), e.stat().st_size)
        return sum(reserved.values())

    def make_room(self, incoming: int, keep: str | None = None) -> None:
        """Evict least recently used entries until `incoming` more bytes fit under the limit, counting the
        downloads in progress; an entry being read or downloaded is skipped (then the cache stays over
        its limit until it is free). Call it holding the room lock (see fetch)."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries) + self.downloading(keep)
        for _, size, sha in entries:
            if total + incoming <= self.limit:
                return
            if sha == keep:
                continue
            with _flock(self._path(sha, "lock"), wait=False) as held:
                if held:
                    self._remove(sha)
                    total -= size


def _file_stamp(path: str) -> dict:
    """What a checked copy must still be: its size, mtime and inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


@contextmanager
def _flock(path: str, shared: bool = False, wait: bool = True):
    """flock on `path` (created if missing) for the block; yields whether it is held (always, if
    `wait`; else False at once when anyone holds it). Lock files stay: one empty file per entry ever
    cached; removing one could let two processes lock two inodes of one name."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
