"""A run started by hand (server, 2 workers, trainer as separate processes from one config
file, no demo) records what it ran with and how far it got:

- the trainer writes RUN_DIR/config.yaml (resolved, no secret), so ``sluice report`` shows the
  task and eta; each worker records its config in the run's Redis;
- trainer log lines say ``step N/max_steps``; ``sluice status`` shows the trainer's last step
  (state, step/max_steps, reward, loss) from its progress record;
- held-out eval results reach metrics.jsonl as event lines (once per version) and the report;
- every published weights dir and checkpoint model dir carries the starting model's tokenizer
  files byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from faults.harness import ROOT, FaultRun

from buffer import keys

STEPS = 6
TOKENIZER = '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"0": 3}}}\n'


def _sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


async def _redis_records(url: str, run: str) -> tuple[dict[str, str], dict[int, dict[str, Any]]]:
    from buffer import connect
    from sluice.runconfig import worker_configs

    client = await connect(url)
    try:
        configs = await worker_configs(client, run)
        evals = {
            int(v): json.loads(raw)
            for v, raw in (await client.hgetall(keys.eval_results(run))).items()
        }
    finally:
        await client.aclose()
    return configs, evals


@pytest.mark.timeout(300)
def test_hand_started_run_end_to_end(tmp_path: Path) -> None:
    extra = {"rollout": {"eval_every": 1, "eval_prompts": 4}}
    run = FaultRun(tmp_path, steps=STEPS, extra=extra)
    (run.model / "tokenizer.json").write_text(TOKENIZER)
    (run.model / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    try:
        run.start()
        run.finish(timeout=180)
        url, name, rd = run.redis.url, run.run_name, run.run_dir

        # -- progress: log lines and sluice status
        trainer_log = run.trainer.log_path.read_text()
        for n in range(1, STEPS + 1):
            assert f"step {n}/{STEPS} " in trainer_log, trainer_log[-2000:]
        st = _sluice("status", "--redis-url", url, "--run", name, "--json")
        assert st.returncode == 0, st.stderr
        tr = json.loads(st.stdout)["trainer"]["trainer-0"]
        assert (tr["state"], tr["step"], tr["max_steps"]) == ("finished", STEPS, STEPS)
        steps = run.metrics()
        last = max(steps, key=lambda r: r["step"])
        assert tr["reward_mean"] == last["reward_mean"] and tr["loss"] == last["loss"]
        assert tr["version"] == last["version"] and tr["age_s"] >= 0
        table = _sluice("status", "--redis-url", url, "--run", name)
        assert table.returncode == 0, table.stderr
        assert f"step {STEPS}/{STEPS}" in table.stdout and "finished" in table.stdout

        # -- the config: the trainer's file, each worker's record in Redis
        cfg = yaml.safe_load((rd / "config.yaml").read_text())
        assert (rd / "config.yaml").read_text().startswith("# written by sluice train")
        assert cfg["task"]["name"] == "reverse" and cfg["staleness"]["eta"] == 1
        assert cfg["model"]["path"] == str(run.model.resolve())
        assert not list(rd.glob("config.resume-*.yaml"))
        configs, evals = asyncio.run(_redis_records(url, name))
        assert len(configs) == 2, configs.keys()
        for wid, text in configs.items():
            assert text.startswith(f"# worker {wid}: written by sluice rollout")
            assert yaml.safe_load(text)["task"] == cfg["task"]

        # -- eval results: event lines, once per version, as the workers recorded them
        lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        events = [r for r in lines if r.get("event") == "eval"]
        assert events, "no eval event in metrics.jsonl"
        assert len({e["version"] for e in events}) == len(events)
        for e in events:
            want = evals[e["version"]]
            assert e["greedy_reward"] == want["greedy_reward"]
            assert e["sampled_reward"] == want["sampled_reward"]
            assert 1 <= e["trainer_step"] <= STEPS and "step" not in e

        # -- the report: task, eta, evals
        rep = _sluice("report", str(rd), "--json")
        assert rep.returncode == 0, rep.stderr
        s = json.loads(rep.stdout)
        assert (s["task"], s["eta"], s["steps"]) == ("reverse", 1, STEPS)
        assert [e["version"] for e in s["evals"]] == sorted(e["version"] for e in events)
        assert "eval.png" in s["plots"]
        md = (rd / "report" / "report.md").read_text()
        assert "| task | reverse |" in md and "## Held-out eval" in md

        # -- published weights and checkpoints carry the tokenizer files
        dirs = [*rd.glob("weights/v*"), *rd.glob("checkpoints/step-*/model")]
        assert len(dirs) >= 2
        for d in dirs:
            assert (d / "tokenizer.json").read_text() == TOKENIZER, d
            assert (d / "special_tokens_map.json").read_bytes() == (
                run.model / "special_tokens_map.json"
            ).read_bytes()
    finally:
        run.close()
