"""Evaluation: segmentation overlap, surface distance, calibration and multi-rater metrics.

Everything in :mod:`latdiffunet.evaluation.metrics` works on plain numpy arrays so it can be
checked against hand-computed values and reused outside the pipeline (no files, no torch).
"""
