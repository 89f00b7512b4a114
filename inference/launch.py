"""Start inference servers as child processes and wait until they serve.

One command-line builder per engine, used by every launcher, the demo, the benchmarks and the
tests: ``sglang_command`` (``python -m sglang.launch_server --skip-tokenizer-init ...``) and
``cpu_server_command`` (``python -m sluice serve ...``, the CPU reference server).
``launch_sglang`` runs the first on one GPU (or ``tp_size`` GPUs), ``launch_cpu_server`` the
second. Both return a ``ServerHandle`` once ``GET /health`` answers 200, and raise
``ServerStartError`` carrying the tail of the server's log when it exits or is not healthy in
time. ``choose_engine`` picks between them.

Invariants (tests/integration/test_launch.py; the process rules are ``procs``'s):
- Every server is started with ``new_session=True`` (its own process group, so a Ctrl-C in the
  launching terminal does not reach it) and is stopped by its own pid: SIGTERM, then SIGKILL
  after a grace period. Children it left behind (SGLang's scheduler and detokenizer) are then
  killed through the process group *it* leads, while its exited process is still unreaped, so
  that group id cannot belong to anyone else. Nothing is looked up by name.
- A handle never outlives a silent failure: ``alive()`` does not reap, so ``stop()`` and
  ``kill()`` work whatever was called before.
- The admin key is masked (``***``) in the command line written to the server's log.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from inference.lora import lora_server_args
from procs import (
    NotHealthy,
    ProcessExited,
    alive,
    free_port,
    kill_pid,
    log_tail,
    spawn,
    stop_pids,
    wait_http_ok,
)

if TYPE_CHECKING:
    from inference.client import SGLangClient

log = logging.getLogger(__name__)

Engine = Literal["sglang", "cpu"]
ENGINES: tuple[str, ...] = ("auto", "sglang", "cpu")
SGLANG_INSTALL_HINT = "pip install 'sluice[sglang]'"


class ServerStartError(RuntimeError):
    """A server exited during start-up or was not healthy in time; the message ends with the
    tail of its log."""


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here (SGLang not installed, or no CUDA)."""


