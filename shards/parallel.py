"""Run a list of tasks on dask.distributed (a LocalCluster by default) with a progress bar."""

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from .progress import Progress

from .memory import keep_freed_memory

GPU = "GPU"  # the worker resource that says a worker has a GPU of its own (dask's worker resources)


class Workers:
    """Where a command's tasks run. `client` waits for a local cluster that is still starting;
    `local` says the workers are processes of this machine that this command started."""

    def __init__(self, client=None, starting=None):
        self._client, self._starting = client, starting
        self.local = starting is not None

    @property
    def client(self):
        if self._client is None:
            self._client = self._starting.result()[1]  # re-raises a failed start
        return self._client


def _start_local_cluster(n: int, gpu_workers: bool = False):
    from dask.distributed import Client, LocalCluster

    # processes: tar writing and npy decoding hold the GIL, threads would not scale;
    # worker logs are silenced because a task's error reaches the caller as the exception itself
    # no dashboard, and its HTTP server (health checks) on a free port: a second cluster on this
    # machine would otherwise warn that 8787 is taken
    quiet = dict(dashboard_address=None, silence_logs=logging.CRITICAL,
                 scheduler_kwargs={"dashboard": False, "dashboard_address": ":0"})
    environ = dict(os.environ)
    if gpu_workers:  # one worker per GPU, each with a GPU resource and a share of the cores
        try:
            from dask_cuda import LocalCUDACluster  # pins each worker to its GPU (CUDA_VISIBLE_DEVICES)

            cluster = LocalCUDACluster(n_workers=n, resources={GPU: 1}, **quiet)
        except ImportError:
            cluster = LocalCluster(n_workers=n, threads_per_worker=max(1, (os.cpu_count() or 1) // n), processes=True,
                                   resources={GPU: 1}, **quiet)
    else:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, **quiet)
    # dask's nanny sets OMP/MKL_NUM_THREADS=1 and malloc settings in *this* process's environment for
    # the workers it spawns; a process this command starts later would inherit them (under
    # MKL_NUM_THREADS=1 torch runs on one thread: measured, C3D at half speed in a child)
    for key in set(os.environ) | set(environ):  # key by key: the calling thread may be reading it
        if key not in environ:
            del os.environ[key]
        elif os.environ.get(key) != environ[key]:
            os.environ[key] = environ[key]
    try:
        return cluster, Client(cluster)
    except BaseException:
        cluster.close()
        raise


def _stop_local_cluster(starting, quiet: bool) -> None:
    try:
        cluster, client = starting.result()  # a cluster still starting is waited for, then closed
    except Exception:
        if quiet:  # the caller is already failing: its error is the one to report
            return
        raise
    client.close()
    cluster.close()


@contextmanager
def start_workers(workers: int = 0, scheduler: str | None = None, client=None, gpu_workers: int = 0):
    """Workers for a command: `client` itself if given, else one connected to `scheduler`, else a
    local process cluster (or `gpu_workers` workers with a GPU resource each), started in a thread so
    that the caller's own work (scanning the source headers, say) overlaps its start-up (0.6-1.3 s on
    2 cores)."""
    if workers < 0:
        raise ValueError(f"--dask-workers must be >= 0 (0: one per core), got {workers}")
    if client is not None:
        yield Workers(client)
        return
    if scheduler:
        from dask.distributed import Client

        with Client(scheduler) as client:
            yield Workers(client)
        return
    starter = ThreadPoolExecutor(1, thread_name_prefix="dask-start")
    if gpu_workers:
        starting = starter.submit(_start_local_cluster, gpu_workers, True)
    else:
        starting = starter.submit(_start_local_cluster, workers or os.cpu_count() or 1)
    starter.shutdown(wait=False)  # its thread ends once the cluster is up
    try:
        yield Workers(starting=starting)
    except BaseException:
        _stop_local_cluster(starting, quiet=True)
        raise
    _stop_local_cluster(starting, quiet=False)


@contextmanager
def dask_client(workers: int = 0, scheduler: str | None = None, client=None, gpu_workers: int = 0):
    """A dask Client: `client` itself if given, else one connected to `scheduler`, else a local process cluster."""
    with start_workers(workers, scheduler, client, gpu_workers) as w:
        yield w.client


def gpu_worker_count(client) -> int:
    """How many workers of the cluster declare a GPU resource (dask-worker --resources GPU=1)."""
    return sum(1 for w in client.scheduler_info()["workers"].values() if w.get("resources", {}).get(GPU, 0) > 0)


def job_index_from_env() -> int | None:
    """SLURM arrays and Kubernetes indexed jobs say which job this is."""
    for var in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def _in_worker(fn, *args):
    keep_freed_memory()  # on any cluster: dask's nanny starts workers with malloc settings that undo it
    return fn(*args)


def run_tasks(client, calls, desc: str, total: int, progress: bool = True, count=lambda r: 1, nbytes=lambda r: 0,
              unit: str = "video", each=None):
    """Submit `calls` [(fn, args...)] and return their results in order.

    The bar advances by `count(result)` (videos, say) and shows MB from `nbytes(result)`; `each(i,
    result)` is called as call i finishes (a journal records it there: a killed run keeps it).
    The first failure cancels the rest and is raised as it was raised in the worker.
    """
    from dask.distributed import as_completed

    futures = [client.submit(_in_worker, fn, *args, pure=False) for fn, *args in calls]
    index = {f.key: i for i, f in enumerate(futures)}
    results = [None] * len(futures)
    done_bytes = 0
    with Progress(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr, leave=False) as bar:
        try:
            for future in as_completed(futures):
                result = future.result()  # re-raises the worker's exception
                results[index[future.key]] = result
                if each is not None:
                    each(index[future.key], result)
                done_bytes += nbytes(result)
                bar.update(count(result))
                bar.set_postfix_str(f"{done_bytes / 1e6:,.0f} MB")
        except BaseException:
            client.cancel(futures)
            drain_workers(client)
            raise
    return results


def run_here(calls, desc: str, total: int, progress: bool = True, count=lambda r: 1, unit: str = "video"):
    """run_tasks in this process, one call after another, with the same progress bar."""
    results = []
    with Progress(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr, leave=False) as bar:
        for fn, *args in calls:
            results.append(fn(*args))
            bar.update(count(results[-1]))
    return results


def _barrier(i):
    return i


def drain_workers(client, timeout: float = 120) -> None:
    """Wait until tasks already running have ended: dask lets a cancelled task run on to its end, and
    one still writing could recreate files after the caller cleaned up. A single-threaded worker runs a
    barrier task only once its current task is done (multi-threaded remote workers: best effort)."""
    from dask.distributed import wait

    workers = list(client.scheduler_info()["workers"])
    barriers = [client.submit(_barrier, i, workers=[w], allow_other_workers=False, pure=False)
                for i, w in enumerate(workers)]
    wait(barriers, timeout=timeout)
