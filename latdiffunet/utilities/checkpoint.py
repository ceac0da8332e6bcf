"""Checkpoints that load with ``torch.load(..., weights_only=True)`` and are written atomically.

Only tensors, numbers, strings, lists and dicts go in, so loading a checkpoint can never execute
code; RNG states are converted to tensors/lists for the same reason. Training writes them and
inference reads them, so they live here, below both.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from latdiffunet.errors import UserInputError
from latdiffunet.utilities.file_io import atomic_path


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, target: Path) -> None:
    with atomic_path(target, suffix=".pth") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", required: tuple[str, ...] = ()) -> dict:
    """Load with ``weights_only=True``; a damaged or foreign file, or one without the ``required``
    keys, is a :class:`UserInputError` naming it."""
    if not path.is_file():
        raise UserInputError("checkpoint not found", path=path, fix="train this fold first (latdiff_train)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which
        if type(exc).__name__ == "UnpicklingError":
            why = ("it is not a latdiffunet checkpoint, or it holds objects other than tensors, numbers, strings, lists "
                   "and dicts (refused: unpickling them could run code)")
        else:
            why = f"the file is damaged or truncated ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        raise UserInputError(
            f"cannot load checkpoint: {why}",
            path=path,
            fix="delete it and use another checkpoint of this fold (checkpoint_latest / _best / _final.pth), or retrain",
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in required):
        what = f"holds a {type(state).__name__}" if not isinstance(state, dict) else f"lacks {[k for k in required if k not in state]}"
        raise UserInputError(
            f"not a latdiffunet checkpoint of this kind: it {what}", path=path,
            fix="delete it and use another checkpoint of this fold (checkpoint_latest / _best / _final.pth), or retrain",
        )
    return state
