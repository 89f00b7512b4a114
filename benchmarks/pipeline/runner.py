"""The runs of one invocation: the two ceilings (generation alone with the gate open, then
training alone on what it generated) and a pipeline run at one eta (trainer + worker + server on
a fresh private Redis). See ``benchmarks/pipeline_bench.py`` for what each number means."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.pipeline.bare import bare_decode
from benchmarks.pipeline.measure import (
    MEM_FIELDS,
    interp,
    other_keys_bytes,
    read_metrics,
    redis_client,
    server_idle,
    stream_bytes_per_entry,
    window,
    worker_metrics,
)
from benchmarks.pipeline.placement import tail
from benchmarks.pipeline.services import sample_busy, start_redis, start_server
from benchmarks.pipeline.workloads import GATE_OPEN_ETA, Setup, write_config
from buffer import keys

POLL_S = 0.1

Samples = list[tuple[float, float, float]]


# ------------------------------------------------------------------ the ceilings


def run_ceilings(s: Setup) -> dict[str, Any]:
    """Worker alone (gate open) to ``steps * B`` groups, then the trainer alone on them."""
    d = s.workdir / "ceilings"
    d.mkdir(parents=True, exist_ok=True)
    run = f"ceil-{s.workload}-{uuid.uuid4().hex[:8]}"
    redis_srv = start_redis(s, d)
    r = redis_client(redis_srv.url)
    try:
        cfg = write_config(s, url=redis_srv.url, run=run, run_dir=d / run, eta=GATE_OPEN_ETA)
        gen, keep = _generation_ceiling(s, r, run, cfg, d)
        try:
            train = _training_ceiling(s, cfg, d / run, d)
        finally:
            for p in keep:  # the following worker, then its (CPU) server
                s.procs.stop(p)
        return {"gen": gen, "train": train, "run": run}
    finally:
        r.close()
        redis_srv.stop()


def _poll_generation(
    s: Setup, r: Any, run: str, url: str, worker: subprocess.Popen[bytes], target: int
) -> tuple[dict[int, float], Samples]:
    """Until the worker exits (or, for a worker that follows the weights afterwards, until
    ``target`` groups are done): when the gate's ``finished`` counter passed the first batch
    and ``target`` (wall time per mark), and the server's busy time every 0.5 s."""
    k_gate = keys.gate(run)
    marks: dict[int, float] = {}
    srv_samples: Samples = []
    deadline = time.monotonic() + s.timeout
    last_srv = 0.0
    while worker.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"generation ceiling: worker not done in {s.timeout}s")
        done = int(r.hget(k_gate, "finished") or 0)
        now = time.time()
        for m in (s.batch_groups, target):
            if done >= m and m not in marks:
                marks[m] = now
        if s.weight_sync == "ipc" and done >= target:
            break
        if now - last_srv > 0.5:
            sample_busy(s, r, run, url, srv_samples)
            last_srv = now
        time.sleep(POLL_S)
    return marks, srv_samples


def _generation_ceiling(
    s: Setup, r: Any, run: str, cfg: Path, d: Path
) -> tuple[dict[str, Any], list[subprocess.Popen[bytes]]]:
    """One worker, the gate open, no trainer: groups/s between the first batch and
    ``steps * batch_groups`` groups. With ``weight_sync: ipc`` the worker then stays, generating
    nothing and loading each version the training ceiling publishes (``--follow-weights``), so
    that the trainer hands its weights to the server in memory as in a pipeline run; it is
    returned, for the caller to stop. On SGLang, the same server then runs a bare closed loop of
    the worker's requests (``--bare-decode``)."""
    server, url = start_server(s, d)
    target = s.steps * s.batch_groups
    args = ["rollout", "--config", str(cfg), "--servers", url, "--worker-id", "w0"]
    args += ["--max-groups", str(target)]
    follow = s.weight_sync == "ipc"
    worker = s.procs.spawn(
        [*args, *(["--follow-weights"] if follow else [])],
        s.placement.inference,
        d / "worker.log",
    )
    marks, srv_samples = _poll_generation(s, r, run, url, worker, target)
    if worker.poll() is not None and worker.returncode != 0:
        raise RuntimeError(f"worker exited {worker.returncode}:\n{tail(d / 'worker.log')}")
    done = int(r.hget(keys.gate(run), "finished") or 0)
    marks.setdefault(target, time.time())
    marks.setdefault(s.batch_groups, marks[target])
    sample_busy(s, r, run, url, srv_samples)
    bare = None
    if s.bare_decode:  # the worker has pushed all its groups: nothing of it is in flight
        bare = bare_decode(url, s.bare_spec())
    keep = [worker] if follow else []
    if server is not None:
        if follow:
            keep.append(server)
        else:
            s.procs.stop(server)
    wm = worker_metrics(r, run)
    tokens_per_group = int(wm["tokens_out"]) / max(1, int(wm["groups_pushed"]))
    t0, t1 = marks[s.batch_groups], marks[target]
    gen_gps = (target - s.batch_groups) / max(t1 - t0, 1e-9)
    bytes_per_group = stream_bytes_per_entry(r, run)
    return {
        "groups_per_s": gen_gps,
        "tokens_per_s": gen_gps * tokens_per_group,
        "groups": done,
        "window_s": t1 - t0,
        "tokens_per_group": tokens_per_group,
        "server_idle": server_idle(srv_samples, t0, t1),
        "bytes_per_group": bytes_per_group,
        **(
            {"bare": bare, "worker_vs_bare": gen_gps * tokens_per_group / bare["tokens_per_s"]}
            if bare
            else {}
        ),
    }, keep


