"""One writer per output: an OS file lock on `<out>.lock`, held for a command's whole run.

flock(2) belongs to the open file, so it dies with its process: a killed writer never leaves a stale
lock, at most the small file, which the next writer takes over. The holder writes its pid, host,
start time and command into the file, so a refused writer can say who holds the folder.

NFS: Linux clients emulate flock with whole-file POSIX locks that the server arbitrates (NFSv4, or v3
with lockd), so writers on different machines exclude each other. A mount with `local_lock=flock` or
`local_lock=all` (which `nolock` implies) keeps locks on one machine; writing there is refused (see
`local_only_reason`) unless ELR_LOCAL_LOCK_OK=1 says only this machine writes to that folder.
"""

import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager

from .atomic import remove_dead_temps
from .errors import ELRError

LOCAL_OK_ENV = "ELR_LOCAL_LOCK_OK"


class OutputBusyError(ELRError):
    """Another live process holds the output's lock."""


class LockUnsupportedError(ELRError):
    """The file system cannot give a lock that other writers would see."""


def lock_path(out: str) -> str:
    """The lock file of an output folder: beside it, so it covers `<out>.building` and the rename too."""
    return os.path.abspath(out).rstrip(os.sep) + ".lock"


class FileLock:
    """`with FileLock(path, "build-shards"):` an exclusive (or `shared=True`) lock on `path`.

    A busy lock raises OutputBusyError at once, naming `subject` and the holder. On release the file is
    removed when no one else holds it."""

    def __init__(self, path: str, command: str, subject: str | None = None, shared: bool = False):
        self.path, self.command, self.shared = path, command, shared
        self.subject = subject or path
        self.fd = -1

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        folder = os.path.dirname(self.path)
        problem = local_only_reason(folder)
        if problem and os.environ.get(LOCAL_OK_ENV) != "1":
            raise LockUnsupportedError(
                f"{self.subject}: {problem}: a lock there is not seen by other machines, so two writers could "
                f"destroy each other's output; remount with local_lock=none, or set {LOCAL_OK_ENV}=1 if only "
                "this machine writes there")
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputBusyError(f"{self.subject}: {busy_text(self.path)}") from None
                raise LockUnsupportedError(f"{self.path}: cannot lock ({e.strerror}); the file system "
                                           "refuses file locks") from None
            # The holder before us may have removed the file between our open and our lock: then we hold
            # a lock on a file no one else will open. Lock the one at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        if not self.shared:
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            except OSError as e:  # a full disk, say
                self.release()
                raise OSError(e.errno, e.strerror, self.path) from None

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o644)
        except FileNotFoundError:  # a new output in a new folder
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            return os.open(self.path, flags, 0o644)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            # remove the file once no one holds it: a shared holder checks by taking it exclusively
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(self.path)
        except OSError:
            pass  # other shared holders remain (or the file is gone): the last one removes it
        finally:
            os.close(self.fd)
            self.fd = -1


def hold_output(out: str, command: str) -> FileLock:
    """The exclusive lock of output folder `out` for `command` (use as a context manager)."""
    return FileLock(lock_path(out), command, subject=os.path.abspath(out).rstrip(os.sep))


@contextmanager
def hold_alone(folder: str, command: str, parts: str, running_text: str):
    """`folder` alone, for a merge: refused while jobs that share the folder hold the lock of one of its
    `parts` (a glob; each job locks `<part>.lock`), naming them: '<folder>: <running_text>: <part> (pid
    ... on ..., since ...); wait for them to finish'."""
    lock = hold_output(folder, command)
    try:
        lock.acquire()
    except OutputBusyError:
        running = []
        for part_lock in sorted(glob.glob(os.path.join(glob.escape(folder), parts + ".lock"))):
            holder = read_holder(part_lock) if is_held(part_lock) else None
            if holder:
                running.append(f"{os.path.basename(part_lock)[:-5]} (pid {holder['pid']} on {holder['host']}, "
                               f"since {holder['started']})")
        if not running:
            raise
        raise OutputBusyError(f"{folder}: {running_text}: {', '.join(running)}; wait for them to finish") from None
    try:
        yield
    finally:
        lock.release()


class OutputFolder:
    """A run's output folder, held from `claim()` to `close()`: locked, created if missing, the
    temporary files of dead writers removed. A failed run that created the folder removes it again,
    unless it wrote one of `keep` (a checkpoint to resume from, say)."""

    def __init__(self, out: str, command: str, keep: tuple = ()):
        self.out, self.keep = os.path.abspath(out).rstrip(os.sep), keep
        self.lock, self.created = hold_output(out, command), False

    def claim(self) -> "OutputFolder":
        self.lock.acquire()
        try:
            self.created = not os.path.isdir(self.out)
            os.makedirs(self.out, exist_ok=True)
            remove_dead_temps(self.out)
        except BaseException:
            self.lock.release()
            raise
        return self

    def close(self, failed: bool) -> None:
        if self.lock.fd < 0:
            return
        try:
            if failed and self.created and not any(os.path.exists(os.path.join(self.out, k)) for k in self.keep):
                shutil.rmtree(self.out, ignore_errors=True)
        finally:
            self.lock.release()

    def __enter__(self):
        return self if self.lock.fd >= 0 else self.claim()  # `with folder.claim():` works too

    def __exit__(self, exc_type, *exc):
        self.close(failed=exc_type is not None)


def read_holder(path: str) -> dict | None:
    """What the exclusive holder of `path` wrote, or None (a shared holder writes nothing)."""
    for _ in range(20):  # the holder writes just after it locks: give it a moment
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return None
        if text.endswith("\n"):
            try:
                holder = json.loads(text)
                return holder if isinstance(holder, dict) else None
            except ValueError:
                return None
        time.sleep(0.05)
    return None


def busy_text(path: str) -> str:
    holder = read_holder(path)
    if holder is None:
        return f"another process is writing here (it holds {path})"
    return (f"{holder.get('command', 'another process')} is writing here (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish or choose another --out")


def is_held(path: str) -> bool:
    """Whether a live process holds a lock on `path` (shared or exclusive)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ---- which file systems keep locks to one machine ----------------------------------------------


def local_only_reason(folder: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Why a flock in `folder` would be local to this machine (an NFS or Lustre mount option), or None."""
    try:
        with open(mountinfo) as f:
            text = f.read()
    except OSError:
        return None  # not Linux: flock is what the platform gives
    mount = mount_of(os.path.realpath(folder), text)
    if mount is None:
        return None
    point, fstype, options = mount
    if fstype.startswith("nfs"):
        local = options.get("local_lock")
        if local in ("flock", "all"):
            return f"NFS mount {point} has local_lock={local}"
    if fstype == "lustre" and ("localflock" in options or "noflock" in options):
        return f"Lustre mount {point} has {'localflock' if 'localflock' in options else 'noflock'}"
    return None


def mount_of(path: str, mountinfo: str):
    """(mount point, fs type, {option: value}) of the mount holding `path`, from mountinfo text."""
    best = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 6 or len(rest) < 3:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):  # the last of equal points is on top
            options = {}
            for opt in (fields[5] + "," + rest[2]).split(","):
                key, _, value = opt.partition("=")
                options[key] = value
            best = (point, rest[0], options)
    return best
