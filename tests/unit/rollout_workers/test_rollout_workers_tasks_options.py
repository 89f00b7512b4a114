"""Task options: each built-in task declares its options with help and defaults
(``task_options``); ``get_task`` names an unknown or missing option (with the task's options)
and the jsonl task names the file (and line) of every data problem, as ``TaskError``."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from rollout_workers.tasks import TASKS, JsonlTask, TaskError, get_task, task_options


def test_every_builtin_task_documents_every_option() -> None:
    for name in ("reverse", "long-tail", "jsonl"):
        opts = task_options(name)
        assert opts is not None
        params = inspect.signature(TASKS[name]).parameters
        assert [o.name for o in opts] == list(params)
        for o in opts:
            assert o.help, (name, o.name)
            assert o.required == (params[o.name].default is inspect.Parameter.empty)
        # What the defaults build is a task (jsonl needs its required options).
        if name != "jsonl":
            get_task(name, **{o.name: o.default for o in opts})
    assert [o.name for o in task_options("jsonl") or [] if o.required] == [
        "path",
        "reward",
        "eos_token_id",
    ]
    assert task_options("no-such-task") is None


def test_get_task_names_unknown_and_missing_options() -> None:
    with pytest.raises(
        TaskError, match=r"no option\(s\) \['digits'\] \(did you mean 'n_digits'\?\)"
    ):
        get_task("reverse", digits=4)
    with pytest.raises(TaskError, match=r"needs option\(s\) eos_token_id") as e:
        get_task("jsonl", path="x.jsonl", reward="math:isfinite")
    assert "vocab_size=None" in str(e.value) and "path (required)" in str(e.value)
    with pytest.raises(TaskError, match=r"path, reward, eos_token_id"):
        get_task("jsonl")
    with pytest.raises(TaskError, match=r"unknown task 'revers' .*did you mean 'reverse'"):
        get_task("revers")
    with pytest.raises(TaskError, match=r"task 'reverse': n_digits must be >= 1"):
        get_task("reverse", n_digits=0)


def _task(path: Path, **kw: object) -> JsonlTask:
    return JsonlTask(path, reward="math:isfinite", eos_token_id=2, **kw)  # type: ignore[arg-type]


def test_jsonl_file_problems_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TaskError, match=rf"{missing} \(task.options.path\) does not exist"):
        _task(missing)
    with pytest.raises(TaskError, match=rf"{tmp_path} \(task.options.path\) is a directory"):
        _task(tmp_path)
    pq = tmp_path / "data.parquet"
    pq.write_bytes(b"PAR1\x15\x04\x15\x10\xff\xfe\x00PAR1")
    with pytest.raises(TaskError, match=rf"{pq} is a Parquet file, not UTF-8 JSONL"):
        _task(pq)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt_ids": [1, 5]}\n{"answer": "caf\xe9"}\n')
    with pytest.raises(TaskError, match=rf"{latin}:2: not UTF-8 text \(byte 0xe9"):
        _task(latin)


def test_jsonl_token_id_outside_vocab_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt_ids": [1, 5]}\n\n{"prompt_ids": [1, 20, 6]}\n{"prompt_ids": [9]}\n')
    with pytest.raises(TaskError, match=rf"{f}:3: token id 20 is outside vocab_size 14"):
        _task(f, vocab_size=14)
    assert _task(f).vocab_size == 21  # default: the largest id + 1
    with pytest.raises(TaskError, match=r"eos_token_id=30 is outside vocab_size 21"):
        JsonlTask(f, reward="math:isfinite", eos_token_id=30, vocab_size=21)
    with pytest.raises(TaskError, match=r"eos_token_id must be a token id"):
        JsonlTask(f, reward="math:isfinite", eos_token_id=-1)


def test_reward_module_not_found_says_where_to_put_it(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt_ids": [1, 5]}\n')
    with pytest.raises(TaskError, match=r"no module 'nosuchmod_x1'.*beside the run config"):
        JsonlTask(f, reward="nosuchmod_x1:f", eos_token_id=2)
    # A module that exists but fails to import says so, not "not found".
    bad = tmp_path / "broken_reward_x1.py"
    bad.write_text("import nosuchdep_x1\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(TaskError, match=r"importing 'broken_reward_x1' failed.*nosuchdep_x1"):
            JsonlTask(f, reward="broken_reward_x1:f", eos_token_id=2)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("broken_reward_x1", None)
