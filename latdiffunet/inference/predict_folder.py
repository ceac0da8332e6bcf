"""Predict a whole folder: sharding, skipping finished cases, I/O in worker processes.

A case is finished when its segmentation file exists: it is written last, atomically, after the
uncertainty maps, samples and pictures, so a killed run is simply restarted and redoes only unfinished cases. Shards
(``num_parts``/``part_id``) take disjoint cases, so several processes or machines can write into
one output folder without clobbering each other.

One unreadable or unsuitable input costs its own case only: every other case is predicted and
written, and the failures are reported together at the end (:class:`CasesFailed`), so a user
with 500 cases and one bad file gets 499 segmentations and one clear message.
"""

from __future__ import annotations

import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from latdiffunet.errors import UserInputError
from latdiffunet.imageio.sitk_io import ImageGeometry, read_images_as_channels, read_label, write_image, write_segmentation
from latdiffunet.inference.export import labels_to_original, map_to_original, probabilities_to_original
from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
from latdiffunet.inference.uncertainty import uncertainty_maps
from latdiffunet.raw_dataset import DatasetSpec, find_cases
from latdiffunet.utilities.file_io import save_npz, write_json
from latdiffunet.utilities.parallel import worker_context

UNCERTAINTY_MAPS = ("uncertainty", "entropy", "mutual_information", "agreement")


class CasesFailed(UserInputError):
    """Some cases could not be predicted (bad input); every other case was written."""

    def __init__(self, failures: dict[str, str], predicted: list[str], output_folder: Path):
        self.failures, self.predicted = dict(failures), list(predicted)
        lines = "\n".join(f"  - {case}: " + message.replace("\n", "\n    ") for case, message in failures.items())
        super().__init__(
            f"{len(failures)} case(s) could not be predicted; the other {len(predicted)} were written to "
            f"{output_folder}:\n{lines}",
            fix="correct or remove the files named above and run the same command again (finished cases are skipped)",
        )


