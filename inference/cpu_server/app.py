"""The CPU reference server's HTTP app: SGLang's endpoints around one ``Engine``, and ``serve``.

A scheduler task admits waiting requests into the engine's running batch and runs one
``Engine.step`` at a time (see ``inference/cpu_server/engine.py`` for the batching rules). The
model runs in one executor thread; every mutation of the batch (steps, aborts, pauses, weight
loads) happens under one ``asyncio.Lock``, so HTTP handlers never see a half step.

Invariants (tests/integration/test_cpu_server.py):
- A request aborted by ``update_weights_from_disk(abort_all_requests=true)`` returns before
  the load and reports the old version; later tokens carry the new one
  (``test_pause_abort_resume_and_update``).
- A bad request is answered 400 ``{"error": {"message": ...}}`` naming the problem and never
  reaches the model (``test_bad_requests_get_400_and_server_keeps_serving``); a failed model
  step answers its requests 500 and the server keeps serving.
- No prefix cache: ``flush_cache`` is a no-op when idle. A weight update during an
  ``in_place`` pause keeps the running rows' old-weight KV (as SGLang does); their later
  tokens carry the new version.
- With an admin key, every path of ``ADMIN_PATHS`` answers 401 without
  ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from aiohttp import web

from inference.cpu_server.engine import Engine, EngineFailure, join_weight_group
from inference.cpu_server.sampling import (
    BadRequest,
    Req,
    Sampling,
    generate_response,
    is_int,
    parse_generate,
    parse_json_object,
)

log = logging.getLogger("sluice.cpu_server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ADMIN_PATHS = frozenset(
    {
        "/pause_generation",
        "/continue_generation",
        "/abort_request",
        "/flush_cache",
        "/update_weights_from_disk",
        "/init_weights_update_group",
        "/update_weights_from_distributed",
    }
)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


class CPUServer:
    """aiohttp app around one ``Engine``; see the module docstring for the scheduling rules."""

    def __init__(
        self,
        engine: Engine,
        *,
        admin_api_key: str | None = None,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        self.engine = engine
        self.admin_api_key = admin_api_key
        self.rng = torch.Generator().manual_seed(seed)
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
        self.groups: dict[str, Any] = {}
        # Read-only counters for /model_info (benchmarks): seconds the model spent in engine
        # steps (decode + prefill), steps taken, /generate requests received, since start.
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.engine_steps = 0
        self.requests = 0

    # ---- plumbing

    async def _in_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _has_work(self) -> bool:
        return bool(self.waiting or self.engine.rows)

    def _finish(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.inflight.pop(r.rid, None)
            if not r.future.done():
                r.future.set_result(r)
        if not self._has_work():
            self.idle.set()

    def _fail(self, reqs: list[Req], message: str) -> None:
        """Answer ``reqs`` with HTTP 500 and drop the running batch (its cache may be torn)."""
        self.engine.remove(set(self.engine.rows))
        for r in reqs:
            self.inflight.pop(r.rid, None)
            if not r.future.done():
                r.future.set_exception(EngineFailure(message))
        if not self._has_work():
            self.idle.set()

    def _abort(self, reqs: list[Req], message: str = "Aborted") -> None:
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
        self._finish(reqs)

    def _enqueue(self, req: Req) -> None:
        self.inflight[req.rid] = req
        self.waiting.append(req)
        self.idle.clear()
        self.work.set()

    async def _scheduler(self) -> None:
        await self._in_executor(torch.set_num_threads, self.threads)
        while True:
            await self.work.wait()
            async with self.lock:
                if self.paused or not self._has_work():
                    self.work.clear()
                    continue
                room = max(0, self.engine.max_batch - len(self.engine.rows))
                admitted, self.waiting = self.waiting[:room], self.waiting[room:]
                t_step = time.monotonic()
                try:
                    finished = await self._in_executor(self.engine.step, admitted)
                except Exception as e:  # the model failed: fail these requests, keep serving
                    log.exception("engine step failed")
                    self._fail(list(self.engine.rows) + admitted, f"engine step failed: {e!r}")
                    continue
                finally:
                    self.busy_s += time.monotonic() - t_step
                    self.engine_steps += 1
                self._finish(finished)
            await asyncio.sleep(0)

    async def _run_scheduler(self, app: web.Application) -> AsyncIterator[None]:
        """The scheduler task for the app's lifetime; the executor is shut down after it."""
        task = asyncio.create_task(self._scheduler())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.executor.shutdown(wait=True)

    def _authorized(self, request: web.Request) -> bool:
        if not self.admin_api_key:
            return True
        return request.headers.get("Authorization", "") == f"Bearer {self.admin_api_key}"

    async def _json_body(self, request: web.Request, *, allow_empty: bool = True) -> dict[str, Any]:
        return parse_json_object(await request.read(), allow_empty=allow_empty)

    # ---- /generate

    async def generate(self, request: web.Request) -> web.Response:
        created = time.perf_counter()
        try:
            body = await self._json_body(request, allow_empty=False)
            parsed = parse_generate(
                body, vocab_size=self.engine.vocab_size, max_positions=self.engine.max_positions
            )
        except BadRequest as e:
            return _error(400, str(e))
        if parsed.rid in self.inflight:
            return _error(400, f"Duplicate request ID: {parsed.rid}")
        self.requests += 1
        sampling = parsed.sampling
        seed = sampling.sampling_seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        gen = torch.Generator().manual_seed(seed) if sampling.temperature > 0 else None
        req = Req(
            rid=parsed.rid,
            input_ids=parsed.input_ids,
            sampling=sampling,
            return_logprob=parsed.return_logprob,
            generator=gen,
            future=asyncio.get_running_loop().create_future(),
            created=created,
        )
        try:
            done = await self._run(req)
        except EngineFailure as e:
            return _error(500, str(e))
        return web.json_response(generate_response(done))

    async def _run(self, req: Req) -> Req:
        """Queue ``req`` (once admission is open) and wait until it finished."""
        self.inflight[req.rid] = req
        try:
            if req.sampling.max_new_tokens == 0:
                req.finish_reason = {"type": "length", "length": 0}
                req.weight_version = self.engine.weight_version
                self._finish([req])
            else:
                await self.admit_open.wait()
                self._enqueue(req)
            return await req.future
        except asyncio.CancelledError:
            # The client went away: free the slot (under the lock, between two steps).
            asyncio.get_running_loop().create_task(self._abort_later([req]))
            raise

    async def _abort_later(self, reqs: list[Req]) -> None:
        async with self.lock:
            self._abort([r for r in reqs if not r.future.done()])

    # ---- control endpoints

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        mode = body.get("mode", "abort")
        if mode == "retract":
            return _error(
                400,
                "pause mode 'retract' is not supported by the CPU server; use 'abort' or 'in_place'",
            )
        if mode not in ("abort", "in_place"):
            return _error(400, f"unknown pause mode {mode!r}; expected 'abort' or 'in_place'")
        async with self.lock:
            self.paused = True
            if mode == "abort":
                self._abort(list(self.engine.rows) + list(self.waiting))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await self._json_body(request)
        async with self.lock:
            self.paused = False
            if self._has_work():
                self.work.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        rid = body.get("rid")
        abort_all = body.get("abort_all", False)
        if not abort_all and not isinstance(rid, str):
            return _error(400, 'abort_request needs {"rid": "<prefix>"} or {"abort_all": true}')
        async with self.lock:
            pending = list(self.engine.rows) + list(self.waiting)
            if abort_all:
                targets = pending
            else:
                assert isinstance(rid, str)
                targets = [r for r in pending if r.rid.startswith(rid)]
            self._abort(targets)
        return web.Response(status=200)

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self._has_work():
            return web.Response(
                status=400, text="Cache not flushed: there are running or waiting requests.\n"
            )
        return web.Response(text="Cache flushed.\n")

    # ---- weight updates

    async def _update(
        self, request: web.Request, load: Callable[[dict[str, Any]], Awaitable[str]]
    ) -> web.Response:
        try:
            body = await self._json_body(request, allow_empty=False)
        except BadRequest as e:
            return _error(400, str(e))
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str | int):
            return _error(400, f"weight_version must be a string, got {version!r}")
        abort_all = bool(body.get("abort_all_requests", False))
        try:
            if not abort_all and not self.paused:
                # SGLang's rule: hold new requests, let the in-flight ones finish, then load.
                self.admit_open.clear()
                await self.idle.wait()
            async with self.lock:
                if abort_all:
                    # Partial outputs go back labelled with the old version, before the load.
                    self._abort(list(self.engine.rows) + list(self.waiting))
                try:
                    message = await load(body)
                except (ValueError, OSError, RuntimeError, KeyError, TypeError) as e:
                    log.warning("weight update failed: %s", e)
                    return web.json_response(
                        {"success": False, "message": f"Failed to update weights: {e}"}, status=400
                    )
                if version is not None:
                    self.engine.weight_version = str(version)
        finally:
            self.admit_open.set()
        log.info("weights updated (%s); version %s", message, self.engine.weight_version)
        return web.json_response(
            {
                "success": True,
                "message": f"Succeeded to update model weights. Weight version updated to "
                f"{self.engine.weight_version}.",
                "num_paused_requests": 0,
            }
        )

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        async def load(body: dict[str, Any]) -> str:
            path = body.get("model_path")
            if not isinstance(path, str) or not path:
                raise ValueError("model_path is missing")
            await self._in_executor(self.engine.load_from_disk, path)
            return f"from {path}"

        return await self._update(request, load)

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request, allow_empty=False)
            for key in ("master_address", "master_port", "rank_offset", "world_size"):
                if key not in body:
                    raise BadRequest(f"{key} is missing")
            backend = body.get("backend", "gloo")
            if backend != "gloo":
                raise BadRequest(
                    f"backend {backend!r} is not supported by the CPU server; use 'gloo'"
                )
        except BadRequest as e:
            return _error(400, str(e))
        name = str(body.get("group_name", "weights"))
        if name in self.groups:
            return web.json_response(
                {"success": False, "message": f"weight update group {name!r} already exists"},
                status=400,
            )

        def join() -> tuple[Any, Any]:
            timeout_s = float(body.get("timeout_s", 120))
            return join_weight_group(
                name,
                str(body["master_address"]),
                int(body["master_port"]),
                int(body["rank_offset"]),
                int(body["world_size"]),
                timeout_s,
            )

        try:
            self.groups[name] = await self._in_executor(join)
        except (RuntimeError, OSError, ValueError) as e:
            return web.json_response(
                {"success": False, "message": f"Failed to init group: {e}"}, status=400
            )
        return web.json_response(
            {"success": True, "message": "Succeeded to initialize custom process group."}
        )

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        async def load(body: dict[str, Any]) -> str:
            name = str(body.get("group_name", "weights"))
            if name not in self.groups:
                raise ValueError(
                    f"no weight update group {name!r}: call /init_weights_update_group"
                )
            names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
            if not (
                isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
            ):
                raise ValueError("names, dtypes and shapes must be lists")
            if not len(names) == len(dtypes) == len(shapes):
                raise ValueError("names, dtypes and shapes must have the same length")
            _, group = self.groups[name]
            await self._in_executor(self.engine.receive_weights, group, names, dtypes, shapes)
            return f"{len(names)} tensors from group {name}"

        return await self._update(request, load)

    # ---- information

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """SGLang's debugging endpoint: ``{"name", "truncate_size"}`` -> the first rows as lists."""
        try:
            body = await self._json_body(request, allow_empty=False)
        except BadRequest as e:
            return _error(400, str(e))
        name, size = body.get("name"), body.get("truncate_size", 100)
        params = dict(self.engine.model.named_parameters())
        if name not in params:
            return _error(400, f"no parameter named {name!r}")
        if not is_int(size) or size < 1:
            return _error(400, f"truncate_size must be a positive integer, got {size!r}")
        async with self.lock:
            value = params[name].detach()[:size].tolist()
        return web.json_response(value)

    async def model_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return web.json_response(
            {
                "model_path": self.engine.model_path,
                "tokenizer_path": None,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.engine.weight_version,
                "model_type": cfg.model_type,
                "architectures": list(cfg.architectures or []),
                "vocab_size": self.engine.vocab_size,
                "max_position_embeddings": self.engine.max_positions,
                "eos_token_ids": sorted(self.engine.eos_ids),
                # Not in SGLang's answer (CPU server only): busy_s / uptime_s = utilisation.
                "busy_s": round(self.busy_s, 6),
                "engine_steps": self.engine_steps,
                "requests": self.requests,
                "uptime_s": round(time.monotonic() - self.started, 6),
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.paused else 200)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.paused:
            return web.Response(status=200)
        loop = asyncio.get_running_loop()
        req = Req(
            rid="health-" + uuid.uuid4().hex,
            input_ids=[0],
            sampling=Sampling(max_new_tokens=1, temperature=0.0),
            return_logprob=False,
            generator=None,
            future=loop.create_future(),
        )
        self._enqueue(req)
        try:
            await asyncio.wait_for(asyncio.shield(req.future), timeout=20)
        except TimeoutError:
            return web.Response(status=503, text="generation did not finish within 20 s")
        return web.Response(status=200)

    # ---- app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """401 for an admin path without the admin key; 400 for a ``BadRequest`` anywhere."""
        if request.path in ADMIN_PATHS and not self._authorized(request):
            return _error(
                401, "Unauthorized: this endpoint needs Authorization: Bearer <admin key>"
            )
        try:
            return await handler(request)
        except BadRequest as e:
            return _error(400, str(e))

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``(method, path, handler)`` of every endpoint."""
        return [
            ("POST", "/generate", self.generate),
            ("POST", "/pause_generation", self.pause_generation),
            ("POST", "/continue_generation", self.continue_generation),
            ("POST", "/abort_request", self.abort_request),
            ("POST", "/flush_cache", self.flush_cache),
            ("GET", "/flush_cache", self.flush_cache),
            ("POST", "/update_weights_from_disk", self.update_weights_from_disk),
            ("POST", "/init_weights_update_group", self.init_weights_update_group),
            ("POST", "/update_weights_from_distributed", self.update_weights_from_distributed),
            ("GET", "/model_info", self.model_info),
            ("POST", "/get_weights_by_name", self.get_weights_by_name),
            ("GET", "/get_weights_by_name", self.get_weights_by_name),
            ("GET", "/get_model_info", self.model_info),
            ("GET", "/health", self.health),
            ("GET", "/health_generate", self.health_generate),
            ("GET", "/ready", self.ready),
        ]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024 * 1024)
        for method, path, handler in self.routes():
            app.router.add_route(method, path, handler)
        app.cleanup_ctx.append(self._run_scheduler)
        return app


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 30000,
    weight_version: str = "0",
    admin_api_key: str | None = None,
    max_batch: int = 64,
    threads: int = 1,
    seed: int = 0,
    dtype: str = "float32",
) -> None:
    """Load ``model`` (in ``dtype``: float32, or float64 for bit-tight checks) and serve it
    until SIGTERM/SIGINT (blocking)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.set_num_threads(threads)
    engine = Engine(model, weight_version, max_batch, dtype=dtype)
    server = CPUServer(engine, admin_api_key=admin_api_key, seed=seed, threads=threads)
    log.info(
        "serving %s (%s, vocab %d) on http://%s:%d, weight version %s",
        model,
        engine.config.model_type,
        engine.vocab_size,
        host,
        port,
        weight_version,
    )
    web.run_app(server.app(), host=host, port=port, print=None, access_log=None)
