"""Runs a function over shards: on threads of this process, in local worker processes, or as Ray tasks on a cluster."""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

from pipeline.errors import SegpipeError

T = TypeVar("T")
R = TypeVar("R")


def without_cyclic_gc(fn: Callable[..., R]) -> Callable[..., R]:
    """Run `fn` with Python's cyclic garbage collector paused.

    COCO files parse into millions of small acyclic objects (freed by reference counting anyway);
    the collector's repeated scans of them cost about a second per 5,000-image evaluation.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return wrapper


def map_shards(fn: Callable[[T], R], shards: Sequence[T], workers: int = 1, address: str | None = None,
               threads: int | None = None, progress: Callable[[int], None] | None = None,
               fold: Callable[[R, R], R] | None = None) -> list[R]:
    """`[fn(shard) for shard in shards]`, in shard order, wherever the shards run; `progress(n)` after each of
    the first n shards has finished (in shard order). With `fold`, the results are folded as they arrive, in
    shard order (`fold(fold(r0, r1), r2) ...`), and the list holds the one result: the driver never holds
    every shard's result.

    - no address, workers == 1: in this process, on `threads` threads (default 1; 0: the cores this process
      may run on), each shard on one; the compiled kernels and Parquet reads release the GIL, so a shard's
      decoding and sweeping run while another's Python waits. At most `threads` shards are in memory.
      Known issue: with table inputs, a process that used several threads ends in a C++ "terminate called
      without an active exception" at exit in about 1 run in 40 here, after its results are complete;
      hence one thread by default;
    - no address, workers > 1: `workers` local processes. A local Ray instance would do the same work
      but costs about 7.6 s to start and stop on a 2-core machine, more than a 5,000-image evaluation;
    - an address (`auto`, `host:port`, `ray://...`): one Ray task of 1 CPU per shard on that cluster,
      so a shard is read where it is evaluated and only its statistics travel back.
    """
    if workers < 1:
        raise SegpipeError(f"--workers {workers}: need at least 1")
    if threads is not None and threads < 0:
        raise SegpipeError(f"--threads {threads}: need at least 0")
    if address is not None:
        return _ray_map(fn, shards, address, progress, fold)
    if workers == 1 or len(shards) < 2:
        threads = min(usable_cores() if threads == 0 else threads or 1, len(shards))
        if threads <= 1:
            return _reported((fn(shard) for shard in shards), progress, fold)
        pool = ThreadPoolExecutor(threads)
        try:
            return _reported(pool.map(fn, shards), progress, fold)
        finally:
            pool.shutdown(cancel_futures=True)  # after a failed shard, the shards not yet started never start
    # forkserver: workers fork from a clean server process, never from a parent that may hold threads.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=context) as pool:
        return _reported(pool.map(fn, shards), progress, fold)


def _reported(results: Iterable[R], progress: Callable[[int], None] | None,
              fold: Callable[[R, R], R] | None = None) -> list[R]:
    """The results as a list (or, with `fold`, the one folded result), calling `progress` with the count after each."""
    done, count = [], 0
    for result in results:
        count += 1
        done = [fold(done[0], result)] if fold is not None and done else [*done, result]
        if progress is not None:
            progress(count)
    return done


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ray_map(fn: Callable[[T], R], shards: Sequence[T], address: str,
             progress: Callable[[int], None] | None = None, fold: Callable[[R, R], R] | None = None) -> list[R]:
    import ray

    from pipeline.cluster import connect

    started = connect(address)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        try:
            return _reported((ray.get(ref) for ref in [task.remote(shard) for shard in shards]), progress, fold)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, SegpipeError):  # a user error inside a task: one line, no traceback
                raise SegpipeError(str(error.cause)) from None
            raise
    finally:
        if started:
            ray.shutdown()
