"""Layering: imports run one way, from the stages down to the building blocks.

``training`` may use ``inference`` (validation predicts like ``latdiff_predict``), never the
reverse: otherwise a change to the trainer can break prediction, and loading a model for
prediction would import the whole trainer. Below both, ``networks``, ``diffusion`` and
``utilities`` know no stage at all, so each can be tested and reused alone. The imports are read
with ``ast`` (including those inside functions), not by importing, so a cycle cannot hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "latdiffunet"
STAGES = ("experiment_planning", "preprocessing", "training", "inference", "evaluation")
# package -> the latdiffunet subpackages its modules must not import
FORBIDDEN = {
    "inference": ("training",),
    "networks": STAGES,
    "diffusion": STAGES,
    "utilities": STAGES,
}


def latdiffunet_imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``latdiffunet.*`` import in ``path`` (under package ``root``),
    relative ones resolved."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from ..x import y -> resolve against this module's package
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "latdiffunet":  # from latdiffunet import training
                found += [(node.lineno, f"latdiffunet.{alias.name}") for alias in node.names]
    return [(line, m) for line, m in found if m == "latdiffunet" or m.startswith("latdiffunet.")]


def violations(package: str, forbidden: tuple[str, ...], root: Path = PACKAGE) -> list[str]:
    """``file:line imports module`` for each import of a ``forbidden`` subpackage in ``root/package``."""
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in latdiffunet_imports(path, root):
            target = module.split(".")[1] if "." in module else ""
            if target in forbidden:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_a_stage_above_it(package):
    assert (PACKAGE / package).is_dir()
    bad = violations(package, FORBIDDEN[package])
    assert not bad, f"latdiffunet.{package} must not import {FORBIDDEN[package]}:\n" + "\n".join(bad)


def test_import_reader_sees_every_form(tmp_path):
    """The checker itself: absolute, from-package, relative and function-local imports all count."""
    fake = tmp_path / "latdiffunet"
    (fake / "inference").mkdir(parents=True)
    (fake / "inference" / "a.py").write_text("import latdiffunet.training.x\n")
    (fake / "inference" / "b.py").write_text("from latdiffunet import training\n")
    (fake / "inference" / "c.py").write_text("from ..training.checkpoint import load\n")
    (fake / "inference" / "d.py").write_text("def f():\n    from latdiffunet.training import trainer\n")
    (fake / "inference" / "e.py").write_text("from latdiffunet.inference import sliding_window\nfrom . import export\n")
    bad = violations("inference", ("training",), root=fake)
    assert [b.split(":")[0] for b in bad] == [f"latdiffunet/inference/{n}.py" for n in "abcd"]
