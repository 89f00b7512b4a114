"""Show a run's policy version, staleness gate, workers and trajectory buffer, and what went
wrong: rejections by reason, dead-lettered entries by reason, each worker's liveness and last
metrics (``sluice:{run}:worker:{id}:metrics``), the trainer's last step (step/max_steps,
reward, loss, tokens/s: ``sluice:{run}:trainer:{consumer}:progress``) and the eval rewards
(``sluice:{run}:eval``).

The Redis URL comes from --redis-url, else $SLUICE_REDIS_URL, else the config default
(redis://127.0.0.1:6379/0); it is printed with its password redacted. Without --run, the only
run in that Redis is shown; if there are several, they are listed and the command exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from buffer import keys

if TYPE_CHECKING:
    import redis.asyncio as aioredis

URL_ENV = "SLUICE_REDIS_URL"


class CommandError(RuntimeError):
    """A problem the user can fix (wrong run, unreachable Redis); printed without a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_redis_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        default=None,
        help=f"Redis URL (default: ${URL_ENV}, else the config default redis://127.0.0.1:6379/0)",
    )
    p.add_argument("--run", default=None, help="run name (default: the only run in that Redis)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_redis_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (per refresh)")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes with --watch"
    )
    p.add_argument(
        "--count",
        type=int,
        default=0,
        help="with --watch: stop after this many refreshes (0 = never)",
    )


def resolve_url(args: argparse.Namespace) -> str:
    if args.redis_url:
        return str(args.redis_url)
    env = os.environ.get(URL_ENV)
    if env:
        return env
    from buffer.config import RedisConfig

    return RedisConfig.model_validate({}).url


async def connect_and_pick_run(url: str, run: str | None) -> tuple[aioredis.Redis, str]:
    """A client for ``url`` and the run to act on (``run``, or the only one there)."""
    from buffer.connection import (
        RedisAuthFailed,
        RedisUnavailable,
        check_run_name,
        connect,
        redact_url,
    )
    from staleness import list_runs

    if run is not None:
        try:
            check_run_name(run)
        except ValueError as e:
            raise CommandError(f"--run: {e}") from None
    try:
        client = await connect(url, wait_s=0)  # an operator's look: fail at once
    except (RedisAuthFailed, ValueError) as e:  # wrong credentials, a bad URL: exit 2
        raise CommandError(str(e), code=2) from None
    except RedisUnavailable as e:  # not reachable: the environment's, exit 1
        raise CommandError(str(e), code=1) from None
    try:
        runs = await list_runs(client)
        if run is None:
            if len(runs) == 1:
                return client, runs[0]
            if not runs:
                raise CommandError(f"no sluice run in Redis at {redact_url(url)}")
            raise CommandError(
                f"{len(runs)} runs in Redis at {redact_url(url)}; pick one with --run:\n  "
                + "\n  ".join(runs)
            )
        if run not in runs:
            listed = ", ".join(runs) if runs else "none"
            raise CommandError(
                f"no run {run!r} in Redis at {redact_url(url)} (runs there: {listed})"
            )
        return client, run
    except BaseException:
        await client.aclose()
        raise


async def collect(client: aioredis.Redis, run: str, url: str) -> dict[str, Any]:
    """The snapshot and buffer stats of ``run`` as one JSON-able object."""
    from buffer import RedisTrajectoryBuffer, redact_url
    from staleness import VersionManager

    vm = await VersionManager.from_client(client, run)
    snap = (await vm.snapshot()).as_dict()
    buf = RedisTrajectoryBuffer(client, run)
    snap["buffer"] = (await buf.stats()).as_dict()
    snap["redis"] = redact_url(url)
    snap["dead_letters"] = _dead_letter_summary(await buf.dead_letters(count=DEAD_LETTERS_READ))
    snap["worker_metrics"] = await _worker_metrics(client, run, snap)
    snap["eval"] = await _evals(client, run)
    snap["trainer"] = await _trainer_progress(client, run)
    ended = await vm.run_finished()
    snap["run_finished"] = ended.as_dict() if ended is not None else None
    w = await vm.waste()
    gen = w.generated_tokens
    snap["waste"] = {
        "generated_tokens": gen,
        "wasted_tokens": w.wasted_tokens,
        "share": w.wasted_tokens / gen if gen else 0.0,
        "wasted_tokens_by": w.wasted_by(),
        "gate_refusals": w.refused,
    }
    snap["eta_changes"] = await vm.eta_changes(count=ETA_CHANGES_SHOWN)
    snap["filtered"] = filtered_summary(snap.get("rejected_by") or {})
    return snap


