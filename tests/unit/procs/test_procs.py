"""procs: spawn, wait for /health, stop and kill by pid (tiny Python processes, no project
code)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from procs import (
    NotHealthy,
    ProcessExited,
    alive,
    free_port,
    kill_pid,
    pid_alive,
    spawn,
    stop_pid,
    stop_pids,
    wait_http_ok,
)

pytestmark = pytest.mark.timeout(30)

# A /health endpoint in five lines; argv: port, directory for pid files.
HEALTH_SERVER = """
    import http.server, os, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self): self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def pid_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_spawn_wait_healthy_and_stop_reaps(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "srv.log"
    proc = spawn([sys.executable, script(tmp_path, HEALTH_SERVER), str(port)], log, header="$ srv")
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", proc, 20, log)
        assert alive(proc) and alive(proc)  # alive() does not reap
    finally:
        code = stop_pid(proc, timeout=5)
    assert code == -15  # SIGTERM ends http.server
    assert proc.returncode == code and not alive(proc) and pid_gone(proc.pid)
    assert log.read_text().startswith("$ srv\n")
    assert stop_pid(proc) == code  # a stopped process stays stopped


def test_exit_before_healthy_fails_with_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "srv.log"
    body = "import sys; print('boom: no model here', flush=True); sys.exit(3)"
    proc = spawn([sys.executable, script(tmp_path, body)], log)
    with pytest.raises(ProcessExited, match="exited with code 3") as ei:
        wait_http_ok(f"http://127.0.0.1:{free_port()}/health", proc, 20, log, what="server")
    assert ei.value.returncode == 3 and proc.returncode == 3  # reaped
    assert str(ei.value).startswith("server (pid ")
    assert "boom: no model here" in str(ei.value)


def test_not_healthy_in_time_leaves_it_running(tmp_path: Path) -> None:
    log = tmp_path / "srv.log"
    body = "import time; print('loading forever', flush=True); time.sleep(60)"
    proc = spawn([sys.executable, script(tmp_path, body)], log)
    try:
        deadline = time.monotonic() + 10
        while "loading forever" not in log.read_text():  # started, so its log has a tail
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(NotHealthy, match="within 1s") as ei:
            wait_http_ok(f"http://127.0.0.1:{free_port()}/health", proc, 1, log)
        assert isinstance(ei.value, TimeoutError)
        assert alive(proc)
        assert "loading forever" in str(ei.value)
    finally:
        stop_pid(proc, timeout=5)


IGNORES_SIGTERM_WITH_CHILD = """
    import os, signal, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(os.path.join(sys.argv[1], "child"), "w").write(str(child.pid))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(60)
"""


def start_stubborn(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp_path / "stubborn.log"
    proc = spawn([sys.executable, script(tmp_path, IGNORES_SIGTERM_WITH_CHILD), str(tmp_path)], log)
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text():
        assert time.monotonic() < deadline and alive(proc), log.read_text()
        time.sleep(0.05)
    return proc, int((tmp_path / "child").read_text())


def test_stop_escalates_to_sigkill_and_takes_the_group(tmp_path: Path) -> None:
    proc, child = start_stubborn(tmp_path)
    t0 = time.monotonic()
    hung = stop_pids([proc], timeout=0.5)
    assert hung == [proc]
    assert proc.returncode == -9
    assert time.monotonic() - t0 < 5
    assert pid_gone(child)  # left in its process group: killed through the group


def test_kill_takes_the_group(tmp_path: Path) -> None:
    proc, child = start_stubborn(tmp_path)
    assert kill_pid(proc) == -9
    assert pid_gone(child)


def test_spawn_env_and_cpu_list(tmp_path: Path) -> None:
    log = tmp_path / "env.log"
    body = "import os; print(os.environ['PROCS_T'], sorted(os.sched_getaffinity(0)))"
    cpu = sorted(os.sched_getaffinity(0))[0]
    env = dict(os.environ, PROCS_T="yes")
    proc = spawn([sys.executable, script(tmp_path, body)], log, env=env, cpu_list=[cpu])
    assert proc.wait(20) == 0
    assert log.read_text().split("\n")[0] == f"yes [{cpu}]"


def test_pid_alive_sees_running_not_zombie_not_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and pid_alive(proc.pid):
            time.sleep(0.02)
        assert not pid_alive(proc.pid)  # a zombie until reaped: not alive
    finally:
        proc.kill()
        proc.wait(timeout=5)
    assert not pid_alive(proc.pid)  # reaped: gone
