"""Run a list of tasks on dask.distributed (a LocalCluster by default) with a progress bar."""

import logging
import os
import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def dask_client(workers: int = 0, scheduler: str | None = None):
    """A dask Client: connected to `scheduler` if given, else to a fresh local process cluster."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    n = workers or os.cpu_count() or 1
    # processes: tar writing and npy decoding hold the GIL, threads would not scale
    with LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as cluster, Client(cluster) as client:
        yield client


def run_tasks(client, calls, desc: str, total: int, progress: bool = True, count=lambda r: 1, nbytes=lambda r: 0):
    """Submit `calls` [(fn, args...)] and return their results in order.

    The bar advances by `count(result)` (videos, say) and shows MB from `nbytes(result)`.
    The first failure cancels the rest and is raised as it was raised in the worker.
    """
    from dask.distributed import as_completed

    futures = [client.submit(fn, *args, pure=False) for fn, *args in calls]
    index = {f.key: i for i, f in enumerate(futures)}
    results = [None] * len(futures)
    done_bytes = 0
    with tqdm(total=total, desc=desc, unit="video", disable=not progress, file=sys.stderr, leave=False) as bar:
        try:
            for future in as_completed(futures):
                result = future.result()  # re-raises the worker's exception
                results[index[future.key]] = result
                done_bytes += nbytes(result)
                bar.update(count(result))
                bar.set_postfix_str(f"{done_bytes / 1e6:,.0f} MB")
        except BaseException:
            client.cancel(futures)
            raise
    return results
