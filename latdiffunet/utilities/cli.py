"""What every console script shares: user errors print one clear message, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable


def friendly_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run ``main``; a :class:`UserInputError` becomes its message on stderr and exit code 2.

    Programming errors still raise with a traceback (set ``LATDIFF_DEBUG=1`` to see user errors
    with traceback too), because hiding those would make bug reports useless.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        from latdiffunet.errors import UserInputError

        try:
            code = main(*args, **kwargs)
            return 0 if code is None else int(code)
        except UserInputError as exc:
            if os.environ.get("LATDIFF_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to continue", file=sys.stderr)
            return 130

    return wrapper


def set_cpu_friendly_threading() -> None:
    """Spinning OpenMP threads slow 2-core machines 4-8x when anything else runs (ENVIRONMENT.md).

    Must happen before torch is imported; explicit user settings win.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
