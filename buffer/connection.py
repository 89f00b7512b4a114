"""Redis connection settings shared by every sluice process.

The URL carries scheme (``redis://`` or ``rediss://`` for TLS), user, password and db; the
password may also come from ``SLUICE_REDIS_PASSWORD``. Credentials never reach logs: use
``redact_url`` whenever a URL is printed.

A Redis Cluster is named by ``redis+cluster://[user:password@]host:port[,host:port...]``
(``rediss+cluster://`` for TLS; no db, a cluster has only db 0): any reachable nodes of it, from
which redis-py's cluster client learns the rest and follows slot moves and failovers. Every key
of a run carries the run's hash tag (``key``), so a run lives in one slot and the Lua scripts
and MULTI transactions, which touch several of its keys, stay valid (docs/scale.md).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_URL = "redis://127.0.0.1:6379/0"
PASSWORD_ENV = "SLUICE_REDIS_PASSWORD"

T = TypeVar("T")

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# Errors worth a retry: the server went away or is (re)loading its AOF; on a cluster, a slot
# whose master is being failed over (CLUSTERDOWN, MASTERDOWN, TRYAGAIN, a slot no node serves).
TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionResetError,
    OSError,
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
)


def closed_transport(e: BaseException) -> bool:
    """True for the error uvloop raises when redis-py writes on a connection whose server went
    away (``RuntimeError: unable to perform operation on <TCPTransport closed=True ...>; the
    handler is closed``): as transient as a ``ConnectionError``. Seen when Redis was SIGKILLed
    and restarted under a worker (tests/faults/test_fault_scenarios.py)."""
    return (
        isinstance(e, RuntimeError)
        and not isinstance(e, RedisUnavailable)
        and "handler is closed" in str(e)
    )


class RedisUnavailable(RuntimeError):
    """Redis could not be reached (or refused our credentials); the message names the URL,
    redacted."""


class RedisAuthFailed(RedisUnavailable):
    """Redis refused our credentials, or wants a password we did not give (a bad input, where
    an unreachable Redis is the environment's problem)."""


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``."""
    parts = urlsplit(url)
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hostport}" if user else f":***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def validate_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme in CLUSTER_SCHEMES:
        cluster_nodes(url)
        return url
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"redis URL {redact_url(url)!r}: scheme must be redis://, rediss:// (TLS), unix:// "
            "or redis+cluster://host:port[,host:port...] (a Redis Cluster)"
        )
    return url


def is_cluster_url(url: str) -> bool:
    """True for a ``redis+cluster://`` (or ``rediss+cluster://``) URL."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def is_cluster(client: object) -> bool:
    """True when ``client`` is a Redis Cluster client (``make_client`` of a cluster URL)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` startup nodes of a ``redis+cluster://`` URL (port 6379 when left
    out). ``ValueError`` names what is wrong: no node, a bad port, or a db other than 0."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    if parts.path not in ("", "/", "/0") or parts.query:
        raise ValueError(
            f"redis URL {redact_url(url)!r}: a Redis Cluster has only db 0; give "
            "redis+cluster://host:port[,host:port...] without a db or options"
        )
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = port, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"redis URL {redact_url(url)!r}: {item!r} is not host:port "
                "(redis+cluster://host:port[,host:port...])"
            )
        nodes.append((host, int(port)))
    return nodes


def make_client(url: str = DEFAULT_URL, *, socket_timeout: float | None = 30.0) -> aioredis.Redis:
    """A ``redis.asyncio`` client for ``url`` (binary replies; no command is sent yet): for a
    ``redis+cluster://`` URL, redis-py's cluster client, which offers the same commands,
    scripts and single-slot transactions (typed as ``Redis`` for the callers)."""
    validate_url(url)
    env_pw = os.environ.get(PASSWORD_ENV)
    password = env_pw if env_pw and urlsplit(url).password is None else None
    if is_cluster_url(url):
        return _make_cluster_client(url, socket_timeout, password)
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=5.0,
        socket_timeout=socket_timeout,
        health_check_interval=30,
    )
    if password:
        client.connection_pool.connection_kwargs["password"] = password
    return client


def _make_cluster_client(
    url: str, socket_timeout: float | None, env_password: str | None
) -> aioredis.Redis:
    from urllib.parse import unquote

    from redis.asyncio.cluster import ClusterNode, RedisCluster

    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, pw = userinfo.partition(":")
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(url)],
        username=unquote(user) or None,
        password=unquote(pw) if pw else env_password,
        ssl=parts.scheme.startswith("rediss"),
        decode_responses=False,
        socket_connect_timeout=5.0,
        socket_timeout=socket_timeout,
        health_check_interval=30,
    )
    return client  # type: ignore[return-value]  # the same commands, scripts, pipelines


async def connect(
    url: str = DEFAULT_URL, *, socket_timeout: float | None = 30.0, wait_s: float = 10.0
) -> aioredis.Redis:
    """Make a client and PING it. ``RedisUnavailable`` at once on a wrong or missing password;
    on an unreachable (or still loading) server after ``wait_s`` seconds of retries, so a
    process started while Redis restarts from its AOF waits for it instead of exiting
    (tests/faults/test_fault_scenarios.py::test_all_in_turn)."""
    client = make_client(url, socket_timeout=socket_timeout)
    deadline = time.monotonic() + wait_s
    delay = 0.05
    last: Exception
    while True:
        try:
            await client.ping()
            return client
        except AuthenticationError as e:  # a ConnectionError subclass: never retried
            await client.aclose()
            raise _auth_error(url, e) from None
        except ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
                await client.aclose()
                raise _auth_error(url, e) from None
            if not isinstance(e, TRANSIENT) and not str(e).startswith("LOADING"):
                await client.aclose()
                raise
            last = e  # loading its AOF, or a cluster failing over
        except TRANSIENT as e:
            last = e
        except RedisClusterException as e:  # no startup node answers (yet)
            last = e
        if time.monotonic() + delay > deadline:
            await client.aclose()
            raise RedisUnavailable(f"cannot reach Redis at {redact_url(url)}: {last}") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _auth_error(url: str, e: Exception) -> RedisUnavailable:
    gave_password = urlsplit(url).password is not None or bool(os.environ.get(PASSWORD_ENV))
    if not gave_password or "NOAUTH" in str(e):
        return RedisAuthFailed(
            f"Redis at {redact_url(url)} needs a password ({e}): put it in the URL or "
            f"${PASSWORD_ENV}"
        )
    return RedisAuthFailed(
        f"Redis at {redact_url(url)} refused the credentials ({e}); check the password in the "
        f"URL or ${PASSWORD_ENV}"
    )


def raise_if_cancelling(error: BaseException | None) -> None:
    """Raise ``CancelledError`` when the current task is being cancelled. The Redis client
    can answer a cancellation with a connection or timeout error of its own (its clean-up on a
    dead connection fails after the cancel): retrying that would swallow the cancel, and a
    stopping process would wait for the task for ever (seen in the fault suite)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from error


async def with_retries(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    attempts: int = 8,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
) -> T:
    """Run ``op`` and retry transient Redis errors with jittered exponential backoff.

    After ``attempts`` failures raises ``RedisUnavailable`` naming ``what``: a write that cannot
    be confirmed is reported, never dropped.
    """
    delay = base_delay
    last: BaseException | None = None
    for _ in range(attempts):
        try:
            return await op()
        except TRANSIENT as e:
            last = e
        except RuntimeError as e:
            if not closed_transport(e):
                raise
            last = e
        except ResponseError as e:
            if not str(e).startswith("LOADING"):
                raise
            last = e
        raise_if_cancelling(last)
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, max_delay)
    raise RedisUnavailable(f"{what}: Redis unavailable after {attempts} attempts: {last}")


def key(run: str, *parts: str) -> str:
    """The run's key namespace: ``sluice:{run}:part:part``.

    The braces are a Redis Cluster hash tag: every key of a run lives in one slot, so the Lua
    scripts that touch several of them stay valid on a cluster.
    """
    check_run_name(run)
    return ":".join(("sluice", "{" + run + "}", *parts))


def check_run_name(run: str) -> str:
    if not run or len(run) > 128 or any(c in run for c in " :{}*?[]\n\t"):
        raise ValueError(
            f"run name {run!r} must be 1-128 characters without spaces, ':', braces or glob characters"
        )
    return run
