"""Shared fixtures: a private redis-server per test (real, on a free port, stopped by pid)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procs import RedisServer

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=None,
        help="run Redis tests against this external server instead of private ones "
        "(tests that kill or restart Redis are skipped)",
    )


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private redis-servers: ``redis_factory(appendonly=True, password="pw")``."""
    started: list[RedisServer] = []

    def start(**kw: object) -> RedisServer:
        d = tmp_path / f"redis{len(started)}"
        srv = RedisServer(directory=d, **kw)  # type: ignore[arg-type]
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.cleanup()


@pytest.fixture
def redis_server(
    redis_factory: Callable[..., RedisServer], request: pytest.FixtureRequest
) -> RedisServer:
    """A private, restartable redis-server (skips when --redis-url points elsewhere)."""
    if request.config.getoption("--redis-url"):
        pytest.skip("needs a private redis-server (it kills or restarts it)")
    return redis_factory()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_factory: Callable[..., RedisServer]) -> str:
    """URL of a Redis for the test: --redis-url if given, else a private server."""
    external = request.config.getoption("--redis-url")
    if external:
        return str(external)
    return redis_factory().url


@pytest.fixture
def run_name() -> str:
    """A fresh run namespace, so tests never see each other's keys on a shared Redis."""
    return "t" + uuid.uuid4().hex[:12]
