"""``latdiff_plan_and_preprocess``: integrity check, fingerprint, plans, preprocessing, splits."""

from __future__ import annotations

import argparse
import sys
import time

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latdiff_plan_and_preprocess",
        description="Fingerprint a raw dataset, plan the experiment and preprocess the data.",
    )
    p.add_argument("-d", "--dataset", nargs="+", required=True, help="dataset ID(s) or name(s), e.g. 4 or Dataset004_Hippocampus")
    p.add_argument("-c", "--configurations", nargs="+", default=None, help="configurations to plan and preprocess (default: all applicable, 2d and 3d for volumes; on the CPU target 2d only)")
    p.add_argument(
        "--target", default="auto", choices=["auto", "cpu", "gpu"],
        help="device the default plans (latdiffPlans) are sized for: gpu (preset default), cpu (preset cpu: CPU-sized "
             "epochs and prediction), or auto (default: gpu when torch sees a CUDA GPU, else cpu)",
    )
    p.add_argument("--preset", default=None, help="planner preset instead of the target's: default (GPU), cpu, tiny, or a preset JSON file")
    p.add_argument("--gpu_memory_gb", type=float, default=None, help="memory budget for patch/batch size (default from the preset: 8 GB; implies --target gpu under auto)")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--verify_dataset_integrity", action="store_true", help="check every file first and report all problems")
    p.add_argument("--no_preprocess", action="store_true", help="stop after writing fingerprint and plans")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint even if one exists")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    from latdiffunet import paths
    from latdiffunet.errors import UserInputError
    from latdiffunet.experiment_planning.fingerprint import FINGERPRINT_VERSION, extract_fingerprint
    from latdiffunet.experiment_planning.integrity import verify_dataset_integrity
    from latdiffunet.experiment_planning.planner import choose_preset, plan_experiment
    from latdiffunet.preprocessing.preprocessor import ReadCaseStore, preprocess_dataset
    from latdiffunet.preprocessing.splits import ensure_splits, validate_splits
    from latdiffunet.raw_dataset import list_training_cases, load_dataset, resolve_dataset_name
    from latdiffunet.utilities.file_io import load_json, write_json

    choose_preset(args.preset, args.target, args.gpu_memory_gb)  # an unknown or contradictory preset fails before any work
    for identifier in args.dataset:
        start = time.time()
        name = resolve_dataset_name(identifier, paths.raw_root())
        spec = load_dataset(paths.raw_root() / name)
        out = paths.preprocessed_root() / name
        read_cases = ReadCaseStore()  # each case is read and checked once; the later stages of this run reuse it
        if args.verify_dataset_integrity:
            cases = verify_dataset_integrity(spec, args.num_processes, keep=read_cases)
            print(f"{name}: integrity check passed ({len(cases)} cases)")
        fingerprint_file = out / "dataset_fingerprint.json"
        if fingerprint_file.is_file() and not args.clean:
            fingerprint = load_json(fingerprint_file, "dataset fingerprint", fix="rerun with --clean to recompute it")
            if not isinstance(fingerprint, dict) or fingerprint.get("fingerprint_version") != FINGERPRINT_VERSION:
                raise UserInputError(
                    f"not a dataset fingerprint of version {FINGERPRINT_VERSION} (edited, or written by another version)",
                    path=fingerprint_file, fix="rerun with --clean to recompute it",
                )
            print(f"{name}: reusing {fingerprint_file} (--clean recomputes it)")
            # written before fingerprints recorded it: dataset.json is the source anyway
            fingerprint.setdefault("num_raters", int(spec.num_raters))
        else:
            fingerprint = extract_fingerprint(spec, args.num_processes, keep=read_cases)
            write_json(fingerprint, fingerprint_file)
        preset, target_why = choose_preset(args.preset, args.target, args.gpu_memory_gb, dataset=name)
        plans = plan_experiment(fingerprint, preset, args.configurations, target_why)
        print(f"{name}: plans for the {plans['target']} ({target_why})")
        plans_file = out / f"{plans['plans_name']}.json"
        write_json(plans, plans_file)
        write_json(spec.to_dict() | spec.extra, out / "dataset.json")
        for cname, cfg in plans["configurations"].items():
            print(
                f"{name} {cname}: spacing {cfg['spacing']}, patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
                f"latent {cfg['latent']['size']}x{cfg['latent']['channels']}ch (factor {cfg['latent']['downsampling_factor']}), "
                f"{cfg['diffusion']['parameterization']}-prediction, {cfg['inference']['sampling_steps']} steps, "
                f"{cfg['inference']['num_samples']} samples"
            )
        print(f"plans written to {plans_file}")
        if args.no_preprocess:
            continue
        cases, problems = list_training_cases(spec)
        if problems:  # the fingerprint already refused these; listed again for completeness
            from latdiffunet.errors import DatasetIntegrityError

            raise DatasetIntegrityError(problems, spec.folder)
        existing = next((f for f in (out / "splits_final.json", spec.folder / "splits_final.json") if f.is_file()), None)
        if existing is not None:  # checked before the long preprocessing, reused or adopted after it
            validate_splits(load_json(existing, "splits_final.json"), [c.case_id for c in cases], existing)
        preprocess_dataset(spec, cases, plans, list(plans["configurations"]), out, args.num_processes, read_cases)
        splits, how = ensure_splits(out, spec.folder, [c.case_id for c in cases])
        print(f"splits_final.json: {how}; fold sizes (train/val): {[(len(s['train']), len(s['val'])) for s in splits]}")
        print(f"{name}: done in {time.time() - start:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