ETA_CHANGES_SHOWN = 5
"""Newest changes ``staleness.eta: auto`` made, shown with their measurements."""


def eta_text(d: dict[str, Any]) -> str:
    """The run's eta: ``2``, or ``auto: 3 (eta_max 8)``, with a lowering in progress."""
    text = str(d["eta"])
    auto = d.get("eta_auto")
    if auto:
        text = f"auto: {d['eta']} (eta_max {auto.get('eta_max')}, idle target "
        text += f"{auto.get('idle_target')}, waste target {auto.get('waste_target')})"
    if d.get("eta_admit") is not None:
        text += f"; lowering: admission already at {d['eta_admit']}, the bound follows"
    return text


def eta_change_text(c: dict[str, Any]) -> str:
    """One change of ``eta: auto`` with the measurements behind it."""
    what = f"admission -> {c['admit']}" if "admit" in c else f"{c.get('from')} -> {c.get('to')}"
    parts = [f"step {c.get('trainer_step', '?')}: {what}", str(c.get("rule", ""))]
    for k in ("idle_share", "hold_share", "waste_share", "gate_refusals"):
        if k in c:
            parts.append(f"{k} {c[k]}")
    return ", ".join(p for p in parts if p)


def waste_text(w: dict[str, Any] | None) -> str:
    """``0.12% of 88,457 generated tokens (rejected:cancelled_stale=80, dropped:stale=27)``."""
    if not w:
        return "-"
    by = ", ".join(f"{k}={v:,}" for k, v in sorted(w["wasted_tokens_by"].items()))
    return f"{w['share']:.2%} of {w['generated_tokens']:,} generated tokens" + (
        f" ({by})" if by else ""
    )


REWARD_FAILURES = ("reward_error", "reward_timeout", "reward_nonfinite")
"""The reasons a group is handed back with when its reward failed (``rollout_workers.rewards``)."""


def filtered_summary(rejected_by: dict[str, Any]) -> dict[str, int]:
    """From the gate's hand-back counts: ``zero_variance`` (groups dynamic sampling dropped)
    and ``reward_errors`` (groups whose reward raised, timed out or was not finite)."""
    return {
        "zero_variance": int(rejected_by.get("zero_variance", 0)),
        "reward_errors": sum(int(rejected_by.get(r, 0)) for r in REWARD_FAILURES),
    }


DEAD_LETTERS_READ = 1000
"""Newest dead-lettered entries summarised by ``sluice status`` (by reason, newest 5 listed)."""


def _reason_head(reason: str) -> str:
    """A dead-letter reason without its entry-specific detail: the text before the first
    colon-and-space after the ``group``/``array`` prefix, capped at 80 characters."""
    head = reason
    for prefix in ("group: ",):
        if head.startswith(prefix):
            head = head[len(prefix) :]
    head = head.split(": ", 1)[0]
    return head[:80]


def _dead_letter_summary(rows: list[dict[str, str]]) -> dict[str, Any]:
    by: dict[str, int] = {}
    for r in rows:
        h = _reason_head(r["reason"])
        by[h] = by.get(h, 0) + 1
    return {"by_reason": by, "recent": rows[:5], "read": len(rows)}


