"""Robustness to image corruption, latdiffunet vs nnU-Net (LDSeg's claim; issue 13).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/robustness.py -d 4 -c 2d -f 0 -p latdiffPlans_tiny \
        --corrupt gaussian blur contrast gamma --levels 0 0.05 0.1 0.2 0.4 \
        [--max-cases N] [--nnunet-dir BENCHMARK_FOLDER | --skip-nnunet] [-o OUT]

The logic lives in :mod:`latdiffunet.evaluation.robustness` (also ``python -m
latdiffunet.evaluation.robustness``); the corruptions in :mod:`latdiffunet.evaluation.corruptions`.
nnU-Net's model is the one ``latdiff_benchmark`` trained on the same fold (found under
``$LATDIFF_RESULTS/<dataset>/benchmark_<config>_fold<k>*/`` unless ``--nnunet-dir`` is given).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    from latdiffunet.evaluation.robustness import main as robustness_main

    return robustness_main(argv)


if __name__ == "__main__":
    sys.exit(main())