def _training_ceiling(s: Setup, cfg: Path, run_dir: Path, d: Path) -> dict[str, Any]:
    """The trainer alone on the buffer the generation ceiling filled: trained groups/s over
    the steps after warm-up."""
    trainer = s.procs.spawn(
        ["train", "--config", str(cfg), "--max-steps", str(s.steps)],
        s.placement.training,
        d / "trainer.log",
    )
    try:
        trainer.wait(timeout=s.timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"training ceiling: trainer not done in {s.timeout}s") from None
    if trainer.returncode != 0:
        raise RuntimeError(f"trainer exited {trainer.returncode}:\n{tail(d / 'trainer.log')}")
    rows, w0, w1 = window(read_metrics(run_dir), s.warmup)
    span = max(w1 - w0, 1e-9)
    trained = sum(x["groups"] - x["dropped"] for x in rows)
    read_s = sum(x["idle_s"] for x in rows)
    buf_s = sum(x.get("buffer_s", 0.0) for x in rows)
    return {
        "groups_per_s": trained / span,
        "tokens_per_s": sum(x["tokens"] for x in rows) / span,
        "steps": len(rows),
        "window_s": span,
        "dropped": int(rows[-1]["dropped_total"]),
        "read_s_per_step": read_s / len(rows),
        "buffer_s_per_step": buf_s / len(rows),
        "wall_s_per_step": span / len(rows),
        "buffer_gate_share": (read_s + buf_s) / span,
        "phase_s_per_step": {
            k: sum(float(x.get(k) or 0.0) for x in rows) / len(rows)
            for k in ("train_s", "publish_s", "checkpoint_s")
        },
        "weights_via": sorted({str(x["weights_via"]) for x in rows if x.get("weights_via")}),
    }


# ------------------------------------------------------------------ one pipeline run


@dataclass
class _Sampled:
    """What a pipeline run's poll loop saw."""

    srv: Samples = field(default_factory=list)  # the server's busy time
    per_entry: list[float] = field(default_factory=list)  # stream bytes per entry
    produced: Samples = field(default_factory=list)  # (wall time, groups pushed, 0)
    clients_mem: int = 0  # the largest client-buffer memory seen (connections of 3 processes)
    top_mem: dict[str, Any] = field(default_factory=dict)  # INFO memory at the largest sample


def _poll_pipeline(
    s: Setup,
    r: Any,
    run: str,
    url: str,
    eta: int | str,
    d: Path,
    trainer: subprocess.Popen[bytes],
    worker: subprocess.Popen[bytes],
) -> _Sampled:
    """Until the trainer exits: groups pushed and Redis memory every poll, the server's busy
    time, stream bytes per entry and client buffers every 0.5 s."""
    seen = _Sampled()
    t_run = time.time()
    k_gate = keys.gate(run)
    deadline = time.monotonic() + s.timeout
    last_srv = 0.0
    while trainer.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"eta={eta}: trainer not done in {s.timeout}s")
        if worker.poll() is not None:
            raise RuntimeError(
                f"eta={eta}: worker exited {worker.returncode}:\n{tail(d / 'worker.log')}"
            )
        now = time.time()
        seen.produced.append((now, float(r.hget(k_gate, "finished") or 0), 0.0))
        mem = r.info("memory")
        if int(mem["used_memory"]) > int(seen.top_mem.get("used_memory", 0)):
            seen.top_mem = {k: mem[k] for k in MEM_FIELDS if k in mem}
            seen.top_mem["t_s"] = round(now - t_run, 2)
        if now - last_srv > 0.5:
            sample_busy(s, r, run, url, seen.srv)
            b = stream_bytes_per_entry(r, run)
            if b is not None:
                seen.per_entry.append(b)
            mem = r.info("memory")
            seen.clients_mem = max(seen.clients_mem, int(mem.get("mem_clients_normal", 0)))
            last_srv = now
        time.sleep(POLL_S)
    return seen


