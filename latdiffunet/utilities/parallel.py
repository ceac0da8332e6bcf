"""Worker processes: a pool with a tqdm bar, and the one place that picks how workers start.

``fork`` starts a worker in milliseconds and shares what the parent already loaded, which is why
every pool here prefers it. It is unsafe once the parent has initialised CUDA: the child inherits
a CUDA context it cannot use, and a worker that touches torch's CUDA state dies or hangs. A
parent that predicts or validates on a GPU has done exactly that before it starts its I/O
workers, so :func:`worker_context` switches to ``spawn`` (fresh interpreters, a few seconds to
start) then, and where ``fork`` does not exist (Windows).
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.context import BaseContext
from typing import Any, Callable, Iterable

from tqdm import tqdm


def cuda_initialised() -> bool:
    """Whether this process holds a CUDA context; never imports torch (no torch, no CUDA)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def worker_context() -> BaseContext:
    """``fork`` when it is safe, else ``spawn``; decided when the pool starts, not at import."""
    if cuda_initialised() or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def map_with_progress(
    func: Callable[[Any], Any], items: Iterable[Any], num_processes: int, desc: str, disable: bool = False
) -> list[Any]:
    """``[func(item) for item in items]`` in ``num_processes`` workers (a plain loop for ``<= 1``).

    ``func`` must be a module-level function: under ``spawn`` workers import it by name.
    """
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=disable, dynamic_ncols=True)
    try:
        if num_processes <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(func(item))
                bar.update()
            return results
        with worker_context().Pool(num_processes) as pool:
            results = []
            for r in pool.imap(func, items, chunksize=max(1, len(items) // (num_processes * 16))):
                results.append(r)
                bar.update()
            return results
    finally:
        bar.close()
