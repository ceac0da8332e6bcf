"""Robustness to image corruption (LDSeg's claim): Dice against corruption level, ours and nnU-Net's.

    python -m latdiffunet.evaluation.robustness -d 4 -c 2d -f 0 -p latdiffPlans_tiny \\
        --corrupt gaussian blur contrast gamma --levels 0 0.05 0.1 0.2 0.4 [--max-cases N] [-o OUT]

LDSeg (papers.md) claims a latent diffusion segmenter is more robust to acquisition noise than
deterministic segmenters. Here the validation cases of one fold (``splits_final.json`` of the
preprocessed dataset, never training cases) are corrupted in their raw geometry at increasing
levels (:mod:`~latdiffunet.evaluation.corruptions` defines each exactly), then predicted by

* our trained fold, as ``latdiff_predict -f K`` does: Dice of the label of the mean of the samples
  (``latdiffunet (mean of N samples)``) and the mean Dice of one sample (``latdiffunet (one
  sample)``), both from one prediction run;
* nnU-Net's trained fold from ``latdiff_benchmark`` (same split), with nnU-Net's own predictor in
  a child process (:mod:`~latdiffunet.evaluation.nnunet_predict`);

and every prediction is scored by ``latdiff_evaluate``'s evaluator against the raw labels in the
original geometry. Level 0 is the clean image for every corruption, so it is predicted once.

Verdict per corruption: the *retention* of each method, the area under its Dice-against-level
curve divided by its level-0 Dice and by the level range (trapezoid rule): 1 means no loss at any
level, 0.5 e.g. half the Dice lost on average. "Degrades more gracefully" = larger retention; the
numbers are written next to the words.

Writes ``robustness.json`` (per corruption, level and method: mean foreground Dice, Dice per
class, cases, seconds), ``robustness.md`` (tables and verdicts) and ``robustness.png`` (Dice vs
level per corruption) into the output folder; the corrupted images, predictions and each
prediction's ``summary.json`` stay in its subfolders.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from latdiffunet.errors import UserInputError
from latdiffunet.evaluation.corruptions import CORRUPTIONS, check_level, describe_level
from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading

DEFAULT_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.4)
CLEAN = "clean"
METHOD_NNUNET = "nnU-Net v2"
#: Retention differences below this are reported as "about as gracefully".
RETENTION_TIE = 0.005


def method_names(num_samples: int) -> tuple[str, str]:
    """Row names of our two Dice readings: the mean of the samples and a single sample."""
    return f"latdiffunet (mean of {num_samples} samples)", "latdiffunet (one sample)"


@dataclass(frozen=True)
class RobustnessConfig:
    """Everything one robustness run needs (the CLI's arguments)."""

    dataset: str
    configuration: str = "2d"
    fold: int = 0
    plans: str | None = None  # None: latdiffPlans on CUDA, latdiffPlans_tiny on the CPU (latdiff_benchmark's rule)
    trainer: str = "LatentDiffusionTrainer"
    checkpoint: str | None = None  # None: best when it exists (latdiff_predict's rule)
    corruptions: tuple[str, ...] = CORRUPTIONS
    levels: tuple[float, ...] = DEFAULT_LEVELS
    seed: int = 0
    max_cases: int | None = None
    nnunet_dir: Path | None = None
    skip_nnunet: bool = False
    output: Path | None = None
    device: str | None = None
    num_samples: int | None = None
    steps: int | None = None
    num_processes: int = 2
    nnunet_checkpoint: str = "checkpoint_final.pth"


# --------------------------------------------------------------------------------------------
# inputs: cases and models
# --------------------------------------------------------------------------------------------


def validation_cases(splits_file: Path, fold: int, max_cases: int | None = None) -> list[str]:
    """The fold's validation cases (sorted), ``max_cases`` of them spread evenly over the sorted list
    when given (the first few would be one or two patients' slices on LIDC)."""
    from latdiffunet.evaluation.sampler_analysis import spread_cases

    from latdiffunet.utilities.file_io import load_json

    splits = load_json(splits_file, "splits_final.json", fix="run latdiff_plan_and_preprocess for this dataset first")
    if not isinstance(splits, list) or not 0 <= fold < len(splits) or "val" not in splits[fold]:
        raise UserInputError(
            f"has no fold {fold} with validation cases", path=splits_file,
            fix=f"give a fold between 0 and {len(splits) - 1 if isinstance(splits, list) else '?'} with -f",
        )
    cases = sorted(splits[fold]["val"])
    if max_cases is not None:
        if max_cases < 1:
            raise UserInputError(f"--max-cases must be at least 1, got {max_cases}")
        cases = spread_cases(cases, max_cases)
    if not cases:
        raise UserInputError(f"fold {fold} has no validation cases", path=splits_file)
    return cases


def find_nnunet_model(
    dataset: str, configuration: str, fold: int, search: Sequence[Path], checkpoint: str = "checkpoint_final.pth"
) -> Path:
    """nnU-Net's trained model folder (``...__nnUNetPlans__<config>``, holding ``fold_K/``) under
    ``search``: a model folder itself, a benchmark's ``nnunet_<variant>`` folder or the benchmark
    folder holding those. Exactly one must have a finished fold (``checkpoint``)."""
    from latdiffunet.evaluation.nnunet_baseline import CONFIGURATION_NAMES

    suffix = f"__{CONFIGURATION_NAMES[configuration]}"
    patterns = ("", "*", f"nnUNet_results/{dataset}/*", f"*/nnUNet_results/{dataset}/*")
    models: set[Path] = set()
    for root in search:
        for pattern in patterns:
            for folder in ([root] if not pattern else root.glob(pattern)):
                if (folder / "plans.json").is_file() and (folder / f"fold_{fold}").is_dir() and folder.name.endswith(suffix):
                    models.add(folder.resolve())
    where = ", ".join(str(s) for s in search) or "(no benchmark folder found)"
    skip = "or pass --skip-nnunet to measure latdiffunet alone"
    if not models:
        raise UserInputError(
            f"no trained nnU-Net model (*{suffix}/fold_{fold}) of {dataset} found under {where}",
            fix=f"run latdiff_benchmark -d {dataset} -c {configuration} -f {fold} first, give its folder with --nnunet-dir, {skip}",
        )
    if len(models) > 1:
        listing = "\n".join(f"  - {m}" for m in sorted(models))
        raise UserInputError(
            f"several nnU-Net models of fold {fold} found:\n{listing}",
            fix="choose one with --nnunet-dir (one of the folders above)",
        )
    model = models.pop()
    if not (model / f"fold_{fold}" / checkpoint).is_file():
        raise UserInputError(
            f"nnU-Net's fold {fold} has no {checkpoint} (still training, or stopped early)", path=model / f"fold_{fold}",
            fix=f"wait until latdiff_benchmark has finished this fold, {skip}",
        )
    return model


def _input_cases(spec, cases: list[str]) -> dict[str, list[Path]]:
    from latdiffunet.raw_dataset import find_cases

    found, problems = find_cases(spec.folder / "imagesTr", spec.file_ending, spec.files_per_case)
    missing = [c for c in cases if c not in found]
    if missing:
        detail = f" ({problems[0]})" if problems else ""
        raise UserInputError(
            f"{len(missing)} validation case(s) have no images in imagesTr, e.g. {missing[0]}{detail}", path=spec.folder / "imagesTr",
            fix="restore the raw dataset the model was trained on (LATDIFF_RAW)",
        )
    return {c: found[c] for c in cases}


# --------------------------------------------------------------------------------------------
# the two methods
# --------------------------------------------------------------------------------------------


def nnunet_installed() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def run_nnunet(model: Path, fold: int, checkpoint: str, jobs: list[dict], work: Path, device: str) -> dict[str, float]:
    """Predict every job with nnU-Net in one child process (its own memory, nnU-Net loaded once);
    returns the seconds per job tag. The log is ``work/nnunet_predict.log``."""
    from latdiffunet import paths
    from latdiffunet.evaluation.benchmark import _run
    from latdiffunet.utilities.file_io import load_json, write_json

    work.mkdir(parents=True, exist_ok=True)
    write_json(jobs, work / "nnunet_jobs.json")
    timings = work / "nnunet_timings.json"
    cmd = [sys.executable, "-m", "latdiffunet.evaluation.nnunet_predict", "--model", str(model), "--fold", str(fold),
           "--checkpoint", checkpoint, "--jobs", str(work / "nnunet_jobs.json"), "--timings", str(timings), "--device", device]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    # nnunetv2 warns at import when these are unset; prediction reads none of them
    env.setdefault("nnUNet_raw", str(paths.raw_root()))
    env.setdefault("nnUNet_preprocessed", str(work / "nnUNet_preprocessed_unused"))
    env.setdefault("nnUNet_results", str(model.parent.parent))
    _run(cmd, env, work / "nnunet_predict.log")
    return load_json(timings, "nnU-Net prediction timings")["jobs"]


def _row(corruption: str, level: float, method: str, dice: float, per_class: dict[str, float], num_cases: int,
         seconds: float | None, **extra: Any) -> dict:
    return {
        "corruption": corruption, "level": level, "setting": describe_level(corruption, level), "method": method,
        "dice": dice, "dice_per_class": per_class, "num_cases": num_cases,
        "seconds": None if seconds is None else round(seconds, 2),
        "seconds_per_case": None if seconds is None else round(seconds / max(num_cases, 1), 3), **extra,
    }


def _our_rows(summary: dict, names: tuple[str, str], corruption: str, level: float, seconds: float) -> list[dict]:
    n = summary["num_cases"]
    mean_rows = _row(corruption, level, names[0], summary["foreground_mean"]["Dice"],
                     {c: m["Dice"] for c, m in summary["mean"].items()}, n, seconds,
                     uncertainty_error_AUROC=summary.get("calibration_mean", {}).get("uncertainty_error_AUROC"))
    samples = summary["samples"]
    sample_row = _row(corruption, level, names[1], samples["foreground_mean"]["Dice_single_sample"],
                      {c: m["Dice_single_sample"] for c, m in samples["mean"].items()}, n, seconds)
    return [mean_rows, sample_row]


def _nnunet_row(summary: dict, corruption: str, level: float, seconds: float | None) -> dict:
    return _row(corruption, level, METHOD_NNUNET, summary["foreground_mean"]["Dice"],
                {c: m["Dice"] for c, m in summary["mean"].items()}, summary["num_cases"], seconds)


# --------------------------------------------------------------------------------------------
# verdict and report
# --------------------------------------------------------------------------------------------


def retention(levels: Sequence[float], dice: Sequence[float]) -> float:
    """Area under Dice(level) / Dice(0) over [0, max level], divided by the level range.

    1 = no loss at any level. NaN when level 0 is missing, its Dice is not positive, or there is
    a single level.
    """
    lv, dc = np.asarray(levels, dtype=np.float64), np.asarray(dice, dtype=np.float64)
    order = np.argsort(lv)
    lv, dc = lv[order], dc[order]
    if lv.size < 2 or lv[0] != 0 or not dc[0] > 0 or lv[-1] <= 0 or np.isnan(dc).any():
        return float("nan")
    return float(np.trapezoid(dc / dc[0], lv) / lv[-1])


def verdicts(rows: list[dict], methods: Sequence[str]) -> dict[str, dict]:
    """Per corruption: each method's retention and level-0 Dice, and one sentence with the numbers."""
    out = {}
    for corruption in dict.fromkeys(r["corruption"] for r in rows):
        ret, clean = {}, {}
        for m in methods:
            mine = sorted((r["level"], r["dice"]) for r in rows if r["corruption"] == corruption and r["method"] == m)
            if not mine:
                continue
            ret[m] = retention([l for l, _ in mine], [np.nan if d is None else d for _, d in mine])
            clean[m] = mine[0][1] if mine[0][0] == 0 else None
        levels = sorted({r["level"] for r in rows if r["corruption"] == corruption})
        numbers = ", ".join(f"{m} {ret[m]:.3f}" for m in ret)
        text = f"{corruption}: Dice retained over levels 0-{levels[-1]:g} (area under Dice/Dice(0), 1 = no loss): {numbers}"
        ours, baseline = methods[0], METHOD_NNUNET
        if ours in ret and baseline in ret and not (math.isnan(ret[ours]) or math.isnan(ret[baseline])):
            diff = ret[ours] - ret[baseline]
            how = ("about as gracefully as" if abs(diff) < RETENTION_TIE
                   else "more gracefully than" if diff > 0 else "less gracefully than")
            text += f". The diffusion model (mean) degrades {how} nnU-Net ({diff:+.3f} retention"
            single = methods[1] if len(methods) > 2 else None
            if single in ret and not math.isnan(ret[single]):
                text += f"; one sample {ret[single] - ret[baseline]:+.3f}"
            text += ")"
        elif baseline not in ret:
            text += " (nnU-Net not run)"
        out[corruption] = {"retention": ret, "dice_at_level_0": clean, "levels": levels, "text": text}
    return out


def _fmt(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_report(report: dict, out: Path) -> None:
    """``robustness.json``, ``robustness.md`` and ``robustness.png`` in ``out``."""
    from latdiffunet.utilities.file_io import atomic_path, write_json

    write_json(report, out / "robustness.json")
    methods, rows = report["methods"], report["rows"]
    lines = [
        f"# Robustness to image corruption: {report['dataset']} {report['configuration']} fold {report['fold']}",
        "",
        f"{report['num_cases']} validation case(s) of splits_final.json fold {report['fold']}"
        + (f" ({report['num_cases']} spread evenly over the sorted list)" if report.get("max_cases") else "")
        + f"; corruption seed {report['seed']}; mean foreground Dice in the original geometry (latdiff_evaluate).",
        "",
    ]
    for corruption, verdict in report["verdicts"].items():
        lines += [f"## {corruption}", "", f"{report['corruption_definitions'][corruption]}", "",
                  "| level | setting | " + " | ".join(f"Dice {m}" for m in methods) + " | " + " | ".join(
                      f"s/case {m.split(' (')[0]}" for m in methods if m != methods[1]) + " |",
                  "|---" * (2 + len(methods) + len(methods) - 1) + "|"]
        for level in verdict["levels"]:
            here = {r["method"]: r for r in rows if r["corruption"] == corruption and r["level"] == level}
            cells = [_fmt(here[m]["dice"]) if m in here else "n/a" for m in methods]
            secs = [_fmt(here[m]["seconds_per_case"], 3) if m in here else "n/a" for m in methods if m != methods[1]]
            lines.append(f"| {level:g} | {describe_level(corruption, level)} | " + " | ".join(cells) + " | " + " | ".join(secs) + " |")
        lines += ["", f"**Verdict** — {verdict['text']}.", ""]
    lines += ["Notes:"] + [f"- {n}" for n in report["notes"]]
    with atomic_path(out / "robustness.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _plot(report, out)


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latdiffunet.utilities.file_io import atomic_path

    corruptions = list(report["verdicts"])
    fig, axes = plt.subplots(1, len(corruptions), figsize=(4.2 * len(corruptions), 3.8), squeeze=False)
    for ax, corruption in zip(axes[0], corruptions):
        for method, style in zip(report["methods"], ("o-", "s--", "^-")):
            pts = sorted((r["level"], r["dice"]) for r in report["rows"] if r["corruption"] == corruption and r["method"] == method)
            if pts:
                ret = report["verdicts"][corruption]["retention"].get(method, float("nan"))
                ax.plot([p[0] for p in pts], [np.nan if p[1] is None else p[1] for p in pts], style,
                        label=f"{method} (retention {_fmt(ret, 3)})")
        ax.set_title(corruption)
        ax.set_xlabel("corruption level")
        ax.set_ylabel("mean foreground Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{report['dataset']} {report['configuration']} fold {report['fold']}, {report['num_cases']} validation case(s)")
    fig.tight_layout()
    with atomic_path(out / "robustness.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _tag(corruption: str, level: float) -> str:
    return CLEAN if level == 0 else f"{corruption}_{level:g}"


def run_robustness(cfg: RobustnessConfig) -> dict:
    """Corrupt, predict with both methods, evaluate; write the report into the output folder and return it."""
    import torch
    from tqdm import tqdm

    from latdiffunet import paths
    from latdiffunet.evaluation.corruptions import write_corrupted_cases
    from latdiffunet.evaluation.evaluate_folder import evaluate_folder
    from latdiffunet.inference.cli import find_run_folder
    from latdiffunet.inference.predict_folder import predict_folder
    from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
    from latdiffunet.raw_dataset import load_dataset, resolve_dataset_name

    unknown = [c for c in cfg.corruptions if c not in CORRUPTIONS]
    if unknown or not cfg.corruptions:
        raise UserInputError(f"unknown corruption(s) {unknown}", fix=f"choose from {', '.join(CORRUPTIONS)}")
    levels = sorted({0.0} | {check_level(level) for level in cfg.levels})
    if len(levels) < 2:
        raise UserInputError("give at least one level above 0", fix="e.g. --levels 0 0.1 0.2 0.4")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plans = cfg.plans or ("latdiffPlans" if device == "cuda" else "latdiffPlans_tiny")
    name = resolve_dataset_name(cfg.dataset, paths.raw_root(), paths.preprocessed_root(), paths.results_root())
    spec = load_dataset(paths.raw_root() / name)
    cases = validation_cases(paths.preprocessed_root() / name / "splits_final.json", cfg.fold, cfg.max_cases)
    inputs = _input_cases(spec, cases)
    nnunet_model = None
    if not cfg.skip_nnunet:  # before anything is predicted: a missing model fails at once
        if not nnunet_installed():
            raise UserInputError("nnunetv2 is not installed, so the nnU-Net baseline cannot run",
                                 fix='pip install -e ".[benchmark]" (see README "Benchmark"), or pass --skip-nnunet')
        benchmarks = (paths.results_root() / name).glob(f"benchmark_{cfg.configuration}_fold{cfg.fold}*")
        search = [cfg.nnunet_dir] if cfg.nnunet_dir else sorted(benchmarks)
        nnunet_model = find_nnunet_model(name, cfg.configuration, cfg.fold, search, cfg.nnunet_checkpoint)
    run_folder = find_run_folder(paths.results_root() / name, cfg.trainer, plans, cfg.configuration)
    out = Path(cfg.output) if cfg.output else paths.results_root() / name / f"robustness_{cfg.configuration}_fold{cfg.fold}"
    out.mkdir(parents=True, exist_ok=True)

    predictor = LatentDiffusionPredictor(run_folder, [str(cfg.fold)], torch.device(device), cfg.checkpoint)
    inference = predictor.configuration["inference"]
    settings = PredictionSettings(num_samples=cfg.num_samples or inference["num_samples"], steps=cfg.steps or inference["sampling_steps"],
                                  seed=cfg.seed, save_samples=True)
    names = method_names(settings.num_samples)
    labels_folder = spec.folder / "labelsTr"

    def evaluate(folder: Path) -> dict:
        return evaluate_folder(labels_folder, folder, spec.foreground_labels, ignore_label=spec.ignore_label,
                               num_processes=max(1, cfg.num_processes), case_ids=cases, file_ending=spec.file_ending, progress=False)

    conditions = [(CLEAN, 0.0)] + [(c, level) for c in cfg.corruptions for level in levels if level > 0]
    ours: dict[str, tuple[dict, float]] = {}
    jobs = []
    for corruption, level in tqdm(conditions, desc="corrupt + latdiffunet", dynamic_ncols=True):
        tag = _tag(corruption, level)
        if level == 0:
            folder, case_files = spec.folder / "imagesTr", inputs
        else:
            folder = write_corrupted_cases(inputs, out / "images" / tag, corruption, level, cfg.seed)
            case_files = {c: [folder / f.name for f in files] for c, files in inputs.items()}
        start = time.time()
        predict_folder(folder, out / "latdiffunet" / tag, predictor, settings, overwrite=True,
                       num_processes=cfg.num_processes, case_ids=cases)
        seconds = time.time() - start
        ours[tag] = (evaluate(out / "latdiffunet" / tag), seconds)
        jobs.append({"tag": tag, "inputs": [[str(f) for f in case_files[c]] for c in cases],
                     "outputs": [str(out / "nnunet" / tag / c) for c in cases]})
    checkpoints = [str(c) for c in predictor.checkpoints]
    del predictor  # nnU-Net's child process gets the GPU memory
    if device == "cuda":
        torch.cuda.empty_cache()
    theirs: dict[str, tuple[dict, float | None]] = {}
    if nnunet_model is not None:
        print(f"nnU-Net ({nnunet_model}) predicts {len(jobs)} condition(s) x {len(cases)} case(s) in a child process; "
              f"log: {out / 'nnunet_predict.log'}")
        nnunet_seconds = run_nnunet(nnunet_model, cfg.fold, cfg.nnunet_checkpoint, jobs, out, device)
        for job in tqdm(jobs, desc="evaluate nnU-Net", dynamic_ncols=True):
            theirs[job["tag"]] = (evaluate(out / "nnunet" / job["tag"]), nnunet_seconds.get(job["tag"]))

    rows = []
    for corruption in cfg.corruptions:
        for level in levels:
            tag = _tag(corruption, level)
            rows += _our_rows(ours[tag][0], names, corruption, level, ours[tag][1])
            if tag in theirs:
                rows.append(_nnunet_row(theirs[tag][0], corruption, level, theirs[tag][1]))
    methods = [*names] + ([METHOD_NNUNET] if nnunet_model is not None else [])
    report = {
        "dataset": name, "output": str(out), "configuration": cfg.configuration, "fold": cfg.fold, "seed": cfg.seed, "cases": cases,
        "num_cases": len(cases), "max_cases": cfg.max_cases, "levels": levels, "corruptions": list(cfg.corruptions),
        "corruption_definitions": {c: _definition(c) for c in cfg.corruptions},
        "methods": methods,
        "latdiffunet": {"run_folder": str(run_folder), "checkpoints": checkpoints,
                        "num_samples": settings.num_samples, "steps": settings.steps, "sampling_seed": settings.seed, "device": device},
        "nnunet": None if nnunet_model is None else {"model_folder": str(nnunet_model), "checkpoint": cfg.nnunet_checkpoint,
                                                      "predictor": "nnUNetPredictor defaults (step 0.5, Gaussian, mirroring)"},
        "rows": rows,
        "verdicts": verdicts(rows, methods),
        "notes": [
            "level 0 is the clean image for every corruption: predicted once, its rows repeated per corruption",
            f"'{names[1]}' is the mean over the {settings.num_samples} samples of each sample's Dice (same prediction run as the mean)",
            "seconds = wall time of predicting the cases (latdiffunet: including its uncertainty maps and samples; "
            "nnU-Net: in its child process, model loading excluded)",
            "retention = area under Dice/Dice(level 0) over [0, max level] / max level (trapezoid rule); larger = degrades more gracefully",
            "the clean (first) prediction's seconds include start-up costs (worker processes, first calls)",
            f"corrupted images: {out / 'images'}; predictions and each summary.json: {out / 'latdiffunet'}"
            + (f", {out / 'nnunet'}" if nnunet_model is not None else ""),
        ],
    }
    write_report(report, out)
    return report


def _definition(corruption: str) -> str:
    from latdiffunet.evaluation.corruptions import BLUR_SIGMA_AT_LEVEL_1, GAMMA_AT_LEVEL_1

    return {
        "gaussian": "x + level * R * N(0, 1) per voxel, R = the channel's 99.5th - 0.5th percentile (seeded per case and level)",
        "blur": f"Gaussian filter, sigma = {BLUR_SIGMA_AT_LEVEL_1:g} * level voxels along the finest axis, "
                "the same millimetres along the others",
        "contrast": "m + (1 - level) * (x - m), m = the channel's mean (per-image z-score normalisation largely undoes it)",
        "gamma": f"lo + (hi - lo) * ((x - lo) / (hi - lo)) ** ({GAMMA_AT_LEVEL_1:g} ** level), lo/hi = the channel's min/max",
    }[corruption]


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_robustness", description=__doc__.splitlines()[0])
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    p.add_argument("-c", "--configuration", default="2d", choices=["2d", "3d"])
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("-p", "--plans", default=None, help="our plans (default: latdiffPlans_tiny on CPU, latdiffPlans on CUDA)")
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer")
    p.add_argument("--checkpoint", default=None, help="our checkpoint: best or final (default: best when it exists)")
    p.add_argument("--corrupt", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS, help="corruptions (default: all)")
    p.add_argument("--levels", nargs="+", type=float, default=list(DEFAULT_LEVELS),
                   help="levels in [0, 1] (0 is always added); see latdiffunet/evaluation/corruptions.py for their meaning")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise corruption and of our sampling")
    p.add_argument("--max-cases", type=int, default=None, help="N validation cases spread evenly over the sorted list")
    p.add_argument("--nnunet-dir", type=Path, default=None,
                   help="latdiff_benchmark's folder, its nnunet_<variant> folder or nnU-Net's model folder "
                        "(default: search $LATDIFF_RESULTS/<dataset>/benchmark_<config>_fold<k>*/)")
    p.add_argument("--nnunet-checkpoint", default="checkpoint_final.pth",
                   help="nnU-Net checkpoint file (default: the final one, which the benchmark validates)")
    p.add_argument("--skip-nnunet", action="store_true", help="measure latdiffunet only")
    p.add_argument("--num-samples", type=int, default=None, help="our diffusion samples (default from the plans)")
    p.add_argument("--steps", type=int, default=None, help="our sampling steps (default from the plans)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("-np", "--num-processes", type=int, default=2, help="reading/writing/evaluation processes (0 = none)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="report folder (default $LATDIFF_RESULTS/<dataset>/robustness_<config>_fold<k>)")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    cfg = RobustnessConfig(
        dataset=args.dataset, configuration=args.configuration, fold=args.fold, plans=args.plans, trainer=args.trainer,
        checkpoint=args.checkpoint, corruptions=tuple(dict.fromkeys(args.corrupt)), levels=tuple(args.levels), seed=args.seed,
        max_cases=args.max_cases, nnunet_dir=args.nnunet_dir, skip_nnunet=args.skip_nnunet, output=args.output,
        device=args.device, num_samples=args.num_samples, steps=args.steps, num_processes=args.num_processes,
        nnunet_checkpoint=args.nnunet_checkpoint,
    )
    report = run_robustness(cfg)
    for verdict in report["verdicts"].values():
        print(verdict["text"])
    print(f"report: {Path(report['output']) / 'robustness.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
