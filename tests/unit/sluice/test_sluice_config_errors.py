"""Config errors that say how to fix them: unknown keys with a did-you-mean (files, --set,
sections, task options), one line per error, redacted URLs; where reward modules are found."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from sluice.config import (
    ConfigError,
    add_module_dirs,
    load_config,
    module_dirs,
    unknown_key_message,
)
from sluice.errors import InputError, exit_code, one_line


def _error(path: Path | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_unknown_key_in_a_section_suggests_the_closest(tmp_path: Path) -> None:
    msg = _error(None, ["staleness.etta=3"])
    assert "staleness.etta: unknown key; did you mean staleness.eta?" in msg
    assert "Extra inputs" not in msg
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"trainer": {"learning_rate": 0.1, "lr": 0.01}}))
    assert "trainer.learning_rate: unknown key" in _error(f)
    f.write_text(yaml.safe_dump({"rollout": {"n_sample": 4}}))
    assert "rollout.n_sample: unknown key; did you mean rollout.n_samples?" in _error(f)


def test_unknown_section_suggests_the_closest(tmp_path: Path) -> None:
    assert "trainr: unknown section; did you mean trainer?" in _error(None, ["trainr.lr=1"])
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"stalenes": {"eta": 1}}))
    assert "stalenes: unknown section; did you mean staleness?" in _error(f)
    # Nothing close: the valid names instead.
    msg = unknown_key_message(("zzzzzz",))
    assert msg.startswith("zzzzzz: unknown section; valid: redis, run, staleness")


def test_unknown_task_option_suggests_the_closest() -> None:
    msg = _error(None, ["task.options={digits: 4}"])
    assert "task.options.digits: unknown option of task 'reverse'" in msg
    assert "did you mean task.options.n_digits?" in msg
    # A registered task that takes **options, or an unknown task name, is not checked here.
    load_config(None, ["task.name=mine", "task.options={anything: 1}"])


def test_errors_are_one_line_and_exit_2() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["staleness.eta=-1", "trainer.lr=0"])
    line = one_line(e.value)
    assert "\n" not in line and "staleness.eta = -1" in line and "trainer.lr = 0" in line
    assert line.startswith("invalid config (defaults + ") and "...): staleness.eta" in line
    assert isinstance(e.value, InputError) and exit_code(e.value) == 2


def test_bad_redis_url_is_a_config_error_with_the_password_redacted() -> None:
    msg = _error(None, ["redis.url=http://u:sekrit-77@h:6379/0"])
    assert "redis.url" in msg and "scheme must be redis://" in msg
    assert "sekrit-77" not in msg and "***" in msg
    assert "Value error" not in msg
    assert "redis.url" in _error(None, ["redis.url=notaurl"])


def test_module_dirs_are_the_config_dir_then_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert module_dirs(cfg_dir / "run.yaml") == [cfg_dir.resolve(), work.resolve()]
    assert module_dirs(None) == [work.resolve()]
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/already/here")
    (cfg_dir / "beside_cfg_reward.py").write_text("def f(p, o):\n    return 1.0\n")
    sys.modules.pop("beside_cfg_reward", None)
    added = add_module_dirs(cfg_dir / "run.yaml")
    assert added == [cfg_dir.resolve(), work.resolve()]
    assert sys.path[-2:] == [str(cfg_dir.resolve()), str(work.resolve())]  # after site-packages
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [
        "/already/here",
        str(cfg_dir.resolve()),
        str(work.resolve()),
    ]
    assert add_module_dirs(cfg_dir / "run.yaml") == []  # idempotent
    from rollout_workers.tasks.jsonl import load_reward_fn

    assert load_reward_fn("beside_cfg_reward:f")(None, []) == 1.0  # type: ignore[arg-type]
    sys.modules.pop("beside_cfg_reward", None)