def sglang_installed() -> bool:
    return importlib.util.find_spec("sglang") is not None


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose_engine(engine: str = "auto") -> Engine:
    """``"auto"``: ``"sglang"`` when SGLang is importable and CUDA is available, else ``"cpu"``.
    ``"sglang"`` without SGLang or CUDA raises ``EngineUnavailable`` saying what is missing."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "cpu":
        return "cpu"
    have_sglang = sglang_installed()
    if engine == "auto":
        return "sglang" if have_sglang and cuda_available() else "cpu"
    if not have_sglang:
        raise EngineUnavailable(
            f"engine 'sglang' needs SGLang, which is not installed: {SGLANG_INSTALL_HINT} "
            "on a CUDA machine, or use --engine cpu (inference.engine=cpu; 'auto' picks cpu "
            "here)"
        )
    if not cuda_available():
        raise EngineUnavailable(
            "engine 'sglang' needs a CUDA GPU and torch.cuda.is_available() is False: use "
            "--engine cpu (inference.engine=cpu; 'auto' picks cpu here)"
        )
    return "sglang"


def model_vocab_size(model_path: str | Path) -> int | None:
    """``vocab_size`` from ``model_path/config.json`` (the embedding's row count, which is what
    an out-of-range id overflows), or None when there is no readable local config."""
    cfg = Path(model_path) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    v = data.get("vocab_size")
    if v is None and isinstance(data.get("text_config"), dict):
        v = data["text_config"].get("vocab_size")
    return v if isinstance(v, int) and v > 0 else None


@dataclass
class ServerHandle:
    """A started server: where it listens, its pid and log, and how to stop it."""

    url: str
    pid: int
    port: int
    log_path: Path
    engine: Engine
    model_path: str
    weight_version: int
    vocab_size: int | None
    admin_api_key: str | None = field(default=None, repr=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        """True while the process runs (does not reap it)."""
        return self.proc is not None and alive(self.proc)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server, SIGKILL it after ``timeout`` s; return its exit code (None if
        already stopped)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if stop_pids([proc], timeout, kill_wait=timeout):
            log.warning("server pid %d ignored SIGTERM for %.0fs: SIGKILL", self.pid, timeout)
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the server (as a crash would) and what it started."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        return kill_pid(proc, 30.0)

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)

    def client(self, **kwargs: Any) -> SGLangClient:
        """An ``SGLangClient`` for this server (vocab size and admin key filled in)."""
        from inference.client import SGLangClient

        kwargs.setdefault("vocab_size", self.vocab_size)
        kwargs.setdefault("admin_api_key", self.admin_api_key)
        return SGLangClient(self.url, **kwargs)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _log_file(log_path: str | Path | None, engine: str, port: int) -> Path:
    if log_path is not None:
        p = Path(log_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    fd, name = tempfile.mkstemp(prefix=f"sluice-{engine}-{port}-", suffix=".log")
    os.close(fd)
    return Path(name)


def _start(
    args: list[str],
    *,
    engine: Engine,
    host: str,
    port: int,
    model_path: str,
    weight_version: int,
    vocab_size: int | None,
    admin_api_key: str | None,
    log_path: Path,
    env: dict[str, str],
    timeout: float,
) -> ServerHandle:
    shown = " ".join(a if a != admin_api_key else "***" for a in args)
    proc = spawn(args, log_path, env=env, new_session=True, header=f"$ {shown}")
    handle = ServerHandle(
        url=f"http://{host}:{port}",
        pid=proc.pid,
        port=port,
        log_path=log_path,
        engine=engine,
        model_path=model_path,
        weight_version=weight_version,
        vocab_size=vocab_size,
        admin_api_key=admin_api_key,
        proc=proc,
    )
    log.info("started %s server pid %d on %s (log %s)", engine, proc.pid, handle.url, log_path)
    try:
        wait_http_ok(handle.url + "/health", proc, timeout, log_path, interval=0.2)
    except ProcessExited as e:
        handle.proc = None  # reaped by wait_http_ok
        raise ServerStartError(
            f"{engine} server ({model_path}) exited with code {e.returncode} during start-up; "
            f"log {log_path}, last lines:\n{log_tail(log_path)}"
        ) from None
    except NotHealthy:
        handle.stop(timeout=10.0)
        raise ServerStartError(
            f"{engine} server ({model_path}) not healthy on {handle.url} within "
            f"{timeout:.0f}s; stopped it. Log {log_path}, last lines:\n{log_tail(log_path)}"
        ) from None
    except BaseException:
        handle.kill()  # KeyboardInterrupt or anything else: never leave it running
        raise
    return handle


def _check_common(weight_version: int, timeout: float) -> None:
    if (
        isinstance(weight_version, bool)
        or not isinstance(weight_version, int)
        or weight_version < 0
    ):
        raise ValueError(f"weight_version must be an int >= 0, got {weight_version!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")


def sglang_command(
    model_path: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    weight_version: int = 0,
    tp_size: int = 1,
    mem_fraction: float | None = None,
    deterministic: bool = False,
    admin_api_key: str | None = None,
    extra_args: Sequence[str] = (),
    lora_rank: int = 0,
    lora_target_modules: Sequence[str] = ("all-linear",),
) -> list[str]:
    """The SGLang server command line sluice uses everywhere: token ids in and out
    (``--skip-tokenizer-init``) and an explicit ``--weight-version``. ``lora_rank > 0``
    (``trainer.lora``) adds ``--enable-lora --max-lora-rank R --lora-target-modules ...``
    (``inference.lora.lora_server_args``)."""
    args = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        "--skip-tokenizer-init",
        "--weight-version", str(weight_version),
        "--host", host,
        "--port", str(port),
        "--tp-size", str(tp_size),
    ]  # fmt: skip
    if mem_fraction is not None:
        args += ["--mem-fraction-static", str(mem_fraction)]
    if deterministic:
        args += ["--enable-deterministic-inference"]
    if admin_api_key:
        args += ["--admin-api-key", admin_api_key]
    if lora_rank > 0:
        args += lora_server_args(lora_rank, list(lora_target_modules))
    return args + list(extra_args)


def cpu_server_command(
    model_path: str | Path | None,
    port: int,
    *,
    host: str = "127.0.0.1",
    config_path: str | Path | None = None,
    weight_version: int | None = None,
    threads: int | None = None,
    admin_api_key: str | None = None,
    extra_args: Sequence[str] = (),
    lora_rank: int = 0,
    lora_target_modules: Sequence[str] = ("all-linear",),
) -> list[str]:
    """The CPU reference server's command line (``python -m sluice serve``) sluice uses
    everywhere. ``config_path`` reads the model, threads, admin key and seed from a run config
    (explicit flags win; with ``trainer.lora`` it serves adapters); a setting left None is the
    server's (its default or the config's). ``lora_rank > 0``: SGLang's LoRA flags."""
    args = [sys.executable, "-m", "sluice", "serve"]
    if config_path is not None:
        args += ["--config", str(config_path)]
    if model_path is not None:
        args += ["--model", str(model_path)]
    args += ["--host", host, "--port", str(port)]
    if weight_version is not None:
        args += ["--weight-version", str(weight_version)]
    if threads is not None:
        args += ["--threads", str(threads)]
    if admin_api_key:
        args += ["--admin-api-key", admin_api_key]
    if lora_rank > 0:
        args += lora_server_args(lora_rank, list(lora_target_modules))
    return args + list(extra_args)


