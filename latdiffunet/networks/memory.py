"""Analytic GPU-memory estimate for one training step, for the experiment planner.

The planner must pick patch and batch sizes for a GPU it may not be running on, so the estimate
never touches a GPU: the model is built on PyTorch's ``meta`` device (tensors with shapes but no
storage) and a forward pass is traced with hooks that add up the size of every leaf module's
output, i.e. the activations autograd keeps for the backward pass. It is an *estimate*, meant
for comparing candidate configurations (monotone in batch and patch size), not an exact figure:
functional ops (residual adds, concatenations) and allocator overhead are not counted, which
the planner should absorb in its safety margin.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .model import build_model, resolve_model_config
from .shapes import latent_spatial_shape, stage_channels, total_stride

__all__ = ["estimate_training_memory_bytes", "memory_breakdown"]

PARAM_STATE_BYTES = 16  # fp32 weight + fp32 grad + two fp32 Adam moments
_RESBLOCK_OUTPUTS = 7  # norm1, act, conv1, norm2, act, conv2 (+ skip conv / FiLM), per ResBlock


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
        model.autoencoder.decode(mu)
        cond = model.condition(image)
        t = torch.zeros(batch, dtype=torch.long, device=meta)
        model.denoise(torch.empty_like(mu), t, cond)
        total += onehot.numel() + image.numel()  # network inputs are kept as well
    finally:
        for h in handles:
            h.remove()
    return total


def _shape_only_activation_elements(cfg: dict[str, Any], patch: list[int], batch: int) -> int:
    """Fallback when a meta forward fails: count activations from the architecture alone.

    Mirrors the network structure level by level (channels x voxels x outputs per block). It
    agrees with the traced count to within tens of percent, enough for the planner's margin.
    """
    dim, strides = cfg["dim"], cfg["strides"]
    ae, ie, dn = cfg["autoencoder"], cfg["image_encoder"], cfg["denoiser"]
    n_lv = len(strides) + 1
    voxels = [math.prod(patch)]
    for i in range(len(strides)):
        voxels.append(math.prod(latent_spatial_shape(patch, strides[: i + 1], dim)))

    def pyramid(ch: list[int], vox: list[int], blocks: int) -> int:
        # conv_in + blocks per level + one down/upsample conv per stage transition
        body = sum(_RESBLOCK_OUTPUTS * blocks * c * v for c, v in zip(ch, vox))
        return ch[0] * vox[0] + body + sum(c * v for c, v in zip(ch[1:], vox[1:]))

    ae_ch = stage_channels(ae["base_channels"], n_lv, ae["channel_multipliers"], ae["max_channels"])
    k, cz = cfg["num_classes"], cfg["latent_channels"]
    enc = pyramid(ae_ch, voxels, ae["blocks_per_stage"]) + (2 * ae_ch[-1] + 2 * cz) * voxels[-1]
    dec = pyramid(ae_ch, voxels, ae["blocks_per_stage"]) + (2 * ae_ch[0] + k) * voxels[0]
    ie_ch = stage_channels(ie["base_channels"], n_lv, ie["channel_multipliers"], ie["max_channels"])
    img = pyramid(ie_ch, voxels, ie["blocks_per_stage"])

    lat = latent_spatial_shape(patch, strides, dim)
    lvox = [math.prod(lat)]
    for i in range(len(dn["strides"])):
        lvox.append(math.prod(latent_spatial_shape(lat, dn["strides"][: i + 1], dim)))
    mults = dn["channel_multipliers"] or [1] + [2] * len(dn["strides"])
    dn_ch = stage_channels(dn["base_channels"], len(lvox), mults)
    den = 2 * pyramid(dn_ch, lvox, dn["blocks_per_level"])  # down and up paths
    den += 2 * _RESBLOCK_OUTPUTS * dn_ch[-1] * lvox[-1] + (2 * dn_ch[0] + cz) * lvox[0]
    if dn["attention_at_bottleneck"]:
        den += 4 * dn_ch[-1] * lvox[-1] + dn["attention_heads"] * lvox[-1] ** 2
    inputs = (k + cfg["in_channels"]) * voxels[0]
    return batch * (enc + dec + img + den + inputs)


def memory_breakdown(
    model_config_dict: dict[str, Any],
    patch_size: list[int],
    batch_size: int,
    bytes_per_element: int = 2,
) -> dict[str, Any]:
    """Components of the estimate: ``activation_bytes``, ``parameter_bytes``, ``total_bytes``,
    ``num_parameters`` and ``method`` (``"meta_trace"`` or ``"shape_only"``)."""
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
        method = "meta_trace"
    except (RuntimeError, NotImplementedError, TypeError):
        act = _shape_only_activation_elements(cfg, patch, batch_size)
        method = "shape_only"
    activation_bytes = act * bytes_per_element
    parameter_bytes = n_params * PARAM_STATE_BYTES
    return {
        "activation_bytes": activation_bytes,
        "parameter_bytes": parameter_bytes,
        "total_bytes": activation_bytes + parameter_bytes,
        "num_parameters": n_params,
        "method": method,
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
