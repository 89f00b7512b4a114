"""``sluice config show`` lists the task's options one by one with their meaning and default,
and what it prints is a valid config: for every built-in task, the options it prints build
the task (``get_task``), and the whole output loads back as a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rollout_workers.tasks import get_task, task_options
from sluice import cli
from sluice.config import load_config


def _show(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["config", "show", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("task", ["reverse", "long-tail", "jsonl"])
def test_printed_task_options_build_the_task(
    task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = ["--set", f"task.name={task}"]
    if task == "jsonl":
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt_ids": [1, 5, 6], "answer": 7}\n')
        sets += [
            "--set",
            f"task.options={{path: {data}, reward: 'math:isfinite', eos_token_id: 2}}",
        ]
    out = _show(capsys, *sets)
    printed = yaml.safe_load(out)["task"]["options"]
    opts = task_options(task)
    assert opts is not None
    assert set(printed) == {o.name for o in opts}  # every option, with its value or default
    for o in opts:
        assert o.help[:30] in out, o.name  # its meaning, beside it
    get_task(task, **printed)
    # The output is itself a config file that loads and validates.
    f = tmp_path / "shown.yaml"
    f.write_text(out)
    assert load_config(f).task.options == printed


def test_reverse_defaults_and_no_digits_option(capsys: pytest.CaptureFixture[str]) -> None:
    out = _show(capsys)
    assert "{digits: 4}" not in out and "digits:" not in out.replace("n_digits:", "")
    assert "    n_digits: 4\n" in out and "digits per prompt" in out


def test_required_jsonl_options_are_marked(capsys: pytest.CaptureFixture[str]) -> None:
    out = _show(capsys, "--set", "task.name=jsonl")
    for name in ("path", "reward", "eos_token_id"):
        assert f"    # {name}:\n" in out, name
    assert "# REQUIRED: the JSONL file" in out and "    max_new_tokens: 256\n" in out
    assert yaml.safe_load(out)["task"]["options"] == {
        "vocab_size": None,
        "max_new_tokens": 256,
        "bos_token_id": 1,
        "pad_token_id": 0,
    }


def test_table_lists_task_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    out = _show(capsys, "--table", "--set", "task.name=long-tail", "--set", "task.options.median=8")
    assert "task.options.median" in out and "task.options.sigma" in out
    assert "median target output length" in out
