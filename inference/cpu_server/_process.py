"""Temporary: CPUServerProcess until its callers use inference.launch.launch_cpu_server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# --------------------------------------------------------------------------------------------
# A server process started by pid (tests, benchmarks)


class CPUServerProcess:
    """``sluice serve`` as a child process on ``port``; stopped by its own pid."""

    def __init__(
        self,
        model: str | Path,
        *,
        port: int,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.model, self.port, self.host = str(model), port, host
        self.extra_args = extra_args or []
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> CPUServerProcess:
        import urllib.error
        import urllib.request

        args = [sys.executable, "-m", "sluice", "serve", "--model", self.model]
        args += ["--host", self.host, "--port", str(self.port), *self.extra_args]
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
                raise RuntimeError(f"sluice serve exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"CPU server on {self.url} not healthy within {timeout}s")

    def stop(self) -> None:
        from procs import stop_pid

        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def __enter__(self) -> CPUServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
