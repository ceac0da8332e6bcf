"""``latdiff_demo``: the whole pipeline on real MSD Hippocampus MRI, in one command.

convert -> verify + fingerprint + plan + preprocess -> train fold 0 within a CPU-sized budget ->
predict its validation cases from the raw images -> evaluate -> print Dice and where the
segmentations and uncertainty maps are. With ``--source DIR`` a local copy is used (the shared
copy or MSD's ``Task04_Hippocampus`` folder); without it, MSD's tar is downloaded from the public
mirror that MONAI uses.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tarfile
from pathlib import Path

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading

MSD_HIPPOCAMPUS_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar"


def download_hippocampus(target_folder: Path) -> Path:
    """Fetch and unpack MSD Task04 (27 MB) unless already there; returns the Task04 folder."""
    import urllib.request

    from tqdm import tqdm

    from latdiffunet.utilities.file_io import atomic_path

    target_folder.mkdir(parents=True, exist_ok=True)
    task = target_folder / "Task04_Hippocampus"
    if (task / "dataset.json").is_file():
        return task
    tar_path = target_folder / "Task04_Hippocampus.tar"
    if not tar_path.is_file():
        print(f"downloading {MSD_HIPPOCAMPUS_URL}")
        with urllib.request.urlopen(MSD_HIPPOCAMPUS_URL) as response, atomic_path(tar_path) as tmp:
            total = int(response.headers.get("Content-Length", 0)) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():  # refuse members that would land outside the folder
            if not (target_folder / member.name).resolve().is_relative_to(target_folder.resolve()) or member.issym() or member.islnk():
                raise RuntimeError(f"{tar_path}: unsafe member {member.name!r}")
        tar.extractall(target_folder)
    return task


def _converter():
    path = Path(__file__).resolve().parents[1] / "dataset_conversion" / "convert_hippocampus.py"
    spec = importlib.util.spec_from_file_location("convert_hippocampus", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latdiff_demo", description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=None, help="local Hippocampus copy (default: download MSD Task04)")
    p.add_argument("--budget-minutes", type=float, default=15.0, help="training wall clock (default 15)")
    p.add_argument("-c", "--configuration", default="2d", choices=["2d", "3d"])
    p.add_argument("--preset", default="tiny", help="planner preset (tiny: CPU-sized)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])
    args = p.parse_args(argv)
    set_cpu_friendly_threading()
    from latdiffunet import paths
    from latdiffunet.errors import UserInputError
    from latdiffunet.experiment_planning.cli import main as plan_main
    from latdiffunet.training.cli import main as train_main
    from latdiffunet.utilities.file_io import load_json

    source = args.source or download_hippocampus(paths.raw_root().parent / "downloads")
    if not source.is_dir():
        raise UserInputError("Hippocampus source folder not found", path=source, fix="give --source the folder holding images/ and labels/ (or imagesTr/ and labelsTr/)")
    print("== 1/4 convert", flush=True)
    dataset = _converter().convert(source, paths.raw_root())
    print("== 2/4 verify, fingerprint, plan, preprocess", flush=True)
    code = plan_main(["-d", "4", "--verify_dataset_integrity", "--preset", args.preset, "-c", args.configuration])
    if code:
        return code
    plans_name = "latdiffPlans" if args.preset == "default" else f"latdiffPlans_{args.preset}"
    print(f"== 3/4 train fold 0 ({args.budget_minutes:g} min budget), then predict + evaluate its validation cases", flush=True)
    argv_train = ["4", "0", "-c", args.configuration, "-p", plans_name, "--budget-minutes", str(args.budget_minutes)]
    code = train_main(argv_train + (["--device", args.device] if args.device else []))
    if code:
        return code
    fold = paths.results_root() / dataset.name / f"LatentDiffusionTrainer__{plans_name}__{args.configuration}" / "fold_0"
    summary = load_json(fold / "validation" / "summary.json")
    print("== 4/4 results (fold 0 validation cases, original geometry)")
    for label, metrics in summary["mean"].items():
        print(f"  class {label}: Dice {metrics['Dice']:.4f}  IoU {metrics['IoU']:.4f}  HD95 {metrics['HD95']:.2f} mm")
    print(f"  mean foreground Dice {summary['foreground_mean']['Dice']:.4f} over {summary['num_cases']} cases")
    if summary.get("calibration_mean"):
        print("  " + ", ".join(f"{k} {v:.4f}" for k, v in summary["calibration_mean"].items()))
    print(f"segmentations + uncertainty maps (entropy, mutual information, agreement): {fold / 'validation'}")
    print(f"training log and progress.png: {fold}")
    print(f"to predict new images: latdiff_predict -i IN -o OUT -d 4 -p {plans_name} -c {args.configuration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
