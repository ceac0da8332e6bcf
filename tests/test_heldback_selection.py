"""Held-back selection (training/held_back.py): checkpoint_best and the temperature are chosen on
cases carved from the fold's training part, never on its validation cases; fold 'all' and
several folds through ``latdiff_train``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from synthetic import make_synthetic_dataset

from latdiffunet.errors import UserInputError
from latdiffunet.preprocessing.splits import CaseGroups, ensure_splits, load_case_groups
from latdiffunet.training.held_back import (
    CONFIG_KEY, HeldBackSelection, choose_held_back, held_back_size, resolve_held_back,
)


# ----------------------------------------------------------------------------- the rule, on lists of names
def test_size_rule():
    """min(10, max(2, ceil(5 %))) units; nothing below 20 training units."""
    assert [held_back_size(n) for n in (0, 5, 19, 20, 40, 41, 176, 200, 240, 5000)] == [0, 0, 0, 2, 2, 3, 9, 10, 10, 10]


def _cases(n: int) -> list[str]:
    return [f"c{i:03d}" for i in range(n)]


def test_held_back_cases_are_training_cases_never_validation_cases_and_deterministic():
    cases = _cases(60)
    train, val = cases[:48], cases[48:]
    first = choose_held_back(0, train, val)
    assert len(first.cases) == 3 and set(first.cases) <= set(train) and not set(first.cases) & set(val)
    assert choose_held_back(0, list(reversed(train)), val) == first  # the order cases are listed in does not matter
    # a case listed in both parts (a bad split) is never held back: it would be reported on
    both = choose_held_back(0, cases, val)
    assert not set(both.cases) & set(val)


def test_groups_are_held_back_whole_and_never_shared_with_validation():
    """44 patients of 2-5 slices; 20 patients' slices are on both sides of the split (a split
    that was not grouped by patient): none of them may be held back."""
    groups, cases = {}, []
    for p in range(44):
        for s in range(2 + p % 4):
            cases.append(f"p{p:02d}_s{s}")
            groups[cases[-1]] = f"p{p:02d}"
    straddling = {f"p{p:02d}" for p in range(4, 24)}
    val = [c for c in cases if groups[c] in {"p00", "p01", "p02", "p03"}] + [f"{g}_s0" for g in sorted(straddling)]
    train = [c for c in cases if c not in val]
    selection = choose_held_back(0, train, val, CaseGroups(groups, Path("case_groups.json")))
    held_groups = {groups[c] for c in selection.cases}
    assert len(held_groups) == held_back_size(20) == 2 and set(selection.groups) == held_groups
    assert set(selection.cases) == {c for c in train if groups[c] in held_groups}  # whole groups
    assert not held_groups & {groups[c] for c in val}
    assert selection.warnings and "20 group(s)" in selection.warnings[0]
    # periodic validation takes the first cases: one of every group before a second of any
    firsts = [groups[c] for c in selection.cases[: len(held_groups)]]
    assert sorted(firsts) == sorted(held_groups)


def test_a_case_without_group_names_the_groups_file():
    groups = CaseGroups({c: "g" for c in _cases(30)[1:]}, Path("/data/case_groups.json"))
    with pytest.raises(UserInputError, match="case_groups.json.*'c000'"):
        choose_held_back(0, _cases(30)[:25], _cases(30)[25:], groups)


def test_too_few_training_cases_and_fold_all_hold_nothing_back():
    assert not choose_held_back(1, _cases(19), _cases(30)[19:]).active
    assert not choose_held_back("all", _cases(100), []).active
    statement = HeldBackSelection.nothing("fold 0 has 8 training cases").checkpoint_statement("checkpoint_final.pth", 2)
    assert "checkpoint_final.pth, as nnU-Net reports" in statement and "nothing was chosen on the 2 validation cases" in statement


def test_stored_selection_is_reused_checked_and_legacy_runs_hold_nothing_back(tmp_path):
    cases = _cases(60)
    train, val = cases[:48], cases[48:]
    stored = HeldBackSelection(("c005", "c006"), (), None, "stored by the first session")
    (tmp_path / "training_config.json").write_text(json.dumps({"seed": 1, CONFIG_KEY: stored.to_dict()}))
    assert resolve_held_back(tmp_path, 0, train, val, None, continuing=True) == stored  # read back, not recomputed
    assert resolve_held_back(tmp_path, 0, train, val, None, continuing=False) == choose_held_back(0, train, val)
    with pytest.raises(UserInputError, match="training_config.json.*no longer fit fold 0"):
        resolve_held_back(tmp_path, 0, train[10:], val + train[:10], None, continuing=True)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "training_config.json").write_text(json.dumps({"seed": 1}))
    (legacy / "checkpoint_latest.pth").write_bytes(b"")
    assert not resolve_held_back(legacy, 0, train, val, None, continuing=True).active
    assert resolve_held_back(legacy, 0, train, val, None, continuing=False).active


def test_case_groups_file_is_copied_with_the_splits_and_validated(tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    raw.mkdir(), pre.mkdir()
    cases = _cases(10)
    (raw / "case_groups.json").write_text(json.dumps({c: int(c[1:]) // 2 for c in cases}))
    ensure_splits(pre, raw, cases)
    groups = load_case_groups(pre, raw)
    assert groups.source == pre / "case_groups.json" and groups.groups["c003"] == "1"
    assert load_case_groups(tmp_path) is None
    (raw / "case_groups.json").write_text(json.dumps({"c000": [1]}))
    with pytest.raises(UserInputError, match="group"):
        load_case_groups(raw)


# ----------------------------------------------------------------------------- the trainer
DATASET = "Dataset903_HeldBack"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """26 synthetic 2D cases (fold 0: 20 training cases, so 2 are held back), tiny plans."""
    from latdiffunet.experiment_planning.cli import main as plan_main

    root = tmp_path_factory.mktemp("heldback")
    env = {k: root / k for k in ("raw", "pre", "res")}
    mp = pytest.MonkeyPatch()
    for var, key in (("LATDIFF_RAW", "raw"), ("LATDIFF_PREPROCESSED", "pre"), ("LATDIFF_RESULTS", "res")):
        mp.setenv(var, str(env[key]))
    make_synthetic_dataset(env["raw"], name=DATASET, num_cases=26, dim=2, seed=5)
    assert plan_main(["-d", "903", "--preset", "tiny", "-np", "1"]) == 0
    yield env
    mp.undo()


@pytest.fixture
def loaded_cases(monkeypatch):
    """The cases every training data loader is given."""
    from latdiffunet.training import data_loading

    seen: list[list[str]] = []

    class Spy(data_loading.PatchDataLoader):
        def __init__(self, folder, case_ids, *args, **kwargs):
            seen.append(list(case_ids))
            super().__init__(folder, case_ids, *args, **kwargs)

    monkeypatch.setattr(data_loading, "PatchDataLoader", Spy)
    return seen


def test_checkpoint_and_temperature_are_chosen_on_held_back_cases_only(planned, monkeypatch, loaded_cases):
    """Spy on what periodic validation evaluates and what calibration scores: only held-back
    cases, which are never trained on; the validation cases only in the final validation."""
    from latdiffunet.training import final_validation as final_validation_module
    from latdiffunet.training import trainer as trainer_module
    from latdiffunet.training import validation as validation_module
    from latdiffunet.training.config import TrainerConfig

    pre = planned["pre"] / DATASET
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    splits = json.loads((pre / "splits_final.json").read_text())
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=2, iterations_per_epoch=1, batch_size=2, num_workers=0,
                           validation_every=1, validation_max_time_fraction=1.0, validation_cases=1, validation_samples=2,
                           augment=False, sample_loss_weight=0.0)
    trainer = trainer_module.LatentDiffusionTrainer(plans, "2d", 0, pre, planned["res"] / "spy" / "fold_0", torch.device("cpu"),
                                                    config, splits)
    held, val = set(trainer.held_back.cases), set(splits[0]["val"])
    assert len(held) == 2 and held <= set(splits[0]["train"])

    events = []
    evaluate, calibrate = validation_module.evaluate_model_on_cases, final_validation_module.calibrate_noise_scale
    validate = trainer.validate

    def spy_evaluate(model, folder, case_ids, *args, **kwargs):
        events.append(("evaluate", set(case_ids)))
        return evaluate(model, folder, case_ids, *args, **kwargs)

    def spy_calibrate(model, folder, case_ids, *args, **kwargs):
        events.append(("calibrate", set(case_ids)))
        return calibrate(model, folder, case_ids, *args, **kwargs)

    def spy_validate(stage, final=False, **kwargs):
        events.append(("final" if final else "periodic", stage))
        return validate(stage, final=final, **kwargs)

    monkeypatch.setattr(validation_module, "evaluate_model_on_cases", spy_evaluate)
    monkeypatch.setattr(final_validation_module, "calibrate_noise_scale", spy_calibrate)
    trainer.validate = spy_validate
    summary = trainer.run()

    assert loaded_cases and all(not set(cases) & (held | val) for cases in loaded_cases)  # never trained on
    chosen_on = [cases for (kind, _), (what, cases) in zip(events, events[1:]) if kind == "periodic" and what == "evaluate"]
    chosen_on += [cases for what, cases in events if what == "calibrate"]
    assert len(chosen_on) == 4 and all(cases <= held for cases in chosen_on), events  # 3 periodic + calibration
    reported = [cases for (kind, stage), (what, cases) in zip(events, events[1:]) if kind == "final" and stage == "diffusion"]
    assert reported == [val]
    assert summary["checkpoint"] == "checkpoint_best.pth"
    assert "chosen on 2 held-back training cases" in summary["checkpoint_selection"]
    stored = json.loads((trainer.output_folder / "training_config.json").read_text())[CONFIG_KEY]
    assert sorted(stored["cases"]) == sorted(held)
    assert set(json.loads((trainer.output_folder / "sampling_calibration.json").read_text())["cases"]) <= held
    # the held-back cases exist to choose on: calibration scores all of them (up to CALIBRATION_MAX_CASES)
    assert [cases for what, cases in events if what == "calibrate"] == [held]


def test_too_few_training_cases_report_the_final_checkpoint(planned, loaded_cases):
    """10 training cases: nothing held back, all of them train, periodic validation only draws the
    curve, no checkpoint_best (not even an earlier run's), no temperature chosen."""
    from latdiffunet.training.config import TrainerConfig
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = planned["pre"] / DATASET
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    cases = json.loads((pre / "splits_final.json").read_text())[0]["train"]
    splits = [{"train": cases[:10], "val": cases[10:13]}]
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=1, iterations_per_epoch=1, batch_size=2, num_workers=0,
                           validation_every=1, validation_max_time_fraction=1.0, validation_samples=2, augment=False,
                           sample_loss_weight=0.0)
    folder = planned["res"] / "few" / "fold_0"
    folder.mkdir(parents=True)
    (folder / "checkpoint_best.pth").write_bytes(b"an earlier run's")
    trainer = LatentDiffusionTrainer(plans, "2d", 0, pre, folder, torch.device("cpu"), config, splits)
    summary = trainer.run()
    assert not trainer.held_back.active and all(sorted(c) == sorted(cases[:10]) for c in loaded_cases)
    assert summary["checkpoint"] == "checkpoint_final.pth" and "as nnU-Net reports" in summary["checkpoint_selection"]
    assert not (folder / "checkpoint_best.pth").exists() and not (folder / "sampling_calibration.json").exists()
    assert any("val_dice" in h for h in json.loads((folder / "metrics.json").read_text()))  # the curve is still drawn


