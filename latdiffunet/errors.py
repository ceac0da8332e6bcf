"""Errors a user can fix themselves.

CLIs catch :class:`UserInputError` and print its message without a traceback, so the message must
say *which file* is wrong and *what to do about it*.
"""

from __future__ import annotations

from pathlib import Path


class UserInputError(Exception):
    """Bad input that the user can correct (missing file, malformed JSON, wrong shape, ...)."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(message)
        if fix:
            parts.append(f"\n  fix: {fix}")
        super().__init__("".join(parts))


class DatasetIntegrityError(UserInputError):
    """Several problems found at once; each one names its file."""

    def __init__(self, problems: list[str], dataset_folder: str | Path):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"dataset integrity check found {len(self.problems)} problem(s):\n{lines}",
            path=dataset_folder,
            fix="correct the files listed above and run the command again; nothing was written",
        )
