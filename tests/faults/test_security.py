"""Security checks: no pickle in the data path, safetensors only, credentials never printed,
TLS Redis URLs, the inference admin key.

Covered elsewhere (not repeated): a model dir holding only ``pytorch_model.bin`` is refused
by serve, rollout and train (tests/faults/test_bad_inputs.py::
test_model_dir_missing_files_or_pickles_is_refused_by_every_command; library level in
tests/unit/inference/test_inference_models.py::test_model_dir_errors); the CPU server answers control calls
without the admin key with 401 (tests/integration/test_client_cpu_server.py::
test_control_calls_need_the_admin_key); checkpoints hold no pickles (trainer/checkpoint.py
writes safetensors + JSON only).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from buffer import (
    RedisTrajectoryBuffer,
    RedisUnavailable,
    Sample,
    TrajectoryGroup,
    connect,
    keys,
)
from buffer.codec import pack
from buffer.connection import make_client
from faults.harness import FaultRun
from procs import free_port

pytestmark = [pytest.mark.faults]
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Redis-pw-7f3Kq9"
ADMIN_KEY = "admin-key-Zx81wq"


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appearing means it was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_REDIS")}
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.timeout(240)
def test_secured_live_run(tmp_path: Path) -> None:
    """A live run with a Redis password and an inference admin key. Mid-run, hostile and
    corrupt entries are written into the stream: garbage bytes, a future schema version, an
    entry without payload, and a pickle whose unpickling would create a file. They are
    dead-lettered (the file never appears), the run reaches its target with its books
    balanced, ``sluice status`` shows the dead letters by reason, the rejections, each
    worker's liveness and metrics, and neither secret appears in any log or status output."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(marker))
    probe = tmp_path / "probe"  # the payload is live: unpickling it does create a file
    pickle.loads(pickle.dumps(_CreatesFile(probe))).close()
    assert probe.exists()

    # The hostile entries go in after step 2; the trainer reads what was queued before them
    # (at most (eta + 1) * batch_groups groups: 2 steps at eta 1) and then them. With 14 steps
    # it is still running then; with 8 it once finished first and never read them.
    run = FaultRun(
        tmp_path / "run",
        steps=14,
        password=PASSWORD,
        extra={"inference": {"admin_api_key": ADMIN_KEY}},
    )
    with run:
        run.wait_steps(2, timeout=90)
        bad = [
            {"d": b"\x00\x01 not msgpack", "g": "garbage"},
            {"d": pack({"sv": 999, "gid": "future"}, []), "g": "future"},
            {"g": "no-payload"},
            {"d": payload, "g": "pickle"},
        ]

        async def inject() -> None:
            c = await connect(run.redis.url)
            try:
                for fields in bad:
                    await c.xadd(keys.stream(run.run_name), fields)
            finally:
                await c.aclose()

        asyncio.run(inject())
        run.injected = len(bad)

        # The server refuses control calls without the admin key (the worker has it: the
        # run's weight updates go through).
        async def no_key() -> None:
            from inference.client import SGLangClient
            from inference.protocol import InferenceError

            async with SGLangClient(run.server_url) as cl:
                with pytest.raises(InferenceError) as e:
                    await cl.pause("abort")
                assert e.value.status == 401

        asyncio.run(no_key())

        # Live status while the workers run.
        deadline = time.monotonic() + 60
        while True:
            res = sluice("status", "--redis-url", run.redis.url, "--json")
            assert res.returncode == 0, res.stderr
            live = json.loads(res.stdout)
            if live["buffer"]["dead_letter"] == len(bad) and len(live["worker_metrics"]) >= 2:
                break
            assert time.monotonic() < deadline, live
            time.sleep(0.5)
        audit = run.finish()
        table = sluice("status", "--redis-url", run.redis.url)
        final = sluice("status", "--redis-url", run.redis.url, "--json")
    assert not marker.exists(), "the pickle payload was executed"
    assert audit.dead_letter == len(bad)
    assert audit.snapshot["rejected_by"].get("dead_letter") == len(bad)

    reasons = live["dead_letters"]["by_reason"]
    assert sum(reasons.values()) == len(bad)
    assert any("not a sluice trajectory payload" in r for r in reasons)
    assert any("unknown schema version 999" in r for r in reasons)
    assert any("'d'" in r for r in reasons)
    assert all(m["status"] == "running" for m in live["worker_metrics"].values())
    assert all(w["alive"] for w in live["workers"])
    d = json.loads(final.stdout)
    assert d["rejected_by"].get("dead_letter") == len(bad)
    assert all(m["status"] == "stopped" for m in d["worker_metrics"].values())
    assert sum(m["groups_pushed"] for m in d["worker_metrics"].values()) >= 8 * 4
    for word in ("dead-lettered", "dead_letter=4", "worker metrics", "stopped", "***"):
        assert word in table.stdout, (word, table.stdout)

    outputs = [res.stdout + res.stderr for res in (table, final)]
    outputs += [p.read_text(errors="replace") for p in (tmp_path / "run" / "logs").iterdir()]
    outputs += [(tmp_path / "run" / "run" / "metrics.jsonl").read_text()]
    for text in outputs:
        assert PASSWORD not in text
        assert ADMIN_KEY not in text


async def test_rediss_url_builds_a_tls_client() -> None:
    from redis.asyncio.connection import SSLConnection

    c = make_client("rediss://:pw@redis.example:6380/0")
    assert c.connection_pool.connection_class is SSLConnection
    assert make_client("redis://h:1/0").connection_pool.connection_class is not SSLConnection
    await c.aclose()


@pytest.mark.timeout(60)
async def test_live_tls_redis(tmp_path: Path) -> None:
    """A redis-server listening on TLS only: the buffer works over ``rediss://`` with the CA
    given in the URL (``ssl_ca_certs``), and a plain ``redis://`` client cannot talk to it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found (needed to make a test certificate)")
    cert, keyf = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(keyf),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    log = open(tmp_path / "redis.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(keyf), "--tls-ca-cert-file",
         str(cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--requirepass", PASSWORD],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    client = None
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        deadline = time.monotonic() + 15
        while client is None:
            if proc.poll() is not None:
                out = (tmp_path / "redis.log").read_text(errors="replace")
                pytest.skip(f"this redis-server does not serve TLS: {out[-500:]}")
            try:
                client = await connect(url, wait_s=0)
            except RedisUnavailable:
                assert time.monotonic() < deadline, "TLS redis-server did not answer"
                await asyncio.sleep(0.2)
        buf = RedisTrajectoryBuffer(client, "tls", "c")
        g = TrajectoryGroup(
            run_id="tls",
            prompt_id="p",
            prompt_ids=np.array([1, 2], dtype=np.int32),
            samples=[
                Sample(
                    output_ids=np.array([3], dtype=np.int32),
                    behaviour_logp=np.array([-0.5], dtype=np.float32),
                    token_versions=np.array([0], dtype=np.int32),
                    reward=1.0,
                    finish_reason="stop",
                    index=0,
                )
            ],
            worker_id="w",
            admission_version=0,
        )
        await buf.put(g)
        got = await buf.get_batch(1, block_ms=1000)
        assert [d.group.group_id for d in got] == [g.group_id]
        # Plain TCP to the TLS port gets no answer it can use.
        with pytest.raises(RedisUnavailable):
            await connect(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", wait_s=0, socket_timeout=2)
    finally:
        if client is not None:
            await client.aclose()
        proc.terminate()
        proc.wait(10)
