"""Building blocks whose failure would not crash anything: stitching, uncertainty, EMA, schedules.

A wrong crop offset, an unweighted overlap, mutual information without its second term, an EMA
that trains frozen weights or a latent scale applied the wrong way round still give outputs of the
right shape and plausible range. Each test here checks values that such a slip changes: window
predictors that echo their input or report their position, hand-computed entropies, and a real
trainer on the Hippocampus ``tiny`` 2d plans fed made-up batches (no data on disk).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from latdiffunet.inference.sliding_window import sliding_window_predict, window_starts
from latdiffunet.inference.uncertainty import uncertainty_maps
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.trainer import LatentDiffusionTrainer

PLANS = Path(__file__).resolve().parents[1] / "plans" / "reference" / "Dataset004_Hippocampus" / "latdiffPlans_tiny.json"
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- sliding window
def echo_windows(num_samples: int):
    """Window predictor returning each window itself as its "probabilities", times (sample + 1)."""

    def predict(patches: torch.Tensor, origins: list) -> torch.Tensor:
        return torch.stack([patches * (s + 1) for s in range(num_samples)], 1)

    return predict


def window_positions(patches: torch.Tensor, origins: list) -> torch.Tensor:
    """Window predictor returning, per spatial axis k, the padded-case coordinate of each voxel."""
    shape = patches.shape[2:]
    grids = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    return torch.stack([grids + torch.tensor(o, dtype=torch.float32).view(-1, *([1] * len(shape))) for o in origins])[:, None]


@pytest.mark.parametrize(
    "shape, patch",
    [
        ((2, 7, 13, 11), [4, 6, 8]),  # 3d: several overlapping windows per axis, none fits evenly
        ((2, 3, 5, 7), [8, 8, 8]),  # 3d: odd sizes, every axis smaller than the patch (padding)
        ((2, 4, 9, 13), [6, 8]),  # 2d configuration on a volume: slice by slice
        ((2, 3, 5, 17), [8, 8]),  # 2d: padded in y, several windows in x
    ],
)
def test_stitching_echoed_windows_gives_back_the_input(shape, patch):
    """Any overlap, padding or slicing error shows as a voxel that is not the input's."""
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = sliding_window_predict(volume, patch, echo_windows(2), 2, shape[0], CPU, windows_per_batch=3)
    assert out.shape == (2,) + shape
    np.testing.assert_allclose(out[0], volume, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], 2 * volume, rtol=1e-5, atol=1e-6)


def test_window_origins_are_positions_in_the_centred_padded_case():
    """3d: z (2 < 5) is padded by 1 before and 2 after, y and x are tiled; the origins passed to
    the predictor must be where each window lies, so coordinates stitch to a plain grid."""
    out = sliding_window_predict(np.zeros((1, 2, 9, 11), np.float32), [5, 4, 6], window_positions, 1, 3, CPU)
    expected = np.indices((2, 9, 11)).astype(np.float32)
    expected[0] += 1  # the z padding before the case
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_window_origins_of_the_2d_configuration_are_in_plane():
    """2d on a volume: every slice sees the same in-plane origins (the noise field is shared)."""
    out = sliding_window_predict(np.zeros((1, 3, 10, 6), np.float32), [4, 8], window_positions, 1, 2, CPU)
    yx = np.indices((10, 6)).astype(np.float32)
    yx[1] += 1  # x (6 < 8) is padded by 1 before and 1 after; y is tiled
    for z in range(3):
        np.testing.assert_allclose(out[0, :, z], yx, atol=1e-5)


def test_overlap_is_gaussian_weighted_towards_each_window_centre():
    """Two windows along x (starts 0 and 8 of 24), predicting 0 and 1: inside the overlap the
    voxel nearer a window's centre follows that window; a plain average would give 0.5 there."""

    def window_index(patches: torch.Tensor, origins: list) -> torch.Tensor:
        return torch.stack([torch.full(patches.shape[2:], float(o[1] == 8)) for o in origins])[:, None, None]

    assert window_starts(24, 16, 0.5) == [0, 8]
    p = sliding_window_predict(np.zeros((1, 1, 8, 24), np.float32), [8, 16], window_index, 1, 1, CPU)[0, 0, 0, 4]
    assert np.all(p[:8] == 0) and np.all(p[16:] == 1)
    assert p[9] < 0.3 and p[14] > 0.7 and np.all(np.diff(p[8:16]) > 0)


def test_window_starts_cover_the_axis_with_the_requested_overlap():
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(16, 16, 0.5) == [0]
    starts = window_starts(101, 16, 0.5)
    assert starts[0] == 0 and starts[-1] == 101 - 16
    assert max(np.diff(starts)) <= 8  # overlap >= 50 %


