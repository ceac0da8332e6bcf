"""Mixed precision in one place, below training and inference, which both need it."""

from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when ``enabled``; a no-op elsewhere, so CPU and MPS runs stay in
    float32 and training, validation and prediction use the same precision on one device."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
