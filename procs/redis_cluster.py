"""A private Redis Cluster for tests and the demo: ``masters`` primaries with ``replicas`` each,
every node a ``redis-server --cluster-enabled yes`` on a free loopback port, joined with
``redis-cli --cluster create``. Each node is started and stopped by its own pid."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from procs.process import free_port, kill_pid, log_tail, spawn, stop_pid


def _ask(port: int, command: bytes, timeout: float = 0.5) -> bytes:
    """One inline command to the node on ``port``; its raw reply (b'' when unreachable)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(command + b"\r\n")
            data = b""
            s.settimeout(timeout)
            while True:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                data += chunk
                if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                    break
                if data.startswith(b"$") and data.count(b"\r\n") >= 2:
                    break
            return data
    except OSError:
        return b""


class RedisCluster:
    """A local Redis Cluster. ``url`` is the ``redis+cluster://`` URL of its nodes.

    ``node_timeout_ms`` is ``cluster-node-timeout``: a master silent this long is failed over
    to its replica. AOF with ``appendfsync always`` on every node (``appendonly``), as the
    single-server fixture, so what a node acknowledged survives its own restart."""

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 1,
        directory: str | Path | None = None,
        node_timeout_ms: int = 1000,
        appendonly: bool = True,
    ) -> None:
        for exe in ("redis-server", "redis-cli"):
            if shutil.which(exe) is None:
                raise FileNotFoundError(f"{exe} not found on PATH: install Redis >= 6.2")
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="sluice-cluster-"))
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        # The cluster bus ports, chosen too (the default, port + 10000, may be taken or above
        # 65535).
        self.bus_ports = {p: free_port() for p in self.ports}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _start_node(self, port: int) -> None:
        d = self.directory / str(port)
        d.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(d),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_ports[port]),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(d / "redis.log"),
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.procs[port] = spawn(args, d / "redis.log", new_session=True)

    def _wait_node(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[port]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server (cluster node {port}) exited with {proc.returncode}:\n"
                    + log_tail(self.directory / str(port) / "redis.log")
                )
            if _ask(port, b"PING").startswith(b"+PONG"):
                return
            time.sleep(0.02)
        raise TimeoutError(f"cluster node {port} did not answer within {timeout}s")

    def start(self, timeout: float = 30.0) -> RedisCluster:
        """Start every node and join them; on any failure stop what was started (by pid)."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> RedisCluster:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait_node(port, timeout)
        create = [
            "redis-cli",
            "--cluster", "create",
            *(f"127.0.0.1:{p}" for p in self.ports),
            "--cluster-replicas", str(self.replicas),
            "--cluster-yes",
        ]  # fmt: skip
        out = subprocess.run(
            create,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        self.wait_ok(timeout)
        return self

    def cluster_ok(self) -> bool:
        """Every live node reports ``cluster_state:ok`` and sees every slot assigned."""
        live = [p for p in self.ports if self.alive(p)]
        for port in live:
            info = _ask(port, b"CLUSTER INFO")
            if b"cluster_state:ok" not in info or b"cluster_slots_ok:16384" not in info:
                return False
        return bool(live)

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cluster_ok() and len(self.master_ports()) == self.masters:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the cluster did not reach cluster_state:ok within {timeout}s")

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def role(self, port: int) -> str | None:
        """``master`` or ``slave`` (Redis's words), None when the node does not answer."""
        info = _ask(port, b"INFO replication")
        for line in info.decode(errors="replace").splitlines():
            if line.startswith("role:"):
                return line.split(":", 1)[1].strip()
        return None

    def master_ports(self) -> list[int]:
        return [p for p in self.ports if self.alive(p) and self.role(p) == "master"]

    proc = None
    """No single process: a harness that watches ``proc`` for an unexpected exit has none."""

    def keyslot(self, key: str) -> int:
        """The hash slot of ``key`` (asked of a live node: CLUSTER KEYSLOT)."""
        for port in self.ports:
            if self.alive(port):
                reply = _ask(port, b"CLUSTER KEYSLOT " + key.encode())
                if reply.startswith(b":"):
                    return int(reply[1:].strip())
        raise RuntimeError("no live cluster node answered CLUSTER KEYSLOT")

    def master_of_slot(self, slot: int) -> int | None:
        """The port of the live master that serves ``slot`` (each master's own line of CLUSTER
        NODES lists its slot ranges)."""
        for port in self.master_ports():
            nodes = _ask(port, b"CLUSTER NODES").decode(errors="replace")
            for line in nodes.splitlines():
                f = line.split()
                if len(f) < 8 or "myself" not in f[2] or "master" not in f[2]:
                    continue
                for rng in f[8:]:
                    if rng.startswith("["):
                        continue
                    lo, _, hi = rng.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return port
        return None

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash would."""
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            kill_pid(proc, timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_pid(proc)
        self.procs.clear()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
