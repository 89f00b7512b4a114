"""sluice.errors: which errors are one line and which exit code each gets; sluice.cli.main
prints them as ``sluice COMMAND: ...`` without a traceback and lets a bug's traceback through."""

from __future__ import annotations

import argparse
import types

import pytest

from sluice import cli
from sluice.errors import (
    BAD_INPUT,
    ENVIRONMENT,
    EnvironmentProblem,
    InputError,
    exit_code,
    one_line,
)


def test_exit_codes_of_the_known_errors() -> None:
    from buffer.connection import RedisAuthFailed, RedisUnavailable
    from inference.cpu_server.app import CannotListen
    from inference.launch import EngineUnavailable
    from inference.models import ModelDirError
    from rollout_workers.tasks import TaskError
    from staleness import RunSettingsMismatch
    from trainer.config import TrainerEnvironmentError, TrainerError

    assert exit_code(InputError("x")) == BAD_INPUT == 2
    assert exit_code(EnvironmentProblem("x")) == ENVIRONMENT == 1
    assert exit_code(RedisUnavailable("x")) == 1
    assert exit_code(RedisAuthFailed("x")) == 2  # a subclass: listed first
    assert exit_code(EngineUnavailable("x")) == 1
    assert exit_code(CannotListen("x")) == 1
    assert exit_code(ModelDirError("x")) == 2
    assert exit_code(TaskError("x")) == 2
    assert exit_code(RunSettingsMismatch("x")) == 2
    assert exit_code(TrainerError("x")) == 2
    assert exit_code(TrainerEnvironmentError("x")) == 1  # device=cuda without CUDA
    for bug in (ValueError("x"), RuntimeError("x"), KeyError("x"), OSError("x")):
        assert exit_code(bug) is None


def test_one_line() -> None:
    assert one_line(ValueError("head:\n  a = 1: bad\n  b = 2: worse\n")) == (
        "head: a = 1: bad; b = 2: worse"
    )
    assert one_line(ValueError("")) == "ValueError"


def _fake_command(monkeypatch: pytest.MonkeyPatch, raise_: BaseException) -> None:
    mod = types.ModuleType("fake_cmd")

    def add_arguments(p: argparse.ArgumentParser) -> None:
        pass

    def run(args: argparse.Namespace) -> int:
        raise raise_

    mod.add_arguments = add_arguments  # type: ignore[attr-defined]
    mod.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "fake_cmd", mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_cmd", "a test command"))


def test_main_prints_one_line_with_the_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_command(monkeypatch, EnvironmentProblem("port 1 is taken:\n  pick another"))
    assert cli.main(["fake"]) == 1
    assert capsys.readouterr().err == "sluice fake: port 1 is taken: pick another\n"
    # In an exception group (a TaskGroup), the first known error.
    _fake_command(monkeypatch, ExceptionGroup("g", [KeyError("k"), InputError("bad --x")]))
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "sluice fake: bad --x\n"


def test_main_keeps_the_traceback_of_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_command(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["fake"])
