"""Diversity learned from raters: a synthetic two-mode dataset that a collapsed model cannot pass.

Every image shows two faint discs; half of the raters outline the left one, the other half the
right one. A model whose samples all give one answer (or the mean, or the union) scores a
Hungarian-matched IoU of at most ~0.5 against the raters; a model whose samples cover both modes
scores near 1. After a short training with the energy-score sample loss, 8 samples must clearly
beat one sample.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from latdiffunet.evaluation.ambiguity import hungarian_matched_iou
from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor
from latdiffunet.inference.sliding_window import sliding_window_predict
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.data_loading import load_preprocessed_case
from latdiffunet.training.losses import energy_score_loss

SIZE = 32
NUM_RATERS = 4


def _two_mode_case(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy = rng.integers(10, 22)
    left = ((yy - cy) ** 2 + (xx - 9) ** 2) <= 16
    right = ((yy - cy) ** 2 + (xx - 23) ** 2) <= 16
    image = 60 + 40 * (left | right) + rng.normal(0, 8, (SIZE, SIZE))
    raters = [(left if k % 2 == 0 else right).astype(np.uint8) for k in range(NUM_RATERS)]
    return np.clip(image, 0, 255).astype(np.uint8), raters


def _write(arr: np.ndarray, path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


@pytest.fixture(scope="module")
def two_mode_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("twomode")
    env = {k: root / k for k in ("raw", "pre", "res")}
    ds = env["raw"] / "Dataset905_TwoModes"
    for sub in ("imagesTr", "labelsTr", "labelsTr_raters"):
        (ds / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 16
    for i in range(n):
        image, raters = _two_mode_case(rng)
        _write(image, ds / "imagesTr" / f"tm_{i:03d}_0000.png")
        _write(raters[0], ds / "labelsTr" / f"tm_{i:03d}.png")
        for k, r in enumerate(raters):
            _write(r, ds / "labelsTr_raters" / f"tm_{i:03d}_rater{k}.png")
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "disc": 1}, "numTraining": n,
        "file_ending": ".png", "num_raters": NUM_RATERS, "rater_labels_folder": "labelsTr_raters",
    }))
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv({"raw": "LATDIFF_RAW", "pre": "LATDIFF_PREPROCESSED", "res": "LATDIFF_RESULTS"}[k], str(v))
    assert plan_main(["-d", "905", "--preset", "tiny", "-np", "1"]) == 0
    yield env
    mp.undo()


def _sample_masks(model, plans_cfg, case, num_samples: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    predictor = DiffusionWindowPredictor(model, plans_cfg["diffusion"], num_samples, plans_cfg["inference"]["sampling_steps"], gen)
    probs = sliding_window_predict(case["data"], plans_cfg["patch_size"], predictor, num_samples, 2, torch.device("cpu"))
    return probs.argmax(1)[:, 0]  # (S, Y, X)


@pytest.mark.slow
def test_samples_cover_both_rater_modes(two_mode_dataset):
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = two_mode_dataset["pre"] / "Dataset905_TwoModes"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    # the raters reach the plans, and the head's mask (the raters' mean: both discs at about 0.5)
    # conditions the denoiser here too: the samples must still split into the two modes
    assert json.loads((pre / "dataset_fingerprint.json").read_text())["num_raters"] == NUM_RATERS
    assert plans["configurations"]["2d"]["network"]["segmentation_head"]["condition_denoiser"] is True
    cases = sorted(p.stem for p in (pre / "latdiffPlans_tiny_2d").glob("*.npz"))
    config = TrainerConfig(
        autoencoder_epochs=3, diffusion_epochs=12, iterations_per_epoch=25, validation_every=1000, learning_rate=2e-3,
        batch_size=16, num_workers=0, augment=False, ema_decay=0.99, foreground_oversampling=0.0, seed=1,
    )
    trainer = LatentDiffusionTrainer(plans, "2d", 0, pre, two_mode_dataset["res"] / "tm", torch.device("cpu"), config,
                                     [{"train": cases[:12], "val": []}])
    trainer.run()
    model, cfg = trainer.ema, plans["configurations"]["2d"]
    many, one = [], []
    for i, case_id in enumerate(cases[12:]):  # images the model never saw
        case = load_preprocessed_case(pre / cfg["data_identifier"], case_id)
        raters = case["seg_raters"][:, 0]
        many.append(hungarian_matched_iou(_sample_masks(model, cfg, case, 8, seed=i), raters))
        one.append(hungarian_matched_iou(_sample_masks(model, cfg, case, 1, seed=i), raters))
    assert np.mean(one) < 0.62, f"one sample can only match half of the raters: {one}"
    assert np.mean(many) > np.mean(one) + 0.2, f"8 samples must cover both modes: HM-IoU {np.mean(many):.3f} vs one sample {np.mean(one):.3f}"


def test_energy_score_prefers_the_rater_distribution():
    """Proper scoring: bimodal samples beat collapsed ones, hedged (mean) ones and the union."""
    yy, xx = np.mgrid[:16, :16]
    left = torch.tensor(((yy - 8) ** 2 + (xx - 4) ** 2) <= 6, dtype=torch.float32)
    right = torch.tensor(((yy - 8) ** 2 + (xx - 11) ** 2) <= 6, dtype=torch.float32)

    def onehot(m):
        return torch.stack([1 - m, m])

    def expected(samples):  # average over the two equally likely raters
        probs = torch.stack([onehot(s) for s in samples])[None]
        return sum(energy_score_loss(probs, onehot(t)[None])[0] for t in (left, right)) / 2

    bimodal = expected([left, right, left, right])
    collapsed = expected([left, left, left, left])
    hedged = expected([(left + right) / 2] * 4)
    union = expected([torch.maximum(left, right)] * 4)
    assert bimodal < collapsed and bimodal < hedged and bimodal < union, (bimodal, collapsed, hedged, union)


def test_sample_loss_reaches_every_sampler_step():
    """Gradients flow through the whole differentiable DDIM chain, to the first (pure-noise) step."""
    from latdiffunet.diffusion import NoiseSchedule, ddim_sample

    weight = torch.nn.Parameter(torch.tensor(0.5))
    seen = []

    def denoise(x, t):
        seen.append(int(t[0]))
        return weight * x if int(t[0]) == 999 else x.detach() * 0 + x

    out = ddim_sample(denoise, NoiseSchedule.from_name("cosine", 1000), (2, 1, 4, 4), 3, "x0",
                      generator=torch.Generator().manual_seed(0), differentiable=True)
    out.square().sum().backward()
    assert seen[0] == 999 and weight.grad is not None and weight.grad.abs() > 0
    with torch.no_grad():
        assert not ddim_sample(denoise, NoiseSchedule.from_name("cosine", 1000), (2, 1, 4, 4), 3, "x0").requires_grad


def _synthetic_trainer(tmp_path, monkeypatch, dataset_id: int, trainer_name: str | None, **overrides):
    """A trainer of ``trainer_name`` (None: the default) on a fresh 6-case synthetic 2D dataset
    planned with the tiny preset; ``overrides`` go on top of the variant's config. Returns
    (trainer, its config, the 2d configuration of the plans)."""
    from synthetic import make_synthetic_dataset

    from latdiffunet.training.trainer import LatentDiffusionTrainer
    from latdiffunet.training.variants import get_trainer_class

    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        monkeypatch.setenv(var, str(tmp_path / key))
    name = f"Dataset{dataset_id:03d}_Synthetic"
    make_synthetic_dataset(tmp_path / "raw", name=name, num_cases=6, dim=2, seed=dataset_id)
    assert plan_main(["-d", str(dataset_id), "--preset", "tiny", "-np", "1"]) == 0
    pre = tmp_path / "pre" / name
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    cfg = plans["configurations"]["2d"]
    trainer_class = get_trainer_class(trainer_name) if trainer_name else LatentDiffusionTrainer
    config = TrainerConfig.from_plans(cfg, **trainer_class.config_overrides).with_overrides(
        num_workers=0, batch_size=2, **overrides)
    trainer = trainer_class(plans, "2d", 0, pre, tmp_path / "out", torch.device("cpu"), config,
                            json.loads((pre / "splits_final.json").read_text()))
    return trainer, config, cfg


@pytest.mark.parametrize("whole_chain", [False, True])
def test_whole_chain_variant_trains_every_sampler_step(tmp_path, monkeypatch, whole_chain):
    """``-tr LatentDiffusionTrainer_wholeChain``: the sample loss builds its graph through every
    step of the few-step chain (the default only through the last), and the first step's denoiser
    call, which starts from pure noise, receives a gradient."""
    trainer, config, cfg = _synthetic_trainer(tmp_path, monkeypatch, 906, "LatentDiffusionTrainer_wholeChain" if whole_chain else None)
    assert config.sample_loss_whole_chain is whole_chain
    with torch.no_grad():  # as after training: the zero-initialised output conv would make later steps ignore their input
        torch.manual_seed(1)
        trainer.model.denoiser.out[-1].weight.normal_(0, 0.05)
    grad_enabled, first_outputs = [], []
    plain_denoise = trainer.model.denoise

    def recording_denoise(*args, **kwargs):
        out = plain_denoise(*args, **kwargs)
        grad_enabled.append(torch.is_grad_enabled())
        if len(grad_enabled) == 1 and out.requires_grad:
            out.retain_grad()
            first_outputs.append(out)
        return out

    monkeypatch.setattr(trainer.model, "denoise", recording_denoise)
    torch.manual_seed(0)
    data = torch.randn(2, cfg["network"]["in_channels"], *cfg["patch_size"])
    seg = (torch.rand(2, 1, *cfg["patch_size"]) > 0.7).long()
    cond, detail = trainer.model.condition_and_detail(data)
    loss, _ = trainer.sample_loss(cond, torch.nn.functional.one_hot(seg[:, 0], 2).movedim(-1, 1).float(), None, detail)
    loss.backward()
    steps = cfg["inference"]["sampling_steps"]
    assert len(grad_enabled) == steps
    if whole_chain:
        assert all(grad_enabled) and first_outputs[0].grad is not None and first_outputs[0].grad.abs().sum() > 0
    else:
        assert grad_enabled == [False] * (steps - 1) + [True] and not first_outputs


def test_sample_loss_every_k_steps_runs_on_those_steps_weighted_k_times(tmp_path, monkeypatch):
    """``sample_loss_every = 2`` (``-tr LatentDiffusionTrainer_sampleLossEvery2``): the sampler runs on
    steps 0, 2, 4, ... of an epoch only, and its loss counts twice there, so the expected gradient
    is that of every step (the epoch log averages a part over the steps that had it)."""
    trainer, config, cfg = _synthetic_trainer(tmp_path, monkeypatch, 907, "LatentDiffusionTrainer_sampleLossEvery2",
                                              sample_loss_start=0.0, autoencoder_epochs=0, iterations_per_epoch=4)
    assert config.sample_loss_every == 2
    calls = []

    def fixed_sample_loss(cond, target, valid=None, detail=None):
        calls.append(trainer._step_in_epoch)
        return cond.sum() * 0 + 0.25, {"sample_spread": torch.tensor(0.1)}

    monkeypatch.setattr(trainer, "sample_loss", fixed_sample_loss)
    torch.manual_seed(0)
    data = torch.randn(2, cfg["network"]["in_channels"], *cfg["patch_size"])
    seg = (torch.rand(2, 1, *cfg["patch_size"]) > 0.7).long()
    totals = []
    for step in range(4):
        trainer._step_in_epoch = step
        loss, parts = trainer.diffusion_loss(data, seg)
        known = (("latent_loss", config.latent_loss_weight), ("decoded_loss", config.decoded_supervision_weight),
                 ("image_seg_loss", config.image_segmentation_weight))
        totals.append(float(loss.detach()) - sum(float(parts[k]) * w for k, w in known if k in parts))
        assert ("sample_loss" in parts) is (step % 2 == 0)
    assert calls == [0, 2]
    assert totals[0] == pytest.approx(2 * 0.25 * config.sample_loss_weight, abs=1e-5) and totals[1] == pytest.approx(0, abs=1e-5)
