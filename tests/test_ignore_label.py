"""The ignore label (dataset.json ``"ignore"``: unannotated voxels) carries no loss and no metric.

One convention for every stage (``latdiffunet/training/losses.py``): ``one_hot`` encodes an ignore
voxel as background, ``valid_mask`` marks it 0, and every loss and validation metric leaves it out.
The end-to-end test plans a synthetic 2D dataset whose top rows are unannotated and checks that
the trainer's losses give those voxels no gradient and that a short run trains, validates and
predicts without ever treating the ignore label as a class.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic import make_synthetic_dataset

from latdiffunet.training.losses import (
    energy_score_loss, latent_valid_fraction, one_hot, segmentation_loss, valid_mask,
)
from latdiffunet.training.validation import _onehot, foreground_dice

IGNORE = 3  # synthetic datasets have classes 0, 1, 2
UNANNOTATED_ROWS = 16  # top rows of every synthetic 32 x 40 label map


def _labels_with_ignore(seed: int = 0) -> torch.Tensor:
    """``(2, 1, 8, 8)`` labels 0..2 with the top three rows unannotated."""
    seg = torch.randint(0, 3, (2, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    seg[..., :3, :] = IGNORE
    return seg


def test_one_hot_encodes_ignore_as_background_not_last_class():
    seg = _labels_with_ignore()
    onehot = one_hot(seg, 3, ignore_label=IGNORE)
    ignored = seg[:, 0] == IGNORE
    assert torch.all(onehot[:, 0][ignored] == 1) and torch.all(onehot[:, 2][ignored] == 0)
    assert torch.equal(onehot.argmax(1)[~ignored], seg[:, 0][~ignored])
    assert torch.equal(valid_mask(seg, IGNORE)[:, 0].bool(), ~ignored) and valid_mask(seg, None) is None


def test_one_hot_rejects_values_that_are_neither_class_nor_ignore():
    with pytest.raises(ValueError, match=r"label values \[3\] are neither a class"):
        one_hot(_labels_with_ignore(), 3)  # an ignore label the caller did not declare is not clamped away


def test_segmentation_loss_does_not_see_logits_on_ignore_voxels():
    seg = _labels_with_ignore()
    ignored = (seg == IGNORE).expand(-1, 3, -1, -1)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    changed = torch.where(ignored, torch.randn(2, 3, 8, 8) * 5, logits.detach())
    weights = torch.tensor([0.5, 1.0, 2.0])
    loss, _ = segmentation_loss(logits, seg, weights, ignore_label=IGNORE)
    loss_changed, _ = segmentation_loss(changed, seg, weights, ignore_label=IGNORE)
    assert torch.allclose(loss, loss_changed)
    loss.backward()
    assert torch.all(logits.grad[ignored] == 0) and torch.any(logits.grad[~ignored] != 0)


def test_segmentation_loss_without_ignore_is_pytorch_weighted_cross_entropy_plus_dice():
    seg = torch.randint(0, 3, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    logits = torch.randn(2, 3, 8, 8)
    weights = torch.tensor([0.5, 1.0, 2.0])
    _, parts = segmentation_loss(logits, seg, weights)
    assert parts["ce"] == pytest.approx(torch.nn.functional.cross_entropy(logits, seg[:, 0], weight=weights).item(), rel=1e-5)


def test_segmentation_loss_on_a_fully_unannotated_patch_is_zero_not_nan():
    seg = torch.full((1, 1, 4, 4), IGNORE)
    loss, _ = segmentation_loss(torch.randn(1, 3, 4, 4), seg, torch.ones(3), ignore_label=IGNORE)
    assert loss.item() == 0.0


def test_energy_score_does_not_see_samples_on_ignore_voxels():
    seg = _labels_with_ignore()
    ignored = (seg == IGNORE)[:, None].expand(-1, 2, 3, -1, -1)  # (N, M, K, H, W)
    probs = torch.randn(2, 2, 3, 8, 8).softmax(2)
    changed = torch.where(ignored, torch.randn(2, 2, 3, 8, 8).softmax(2), probs)
    target, valid = one_hot(seg, 3, IGNORE), valid_mask(seg, IGNORE)
    assert energy_score_loss(probs, target, valid)[0].item() == pytest.approx(energy_score_loss(changed, target, valid)[0].item())


def test_latent_valid_fraction_is_the_annotated_share_under_each_latent_voxel():
    seg = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    seg[..., :4, :] = IGNORE
    seg[..., 4:6, :2] = IGNORE
    fraction = latent_valid_fraction(valid_mask(seg, IGNORE), torch.Size((1, 4, 2, 2)))
    assert fraction[0, 0].tolist() == [[0.0, 0.0], [0.75, 1.0]]


def test_validation_metrics_and_reconstruction_input_ignore_unannotated_voxels():
    ref = np.zeros((1, 6, 6), np.int64)
    ref[0, 2:4, 2:4] = 1
    ref[0, :, 5] = IGNORE
    pred = ref.copy()
    pred[0, :, 5] = 2  # any prediction where nobody annotated is neither right nor wrong
    assert foreground_dice(pred, ref, 3, IGNORE) == 1.0
    assert foreground_dice(pred, ref, 3) < 1.0
    onehot = _onehot(ref, 3, IGNORE)
    assert onehot.shape == (3, 1, 6, 6) and np.all(onehot.sum(0) == 1) and np.all(onehot[0, 0, :, 5] == 1)


# ------------------------------------------------------------------------------ end to end


def _mark_top_rows_unannotated(folder) -> None:
    """Relabel the top rows of every label map as ``IGNORE`` and declare it in dataset.json."""
    for path in sorted((folder / "labelsTr").glob("*.png")):
        image = sitk.ReadImage(str(path))
        seg = sitk.GetArrayFromImage(image)
        seg[:UNANNOTATED_ROWS] = IGNORE
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(path))
    meta = json.loads((folder / "dataset.json").read_text())
    meta["labels"]["ignore"] = IGNORE
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))


@pytest.fixture(scope="module")
def planned_with_ignore(tmp_path_factory):
    from conftest import module_folders
    from latdiffunet.experiment_planning.cli import main as plan_main

    root = tmp_path_factory.mktemp("ignore2d")
    with module_folders(root) as env:
        folder = make_synthetic_dataset(root / "raw", name="Dataset905_Ignore2D", num_cases=6, dim=2, seed=5)
        _mark_top_rows_unannotated(folder)
        assert plan_main(["-d", "905", "--preset", "tiny", "-np", "1"]) == 0
        yield {"raw": folder, "pre": root / "pre" / "Dataset905_Ignore2D", "res": root / "res"}


def _trainer(env, **config):
    from latdiffunet.training.config import TrainerConfig
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    plans = json.loads((env["pre"] / "latdiffPlans_tiny.json").read_text())
    splits = json.loads((env["pre"] / "splits_final.json").read_text())
    defaults = dict(num_workers=0, batch_size=4, augment=False, validation_cases=2, validation_samples=2)
    fold = env["res"] / "LatentDiffusionTrainer__latdiffPlans_tiny__2d" / "fold_0"  # the layout prediction reads
    return LatentDiffusionTrainer(plans, "2d", 0, env["pre"], fold, torch.device("cpu"), TrainerConfig(**(defaults | config)),
                                  splits, raw_dataset_folder=env["raw"])


def _retain_output_grads(owner: torch.nn.Module, method: str) -> list[torch.Tensor]:
    """Wrap ``owner.method`` so each output keeps its gradient; returns the list the outputs go to."""
    outputs, original = [], getattr(owner, method)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        tensor = out["logits"] if isinstance(out, dict) else out
        if tensor.requires_grad:
            tensor.retain_grad()
            outputs.append(tensor)
        return out

    setattr(owner, method, wrapped)
    return outputs


def _gradients_inside_and_outside(out: torch.Tensor, ignored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out.grad`` on ignored and on annotated voxels (``out`` may hold several samples per image)."""
    mask = ignored.repeat_interleave(out.shape[0] // ignored.shape[0], 0).expand_as(out)
    return out.grad.masked_select(mask), out.grad.masked_select(~mask)


def test_trainer_losses_give_unannotated_voxels_no_gradient(planned_with_ignore):
    """Autoencoder, decoded and sample losses: no gradient reaches an unannotated voxel; the
    latent loss: none reaches a latent voxel over unannotated voxels only."""
    trainer = _trainer(planned_with_ignore, autoencoder_epochs=0, diffusion_epochs=1, sample_loss_start=0.0)
    assert trainer.ignore_label == IGNORE
    batch = next(trainer.batch_stream())
    trainer.shutdown()
    data, seg = trainer._to_device(batch)
    ignored = seg == IGNORE
    assert ignored.any() and (~ignored).any()

    reconstructed = _retain_output_grads(trainer.model.autoencoder, "forward")
    trainer.autoencoder_loss(data, seg)[0].backward()
    decoded = _retain_output_grads(trainer.model, "decode_latent")
    loss, parts = trainer.diffusion_loss(data, seg)
    loss.backward()
    assert {"decoded_loss", "sample_loss"} <= parts.keys() and len(decoded) == 2  # decoded x0-estimate, samples
    for out in reconstructed + decoded:
        inside, outside = _gradients_inside_and_outside(out, ignored)
        assert torch.all(inside == 0) and torch.any(outside != 0)

    trainer.config = trainer.config.with_overrides(decoded_supervision_weight=0.0, sample_loss_weight=0.0)
    denoised = _retain_output_grads(trainer.model, "denoise")
    trainer.diffusion_loss(data, seg)[0].backward()
    fully_ignored = latent_valid_fraction((~ignored).float(), denoised[0].shape) == 0
    inside, outside = _gradients_inside_and_outside(denoised[0], fully_ignored)
    assert inside.numel() > 0 and torch.all(inside == 0) and torch.any(outside != 0)


def test_short_run_with_ignore_label_trains_validates_and_predicts(planned_with_ignore):
    pre = planned_with_ignore["pre"] / "latdiffPlans_tiny_2d"
    with np.load(next(pre.glob("*.npz"))) as case:
        assert (case["seg"] == IGNORE).any() and f"locations_{IGNORE}" not in case.files  # no oversampling of it

    trainer = _trainer(planned_with_ignore, autoencoder_epochs=1, diffusion_epochs=1, iterations_per_epoch=2)
    summary = trainer.run()
    assert summary["ignore_label"] == IGNORE and set(summary["mean"]) == {"1", "2"}
    recon = json.loads((trainer.output_folder / "autoencoder_reconstruction.json").read_text())
    for case in recon["metric_per_case"] + summary["metric_per_case"]:  # periodic and final: annotated voxels only
        counts = case["metrics"]["1"]
        assert counts["TP"] + counts["FP"] + counts["FN"] + counts["TN"] == 32 * 40 - UNANNOTATED_ROWS * 40
    for case_id in trainer.val_cases:
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(trainer.output_folder / "validation" / f"{case_id}.png")))
        assert prediction.max() < IGNORE
