"""The CPU reference server's control endpoints: pause, continue, abort, flush, the three weight
updates, and the information endpoints (``model_info``, ``get_weights_by_name``, health).

Each handler works on one ``Scheduler`` (``inference/cpu_server/scheduler.py``): every change
of the batch, the pause flag or the weights happens under its lock, between two engine steps.

Invariants (tests/integration/test_cpu_server.py with a model; the same rules over a fake
engine in tests/unit/inference/test_cpu_server_control.py):
- A request aborted by ``update_weights_from_disk(abort_all_requests=true)`` returns before
  the load and reports the old version; later tokens carry the new one
  (``test_pause_abort_resume_and_update``;
  ``test_update_with_abort_all_returns_partial_with_old_version``).
- Without ``abort_all_requests`` (and not paused), a weight update holds new requests, lets
  the in-flight ones finish, then loads, as SGLang does
  (``test_update_waits_for_inflight_and_holds_new_requests``); a failed load answers
  ``{"success": false}`` 400 and keeps the old weights and version
  (``test_pause_abort_resume_and_update``, ``test_failed_load_answers_400_and_keeps_the_version``).
- No prefix cache: ``flush_cache`` is a no-op when idle, 400 while requests are pending
  (``test_flush_cache_refused_while_requests_are_pending``). A weight update during an
  ``in_place`` pause keeps the running rows' old-weight KV (as SGLang does); their later
  tokens carry the new version (``test_pause_abort_resume_and_update``).
- Distributed updates join a gloo group once per ``group_name`` and load each broadcast bucket
  into the running model (``test_distributed_update_matches_sender``).
- ``update_weights_from_tensor`` loads a bucket handed over in shared memory by another
  process on this host, with the same abort / hold / label rules as the other updates
  (tests/integration/test_ipc_weight_sync.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from inference.cpu_server.engine import join_weight_group
from inference.cpu_server.sampling import BadRequest, Req, Sampling, is_int, parse_json_object
from inference.cpu_server.scheduler import Scheduler

log = logging.getLogger("sluice.cpu_server")

Load = Callable[[dict[str, Any]], Awaitable[str]]


def error_response(status: int, message: str) -> web.Response:
    """SGLang's error answer: ``{"error": {"message": ...}}`` with ``status``."""
    return web.json_response({"error": {"message": message}}, status=status)


async def json_body(request: web.Request, *, allow_empty: bool = True) -> dict[str, Any]:
    """The request's JSON object (``BadRequest`` when it is not one)."""
    return parse_json_object(await request.read(), allow_empty=allow_empty)


def _failure(message: str) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=400)


