"""One command that checks the default (GPU) plans on one GPU: speed, memory against the planner, inference.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/gpu_check.py                 # Hippocampus, 2d and 3d, < 8 min
    python benchmarks/gpu_check.py -d 4 -c 3d --iterations 100
    python benchmarks/gpu_check.py --device cpu                            # no GPU: a short smoke run of the script

For each configuration of ``latdiffPlans`` it trains the plans' networks with the real trainer
(data loading with augmentation in workers, mixed precision, the sample loss of the diffusion stage
switched on) and prints, per stage, seconds per iteration, iterations per second, the epoch time
that gives (the plans' iterations per epoch) and the peak of ``torch.cuda.max_memory_allocated``
next to the planner's estimate for the plans' batch (``patch_and_batch_why``: the bytes at the
smallest batch plus the bytes per extra sample), which chose patch and batch size without a GPU.
Then it predicts fold 0's first validation cases from the raw images as ``latdiff_predict`` does
(the plans' samples and steps, untrained weights: the time does not depend on them) and prints the
seconds per case. Everything is also written to ``gpu_check.json``.

It works in its own folders (``--workdir``, by default a new temporary one) so that it never
rewrites anyone's plans: the raw dataset comes from ``$LATDIFF_RAW`` when it is there, else (for
Hippocampus) it is converted from ``--source`` with ``dataset_conversion/convert_hippocampus.py``;
plans are made with ``latdiff_plan_and_preprocess --target gpu`` (``cpu`` with ``--device cpu``).
Without a CUDA GPU it stops with a message, unless ``--device cpu`` asks for the smoke run (a few
iterations and cases; its numbers say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inference_time.py beside this file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("-d", "--dataset", default="4", help="dataset ID or name (default 4, Hippocampus)")
    p.add_argument("-c", "--configurations", nargs="+", default=None, help="default: every configuration of the plans")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run of this script only")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations per stage (default 50; 3 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per stage first (default 5; 1 on cpu)")
    p.add_argument("--cases", type=int, default=None, help="timed inference cases (default 10; 2 on cpu)")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "Hippocampus"),
                   help="Hippocampus source for the converter when $LATDIFF_RAW lacks the dataset")
    p.add_argument("--workdir", default=None, help="folder for preprocessed data and results (default: temporary, removed)")
    p.add_argument("-np", "--num_processes", type=int, default=min(8, os.cpu_count() or 1), help="preprocessing processes")
    return p


def raw_dataset_present(dataset: str, raw_root: str | None) -> bool:
    from latdiffunet.errors import UserInputError
    from latdiffunet.raw_dataset import resolve_dataset_name

    if not raw_root:
        return False
    try:
        return (Path(raw_root) / resolve_dataset_name(dataset, Path(raw_root))).is_dir()
    except UserInputError:
        return False


def prepare(args: argparse.Namespace, work: Path) -> tuple[str, dict]:
    """Raw data, plans and preprocessed data in ``work``; returns the dataset name and the plans."""
    from latdiffunet.experiment_planning.cli import main as plan_main
    from latdiffunet.raw_dataset import resolve_dataset_name

    if not raw_dataset_present(args.dataset, os.environ.get("LATDIFF_RAW")):
        if args.dataset not in ("4", "Dataset004_Hippocampus"):
            sys.exit(f"error: dataset {args.dataset} is not in $LATDIFF_RAW; convert it first (dataset_conversion/)")
        os.environ["LATDIFF_RAW"] = str(work / "raw")
        subprocess.run([sys.executable, str(REPO / "dataset_conversion" / "convert_hippocampus.py"), "--source", args.source,
                        "--raw-root", str(work / "raw"), "--num-processes", str(args.num_processes)], check=True)
    os.environ.update(LATDIFF_PREPROCESSED=str(work / "pre"), LATDIFF_RESULTS=str(work / "res"))
    argv = ["-d", args.dataset, "--target", "gpu" if args.device == "cuda" else "cpu", "-np", str(args.num_processes)]
    if plan_main(argv + (["-c", *args.configurations] if args.configurations else [])) != 0:
        sys.exit("error: latdiff_plan_and_preprocess failed (see above)")
    name = resolve_dataset_name(args.dataset, work / "pre")
    return name, json.loads((work / "pre" / name / "latdiffPlans.json").read_text())


def planner_estimate_bytes(cfg: dict) -> int:
    """The planner's training-memory estimate for the plans' batch (it stores the smallest batch's)."""
    why = cfg["patch_and_batch_why"]
    extra = cfg["batch_size"] - why["batch_limits"][0]
    return int(why["estimated_bytes_at_min_batch"] + extra * why["estimated_bytes_per_extra_sample"])


def time_stage(trainer, stage: str, warmup: int, iterations: int) -> dict:
    """Seconds per training iteration of ``stage`` and its peak allocated memory (CUDA)."""
    import torch

    cuda = trainer.device.type == "cuda"
    if stage == "diffusion":
        trainer.calibrate_latent_scale()
        trainer.epoch = trainer.config.total_epochs - 1  # late in the stage: the sample loss is on
    trainer._setup_stage(stage)  # the optimiser of that stage, as the trainer's epoch loop makes it
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(next(trainer.batch_stream()), stage)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iterations):
        trainer.train_step(next(trainer.batch_stream()), stage)
    if cuda:
        torch.cuda.synchronize()
    per_iteration = (time.perf_counter() - start) / iterations
    return {
        "seconds_per_iteration": round(per_iteration, 4),
        "iterations_per_second": round(1 / per_iteration, 2),
        "epoch_seconds": round(per_iteration * trainer.config.iterations_per_epoch, 1),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def check_configuration(name: str, plans: dict, cname: str, work: Path, device, args) -> dict:
    import torch
    from inference_time import seconds_per_case

    from latdiffunet import paths
    from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
    from latdiffunet.training.config import TrainerConfig
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    cfg = plans["configurations"][cname]
    pre = paths.preprocessed_root() / name
    splits = json.loads((pre / "splits_final.json").read_text())
    workers = 4 if device.type == "cuda" else 1
    config = TrainerConfig.from_plans(cfg, num_workers=workers)
    run = work / "res" / name / f"gpu_check__latdiffPlans__{cname}"
    trainer = LatentDiffusionTrainer(plans, cname, 0, pre, run / "fold_0", device, config, splits)
    try:
        stages = {stage: time_stage(trainer, stage, args.warmup, args.iterations) for stage in ("autoencoder", "diffusion")}
    finally:
        trainer.shutdown()
    (run / "fold_0").mkdir(parents=True, exist_ok=True)
    trainer.save("checkpoint_final.pth")
    trainer._write_run_files()  # plans.json + dataset.json: what the predictor reads
    predictor = LatentDiffusionPredictor(run, ["0"], device, "checkpoint_final.pth")
    inference = cfg["inference"]
    settings = PredictionSettings(num_samples=inference["num_samples"], steps=inference["sampling_steps"])
    cases = splits[0]["val"][: args.cases + 1]
    per_case = seconds_per_case(predictor, paths.raw_root() / name / "imagesTr", cases, settings, device)
    return {
        "configuration": cname, "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
        "iterations_per_epoch": config.iterations_per_epoch, "timed_iterations_per_stage": args.iterations,
        "stages": stages, "planner_estimate_bytes": planner_estimate_bytes(cfg),
        "inference": {"seconds_per_case": round(per_case, 3), "cases": len(cases) - 1, **inference,
                      "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None},
    }


def report(rows: list[dict]) -> str:
    def mib(b: int | None) -> str:
        return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"

    lines = []
    for r in rows:
        lines.append(f"{r['configuration']}: patch {r['patch_size']}, batch {r['batch_size']}, "
                     f"{r['iterations_per_epoch']} iterations per epoch; planner's memory estimate {mib(r['planner_estimate_bytes'])}")
        for stage, s in r["stages"].items():
            ratio = "" if s["peak_memory_bytes"] is None else f" ({s['peak_memory_bytes'] / r['planner_estimate_bytes']:.2f}x the estimate)"
            lines.append(f"  {stage:12s} {s['seconds_per_iteration']:.3f} s/iteration = {s['iterations_per_second']:.1f} it/s, "
                         f"epoch {s['epoch_seconds']:.0f} s, peak memory {mib(s['peak_memory_bytes'])}{ratio}")
        i = r["inference"]
        lines.append(f"  inference    {i['seconds_per_case']:.2f} s per case ({i['num_samples']} samples x {i['sampling_steps']} steps, "
                     f"{i['cases']} cases), peak memory {mib(i['peak_memory_bytes'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible (torch.cuda.is_available() is False), and this check measures one.\n"
              "fix: run it on a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu for a short "
              "smoke run of the script (its numbers say nothing about a GPU)", file=sys.stderr)
        return 2
    smoke = args.device == "cpu"
    args.iterations = args.iterations or (3 if smoke else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    args.cases = args.cases or (2 if smoke else 10)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="latdiff_gpu_check_"))
    start = time.time()
    try:
        name, plans = prepare(args, work)
        device = torch.device(args.device)
        rows = [check_configuration(name, plans, c, work, device, args) for c in (args.configurations or plans["configurations"])]
        machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        result = {"dataset": name, "device": machine, "target": plans["target"], "seconds": round(time.time() - start, 1),
                  "configurations": rows}
        out = Path.cwd() / "gpu_check.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n{name} on {machine} (plans for the {plans['target']}), {result['seconds']:.0f} s in all\n{report(rows)}\n-> {out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
