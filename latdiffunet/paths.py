"""The three folders every stage shares, nnU-Net style.

``LATDIFF_RAW`` holds datasets in nnU-Net v2's raw format, ``LATDIFF_PREPROCESSED`` the
fingerprints, plans and preprocessed arrays, ``LATDIFF_RESULTS`` trained models. When a variable
is unset we fall back to ``~/latdiffunet_data/{raw,preprocessed,results}`` and say so once, so
that a first run works without setup but nobody is surprised where the files went.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VARS = {
    "raw": "LATDIFF_RAW",
    "preprocessed": "LATDIFF_PREPROCESSED",
    "results": "LATDIFF_RESULTS",
}
DEFAULT_ROOT = Path.home() / "latdiffunet_data"
_announced: set[str] = set()


def _folder(kind: str) -> Path:
    var = ENV_VARS[kind]
    value = os.environ.get(var)
    if value:
        return Path(value).expanduser()
    default = DEFAULT_ROOT / kind
    if var not in _announced:
        _announced.add(var)
        print(f"[latdiffunet] {var} is not set; using {default}", file=sys.stderr)
    return default


def raw_root() -> Path:
    return _folder("raw")


def preprocessed_root() -> Path:
    return _folder("preprocessed")


def results_root() -> Path:
    return _folder("results")
