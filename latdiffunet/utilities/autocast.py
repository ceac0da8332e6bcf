"""Mixed precision in one place, below training and inference, which both need it.

On CUDA, autocast runs in bfloat16 where the GPU computes it natively (compute capability 8.0 and
newer: A100, H100, RTX 30xx/40xx; and ROCm), else in float16. bfloat16 has float32's exponent
range, so gradients cannot underflow and no loss scaling is needed; float16 needs a GradScaler
(:func:`needs_grad_scaler`), which costs a host sync per step to check for inf. CPU and MPS stay
in float32, so training, validation and prediction use the same precision on one device.
"""

from __future__ import annotations

import contextlib

import torch


def bf16_supported(device: torch.device) -> bool:
    """Native bfloat16 on this CUDA device. ``torch.cuda.is_bf16_supported()`` is not used: it
    answers for the current device only and, by default, counts slow emulation on older GPUs."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype on ``device``: bfloat16 / float16 on CUDA, None (float32) elsewhere or when off."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def needs_grad_scaler(device: torch.device, enabled: bool) -> bool:
    """Loss scaling only for float16: its small exponent range lets gradients underflow."""
    return amp_dtype(device, enabled) == torch.float16


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast in :func:`amp_dtype` on CUDA when ``enabled``; a no-op elsewhere."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)