def check_output_folder(folder: Path) -> None:
    """Refuse, before anything is written, an output folder that is a file or lies inside one."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        inside = "" if blocking == folder else f" and cannot hold the output folder {folder}"
        raise UserInputError(
            f"is a file, not a folder{inside}", path=blocking,
            fix="give -o a new or existing folder, or move the file out of the way",
        )


def list_input_cases(folder: Path, spec: DatasetSpec) -> dict[str, list[Path]]:
    """Input cases named like the training data (one file per channel, or one RGB file)."""
    if not folder.is_dir():
        raise UserInputError("input folder not found", path=folder, fix="give the folder holding the CASE_0000 images with -i")
    ending, files_per_case = spec.file_ending, spec.files_per_case
    cases, problems = find_cases(folder, ending, files_per_case)
    if problems:
        raise UserInputError(
            "input folder does not match the trained model's dataset.json:\n" + "\n".join(f"  - {p}" for p in problems[:20]),
            path=folder,
            fix=f"name inputs CASE_0000{ending}" + (f" ... CASE_{files_per_case - 1:04d}{ending}" if files_per_case > 1 else ""),
        )
    if not cases:
        raise UserInputError(
            f"no input images (*_0000{ending}) found", path=folder,
            fix=f"put the images into this folder, named CASE_0000{ending} (the trained model's file ending)",
        )
    return cases


def _read_and_preprocess(args: tuple) -> tuple:
    """-> preprocessed data, properties, 2D thumbnail ``(C, Y, X)`` or None, original ``(C, Z, Y, X)`` if ``keep_image``."""
    paths, num_channels, plans, configuration_name, keep_image = args
    from latdiffunet.preprocessing.preprocessor import preprocess_case

    data, geometry = read_images_as_channels(paths)
    if data.shape[0] != num_channels:
        raise UserInputError(
            f"case has {data.shape[0]} channel(s) but the model was trained on {num_channels}",
            path=paths[0], fix="give the same channels (modalities) the training data had, named CASE_XXXX",
        )
    if not np.all(np.isfinite(data)):
        raise UserInputError(
            "image contains NaN or inf values", path=paths[0],
            fix="replace them (e.g. with the background value) and export the image again",
        )
    pre, _, props = preprocess_case(data, None, geometry, plans, configuration_name)
    thumbnail = data[:, data.shape[1] // 2] if geometry.dimension == 2 else None
    return pre, props, thumbnail, (data if keep_image else None)


@dataclass(frozen=True)
class _ExportJob:
    """Everything :func:`_export` needs for one case (pickled to a worker process)."""

    maps: dict  # uncertainty_maps() output in preprocessed space; "sample_labels" only when samples are used
    props: dict
    label_values: tuple[int, ...]
    out_base: Path  # output folder / case id
    ending: str
    save_samples: bool
    save_probabilities: bool
    thumbnail: np.ndarray | None  # (C, Y, X) of a 2D case: CASE_overlay.png
    montage_image: np.ndarray | None = None  # (C, Z, Y, X) original image: CASE_montage.png
    rater_files: tuple[Path, ...] = ()  # annotations drawn in the montage


def _read_raters(files: tuple[Path, ...], geometry: ImageGeometry) -> list[np.ndarray]:
    raters = []
    for f in files:
        arr, geo = read_label(f)
        problems = geometry.matches(geo)
        if problems:
            raise UserInputError(
                f"rater annotation does not match the image's geometry ({'; '.join(problems)})", path=f,
                fix="give the rater label files of this case, in the geometry of its image",
            )
        raters.append(arr)
    return raters


def _export(job: _ExportJob) -> str:
    maps, props, out_base = job.maps, job.props, job.out_base
    label_values = np.asarray(job.label_values)
    geometry = ImageGeometry.from_dict(props["geometry"])
    probs = probabilities_to_original(maps["probabilities"], props)
    seg = label_values[probs.argmax(0)]
    originals = {}
    for name in UNCERTAINTY_MAPS:
        fill = 1.0 if name == "agreement" else 0.0
        originals[name] = map_to_original(maps[name], props, fill)
        write_image(originals[name], geometry, f"{out_base}_{name}.nii.gz")
    if job.save_probabilities:
        save_npz(f"{out_base}_probabilities.npz", probabilities=probs.astype(np.float16))
    montage = job.montage_image is not None
    montage_samples = []
    if job.save_samples or montage:
        from latdiffunet.inference.montage import MAX_SAMPLES

        sample_dtype = np.min_scalar_type(int(label_values.max()))
        for i, sample in enumerate(maps["sample_labels"]):
            if not job.save_samples and i >= MAX_SAMPLES:
                break
            sample_seg = label_values[labels_to_original(sample, props, list(range(len(label_values))))]
            if job.save_samples:
                write_segmentation(sample_seg, geometry, Path(f"{out_base}_samples") / f"sample_{i:02d}{job.ending}")
            if montage and i < MAX_SAMPLES:  # the montage draws the samples as saved
                montage_samples.append(sample_seg.astype(sample_dtype))
    if job.thumbnail is not None:
        from latdiffunet.inference.overlay import write_overlay

        write_overlay(job.thumbnail, seg[0], originals["uncertainty"][0], Path(f"{out_base}_overlay.png"))
    if montage:
        from latdiffunet.inference.montage import write_montage

        raters = _read_raters(job.rater_files, geometry) if job.rater_files else None
        write_montage(job.montage_image, seg, originals["uncertainty"], montage_samples, Path(f"{out_base}_montage.png"),
                      raters=raters, labels=[int(v) for v in label_values if v != 0], spacing=geometry.spacing_zyx)
    write_segmentation(seg, geometry, f"{out_base}{job.ending}")  # last: marks the case as finished
    return str(out_base)


def predict_folder(
    input_folder: Path,
    output_folder: Path,
    predictor: LatentDiffusionPredictor,
    settings: PredictionSettings,
    num_parts: int = 1,
    part_id: int = 0,
    overwrite: bool = False,
    num_processes: int = 2,
    case_ids: list[str] | None = None,
    rater_label_files: dict[str, list[Path]] | None = None,
) -> list[str]:
    """Predict every (unfinished) case of this shard (or only ``case_ids``); returns those predicted.

    A case whose input is bad (:class:`UserInputError` while reading or writing it) is skipped;
    the others are all predicted and written, then :class:`CasesFailed` lists the skipped ones.
    ``rater_label_files`` maps a case id to its raters' label files (original geometry); with
    ``settings.save_montage`` they are drawn in ``CASE_montage.png``, otherwise unused.
    """
    if not 0 <= part_id < num_parts:
        raise UserInputError(f"--part_id must be in 0..{num_parts - 1}, got {part_id}", fix="number the shards 0 .. --num_parts - 1")
    check_output_folder(output_folder)
    cases = list_input_cases(input_folder, predictor.dataset_spec)
    if case_ids is not None:
        missing = sorted(set(case_ids) - set(cases))
        if missing:
            raise UserInputError(f"case(s) {missing[:5]} not found among the inputs", path=input_folder)
        cases = {c: cases[c] for c in case_ids}
    ending = predictor.dataset_spec.file_ending
    shard = sorted(cases)[part_id::num_parts]
    todo = [c for c in shard if overwrite or not (output_folder / f"{c}{ending}").is_file()]
    try:
        output_folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(
            f"cannot create the output folder ({exc.strerror})", path=output_folder, fix="give -o a folder you can write to"
        ) from None
    write_json(
        {"run_folder": str(predictor.run_folder), "checkpoints": predictor.checkpoints, "configuration": predictor.configuration_name,
         "num_samples_per_fold": settings.num_samples, "sampling_steps": settings.steps, "seed": settings.seed,
         "uncertainty_maps": list(UNCERTAINTY_MAPS)},
        output_folder / "prediction_info.json",
    )
    if len(todo) < len(shard):
        print(f"{len(shard) - len(todo)} case(s) already predicted in {output_folder} (--overwrite redoes them)")
    num_channels = predictor.dataset_spec.num_channels
    jobs = {c: (cases[c], num_channels, predictor.plans, predictor.configuration_name, settings.save_montage) for c in todo}
    raters = rater_label_files or {}
    pool = ProcessPoolExecutor(num_processes, mp_context=worker_context()) if num_processes > 0 else None
    prefetch: dict[str, Future] = {}
    exports: dict[str, Future] = {}
    predicted: set[str] = set()
    failures: dict[str, str] = {}

    def fail(case: str, exc: UserInputError) -> None:
        failures[case] = str(exc)
        tqdm.write(f"warning: {case} skipped, reported at the end: {str(exc).splitlines()[0]}", file=sys.stderr)

    def collect_finished_exports() -> None:
        """A finished export marks its case predicted, or failed on a user error; anything else raises now."""
        for case in [c for c, f in exports.items() if f.done()]:
            try:
                exports.pop(case).result()
                predicted.add(case)
            except UserInputError as exc:
                fail(case, exc)

    try:
        for i, case in enumerate(tqdm(todo, desc="predicting", dynamic_ncols=True)):
            for c in todo[i : i + 3]:  # read ahead two cases
                if c not in prefetch:
                    prefetch[c] = _submit(pool, _read_and_preprocess, jobs[c])
            try:
                data, props, thumbnail, image = prefetch.pop(case).result()
            except UserInputError as exc:
                fail(case, exc)
                continue
            maps = uncertainty_maps(*predictor.sample_and_image_probabilities(data, settings, case_id=case))
            if not (settings.save_samples or settings.save_montage):
                maps.pop("sample_labels")
            exports[case] = _submit(pool, _export, _ExportJob(
                maps, props, tuple(predictor.label_values), output_folder / case, ending, settings.save_samples,
                settings.save_probabilities, thumbnail, montage_image=image,
                rater_files=tuple(Path(f) for f in raters.get(case, ())) if settings.save_montage else (),
            ))
            collect_finished_exports()
            while len(exports) > 2:  # bound memory held by pending exports
                wait(exports.values(), return_when=FIRST_COMPLETED)
                collect_finished_exports()
        wait(exports.values())
        collect_finished_exports()
    finally:
        # cases already sampled are written even when a later case raised or Ctrl-C came:
        # only reads not yet started are cancelled, never a pending export
        for f in prefetch.values():
            f.cancel()
        wait(exports.values())
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise CasesFailed({c: failures[c] for c in todo if c in failures}, [c for c in todo if c in predicted], output_folder)
    return todo


def _submit(pool: ProcessPoolExecutor | None, fn: Callable[[Any], Any], arg: Any) -> Future:
    """``pool.submit``, or run now when there is no pool (errors kept in the future alike)."""
    if pool is not None:
        return pool.submit(fn, arg)
    future: Future = Future()
    try:
        future.set_result(fn(arg))
    except Exception as exc:  # noqa: BLE001 -- re-raised by future.result(), as from a worker
        future.set_exception(exc)
    return future
