"""Reusable CPU-server fixtures: a tiny model directory and real ``sluice serve`` processes.

Import the fixtures into a test module with
``from cpu_server_fixture import cpu_server, cpu_server_factory, tiny_model  # noqa: F401``.
Every server runs on a free port and is stopped by its own pid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procs import free_port

TINY = dict(vocab=128, layers=2, hidden=64, init_std=0.3)


def make_model(directory: Path, seed: int = 1) -> Path:
    """A sharp-ish tiny llama (init_std 0.3: input-dependent next-token distributions)."""
    from inference.models import init_tiny_model

    return init_tiny_model(directory, seed=seed, **TINY)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture
def cpu_server_factory(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """``start(model_dir, *extra_args)`` -> a started ``CPUServerProcess`` (stopped at teardown)."""
    from inference.cpu_server import CPUServerProcess

    started: list[CPUServerProcess] = []

    def start(model: Path, *extra: str) -> CPUServerProcess:
        srv = CPUServerProcess(
            model,
            port=free_port(),
            extra_args=list(extra),
            log_path=tmp_path / f"server{len(started)}.log",
        )
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def cpu_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One server on ``tiny_model`` shared by a module's read-only tests."""
    from inference.cpu_server import CPUServerProcess

    log = tmp_path_factory.mktemp("cpu-server") / "server.log"
    with CPUServerProcess(tiny_model, port=free_port(), log_path=log) as srv:
        yield srv
