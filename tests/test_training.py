"""Training on small synthetic data: overfitting, the CLI smoke run, resume, checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from synthetic import make_synthetic_dataset

from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor
from latdiffunet.inference.sliding_window import sliding_window_predict
from latdiffunet.training.data_loading import load_preprocessed_case
from latdiffunet.utilities.checkpoint import load_checkpoint, save_checkpoint
from latdiffunet.training.cli import main as train_main, split_epochs
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.variants import get_trainer_class
from latdiffunet.errors import UserInputError


@pytest.fixture(scope="module")
def planned_2d(tmp_path_factory):
    """A 2D synthetic dataset, planned and preprocessed with the tiny preset."""
    root = tmp_path_factory.mktemp("train2d")
    env = {k: root / k for k in ("raw", "pre", "res")}
    mp = pytest.MonkeyPatch()
    mp.setenv("LATDIFF_RAW", str(env["raw"]))
    mp.setenv("LATDIFF_PREPROCESSED", str(env["pre"]))
    mp.setenv("LATDIFF_RESULTS", str(env["res"]))
    make_synthetic_dataset(env["raw"], name="Dataset901_Disc2D", num_cases=10, dim=2, seed=3)
    assert plan_main(["-d", "901", "--preset", "tiny", "-np", "1"]) == 0
    yield env
    mp.undo()


def _trainer(env, config: TrainerConfig, folder_name: str, splits=None):
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = env["pre"] / "Dataset901_Disc2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    if splits is None:
        splits = json.loads((pre / "splits_final.json").read_text())
    return LatentDiffusionTrainer(plans, "2d", 0, pre, env["res"] / folder_name, torch.device("cpu"), config, splits)


def test_tiny_model_overfits_synthetic_cases(planned_2d):
    """Validation = training cases: the whole model must be able to fit them (Dice > 0.9), and it
    must still be a sampler. A deterministic segmenter, or a denoiser that learnt to ignore its
    noisy input, passes a Dice check as well; so each sample alone must be a good mask (not only
    the mean of several), and another seed must give other samples."""
    folder = planned_2d["pre"] / "Dataset901_Disc2D" / "latdiffPlans_tiny_2d"
    cases = sorted(p.stem for p in folder.glob("*.npz"))[:4]
    config = TrainerConfig(
        autoencoder_epochs=3, diffusion_epochs=6, iterations_per_epoch=25, validation_every=100,
        learning_rate=2e-3, batch_size=8, num_workers=0, augment=False, validation_samples=3, ema_decay=0.99,
    )
    trainer = _trainer(planned_2d, config, "overfit", splits=[{"train": cases, "val": cases}])
    summary = trainer.run()
    recon = json.loads((trainer.output_folder / "autoencoder_reconstruction.json").read_text())
    assert recon["foreground_mean"]["Dice"] > 0.9
    assert summary["foreground_mean"]["Dice"] > 0.9, summary["mean"]
    assert summary["single_sample_foreground_dice"] > 0.9

    def samples(seed: int) -> np.ndarray:
        predictor = DiffusionWindowPredictor(trainer.ema, trainer.configuration["diffusion"], 2, 4,
                                             torch.Generator().manual_seed(seed), noise_scale=1.0)
        data = load_preprocessed_case(folder, cases[0])["data"]
        return sliding_window_predict(data, trainer.configuration["patch_size"], predictor, 2, 3, torch.device("cpu"))

    first, second = samples(0), samples(1)
    assert np.abs(first - second).max() > 1e-2 and np.abs(first[0] - first[1]).max() > 1e-2


def test_cli_smoke_and_resume(planned_2d):
    common = ["901", "0", "-c", "2d", "-p", "latdiffPlans_tiny", "--iters-per-epoch", "3", "--device", "cpu", "--num-workers", "0"]
    assert train_main(common + ["--epochs", "2"]) == 0
    fold = planned_2d["res"] / "Dataset901_Disc2D" / "LatentDiffusionTrainer__latdiffPlans_tiny__2d" / "fold_0"
    for name in ("progress.png", "checkpoint_final.pth", "checkpoint_latest.pth", "metrics.json", "training_log.txt", "validation/summary.json"):
        assert (fold / name).is_file(), name
    first = load_checkpoint(fold / "checkpoint_latest.pth")
    assert first["epoch"] == 2
    assert train_main(common + ["--epochs", "3", "--c"]) == 0
    resumed = load_checkpoint(fold / "checkpoint_latest.pth")
    assert resumed["epoch"] == 3 and resumed["autoencoder_epochs"] == first["autoencoder_epochs"]
    history = json.loads((fold / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert "resuming from" in (fold / "training_log.txt").read_text()
    # the autoencoder was frozen in stage 2: its weights are unchanged by the resumed epoch
    for k, v in first["model"].items():
        if k.startswith("autoencoder."):
            assert torch.equal(v, resumed["model"][k]), k


class _Killed(Exception):
    """Stands in for a kill of the training process right after a checkpoint."""


def _run_until_killed(trainer, epochs: int) -> None:
    """Run ``trainer`` and stop it like a kill just after its checkpoint at ``epochs`` epochs."""
    save = trainer.save

    def save_then_die(name: str) -> None:
        save(name)
        if name == "checkpoint_latest.pth" and trainer.epoch >= epochs:
            raise _Killed

    trainer.save = save_then_die
    with pytest.raises(_Killed):
        trainer.run()


def _train_cases(env) -> list[dict]:
    """Fold 0's training cases, no validation cases: the tests below need no validation."""
    splits = json.loads((env["pre"] / "Dataset901_Disc2D" / "splits_final.json").read_text())
    return [{"train": splits[0]["train"], "val": []}]