def _cuda_devices(gpu: int | str | Sequence[int], tp_size: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for ``gpu``: an int is the first of ``tp_size`` GPUs."""
    if isinstance(gpu, int):
        devices = ",".join(str(gpu + i) for i in range(tp_size))
    elif isinstance(gpu, str):
        devices = gpu
    else:
        devices = ",".join(str(int(g)) for g in gpu)
    if len(devices.split(",")) < tp_size:
        raise ValueError(
            f"tp_size {tp_size} needs as many GPUs, got CUDA_VISIBLE_DEVICES={devices}"
        )
    return devices


def launch_sglang(
    model_path: str | Path,
    port: int | None = None,
    gpu: int | str | Sequence[int] = 0,
    *,
    weight_version: int = 0,
    mem_fraction: float | None = None,
    tp_size: int = 1,
    deterministic: bool = False,
    admin_api_key: str | None = None,
    extra_args: Sequence[str] = (),
    log_path: str | Path | None = None,
    timeout: float = 600,
    host: str = "127.0.0.1",
    lora_rank: int = 0,
    lora_target_modules: Sequence[str] = ("all-linear",),
) -> ServerHandle:
    """Start SGLang on ``gpu`` (``CUDA_VISIBLE_DEVICES``; with ``tp_size > 1`` an int means
    GPUs ``gpu .. gpu + tp_size - 1``) and wait for ``/health``.

    Always ``--skip-tokenizer-init`` (token in, token out) and ``--weight-version``. The admin
    key is passed on SGLang's command line (as SGLang requires), so it is visible to local
    users in the process list; it is masked in the log.
    """
    if not sglang_installed():
        raise EngineUnavailable(f"SGLang is not installed: {SGLANG_INSTALL_HINT}")
    _check_common(weight_version, timeout)
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if mem_fraction is not None and not (0.0 < mem_fraction < 1.0):
        raise ValueError(f"mem_fraction must be in (0, 1), got {mem_fraction}")
    devices = _cuda_devices(gpu, tp_size)
    port = port or free_port(host)
    model = str(model_path)
    args = sglang_command(
        model,
        port,
        host=host,
        weight_version=weight_version,
        tp_size=tp_size,
        mem_fraction=mem_fraction,
        deterministic=deterministic,
        admin_api_key=admin_api_key,
        extra_args=extra_args,
        lora_rank=lora_rank,
        lora_target_modules=lora_target_modules,
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices, PYTHONUNBUFFERED="1")
    return _start(
        args,
        engine="sglang",
        host=host,
        port=port,
        model_path=model,
        weight_version=weight_version,
        vocab_size=model_vocab_size(model),
        admin_api_key=admin_api_key,
        log_path=_log_file(log_path, "sglang", port),
        env=env,
        timeout=timeout,
    )


def launch_cpu_server(
    model_path: str | Path,
    port: int | None = None,
    *,
    weight_version: int = 0,
    threads: int = 1,
    admin_api_key: str | None = None,
    log_path: str | Path | None = None,
    timeout: float = 120,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    lora_rank: int = 0,
    lora_target_modules: Sequence[str] = ("all-linear",),
) -> ServerHandle:
    """Start the CPU reference server (``python -m sluice serve``) and wait for ``/health``.
    ``threads`` is its torch thread count (also ``OMP_NUM_THREADS``)."""
    _check_common(weight_version, timeout)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    port = port or free_port(host)
    model = str(model_path)
    args = cpu_server_command(
        model,
        port,
        host=host,
        weight_version=weight_version,
        threads=threads,
        admin_api_key=admin_api_key,
        extra_args=extra_args,
        lora_rank=lora_rank,
        lora_target_modules=lora_target_modules,
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return _start(
        args,
        engine="cpu",
        host=host,
        port=port,
        model_path=model,
        weight_version=weight_version,
        vocab_size=model_vocab_size(model),
        admin_api_key=admin_api_key,
        log_path=_log_file(log_path, "cpu", port),
        env=env,
        timeout=timeout,
    )


def launch_server(
    engine: str, model_path: str | Path, port: int | None = None, **kwargs: Any
) -> ServerHandle:
    """``launch_sglang`` or ``launch_cpu_server`` by ``choose_engine(engine)``; ``kwargs`` must
    suit the chosen launcher."""
    chosen = choose_engine(engine)
    if chosen == "sglang":
        return launch_sglang(model_path, port, **kwargs)
    return launch_cpu_server(model_path, port, **kwargs)
