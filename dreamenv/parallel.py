"""One evaluator for real-env work (collection, evaluation): serial, process (spawn) or Ray backends."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from gymnasium.error import DependencyNotInstalled

T = TypeVar("T")
R = TypeVar("R")

BACKENDS = ("serial", "process", "ray")


def run_tasks(
    fn: Callable[[T], R], tasks: Iterable[T], backend: str = "process", workers: int = 2
) -> Iterator[R]:
    """Yield fn(task) for every task as each completes (any order); fn must be module-level."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tasks = list(tasks)
    if not tasks:
        return iter(())
    if backend == "serial":
        return (fn(task) for task in tasks)
    if backend == "process":
        return _run_process(fn, tasks, min(workers, len(tasks)))
    return _run_ray(fn, tasks, workers)


def _init_worker(parent: int) -> None:
    """Worker initializer: one torch thread (one process per core; more threads per worker oversubscribe the
    cores, measured here: small ops over 10x slower), and exit when the parent dies, so that a killed
    `dreamenv collect` leaves no orphan worker playing on (its unfinished shard is redone on resume)."""
    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="dreamenv-parent-watch").start()


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """Poll the parent pid; on its death (we are re-parented) end this worker at once."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _run_process(fn: Callable[[T], R], tasks: list[T], workers: int) -> Iterator[R]:
    """ProcessPoolExecutor with the spawn context (safe with threads, torch and every OS), one torch thread each."""
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(os.getpid(),))
    try:
        futures = [executor.submit(fn, task) for task in tasks]
        for future in as_completed(futures):
            yield future.result()
    except BrokenProcessPool as error:
        raise RuntimeError(
            "a real-env worker process died before finishing its task. Workers start with spawn, which runs the "
            "calling script again in each worker: in a script, keep the code that collects, evaluates or compares "
            "under `if __name__ == \"__main__\":`. Otherwise the worker was killed (out of memory?) or crashed; "
            "backend=\"serial\" (--backend serial) runs the episodes in this process instead") from error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _run_ray(fn: Callable[[T], R], tasks: list[T], workers: int) -> Iterator[R]:
    """Ray tasks, one CPU each; starts a local Ray with `workers` CPUs when none is running."""
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(num_cpus=workers, ignore_reinit_error=True)
    remote_fn = ray.remote(num_cpus=1)(fn)
    pending: list[Any] = [remote_fn.remote(task) for task in tasks]
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def _import_ray() -> Any:
    """Import Ray or say how to install it."""
    try:
        import ray
    except ImportError as err:
        raise DependencyNotInstalled("the ray backend needs Ray: pip install ray") from err
    return ray
