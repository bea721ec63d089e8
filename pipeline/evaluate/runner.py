"""Runs a function over shards in this process or as Ray tasks; results come back in shard order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.errors import SegpipeError

T = TypeVar("T")
R = TypeVar("R")


def map_shards(fn: Callable[[T], R], shards: Sequence[T], workers: int = 1, address: str | None = None) -> list[R]:
    """`[fn(shard) for shard in shards]`, on `workers` Ray CPU slots when workers > 1 or an address is given.

    `workers=1` without an address starts no cluster. Otherwise a local Ray instance with `workers`
    CPUs is started (and stopped after), or the cluster at `address` is joined; each shard is one
    task of one CPU, so at most `workers` (or the cluster's CPUs) run at once.
    """
    if workers < 1:
        raise SegpipeError(f"--workers {workers}: need at least 1")
    if workers == 1 and address is None:
        return [fn(shard) for shard in shards]
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise SegpipeError(f"cannot start or reach a Ray cluster{f' at {address}' if address else ''}: {error}") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        refs = [task.remote(shard) for shard in shards]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, SegpipeError):  # a user error inside a task: one line, no traceback
                raise SegpipeError(str(error.cause)) from None
            raise
    finally:
        if started:
            ray.shutdown()
