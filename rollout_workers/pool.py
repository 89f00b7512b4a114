"""The inference servers one rollout worker drives, each in one explicit state.

A ``Server`` is always in exactly one ``ServerState``; only the ``ServerPool`` moves it, and
every move wakes the samples waiting in ``acquire``::

    NEEDS_LOAD --(loads the current weights)--> UP
    UP --(a newer version is published, or a load failed)--> NEEDS_LOAD
    any --exclusive()--> UPDATING --(the update ends)--> UP | NEEDS_LOAD | DEAD
    any --mark_dead--> DEAD --(answers /health, loads the current weights)--> UP

``acquire(min_version)`` hands out only UP servers whose weights are at least ``min_version``
(a group's admission version), newest weights first, then the least loaded. While this worker
changes a server's weights (``exclusive``) the server is UPDATING: its new requests wait in
the worker; when the update ends, the server takes the state the update left it in.

Invariants (tests/unit/rollout_workers/test_rollout_workers_pool.py, and with real servers
tests/integration/test_rollout_worker.py):

- A dead server gets no work: its samples are resubmitted to the others
  (``test_killed_server_its_samples_finish_on_the_other``).
- A server that comes back (or is relaunched, with ``--launch``) gets the current weights
  before any work (``test_cli_launch_restarts_crashed_server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from inference.client import SGLangClient
from inference.protocol import InferenceClient, InferenceTimeout, ServerDead

log = logging.getLogger("sluice.rollout")


class Shutdown(Exception):
    """The worker is stopping: the sample or group in hand is given up."""


class NoServer(RuntimeError):
    """No server answered /health within the start-up wait; the message is one line naming
    the URLs and the fix."""


WAIT_LOG_S = 10.0
"""While waiting for a server at start-up, log the URLs waited for this often."""


def check_servers(servers: Sequence[Server]) -> None:
    if not servers:
        raise ValueError("a rollout worker needs at least one inference server")


class ServerState(enum.Enum):
    UP = "up"
    """Answers, serves ``version``, takes requests."""
    UPDATING = "updating"
    """This worker is changing its weights: new requests wait in the worker."""
    NEEDS_LOAD = "needs_load"
    """Answers, but must load the current weights before it gets work (a new record, a live
    server behind the current version, or one whose load failed)."""
    DEAD = "dead"
    """Does not answer, or answered again and has not loaded the current weights yet."""


class ServerProcess(Protocol):
    """A server this worker launched (``inference.launch.ServerHandle``)."""

    pid: int

    def alive(self) -> bool: ...

    def stop(self, timeout: float = ...) -> int | None: ...


class Loader(Protocol):
    """Makes a server serve the current weights (the worker's weight updater)."""

    @property
    def version(self) -> int:
        """The version servers must serve."""
        ...

    def behind(self, server: Server) -> bool:
        """A live server that serves older weights and can catch up by itself."""
        ...

    async def bring_up(self, server: Server) -> None:
        """Make ``server`` serve the current weights, or mark it dead."""
        ...


@dataclass(eq=False)
class Server:
    """One inference server as this worker sees it. Move its state through the pool."""

    url: str
    client: InferenceClient
    handle: ServerProcess | None = None
    restart: Callable[[], ServerProcess] | None = None
    """Relaunch the server (blocking); only for servers this worker launched."""
    state: ServerState = ServerState.NEEDS_LOAD
    version: int | None = None
    """The weights it serves, as far as this worker knows."""
    group: str | None = None
    """The distributed weight-sync group this server process has joined (None: none)."""
    mixed: bool = False
    """A distributed transfer failed part-way: its weights are mixed; reload before work."""
    rids: set[str] = field(default_factory=set)
    """Requests of this worker running on it."""
    busy_s: float = 0.0
    busy_since: float | None = None
    restarts: int = 0
    deaths: int = 0
    adapter: str | None = None
    """LoRA runs: the adapter this worker's requests name (``lora_path``; None: the base)."""
    adapters: set[str] = field(default_factory=set)
    """LoRA runs: the adapters this worker loaded on the server and has not unloaded yet."""
    adapter_uses: dict[str, int] = field(default_factory=dict)
    """LoRA runs: this worker's requests running on the server, by the adapter they name."""
    adapter_released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """Set whenever a request naming an adapter ends (``release_adapter``)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    """Held while this worker changes its weights (``ServerPool.exclusive``)."""
    after: ServerState | None = None
    """While UPDATING: the state it takes when the update ends."""

    @property
    def settled(self) -> ServerState:
        """The state once the update in progress (if any) ends."""
        if self.state is ServerState.UPDATING and self.after is not None:
            return self.after
        return self.state

    @property
    def alive(self) -> bool:
        return self.settled is not ServerState.DEAD

    def track(self, rid: str) -> None:
        if not self.rids:
            self.busy_since = time.monotonic()
        self.rids.add(rid)

    def untrack(self, rid: str) -> None:
        self.rids.discard(rid)
        if not self.rids and self.busy_since is not None:
            self.busy_s += time.monotonic() - self.busy_since
            self.busy_since = None

    def use_adapter(self) -> str | None:
        """The adapter a request sent now names (``adapter``), counted as in use until
        ``release_adapter``: an adapter is unloaded only once no request names it."""
        name = self.adapter
        if name is not None:
            self.adapter_uses[name] = self.adapter_uses.get(name, 0) + 1
        return name

    def release_adapter(self, name: str | None) -> None:
        if name is None:
            return
        left = self.adapter_uses.get(name, 0) - 1
        if left > 0:
            self.adapter_uses[name] = left
        else:
            self.adapter_uses.pop(name, None)
            self.adapter_released.set()

    def busy_total(self) -> float:
        extra = time.monotonic() - self.busy_since if self.busy_since is not None else 0.0
        return self.busy_s + extra


class ServerPool:
    """The servers of one worker; every state change goes through these methods."""

    def __init__(self, servers: list[Server]) -> None:
        check_servers(servers)
        self.servers = servers
        self.closed = False
        """Set by ``close``: ``acquire`` raises ``Shutdown`` from then on."""
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ state changes
    def _notify(self) -> None:
        """Wake every ``acquire`` waiting for a server."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _set(self, s: Server, state: ServerState) -> None:
        if s.state is ServerState.UPDATING:
            s.after = state
        else:
            s.state = state
        self._notify()

    def mark_dead(self, s: Server) -> None:
        if s.alive:
            s.deaths += 1
            log.warning("server %s is dead; its samples go to the other servers", s.url)
        s.group = None  # a restarted server process has joined no group
        s.adapters.clear()  # nor loaded any adapter: bring-up loads the current one again
        self._set(s, ServerState.DEAD)

    def mark_up(self, s: Server, version: int | None = None) -> None:
        """``s`` answers and serves the current weights (``version``, if given)."""
        if version is not None:
            s.version = version
        self._set(s, ServerState.UP)

    def loaded(self, s: Server, version: int) -> None:
        """A weight transfer into ``s`` completed: it serves ``version``, unmixed. A server
        that died meanwhile, or was dead before, stays DEAD until ``mark_up``."""
        s.version, s.mixed = version, False
        self._set(s, ServerState.UP if s.alive else ServerState.DEAD)

    def require_load(self, s: Server) -> None:
        """``s`` must load the current weights before it gets more work."""
        if s.settled is ServerState.UP:
            self._set(s, ServerState.NEEDS_LOAD)

    @contextlib.asynccontextmanager
    async def exclusive(self, s: Server) -> AsyncIterator[Server]:
        """Hold ``s``'s new requests while this worker changes its weights (one change at a
        time per server); then it takes the state the change left it in."""
        async with s.lock:
            s.after, s.state = s.state, ServerState.UPDATING
            try:
                yield s
            finally:
                s.state = s.after if s.after is not None else ServerState.NEEDS_LOAD
                s.after = None
                self._notify()

    def close(self) -> None:
        """The worker is stopping: ``acquire`` raises ``Shutdown`` from now on."""
        self.closed = True
        self._notify()

    # ------------------------------------------------------------------ work
    async def acquire(self, min_version: int = 0) -> Server:
        """An UP server with weights at least ``min_version`` (a group's admission version:
        generating it on older weights would make it staler than the gate allowed): the
        newest weights first, then the least loaded. Waits until one is."""
        while True:
            if self.closed:
                raise Shutdown()
            usable = [
                s
                for s in self.servers
                if s.state is ServerState.UP and (s.version or 0) >= min_version
            ]
            if usable:
                return min(usable, key=lambda s: (-(s.version or 0), len(s.rids)))
            await self._changed.wait()

    def live(self) -> list[Server]:
        """Servers that answer and serve the current weights (or are being updated from it)."""
        return [s for s in self.servers if s.settled is ServerState.UP]

    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def launched_urls(self) -> list[str]:
        """The servers this worker launched itself (``--launch``): the only ones it offers
        for ipc weight sync (docs/weight-sync.md)."""
        return [s.url for s in self.servers if s.handle is not None]

    def inflight_requests(self) -> int:
        return sum(len(s.rids) for s in self.servers)

    async def abort_requests(self, timeout: float) -> None:
        """Ask every live server to abort this worker's requests (best effort)."""
        aborts = [
            s.client.abort(rid, timeout=timeout)
            for s in self.servers
            if s.alive
            for rid in list(s.rids)
        ]
        await asyncio.gather(*aborts, return_exceptions=True)

    async def close_clients(self) -> None:
        for s in self.servers:
            await s.client.close()

    # ------------------------------------------------------------------ health
    async def healthy(self, s: Server) -> bool:
        try:
            return await s.client.health(timeout=5.0, retries=0)
        except (ServerDead, InferenceTimeout):
            return False

    async def wait_for_a_server(
        self, timeout: float, stop: asyncio.Event, *, log_every: float = WAIT_LOG_S
    ) -> None:
        """Until one server answers /health (those that do not are DEAD, uncounted), logging
        the URLs it waits for and for how long, first at once, then every ``log_every``
        seconds; ``NoServer`` naming them after ``timeout``; returns early once ``stop`` is
        set."""
        t0 = time.monotonic()
        next_log = t0
        while True:
            ok = await asyncio.gather(*(self.healthy(s) for s in self.servers))
            for s, good in zip(self.servers, ok, strict=True):
                if not good:
                    self._set(s, ServerState.DEAD)
                elif s.state is ServerState.DEAD:
                    self._set(s, ServerState.NEEDS_LOAD)
            waited = time.monotonic() - t0
            if any(ok):
                if next_log > t0:  # it logged that it was waiting: say the wait is over
                    up = ", ".join(s.url for s, good in zip(self.servers, ok, strict=True) if good)
                    log.info("inference server %s answers after %.0fs", up, waited)
                return
            if waited >= timeout:
                raise NoServer(
                    f"no inference server answered /health within {timeout:g}s "
                    f"(rollout.server_wait_s) at {', '.join(self.urls())}: start one there "
                    "(`sluice serve --config RUN.yaml --port PORT`, or SGLang), or check "
                    "--servers / inference.servers"
                )
            if time.monotonic() >= next_log:
                log.warning(
                    "waiting for an inference server to answer /health at %s: %.0fs of %gs "
                    "(rollout.server_wait_s)",
                    ", ".join(self.urls()),
                    waited,
                    timeout,
                )
                next_log = time.monotonic() + log_every
            with contextlib.suppress(TimeoutError):  # SIGTERM ends the wait at once
                await asyncio.wait_for(stop.wait(), min(0.5, max(0.0, timeout - waited)))
            if stop.is_set():
                return

    async def health_loop(self, interval_s: float, loader: Loader) -> None:
        """Every ``interval_s``: relaunch exited servers this worker launched, mark silent ones
        dead, and have ``loader`` load the current weights into those that came back."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.gather(*(self.check(s, loader) for s in self.servers))

    async def check(self, s: Server, loader: Loader) -> None:
        if s.lock.locked():
            return  # being updated: SGLang answers 503 while paused
        if s.handle is not None and s.restart is not None and not s.handle.alive():
            self.mark_dead(s)
            code = await asyncio.to_thread(s.handle.stop, 5.0)
            log.warning("server %s exited (code %s): relaunching it", s.url, code)
            s.handle = await asyncio.to_thread(s.restart)
            s.restarts += 1
        if not await self.healthy(s):
            if s.alive:
                self.mark_dead(s)
            return
        if loader.behind(s):
            await loader.bring_up(s)  # loads a newer disk copy if one has been recorded
        elif s.settled is not ServerState.UP:
            log.info("server %s is back: loading v%d before it gets work", s.url, loader.version)
            await loader.bring_up(s)


def make_servers(
    urls: list[str],
    *,
    handles: Sequence[ServerProcess] | None = None,
    restarts: Sequence[Callable[[], ServerProcess]] | None = None,
    admin_api_key: str | None = None,
    vocab_size: int | None = None,
) -> list[Server]:
    """``Server`` records for ``urls`` (with their launch handles and relaunchers, if any),
    each with an ``SGLangClient``."""
    out = []
    for i, url in enumerate(urls):
        client = SGLangClient(url, admin_api_key=admin_api_key, vocab_size=vocab_size)
        out.append(
            Server(
                url=client.url,
                client=client,
                handle=handles[i] if handles else None,
                restart=restarts[i] if restarts else None,
            )
        )
    return out