async def _worker_metrics(
    client: aioredis.Redis, run: str, snap: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each worker's last metrics write (``sluice:{run}:worker:{id}:metrics``), JSON decoded,
    with ``age_s``: seconds since it was written (Redis clock), and its ``liveness`` as
    ``worker_liveness`` judges it against the heartbeats in ``snap`` (``last_heartbeat``: unix
    seconds, or None when unknown)."""

    prefix = keys.worker_prefix(run)
    now_s, now_us = await client.time()
    now = float(now_s) + float(now_us) / 1e6
    beats = {w["id"]: w for w in snap["workers"]}
    out: dict[str, dict[str, Any]] = {}
    async for k in client.scan_iter(match=keys.worker_metrics_glob(run), count=1000):
        name = k.decode() if isinstance(k, bytes) else str(k)
        wid = name[len(prefix) : -len(":metrics")]
        raw = await client.hgetall(k)
        m: dict[str, Any] = {}
        for f, v in raw.items():
            field = f.decode() if isinstance(f, bytes) else f
            text = v.decode(errors="replace") if isinstance(v, bytes) else v
            try:
                m[field] = json.loads(text)
            except ValueError:
                m[field] = text
        if isinstance(m.get("updated_at"), int | float):
            m["age_s"] = round(now - float(m["updated_at"]), 3)
        m["liveness"], m["last_heartbeat"] = worker_liveness(m, beats.get(wid), now)
        out[wid] = m
    return dict(sorted(out.items()))


def worker_liveness(
    metrics: dict[str, Any], beat: dict[str, Any] | None, now: float
) -> tuple[str, float | None]:
    """Whether a worker with these last ``metrics`` lives: ``alive`` (its heartbeat ``beat``,
    a ``WorkerInfo.as_dict``, has not expired), ``stopped`` (no live heartbeat, and its last
    metrics say it stopped: a clean stop deregisters the worker) or ``lost`` (no live
    heartbeat, and it never said it stopped: killed, or cut off). Also its last heartbeat
    (unix seconds at ``now``), or, once ``reap`` removed the heartbeat, its last metrics write;
    None when neither is known."""
    if beat is not None:
        last: float | None = now - float(beat["seconds_since_heartbeat"])
        if beat["alive"]:
            return "alive", last
    elif isinstance(metrics.get("updated_at"), int | float):
        last = float(metrics["updated_at"])
    else:
        last = None
    return ("stopped" if metrics.get("status") == "stopped" else "lost"), last


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t is not None else "?"


def _lost(m: dict[str, Any]) -> str:
    return f"lost (no heartbeat since {_clock(m.get('last_heartbeat'))})"


async def _evals(client: aioredis.Redis, run: str) -> list[dict[str, Any]]:
    """Eval records (``sluice:{run}:eval``: version -> JSON), by version."""

    rows = []
    for _v, raw in (await client.hgetall(keys.eval_results(run))).items():
        try:
            rows.append(json.loads(raw))
        except ValueError:
            continue
    return sorted(rows, key=lambda r: int(r.get("version", 0)))


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _gate_table(d: dict[str, Any]) -> Any:
    from rich.table import Table

    gate = Table(title=f"run {d['run']}  ({d['redis']})", show_header=False, title_justify="left")
    gate.add_column("what", style="bold")
    gate.add_column("value")
    gate.add_row("version", str(d["version"]))
    ended = d.get("run_finished")
    if ended:
        gate.add_row(
            "run",
            f"[green]finished[/green] at step {ended['step']} (v{ended['version']}, "
            f"{_age(d['time'] - ended['time'])} ago): its workers exit or wait for a new run",
        )
    gate.add_row("eta (staleness limit)", eta_text(d))
    for rec in (d.get("trainer") or {}).values():
        if rec.get("staleness_max_trained") is not None:
            gate.add_row(
                "staleness trained (last step)",
                f"max {rec['staleness_max_trained']} (eta {rec.get('eta', d['eta'])})",
            )
    gate.add_row("waste", waste_text(d.get("waste")))
    for c in d.get("eta_changes") or []:
        gate.add_row("eta change", eta_change_text(c))
    gate.add_row("batch_groups (B)", str(d["batch_groups"]))
    gate.add_row("capacity (may start now)", str(d["capacity"]))
    gate.add_row("admitted", str(d["admitted"]))
    gate.add_row("finished", str(d["finished"]))
    by = ", ".join(f"{k}={v}" for k, v in sorted(d["rejected_by"].items()))
    gate.add_row("rejected", f"{d['rejected']}" + (f"  ({by})" if by else ""))
    f = d.get("filtered") or {}
    if f.get("zero_variance") or f.get("reward_errors"):
        gate.add_row(
            "filtered / reward errors",
            f"{f.get('zero_variance', 0)} zero-variance groups dropped (dynamic sampling), "
            f"{f.get('reward_errors', 0)} groups whose reward failed",
        )
    gate.add_row("in flight", str(d["inflight"]))
    if d["late"]:
        gate.add_row("late (after reap)", str(d["late"]))
    w = d["weights"]
    if w:
        gate.add_row(
            "weights",
            f"v{w['version']} {w['fmt']} {w['location']} ({_age(d['time'] - w['time'])} ago)",
        )
    else:
        gate.add_row("weights", "none published (version 0 = initial weights)")
    b = d["buffer"]
    gate.add_row(
        "buffer",
        f"length {b['length']}, pending {b['pending']}, dead-letter {b['dead_letter']}, "
        f"{b['bytes'] / 1e6:.2f} MB",
    )
    return gate


def _workers_table(d: dict[str, Any]) -> Any:
    """Heartbeats (alive, or expired: reap pending), slot holders that never heart-beat, then
    the workers known only from their last metrics: stopped (a clean stop deregisters) or
    lost (reaped, or expired and gone)."""
    from rich.table import Table

    workers = Table(title="workers", title_justify="left")
    for col in ("id", "in flight", "last heartbeat", "state"):
        workers.add_column(col)
    for wk in d["workers"]:
        workers.add_row(
            wk["id"],
            str(wk["inflight"]),
            f"{_age(wk['seconds_since_heartbeat'])} ago",
            "alive" if wk["alive"] else "[red]expired (reap pending)[/red]",
        )
    holders = {wk["id"] for wk in d["workers"]}
    for wid, n in sorted(d["inflight_by_worker"].items()):
        if wid not in holders:
            workers.add_row(wid, str(n), "never", "[red]no heartbeat (reap pending)[/red]")
    gone = {
        wid: m
        for wid, m in (d.get("worker_metrics") or {}).items()
        if wid not in holders and wid not in d["inflight_by_worker"]
    }
    for wid, m in gone.items():
        last = m.get("last_heartbeat")
        workers.add_row(
            wid,
            "0",
            f"{_age(max(0.0, d['time'] - last))} ago" if last is not None else "?",
            "stopped" if m.get("liveness") == "stopped" else f"[red]{_lost(m)}[/red]",
        )
    if not d["workers"] and not d["inflight_by_worker"] and not gone:
        workers.add_row("(none)", "", "", "")
    return workers


def _dead_letters_table(dl: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="dead-lettered entries (newest first)", title_justify="left")
    t.add_column("reason")
    t.add_column("count")
    for reason, n in sorted(dl["by_reason"].items(), key=lambda kv: -kv[1]):
        t.add_row(reason, str(n))
    for r in dl.get("recent", []):
        t.add_row(f"[dim]{r['entry']}: {r['reason'][:100]}[/dim]", "")
    return t


def _worker_metrics_table(wm: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="worker metrics (last write)", title_justify="left")
    for col in ("id", "status", "pushed", "rejected", "tok/s", "version", "servers", "age"):
        t.add_column(col)
    for wid, m in wm.items():
        rej = m.get("rejected_by") or {}
        rej_s = str(m.get("groups_rejected", 0))
        if rej:
            rej_s += " (" + ", ".join(f"{k}={v}" for k, v in sorted(rej.items())) + ")"
        servers = m.get("servers") or []
        alive = sum(1 for s in servers if isinstance(s, dict) and s.get("alive"))
        status = str(m.get("status", "?"))
        if m.get("liveness") == "lost":  # its last write says running, but it is gone
            status = f"[red]{_lost(m)}[/red]"
        t.add_row(
            wid,
            status,
            str(m.get("groups_pushed", 0)),
            rej_s,
            str(m.get("tokens_per_s", "")),
            str(m.get("version", "")),
            f"{alive}/{len(servers)} alive",
            _age(float(m["age_s"])) + " ago" if "age_s" in m else "?",
        )
    return t


def _eval_table(ev: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="eval", title_justify="left")
    for col in ("version", "greedy reward", "sampled reward", "prompts", "worker"):
        t.add_column(col)
    for r in ev[-10:]:
        t.add_row(
            str(r.get("version")),
            f"{r.get('greedy_reward', float('nan')):.3f}",
            f"{r.get('sampled_reward', float('nan')):.3f}",
            str(r.get("prompts", "")),
            str(r.get("worker", "")),
        )
    return t


async def _trainer_progress(client: aioredis.Redis, run: str) -> dict[str, dict[str, Any]]:
    """Each trainer's latest step summary (``keys.trainer_progress``, written by its rank 0
    after every step: ``trainer.metrics.progress_record``) by consumer name, with ``age_s``:
    seconds since it was written (Redis clock)."""
    now_s, now_us = await client.time()
    now = float(now_s) + float(now_us) / 1e6
    glob = keys.trainer_progress_glob(run)
    prefix, suffix = glob.split("*")
    out: dict[str, dict[str, Any]] = {}
    async for k in client.scan_iter(match=glob, count=1000):
        name = k.decode() if isinstance(k, bytes) else str(k)
        raw = await client.get(k)
        try:
            rec = json.loads(raw) if raw is not None else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("time"), int | float):
            rec["age_s"] = round(now - float(rec["time"]), 3)
        out[name[len(prefix) : -len(suffix)]] = rec
    return dict(sorted(out.items()))


def _num_text(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def trainer_line(rec: dict[str, Any]) -> str:
    """One trainer's progress in a line: ``step 12/200 v12 reward 0.412±0.1 loss 0.0123 ...``."""
    ms = rec.get("max_steps")
    line = f"step {rec.get('step', '?')}/{ms if ms is not None else '∞'} v{rec.get('version', '?')}"
    line += f" reward {_num_text(rec.get('reward_mean'), '.3f')}"
    if isinstance(rec.get("reward_std"), int | float):
        line += f"±{rec['reward_std']:.3f}"
    line += f" loss {_num_text(rec.get('loss'), '.4f')}"
    line += f" tok/s {_num_text(rec.get('tokens_per_s'), '.0f')}"
    line += f" dropped {rec.get('dropped_total') if rec.get('dropped_total') is not None else '-'}"
    if rec.get("staleness_max_trained") is not None:
        line += f" stale trained max {rec['staleness_max_trained']} (eta {rec.get('eta', '?')})"
    if isinstance(rec.get("waste_share"), int | float):
        line += f" waste {rec['waste_share']:.2%}"
    return line