def test_fold_all_trains_on_every_case_and_several_folds_are_merged(planned, loaded_cases, capsys):
    from latdiffunet.training.cli import main as train_main

    common = ["903", "-c", "2d", "-p", "latdiffPlans_tiny", "--epochs", "2", "--iters-per-epoch", "1", "--batch-size", "2",
              "--device", "cpu", "--num-workers", "0"]
    run = planned["res"] / DATASET / "LatentDiffusionTrainer__latdiffPlans_tiny__2d"
    assert train_main(common[:1] + ["all"] + common[1:]) == 0
    everything = sorted(json.loads((planned["pre"] / DATASET / "splits_final.json").read_text())[0]["train"]
                        + json.loads((planned["pre"] / DATASET / "splits_final.json").read_text())[0]["val"])
    assert loaded_cases and all(sorted(cases) == everything for cases in loaded_cases)
    assert json.loads((run / "fold_all" / "training_config.json").read_text())[CONFIG_KEY]["cases"] == []
    assert (run / "fold_all" / "checkpoint_final.pth").is_file() and not (run / "fold_all" / "validation").exists()

    assert train_main(common[:1] + ["0", "1"] + common[1:]) == 0
    out = capsys.readouterr().out
    merged = json.loads((run / "crossval_results_folds_0_1" / "summary.json").read_text())
    assert sorted(merged["folds"]) == ["0", "1"] and "cross-validation (2 folds" in out
    assert train_main(common[:1] + ["0", "1", "--c"] + common[1:]) == 0  # a finished loop restarts at once
    assert capsys.readouterr().out.count("already finished") == 2
    assert train_main(common[:1] + ["0", "0"] + common[1:]) == 2
    assert "given more than once" in capsys.readouterr().err
