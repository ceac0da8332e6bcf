"""The training hot path is ready for a GPU, tested without one.

* Autocast: bfloat16 where the GPU computes it natively (compute capability >= 8), float16 with a
  GradScaler elsewhere, float32 off CUDA (the capability is monkeypatched).
* A training step never reads a device value back on the host: it runs on PyTorch's ``meta``
  device, where any ``.item()``, ``float()``, ``bool()`` or copy to the CPU of a device tensor
  raises. Both stages, with the decoded-loss threshold, an ignore label and the sample loss.
* The epoch loop reads the summed losses once every ``loss_readout_every`` steps and once at the
  end, not after every step.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from test_soundness import made_up_batch

from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.trainer import LatentDiffusionTrainer
from latdiffunet.utilities.autocast import amp_dtype, autocast_for, needs_grad_scaler

PLANS = REPO_ROOT / "plans" / "reference" / "Dataset004_Hippocampus" / "latdiffPlans_tiny.json"
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability,dtype,scaler", [((8, 0), torch.bfloat16, False), ((9, 0), torch.bfloat16, False),
                                                     ((7, 5), torch.float16, True), ((6, 1), torch.float16, True)])
def test_autocast_is_bfloat16_where_native_else_float16_with_a_grad_scaler(monkeypatch, capability, dtype, scaler):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert amp_dtype(CUDA) == dtype and needs_grad_scaler(CUDA, True) == scaler
    with warnings.catch_warnings():  # without a GPU torch warns that it disables CUDA autocast
        warnings.simplefilter("ignore")
        assert autocast_for(CUDA, True).fast_dtype == dtype
    assert amp_dtype(CUDA, enabled=False) is None and not needs_grad_scaler(CUDA, False)
    for device in ("cpu", "mps"):
        assert amp_dtype(torch.device(device)) is None and not needs_grad_scaler(torch.device(device), True)


def batch_with_unannotated_voxels(ignore: int) -> dict:
    batch = made_up_batch(0, batch_size=4)
    batch["seg"][0, 0, :, :5] = ignore
    return batch


def trainer_on(device: torch.device, tmp_path: Path, **config) -> LatentDiffusionTrainer:
    plans = json.loads(PLANS.read_text())
    return LatentDiffusionTrainer(plans, "2d", 0, tmp_path, tmp_path / "fold_0", device,
                                  TrainerConfig(num_workers=0, amp=False, **config), [{"train": ["x"], "val": []}])


@pytest.mark.parametrize("min_signal", [0.0, 0.3])
def test_a_training_step_never_waits_for_the_device(tmp_path, min_signal):
    """On the meta device a tensor has no values: reading one back (``.item()``, ``float()``,
    ``bool()``, ``.cpu()``, ``.tolist()``) raises, exactly where a GPU would make the host wait."""
    trainer = trainer_on(torch.device("meta"), tmp_path, sample_loss_start=0.0, sample_loss_images=2,
                         decoded_loss_min_signal=min_signal)
    trainer.ignore_label = 3
    for stage in ("autoencoder", "diffusion"):
        trainer._setup_stage(stage)
        trainer.epoch = 0 if stage == "autoencoder" else trainer.config.autoencoder_epochs  # the sample loss is on
        parts = trainer.train_step(batch_with_unannotated_voxels(3), stage)
        assert all(v.device.type == "meta" for v in parts.values()), parts
    assert {"loss", "latent_loss", "decoded_loss", "sample_loss", "ce", "dice_loss"} <= parts.keys()


def test_labels_are_still_checked_when_the_device_is_never_read(tmp_path):
    """The label check moved to the host batch (before the copy); a device-side check would wait."""
    trainer = trainer_on(torch.device("meta"), tmp_path)
    trainer._setup_stage("autoencoder")
    batch = made_up_batch(0, batch_size=2)
    batch["seg"][1, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"label values \[7\] are neither a class"):
        trainer.train_step(batch, "autoencoder")


_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__format__", "cpu", "numpy")


def test_the_epoch_loop_reads_losses_once_every_few_steps(tmp_path, monkeypatch):
    """9 steps, a read every 3: 3 reads for the progress bar and 1 for the epoch's means."""
    trainer = trainer_on(torch.device("cpu"), tmp_path, iterations_per_epoch=9, loss_readout_every=3)
    step = iter(range(100))
    monkeypatch.setattr(trainer, "batch_stream", lambda: iter([None]))
    monkeypatch.setattr(trainer, "train_step", lambda batch, stage: {
        "loss": torch.tensor(float(next(step))), "ce": torch.tensor(1.0), "dice_loss": torch.tensor(0.5)})
    reads = []
    package = str(REPO_ROOT / "latdiffunet")
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):  # the code under test, not torch's own
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    means = trainer.train_iterations("autoencoder", start=0.0)
    monkeypatch.undo()
    assert means == pytest.approx({"loss": 4.0, "ce": 1.0, "dice_loss": 0.5})
    assert len(reads) == 9 // 3 + 1, reads
