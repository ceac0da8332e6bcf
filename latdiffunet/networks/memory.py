"""Analytic GPU-memory estimate for one training step, for the experiment planner.

The planner must pick patch and batch sizes for a GPU it may not be running on, so the estimate
never touches a GPU: the model is built on PyTorch's ``meta`` device (tensors with shapes but no
storage) and a forward pass is traced with hooks that add up the size of every leaf module's
output, i.e. the activations autograd keeps for the backward pass. It is an *estimate*, meant
for comparing candidate configurations (monotone in batch and patch size), not an exact figure:
functional ops (residual adds, concatenations) and allocator overhead are not counted, which
the planner should absorb in its safety margin; attention probabilities are counted in full
(the worst case: fused kernels keep less).

There is deliberately no second, hand-written model of the architecture to fall back on: it
would drift from the networks, and plans would then depend on which of the two a machine used.
A torch too old to trace the networks on ``meta`` is an error that says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import build_model, resolve_model_config
from .shapes import latent_spatial_shape, total_stride

__all__ = ["estimate_training_memory_bytes", "memory_breakdown"]

PARAM_STATE_BYTES = 16  # fp32 weight + fp32 grad + two fp32 Adam moments


def _numel(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, (list, tuple)):
        return sum(_numel(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_numel(o) for o in obj.values())
    return 0


def _traced_activation_elements(
    model: nn.Module, cfg: dict[str, Any], patch: list[int], batch: int
) -> int:
    """Meta-device forward of all three networks; sums leaf-module output sizes."""
    model.train()
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if not torch.is_grad_enabled():  # e.g. the head prior's encoder pass: nothing kept for backward
            return
        total += _numel(output)
        if isinstance(module, nn.MultiheadAttention):  # attention probabilities [B, h, N, N]
            n = _inputs[0].shape[1]
            total += _inputs[0].shape[0] * module.num_heads * n * n

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
        or (not any(True for _ in m.children()) and not isinstance(m, nn.Identity))
    ]
    try:
        meta = torch.device("meta")
        onehot = torch.empty(batch, cfg["num_classes"], *patch, device=meta)
        image = torch.empty(batch, cfg["in_channels"], *patch, device=meta)
        mu, _ = model.autoencoder.encode(onehot)
        features = model.image_encoder(image)
        cond, detail, head_logits = model.image_conditioning(features)
        if model.segmentation_head is not None and head_logits is None:  # trained alongside (deep supervision)
            model.segment_image(features)
        t = torch.zeros(batch, dtype=torch.long, device=meta)
        model.denoise(torch.empty_like(mu), t, cond)
        model.decode_latent(mu, detail)  # the autoencoder's decoder, then the refinement head if any
        total += onehot.numel() + image.numel()  # network inputs are kept as well
    finally:
        for h in handles:
            h.remove()
    return total


def memory_breakdown(
    model_config_dict: dict[str, Any],
    patch_size: list[int],
    batch_size: int,
    bytes_per_element: int = 2,
) -> dict[str, Any]:
    """Components of the estimate: ``activation_bytes``, ``parameter_bytes``, ``total_bytes``,
    ``num_parameters`` and ``total_stride``."""
    cfg = resolve_model_config(model_config_dict)
    patch = [int(p) for p in patch_size]
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    lat = latent_spatial_shape(patch, cfg["strides"], cfg["dim"])  # validates divisibility
    latent_spatial_shape(lat, cfg["denoiser"]["strides"], cfg["dim"])
    with torch.device("meta"):
        model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    try:
        act = _traced_activation_elements(model, cfg, patch, batch_size)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise RuntimeError(
            f"cannot estimate training memory: torch {torch.__version__} failed to trace the networks on the "
            f"meta device ({type(exc).__name__}: {exc}); install a newer torch"
        ) from exc
    activation_bytes = act * bytes_per_element
    parameter_bytes = n_params * PARAM_STATE_BYTES
    return {
        "activation_bytes": activation_bytes,
        "parameter_bytes": parameter_bytes,
        "total_bytes": activation_bytes + parameter_bytes,
        "num_parameters": n_params,
        "total_stride": list(total_stride(cfg["strides"], cfg["dim"])),
    }


def estimate_training_memory_bytes(
    model_config_dict: dict[str, Any],
    patch_size: list[int],
    batch_size: int,
    bytes_per_element: int = 2,
) -> int:
    """Estimated bytes for one training step: kept activations x ``bytes_per_element``
    (2 = AMP) plus parameters x 16 (fp32 weights, grads and Adam moments)."""
    return int(
        memory_breakdown(model_config_dict, patch_size, batch_size, bytes_per_element)[
            "total_bytes"
        ]
    )
