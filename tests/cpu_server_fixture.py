"""Reusable CPU-server fixtures: a tiny model directory and real ``sluice serve`` processes.

Import the fixtures into a test module with
``from cpu_server_fixture import cpu_server, cpu_server_factory, tiny_model  # noqa: F401``.
Every server is started by ``inference.launch.launch_cpu_server`` on a free port (a
``ServerHandle``) and is stopped by its own pid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inference.launch import ServerHandle, launch_cpu_server

TINY = dict(vocab=128, layers=2, hidden=64, init_std=0.3)


def make_model(directory: Path, seed: int = 1) -> Path:
    """A sharp-ish tiny llama (init_std 0.3: input-dependent next-token distributions)."""
    from inference.models import init_tiny_model

    return init_tiny_model(directory, seed=seed, **TINY)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture
def cpu_server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    """``start(model_dir, *extra_args)`` -> a started server (stopped at teardown)."""
    started: list[ServerHandle] = []

    def start(model: Path, *extra: str) -> ServerHandle:
        log = tmp_path / f"server{len(started)}.log"
        srv = launch_cpu_server(model, extra_args=list(extra), log_path=log)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def cpu_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    """One server on ``tiny_model`` shared by a module's read-only tests."""
    log = tmp_path_factory.mktemp("cpu-server") / "server.log"
    with launch_cpu_server(tiny_model, log_path=log) as srv:
        yield srv
