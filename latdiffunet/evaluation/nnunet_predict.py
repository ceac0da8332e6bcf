"""Predict with a trained nnU-Net v2 fold (the benchmark's baseline), in its own process.

Run as ``python -m latdiffunet.evaluation.nnunet_predict --model FOLDER --fold K --jobs JOBS.json
--timings OUT.json`` by the robustness runner; never imported by the core package (nnunetv2 is an
optional extra). The model is loaded once and predicts every job of ``JOBS.json``::

    [{"tag": "gaussian_0.1", "inputs": [[CASE_0000.nii.gz, ...], ...], "outputs": [OUT/CASE, ...]}, ...]

(``outputs`` are nnU-Net's truncated names: the file ending is added). Prediction is nnU-Net's own
``nnUNetPredictor`` with its defaults (Gaussian-weighted sliding window, step 0.5, mirroring as
the trainer allowed), the inference its ``perform_actual_validation`` does in the benchmark.

``latdiff_benchmark`` trains ``nnUNetTrainerTimeBudget`` (see ``nnunet_baseline.py``), a class
made at run time that nnU-Net's lookup by name cannot find; it is handed to nnU-Net here (it
builds nnUNetTrainer's network). The Primus stand-in of ``nnunet_baseline`` is registered first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

from latdiffunet.evaluation.nnunet_baseline import PRIMUS_MODULE, make_budget_trainer


def trainer_lookup(original, base):
    """nnU-Net's ``recursive_find_trainer_class_by_name`` that also knows the benchmark's budget trainer."""
    budget_trainer = make_budget_trainer(base)

    def find(name: str):
        if name == budget_trainer.__name__:
            return budget_trainer
        return original(name)

    return find


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="nnU-Net's trained model folder (holds plans.json, fold_K/)")
    p.add_argument("--fold", required=True)
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--jobs", required=True, type=Path)
    p.add_argument("--timings", required=True, type=Path, help="where to write seconds per job as JSON")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.modules.setdefault(PRIMUS_MODULE, types.ModuleType(PRIMUS_MODULE))

    import torch
    import nnunetv2.inference.predict_from_raw_data as nnunet_inference
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    nnunet_inference.recursive_find_trainer_class_by_name = trainer_lookup(
        nnunet_inference.recursive_find_trainer_class_by_name, nnUNetTrainer
    )
    device = torch.device(args.device)
    predictor = nnunet_inference.nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
    fold = args.fold if args.fold == "all" else int(args.fold)
    t0 = time.time()
    predictor.initialize_from_trained_model_folder(str(args.model), use_folds=(fold,), checkpoint_name=args.checkpoint)
    timings = {"model_loading_seconds": round(time.time() - t0, 2), "jobs": {}}
    for job in json.loads(args.jobs.read_text()):
        Path(job["outputs"][0]).parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        predictor.predict_from_files_sequential(job["inputs"], job["outputs"], save_probabilities=False, overwrite=True)
        timings["jobs"][job["tag"]] = round(time.time() - start, 2)
        print(f"{job['tag']}: {len(job['inputs'])} case(s) in {timings['jobs'][job['tag']]} s", flush=True)
    from latdiffunet.utilities.file_io import write_json

    write_json(timings, args.timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