class Control:
    """SGLang's control and information endpoints over one ``Scheduler``.

    ``groups``: the weight-update process groups joined so far, by ``group_name``.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.groups: dict[str, Any] = {}
        self.unloading: set[str] = set()
        """Adapters being unloaded: new requests naming them are refused."""

    # ---- generation control

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        mode = body.get("mode", "abort")
        if mode == "retract":
            return error_response(
                400,
                "pause mode 'retract' is not supported by the CPU server; use 'abort' or 'in_place'",
            )
        if mode not in ("abort", "in_place"):
            return error_response(
                400, f"unknown pause mode {mode!r}; expected 'abort' or 'in_place'"
            )
        sched = self.scheduler
        async with sched.lock:
            sched.paused = True
            if mode == "abort":
                sched.abort(sched.pending())
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await json_body(request)
        sched = self.scheduler
        async with sched.lock:
            sched.paused = False
            if sched.has_work():
                sched.work.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        rid = body.get("rid")
        abort_all = body.get("abort_all", False)
        if not abort_all and not isinstance(rid, str):
            return error_response(
                400, 'abort_request needs {"rid": "<prefix>"} or {"abort_all": true}'
            )
        sched = self.scheduler
        async with sched.lock:
            pending = sched.pending()
            if abort_all:
                targets = pending
            else:
                assert isinstance(rid, str)
                targets = [r for r in pending if r.rid.startswith(rid)]
            sched.abort(targets)
        return web.Response(status=200)

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self.scheduler.has_work():
            return web.Response(
                status=400, text="Cache not flushed: there are running or waiting requests.\n"
            )
        return web.Response(text="Cache flushed.\n")

    # ---- weight updates

    async def _update(self, request: web.Request, load: Load) -> web.Response:
        """Apply ``load(body)`` between two steps, then set the body's ``weight_version``."""
        try:
            body = await json_body(request, allow_empty=False)
        except BadRequest as e:
            return error_response(400, str(e))
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str | int):
            return error_response(400, f"weight_version must be a string, got {version!r}")
        abort_all = bool(body.get("abort_all_requests", False))
        sched = self.scheduler
        try:
            if not abort_all and not sched.paused:
                # SGLang's rule: hold new requests, let the in-flight ones finish, then load.
                sched.admit_open.clear()
                await sched.idle.wait()
            async with sched.lock:
                if abort_all:
                    # Partial outputs go back labelled with the old version, before the load.
                    sched.abort(sched.pending())
                try:
                    message = await load(body)
                except (ValueError, OSError, RuntimeError, KeyError, TypeError) as e:
                    log.warning("weight update failed: %s", e)
                    return _failure(f"Failed to update weights: {e}")
                if version is not None:
                    self.engine.weight_version = str(version)
        finally:
            sched.admit_open.set()
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
            await self.scheduler.in_executor(self.engine.load_from_disk, path)
            return f"from {path}"

        return await self._update(request, load)

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request, allow_empty=False)
            _check_group_request(body)
        except BadRequest as e:
            return error_response(400, str(e))
        name = str(body.get("group_name", "weights"))
        if name in self.groups:
            return _failure(f"weight update group {name!r} already exists")

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
            self.groups[name] = await self.scheduler.in_executor(join)
        except (RuntimeError, OSError, ValueError) as e:
            return _failure(f"Failed to init group: {e}")
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
            await self.scheduler.in_executor(
                self.engine.receive_weights, group, names, dtypes, shapes
            )
            return f"{len(names)} tensors from group {name}"

        return await self._update(request, load)

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        """SGLang's in-process handover: ``serialized_named_tensors`` (one base64 pickle per TP
        rank; the CPU server has one), ``load_format`` null (a list of ``(name, tensor)``)."""

        async def load(body: dict[str, Any]) -> str:
            fmt = body.get("load_format")
            if fmt is not None:
                raise ValueError(
                    f"load_format {fmt!r} is not supported by the CPU server; send null "
                    "(a list of (name, tensor))"
                )
            payloads = body.get("serialized_named_tensors")
            if not (isinstance(payloads, list) and len(payloads) == 1 and payloads[0]):
                raise ValueError(
                    "serialized_named_tensors must be a list of one base64 string (the CPU "
                    "server has one TP rank)"
                )
            n = await self.scheduler.in_executor(self.engine.load_tensors, str(payloads[0]))
            return f"{n} tensors handed over in memory"

        return await self._update(request, load)

    # ---- LoRA adapters (SGLang's LoRAUpdateOutput: success, error_message, loaded_adapters)

    def lora_refusal(self, name: str) -> str | None:
        """Why a request naming the adapter ``name`` cannot run (None: it can)."""
        lora = self.engine.lora
        if lora is None:
            return "LoRA is not enabled on this server: start it with --enable-lora"
        if name not in lora.adapters or name in self.unloading:
            return f"LoRA adapter {name!r} is not loaded (loaded: {sorted(lora.adapters)})"
        return None

    def _lora_answer(self, error: str | None) -> web.Response:
        lora = self.engine.lora
        body = {
            "success": error is None,
            "error_message": error,
            "loaded_adapters": lora.loaded() if lora is not None else {},
        }
        return web.json_response(body, status=200 if error is None else 400)

    async def _load_lora(
        self,
        request: web.Request,
        read: Callable[[dict[str, Any]], Any],
        path: Callable[[dict[str, Any]], str],
    ) -> web.Response:
        from inference.cpu_server.lora import LoraRefused

        body = await json_body(request, allow_empty=False)
        lora = self.engine.lora
        if lora is None:
            return self._lora_answer(
                "LoRA is not enabled on this server: start it with --enable-lora"
            )
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            return self._lora_answer(f"lora_name must be a non-empty string, got {name!r}")
        try:
            config, tensors = await asyncio.to_thread(read, body)
            async with self.scheduler.lock:  # between two engine steps
                lora.load(name, path(body), config, tensors)
        except (LoraRefused, ValueError, OSError, KeyError, TypeError) as e:
            log.warning("LoRA adapter %s not loaded: %s", name, e)
            return self._lora_answer(f"Failed to load LoRA adapter {name}: {e}")
        log.info("LoRA adapter %s loaded from %s", name, path(body))
        return self._lora_answer(None)

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """``{"lora_name", "lora_path", "pinned"}``: a PEFT adapter directory."""
        from inference.cpu_server.lora import adapter_from_files

        def read(body: dict[str, Any]) -> Any:
            p = body.get("lora_path")
            if not isinstance(p, str) or not p:
                raise ValueError(f"lora_path must be a directory, got {p!r}")
            return adapter_from_files(p)

        return await self._load_lora(request, read, lambda body: str(body["lora_path"]))

    async def load_lora_adapter_from_tensors(self, request: web.Request) -> web.Response:
        """``{"lora_name", "config_dict", "serialized_named_tensors": [B64 per TP rank]}``
        (newer SGLang) or ``"serialized_tensors": B64`` (older): a hand-over payload of
        ``[(name, tensor)]`` in PEFT's names, read as ``/update_weights_from_tensor``'s."""
        from inference.cpu_server.engine import unpickle_named_tensors

        def read(body: dict[str, Any]) -> Any:
            config = body.get("config_dict")
            if not isinstance(config, dict):
                raise ValueError("config_dict must be the adapter's adapter_config.json object")
            if body.get("load_format") not in (None, "default"):
                raise ValueError(f"load_format {body.get('load_format')!r} is not supported")
            payloads = body.get("serialized_named_tensors")
            if payloads is None and isinstance(body.get("serialized_tensors"), str):
                payloads = [body["serialized_tensors"]]
            if not (isinstance(payloads, list) and len(payloads) == 1 and payloads[0]):
                raise ValueError(
                    "serialized_named_tensors must be a list of one base64 string (the CPU "
                    "server has one TP rank)"
                )
            return config, unpickle_named_tensors(str(payloads[0]))

        return await self._load_lora(request, read, lambda body: "__tensor__")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """``{"lora_name"}``: new requests naming it are refused at once; it is dropped once
        no running or waiting request uses it (as SGLang waits for them)."""
        from inference.cpu_server.lora import LoraRefused

        body = await json_body(request, allow_empty=False)
        lora = self.engine.lora
        if lora is None:
            return self._lora_answer(
                "LoRA is not enabled on this server: start it with --enable-lora"
            )
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in lora.adapters or name in self.unloading:
            return self._lora_answer(f"LoRA adapter {name!r} is not loaded")
        sched = self.scheduler
        self.unloading.add(name)
        try:
            while True:
                async with sched.lock:
                    if not any(r.lora == name for r in sched.inflight.values()):
                        lora.unload(name)
                        break
                await asyncio.sleep(0.005)
        except LoraRefused as e:
            return self._lora_answer(str(e))
        finally:
            self.unloading.discard(name)
        log.info("LoRA adapter %s unloaded", name)
        return self._lora_answer(None)

    # ---- information

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """SGLang's debugging endpoint: ``{"name", "truncate_size"}`` -> the first rows as lists."""
        try:
            body = await json_body(request, allow_empty=False)
        except BadRequest as e:
            return error_response(400, str(e))
        name, size = body.get("name"), body.get("truncate_size", 100)
        params = dict(self.engine.model.named_parameters())
        if name not in params:
            return error_response(400, f"no parameter named {name!r}")
        if not is_int(size) or size < 1:
            return error_response(400, f"truncate_size must be a positive integer, got {size!r}")
        async with self.scheduler.lock:
            value = params[name].detach()[:size].tolist()
        return web.json_response(value)

    async def model_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        sched = self.scheduler
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
                "busy_s": round(sched.busy_s, 6),
                "engine_steps": sched.engine_steps,
                "requests": sched.requests,
                "uptime_s": round(time.monotonic() - sched.started, 6),
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.scheduler.paused else 200)

    async def health_generate(self, request: web.Request) -> web.Response:
        """200 once a one-token generation finished (or while paused); 503 after 20 s."""
        if self.scheduler.paused:
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
        self.scheduler.enqueue(req)
        try:
            await asyncio.wait_for(asyncio.shield(req.future), timeout=20)
        except TimeoutError:
            return web.Response(status=503, text="generation did not finish within 20 s")
        return web.Response(status=200)


def _check_group_request(body: dict[str, Any]) -> None:
    """``BadRequest`` for an ``/init_weights_update_group`` body the CPU server cannot join."""
    for key in ("master_address", "master_port", "rank_offset", "world_size"):
        if key not in body:
            raise BadRequest(f"{key} is missing")
    backend = body.get("backend", "gloo")
    if backend != "gloo":
        raise BadRequest(f"backend {backend!r} is not supported by the CPU server; use 'gloo'")
