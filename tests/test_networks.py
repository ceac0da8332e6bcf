"""Tests for latdiffunet.networks: shapes (2D/3D, anisotropic), learning, init, builder, memory."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from latdiffunet.networks import (
    Downsample,
    ImageEncoder,
    ImageEncoderConfig,
    LatentDenoiser,
    LatentDenoiserConfig,
    LatentDiffusionSegmenter,
    MaskAutoencoder,
    MaskAutoencoderConfig,
    ResBlock,
    SpatialSelfAttention,
    Upsample,
    build_model,
    estimate_training_memory_bytes,
    kl_divergence,
    memory_breakdown,
    resolve_model_config,
    timestep_embedding,
)

ANISO = [[1, 2, 2], [2, 2, 2]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model_dict(dim: int = 3, strides=None, **denoiser) -> dict:
    return {
        "dim": dim,
        "in_channels": 2,
        "num_classes": 3,
        "latent_channels": 4,
        "strides": ANISO if strides is None else strides,
        "autoencoder": {"base_channels": 4, "max_channels": 8},
        "image_encoder": {"base_channels": 4, "max_channels": 8},
        "denoiser": {"base_channels": 8, **denoiser},
    }


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("dim", [2, 3])
def test_blocks_shapes(dim):
    x = torch.randn(2, 6, *([8] * dim))
    emb = torch.randn(2, 16)
    assert ResBlock(dim, 6, 10, time_emb_dim=16)(x, emb).shape == (2, 10, *([8] * dim))
    assert ResBlock(dim, 6, 6)(x).shape == x.shape
    stride = [1] + [2] * (dim - 1)
    down = Downsample(dim, 6, stride)(x)
    assert down.shape == (2, 6, 8, *([4] * (dim - 1)))
    assert Upsample(dim, 6, stride)(down).shape == x.shape
    assert SpatialSelfAttention(dim, 6, heads=4)(x).shape == x.shape  # heads reduced to 3


def test_downsample_rejects_wrong_stride_length():
    with pytest.raises(ValueError, match="entries but dim=3"):
        Downsample(3, 4, [2, 2])


def test_timestep_embedding():
    t = torch.tensor([0, 10, 999])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (3, 32)
    assert torch.allclose(emb[0, :16], torch.ones(16))  # cos(0)
    assert not torch.allclose(emb[1], emb[2])
    assert timestep_embedding(t, 33).shape == (3, 33)


# ---------------------------------------------------------------- autoencoder


@pytest.mark.parametrize(
    "dim,strides,spatial,latent",
    [
        (2, [[2, 2], [2, 2]], (32, 32), (8, 8)),
        (3, [[2, 2, 2]], (8, 8, 8), (4, 4, 4)),
        (3, ANISO, (8, 32, 32), (4, 8, 8)),  # per-axis product (2, 4, 4)
        (3, ANISO, (4, 32, 32), (2, 8, 8)),
        (2, [], (12, 12), (12, 12)),  # no downsampling at all
    ],
)
def test_autoencoder_shapes(dim, strides, spatial, latent):
    cfg = MaskAutoencoderConfig(dim=dim, num_classes=3, latent_channels=4, strides=strides,
                                base_channels=4, max_channels=8)
    ae = MaskAutoencoder(cfg)
    onehot = F.one_hot(torch.randint(0, 3, (2, *spatial)), 3).movedim(-1, 1).float()
    mu, logvar = ae.encode(onehot)
    assert mu.shape == logvar.shape == (2, 4, *latent)
    assert cfg.latent_shape(spatial) == latent
    out = ae(onehot)
    assert out["logits"].shape == (2, 3, *spatial)
    assert out["z"].shape == mu.shape
    assert ae.decode(mu).shape == (2, 3, *spatial)


def test_autoencoder_variational_sampling_and_kl():
    ae = MaskAutoencoder(MaskAutoencoderConfig(dim=2, num_classes=3, latent_channels=2,
                                               strides=[[2, 2]], base_channels=4))
    onehot = F.one_hot(torch.randint(0, 3, (1, 8, 8)), 3).movedim(-1, 1).float()
    mu, logvar = ae.encode(onehot)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    z1, z2 = ae.sample_latent(mu, logvar, g1), ae.sample_latent(mu, logvar, g2)
    assert torch.equal(z1, z2) and not torch.equal(z1, mu)
    ae.eval()
    assert torch.equal(ae(onehot)["z"], mu)  # deterministic in eval mode
    assert kl_divergence(mu, logvar).item() >= 0
    zeros = torch.zeros(2, 3)
    assert kl_divergence(zeros, zeros).item() == pytest.approx(0.0)
    assert kl_divergence(torch.ones(2, 3), zeros).item() == pytest.approx(0.5)


def test_autoencoder_non_variational_and_bad_input():
    ae = MaskAutoencoder(MaskAutoencoderConfig(dim=2, num_classes=3, latent_channels=2,
                                               strides=[[2, 2]], base_channels=4,
                                               variational=False))
    onehot = torch.zeros(1, 3, 8, 8)
    mu, logvar = ae.encode(onehot)
    assert logvar is None
    assert torch.equal(ae.train()(onehot)["z"], mu)
    with pytest.raises(ValueError, match="not divisible"):
        ae.encode(torch.zeros(1, 3, 9, 8))
    with pytest.raises(ValueError, match="one-hot"):
        ae.encode(torch.zeros(1, 2, 8, 8))


def test_autoencoder_overfits_single_random_mask():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (1, 32, 32), generator=g)  # i.i.d. per pixel: hardest case
    onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
    ae = MaskAutoencoder(MaskAutoencoderConfig(dim=2, num_classes=3, latent_channels=4,
                                               strides=[[2, 2], [2, 2]], base_channels=8,
                                               channel_multipliers=(1, 2, 2),
                                               variational=False))
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(ae(onehot)["logits"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.eval()
    with torch.no_grad():
        acc = (ae(onehot)["logits"].argmax(1) == labels).float().mean().item()
    assert acc >= 0.98, f"argmax accuracy {acc:.4f} after 150 steps"


# ---------------------------------------------------------------- image encoder


@pytest.mark.parametrize("dim,strides,spatial", [(2, [[2, 2], [2, 2]], (16, 16)),
                                                 (3, ANISO, (8, 32, 32))])
def test_image_encoder_pyramid(dim, strides, spatial):
    cfg = ImageEncoderConfig(dim=dim, in_channels=2, strides=strides, base_channels=4,
                             out_channels=6)
    enc = ImageEncoder(cfg)
    feats = enc(torch.randn(2, 2, *spatial))
    assert len(feats) == len(strides) + 1
    assert [f.shape[1] for f in feats] == enc.out_channels_per_scale == [4, 8, 6]
    ae_cfg = MaskAutoencoderConfig(dim=dim, num_classes=2, latent_channels=1, strides=strides)
    assert tuple(feats[-1].shape[2:]) == ae_cfg.latent_shape(spatial)
    assert tuple(feats[0].shape[2:]) == spatial


# ---------------------------------------------------------------- denoiser


@pytest.mark.parametrize("dim,strides,latent", [(2, [[2, 2]], (8, 8)),
                                                (3, [[1, 2, 2]], (2, 8, 8)),
                                                (3, [], (2, 2, 2))])
def test_denoiser_shapes_and_zero_init(dim, strides, latent):
    cfg = LatentDenoiserConfig(dim=dim, latent_channels=4, cond_channels=6, base_channels=8,
                               strides=strides, time_embedding_dim=16)
    net = LatentDenoiser(cfg)
    x = torch.randn(2, 4, *latent)
    out = net(x, torch.tensor([3, 700]), torch.randn(2, 6, *latent))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised final conv


def test_denoiser_gradients_reach_all_parameters():
    cfg = LatentDenoiserConfig(dim=2, latent_channels=4, cond_channels=6, base_channels=8,
                               channel_multipliers=(1, 2), strides=[[2, 2]],
                               time_embedding_dim=16, random_latent_dim=5)
    net = LatentDenoiser(cfg)
    with torch.no_grad():
        net.out[-1].weight.normal_(0, 0.1)
        net.out[-1].bias.normal_(0, 0.1)
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    out = net(x, torch.tensor([1, 500]), cond, random_latent=torch.randn(2, 5))
    F.mse_loss(out, torch.randn_like(out)).backward()
    missing = [n for n, p in net.named_parameters()
               if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing, f"no gradient for {missing}"


def test_denoiser_random_latent_changes_output_and_is_reproducible():
    net = LatentDenoiser(LatentDenoiserConfig(dim=2, latent_channels=2, cond_channels=2,
                                              base_channels=8, random_latent_dim=3))
    with torch.no_grad():
        net.out[-1].weight.normal_(0, 0.1)
    x, cond, t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), torch.tensor([5])
    a = net(x, t, cond, generator=torch.Generator().manual_seed(0))
    b = net(x, t, cond, generator=torch.Generator().manual_seed(0))
    c = net(x, t, cond, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_denoiser_rejects_mismatched_cond_and_bad_multipliers():
    net = LatentDenoiser(LatentDenoiserConfig(dim=2, latent_channels=2, cond_channels=2,
                                              base_channels=8))
    with pytest.raises(ValueError, match="must match"):
        net(torch.randn(1, 2, 4, 4), torch.tensor([0]), torch.randn(1, 2, 2, 2))
    with pytest.raises(ValueError, match="more entries"):
        LatentDenoiserConfig(dim=2, latent_channels=2, cond_channels=2,
                             channel_multipliers=(1, 2, 4), strides=[[2, 2]])


# ---------------------------------------------------------------- full model / builder


def test_build_model_from_minimal_dict():
    minimal = {"dim": 2, "in_channels": 1, "num_classes": 2}
    model = build_model(minimal)
    assert isinstance(model, LatentDiffusionSegmenter)
    assert model.latent_scale.item() == 1.0 and "latent_scale" in model.state_dict()
    resolved = resolve_model_config(minimal)
    assert json.loads(json.dumps(resolved)) == resolved  # stays JSON-able
    assert resolved["denoiser"]["base_channels"] == 64 and resolved["latent_channels"] == 4
    assert model.denoiser.config.cond_channels == model.image_encoder.out_channels_per_scale[-1]
    with pytest.raises(ValueError, match="unknown"):
        build_model({**minimal, "denoiser": {"base_chanels": 8}})
    with pytest.raises(ValueError, match="missing"):
        build_model({"dim": 2})


def test_full_model_3d_batch2_and_latent_scale():
    cfg = tiny_model_dict(3, strides=ANISO)
    cfg["denoiser"]["strides"] = [[1, 2, 2]]  # latent (4, 8, 8) -> (4, 4, 4) inside the UNet
    model = build_model(cfg)
    image = torch.randn(2, 2, 8, 32, 32)
    onehot = F.one_hot(torch.randint(0, 3, (2, 8, 32, 32)), 3).movedim(-1, 1).float()
    z0 = model.encode_mask(onehot)
    assert z0.shape == (2, 4, 4, 8, 8)
    cond = model.condition(image)
    assert cond.shape[0] == 2 and cond.shape[2:] == z0.shape[2:]
    out = model.denoise(torch.randn_like(z0), torch.tensor([10, 20]), cond)
    assert out.shape == z0.shape
    assert model.decode_latent(z0).shape == (2, 3, 8, 32, 32)
    # latent_scale: encode scales, decode undoes it
    model.latent_scale.fill_(2.0)
    z_scaled = model.encode_mask(onehot)
    assert torch.allclose(z_scaled, 2 * z0, atol=1e-5)
    assert torch.allclose(model.decode_latent(z_scaled), model.decode_latent(z0 * 2), atol=1e-5)
    mu, _ = model.autoencoder.encode(onehot)
    assert torch.allclose(model.decode_latent(z_scaled), model.autoencoder.decode(mu), atol=1e-5)


# ---------------------------------------------------------------- memory estimate


def test_memory_estimate_monotone_and_positive():
    cfg = tiny_model_dict(3)
    base = estimate_training_memory_bytes(cfg, [8, 32, 32], 1)
    assert base > 0
    assert estimate_training_memory_bytes(cfg, [8, 32, 32], 2) > base
    assert estimate_training_memory_bytes(cfg, [16, 32, 32], 1) > base
    assert estimate_training_memory_bytes(cfg, [8, 32, 32], 1, bytes_per_element=4) > base
    with pytest.raises(ValueError, match="not divisible"):
        estimate_training_memory_bytes(cfg, [7, 32, 32], 1)


def test_memory_estimate_fast_for_3d_64_cubed():
    cfg = {"dim": 3, "in_channels": 1, "num_classes": 4, "strides": [[2, 2, 2]] * 3,
           "denoiser": {"strides": [[2, 2, 2]]}}
    estimate_training_memory_bytes(cfg, [32, 32, 32], 1)  # warm-up: torch lazily imports decomps
    start = time.perf_counter()
    info = memory_breakdown(cfg, [64, 64, 64], 2)
    assert time.perf_counter() - start < 0.5
    assert info["parameter_bytes"] == 16 * info["num_parameters"]


def _autograd_saved_elements(cfg: dict, patch: list[int], batch: int) -> int:
    """Elements of the distinct tensors autograd saves for backward in a real CPU forward of the
    passes the estimate traces: the ground truth the meta-device hooks approximate."""
    model = build_model(cfg).train()
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mu, _ = model.autoencoder.encode(torch.rand(batch, cfg["num_classes"], *patch))
        model.autoencoder.decode(mu)
        cond = model.condition(torch.rand(batch, cfg["in_channels"], *patch))
        model.denoise(torch.randn_like(mu), torch.zeros(batch, dtype=torch.long), cond)
    return sum(saved.values())


SMALL = {"autoencoder": {"base_channels": 4, "max_channels": 8}, "image_encoder": {"base_channels": 4, "max_channels": 8}}


@pytest.mark.parametrize("dim, patch, strides, denoiser", [
    (2, [32, 32], [[2, 2]] * 2, {}),  # latent factor 4
    (2, [64, 64], [[2, 2]] * 3, {"strides": [[2, 2]], "random_latent_dim": 8}),  # factor 8
    (3, [16, 16, 16], [[2, 2, 2]], {"attention_at_bottleneck": False}),  # factor 2
    (3, [16, 32, 32], ANISO, {"strides": [[2, 2, 2]]}),  # anisotropic factor (2, 4, 4)
    (3, [16, 32, 32], [[2, 2, 2]] * 3, {}),  # factor 8
])
def test_memory_estimate_follows_what_autograd_keeps(dim, patch, strides, denoiser):
    """The meta trace is derived from the networks, so it cannot drift from them; this checks it
    also counts what training really keeps (within 20 %) across 2d/3d and latent factors."""
    cfg = resolve_model_config({"dim": dim, "in_channels": 1, "num_classes": 3, "strides": strides,
                                "denoiser": {"base_channels": 8, **denoiser}, **SMALL})
    estimated = memory_breakdown(cfg, patch, 2, bytes_per_element=1)["activation_bytes"]
    assert 0.8 < estimated / _autograd_saved_elements(cfg, patch, 2) < 1.2


def test_memory_estimate_fails_loudly_when_meta_trace_fails(monkeypatch):
    """No silent fallback to a hand-written architecture model: it drifted from the networks and
    made plans depend on the machine."""
    import latdiffunet.networks.memory as memory

    def broken(*args, **kwargs):
        raise NotImplementedError("op has no meta kernel")

    monkeypatch.setattr(memory, "_traced_activation_elements", broken)
    with pytest.raises(RuntimeError, match="failed to trace the networks on the meta device"):
        memory.memory_breakdown(tiny_model_dict(3), [8, 32, 32], 2)
