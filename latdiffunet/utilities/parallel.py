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
from functools import partial
from multiprocessing.context import BaseContext
from typing import Any, Callable, Iterable, Iterator

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


_NOTHING = object()
_inherited: Any = None  # what forked workers of the running pool see as ``inherited``


def _call_with_inherited(func: Callable[[Any, Any], Any], item: Any) -> Any:
    return func(item, _inherited)


def imap_with_progress(
    func: Callable[..., Any],
    items: Iterable[Any],
    num_processes: int,
    desc: str,
    disable: bool = False,
    inherited: Any = _NOTHING,
) -> Iterator[Any]:
    """``func(item)`` for each item, in order, yielded as they arrive from ``num_processes`` workers
    (a plain loop for ``<= 1``), so that a caller can keep or drop large results one at a time.

    Items go to the workers in chunks, 16 per worker: thousands of small cases (2D slices) then
    cost a few dozen messages, and a chunk is small enough that no worker idles long at the end.
    Arguments shared by every item belong in ``functools.partial(func, ...)``: it is sent once
    per chunk, a tuple element once per item. ``func`` must be a module-level function (or a
    partial of one): under ``spawn`` workers import it by name.

    With ``inherited``, ``func`` is called as ``func(item, inherited)``, and forked workers see the
    parent's object itself, nothing copied or sent: a gigabyte of arrays read earlier costs
    nothing to hand over, where sending it through the workers' pipes costs seconds. Spawned
    workers get ``None`` instead and must do without it.
    """
    global _inherited
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=disable, dynamic_ncols=True)
    try:
        if num_processes <= 1 or len(items) <= 1:
            for item in items:
                yield func(item) if inherited is _NOTHING else func(item, inherited)
                bar.update()
            return
        if inherited is not _NOTHING:
            _inherited = inherited  # forked workers copy this module as it is now; spawned ones import it afresh
            func = partial(_call_with_inherited, func)
        with worker_context().Pool(num_processes) as pool:
            for r in pool.imap(func, items, chunksize=max(1, len(items) // (num_processes * 16))):
                yield r
                bar.update()
    finally:
        _inherited = None
        bar.close()


def map_with_progress(
    func: Callable[..., Any], items: Iterable[Any], num_processes: int, desc: str, **options: Any
) -> list[Any]:
    """``[func(item) for item in items]`` in ``num_processes`` workers; ``options`` (``disable``,
    ``inherited``) and everything else as :func:`imap_with_progress`."""
    return list(imap_with_progress(func, items, num_processes, desc, **options))