def run_pipeline(s: Setup, eta: int | str, bytes_hint: float | None) -> dict[str, Any]:
    """Trainer + worker + server at ``eta`` (an int, or ``"auto"``: ``staleness.eta: auto``
    from 1, within ``s.eta_max``) on a fresh private Redis, ``s.steps`` steps."""
    d = s.workdir / f"eta{eta}"
    d.mkdir(parents=True, exist_ok=True)
    run = f"pipe-{s.workload}-e{eta}-{uuid.uuid4().hex[:8]}"
    redis_srv = start_redis(s, d)
    r = redis_client(redis_srv.url)
    try:
        base_mem = int(r.info("memory")["used_memory"])
        cfg = write_config(s, url=redis_srv.url, run=run, run_dir=d / run, eta=eta)
        server, url = start_server(s, d)
        trainer = s.procs.spawn(
            ["train", "--config", str(cfg), "--max-steps", str(s.steps)],
            s.placement.training,
            d / "trainer.log",
        )
        worker = s.procs.spawn(
            ["rollout", "--config", str(cfg), "--servers", url, "--worker-id", "w0"],
            s.placement.inference,
            d / "worker.log",
        )
        seen = _poll_pipeline(s, r, run, url, eta, d, trainer, worker)
        if trainer.returncode != 0:
            raise RuntimeError(
                f"eta={eta}: trainer exited {trainer.returncode}:\n{tail(d / 'trainer.log')}"
            )
        sample_busy(s, r, run, url, seen.srv)
        s.procs.stop(worker)
        if server is not None:
            s.procs.stop(server)
        wm = worker_metrics(r, run)
        b = stream_bytes_per_entry(r, run)
        if b is not None:
            seen.per_entry.append(b)
        redis = _redis_memory(s, r, run, _eta_bound(s, eta), base_mem, seen, bytes_hint)
        return _pipeline_result(s, eta, run, read_metrics(d / run), seen, redis, wm)
    finally:
        r.close()
        redis_srv.stop()


def _eta_bound(s: Setup, eta: int | str) -> int:
    """The largest eta a run may use (``eta_max`` for auto)."""
    return s.eta_max if eta == "auto" else int(eta)


def _redis_memory(
    s: Setup, r: Any, run: str, eta: int, base_mem: int, seen: _Sampled, bytes_hint: float | None
) -> dict[str, Any]:
    """Redis ``used_memory_peak`` beside the bound ``(eta + 1 + checkpoint_every) * B *
    bytes_per_group + overhead``, with the overhead's parts."""
    mem = r.info("memory")
    peak = int(mem["used_memory_peak"])
    scripts = int(mem.get("used_memory_scripts", 0)) + int(mem.get("used_memory_vm_eval", 0))
    overhead = base_mem + seen.clients_mem + scripts + other_keys_bytes(r, run)
    bpg = max(seen.per_entry) if seen.per_entry else (bytes_hint or 0.0)
    bound = (eta + 1 + s.checkpoint_every) * s.batch_groups * bpg + overhead
    return {
        "redis_peak_bytes": peak,
        "redis_bound_bytes": int(bound),
        "redis_within_bound": peak <= bound,
        "bytes_per_group": bpg,
        "redis_overhead_bytes": overhead,
        "redis_top_sample": seen.top_mem,
        "redis_overhead_parts": {
            "empty_server": base_mem,
            "client_buffers_max_sampled": seen.clients_mem,
            "scripts": scripts,
            "other_keys": overhead - base_mem - seen.clients_mem - scripts,
        },
    }


