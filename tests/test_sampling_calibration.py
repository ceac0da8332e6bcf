"""Choosing the sampling temperature: the rule, the unbiased GED it compares, the cases it uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latdiffunet.evaluation.ambiguity import energy_distance_terms
from latdiffunet.training.sampling_calibration import calibration_cases, choose_noise_scale, unbiased_ged


def _disc(radius: float, size: int = 24) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - size / 2) ** 2 + (x - size / 2) ** 2 <= radius**2


def test_unbiased_ged_is_lowest_at_the_raters_own_spread():
    """Raters draw disc radii around 9 with sd 2; a model's 5 samples use sd 2 * t. Averaged over
    cases, the protocol's GED (identical pairs counted) is lowest at t = 0.75: with 5 samples it
    under-counts their spread by 20 % and favours too cold a temperature. The unbiased GED that
    calibration compares is lowest at the honest t = 1."""
    rng = np.random.default_rng(0)
    temperatures = (0.5, 0.75, 1.0, 1.25)
    protocol, unbiased = {t: [] for t in temperatures}, {t: [] for t in temperatures}
    for _ in range(300):
        raters = np.stack([_disc(r, 32) for r in rng.normal(9, 2, 4)])
        z = rng.normal(0, 1, 5)
        for t in temperatures:
            terms = energy_distance_terms(np.stack([_disc(9 + 2 * t * v, 32) for v in z]), raters)
            protocol[t].append(terms["GED"])
            unbiased[t].append(unbiased_ged(terms, 5, 4)[0])
    assert min(temperatures, key=lambda t: np.mean(protocol[t])) == 0.75
    assert min(temperatures, key=lambda t: np.mean(unbiased[t])) == 1.0
    terms = energy_distance_terms(np.stack([_disc(5), _disc(8)]), np.stack([_disc(5)]))
    assert unbiased_ged(terms, 2, 1)[1] == pytest.approx(2 * terms["sample_diversity"])


def test_unbiased_ged_prefers_samples_that_spread_like_the_raters_over_one_repeated_mask():
    a, b = _disc(5), _disc(8)
    raters = np.stack([a, b, a, b])
    spread = np.stack([a, b, a, b, a])
    collapsed = np.stack([b] * 5)
    ged_spread, _ = unbiased_ged(energy_distance_terms(spread, raters), 5, 4)
    ged_collapsed, _ = unbiased_ged(energy_distance_terms(collapsed, raters), 5, 4)
    assert ged_spread < ged_collapsed


def test_calibration_cases_spread_over_the_whole_fold():
    cases = [f"patient{p:02d}_slice{s}" for p in range(40) for s in range(25)]  # 1000 cases, sorted by patient
    picked = calibration_cases(cases, minimum=10)
    assert len(picked) == 50  # 5 % of 1000
    assert len({c.split("_")[0] for c in picked}) >= 35  # not the first two patients
    assert picked[0] == cases[0] and picked[-1] == cases[-1]
    assert calibration_cases(cases[:7], minimum=10) == cases[:7]
    assert calibration_cases([], minimum=10) == []


def test_several_raters_prefer_the_coldest_scale_the_data_cannot_tell_from_the_best():
    """One-standard-error rule on paired per-case GEDs: a colder scale within noise of the lowest
    GED wins; one clearly worse does not."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 1.0, 64)
    rows = [
        {"noise_scale": 0.5, "GED": 0.0, "GED_per_case": list(base + 0.10)},  # clearly worse
        {"noise_scale": 0.75, "GED": 0.0, "GED_per_case": list(base + rng.normal(0.0, 0.05, 64))},  # a tie
        {"noise_scale": 1.0, "GED": 0.0, "GED_per_case": list(base)},
    ]
    for r in rows:
        r["GED"] = float(np.mean(r["GED_per_case"]))
    rows[1]["GED"] = rows[2]["GED"] + 1e-4  # the mean ranks 1.0 first, by a hair
    rows[1]["GED_per_case"] = list(np.asarray(rows[1]["GED_per_case"]) - np.mean(rows[1]["GED_per_case"]) + rows[1]["GED"])
    scale, why = choose_noise_scale(rows, multi_rater=True)
    assert scale == 0.75 and "standard error" in why
    rows[1]["GED_per_case"] = list(base + 0.10)  # now clearly worse too
    rows[1]["GED"] = float(np.mean(rows[1]["GED_per_case"]))
    assert choose_noise_scale(rows, multi_rater=True)[0] == 1.0
    few = [dict(r, GED_per_case=r["GED_per_case"][:3]) for r in rows]
    few[1]["GED_per_case"] = [g - 0.2 for g in rows[2]["GED_per_case"][:3]]  # a tie on 3 cases...
    few[1]["GED"] = few[2]["GED"] + 1e-4
    assert choose_noise_scale(few, multi_rater=True)[0] == 1.0, "...is no evidence: lowest GED decides"
    for r in rows:  # tables written before per-case GEDs were stored: plain lowest GED
        del r["GED_per_case"]
    assert choose_noise_scale(rows, multi_rater=True)[0] == 1.0


