"""The CPU reference server's scheduler: the waiting queue, the engine's running batch, one lock.

A scheduler task admits waiting requests into the engine's running batch and runs one
``Engine.step`` at a time (see ``inference/cpu_server/engine.py`` for the batching rules). The
model runs in one executor thread; every mutation of the batch (steps, aborts, pauses, weight
loads) happens under one ``asyncio.Lock``, so HTTP handlers never see a half step.

Invariants (tests/unit/inference/test_cpu_server_control.py, over a fake engine):
- A failed model step answers its requests 500 (``EngineFailure``), drops the running batch
  (its cache may be torn), and the server keeps serving
  (``test_failed_step_answers_500_and_keeps_serving``).
- An aborted request finishes at once with its partial output, labelled with the weight
  version live at the abort (``test_update_with_abort_all_returns_partial_with_old_version``);
  one whose client went away is aborted between two steps.
- While ``admit_open`` is clear, a new request waits before the queue (a weight update holds
  new requests: ``inference/cpu_server/control.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from aiohttp import web

from inference.cpu_server.engine import Engine, EngineFailure
from inference.cpu_server.sampling import Req

log = logging.getLogger("sluice.cpu_server")


class Scheduler:
    """The queue and the running batch of one ``Engine``; see the module docstring."""

    def __init__(self, engine: Engine, *, threads: int = 1) -> None:
        self.engine = engine
        self.threads = threads
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-engine")
        self.lock = asyncio.Lock()
        self.work = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.admit_open = asyncio.Event()
        self.admit_open.set()
        self.paused = False
        self.waiting: list[Req] = []
        self.inflight: dict[str, Req] = {}
        # Read-only counters for /model_info (benchmarks): seconds the model spent in engine
        # steps (decode + prefill), steps taken, /generate requests received, since start.
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.engine_steps = 0
        self.requests = 0

    async def in_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the model's one thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def has_work(self) -> bool:
        return bool(self.waiting or self.engine.rows)

    def pending(self) -> list[Req]:
        """Every request not finished yet: the running rows, then the waiting ones."""
        return list(self.engine.rows) + list(self.waiting)

    def finish(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.inflight.pop(r.rid, None)
            if not r.future.done():
                r.future.set_result(r)
        if not self.has_work():
            self.idle.set()

    def fail(self, reqs: list[Req], message: str) -> None:
        """Answer ``reqs`` with HTTP 500 and drop the running batch (its cache may be torn)."""
        self.engine.remove(set(self.engine.rows))
        for r in reqs:
            self.inflight.pop(r.rid, None)
            if not r.future.done():
                r.future.set_exception(EngineFailure(message))
        if not self.has_work():
            self.idle.set()

    def abort(self, reqs: list[Req], message: str = "Aborted") -> None:
        """Finish ``reqs`` now with their partial outputs (caller holds the lock)."""
        running = {r for r in reqs if r in self.engine.rows}
        if running:
            self.engine.remove(running)
        for r in reqs:
            if r in self.waiting:
                self.waiting.remove(r)
            msg = message if r in running or r.output_ids else "Abort in waiting queue"
            r.finish_reason = {
                "type": "abort",
                "message": msg,
                "status_code": None,
                "err_type": None,
            }
            r.weight_version = self.engine.weight_version
        self.finish(reqs)

    def enqueue(self, req: Req) -> None:
        self.inflight[req.rid] = req
        self.waiting.append(req)
        self.idle.clear()
        self.work.set()

    async def submit(self, req: Req) -> Req:
        """Queue ``req`` (once admission is open) and wait until it finished."""
        self.inflight[req.rid] = req
        try:
            if req.sampling.max_new_tokens == 0:
                req.finish_reason = {"type": "length", "length": 0}
                req.weight_version = self.engine.weight_version
                self.finish([req])
            else:
                await self.admit_open.wait()
                self.enqueue(req)
            return await req.future
        except asyncio.CancelledError:
            # The client went away: free the slot (under the lock, between two steps).
            asyncio.get_running_loop().create_task(self._abort_later([req]))
            raise

    async def _abort_later(self, reqs: list[Req]) -> None:
        async with self.lock:
            self.abort([r for r in reqs if not r.future.done()])

    async def _loop(self) -> None:
        await self.in_executor(torch.set_num_threads, self.threads)
        while True:
            await self.work.wait()
            async with self.lock:
                if self.paused or not self.has_work():
                    self.work.clear()
                    continue
                room = max(0, self.engine.max_batch - len(self.engine.rows))
                admitted, self.waiting = self.waiting[:room], self.waiting[room:]
                t_step = time.monotonic()
                try:
                    finished = await self.in_executor(self.engine.step, admitted)
                except Exception as e:  # the model failed: fail these requests, keep serving
                    log.exception("engine step failed")
                    self.fail(list(self.engine.rows) + admitted, f"engine step failed: {e!r}")
                    continue
                finally:
                    self.busy_s += time.monotonic() - t_step
                    self.engine_steps += 1
                self.finish(finished)
            await asyncio.sleep(0)

    async def run(self, app: web.Application) -> AsyncIterator[None]:
        """The scheduler task for the app's lifetime (a cleanup context); the executor is shut
        down after it."""
        task = asyncio.create_task(self._loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.executor.shutdown(wait=True)
