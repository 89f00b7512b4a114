"""The import graph follows the layering in README.md ("How it fits together").

Every ``import`` and ``from ... import`` in a package's modules counts, also those inside
functions and ``if TYPE_CHECKING:`` blocks: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROJECT = {
    "procs",
    "buffer",
    "staleness",
    "inference",
    "weights",
    "rollout_workers",
    "trainer",
    "sluice",
    "benchmarks",
}
# What each package may import besides itself. Components never import ``sluice`` (the CLI and
# the demo) or ``benchmarks``; the rollout workers and the trainer never import each other.
ALLOWED: dict[str, set[str]] = {
    "procs": set(),
    "buffer": set(),
    "staleness": {"buffer"},
    "inference": {"procs"},
    "weights": {"procs", "buffer", "staleness", "inference"},
    "rollout_workers": {"procs", "buffer", "staleness", "inference", "weights"},
    "trainer": {"procs", "buffer", "staleness", "inference", "weights"},
    "benchmarks": PROJECT - {"sluice", "benchmarks"},
    "sluice": PROJECT - {"sluice"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add((alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return {(name, line) for name, line in found if name in PROJECT}


def violations() -> list[str]:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, line in sorted(imported_packages(path)):
                if name != package and name not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {name}")
    return bad


def test_every_package_is_checked() -> None:
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk <= set(ALLOWED), f"packages without a layering rule: {on_disk - set(ALLOWED)}"


def test_import_graph_follows_the_layering() -> None:
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    # The walker must see imports inside functions and TYPE_CHECKING blocks.
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from sluice.config import X\n"
        "def f():\n    import trainer.loop\n"
    )
    assert {n for n, _ in imported_packages(f)} == {"sluice", "trainer"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_has_a_module(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