def test_choose_noise_scale_rules():
    rows = [
        {"noise_scale": 0.0, "GED": 0.50, "Dice_single_sample": 0.80, "Dice_of_mean": 0.80},
        {"noise_scale": 0.5, "GED": 0.30, "Dice_single_sample": 0.805, "Dice_of_mean": 0.81},
        {"noise_scale": 1.0, "GED": 0.35, "Dice_single_sample": 0.70, "Dice_of_mean": 0.80},
    ]
    assert choose_noise_scale(rows, multi_rater=True)[0] == 0.5  # lowest GED
    # single rater: the largest scale whose one-sample Dice is within 0.01 of the best mean (0.81)
    assert choose_noise_scale(rows, multi_rater=False)[0] == 0.5
    rows[1]["Dice_single_sample"] = 0.79  # now only scale 0 (0.80) is within 0.01 of 0.81
    assert choose_noise_scale(rows, multi_rater=False)[0] == 0.0


def test_a_temperature_sweep_draws_each_temperatures_samples_and_conditions_each_window_once():
    """``noise_scales``: the samples at temperature c are exactly those of a predictor with
    ``noise_scale=c`` and the same generator (the table's rows do not change), while the image
    encoder runs once per window for all temperatures instead of once per temperature."""
    import copy

    from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor
    from latdiffunet.inference.sliding_window import sliding_window_predict
    from latdiffunet.networks import build_model
    from test_test_time_mirroring import DIFF, MODEL

    torch.manual_seed(0)
    model = build_model(copy.deepcopy(MODEL)).eval()
    torch.nn.init.normal_(model.denoiser.out[-1].weight, std=0.5)  # zero at init: every sample would be alike
    calls = {"n": 0}
    condition = model.condition_and_detail

    def counting(images):
        calls["n"] += 1
        return condition(images)

    model.condition_and_detail = counting
    volume = np.random.default_rng(0).normal(size=(1, 2, 40, 36)).astype(np.float32)  # 2 slices, overlapping windows
    scales, samples = (0.0, 0.5, 1.0), 3

    def predict(predictor, n):
        return sliding_window_predict(volume, [32, 32], predictor, n, 3, torch.device("cpu"), windows_per_batch=2)

    sweep = DiffusionWindowPredictor(model, DIFF, samples, 2, torch.Generator().manual_seed(7), mirror=True, noise_scales=scales)
    swept = predict(sweep, samples * len(scales))
    sweep_calls, calls["n"] = calls["n"], 0
    for k, scale in enumerate(scales):
        single = DiffusionWindowPredictor(model, DIFF, samples, 2, torch.Generator().manual_seed(7), mirror=True,
                                          noise_scale=scale)
        np.testing.assert_allclose(swept[k * samples:(k + 1) * samples], predict(single, samples), atol=1e-5)
    assert sweep_calls * len(scales) == calls["n"], "the sweep must condition each window once for all temperatures"
    assert np.abs(swept[:samples] - swept[-samples:]).max() > 1e-4, "temperatures 0 and 1 must give different samples"
    assert 0 < sweep.seconds["conditioning"] < sweep.seconds["total"]


def test_the_time_reserved_for_the_temperature_choice_counts_the_shared_conditioning_once():
    from latdiffunet.training.sampling_calibration import calibration_seconds

    assert calibration_seconds(10, 2.0) == pytest.approx(5 * 10 * 2.0)  # nothing known to be shared: 5 full passes
    assert calibration_seconds(10, 2.0, conditioning_share=0.5) == pytest.approx(10 * 2.0 * (0.5 + 5 * 0.5))
    assert calibration_seconds(10, 2.0, conditioning_share=1.0) == pytest.approx(10 * 2.0)


def test_the_temperature_table_reports_hungarian_matched_iou_per_case(tmp_path, monkeypatch):
    """Each row of the table carries HM-IoU (samples matched one-to-one to the raters, per class)
    next to GED, per case and as the mean: the held-back number that shows whether a warmer
    temperature buys spread at the price of samples no rater drew."""
    import copy

    import latdiffunet.evaluation.ambiguity as ambiguity
    from latdiffunet.networks import build_model
    from latdiffunet.training.sampling_calibration import noise_scale_table
    from test_test_time_mirroring import DIFF, MODEL

    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        raters = np.stack([np.zeros((1, 16, 16), np.int8) for _ in range(3)])
        raters[0, 0, 4:10, 4:10] = 1
        raters[1, 0, 5:12, 3:9] = 2
        np.savez(tmp_path / f"{case}.npz", data=rng.normal(size=(1, 1, 16, 16)).astype(np.float32),
                 seg=raters[0], seg_raters=raters)
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(MODEL)).eval()
    torch.nn.init.normal_(model.denoiser.out[-1].weight, std=0.5)
    configuration = {"network": {"num_classes": 3}, "inference": {"sampling_steps": 2}, "diffusion": DIFF,
                     "patch_size": [16, 16]}
    seen = []
    matched = ambiguity.hungarian_matched_iou

    def spy(samples, raters):
        seen.append(matched(samples, raters))
        return seen[-1]

    monkeypatch.setattr(ambiguity, "hungarian_matched_iou", spy)
    scales = (0.0, 1.0)
    rows = noise_scale_table(model, tmp_path, ["a", "b"], configuration, torch.device("cpu"), 3, scales=scales)
    # per case, per scale, per foreground class (2): the case's HM-IoU is the mean over its classes
    per = np.asarray(seen).reshape(2, len(scales), 2).mean(-1)
    for k, row in enumerate(rows):
        np.testing.assert_allclose(row["HM_IoU_per_case"], per[:, k], atol=1e-6)
        assert row["HM_IoU"] == pytest.approx(per[:, k].mean(), abs=1e-6) and 0.0 <= row["HM_IoU"] <= 1.0