# ----------------------------------------------------------------------------- uncertainty
def _entropy(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_uncertainty_maps_of_hand_computed_probabilities():
    """Two samples, two classes, four voxels: total disagreement, shared doubt, shared certainty,
    and partial disagreement. Mutual information is the entropy of the mean minus the mean
    entropy, so it separates disagreement (voxels 0, 3) from doubt both samples share (voxel 1)."""
    sample_a = [[1.0, 0.5, 1.0, 0.9], [0.0, 0.5, 0.0, 0.1]]
    sample_b = [[0.0, 0.5, 1.0, 0.2], [1.0, 0.5, 0.0, 0.8]]
    maps = uncertainty_maps(np.array([sample_a, sample_b], np.float32))
    ln2 = math.log(2)
    np.testing.assert_allclose(maps["entropy"], [ln2, ln2, 0, _entropy(0.55, 0.45)], atol=1e-6)
    mi_3 = _entropy(0.55, 0.45) - (_entropy(0.9, 0.1) + _entropy(0.2, 0.8)) / 2
    np.testing.assert_allclose(maps["mutual_information"], [ln2, 0, 0, mi_3], atol=1e-6)
    assert mi_3 > 0.2  # a clearly positive value, not a rounding residue
    np.testing.assert_allclose(maps["probabilities"], [[0.5, 0.5, 1, 0.55], [0.5, 0.5, 0, 0.45]], atol=1e-6)
    assert maps["label"].tolist() == [0, 0, 0, 0]  # ties go to the first class
    assert maps["sample_labels"].tolist() == [[0, 0, 0, 0], [1, 0, 0, 1]]
    np.testing.assert_allclose(maps["agreement"], [0.5, 1, 1, 0.5])
    np.testing.assert_allclose(maps["uncertainty"], maps["entropy"])  # no image head: the entropy


def test_uncertainty_map_is_the_image_heads_entropy_plus_the_samples_disagreement():
    """Two samples sure of the same wrong boundary voxel (voxel 1) have entropy 0 there; the image
    head, unsure there, makes that voxel the most uncertain one, and disagreement (voxel 0) adds."""
    sample_a = [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    sample_b = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    head = np.array([[0.9, 0.5, 0.99], [0.1, 0.5, 0.01]], np.float32)
    maps = uncertainty_maps(np.array([sample_a, sample_b], np.float32), head)
    ln2 = math.log(2)
    np.testing.assert_allclose(maps["entropy"], [ln2, 0, 0], atol=1e-6)
    expected = [_entropy(0.9, 0.1) + ln2, ln2, _entropy(0.99, 0.01)]
    np.testing.assert_allclose(maps["uncertainty"], expected, atol=1e-5)
    assert maps["label"].tolist() == [0, 0, 0]  # the label still comes from the samples alone
    with pytest.raises(ValueError, match="do not match"):
        uncertainty_maps(np.array([sample_a, sample_b], np.float32), head[:, :2])


# ----------------------------------------------------------------------------- trainer parts
def make_trainer(tmp_path: Path, **config) -> LatentDiffusionTrainer:
    """A real trainer on the Hippocampus tiny 2d plans (patch 56 x 40, 3 classes); no data on disk."""
    plans = json.loads(PLANS.read_text())
    return LatentDiffusionTrainer(plans, "2d", 0, tmp_path, tmp_path / "fold_0", CPU,
                                  TrainerConfig(num_workers=0, amp=False, **config), [{"train": ["x"], "val": []}])


def made_up_batch(seed: int, batch_size: int = 2) -> dict:
    """Noisy image with a disc (class 1) and a box (class 2) at random places, as the loader gives."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:56, :40]
    seg = np.zeros((batch_size, 1, 56, 40), np.int16)
    for b in range(batch_size):
        cy, cx = rng.integers(10, 30), rng.integers(8, 20)
        seg[b, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 1
        seg[b, 0, cy + 10 : cy + 18, cx + 8 : cx + 16] = 2
    return {"data": (seg * 1.0 + rng.normal(0, 0.3, seg.shape)).astype(np.float32), "seg": seg.astype(np.int64)}


def test_learning_rate_decays_within_each_stage_and_restarts_at_the_second(tmp_path):
    trainer = make_trainer(tmp_path, autoencoder_epochs=10, diffusion_epochs=20, learning_rate=2e-4,
                           autoencoder_learning_rate=1e-3)
    expected = {
        0: 1e-3, 5: 1e-3 * 0.5**0.9, 9: 1e-3 * 0.1**0.9,  # autoencoder: its own rate, polynomial decay
        10: 2e-4, 20: 2e-4 * 0.5**0.9, 29: 2e-4 * (1 / 20) ** 0.9,  # diffusion: restarts at its rate
    }
    for epoch, lr in expected.items():
        assert trainer.learning_rate(epoch) == pytest.approx(lr, rel=1e-9), epoch


def test_ema_warms_up_and_leaves_frozen_weights_alone(tmp_path):
    """Decay min(ema_decay, (1 + n) / (10 + n)): after n updates towards a fixed weight 1 from 0 the
    EMA is 1 - prod(decays). Frozen (autoencoder) weights are not averaged; buffers are copied."""
    trainer = make_trainer(tmp_path, ema_decay=0.999)
    trainer._setup_stage("diffusion")  # autoencoder frozen, image encoder + denoiser trained
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            p.fill_(5.0 if name.startswith("autoencoder.") else 1.0)
        for e in trainer.ema.parameters():
            e.zero_()
        trainer.model.latent_scale.fill_(2.5)
    for _ in range(3):
        trainer._update_ema()
    warm = 1 - (2 / 11) * (3 / 12) * (4 / 13)
    for name, e in trainer.ema.named_parameters():
        assert torch.all(e == 0) if name.startswith("autoencoder.") else torch.allclose(e, torch.full_like(e, warm)), name
    assert float(trainer.ema.latent_scale) == 2.5

    capped = make_trainer(tmp_path, ema_decay=0.1)  # below every warm-up value (2/11, 3/12, ...): the cap wins
    capped._setup_stage("diffusion")
    with torch.no_grad():
        for p in capped.model.denoiser.parameters():
            p.fill_(1.0)
        for e in capped.ema.denoiser.parameters():
            e.zero_()
    for _ in range(3):
        capped._update_ema()
    assert all(torch.allclose(e, torch.full_like(e, 1 - 0.1**3)) for e in capped.ema.denoiser.parameters())


def test_latent_scale_makes_the_training_latents_unit_std(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    batches = [made_up_batch(seed) for seed in range(10)]
    monkeypatch.setattr(trainer, "batch_stream", lambda: iter(batches))  # one fresh iterator per call

    def latent_std() -> float:
        with torch.no_grad():
            return float(torch.cat([
                trainer.model.encode_mask(torch.nn.functional.one_hot(torch.as_tensor(b["seg"][:, 0]), 3).movedim(-1, 1).float()).flatten()
                for b in batches]).std())

    raw = latent_std()
    assert not 0.7 < raw < 1.4, f"raw latent std {raw}: too close to 1 for this test to see a wrong scale"
    trainer.model.latent_scale.fill_(3.0)  # a stale scale must not enter the measurement
    stream = iter(batches)
    monkeypatch.setattr(trainer, "batch_stream", lambda: stream)
    scale = trainer.calibrate_latent_scale(num_batches=10)
    assert scale == pytest.approx(1 / raw, rel=1e-4)
    assert latent_std() == pytest.approx(1.0, rel=1e-4)
    assert float(trainer.ema.latent_scale) == pytest.approx(scale) and trainer.ema_updates == 0  # EMA starts from it


@pytest.mark.parametrize("latent_loss_weight", [1.0, 0.0])
def test_diffusion_loss_reaches_image_encoder_and_denoiser_not_the_frozen_autoencoder(tmp_path, latent_loss_weight):
    """Every image-encoder and denoiser weight gets a gradient, no autoencoder weight does. With
    the latent loss off, the decoded supervision alone must still reach them through the frozen
    decoder (it is not detached)."""
    trainer = make_trainer(tmp_path, latent_loss_weight=latent_loss_weight, sample_loss_weight=0.0)
    trainer._setup_stage("autoencoder")
    trainer._setup_stage("diffusion")  # as a run switches stages
    with torch.no_grad():  # zero-initialised, the output conv would pass no gradient on at all
        torch.nn.init.normal_(trainer.model.denoiser.out[-1].weight, std=0.05)
    torch.manual_seed(0)
    loss, _ = trainer.diffusion_loss(*trainer._to_device(made_up_batch(0, batch_size=4)))
    loss.backward()
    frozen = {n for n, p in trainer.model.named_parameters() if n.startswith("autoencoder.") and p.grad is not None}
    assert not frozen, f"the frozen autoencoder got gradients: {sorted(frozen)[:3]}"
    missed = [n for n, p in trainer.model.named_parameters()
              if not n.startswith("autoencoder.") and (p.grad is None or not torch.any(p.grad != 0))]
    assert not missed, f"no gradient reached {missed[:5]} ({len(missed)} tensors)"
