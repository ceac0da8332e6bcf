"""A process pool with a tqdm bar that degrades to a plain loop for ``num_processes <= 1``."""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Iterable

from tqdm import tqdm


def map_with_progress(
    func: Callable[[Any], Any], items: Iterable[Any], num_processes: int, desc: str, disable: bool = False
) -> list[Any]:
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=disable, dynamic_ncols=True)
    try:
        if num_processes <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(func(item))
                bar.update()
            return results
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(num_processes) as pool:
            results = []
            for r in pool.imap(func, items, chunksize=max(1, len(items) // (num_processes * 16))):
                results.append(r)
                bar.update()
            return results
    finally:
        bar.close()
