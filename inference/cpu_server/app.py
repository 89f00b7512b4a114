"""The CPU reference server's HTTP app: SGLang's endpoints around one ``Engine``, and ``serve``.

``CPUServer`` wires the parts: the ``Scheduler`` (``inference/cpu_server/scheduler.py``: the
queue, the running batch, one lock), the ``Control`` endpoints
(``inference/cpu_server/control.py``: pause, abort, flush, weight updates, information) and
``/generate`` here, behind one middleware for the admin key and bad requests.

Invariants (tests/integration/test_cpu_server.py; over a fake engine,
tests/unit/inference/test_cpu_server_control.py):
- A bad request is answered 400 ``{"error": {"message": ...}}`` naming the problem and never
  reaches the model (``test_bad_requests_get_400_and_server_keeps_serving``); a failed model
  step answers its requests 500 and the server keeps serving (``scheduler.py``,
  ``test_failed_step_answers_500_and_keeps_serving``).
- With an admin key, every path of ``ADMIN_PATHS`` answers 401 without
  ``Authorization: Bearer <key>`` (``test_pause_abort_resume_and_update``,
  ``test_admin_paths_need_the_key_and_duplicate_rids_are_refused``;
  tests/integration/test_client_cpu_server.py::test_control_calls_need_the_admin_key).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable

import torch
from aiohttp import web

from inference.cpu_server.control import Control, error_response, json_body
from inference.cpu_server.engine import Engine, EngineFailure
from inference.cpu_server.sampling import BadRequest, Req, generate_response, parse_generate
from inference.cpu_server.scheduler import Scheduler

log = logging.getLogger("sluice.cpu_server")


class CannotListen(RuntimeError):
    """The server cannot listen on its host and port (in use, not an address of this
    machine, or not allowed); the message names them and what to do."""


def _listen_error(host: str, port: int, e: OSError) -> CannotListen:
    if e.errno == errno.EADDRINUSE:
        why = "is already in use: stop what listens there or pick another --port"
    elif e.errno == errno.EACCES:
        why = "is not allowed for this user: pick a --port above 1023"
    elif e.errno == errno.EADDRNOTAVAIL:
        why = "is not an address of this machine: pick another --host"
    else:
        why = f"cannot be listened on: {e.strerror or e}"
    return CannotListen(f"{host}:{port} {why}")


def check_can_listen(host: str, port: int) -> None:
    """``CannotListen`` now, before the model loads, when ``host:port`` cannot be bound (with
    SO_REUSEADDR, as the server binds it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CannotListen(f"--host {host!r} does not resolve: {e.strerror}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise _listen_error(host, port, e) from None


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
        "/update_weights_from_tensor",
        "/load_lora_adapter",
        "/load_lora_adapter_from_tensors",
        "/unload_lora_adapter",
    }
)


class CPUServer:
    """aiohttp app around one ``Engine``: ``/generate`` here, the control endpoints in
    ``Control``, both over one ``Scheduler``."""

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
        self.scheduler = Scheduler(engine, threads=threads)
        self.control = Control(self.scheduler)

    # ---- /generate

    async def generate(self, request: web.Request) -> web.Response:
        created = time.perf_counter()
        try:
            body = await json_body(request, allow_empty=False)
            parsed = parse_generate(
                body, vocab_size=self.engine.vocab_size, max_positions=self.engine.max_positions
            )
        except BadRequest as e:
            return error_response(400, str(e))
        if parsed.rid in self.scheduler.inflight:
            return error_response(400, f"Duplicate request ID: {parsed.rid}")
        if parsed.lora is not None:
            why = self.control.lora_refusal(parsed.lora)
            if why is not None:
                return error_response(400, why)
        self.scheduler.requests += 1
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
            lora=parsed.lora,
        )
        try:
            done = await self.scheduler.submit(req)
        except EngineFailure as e:
            return error_response(500, str(e))
        return web.json_response(generate_response(done))

    # ---- app

    def _authorized(self, request: web.Request) -> bool:
        if not self.admin_api_key:
            return True
        return request.headers.get("Authorization", "") == f"Bearer {self.admin_api_key}"

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """401 for an admin path without the admin key; 400 for a ``BadRequest`` anywhere."""
        if request.path in ADMIN_PATHS and not self._authorized(request):
            return error_response(
                401, "Unauthorized: this endpoint needs Authorization: Bearer <admin key>"
            )
        try:
            return await handler(request)
        except BadRequest as e:
            return error_response(400, str(e))

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``(method, path, handler)`` of every endpoint."""
        c = self.control
        return [
            ("POST", "/generate", self.generate),
            ("POST", "/pause_generation", c.pause_generation),
            ("POST", "/continue_generation", c.continue_generation),
            ("POST", "/abort_request", c.abort_request),
            ("POST", "/flush_cache", c.flush_cache),
            ("GET", "/flush_cache", c.flush_cache),
            ("POST", "/update_weights_from_disk", c.update_weights_from_disk),
            ("POST", "/init_weights_update_group", c.init_weights_update_group),
            ("POST", "/update_weights_from_distributed", c.update_weights_from_distributed),
            ("POST", "/update_weights_from_tensor", c.update_weights_from_tensor),
            ("POST", "/load_lora_adapter", c.load_lora_adapter),
            ("POST", "/load_lora_adapter_from_tensors", c.load_lora_adapter_from_tensors),
            ("POST", "/unload_lora_adapter", c.unload_lora_adapter),
            ("GET", "/model_info", c.model_info),
            ("POST", "/get_weights_by_name", c.get_weights_by_name),
            ("GET", "/get_weights_by_name", c.get_weights_by_name),
            ("GET", "/get_model_info", c.model_info),
            ("GET", "/health", c.health),
            ("GET", "/health_generate", c.health_generate),
            ("GET", "/ready", c.ready),
        ]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024 * 1024)
        for method, path, handler in self.routes():
            app.router.add_route(method, path, handler)
        app.cleanup_ctx.append(self.scheduler.run)
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
    max_lora_rank: int | None = None,
    lora_target_modules: list[str] | None = None,
) -> None:
    """Load ``model`` (in ``dtype``: float32, or float64 for bit-tight checks) and serve it
    until SIGTERM/SIGINT (blocking)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    check_can_listen(host, port)
    torch.set_num_threads(threads)
    engine = Engine(model, weight_version, max_batch, dtype=dtype)
    if max_lora_rank is not None:
        engine.enable_lora(max_lora_rank, lora_target_modules)
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
    try:
        web.run_app(server.app(), host=host, port=port, print=None, access_log=None)
    except OSError as e:  # taken between the check and the bind
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise _listen_error(host, port, e) from None
        raise
