"""Atomic file writing and JSON helpers.

Every file the pipeline writes goes to a temporary name in the same folder and is renamed into
place, so a killed process never leaves a half-written plan, array or checkpoint behind: the
target either holds the old complete content or the new complete content.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from latdiffunet.errors import UserInputError


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    ``suffix`` lets writers that insist on a file ending (SimpleITK, numpy) see one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; outputs are meant to be shared
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(obj: Any, target: str | Path, indent: int = 2) -> None:
    """Write human-readable, diff-friendly JSON atomically (numpy scalars/arrays converted)."""
    text = json.dumps(_to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=True)
    with atomic_path(target) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def load_json(path: str | Path, what: str = "JSON file", fix: str | None = None) -> Any:
    """Load JSON, turning a missing or malformed file into a :class:`UserInputError`.

    ``fix`` says how to get the file when it is missing (e.g. which command writes it).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} not found", path=path, fix=fix or "check the path, or create the file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(
            f"{what} is not valid JSON ({exc})", path=path,
            fix="fix the syntax error at the position shown" + (f", or {fix}" if fix else ""),
        ) from None


def save_npz(target: str | Path, **arrays: np.ndarray) -> None:
    """Compressed ``.npz`` written atomically (never pickled objects)."""
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz``; pickled object arrays are refused, a damaged file names itself."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserInputError("file not found", path=path, fix="rerun the command that writes it") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserInputError(
            f"cannot read the arrays ({type(exc).__name__}: {str(exc)[:120]}); damaged, truncated or holding pickled objects",
            path=path,
            fix="delete it and rerun the command that writes it (latdiff_plan_and_preprocess for preprocessed cases)",
        ) from None
