"""Per-case inference time of a trained model for several sample counts (prints numbers).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/inference_time.py -d 4 -p latdiffPlans_tiny -c 2d -f 0 \
        --input $LATDIFF_RAW/Dataset004_Hippocampus/imagesTr --cases 10 --samples 1 5 10

Times the whole per-case path users pay for (read, preprocess, sliding-window sampling, export
in the original geometry, write), one process, after one warm-up case.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-p", "--plans", default="latdiffPlans")
    p.add_argument("-c", "--configuration", default=None)
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer")
    p.add_argument("-f", "--folds", nargs="+", default=["0"])
    p.add_argument("--input", required=True, help="folder of CASE_0000.ext images")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--samples", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args()

    import torch

    from latdiffunet import paths
    from latdiffunet.inference.cli import find_run_folder
    from latdiffunet.inference.predict_folder import list_input_cases
    from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
    from latdiffunet.raw_dataset import resolve_dataset_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = resolve_dataset_name(args.dataset, paths.results_root())
    run = find_run_folder(paths.results_root() / name, args.trainer, args.plans, args.configuration)
    predictor = LatentDiffusionPredictor(run, args.folds, device)
    steps = args.steps or predictor.configuration["inference"]["sampling_steps"]
    cases = sorted(list_input_cases(Path(args.input), predictor.dataset_spec))[: args.cases + 1]
    print(f"device {device}, torch threads {torch.get_num_threads()}, folds {args.folds}, steps {steps}, "
          f"patch {predictor.configuration['patch_size']}, {len(cases) - 1} timed cases")
    for n in args.samples:
        per_case = seconds_per_case(predictor, Path(args.input), cases, PredictionSettings(num_samples=n, steps=steps), device)
        extra = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""
        print(f"samples {n:3d} x {len(args.folds)} fold(s): {per_case:.3f} s per case{extra}")


def seconds_per_case(predictor, input_folder: Path, cases: list[str], settings, device) -> float:
    """Mean wall-clock seconds per case of ``cases[1:]``, predicted and written as ``latdiff_predict``
    does in one process, after ``cases[0]`` as a warm-up (first CUDA kernels, caches); on CUDA the
    peak-memory counter is reset after the warm-up."""
    import torch

    from latdiffunet.inference.predict_folder import predict_folder

    with tempfile.TemporaryDirectory() as out:
        predict_folder(input_folder, Path(out), predictor, settings, num_processes=0, case_ids=cases[:1])
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        predict_folder(input_folder, Path(out), predictor, settings, num_processes=0, case_ids=cases[1:])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / max(len(cases) - 1, 1)


if __name__ == "__main__":
    main()