def _rates(
    s: Setup, all_rows: list[dict[str, Any]], produced: Samples
) -> tuple[dict[str, Any], list[dict[str, Any]], float, float, float]:
    """Throughput over the window, the window's rows, its bounds and span.

    Sustained rate: groups trained in the window plus the change of the backlog (pushed, not
    yet read). Without it a run whose worker filled (eta + 1) batches while the trainer started
    up would count that backlog as throughput."""
    rows, w0, w1 = window(all_rows, s.warmup)
    span = max(w1 - w0, 1e-9)
    trained = sum(x["groups"] - x["dropped"] for x in rows)
    read_before = sum(x["groups"] for x in all_rows[: s.warmup])
    read_all = sum(x["groups"] for x in all_rows)
    backlog0 = interp(produced, w0)[0] - read_before if produced else 0.0
    backlog1 = interp(produced, w1)[0] - read_all if produced else 0.0
    sustained = max(0.0, trained + backlog1 - backlog0) / span
    tokens_per_group = sum(x["tokens"] for x in rows) / max(1, trained)
    rates = {
        "groups_per_s": sustained,
        "tokens_per_s": sustained * tokens_per_group,
        "consumed_groups_per_s": trained / span,
        "backlog_start": backlog0,
        "backlog_end": backlog1,
    }
    return rates, rows, w0, w1, span


def _mean_staleness(all_rows: list[dict[str, Any]]) -> float:
    """Mean staleness over the trainer's histograms of every step."""
    hist: dict[int, int] = {}
    for x in all_rows:
        for k, c in x["staleness_hist"].items():
            hist[int(k.rstrip("+"))] = hist.get(int(k.rstrip("+")), 0) + int(c)
    n_hist = sum(hist.values())
    return sum(k * c for k, c in hist.items()) / max(1, n_hist)


def _waste(all_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Groups dropped or cancelled over the groups generated (received by the trainer plus
    cancelled by the worker), wasted tokens over generated tokens (the run's books after the
    last step), the largest staleness trained, seconds held, and the eta the steps of the
    window were judged at (it moves with ``eta: auto``)."""
    last = all_rows[-1]
    received = sum(int(x["groups"]) for x in all_rows)
    cancelled = int(last.get("cancelled_total") or 0)
    dropped = int(last["dropped_total"])
    etas = [int(x["eta"]) for x in rows if x.get("eta") is not None]
    return {
        "groups_received": received,
        "cancelled": cancelled,
        "dropped_or_cancelled_share": (dropped + cancelled) / max(1, received + cancelled),
        "waste_share": last.get("waste_share"),
        "wasted_tokens": last.get("wasted_tokens"),
        "generated_tokens": last.get("generated_tokens"),
        "max_staleness_trained": max(
            (
                int(x["staleness_max_trained"])
                for x in all_rows
                if x.get("staleness_max_trained") is not None
            ),
            default=None,
        ),
        "hold_s": sum(float(x.get("hold_s") or 0.0) for x in rows),
        "eta_mean": sum(etas) / len(etas) if etas else None,
        "eta_max_used": max(etas) if etas else None,
        "eta_last": etas[-1] if etas else None,
    }


def _pipeline_result(
    s: Setup,
    eta: int | str,
    run: str,
    all_rows: list[dict[str, Any]],
    seen: _Sampled,
    redis: dict[str, Any],
    wm: dict[str, str],
) -> dict[str, Any]:
    """One run's JSON object (``runs[i]`` of the bench's output)."""
    rates, rows, w0, w1, span = _rates(s, all_rows, seen.produced)
    tail_rows = all_rows[-max(1, len(all_rows) // 5) :]
    return {
        "eta": eta,
        **rates,
        **_waste(all_rows, rows),
        "trainer_idle": sum(x["idle_s"] for x in rows) / span,
        "server_idle": server_idle(seen.srv, w0, w1),
        "mean_staleness": _mean_staleness(all_rows),
        "max_staleness": max(int(x["staleness_max"]) for x in all_rows),
        "dropped": int(all_rows[-1]["dropped_total"]),
        "final_reward": sum(x["reward_mean"] for x in tail_rows) / len(tail_rows),
        **redis,
        "buffer_gate_share": sum(x.get("buffer_s", 0.0) for x in rows) / span,
        "steps": len(all_rows),
        "window_s": span,
        "weight_updates": int(wm.get("updates", 0)),
        "update_latency_mean_s": float(json.loads(wm.get("update_latency_mean_s", "null")) or 0),
        "interrupted_samples": int(wm.get("interrupted_samples", 0)),
        "gate_blocked_s": float(wm.get("gate_blocked_s", 0.0)),
        "run": run,
    }
