"""Bad inputs and a wrong environment through the CLI, as a user meets them: each ends with
exit 2 (bad input) or 1 (environment) and one line on stderr, ``sluice COMMAND: ...``, naming
the input and the fix, never a traceback (sluice.errors; the list is in docs/reliability.md).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from faults.harness import make_model
from faults.test_bad_inputs import sluice
from procs import free_port

pytestmark = [pytest.mark.faults]

UNREACHABLE = "redis://127.0.0.1:1/0"


def one_line_error(res: subprocess.CompletedProcess[str], cmd: str, code: int, *words: str) -> str:
    """The one line ``sluice CMD: ...`` on stderr, checked: exit ``code``, every word in it,
    no traceback, no other line."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    (line,) = lines
    assert line.startswith(f"sluice {cmd}: "), line
    for w in words:
        assert w in line, (w, line)
    return line


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "model")


@pytest.mark.timeout(180)
def test_bad_or_unreachable_redis_url(model: Path, tmp_path: Path) -> None:
    train = ["train", "--set", f"model.path={model}", "--set", f"run.dir={tmp_path / 'run'}"]
    rollout = ["rollout", "--set", f"model.path={model}", "--servers", "http://127.0.0.1:1"]
    for argv in (train, rollout, ["demo", "--no-live", "--run-dir", str(tmp_path / "d0")]):
        # Not a URL: refused by the config validation, before anything starts.
        res = sluice(*argv, "--set", "redis.url=notaurl")
        one_line_error(res, argv[0], 2, "redis.url", "notaurl", "redis://")
    for argv in (train, rollout):
        res = sluice(*argv, "--set", f"redis.url={UNREACHABLE}")
        one_line_error(res, argv[0], 1, "cannot reach Redis at redis://127.0.0.1:1/0")
    # The demo takes a redis.url given with --set as its Redis (like --redis-url).
    res = sluice(
        "demo", "--no-live", "--run-dir", str(tmp_path / "d1"), "--set", f"redis.url={UNREACHABLE}"
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert (
        "sluice demo: redis: cannot reach Redis at redis://127.0.0.1:1/0" in res.stdout + res.stderr
    )
    for argv in (["status"], ["run", "set-eta", "3"]):
        res = sluice(*argv, "--redis-url", UNREACHABLE)
        one_line_error(res, argv[0], 1, "cannot reach Redis at redis://127.0.0.1:1/0")


@pytest.mark.timeout(90)
def test_engine_sglang_without_sglang(model: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("SGLang is installed here")
    res = sluice("rollout", "--set", f"model.path={model}", "--launch", "1", "--engine", "sglang")
    one_line_error(res, "rollout", 1, "SGLang", "not installed", "pip install", "--engine cpu")
    # sluice serve has no --engine (it is the CPU server); the demo says the same in one line.
    res = sluice("demo", "--no-live", "--engine", "sglang")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "sluice demo: engine 'sglang' needs SGLang" in res.stdout + res.stderr


@pytest.mark.timeout(60)
def test_serve_on_a_port_in_use(model: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = sluice("serve", "--model", str(model), "--port", str(port))
    one_line_error(res, "serve", 1, f"127.0.0.1:{port} is already in use", "--port")


def _jsonl(model: Path, options: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return sluice(
        "rollout",
        "--set", f"model.path={model}",
        "--set", "task.name=jsonl",
        "--set", f"task.options={options}",
        "--servers", f"http://127.0.0.1:{free_port()}",
        *extra,
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_jsonl_task_data_problems(model: Path, tmp_path: Path) -> None:
    rw = "reward: 'math:isfinite'"
    pq = tmp_path / "data.parquet"
    pq.write_bytes(b"PAR1\x15\x04\x15\x10\x4c\x15\x0c\xff\xfe\x00\x00PAR1")
    res = _jsonl(model, f"{{path: {pq}, {rw}, eos_token_id: 2}}")
    one_line_error(res, "rollout", 2, str(pq), "Parquet", "not UTF-8 JSONL")

    res = _jsonl(model, f"{{path: {tmp_path}, {rw}, eos_token_id: 2}}")
    line = one_line_error(res, "rollout", 2, str(tmp_path), "is a directory")
    assert "does not exist" not in line

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt_ids": [1, 5, 6]}\n\n{"prompt_ids": [1, 99, 6]}\n')
    res = _jsonl(model, f"{{path: {data}, {rw}}}")
    line = one_line_error(res, "rollout", 2, "needs option(s) eos_token_id", "task.options")
    for option in ("vocab_size", "max_new_tokens", "bos_token_id", "pad_token_id"):
        assert option in line  # the task's options are listed

    res = _jsonl(model, f"{{path: {data}, {rw}, eos_token_id: 2, vocab_size: 14}}")
    one_line_error(res, "rollout", 2, f"{data}:3: token id 99 is outside vocab_size 14")


@pytest.mark.timeout(120)
def test_reward_module_beside_the_config(model: Path, tmp_path: Path) -> None:
    """``reward: mod:fn`` finds mod.py beside the run config without PYTHONPATH, whatever the
    current directory (the worker gets past the task and stops at the unreachable Redis)."""
    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    data = cfg_dir / "d.jsonl"
    data.write_text('{"prompt_ids": [1, 5, 6], "answer": 7}\n')
    conf = {
        "redis": {"url": UNREACHABLE},
        "model": {"path": str(model)},
        "task": {
            "name": "jsonl",
            "options": {"path": str(data), "reward": "beside_reward_x7:score", "eos_token_id": 2},
        },
    }
    (cfg_dir / "run.yaml").write_text(yaml.safe_dump(conf))
    argv = ["rollout", "--config", str(cfg_dir / "run.yaml"), "--servers", "http://127.0.0.1:1"]
    res = sluice(*argv)  # not there yet
    one_line_error(res, "rollout", 2, "no module 'beside_reward_x7'", "beside the run config")
    (cfg_dir / "beside_reward_x7.py").write_text("def score(prompt, output_ids):\n    return 1.0\n")
    res = sluice(*argv)
    one_line_error(res, "rollout", 1, "cannot reach Redis")  # past the task: the reward loaded
    # rollout.reward_fn is found the same way, and named when it is not.
    res = sluice(*argv, "--set", "rollout.reward_fn=beside_reward_x7:nope")
    one_line_error(res, "rollout", 2, "rollout.reward_fn", "no callable 'nope'")


@pytest.mark.timeout(60)
def test_config_typo_says_did_you_mean(tmp_path: Path) -> None:
    res = sluice("train", "--set", "staleness.etta=3")
    one_line_error(res, "train", 2, "staleness.etta: unknown key; did you mean staleness.eta?")
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"rollot": {"n_samples": 4}}))
    res = sluice("rollout", "--config", str(f), "--servers", "http://127.0.0.1:1")
    one_line_error(res, "rollout", 2, "rollot: unknown section; did you mean rollout?")


@pytest.mark.timeout(60)
def test_follow_weights_needs_max_groups(model: Path) -> None:
    res = sluice(
        "rollout",
        "--set",
        f"model.path={model}",
        "--servers",
        "http://127.0.0.1:1",
        "--follow-weights",
    )
    one_line_error(res, "rollout", 2, "--follow-weights needs --max-groups")
