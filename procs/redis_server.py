"""A private ``redis-server`` for tests, the demo and the benchmarks, started and stopped by
its own pid."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from procs.process import free_port, kill_pid, log_tail, spawn, stop_pid


class RedisServer:
    """A private ``redis-server`` on a free loopback port in its own directory.

    No persistence unless ``appendonly`` (AOF with ``appendfsync always``), so a restart after
    SIGKILL finds every acknowledged write. Stopped by its own pid.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        directory: str | Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
        executable: str = "redis-server",
    ) -> None:
        exe = shutil.which(executable)
        if exe is None:
            raise FileNotFoundError(
                "redis-server not found on PATH: install Redis >= 6.2 (`make setup` does it with apt)"
            )
        self.executable = exe
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="sluice-redis-"))
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            "--protected-mode",
            "yes",
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        # Own session: a Ctrl-C in the terminal must not kill Redis under processes that are
        # still checkpointing; whoever started it stops it by pid. What it prints before its
        # own log is open (a bad option) lands in that log too.
        self.proc = spawn(args, self.directory / "redis.log", new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}:\n"
                    + log_tail(self.directory / "redis.log")
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")) and self._loaded():
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def _loaded(self) -> bool:
        # While loading an AOF, Redis answers -LOADING to commands; PING passes, so check INFO.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"INFO persistence\r\n")
                data = s.recv(4096)
            return b"loading:0" in data
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            kill_pid(self.proc, timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def restart(self, *, crash: bool = False) -> RedisServer:
        """Stop (or SIGKILL when ``crash``) and start again on the same port and directory."""
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
