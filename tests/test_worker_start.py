"""Worker pools fork while that is safe and spawn once CUDA is initialised (utilities/parallel.py)."""

from __future__ import annotations

import pytest
import torch

from latdiffunet.utilities.parallel import map_with_progress, worker_context

MARKER = "as imported"  # a forked worker sees the parent's value, a spawned one imports this module afresh


def _marker(_: int) -> str:
    return MARKER


@pytest.mark.parametrize("cuda", [False, True], ids=["no-cuda", "cuda-initialised"])
def test_start_method_follows_cuda_state(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda)
    assert worker_context().get_start_method() == ("spawn" if cuda else "fork")


@pytest.mark.parametrize("cuda", [False, True], ids=["no-cuda-forks", "cuda-initialised-spawns"])
def test_map_with_progress_workers_start_accordingly(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda)
    monkeypatch.setitem(globals(), "MARKER", "set in the parent")
    seen = set(map_with_progress(_marker, range(4), num_processes=2, desc="test", disable=True))
    assert seen == {"as imported" if cuda else "set in the parent"}
