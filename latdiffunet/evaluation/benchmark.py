"""``latdiff_benchmark``: latdiffunet vs nnU-Net v2 on the same data, split, device and budget.

Both methods get the same wall-clock budget for training (each rescales its epochs to fit; see
``nnunet_baseline.py`` and ``TrainerConfig.time_budget_minutes``), the same fold of the same
``splits_final.json``, and are scored by the same evaluator on the same validation cases in the
original geometry. nnU-Net's calibration is measured from its own saved softmax probabilities and
the entropy of those (its natural uncertainty) is scored like ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_benchmark", description=__doc__.splitlines()[0])
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="2d", choices=["2d", "3d"])
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, required=True, help="training wall clock per method")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("-p", "--plans", default=None, help="our plans (default: latdiffPlans_tiny on CPU, latdiffPlans on CUDA)")
    p.add_argument("-o", "--output", default=None, help="report folder (default $LATDIFF_RESULTS/<dataset>/benchmark_<config>_fold<k>)")
    p.add_argument("--skip-nnunet", action="store_true", help="only run latdiffunet (e.g. nnunetv2 not installed)")
    p.add_argument("--skip-latdiffunet", action="store_true")
    p.add_argument("--nnunet-iterations-per-epoch", type=int, default=None, help="default: nnU-Net's 250")
    p.add_argument("--nnunet-gpu-memory-gb", type=float, default=None,
                   help="nnU-Net planner memory target (default its 8 GB; small values give CPU-sized batches)")
    p.add_argument("--reuse", action="store_true", help="reuse a method's finished run in the output folder instead of retraining it")
    return p


def _run(cmd: list[str], env: dict, log: Path) -> float:
    """Run a stage in a child process (so its peak memory is its own); returns wall seconds."""
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        from latdiffunet.errors import UserInputError

        raise UserInputError(f"{' '.join(cmd[:4])} ... failed with exit code {code}", path=log, fix="read the log above")
    return time.time() - start


def _peak_child_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _stage_nnunet_outputs(validation: Path, staging: Path, cases: list[str], ending: str) -> None:
    """nnU-Net writes CASE.npz with 'probabilities'; give our evaluator the names it reads, plus
    the softmax entropy as nnU-Net's uncertainty map."""
    from latdiffunet.imageio.sitk_io import read_label, write_image
    from latdiffunet.inference.uncertainty import entropy
    from latdiffunet.utilities.file_io import load_npz, save_npz

    staging.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy(validation / f"{case}{ending}", staging / f"{case}{ending}")
        _, geometry = read_label(staging / f"{case}{ending}")
        probs = load_npz(validation / f"{case}.npz")["probabilities"].astype(np.float32)
        save_npz(staging / f"{case}_probabilities.npz", probabilities=probs)
        write_image(entropy(probs, axis=0).astype(np.float32), geometry, staging / f"{case}_entropy.nii.gz")


def _method_row(name: str, summary: dict, train_s: float, predict_s: float, n_cases: int, rss: float | None, extra: dict) -> dict:
    return {
        "method": name,
        "foreground_mean": summary["foreground_mean"],
        "mean_per_class": summary["mean"],
        "calibration_mean": summary.get("calibration_mean", {}),
        "training_seconds": round(train_s, 1),
        "inference_seconds_per_case": round(predict_s / max(n_cases, 1), 3),
        "peak_rss_mib": None if rss is None else round(rss, 1),
        **extra,
    }