def _trainer_table(tr: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="trainer (last step)", title_justify="left")
    for col in ("consumer", "state", "progress", "host/pid", "age"):
        t.add_column(col)
    for consumer, rec in tr.items():
        state = str(rec.get("state", "?"))
        t.add_row(
            consumer,
            state,
            trainer_line(rec),
            f"{rec.get('host', '?')}/{rec.get('pid', '?')}",
            _age(float(rec["age_s"])) + " ago" if "age_s" in rec else "?",
        )
    return t


def render(d: dict[str, Any]) -> Any:
    """Rich renderables for one status object: the gate, the workers, then (when there are
    any) dead letters, worker metrics and eval results."""
    from rich.console import Group

    parts: list[Any] = [_gate_table(d), _workers_table(d)]
    if d.get("trainer"):
        parts.insert(1, _trainer_table(d["trainer"]))
    dl = d.get("dead_letters") or {}
    if dl.get("by_reason"):
        parts.append(_dead_letters_table(dl))
    wm = d.get("worker_metrics") or {}
    if wm:
        parts.append(_worker_metrics_table(wm))
    ev = d.get("eval") or []
    if ev:
        parts.append(_eval_table(ev))
    return Group(*parts)


async def _main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from staleness import RunNotFound

    url = resolve_url(args)
    if args.interval <= 0:
        raise CommandError(f"--interval={args.interval} must be > 0 seconds")
    client, run = await connect_and_pick_run(url, args.run)
    console = Console()
    try:
        if not args.watch:
            d = await collect(client, run, url)
            if args.json:
                print(json.dumps(d, sort_keys=True))
            else:
                console.print(render(d))
            return 0
        n = 0
        if args.json:
            while True:
                print(json.dumps(await collect(client, run, url), sort_keys=True), flush=True)
                n += 1
                if args.count and n >= args.count:
                    return 0
                await asyncio.sleep(args.interval)
        with Live(
            render(await collect(client, run, url)), console=console, auto_refresh=False
        ) as live:
            n = 1
            while not args.count or n < args.count:
                await asyncio.sleep(args.interval)
                live.update(render(await collect(client, run, url)), refresh=True)
                n += 1
        return 0
    except RunNotFound as e:
        raise CommandError(str(e)) from None
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    from buffer.connection import RedisUnavailable

    try:
        return asyncio.run(_main(args))
    except CommandError as e:
        print(f"sluice status: {e}", file=sys.stderr)
        return e.code
    except RedisUnavailable as e:  # its message carries the URL redacted
        print(f"sluice status: {e}", file=sys.stderr)
        return 2
