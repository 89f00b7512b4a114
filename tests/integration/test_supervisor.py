"""sluice.supervisor with real child processes: restart with restart args, restart limit,
finished children, and shutdown that leaves no process (nor grandchild) alive."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from procs import pid_alive
from sluice.supervisor import ChildSpec, Supervisor, describe_exit

PY = sys.executable


def _wait(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _sleeper(marker: Path) -> list[str]:
    """A child that appends its argv tail to ``marker`` then sleeps."""
    code = (
        "import sys, time, pathlib; "
        f"pathlib.Path({str(marker)!r}).open('a').write(' '.join(sys.argv[1:]) + '\\n'); "
        "time.sleep(600)"
    )
    return [PY, "-c", code]


@pytest.mark.timeout(60)
def test_sigkilled_child_is_restarted_with_restart_args(tmp_path: Path) -> None:
    marker = tmp_path / "starts.txt"
    events = []
    sup = Supervisor(tmp_path / "logs", max_restarts=3, on_event=events.append)
    with sup:
        args = _sleeper(marker)
        c = sup.start(ChildSpec("trainer", [*args, "first"], restart_args=[*args, "--resume"]))
        first = c.pid
        assert first is not None
        assert _wait(lambda: marker.is_file() and marker.read_text() == "first\n")
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: bool(sup.poll()) or c.restarts == 1)
        assert c.restarts == 1 and c.pid != first and c.state == "running"
        assert _wait(lambda: marker.read_text().splitlines() == ["first", "--resume"])
        assert events and events[0].kind == "restarted" and events[0].exit == "killed by SIGKILL"
        assert events[0].pid == first and events[0].new_pid == c.pid
        assert not pid_alive(first)
        pids = sup.all_pids()
        assert pids == [first, c.pid]
    assert not any(pid_alive(p) for p in pids)
    log = (tmp_path / "logs" / "trainer.log").read_text()
    assert "first" in log and "--resume" in log  # both command lines are in the child's log


@pytest.mark.timeout(60)
def test_restart_limit_holds(tmp_path: Path) -> None:
    counter = tmp_path / "n.txt"
    code = (
        f"import pathlib; pathlib.Path({str(counter)!r}).open('a').write('x'); raise SystemExit(3)"
    )
    sup = Supervisor(tmp_path / "logs", max_restarts=2)
    with sup:
        c = sup.start(ChildSpec("worker", [PY, "-c", code]))
        kinds: list[str] = []
        assert _wait(lambda: kinds.extend(e.kind for e in sup.poll()) or c.state == "failed", 30)
        # Keep polling a while: a failed child is never started again.
        for _ in range(10):
            kinds.extend(e.kind for e in sup.poll())
            time.sleep(0.05)
    assert kinds == ["restarted", "restarted", "failed"]
    assert c.restarts == 2
    assert counter.read_text() == "xxx"  # the first start + 2 restarts
    assert describe_exit(c.returncode) == "exit code 3"


@pytest.mark.timeout(60)
def test_exit_zero_finishes_only_when_done_on_success(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs", max_restarts=1)
    with sup:
        done = sup.start(ChildSpec("trainer", [PY, "-c", "pass"], done_on_success=True))
        other = sup.start(ChildSpec("worker", [PY, "-c", "pass"]))
        seen: list[tuple[str, str]] = []

        def settled() -> bool:
            seen.extend((e.name, e.kind) for e in sup.poll())
            return done.state == "finished" and other.state == "failed"

        assert _wait(settled, 30)
    # A clean exit of a child that should run for ever is unexpected: it is restarted.
    assert ("trainer", "finished") in seen
    assert seen.count(("worker", "restarted")) == 1 and ("worker", "failed") in seen
    assert done.restarts == 0


@pytest.mark.timeout(60)
def test_stop_all_leaves_nothingpid_alive(tmp_path: Path) -> None:
    """A child that ignores SIGTERM is SIGKILLed after the timeout; a grandchild left in the
    child's process group is killed too."""
    gpid_file = tmp_path / "grandchild.pid"
    stubborn = (
        "import signal, subprocess, sys, time, pathlib; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"pathlib.Path({str(gpid_file)!r}).write_text(str(p.pid)); time.sleep(600)"
    )
    polite = "import time; time.sleep(600)"
    sup = Supervisor(tmp_path / "logs", stop_timeout=1.0)
    a = sup.start(ChildSpec("server", [PY, "-c", stubborn]))
    b = sup.start(ChildSpec("worker", [PY, "-c", polite]))
    assert _wait(lambda: gpid_file.is_file() and gpid_file.read_text().strip() != "")
    grandchild = int(gpid_file.read_text())
    assert pid_alive(grandchild)
    t0 = time.monotonic()
    sup.stop_all()
    took = time.monotonic() - t0
    assert a.pid is not None and b.pid is not None
    for pid in (a.pid, b.pid, grandchild):
        assert _wait(lambda pid=pid: not pid_alive(pid), 5), f"pid {pid} still alive"
    assert a.returncode == -signal.SIGKILL  # ignored SIGTERM
    assert b.returncode == -signal.SIGTERM
    assert 0.9 <= took < 10
    assert a.state == b.state == "stopped"


@pytest.mark.timeout(30)
def test_bad_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        Supervisor(tmp_path, max_restarts=-1)
    sup = Supervisor(tmp_path)
    with sup:
        with pytest.raises(ValueError, match="no command"):
            sup.start(ChildSpec("x", []))
        sup.start(ChildSpec("x", [PY, "-c", "import time; time.sleep(60)"]))
        with pytest.raises(ValueError, match="already supervised"):
            sup.start(ChildSpec("x", [PY, "-c", "pass"]))