def write_report(report: dict, out: Path) -> None:
    from latdiffunet.utilities.file_io import atomic_path, write_json

    write_json(report, out / "benchmark.json")
    rows = report["methods"]
    classes = sorted({c for r in rows for c in r["mean_per_class"]}, key=int)
    lines = [
        f"# Benchmark: {report['dataset']} {report['configuration']} fold {report['fold']}",
        "",
        f"Budget {report['budget_minutes']} min training per method on {report['machine']['device']} "
        f"({report['machine']['cpu_count']} CPU cores, torch {report['machine']['torch']}); "
        f"{report['num_validation_cases']} validation cases of splits_final.json fold {report['fold']}; seed {report['seed']}.",
        "",
        "| method | " + " | ".join(f"Dice {c}" for c in classes) + " | mean Dice | mean IoU | mean HD95 (mm) | ECE all | ECE roi | uncertainty-error AUROC | train (s) | inference (s/case) | peak RSS (MiB) |",
        "|---" * (len(classes) + 10) + "|",
    ]
    for r in rows:
        cal = r["calibration_mean"]
        fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"  # noqa: E731
        lines.append(
            f"| {r['method']} | " + " | ".join(fmt(r["mean_per_class"][c]["Dice"]) for c in classes)
            + f" | {fmt(r['foreground_mean']['Dice'])} | {fmt(r['foreground_mean']['IoU'])} | {fmt(r['foreground_mean']['HD95'])}"
            + f" | {fmt(cal.get('ECE_all'))} | {fmt(cal.get('ECE_roi'))} | {fmt(cal.get('uncertainty_error_AUROC'))}"
            + f" | {r['training_seconds']} | {r['inference_seconds_per_case']} | {r['peak_rss_mib']} |"
        )
    lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    with atomic_path(out / "benchmark.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _plot(rows, classes, out)


def _plot(rows: list[dict], classes: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latdiffunet.utilities.file_io import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = np.arange(len(classes) + 1) + i * width
        vals = [r["mean_per_class"][c]["Dice"] for c in classes] + [r["foreground_mean"]["Dice"]]
        axes[0].bar(xs, vals, width, label=r["method"].split(" (")[0])
    axes[0].set_xticks(np.arange(len(classes) + 1) + width * (len(rows) - 1) / 2, [f"class {c}" for c in classes] + ["mean"])
    axes[0].set_ylabel("Dice")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    names = [r["method"].split(" (")[0] for r in rows]
    axes[1].bar(names, [r["training_seconds"] / 60 for r in rows], color="tab:gray")
    axes[1].set_ylabel("training (min)")
    axes[2].bar(names, [r["inference_seconds_per_case"] for r in rows], color="tab:purple")
    axes[2].set_ylabel("inference (s per case)")
    fig.tight_layout()
    with atomic_path(out / "benchmark.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    import torch

    from latdiffunet import paths
    from latdiffunet.errors import UserInputError
    from latdiffunet.evaluation.evaluate_folder import evaluate_folder
    from latdiffunet.raw_dataset import load_dataset, resolve_dataset_name
    from latdiffunet.utilities.file_io import load_json, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plans_name = args.plans or ("latdiffPlans" if device == "cuda" else "latdiffPlans_tiny")
    name = resolve_dataset_name(args.dataset, paths.raw_root(), paths.preprocessed_root())
    spec = load_dataset(paths.raw_root() / name)
    if not args.skip_nnunet and importlib.util.find_spec("nnunetv2") is None:
        raise UserInputError(
            "nnunetv2 is not installed, so the nnU-Net baseline cannot run",
            fix='pip install -e ".[benchmark]" (it pulls torchvision; see README "Benchmark"), or pass --skip-nnunet',
        )
    pre = paths.preprocessed_root() / name
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = Path(args.output) if args.output else paths.results_root() / name / f"benchmark_{args.configuration}_fold{args.fold}"
    out.mkdir(parents=True, exist_ok=True)
    if not (pre / f"{plans_name}.json").is_file():
        # latdiffPlans sized for the device the benchmark trains on, whatever else this machine has
        sizing = ["--preset", "tiny"] if plans_name.endswith("_tiny") else ["--target", "gpu" if device == "cuda" else "cpu"]
        _run([sys.executable, "-m", "latdiffunet.experiment_planning.cli", "-d", name, *sizing], env, out / "plan.log")
    splits = load_json(pre / "splits_final.json", "splits_final.json")
    val_cases = splits[args.fold]["val"]
    labels = spec.foreground_labels
    rows, notes = [], []
    if not args.skip_latdiffunet:
        results = out / "latdiffunet_results"
        fold = results / name / f"LatentDiffusionTrainer__{plans_name}__{args.configuration}" / f"fold_{args.fold}"
        stats_file = out / "latdiffunet_stats.json"
        if not (args.reuse and stats_file.is_file()):
            cmd = [sys.executable, "-m", "latdiffunet.training.cli", name, str(args.fold), "-c", args.configuration, "-p", plans_name,
                   "--budget-minutes", str(args.budget_minutes), "--device", device]
            wall = _run(cmd, env | {"LATDIFF_RESULTS": str(results)}, out / "latdiffunet_train.log")
            write_json({"wall_seconds": round(wall, 1), "peak_rss_mib": round(_peak_child_rss_mib(), 1)}, stats_file)
        stats = load_json(stats_file)
        summary = load_json(fold / "validation" / "summary.json")
        rows.append(_method_row(
            "latdiffunet (LatentDiffusionTrainer, " + plans_name + ")", summary, stats["wall_seconds"] - summary["seconds"],
            summary["prediction_seconds"], len(val_cases), stats["peak_rss_mib"],
            {"epochs": len(load_json(fold / "metrics.json")), "prediction_settings": summary.get("prediction_settings"),
             "validation_folder": str(fold / "validation")},
        ))
    if not args.skip_nnunet:
        variant = f"{args.nnunet_iterations_per_epoch or 250}it" + (f"_{args.nnunet_gpu_memory_gb:g}GB" if args.nnunet_gpu_memory_gb else "")
        stats_file = out / f"nnunet_stats_{variant}.json"
        cmd = [sys.executable, "-m", "latdiffunet.evaluation.nnunet_baseline", "--dataset", name, "--configuration", args.configuration,
               "--fold", str(args.fold), "--raw", str(paths.raw_root()), "--workdir", str(out / f"nnunet_{variant}"), "--splits",
               str(pre / "splits_final.json"), "--budget-minutes", str(args.budget_minutes), "--device", device, "--stats", str(stats_file)]
        if args.nnunet_iterations_per_epoch:
            cmd += ["--iterations-per-epoch", str(args.nnunet_iterations_per_epoch)]
        if args.nnunet_gpu_memory_gb:
            cmd += ["--gpu-memory-gb", str(args.nnunet_gpu_memory_gb)]
        if not (args.reuse and stats_file.is_file()):
            _run(cmd, env, out / "nnunet.log")
        stats = load_json(stats_file)
        staging = out / f"nnunet_validation_for_evaluation_{variant}"
        _stage_nnunet_outputs(Path(stats["validation_folder"]), staging, val_cases, spec.file_ending)
        summary = evaluate_folder(spec.folder / "labelsTr", staging, labels, case_ids=val_cases, progress=False)
        rows.append(_method_row(
            stats["method"], summary, stats["training_seconds"], stats["validation_prediction_seconds"], len(val_cases),
            stats["peak_rss_mib"], {"epochs": stats["epochs"], "iterations_per_epoch": stats["iterations_per_epoch"],
                                    "iterations_done": stats.get("iterations_done"),
                                    "batch_size": stats["batch_size"], "patch_size": stats["patch_size"]},
        ))
        notes.append("nnU-Net's uncertainty is the entropy of its softmax; its inference time includes its export with probabilities")
    notes += [
        "both methods: same splits_final.json, same validation cases, same evaluator (original geometry)",
        "equal wall-clock training budgets; each method rescales its epoch count to fit (latdiffunet keeps 10 % for its final validation)",
        "latdiffunet training time excludes its final validation prediction; inference time = validation prediction time / cases",
    ]
    report = {
        "dataset": name, "configuration": args.configuration, "fold": args.fold, "budget_minutes": args.budget_minutes,
        "num_validation_cases": len(val_cases), "seed": 12345,
        "machine": {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "methods": rows, "notes": notes,
    }
    write_report(report, out)
    print((out / "benchmark.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
