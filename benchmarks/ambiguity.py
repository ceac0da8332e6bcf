"""Ambiguity benchmark on a multi-rater dataset (LIDC, QUBIQ): does the sample spread match the raters'?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ambiguity.py -d 20 -p latdiffPlans_tiny -f 0 --samples 16 \
        [--max-cases N] [--nnunet-predictions FOLDER]

On the validation cases of one fold (``splits_final.json``, never training cases), with the same
evaluator (``latdiff_evaluate``) for every row:

* ``latdiffunet, N samples``: the trained fold, N diffusion samples per image;
* ``latdiffunet, 1 sample``: the same model, one sample (the deterministic baseline);
* ``--noise-scales 1 0.5 ...``: the N-sample row at other sampling temperatures than the calibrated one;
* ``empty mask``: predicts nothing (on LIDC many raters see no nodule, so this is a real bar);
* ``nnU-Net (majority vote)``: with ``--nnunet-predictions``, a folder of nnU-Net segmentations of
  the same cases (trained on the majority-vote labels); one mask, used as every sample.

Reported: GED² (d = 1 − IoU), HM-IoU, sample and rater diversity E d(·,·) (all pairs, as GED counts
them), their ratio, the ratio of the distinct-pair diversities (identical pairs left out: the
all-pairs terms shrink by (n - 1) / n, 25 % for 4 raters, 6 % for 16 samples, so this is the ratio
that compares the two spreads), Dice of the
mean against the consensus label, Dice of one sample, and prediction time per image. Writes
``ambiguity.json`` and ``ambiguity.md`` into the output folder and prints the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROW_KEYS = ("GED", "HM_IoU", "sample_diversity", "rater_diversity", "diversity_ratio_of_means", "diversity_ratio_distinct_pairs")


def _evaluate(ref: Path, pred: Path, spec, case_ids: list[str]) -> dict:
    from latdiffunet.evaluation.evaluate_folder import evaluate_folder

    labels = [v for k, v in spec.labels.items() if k not in ("background", "ignore")]
    return evaluate_folder(
        ref, pred, labels, ignore_label=spec.labels.get("ignore"), num_processes=2,
        raters_folder=spec.folder / spec.rater_labels_folder, num_raters=spec.num_raters, case_ids=case_ids,
        file_ending=spec.file_ending, progress=False,
    )


def _row(name: str, summary: dict, seconds_per_image: float | None) -> dict:
    amb = summary.get("ambiguity", {})
    samples = summary.get("samples", {}).get("foreground_mean", {})
    return {
        "method": name,
        **{k: amb.get(k) for k in ROW_KEYS},
        "Dice_of_mean": summary["foreground_mean"]["Dice"],
        "Dice_single_sample": samples.get("Dice_single_sample"),
        "seconds_per_image": seconds_per_image,
    }


def _constant_predictions(source: Path | None, out: Path, spec, case_ids: list[str]) -> None:
    """One mask per case used as its only sample: nnU-Net's segmentation, or an empty mask."""
    import numpy as np

    from latdiffunet.imageio.sitk_io import read_label, write_segmentation

    out.mkdir(parents=True, exist_ok=True)
    for case in case_ids:
        ref, geometry = read_label(spec.folder / "labelsTr" / f"{case}{spec.file_ending}")
        if source is None:
            seg = np.zeros_like(ref)
        else:
            seg, _ = read_label(source / f"{case}{spec.file_ending}")
        write_segmentation(seg, geometry, out / f"{case}_samples" / f"sample_00{spec.file_ending}")
        write_segmentation(seg, geometry, out / f"{case}{spec.file_ending}")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):  # None or NaN (one sample has no distinct pair)
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-p", "--plans", default="latdiffPlans_tiny")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer")
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--noise-scales", type=float, nargs="+", default=[None],
                   help="sampling temperatures to report (default: the calibrated one stored in the checkpoint)")
    p.add_argument("--max-cases", type=int, default=None, help="first N validation cases (sorted), for a quick look")
    p.add_argument("--nnunet-predictions", default=None, help="folder of nnU-Net segmentations of the validation cases")
    p.add_argument("-o", "--output", default=None, help="default: <run folder>/ambiguity_fold<k>")
    p.add_argument("--disable-tta", action="store_true", help="no test-time mirroring (latdiff_predict --disable_tta)")
    args = p.parse_args()

    import torch

    from latdiffunet import paths
    from latdiffunet.inference.cli import find_run_folder
    from latdiffunet.inference.predict_folder import predict_folder
    from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
    from latdiffunet.raw_dataset import parse_dataset_json, resolve_dataset_name
    from latdiffunet.utilities.file_io import load_json, write_json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = resolve_dataset_name(args.dataset, paths.results_root())
    run = find_run_folder(paths.results_root() / name, args.trainer, args.plans, args.configuration)
    spec = parse_dataset_json(paths.raw_root() / name / "dataset.json")
    if spec.num_raters < 2 or not spec.rater_labels_folder:
        raise SystemExit(f"{name} has no rater annotations (dataset.json num_raters / rater_labels_folder)")
    splits = load_json(paths.preprocessed_root() / name / "splits_final.json", "splits_final.json")
    cases = sorted(splits[int(args.fold)]["val"])[: args.max_cases]
    out = Path(args.output) if args.output else run / f"ambiguity_fold{args.fold}"
    shutil.rmtree(out, ignore_errors=True)
    predictor = LatentDiffusionPredictor(run, [str(args.fold)], device)
    steps = args.steps or predictor.configuration["inference"]["sampling_steps"]
    images = paths.raw_root() / name / "imagesTr"
    print(f"{name}: fold {args.fold}, {len(cases)} validation cases, {steps} steps, device {device}")

    rows = []
    runs = [(args.samples, scale) for scale in args.noise_scales] + [(1, None)]
    for n, scale in runs:
        tag = "calibrated" if scale is None else f"scale {scale:g}"
        folder = out / f"latdiffunet_{n}_samples_{tag.replace(' ', '')}"
        settings = PredictionSettings(num_samples=n, steps=steps, seed=0, save_samples=True, noise_scale=scale,
                                      mirror=False if args.disable_tta else None)
        start = time.time()
        predict_folder(images, folder, predictor, settings, overwrite=True, num_processes=2, case_ids=cases)
        seconds = (time.time() - start) / len(cases)
        label = f"latdiffunet, {n} sample{'s' if n > 1 else ''}" + (f", noise {tag}" if n > 1 else "")
        rows.append(_row(label, _evaluate(spec.folder / "labelsTr", folder, spec, cases), seconds))
    baselines = [("empty mask", None)]
    if args.nnunet_predictions:
        baselines.append(("nnU-Net (majority vote), 1 mask", Path(args.nnunet_predictions)))
    for label, source in baselines:
        folder = out / label.split(" ")[0].replace(",", "").lower()
        _constant_predictions(source, folder, spec, cases)
        rows.append(_row(label, _evaluate(spec.folder / "labelsTr", folder, spec, cases), None))

    header = ["method", "GED²", "HM-IoU", "sample div.", "rater div.", "ratio", "ratio (distinct pairs)", "Dice of mean",
              "Dice 1 sample", "s / image"]
    keys = ["method", *ROW_KEYS, "Dice_of_mean", "Dice_single_sample", "seconds_per_image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    write_json({"dataset": name, "fold": args.fold, "cases": len(cases), "steps": steps, "run": str(run),
                "test_time_mirroring": not args.disable_tta, "rows": rows},
               out / "ambiguity.json")
    (out / "ambiguity.md").write_text(f"{name}, fold {args.fold}, {len(cases)} validation cases\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
