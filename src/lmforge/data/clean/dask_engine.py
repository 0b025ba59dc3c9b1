"""Stage 1 of the refinery on a Dask cluster, for corpora that outgrow one machine.

The shards are the same; each is cleaned by the function the pipeline passes in (its
`clean_shard_on_worker`) on a Dask worker instead of a local process, and writes to the
same `out/_work/` directory, so the output directory must be on a file system every worker
sees (NFS, a cluster file system; on one machine, any directory). Deduplication and
writing the part files stay in the calling process. A run started on Dask resumes locally
and the other way round: a shard is done when its stats file exists, whoever wrote it.

    clean(inputs, out, recipe, engine="dask", scheduler="tcp://scheduler:8786")

Without `scheduler`, a local cluster is started with `workers` worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from lmforge.data.clean.readers import Shard
from lmforge.errors import LmforgeError


def run_on_dask(clean_one: Callable[..., tuple[int, dict]], shards: list[Shard], init_args: tuple[dict, str],
                workers: int, scheduler: str | None) -> Iterator[tuple[int, dict]]:
    """(shard index, stats) for every shard as it finishes on the cluster."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise LmforgeError("engine 'dask' needs Dask: pip install 'dask[distributed]'") from None
    cluster: LocalCluster | None = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=None)
    client = Client(scheduler or cluster)
    try:
        futures = client.map(clean_one, shards, recipe_dict=init_args[0], work=init_args[1], pure=False)
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