def test_resumed_run_continues_like_an_uninterrupted_one(planned_2d):
    """2 epochs, kill, resume for 2 more == 4 epochs in one go: same losses, weights, EMA and
    optimiser moments. Holds only if the checkpoint carries the EMA, the optimiser, the RNG states
    (noise levels, noise, the sample loss's sampler) and the data stream's position."""
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=3, iterations_per_epoch=2, num_workers=0, batch_size=4,
                           checkpoint_every=1, sample_loss_start=0.5, sample_loss_images=2)
    whole = _trainer(planned_2d, config, "uninterrupted", splits=_train_cases(planned_2d))
    whole.run()
    _run_until_killed(_trainer(planned_2d, config, "resumed", splits=_train_cases(planned_2d)), epochs=2)
    resumed = _trainer(planned_2d, config, "resumed", splits=_train_cases(planned_2d))
    resumed.run(resume=True)

    losses = [[h["train_loss"] for h in json.loads((t.output_folder / "metrics.json").read_text())] for t in (whole, resumed)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    for name in ("model", "ema"):
        a, b = getattr(whole, name).state_dict(), getattr(resumed, name).state_dict()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")
    moments = [[s["exp_avg"] for s in t.optimizer.state_dict()["state"].values()] for t in (whole, resumed)]
    torch.testing.assert_close(moments[1], moments[0], rtol=1e-5, atol=1e-7)
    assert resumed.ema_updates == whole.ema_updates


def test_resumed_run_counts_the_time_already_spent(planned_2d):
    """A run killed in its autoencoder stage after using 99 % of its budget must not start the
    budget afresh on resume: it ends the autoencoder stage at once and trains only the one
    diffusion epoch the rescaling always keeps (not 1 + 20 more epochs, nor 1 + 1)."""
    config = TrainerConfig(autoencoder_epochs=2, diffusion_epochs=20, iterations_per_epoch=1, num_workers=0, batch_size=2,
                           checkpoint_every=1, time_budget_minutes=10, sample_loss_weight=0.0)
    _run_until_killed(_trainer(planned_2d, config, "budget_resume", splits=_train_cases(planned_2d)), epochs=1)
    latest = planned_2d["res"] / "budget_resume" / "checkpoint_latest.pth"
    state = load_checkpoint(latest)
    assert 0 < state["training_seconds"] < 60 and len(state["epoch_times"]["autoencoder"]) == 1
    state["training_seconds"] = 0.99 * 10 * 60  # as if the first session had taken that long
    save_checkpoint(state, latest)
    resumed = _trainer(planned_2d, config, "budget_resume", splits=_train_cases(planned_2d))
    resumed.run(resume=True)
    assert (resumed.epoch, resumed.config.autoencoder_epochs, resumed.config.diffusion_epochs) == (2, 1, 1)


def test_checkpoints_load_weights_only_and_corrupt_is_user_error(planned_2d, tmp_path):
    fold = planned_2d["res"] / "Dataset901_Disc2D" / "LatentDiffusionTrainer__latdiffPlans_tiny__2d" / "fold_0"
    if not (fold / "checkpoint_final.pth").is_file():
        pytest.skip("needs the smoke run")
    torch.load(fold / "checkpoint_final.pth", weights_only=True)
    bad = tmp_path / "bad.pth"
    shutil.copy(fold / "checkpoint_final.pth", bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(UserInputError, match="bad.pth"):
        load_checkpoint(bad)


def test_epoch_split_and_trainer_registry():
    assert split_epochs(2, 10, 30) == (1, 1)
    assert split_epochs(40, 10, 30) == (10, 30)
    assert split_epochs(3, 10, 30) == (1, 2)
    assert get_trainer_class("LatentDiffusionTrainer_vpred").diffusion_overrides == {"parameterization": "v"}
    with pytest.raises(UserInputError, match="unknown trainer"):
        get_trainer_class("Nope")
    cfg = TrainerConfig.from_plans({"training": {"diffusion_epochs": 7}, "loss": {"dice_weight": 0.5}}, autoencoder_epochs=2)
    assert (cfg.autoencoder_epochs, cfg.diffusion_epochs, cfg.dice_weight, cfg.total_epochs) == (2, 7, 0.5, 9)
    assert cfg.stage_of(1) == "autoencoder" and cfg.stage_of(2) == "diffusion"


def test_bad_fold_and_missing_plans_are_user_errors(planned_2d, capsys):
    assert train_main(["901", "7", "-p", "latdiffPlans_tiny", "--device", "cpu"]) == 2
    assert "fold 7 does not exist" in capsys.readouterr().err
    assert train_main(["901", "0", "-p", "latdiffPlans_nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "latdiffPlans_nope.json" in err and "Traceback" not in err


def test_time_budget_rescales_epochs(planned_2d):
    """A generous epoch plan is cut down to what fits a tiny budget, and the run stays short."""
    import time

    config = TrainerConfig(autoencoder_epochs=50, diffusion_epochs=200, iterations_per_epoch=2, num_workers=0, batch_size=4,
                           validation_cases=1, validation_every=1000, time_budget_minutes=0.25)
    trainer = _trainer(planned_2d, config, "budget")
    start = time.time()
    trainer.run()
    assert trainer.config.autoencoder_epochs < 50 and trainer.config.diffusion_epochs < 200
    assert trainer.epoch == trainer.config.total_epochs >= 2
    assert time.time() - start < 60
